//! Device-resident delivery: the received slots a dispatch left in a rank's workspace turned
//! into the Standard format's separate tensors on the GPU (`moe_deliver_standard` in
//! kernels/copy.cu), so `prepare` hands the experts device tensors without the host reading
//! anything. The buffers are allocated once, at construction; a delivery is valid until the
//! next dispatch of its backend.

use std::sync::Arc;

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use moe_core::{Activations, DType, DispatchLayout, Dispatched, MoeError, ScaleLayout, Tensor, quant::swizzle};

use crate::buffer::DeviceBuffer;
use crate::device::CudaDevice;
use crate::driver::driver;
use crate::error::KernelError;
use crate::source::{DELIVER_STANDARD, Module, QuantSpec, SWIZZLE_128X4};
use crate::tensor::device_tensor;

/// Threads per block of the delivery kernel.
const BLOCK: u32 = 256;
/// Most blocks the delivery kernel uses (one row per block at a time).
const MAX_BLOCKS: u32 = 1056;

/// Mirrors `struct DeliverParams` in copy.cu field for field (`repr(C)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct DeliverParams {
    slots: u64,
    counts: u64,
    payload: u64,
    scales: u64,
    ids: u64,
    weights: u64,
    owner: u64,
    status: u64,
    status_mirror: u64,
    counts_stride: i32,
    sources: i32,
    segment: i32,
    rows: i32,
    slot_bytes: i32,
    payload_bytes: i32,
    scales_offset: i32,
    scale_bytes: i32,
    ids_offset: i32,
    weights_offset: i32,
    top_k: i32,
    num_experts: i32,
    me: i32,
}

// The kernel's `static_assert` checks the same size, so a field added on one side only fails to
// build instead of shifting the others.
const _: () = assert!(std::mem::size_of::<DeliverParams>() == 128);

// SAFETY: plain old data with the C layout of the kernel's struct; passed by value.
unsafe impl DeviceRepr for DeliverParams {}

/// Where a dispatch left its rows, in device memory.
#[derive(Clone, Copy, Debug)]
pub struct ReceivedSlots {
    /// Row `r`'s slot at `slots + r * slot_bytes`.
    pub slots: u64,
    /// The `u32` row count of each source, `counts_stride` words apart.
    pub counts: u64,
    pub counts_stride: usize,
    pub sources: usize,
    /// `Some(max)`: `max` rows per source, row `s * max + t` filled when `t < count[s]`.
    /// `None`: rows dense in source order, filled below the sum of the counts.
    pub rows_per_source: Option<usize>,
    /// How the sources' ids are checked: a filled row whose ids are not all -1 or experts of
    /// this rank is delivered as padding, and the status records its source.
    pub ids: IdCheck,
}

/// What a received row's ids are checked against, and where a foreign one is reported.
#[derive(Clone, Copy, Debug)]
pub struct IdCheck {
    /// `[num_experts]` i32: each expert's EP rank.
    pub owner: u64,
    pub num_experts: usize,
    /// This rank.
    pub me: usize,
    /// The rank's status word (`u32[2]`) and its host-mapped mirror (`status::KernelStatus`).
    pub status: u64,
    pub status_mirror: u64,
}

/// The Standard delivery's tensors on one GPU: `[rows, payload]`, scales (linear
/// `[rows, scale_bytes]` or the 128x4 swizzle of that matrix), `[rows, top_k]` ids and weights.
#[derive(Debug)]
pub struct StandardDelivery {
    gpu: Arc<CudaDevice>,
    layout: DispatchLayout,
    rows: usize,
    scale_layout: Option<ScaleLayout>,
    payload: Arc<DeviceBuffer>,
    scales: Arc<DeviceBuffer>,
    swizzled: Option<Arc<DeviceBuffer>>,
    ids: Arc<DeviceBuffer>,
    weights: Arc<DeviceBuffer>,
}

fn narrow(x: usize) -> Result<i32, KernelError> {
    i32::try_from(x).map_err(|_| KernelError::InvalidArgument(format!("{x} does not fit the kernel's 32-bit sizes")))
}

impl StandardDelivery {
    /// Buffers for `rows` rows of `layout` (allocates: construct before any rank's kernels
    /// wait on peers). `scale_layout` is what the experts consume, `None` for schemes without
    /// scales.
    pub fn new(
        gpu: &Arc<CudaDevice>,
        layout: DispatchLayout,
        rows: usize,
        scale_layout: Option<ScaleLayout>,
    ) -> Result<Self, KernelError> {
        let alloc = |bytes: usize| DeviceBuffer::zeroed(gpu, bytes).map(Arc::new);
        let (pb, sb, k) = (layout.wire.payload_bytes, layout.wire.scale_bytes, layout.top_k);
        let swizzled = match scale_layout {
            Some(ScaleLayout::Swizzled128x4) => Some(alloc(swizzle::swizzled_len(rows, layout.wire.scales_per_token))?),
            _ => None,
        };
        gpu.preload(&Module::Copy)?;
        if swizzled.is_some() {
            gpu.preload_swizzle()?;
        }
        Ok(StandardDelivery {
            gpu: gpu.clone(),
            layout,
            rows,
            scale_layout,
            payload: alloc(rows * pb)?,
            scales: alloc(rows * sb)?,
            swizzled,
            ids: alloc(rows * k * 4)?,
            weights: alloc(rows * k * 4)?,
        })
    }

    /// Enqueues the delivery of `from` (and the scales' swizzle, when the experts want it) on
    /// the GPU's stream, after the dispatch that filled the slots.
    ///
    /// # Safety
    /// `from` must describe live device memory on (or reachable from) this GPU: `rows` slots of
    /// this delivery's layout and the counts.
    pub unsafe fn launch(&self, from: &ReceivedSlots) -> Result<(), KernelError> {
        let d = &self.layout;
        let p = DeliverParams {
            slots: from.slots,
            counts: from.counts,
            payload: self.payload.ptr(),
            scales: self.scales.ptr(),
            ids: self.ids.ptr(),
            weights: self.weights.ptr(),
            owner: from.ids.owner,
            status: from.ids.status,
            status_mirror: from.ids.status_mirror,
            counts_stride: narrow(from.counts_stride)?,
            sources: narrow(from.sources)?,
            segment: narrow(from.rows_per_source.unwrap_or(0))?,
            rows: narrow(self.rows)?,
            slot_bytes: narrow(d.slot_bytes())?,
            payload_bytes: narrow(d.wire.payload_bytes)?,
            scales_offset: narrow(d.scales_offset())?,
            scale_bytes: narrow(d.wire.scale_bytes)?,
            ids_offset: narrow(d.ids_offset())?,
            weights_offset: narrow(d.weights_offset())?,
            top_k: narrow(d.top_k)?,
            num_experts: narrow(from.ids.num_experts)?,
            me: narrow(from.ids.me)?,
        };
        let f = self.gpu.function(&Module::Copy, DELIVER_STANDARD)?;
        let cfg = LaunchConfig {
            grid_dim: ((self.rows as u32).clamp(1, MAX_BLOCKS), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.gpu.stream().launch_builder(&f);
        b.arg(&p);
        // SAFETY: the kernel takes one DeliverParams by value; this delivery's buffers hold
        // `rows` rows of each output and the caller guarantees the inputs (this function's
        // contract).
        unsafe { b.launch(cfg) }.map_err(driver(DELIVER_STANDARD))?;
        if let Some(swizzled) = &self.swizzled {
            // SAFETY: `scales` holds the linear [rows, scales_per_token] matrix and `swizzled`
            // its swizzled_len bytes, both allocated for `rows` in `new`.
            unsafe {
                self.gpu
                    .swizzle_128x4_raw(self.scales.ptr(), self.rows, d.wire.scales_per_token, swizzled.ptr())
            }?;
        }
        Ok(())
    }

    /// The delivery as device tensors (views of this delivery's buffers, overwritten by the
    /// next launch).
    pub fn dispatched(&self) -> moe_core::Result<Dispatched> {
        let d = &self.layout;
        let (rows, k) = (self.rows, d.top_k);
        standard_tensors(
            d,
            self.scale_layout,
            device_tensor(&self.payload, 0, DType::U8, &[rows, d.wire.payload_bytes])?,
            device_tensor(&self.scales, 0, DType::U8, &[rows, d.wire.scale_bytes])?,
            self.swizzled.as_ref(),
            device_tensor(&self.ids, 0, DType::I32, &[rows, k])?,
            device_tensor(&self.weights, 0, DType::F32, &[rows, k])?,
        )
    }
}

/// The Standard format's device tensors of `d`: `payload` `[rows, payload_bytes]`, `ids` and
/// `weights` `[rows, top_k]`, and the scales the experts consume, `linear_scales`
/// (`[rows, scale_bytes]`) or, with `Swizzled128x4`, all of `swizzled`. Shared by every
/// delivery that hands out device buffers, so they build the same `Dispatched`.
pub fn standard_tensors(
    d: &DispatchLayout,
    scale_layout: Option<ScaleLayout>,
    payload: Tensor,
    linear_scales: Tensor,
    swizzled: Option<&Arc<DeviceBuffer>>,
    ids: Tensor,
    weights: Tensor,
) -> moe_core::Result<Dispatched> {
    let scales = match (scale_layout, swizzled) {
        (None, _) => None,
        (Some(ScaleLayout::Linear), _) => Some((linear_scales, ScaleLayout::Linear)),
        (Some(ScaleLayout::Swizzled128x4), Some(swizzled)) => Some((
            device_tensor(swizzled, 0, DType::U8, &[swizzled.bytes()])?,
            ScaleLayout::Swizzled128x4,
        )),
        (Some(ScaleLayout::Swizzled128x4), None) => {
            return Err(MoeError::Device(
                "moe invariant violated: swizzled scales without their buffer".to_string(),
            ));
        }
    };
    Ok(Dispatched::Standard {
        activations: Activations::new(d.scheme, payload, scales),
        topk_ids: ids,
        topk_weights: weights,
    })
}

/// The swizzle does not depend on the quantization specialization; any valid one holds it.
fn swizzle_spec() -> QuantSpec {
    QuantSpec {
        scheme: moe_quant::QuantScheme::Nvfp4,
        hidden: 128,
        input_bf16: true,
    }
}

impl CudaDevice {
    /// Compiles and loads the kernel of [`Self::swizzle_128x4_raw`] (at construction, never on
    /// a call's path).
    pub fn preload_swizzle(&self) -> Result<(), KernelError> {
        self.preload(&Module::Quant(swizzle_spec()))
    }

    /// Enqueues the 128x4 swizzle of the row-major `[rows, cols]` matrix at `src` into `dst`.
    ///
    /// # Safety
    /// `src` must hold `rows * cols` bytes and `dst` `swizzled_len(rows, cols)` bytes, on this
    /// device.
    pub unsafe fn swizzle_128x4_raw(&self, src: u64, rows: usize, cols: usize, dst: u64) -> Result<(), KernelError> {
        let f = self.function(&Module::Quant(swizzle_spec()), SWIZZLE_128X4)?;
        let len = swizzle::swizzled_len(rows, cols);
        let (r, c) = (narrow(rows)?, narrow(cols)?);
        let cfg = LaunchConfig {
            grid_dim: (len.div_ceil(256).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream().launch_builder(&f);
        b.arg(&src).arg(&r).arg(&c).arg(&dst);
        // SAFETY: matches `moe_swizzle_128x4(const u8*, int, int, u8*)`; the caller guarantees
        // both ranges.
        unsafe { b.launch(cfg) }.map_err(driver(SWIZZLE_128X4))?;
        Ok(())
    }
}
