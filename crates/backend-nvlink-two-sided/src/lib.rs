//! nvlink-two-sided: a count exchange, then a dense all-to-all-v over peer memory, after
//! FlashInfer's `MnnvlMoe` all-to-all (vLLM's two-sided NVLink prepare/finalize).
//!
//! # Protocol
//!
//! One call runs round `R`: its `prepare` starts it (the round counter's +1) and raises the
//! counts and data flags with `R`, its `finalize` the combine flags; `workspace.rs` tabulates
//! the per-rank layout ([`WorkspaceLayout`]) and [`CountMatrix`] computes the dense offsets.
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
//! round `R`, the flag holds the previous call's value (`R - 1`) or `R`: it cannot already hold
//! `R + 1`. A counts or data flag of `R + 1` comes after `s`'s combine wait of round `R`, which
//! needs `r`'s combine flag of `R`, which `r` raises after its dispatch waits; a combine flag of
//! `R + 1` comes after `s`'s data wait of `R + 1`, which needs `r`'s data flag of `R + 1`, which
//! `r` raises after its combine wait of `R`. So comparing for equality with the current round
//! is exact, and the `u32` wrap-around is harmless.
//!
//! # Why a fast rank cannot overwrite a slow rank's buffers
//!
//! - A sender's count and data writes of the next call (round `R + 1`) come after its combine
//!   wait of round `R`, which needs the receiver's combine flag of `R`; the receiver raises it
//!   in `finalize`, after it copied its count matrix and its received rows of round `R` out of
//!   the workspace in `prepare`.
//! - A receiver's replies of round `R` come after its data wait of round `R`, which needs
//!   the sender's data flag of `R`; the sender raises it in `prepare`, after it finished reading
//!   the replies of its previous call. The sender reads this call's replies only after its own
//!   combine wait, when every receiver is done writing them.
//!
//! Both arguments order one call's accesses before the next call's, whichever layers the calls
//! belong to: the layers of an EP group share one workspace and take turns on it (below).
//!
//! # One workspace per EP group
//!
//! The layers constructed on a rank for the same EP group (an nvfp4 MoE and a bf16 MTP head)
//! share one workspace ([`WorkspaceGroup`]), grown to the union of their layouts when a larger
//! layer is constructed (collectively, with a barrier over the EP group only), never shrunk; a
//! layer whose top_k or expert count differs from the group's is refused. The round counter,
//! count matrix and flags are the group's, while each layer packs its own rows from the start
//! of the group's regions ([`LayerRows`]). The layers take turns: one call, prepare to
//! finalize, at a time. Each call runs on the group's workspace of the moment its prepare
//! starts, and a finalize after a rebuild (a larger layer constructed in between) is refused.
//! GPU ranks do the same with every rank's device buffer of the group's current generation
//! (module `cuda`).
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

use moe_core::config::ExpertPlacement;
use moe_core::host::SymmetricMemory;
use moe_core::quant::QuantScheme;
use moe_core::registry::{BackendRegistration, Capabilities, Limits};
use moe_core::routing::SendPlan;
use moe_core::slots::{self, ReceivedRows};
use moe_core::workspace_group::{self, CallTicket, Membership, WorkspaceGroup};
use moe_core::{
    ActivationFormat, DispatchLayout, LayerConfig, ParallelMode, PlatformKind, PrepareFinalize, PrepareInput, Prepared,
    RankContext, Receipt, Result, Tensor,
};

pub use workspace::{CountMatrix, LayerRows, SharedGroup, WorkspaceLayout};

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
    gpu_per_rank: false,
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

/// One layer's two-sided backend on one rank.
#[derive(Debug)]
pub struct TwoSided {
    layer: LayerConfig,
    dispatch: DispatchLayout,
    placement: ExpertPlacement,
    /// The layer's own workspace layout, placed in the group's by [`LayerRows`].
    own: WorkspaceLayout,
    /// The layer in its EP group's shared workspace.
    member: Membership<WorkspaceLayout, SymmetricMemory>,
}

/// Per-call state carried from prepare to finalize.
#[derive(Debug)]
struct TwoSidedReceipt {
    /// The call's turn on the workspace group.
    ticket: CallTicket,
    /// The workspace generation the dispatch ran on; finalize refuses another.
    generation: u64,
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
    Err(moe_core::MoeError::built_without_cuda(NAME))
}

impl TwoSided {
    /// Constructs the backend for one rank in the rank's workspace group for the layer's EP
    /// group, growing it when the layer needs more (collective: every rank of the EP group
    /// constructs the same layers in the same order).
    pub fn construct(layer: &LayerConfig, ctx: &RankContext) -> Result<Box<dyn PrepareFinalize>> {
        if let RankContext::Cuda(rank) = ctx {
            return construct_on_gpu(layer, rank);
        }
        let rank = ctx.host(NAME)?;
        let dispatch = layer.dispatch_layout();
        let own = WorkspaceLayout::for_layer(layer, &dispatch);
        let ep_group = layer.parallel.world_group();
        let group: SharedGroup = WorkspaceGroup::of(rank, NAME, &ep_group);
        workspace_group::lock(&group).admit(layer, own, |layout| {
            // Every member must be done with the old workspace before any member drops it.
            rank.barrier(&ep_group, "two-sided workspace rebuild")?;
            rank.symmetric_alloc(&ep_group, "two-sided workspace rebuild", layout.bytes().div_ceil(4))
        })?;
        Ok(Box::new(TwoSided {
            layer: layer.clone(),
            dispatch,
            placement: layer.placement(),
            own,
            member: Membership::new(group),
        }))
    }

    /// The group's current generation, this layer's rows in it, and its memory.
    fn workspace(&self) -> (u64, LayerRows, SymmetricMemory) {
        let (generation, layout, memory) = self.member.current();
        (generation, LayerRows::new(layout, self.own), memory)
    }

    fn current_round(layout: &WorkspaceLayout, mem: &SymmetricMemory) -> u32 {
        mem.load_u32(mem.me(), layout.round_offset())
    }

    fn next_round(layout: &WorkspaceLayout, mem: &SymmetricMemory) -> u32 {
        let round = Self::current_round(layout, mem).wrapping_add(1);
        mem.store_u32(mem.me(), layout.round_offset(), round);
        round
    }

    /// Count exchange and dense dispatch of one call (the turn is taken), on the group's
    /// current workspace.
    fn prepare_call(&self, input: PrepareInput<'_>, ticket: CallTicket) -> Result<Prepared> {
        let (generation, rows, mem) = self.workspace();
        let (d, l, mem) = (self.dispatch, rows.group, &mem);
        let (me, ep, k) = (mem.me(), self.own.ep, d.top_k);
        // Quantize before the first store: a quantization error then leaves the round counter
        // and every peer's workspace untouched.
        let images = slots::encode_tokens(&d, &self.layer.quant.params, &input)?;
        let ids = input.topk_ids().to_i32();
        let weights = input.topk_weights().to_f32();
        let plan = SendPlan::new(&ids, k, &self.placement);
        let round = Self::next_round(&l, mem);

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
                let at = rows.dispatch_row_offset(first_row[target] + slot);
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

        let mut received = ReceivedRows::new(d, rows.rows());
        let mut slot = vec![0u8; d.slot_bytes()];
        for r in 0..counts.received(me) {
            mem.load_bytes(me, rows.dispatch_row_offset(r), &mut slot);
            received.fill(r, &slot);
        }
        let scale_layout = self.layer.quant.received_scale_layout(self.layer.moe.input_dtype);
        Ok(Prepared {
            dispatched: received.into_standard(scale_layout)?,
            receipt: Receipt::new(
                NAME,
                TwoSidedReceipt {
                    ticket,
                    generation,
                    plan,
                    counts,
                },
            ),
            expert_output: None,
        })
    }

    /// Reverse all-to-all-v and sum of one call (the turn is released after it, whatever the
    /// outcome).
    fn finalize_call(&self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let state: TwoSidedReceipt = receipt.into_state(NAME)?;
        self.member.finish_call(state.ticket)?;
        // Checked before the first store, because the receipt's counts place every reply.
        let (layout, mem) = self.member.workspace_of(state.generation, "finalize")?;
        let rows = LayerRows::new(layout, self.own);
        let (l, mem) = (rows.group, &mem);
        let (me, ep, h) = (mem.me(), self.own.ep, self.dispatch.hidden);
        let dtype = self.layer.moe.input_dtype.dtype();
        let n = state.plan.num_tokens();
        expert_output.expect("finalize", "expert_output", dtype, &[rows.rows(), h])?;
        out.expect("finalize", "out", dtype, &[n, h])?;
        // The round its prepare started.
        let round = Self::current_round(&l, mem);

        // 3. Reverse all-to-all-v: received row `first + i` from `s` is `s`'s reply row `reply + i`.
        let c = &state.counts;
        for s in 0..ep {
            let (first, reply) = (c.dispatch_row(s, me), c.reply_row(s, me));
            for i in 0..c.get(s, me) {
                mem.store_bytes(
                    s,
                    rows.combine_row_offset(reply + i),
                    expert_output.row_bytes(first + i),
                );
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
            mem.load_bytes(me, rows.combine_row_offset(i), row);
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
        self.own.max_tokens
    }
    fn num_dispatchers(&self) -> usize {
        self.own.ep
    }
    fn workspace_bytes(&self) -> usize {
        self.workspace().1.group.bytes()
    }

    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared> {
        input.require_host(self.name())?;
        self.member.clone().prepare(|ticket| self.prepare_call(input, ticket))
    }

    /// The receipt's call ends when finalize takes it (see `WorkspaceGroup::finish_call`),
    /// whatever happens after.
    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        self.finalize_call(receipt, expert_output, out)
    }
}

#[cfg(test)]
mod tests;
