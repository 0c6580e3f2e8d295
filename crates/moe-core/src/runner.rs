//! The layer runner: prepare -> experts -> finalize for one rank, with the parallel wrapping
//! around it (sequence-parallel chunking and all-gather, the TP all-reduce exactly when the
//! backend's output is not reduced, and the format check between backend and experts).

use std::sync::Arc;

use crate::config::{ExpertOwnership, LayerConfig};
use crate::contract::{Dispatched, PrepareFinalize, PrepareInput, routing_rows, token_rows};
use crate::error::{MoeError, Result};
use crate::experts::Experts;
use crate::platform::RankContext;
use crate::registry::Registry;
use crate::tensor::Tensor;

/// One MoE layer on one rank.
#[derive(Debug)]
pub struct MoeLayer {
    layer: LayerConfig,
    ctx: RankContext,
    backend: Box<dyn PrepareFinalize>,
    experts: Arc<dyn Experts>,
    ownership: ExpertOwnership,
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

    /// Pairs an already constructed backend with `experts`; refuses differing formats.
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
        Ok(MoeLayer {
            layer,
            ctx,
            backend,
            experts,
            ownership,
        })
    }

    /// The backend object.
    pub fn backend(&self) -> &dyn PrepareFinalize {
        self.backend.as_ref()
    }

    /// Runs the layer: `tokens` `[n, hidden]` are this rank's tokens (under SP, the whole DP
    /// replica's tokens, identical on its TP ranks); `out` `[n, hidden]` receives the complete
    /// MoE output.
    pub fn forward(
        &mut self,
        tokens: &Tensor,
        topk_ids: &Tensor,
        topk_weights: &Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        let p = self.layer.parallel;
        let n = match self.checked_rows(tokens, topk_ids, topk_weights, out) {
            Ok(n) => n,
            Err(e) => return Err(self.abandoned(None, e)),
        };
        if !p.sp {
            let max = self.backend.max_tokens_per_rank();
            let input = match PrepareInput::new(&self.layer, max, tokens, topk_ids, topk_weights) {
                Ok(input) => input,
                Err(e) => return Err(self.abandoned(None, e)),
            };
            self.run_backend(input, out)?;
            if !self.backend.output_is_reduced() && p.tp > 1 {
                let group = p.tp_group(self.ctx.rank());
                let mut v = out.to_f32();
                self.host().all_reduce_sum(&group, "tp all-reduce", &mut v)?;
                out.store_f32(0, &v);
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
        let tp_rank = p.tp_rank(self.ctx.rank());
        let (start, end) = ((tp_rank * chunk).min(n), ((tp_rank + 1) * chunk).min(n));
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
        self.run_backend(input, &mut part)?;
        let group = p.tp_group(self.ctx.rank());
        let parts = self.host().all_gather(&group, "sp all-gather", part.bytes().to_vec())?;
        let mut offset = 0;
        for bytes in parts {
            out.bytes_mut()[offset..offset + bytes.len()].copy_from_slice(&bytes);
            offset += bytes.len();
        }
        Ok(())
    }

    /// The rows of `tokens`, checked against the other arguments (`out` included) before
    /// anything else reads them.
    fn checked_rows(&self, tokens: &Tensor, topk_ids: &Tensor, topk_weights: &Tensor, out: &Tensor) -> Result<usize> {
        let n = token_rows("forward", &self.layer, tokens)?;
        routing_rows("forward", n, topk_ids, topk_weights)?;
        let (dtype, h) = (self.layer.moe.input_dtype.dtype(), self.layer.moe.hidden);
        out.expect("forward", "out", dtype, &[n, h])?;
        Ok(n)
    }

    /// Marks this rank's call abandoned for `e` (see `PrepareFinalize::abandon`), so every
    /// peer fails the same call, and returns `e`, the reason this rank gives.
    fn abandoned(&mut self, prepared: Option<crate::contract::Receipt>, e: MoeError) -> MoeError {
        // An abandonment that fails (a backend that cannot announce it) leaves the peers to
        // their bounded wait; this rank's reason is still the one to report.
        let _ = self.backend.abandon(prepared, &e);
        e
    }

    fn run_backend(&mut self, input: PrepareInput<'_>, out: &mut Tensor) -> Result<()> {
        // `prepare` and `finalize` mark the calls they refuse themselves.
        let prepared = self.backend.prepare(input)?;
        let h = self.layer.moe.hidden;
        let shape = match &prepared.dispatched {
            Dispatched::Standard { topk_ids, .. } => vec![topk_ids.shape()[0], h],
            Dispatched::Batched { weights, .. } => vec![weights.shape()[0], weights.shape()[1], h],
        };
        let mut expert_out = Tensor::zeros(self.layer.moe.input_dtype.dtype(), &shape);
        if let Err(e) = self
            .experts
            .apply(&prepared.dispatched, &self.ownership, &mut expert_out)
        {
            return Err(self.abandoned(Some(prepared.receipt), e));
        }
        self.backend.finalize(prepared.receipt, &expert_out, out)
    }

    fn host(&self) -> &crate::host::HostRank {
        self.ctx.control()
    }
}
