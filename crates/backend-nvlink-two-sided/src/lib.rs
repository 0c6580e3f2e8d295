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
mod workspace;

use moe_core::registry::Capabilities;
use moe_core::slots::ReceivedRows;
use moe_core::{ActivationFormat, Result, Tensor};
use moe_peer::{HostCombine, HostDispatch, PeerProtocol, signal_and_wait};

pub use workspace::{CountMatrix, LayerRows, SharedGroup, WorkspaceLayout};

/// The registered name.
pub const NAME: &str = "nvlink-two-sided";

/// The two-sided protocol, as it plugs into the peer-memory layer (`moe_peer`).
#[derive(Debug)]
pub enum TwoSided {}

moe_peer::register_peer_backend!(TwoSided);

impl PeerProtocol for TwoSided {
    const NAME: &'static str = NAME;
    const PROTOCOL: &'static str = "two-sided";
    const DESCRIPTION: &'static str = "count exchange then a dense all-to-all-v over peer memory (FlashInfer two-sided protocol); received rows packed by source, needs all-pairs peer access";
    // Received rows are grouped by source, not by expert; batched expert kernels need the
    // expert-major layout nvlink-one-sided delivers.
    const CAPABILITIES: Capabilities = moe_peer::capabilities(&[ActivationFormat::Standard]);
    type Layout = WorkspaceLayout;
    type Place = LayerRows;
    /// Copied at dispatch: the combine offsets come from the same matrix, and the copy stays
    /// valid whatever peers write into the workspace for their next call.
    type Exchange = CountMatrix;

    fn flags(rows: &LayerRows, source: usize) -> Vec<usize> {
        let g = &rows.group;
        vec![
            g.counts_flag_offset(source),
            g.data_flag_offset(source),
            g.combine_flag_offset(source),
        ]
    }

    fn place(group: WorkspaceLayout, own: WorkspaceLayout) -> LayerRows {
        LayerRows::new(group, own)
    }

    /// Count exchange, then the dense dispatch.
    fn host_dispatch(call: &HostDispatch<'_, Self>) -> Result<(ReceivedRows, CountMatrix)> {
        let (rows, mem, d) = (call.place, call.mem, call.dispatch);
        let (l, me) = (rows.group, call.me);
        let row: Vec<u32> = call.plan.counts().iter().map(|&c| c as u32).collect();
        for peer in 0..call.ep {
            mem.store_bytes(peer, l.counts_row_offset(me), bytemuck::cast_slice(&row));
        }
        signal_and_wait(mem, "two-sided count exchange", |r| l.counts_flag_offset(r), call.id)?;
        let counts = CountMatrix::load(&l, rows.own.bounds.max_tokens, mem)?;

        let first_row: Vec<usize> = (0..call.ep).map(|r| counts.dispatch_row(me, r)).collect();
        let mut slot = vec![0u8; d.slot_bytes()];
        for t in 0..call.plan.num_tokens() {
            for (_, target, at) in call.plan.sends_of(t) {
                call.fill_slot(t, target, &mut slot);
                mem.store_bytes(target, rows.dispatch_row_offset(first_row[target] + at), &slot);
            }
        }
        signal_and_wait(mem, "two-sided dispatch", |r| l.data_flag_offset(r), call.id)?;

        let mut received = ReceivedRows::new(d, rows.rows());
        for s in 0..call.ep {
            let first = counts.dispatch_row(s, me);
            for r in first..first + counts.get(s, me) {
                mem.load_bytes(me, rows.dispatch_row_offset(r), &mut slot);
                received.fill(r, s, &slot);
            }
        }
        Ok((received, counts))
    }

    /// The reverse all-to-all-v: received row `first + i` from `s` is `s`'s reply row
    /// `reply + i`.
    fn host_combine(call: &HostCombine<'_, Self>, counts: &CountMatrix, rows: &Tensor) -> Result<()> {
        let (place, mem, me) = (call.place, call.mem, call.me);
        for s in 0..call.ep {
            let (first, reply) = (counts.dispatch_row(s, me), counts.reply_row(s, me));
            for i in 0..counts.get(s, me) {
                mem.store_bytes(s, place.combine_row_offset(reply + i), rows.row_bytes(first + i));
            }
        }
        signal_and_wait(
            mem,
            "two-sided combine",
            |r| place.group.combine_flag_offset(r),
            call.id,
        )
    }

    /// Read from this rank's own combine rows, where the target wrote it.
    fn host_reply(call: &HostCombine<'_, Self>, counts: &CountMatrix, target: usize, slot: usize, row: &mut [u8]) {
        let at = call.place.combine_row_offset(counts.reply_row(call.me, target) + slot);
        call.mem.load_bytes(call.me, at, row);
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
moe_peer::peer_conformance_tests!(crate::TwoSided);
