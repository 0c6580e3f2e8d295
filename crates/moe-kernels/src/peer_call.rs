//! The head every peer-memory protocol's parameter block starts with (`struct PeerCall` in
//! `kernels/common.cuh`): the rank and its group, the call's tensors and the rank's own buffers,
//! the bound of its waits and the words of its call. The protocols' helpers in `common.cuh`
//! read only this part, so each protocol's block adds only its own layout's offsets.

#[cfg(feature = "cuda")]
use std::fmt::Debug;

#[cfg(feature = "cuda")]
use crate::device::CudaDevice;
use crate::error::KernelError;
#[cfg(feature = "cuda")]
use crate::launch::CommGrid;
use crate::source::QuantSpec;

/// Most ranks the protocol kernels address (`MOE_MAX_RANKS`: a token's destinations are a
/// 64-bit mask).
pub const MAX_RANKS: usize = 64;

/// Mirrors `struct PeerCall` in common.cuh field for field (`repr(C)`, same order and types,
/// no implicit padding). Pointers are device addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeerCall {
    /// Base of every rank's workspace, peer-mapped.
    pub peers: [u64; MAX_RANKS],
    /// `[n_tokens, hidden]` 16-bit input rows.
    pub tokens: u64,
    /// `[n_tokens, top_k]` i32.
    pub ids: u64,
    /// `[n_tokens, top_k]` f32.
    pub weights: u64,
    /// `[num_experts]` i32: the EP rank of each expert.
    pub owner: u64,
    /// `[max_tokens, top_k]` i32: the rank each top-k copy goes to.
    pub send_target: u64,
    /// `[max_tokens, top_k]` i32: its slot there, -1 when not sent.
    pub send_slot: u64,
    /// Two u32 words: 0 or an error, and the call word it concerns (`KernelStatus`).
    pub status: u64,
    /// A u32 in host-mapped memory: the first error, for the host.
    pub status_mirror: u64,
    /// `[n_tokens, hidden]` 16-bit: the combined output.
    pub out: u64,
    /// The bound of every wait, in the GPU's clock cycles.
    pub timeout_cycles: i64,
    pub ep: i32,
    pub me: i32,
    pub max_tokens: i32,
    pub n_tokens: i32,
    pub top_k: i32,
    pub hidden: i32,
    pub input_bf16: i32,
    pub num_experts: i32,
    /// A combine row (`hidden` 16-bit values), and its slot in the combine region.
    pub combine_slot_bytes: i32,
    pub combine_row_bytes: i32,
    pub fp8_static_scale: f32,
    pub nvfp4_global_scale: f32,
    /// The layer's bits of its call words (`moe_core::call::CallId::tag`); an abandoned
    /// call's tag for a protocol's abandon kernel.
    pub call_tag: u32,
    /// A protocol's abandon kernel: 1 starts a new call (the round counter's + 1), 0 abandons
    /// the call in flight.
    pub abandon_advances: u32,
}

// The kernels' static_assert checks the same size; an even number of 4-byte fields leaves no
// implicit padding, so every byte the driver copies is initialized.
const _: () = assert!(std::mem::size_of::<PeerCall>() == 648);

impl PeerCall {
    /// What every protocol's kernels assume of their head, checked before a launch:
    /// `protocol` names the kernels in the error.
    pub fn check(&self, protocol: &str, spec: &QuantSpec) -> Result<(), KernelError> {
        if self.ep < 1 || self.ep as usize > MAX_RANKS || self.me < 0 || self.me >= self.ep {
            return Err(KernelError::InvalidArgument(format!(
                "{protocol} kernels handle 1 to {MAX_RANKS} ranks and a rank below them, got rank {} of {}",
                self.me, self.ep
            )));
        }
        if self.hidden as usize != spec.hidden {
            return Err(KernelError::InvalidArgument(format!(
                "parameters of hidden size {} for {protocol} kernels specialized on {}",
                self.hidden, spec.hidden
            )));
        }
        if self.n_tokens < 0 || self.n_tokens > self.max_tokens {
            return Err(KernelError::InvalidArgument(format!(
                "{} tokens, the {protocol} buffers hold at most {}",
                self.n_tokens, self.max_tokens
            )));
        }
        Ok(())
    }
}

/// A peer-memory protocol's parameter block as its kernels take it: a [`PeerCall`] head, then
/// the protocol's own offsets; and how each of its kernels launches.
#[cfg(feature = "cuda")]
pub trait PeerKernels: Copy + Debug + Send + Sync + 'static {
    /// One kernel of the protocol.
    type Step: Copy + Debug + 'static;
    /// The grid its kernels launch with.
    type Launch: Copy + Debug + Send + Sync + From<CommGrid>;
    /// The kernel that marks a call abandoned (`PeerCall::abandon_advances` says which).
    const ABANDON: Self::Step;

    /// The head every protocol's kernels share.
    fn call(&mut self) -> &mut PeerCall;

    /// Checks the block (the head, and what the protocol's kernels assume of the rest), then
    /// enqueues kernel `step`, specialized on `spec`, on `gpu`'s stream.
    ///
    /// # Safety
    /// Every address in the block must be live device memory of the sizes its kernels derive
    /// from it: every peer's workspace (peer access enabled) of the protocol's layout, whose
    /// offsets the block holds and whose slots are the `DispatchLayout` of `spec`; `tokens`
    /// for `n_tokens` rows of `hidden` 16-bit values; `ids` / `weights` for `n_tokens * top_k`
    /// values; `owner` for `num_experts` ranks below `ep`; `send_*` for `max_tokens * top_k`
    /// values; `status` two words; `out` for `n_tokens` rows of `hidden` 16-bit values; the
    /// protocol's own buffers as its block documents them. The protocol's module for `spec`
    /// must be loaded.
    unsafe fn launch(
        &self,
        gpu: &CudaDevice,
        spec: &QuantSpec,
        step: Self::Step,
        launch: Self::Launch,
    ) -> Result<(), KernelError>;
}
