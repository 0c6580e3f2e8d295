//! nvlink-one-sided as a [`PrepareFinalize`] on GPU ranks, the GPU protocol of [`GpuOneSided`]
//! behind the contract, with tensors in either place:
//!
//! - **Device tensors** (on the rank's GPU): the steady-state path. `prepare` enqueues the
//!   dispatch (reading the inputs in place) and returns device tensors. Standard format: the
//!   received regions of the workspace themselves (no delivery copy; only swizzled scales take
//!   a pass), plus, in `Prepared::expert_output`, the combine region where the experts can
//!   write in place. BatchedExperts: the expert-major delivery of `moe_kernels::batched`,
//!   whose reduction `finalize` runs into the combine region before the combine. `finalize`
//!   enqueues the combine into the caller's `out`. No host synchronization, no allocation; errors the kernels record
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
use moe_kernels::platform::CudaRankDevice;

use crate::cuda::{self, GpuOneSided};
use crate::{NAME, combine_rows};

/// One layer's one-sided backend on one GPU rank.
#[derive(Debug)]
pub struct GpuBackend {
    layer: LayerConfig,
    rank: usize,
    gpu: GpuOneSided,
}

/// Per-call state carried from prepare to finalize.
#[derive(Debug)]
struct GpuReceipt {
    /// The call's turn on the workspace group.
    ticket: CallTicket,
    tensors: CallTensors,
}

/// Where the call's tensors are.
#[derive(Debug)]
enum CallTensors {
    Host {
        /// BatchedExperts only: the received row of each row of each local expert.
        batched_rows: Option<Vec<Vec<usize>>>,
    },
    Device,
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
        let gpu = device.build_collectively(host, &ranks, "one-sided GPU workspace", || {
            let group = cuda::gpu_workspace_group(host, device, &ranks);
            cuda::admit(&group, layer, host, device)?;
            GpuOneSided::in_group(
                layer,
                &device.world,
                group,
                device.rank,
                host.timeout(),
                device.comm_grid()?.into(),
            )
        })?;
        Ok(Box::new(GpuBackend {
            layer: layer.clone(),
            rank: device.rank,
            gpu,
        }))
    }
}

impl PrepareFinalize for GpuBackend {
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
        self.layer.parallel.world_size()
    }
    fn workspace_bytes(&self) -> usize {
        self.gpu.workspace_layout().bytes()
    }

    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared> {
        self.gpu.check_status()?;
        self.gpu.member().clone().prepare(|ticket| match input.location() {
            Location::Host => self.prepare_host(input, ticket),
            Location::Device(_) => self.prepare_device(input, ticket),
        })
    }

    /// The receipt's call ends when finalize takes it (see `WorkspaceGroup::finish_call`),
    /// whatever happens after.
    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let state: GpuReceipt = receipt.into_state(NAME)?;
        self.gpu.member().finish_call(state.ticket)?;
        self.gpu.check_status()?;
        match state.tensors {
            CallTensors::Host { batched_rows } => self.finalize_host(batched_rows, expert_output, out),
            CallTensors::Device => self.gpu.combine_device(expert_output, out),
        }
    }

    fn wait(&mut self) -> Result<()> {
        self.gpu.finish(crate::cuda::Phase::Combine)
    }
}

impl GpuBackend {
    fn prepare_device(&mut self, input: PrepareInput<'_>, ticket: CallTicket) -> Result<Prepared> {
        self.gpu.dispatch_device(input)?;
        // BatchedExperts: the experts' `[local_experts, rows, hidden]` output is reduced per
        // received row into the combine region, so there is nothing to offer in place.
        let expert_output = match self.layer.activation_format {
            ActivationFormat::Standard => Some(self.gpu.expert_output_tensor()?),
            ActivationFormat::BatchedExperts => None,
        };
        Ok(Prepared {
            dispatched: self.gpu.received_tensors()?,
            receipt: Receipt::new(
                NAME,
                GpuReceipt {
                    ticket,
                    tensors: CallTensors::Device,
                },
            ),
            expert_output,
        })
    }

    fn prepare_host(&mut self, input: PrepareInput<'_>, ticket: CallTicket) -> Result<Prepared> {
        let (received, _) = self.gpu.dispatch_rows(input)?;
        let scale_layout = self.layer.quant.received_scale_layout(self.layer.moe.input_dtype);
        let (dispatched, batched_rows) = match self.layer.activation_format {
            ActivationFormat::Standard => (received.into_standard(scale_layout)?, None),
            ActivationFormat::BatchedExperts => {
                let (dispatched, sources) = received.into_batched(&self.layer.placement(), self.rank, scale_layout)?;
                (dispatched, Some(sources))
            }
        };
        Ok(Prepared {
            dispatched,
            receipt: Receipt::new(
                NAME,
                GpuReceipt {
                    ticket,
                    tensors: CallTensors::Host { batched_rows },
                },
            ),
            expert_output: None,
        })
    }

    fn finalize_host(
        &mut self,
        batched_rows: Option<Vec<Vec<usize>>>,
        expert_output: &Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        let rows = self.layer.parallel.world_size() * self.max_tokens_per_rank();
        let dtype = self.layer.moe.input_dtype.dtype();
        let staged = combine_rows(
            batched_rows.as_deref(),
            expert_output,
            rows,
            self.layer.moe.hidden,
            dtype,
        )?;
        self.gpu.combine(staged.as_ref().unwrap_or(expert_output), out)
    }
}
