//! The prepare/finalize contract every backend implements.
//!
//! # Semantics shared by every backend
//!
//! - **One copy per destination rank.** A token goes to each rank that owns at least one of its
//!   top-k experts exactly once, however many of its experts live there.
//! - **Experts weight and reduce; combine only sums.** The experts on the receiving rank apply
//!   the router weights and sum over their local experts, writing one row per received token
//!   (Standard format). In BatchedExperts format the experts write one weighted row per
//!   (expert, token) pair and the backend sums the rows of one token before sending them back.
//!   `finalize` then adds the per-rank rows of each token, unweighted, in f32, in ascending
//!   order of the token's top-k slots, and writes the result in the input dtype.
//! - **Ids the receiver must not compute.** In every received top-k row, an expert this rank
//!   does not compute has id `-1` and weight `0.0`. Padding rows (slots no token filled) have all
//!   ids `-1` and weights `0.0`; their activations are unspecified and their expert output is
//!   never read. Experts must skip `-1` ids rather than multiply by a zero weight (stale
//!   activations may hold NaN).
//! - **`output_is_reduced`.** `true`: after `finalize`, `out` holds the complete MoE result for
//!   this rank's tokens. `false`: `out` holds a partial sum that must still be summed over the
//!   rank's TP group; the layer runner does exactly that, so engines using it cannot
//!   double-reduce or forget to reduce.
//! - **Every element of `out` is written** by `finalize`, including rows of tokens whose
//!   experts produced zeros.

use std::any::Any;

use moe_quant::QuantScheme;

use crate::config::{ActivationFormat, LayerConfig, ScaleLayout};
use crate::error::{MoeError, Result};
use crate::tensor::{DType, Location, Tensor};

/// The received activations. The scale tensor exists exactly when the wire scheme has scales.
#[derive(Clone, Debug, PartialEq)]
pub enum Activations {
    /// bf16/fp16 (unquantized or deferred) or fp8 with a static per-tensor scale.
    Unscaled {
        scheme: QuantScheme,
        /// `[rows, payload_bytes]` (Standard) or `[experts, max_rows, payload_bytes]` (Batched), U8.
        data: Tensor,
    },
    /// Formats that send scales with each token.
    Scaled {
        scheme: QuantScheme,
        data: Tensor,
        /// Linear: `[rows, scale_bytes]` (or `[experts, max_rows, scale_bytes]`), U8.
        /// Swizzled128x4: each matrix of rows swizzled into `swizzled_len(rows, scales_per_token)` bytes.
        scales: Tensor,
        layout: ScaleLayout,
    },
}

impl Activations {
    /// Builds the variant the scheme calls for.
    pub fn new(scheme: QuantScheme, data: Tensor, scales: Option<(Tensor, ScaleLayout)>) -> Self {
        match (scheme.has_scales(), scales) {
            (true, Some((scales, layout))) => Activations::Scaled {
                scheme,
                data,
                scales,
                layout,
            },
            (false, None) => Activations::Unscaled { scheme, data },
            (has, got) => panic!(
                "moe invariant violated: scheme {scheme} has_scales = {has} but scales given = {}",
                got.is_some()
            ),
        }
    }

    /// The scheme on the wire.
    pub fn scheme(&self) -> QuantScheme {
        match self {
            Activations::Unscaled { scheme, .. } | Activations::Scaled { scheme, .. } => *scheme,
        }
    }

    /// The payload bytes.
    pub fn data(&self) -> &Tensor {
        match self {
            Activations::Unscaled { data, .. } | Activations::Scaled { data, .. } => data,
        }
    }

    /// A copy in host memory (reading device tensors back), in the same variant and layout.
    pub fn to_host(&self) -> Result<Activations> {
        Ok(match self {
            Activations::Unscaled { scheme, data } => Activations::Unscaled {
                scheme: *scheme,
                data: data.to_host()?,
            },
            Activations::Scaled {
                scheme,
                data,
                scales,
                layout,
            } => Activations::Scaled {
                scheme: *scheme,
                data: data.to_host()?,
                scales: scales.to_host()?,
                layout: *layout,
            },
        })
    }
}

/// What `prepare` delivers, in the backend's activation format.
#[derive(Clone, Debug, PartialEq)]
pub enum Dispatched {
    /// One row per received token.
    Standard {
        activations: Activations,
        /// `[rows, top_k]` I32, global expert ids, `-1` for experts this rank does not compute.
        topk_ids: Tensor,
        /// `[rows, top_k]` F32, `0.0` wherever the id is `-1`.
        topk_weights: Tensor,
    },
    /// Expert-major rows for batched expert kernels.
    Batched {
        activations: Activations,
        /// `[local_experts]` I32: rows `[0, count)` of each expert hold tokens.
        expert_counts: Tensor,
        /// `[local_experts, max_rows]` F32: the router weight of each (expert, token) row.
        weights: Tensor,
    },
}

impl Dispatched {
    /// A copy in host memory (reading device tensors back), in the same format: what an
    /// engine or a test inspects of a delivery that lives on a GPU.
    pub fn to_host(&self) -> Result<Dispatched> {
        Ok(match self {
            Dispatched::Standard {
                activations,
                topk_ids,
                topk_weights,
            } => Dispatched::Standard {
                activations: activations.to_host()?,
                topk_ids: topk_ids.to_host()?,
                topk_weights: topk_weights.to_host()?,
            },
            Dispatched::Batched {
                activations,
                expert_counts,
                weights,
            } => Dispatched::Batched {
                activations: activations.to_host()?,
                expert_counts: expert_counts.to_host()?,
                weights: weights.to_host()?,
            },
        })
    }

    /// The received activations.
    pub fn activations(&self) -> &Activations {
        match self {
            Dispatched::Standard { activations, .. } | Dispatched::Batched { activations, .. } => activations,
        }
    }

    /// The shape of the experts' output for this delivery, rows of `hidden` elements:
    /// `[rows, hidden]` (Standard) or `[local_experts, max_rows, hidden]` (Batched).
    pub fn expert_output_shape(&self, hidden: usize) -> Vec<usize> {
        match self {
            Dispatched::Standard { topk_ids, .. } => vec![topk_ids.shape()[0], hidden],
            Dispatched::Batched { weights, .. } => vec![weights.shape()[0], weights.shape()[1], hidden],
        }
    }

    /// The format of this delivery.
    pub fn format(&self) -> ActivationFormat {
        match self {
            Dispatched::Standard { .. } => ActivationFormat::Standard,
            Dispatched::Batched { .. } => ActivationFormat::BatchedExperts,
        }
    }
}

/// Per-call state that `finalize` consumes; a prepare without its finalize is a bug the type
/// makes visible.
#[must_use = "pass the receipt to finalize"]
pub struct Receipt {
    issued_by: &'static str,
    state: Box<dyn Any + Send>,
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receipt")
            .field("issued_by", &self.issued_by)
            .finish_non_exhaustive()
    }
}

impl Receipt {
    /// A receipt carrying backend-specific state.
    pub fn new<T: Any + Send>(issued_by: &'static str, state: T) -> Self {
        Receipt {
            issued_by,
            state: Box::new(state),
        }
    }

    /// The backend that issued it.
    pub fn issued_by(&self) -> &'static str {
        self.issued_by
    }

    /// Recovers the state, checking that `backend` issued it.
    pub fn into_state<T: Any + Send>(self, backend: &'static str) -> Result<T> {
        let foreign = MoeError::ForeignReceipt {
            backend,
            issued_by: self.issued_by,
        };
        if self.issued_by != backend {
            return Err(foreign);
        }
        self.state.downcast::<T>().map(|b| *b).map_err(|_| foreign)
    }
}

/// The result of `prepare`.
#[derive(Debug)]
pub struct Prepared {
    /// What this rank's experts take. Where it is in place in peer memory (device tensors of
    /// the NVLink backends), a call that then fails at `finalize` (a peer abandoned it) may have
    /// had a peer's next call's rows written into it meanwhile (the experts' output of a failed
    /// call is not used).
    pub dispatched: Dispatched,
    pub receipt: Receipt,
    /// Where the experts may write their output (`[rows, hidden]` in the delivery's format)
    /// so that `finalize` reads it in place: a view of the backend's combine buffer, offered by
    /// backends that combine from device memory when the call's tensors are on the device.
    /// `None`: the experts write any tensor of that shape.
    pub expert_output: Option<Tensor>,
}

/// Validated inputs of `prepare`: tokens `[n, hidden]` in the input dtype, top-k ids
/// `[n, top_k]` I32 in `[0, num_experts)`, weights `[n, top_k]` F32, `n <= max_tokens_per_rank`,
/// all three in host memory or all on one GPU.
///
/// The ids of host inputs are checked here (ranges, repeats). Reading device inputs here would
/// synchronize the stream, so a GPU backend checks their ids in its dispatch kernel instead and
/// reports a bad one as an error of the rank (at the next call or its explicit wait).
#[derive(Clone, Copy, Debug)]
pub struct PrepareInput<'a> {
    tokens: &'a Tensor,
    topk_ids: &'a Tensor,
    topk_weights: &'a Tensor,
}

/// The tokens `tokens` holds for `layer` (`op` names the call in errors): fails unless it is a
/// `[n, hidden]` matrix of the layer's input dtype, so every other argument is then checked
/// against a token count that is right.
pub fn token_rows(op: &'static str, layer: &LayerConfig, tokens: &Tensor) -> Result<usize> {
    let (dtype, hidden) = (layer.moe.input_dtype.dtype(), layer.moe.hidden);
    match tokens.shape() {
        &[n, h] if h == hidden => {
            tokens.expect_shape(op, "tokens", dtype, &[n, hidden])?;
            Ok(n)
        }
        shape => Err(MoeError::InvalidInput {
            op,
            detail: format!(
                "`tokens` must be a [tokens, {hidden}] matrix of {dtype:?} (one row per token), got {:?} {shape:?}",
                tokens.dtype()
            ),
        }),
    }
}

/// Fails unless the top-k ids and weights, where they are matrices, have one row per token of
/// `tokens` (`n`), naming the argument whose rows differ.
pub fn routing_rows(op: &'static str, n: usize, topk_ids: &Tensor, topk_weights: &Tensor) -> Result<()> {
    for (arg, t) in [("topk_ids", topk_ids), ("topk_weights", topk_weights)] {
        if let &[rows, _] = t.shape()
            && rows != n
        {
            return Err(MoeError::InvalidInput {
                op,
                detail: format!("`tokens` has {n} rows and `{arg}` {rows}: pass one row of `{arg}` per token"),
            });
        }
    }
    Ok(())
}

impl<'a> PrepareInput<'a> {
    /// Checks shapes, dtypes, id ranges and the token bound; nothing is sent if this fails.
    pub fn new(
        layer: &LayerConfig,
        max_tokens: usize,
        tokens: &'a Tensor,
        topk_ids: &'a Tensor,
        topk_weights: &'a Tensor,
    ) -> Result<Self> {
        let moe = &layer.moe;
        let n = token_rows("prepare", layer, tokens)?;
        if n > max_tokens {
            return Err(MoeError::TooManyTokens {
                tokens: n,
                max: max_tokens,
            });
        }
        let at = tokens.location();
        routing_rows("prepare", n, topk_ids, topk_weights)?;
        topk_ids.expect_at("prepare", "topk_ids", DType::I32, &[n, moe.top_k], at)?;
        topk_weights.expect_at("prepare", "topk_weights", DType::F32, &[n, moe.top_k], at)?;
        let input = PrepareInput {
            tokens,
            topk_ids,
            topk_weights,
        };
        if at != Location::Host {
            return Ok(input);
        }
        let ids = topk_ids.to_i32();
        if let Some((i, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id < 0 || **id as usize >= moe.num_experts)
        {
            return Err(MoeError::InvalidInput {
                op: "prepare",
                detail: format!(
                    "topk_ids[{}][{}] = {id} is not an expert id in [0, {})",
                    i / moe.top_k,
                    i % moe.top_k,
                    moe.num_experts
                ),
            });
        }
        for (t, row) in ids.chunks_exact(moe.top_k).enumerate() {
            for k in 1..row.len() {
                if row[..k].contains(&row[k]) {
                    return Err(MoeError::InvalidInput {
                        op: "prepare",
                        detail: format!("token {t} lists expert {} twice in its top-k ids {row:?}", row[k]),
                    });
                }
            }
        }
        if let Some((i, w)) = topk_weights
            .to_f32()
            .into_iter()
            .enumerate()
            .find(|(_, w)| !w.is_finite())
        {
            return Err(MoeError::InvalidInput {
                op: "prepare",
                detail: format!(
                    "topk_weights[{}][{}] = {w} is not finite: a router weight must be a finite number",
                    i / moe.top_k,
                    i % moe.top_k
                ),
            });
        }
        Ok(input)
    }

    /// Where the inputs are (all three in the same place).
    pub fn location(&self) -> Location {
        self.tokens.location()
    }

    /// Fails unless the inputs are in host memory: for `backend`s that read them on the host.
    pub fn require_host(&self, backend: &str) -> Result<()> {
        match self.location() {
            Location::Host => Ok(()),
            at => Err(MoeError::InvalidInput {
                op: "prepare",
                detail: format!(
                    "the inputs are on {at}, and `{backend}` on the host platform reads them in host memory: pass host tensors, or run the backend on the cuda platform"
                ),
            }),
        }
    }

    /// Number of tokens.
    pub fn num_tokens(&self) -> usize {
        self.tokens.shape()[0]
    }
    /// Tokens `[n, hidden]`.
    pub fn tokens(&self) -> &'a Tensor {
        self.tokens
    }
    /// Top-k ids `[n, top_k]`.
    pub fn topk_ids(&self) -> &'a Tensor {
        self.topk_ids
    }
    /// Top-k weights `[n, top_k]`.
    pub fn topk_weights(&self) -> &'a Tensor {
        self.topk_weights
    }
}

/// The object one rank holds per (layer, backend): it owns the layer's view of the workspace
/// and its per-call state.
pub trait PrepareFinalize: Send + std::fmt::Debug {
    /// The registered backend name.
    fn name(&self) -> &'static str;
    /// The layout `prepare` delivers.
    fn activation_format(&self) -> ActivationFormat;
    /// Whether `finalize` leaves the complete result (see the module docs).
    fn output_is_reduced(&self) -> bool;
    /// The dtype top-k ids must have.
    fn topk_ids_dtype(&self) -> DType {
        DType::I32
    }
    /// The most tokens one `prepare` accepts on this rank.
    fn max_tokens_per_rank(&self) -> usize;
    /// Number of ranks that send tokens to this one.
    fn num_dispatchers(&self) -> usize;
    /// Bytes of workspace this rank holds for the backend (shared by its layer group).
    fn workspace_bytes(&self) -> usize;
    /// Quantizes (unless deferred) and dispatches.
    ///
    /// With inputs in host memory the delivery is in host memory and complete on return. With
    /// inputs on the rank's GPU (backends on the cuda platform) the delivery is on the GPU and
    /// the work is only enqueued on the rank's stream: nothing waits for the host, and the
    /// tensors are valid for work ordered after it on that stream until the next `prepare`.
    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared>;
    /// Takes part in a call this rank cannot complete, for `reason`: the call is marked
    /// abandoned wherever the peers wait for it, so each peer's same call fails promptly naming
    /// this rank, instead of waiting for this rank's next call or pairing with it. `prepared`
    /// is the call's receipt when its `prepare` succeeded (the experts failed after it), else
    /// `None`: its input was refused before `prepare` (by [`PrepareInput::new`], or by the
    /// engine), and this stands where the call's `prepare` would. The layer runner calls it for
    /// every error of a call; `prepare` and `finalize` mark the calls they refuse themselves.
    fn abandon(&mut self, prepared: Option<Receipt>, reason: &MoeError) -> Result<()>;
    /// Combines the experts' output into `out` (`[n, hidden]`, input dtype, owned by the caller),
    /// both where `prepare`'s inputs were (host memory, or the rank's GPU: then enqueued only).
    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()>;
    /// Waits until the work this backend enqueued has run and reports an error a kernel
    /// recorded meanwhile (a timed-out wait naming the rank, a bad id in a device input). Calls
    /// on host tensors complete before they return, so there is nothing to wait for.
    fn wait(&mut self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::{Cell, SHAPES};
    use crate::tensor::tests::on_fake_device;

    fn inputs(bad_id: bool) -> (LayerConfig, [Tensor; 3]) {
        let cell = Cell {
            shape: SHAPES[1],
            ..Cell::new("any")
        };
        let layer = cell.layer().unwrap();
        let (n, h, k) = (2, layer.moe.hidden, layer.moe.top_k);
        let ids = if bad_id { [0, 99] } else { [0, 1] };
        (
            layer,
            [
                Tensor::from_f32(DType::Bf16, &[n, h], &vec![0.5; n * h]),
                Tensor::from_i32(&[n, k], &ids),
                Tensor::from_f32(DType::F32, &[n, k], &[1.0, 1.0]),
            ],
        )
    }

    /// A delivery on a device reads back to the same bytes, shapes and variants, scales and
    /// their layout included, in both formats.
    #[test]
    fn a_delivery_on_a_device_reads_back_to_the_same_tensors() {
        let payload = Tensor::from_bytes(DType::U8, &[2, 4], (0..8).collect()).unwrap();
        let scales = Tensor::from_bytes(DType::U8, &[2, 1], vec![7, 9]).unwrap();
        let ids = Tensor::from_i32(&[2, 2], &[3, -1, -1, 5]);
        let weights = Tensor::from_f32(DType::F32, &[2, 2], &[0.5, 0.0, 0.0, 0.25]);
        let activations = |on_device: bool| {
            let place = |t: &Tensor| if on_device { on_fake_device(t) } else { t.clone() };
            Activations::new(
                QuantScheme::Nvfp4,
                place(&payload),
                Some((place(&scales), ScaleLayout::Swizzled128x4)),
            )
        };
        let standard = |on_device: bool| {
            let place = |t: &Tensor| if on_device { on_fake_device(t) } else { t.clone() };
            Dispatched::Standard {
                activations: activations(on_device),
                topk_ids: place(&ids),
                topk_weights: place(&weights),
            }
        };
        let batched = |on_device: bool| {
            let place = |t: &Tensor| if on_device { on_fake_device(t) } else { t.clone() };
            Dispatched::Batched {
                activations: activations(on_device),
                expert_counts: place(&Tensor::from_i32(&[2], &[1, 0])),
                weights: place(&Tensor::from_f32(DType::F32, &[2, 1], &[0.5, 0.0])),
            }
        };
        for (on_device, on_host) in [(standard(true), standard(false)), (batched(true), batched(false))] {
            let read = on_device.to_host().unwrap();
            assert_eq!(format!("{read:?}"), format!("{on_host:?}"));
            assert!(read.activations().data().device_region().is_none());
        }
    }

    fn refusal(layer: &LayerConfig, x: &Tensor, ids: &Tensor, w: &Tensor) -> String {
        PrepareInput::new(layer, 4, x, ids, w)
            .map(drop)
            .unwrap_err()
            .to_string()
    }

    /// A NaN router weight made that token's output NaN without an error.
    #[test]
    fn non_finite_router_weights_are_refused_naming_the_token_and_slot() {
        let (layer, [x, ids, _]) = inputs(false);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let w = Tensor::from_f32(DType::F32, &[2, 1], &[0.5, bad]);
            let err = refusal(&layer, &x, &ids, &w);
            assert!(
                err.contains("topk_weights[1][0]") && err.contains("not finite"),
                "{err}"
            );
        }
    }

    /// A 1-D `tokens` was reported as a wrong `out` (its length taken for the token count).
    #[test]
    fn tokens_that_are_not_a_matrix_are_named_as_tokens() {
        let (layer, [x, ids, w]) = inputs(false);
        let flat = Tensor::from_bytes(x.dtype(), &[x.shape().iter().product()], x.bytes().to_vec()).unwrap();
        let err = refusal(&layer, &flat, &ids, &w);
        assert!(
            err.contains("`tokens` must be a [tokens,") && !err.contains("`out`"),
            "{err}"
        );
    }

    /// `tokens` with one row fewer than `topk_ids` blamed `topk_ids` alone.
    #[test]
    fn rows_that_differ_between_tokens_and_topk_ids_name_both() {
        let (layer, [x, ids, w]) = inputs(false);
        let one_row =
            Tensor::from_bytes(x.dtype(), &[1, x.shape()[1]], x.bytes()[..x.bytes().len() / 2].to_vec()).unwrap();
        let err = refusal(&layer, &one_row, &ids, &w);
        assert!(err.contains("`tokens` has 1 rows and `topk_ids` 2"), "{err}");
    }

    #[test]
    fn device_inputs_leave_the_id_check_to_the_gpu_backend() {
        let (layer, [x, ids, w]) = inputs(true);
        assert!(
            PrepareInput::new(&layer, 4, &x, &ids, &w).is_err(),
            "host ids are checked"
        );
        let (x, ids, w) = (on_fake_device(&x), on_fake_device(&ids), on_fake_device(&w));
        let input = PrepareInput::new(&layer, 4, &x, &ids, &w).unwrap();
        assert_eq!(input.location(), Location::Device(1));
        let err = input.require_host("nvlink-one-sided").unwrap_err().to_string();
        assert!(err.contains("on GPU 1") && err.contains("pass host tensors"), "{err}");
    }

    #[test]
    fn inputs_in_two_places_are_refused() {
        let (layer, [x, ids, w]) = inputs(false);
        let ids = on_fake_device(&ids);
        let err = PrepareInput::new(&layer, 4, &x, &ids, &w).unwrap_err().to_string();
        assert!(err.contains("`topk_ids` is in GPU 1"), "{err}");
    }
}
