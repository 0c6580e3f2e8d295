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
#[cfg(feature = "cuda")]
mod gpu_backend;
mod workspace;

use moe_core::config::ExpertPlacement;
use moe_core::host::SymmetricMemory;
use moe_core::quant::QuantScheme;
use moe_core::registry::{BackendRegistration, Capabilities, Limits};
use moe_core::routing::SendPlan;
use moe_core::slots;
use moe_core::workspace_group::{self, CallTicket, Membership, WorkspaceGroup};
use moe_core::{
    ActivationFormat, DispatchLayout, LayerConfig, ParallelMode, PlatformKind, PrepareFinalize, PrepareInput, Prepared,
    RankContext, Receipt, Result, Tensor,
};

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
    construct: OneSided::construct,
});

/// One layer's one-sided backend on one rank.
#[derive(Debug)]
pub struct OneSided {
    layer: LayerConfig,
    dispatch: DispatchLayout,
    /// The layer's own workspace layout, placed in the group's by [`LayerSlots`].
    own: WorkspaceLayout,
    placement: ExpertPlacement,
    ep_group: Vec<usize>,
    /// The layer in its EP group's shared workspace.
    member: Membership<WorkspaceLayout, SymmetricMemory>,
}

/// Per-call state carried from prepare to finalize.
#[derive(Debug)]
struct OneSidedReceipt {
    /// The call's turn on the workspace group.
    ticket: CallTicket,
    generation: u64,
    plan: SendPlan,
    recv_counts: Vec<usize>,
    /// BatchedExperts only: the received row (`source * max_tokens + slot`) of each row of
    /// each local expert.
    batched_rows: Option<Vec<Vec<usize>>>,
}

impl OneSided {
    /// Constructs the backend for one rank (collective when the workspace must grow).
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
            rank.barrier(&ep_group, "one-sided workspace rebuild")?;
            rank.symmetric_alloc(&ep_group, "one-sided workspace rebuild", layout.bytes().div_ceil(4))
        })?;
        Ok(Box::new(OneSided {
            layer: layer.clone(),
            dispatch,
            own,
            placement: layer.placement(),
            ep_group,
            member: Membership::new(group),
        }))
    }

    /// Dispatch of one call (the turn is taken).
    fn prepare_call(&mut self, input: PrepareInput<'_>, ticket: CallTicket) -> Result<Prepared> {
        let (generation, slots, mem) = self.workspace();
        let layout = slots.group;
        let d = self.dispatch;
        let (me, ep, k) = (mem.me(), self.ep_group.len(), d.top_k);
        // Quantize before the first store: a quantization error then leaves the round counter
        // and every peer's workspace untouched.
        let images = slots::encode_tokens(&d, &self.layer.quant.params, &input)?;
        let round = Self::next_round(&layout, &mem);
        let image_bytes = d.ids_offset();
        let ids = input.topk_ids().to_i32();
        let weights = input.topk_weights().to_f32();
        let plan = SendPlan::new(&ids, k, &self.placement);
        let mut slot = vec![0u8; d.slot_bytes()];
        for t in 0..input.num_tokens() {
            let (ids, weights) = (&ids[t * k..(t + 1) * k], &weights[t * k..(t + 1) * k]);
            slot[..image_bytes].copy_from_slice(&images[t * image_bytes..(t + 1) * image_bytes]);
            for (_, target, at) in plan.sends_of(t) {
                slots::write_routing(
                    &d,
                    ids,
                    weights,
                    Some((target, &self.placement)),
                    &mut slot[image_bytes..],
                );
                for field in Field::ALL {
                    let (from, len) = field.in_slot(&d);
                    mem.store_bytes(target, slots.field_offset(field, me, at), &slot[from..from + len]);
                }
            }
        }
        for (peer, &count) in plan.counts().iter().enumerate() {
            mem.store_u32(peer, layout.recv_count_offset(me), count as u32);
        }
        for peer in 0..ep {
            mem.release_flag(peer, layout.dispatch_flag_offset(me), round);
        }
        for peer in 0..ep {
            mem.acquire_flag("one-sided dispatch", layout.dispatch_flag_offset(peer), peer, round)?;
        }
        let recv_counts: Vec<usize> = (0..ep)
            .map(|s| mem.load_u32(me, layout.recv_count_offset(s)) as usize)
            .collect();
        let received = slots.received_rows(d, &recv_counts, |at, bytes| mem.load_bytes(me, at, bytes));
        slots.pad_unfilled(&mem, &recv_counts);
        let scale_layout = self.layer.quant.received_scale_layout(self.layer.moe.input_dtype);
        let (dispatched, batched_rows) = match self.layer.activation_format {
            ActivationFormat::Standard => (received.into_standard(scale_layout)?, None),
            ActivationFormat::BatchedExperts => {
                let (dispatched, sources) = received.into_batched(&self.placement, me, scale_layout)?;
                (dispatched, Some(sources))
            }
        };
        Ok(Prepared {
            dispatched,
            receipt: Receipt::new(
                NAME,
                OneSidedReceipt {
                    ticket,
                    generation,
                    plan,
                    recv_counts,
                    batched_rows,
                },
            ),
            expert_output: None,
        })
    }

    /// Combine of one call (the turn is released after it, whatever the outcome).
    fn finalize_call(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let state: OneSidedReceipt = receipt.into_state(NAME)?;
        self.member.finish_call(state.ticket)?;
        let (layout, mem) = self.member.workspace_of(state.generation, "finalize")?;
        let slots = LayerSlots::new(layout, self.own);
        let h = self.dispatch.hidden;
        let dtype = self.layer.moe.input_dtype.dtype();
        let n = state.plan.num_tokens();
        let (me, ep, max_tokens) = (mem.me(), self.ep_group.len(), self.max_tokens_per_rank());
        let rows = ep * max_tokens;
        out.expect("finalize", "out", dtype, &[n, h])?;
        let staged = combine_rows(state.batched_rows.as_deref(), expert_output, rows, h, dtype)?;
        let rows_out = staged.as_ref().unwrap_or(expert_output);
        let round = Self::current_round(&layout, &mem);
        for (s, &count) in state.recv_counts.iter().enumerate() {
            for t in 0..count {
                mem.store_bytes(
                    me,
                    slots.combine_slot_offset(s, t),
                    rows_out.row_bytes(s * max_tokens + t),
                );
            }
        }
        for peer in 0..ep {
            mem.release_flag(peer, layout.combine_flag_offset(me), round);
        }
        for peer in 0..ep {
            mem.acquire_flag("one-sided combine", layout.combine_flag_offset(peer), peer, round)?;
        }
        let mut row = Tensor::zeros(dtype, &[h]);
        let mut acc = vec![0f32; h];
        for t in 0..n {
            acc.fill(0.0);
            for (_, target, slot) in state.plan.sends_of(t) {
                mem.load_bytes(target, slots.combine_slot_offset(me, slot), row.bytes_mut());
                acc.iter_mut().zip(row.to_f32()).for_each(|(a, v)| *a += v);
            }
            out.store_f32(t * h, &acc);
        }
        Ok(())
    }

    /// The group's current generation, this layer's slots in it, and its memory.
    fn workspace(&self) -> (u64, LayerSlots, SymmetricMemory) {
        let (generation, layout, memory) = self.member.current();
        (generation, LayerSlots::new(layout, self.own), memory)
    }

    /// Advances the round counter for a new call (at its dispatch) and returns the new round.
    fn next_round(layout: &WorkspaceLayout, mem: &SymmetricMemory) -> u32 {
        let round = Self::current_round(layout, mem).wrapping_add(1);
        mem.store_u32(mem.me(), layout.round_offset(), round);
        round
    }

    /// The round of the call in progress (its combine flags carry the dispatch's round).
    fn current_round(layout: &WorkspaceLayout, mem: &SymmetricMemory) -> u32 {
        mem.load_u32(mem.me(), layout.round_offset())
    }
}

#[cfg(feature = "cuda")]
fn construct_on_gpu(layer: &LayerConfig, rank: &moe_core::CudaRank) -> Result<Box<dyn PrepareFinalize>> {
    gpu_backend::GpuBackend::construct(layer, rank)
}

#[cfg(not(feature = "cuda"))]
fn construct_on_gpu(_: &LayerConfig, _: &moe_core::CudaRank) -> Result<Box<dyn PrepareFinalize>> {
    Err(moe_core::MoeError::built_without_cuda(NAME))
}

/// One combine row per received token (`rows` of them): `Some` in BatchedExperts format, where
/// the row is the f32 sum of the token's rows over this rank's experts (`batched_rows[expert]`
/// lists the received row of each of the expert's rows); `None` in Standard format, where the
/// experts' output already is one row per received token. Checks the output's shape.
fn combine_rows(
    batched_rows: Option<&[Vec<usize>]>,
    expert_output: &Tensor,
    rows: usize,
    h: usize,
    dtype: moe_core::DType,
) -> Result<Option<Tensor>> {
    let Some(sources) = batched_rows else {
        expert_output.expect("finalize", "expert_output", dtype, &[rows, h])?;
        return Ok(None);
    };
    slots::reduce_batched(sources, expert_output, rows, h, dtype).map(Some)
}

impl PrepareFinalize for OneSided {
    fn name(&self) -> &'static str {
        NAME
    }
    fn activation_format(&self) -> ActivationFormat {
        self.layer.activation_format
    }
    /// `true`: every rank that owns one of a token's experts sends its weighted partial sum
    /// back, and combine adds all of them.
    fn output_is_reduced(&self) -> bool {
        true
    }
    fn max_tokens_per_rank(&self) -> usize {
        self.layer.dispatch_tokens_bound()
    }
    fn num_dispatchers(&self) -> usize {
        self.ep_group.len()
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
mod tests {
    use std::sync::Arc;

    use moe_core::experts::{Experts, ReferenceExperts};
    use moe_core::harness::{Cell, HOST, make_inputs, run_on};
    use moe_core::host::{HostWorldConfig, run_host_world};
    use moe_core::workspace_group::GroupLayout;
    use moe_core::{Dispatched, QuantConfig, Registry};

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
