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

use moe_core::quant::QuantScheme;
use moe_core::registry::{BackendRegistration, Capabilities, Limits};
use moe_core::slots::ReceivedRows;
use moe_core::{ActivationFormat, ParallelMode, PlatformKind, Result, Tensor};
use moe_peer::{HostCombine, HostDispatch, PeerProtocol, signal_and_wait};

pub use workspace::{Field, LayerSlots, SharedGroup, WorkspaceLayout};

/// The registered name.
pub const NAME: &str = "nvlink-one-sided";

/// What this backend declares.
pub const CAPABILITIES: Capabilities = Capabilities {
    quant_schemes: &QuantScheme::ALL,
    deferred_quant: true,
    swizzled_scales: true,
    activation_formats: &[ActivationFormat::Standard, ActivationFormat::BatchedExperts],
    parallel_modes: &[ParallelMode::Ep, ParallelMode::TpDpEp, ParallelMode::Sp],
    platforms: &[PlatformKind::Host, PlatformKind::Cuda],
    needs_all_pairs_peer_access: true,
    gpu_per_rank: false,
    single_node: true,
    limits: Limits {
        // One bit per rank in a 64-bit peer mask on the GPU.
        max_ranks: 64,
        // One warp lane per top-k slot on the GPU.
        max_top_k: 32,
        hidden_multiple_of: 16,
        max_tokens_per_rank: 1 << 16,
    },
};

moe_core::register_backend!(BackendRegistration {
    name: NAME,
    description: "rank-major push dispatch and pull combine over peer memory (TensorRT-LLM one-sided protocol); lowest latency, needs all-pairs peer access",
    capabilities: CAPABILITIES,
    construct,
});

/// The one-sided protocol, as it plugs into the peer-memory layer (`moe_peer`).
#[derive(Debug)]
pub enum OneSided {}

moe_peer::peer_backend_constructor!(OneSided);

impl PeerProtocol for OneSided {
    const NAME: &'static str = NAME;
    const PROTOCOL: &'static str = "one-sided";
    type Layout = WorkspaceLayout;
    type Place = LayerSlots;
    /// The tokens each source sent here.
    type Exchange = Vec<usize>;

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
        signal_and_wait(
            mem,
            "one-sided dispatch",
            |r| layout.dispatch_flag_offset(r),
            call.round,
        )?;
        let recv_counts: Vec<usize> = (0..call.ep)
            .map(|s| mem.load_u32(me, layout.recv_count_offset(s)) as usize)
            .collect();
        let received = slots.received_rows(d, &recv_counts, |at, bytes| mem.load_bytes(me, at, bytes));
        slots.pad_unfilled(mem, &recv_counts);
        Ok((received, recv_counts))
    }

    /// Stages the rows in this rank's combine region, at the `(source, slot)` they arrived in,
    /// where their senders pull them from.
    fn host_combine(call: &HostCombine<'_, Self>, recv_counts: &Vec<usize>, rows: &Tensor) -> Result<()> {
        let (slots, mem, me) = (call.place, call.mem, call.me);
        let max_tokens = slots.own.max_tokens;
        for (s, &count) in recv_counts.iter().enumerate() {
            for t in 0..count {
                mem.store_bytes(me, slots.combine_slot_offset(s, t), rows.row_bytes(s * max_tokens + t));
            }
        }
        signal_and_wait(
            mem,
            "one-sided combine",
            |r| slots.group.combine_flag_offset(r),
            call.round,
        )
    }

    /// Pulled from the target's combine region.
    fn host_reply(call: &HostCombine<'_, Self>, _: &Vec<usize>, target: usize, slot: usize, row: &mut [u8]) {
        call.mem
            .load_bytes(target, call.place.combine_slot_offset(call.me, slot), row);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use moe_core::experts::{Experts, ReferenceExperts};
    use moe_core::harness::{Cell, HOST, make_inputs, run_on};
    use moe_core::host::{HostWorldConfig, run_host_world};
    use moe_core::workspace_group::GroupLayout;
    use moe_core::{Dispatched, LayerConfig, PrepareInput, QuantConfig, RankContext, Registry};

    use super::*;

    /// The received top-k ids and weights of a Standard delivery (padding included).
    fn routing_of(d: &Dispatched) -> Vec<u8> {
        match d {
            Dispatched::Standard {
                topk_ids, topk_weights, ..
            } => [topk_ids.bytes(), topk_weights.bytes()].concat(),
            Dispatched::Batched { .. } => unreachable!("Standard was asked"),
        }
    }

    /// A receipt passed to another layer's finalize is refused naming the mistake; its call can
    /// then never run the combine its peers wait for, so every later prepare of the group is
    /// refused, saying so, instead of starting a round ahead of them.
    #[test]
    fn a_receipt_passed_to_another_layer_is_refused_and_stops_the_group() {
        let cell = Cell::new(NAME).reseeded();
        let layer = cell.layer().unwrap();
        let max = layer.dispatch_tokens_bound();
        let results = run_host_world(HostWorldConfig::new(2), |rank| {
            let r = rank.rank();
            let ctx = RankContext::Host(rank);
            let mut a = Registry::global().construct(NAME, &layer, &ctx)?;
            let mut b = Registry::global().construct(NAME, &layer, &ctx)?;
            let inputs = make_inputs(&cell, &layer, 0);
            let inp = &inputs[r];
            let input = || PrepareInput::new(&layer, max, &inp.tokens, &inp.topk_ids, &inp.topk_weights);
            let rows = layer.parallel.world_size() * max;
            let expert_out = Tensor::zeros(layer.moe.input_dtype.dtype(), &[rows, layer.moe.hidden]);
            let mut out = Tensor::zeros(layer.moe.input_dtype.dtype(), inp.tokens.shape());
            let lost = a.prepare(input()?)?;
            let refused = b.finalize(lost.receipt, &expert_out, &mut out).unwrap_err();
            assert!(refused.to_string().contains("another layer's call"), "{refused}");
            for layer in [&mut a, &mut b] {
                let held = layer.prepare(input()?).map(drop).unwrap_err();
                assert!(held.to_string().contains("not finalized"), "{held}");
            }
            Ok(())
        });
        for (r, res) in results.into_iter().enumerate() {
            res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        }
    }

    /// A small bf16 layer and a larger nvfp4 layer (more tokens per rank: their matrices lie
    /// over each other's at other strides), constructed small-first on the same ranks so the
    /// second grows the group, then run alternately: every call delivers the rows and gives
    /// the bits the layer gives on a workspace of its own. (The host delivery copies the filled
    /// slots out, so the padding reset in place is `workspace`'s tests' and the GPU tests'.)
    #[test]
    fn alternating_layers_of_one_group_behave_as_each_alone() {
        let cell = |scheme: QuantScheme, max_tokens: usize, tokens: usize| {
            let mut c = Cell {
                quant: QuantConfig::new(scheme),
                ..Cell::new(NAME)
            };
            c.shape.max_tokens_per_rank = max_tokens;
            c.shape.tokens = tokens;
            c.reseeded()
        };
        let cells = [cell(QuantScheme::Bf16, 16, 5), cell(QuantScheme::Nvfp4, 24, 20)];
        let layers: Vec<LayerConfig> = cells.iter().map(|c| c.layer().unwrap()).collect();
        let own: Vec<WorkspaceLayout> = layers
            .iter()
            .map(|l| WorkspaceLayout::for_layer(l, &l.dispatch_layout()))
            .collect();
        assert!(!own[0].covers(&own[1]) && !own[1].covers(&own[0]));
        let union = own[0].union(own[1]).bytes();
        let experts: Vec<_> = cells
            .iter()
            .map(|c| Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant)))
            .collect();
        let calls: Vec<Vec<_>> = (0..3)
            .map(|i| cells.iter().zip(&layers).map(|(c, l)| make_inputs(c, l, i)).collect())
            .collect();
        let alone: Vec<_> = (0..2)
            .map(|j| {
                let calls: Vec<_> = calls.iter().map(|call| call[j].clone()).collect();
                run_on(Registry::global(), HOST, &cells[j], &layers[j], &experts[j], &calls)
            })
            .collect();
        let shared = run_host_world(HostWorldConfig::new(2), |rank| {
            let r = rank.rank();
            let ctx = RankContext::Host(rank);
            let mut built = Vec::new();
            for l in &layers {
                built.push(Registry::global().construct(NAME, l, &ctx)?);
            }
            let bytes: Vec<usize> = built.iter().map(|b| b.workspace_bytes()).collect();
            let mut seen = Vec::new();
            for call in &calls {
                for (j, (b, inputs)) in built.iter_mut().zip(call).enumerate() {
                    let (l, inp) = (&layers[j], &inputs[r]);
                    let input = PrepareInput::new(
                        l,
                        b.max_tokens_per_rank(),
                        &inp.tokens,
                        &inp.topk_ids,
                        &inp.topk_weights,
                    )?;
                    let prepared = b.prepare(input)?;
                    let rows = routing_of(&prepared.dispatched).len() / (8 * l.moe.top_k);
                    let mut y = Tensor::zeros(moe_core::DType::Bf16, &[rows, l.moe.hidden]);
                    experts[j].apply(&prepared.dispatched, &l.ownership(r), &mut y)?;
                    let mut out = Tensor::zeros(moe_core::DType::Bf16, inp.tokens.shape());
                    b.finalize(prepared.receipt, &y, &mut out)?;
                    seen.push((routing_of(&prepared.dispatched), out.bytes().to_vec()));
                }
            }
            Ok((bytes, seen))
        });
        for (r, got) in shared.into_iter().enumerate() {
            let (bytes, seen) = got.expect("rank ran");
            assert_eq!(bytes, [union, union], "rank {r}: both layers on the union's workspace");
            for (i, (routing, out)) in seen.iter().enumerate() {
                let (call, j) = (i / 2, i % 2);
                let want = &alone[j][r].as_ref().expect("the layer ran alone")[call];
                let what = format!("rank {r} call {call} of layer {j}");
                assert!(
                    routing == &routing_of(&want.received),
                    "{what}: other ids or weights than alone"
                );
                assert!(out == want.out.bytes(), "{what}: other output bits than alone");
            }
        }
    }
}
