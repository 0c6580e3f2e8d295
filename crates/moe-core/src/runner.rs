//! The layer runner: prepare -> experts -> finalize for one rank, with the parallel wrapping
//! around it (sequence-parallel chunking and all-gather, the TP all-reduce exactly when the
//! backend's output is not reduced, and the format check between backend and experts).
//!
//! Tensors are all in host memory or all on the rank's GPU. On the GPU the experts write into
//! the backend's `Prepared::expert_output` where it offers one (its workspace: zero-copy), or
//! into a tensor the runner allocates on the first call and reuses; the all-reduce and the
//! all-gather run on the rank's stream through the GPU platform's collectives (`GpuRank`,
//! NCCL on the CUDA platform, joined at construction), and nothing waits for the stream.

use std::sync::Arc;

use crate::config::{ExpertOwnership, LayerConfig};
use crate::contract::{PrepareFinalize, PrepareInput, Prepared, routing_rows, token_rows};
use crate::error::{MoeError, Result};
use crate::experts::Experts;
use crate::platform::{GpuRank, RankContext};
use crate::registry::Registry;
use crate::tensor::{DType, Location, Tensor};

/// One MoE layer on one rank.
#[derive(Debug)]
pub struct MoeLayer {
    layer: LayerConfig,
    ctx: RankContext,
    backend: Box<dyn PrepareFinalize>,
    experts: Arc<dyn Experts>,
    ownership: ExpertOwnership,
    /// On the GPU, the experts' output where the backend offers none: allocated by the first
    /// call that needs it, reused while the shape holds.
    expert_scratch: Option<Tensor>,
}

impl MoeLayer {
    /// Constructs backend `name` from the registry and pairs it with `experts`.
    pub fn new(
        registry: &Registry,
        name: &str,
        layer: LayerConfig,
        experts: Arc<dyn Experts>,
        ctx: RankContext,
    ) -> Result<Self> {
        let backend = registry.construct(name, &layer, &ctx)?;
        Self::with_backend(layer, backend, experts, ctx)
    }

    /// Pairs an already constructed backend with `experts`; refuses differing formats. On a
    /// GPU rank whose layer needs a TP all-reduce or an SP all-gather, joins the TP group's
    /// collectives (collective over the group, like the backend's construction).
    pub fn with_backend(
        layer: LayerConfig,
        backend: Box<dyn PrepareFinalize>,
        experts: Arc<dyn Experts>,
        ctx: RankContext,
    ) -> Result<Self> {
        if backend.activation_format() != experts.activation_format() {
            return Err(MoeError::FormatMismatch {
                backend: backend.name(),
                backend_format: backend.activation_format().to_string(),
                experts_format: experts.activation_format().to_string(),
            });
        }
        let ownership = layer.ownership(ctx.rank());
        if let RankContext::Cuda(rank) = &ctx
            && needs_tp_collectives(&layer, backend.as_ref())
        {
            rank.gpu()
                .join_group(rank.host(), &layer.parallel.tp_group(ctx.rank()))?;
        }
        Ok(MoeLayer {
            layer,
            ctx,
            backend,
            experts,
            ownership,
            expert_scratch: None,
        })
    }

    /// The backend object.
    pub fn backend(&self) -> &dyn PrepareFinalize {
        self.backend.as_ref()
    }

    /// Whether `forward` takes device tensors on this rank: a GPU rank whose layer needs no TP
    /// collective, or whose TP group's collectives exist (ranks sharing a GPU have none); the
    /// error says why not.
    pub fn device_tensors(&self) -> Result<()> {
        let RankContext::Cuda(rank) = &self.ctx else {
            return Err(MoeError::Unsupported(format!(
                "rank {} runs on the host platform: pass host tensors, or build the rank on the CUDA platform (RankContext::Cuda)",
                self.ctx.rank()
            )));
        };
        if needs_tp_collectives(&self.layer, self.backend.as_ref()) {
            rank.gpu().collectives(&self.layer.parallel.tp_group(self.ctx.rank()))?;
        }
        Ok(())
    }

    /// Waits until the work `forward` enqueued on device tensors has run, and reports an
    /// error its kernels recorded meanwhile (`PrepareFinalize::wait`); with host tensors there
    /// is nothing to wait for.
    pub fn wait(&mut self) -> Result<()> {
        self.backend.wait()
    }

    /// Takes part in the coming call without running it, for `reason` (an input the engine
    /// refused before `forward`): each peer's same call fails promptly, naming this rank,
    /// instead of pairing with this rank's next call.
    pub fn abandon(&mut self, reason: &MoeError) -> Result<()> {
        self.backend.abandon(None, reason)
    }

    /// Runs the layer: `tokens` `[n, hidden]` are this rank's tokens (under SP, the whole DP
    /// replica's tokens, identical on its TP ranks); `out` `[n, hidden]` receives the complete
    /// MoE output. Every tensor is in host memory (complete on return), or every one is on the
    /// rank's GPU (enqueued on the rank's stream; the backend's `wait`, or the next call,
    /// reports what its kernels found).
    pub fn forward(
        &mut self,
        tokens: &Tensor,
        topk_ids: &Tensor,
        topk_weights: &Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        let p = self.layer.parallel;
        let (n, at) = match self.checked(tokens, topk_ids, topk_weights, out) {
            Ok(checked) => checked,
            Err(e) => return Err(self.abandoned(None, e)),
        };
        if !p.sp {
            let max = self.backend.max_tokens_per_rank();
            let input = match PrepareInput::new(&self.layer, max, tokens, topk_ids, topk_weights) {
                Ok(input) => input,
                Err(e) => return Err(self.abandoned(None, e)),
            };
            self.run_backend(input, out, at)?;
            if !self.backend.output_is_reduced() && p.tp > 1 {
                let group = p.tp_group(self.ctx.rank());
                match self.gpu(at) {
                    Some(gpu) => gpu.all_reduce_sum(&group, out)?,
                    None => {
                        let mut v = out.to_f32();
                        self.host().all_reduce_sum(&group, "tp all-reduce", &mut v)?;
                        out.store_f32(0, &v);
                    }
                }
            }
            return Ok(());
        }
        if n > self.layer.moe.max_tokens_per_rank {
            let e = MoeError::TooManyTokens {
                tokens: n,
                max: self.layer.moe.max_tokens_per_rank,
            };
            return Err(self.abandoned(None, e));
        }
        if !self.backend.output_is_reduced() {
            let e = MoeError::Unsupported(format!(
                "backend `{}` leaves partial sums under sequence parallelism, where TP peers hold different tokens and no all-reduce can complete them; use a backend whose output is reduced under SP",
                self.backend.name()
            ));
            return Err(self.abandoned(None, e));
        }
        let chunk = n.div_ceil(p.tp);
        let rows = |t: usize| (t * chunk).min(n)..((t + 1) * chunk).min(n);
        let std::ops::Range { start, end } = rows(p.tp_rank(self.ctx.rank()));
        let (x, ids, w) = (
            tokens.slice_rows(start, end),
            topk_ids.slice_rows(start, end),
            topk_weights.slice_rows(start, end),
        );
        let mut part = out.slice_rows(start, end);
        let input = match PrepareInput::new(&self.layer, self.backend.max_tokens_per_rank(), &x, &ids, &w) {
            Ok(input) => input,
            Err(e) => return Err(self.abandoned(None, e)),
        };
        self.run_backend(input, &mut part, at)?;
        let group = p.tp_group(self.ctx.rank());
        if let Some(gpu) = self.gpu(at) {
            // `part` is rows of `out` itself on the GPU: every member broadcasts its rows.
            let ranges: Vec<_> = (0..p.tp).map(rows).collect();
            return gpu.all_gather_rows(&group, &ranges, out);
        }
        let parts = self.host().all_gather(&group, "sp all-gather", part.bytes().to_vec())?;
        let mut offset = 0;
        for bytes in parts {
            out.bytes_mut()[offset..offset + bytes.len()].copy_from_slice(&bytes);
            offset += bytes.len();
        }
        Ok(())
    }

    /// The rows of `tokens` and where the call's tensors are, checked against the other
    /// arguments (`out` included) before anything else reads them: all in one place, and a
    /// GPU only on a GPU rank, its own.
    fn checked(
        &self,
        tokens: &Tensor,
        topk_ids: &Tensor,
        topk_weights: &Tensor,
        out: &Tensor,
    ) -> Result<(usize, Location)> {
        let at = tokens.location();
        for (name, t) in [("topk_ids", topk_ids), ("topk_weights", topk_weights), ("out", out)] {
            if t.location() != at {
                return Err(MoeError::InvalidInput {
                    op: "forward",
                    detail: format!(
                        "`{name}` is in {} while `tokens` is in {at}: pass every tensor of a call in one place, all in host memory or all on the rank's GPU",
                        t.location()
                    ),
                });
            }
        }
        if let Location::Device(ordinal) = at {
            if let RankContext::Cuda(rank) = &self.ctx
                && rank.gpu().ordinal() != ordinal
            {
                return Err(MoeError::InvalidInput {
                    op: "forward",
                    detail: format!(
                        "the tensors are on GPU {ordinal}, and rank {}'s GPU is {}: pass tensors on the rank's GPU",
                        self.ctx.rank(),
                        rank.gpu().ordinal()
                    ),
                });
            }
            self.device_tensors().map_err(|e| match e {
                MoeError::Unsupported(why) => {
                    MoeError::Unsupported(format!("the tensors are on GPU {ordinal}, and {why}"))
                }
                other => other,
            })?;
        }
        let n = token_rows("forward", &self.layer, tokens)?;
        routing_rows("forward", n, topk_ids, topk_weights)?;
        let (dtype, h) = (self.layer.moe.input_dtype.dtype(), self.layer.moe.hidden);
        out.expect_shape("forward", "out", dtype, &[n, h])?;
        Ok((n, at))
    }

    /// The GPU platform, for a call whose tensors are at `at` on a GPU (checked: the rank's).
    fn gpu(&self, at: Location) -> Option<&dyn GpuRank> {
        gpu_of(&self.ctx, at)
    }

    /// Marks this rank's call abandoned for `e` (see `PrepareFinalize::abandon`), so every
    /// peer fails the same call, and returns `e`, the reason this rank gives.
    fn abandoned(&mut self, prepared: Option<crate::contract::Receipt>, e: MoeError) -> MoeError {
        // An abandonment that fails (a backend that cannot announce it) leaves the peers to
        // their bounded wait; this rank's reason is still the one to report.
        let _ = self.backend.abandon(prepared, &e);
        e
    }

    fn run_backend(&mut self, input: PrepareInput<'_>, out: &mut Tensor, at: Location) -> Result<()> {
        // `prepare` and `finalize` mark the calls they refuse themselves.
        let Prepared {
            dispatched,
            receipt,
            expert_output,
        } = self.backend.prepare(input)?;
        let shape = dispatched.expert_output_shape(self.layer.moe.hidden);
        let dtype = self.layer.moe.input_dtype.dtype();
        let gpu = gpu_of(&self.ctx, at);
        let expert_out = experts_output(expert_output, &shape, dtype, gpu, &mut self.expert_scratch);
        let applied = expert_out.and_then(|mut t| {
            self.experts.apply(&dispatched, &self.ownership, &mut t)?;
            Ok(t)
        });
        match applied {
            Ok(expert_out) => self.backend.finalize(receipt, &expert_out, out),
            Err(e) => Err(self.abandoned(Some(receipt), e)),
        }
    }

    fn host(&self) -> &crate::host::HostRank {
        self.ctx.control()
    }
}

/// The GPU platform of `ctx` for tensors at `at`: a GPU rank's, for tensors on its GPU.
pub fn gpu_of(ctx: &RankContext, at: Location) -> Option<&dyn GpuRank> {
    match (ctx, at) {
        (RankContext::Cuda(rank), Location::Device(_)) => Some(rank.gpu().as_ref()),
        _ => None,
    }
}

/// Where the experts write their output of `shape` in `dtype`: the backend's `offered` buffer
/// (its workspace, read in place by finalize), else on a GPU (`gpu`) a tensor of the caller's,
/// allocated once per shape and kept in `scratch`, else a new zeroed host tensor. The layer
/// runner and the foreign interfaces' prepare/finalize share it.
pub fn experts_output(
    offered: Option<Tensor>,
    shape: &[usize],
    dtype: DType,
    gpu: Option<&dyn GpuRank>,
    scratch: &mut Option<Tensor>,
) -> Result<Tensor> {
    if let Some(offered) = offered {
        return Ok(offered);
    }
    let Some(gpu) = gpu else {
        return Ok(Tensor::zeros(dtype, shape));
    };
    if let Some(t) = scratch.as_ref().filter(|t| t.shape() == shape && t.dtype() == dtype) {
        return Ok(t.clone());
    }
    let t = gpu.zeros(dtype, shape)?;
    *scratch = Some(t.clone());
    Ok(t)
}

/// Whether `layer` on `backend` needs collectives over each TP group: the all-reduce of an
/// output that is not reduced, or the all-gather of sequence parallelism.
fn needs_tp_collectives(layer: &LayerConfig, backend: &dyn PrepareFinalize) -> bool {
    let p = layer.parallel;
    p.tp > 1 && (p.sp || !backend.output_is_reduced())
}
