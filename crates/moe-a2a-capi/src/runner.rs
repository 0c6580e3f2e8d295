//! `MoeRunner`: the whole MoE layer on one rank (prepare -> the engine's experts -> finalize,
//! the sequence-parallel split and gather, and the TP all-reduce exactly when the backend's
//! output is not reduced), with the experts a C callback.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use moe_a2a::experts::Experts;
use moe_a2a::runner::MoeLayer as LayerRunner;
use moe_a2a::{ActivationFormat, Dispatched, ExpertOwnership, LayerConfig, MoeError, Tensor};

use crate::layer::{Inputs, inputs};
use crate::status::{Failure, MoeStatus, guarded};
use crate::types::{MoeDelivery, MoeFormat, MoeLayerSpec, MoeTensor, borrowed, c_str, free, give, handle};
use crate::world::{MoeWorld, Place};

/// The engine's experts: computes `out` (the delivery's `expert_output`, in the layer's input
/// dtype) from `delivery`, and returns 0, or nonzero when it fails (the call is then abandoned
/// on every rank). Called on the thread that called `moe_runner_forward`.
pub type MoeExpertsApply =
    Option<unsafe extern "C" fn(user_data: *mut c_void, delivery: *const MoeDelivery, out: *const MoeTensor) -> i32>;

/// The engine's experts for `moe_runner_new`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MoeExperts {
    pub apply: MoeExpertsApply,
    /// Passed to `apply` as it is; the engine keeps it alive while the runner lives.
    pub user_data: *mut c_void,
    /// The `MOE_FORMAT_*` the experts consume.
    pub activation_format: i32,
}

/// Experts behind a C callback.
#[derive(Debug)]
struct CallbackExperts {
    apply: unsafe extern "C" fn(*mut c_void, *const MoeDelivery, *const MoeTensor) -> i32,
    user_data: *mut c_void,
    format: ActivationFormat,
}

// SAFETY: the runner calls the experts only from the thread that called moe_runner_forward,
// one call at a time (the handle is not for two threads at once); `user_data` is the engine's,
// which `moe_runner_new`'s contract keeps alive for the runner's life.
unsafe impl Send for CallbackExperts {}
// SAFETY: as above: no two threads call the experts at once.
unsafe impl Sync for CallbackExperts {}

impl Experts for CallbackExperts {
    fn activation_format(&self) -> ActivationFormat {
        self.format
    }

    fn apply(&self, dispatched: &Dispatched, _ownership: &ExpertOwnership, out: &mut Tensor) -> moe_a2a::Result<()> {
        let delivery = MoeDelivery::of(dispatched, out);
        // SAFETY: the callback's contract (moe_runner_new): it reads the delivery's tensors and
        // writes `expert_output`, all alive for the call.
        let code = unsafe { (self.apply)(self.user_data, &delivery, &delivery.expert_output) };
        match code {
            0 => Ok(()),
            code => Err(MoeError::InvalidInput {
                op: "experts",
                detail: format!("the engine's experts callback returned {code}"),
            }),
        }
    }
}

/// The whole layer on one rank (opaque; `moe_runner_new`). Not for use by two threads at once.
#[derive(Debug)]
pub struct MoeRunner {
    runner: LayerRunner,
    place: Place,
}

impl MoeRunner {
    /// Builds backend `backend` for `layer` on `world`'s rank with `experts` (collective).
    pub fn new(
        world: &MoeWorld,
        backend: &str,
        layer: LayerConfig,
        experts: Arc<dyn Experts>,
    ) -> moe_a2a::Result<MoeRunner> {
        let place = world.place().clone();
        let runner = LayerRunner::new(moe_a2a::registry(), backend, layer, experts, place.context())?;
        Ok(MoeRunner { runner, place })
    }

    /// Where the layer runs, and how descriptors become its tensors.
    pub fn place(&self) -> &Place {
        &self.place
    }

    /// Runs the layer on `inputs` into `out`.
    pub fn forward(&mut self, inputs: &Inputs, out: &mut Tensor) -> Result<(), Failure> {
        Ok(self
            .runner
            .forward(&inputs.tokens, &inputs.topk_ids, &inputs.topk_weights, out)?)
    }

    /// `failure`, which refused the coming call before it ran, after marking that call
    /// abandoned, so every peer's same call fails too, naming this rank.
    pub fn refused(&mut self, failure: Failure) -> Failure {
        let error = MoeError::InvalidInput {
            op: "forward",
            detail: failure.message.clone(),
        };
        let _ = self.runner.abandon(&error);
        failure
    }

    /// Waits for the work the layer enqueued on a GPU rank's stream and reports what its
    /// kernels recorded meanwhile.
    pub fn wait(&mut self) -> Result<(), Failure> {
        Ok(self.runner.wait()?)
    }

    /// The runner of C experts.
    fn of_c_experts(
        world: &MoeWorld,
        backend: &str,
        layer: LayerConfig,
        experts: &MoeExperts,
    ) -> Result<MoeRunner, Failure> {
        let apply = experts
            .apply
            .ok_or_else(|| Failure::invalid("`experts.apply` is NULL; pass the experts' function"))?;
        let format = match experts.activation_format {
            f if f == MoeFormat::Standard as i32 => ActivationFormat::Standard,
            f if f == MoeFormat::BatchedExperts as i32 => ActivationFormat::BatchedExperts,
            other => {
                return Err(Failure::invalid(format!(
                    "`experts.activation_format` = {other} is neither MOE_FORMAT_STANDARD (0) nor MOE_FORMAT_BATCHED_EXPERTS (1)"
                )));
            }
        };
        let experts = Arc::new(CallbackExperts {
            apply,
            user_data: experts.user_data,
            format,
        });
        Ok(MoeRunner::new(world, backend, layer, experts)?)
    }
}

/// Builds backend `backend` for the layer `spec` describes and pairs it with `experts`, on
/// `world`'s rank. Collective, like `moe_layer_new`; fails with `MOE_STATUS_UNSUPPORTED` when
/// the experts' format is not the layer's.
///
/// # Safety
/// `world` is NULL or a live world; `backend` is NULL or NUL-terminated; `spec` is NULL or a
/// `MoeLayerSpec` (its `workspace_group` NULL or NUL-terminated); `experts` is NULL or a
/// `MoeExperts` whose `apply` follows `MoeExpertsApply`'s contract and whose `user_data` lives
/// as long as the runner; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_runner_new(
    world: *const MoeWorld,
    backend: *const c_char,
    spec: *const MoeLayerSpec,
    experts: *const MoeExperts,
    out: *mut *mut MoeRunner,
) -> MoeStatus {
    guarded(|| {
        // SAFETY: this function's contract.
        let (world, backend, layer, experts) = unsafe {
            (
                borrowed("world", world)?,
                c_str("backend", backend)?,
                borrowed("spec", spec)?.layer_config()?,
                borrowed("experts", experts)?,
            )
        };
        let runner = MoeRunner::of_c_experts(world, backend, layer, experts)?;
        // SAFETY: this function's contract.
        unsafe { give("out", out, runner) }
    })
}

/// Runs the layer: `tokens` `[n, hidden]` (under sequence parallelism, the whole replica's
/// tokens, the same on its TP ranks), `topk_ids` `[n, top_k]` I32, `topk_weights` `[n, top_k]`
/// F32; `out` `[n, hidden]` receives the complete MoE output. Collective over the world. An
/// error on any rank (a refused input, the experts' nonzero return) fails every rank's call.
///
/// # Safety
/// `runner` is NULL or a live runner; the inputs are NULL or descriptors of readable memory as
/// they claim, `out` NULL or a descriptor of writable memory as it claims.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_runner_forward(
    runner: *mut MoeRunner,
    tokens: *const MoeTensor,
    topk_ids: *const MoeTensor,
    topk_weights: *const MoeTensor,
    out: *const MoeTensor,
) -> MoeStatus {
    guarded(|| {
        // SAFETY: this function's contract.
        let runner = unsafe { handle("runner", runner) }?;
        // SAFETY: this function's contract.
        let checked = unsafe {
            let place = &runner.place;
            borrowed("out", out)
                .and_then(|o| place.output(o, "out"))
                .and_then(|o| Ok((inputs(place, tokens, topk_ids, topk_weights)?, o)))
        };
        let (inputs, mut out) = checked.map_err(|f| runner.refused(f))?;
        runner.forward(&inputs, &mut out.tensor)?;
        // SAFETY: `out` describes writable memory per this function's contract.
        unsafe { out.finish("out") }
    })
}

/// Waits until the work the runner enqueued on a GPU rank's stream has run, and reports an
/// error its kernels recorded meanwhile, as `moe_layer_wait`.
///
/// # Safety
/// `runner` is NULL or a live runner.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_runner_wait(runner: *mut MoeRunner) -> MoeStatus {
    guarded(|| {
        // SAFETY: this function's contract.
        unsafe { handle("runner", runner) }?.wait()
    })
}

/// Frees a runner (NULL is ignored). Not collective.
///
/// # Safety
/// `runner` is NULL or a runner not freed before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_runner_free(runner: *mut MoeRunner) {
    // SAFETY: this function's contract.
    unsafe { free(runner) }
}
