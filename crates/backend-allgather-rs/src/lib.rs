//! allgather-rs: all-gather the (quantized) tokens, their scales, top-k ids and weights over
//! the dispatch group, let every rank's experts run on every gathered token, and reduce-scatter
//! the expert outputs back.
//!
//! The dispatch group is the rank's DP group (the ranks with its `tp_rank`), or every rank under
//! sequence parallelism. Each rank contributes `max_tokens` rows plus its count, so receivers
//! never need the counts before the transfer (no host synchronization on GPUs). After the
//! reduce-scatter a rank holds the sum over its dispatch group; that is the complete result
//! when the group spans every rank (tp = 1, or SP), and a partial sum to be all-reduced over
//! the TP group otherwise, which `output_is_reduced` reports.
#![forbid(unsafe_code)]

use moe_core::host::HostRank;
use moe_core::quant::{QuantScheme, quantize_token, swizzle};
use moe_core::registry::{BackendRegistration, Capabilities, Limits};
use moe_core::routing::mask_foreign;
use moe_core::{
    ActivationFormat, Activations, DType, DispatchLayout, Dispatched, ExpertPlacement, LayerConfig,
    ParallelMode, PlatformKind, PrepareFinalize, PrepareInput, Prepared, RankContext, Receipt,
    Result, ScaleLayout, Tensor,
};

/// The registered name.
pub const NAME: &str = "allgather-rs";

/// What this backend declares.
pub const CAPABILITIES: Capabilities = Capabilities {
    quant_schemes: &QuantScheme::ALL,
    deferred_quant: true,
    swizzled_scales: true,
    activation_formats: &[ActivationFormat::Standard],
    parallel_modes: &[
        ParallelMode::Single,
        ParallelMode::Ep,
        ParallelMode::Dp,
        ParallelMode::Tp,
        ParallelMode::TpDp,
        ParallelMode::TpDpEp,
        ParallelMode::Sp,
    ],
    platforms: &[PlatformKind::Host],
    needs_all_pairs_peer_access: false,
    single_node: false,
    limits: Limits {
        max_ranks: 1024,
        max_top_k: 64,
        hidden_multiple_of: 1,
        max_tokens_per_rank: 1 << 20,
    },
};

moe_core::register_backend!(BackendRegistration {
    name: NAME,
    description: "all-gather dispatch and reduce-scatter combine; any topology and parallel mode, moves group_size times more data than an all-to-all",
    capabilities: CAPABILITIES,
    construct: AllGather::construct,
});

/// One layer's all-gather backend on one rank.
#[derive(Debug)]
pub struct AllGather {
    layer: LayerConfig,
    dispatch: DispatchLayout,
    /// `Some` under EP: ids of experts other ranks own are masked to -1.
    placement: Option<ExpertPlacement>,
    rank: HostRank,
    group: Vec<usize>,
}

/// One rank's contribution to the gather: `max_tokens` rows, padding rows with ids -1.
#[derive(Clone, Debug)]
struct Contribution {
    payload: Vec<u8>,
    scales: Vec<u8>,
    ids: Vec<i32>,
    weights: Vec<f32>,
}

#[derive(Debug)]
struct AllGatherReceipt {
    tokens: usize,
}

impl AllGather {
    /// Constructs the backend for one rank.
    pub fn construct(layer: &LayerConfig, ctx: &RankContext) -> Result<Box<dyn PrepareFinalize>> {
        let rank = ctx.host(NAME)?;
        let p = layer.parallel;
        let group = if p.sp {
            p.world_group()
        } else {
            p.dp_group(rank.rank())
        };
        Ok(Box::new(AllGather {
            layer: layer.clone(),
            dispatch: layer.dispatch_layout(),
            placement: p.ep.then(|| layer.placement()),
            rank: rank.clone(),
            group,
        }))
    }
}

impl PrepareFinalize for AllGather {
    fn name(&self) -> &'static str {
        NAME
    }
    fn activation_format(&self) -> ActivationFormat {
        ActivationFormat::Standard
    }
    fn output_is_reduced(&self) -> bool {
        self.group.len() == self.layer.parallel.world_size()
    }
    fn max_tokens_per_rank(&self) -> usize {
        self.layer.dispatch_tokens_bound()
    }
    fn num_dispatchers(&self) -> usize {
        self.group.len()
    }
    fn workspace_bytes(&self) -> usize {
        0
    }

    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared> {
        let d = self.dispatch;
        let (h, k, max) = (d.hidden, d.top_k, self.max_tokens_per_rank());
        let (pb, sb) = (d.wire.payload_bytes, d.wire.scale_bytes);
        let n = input.num_tokens();
        let x = input.tokens().to_f32();
        let mut mine = Contribution {
            payload: vec![0; max * pb],
            scales: vec![0; max * sb],
            ids: vec![-1; max * k],
            weights: vec![0.0; max * k],
        };
        for t in 0..n {
            quantize_token(
                d.scheme,
                &self.layer.quant.params,
                &x[t * h..(t + 1) * h],
                &mut mine.payload[t * pb..(t + 1) * pb],
                &mut mine.scales[t * sb..(t + 1) * sb],
            )?;
        }
        mine.ids[..n * k].copy_from_slice(&input.topk_ids().to_i32());
        mine.weights[..n * k].copy_from_slice(&input.topk_weights().to_f32());

        let all = self
            .rank
            .all_gather(&self.group, "allgather dispatch", vec![mine])?;
        let rows = self.group.len() * max;
        let (mut payload, mut scales) =
            (Vec::with_capacity(rows * pb), Vec::with_capacity(rows * sb));
        let (mut ids, mut weights) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
        for c in all.iter().map(|v| &v[0]) {
            payload.extend_from_slice(&c.payload);
            scales.extend_from_slice(&c.scales);
            ids.extend_from_slice(&c.ids);
            weights.extend_from_slice(&c.weights);
        }
        if let Some(placement) = &self.placement {
            let me = self.rank.rank();
            for (i, w) in ids.chunks_exact_mut(k).zip(weights.chunks_exact_mut(k)) {
                mask_foreign(i, w, me, placement);
            }
        }
        let data = Tensor::from_bytes(DType::U8, &[rows, pb], payload)?;
        let scales = match self
            .layer
            .quant
            .received_scale_layout(self.layer.moe.input_dtype)
        {
            None => None,
            Some(ScaleLayout::Linear) => Some((
                Tensor::from_bytes(DType::U8, &[rows, sb], scales)?,
                ScaleLayout::Linear,
            )),
            Some(ScaleLayout::Swizzled128x4) => {
                let s = swizzle::swizzle_128x4(&scales, rows, d.wire.scales_per_token);
                let len = s.len();
                Some((
                    Tensor::from_bytes(DType::U8, &[len], s)?,
                    ScaleLayout::Swizzled128x4,
                ))
            }
        };
        Ok(Prepared {
            dispatched: Dispatched::Standard {
                activations: Activations::new(d.scheme, data, scales),
                topk_ids: Tensor::from_i32(&[rows, k], &ids),
                topk_weights: Tensor::from_f32(DType::F32, &[rows, k], &weights),
            },
            receipt: Receipt::new(NAME, AllGatherReceipt { tokens: n }),
        })
    }

    fn finalize(
        &mut self,
        receipt: Receipt,
        expert_output: &Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        let state: AllGatherReceipt = receipt.into_state(NAME)?;
        let h = self.dispatch.hidden;
        let dtype = self.layer.moe.input_dtype.dtype();
        let max = self.max_tokens_per_rank();
        expert_output.expect(
            "finalize",
            "expert_output",
            dtype,
            &[self.group.len() * max, h],
        )?;
        out.expect("finalize", "out", dtype, &[state.tokens, h])?;
        let mine = self.rank.reduce_scatter_sum(
            &self.group,
            "allgather combine",
            expert_output.to_f32(),
        )?;
        out.store_f32(0, &mine[..state.tokens * h]);
        Ok(())
    }
}
