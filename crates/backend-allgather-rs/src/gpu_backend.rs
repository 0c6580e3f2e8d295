//! allgather-rs as a [`PrepareFinalize`] on GPU ranks: [`GpuAllGather`] (NCCL all-gather and
//! reduce-scatter) with host tensors at the contract's boundary, so the layer runner, the host
//! reference experts and the test matrix run on GPUs unchanged.

use moe_core::{
    ActivationFormat, CudaRank, LayerConfig, Location, MoeError, PrepareFinalize, PrepareInput, Prepared, Receipt,
    Result, Tensor,
};
use moe_kernels::platform::CudaRankDevice;

use crate::NAME;
use crate::cuda::{GpuAllGather, group_of, new_comm_id};

/// One layer's all-gather backend on one GPU rank.
#[derive(Debug)]
pub struct GpuBackend {
    layer: LayerConfig,
    group: Vec<usize>,
    gpu: GpuAllGather,
}

// SAFETY: the NCCL communicator inside `GpuAllGather` is what makes it !Send (a raw pointer).
// NCCL allows a communicator to be used from any thread as long as calls on it are not
// concurrent; `PrepareFinalize` takes `&mut self` for every call that touches it, so moving the
// backend to another thread cannot make two calls overlap.
unsafe impl Send for GpuBackend {}

/// Per-call state carried from prepare to finalize: nothing beyond the GPU's own, but finalize
/// still needs a receipt from this backend.
#[derive(Debug)]
struct GpuReceipt;

impl GpuBackend {
    /// Constructs the backend on a GPU rank: the dispatch group's first rank makes the NCCL
    /// communicator id and shares it; every member joins the communicator (collective).
    pub fn construct(layer: &LayerConfig, ctx: &CudaRank) -> Result<Box<dyn PrepareFinalize>> {
        let device = CudaRankDevice::of(ctx, NAME)?;
        let host = ctx.host();
        let group = group_of(layer, device.rank);
        let id = host.share_from_first(&group, "allgather NCCL id", || {
            new_comm_id().map_err(|e| format!("making the NCCL id: {e}"))
        })?;
        let gpu = GpuAllGather::new(layer, device.gpu().clone(), device.rank, id)?;
        Ok(Box::new(GpuBackend {
            layer: layer.clone(),
            group,
            gpu,
        }))
    }
}

impl PrepareFinalize for GpuBackend {
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
        if input.location() != Location::Host {
            return Err(MoeError::Unsupported(format!(
                "{NAME} on GPUs stages its inputs through host memory; the inputs are on {}: pass host tensors, or use nvlink-one-sided or nvlink-two-sided, which take device tensors",
                input.location()
            )));
        }
        Ok(Prepared {
            dispatched: self.gpu.dispatch(input)?,
            receipt: Receipt::new(NAME, GpuReceipt),
            expert_output: None,
        })
    }

    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let GpuReceipt = receipt.into_state(NAME)?;
        self.gpu.combine(expert_output, out)
    }
}
