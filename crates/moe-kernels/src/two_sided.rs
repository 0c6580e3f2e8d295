//! Launchers of the two-sided protocol kernels (`kernels/two_sided.cu`, specialized on the wire
//! scheme their dispatch quantizes to). The backend crate
//! fills [`TwoSidedParams`] from its workspace and slot layouts, so host and GPU share them.

use cudarc::driver::DeviceRepr;

use crate::device::CudaDevice;
use crate::error::KernelError;
use crate::launch::{CommGrid, combine_items};
use crate::source::{
    Module, QuantSpec, TWO_SIDED_ABANDON, TWO_SIDED_COMBINE_REDUCE, TWO_SIDED_COMBINE_SEND, TWO_SIDED_DISPATCH,
    TWO_SIDED_PLAN,
};

/// Most ranks the kernels address (`MOE_MAX_RANKS`: a token's destinations are a 64-bit mask).
pub const MAX_RANKS: usize = 64;
/// Threads per block of the copies and the reduce (dispatch, combine_send, combine_reduce):
/// each thread keeps a few 16-byte accesses in flight, and a full block of them fills an SM
/// (`__launch_bounds__(1024)`).
const COPY_BLOCK: u32 = 1024;
/// Threads of the plan kernel's single block (`MOE_PLAN_THREADS`): it numbers the sends of
/// this many tokens per step, so more threads mean fewer serial steps for large batches.
const PLAN_THREADS: u32 = 1024;

/// The kernels' parameter block; mirrors `struct TwoSidedParams` in two_sided.cu field for
/// field (`repr(C)`, same order and types, no implicit padding). Offsets are bytes; pointers are
/// device addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TwoSidedParams {
    pub peers: [u64; MAX_RANKS],
    /// `[n_tokens, hidden]` 16-bit input rows, which dispatch quantizes.
    pub tokens: u64,
    pub ids: u64,
    pub weights: u64,
    pub owner: u64,
    pub send_target: u64,
    pub send_slot: u64,
    pub done: u64,
    pub status: u64,
    pub status_mirror: u64,
    pub expert_out: u64,
    pub out: u64,
    pub dispatch_region_off: i64,
    pub combine_region_off: i64,
    pub timeout_cycles: i64,
    pub ep: i32,
    pub me: i32,
    pub max_tokens: i32,
    pub n_tokens: i32,
    pub top_k: i32,
    pub hidden: i32,
    pub input_bf16: i32,
    pub slot_bytes: i32,
    pub image_bytes: i32,
    pub weights_offset: i32,
    pub combine_slot_bytes: i32,
    pub combine_row_bytes: i32,
    pub round_off: i32,
    pub counts_off: i32,
    pub counts_flag_off: i32,
    pub data_flag_off: i32,
    pub combine_flag_off: i32,
    pub num_experts: i32,
    pub fp8_static_scale: f32,
    pub nvfp4_global_scale: f32,
    /// The layer's bits of its call words (`moe_core::call::CallId::tag`); an abandoned
    /// call's tag for [`TwoSidedStep::Abandon`].
    pub call_tag: u32,
    /// [`TwoSidedStep::Abandon`]: 1 starts a new call (the round counter's + 1), 0 abandons
    /// the call in flight.
    pub abandon_advances: u32,
}

// The kernel's `static_assert` checks the same size on the C side; an even number of 4-byte
// fields leaves no implicit padding, so every byte the driver copies is initialized.
const _: () = assert!(std::mem::size_of::<TwoSidedParams>() == 712);

// SAFETY: plain old data with the C layout of the kernel's struct and no padding; passed by
// value.
unsafe impl DeviceRepr for TwoSidedParams {}

/// Grid and SM settings of the two-sided kernels. The backend takes them from the world's
/// [`CommSms`](crate::launch::CommSms): every SM of the device unless the engine sets fewer
/// (in the one-sided grid sweep of docs/BENCHMARKS.md, dispatches were within 4% from 132 to
/// 1056 blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwoSidedLaunch {
    /// Most blocks a kernel uses (the SMs given to communication).
    pub max_blocks: u32,
}

/// The block count of a grid; the two-sided kernels' blocks have sizes of their own.
impl From<CommGrid> for TwoSidedLaunch {
    fn from(grid: CommGrid) -> Self {
        TwoSidedLaunch {
            max_blocks: grid.blocks,
        }
    }
}

/// The kernels of one call, in order: Plan (which starts the call's round), Dispatch,
/// (experts), CombineSend, CombineReduce; or Abandon, for a call this rank cannot run or
/// complete (see `TwoSidedParams::abandon_advances`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TwoSidedStep {
    Plan,
    Dispatch,
    CombineSend,
    CombineReduce,
    Abandon,
}

impl CudaDevice {
    fn launch_two_sided(
        &self,
        spec: &QuantSpec,
        name: &'static str,
        p: &TwoSidedParams,
        blocks: u32,
        threads: u32,
    ) -> Result<(), KernelError> {
        // SAFETY: every two-sided kernel takes one `TwoSidedParams` by value; the caller built
        // `p` from live workspaces and buffers sized by the backend's layouts (see
        // `two_sided_call`'s contract).
        unsafe { self.launch_with_params(&Module::TwoSided(*spec), name, p, blocks, threads) }
    }

    /// Launches one step of the two-sided protocol of wire scheme `spec` on this GPU's stream.
    ///
    /// # Safety
    /// Every address in `p` must be live device memory of the sizes the kernels derive from
    /// `p`: every peer's workspace (peer access enabled) of the backend's layout, whose offsets
    /// `p` holds and whose slots are the `DispatchLayout` of `spec`; `tokens` for `n_tokens`
    /// rows of `hidden` 16-bit values, `ids` / `weights` for
    /// `n_tokens * top_k` values with ids below the length of `owner`, whose entries are below
    /// `ep`; `send_*` for `max_tokens * top_k` values; `done` and `status` one word each;
    /// `expert_out` for `ep * max_tokens` rows of `combine_row_bytes`; `out` for `n_tokens` rows
    /// of `hidden` 16-bit values. `n_tokens <= max_tokens`.
    pub unsafe fn two_sided_call(
        &self,
        spec: &QuantSpec,
        step: TwoSidedStep,
        p: &TwoSidedParams,
        launch: TwoSidedLaunch,
    ) -> Result<(), KernelError> {
        if p.ep < 1 || p.ep as usize > MAX_RANKS || p.me < 0 || p.me >= p.ep {
            return Err(KernelError::InvalidArgument(format!(
                "two-sided kernels handle 1 to {MAX_RANKS} ranks and a rank below them, got rank {} of {}",
                p.me, p.ep
            )));
        }
        if p.hidden as usize != spec.hidden {
            return Err(KernelError::InvalidArgument(format!(
                "parameters of hidden size {} for kernels specialized on {}",
                p.hidden, spec.hidden
            )));
        }
        if p.n_tokens < 0 || p.n_tokens > p.max_tokens {
            return Err(KernelError::InvalidArgument(format!(
                "{} tokens, the buffers hold at most {}",
                p.n_tokens, p.max_tokens
            )));
        }
        // The kernels move 16-byte vectors and 4-byte words.
        let vectors = [p.image_bytes, p.slot_bytes, p.combine_row_bytes, p.combine_slot_bytes];
        if vectors.iter().any(|b| b % 16 != 0) || p.hidden % 8 != 0 || p.weights_offset % 4 != 0 {
            return Err(KernelError::InvalidArgument(format!(
                "two-sided kernels need 16-byte slot parts and a hidden size divisible by 8, got image {}, slot {}, combine row {} and slot {} bytes, hidden {}",
                p.image_bytes, p.slot_bytes, p.combine_row_bytes, p.combine_slot_bytes, p.hidden
            )));
        }
        let tokens = (p.n_tokens.max(1) as u32).min(launch.max_blocks);
        let rows = ((p.ep * p.max_tokens).max(1) as u32).min(launch.max_blocks);
        match step {
            TwoSidedStep::Plan => self.launch_two_sided(spec, TWO_SIDED_PLAN, p, 1, PLAN_THREADS),
            TwoSidedStep::Dispatch => self.launch_two_sided(spec, TWO_SIDED_DISPATCH, p, tokens, COPY_BLOCK),
            TwoSidedStep::CombineSend => self.launch_two_sided(spec, TWO_SIDED_COMBINE_SEND, p, rows, COPY_BLOCK),
            TwoSidedStep::CombineReduce => {
                let items = combine_items(p.n_tokens, p.hidden);
                let blocks = items.div_ceil(u64::from(COPY_BLOCK)).min(u64::from(launch.max_blocks)) as u32;
                self.launch_two_sided(spec, TWO_SIDED_COMBINE_REDUCE, p, blocks, COPY_BLOCK)
            }
            TwoSidedStep::Abandon => self.launch_two_sided(spec, TWO_SIDED_ABANDON, p, 1, 64),
        }
    }
}
