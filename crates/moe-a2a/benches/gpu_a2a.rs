//! GPU benchmark of the backends, with the NCCL baseline and the peer-copy ceiling in the same
//! run: the DeepSeek-V3 shape (hidden 7168, 256 experts, top-8, uniform random routing) at 1,
//! 128, 512 and 4096 tokens per rank, bf16 / fp8-block128 / nvfp4, over every GPU of the machine
//! (`MOE_BENCH_RANKS` to use fewer).
//!
//! Per cell and backend, CUDA events on each rank's stream time dispatch and combine (median of
//! `ITERS` after `WARMUP`, a host barrier before each iteration, the slower rank reported), and a
//! host clock times how long enqueueing one call takes. In the same process, on the same
//! routing:
//! - NCCL all-to-all-v: grouped `ncclSend`/`ncclRecv` through `cudarc::nccl` moving each rank's
//!   remote slots (dispatch) and remote output rows (combine), with the counts known to the host
//!   beforehand (a real all-to-all-v must first exchange them, so this favours NCCL);
//! - the peer-copy ceiling: `moe_copy_16b` (16-byte stores into the next rank's memory) moving
//!   the same remote slot bytes with the same grid as dispatch.
//!
//! Prints Markdown tables. Run on a GPU host: `cargo xtask bench`, or `cargo xtask gpu-bundle`
//! here and `bash gpu-bundle/bench.sh` there. `MOE_BENCH_BLOCKS=32,132` sweeps the grid cap.
//! Without the `cuda` feature or two GPUs it says why and exits.

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("gpu_a2a: built without the `cuda` feature (cargo bench -p moe-a2a --features cuda); nothing measured");
}

#[cfg(feature = "cuda")]
fn main() {
    if let Err(e) = bench::run() {
        eprintln!("gpu_a2a: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
mod bench {
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    use backend_nvlink_one_sided::cuda::{GpuOneSided, Phase};
    use moe_a2a::harness::{Cell, Routing, SHAPES, make_inputs};
    use moe_a2a::quant::QuantScheme;
    use moe_a2a::routing::SendPlan;
    use moe_a2a::{InputDtype, LayerConfig, ParallelConfig, PrepareInput, QuantConfig};
    use moe_kernels::cudarc::driver::sys::CUevent_flags;
    use moe_kernels::cudarc::driver::{CudaEvent, CudaSlice};
    use moe_kernels::cudarc::nccl::{Comm, Id};
    use moe_kernels::gpu::Gpu;
    use moe_kernels::one_sided::OneSidedLaunch;
    use moe_kernels::platform::{CudaWorld, DeviceBuffer};

    const WARMUP: usize = 5;
    const ITERS: usize = 30;
    const TOKENS: [usize; 4] = [1, 128, 512, 4096];
    const SCHEMES: [QuantScheme; 3] = [QuantScheme::Bf16, QuantScheme::Fp8Block128, QuantScheme::Nvfp4];

    type Res<T> = Result<T, String>;

    fn err(e: impl std::fmt::Display) -> String {
        e.to_string()
    }

    fn median(mut v: Vec<f32>) -> f32 {
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    }

    /// Medians of one rank, in microseconds.
    #[derive(Clone, Copy, Debug, Default)]
    struct Times {
        dispatch: f32,
        combine: f32,
        /// Host time to enqueue one dispatch and one combine.
        host: f32,
    }

    impl Times {
        /// The slower rank bounds the step.
        fn worst(all: &[Times]) -> Times {
            all.iter().fold(Times::default(), |a, t| Times {
                dispatch: a.dispatch.max(t.dispatch),
                combine: a.combine.max(t.combine),
                host: a.host.max(t.host),
            })
        }
    }

    /// One cell: the layer and, per rank, its inputs and how many tokens it sends to each rank.
    struct Case {
        scheme: QuantScheme,
        tokens: usize,
        layer: LayerConfig,
        inputs: Vec<moe_a2a::harness::ReplicaInputs>,
        /// `counts[s][r]`: tokens rank `s` sends to rank `r`.
        counts: Vec<Vec<usize>>,
    }

    impl Case {
        fn new(scheme: QuantScheme, tokens: usize, ranks: usize) -> Res<Case> {
            let mut quant = QuantConfig::new(scheme);
            quant.params.nvfp4_global_scale = 448.0 * 6.0 / 100.0;
            let mut cell = Cell {
                input_dtype: InputDtype::Bf16,
                quant,
                parallel: ParallelConfig::ep(ranks),
                shape: SHAPES[2],
                routing: Routing::Uniform,
                ..Cell::new(backend_nvlink_one_sided::NAME)
            };
            cell.shape.tokens = tokens;
            cell.shape.max_tokens_per_rank = tokens;
            let cell = cell.reseeded();
            let layer = cell.layer().map_err(err)?;
            let inputs = make_inputs(&cell, &layer, 0);
            let counts = inputs
                .iter()
                .map(|inp| {
                    SendPlan::new(&inp.topk_ids.to_i32(), layer.moe.top_k, &layer.placement())
                        .counts()
                        .to_vec()
                })
                .collect();
            Ok(Case {
                scheme,
                tokens,
                layer,
                inputs,
                counts,
            })
        }

        fn ranks(&self) -> usize {
            self.counts.len()
        }

        /// Tokens rank `r` sends to other ranks.
        fn remote(&self, r: usize) -> usize {
            self.counts[r]
                .iter()
                .enumerate()
                .filter(|(t, _)| *t != r)
                .map(|(_, c)| c)
                .sum()
        }

        fn input(&self, r: usize) -> Res<PrepareInput<'_>> {
            let inp = &self.inputs[r];
            PrepareInput::new(&self.layer, self.tokens, &inp.tokens, &inp.topk_ids, &inp.topk_weights).map_err(err)
        }
    }

    /// Events around a region of a rank's stream.
    struct Clock {
        gpu: Arc<Gpu>,
        events: Vec<CudaEvent>,
    }

    impl Clock {
        fn new(gpu: &Arc<Gpu>, marks: usize) -> Res<Clock> {
            let events = (0..marks)
                .map(|_| gpu.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)))
                .collect::<Result<_, _>>()
                .map_err(err)?;
            Ok(Clock {
                gpu: gpu.clone(),
                events,
            })
        }

        fn mark(&self, i: usize) -> Res<()> {
            self.events[i].record(self.gpu.stream()).map_err(err)
        }

        fn us(&self, from: usize, to: usize) -> Res<f32> {
            Ok(self.events[from].elapsed_ms(&self.events[to]).map_err(err)? * 1e3)
        }
    }

    /// Runs `iteration` `WARMUP + ITERS` times behind a barrier on every rank and returns the
    /// medians of the timed ones.
    fn timed(
        barrier: &Barrier,
        clock: &Clock,
        mut iteration: impl FnMut() -> Res<f32>,
    ) -> Res<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (mut d, mut c, mut h) = (Vec::new(), Vec::new(), Vec::new());
        for it in 0..WARMUP + ITERS {
            barrier.wait();
            let host = iteration()?;
            if it >= WARMUP {
                d.push(clock.us(0, 1)?);
                c.push(clock.us(1, 2)?);
                h.push(host);
            }
        }
        Ok((d, c, h))
    }

    fn medians((d, c, h): (Vec<f32>, Vec<f32>, Vec<f32>)) -> Times {
        Times {
            dispatch: median(d),
            combine: median(c),
            host: median(h),
        }
    }

    /// nvlink-one-sided: dispatch (quantizes on the way) and combine (the experts' rows are
    /// read in place from the combine region), eagerly launched and as CUDA graphs.
    fn one_sided(world: &CudaWorld, case: &Case, launch: OneSidedLaunch) -> Res<(Times, Times)> {
        let ranks = case.ranks();
        let layout = backend_nvlink_one_sided::WorkspaceLayout::for_layer(&case.layer, &case.layer.dispatch_layout());
        let workspaces = Arc::new(world.symmetric_alloc(layout.bytes()).map_err(err)?);
        let barrier = Barrier::new(ranks);
        let results: Vec<Res<(Times, Times)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..ranks)
                .map(|r| {
                    let (workspaces, barrier) = (workspaces.clone(), &barrier);
                    s.spawn(move || -> Res<(Times, Times)> {
                        let built = (|| -> Res<_> {
                            let mut b =
                                GpuOneSided::new(&case.layer, world, workspaces, r, Duration::from_secs(10), launch)
                                    .map_err(err)?;
                            b.upload_inputs(case.input(r)?).map_err(err)?;
                            let graphs = (
                                b.capture(Phase::Dispatch).map_err(err)?,
                                b.capture(Phase::Combine).map_err(err)?,
                            );
                            let clock = Clock::new(b.gpu(), 3)?;
                            Ok((b, graphs, clock))
                        })();
                        // Everything allocated and loaded before any rank waits on a peer.
                        barrier.wait();
                        let (b, (g_dispatch, g_combine), clock) = built?;
                        let eager = timed(barrier, &clock, || {
                            clock.mark(0)?;
                            let start = Instant::now();
                            b.launch(Phase::Dispatch).map_err(err)?;
                            let host = start.elapsed();
                            clock.mark(1)?;
                            let start = Instant::now();
                            b.launch(Phase::Combine).map_err(err)?;
                            let host = (host + start.elapsed()).as_secs_f32() * 1e6;
                            clock.mark(2)?;
                            b.finish(Phase::Combine).map_err(err)?;
                            Ok(host)
                        })?;
                        let graph = timed(barrier, &clock, || {
                            clock.mark(0)?;
                            let start = Instant::now();
                            g_dispatch.launch().map_err(err)?;
                            let host = start.elapsed();
                            clock.mark(1)?;
                            let start = Instant::now();
                            g_combine.launch().map_err(err)?;
                            let host = (host + start.elapsed()).as_secs_f32() * 1e6;
                            clock.mark(2)?;
                            b.finish(Phase::Combine).map_err(err)?;
                            Ok(host)
                        })?;
                        Ok((medians(eager), medians(graph)))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });
        let results: Vec<(Times, Times)> = results.into_iter().collect::<Res<_>>()?;
        let eager: Vec<Times> = results.iter().map(|r| r.0).collect();
        let graph: Vec<Times> = results.iter().map(|r| r.1).collect();
        Ok((Times::worst(&eager), Times::worst(&graph)))
    }

    /// NCCL all-to-all-v through grouped send/recv: each rank sends `counts[me][peer]` slots to
    /// every other rank (dispatch) and gets one output row back for each (combine).
    fn nccl(world: &CudaWorld, case: &Case) -> Res<Times> {
        let ranks = case.ranks();
        let d = case.layer.dispatch_layout();
        let (slot, row) = (d.slot_bytes(), d.combine_row_bytes);
        let id = Id::new().map_err(|e| format!("NCCL unique id: {e:?}"))?;
        let barrier = Barrier::new(ranks);
        let results: Vec<Res<Times>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..ranks)
                .map(|me| {
                    let barrier = &barrier;
                    s.spawn(move || -> Res<Times> {
                        let gpu = world.gpu(me);
                        let stream = gpu.stream().clone();
                        // NCCL memory needs no peer mapping, so the stream allocator is fine.
                        let alloc = |bytes: usize| stream.alloc_zeros::<u8>(bytes.max(1)).map_err(err);
                        // NCCL takes the device from the thread's current context.
                        gpu.context().bind_to_thread().map_err(err)?;
                        let comm =
                            Comm::from_rank(stream.clone(), me, ranks, id).map_err(|e| format!("NCCL init: {e:?}"))?;
                        // Per peer: slots out and in (dispatch), rows out and in (combine).
                        let to: Vec<usize> = (0..ranks)
                            .map(|p| if p == me { 0 } else { case.counts[me][p] })
                            .collect();
                        let from: Vec<usize> = (0..ranks)
                            .map(|p| if p == me { 0 } else { case.counts[p][me] })
                            .collect();
                        let buffers = |counts: &[usize], bytes: usize| -> Res<Vec<CudaSlice<u8>>> {
                            counts.iter().map(|c| alloc(c * bytes)).collect()
                        };
                        let (slots_out, mut slots_in) = (buffers(&to, slot)?, buffers(&from, slot)?);
                        let (rows_out, mut rows_in) = (buffers(&from, row)?, buffers(&to, row)?);
                        let clock = Clock::new(gpu, 3)?;
                        barrier.wait();
                        let exchange = |send: &[CudaSlice<u8>],
                                        out_counts: &[usize],
                                        recv: &mut [CudaSlice<u8>],
                                        in_counts: &[usize],
                                        bytes: usize|
                         -> Res<()> {
                            let mut group = comm.group();
                            for (peer, (s, r)) in send.iter().zip(recv.iter_mut()).enumerate() {
                                if out_counts[peer] > 0 {
                                    group
                                        .send(s.slice(..out_counts[peer] * bytes), peer as i32)
                                        .map_err(|e| format!("NCCL send: {e:?}"))?;
                                }
                                if in_counts[peer] > 0 {
                                    group
                                        .recv(r.slice_mut(..in_counts[peer] * bytes), peer as i32)
                                        .map_err(|e| format!("NCCL recv: {e:?}"))?;
                                }
                            }
                            Ok(())
                        };
                        let times = timed(barrier, &clock, || {
                            clock.mark(0)?;
                            let start = Instant::now();
                            exchange(&slots_out, &to, &mut slots_in, &from, slot)?;
                            let host = start.elapsed();
                            clock.mark(1)?;
                            let start = Instant::now();
                            exchange(&rows_out, &from, &mut rows_in, &to, row)?;
                            let host = (host + start.elapsed()).as_secs_f32() * 1e6;
                            clock.mark(2)?;
                            stream.synchronize().map_err(err)?;
                            Ok(host)
                        })?;
                        Ok(medians(times))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });
        Ok(Times::worst(&results.into_iter().collect::<Res<Vec<_>>>()?))
    }

    /// The peer-copy ceiling: each rank copies its remote slot bytes into a buffer on the next
    /// rank with 16-byte stores, all ranks at once.
    fn ceiling(world: &CudaWorld, case: &Case, launch: OneSidedLaunch) -> Res<f32> {
        let ranks = case.ranks();
        let slot = case.layer.dispatch_layout().slot_bytes();
        let bytes: Vec<usize> = (0..ranks).map(|r| (case.remote(r) * slot).max(16)).collect();
        let sources: Vec<DeviceBuffer> = (0..ranks)
            .map(|r| DeviceBuffer::zeroed(world.gpu(r), bytes[r]))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let targets: Vec<DeviceBuffer> = (0..ranks)
            .map(|r| DeviceBuffer::zeroed(world.gpu((r + 1) % ranks), bytes[r]))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let barrier = Barrier::new(ranks);
        let results: Vec<Res<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..ranks)
                .map(|r| {
                    let (src, dst, bytes, barrier) = (&sources[r], &targets[r], bytes[r], &barrier);
                    s.spawn(move || -> Res<f32> {
                        let gpu = world.gpu(r);
                        let clock = Clock::new(gpu, 3)?;
                        let times = timed(barrier, &clock, || {
                            clock.mark(0)?;
                            // SAFETY: `src` holds `bytes` bytes on this GPU and `dst` `bytes` on
                            // the next rank's GPU, which this GPU reaches (peer access).
                            unsafe { gpu.copy_16b(src.ptr(), dst.ptr(), bytes, launch.max_blocks) }.map_err(err)?;
                            clock.mark(1)?;
                            clock.mark(2)?;
                            gpu.stream().synchronize().map_err(err)?;
                            Ok(0.0)
                        })?;
                        Ok(medians(times).dispatch)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });
        Ok(results
            .into_iter()
            .collect::<Res<Vec<f32>>>()?
            .into_iter()
            .fold(0f32, f32::max))
    }

    pub fn run() -> Res<()> {
        let gpus = moe_kernels::probe::gpu_count()?;
        let ranks = match std::env::var("MOE_BENCH_RANKS") {
            Ok(v) => v.parse().map_err(|e| format!("MOE_BENCH_RANKS `{v}`: {e}"))?,
            Err(_) => gpus,
        };
        if ranks < 2 || ranks > gpus {
            return Err(format!(
                "needs 2 or more GPUs and at most the {gpus} this machine has, asked for {ranks}"
            ));
        }
        let world = CudaWorld::new(ranks).map_err(err)?;
        let sweep =
            std::env::var("MOE_BENCH_BLOCKS").unwrap_or_else(|_| OneSidedLaunch::default().max_blocks.to_string());
        let sweep: Vec<u32> = sweep
            .split(',')
            .map(|b| b.trim().parse().map_err(|e| format!("MOE_BENCH_BLOCKS `{b}`: {e}")))
            .collect::<Res<_>>()?;
        println!(
            "{ranks} ranks, hidden 7168, 256 experts, top-8, uniform routing, median of {ITERS} after {WARMUP} warm-up, slower rank; times in us"
        );
        println!();
        println!(
            "| scheme | tokens/rank | blocks | remote MB (slots) | one-sided dispatch | combine | graph dispatch | graph combine | host us/call (eager / graph / NCCL) | NCCL dispatch | NCCL combine | ceiling | dispatch / ceiling | dispatch GB/s | combine GB/s | vs NCCL (dispatch / combine) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for scheme in SCHEMES {
            for tokens in TOKENS {
                let case = Case::new(scheme, tokens, ranks)?;
                let d = case.layer.dispatch_layout();
                let remote = (0..ranks).map(|r| case.remote(r)).max().unwrap_or(0);
                let (slot_mb, row_mb) = (
                    (remote * d.slot_bytes()) as f32 / 1e6,
                    (remote * d.combine_row_bytes) as f32 / 1e6,
                );
                let base = nccl(&world, &case)?;
                for &max_blocks in &sweep {
                    let launch = OneSidedLaunch { max_blocks };
                    let (eager, graph) = one_sided(&world, &case, launch)?;
                    let ceil = ceiling(&world, &case, launch)?;
                    println!(
                        "| {} | {} | {max_blocks} | {slot_mb:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} / {:.1} / {:.1} | {:.1} | {:.1} | {ceil:.1} | {:.2} | {:.1} | {:.1} | {:.2} / {:.2} |",
                        case.scheme,
                        case.tokens,
                        eager.dispatch,
                        eager.combine,
                        graph.dispatch,
                        graph.combine,
                        eager.host,
                        graph.host,
                        base.host,
                        base.dispatch,
                        base.combine,
                        ceil / eager.dispatch,
                        slot_mb * 1e3 / eager.dispatch,
                        row_mb * 1e3 / eager.combine,
                        base.dispatch / eager.dispatch,
                        base.combine / eager.combine,
                    );
                }
            }
        }
        Ok(())
    }
}
