//! nvlink-one-sided: rank-major push dispatch and pull combine over peer memory, after
//! TensorRT-LLM's one-sided MoE all-to-all.
//!
//! Dispatch: each rank quantizes its tokens and writes each token once per destination rank
//! straight into that rank's receive buffer `[ranks, max_tokens, slot]` at `(my_rank, slot)`,
//! where `slot` counts the tokens already sent there; then it stores the send count into the
//! receiver and raises the receiver's dispatch flag for it with the round value (release); then
//! it waits (bounded) until every peer raised its flag here (acquire).
//!
//! Combine: each rank stages its experts' output rows in its own combine region, at the
//! `(source, slot)` the rows arrived in, raises its combine flag on every peer, waits for every
//! peer's, and then pulls each of its tokens' rows from the ranks the token went to and sums
//! them in f32 in top-k order (bitwise reproducible).
//!
//! It can deliver BatchedExperts activations (`[local_experts, ranks * max_tokens, ..]` plus
//! per-expert counts) for batched expert kernels; the rows of one token are summed over local
//! experts before they are staged for combine.
#![forbid(unsafe_code)]

mod workspace;

use moe_core::config::ExpertPlacement;
use moe_core::host::SymmetricMemory;
use moe_core::quant::{QuantScheme, quantize_token, swizzle};
use moe_core::registry::{BackendRegistration, Capabilities, Limits};
use moe_core::routing::{SendPlan, mask_foreign};
use moe_core::{
    ActivationFormat, Activations, DType, DispatchLayout, Dispatched, LayerConfig, MoeError,
    ParallelMode, PlatformKind, PrepareFinalize, PrepareInput, Prepared, RankContext, Receipt,
    Result, ScaleLayout, Tensor,
};

pub use workspace::{SharedGroup, WorkspaceGroup, WorkspaceLayout};

/// The registered name.
pub const NAME: &str = "nvlink-one-sided";

/// What this backend declares.
pub const CAPABILITIES: Capabilities = Capabilities {
    quant_schemes: &QuantScheme::ALL,
    deferred_quant: true,
    swizzled_scales: true,
    activation_formats: &[ActivationFormat::Standard, ActivationFormat::BatchedExperts],
    parallel_modes: &[ParallelMode::Ep, ParallelMode::TpDpEp, ParallelMode::Sp],
    platforms: &[PlatformKind::Host],
    needs_all_pairs_peer_access: true,
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
    placement: ExpertPlacement,
    ep_group: Vec<usize>,
    group: SharedGroup,
}

/// Per-call state carried from prepare to finalize.
#[derive(Debug)]
struct OneSidedReceipt {
    generation: u64,
    plan: SendPlan,
    recv_counts: Vec<usize>,
    /// BatchedExperts only: the `(source, slot)` of each row of each local expert.
    batched_rows: Option<Vec<Vec<(usize, usize)>>>,
}

impl OneSided {
    /// Constructs the backend for one rank (collective when the workspace must grow).
    pub fn construct(layer: &LayerConfig, ctx: &RankContext) -> Result<Box<dyn PrepareFinalize>> {
        let rank = ctx.host(NAME)?;
        let dispatch = layer.dispatch_layout();
        let ep_group = layer.parallel.world_group();
        let group = WorkspaceGroup::of(rank, &ep_group);
        group.lock().unwrap_or_else(|e| e.into_inner()).admit(
            rank,
            &ep_group,
            layer,
            WorkspaceLayout::for_layer(layer, &dispatch),
        )?;
        Ok(Box::new(OneSided {
            layer: layer.clone(),
            dispatch,
            placement: layer.placement(),
            ep_group,
            group,
        }))
    }

    fn workspace(&self) -> (u64, WorkspaceLayout, SymmetricMemory) {
        let g = self.group.lock().unwrap_or_else(|e| e.into_inner());
        let (layout, memory) = g.current();
        (g.generation, layout, memory)
    }

    fn next_round(layout: &WorkspaceLayout, mem: &SymmetricMemory) -> u32 {
        let round = mem
            .load_u32(mem.me(), layout.round_offset())
            .wrapping_add(1);
        mem.store_u32(mem.me(), layout.round_offset(), round);
        round
    }

    /// Builds the quantized image of every token: payload then scales, at slot offsets.
    fn encode_tokens(&self, input: &PrepareInput<'_>) -> Result<Vec<u8>> {
        let d = &self.dispatch;
        let n = input.num_tokens();
        let x = input.tokens().to_f32();
        let h = d.hidden;
        let image_bytes = d.ids_offset();
        let mut images = vec![0u8; n * image_bytes];
        for t in 0..n {
            let img = &mut images[t * image_bytes..(t + 1) * image_bytes];
            let (payload, rest) = img.split_at_mut(d.scales_offset());
            quantize_token(
                d.scheme,
                &self.layer.quant.params,
                &x[t * h..(t + 1) * h],
                &mut payload[..d.wire.payload_bytes],
                &mut rest[..d.wire.scale_bytes],
            )?;
        }
        Ok(images)
    }
}

impl PrepareFinalize for OneSided {
    fn name(&self) -> &'static str {
        NAME
    }
    fn activation_format(&self) -> ActivationFormat {
        self.layer.activation_format
    }
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
        self.workspace().1.bytes()
    }

    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared> {
        let (generation, layout, mem) = self.workspace();
        let d = self.dispatch;
        let me = mem.me();
        let ep = self.ep_group.len();
        let k = d.top_k;
        let round = Self::next_round(&layout, &mem);

        let images = self.encode_tokens(&input)?;
        let image_bytes = d.ids_offset();
        let ids = input.topk_ids().to_i32();
        let weights = input.topk_weights().to_f32();
        let plan = SendPlan::new(&ids, k, &self.placement);
        let mut tail = vec![0u8; d.slot_bytes() - image_bytes];
        for t in 0..input.num_tokens() {
            for (_, target, slot) in plan.sends_of(t) {
                let mut tid = ids[t * k..(t + 1) * k].to_vec();
                let mut tw = weights[t * k..(t + 1) * k].to_vec();
                mask_foreign(&mut tid, &mut tw, target, &self.placement);
                tail.fill(0);
                tail[..4 * k].copy_from_slice(bytemuck::cast_slice(&tid));
                let w_at = d.weights_offset() - image_bytes;
                tail[w_at..w_at + 4 * k].copy_from_slice(bytemuck::cast_slice(&tw));
                let at = layout.dispatch_slot_offset(me, slot);
                mem.store_bytes(target, at, &images[t * image_bytes..(t + 1) * image_bytes]);
                mem.store_bytes(target, at + image_bytes, &tail);
            }
        }
        for (peer, &count) in plan.counts().iter().enumerate() {
            mem.store_u32(peer, layout.recv_count_offset(me), count as u32);
        }
        for peer in 0..ep {
            mem.release_flag(peer, layout.dispatch_flag_offset(me), round);
        }
        for peer in 0..ep {
            mem.acquire_flag(
                "one-sided dispatch",
                layout.dispatch_flag_offset(peer),
                peer,
                round,
            )?;
        }
        let recv_counts: Vec<usize> = (0..ep)
            .map(|s| mem.load_u32(me, layout.recv_count_offset(s)) as usize)
            .collect();

        let max_tokens = self.max_tokens_per_rank();
        let rows = ep * max_tokens;
        let mut slot = vec![0u8; d.slot_bytes()];
        let mut payload = vec![0u8; rows * d.wire.payload_bytes];
        let mut scales = vec![0u8; rows * d.wire.scale_bytes];
        let mut rids = vec![-1i32; rows * k];
        let mut rw = vec![0f32; rows * k];
        for (s, &count) in recv_counts.iter().enumerate() {
            for t in 0..count {
                let r = s * max_tokens + t;
                mem.load_bytes(me, layout.dispatch_slot_offset(s, t), &mut slot);
                let wire = &d.wire;
                payload[r * wire.payload_bytes..(r + 1) * wire.payload_bytes]
                    .copy_from_slice(&slot[..wire.payload_bytes]);
                scales[r * wire.scale_bytes..(r + 1) * wire.scale_bytes].copy_from_slice(
                    &slot[d.scales_offset()..d.scales_offset() + wire.scale_bytes],
                );
                rids[r * k..(r + 1) * k].copy_from_slice(bytemuck::cast_slice(
                    &slot[d.ids_offset()..d.ids_offset() + 4 * k],
                ));
                rw[r * k..(r + 1) * k].copy_from_slice(bytemuck::cast_slice(
                    &slot[d.weights_offset()..d.weights_offset() + 4 * k],
                ));
            }
        }

        let scale_layout = self
            .layer
            .quant
            .received_scale_layout(self.layer.moe.input_dtype);
        let (dispatched, batched_rows) = match self.layer.activation_format {
            ActivationFormat::Standard => {
                let activations = activations(&d, scale_layout, payload, scales, &[rows])?;
                (
                    Dispatched::Standard {
                        activations,
                        topk_ids: Tensor::from_i32(&[rows, k], &rids),
                        topk_weights: Tensor::from_f32(DType::F32, &[rows, k], &rw),
                    },
                    None,
                )
            }
            ActivationFormat::BatchedExperts => {
                let local = self.placement.experts_of(me);
                let e_local = local.len();
                let mut map: Vec<Vec<(usize, usize)>> = vec![Vec::new(); e_local];
                let mut bw = vec![0f32; e_local * rows];
                let mut bp = vec![0u8; e_local * rows * d.wire.payload_bytes];
                let mut bs = vec![0u8; e_local * rows * d.wire.scale_bytes];
                let (pb, sb) = (d.wire.payload_bytes, d.wire.scale_bytes);
                for (s, &count) in recv_counts.iter().enumerate() {
                    for t in 0..count {
                        let r = s * max_tokens + t;
                        for j in 0..k {
                            let id = rids[r * k + j];
                            if id < 0 {
                                continue;
                            }
                            let li = self.placement.local_index(id as usize);
                            let row = li * rows + map[li].len();
                            bp[row * pb..(row + 1) * pb]
                                .copy_from_slice(&payload[r * pb..(r + 1) * pb]);
                            bs[row * sb..(row + 1) * sb]
                                .copy_from_slice(&scales[r * sb..(r + 1) * sb]);
                            bw[row] = rw[r * k + j];
                            map[li].push((s, t));
                        }
                    }
                }
                let counts: Vec<i32> = map.iter().map(|m| m.len() as i32).collect();
                let activations = activations(&d, scale_layout, bp, bs, &[e_local, rows])?;
                (
                    Dispatched::Batched {
                        activations,
                        expert_counts: Tensor::from_i32(&[e_local], &counts),
                        weights: Tensor::from_f32(DType::F32, &[e_local, rows], &bw),
                    },
                    Some(map),
                )
            }
        };
        Ok(Prepared {
            dispatched,
            receipt: Receipt::new(
                NAME,
                OneSidedReceipt {
                    generation,
                    plan,
                    recv_counts,
                    batched_rows,
                },
            ),
        })
    }

    fn finalize(
        &mut self,
        receipt: Receipt,
        expert_output: &Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        let state: OneSidedReceipt = receipt.into_state(NAME)?;
        let (generation, layout, mem) = self.workspace();
        if generation != state.generation {
            return Err(MoeError::InvalidInput {
                op: "finalize",
                detail: "the shared workspace was rebuilt (a larger layer was constructed) between prepare and finalize; construct every layer before running any".to_string(),
            });
        }
        let h = self.dispatch.hidden;
        let dtype = self.layer.moe.input_dtype.dtype();
        let n = state.plan.num_tokens();
        out.expect("finalize", "out", dtype, &[n, h])?;
        let me = mem.me();
        let ep = self.ep_group.len();
        let max_tokens = self.max_tokens_per_rank();
        let row_bytes = self.dispatch.combine_row_bytes;
        let round = Self::next_round(&layout, &mem);

        match &state.batched_rows {
            None => {
                expert_output.expect("finalize", "expert_output", dtype, &[ep * max_tokens, h])?;
                for (s, &count) in state.recv_counts.iter().enumerate() {
                    for t in 0..count {
                        mem.store_bytes(
                            me,
                            layout.combine_slot_offset(s, t),
                            expert_output.row_bytes(s * max_tokens + t),
                        );
                    }
                }
            }
            Some(map) => {
                let rows = ep * max_tokens;
                expert_output.expect("finalize", "expert_output", dtype, &[map.len(), rows, h])?;
                let y = expert_output.to_f32();
                let mut acc = vec![0f32; ep * max_tokens * h];
                for (li, entries) in map.iter().enumerate() {
                    for (i, &(s, t)) in entries.iter().enumerate() {
                        let src = &y[(li * rows + i) * h..(li * rows + i + 1) * h];
                        let dst = &mut acc[(s * max_tokens + t) * h..(s * max_tokens + t + 1) * h];
                        dst.iter_mut().zip(src).for_each(|(a, v)| *a += v);
                    }
                }
                let staged = Tensor::from_f32(dtype, &[rows, h], &acc);
                for (s, &count) in state.recv_counts.iter().enumerate() {
                    for t in 0..count {
                        mem.store_bytes(
                            me,
                            layout.combine_slot_offset(s, t),
                            staged.row_bytes(s * max_tokens + t),
                        );
                    }
                }
            }
        }
        for peer in 0..ep {
            mem.release_flag(peer, layout.combine_flag_offset(me), round);
        }
        for peer in 0..ep {
            mem.acquire_flag(
                "one-sided combine",
                layout.combine_flag_offset(peer),
                peer,
                round,
            )?;
        }
        let mut row = vec![0u8; row_bytes];
        let mut acc = vec![0f32; h];
        for t in 0..n {
            acc.fill(0.0);
            for (_, target, slot) in state.plan.sends_of(t) {
                mem.load_bytes(target, layout.combine_slot_offset(me, slot), &mut row);
                let part = Tensor::from_bytes(dtype, &[h], row.clone())?;
                acc.iter_mut().zip(part.to_f32()).for_each(|(a, v)| *a += v);
            }
            out.store_f32(t * h, &acc);
        }
        Ok(())
    }
}

/// Wraps received payload and scale bytes (`lead` leading dims, each matrix of rows
/// swizzled on its own when asked).
fn activations(
    d: &DispatchLayout,
    layout: Option<ScaleLayout>,
    payload: Vec<u8>,
    scales: Vec<u8>,
    lead: &[usize],
) -> Result<Activations> {
    let mut shape = lead.to_vec();
    shape.push(d.wire.payload_bytes);
    let data = Tensor::from_bytes(DType::U8, &shape, payload)?;
    let scales = match layout {
        None => None,
        Some(ScaleLayout::Linear) => {
            let mut s = lead.to_vec();
            s.push(d.wire.scale_bytes);
            Some((
                Tensor::from_bytes(DType::U8, &s, scales)?,
                ScaleLayout::Linear,
            ))
        }
        Some(ScaleLayout::Swizzled128x4) => {
            let rows = *lead.last().expect("at least one leading dim");
            let cols = d.wire.scales_per_token;
            let matrices = lead.iter().product::<usize>() / rows.max(1);
            let mut out = Vec::with_capacity(matrices * swizzle::swizzled_len(rows, cols));
            for m in 0..matrices {
                out.extend(swizzle::swizzle_128x4(
                    &scales[m * rows * cols..(m + 1) * rows * cols],
                    rows,
                    cols,
                ));
            }
            let len = out.len();
            Some((
                Tensor::from_bytes(DType::U8, &[len], out)?,
                ScaleLayout::Swizzled128x4,
            ))
        }
    };
    Ok(Activations::new(d.scheme, data, scales))
}
