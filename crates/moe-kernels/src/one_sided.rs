//! Launchers of the one-sided protocol kernels (`kernels/one_sided.cu`). The backend crate
//! fills [`OneSidedParams`] from its workspace and slot layouts, so host and GPU share them.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use crate::error::KernelError;
use crate::gpu::{Gpu, driver};
use crate::source::{
    COPY_16B, Module, ONE_SIDED_BEGIN, ONE_SIDED_COMBINE_PULL, ONE_SIDED_COMBINE_STAGE, ONE_SIDED_DISPATCH,
};

/// Most ranks the kernels address (`MOE_MAX_RANKS`).
pub const MAX_RANKS: usize = 64;
/// Largest top_k (`MOE_MAX_TOPK`, one thread per slot).
pub const MAX_TOP_K: usize = 32;
/// Threads per block of every one-sided kernel.
const BLOCK: u32 = 256;
/// Vectors each combine_pull thread loads at once (`MOE_PULL_UNROLL`).
const PULL_UNROLL: u64 = 4;

/// The kernels' parameter block; mirrors `struct OneSidedParams` in one_sided.cu field for
/// field (`repr(C)`, same order and types). Offsets are bytes; pointers are device addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OneSidedParams {
    pub peers: [u64; MAX_RANKS],
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
    pub recv_count_off: i32,
    pub dispatch_flag_off: i32,
    pub combine_flag_off: i32,
    pub dispatch_region_off: i32,
    pub combine_region_off: i32,
    pub images: u64,
    pub ids: u64,
    pub weights: u64,
    pub owner: u64,
    pub send_target: u64,
    pub send_slot: u64,
    pub counters: u64,
    pub status: u64,
    pub expert_out: u64,
    pub out: u64,
    pub timeout_cycles: i64,
}

// SAFETY: plain old data with the C layout of the kernel's struct; passed by value.
unsafe impl DeviceRepr for OneSidedParams {}

/// Grid and SM settings of the one-sided kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OneSidedLaunch {
    /// Most blocks a kernel uses (the SMs given to communication).
    pub max_blocks: u32,
}

impl Default for OneSidedLaunch {
    /// 132 blocks of 256 threads, one per SM of an H100/H200: on 2x H200 this reached 0.96 of
    /// the peer-copy ceiling for 4096-token bf16 dispatch, where 32 blocks reached 0.39
    /// (docs/BENCHMARKS.md).
    fn default() -> Self {
        OneSidedLaunch { max_blocks: 132 }
    }
}

impl Gpu {
    fn launch_one_sided(&self, name: &'static str, p: &OneSidedParams, blocks: u32) -> Result<(), KernelError> {
        let f = self.function(&Module::OneSided, name)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks.max(1), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream().launch_builder(&f);
        b.arg(p);
        // SAFETY: every one-sided kernel takes one `OneSidedParams` by value; the caller built
        // `p` from live workspaces and buffers sized by the backend's layouts (see
        // `one_sided_call`'s contract).
        unsafe { b.launch(cfg) }.map_err(driver(name))?;
        Ok(())
    }

    /// Launches one step of the one-sided protocol on this GPU's stream.
    ///
    /// # Safety
    /// Every address in `p` must be live device memory of the sizes the kernels derive from
    /// `p` (workspaces of every peer with peer access enabled, inputs for `n_tokens` tokens,
    /// `send_*` for `max_tokens * top_k`, `counters` for `ep + 1` words, `expert_out` for
    /// `ep * max_tokens` rows), `ep <= 64` and `top_k <= 32`.
    pub unsafe fn one_sided_call(
        &self,
        step: OneSidedStep,
        p: &OneSidedParams,
        launch: OneSidedLaunch,
    ) -> Result<(), KernelError> {
        if p.ep as usize > MAX_RANKS || p.top_k as usize > MAX_TOP_K {
            return Err(KernelError::InvalidArgument(format!(
                "one-sided kernels handle at most {MAX_RANKS} ranks and top_k {MAX_TOP_K}, got {} and {}",
                p.ep, p.top_k
            )));
        }
        let tokens = (p.n_tokens.max(1) as u32).min(launch.max_blocks);
        let rows = ((p.ep * p.max_tokens).max(1) as u32).min(launch.max_blocks);
        match step {
            OneSidedStep::Begin => self.launch_one_sided(ONE_SIDED_BEGIN, p, 1),
            OneSidedStep::Dispatch => self.launch_one_sided(ONE_SIDED_DISPATCH, p, tokens),
            OneSidedStep::CombineStage => self.launch_one_sided(ONE_SIDED_COMBINE_STAGE, p, rows),
            OneSidedStep::CombinePull => {
                // One thread per (token, group of PULL_UNROLL vectors of 8 elements).
                let items = p.n_tokens.max(1) as u64 * (p.hidden as u64 / 8).div_ceil(PULL_UNROLL);
                let blocks = items.div_ceil(u64::from(BLOCK)).min(u64::from(launch.max_blocks)) as u32;
                self.launch_one_sided(ONE_SIDED_COMBINE_PULL, p, blocks)
            }
        }
    }
}

impl Gpu {
    /// Copies `bytes` (a multiple of 16) from `src` to `dst` with 16-byte vectors on `blocks`
    /// blocks: the SM-driven copy ceiling, peer-to-peer when `dst` is a peer's memory.
    ///
    /// # Safety
    /// `src` must be `bytes` readable bytes on this device and `dst` `bytes` writable bytes this
    /// device can reach (its own memory, or a peer's with peer access enabled).
    pub unsafe fn copy_16b(&self, src: u64, dst: u64, bytes: usize, blocks: u32) -> Result<(), KernelError> {
        if !bytes.is_multiple_of(16) {
            return Err(KernelError::InvalidArgument(format!(
                "{bytes} bytes is not a multiple of 16"
            )));
        }
        let f = self.function(&Module::OneSided, COPY_16B)?;
        let vecs = (bytes / 16) as u64;
        let cfg = LaunchConfig {
            grid_dim: (blocks.max(1), 1, 1),
            block_dim: (BLOCK, 1, 1),
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

/// The kernels of one call, in order: Begin, Dispatch, (experts), Begin, CombineStage,
/// CombinePull.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OneSidedStep {
    Begin,
    Dispatch,
    CombineStage,
    CombinePull,
}
