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
#![deny(unsafe_code)]

// The kernel and NCCL launches on device addresses cross the FFI boundary into moe-kernels'
// launchers.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub mod cuda;

use moe_core::host::HostRank;
use moe_core::quant::QuantScheme;
use moe_core::registry::{BackendRegistration, Capabilities, Limits};
use moe_core::slots::{self, ReceivedRows};
use moe_core::{
    ActivationFormat, DispatchLayout, ExpertPlacement, LayerConfig, ParallelMode, PlatformKind, PrepareFinalize,
    PrepareInput, Prepared, RankContext, Receipt, Result, Tensor,
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
    platforms: &[PlatformKind::Host, PlatformKind::Cuda],
    needs_all_pairs_peer_access: false,
    gpu_per_rank: true,
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

#[derive(Debug)]
struct AllGatherReceipt {
    tokens: usize,
}

#[cfg(feature = "cuda")]
fn construct_on_gpu(layer: &LayerConfig, rank: &moe_core::CudaRank) -> Result<Box<dyn PrepareFinalize>> {
    cuda::CudaAllGather::construct(layer, rank)
}

#[cfg(not(feature = "cuda"))]
fn construct_on_gpu(_: &LayerConfig, _: &moe_core::CudaRank) -> Result<Box<dyn PrepareFinalize>> {
    Err(moe_core::MoeError::built_without_cuda(NAME))
}

impl AllGather {
    /// Constructs the backend for one rank.
    pub fn construct(layer: &LayerConfig, ctx: &RankContext) -> Result<Box<dyn PrepareFinalize>> {
        if let RankContext::Cuda(rank) = ctx {
            return construct_on_gpu(layer, rank);
        }
        let rank = ctx.host(NAME)?;
        let p = layer.parallel;
        let group = if p.sp { p.world_group() } else { p.dp_group(rank.rank()) };
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
        input.require_host(self.name())?;
        let d = self.dispatch;
        let (k, max, n) = (d.top_k, self.max_tokens_per_rank(), input.num_tokens());
        let (image_bytes, slot_bytes) = (d.ids_offset(), d.slot_bytes());
        let images = slots::encode_tokens(&d, &self.layer.quant.params, &input)?;
        let ids = input.topk_ids().to_i32();
        let weights = input.topk_weights().to_f32();
        // `max` slots, the unused ones padding (ids -1), so receivers need no counts up front.
        let mut mine = vec![0u8; max * slot_bytes];
        let padding_ids = vec![-1i32; k];
        let padding_weights = vec![0f32; k];
        for (t, slot) in mine.chunks_exact_mut(slot_bytes).enumerate() {
            let (image, tail) = slot.split_at_mut(image_bytes);
            if t < n {
                image.copy_from_slice(&images[t * image_bytes..(t + 1) * image_bytes]);
                slots::write_routing(&d, &ids[t * k..(t + 1) * k], &weights[t * k..(t + 1) * k], None, tail);
            } else {
                slots::write_routing(&d, &padding_ids, &padding_weights, None, tail);
            }
        }
        let all = self.rank.all_gather(&self.group, "allgather dispatch", mine)?;
        let mut received = ReceivedRows::new(d, self.group.len() * max);
        for (g, slots) in all.iter().enumerate() {
            for (t, slot) in slots.chunks_exact(slot_bytes).enumerate() {
                received.fill(g * max + t, slot);
            }
        }
        if let Some(placement) = &self.placement {
            received.mask_foreign(self.rank.rank(), placement);
        }
        let scale_layout = self.layer.quant.received_scale_layout(self.layer.moe.input_dtype);
        Ok(Prepared {
            dispatched: received.into_standard(scale_layout)?,
            receipt: Receipt::new(NAME, AllGatherReceipt { tokens: n }),
            expert_output: None,
        })
    }

    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let state: AllGatherReceipt = receipt.into_state(NAME)?;
        let h = self.dispatch.hidden;
        let dtype = self.layer.moe.input_dtype.dtype();
        let max = self.max_tokens_per_rank();
        expert_output.expect("finalize", "expert_output", dtype, &[self.group.len() * max, h])?;
        out.expect("finalize", "out", dtype, &[state.tokens, h])?;
        let mine = self
            .rank
            .reduce_scatter_sum(&self.group, "allgather combine", expert_output.to_f32())?;
        out.store_f32(0, &mine[..state.tokens * h]);
        Ok(())
    }
}
