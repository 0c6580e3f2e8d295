//! Launchers of the one-sided protocol kernels (`kernels/one_sided.cu`). The backend crate
//! fills [`OneSidedParams`] from its workspace and slot layouts, so host and GPU share them.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use crate::device::CudaDevice;
use crate::driver::driver;
use crate::error::KernelError;
use crate::launch::{CommGrid, combine_items};
use crate::peer_call::{PeerCall, PeerKernels};
use crate::source::{
    COPY_16B, Module, ONE_SIDED_ABANDON, ONE_SIDED_CHECK_IDS_PER_THREAD, ONE_SIDED_COMBINE, ONE_SIDED_DISPATCH,
    QuantSpec,
};

/// Largest top_k (`MOE_MAX_TOPK`, one thread per slot).
pub const MAX_TOP_K: usize = 32;

/// The kernels' parameter block; mirrors `struct OneSidedParams` in one_sided.cu field for
/// field (`repr(C)`, same order and types). Offsets are bytes; pointers are device addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OneSidedParams {
    pub call: PeerCall,
    pub payload_bytes: i32,
    pub scale_bytes: i32,
    pub round_off: i32,
    pub dispatch_flag_off: i32,
    pub combine_flag_off: i32,
    pub padded_tail_off: i32,
    pub payload_region_off: i32,
    pub scales_region_off: i32,
    pub ids_region_off: i32,
    pub weights_region_off: i32,
    pub combine_region_off: i32,
    /// `[ep + 1]` u32: per-target send counters, then blocks done.
    pub counters: u64,
    /// 0, or the device address of [`TRACE_WORDS`] u64 words the kernels stamp (see
    /// [`TracePoint`]).
    pub trace: u64,
}

// The kernel's static_assert checks the same size, so a field added on one side only fails to
// build.
const _: () = assert!(std::mem::size_of::<OneSidedParams>() == 712);

/// Words of a trace buffer (`MOE_TRACE_WORDS`).
pub const TRACE_WORDS: usize = 16;

/// Where a call of the one-sided kernels stamps `%globaltimer` (ns, this GPU's clock) in a
/// trace buffer (`OneSidedParams::trace`), for profiling: the word of each point is its
/// discriminant (`MoeTracePoint` in one_sided.cu). The starts are the earliest block's, the
/// other points the latest block's (or the dispatch's last block's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TracePoint {
    /// The earliest block enters dispatch.
    DispatchStart = 0,
    /// The latest block has its batch's slots and destinations.
    Routed = 1,
    /// The latest block has issued all its stores.
    Sent = 2,
    /// The last block knows it is last (every block fenced its stores).
    Last = 3,
    /// The last block has released the dispatch words (counts and round) to every peer.
    Published = 4,
    /// The last block has every peer's dispatch word.
    PeersSeen = 5,
    /// The latest block has checked its part of the ids the peers wrote (or the last block,
    /// where one block checks them): dispatch is over.
    DispatchDone = 6,
    /// The latest checker's wait for the peers' dispatch words has ended (it checks next).
    Checking = 7,
    /// The earliest block enters combine.
    CombineStart = 8,
    /// The latest block has raised its combine flags.
    CombineReleased = 9,
    /// The latest block has every peer's combine flag.
    CombineSeen = 10,
    /// The latest block has written its sums: combine is over.
    CombineDone = 11,
    /// The last block of dispatch has reset the unfilled rows.
    Padded = 12,
}

impl TracePoint {
    /// Every point, in the order a call passes them.
    pub const ALL: [TracePoint; 13] = [
        TracePoint::DispatchStart,
        TracePoint::Routed,
        TracePoint::Sent,
        TracePoint::Last,
        TracePoint::Published,
        TracePoint::PeersSeen,
        TracePoint::Padded,
        TracePoint::Checking,
        TracePoint::DispatchDone,
        TracePoint::CombineStart,
        TracePoint::CombineReleased,
        TracePoint::CombineSeen,
        TracePoint::CombineDone,
    ];

    /// The start of the kernel this point is in: what its time counts from.
    pub fn kernel_start(self) -> TracePoint {
        match self {
            TracePoint::CombineStart
            | TracePoint::CombineReleased
            | TracePoint::CombineSeen
            | TracePoint::CombineDone => TracePoint::CombineStart,
            _ => TracePoint::DispatchStart,
        }
    }

    /// What a trace buffer holds before a call: the starts (kept with a minimum) at the
    /// largest value, every other word (kept with a maximum) at zero.
    pub fn reset_words() -> [u64; TRACE_WORDS] {
        let mut words = [0; TRACE_WORDS];
        words[TracePoint::DispatchStart as usize] = u64::MAX;
        words[TracePoint::CombineStart as usize] = u64::MAX;
        words
    }
}

// SAFETY: plain old data with the C layout of the kernel's struct; passed by value.
unsafe impl DeviceRepr for OneSidedParams {}

/// Grid and SM settings of the one-sided kernels. The backends take them from the world's
/// [`CommSms`](crate::launch::CommSms) (every SM of the device with 1024 threads unless the
/// engine sets fewer); the benchmark sweeps them directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OneSidedLaunch {
    /// Most blocks a kernel uses (the SMs given to communication, with `threads_per_block`
    /// large enough that one block fills an SM).
    pub max_blocks: u32,
    /// Threads per block: a multiple of 32 from 32 to 1024.
    pub threads_per_block: u32,
}

impl From<CommGrid> for OneSidedLaunch {
    fn from(grid: CommGrid) -> Self {
        OneSidedLaunch {
            max_blocks: grid.blocks,
            threads_per_block: grid.threads_per_block,
        }
    }
}

impl OneSidedLaunch {
    fn check(&self) -> Result<(), KernelError> {
        let t = self.threads_per_block;
        if self.max_blocks == 0 || t == 0 || t > 1024 || !t.is_multiple_of(32) {
            return Err(KernelError::InvalidArgument(format!(
                "one-sided launch of {} blocks x {t} threads: blocks must be at least 1 and threads a multiple of 32 \
                 from 32 to 1024 (the default is every SM x 1024, see CommSms)",
                self.max_blocks
            )));
        }
        Ok(())
    }
}

impl CudaDevice {
    /// Compiles and loads the one-sided kernels of `spec`. Call once per layer before any rank
    /// launches, never on a call's path.
    pub fn load_one_sided(&self, spec: &QuantSpec) -> Result<(), KernelError> {
        self.preload(&Module::OneSided(*spec))
    }

    /// The blocks and threads per block `step` launches with for `p` under `launch`: at most
    /// `launch.max_blocks` blocks (fewer when there is less work), and `launch`'s threads unless
    /// the kernel's registers allow fewer. The SMs a step occupies: one block per SM.
    pub fn one_sided_grid(
        &self,
        spec: &QuantSpec,
        step: OneSidedStep,
        p: &OneSidedParams,
        launch: OneSidedLaunch,
    ) -> Result<(u32, u32), KernelError> {
        launch.check()?;
        let name = step.kernel();
        let threads = launch
            .threads_per_block
            .min(self.max_threads(&Module::OneSided(*spec), name)?);
        let blocks = match step {
            // A block per token, or, if more, the blocks that check the ids the peers wrote
            // (the peers' slots' ids at most, ONE_SIDED_CHECK_IDS_PER_THREAD to a thread) and the
            // last block, which resets the unfilled rows beside them.
            OneSidedStep::Dispatch => (p.call.n_tokens.max(1) as u64)
                .max(1 + peer_slot_ids(p).div_ceil(ONE_SIDED_CHECK_IDS_PER_THREAD * u64::from(threads))),
            OneSidedStep::Combine => combine_items(p.call.n_tokens, p.call.hidden).div_ceil(u64::from(threads)),
            OneSidedStep::Abandon => 1,
        };
        Ok((blocks.clamp(1, u64::from(launch.max_blocks)) as u32, threads))
    }

    fn launch_one_sided(
        &self,
        spec: &QuantSpec,
        step: OneSidedStep,
        p: &OneSidedParams,
        launch: OneSidedLaunch,
    ) -> Result<(), KernelError> {
        let (blocks, threads) = self.one_sided_grid(spec, step, p, launch)?;
        // SAFETY: every one-sided kernel takes one `OneSidedParams` by value; the caller built
        // `p` from live workspaces and buffers sized by the backend's layouts (see
        // `PeerKernels::launch`'s contract).
        unsafe { self.launch_with_params(&Module::OneSided(*spec), step.kernel(), p, blocks, threads) }
    }
}

impl PeerKernels for OneSidedParams {
    type Step = OneSidedStep;
    type Launch = OneSidedLaunch;
    const ABANDON: OneSidedStep = OneSidedStep::Abandon;

    fn call(&mut self) -> &mut PeerCall {
        &mut self.call
    }

    /// Beyond the trait's contract: `counters` holds `ep + 1` words, zero before the first
    /// dispatch, and `top_k <= 32` (checked).
    unsafe fn launch(
        &self,
        gpu: &CudaDevice,
        spec: &QuantSpec,
        step: OneSidedStep,
        launch: OneSidedLaunch,
    ) -> Result<(), KernelError> {
        self.call.check("one-sided", spec)?;
        if self.call.top_k as usize > MAX_TOP_K {
            return Err(KernelError::InvalidArgument(format!(
                "one-sided kernels handle top_k up to {MAX_TOP_K}, got {}",
                self.call.top_k
            )));
        }
        gpu.launch_one_sided(spec, step, self, launch)
    }
}

/// The ids of the slots dispatch checks (the peers', `moe_check_blocks` in one_sided.cu):
/// `(ep - 1) * max_tokens * top_k`, one source's at least.
fn peer_slot_ids(p: &OneSidedParams) -> u64 {
    (p.call.ep - 1).max(1) as u64 * p.call.max_tokens.max(1) as u64 * p.call.top_k.max(1) as u64
}

impl CudaDevice {
    /// Copies `bytes` (a multiple of 16) from `src` to `dst` with 16-byte vectors on the grid of
    /// `launch`: the SM-driven copy ceiling, peer-to-peer when `dst` is a peer's memory.
    ///
    /// # Safety
    /// `src` must be `bytes` readable bytes on this device and `dst` `bytes` writable bytes this
    /// device can reach (its own memory, or a peer's with peer access enabled).
    pub unsafe fn copy_16b(&self, src: u64, dst: u64, bytes: usize, launch: OneSidedLaunch) -> Result<(), KernelError> {
        if !bytes.is_multiple_of(16) {
            return Err(KernelError::InvalidArgument(format!(
                "{bytes} bytes is not a multiple of 16"
            )));
        }
        launch.check()?;
        let f = self.function(&Module::Copy, COPY_16B)?;
        let vecs = (bytes / 16) as u64;
        let cfg = LaunchConfig {
            grid_dim: (launch.max_blocks, 1, 1),
            block_dim: (launch.threads_per_block, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream().launch_builder(&f);
        b.arg(&src).arg(&dst).arg(&vecs);
        // SAFETY: matches `moe_copy_16b(const uint4*, uint4*, u64)`; the caller guarantees both
        // ranges.
        unsafe { b.launch(cfg) }.map_err(driver(COPY_16B))?;
        Ok(())
    }
}

/// The kernels of one call, in order: Dispatch (which also checks the ids the peers wrote, see
/// [`ONE_SIDED_CHECK_IDS_PER_THREAD`]), (experts write their rows into the combine region),
/// Combine; or Abandon, for a call this rank cannot run or complete (see
/// `OneSidedParams::abandon_advances`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OneSidedStep {
    Dispatch,
    Combine,
    Abandon,
}

impl OneSidedStep {
    fn kernel(self) -> &'static str {
        match self {
            OneSidedStep::Dispatch => ONE_SIDED_DISPATCH,
            OneSidedStep::Combine => ONE_SIDED_COMBINE,
            OneSidedStep::Abandon => ONE_SIDED_ABANDON,
        }
    }
}
