//! Launchers of the two-sided protocol kernels (`kernels/two_sided.cu`, specialized on the wire
//! scheme their dispatch quantizes to). The backend crate
//! fills [`TwoSidedParams`] from its workspace and slot layouts, so host and GPU share them.

use cudarc::driver::DeviceRepr;

use crate::device::CudaDevice;
use crate::error::KernelError;
use crate::launch::{CommGrid, combine_items};
use crate::peer_call::{PeerCall, PeerKernels};
use crate::source::{
    Module, QuantSpec, TWO_SIDED_ABANDON, TWO_SIDED_COMBINE_REDUCE, TWO_SIDED_COMBINE_SEND, TWO_SIDED_DISPATCH,
    TWO_SIDED_PLAN,
};

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
    pub call: PeerCall,
    pub done: u64,
    /// `[ep * max_tokens, hidden]` 16-bit: the experts' rows.
    pub expert_out: u64,
    pub dispatch_region_off: i64,
    pub combine_region_off: i64,
    pub slot_bytes: i32,
    pub image_bytes: i32,
    pub weights_offset: i32,
    pub round_off: i32,
    pub counts_off: i32,
    pub counts_flag_off: i32,
    pub data_flag_off: i32,
    pub combine_flag_off: i32,
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
        // `PeerKernels::launch`'s contract).
        unsafe { self.launch_with_params(&Module::TwoSided(*spec), name, p, blocks, threads) }
    }
}

impl PeerKernels for TwoSidedParams {
    type Step = TwoSidedStep;
    type Launch = TwoSidedLaunch;
    const ABANDON: TwoSidedStep = TwoSidedStep::Abandon;

    fn call(&mut self) -> &mut PeerCall {
        &mut self.call
    }

    /// Beyond the trait's contract: `done` is one word, zero before the first dispatch;
    /// `expert_out` holds `ep * max_tokens` rows of `combine_row_bytes`; ids are checked on the
    /// device, slot sizes here.
    unsafe fn launch(
        &self,
        gpu: &CudaDevice,
        spec: &QuantSpec,
        step: TwoSidedStep,
        launch: TwoSidedLaunch,
    ) -> Result<(), KernelError> {
        let p = self;
        p.call.check("two-sided", spec)?;
        // The kernels move 16-byte vectors and 4-byte words.
        let vectors = [
            p.image_bytes,
            p.slot_bytes,
            p.call.combine_row_bytes,
            p.call.combine_slot_bytes,
        ];
        if vectors.iter().any(|b| b % 16 != 0) || p.call.hidden % 8 != 0 || p.weights_offset % 4 != 0 {
            return Err(KernelError::InvalidArgument(format!(
                "two-sided kernels need 16-byte slot parts and a hidden size divisible by 8, got image {}, slot {}, combine row {} and slot {} bytes, hidden {}",
                p.image_bytes, p.slot_bytes, p.call.combine_row_bytes, p.call.combine_slot_bytes, p.call.hidden
            )));
        }
        let tokens = (p.call.n_tokens.max(1) as u32).min(launch.max_blocks);
        let rows = ((p.call.ep * p.call.max_tokens).max(1) as u32).min(launch.max_blocks);
        match step {
            TwoSidedStep::Plan => gpu.launch_two_sided(spec, TWO_SIDED_PLAN, p, 1, PLAN_THREADS),
            TwoSidedStep::Dispatch => gpu.launch_two_sided(spec, TWO_SIDED_DISPATCH, p, tokens, COPY_BLOCK),
            TwoSidedStep::CombineSend => gpu.launch_two_sided(spec, TWO_SIDED_COMBINE_SEND, p, rows, COPY_BLOCK),
            TwoSidedStep::CombineReduce => {
                let items = combine_items(p.call.n_tokens, p.call.hidden);
                let blocks = items.div_ceil(u64::from(COPY_BLOCK)).min(u64::from(launch.max_blocks)) as u32;
                gpu.launch_two_sided(spec, TWO_SIDED_COMBINE_REDUCE, p, blocks, COPY_BLOCK)
            }
            TwoSidedStep::Abandon => gpu.launch_two_sided(spec, TWO_SIDED_ABANDON, p, 1, 64),
        }
    }
}
