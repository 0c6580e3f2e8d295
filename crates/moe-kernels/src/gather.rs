//! The device side of allgather-rs's kernels: launchers of `kernels/gather.cu` (routing rows
//! into the send buffers, EP masking of the gathered ids, and the f32 widening and narrowing
//! around the combine's reduce-scatter), with their parameter blocks mirrored in C. The
//! collectives between them are [`crate::nccl`]'s.
//!
//! The launchers only enqueue on the GPU's stream: no allocation, no wait for the GPU.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use crate::device::CudaDevice;
use crate::driver::driver;
use crate::error::KernelError;
use crate::source::{GATHER_MASK_FOREIGN, GATHER_NARROW, GATHER_ROUTING, GATHER_WIDEN, Module};

/// Threads per block of every gather kernel.
const BLOCK: u32 = 256;
/// Most blocks a gather kernel uses (8 per SM of an H100/H200); larger calls grid-stride.
const MAX_BLOCKS: u64 = 1056;

/// A grid of one thread per item, at most [`MAX_BLOCKS`] blocks.
fn grid(items: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.div_ceil(u64::from(BLOCK)).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn narrow(what: &str, x: usize) -> Result<i32, KernelError> {
    i32::try_from(x).map_err(|_| {
        KernelError::InvalidArgument(format!("{what} = {x} does not fit the gather kernels' 32-bit sizes"))
    })
}

/// Mirrors `struct GatherRoutingParams` in gather.cu field for field (`repr(C)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RoutingParams {
    ids: u64,
    weights: u64,
    out_ids: u64,
    out_weights: u64,
    status: u64,
    n_tokens: i32,
    pad_end: i32,
    top_k: i32,
    num_experts: i32,
}

// The kernel's `static_assert` checks the same size, so a field added on one side only fails to
// build instead of shifting the others.
const _: () = assert!(std::mem::size_of::<RoutingParams>() == 56);

// SAFETY: plain old data with the C layout of the kernel's struct; passed by value.
unsafe impl DeviceRepr for RoutingParams {}

/// Mirrors `struct GatherMaskParams` in gather.cu field for field (`repr(C)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct MaskParams {
    ids: u64,
    weights: u64,
    owner: u64,
    entries: u64,
    num_experts: i32,
    rank: i32,
}

// The kernel's `static_assert` checks the same size, so a field added on one side only fails to
// build instead of shifting the others.
const _: () = assert!(std::mem::size_of::<MaskParams>() == 40);

// SAFETY: plain old data with the C layout of the kernel's struct; passed by value.
unsafe impl DeviceRepr for MaskParams {}

/// One call of [`CudaDevice::gather_routing`]: this rank's top-k rows into its send buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing {
    /// `[n_tokens, top_k]` i32 ids and f32 weights (a device input, or staged host input).
    pub ids: u64,
    pub weights: u64,
    pub n_tokens: usize,
    /// The send buffers, `[max_tokens, top_k]` i32 and f32.
    pub out_ids: u64,
    pub out_weights: u64,
    /// Rows `[0, pad_end)` are written: the input's rows, then padding (ids -1, weights 0).
    /// At least `n_tokens`; the rows above it must hold padding already.
    pub pad_end: usize,
    pub top_k: usize,
    pub num_experts: usize,
    /// A `u32` that keeps the first bad row: `STATUS_BAD_ID | token`, the flag of the protocol
    /// kernels' status word ([`crate::status::STATUS_BAD_ID`]).
    pub status: u64,
}

/// One call of [`CudaDevice::gather_mask_foreign`]: the gathered ids of experts other ranks own
/// become -1 with weight 0.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskForeign {
    /// `entries` i32 ids and f32 weights, rewritten in place.
    pub ids: u64,
    pub weights: u64,
    pub entries: usize,
    /// `[num_experts]` i32: the EP rank that owns each expert.
    pub owner: u64,
    pub num_experts: usize,
    /// The EP rank whose experts stay.
    pub rank: usize,
}

impl CudaDevice {
    /// Compiles and loads the gather kernels (once per device; do it at construction, before
    /// any collective runs).
    pub fn load_gather(&self) -> Result<(), KernelError> {
        self.preload(&Module::Gather)
    }

    /// Enqueues `moe_gather_routing`: rows `[0, n_tokens)` of the input into the send buffers,
    /// each id outside `[0, num_experts)` or repeated in its row dropped (-1, weight 0) and
    /// recorded in the status word, rows `[n_tokens, pad_end)` as padding.
    ///
    /// # Safety
    /// The input must hold `n_tokens * top_k` ids and weights, the outputs `pad_end * top_k`
    /// of each, and `status` one `u32`, all on this device, and stay valid until the kernel ran.
    pub unsafe fn gather_routing(&self, r: &Routing) -> Result<(), KernelError> {
        if r.pad_end < r.n_tokens {
            return Err(KernelError::InvalidArgument(format!(
                "routing rows up to {} of {} tokens: pad_end must cover the tokens",
                r.pad_end, r.n_tokens
            )));
        }
        let entries = (r.pad_end as u64) * (r.top_k as u64);
        if entries == 0 {
            return Ok(());
        }
        let p = RoutingParams {
            ids: r.ids,
            weights: r.weights,
            out_ids: r.out_ids,
            out_weights: r.out_weights,
            status: r.status,
            n_tokens: narrow("n_tokens", r.n_tokens)?,
            pad_end: narrow("pad_end", r.pad_end)?,
            top_k: narrow("top_k", r.top_k)?,
            num_experts: narrow("num_experts", r.num_experts)?,
        };
        let f = self.function(&Module::Gather, GATHER_ROUTING)?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(&p);
        // SAFETY: the kernel takes one GatherRoutingParams by value and touches the entries
        // below pad_end * top_k (inputs below n_tokens * top_k); the caller guarantees the
        // buffers (this function's contract).
        unsafe { b.launch(grid(entries)) }.map_err(driver(GATHER_ROUTING))?;
        Ok(())
    }

    /// Enqueues `moe_gather_mask_foreign`: the id convention for `rank` over `entries` ids.
    ///
    /// # Safety
    /// `ids` and `weights` must hold `entries` values each and `owner` `num_experts` i32 ranks,
    /// on this device, valid until the kernel ran.
    pub unsafe fn gather_mask_foreign(&self, m: &MaskForeign) -> Result<(), KernelError> {
        if m.entries == 0 {
            return Ok(());
        }
        let p = MaskParams {
            ids: m.ids,
            weights: m.weights,
            owner: m.owner,
            entries: m.entries as u64,
            num_experts: narrow("num_experts", m.num_experts)?,
            rank: narrow("rank", m.rank)?,
        };
        let f = self.function(&Module::Gather, GATHER_MASK_FOREIGN)?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(&p);
        // SAFETY: the kernel takes one GatherMaskParams by value, touches `entries` ids and
        // weights and reads `owner` only at ids in [0, num_experts); the caller guarantees the
        // buffers.
        unsafe { b.launch(grid(m.entries as u64)) }.map_err(driver(GATHER_MASK_FOREIGN))?;
        Ok(())
    }

    /// Enqueues `moe_gather_widen`: `count` 16-bit values at `src` (bf16 when `bf16`, else
    /// fp16) to f32 at `dst`, exactly as `moe_core::Tensor::to_f32` widens them.
    ///
    /// # Safety
    /// `src` must hold `count` 16-bit values (2-byte aligned) and `dst` room for `count` f32
    /// (4-byte aligned), on this device, valid until the kernel ran.
    pub unsafe fn gather_widen(&self, src: u64, dst: u64, count: usize, bf16: bool) -> Result<(), KernelError> {
        // SAFETY: the caller's contract.
        unsafe { self.convert(GATHER_WIDEN, src, dst, count, bf16) }
    }

    /// Enqueues `moe_gather_narrow`: `count` f32 values at `src` to 16-bit values at `dst`
    /// rounded exactly as `moe_core::Tensor::store_f32` rounds them (a zero as +0.0, the sign a
    /// sum from +0.0 gives).
    ///
    /// # Safety
    /// `src` must hold `count` f32 (4-byte aligned) and `dst` room for `count` 16-bit values
    /// (2-byte aligned), on this device, valid until the kernel ran.
    pub unsafe fn gather_narrow(&self, src: u64, dst: u64, count: usize, bf16: bool) -> Result<(), KernelError> {
        // SAFETY: the caller's contract.
        unsafe { self.convert(GATHER_NARROW, src, dst, count, bf16) }
    }

    /// # Safety
    /// See [`Self::gather_widen`] and [`Self::gather_narrow`].
    unsafe fn convert(
        &self,
        name: &'static str,
        src: u64,
        dst: u64,
        count: usize,
        bf16: bool,
    ) -> Result<(), KernelError> {
        if count == 0 {
            return Ok(());
        }
        let f = self.function(&Module::Gather, name)?;
        let (count, bf16) = (count as u64, i32::from(bf16));
        let mut b = self.stream().launch_builder(&f);
        b.arg(&src).arg(&dst).arg(&count).arg(&bf16);
        // SAFETY: matches `(const u16*, u32*, u64, int)` / `(const u32*, u16*, u64, int)`; the
        // kernel touches `count` values of each side, which the caller guarantees.
        unsafe { b.launch(grid(count.div_ceil(8))) }.map_err(driver(name))?;
        Ok(())
    }
}
