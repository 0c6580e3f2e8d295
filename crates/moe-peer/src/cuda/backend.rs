//! A peer-memory protocol as a [`PrepareFinalize`] on GPU ranks: [`CudaPeer`], the protocol's
//! [`CudaPeerRank`] behind the contract, with tensors in either place:
//!
//! - **Device tensors** (on the rank's GPU): the steady-state path. `prepare` enqueues the
//!   dispatch (reading the inputs in place) and the protocol's delivery, and returns device
//!   tensors plus, in the Standard format, `Prepared::expert_output`, where the experts can
//!   write the rows the combine reads. `finalize` enqueues the combine into the caller's `out`.
//!   No host synchronization, no allocation; errors the kernels record come back from the next
//!   call or from `wait`.
//! - **Host tensors**: staged through host memory, complete on return, so the layer runner,
//!   the host reference experts and the test matrix run on GPUs unchanged.
//!
//! The layers constructed on a rank share one workspace per EP group, as on the host platform
//! (see the `cuda` module). The layers of a group take turns on its workspace: one call, prepare
//! to finalize, at a time.

use moe_core::call::Abandon;
use moe_core::workspace_group::CallTicket;
use moe_core::{
    ActivationFormat, CudaRank, LayerConfig, Location, MoeError, PrepareFinalize, PrepareInput, Prepared, Receipt,
    Result, Tensor,
};
use moe_kernels::world::CudaWorldRank;

use super::{CudaPeerRank, CudaProtocol, admit, build_collectively, workspace_group};
use crate::host::{combine_rows, format_received};
use crate::{PeerLayout, Phase};

/// One layer's backend of protocol `P` on one GPU rank.
#[derive(Debug)]
pub struct CudaPeer<P: CudaProtocol> {
    rank: CudaPeerRank<P>,
}

/// Per-call state carried from prepare to finalize.
#[derive(Debug)]
struct CudaReceipt {
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

impl<P: CudaProtocol> CudaPeer<P> {
    /// Constructs the backend on a GPU rank in the rank's workspace group, growing it when the
    /// layer needs more (collective over the layer's EP group: see [`build_collectively`],
    /// which fails on every rank, naming the pair, when two ranks of the world cannot reach
    /// each other's memory, and [`admit`]).
    pub fn construct(layer: &LayerConfig, ctx: &CudaRank) -> Result<Box<dyn PrepareFinalize>> {
        let device = CudaWorldRank::of(ctx, P::NAME)?;
        let host = ctx.host();
        let ranks = layer.parallel.world_group();
        let op = format!("{} GPU workspace", P::PROTOCOL);
        let rank = build_collectively(device, host, &ranks, &op, || {
            let group = workspace_group(device, host, P::NAME, &ranks, layer.workspace_group.as_deref());
            let needed = P::Layout::for_layer(layer, &layer.dispatch_layout());
            admit(device, &group, layer, needed, P::Layout::bytes, host, &op)?;
            CudaPeerRank::<P>::in_group(
                layer,
                device.world(),
                group,
                device.rank(),
                host.timeout(),
                device.comm_grid()?.into(),
            )
        })?;
        Ok(Box::new(CudaPeer { rank }))
    }

    fn prepare_device(&mut self, input: PrepareInput<'_>, ticket: CallTicket) -> Result<Prepared> {
        self.rank.dispatch_device(input)?;
        // BatchedExperts: the experts' `[local_experts, rows, hidden]` output is reduced per
        // received row into the combine's rows, so there is nothing to offer in place.
        let expert_output = match self.rank.layer().activation_format {
            ActivationFormat::Standard => Some(self.rank.expert_output_tensor()?),
            ActivationFormat::BatchedExperts => None,
        };
        Ok(Prepared {
            dispatched: self.rank.delivered()?,
            receipt: Receipt::new(
                P::NAME,
                CudaReceipt {
                    ticket,
                    tensors: CallTensors::Device,
                },
            ),
            expert_output,
        })
    }

    fn prepare_host(&mut self, input: PrepareInput<'_>, ticket: CallTicket) -> Result<Prepared> {
        let (received, _) = self.rank.dispatch_rows(input)?;
        let (dispatched, batched_rows) = format_received(self.rank.layer(), received, self.rank.me())?;
        Ok(Prepared {
            dispatched,
            receipt: Receipt::new(
                P::NAME,
                CudaReceipt {
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
        let layer = self.rank.layer();
        let staged = combine_rows(
            batched_rows.as_deref(),
            expert_output,
            self.rank.rows(),
            layer.moe.hidden,
            layer.moe.input_dtype.dtype(),
        )?;
        self.rank.combine(staged.as_ref().unwrap_or(expert_output), out)
    }
}

impl<P: CudaProtocol> PrepareFinalize for CudaPeer<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }
    fn activation_format(&self) -> ActivationFormat {
        self.rank.layer().activation_format
    }
    /// `true`, as on the host platform.
    fn output_is_reduced(&self) -> bool {
        true
    }
    fn max_tokens_per_rank(&self) -> usize {
        self.rank.layer().dispatch_tokens_bound()
    }
    fn num_dispatchers(&self) -> usize {
        self.rank.layer().parallel.world_size()
    }
    fn workspace_bytes(&self) -> usize {
        self.rank.workspace_layout().bytes()
    }

    /// Enqueues the marking (a kernel on the rank's stream; nothing waits for the host).
    fn abandon(&mut self, prepared: Option<Receipt>, reason: &MoeError) -> Result<()> {
        let why = Abandon::of(reason);
        let Some(receipt) = prepared else {
            let member = self.rank.member().clone();
            return member.abandon(|| self.rank.abandon(why, true));
        };
        let state: CudaReceipt = receipt.into_state(P::NAME)?;
        self.rank.member().finish_call(state.ticket)?;
        self.rank.abandon(why, false)
    }

    /// An error an earlier call recorded on the GPU and nobody read yet (no `wait` after a call
    /// on device tensors) is reported here, and this call is abandoned on every rank.
    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared> {
        let earlier = self.rank.check_status();
        self.rank.member().clone().prepare(|ticket| {
            if let Err(e) = earlier {
                self.rank.abandon(Abandon::of(&e), true)?;
                return Err(e);
            }
            match input.location() {
                Location::Host => self.prepare_host(input, ticket),
                Location::Device(_) => self.prepare_device(input, ticket),
            }
        })
    }

    /// The receipt's call ends when finalize takes it (see `WorkspaceGroup::finish_call`),
    /// whatever happens after.
    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let state: CudaReceipt = receipt.into_state(P::NAME)?;
        self.rank.member().finish_call(state.ticket)?;
        self.rank.check_status()?;
        match state.tensors {
            CallTensors::Host { batched_rows } => self.finalize_host(batched_rows, expert_output, out),
            CallTensors::Device => self.rank.combine_device(expert_output, out),
        }
    }

    fn wait(&mut self) -> Result<()> {
        self.rank.finish(Phase::Combine)
    }
}
