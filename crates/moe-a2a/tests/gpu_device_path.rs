//! The device-resident path on two GPUs, for every backend that delivers device tensors, each
//! rank on a stream the caller created: `MoeLayer::forward` on device tensors (the backend's
//! `prepare`, the CUDA reference experts writing into the backend's `Prepared::expert_output`
//! or the runner's own tensor, `finalize` into a device `out`, and the TP all-reduce on the GPU
//! where the backend's output is not reduced), every call enqueued while the callers' streams
//! are held shut by a gate the host opens only after every call returned. A call that
//! synchronized with its stream would still be waiting when the gate's watchdog opens it, and
//! the trial fails saying so. Each rank counts what its `forward` allocates on its thread: no
//! driver allocation (device memory, mapped host memory) in any call, the first included
//! (BatchedExperts, where the runner allocates the experts' output on its first call, runs that
//! call before the gate shuts and counts the others), and a few small heap objects (the tensor
//! handles), never a buffer the size of the tokens. The outputs are then bit-identical to the
//! host platform with the host reference experts.
//! allgather-rs also runs without EP (DP over both ranks, and TP, where each rank's dispatch
//! group is itself) and with fewer tokens in later calls than in the first, so rows an earlier
//! call filled must turn back into padding.
//! nvlink-one-sided also runs the BatchedExperts format, whose expert-major delivery and
//! reduction run on the GPU.
//! `MoeLayer::forward` on device tensors captured once in a CUDA graph (after one eager call)
//! and replayed with new inputs in the same buffers gives the host platform's bits each time.
//! A bad id in a device input is found on the GPU and reported by `wait` (and, on the
//! peer-memory backends, fails the peers' same call). allgather-rs refuses
//! ranks that share a GPU (NCCL needs one per rank) at construction, on every rank. Without two
//! GPUs each trial is reported as ignored with the reason; `MOE_REQUIRE_GPU=1` makes that a
//! failure. With `MOE_SHARE_GPUS=1` the nvlink backends' trials run both ranks on one GPU when
//! there is only one.

use libtest_mimic::{Arguments, Failed, Trial};
use moe_core::harness::{Cell, Routing, SHAPES, Shape};
use moe_core::quant::QuantScheme;
use moe_core::{ActivationFormat, InputDtype, ParallelConfig, QuantConfig, ScaleLayout};
use moe_kernels::probe::trial_label;

const RANKS: usize = 2;

/// The backends whose GPU implementation takes device tensors.
const BACKENDS: [&str; 3] = [
    backend_nvlink_one_sided::NAME,
    backend_nvlink_two_sided::NAME,
    backend_allgather_rs::NAME,
];

/// A cell of `backend`: EP over both ranks, `scheme` with the matrix's nvfp4 global scale,
/// shape `SHAPES[shape]`.
fn base(backend: &str, scheme: QuantScheme, shape: usize, routing: Routing) -> Cell {
    let mut quant = QuantConfig::new(scheme);
    quant.params.nvfp4_global_scale = 448.0 * 6.0 / 100.0;
    Cell {
        quant,
        parallel: ParallelConfig::ep(RANKS),
        shape: SHAPES[shape],
        routing,
        ..Cell::new(backend)
    }
    .reseeded()
}

fn cells(backend: &str) -> Vec<Cell> {
    if backend == backend_allgather_rs::NAME {
        return allgather_cells();
    }
    let base = |scheme: QuantScheme, shape: usize, routing: Routing| base(backend, scheme, shape, routing);
    let mut v = vec![
        base(QuantScheme::Bf16, 2, Routing::Uniform),
        base(QuantScheme::Fp8Block128, 2, Routing::Skewed),
        base(QuantScheme::Nvfp4, 2, Routing::EmptyFirstReplica),
        Cell {
            quant: QuantConfig::new(QuantScheme::Nvfp4).with_scale_layout(ScaleLayout::Swizzled128x4),
            ..base(QuantScheme::Bf16, 1, Routing::AllOnOneRank)
        },
        Cell {
            input_dtype: InputDtype::F16,
            quant: QuantConfig::new(QuantScheme::Fp16),
            ..base(QuantScheme::Bf16, 1, Routing::Uniform)
        },
    ];
    if backend == backend_nvlink_one_sided::NAME {
        // BatchedExperts: the expert-major delivery and the reduction before combine, on the
        // GPU; the engine brings the experts' output tensor.
        let batched = |cell: Cell| Cell {
            format: ActivationFormat::BatchedExperts,
            ..cell
        };
        v.extend([
            batched(base(QuantScheme::Bf16, 2, Routing::Uniform)),
            batched(base(QuantScheme::Fp8Block128, 2, Routing::Skewed)),
            batched(Cell {
                quant: QuantConfig::new(QuantScheme::Nvfp4).with_scale_layout(ScaleLayout::Swizzled128x4),
                ..base(QuantScheme::Bf16, 2, Routing::EmptyFirstReplica)
            }),
        ]);
    }
    v
}

/// allgather-rs's cells: EP (foreign ids masked on the GPU) with bf16 and with nvfp4 and
/// swizzled scales, DP without EP (no masking), and TP (a dispatch group of one rank, output
/// not reduced), each filling every row of the first call (see [`tokens_in_call`]).
fn allgather_cells() -> Vec<Cell> {
    let backend = backend_allgather_rs::NAME;
    let full = |shape: usize| Shape {
        tokens: SHAPES[shape].max_tokens_per_rank,
        ..SHAPES[shape]
    };
    let no_ep = |tp: usize, dp: usize| ParallelConfig {
        tp,
        dp,
        ep: false,
        sp: false,
    };
    let nvfp4 = base(backend, QuantScheme::Nvfp4, 2, Routing::Skewed);
    vec![
        Cell {
            shape: full(2),
            ..base(backend, QuantScheme::Bf16, 2, Routing::Uniform)
        },
        Cell {
            quant: nvfp4.quant.with_scale_layout(ScaleLayout::Swizzled128x4),
            shape: full(2),
            ..nvfp4
        },
        Cell {
            shape: full(2),
            ..base(backend, QuantScheme::Nvfp4, 2, Routing::EmptyFirstReplica)
        },
        Cell {
            parallel: no_ep(1, RANKS),
            shape: full(1),
            ..base(backend, QuantScheme::Fp8Block128, 1, Routing::Uniform)
        },
        Cell {
            input_dtype: InputDtype::F16,
            quant: QuantConfig::new(QuantScheme::Fp16),
            parallel: no_ep(RANKS, 1),
            shape: full(2),
            ..base(backend, QuantScheme::Bf16, 2, Routing::Uniform)
        },
    ]
    .into_iter()
    .map(Cell::reseeded)
    .collect()
}

fn main() {
    let mut args = Arguments::from_args();
    // One trial at a time: trials share the GPUs (see moe_kernels::buffer).
    args.test_threads.get_or_insert(1);
    // A backend that needs a GPU per rank (NCCL) needs RANKS GPUs; the peer-memory protocols
    // also run with ranks sharing one (MOE_SHARE_GPUS=1).
    let skip_of = |backend: &str| {
        let gpu_per_rank = moe_a2a::registry()
            .get(backend)
            .is_ok_and(|r| r.capabilities.gpu_per_rank);
        if gpu_per_rank {
            moe_kernels::probe::gpu_skip_reason(RANKS)
        } else {
            moe_kernels::probe::ranks_skip_reason(RANKS)
        }
    };
    let trial = |name: String, skip: Option<String>, test: Box<dyn FnOnce() -> Result<(), Failed> + Send>| {
        Trial::test(trial_label(name, skip.as_deref()), test).with_ignored_flag(skip.is_some())
    };
    let mut trials: Vec<Trial> = BACKENDS
        .iter()
        .flat_map(|b| cells(b))
        .map(|c| {
            let name = c.trial_name("device_path_enqueues_only_and_matches_host");
            let skip = skip_of(&c.backend);
            trial(name, skip, Box::new(move || cases::matches_host(&c)))
        })
        .collect();
    for backend in BACKENDS {
        trials.push(trial(
            format!("a_bad_device_id_is_reported_by_wait {backend}"),
            skip_of(backend),
            Box::new(move || cases::bad_id(backend)),
        ));
    }
    for backend in BACKENDS {
        trials.push(trial(
            format!("forward_captured_in_a_cuda_graph_replays_with_the_hosts_bits {backend}"),
            skip_of(backend),
            Box::new(move || cases::graph_replay(backend)),
        ));
    }
    trials.push(trial(
        "the_runner_reduces_a_tp_output_exactly_once_on_the_gpu".to_string(),
        moe_kernels::probe::gpu_skip_reason(RANKS),
        Box::new(cases::reduces_exactly_once),
    ));
    trials.push(trial(
        "allgather_rs_refuses_ranks_sharing_a_gpu".to_string(),
        moe_kernels::probe::gpu_skip_reason(1),
        Box::new(cases::allgather_rs_refuses_ranks_sharing_a_gpu),
    ));
    libtest_mimic::run(&args, trials).exit();
}

#[cfg(not(feature = "cuda"))]
mod cases {
    use super::*;

    pub fn matches_host(_: &Cell) -> Result<(), Failed> {
        Err(missing())
    }

    pub fn bad_id(_: &str) -> Result<(), Failed> {
        Err(missing())
    }

    pub fn graph_replay(_: &str) -> Result<(), Failed> {
        Err(missing())
    }

    pub fn allgather_rs_refuses_ranks_sharing_a_gpu() -> Result<(), Failed> {
        Err(missing())
    }

    pub fn reduces_exactly_once() -> Result<(), Failed> {
        Err(missing())
    }

    fn missing() -> Failed {
        "built without the `cuda` feature (cargo test --features cuda)".into()
    }
}

#[cfg(feature = "cuda")]
mod cases {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use moe_core::experts::{DiagonalExperts, ReferenceExperts};
    use moe_core::harness::{Alteration, Altered};
    use moe_core::harness::{ReplicaInputs, make_inputs, run_on_host};
    use moe_core::host::{HostRank, HostWorldConfig, run_host_world};
    use moe_core::runner::MoeLayer;
    use moe_core::{CudaRank, LayerConfig, MoeError, PrepareFinalize, RankContext, Registry, Result, Tensor};
    use moe_kernels::buffer::DeviceBuffer;
    use moe_kernels::buffer::HostMappedWord;
    use moe_kernels::cudarc::driver::{CudaContext, result, sys};
    use moe_kernels::device::CudaDevice;
    use moe_kernels::driver::driver_allocations_on_this_thread;
    use moe_kernels::experts::CudaDiagonalExperts;
    use moe_kernels::tensor::{device_tensor, upload_tensor};
    use moe_kernels::world::{CudaWorld, CudaWorldRank};

    use super::*;

    /// Calls per trial.
    const CALLS: u64 = 3;

    /// How many of its replica's tokens each call passes: all of them for most cells; for
    /// allgather-rs (whose cells have `max_tokens_per_rank` tokens) every row in call 0, a quarter
    /// in call 1 (the rows call 0 filled above it must become padding again) and three quarters in
    /// call 2 (more than call 1).
    fn tokens_in_call(c: &Cell, call: u64) -> usize {
        let all = c.shape.tokens;
        if c.backend != backend_allgather_rs::NAME {
            return all;
        }
        match call {
            0 => all,
            1 => all.div_ceil(4),
            _ => all * 3 / 4,
        }
    }

    /// The inputs of `calls` calls of `c`, each replica cut to [`tokens_in_call`] tokens.
    fn inputs(c: &Cell, layer: &LayerConfig, calls: u64) -> Vec<Vec<ReplicaInputs>> {
        (0..calls)
            .map(|call| {
                let keep = tokens_in_call(c, call);
                make_inputs(c, layer, call)
                    .into_iter()
                    .map(|r| {
                        let n = keep.min(r.tokens.shape()[0]);
                        ReplicaInputs {
                            tokens: r.tokens.slice_rows(0, n),
                            topk_ids: r.topk_ids.slice_rows(0, n),
                            topk_weights: r.topk_weights.slice_rows(0, n),
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn fail(e: impl std::fmt::Display) -> Failed {
        e.to_string().into()
    }

    /// The function of cell `c`'s experts, which the CUDA reference experts compute when it is
    /// diagonal.
    fn diagonal_function(c: &Cell) -> std::result::Result<DiagonalExperts, Failed> {
        c.diagonal_experts()
            .ok_or_else(|| fail("the CUDA reference experts are diagonal: use a diagonal shape"))
    }

    /// Host rank `host`'s rank of `world`: its GPU, its context for the registry, and the CUDA
    /// reference experts of `function` for `layer` on it.
    fn gpu_rank(
        world: &Arc<CudaWorld>,
        host: &HostRank,
        layer: &LayerConfig,
        function: &DiagonalExperts,
    ) -> Result<(Arc<CudaDevice>, RankContext, Arc<CudaDiagonalExperts>)> {
        let r = host.rank();
        let device = CudaWorldRank::new(world.clone(), r).map_err(|e| MoeError::Device(e.to_string()))?;
        let gpu = device.gpu().clone();
        let experts = Arc::new(CudaDiagonalExperts::for_layer(&gpu, function, layer, r)?);
        Ok((
            gpu,
            RankContext::Cuda(CudaRank::new(host.clone(), Arc::new(device))),
            experts,
        ))
    }

    /// How long the gate stays shut at most: far longer than enqueuing a call takes.
    const WATCHDOG: Duration = Duration::from_secs(20);

    /// Streams the test creates, as an engine would, and destroys at the end. The primary
    /// contexts are held too: releasing a device's last reference destroys its streams.
    struct CallerStreams {
        contexts: Vec<Arc<CudaContext>>,
        streams: Vec<sys::CUstream>,
    }

    impl CallerStreams {
        fn new(ranks: usize) -> std::result::Result<Self, Failed> {
            let mut this = CallerStreams {
                contexts: Vec::new(),
                streams: Vec::new(),
            };
            for o in moe_kernels::probe::rank_devices(ranks)? {
                let ctx = CudaContext::new(o).map_err(fail)?;
                ctx.bind_to_thread().map_err(fail)?;
                this.streams
                    .push(result::stream::create(result::stream::StreamKind::NonBlocking).map_err(fail)?);
                this.contexts.push(ctx);
            }
            Ok(this)
        }
    }

    impl Drop for CallerStreams {
        fn drop(&mut self) {
            for (ctx, &s) in self.contexts.iter().zip(&self.streams) {
                let _ = ctx.bind_to_thread();
                // SAFETY: the stream was created above and everything that used it (the world,
                // the backends) was dropped before this value.
                let _ = unsafe { result::stream::synchronize(s).and_then(|()| result::stream::destroy(s)) };
            }
        }
    }

    /// Holds `stream` until `gate` becomes nonzero.
    fn shut(stream: sys::CUstream, gate: &HostMappedWord) -> Result<()> {
        // SAFETY: `stream` is a live stream of the current device; `gate` is mapped into every
        // device and outlives the wait (the test opens it before dropping it).
        unsafe {
            sys::cuStreamWaitValue32_v2(
                stream,
                gate.device_ptr(),
                1,
                sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
            )
        }
        .result()
        .map_err(|e| MoeError::Device(format!("cuStreamWaitValue32: {e}")))
    }

    /// What one step of a call allocated on the rank's thread.
    #[derive(Clone, Copy, Debug)]
    struct StepAllocations {
        /// Device memory or mapped host memory, through the CUDA driver.
        driver: u64,
        heap_count: u64,
        heap_bytes: u64,
    }

    /// The most heap bytes one `forward` may allocate: room for the handles of the tensors
    /// `prepare` returns, far less than one token of the deepseek-v3 cells (14 KiB).
    const HEAP_BYTES_PER_CALL: u64 = 16 << 10;

    /// Runs `step`, counting what it allocates on this thread.
    fn counted<T>(step: impl FnOnce() -> T) -> (T, StepAllocations) {
        let driver = driver_allocations_on_this_thread();
        let mut out = None;
        let heap = allocation_counter::measure(|| out = Some(step()));
        let allocations = StepAllocations {
            driver: driver_allocations_on_this_thread() - driver,
            heap_count: heap.count_total,
            heap_bytes: heap.bytes_total,
        };
        (out.expect("the measured step ran"), allocations)
    }

    /// One rank's outputs of every call and what each gated call's `forward` allocated.
    type RankRun = (Vec<Tensor>, Vec<StepAllocations>);

    /// Each rank's run (or error), and whether the watchdog had to open the gate.
    type GatedRun = (Vec<Result<RankRun>>, bool);

    struct DeviceCall {
        tokens: Tensor,
        ids: Tensor,
        weights: Tensor,
        out: Tensor,
    }

    /// Runs `calls` on the GPUs through the registry, everything enqueued behind a shut gate.
    fn run_gated(
        layer: &LayerConfig,
        cell: &Cell,
        calls: &[Vec<ReplicaInputs>],
        streams: &CallerStreams,
    ) -> std::result::Result<GatedRun, Failed> {
        // SAFETY: the streams outlive the world (declared by the caller before it, dropped after).
        let world = Arc::new(unsafe { CudaWorld::with_streams(&streams.streams) }.map_err(fail)?);
        let gate = HostMappedWord::new(world.gpu(0).map_err(fail)?).map_err(fail)?;
        let watchdog_fired = AtomicBool::new(false);
        let all_returned = AtomicBool::new(false);
        let function = diagonal_function(cell)?;
        let results = std::thread::scope(|s| {
            s.spawn(|| {
                let start = std::time::Instant::now();
                while !all_returned.load(Ordering::Acquire) && start.elapsed() < WATCHDOG {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if gate.read() == 0 {
                    watchdog_fired.store(!all_returned.load(Ordering::Acquire), Ordering::Release);
                    gate.write(1);
                }
            });
            let mut config = HostWorldConfig::new(RANKS);
            config.timeout = WATCHDOG * 2;
            let results = run_host_world(config, |host| {
                let r = host.rank();
                let group: Vec<usize> = (0..RANKS).collect();
                let (gpu, ctx, experts) = gpu_rank(&world, &host, layer, &function)?;
                let mut moe = MoeLayer::new(
                    Registry::global(),
                    cell.backend.as_str(),
                    layer.clone(),
                    experts.clone(),
                    ctx,
                )?;
                let dtype = layer.moe.input_dtype.dtype();
                let mut staged = Vec::new();
                for call in calls {
                    let inp = &call[layer.parallel.dp_rank(r)];
                    let mut poisoned = Tensor::zeros(dtype, inp.tokens.shape());
                    poisoned.poison();
                    staged.push(DeviceCall {
                        tokens: upload_tensor(&gpu, &inp.tokens)?,
                        ids: upload_tensor(&gpu, &inp.topk_ids)?,
                        weights: upload_tensor(&gpu, &inp.topk_weights)?,
                        out: upload_tensor(&gpu, &poisoned)?,
                    });
                }
                // The runner allocates the experts' output of a BatchedExperts layer on its first
                // call, which waits for the stream once: run that call before the gate shuts.
                let ungated = usize::from(layer.activation_format == ActivationFormat::BatchedExperts);
                for call in &mut staged[..ungated] {
                    moe.forward(&call.tokens, &call.ids, &call.weights, &mut call.out)?;
                }
                host.barrier(&group, "inputs staged")?;
                shut(gpu.stream().cu_stream(), &gate)?;
                let mut allocations = Vec::new();
                for call in &mut staged[ungated..] {
                    let (done, counts) = counted(|| moe.forward(&call.tokens, &call.ids, &call.weights, &mut call.out));
                    done?;
                    allocations.push(counts);
                }
                // The gate must really hold the stream, or the trial proves nothing.
                // SAFETY: a query on the live stream of this rank's GPU.
                let held = unsafe { sys::cuStreamQuery(gpu.stream().cu_stream()) };
                if held != sys::CUresult::CUDA_ERROR_NOT_READY && gate.read() == 0 {
                    return Err(MoeError::Device(format!(
                        "the gate did not hold rank {r}'s stream (cuStreamQuery: {held:?})"
                    )));
                }
                host.barrier(&group, "every call enqueued")?;
                if r == 0 {
                    all_returned.store(gate.read() == 0, Ordering::Release);
                    gate.write(1);
                }
                moe.wait()?;
                experts.check()?;
                let outs: Vec<Tensor> = staged.iter().map(|c| c.out.to_host()).collect::<Result<_>>()?;
                Ok((outs, allocations))
            });
            all_returned.store(true, Ordering::Release);
            results
        });
        Ok((results, watchdog_fired.load(Ordering::Acquire)))
    }

    pub fn matches_host(c: &Cell) -> std::result::Result<(), Failed> {
        let layer = c.layer().map_err(fail)?;
        let calls = inputs(c, &layer, CALLS);
        let experts = Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant));
        let host = run_on_host(Registry::global(), c, &layer, &experts, &calls);
        let streams = CallerStreams::new(RANKS)?;
        let (gpu, watchdog_fired) = run_gated(&layer, c, &calls, &streams)?;
        if watchdog_fired {
            return Err(fail(format!(
                "prepare / experts / finalize on device tensors waited for the stream: the gate was still shut {WATCHDOG:?} later"
            )));
        }
        for (r, (g, h)) in gpu.into_iter().zip(host).enumerate() {
            let (g, allocations) = g.map_err(|e| fail(format!("GPU rank {r}: {e}")))?;
            let h = h.map_err(|e| fail(format!("host rank {r}: {e}")))?;
            check_allocations(r, &allocations)?;
            for (call, (gpu_out, host_out)) in g.iter().zip(&h).enumerate() {
                if let Some(i) = gpu_out.bytes().iter().zip(host_out.bytes()).position(|(a, b)| a != b) {
                    return Err(fail(format!(
                        "call {call} rank {r}: output byte {i} differs (GPU 0x{:02x}, host 0x{:02x})",
                        gpu_out.bytes()[i],
                        host_out.bytes()[i]
                    )));
                }
            }
        }
        Ok(())
    }

    /// No driver allocation in any gated call, and at most [`HEAP_BYTES_PER_CALL`] heap bytes;
    /// prints the heap use of the last call for the run's record.
    fn check_allocations(rank: usize, calls: &[StepAllocations]) -> std::result::Result<(), Failed> {
        for (call, a) in calls.iter().enumerate() {
            if a.driver != 0 || a.heap_bytes > HEAP_BYTES_PER_CALL {
                return Err(fail(format!(
                    "gated call {call} rank {rank}: forward made {} driver allocations and {} heap allocations of {} bytes (allowed: none, and at most {HEAP_BYTES_PER_CALL} heap bytes)",
                    a.driver, a.heap_count, a.heap_bytes
                )));
            }
        }
        if let Some(a) = calls.last() {
            eprintln!(
                "  rank {rank}: forward {} heap allocations / {} B, 0 driver allocations",
                a.heap_count, a.heap_bytes
            );
        }
        Ok(())
    }

    /// `MoeLayer::forward` on device tensors with TP over both ranks, once as the backend
    /// reports itself and once with its `output_is_reduced` flipped (`Alteration::FlippedReduction`):
    /// allgather-rs without EP (output not reduced: the runner's NCCL all-reduce must run once;
    /// flipped, it is missing) and nvlink-one-sided with EP (reduced: none must run; flipped, it
    /// runs a second time). The honest runs give the host platform's bytes, the flipped ones do
    /// not.
    pub fn reduces_exactly_once() -> std::result::Result<(), Failed> {
        let tp = |ep: bool| ParallelConfig {
            tp: RANKS,
            dp: 1,
            ep,
            sp: false,
        };
        let cases = [
            (allgather_cells()[0].clone(), false),
            (
                base(backend_nvlink_one_sided::NAME, QuantScheme::Bf16, 2, Routing::Uniform),
                true,
            ),
        ];
        for (c, ep) in cases {
            let c = Cell { parallel: tp(ep), ..c }.reseeded();
            let layer = c.layer().map_err(fail)?;
            let calls = inputs(&c, &layer, 1);
            let experts = Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant));
            let host = run_on_host(Registry::global(), &c, &layer, &experts, &calls);
            for flipped in [false, true] {
                let gpu = run_flipped(&c, &layer, &calls[0], flipped)?;
                let same = gpu.iter().zip(&host).all(|(g, h)| match (g, h) {
                    (Ok(g), Ok(h)) => g.bytes() == h[0].bytes(),
                    _ => false,
                });
                if let Some((r, Err(e))) = gpu.iter().enumerate().find(|(_, g)| g.is_err()) {
                    return Err(fail(format!(
                        "{} {} flipped {flipped}: rank {r}: {e}",
                        c.backend, c.parallel
                    )));
                }
                if same == flipped {
                    return Err(fail(format!(
                        "{} {}: with output_is_reduced {}, the runner's output {} the host platform's",
                        c.backend,
                        c.parallel,
                        if flipped { "flipped" } else { "as reported" },
                        if same { "matches" } else { "differs from" }
                    )));
                }
            }
        }
        Ok(())
    }

    /// One call of `c` through `MoeLayer::forward` on device tensors on two GPUs, the backend
    /// wrapped in `FlippedReduction` when `flipped`; every rank's output read back.
    fn run_flipped(
        c: &Cell,
        layer: &LayerConfig,
        call: &[ReplicaInputs],
        flipped: bool,
    ) -> std::result::Result<Vec<Result<Tensor>>, Failed> {
        let world = Arc::new(CudaWorld::new(RANKS).map_err(fail)?);
        let function = diagonal_function(c)?;
        Ok(run_host_world(HostWorldConfig::new(RANKS), |host| {
            let r = host.rank();
            let (gpu, ctx, experts) = gpu_rank(&world, &host, layer, &function)?;
            let backend = Registry::global().construct(c.backend.as_str(), layer, &ctx)?;
            let backend: Box<dyn PrepareFinalize> = if flipped {
                Box::new(Altered {
                    inner: backend,
                    alteration: Alteration::FlippedReduction,
                })
            } else {
                backend
            };
            let mut moe = MoeLayer::with_backend(layer.clone(), backend, experts, ctx)?;
            let inp = &call[layer.parallel.dp_rank(r)];
            let mut out = upload_tensor(&gpu, &Tensor::zeros(inp.tokens.dtype(), inp.tokens.shape()))?;
            moe.forward(
                &upload_tensor(&gpu, &inp.tokens)?,
                &upload_tensor(&gpu, &inp.topk_ids)?,
                &upload_tensor(&gpu, &inp.topk_weights)?,
                &mut out,
            )?;
            moe.wait()?;
            out.to_host()
        }))
    }

    /// Both ranks on GPU 0: allgather-rs refuses at construction on every rank, before any
    /// rank waits for the NCCL id or for NCCL (which would refuse the duplicate GPU itself).
    pub fn allgather_rs_refuses_ranks_sharing_a_gpu() -> std::result::Result<(), Failed> {
        let world = Arc::new(CudaWorld::on_devices(&[0, 0]).map_err(fail)?);
        let layer = cells(backend_allgather_rs::NAME)[0].layer().map_err(fail)?;
        let results = run_host_world(HostWorldConfig::new(RANKS), |host| {
            let device = CudaWorldRank::new(world.clone(), host.rank()).map_err(|e| MoeError::Device(e.to_string()))?;
            let ctx = RankContext::Cuda(CudaRank::new(host.clone(), Arc::new(device)));
            Registry::global()
                .construct(backend_allgather_rs::NAME, &layer, &ctx)
                .map(|_| ())
        });
        for (r, result) in results.into_iter().enumerate() {
            match result {
                Err(e) if e.to_string().contains("ranks 0 and 1 are both on GPU 0") => {}
                other => return Err(fail(format!("rank {r}: expected the refusal, got {other:?}"))),
            }
        }
        Ok(())
    }

    /// Rank 0's token 1 lists one expert twice: its prepare still returns (the host does not
    /// read device ids), and `wait` names the token; the dispatch kernel publishes the call
    /// abandoned, so rank 1's same call fails naming rank 0 (on the peer-memory backends;
    /// allgather-rs, whose NCCL collectives carry no call word yet, completes it).
    pub fn bad_id(backend: &str) -> std::result::Result<(), Failed> {
        let c = cells(backend).remove(0);
        let layer = c.layer().map_err(fail)?;
        let mut calls = inputs(&c, &layer, 1);
        let k = layer.moe.top_k;
        let mut ids = calls[0][0].topk_ids.to_i32();
        ids[k + 1] = ids[k];
        calls[0][0].topk_ids = Tensor::from_i32(&[ids.len() / k, k], &ids);
        let streams = CallerStreams::new(RANKS)?;
        let (gpu, _) = run_gated(&layer, &c, &calls, &streams)?;
        match &gpu[0] {
            Err(MoeError::InvalidInput { detail, .. }) if detail.contains("token 1 ") => {}
            other => return Err(fail(format!("rank 0: expected the bad id of token 1, got {other:?}"))),
        }
        match (&gpu[1], backend == backend_allgather_rs::NAME) {
            (Err(MoeError::PeerAbandoned { peer: 0, .. }), false) | (Ok(_), true) => Ok(()),
            (other, _) => Err(fail(format!(
                "rank 1: expected its call to fail naming rank 0 (or to complete on allgather-rs), got {other:?}"
            ))),
        }
    }

    /// The first cell of `backend` (bf16, Standard) on both ranks: an eager `forward`, then
    /// `forward` captured in a CUDA graph on the rank's stream (every rank captures before any
    /// replays: instantiating allocates), then replays, each after new inputs were copied into
    /// the tensors the graph reads. Every call's output is the host platform's, bit for bit.
    pub fn graph_replay(backend: &str) -> std::result::Result<(), Failed> {
        let c = cells(backend).remove(0);
        let layer = c.layer().map_err(fail)?;
        let calls = inputs(&c, &layer, CALLS + 1);
        let experts = Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant));
        let host = run_on_host(Registry::global(), &c, &layer, &experts, &calls);
        let world = Arc::new(CudaWorld::on_devices(&moe_kernels::probe::rank_devices(RANKS)?).map_err(fail)?);
        let function = diagonal_function(&c)?;
        let gpu_runs = run_host_world(HostWorldConfig::new(RANKS), |host| {
            let r = host.rank();
            let group: Vec<usize> = (0..RANKS).collect();
            let (gpu, ctx, experts) = gpu_rank(&world, &host, &layer, &function)?;
            let mut moe = MoeLayer::new(Registry::global(), backend, layer.clone(), experts.clone(), ctx)?;
            let replica = layer.parallel.dp_rank(r);
            // Every call has the first call's token count: the graph's shapes are fixed. The
            // inputs stay in these buffers, new calls' inputs copied in.
            let first = &calls[0][replica];
            let device_error = |e: moe_kernels::KernelError| MoeError::Device(e.to_string());
            let buffers: Vec<Arc<DeviceBuffer>> = [&first.tokens, &first.topk_ids, &first.topk_weights]
                .into_iter()
                .map(|t| {
                    DeviceBuffer::from_bytes(&gpu, t.bytes())
                        .map(Arc::new)
                        .map_err(device_error)
                })
                .collect::<Result<_>>()?;
            let on = |b: &Arc<DeviceBuffer>, t: &Tensor| device_tensor(b, 0, t.dtype(), t.shape());
            let (tokens, ids, weights) = (
                on(&buffers[0], &first.tokens)?,
                on(&buffers[1], &first.topk_ids)?,
                on(&buffers[2], &first.topk_weights)?,
            );
            let mut out = upload_tensor(&gpu, &Tensor::zeros(first.tokens.dtype(), first.tokens.shape()))?;
            let mut outs = Vec::new();
            moe.forward(&tokens, &ids, &weights, &mut out)?;
            moe.wait()?;
            outs.push(out.to_host()?);
            let graph = gpu.capture_graph(|| moe.forward(&tokens, &ids, &weights, &mut out))?;
            host.barrier(&group, "graphs captured")?;
            for call in &calls[1..] {
                let inp = &call[replica];
                for (buffer, t) in buffers.iter().zip([&inp.tokens, &inp.topk_ids, &inp.topk_weights]) {
                    buffer.upload(0, t.bytes()).map_err(device_error)?;
                }
                graph
                    .launch()
                    .map_err(|e| MoeError::Device(format!("graph launch: {e}")))?;
                moe.wait()?;
                outs.push(out.to_host()?);
            }
            experts.check()?;
            Ok(outs)
        });
        for (r, (g, h)) in gpu_runs.into_iter().zip(host).enumerate() {
            let g = g.map_err(|e| fail(format!("GPU rank {r}: {e}")))?;
            let h = h.map_err(|e| fail(format!("host rank {r}: {e}")))?;
            for (call, (gpu_out, host_out)) in g.iter().zip(&h).enumerate() {
                if let Some(i) = gpu_out.bytes().iter().zip(host_out.bytes()).position(|(a, b)| a != b) {
                    return Err(fail(format!(
                        "call {call} ({}) rank {r}: output byte {i} differs (GPU 0x{:02x}, host 0x{:02x})",
                        if call == 0 { "eager" } else { "graph replay" },
                        gpu_out.bytes()[i],
                        host_out.bytes()[i]
                    )));
                }
            }
        }
        Ok(())
    }
}
