//! allgather-rs as a [`PrepareFinalize`] on GPU ranks, [`CudaAllGatherRank`] (NCCL all-gather and
//! reduce-scatter) behind the contract, with tensors in either place and every wait bounded:
//!
//! - **Device tensors** (on the rank's GPU): the steady-state path. `prepare` enqueues the
//!   dispatch, reading the inputs in place, and returns the Standard delivery as device tensors
//!   (views of the gathered buffers, valid until the next `prepare`) plus, in
//!   `Prepared::expert_output`, a `[group * max_tokens, hidden]` buffer the experts may write
//!   in place; `finalize` enqueues the combine of that buffer, or of any other device tensor of
//!   its shape, into the caller's `out`. No host synchronization, no allocation, no copy. A bad
//!   id in a device input is reported by `wait` (see [`crate::cuda`]).
//! - **Host tensors**: staged through host memory, complete on return, so the layer runner,
//!   the host reference experts and the test matrix run on GPUs unchanged.
//! - **Timeouts**: `wait`, and the host tensors' path, wait for the stream for at most the
//!   rank's timeout; a collective a peer never joined then aborts the NCCL communicator and
//!   fails with `MoeError::Timeout` naming that peer, and every later call fails asking for the
//!   layer to be constructed again (see [`crate::cuda`]).

use moe_core::{
    ActivationFormat, CudaRank, LayerConfig, Location, MoeError, PrepareFinalize, PrepareInput, Prepared, Receipt,
    Result, Tensor,
};
use moe_kernels::world::CudaWorldRank;

use moe_kernels::nccl;

use crate::NAME;
use crate::cuda::{CudaAllGatherRank, group_of};

/// One layer's all-gather backend on one GPU rank.
#[derive(Debug)]
pub struct CudaAllGather {
    layer: LayerConfig,
    group: Vec<usize>,
    gpu: CudaAllGatherRank,
}

/// Per-call state carried from prepare to finalize: where the call's tensors are.
#[derive(Debug)]
enum CudaReceipt {
    Host,
    Device,
}

impl CudaAllGather {
    /// Constructs the backend on a GPU rank: the dispatch group's first rank makes the NCCL
    /// communicator id and shares it; every member joins the communicator (collective, waiting
    /// at most the rank's timeout for the others to join).
    pub fn construct(layer: &LayerConfig, ctx: &CudaRank) -> Result<Box<dyn PrepareFinalize>> {
        let device = CudaWorldRank::of(ctx, NAME)?;
        let host = ctx.host();
        let group = group_of(layer, device.rank());
        // Every member sees the same world, so all refuse together and none waits for the id.
        if let Some((a, b, gpu)) = device.world().ranks_sharing_a_gpu(&group) {
            return Err(MoeError::Unsupported(format!(
                "{NAME} on GPUs runs on NCCL, which needs a GPU of its own for every rank of a group: ranks {a} and {b} are both on GPU {gpu}; place them on different GPUs, or use nvlink-one-sided or nvlink-two-sided, which run with ranks sharing a GPU"
            )));
        }
        // As bytes through the control plane, so the members may be other processes or hosts.
        let id = nccl::share_id(host, &group, "allgather NCCL id")?;
        let gpu = CudaAllGatherRank::new(layer, device.gpu().clone(), host, id)?;
        Ok(Box::new(CudaAllGather {
            layer: layer.clone(),
            group,
            gpu,
        }))
    }
}

impl PrepareFinalize for CudaAllGather {
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

    /// Not yet on the cuda platform (issue 16): its NCCL collectives carry no call word, so
    /// the peers' same call times out (bounded) instead of failing at once.
    fn abandon(&mut self, _prepared: Option<Receipt>, reason: &MoeError) -> Result<()> {
        Err(MoeError::Unsupported(format!(
            "{}: a call abandoned on the cuda platform ({reason}) is not yet announced to the peers, whose same call times out instead",
            NAME
        )))
    }

    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared> {
        match input.location() {
            Location::Host => Ok(Prepared {
                dispatched: self.gpu.dispatch(input)?,
                receipt: Receipt::new(NAME, CudaReceipt::Host),
                expert_output: None,
            }),
            Location::Device(_) => {
                self.gpu.dispatch_device(input)?;
                Ok(Prepared {
                    dispatched: self.gpu.delivery(),
                    receipt: Receipt::new(NAME, CudaReceipt::Device),
                    expert_output: Some(self.gpu.expert_output_tensor()),
                })
            }
        }
    }

    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        match receipt.into_state(NAME)? {
            CudaReceipt::Host => self.gpu.combine(expert_output, out),
            CudaReceipt::Device => self.gpu.combine_device(expert_output, out),
        }
    }

    fn wait(&mut self) -> Result<()> {
        self.gpu.finish()
    }
}
