//! Device-resident BatchedExperts format (`kernels/batched.cu`): a rank's received Standard
//! rows regrouped expert-major on the GPU, exactly as [`ReceivedRows::into_batched`] does on the
//! host, and the combine-side sum of the experts' batched rows back into one row per received
//! row, bit-identical with [`reduce_batched`]. With both, a backend hands batched experts device
//! tensors and combines their output without the host reading anything.
//!
//! Buffers are allocated and kernels loaded once, at construction; [`BatchedDelivery::launch`]
//! and [`BatchedDelivery::reduce`] only enqueue kernels on the GPU's stream (no allocation, no
//! host synchronization), so they can be captured in a CUDA graph with the backend's kernels.
//! A delivery is valid until the next launch.
//!
//! [`ReceivedRows::into_batched`]: moe_core::slots::ReceivedRows::into_batched
//! [`reduce_batched`]: moe_core::slots::reduce_batched

use std::sync::Arc;

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use moe_core::{Activations, DType, DispatchLayout, Dispatched, ExpertPlacement, ScaleLayout, quant::swizzle};

use crate::buffer::DeviceBuffer;
use crate::device::CudaDevice;
use crate::driver::driver;
use crate::error::KernelError;
use crate::source::{BATCHED_COPY, BATCHED_COUNT, BATCHED_PLACE, BATCHED_REDUCE, Module};
use crate::tensor::device_tensor;

/// Most top-k slots per row (`MOE_BATCHED_MAX_TOP_K`: the reduction stages a row's slots in
/// shared memory).
pub const MAX_TOP_K: usize = 64;
/// Rows per block of the count and place kernels (`MOE_BATCHED_CHUNK`, their block size: the
/// ordered scan gives each thread one row).
const CHUNK: usize = 512;
/// Threads per block of the copy and reduce kernels (one received row per block at a time; at
/// least [`MAX_TOP_K`], which the reduction stages one slot per thread).
const BLOCK: u32 = 256;
/// Most blocks of the copy and reduce kernels (8 per SM of an H100/H200); more rows grid-stride.
const MAX_BLOCKS: usize = 1056;
/// Most local experts: the count and place grids have one row of blocks per expert.
const MAX_LOCAL_EXPERTS: usize = 65535;

/// `BatchedParams::scale_mode` in batched.cu.
const NO_SCALES: i32 = 0;
const LINEAR_SCALES: i32 = 1;
const SWIZZLED_SCALES: i32 = 2;

/// Mirrors `struct BatchedParams` in batched.cu field for field (`repr(C)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct BatchedParams {
    payload_in: u64,
    scales_in: u64,
    ids_in: u64,
    weights_in: u64,
    payload_in_stride: u64,
    scales_in_stride: u64,
    ids_in_stride: u64,
    weights_in_stride: u64,
    local_of: u64,
    chunk_counts: u64,
    slot_row: u64,
    payload: u64,
    scales: u64,
    counts: u64,
    weights: u64,
    rows: i32,
    top_k: i32,
    num_experts: i32,
    local_experts: i32,
    chunks: i32,
    payload_bytes: i32,
    scale_bytes: i32,
    scales_per_token: i32,
    scale_mode: i32,
}

// SAFETY: plain old data with the C layout of the kernel's struct; passed by value.
unsafe impl DeviceRepr for BatchedParams {}
// batched.cu asserts the same size.
const _: () = assert!(std::mem::size_of::<BatchedParams>() == 160);

/// Mirrors `struct ReduceParams` in batched.cu field for field (`repr(C)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ReduceParams {
    expert_output: u64,
    dst: u64,
    dst_row_stride: u64,
    slot_row: u64,
    rows: i32,
    top_k: i32,
    hidden: i32,
    bf16: i32,
}

// SAFETY: plain old data with the C layout of the kernel's struct; passed by value.
unsafe impl DeviceRepr for ReduceParams {}
// batched.cu asserts the same size.
const _: () = assert!(std::mem::size_of::<ReduceParams>() == 48);

/// Received rows in the Standard format in device memory, each field of row `r` at
/// `field + r * field_stride` bytes: `payload_bytes` of payload, `scale_bytes` of linear scales
/// (unused for schemes without scales), `top_k` i32 ids and `top_k` f32 weights of the
/// [`DispatchLayout`]. Strides let one description cover whole dispatch slots
/// ([`StandardRows::slot_major`]) and separate arrays ([`StandardRows::field_major`], such as
/// nvlink-one-sided's receive regions) alike.
///
/// Rows no token filled have all ids `-1`; every other id is `-1` or an expert this rank owns
/// (the id convention of `moe_core::contract`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandardRows {
    pub payload: u64,
    pub payload_stride: usize,
    pub scales: u64,
    pub scales_stride: usize,
    pub ids: u64,
    pub ids_stride: usize,
    pub weights: u64,
    pub weights_stride: usize,
    pub rows: usize,
}

impl StandardRows {
    /// `rows` whole dispatch slots of `layout`, row `r` at `slots + r * slot_bytes()`: how
    /// a dispatch leaves them in a workspace.
    pub fn slot_major(slots: u64, layout: &DispatchLayout, rows: usize) -> Self {
        let stride = layout.slot_bytes();
        StandardRows {
            payload: slots + layout.payload_offset() as u64,
            payload_stride: stride,
            scales: slots + layout.scales_offset() as u64,
            scales_stride: stride,
            ids: slots + layout.ids_offset() as u64,
            ids_stride: stride,
            weights: slots + layout.weights_offset() as u64,
            weights_stride: stride,
            rows,
        }
    }

    /// Dense `[rows, payload_bytes]`, `[rows, scale_bytes]`, `[rows, top_k]` i32 and
    /// `[rows, top_k]` f32 arrays of `layout`.
    pub fn field_major(
        payload: u64,
        scales: u64,
        ids: u64,
        weights: u64,
        layout: &DispatchLayout,
        rows: usize,
    ) -> Self {
        StandardRows {
            payload,
            payload_stride: layout.wire.payload_bytes,
            scales,
            scales_stride: layout.wire.scale_bytes,
            ids,
            ids_stride: 4 * layout.top_k,
            weights,
            weights_stride: 4 * layout.top_k,
            rows,
        }
    }
}

/// The BatchedExperts delivery's tensors on one GPU: `[local_experts, rows, payload_bytes]`,
/// scales (linear `[local_experts, rows, scale_bytes]` or each expert's `[rows,
/// scales_per_token]` matrix in the 128x4 swizzle), `[local_experts]` i32 counts and
/// `[local_experts, rows]` f32 weights; plus the batched row of each received (row, slot), which
/// the reduction sums.
#[derive(Debug)]
pub struct BatchedDelivery {
    gpu: Arc<CudaDevice>,
    layout: DispatchLayout,
    rows: usize,
    local_experts: usize,
    num_experts: usize,
    scale_layout: Option<ScaleLayout>,
    /// `[num_experts]` i32: local index on this rank, `-1` for the other ranks' experts.
    local_of: DeviceBuffer,
    /// `[local_experts, chunks]` i32 matches per chunk of rows, from the count to the place pass.
    chunk_counts: DeviceBuffer,
    /// `[rows, top_k]` i32: the batched row of each received (row, slot), `-1` for no local
    /// expert (all `-1` until the first launch, so a reduction before it writes zeros).
    slot_row: Arc<DeviceBuffer>,
    payload: Arc<DeviceBuffer>,
    scales: Arc<DeviceBuffer>,
    counts: Arc<DeviceBuffer>,
    weights: Arc<DeviceBuffer>,
}

fn narrow(x: usize) -> Result<i32, KernelError> {
    i32::try_from(x).map_err(|_| KernelError::InvalidArgument(format!("{x} does not fit the kernel's 32-bit sizes")))
}

fn invalid(detail: String) -> KernelError {
    KernelError::InvalidArgument(format!("BatchedDelivery: {detail}"))
}

impl BatchedDelivery {
    /// Buffers for `rows` received rows of `layout` on rank `rank` of `placement` (allocates
    /// and loads the kernels: construct before any rank's kernels wait on peers).
    /// `scale_layout` is what the experts consume, `None` exactly for schemes without scales.
    ///
    /// # Errors
    ///
    /// A rank outside the placement, a scale layout the scheme does not have (or a swizzle of
    /// scales wider than a byte), `top_k` above [`MAX_TOP_K`], sizes beyond the kernels' `i32`
    /// indices, and driver or NVRTC failures.
    pub fn new(
        gpu: &Arc<CudaDevice>,
        layout: DispatchLayout,
        rows: usize,
        placement: &ExpertPlacement,
        rank: usize,
        scale_layout: Option<ScaleLayout>,
    ) -> Result<Self, KernelError> {
        if rank >= placement.ep_size() {
            return Err(invalid(format!(
                "rank {rank} is outside the placement's {} ranks",
                placement.ep_size()
            )));
        }
        let (pb, sb, cols, k) = (
            layout.wire.payload_bytes,
            layout.wire.scale_bytes,
            layout.wire.scales_per_token,
            layout.top_k,
        );
        match scale_layout {
            Some(_) if !layout.scheme.has_scales() => {
                return Err(invalid(format!("{} has no scales to lay out", layout.scheme)));
            }
            None if layout.scheme.has_scales() => {
                return Err(invalid(format!(
                    "{} has scales: give the layout the experts consume",
                    layout.scheme
                )));
            }
            Some(ScaleLayout::Swizzled128x4) if sb != cols => {
                return Err(invalid(format!(
                    "the 128x4 swizzle lays out one-byte scales; {} has {sb} scale bytes for {cols} scales",
                    layout.scheme
                )));
            }
            _ => {}
        }
        if k > MAX_TOP_K {
            return Err(invalid(format!("top_k {k} is above the kernels' {MAX_TOP_K}")));
        }
        let local_experts = placement.local_count(rank);
        if local_experts > MAX_LOCAL_EXPERTS {
            return Err(invalid(format!(
                "{local_experts} local experts are above the kernels' {MAX_LOCAL_EXPERTS}"
            )));
        }
        // The kernels index batched rows, and bytes within a row, with i32.
        let batched_rows = local_experts * rows;
        for size in [batched_rows, rows * k, pb, sb, placement.num_experts()] {
            narrow(size)?;
        }
        let alloc = |bytes: usize| DeviceBuffer::zeroed(gpu, bytes);
        let scale_bytes = match scale_layout {
            None => 0,
            Some(ScaleLayout::Linear) => batched_rows * sb,
            Some(ScaleLayout::Swizzled128x4) => local_experts * swizzle::swizzled_len(rows, cols),
        };
        let local_of: Vec<u8> = (0..placement.num_experts())
            .map(|e| {
                if placement.owner(e) == rank {
                    placement.local_index(e) as i32
                } else {
                    -1
                }
            })
            .flat_map(i32::to_le_bytes)
            .collect();
        gpu.preload(&Module::Batched)?;
        Ok(BatchedDelivery {
            gpu: gpu.clone(),
            layout,
            rows,
            local_experts,
            num_experts: placement.num_experts(),
            scale_layout,
            local_of: DeviceBuffer::from_bytes(gpu, &local_of)?,
            chunk_counts: alloc(local_experts * rows.div_ceil(CHUNK) * 4)?,
            slot_row: Arc::new(DeviceBuffer::from_bytes(gpu, &vec![0xff; rows * k * 4])?),
            payload: Arc::new(alloc(batched_rows * pb)?),
            scales: Arc::new(alloc(scale_bytes)?),
            counts: Arc::new(alloc(local_experts * 4)?),
            weights: Arc::new(alloc(batched_rows * 4)?),
        })
    }

    /// Received rows per delivery, which is also the rows per local expert.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Experts this rank owns.
    pub fn local_experts(&self) -> usize {
        self.local_experts
    }

    /// Enqueues the delivery of `from` on the GPU's stream (three kernels: count, place, copy):
    /// expert `li`'s row `i` is the `i`-th received row, in row order, that lists `li`, with that
    /// slot's weight; weights from each count on are `0.0`, payload and scales there are
    /// unspecified. Where the host would misplace rows or panic, the kernels stay in bounds:
    /// ids that name no expert of this rank (which masked rows never have) are skipped, and
    /// slots past an expert's `rows` rows (only rows listing it twice get there) are dropped,
    /// its count then being `rows`.
    ///
    /// # Errors
    ///
    /// `from` with another number of rows, ids or weights not 4-byte aligned, strides shorter
    /// than their fields, missing scales, and launch failures.
    ///
    /// # Safety
    /// `from` must describe live device memory on (or reachable from) this GPU holding `rows`
    /// rows of this delivery's layout at its strides, written by work ordered before this
    /// launch on the GPU's stream, and left unchanged until the delivery has run.
    pub unsafe fn launch(&self, from: &StandardRows) -> Result<(), KernelError> {
        let d = &self.layout;
        let (pb, sb, k) = (d.wire.payload_bytes, d.wire.scale_bytes, d.top_k);
        if from.rows != self.rows {
            return Err(invalid(format!(
                "{} rows given to a delivery built for {} rows; describe all the rows the backend receives (unfilled ones with ids -1)",
                from.rows, self.rows
            )));
        }
        if !(from.ids | from.weights).is_multiple_of(4) || !(from.ids_stride | from.weights_stride).is_multiple_of(4) {
            return Err(invalid(format!(
                "ids at {:#x} (stride {}) and weights at {:#x} (stride {}) must be 4-byte aligned",
                from.ids, from.ids_stride, from.weights, from.weights_stride
            )));
        }
        let with_scales = self.scale_layout.is_some();
        let short = [
            Some(("payload", from.payload_stride, pb)),
            with_scales.then_some(("scales", from.scales_stride, sb)),
            Some(("ids", from.ids_stride, 4 * k)),
            Some(("weights", from.weights_stride, 4 * k)),
        ]
        .into_iter()
        .flatten()
        .find(|(_, stride, bytes)| stride < bytes);
        if let Some((field, stride, bytes)) = short {
            return Err(invalid(format!(
                "{field} stride {stride} is shorter than its {bytes} bytes"
            )));
        }
        if with_scales && from.scales == 0 {
            return Err(invalid("the scheme has scales but no scales were given".to_string()));
        }
        if self.rows == 0 {
            return Ok(());
        }
        let chunks = self.rows.div_ceil(CHUNK);
        let p = BatchedParams {
            payload_in: from.payload,
            scales_in: if with_scales { from.scales } else { 0 },
            ids_in: from.ids,
            weights_in: from.weights,
            payload_in_stride: from.payload_stride as u64,
            scales_in_stride: from.scales_stride as u64,
            ids_in_stride: from.ids_stride as u64,
            weights_in_stride: from.weights_stride as u64,
            local_of: self.local_of.ptr(),
            chunk_counts: self.chunk_counts.ptr(),
            slot_row: self.slot_row.ptr(),
            payload: self.payload.ptr(),
            scales: self.scales.ptr(),
            counts: self.counts.ptr(),
            weights: self.weights.ptr(),
            rows: narrow(self.rows)?,
            top_k: narrow(k)?,
            num_experts: narrow(self.num_experts)?,
            local_experts: narrow(self.local_experts)?,
            chunks: narrow(chunks)?,
            payload_bytes: narrow(pb)?,
            scale_bytes: narrow(sb)?,
            scales_per_token: narrow(d.wire.scales_per_token)?,
            scale_mode: match self.scale_layout {
                None => NO_SCALES,
                Some(ScaleLayout::Linear) => LINEAR_SCALES,
                Some(ScaleLayout::Swizzled128x4) => SWIZZLED_SCALES,
            },
        };
        let plan = |experts: usize| LaunchConfig {
            grid_dim: (chunks as u32, experts as u32, 1),
            block_dim: (CHUNK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let per_row = LaunchConfig {
            grid_dim: (self.rows.min(MAX_BLOCKS) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // Without local experts only the place pass runs, with one row of blocks, to mark
        // every slot as naming none.
        let passes = [
            (BATCHED_COUNT, plan(self.local_experts)),
            (BATCHED_PLACE, plan(self.local_experts.max(1))),
            (BATCHED_COPY, per_row),
        ];
        for (name, cfg) in passes {
            if cfg.grid_dim.1 == 0 {
                continue;
            }
            let f = self.gpu.function(&Module::Batched, name)?;
            let mut b = self.gpu.stream().launch_builder(&f);
            b.arg(&p);
            // SAFETY: each kernel takes one BatchedParams by value. Its own buffers were
            // allocated in `new` for `rows` rows of this layout, `local_experts` experts and
            // `chunks` chunks (at least one byte each, so every address is valid), the grids
            // are the shapes the kernels index by (chunks x experts blocks of CHUNK threads, or
            // any grid of at least top_k threads), and the caller guarantees the input rows
            // (this function's contract); the checks above held for the strides and alignment.
            unsafe { b.launch(cfg) }.map_err(driver(name))?;
        }
        Ok(())
    }

    /// Enqueues the combine-side sum on the GPU's stream, after the last [`Self::launch`]:
    /// `dst` row `r` (at `dst + r * dst_row_stride`, `hidden` elements of `dtype`) becomes the
    /// sum of received row `r`'s batched rows of `expert_output`, in f32 from `0.0` in
    /// ascending expert order, rounded to `dtype` to nearest even; rows that list no local
    /// expert become zeros. Bit-identical with `moe_core::slots::reduce_batched`.
    ///
    /// # Errors
    ///
    /// A dtype other than bf16 and fp16, a stride shorter than a row, addresses or a stride
    /// not 2-byte aligned, and launch failures.
    ///
    /// # Safety
    /// `expert_output` must hold `[local_experts, rows, hidden]` elements of `dtype` and `dst`
    /// `rows` rows of `dst_row_stride` bytes, live on this GPU, with no other work writing them
    /// until the reduction has run; `dst` must not overlap `expert_output`.
    pub unsafe fn reduce(
        &self,
        expert_output: u64,
        dst: u64,
        dst_row_stride: usize,
        dtype: DType,
    ) -> Result<(), KernelError> {
        let hidden = self.layout.hidden;
        let bf16 = match dtype {
            DType::Bf16 => 1,
            DType::F16 => 0,
            other => return Err(invalid(format!("the experts' output is bf16 or fp16, not {other:?}"))),
        };
        if dst_row_stride < 2 * hidden {
            return Err(invalid(format!(
                "dst row stride {dst_row_stride} is shorter than a row of {hidden} elements"
            )));
        }
        if !(expert_output | dst | dst_row_stride as u64).is_multiple_of(2) {
            return Err(invalid(format!(
                "expert output at {expert_output:#x}, dst at {dst:#x} and the stride {dst_row_stride} must be 2-byte aligned"
            )));
        }
        if self.rows == 0 {
            return Ok(());
        }
        let p = ReduceParams {
            expert_output,
            dst,
            dst_row_stride: dst_row_stride as u64,
            slot_row: self.slot_row.ptr(),
            rows: narrow(self.rows)?,
            top_k: narrow(self.layout.top_k)?,
            hidden: narrow(hidden)?,
            bf16,
        };
        let cfg = LaunchConfig {
            grid_dim: (self.rows.min(MAX_BLOCKS) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = self.gpu.function(&Module::Batched, BATCHED_REDUCE)?;
        let mut b = self.gpu.stream().launch_builder(&f);
        b.arg(&p);
        // SAFETY: the kernel takes one ReduceParams by value; `slot_row` holds `rows * top_k`
        // batched rows, each -1 or below `local_experts * rows` (initialized to -1, then written
        // only by the place pass), the block has at least `top_k` threads, and the caller
        // guarantees the input and output ranges (this function's contract).
        unsafe { b.launch(cfg) }.map_err(driver(BATCHED_REDUCE))?;
        Ok(())
    }

    /// The delivery as device tensors (views of this delivery's buffers, overwritten by the
    /// next launch), with the host's shapes.
    pub fn dispatched(&self) -> moe_core::Result<Dispatched> {
        let d = &self.layout;
        let (e, rows) = (self.local_experts, self.rows);
        let data = device_tensor(&self.payload, 0, DType::U8, &[e, rows, d.wire.payload_bytes])?;
        let scales = match self.scale_layout {
            None => None,
            Some(ScaleLayout::Linear) => Some((
                device_tensor(&self.scales, 0, DType::U8, &[e, rows, d.wire.scale_bytes])?,
                ScaleLayout::Linear,
            )),
            Some(ScaleLayout::Swizzled128x4) => Some((
                device_tensor(&self.scales, 0, DType::U8, &[self.scales.bytes()])?,
                ScaleLayout::Swizzled128x4,
            )),
        };
        Ok(Dispatched::Batched {
            activations: Activations::new(d.scheme, data, scales),
            expert_counts: device_tensor(&self.counts, 0, DType::I32, &[e])?,
            weights: device_tensor(&self.weights, 0, DType::F32, &[e, rows])?,
        })
    }

    /// `[rows, top_k]` i32: the batched row (`local_expert * rows + i`) each received (row,
    /// slot) went to in the last launch, `-1` where the slot names no local expert; what the
    /// reduction sums, and the device form of the host's per-expert source lists.
    pub fn slot_rows(&self) -> moe_core::Result<moe_core::Tensor> {
        device_tensor(&self.slot_row, 0, DType::I32, &[self.rows, self.layout.top_k])
    }
}
