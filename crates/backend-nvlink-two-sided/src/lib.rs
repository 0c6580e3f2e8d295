//! nvlink-two-sided: a count exchange, then a dense all-to-all-v over peer memory, after
//! FlashInfer's `MnnvlMoe` all-to-all (vLLM's two-sided NVLink prepare/finalize).
//!
//! # Protocol
//!
//! One `prepare` runs round `R`, its `finalize` round `R + 1`; `workspace.rs` tabulates the
//! per-rank layout ([`WorkspaceLayout`]) and [`CountMatrix`] computes the dense offsets.
//!
//! 1. **Count exchange.** Each rank quantizes its tokens and plans one copy of each token per
//!    destination rank ([`SendPlan`]). It writes its send counts into row `me` of every peer's
//!    `[ep, ep]` count matrix, raises its counts flag there with `R` (release), and waits
//!    (bounded, acquire) for every peer's counts flag. Every rank now holds the whole matrix.
//! 2. **Dispatch.** Source `s`'s tokens land in receiver `r`'s dense receive region from row
//!    `sum(counts[s'][r] for s' < s)` on, its `slot`-th token sent there at `+slot`. Each sender
//!    writes each token's slot (payload, scales, top-k ids masked for that receiver, weights)
//!    there, raises its data flag on every peer and waits for every peer's. `prepare` delivers
//!    Standard rows `[ep * max_tokens, ..]`: rows `[0, received)` dense, grouped by source in
//!    rank order; the rest padding (ids `-1`, weights `0.0`, zero payload).
//! 3. **Combine.** The receiver writes the expert output of each received row back to its
//!    sender `s`, into `s`'s dense combine region from row `sum(counts[s][r'] for r' < me)` on
//!    (the reverse all-to-all-v), raises its combine flag on every peer and waits for every
//!    peer's. Each rank then sums, per token, the replies of the ranks the token went to, in
//!    f32 in ascending top-k order (bitwise reproducible), and writes `out` in the input dtype.
//!
//! Unlike FlashInfer, the routing metadata travels inside each token's slot instead of in a
//! separate exchange, ids a receiver does not compute are `-1` (the contract's convention)
//! rather than `num_experts`, and senders write straight into dense receive regions sized
//! `ep * max_tokens` rows instead of streaming through fixed-depth FIFOs.
//!
//! # Why the flags are never reset
//!
//! Flag `s` of each flag array on rank `r` is stored only by rank `s`, and every rank's round
//! counter takes the same values because every rank runs the same calls. When `r` waits for
//! round `R`, the flag holds the previous call's value (`R - 2`) or `R`: it cannot already hold
//! `R + 2`, because `s` gets there only after its combine wait of round `R + 1`, which needs
//! `r`'s combine flag of `R + 1`, which `r` raises after this wait. So comparing for equality
//! with the current round is exact, and the `u32` wrap-around is harmless.
//!
//! # Why a fast rank cannot overwrite a slow rank's buffers
//!
//! - A sender's count and data writes of the next call (round `R + 2`) come after its combine
//!   wait of round `R + 1`, which needs the receiver's combine flag of `R + 1`; the receiver
//!   raises it in `finalize`, after it copied its count matrix and its received rows of round
//!   `R` out of the workspace in `prepare`.
//! - A receiver's replies of round `R + 1` come after its data wait of round `R`, which needs
//!   the sender's data flag of `R`; the sender raises it in `prepare`, after it finished reading
//!   the replies of its previous call. The sender reads this call's replies only after its own
//!   combine wait, when every receiver is done writing them.
//!
//! Host ranks run the same layouts, counters and flags as the GPU implementation (module
//! `cuda`, with the `cuda` feature), so protocol bugs show up without a GPU.
#![deny(unsafe_code)]

// Kernel launches cross the FFI boundary into moe-kernels' launchers.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub mod cuda;
#[cfg(feature = "cuda")]
mod gpu_backend;
mod workspace;

use std::sync::atomic::{AtomicU64, Ordering};

use moe_core::config::ExpertPlacement;
use moe_core::host::SymmetricMemory;
use moe_core::quant::QuantScheme;
use moe_core::registry::{BackendRegistration, Capabilities, Limits};
use moe_core::routing::SendPlan;
use moe_core::slots::{self, ReceivedRows};
use moe_core::{
    ActivationFormat, DispatchLayout, LayerConfig, MoeError, ParallelMode, PlatformKind, PrepareFinalize, PrepareInput,
    Prepared, RankContext, Receipt, Result, Tensor,
};

pub use workspace::{CountMatrix, WorkspaceLayout};

/// The registered name.
pub const NAME: &str = "nvlink-two-sided";

/// What this backend declares.
pub const CAPABILITIES: Capabilities = Capabilities {
    quant_schemes: &QuantScheme::ALL,
    deferred_quant: true,
    swizzled_scales: true,
    // Received rows are grouped by source, not by expert; batched expert kernels need the
    // expert-major layout nvlink-one-sided delivers.
    activation_formats: &[ActivationFormat::Standard],
    parallel_modes: &[ParallelMode::Ep, ParallelMode::TpDpEp, ParallelMode::Sp],
    platforms: &[PlatformKind::Host, PlatformKind::Cuda],
    needs_all_pairs_peer_access: true,
    single_node: true,
    limits: Limits {
        // The `[ep, ep]` count matrix (16 KiB at 64 ranks) stays small enough for one thread
        // block to hold while computing the prefix sums on the GPU.
        max_ranks: 64,
        // FlashInfer's two-sided prepare checks `1 <= top_k <= 32`: one warp lane per slot.
        max_top_k: 32,
        hidden_multiple_of: 16,
        max_tokens_per_rank: 1 << 16,
    },
};

moe_core::register_backend!(BackendRegistration {
    name: NAME,
    description: "count exchange then a dense all-to-all-v over peer memory (FlashInfer two-sided protocol); received rows packed by source, needs all-pairs peer access",
    capabilities: CAPABILITIES,
    construct: TwoSided::construct,
});

/// Source of the ids that tie a receipt to the backend object that issued it.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(0);

/// One layer's two-sided backend on one rank.
#[derive(Debug)]
pub struct TwoSided {
    layer: LayerConfig,
    dispatch: DispatchLayout,
    placement: ExpertPlacement,
    layout: WorkspaceLayout,
    mem: SymmetricMemory,
    instance: u64,
}

/// Per-call state carried from prepare to finalize.
#[derive(Debug)]
struct TwoSidedReceipt {
    instance: u64,
    /// The dispatch round; finalize runs the next one.
    round: u32,
    plan: SendPlan,
    /// Copied at dispatch: the combine offsets come from the same matrix, and the copy stays
    /// valid whatever peers write into the workspace for their next call.
    counts: CountMatrix,
}

#[cfg(feature = "cuda")]
fn construct_on_gpu(layer: &LayerConfig, rank: &moe_core::CudaRank) -> Result<Box<dyn PrepareFinalize>> {
    gpu_backend::GpuBackend::construct(layer, rank)
}

#[cfg(not(feature = "cuda"))]
fn construct_on_gpu(_: &LayerConfig, _: &moe_core::CudaRank) -> Result<Box<dyn PrepareFinalize>> {
    Err(MoeError::Unsupported(format!(
        "{NAME} was built without its GPU implementation; enable the `cuda` feature (moe-a2a/cuda)"
    )))
}

impl TwoSided {
    /// Constructs the backend for one rank and allocates its workspace (collective: every rank
    /// of the EP group constructs the same layers in the same order).
    pub fn construct(layer: &LayerConfig, ctx: &RankContext) -> Result<Box<dyn PrepareFinalize>> {
        if let RankContext::Cuda(rank) = ctx {
            return construct_on_gpu(layer, rank);
        }
        let rank = ctx.host(NAME)?;
        let dispatch = layer.dispatch_layout();
        let layout = WorkspaceLayout::for_layer(layer, &dispatch);
        let mem = rank.symmetric_alloc(
            &layer.parallel.world_group(),
            "two-sided workspace",
            layout.bytes().div_ceil(4),
        )?;
        Ok(Box::new(TwoSided {
            layer: layer.clone(),
            dispatch,
            placement: layer.placement(),
            layout,
            mem,
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
        }))
    }

    fn current_round(&self) -> u32 {
        self.mem.load_u32(self.mem.me(), self.layout.round_offset())
    }

    fn next_round(&self) -> u32 {
        let round = self.current_round().wrapping_add(1);
        self.mem.store_u32(self.mem.me(), self.layout.round_offset(), round);
        round
    }
}

impl PrepareFinalize for TwoSided {
    fn name(&self) -> &'static str {
        NAME
    }
    fn activation_format(&self) -> ActivationFormat {
        ActivationFormat::Standard
    }
    /// `true`: the EP group spans every rank and each token goes to every rank that owns one of
    /// its experts, so combine returns every rank's contribution to each of this rank's tokens
    /// and no TP all-reduce is left to do (under TP+DP+EP each TP rank dispatches its replica's
    /// tokens itself).
    fn output_is_reduced(&self) -> bool {
        true
    }
    fn max_tokens_per_rank(&self) -> usize {
        self.layout.max_tokens
    }
    fn num_dispatchers(&self) -> usize {
        self.layout.ep
    }
    fn workspace_bytes(&self) -> usize {
        self.layout.bytes()
    }

    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared> {
        input.require_host(self.name())?;
        let (d, l, mem) = (self.dispatch, self.layout, &self.mem);
        let (me, ep, k) = (mem.me(), l.ep, d.top_k);
        // Quantize before the first store: a quantization error then leaves the round counter
        // and every peer's workspace untouched.
        let images = slots::encode_tokens(&d, &self.layer.quant.params, &input)?;
        let ids = input.topk_ids().to_i32();
        let weights = input.topk_weights().to_f32();
        let plan = SendPlan::new(&ids, k, &self.placement);
        let round = self.next_round();

        // 1. Count exchange.
        let row: Vec<u32> = plan.counts().iter().map(|&c| c as u32).collect();
        for peer in 0..ep {
            mem.store_bytes(peer, l.counts_row_offset(me), bytemuck::cast_slice(&row));
            mem.release_flag(peer, l.counts_flag_offset(me), round);
        }
        for peer in 0..ep {
            mem.acquire_flag("two-sided count exchange", l.counts_flag_offset(peer), peer, round)?;
        }
        let counts = CountMatrix::load(&l, mem);

        // 2. Dense dispatch.
        let first_row: Vec<usize> = (0..ep).map(|r| counts.dispatch_row(me, r)).collect();
        let image_bytes = d.ids_offset();
        let mut tail = vec![0u8; d.slot_bytes() - image_bytes];
        for t in 0..input.num_tokens() {
            let (ids, weights) = (&ids[t * k..(t + 1) * k], &weights[t * k..(t + 1) * k]);
            for (_, target, slot) in plan.sends_of(t) {
                slots::write_routing(&d, ids, weights, Some((target, &self.placement)), &mut tail);
                let at = l.dispatch_row_offset(first_row[target] + slot);
                mem.store_bytes(target, at, &images[t * image_bytes..(t + 1) * image_bytes]);
                mem.store_bytes(target, at + image_bytes, &tail);
            }
        }
        for peer in 0..ep {
            mem.release_flag(peer, l.data_flag_offset(me), round);
        }
        for peer in 0..ep {
            mem.acquire_flag("two-sided dispatch", l.data_flag_offset(peer), peer, round)?;
        }

        let mut received = ReceivedRows::new(d, l.rows());
        let mut slot = vec![0u8; d.slot_bytes()];
        for r in 0..counts.received(me) {
            mem.load_bytes(me, l.dispatch_row_offset(r), &mut slot);
            received.fill(r, &slot);
        }
        let scale_layout = self.layer.quant.received_scale_layout(self.layer.moe.input_dtype);
        Ok(Prepared {
            dispatched: received.into_standard(scale_layout)?,
            receipt: Receipt::new(
                NAME,
                TwoSidedReceipt {
                    instance: self.instance,
                    round,
                    plan,
                    counts,
                },
            ),
            expert_output: None,
        })
    }

    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let state: TwoSidedReceipt = receipt.into_state(NAME)?;
        let (l, mem) = (self.layout, &self.mem);
        let (me, ep, h) = (mem.me(), l.ep, self.dispatch.hidden);
        let dtype = self.layer.moe.input_dtype.dtype();
        let n = state.plan.num_tokens();
        // Checked before the first store, because the receipt's counts place every reply.
        if state.instance != self.instance || state.round != self.current_round() {
            return Err(MoeError::InvalidInput {
                op: "finalize",
                detail: "the receipt is not from this layer's latest prepare; pass each prepare's receipt to the same layer's finalize before its next prepare".to_string(),
            });
        }
        expert_output.expect("finalize", "expert_output", dtype, &[l.rows(), h])?;
        out.expect("finalize", "out", dtype, &[n, h])?;
        let round = self.next_round();

        // 3. Reverse all-to-all-v: received row `first + i` from `s` is `s`'s reply row `reply + i`.
        let c = &state.counts;
        for s in 0..ep {
            let (first, reply) = (c.dispatch_row(s, me), c.reply_row(s, me));
            for i in 0..c.get(s, me) {
                mem.store_bytes(s, l.combine_row_offset(reply + i), expert_output.row_bytes(first + i));
            }
        }
        for peer in 0..ep {
            mem.release_flag(peer, l.combine_flag_offset(me), round);
        }
        for peer in 0..ep {
            mem.acquire_flag("two-sided combine", l.combine_flag_offset(peer), peer, round)?;
        }

        let row_bytes = self.dispatch.combine_row_bytes;
        let sent = c.sent(me);
        let mut replies = vec![0u8; sent * row_bytes];
        for (i, row) in replies.chunks_exact_mut(row_bytes).enumerate() {
            mem.load_bytes(me, l.combine_row_offset(i), row);
        }
        let replies = Tensor::from_bytes(dtype, &[sent, h], replies)?.to_f32();
        let reply_row: Vec<usize> = (0..ep).map(|r| c.reply_row(me, r)).collect();
        let mut acc = vec![0f32; h];
        for t in 0..n {
            acc.fill(0.0);
            for (_, target, slot) in state.plan.sends_of(t) {
                let row = reply_row[target] + slot;
                acc.iter_mut()
                    .zip(&replies[row * h..(row + 1) * h])
                    .for_each(|(a, v)| *a += v);
            }
            out.store_f32(t * h, &acc);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
