//! `moe_a2a._native`: the Python binding, over the same Rust layer as the C ABI
//! (`moe_a2a_capi`): a world joined over TCP, a layer's prepare/finalize shaped like vLLM's
//! `FusedMoEPrepareAndFinalize`, and the whole-layer runner with the experts a Python callable.
//! Arrays cross through DLPack; errors are exceptions carrying the library's message.

mod dlpack;

use std::sync::Arc;
use std::time::Duration;

use moe_a2a::experts::Experts;
use moe_a2a::{ActivationFormat, Dispatched, ExpertOwnership, LayerConfig, MoeError, Tensor};
use moe_a2a_capi::layer::{Inputs, MoeLayer as CLayer};
use moe_a2a_capi::runner::MoeRunner;
use moe_a2a_capi::status::{Failure, MoeStatus};
use moe_a2a_capi::types::MoeLayerSpec;
use moe_a2a_capi::world::{MoeWorld, Place};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use dlpack::{Array, CallArrays, Target, dtype_name, tensor};

create_exception!(_native, MoeA2aError, PyException, "An error of the moe-a2a library.");
create_exception!(
    _native,
    InvalidArgumentError,
    MoeA2aError,
    "A malformed argument: a tensor of the wrong shape, dtype or place, an expert id out of range, a call out of order."
);
create_exception!(
    _native,
    UnsupportedError,
    MoeA2aError,
    "The backend cannot serve the layer asked for (the message says what is supported and which backends would accept it)."
);
create_exception!(
    _native,
    CallTimeoutError,
    MoeA2aError,
    "A wait ran past the timeout; the message names the rank waited for."
);
create_exception!(
    _native,
    PeerFailedError,
    MoeA2aError,
    "A peer failed, abandoned or disagreed on the call, or the control plane failed."
);
create_exception!(_native, DeviceError, MoeA2aError, "The GPU or its driver failed.");
create_exception!(_native, InternalError, MoeA2aError, "A bug in moe-a2a.");

/// The exception for a failure of `status`.
pub fn error_of(status: MoeStatus, message: String) -> PyErr {
    match status {
        MoeStatus::InvalidArgument => InvalidArgumentError::new_err(message),
        MoeStatus::Unsupported => UnsupportedError::new_err(message),
        MoeStatus::Timeout => CallTimeoutError::new_err(message),
        MoeStatus::PeerFailed => PeerFailedError::new_err(message),
        MoeStatus::Device => DeviceError::new_err(message),
        MoeStatus::Ok | MoeStatus::Internal => InternalError::new_err(message),
    }
}

fn raised(failure: Failure) -> PyErr {
    error_of(failure.status, failure.message)
}

fn moe(error: MoeError) -> PyErr {
    raised(error.into())
}

/// This process's rank in a world of processes joined over TCP: `World.from_env()` (torchrun's
/// or an MPI launcher's variables, `MASTER_ADDR`/`MASTER_PORT`) or `World.connect(...)`.
#[pyclass(module = "moe_a2a._native", frozen)]
#[derive(Debug)]
struct World {
    inner: Arc<MoeWorld>,
}

#[pymethods]
impl World {
    /// Joins the world the launcher's environment describes (collective); with `device`, on
    /// that GPU (see `connect`).
    #[staticmethod]
    #[pyo3(signature = (device=None, stream=None))]
    fn from_env(py: Python<'_>, device: Option<usize>, stream: Option<usize>) -> PyResult<World> {
        let config = moe_a2a::control::TcpConfig::from_env().map_err(moe)?;
        World::joined(py, &config, device, stream)
    }

    /// Joins the world whose rank 0 listens on `master_addr:master_port` (collective).
    #[staticmethod]
    #[pyo3(signature = (master_addr, master_port, rank, world_size, local_rank=None, local_world_size=None, run_id=0, timeout_s=20.0, device=None, stream=None))]
    #[allow(clippy::too_many_arguments)]
    fn connect(
        py: Python<'_>,
        master_addr: String,
        master_port: u16,
        rank: usize,
        world_size: usize,
        local_rank: Option<usize>,
        local_world_size: Option<usize>,
        run_id: u64,
        timeout_s: f64,
        device: Option<usize>,
        stream: Option<usize>,
    ) -> PyResult<World> {
        let timeout = Duration::try_from_secs_f64(timeout_s)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| {
                InvalidArgumentError::new_err(format!("timeout_s = {timeout_s}: pass a positive number of seconds"))
            })?;
        let config = moe_a2a::control::TcpConfig {
            master_addr,
            master_port,
            rank,
            world_size,
            local_rank: local_rank.unwrap_or(rank),
            local_world_size: local_world_size.unwrap_or(world_size),
            run_id,
            timeout,
        };
        World::joined(py, &config, device, stream)
    }

    /// Whether this build has the GPU platform (device arrays, `device=`).
    #[staticmethod]
    fn has_gpu_platform() -> bool {
        cfg!(feature = "cuda")
    }

    /// A port on 127.0.0.1 that nothing listens on now (for rank 0 of a local world).
    #[staticmethod]
    fn free_local_port() -> PyResult<u16> {
        moe_a2a::control::TcpConfig::free_local_port()
            .map_err(|e| InvalidArgumentError::new_err(format!("no free local port: {e}")))
    }

    /// Aborts the world for `reason`: every rank's pending and later calls raise
    /// `PeerFailedError` naming this rank and the reason, promptly. The world cannot be used
    /// again.
    fn abort(&self, reason: &str) {
        self.inner.abort(reason);
    }

    #[getter]
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    #[getter]
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn __repr__(&self) -> String {
        format!("moe_a2a.World(rank={}, world_size={})", self.rank(), self.world_size())
    }
}

impl World {
    /// Joins the world `config` describes, then GPU `device` (collective) with its work on
    /// `stream` (a `CUstream` handle of that GPU, as `torch.cuda.current_stream().cuda_stream`
    /// gives; None or 0, PyTorch's default stream: a stream of its own, ordered after each
    /// array's producer stream on the GPU).
    fn joined(
        py: Python<'_>,
        config: &moe_a2a::control::TcpConfig,
        device: Option<usize>,
        stream: Option<usize>,
    ) -> PyResult<World> {
        if stream.is_some() && device.is_none() {
            return Err(InvalidArgumentError::new_err(
                "stream given without device: a stream belongs to a GPU; pass device too",
            ));
        }
        let mut world = py.detach(|| MoeWorld::connect(config)).map_err(moe)?;
        if let Some(ordinal) = device {
            let stream = SendPtr(stream.unwrap_or(0) as *mut std::ffi::c_void);
            let world = &mut world;
            let joined = py.detach(move || {
                let stream = stream;
                // SAFETY: the caller passes a live stream of GPU `ordinal` (or none), kept for
                // the world's life, as documented.
                unsafe { world.use_gpu(ordinal, stream.0) }
            });
            joined.map_err(raised)?;
        }
        Ok(World { inner: Arc::new(world) })
    }
}

/// A result tensor carried into a section without the GIL (its array is held by the caller's
/// frame meanwhile).
struct SendMut<'a>(&'a mut Tensor);
// SAFETY: the tensor is the library's (host bytes, or a borrowed device region), touched by
// only the one thread that runs the section while its owner waits.
unsafe impl Send for SendMut<'_> {}

/// A stream handle carried into a section without the GIL.
struct SendPtr(*mut std::ffi::c_void);
// SAFETY: a CUDA stream handle is an opaque value valid from any thread.
unsafe impl Send for SendPtr {}

/// The layer a `LayerSpec` (Python, in `moe_a2a`) describes, as the C ABI's spec.
#[derive(Debug, FromPyObject)]
#[pyo3(from_item_all)]
struct Spec {
    num_experts: u32,
    top_k: u32,
    hidden: u32,
    max_tokens_per_rank: u32,
    input_dtype: i32,
    quant_scheme: i32,
    fp8_static_scale: f32,
    nvfp4_global_scale: f32,
    defer_input_quant: bool,
    swizzled_scales: bool,
    tp: u32,
    dp: u32,
    ep: bool,
    sp: bool,
    activation_format: i32,
    workspace_group: Option<String>,
    expert_map: Option<Vec<u32>>,
}

impl Spec {
    fn layer(&self) -> PyResult<LayerConfig> {
        let c = MoeLayerSpec {
            num_experts: self.num_experts,
            top_k: self.top_k,
            hidden: self.hidden,
            max_tokens_per_rank: self.max_tokens_per_rank,
            input_dtype: self.input_dtype,
            quant_scheme: self.quant_scheme,
            fp8_static_scale: self.fp8_static_scale,
            nvfp4_global_scale: self.nvfp4_global_scale,
            defer_input_quant: i32::from(self.defer_input_quant),
            swizzled_scales: i32::from(self.swizzled_scales),
            tp: self.tp,
            dp: self.dp,
            ep: i32::from(self.ep),
            sp: i32::from(self.sp),
            activation_format: self.activation_format,
            workspace_group: std::ptr::null(),
            expert_map: match &self.expert_map {
                Some(map) if map.len() == self.num_experts as usize => map.as_ptr(),
                Some(map) => {
                    return Err(InvalidArgumentError::new_err(format!(
                        "expert_map has {} entries; it needs one EP rank per expert ({})",
                        map.len(),
                        self.num_experts
                    )));
                }
                None => std::ptr::null(),
            },
        };
        // SAFETY: `workspace_group` is NULL (the name is applied below); `expert_map` is NULL
        // or `num_experts` values of `self`, alive for the call.
        let layer = unsafe { c.layer_config() }.map_err(raised)?;
        Ok(match &self.workspace_group {
            Some(name) => layer.with_workspace_group(name.clone()),
            None => layer,
        })
    }
}

/// vLLM's `PrepareResultType`: `(a1q, a1q_scale, expert_tokens_meta, topk_ids, topk_weights)`.
type PrepareResult = (
    Py<Array>,
    Option<Py<Array>>,
    Option<Py<Array>>,
    Option<Py<Array>>,
    Option<Py<Array>>,
);

/// The `(a1q, a1q_scale, expert_tokens_meta, topk_ids, topk_weights)` of a delivery, as vLLM's
/// `prepare` returns it: the delivery's own tensors (moved, not copied), `a1q_scale` None
/// without scales, `expert_tokens_meta` the per-expert counts of a BatchedExperts delivery (None
/// in Standard).
fn prepare_result(py: Python<'_>, dispatched: Dispatched, place: &Place) -> PyResult<PrepareResult> {
    let array = |t: Tensor| -> PyResult<Py<Array>> { Py::new(py, Array::new(t, place.clone())) };
    let (activations, routing) = match dispatched {
        Dispatched::Standard {
            activations,
            topk_ids,
            topk_weights,
        } => (activations, (None, Some(topk_ids), topk_weights)),
        Dispatched::Batched {
            activations,
            expert_counts,
            weights,
        } => (activations, (Some(expert_counts), None, weights)),
    };
    let (a1q, scales) = match activations {
        moe_a2a::Activations::Scaled { data, scales, .. } => (data, Some(array(scales)?)),
        moe_a2a::Activations::Unscaled { data, .. } => (data, None),
    };
    let (meta, ids, weights) = routing;
    Ok((
        array(a1q)?,
        scales,
        meta.map(array).transpose()?,
        ids.map(array).transpose()?,
        Some(array(weights)?),
    ))
}

/// `checked` (a call's arguments read), or its error after `refuse` marked the call refused with
/// it, so that the peers' same call fails too, naming this rank.
fn or_refused<T>(checked: PyResult<T>, refuse: impl FnOnce(Failure)) -> PyResult<T> {
    checked.inspect_err(|e| refuse(Failure::invalid(e.to_string())))
}

/// A call's three input arrays; the tokens' argument is named as the caller names it.
fn inputs(
    call: &CallArrays<'_>,
    (name, tokens): (&str, &Bound<'_, PyAny>),
    topk_ids: &Bound<'_, PyAny>,
    topk_weights: &Bound<'_, PyAny>,
) -> PyResult<Inputs> {
    Ok(Inputs {
        tokens: tensor(call, tokens, name)?,
        topk_ids: tensor(call, topk_ids, "topk_ids")?,
        topk_weights: tensor(call, topk_weights, "topk_weights")?,
    })
}

/// One rank's prepare/finalize object of one MoE layer, shaped like vLLM's
/// `FusedMoEPrepareAndFinalize`.
#[pyclass(module = "moe_a2a._native", unsendable)]
#[derive(Debug)]
struct PrepareFinalize {
    layer: CLayer,
}

#[pymethods]
impl PrepareFinalize {
    /// Builds backend `backend` for the layer `spec` describes on `world`'s rank (collective).
    #[new]
    fn new(py: Python<'_>, world: &World, backend: &str, spec: Spec) -> PyResult<Self> {
        let layer = spec.layer()?;
        let world = world.inner.clone();
        let built = py.detach(|| CLayer::new(&world, backend, layer)).map_err(moe)?;
        Ok(PrepareFinalize { layer: built })
    }

    /// Quantizes and dispatches this rank's tokens (collective); returns
    /// `(a1q, a1q_scale, expert_tokens_meta, topk_ids, topk_weights)`.
    #[pyo3(signature = (a1, topk_weights, topk_ids))]
    fn prepare(
        &mut self,
        py: Python<'_>,
        a1: &Bound<'_, PyAny>,
        topk_weights: &Bound<'_, PyAny>,
        topk_ids: &Bound<'_, PyAny>,
    ) -> PyResult<PrepareResult> {
        let place = self.layer.place().clone();
        let inputs = or_refused(
            inputs(&CallArrays::new(&place), ("a1", a1), topk_ids, topk_weights),
            |f| drop(self.layer.refused_prepare(f)),
        )?;
        let layer = &mut self.layer;
        py.detach(|| layer.prepare(inputs).map(drop)).map_err(raised)?;
        prepare_result(
            py,
            self.layer.take_delivered().expect("a prepared call has its delivery"),
            &place,
        )
    }

    /// Combines the experts' output (`fused_expert_output`, the delivery's shape in the
    /// layer's input dtype) into `output` `[n, hidden]`, written in place (collective).
    #[pyo3(signature = (output, fused_expert_output))]
    fn finalize(
        &mut self,
        py: Python<'_>,
        output: &Bound<'_, PyAny>,
        fused_expert_output: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let place = self.layer.place().clone();
        let call = CallArrays::new(&place);
        let checked = tensor(&call, fused_expert_output, "fused_expert_output")
            .and_then(|expert| Ok((expert, Target::of(&call, output, "output")?)));
        let (expert, mut target) = or_refused(checked, |f| drop(self.layer.refused_finalize(f)))?;
        let layer = &mut self.layer;
        let out = SendMut(target.tensor());
        py.detach(move || layer.finalize(Some(expert), out.0)).map_err(raised)?;
        target.finish()
    }

    /// Abandons the prepared call, or the coming one, for `reason`: every peer's same call
    /// fails promptly naming this rank.
    fn abandon(&mut self, reason: &str) -> PyResult<()> {
        self.layer.abandon(reason).map_err(raised)
    }

    /// Seconds per call of `calls` prepare/finalize pairs on these arrays driven from Rust,
    /// as an engine in Rust would drive this layer (the inputs taken into tensors each call, as
    /// `prepare` takes them): the package's benchmark compares it with the same calls made from
    /// Python. Collective: every rank passes the same `calls`.
    #[pyo3(signature = (a1, topk_weights, topk_ids, fused_expert_output, output, calls))]
    #[allow(clippy::too_many_arguments)]
    fn _rust_seconds_per_call(
        &mut self,
        py: Python<'_>,
        a1: &Bound<'_, PyAny>,
        topk_weights: &Bound<'_, PyAny>,
        topk_ids: &Bound<'_, PyAny>,
        fused_expert_output: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
        calls: usize,
    ) -> PyResult<f64> {
        let place = self.layer.place().clone();
        let call = CallArrays::new(&place);
        let given = inputs(&call, ("a1", a1), topk_ids, topk_weights)?;
        let expert = tensor(&call, fused_expert_output, "fused_expert_output")?;
        let mut target = Target::of(&call, output, "output")?;
        let layer = &mut self.layer;
        let out = SendMut(target.tensor());
        let seconds = py
            .detach(move || {
                let out = out.0;
                let start = std::time::Instant::now();
                for _ in 0..calls {
                    layer.prepare(Inputs {
                        tokens: given.tokens.clone(),
                        topk_ids: given.topk_ids.clone(),
                        topk_weights: given.topk_weights.clone(),
                    })?;
                    layer.finalize(Some(expert.clone()), out)?;
                }
                Ok(start.elapsed().as_secs_f64() / calls.max(1) as f64)
            })
            .map_err(raised)?;
        target.finish()?;
        Ok(seconds)
    }

    /// Waits for the work this layer enqueued on a GPU rank's stream and raises what its
    /// kernels recorded meanwhile (otherwise the next call raises it).
    fn wait(&mut self, py: Python<'_>) -> PyResult<()> {
        let layer = &mut self.layer;
        py.detach(|| layer.wait()).map_err(raised)
    }

    /// "standard" or "batched_experts" (vLLM's `FusedMoEActivationFormat` values).
    #[getter]
    fn activation_format(&self) -> &'static str {
        format_name(self.layer.config().activation_format)
    }

    fn output_is_reduced(&self) -> bool {
        self.layer.info().output_is_reduced != 0
    }

    fn max_num_tokens_per_rank(&self) -> u64 {
        self.layer.info().max_tokens_per_rank
    }

    fn num_dispatchers(&self) -> u64 {
        self.layer.info().num_dispatchers
    }

    /// The dtype top-k ids must have ("int32").
    fn topk_indices_dtype(&self) -> &'static str {
        "int32"
    }
}

fn format_name(format: ActivationFormat) -> &'static str {
    match format {
        ActivationFormat::Standard => "standard",
        ActivationFormat::BatchedExperts => "batched_experts",
    }
}

/// Experts behind a Python callable: `experts(a1q, a1q_scale, expert_tokens_meta, topk_ids,
/// topk_weights)` returns the experts' output array.
#[derive(Debug)]
struct PythonExperts {
    apply: Py<PyAny>,
    format: ActivationFormat,
    place: Place,
}

impl Experts for PythonExperts {
    fn activation_format(&self) -> ActivationFormat {
        self.format
    }

    fn apply(&self, dispatched: &Dispatched, _ownership: &ExpertOwnership, out: &mut Tensor) -> moe_a2a::Result<()> {
        Python::attach(|py| {
            let failed = |e: PyErr| MoeError::InvalidInput {
                op: "experts",
                detail: format!("the experts callable raised: {e}"),
            };
            let args = prepare_result(py, dispatched.clone(), &self.place).map_err(failed)?;
            let result = self.apply.bind(py).call1(args).map_err(failed)?;
            let computed = tensor(&CallArrays::new(&self.place), &result, "the experts' output").map_err(failed)?;
            let described = format!(
                "the experts callable's output ({} {:?})",
                dtype_name(computed.dtype()),
                computed.shape()
            );
            self.place
                .copy(&computed, out, &described)
                .map_err(|f| MoeError::InvalidInput {
                    op: "experts",
                    detail: f.message,
                })
        })
    }
}

/// The whole layer on one rank: prepare, the experts (a Python callable), finalize, the SP
/// split and gather, and the TP all-reduce exactly when the backend's output is not reduced.
#[pyclass(module = "moe_a2a._native", unsendable)]
#[derive(Debug)]
struct MoeLayer {
    runner: MoeRunner,
}

#[pymethods]
impl MoeLayer {
    /// Builds backend `backend` for the layer `spec` describes with `experts`, a callable
    /// taking `prepare`'s five results and returning the experts' output (collective).
    #[new]
    fn new(py: Python<'_>, world: &World, backend: &str, spec: Spec, experts: Py<PyAny>) -> PyResult<Self> {
        let layer = spec.layer()?;
        let place = world.inner.place().clone();
        let experts = Arc::new(PythonExperts {
            apply: experts,
            format: layer.activation_format,
            place: place.clone(),
        });
        let world = world.inner.clone();
        let runner = py
            .detach(|| MoeRunner::new(&world, backend, layer, experts))
            .map_err(moe)?;
        Ok(MoeLayer { runner })
    }

    /// Waits for the work the layer enqueued on a GPU rank's stream and raises what its
    /// kernels recorded meanwhile (otherwise the next call raises it).
    fn wait(&mut self, py: Python<'_>) -> PyResult<()> {
        let runner = &mut self.runner;
        py.detach(|| runner.wait()).map_err(raised)
    }

    /// Runs the layer on this rank's tokens into `out` `[n, hidden]`, written in place
    /// (collective).
    fn forward(
        &mut self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        topk_ids: &Bound<'_, PyAny>,
        topk_weights: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let place = self.runner.place().clone();
        let call = CallArrays::new(&place);
        let checked = Target::of(&call, out, "out")
            .and_then(|target| Ok((inputs(&call, ("tokens", tokens), topk_ids, topk_weights)?, target)));
        let (inputs, mut target) = or_refused(checked, |f| drop(self.runner.refused(f)))?;
        let runner = &mut self.runner;
        let out = SendMut(target.tensor());
        py.detach(move || runner.forward(&inputs, out.0)).map_err(raised)?;
        target.finish()
    }
}

/// The names of the backends linked into this package, sorted.
#[pyfunction]
fn backends() -> Vec<&'static str> {
    moe_a2a::registry().names()
}

/// The capability matrix of the linked backends, a Markdown table (README.md's).
#[pyfunction]
fn capability_matrix() -> String {
    moe_a2a::registry().render_matrix()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(backends, m)?)?;
    m.add_function(wrap_pyfunction!(capability_matrix, m)?)?;
    m.add_class::<World>()?;
    m.add_class::<PrepareFinalize>()?;
    m.add_class::<MoeLayer>()?;
    m.add_class::<Array>()?;
    let py = m.py();
    m.add("MoeA2aError", py.get_type::<MoeA2aError>())?;
    m.add("InvalidArgumentError", py.get_type::<InvalidArgumentError>())?;
    m.add("UnsupportedError", py.get_type::<UnsupportedError>())?;
    m.add("CallTimeoutError", py.get_type::<CallTimeoutError>())?;
    m.add("PeerFailedError", py.get_type::<PeerFailedError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    Ok(())
}
