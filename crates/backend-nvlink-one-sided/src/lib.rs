//! nvlink-one-sided: rank-major push dispatch and pull combine over peer memory, after
//! TensorRT-LLM's one-sided MoE all-to-all.
//!
//! Dispatch: each rank quantizes its tokens and writes each token once per destination rank
//! straight into that rank's receive regions at `(my_rank, slot)`, where `slot` counts the
//! tokens already sent there: payload, scales, ids and weights each into their own
//! `[ranks, max_tokens, ..]` region, so the regions are the Standard format's tensors as they
//! are (see `workspace`). Then it stores the send count into the receiver and raises the
//! receiver's dispatch flag for it with the round value (release); then it waits (bounded)
//! until every peer raised its flag here (acquire), and resets the unfilled slots' ids and
//! weights to padding.
//!
//! Combine: each rank stages its experts' output rows in its own combine region, at the
//! `(source, slot)` the rows arrived in, raises its combine flag on every peer, waits for every
//! peer's, and then pulls each of its tokens' rows from the ranks the token went to and sums
//! them in f32 in top-k order (bitwise reproducible).
//!
//! It can deliver BatchedExperts activations (`[local_experts, ranks * max_tokens, ..]` plus
//! per-expert counts) for batched expert kernels; the rows of one token are summed over local
//! experts before they are staged for combine.
#![deny(unsafe_code)]

// Kernel launches cross the FFI boundary into moe-kernels' launchers.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub mod cuda;
mod workspace;

use moe_core::host::SymmetricMemory;
use moe_core::registry::Capabilities;
use moe_core::slots::ReceivedRows;
use moe_core::{ActivationFormat, Result, Tensor};
use moe_peer::{HostCombine, HostDispatch, PeerProtocol, signal_and_wait};

pub use workspace::{Field, LayerSlots, SharedGroup, WorkspaceLayout};

/// The registered name.
pub const NAME: &str = "nvlink-one-sided";

/// The one-sided protocol, as it plugs into the peer-memory layer (`moe_peer`).
#[derive(Debug)]
pub enum OneSided {}

moe_peer::register_peer_backend!(OneSided);

impl PeerProtocol for OneSided {
    const NAME: &'static str = NAME;
    const PROTOCOL: &'static str = "one-sided";
    const DESCRIPTION: &'static str = "rank-major push dispatch and pull combine over peer memory (TensorRT-LLM one-sided protocol); lowest latency, needs all-pairs peer access";
    const CAPABILITIES: Capabilities =
        moe_peer::capabilities(&[ActivationFormat::Standard, ActivationFormat::BatchedExperts]);
    type Layout = WorkspaceLayout;
    type Place = LayerSlots;
    /// The tokens each source sent here.
    type Exchange = Vec<usize>;

    fn flags(slots: &LayerSlots, source: usize) -> Vec<usize> {
        let g = &slots.group;
        vec![g.dispatch_flag_offset(source), g.combine_flag_offset(source)]
    }

    /// The padded tails: the next dispatch resets every unfilled row.
    fn forget(slots: &LayerSlots, mem: &SymmetricMemory) {
        mem.store_u32(mem.me(), slots.group.padded_frame_offset(), 0);
    }

    fn place(group: WorkspaceLayout, own: WorkspaceLayout) -> LayerSlots {
        LayerSlots::new(group, own)
    }

    fn host_dispatch(call: &HostDispatch<'_, Self>) -> Result<(ReceivedRows, Vec<usize>)> {
        let (slots, mem, d) = (call.place, call.mem, call.dispatch);
        let (layout, me) = (slots.group, call.me);
        let mut slot = vec![0u8; d.slot_bytes()];
        for t in 0..call.plan.num_tokens() {
            for (_, target, at) in call.plan.sends_of(t) {
                call.fill_slot(t, target, &mut slot);
                for field in Field::ALL {
                    let (from, len) = field.in_slot(&d);
                    mem.store_bytes(target, slots.field_offset(field, me, at), &slot[from..from + len]);
                }
            }
        }
        for (peer, &count) in call.plan.counts().iter().enumerate() {
            mem.store_u32(peer, layout.recv_count_offset(me), count as u32);
        }
        signal_and_wait(mem, "one-sided dispatch", |r| layout.dispatch_flag_offset(r), call.id)?;
        let recv_counts = (0..call.ep)
            .map(|s| {
                let count = mem.load_u32(me, layout.recv_count_offset(s));
                moe_peer::peer_count("prepare", s, count, slots.own.bounds.max_tokens)
            })
            .collect::<Result<Vec<usize>>>()?;
        let received = slots.received_rows(d, &recv_counts, |at, bytes| mem.load_bytes(me, at, bytes));
        slots.pad_unfilled(mem, &recv_counts);
        Ok((received, recv_counts))
    }

    /// Stages the rows in this rank's combine region, at the `(source, slot)` they arrived in,
    /// where their senders pull them from.
    fn host_combine(call: &HostCombine<'_, Self>, recv_counts: &Vec<usize>, rows: &Tensor) -> Result<()> {
        let (slots, mem, me) = (call.place, call.mem, call.me);
        let max_tokens = slots.own.bounds.max_tokens;
        for (s, &count) in recv_counts.iter().enumerate() {
            for t in 0..count {
                mem.store_bytes(me, slots.combine_slot_offset(s, t), rows.row_bytes(s * max_tokens + t));
            }
        }
        signal_and_wait(
            mem,
            "one-sided combine",
            |r| slots.group.combine_flag_offset(r),
            call.id,
        )
    }

    /// Pulled from the target's combine region.
    fn host_reply(call: &HostCombine<'_, Self>, _: &Vec<usize>, target: usize, slot: usize, row: &mut [u8]) {
        call.mem
            .load_bytes(target, call.place.combine_slot_offset(call.me, slot), row);
    }
}

#[cfg(test)]
moe_peer::peer_conformance_tests!(crate::OneSided);
