//! Benchmark of the one-sided protocol on GPUs (CUDA events on each rank's stream): quantize,
//! dispatch and combine latency at the DeepSeek-V3 shape (hidden 7168, 256 experts, top-8,
//! uniform random routing) over 2 ranks, with the SM-driven peer-copy ceiling for the same
//! remote bytes measured in the same run. Prints a Markdown table; the NCCL baseline comes from
//! `shared/baselines/nccl_torch_a2a.py` run in the same session (see docs/BENCHMARKS.md).
//!
//! Run on a GPU host: `cargo xtask gpu-bundle` here, then `bash gpu-bundle/bench.sh` there;
//! `MOE_BENCH_BLOCKS=32,132` sweeps the grid cap (default: `OneSidedLaunch::default()`).
//! Without the `cuda` feature or two GPUs it says why and exits.

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("one_sided_gpu: built without the `cuda` feature (cargo bench --features cuda); nothing measured");
}

#[cfg(feature = "cuda")]
fn main() {
    if let Err(e) = bench::run() {
        eprintln!("one_sided_gpu: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
mod bench {
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    use backend_nvlink_one_sided::WorkspaceLayout;
    use backend_nvlink_one_sided::cuda::{GpuOneSided, Phase};
    use moe_core::harness::{Cell, Placement, Routing, SHAPES, make_inputs, seed_of};
    use moe_core::quant::QuantScheme;
    use moe_core::routing::SendPlan;
    use moe_core::{ActivationFormat, InputDtype, ParallelConfig, PrepareInput, QuantConfig};
    use moe_kernels::one_sided::OneSidedLaunch;
    use moe_kernels::platform::{CudaWorld, DeviceBuffer};

    const RANKS: usize = 2;
    const WARMUP: usize = 5;
    const ITERS: usize = 30;

    fn median(mut v: Vec<f32>) -> f32 {
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    }

    /// Per rank: median quantize, dispatch, combine and ceiling times (us) and remote bytes.
    struct RankResult {
        quant_us: f32,
        dispatch_us: f32,
        combine_us: f32,
        ceiling_us: f32,
        remote_slot_bytes: usize,
        remote_row_bytes: usize,
    }

    pub fn run() -> Result<(), String> {
        let gpus = moe_kernels::probe::gpu_count()?;
        if gpus < RANKS {
            return Err(format!("needs {RANKS} GPUs, this machine has {gpus}"));
        }
        let world = CudaWorld::new(RANKS).map_err(|e| e.to_string())?;
        // MOE_BENCH_BLOCKS: comma-separated grid caps to sweep (the SMs given to communication).
        let sweep =
            std::env::var("MOE_BENCH_BLOCKS").unwrap_or_else(|_| OneSidedLaunch::default().max_blocks.to_string());
        for blocks in sweep.split(',') {
            let max_blocks = blocks
                .trim()
                .parse()
                .map_err(|e| format!("MOE_BENCH_BLOCKS `{blocks}`: {e}"))?;
            table(&world, OneSidedLaunch { max_blocks })?;
            println!();
        }
        Ok(())
    }

    fn table(world: &CudaWorld, launch: OneSidedLaunch) -> Result<(), String> {
        println!(
            "one-sided, {RANKS} ranks, hidden 7168, 256 experts, top-8, uniform routing, {} blocks x 256 threads per kernel, median of {ITERS} after {WARMUP} warm-up",
            launch.max_blocks
        );
        println!();
        println!(
            "| scheme | tokens/rank | quantize us | dispatch us | combine us | remote MB (slots) | dispatch GB/s | combine GB/s | peer-copy ceiling us | ceiling GB/s | dispatch / ceiling |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for scheme in [QuantScheme::Bf16, QuantScheme::Fp8Block128, QuantScheme::Nvfp4] {
            for tokens in [1usize, 128, 512, 4096] {
                let r = config(world, scheme, tokens, launch)?;
                // The slower rank bounds the step.
                let worst = |f: fn(&RankResult) -> f32| r.iter().map(f).fold(0f32, f32::max);
                let (q, d, c, ceil) = (
                    worst(|x| x.quant_us),
                    worst(|x| x.dispatch_us),
                    worst(|x| x.combine_us),
                    worst(|x| x.ceiling_us),
                );
                let slot = r.iter().map(|x| x.remote_slot_bytes).max().unwrap_or(0) as f32;
                let row = r.iter().map(|x| x.remote_row_bytes).max().unwrap_or(0) as f32;
                println!(
                    "| {scheme} | {tokens} | {q:.1} | {d:.1} | {c:.1} | {:.2} | {:.1} | {:.1} | {ceil:.1} | {:.1} | {:.2} |",
                    slot / 1e6,
                    slot / d / 1e3,
                    row / c / 1e3,
                    slot / ceil / 1e3,
                    ceil / d
                );
            }
        }
        Ok(())
    }

    fn config(
        world: &CudaWorld,
        scheme: QuantScheme,
        tokens: usize,
        launch: OneSidedLaunch,
    ) -> Result<Vec<RankResult>, String> {
        let mut quant = QuantConfig::new(scheme);
        quant.params.nvfp4_global_scale = 448.0 * 6.0 / 100.0;
        let mut cell = Cell {
            backend: backend_nvlink_one_sided::NAME.to_string(),
            input_dtype: InputDtype::Bf16,
            quant,
            parallel: ParallelConfig::ep(RANKS),
            format: ActivationFormat::Standard,
            shape: SHAPES[2],
            routing: Routing::Uniform,
            placement: Placement::Contiguous,
            seed: 0,
        };
        cell.shape.tokens = tokens;
        cell.shape.max_tokens_per_rank = tokens;
        cell.seed = seed_of(&cell.to_string());
        let layer = cell.layer().map_err(|e| e.to_string())?;
        let inputs = make_inputs(&cell, &layer, 0);
        let d = layer.dispatch_layout();
        let layout = WorkspaceLayout::for_layer(&layer, &d);
        let workspaces = Arc::new(world.symmetric_alloc(layout.bytes()).map_err(|e| e.to_string())?);
        let remote: Vec<usize> = (0..RANKS)
            .map(|r| {
                let plan = SendPlan::new(&inputs[r].topk_ids.to_i32(), layer.moe.top_k, &layer.placement());
                plan.counts()
                    .iter()
                    .enumerate()
                    .filter(|(t, _)| *t != r)
                    .map(|(_, c)| c)
                    .sum()
            })
            .collect();
        // Ceiling buffers: each rank copies its remote slot bytes into a buffer on the next rank.
        let ceiling_bytes: Vec<usize> = remote.iter().map(|c| (c * d.slot_bytes()).max(16)).collect();
        let sources: Vec<DeviceBuffer> = (0..RANKS)
            .map(|r| DeviceBuffer::zeroed(world.gpu(r), ceiling_bytes[r]))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let targets: Vec<DeviceBuffer> = (0..RANKS)
            .map(|r| DeviceBuffer::zeroed(world.gpu((r + 1) % RANKS), ceiling_bytes[r]))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let barrier = Barrier::new(RANKS);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..RANKS)
                .map(|r| {
                    let (workspaces, layer, inputs, barrier) = (workspaces.clone(), &layer, &inputs, &barrier);
                    let (src, dst, bytes, remote) = (&sources[r], &targets[r], ceiling_bytes[r], remote[r]);
                    s.spawn(move || -> Result<RankResult, String> {
                        let built = GpuOneSided::new(layer, world, workspaces, r, Duration::from_secs(10), launch)
                            .and_then(|mut b| {
                                let inp = &inputs[r];
                                let input =
                                    PrepareInput::new(layer, tokens, &inp.tokens, &inp.topk_ids, &inp.topk_weights)?;
                                b.upload_inputs(input)?;
                                Ok(b)
                            });
                        barrier.wait();
                        let b = built.map_err(|e| e.to_string())?;
                        let gpu = b.gpu().clone();
                        let timing = Some(moe_kernels::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
                        let ev: Vec<_> = (0..4)
                            .map(|_| gpu.context().new_event(timing))
                            .collect::<Result<_, _>>()
                            .map_err(|e| e.to_string())?;
                        let stream = gpu.stream();
                        let (mut q, mut dsp, mut cmb) = (Vec::new(), Vec::new(), Vec::new());
                        for it in 0..WARMUP + ITERS {
                            barrier.wait();
                            let step = || -> Result<(), String> {
                                ev[0].record(stream).map_err(|e| e.to_string())?;
                                b.launch_quantize().map_err(|e| e.to_string())?;
                                ev[1].record(stream).map_err(|e| e.to_string())?;
                                b.launch(Phase::Dispatch).map_err(|e| e.to_string())?;
                                ev[2].record(stream).map_err(|e| e.to_string())?;
                                b.launch(Phase::Combine).map_err(|e| e.to_string())?;
                                ev[3].record(stream).map_err(|e| e.to_string())?;
                                b.finish(Phase::Combine).map_err(|e| e.to_string())
                            };
                            step()?;
                            if it >= WARMUP {
                                let ms = |a: usize, z: usize| ev[a].elapsed_ms(&ev[z]).map_err(|e| e.to_string());
                                q.push(ms(0, 1)? * 1e3);
                                dsp.push(ms(1, 2)? * 1e3);
                                cmb.push(ms(2, 3)? * 1e3);
                            }
                        }
                        let mut ceil = Vec::new();
                        for it in 0..WARMUP + ITERS {
                            barrier.wait();
                            ev[0].record(stream).map_err(|e| e.to_string())?;
                            // SAFETY: `src` holds `bytes` bytes on this GPU and `dst` `bytes` on
                            // the next rank's GPU, which this GPU can reach (peer access).
                            unsafe { gpu.copy_16b(src.ptr(), dst.ptr(), bytes, launch.max_blocks) }
                                .map_err(|e| e.to_string())?;
                            ev[1].record(stream).map_err(|e| e.to_string())?;
                            stream.synchronize().map_err(|e| e.to_string())?;
                            if it >= WARMUP {
                                ceil.push(ev[0].elapsed_ms(&ev[1]).map_err(|e| e.to_string())? * 1e3);
                            }
                        }
                        Ok(RankResult {
                            quant_us: median(q),
                            dispatch_us: median(dsp),
                            combine_us: median(cmb),
                            ceiling_us: median(ceil),
                            remote_slot_bytes: remote * layer.dispatch_layout().slot_bytes(),
                            remote_row_bytes: remote * layer.dispatch_layout().combine_row_bytes,
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        })
    }
}
