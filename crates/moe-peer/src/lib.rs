//! moe-peer: what the peer-memory protocols (nvlink-one-sided, nvlink-two-sided) do alike, on
//! the host platform and on GPUs, written once.
//!
//! A peer-memory protocol runs each call as a round over a workspace every rank of its EP group
//! can store into: the call's `prepare` advances the rank's round counter, stores the tokens into
//! the peers' workspaces and raises flags with the round (release); each rank waits (bounded,
//! acquire) for its peers' flags; `finalize` sends the experts' rows back the same way and each
//! rank sums its tokens' replies in f32, in top-k order.
//!
//! | concept | where |
//! |---|---|
//! | a protocol plugs in: its registry name, layout, per-call exchange | [`PeerProtocol`] |
//! | its workspace layout, as a group of layers shares it | [`PeerLayout`] |
//! | the host platform's `PrepareFinalize` for any protocol | [`HostPeer`] |
//! | the two halves of a call | [`Phase`] |
//! | the GPU rank, its workspace group and its `PrepareFinalize` (feature `cuda`) | `cuda` |
//!
//! A protocol crate keeps only what is its own: its workspace layout (offsets of the round
//! counter, flags and regions), its per-call exchange on the host ([`PeerProtocol`]), its kernel
//! parameter block and phase -> kernel steps on GPUs (`cuda::CudaProtocol`), its delivery and its
//! capability record. Everything else — the workspace group's generations and turns, the round
//! counter, input validation, quantization before the first store, the received rows into the
//! Standard or BatchedExperts format, the combine's sum, the receipt — lives here.
#![deny(unsafe_code)]

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub mod cuda;
mod host;
#[cfg(feature = "trials")]
pub mod trials;

use std::fmt::Debug;

use moe_core::host::SymmetricMemory;
use moe_core::quant::QuantScheme;
use moe_core::registry::{Capabilities, Limits};
use moe_core::workspace_group::GroupLayout;
use moe_core::{ActivationFormat, DispatchLayout, LayerConfig, ParallelMode, PlatformKind};

pub use host::{HostCombine, HostDispatch, HostPeer, signal_and_wait};

/// Registers a protocol crate's backend with the registry under the protocol's name, with its
/// description and capability record ([`PeerProtocol`]), and defines its constructor,
/// `pub fn construct(layer, ctx)`: host ranks get [`HostPeer`] of `$protocol`, GPU ranks
/// `cuda::CudaPeer` when the invoking crate is built with its `cuda` feature, and an error saying
/// to rebuild with it otherwise. Collective, as every constructor of a peer-memory backend is:
/// every rank of the EP group constructs the same layers in the same order.
#[macro_export]
macro_rules! register_peer_backend {
    ($protocol:ty) => {
        moe_core::register_backend!(moe_core::registry::BackendRegistration {
            name: <$protocol as $crate::PeerProtocol>::NAME,
            description: <$protocol as $crate::PeerProtocol>::DESCRIPTION,
            capabilities: <$protocol as $crate::PeerProtocol>::CAPABILITIES,
            construct,
        });

        /// Constructs the backend for one rank in the rank's workspace group for the layer's
        /// EP group, growing it when the layer needs more (collective: every rank of the EP
        /// group constructs the same layers in the same order).
        pub fn construct(
            layer: &moe_core::LayerConfig,
            ctx: &moe_core::RankContext,
        ) -> moe_core::Result<Box<dyn moe_core::PrepareFinalize>> {
            match ctx {
                #[cfg(feature = "cuda")]
                moe_core::RankContext::Cuda(rank) => $crate::cuda::CudaPeer::<$protocol>::construct(layer, rank),
                #[cfg(not(feature = "cuda"))]
                moe_core::RankContext::Cuda(_) => Err(moe_core::MoeError::built_without_cuda(
                    <$protocol as $crate::PeerProtocol>::NAME,
                )),
                _ => $crate::HostPeer::<$protocol>::construct(layer, ctx),
            }
        }
    };
}

/// The capability record of a peer-memory protocol that delivers `activation_formats`: what
/// the layer and its kernels serve alike for every protocol.
pub const fn capabilities(activation_formats: &'static [ActivationFormat]) -> Capabilities {
    Capabilities {
        quant_schemes: &QuantScheme::ALL,
        deferred_quant: true,
        swizzled_scales: true,
        activation_formats,
        parallel_modes: &[ParallelMode::Ep, ParallelMode::TpDpEp, ParallelMode::Sp],
        platforms: &[PlatformKind::Host, PlatformKind::Cuda],
        // Every rank stores into every peer's workspace, on one node.
        needs_all_pairs_peer_access: true,
        gpu_per_rank: false,
        single_node: true,
        limits: Limits {
            // One bit per rank in a 64-bit peer mask on the GPU; the `[ep, ep]` count matrix
            // (16 KiB at 64 ranks) stays small enough for one thread block's prefix sums.
            max_ranks: 64,
            // One warp lane per top-k slot on the GPU (FlashInfer's two-sided prepare checks
            // `1 <= top_k <= 32` for the same reason).
            max_top_k: 32,
            hidden_multiple_of: 16,
            max_tokens_per_rank: 1 << 16,
        },
    }
}

/// The two halves of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Quantize and send the tokens; receive the peers' (the contract's `prepare`).
    Dispatch,
    /// Send the experts' rows back and sum each token's replies (the contract's `finalize`).
    Combine,
}

impl Phase {
    /// The contract's step the phase belongs to.
    pub fn call_step(self) -> &'static str {
        match self {
            Phase::Dispatch => "prepare",
            Phase::Combine => "finalize",
        }
    }
}

/// A token count rank `source` wrote into this rank's workspace, checked before it is used as a
/// length: at most `max`, the layer's tokens per rank. `op` names the call.
pub fn peer_count(op: &'static str, source: usize, count: u32, max: usize) -> moe_core::Result<usize> {
    let count = count as usize;
    if count > max {
        return Err(moe_core::MoeError::CorruptPeerData {
            op,
            detail: format!("rank {source} announced {count} tokens, more than the layer's {max} per rank"),
        });
    }
    Ok(count)
}

/// `error`, or, when it says rank `peer` is past this rank's call and one of the flags that
/// peer raises here (`flags(peer)`, read by `word_at`) still holds its abandonment of the call,
/// that abandonment with its reason. A rank that abandons a call goes on to its next at once,
/// and may raise that call's first flag before this rank reads the mark there; on both
/// platforms.
pub(crate) fn abandonment_behind(
    error: moe_core::MoeError,
    flags: impl FnOnce(usize) -> Vec<usize>,
    word_at: impl Fn(usize) -> Option<u32>,
) -> moe_core::MoeError {
    let moe_core::MoeError::PeerMovedOn {
        rank, peer, op, call, ..
    } = &error
    else {
        return error;
    };
    let why = flags(*peer)
        .into_iter()
        .find_map(|flag| match moe_core::call::PeerWord::read(*call, word_at(flag)?) {
            moe_core::call::PeerWord::Abandoned(why) => Some(why),
            _ => None,
        });
    match why {
        Some(why) => moe_core::MoeError::PeerAbandoned {
            rank: *rank,
            peer: *peer,
            op: op.clone(),
            call: *call,
            why,
        },
        None => error,
    }
}

/// The round counter of a rank whose call found its peers `ahead` calls further, once it
/// follows them: its next call is theirs.
pub(crate) fn round_following(round: u32, ahead: u16) -> u32 {
    round.wrapping_add(u32::from(ahead) - 1)
}

/// Offset of a rank's round counter, a 32-bit word, in the workspace of every peer-memory
/// protocol: its first word, so a layout leaves its first section to it.
pub const ROUND_OFFSET: usize = 0;

/// What bounds every peer-memory protocol's regions, whatever else its layout holds: the ranks
/// of the EP group, the tokens a source may send a rank in one call, and the bytes of one
/// combine row. A receive region holds `ep * max_tokens` rows: at most `max_tokens` from each of
/// `ep` sources, or one reply per (token, destination rank) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExchangeBounds {
    pub ep: usize,
    pub max_tokens: usize,
    pub combine_slot_bytes: usize,
}

impl ExchangeBounds {
    /// The bounds of `layer` on its own.
    pub fn for_layer(layer: &LayerConfig, dispatch: &DispatchLayout) -> Self {
        ExchangeBounds {
            ep: layer.parallel.world_size(),
            max_tokens: layer.dispatch_tokens_bound(),
            combine_slot_bytes: dispatch.combine_slot_bytes(),
        }
    }

    /// Rows of a receive region (`ep * max_tokens`).
    pub fn rows(&self) -> usize {
        self.ep * self.max_tokens
    }
}

impl GroupLayout for ExchangeBounds {
    fn union(self, other: Self) -> Self {
        ExchangeBounds {
            ep: self.ep.max(other.ep),
            max_tokens: self.max_tokens.max(other.max_tokens),
            combine_slot_bytes: self.combine_slot_bytes.max(other.combine_slot_bytes),
        }
    }
}

/// A protocol's workspace layout: what a workspace group of its layers needs of it.
pub trait PeerLayout: GroupLayout + Send + Sync + 'static {
    /// The layout `layer` needs on its own.
    fn for_layer(layer: &LayerConfig, dispatch: &DispatchLayout) -> Self;
    /// The bytes a workspace of this layout takes on each rank.
    fn bytes(&self) -> usize;
    /// The bounds the layout's regions are sized by.
    fn bounds(&self) -> ExchangeBounds;
    /// The ranks of the EP group the layout is for.
    fn ranks(&self) -> usize {
        self.bounds().ep
    }
}

/// A peer-memory protocol on the host platform: the one trait a protocol crate implements
/// (its GPU side is `cuda::CudaProtocol`).
pub trait PeerProtocol: Sized + Debug + Send + Sync + 'static {
    /// The backend's registry name.
    const NAME: &'static str;
    /// The protocol's name in messages ("one-sided" in "one-sided dispatch").
    const PROTOCOL: &'static str;
    /// The registry's one-line description of the backend.
    const DESCRIPTION: &'static str;
    /// What the backend declares (see [`capabilities`]).
    const CAPABILITIES: Capabilities;
    /// The workspace layout.
    type Layout: PeerLayout;
    /// A layer's place in its group's workspace: the group's layout (sections and regions) and
    /// the layer's own (rows and row sizes).
    type Place: Copy + Debug + Send + Sync;
    /// What a host dispatch leaves for the call's combine (counts that place the replies).
    type Exchange: Debug + Send + 'static;

    /// The place of a layer of layout `own` in a workspace of layout `group`, which covers it.
    fn place(group: Self::Layout, own: Self::Layout) -> Self::Place;

    /// Offsets of every flag rank `source` raises at its peers in one call (each carries the
    /// call's word, see `moe_core::call`): where an abandoned call is marked.
    fn flags(place: &Self::Place, source: usize) -> Vec<usize>;

    /// After a call failed on this rank: forgets what the workspace's own bookkeeping assumed
    /// of the call's rows (peers may have stored some of them), so the next call trusts none of
    /// it. Nothing by default.
    fn forget(_place: &Self::Place, _mem: &SymmetricMemory) {}

    /// The exchange of a dispatch on the host, after the round started: stores the call's slots
    /// into the peers' workspaces, raises the flags, waits for the peers' and returns what
    /// arrived here.
    fn host_dispatch(
        call: &HostDispatch<'_, Self>,
    ) -> moe_core::Result<(moe_core::slots::ReceivedRows, Self::Exchange)>;

    /// The combine's exchange on the host: stores the experts' `rows` (one per received row,
    /// Standard format) where their senders read them, raises the flags and waits for the
    /// peers'.
    fn host_combine(
        call: &HostCombine<'_, Self>,
        exchange: &Self::Exchange,
        rows: &moe_core::Tensor,
    ) -> moe_core::Result<()>;

    /// After [`Self::host_combine`]: reads into `row` the reply of rank `target` to the token
    /// this rank sent it in slot `slot`.
    fn host_reply(call: &HostCombine<'_, Self>, exchange: &Self::Exchange, target: usize, slot: usize, row: &mut [u8]);
}
