//! nvlink-two-sided as a [`PrepareFinalize`] on GPU ranks, the GPU protocol of [`GpuTwoSided`]
//! behind the contract, with tensors in either place:
//!
//! - **Device tensors** (on the rank's GPU): the steady-state path. `prepare` enqueues the
//!   quantization, the dispatch (reading the inputs in place) and the delivery of the received
//!   rows as Standard tensors on the GPU, and returns device tensors plus, in
//!   `Prepared::expert_output`, the buffer the combine reads; `finalize` enqueues the combine
//!   into the caller's `out`. No host synchronization, no allocation; errors the kernels record
//!   come back from the next call or from `wait`.
//! - **Host tensors**: staged through host memory, complete on return, so the layer runner,
//!   the host reference experts and the test matrix run on GPUs unchanged.

use moe_core::{
    ActivationFormat, CudaRank, LayerConfig, Location, PrepareFinalize, PrepareInput, Prepared, Receipt, Result, Tensor,
};
use moe_kernels::deliver::StandardDelivery;
use moe_kernels::platform::CudaRankDevice;

use crate::NAME;
use crate::WorkspaceLayout;
use crate::cuda::GpuTwoSided;

/// One layer's two-sided backend on one GPU rank.
#[derive(Debug)]
pub struct GpuBackend {
    layer: LayerConfig,
    gpu: GpuTwoSided,
    delivery: StandardDelivery,
}

/// Per-call state carried from prepare to finalize: where the call's tensors are.
#[derive(Debug)]
struct GpuReceipt(Location);

impl GpuBackend {
    /// Constructs the backend on a GPU rank (collective: see
    /// `CudaRankDevice::build_over_workspace`, which fails on every rank, naming the pair,
    /// when two ranks of the world cannot reach each other's memory).
    pub fn construct(layer: &LayerConfig, ctx: &CudaRank) -> Result<Box<dyn PrepareFinalize>> {
        let device = CudaRankDevice::of(ctx, NAME)?;
        let host = ctx.host();
        let group = layer.parallel.world_group();
        let layout = WorkspaceLayout::for_layer(layer, &layer.dispatch_layout());
        let (gpu, delivery) =
            device.build_over_workspace(host, &group, "two-sided GPU workspace", layout.bytes(), |workspaces| {
                let gpu = GpuTwoSided::new(
                    layer,
                    &device.world,
                    workspaces,
                    device.rank,
                    host.timeout(),
                    device.comm_grid()?.into(),
                )?;
                let delivery = gpu.new_delivery()?;
                Ok((gpu, delivery))
            })?;
        Ok(Box::new(GpuBackend {
            layer: layer.clone(),
            gpu,
            delivery,
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
        self.gpu.check_status()?;
        let at = input.location();
        let (dispatched, expert_output) = match at {
            Location::Host => (self.gpu.dispatch(input)?.0, None),
            Location::Device(_) => {
                self.gpu.dispatch_device(input)?;
                self.gpu.deliver(&self.delivery)?;
                (self.delivery.dispatched()?, Some(self.gpu.expert_output_tensor()?))
            }
        };
        Ok(Prepared {
            dispatched,
            receipt: Receipt::new(NAME, GpuReceipt(at)),
            expert_output,
        })
    }

    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        self.gpu.check_status()?;
        match receipt.into_state(NAME)? {
            GpuReceipt(Location::Host) => self.gpu.combine(expert_output, out),
            GpuReceipt(Location::Device(_)) => self.gpu.combine_device(expert_output, out),
        }
    }

    fn wait(&mut self) -> Result<()> {
        self.gpu.finish(crate::cuda::Phase::Combine)
    }
}
