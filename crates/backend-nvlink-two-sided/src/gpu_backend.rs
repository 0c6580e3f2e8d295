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
//!
//! The layers constructed on a rank share one workspace per EP group, as on the host platform:
//! the rank's [`cuda::gpu_workspace_group`](crate::cuda::gpu_workspace_group), grown to the
//! union of the layers' layouts when a larger layer is constructed (collectively, with a
//! barrier over the EP group only), never shrunk; a layer whose top_k or expert count differs
//! from the group's is refused. Every layer follows the group to its current workspace when a
//! call starts, and a call whose prepare ran before a rebuild fails in finalize (see the
//! `cuda` module). The layers of a group take turns on its workspace: one call, prepare to
//! finalize, at a time.

use moe_core::workspace_group::CallTicket;
use moe_core::{
    ActivationFormat, CudaRank, LayerConfig, Location, PrepareFinalize, PrepareInput, Prepared, Receipt, Result, Tensor,
};
use moe_kernels::deliver::StandardDelivery;
use moe_kernels::platform::CudaRankDevice;

use crate::NAME;
use crate::cuda::{self, GpuTwoSided};

/// One layer's two-sided backend on one GPU rank.
#[derive(Debug)]
pub struct GpuBackend {
    layer: LayerConfig,
    gpu: GpuTwoSided,
    delivery: StandardDelivery,
}

/// Per-call state carried from prepare to finalize: the call's turn on the workspace group and
/// where its tensors are.
#[derive(Debug)]
struct GpuReceipt {
    ticket: CallTicket,
    at: Location,
}

impl GpuBackend {
    /// Constructs the backend on a GPU rank in the rank's workspace group, growing it when the
    /// layer needs more (collective: see `CudaRankDevice::build_collectively`, which fails on
    /// every rank, naming the pair, when two ranks of the world cannot reach each other's
    /// memory, and [`cuda::admit`]).
    pub fn construct(layer: &LayerConfig, ctx: &CudaRank) -> Result<Box<dyn PrepareFinalize>> {
        let device = CudaRankDevice::of(ctx, NAME)?;
        let host = ctx.host();
        let ranks = layer.parallel.world_group();
        let (gpu, delivery) = device.build_collectively(host, &ranks, "two-sided GPU workspace", || {
            let group = cuda::gpu_workspace_group(host, device, &ranks);
            cuda::admit(&group, layer, host, device)?;
            let gpu = GpuTwoSided::in_group(
                layer,
                &device.world,
                group,
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

    fn prepare_call(&mut self, input: PrepareInput<'_>, ticket: CallTicket) -> Result<Prepared> {
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
            receipt: Receipt::new(NAME, GpuReceipt { ticket, at }),
            expert_output,
        })
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
        self.gpu.workspace_layout().bytes()
    }

    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared> {
        self.gpu.check_status()?;
        self.gpu
            .member()
            .clone()
            .prepare(|ticket| self.prepare_call(input, ticket))
    }

    /// The receipt's call ends when finalize takes it (see `WorkspaceGroup::finish_call`),
    /// whatever happens after.
    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let state: GpuReceipt = receipt.into_state(NAME)?;
        self.gpu.member().finish_call(state.ticket)?;
        self.gpu.check_status()?;
        match state.at {
            Location::Host => self.gpu.combine(expert_output, out),
            Location::Device(_) => self.gpu.combine_device(expert_output, out),
        }
    }

    fn wait(&mut self) -> Result<()> {
        self.gpu.finish(crate::cuda::Phase::Combine)
    }
}
