//! The two-sided protocol on two GPUs against the host platform: for the same inputs, each GPU
//! rank receives the same number of tokens from each source, the same rows in the same order
//! (the host's dense layout, bit for bit), and — with the reference experts run on what the GPU
//! delivered — combines to exactly the bits the host platform produces (same rows, same f32
//! order), also when dispatch and combine are captured in CUDA graphs and replayed, and when a
//! few blocks each take many tokens (the grid-stride paths large calls take). A rank that
//! never dispatches makes its peer's dispatch fail with a timeout naming it, instead of
//! hanging. Without two GPUs each trial is reported as ignored with the reason;
//! `MOE_REQUIRE_GPU=1` makes that a failure.

use libtest_mimic::{Arguments, Failed, Trial};
use moe_core::harness::{Cell, Routing, SHAPES};
use moe_core::quant::QuantScheme;
use moe_core::{InputDtype, ParallelConfig, QuantConfig, ScaleLayout};

const RANKS: usize = 2;

fn cells() -> Vec<Cell> {
    let base = |scheme: QuantScheme, shape: usize, routing: Routing| {
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
    };
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
    let skip = moe_kernels::probe::gpu_skip_reason(RANKS);
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

    fn moe_kernels_missing() -> Failed {
        "built without the `cuda` feature (cargo test --features cuda)".into()
    }
}

#[cfg(feature = "cuda")]
mod cases {
    use std::sync::Arc;
    use std::time::Duration;

    use backend_nvlink_two_sided::WorkspaceLayout;
    use backend_nvlink_two_sided::cuda::{GpuTwoSided, Phase};
    use moe_core::experts::{Experts, ReferenceExperts};
    use moe_core::harness::{CALLS_PER_CELL, ReplicaInputs, make_inputs, run_on_host};
    use moe_core::routing::SendPlan;
    use moe_core::slots::{self, ReceivedRows};
    use moe_core::{Dispatched, LayerConfig, MoeError, PrepareInput, Registry, Tensor};
    use moe_kernels::platform::CudaWorld;
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

        let world = CudaWorld::new(RANKS).map_err(fail)?;
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
        let world = CudaWorld::new(RANKS).map_err(fail)?;
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
}
