//! The two-sided protocol on two GPUs against the host platform: for the same inputs, each GPU
//! rank receives the same number of tokens from each source, the same rows in the same order
//! (the host's dense layout, bit for bit), and — with the reference experts run on what the GPU
//! delivered — combines to exactly the bits the host platform produces (same rows, same f32
//! order), also when dispatch and combine are captured in CUDA graphs and replayed, and when a
//! few blocks each take many tokens (the grid-stride paths large calls take). Three layers of
//! different layouts constructed through the registry on the same ranks share one workspace,
//! grown to the union when the larger one is constructed, and alternate calls on it with the
//! host platform's rows and bits. A rank that never dispatches makes its peer's dispatch fail
//! with a timeout naming it, instead of hanging. Without two GPUs each trial is reported as
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
        ..Cell::new(backend_nvlink_two_sided::NAME)
    }
    .reseeded()
}

fn cells() -> Vec<Cell> {
    let mut v = Vec::new();
    // Every wire scheme at the DeepSeek-V3 shape (fp16 needs fp16 inputs: below).
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
    // Every token to one rank at full capacity: that rank's receive region is full.
    let mut full = base(QuantScheme::Bf16, 0, Routing::Skewed);
    full.shape.tokens = full.shape.max_tokens_per_rank;
    v.push(full);
    v.push(base(QuantScheme::Nvfp4, 2, Routing::AllOnOneRank));
    v.push(base(QuantScheme::Fp8Block128, 2, Routing::EmptyFirstReplica));
    v.push(base(QuantScheme::Bf16, 1, Routing::Uniform));
    v
}

fn name_of(test: &str, c: &Cell) -> String {
    format!(
        "{test} {}",
        c.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
    )
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
            Trial::test(label(name_of("gpu_matches_host", &c)), move || cases::matches_host(&c))
                .with_ignored_flag(skip.is_some())
        })
        .collect();
    for c in Cell::many_tokens(backend_nvlink_two_sided::NAME, RANKS) {
        let name = format!(
            "{} {} tokens",
            name_of("gpu_matches_host_on_a_small_grid", &c),
            c.shape.tokens
        );
        trials.push(
            Trial::test(label(name), move || cases::matches_host_on_a_small_grid(&c)).with_ignored_flag(skip.is_some()),
        );
    }
    // bf16 and nvfp4 (the scheme with the most quantization work) at the DeepSeek-V3 shape.
    for c in [cells().remove(0), cells().remove(4)] {
        trials.push(
            Trial::test(label(name_of("graph_replay_matches_host", &c)), move || {
                cases::graph_replay(&c)
            })
            .with_ignored_flag(skip.is_some()),
        );
    }
    trials.push(
        Trial::test(
            label("layers_of_different_layouts_share_one_growing_workspace".to_string()),
            cases::shared_workspace,
        )
        .with_ignored_flag(skip.is_some()),
    );
    trials.push(
        Trial::test(
            label("a_silent_rank_is_named_in_the_timeout".to_string()),
            cases::timeout,
        )
        .with_ignored_flag(skip.is_some()),
    );
    libtest_mimic::run(&args, trials).exit();
}

#[cfg(not(feature = "cuda"))]
mod cases {
    use super::*;

    pub fn matches_host(_: &Cell) -> Result<(), Failed> {
        Err(moe_kernels_missing())
    }

    pub fn matches_host_on_a_small_grid(_: &Cell) -> Result<(), Failed> {
        Err(moe_kernels_missing())
    }

    pub fn graph_replay(_: &Cell) -> Result<(), Failed> {
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

    use backend_nvlink_two_sided::WorkspaceLayout;
    use backend_nvlink_two_sided::cuda::{GpuTwoSided, Phase, gpu_workspace_group};
    use moe_core::experts::{Experts, ReferenceExperts};
    use moe_core::harness::{self, CALLS_PER_CELL, HOST, ReplicaInputs, make_inputs, run_on, run_on_host};
    use moe_core::host::{HostWorldConfig, run_host_world};
    use moe_core::routing::SendPlan;
    use moe_core::slots::{self, ReceivedRows};
    use moe_core::workspace_group::GroupLayout;
    use moe_core::{
        Activations, CudaRank, Dispatched, LayerConfig, MoeError, PrepareFinalize, PrepareInput, RankContext, Registry,
        Tensor,
    };
    use moe_kernels::platform::{CudaRankDevice, CudaWorld, DeviceBuffer, device_tensor, upload_tensor};
    use moe_kernels::two_sided::TwoSidedLaunch;

    use super::*;

    /// One call on one rank: what it received, the tokens from each source, the output bytes.
    struct CallRun {
        received: Dispatched,
        recv: Vec<usize>,
        out: Vec<u8>,
    }

    type RankRuns = Result<Vec<CallRun>, MoeError>;

    fn fail(e: impl std::fmt::Display) -> Failed {
        e.to_string().into()
    }

    fn prepare_input<'a>(
        layer: &LayerConfig,
        max_tokens: usize,
        inp: &'a ReplicaInputs,
    ) -> Result<PrepareInput<'a>, MoeError> {
        PrepareInput::new(layer, max_tokens, &inp.tokens, &inp.topk_ids, &inp.topk_weights)
    }

    /// What the host platform's `prepare` delivers to rank `r` when source `s` passes
    /// `inputs[s]`, built with moe-core's slot codec: sources in rank order, each one's tokens
    /// to `r` in token order (the slots its SendPlan numbers), then padding rows.
    fn host_received(layer: &LayerConfig, inputs: &[ReplicaInputs], r: usize) -> Result<Dispatched, MoeError> {
        let d = layer.dispatch_layout();
        let layout = WorkspaceLayout::for_layer(layer, &d);
        let (placement, k, image) = (layer.placement(), d.top_k, d.ids_offset());
        let mut rows = ReceivedRows::new(d, layout.rows());
        let mut slot = vec![0u8; d.slot_bytes()];
        let mut next = 0;
        for inp in inputs {
            let images = slots::encode_tokens(&d, &layer.quant.params, &prepare_input(layer, layout.max_tokens, inp)?)?;
            let (ids, weights) = (inp.topk_ids.to_i32(), inp.topk_weights.to_f32());
            let plan = SendPlan::new(&ids, k, &placement);
            for t in 0..plan.num_tokens() {
                if plan.sends_of(t).any(|(_, target, _)| target == r) {
                    slot[..image].copy_from_slice(&images[t * image..(t + 1) * image]);
                    let (ids, weights) = (&ids[t * k..(t + 1) * k], &weights[t * k..(t + 1) * k]);
                    slots::write_routing(&d, ids, weights, Some((r, &placement)), &mut slot[image..]);
                    rows.fill(next, &slot);
                    next += 1;
                }
            }
        }
        rows.into_standard(layer.quant.received_scale_layout(layer.moe.input_dtype))
    }

    pub fn matches_host(c: &Cell) -> Result<(), Failed> {
        compare_with_host(c, CALLS_PER_CELL, false, None)
    }

    /// 3 blocks: far fewer than the cells of `Cell::many_tokens` have tokens.
    pub fn matches_host_on_a_small_grid(c: &Cell) -> Result<(), Failed> {
        compare_with_host(c, CALLS_PER_CELL, false, Some(TwoSidedLaunch { max_blocks: 3 }))
    }

    /// Dispatch (with its quantization) and combine each captured once in a CUDA graph and
    /// replayed for three calls with fresh inputs: still bit-identical to the host platform.
    pub fn graph_replay(c: &Cell) -> Result<(), Failed> {
        compare_with_host(c, 3, true, None)
    }

    /// `launch`: the kernels' grid, `None` for the world's default (every SM).
    fn compare_with_host(c: &Cell, calls: u64, graph: bool, launch: Option<TwoSidedLaunch>) -> Result<(), Failed> {
        let layer = c.layer().map_err(fail)?;
        let calls: Vec<_> = (0..calls).map(|i| make_inputs(c, &layer, i)).collect();
        let experts = Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant));

        let host = run_on_host(Registry::global(), c, &layer, &experts, &calls);

        let world = CudaWorld::on_devices(&moe_kernels::probe::rank_devices(RANKS)?).map_err(fail)?;
        let launch: TwoSidedLaunch = match launch {
            Some(launch) => launch,
            None => world.comm_grid(0).map_err(fail)?.into(),
        };
        let layout = WorkspaceLayout::for_layer(&layer, &layer.dispatch_layout());
        let workspaces = Arc::new(world.symmetric_alloc(layout.bytes()).map_err(fail)?);
        // Every rank allocates, loads its kernels and captures its graphs before any rank
        // starts waiting on its peers (see moe_kernels::platform).
        let constructed = std::sync::Barrier::new(RANKS);
        let gpu: Vec<RankRuns> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..RANKS)
                .map(|r| {
                    let (world, workspaces, layer, calls, experts) =
                        (&world, workspaces.clone(), &layer, &calls, &experts);
                    let constructed = &constructed;
                    s.spawn(move || -> RankRuns {
                        let built = GpuTwoSided::new(layer, world, workspaces, r, Duration::from_secs(5), launch)
                            .and_then(|mut b| {
                                if !graph {
                                    return Ok((b, None));
                                }
                                b.upload_inputs(prepare_input(layer, layout.max_tokens, &calls[0][r])?)?;
                                let graphs = (b.capture(Phase::Dispatch)?, b.capture(Phase::Combine)?);
                                Ok((b, Some(graphs)))
                            });
                        constructed.wait();
                        let (mut b, graphs) = built?;
                        let replay = |g: &moe_kernels::cudarc::driver::CudaGraph| {
                            g.launch().map_err(|e| MoeError::Device(format!("graph launch: {e}")))
                        };
                        let ownership = layer.ownership(r);
                        let mut runs = Vec::new();
                        for inputs in calls {
                            let inp = &inputs[r];
                            let input = prepare_input(layer, layout.max_tokens, inp)?;
                            let (received, recv) = match &graphs {
                                None => b.dispatch(input)?,
                                Some((dispatch, _)) => {
                                    b.upload_inputs(input)?;
                                    replay(dispatch)?;
                                    b.finish(Phase::Dispatch)?;
                                    b.received()?
                                }
                            };
                            let mut y = Tensor::zeros(c.input_dtype.dtype(), &[layout.rows(), layer.moe.hidden]);
                            experts.apply(&received, &ownership, &mut y)?;
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
                            runs.push(CallRun {
                                received,
                                recv,
                                out: out.bytes().to_vec(),
                            });
                        }
                        Ok(runs)
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
            for (call, (run, host_out)) in g.iter().zip(&h).enumerate() {
                let sent_here: Vec<usize> = calls[call]
                    .iter()
                    .map(|inp| SendPlan::new(&inp.topk_ids.to_i32(), layer.moe.top_k, &layer.placement()).counts()[r])
                    .collect();
                if run.recv != sent_here {
                    return Err(fail(format!(
                        "call {call} rank {r}: received {:?} tokens per source, sent {sent_here:?}",
                        run.recv
                    )));
                }
                if run.received != host_received(&layer, &calls[call], r).map_err(fail)? {
                    return Err(fail(format!(
                        "call {call} rank {r}: the received rows differ from the host platform's (payload, scales, ids, weights or row order)"
                    )));
                }
                if let Some(i) = run.out.iter().zip(host_out.bytes()).position(|(a, b)| a != b) {
                    return Err(fail(format!(
                        "call {call} rank {r}: output byte {i} differs (GPU 0x{:02x}, host 0x{:02x})",
                        run.out[i],
                        host_out.bytes()[i]
                    )));
                }
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
        let launch: TwoSidedLaunch = world.comm_grid(0).map_err(fail)?.into();
        let layout = WorkspaceLayout::for_layer(&layer, &layer.dispatch_layout());
        let workspaces = Arc::new(world.symmetric_alloc(layout.bytes()).map_err(fail)?);
        let mut b =
            GpuTwoSided::new(&layer, &world, workspaces, 0, Duration::from_millis(300), launch).map_err(fail)?;
        let input = prepare_input(&layer, layout.max_tokens, &inputs[0]).map_err(fail)?;
        // Rank 1 never dispatches: rank 0 waits for its counts in vain.
        match b.dispatch(input) {
            Err(MoeError::Timeout {
                rank: 0, waited_for, ..
            }) if waited_for == [1] => Ok(()),
            Err(e) => Err(fail(format!("expected a timeout naming rank 1, got: {e}"))),
            Ok(_) => Err(fail("dispatch completed although rank 1 never dispatched")),
        }
    }

    /// The layers of [`shared_workspace`], in construction order: a small bf16 layer; an nvfp4
    /// layer of three times the tokens per rank (smaller slots, more rows: neither layout covers
    /// the other, so it grows the group to their union); a bf16 layer of half the hidden size
    /// and fewer tokens per rank, which the union covers.
    fn shared_cells() -> [Cell; 3] {
        let cell = |scheme: QuantScheme, shape: usize, max_tokens: usize, tokens: usize| {
            let mut c = base(scheme, shape, Routing::Uniform);
            c.shape.max_tokens_per_rank = max_tokens;
            c.shape.tokens = tokens;
            c.reseeded()
        };
        let mut half = cell(QuantScheme::Bf16, 0, 8, 7);
        half.shape.hidden = SHAPES[1].hidden;
        [
            cell(QuantScheme::Bf16, 0, 16, 5),
            cell(QuantScheme::Nvfp4, 0, 48, 40),
            half.reseeded(),
        ]
    }

    /// Calls per layer in [`shared_workspace`].
    const SHARED_CALLS: u64 = 3;

    /// Whether call `call` of layer `j` runs on device tensors (else host tensors): neighbouring
    /// layers take different paths, and so does each layer from call to call.
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

    /// Whether device tensor `t` overlaps `buffer`.
    fn overlaps(t: &Tensor, buffer: &DeviceBuffer) -> bool {
        t.device_region().is_some_and(|r| {
            r.address() < buffer.ptr() + buffer.bytes() as u64 && buffer.ptr() < r.address() + r.len() as u64
        })
    }

    /// One call of layer `b` on host or device tensors: its delivery (on the host) and output.
    /// On device tensors, nothing handed out may lie in the group's workspace (`workspace`,
    /// this rank's): no tensor keeps a workspace alive across a rebuild.
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
            let mut y = Tensor::zeros(dtype, &[RANKS * max, layer.moe.hidden]);
            experts.apply(&prepared.dispatched, &layer.ownership(r), &mut y)?;
            let mut out = Tensor::zeros(dtype, inp.tokens.shape());
            out.poison();
            b.finalize(prepared.receipt, &y, &mut out)?;
            return Ok((prepared.dispatched, out.bytes().to_vec()));
        };
        let prepared = b.prepare(PrepareInput::new(layer, max, &st.tokens, &st.ids, &st.weights)?)?;
        let handed_out = match (&prepared.expert_output, &prepared.dispatched) {
            (
                Some(y),
                Dispatched::Standard {
                    activations,
                    topk_ids,
                    topk_weights,
                },
            ) => {
                let scales = match activations {
                    Activations::Scaled { scales, .. } => Some(scales),
                    Activations::Unscaled { .. } => None,
                };
                [y, activations.data(), topk_ids, topk_weights]
                    .into_iter()
                    .chain(scales)
                    .collect::<Vec<_>>()
            }
            _ => {
                return Err(MoeError::Convention(
                    "expected a Standard delivery and the combine's buffer".into(),
                ));
            }
        };
        if handed_out
            .iter()
            .any(|t| t.device_region().is_none() || overlaps(t, workspace))
        {
            return Err(MoeError::Convention(
                "a tensor handed out is not a device tensor of the layer's own, or lies in the group's workspace"
                    .into(),
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

    /// Three layers of different layouts through the registry's constructor on the same GPU
    /// ranks, small first, so the second grows the rank's workspace group and the third fits
    /// in it: a call prepared before the growth fails in finalize, a layer of another top_k is
    /// refused, every layer reports the union's workspace, which the group holds once per rank
    /// (generation 2); then calls alternate between the layers, each on host or device tensors
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
        let union = own[0].union(own[1]);
        if own[0].covers(&own[1]) || own[1].covers(&own[0]) || !union.covers(&own[2]) {
            return Err(fail(
                "the second layer must grow the workspace and the third fit the union",
            ));
        }
        let experts: Vec<_> = cells
            .iter()
            .map(|c| Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant)))
            .collect();
        let calls: Vec<Vec<Vec<ReplicaInputs>>> = (0..SHARED_CALLS)
            .map(|i| cells.iter().zip(&layers).map(|(c, l)| make_inputs(c, l, i)).collect())
            .collect();
        let host: Vec<_> = (0..cells.len())
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
        let name = backend_nvlink_two_sided::NAME;
        let gpu = run_host_world(config, |rank| {
            let r = rank.rank();
            let ranks: Vec<usize> = (0..RANKS).collect();
            let device = CudaRankDevice {
                world: world.clone(),
                rank: r,
            };
            let ctx = RankContext::Cuda(CudaRank::new(rank.clone(), Arc::new(device.clone())));
            let registry = Registry::global();
            let mut first = registry.construct(name, &layers[0], &ctx)?;
            let inp = &calls[0][0][r];
            let early = first.prepare(PrepareInput::new(
                &layers[0],
                first.max_tokens_per_rank(),
                &inp.tokens,
                &inp.topk_ids,
                &inp.topk_weights,
            )?)?;
            let second = registry.construct(name, &layers[1], &ctx)?;
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
            match registry.construct(name, &other_top_k, &ctx) {
                Err(MoeError::WorkspaceGroupMismatch { field: "top_k", .. }) => {}
                other => {
                    return Err(MoeError::Convention(format!(
                        "a layer of another top_k gave {other:?}, not the group mismatch"
                    )));
                }
            }
            let third = registry.construct(name, &layers[2], &ctx)?;
            let reported = [
                first.workspace_bytes(),
                second.workspace_bytes(),
                third.workspace_bytes(),
            ];
            let group = gpu_workspace_group(&rank, &device, &ranks);
            let (generation, layout, workspaces) = {
                let g = group.lock().unwrap_or_else(|e| e.into_inner());
                let w = g.current();
                (w.generation, w.layout, w.memory.clone())
            };
            let sizes: Vec<usize> = workspaces.iter().map(|w| w.bytes()).collect();
            if (generation, layout, reported) != (2, union, [union.bytes(); 3]) || sizes != [union.bytes(); RANKS] {
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
            let mut built = [first, second, third];
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
                let (call, j) = (i / cells.len(), i % cells.len());
                let want = &host[j][r].as_ref().map_err(|e| fail(format!("host rank {r}: {e}")))?[call];
                let what = format!(
                    "rank {r} call {call} of layer {j} on {} tensors",
                    if on_device(call as u64, j) { "device" } else { "host" }
                );
                if harness::filled_rows(received).map_err(|e| fail(format!("{what}: {e}")))?
                    != harness::filled_rows(&want.received).map_err(fail)?
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
