//! The one-sided protocol on two GPUs against the host platform: for the same inputs, each GPU
//! rank receives the same number of tokens from each source, and — with the reference experts
//! run on what the GPU delivered — combines to exactly the bits the host platform produces
//! (same slots' rows, same f32 order), also when dispatch and combine are captured in CUDA
//! graphs and replayed, and when a few small blocks each take many tokens (the batched and
//! grid-stride paths that large calls take on the default grid). The workspace regions handed
//! out in place as the Standard tensors
//! equal the rows read out slot by slot, padding included. Two layers of different layouts
//! constructed through the registry on the same ranks share one workspace, grown to the union
//! when the larger one is constructed, and alternate calls on it with the host platform's bits.
//! A rank that never dispatches makes its peer's dispatch
//! fail with a timeout naming it, instead of hanging. Without two GPUs each trial is reported as
//! ignored with the reason; `MOE_REQUIRE_GPU=1` makes that a failure. With `MOE_SHARE_GPUS=1`
//! both ranks run on one GPU when there is only one (the kernels and the protocol, not the
//! path between GPUs).

use libtest_mimic::{Arguments, Failed, Trial};
use moe_core::harness::{Cell, Routing, SHAPES};
use moe_core::quant::QuantScheme;
use moe_core::{InputDtype, ParallelConfig, QuantConfig, ScaleLayout};

const RANKS: usize = 2;

fn base(scheme: QuantScheme, shape: usize, routing: Routing) -> Cell {
    let mut quant = QuantConfig::new(scheme);
    quant.params.nvfp4_global_scale = 448.0 * 6.0 / 100.0;
    quant.params.fp8_static_scale = 0.05;
    Cell {
        quant,
        parallel: ParallelConfig::ep(RANKS),
        shape: SHAPES[shape],
        routing,
        ..Cell::new(backend_nvlink_one_sided::NAME)
    }
    .reseeded()
}

fn cells() -> Vec<Cell> {
    let mut v = Vec::new();
    for scheme in QuantScheme::ALL {
        if scheme == QuantScheme::Fp16 {
            continue;
        }
        v.push(base(scheme, 2, Routing::Uniform));
    }
    v.push(Cell {
        input_dtype: InputDtype::F16,
        quant: QuantConfig::new(QuantScheme::Fp16),
        ..base(QuantScheme::Bf16, 0, Routing::Uniform)
    });
    v.push(Cell {
        quant: QuantConfig::new(QuantScheme::Nvfp4).with_scale_layout(ScaleLayout::Swizzled128x4),
        ..base(QuantScheme::Bf16, 0, Routing::Uniform)
    });
    let mut full = base(QuantScheme::Bf16, 0, Routing::Skewed);
    full.shape.tokens = full.shape.max_tokens_per_rank;
    v.push(full);
    v.push(base(QuantScheme::Nvfp4, 2, Routing::AllOnOneRank));
    v.push(base(QuantScheme::Fp8Block128, 2, Routing::EmptyFirstReplica));
    v.push(base(QuantScheme::Bf16, 1, Routing::Uniform));
    v
}

fn main() {
    let mut args = Arguments::from_args();
    // One trial at a time: trials share the GPUs, and one trial's spinning kernels must not
    // meet another trial's allocations (see moe_kernels::platform).
    args.test_threads.get_or_insert(1);
    let skip = moe_kernels::probe::ranks_skip_reason(RANKS);
    let label = |name: String| match &skip {
        Some(reason) => format!("{name} [ignored: {reason}]"),
        None => name,
    };
    let mut trials: Vec<Trial> = cells()
        .into_iter()
        .map(|c| {
            let name = label(format!(
                "gpu_matches_host {}",
                c.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
            ));
            Trial::test(name, move || cases::matches_host(&c)).with_ignored_flag(skip.is_some())
        })
        .collect();
    for c in Cell::many_tokens(backend_nvlink_one_sided::NAME, RANKS) {
        let name = label(format!(
            "gpu_matches_host_on_a_small_grid {} {} tokens",
            c.to_string().split_whitespace().collect::<Vec<_>>().join(" "),
            c.shape.tokens
        ));
        trials
            .push(Trial::test(name, move || cases::matches_host_on_a_small_grid(&c)).with_ignored_flag(skip.is_some()));
    }
    for c in [cells().remove(0), cells().remove(4)] {
        let name = label(format!(
            "graph_replay_matches_host {}",
            c.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
        ));
        trials.push(Trial::test(name, move || cases::graph_replay(&c)).with_ignored_flag(skip.is_some()));
    }
    // bf16, and fp8-block128 with a rank that has no tokens (it routes nothing).
    let empty_first = cells().into_iter().filter(|c| c.routing == Routing::EmptyFirstReplica);
    for c in std::iter::once(cells().remove(0)).chain(empty_first) {
        let name = label(format!(
            "traced_calls_stamp_every_phase_in_order_and_match_host {}",
            c.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
        ));
        trials.push(Trial::test(name, move || cases::traced(&c)).with_ignored_flag(skip.is_some()));
    }
    trials.push(
        Trial::test(
            label("layers_of_different_layouts_share_one_growing_workspace".to_string()),
            cases::shared_workspace,
        )
        .with_ignored_flag(skip.is_some()),
    );
    trials.push(Trial::test(
        "matrix_shapes_are_compiled_in_ci",
        matrix_shapes_are_compiled_in_ci,
    ));
    trials.push(
        Trial::test(
            label("a_silent_rank_is_named_in_the_timeout".to_string()),
            cases::timeout,
        )
        .with_ignored_flag(skip.is_some()),
    );
    libtest_mimic::run(&args, trials).exit();
}

/// A kernel specialization the matrix runs on GPUs must be one CI compiles without a GPU, or a
/// kernel that does not compile for it shows only on a GPU host.
fn matrix_shapes_are_compiled_in_ci() -> Result<(), Failed> {
    let compiled = moe_kernels::source::COMPILED_HIDDEN;
    match SHAPES.iter().find(|s| !compiled.contains(&s.hidden)) {
        Some(s) => Err(format!(
            "shape {} has hidden {}, which moe_kernels::source::COMPILED_HIDDEN ({compiled:?}) lacks: add it there",
            s.name, s.hidden
        )
        .into()),
        None => Ok(()),
    }
}

#[cfg(not(feature = "cuda"))]
mod cases {
    use super::*;

    pub fn matches_host(_: &Cell) -> Result<(), Failed> {
        Err(moe_kernels_missing())
    }

    pub fn traced(_: &Cell) -> Result<(), Failed> {
        Err(moe_kernels_missing())
    }

    pub fn graph_replay(_: &Cell) -> Result<(), Failed> {
        Err(moe_kernels_missing())
    }

    pub fn matches_host_on_a_small_grid(_: &Cell) -> Result<(), Failed> {
        Err(moe_kernels_missing())
    }

    pub fn timeout() -> Result<(), Failed> {
        Err(moe_kernels_missing())
    }

    pub fn shared_workspace() -> Result<(), Failed> {
        Err(moe_kernels_missing())
    }

    fn moe_kernels_missing() -> Failed {
        "built without the `cuda` feature (cargo test --features cuda)".into()
    }
}

#[cfg(feature = "cuda")]
mod cases {
    use std::sync::Arc;
    use std::time::Duration;

    use backend_nvlink_one_sided::WorkspaceLayout;
    use backend_nvlink_one_sided::cuda::{GpuOneSided, Phase, gpu_workspace_group};
    use moe_core::experts::{Experts, ReferenceExperts};
    use moe_core::harness::{self, CALLS_PER_CELL, HOST, ReplicaInputs, make_inputs, run_on, run_on_host};
    use moe_core::host::{HostWorldConfig, run_host_world};
    use moe_core::workspace_group::GroupLayout;
    use moe_core::{
        Activations, CudaRank, Dispatched, LayerConfig, MoeError, PrepareFinalize, PrepareInput, RankContext, Registry,
        Tensor,
    };
    use moe_kernels::one_sided::{OneSidedLaunch, TRACE_WORDS, TracePoint};
    use moe_kernels::platform::{CudaRankDevice, CudaWorld, DeviceBuffer, device_tensor, upload_tensor};

    use super::*;

    /// Per call: the output bytes and the tokens received from each source.
    type RankRuns = Result<Vec<(Vec<u8>, Vec<usize>)>, MoeError>;

    fn fail(e: impl std::fmt::Display) -> Failed {
        e.to_string().into()
    }

    /// 3 blocks of 64 threads: far fewer than the cells of `Cell::many_tokens` have tokens.
    const SMALL_GRID: OneSidedLaunch = OneSidedLaunch {
        max_blocks: 3,
        threads_per_block: 64,
    };

    pub fn matches_host(c: &Cell) -> Result<(), Failed> {
        compare_with_host(c, CALLS_PER_CELL, false, None, false)
    }

    pub fn matches_host_on_a_small_grid(c: &Cell) -> Result<(), Failed> {
        compare_with_host(c, CALLS_PER_CELL, false, Some(SMALL_GRID), false)
    }

    /// Calls with the kernels stamping their phases: the outputs still match the host, and
    /// every point is stamped, in the order a call passes them.
    pub fn traced(c: &Cell) -> Result<(), Failed> {
        compare_with_host(c, CALLS_PER_CELL, false, None, true)
    }

    /// Reads a call's trace words and checks they are in call order (a rank without tokens
    /// routes nothing, so its `Routed` stays unstamped).
    fn check_trace(words: &DeviceBuffer, tokens: usize) -> Result<(), MoeError> {
        let mut bytes = [0u8; 8 * TRACE_WORDS];
        words
            .download(0, &mut bytes)
            .map_err(|e| MoeError::Device(e.to_string()))?;
        let word = |p: TracePoint| {
            let at = 8 * p as usize;
            u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
        };
        let points: Vec<TracePoint> = TracePoint::ALL
            .into_iter()
            .filter(|&p| tokens > 0 || p != TracePoint::Routed)
            .collect();
        for pair in points.windows(2) {
            let (a, b) = (word(pair[0]), word(pair[1]));
            if a == 0 || a == u64::MAX || b < a {
                return Err(MoeError::Device(format!(
                    "trace out of order: {:?} at {a}, {:?} at {b}",
                    pair[0], pair[1]
                )));
            }
        }
        Ok(())
    }

    /// Dispatch (with its quantization) and combine each captured once in a CUDA graph and
    /// replayed for three calls with fresh inputs: still bit-identical to the host platform.
    pub fn graph_replay(c: &Cell) -> Result<(), Failed> {
        compare_with_host(c, 3, true, None, false)
    }

    /// `launch`: the kernels' grid, `None` for the world's default (every SM); `trace`: the
    /// kernels stamp their phases, checked after every call (eager calls only).
    fn compare_with_host(
        c: &Cell,
        calls: u64,
        graph: bool,
        launch: Option<OneSidedLaunch>,
        trace: bool,
    ) -> Result<(), Failed> {
        let layer = c.layer().map_err(fail)?;
        let calls: Vec<_> = (0..calls).map(|i| make_inputs(c, &layer, i)).collect();
        let experts = Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant));

        let host = run_on_host(Registry::global(), c, &layer, &experts, &calls);

        let world = CudaWorld::on_devices(&moe_kernels::probe::rank_devices(RANKS)?).map_err(fail)?;
        let launch: OneSidedLaunch = match launch {
            Some(launch) => launch,
            None => world.comm_grid(0).map_err(fail)?.into(),
        };
        let layout = WorkspaceLayout::for_layer(&layer, &layer.dispatch_layout());
        let workspaces = Arc::new(world.symmetric_alloc(layout.bytes()).map_err(fail)?);
        // Every rank allocates and loads its kernels before any rank starts waiting on its
        // peers (see moe_kernels::platform).
        let constructed = std::sync::Barrier::new(RANKS);
        let gpu: Vec<RankRuns> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..RANKS)
                .map(|r| {
                    let (world, workspaces, layer, calls, experts) =
                        (&world, workspaces.clone(), &layer, &calls, &experts);
                    let constructed = &constructed;
                    s.spawn(move || -> Result<_, MoeError> {
                        let built = GpuOneSided::new(layer, world, workspaces, r, Duration::from_secs(5), launch)
                            .and_then(|mut b| {
                                if !graph {
                                    return Ok((b, None));
                                }
                                let first = &calls[0][r];
                                b.upload_inputs(PrepareInput::new(
                                    layer,
                                    layout.max_tokens,
                                    &first.tokens,
                                    &first.topk_ids,
                                    &first.topk_weights,
                                )?)?;
                                let graphs = (b.capture(Phase::Dispatch)?, b.capture(Phase::Combine)?);
                                Ok((b, Some(graphs)))
                            });
                        let words = if trace {
                            Some(
                                DeviceBuffer::zeroed(world.gpu(r), 8 * TRACE_WORDS)
                                    .map_err(|e| MoeError::Device(e.to_string()))?,
                            )
                        } else {
                            None
                        };
                        constructed.wait();
                        let (mut b, graphs) = built?;
                        if let Some(words) = &words {
                            b.set_trace(words.ptr());
                        }
                        let replay = |g: &moe_kernels::cudarc::driver::CudaGraph| {
                            g.launch().map_err(|e| MoeError::Device(format!("graph launch: {e}")))
                        };
                        let ownership = layer.ownership(r);
                        let mut outs = Vec::new();
                        for inputs in calls {
                            let inp = &inputs[r];
                            let input = PrepareInput::new(
                                layer,
                                layout.max_tokens,
                                &inp.tokens,
                                &inp.topk_ids,
                                &inp.topk_weights,
                            )?;
                            if let Some(words) = &words {
                                let reset: Vec<u8> =
                                    TracePoint::reset_words().iter().flat_map(|w| w.to_le_bytes()).collect();
                                words.upload(0, &reset).map_err(|e| MoeError::Device(e.to_string()))?;
                            }
                            let (dispatched, recv) = match &graphs {
                                None => {
                                    let (dispatched, recv) = b.dispatch(input)?;
                                    if layer.activation_format == moe_core::ActivationFormat::Standard {
                                        in_place_views_match(&b.received_tensors()?, &dispatched, layer)?;
                                    }
                                    (dispatched, recv)
                                }
                                Some((dispatch, _)) => {
                                    b.upload_inputs(input)?;
                                    replay(dispatch)?;
                                    b.finish(Phase::Dispatch)?;
                                    b.received()?
                                }
                            };
                            let rows = RANKS * layout.max_tokens;
                            let mut y = Tensor::zeros(c.input_dtype.dtype(), &[rows, layer.moe.hidden]);
                            experts.apply(&dispatched, &ownership, &mut y)?;
                            let mut out = Tensor::zeros(c.input_dtype.dtype(), inp.tokens.shape());
                            out.poison();
                            match &graphs {
                                None => b.combine(&y, &mut out)?,
                                Some((_, combine)) => {
                                    b.upload_expert_output(&y)?;
                                    replay(combine)?;
                                    b.finish(Phase::Combine)?;
                                    b.download_output(&mut out)?;
                                }
                            }
                            if let Some(words) = &words {
                                check_trace(words, inp.tokens.shape()[0])?;
                            }
                            outs.push((out.bytes().to_vec(), recv));
                        }
                        Ok(outs)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });

        let errors: Vec<String> = gpu
            .iter()
            .enumerate()
            .filter_map(|(r, g)| g.as_ref().err().map(|e| format!("GPU rank {r}: {e}")))
            .collect();
        if !errors.is_empty() {
            return Err(fail(errors.join("\n")));
        }
        for (r, (g, h)) in gpu.into_iter().zip(host).enumerate() {
            let g = g.map_err(|e| fail(format!("GPU rank {r}: {e}")))?;
            let h = h.map_err(|e| fail(format!("host rank {r}: {e}")))?;
            for (call, ((gpu_out, recv), host_out)) in g.iter().zip(&h).enumerate() {
                let sent_here: Vec<usize> = calls[call]
                    .iter()
                    .map(|inp| {
                        let plan = moe_core::routing::SendPlan::new(
                            &inp.topk_ids.to_i32(),
                            layer.moe.top_k,
                            &layer.placement(),
                        );
                        plan.counts()[r]
                    })
                    .collect();
                if recv != &sent_here {
                    return Err(fail(format!(
                        "call {call} rank {r}: received {recv:?} tokens per source, sent {sent_here:?}"
                    )));
                }
                if let Some(i) = gpu_out.iter().zip(host_out.bytes()).position(|(a, b)| a != b) {
                    return Err(fail(format!(
                        "call {call} rank {r}: output byte {i} differs (GPU 0x{:02x}, host 0x{:02x})",
                        gpu_out[i],
                        host_out.bytes()[i]
                    )));
                }
            }
        }
        Ok(())
    }

    /// The workspace regions handed out as the Standard tensors (device, in place) against the
    /// rows read out of the same workspace slot by slot: ids and weights equal everywhere, so
    /// slots an earlier, larger call filled read as padding again; activations and scales equal
    /// in every filled row (padding rows' activations are unspecified).
    fn in_place_views_match(views: &Dispatched, rows: &Dispatched, layer: &LayerConfig) -> Result<(), MoeError> {
        let (
            Dispatched::Standard {
                activations: va,
                topk_ids: vi,
                topk_weights: vw,
            },
            Dispatched::Standard {
                activations: ra,
                topk_ids: ri,
                topk_weights: rw,
            },
        ) = (views, rows)
        else {
            return Err(MoeError::Convention("expected two Standard deliveries".into()));
        };
        let mismatch = |what: &str| Err(MoeError::Convention(format!("in-place {what} differ from the slots")));
        let ids = vi.to_host()?;
        if ids.bytes() != ri.bytes() {
            return mismatch("top-k ids");
        }
        if vw.to_host()?.bytes() != rw.bytes() {
            return mismatch("top-k weights");
        }
        let k = ids.shape()[1];
        let filled: Vec<bool> = ids
            .to_i32()
            .chunks_exact(k)
            .map(|r| r.iter().any(|&i| i >= 0))
            .collect();
        let rows_equal = |a: &[u8], b: &[u8], width: usize| {
            width == 0
                || a.chunks_exact(width)
                    .zip(b.chunks_exact(width))
                    .zip(&filled)
                    .all(|((x, y), &f)| !f || x == y)
        };
        let payload = va.data().to_host()?;
        if !rows_equal(payload.bytes(), ra.data().bytes(), ra.data().shape()[1]) {
            return mismatch("payload rows");
        }
        if let (Activations::Scaled { scales: vs, layout, .. }, Activations::Scaled { scales: rs, .. }) = (va, ra) {
            let (v, r) = (vs.to_host()?, rs.clone());
            let (v, r, width) = match layout {
                ScaleLayout::Linear => (v.bytes().to_vec(), r.bytes().to_vec(), r.shape()[1]),
                ScaleLayout::Swizzled128x4 => {
                    let cols = layer.dispatch_layout().wire.scales_per_token;
                    let un = |b: &[u8]| moe_core::quant::swizzle::unswizzle_128x4(b, filled.len(), cols);
                    (un(v.bytes()), un(r.bytes()), cols)
                }
            };
            if !rows_equal(&v, &r, width) {
                return mismatch("scale rows");
            }
        }
        Ok(())
    }

    pub fn timeout() -> Result<(), Failed> {
        let mut c = cells().remove(0);
        c.shape = SHAPES[0];
        let layer = c.layer().map_err(fail)?;
        let inputs = make_inputs(&c, &layer, 0);
        let world = CudaWorld::on_devices(&moe_kernels::probe::rank_devices(RANKS)?).map_err(fail)?;
        let launch: OneSidedLaunch = world.comm_grid(0).map_err(fail)?.into();
        let layout = WorkspaceLayout::for_layer(&layer, &layer.dispatch_layout());
        let workspaces = Arc::new(world.symmetric_alloc(layout.bytes()).map_err(fail)?);
        let mut b =
            GpuOneSided::new(&layer, &world, workspaces, 0, Duration::from_millis(300), launch).map_err(fail)?;
        let inp = &inputs[0];
        let input = PrepareInput::new(&layer, layout.max_tokens, &inp.tokens, &inp.topk_ids, &inp.topk_weights)
            .map_err(fail)?;
        // Rank 1 never dispatches.
        match b.dispatch(input) {
            Err(MoeError::Timeout {
                rank: 0, waited_for, ..
            }) if waited_for == [1] => Ok(()),
            Err(e) => Err(fail(format!("expected a timeout naming rank 1, got: {e}"))),
            Ok(_) => Err(fail("dispatch completed although rank 1 never dispatched")),
        }
    }

    /// The two layers of [`shared_workspace`]: a small bf16 layer, then an nvfp4 layer of three
    /// times the tokens per rank (a layout the first does not cover, whose matrices lie over
    /// the first's at other strides).
    fn shared_cells() -> [Cell; 2] {
        let cell = |scheme: QuantScheme, max_tokens: usize, tokens: usize| {
            let mut c = base(scheme, 0, Routing::Uniform);
            c.shape.max_tokens_per_rank = max_tokens;
            c.shape.tokens = tokens;
            c.reseeded()
        };
        [cell(QuantScheme::Bf16, 16, 5), cell(QuantScheme::Nvfp4, 48, 40)]
    }

    /// Calls per layer in [`shared_workspace`].
    const SHARED_CALLS: u64 = 3;

    /// Whether call `call` of layer `j` runs on device tensors (else host tensors): the two
    /// layers alternate paths, and so does each layer from call to call.
    fn on_device(call: u64, j: usize) -> bool {
        (call as usize + j) % 2 == 1
    }

    /// A device-path call's tensors, allocated before any rank launches (see
    /// moe_kernels::platform).
    struct Staged {
        tokens: Tensor,
        ids: Tensor,
        weights: Tensor,
        out: Tensor,
        expert_output: Tensor,
        expert_output_buffer: Arc<DeviceBuffer>,
    }

    fn stage(device: &CudaRankDevice, layer: &LayerConfig, inp: &ReplicaInputs) -> Result<Staged, MoeError> {
        let gpu = device.gpu();
        let dtype = layer.moe.input_dtype.dtype();
        let rows = RANKS * layer.dispatch_tokens_bound();
        let expert_output_buffer = Arc::new(
            DeviceBuffer::zeroed(gpu, rows * layer.moe.hidden * dtype.size())
                .map_err(|e| MoeError::Device(e.to_string()))?,
        );
        Ok(Staged {
            tokens: upload_tensor(gpu, &inp.tokens)?,
            ids: upload_tensor(gpu, &inp.topk_ids)?,
            weights: upload_tensor(gpu, &inp.topk_weights)?,
            out: upload_tensor(gpu, &Tensor::zeros(dtype, inp.tokens.shape()))?,
            expert_output: device_tensor(&expert_output_buffer, 0, dtype, &[rows, layer.moe.hidden])?,
            expert_output_buffer,
        })
    }

    /// `harness::filled_rows`, sorted: one-sided GPU dispatch numbers slots with atomics.
    fn filled_rows(d: &Dispatched) -> Result<Vec<Vec<u8>>, MoeError> {
        let mut rows = harness::filled_rows(d)?;
        rows.sort();
        Ok(rows)
    }

    /// Whether device tensor `t` lies in `buffer`.
    fn inside(t: &Tensor, buffer: &DeviceBuffer) -> bool {
        t.device_region().is_some_and(|r| {
            r.address() >= buffer.ptr() && r.address() + r.len() as u64 <= buffer.ptr() + buffer.bytes() as u64
        })
    }

    /// One call of layer `b` on host or device tensors: its delivery (on the host) and output.
    fn call(
        b: &mut dyn PrepareFinalize,
        layer: &LayerConfig,
        experts: &ReferenceExperts,
        r: usize,
        inp: &ReplicaInputs,
        staged: Option<&mut Staged>,
        workspace: &DeviceBuffer,
    ) -> Result<(Dispatched, Vec<u8>), MoeError> {
        let dtype = layer.moe.input_dtype.dtype();
        let max = b.max_tokens_per_rank();
        let Some(st) = staged else {
            let prepared = b.prepare(PrepareInput::new(
                layer,
                max,
                &inp.tokens,
                &inp.topk_ids,
                &inp.topk_weights,
            )?)?;
            let Dispatched::Standard { topk_ids, .. } = &prepared.dispatched else {
                return Err(MoeError::Convention("expected a Standard delivery".into()));
            };
            let mut y = Tensor::zeros(dtype, &[topk_ids.shape()[0], layer.moe.hidden]);
            experts.apply(&prepared.dispatched, &layer.ownership(r), &mut y)?;
            let mut out = Tensor::zeros(dtype, inp.tokens.shape());
            b.finalize(prepared.receipt, &y, &mut out)?;
            return Ok((prepared.dispatched, out.bytes().to_vec()));
        };
        let prepared = b.prepare(PrepareInput::new(layer, max, &st.tokens, &st.ids, &st.weights)?)?;
        let in_workspace = match (&prepared.expert_output, &prepared.dispatched) {
            (Some(y), Dispatched::Standard { topk_ids, .. }) => inside(y, workspace) && inside(topk_ids, workspace),
            _ => false,
        };
        if !in_workspace {
            return Err(MoeError::Convention(
                "the in-place tensors are not in the group's workspace".into(),
            ));
        }
        let received = prepared.dispatched.to_host()?;
        let mut y = Tensor::zeros(dtype, &[RANKS * max, layer.moe.hidden]);
        experts.apply(&received, &layer.ownership(r), &mut y)?;
        st.expert_output_buffer
            .upload(0, y.bytes())
            .map_err(|e| MoeError::Device(e.to_string()))?;
        b.finalize(prepared.receipt, &st.expert_output, &mut st.out)?;
        b.wait()?;
        Ok((received, st.out.to_host()?.bytes().to_vec()))
    }

    /// Two layers of different layouts through the registry's constructor on the same GPU
    /// ranks, small first, so the second grows the rank's workspace group: a call prepared
    /// before the growth fails in finalize, a layer of another top_k is refused, both layers
    /// report the union's workspace, which the group holds once per rank with every in-place
    /// tensor in it; then calls alternate between the layers, each on host or device tensors
    /// in turn, and each delivers the rows (padding included) and the output bits of the host
    /// platform.
    pub fn shared_workspace() -> Result<(), Failed> {
        let cells = shared_cells();
        let layers: Vec<LayerConfig> = cells
            .iter()
            .map(|c| c.layer())
            .collect::<Result<_, _>>()
            .map_err(fail)?;
        let own: Vec<WorkspaceLayout> = layers
            .iter()
            .map(|l| WorkspaceLayout::for_layer(l, &l.dispatch_layout()))
            .collect();
        if own[0].covers(&own[1]) {
            return Err(fail("the second layer must need a larger workspace"));
        }
        let union = own[0].union(own[1]);
        let experts: Vec<_> = cells
            .iter()
            .map(|c| Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant)))
            .collect();
        let calls: Vec<Vec<Vec<ReplicaInputs>>> = (0..SHARED_CALLS)
            .map(|i| cells.iter().zip(&layers).map(|(c, l)| make_inputs(c, l, i)).collect())
            .collect();
        let host: Vec<_> = (0..2)
            .map(|j| {
                let calls: Vec<_> = calls.iter().map(|call| call[j].clone()).collect();
                run_on(Registry::global(), HOST, &cells[j], &layers[j], &experts[j], &calls)
            })
            .collect();

        let world = Arc::new(CudaWorld::on_devices(&moe_kernels::probe::rank_devices(RANKS)?).map_err(fail)?);
        let mut other_top_k = cells[0].clone();
        other_top_k.shape.top_k = 1;
        let other_top_k = other_top_k.layer().map_err(fail)?;
        let config = HostWorldConfig {
            ranks: RANKS,
            timeout: Duration::from_secs(60),
        };
        let gpu = run_host_world(config, |rank| {
            let r = rank.rank();
            let ranks: Vec<usize> = (0..RANKS).collect();
            let device = CudaRankDevice {
                world: world.clone(),
                rank: r,
            };
            let ctx = RankContext::Cuda(CudaRank::new(rank.clone(), Arc::new(device.clone())));
            let registry = Registry::global();
            let mut first = registry.construct(backend_nvlink_one_sided::NAME, &layers[0], &ctx)?;
            let inp = &calls[0][0][r];
            let early = first.prepare(PrepareInput::new(
                &layers[0],
                first.max_tokens_per_rank(),
                &inp.tokens,
                &inp.topk_ids,
                &inp.topk_weights,
            )?)?;
            let second = registry.construct(backend_nvlink_one_sided::NAME, &layers[1], &ctx)?;
            let dtype = layers[0].moe.input_dtype.dtype();
            let rows = RANKS * first.max_tokens_per_rank();
            let stale = first.finalize(
                early.receipt,
                &Tensor::zeros(dtype, &[rows, layers[0].moe.hidden]),
                &mut Tensor::zeros(dtype, inp.tokens.shape()),
            );
            match stale {
                Err(MoeError::InvalidInput { op: "finalize", detail }) if detail.contains("rebuilt") => {}
                other => {
                    return Err(MoeError::Convention(format!(
                        "a finalize after the workspace grew gave {other:?}, not the rebuild error"
                    )));
                }
            }
            match registry.construct(backend_nvlink_one_sided::NAME, &other_top_k, &ctx) {
                Err(MoeError::WorkspaceGroupMismatch { field: "top_k", .. }) => {}
                other => {
                    return Err(MoeError::Convention(format!(
                        "a layer of another top_k gave {other:?}, not the group mismatch"
                    )));
                }
            }
            let reported = [first.workspace_bytes(), second.workspace_bytes()];
            let group = gpu_workspace_group(&rank, &device, &ranks);
            let (generation, layout, workspaces) = {
                let g = group.lock().unwrap_or_else(|e| e.into_inner());
                let w = g.current();
                (w.generation, w.layout, w.memory.clone())
            };
            let sizes: Vec<usize> = workspaces.iter().map(|w| w.bytes()).collect();
            if (generation, layout, reported) != (2, union, [union.bytes(); 2]) || sizes != [union.bytes(); RANKS] {
                return Err(MoeError::Convention(format!(
                    "rank {r}: generation {generation}, layout {layout:?}, layers report {reported:?} bytes, buffers {sizes:?}; expected one rebuild to {union:?} ({} bytes)",
                    union.bytes()
                )));
            }
            let mut staged: Vec<Vec<Option<Staged>>> = Vec::new();
            for call in &calls {
                let mut per_layer = Vec::new();
                for (j, inputs) in call.iter().enumerate() {
                    let device_call = on_device(staged.len() as u64, j);
                    per_layer.push(
                        device_call
                            .then(|| stage(&device, &layers[j], &inputs[r]))
                            .transpose()?,
                    );
                }
                staged.push(per_layer);
            }
            rank.barrier(&ranks, "device calls staged")?;
            let mut built = [first, second];
            let mut seen = Vec::new();
            for (call, staged) in calls.iter().zip(staged.iter_mut()) {
                for (j, (inputs, st)) in call.iter().zip(staged.iter_mut()).enumerate() {
                    let b = built[j].as_mut();
                    seen.push(self::call(
                        b,
                        &layers[j],
                        &experts[j],
                        r,
                        &inputs[r],
                        st.as_mut(),
                        &workspaces[r],
                    )?);
                }
            }
            Ok(seen)
        });

        for (r, g) in gpu.into_iter().enumerate() {
            let g = g.map_err(|e| fail(format!("GPU rank {r}: {e}")))?;
            for (i, (received, out)) in g.iter().enumerate() {
                let (call, j) = (i / 2, i % 2);
                let want = &host[j][r].as_ref().map_err(|e| fail(format!("host rank {r}: {e}")))?[call];
                let what = format!(
                    "rank {r} call {call} of layer {j} on {} tensors",
                    if on_device(call as u64, j) { "device" } else { "host" }
                );
                if filled_rows(received).map_err(|e| fail(format!("{what}: {e}")))?
                    != filled_rows(&want.received).map_err(fail)?
                {
                    return Err(fail(format!("{what}: other rows than on the host platform")));
                }
                if let Some(i) = out.iter().zip(want.out.bytes()).position(|(a, b)| a != b) {
                    return Err(fail(format!(
                        "{what}: output byte {i} differs (GPU 0x{:02x}, host 0x{:02x})",
                        out[i],
                        want.out.bytes()[i]
                    )));
                }
            }
        }
        Ok(())
    }
}
