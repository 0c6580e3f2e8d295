//! `MoeLayer`: one rank's prepare/finalize object of one MoE layer, shaped like vLLM's
//! `FusedMoEPrepareAndFinalize`: `prepare` dispatches and hands the experts their rows,
//! `finalize` combines the experts' output. The engine runs its experts in between, and applies
//! the TP all-reduce itself when `output_is_reduced` is zero (or uses `MoeRunner`, which does).

use std::ffi::c_char;

use moe_a2a::runner::experts_output;
use moe_a2a::{Dispatched, LayerConfig, MoeError, PrepareFinalize, PrepareInput, Receipt, Tensor};

use crate::status::{Failure, MoeStatus, guarded};
use crate::types::{
    MoeDelivery, MoeLayerInfo, MoeLayerSpec, MoeTensor, borrowed, c_str, dtype_code, format_code, free, give, handle,
};
use crate::world::{MoeWorld, Place};

/// One rank's prepare/finalize object of one MoE layer (opaque; `moe_layer_new`). Not for use
/// by two threads at once.
#[derive(Debug)]
pub struct MoeLayer {
    layer: LayerConfig,
    backend: Box<dyn PrepareFinalize>,
    /// The call between its prepare and its finalize.
    pending: Option<Receipt>,
    /// The last delivery, alive for the descriptors handed out until the next prepare.
    delivery: Option<Dispatched>,
    /// Where the last delivery's experts write.
    expert_output: Option<Tensor>,
    /// On the GPU, where the experts write when the backend offers nowhere: allocated once
    /// per shape.
    scratch: Option<Tensor>,
    place: Place,
}

/// A call's inputs, as host tensors.
#[derive(Debug)]
pub struct Inputs {
    pub tokens: Tensor,
    pub topk_ids: Tensor,
    pub topk_weights: Tensor,
}

impl MoeLayer {
    /// Builds backend `backend` for `layer` on `world`'s rank (collective over the world).
    pub fn new(world: &MoeWorld, backend: &str, layer: LayerConfig) -> moe_a2a::Result<MoeLayer> {
        let place = world.place().clone();
        let built = moe_a2a::registry().construct(backend, &layer, &place.context())?;
        Ok(MoeLayer {
            layer,
            backend: built,
            pending: None,
            delivery: None,
            expert_output: None,
            scratch: None,
            place,
        })
    }

    /// Where the layer runs, and how descriptors become its tensors.
    pub fn place(&self) -> &Place {
        &self.place
    }

    /// The backend's answers to vLLM's prepare/finalize queries.
    pub fn info(&self) -> MoeLayerInfo {
        let b = &self.backend;
        MoeLayerInfo {
            activation_format: format_code(b.activation_format()),
            output_is_reduced: i32::from(b.output_is_reduced()),
            max_tokens_per_rank: b.max_tokens_per_rank() as u64,
            num_dispatchers: b.num_dispatchers() as u64,
            topk_ids_dtype: dtype_code(b.topk_ids_dtype()),
            workspace_bytes: b.workspace_bytes() as u64,
        }
    }

    /// The last prepare's delivery, moved out to a caller that keeps its tensors (the
    /// descriptors `prepare` returned then point nowhere): Python's arrays take it whole rather
    /// than copy it.
    pub fn take_delivered(&mut self) -> Option<Dispatched> {
        self.delivery.take()
    }

    /// The layer's configuration.
    pub fn config(&self) -> &LayerConfig {
        &self.layer
    }

    /// Dispatches this rank's tokens and returns the delivery's descriptors. A refused call is
    /// marked abandoned, so the peers' same call fails too, naming this rank.
    pub fn prepare(&mut self, inputs: Inputs) -> Result<MoeDelivery, Failure> {
        if self.pending.is_some() {
            return Err(self.refused_prepare(Failure::invalid(
                "the previous call was prepared and never finalized; call moe_layer_finalize (or moe_layer_abandon) after every prepare",
            )));
        }
        let max = self.backend.max_tokens_per_rank();
        let input = match PrepareInput::new(&self.layer, max, &inputs.tokens, &inputs.topk_ids, &inputs.topk_weights) {
            Ok(input) => input,
            Err(error) => return Err(self.refused_prepare(error.into())),
        };
        // `prepare` marks the calls it refuses itself.
        let prepared = self.backend.prepare(input)?;
        let shape = prepared.dispatched.expert_output_shape(self.layer.moe.hidden);
        let gpu = self.place.gpu_rank(inputs.tokens.location());
        let dtype = self.layer.moe.input_dtype.dtype();
        let expert_output = match experts_output(prepared.expert_output, &shape, dtype, gpu, &mut self.scratch) {
            Ok(t) => t,
            Err(error) => {
                let _ = self.backend.abandon(Some(prepared.receipt), &error);
                return Err(error.into());
            }
        };
        let delivery = self.delivery.insert(prepared.dispatched);
        let expert_output = self.expert_output.insert(expert_output);
        self.pending = Some(prepared.receipt);
        Ok(MoeDelivery::of(delivery, expert_output))
    }

    /// `failure`, which refused the coming call before its prepare ran, after marking that
    /// call abandoned (and a call still prepared, which can no longer finalize).
    pub fn refused_prepare(&mut self, failure: Failure) -> Failure {
        let error = MoeError::InvalidInput {
            op: "prepare",
            detail: failure.message.clone(),
        };
        if let Some(receipt) = self.pending.take() {
            let _ = self.backend.abandon(Some(receipt), &error);
        }
        let _ = self.backend.abandon(None, &error);
        failure
    }

    /// Combines the experts' output (`copied`: the caller's tensor, or `None` for the
    /// delivery's own) into `out`.
    pub fn finalize(&mut self, copied: Option<Tensor>, out: &mut Tensor) -> Result<(), Failure> {
        let Some(receipt) = self.pending.take() else {
            return Err(Failure::invalid(
                "finalize without a prepared call: call moe_layer_prepare first, once per finalize",
            ));
        };
        let own = self
            .expert_output
            .as_ref()
            .expect("a prepared call has its expert output");
        // `finalize` marks the calls it refuses itself.
        Ok(self.backend.finalize(receipt, copied.as_ref().unwrap_or(own), out)?)
    }

    /// `failure`, which refused the prepared call's finalize before it ran, after marking the
    /// call abandoned.
    pub fn refused_finalize(&mut self, failure: Failure) -> Failure {
        if let Some(receipt) = self.pending.take() {
            let error = MoeError::InvalidInput {
                op: "finalize",
                detail: failure.message.clone(),
            };
            let _ = self.backend.abandon(Some(receipt), &error);
        }
        failure
    }

    /// Waits for the work this layer enqueued on the rank's stream and reports what its kernels
    /// recorded meanwhile (a timed-out peer, a bad id in a device input, a peer's corrupt row).
    pub fn wait(&mut self) -> Result<(), Failure> {
        Ok(self.backend.wait()?)
    }

    /// Marks the call abandoned for `reason`: the one in flight when prepared, else the next.
    pub fn abandon(&mut self, reason: &str) -> Result<(), Failure> {
        let error = MoeError::InvalidInput {
            op: "experts",
            detail: format!("the engine abandoned the call: {reason}"),
        };
        let receipt = self.pending.take();
        Ok(self.backend.abandon(receipt, &error)?)
    }

    /// The tensor `expert_output` describes: `None` when it is the delivery's own (no copy).
    ///
    /// # Safety
    /// As [`Place::input`].
    pub unsafe fn expert_output_of(&self, expert_output: &MoeTensor) -> Result<Option<Tensor>, Failure> {
        if let Some(own) = &self.expert_output {
            let mine = MoeTensor::of(own);
            let same = (mine.data, mine.device_type, mine.ndim, mine.dtype)
                == (
                    expert_output.data,
                    expert_output.device_type,
                    expert_output.ndim,
                    expert_output.dtype,
                );
            if same && mine.shape == expert_output.shape {
                return Ok(None);
            }
        }
        // SAFETY: this function's contract.
        unsafe { self.place.input(expert_output, "expert_output") }.map(Some)
    }
}

/// The tensors the three descriptors describe, at `place`.
///
/// # Safety
/// Each pointer is NULL or points to a descriptor as [`Place::input`] requires.
pub unsafe fn inputs(
    place: &Place,
    tokens: *const MoeTensor,
    topk_ids: *const MoeTensor,
    topk_weights: *const MoeTensor,
) -> Result<Inputs, Failure> {
    // SAFETY: this function's contract.
    unsafe {
        Ok(Inputs {
            tokens: place.input(borrowed("tokens", tokens)?, "tokens")?,
            topk_ids: place.input(borrowed("topk_ids", topk_ids)?, "topk_ids")?,
            topk_weights: place.input(borrowed("topk_weights", topk_weights)?, "topk_weights")?,
        })
    }
}

/// Builds backend `backend` (a registered name: "nvlink-one-sided", "nvlink-two-sided",
/// "allgather-rs") for the layer `spec` describes, on `world`'s rank. Collective: every rank
/// of the world builds the layer, in the same order as its other layers. A backend that cannot
/// serve the layer fails with `MOE_STATUS_UNSUPPORTED`, its message saying what was asked, what
/// the backend supports and which backends would accept it.
///
/// # Safety
/// `world` is NULL or a live world; `backend` is NULL or NUL-terminated; `spec` is NULL or a
/// `MoeLayerSpec` (its `workspace_group` NULL or NUL-terminated); `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_new(
    world: *const MoeWorld,
    backend: *const c_char,
    spec: *const MoeLayerSpec,
    out: *mut *mut MoeLayer,
) -> MoeStatus {
    guarded(|| {
        // SAFETY: this function's contract.
        let (world, backend, layer) = unsafe {
            (
                borrowed("world", world)?,
                c_str("backend", backend)?,
                borrowed("spec", spec)?.layer_config()?,
            )
        };
        let built = MoeLayer::new(world, backend, layer)?;
        // SAFETY: this function's contract.
        unsafe { give("out", out, built) }
    })
}

/// What the layer's backend reports: its activation format, whether its output is reduced,
/// the most tokens per call, the ranks that send to this one, the ids' dtype, its workspace.
///
/// # Safety
/// `layer` is NULL or a live layer; `info` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_info(layer: *const MoeLayer, info: *mut MoeLayerInfo) -> MoeStatus {
    guarded(|| {
        // SAFETY: this function's contract.
        let (layer, info) = unsafe { (borrowed("layer", layer)?, handle("info", info)?) };
        *info = layer.info();
        Ok(())
    })
}

/// Quantizes and dispatches this rank's tokens: `tokens` `[n, hidden]` in the layer's input
/// dtype, `topk_ids` `[n, top_k]` `MOE_DTYPE_I32` in `[0, num_experts)`, `topk_weights`
/// `[n, top_k]` `MOE_DTYPE_F32`, `n` at most `max_tokens_per_rank` (0 allowed). Collective: the
/// call completes with every rank's same call. Fills `delivery` with the rows this rank's
/// experts compute, valid until the layer's next prepare. Every prepare is followed by one
/// `moe_layer_finalize` or `moe_layer_abandon`.
///
/// A refused input fails here and marks the call abandoned, so every peer's same call fails
/// promptly naming this rank instead of waiting for its timeout.
///
/// # Safety
/// `layer` is NULL or a live layer; each tensor is NULL or a descriptor of readable memory as
/// it claims; `delivery` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_prepare(
    layer: *mut MoeLayer,
    tokens: *const MoeTensor,
    topk_ids: *const MoeTensor,
    topk_weights: *const MoeTensor,
    delivery: *mut MoeDelivery,
) -> MoeStatus {
    guarded(|| {
        // SAFETY: this function's contract.
        let layer = unsafe { handle("layer", layer) }?;
        let inputs = if delivery.is_null() {
            Err(Failure::invalid("`delivery` is NULL; pass where to store the delivery"))
        } else {
            // SAFETY: this function's contract.
            unsafe { inputs(&layer.place, tokens, topk_ids, topk_weights) }
        };
        let inputs = inputs.map_err(|f| layer.refused_prepare(f))?;
        let described = layer.prepare(inputs)?;
        // SAFETY: not NULL, and writable per this function's contract.
        unsafe { delivery.write(described) };
        Ok(())
    })
}

/// Combines the experts' output of the prepared call into `out` (`[n, hidden]`, the layer's
/// input dtype, `n` the tokens of the prepare). `expert_output` is the delivery's
/// `expert_output` (no copy) or any tensor of its shape and dtype. Collective, like prepare.
///
/// # Safety
/// `layer` is NULL or a live layer; `expert_output` is NULL or a descriptor of readable memory
/// as it claims; `out` is NULL or a descriptor of writable memory as it claims.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_finalize(
    layer: *mut MoeLayer,
    expert_output: *const MoeTensor,
    out: *const MoeTensor,
) -> MoeStatus {
    guarded(|| {
        // SAFETY: this function's contract.
        let layer = unsafe { handle("layer", layer) }?;
        // SAFETY: this function's contract.
        let checked = unsafe {
            borrowed("expert_output", expert_output)
                .and_then(|e| layer.expert_output_of(e))
                .and_then(|e| Ok((e, layer.place.output(borrowed("out", out)?, "out")?)))
        };
        let (copied, mut out) = checked.map_err(|f| layer.refused_finalize(f))?;
        layer.finalize(copied, &mut out.tensor)?;
        // SAFETY: `out` describes writable memory per this function's contract.
        unsafe { out.finish("out") }
    })
}

/// Abandons the prepared call (the experts failed between prepare and finalize), or when none
/// is prepared the coming one (this rank cannot take part in it): every peer's same call fails
/// promptly, naming this rank and `reason` (NUL-terminated, may be NULL).
///
/// # Safety
/// `layer` is NULL or a live layer; `reason` is NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_abandon(layer: *mut MoeLayer, reason: *const c_char) -> MoeStatus {
    guarded(|| {
        // SAFETY: this function's contract.
        let layer = unsafe { handle("layer", layer) }?;
        // SAFETY: this function's contract.
        let reason = unsafe { crate::types::reason(reason) }?;
        layer.abandon(reason)
    })
}

/// Waits until the work the layer enqueued on a GPU rank's stream has run, and reports an error
/// its kernels recorded meanwhile (a timed-out peer, a bad id in a device input, a peer's
/// corrupt row); otherwise such an error is reported by the layer's next call. Host calls
/// complete before they return: nothing to wait for.
///
/// # Safety
/// `layer` is NULL or a live layer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_wait(layer: *mut MoeLayer) -> MoeStatus {
    guarded(|| {
        // SAFETY: this function's contract.
        unsafe { handle("layer", layer) }?.wait()
    })
}

/// Frees a layer (NULL is ignored). Not collective; a layer with a prepared call abandons it.
///
/// # Safety
/// `layer` is NULL or a layer not freed before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_layer_free(layer: *mut MoeLayer) {
    // SAFETY: this function's contract.
    if let Ok(l) = unsafe { handle("layer", layer) }
        && l.pending.is_some()
    {
        let _ = guarded(|| l.abandon("the layer was freed between prepare and finalize"));
    }
    // SAFETY: this function's contract.
    unsafe { free(layer) }
}
