//! nvlink-two-sided as a [`PrepareFinalize`] on GPU ranks: the GPU protocol of [`GpuTwoSided`]
//! with host tensors at the contract's boundary, so the layer runner, the host reference experts
//! and the test matrix run on GPUs unchanged.

use moe_core::{
    ActivationFormat, CudaRank, LayerConfig, PrepareFinalize, PrepareInput, Prepared, Receipt, Result, Tensor,
};
use moe_kernels::platform::CudaRankDevice;
use moe_kernels::two_sided::TwoSidedLaunch;

use crate::NAME;
use crate::WorkspaceLayout;
use crate::cuda::GpuTwoSided;

/// One layer's two-sided backend on one GPU rank.
#[derive(Debug)]
pub struct GpuBackend {
    layer: LayerConfig,
    gpu: GpuTwoSided,
}

/// Per-call state carried from prepare to finalize: nothing beyond the GPU's own, but finalize
/// still needs a receipt from this backend.
#[derive(Debug)]
struct GpuReceipt;

impl GpuBackend {
    /// Constructs the backend on a GPU rank: the group's first rank allocates every rank's
    /// workspace, each rank loads its kernels, and all wait for each other before any can
    /// dispatch (a rank that allocates while a peer's kernel spins waiting for it would hang).
    pub fn construct(layer: &LayerConfig, ctx: &CudaRank) -> Result<Box<dyn PrepareFinalize>> {
        let device = CudaRankDevice::of(ctx, NAME)?;
        let host = ctx.host();
        let group = layer.parallel.world_group();
        let layout = WorkspaceLayout::for_layer(layer, &layer.dispatch_layout());
        let built = device
            .symmetric_workspace(host, &group, "two-sided GPU workspace", layout.bytes())
            .and_then(|workspaces| {
                GpuTwoSided::new(
                    layer,
                    &device.world,
                    workspaces,
                    device.rank,
                    host.timeout(),
                    TwoSidedLaunch::default(),
                )
            });
        host.barrier(&group, "two-sided GPU construction")?;
        Ok(Box::new(GpuBackend {
            layer: layer.clone(),
            gpu: built?,
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
        true
    }
    fn max_tokens_per_rank(&self) -> usize {
        self.layer.dispatch_tokens_bound()
    }
    fn num_dispatchers(&self) -> usize {
        self.layer.parallel.world_size()
    }
    fn workspace_bytes(&self) -> usize {
        WorkspaceLayout::for_layer(&self.layer, &self.layer.dispatch_layout()).bytes()
    }

    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared> {
        let (dispatched, _) = self.gpu.dispatch(input)?;
        Ok(Prepared {
            dispatched,
            receipt: Receipt::new(NAME, GpuReceipt),
            expert_output: None,
        })
    }

    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let GpuReceipt = receipt.into_state(NAME)?;
        self.gpu.combine(expert_output, out)
    }
}
