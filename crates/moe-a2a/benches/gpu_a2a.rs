//! GPU benchmark of every backend's GPU implementation, with the NCCL baseline and the
//! peer-copy ceiling in the same run: the DeepSeek-V3 shape (hidden 7168, 256 experts, top-8,
//! uniform random routing) at 1, 128, 512 and 4096 tokens per rank, bf16 / fp8-block128 /
//! nvfp4, over every GPU of the machine (`MOE_BENCH_RANKS` to use fewer).
//!
//! Per cell, one at a time, every rank builds what is measured (allocates, loads its kernels,
//! uploads its inputs, captures its graphs) and only after a barrier launches anything that
//! waits on a peer. CUDA events on each rank's stream then time dispatch and combine (median of
//! `ITERS` after `WARMUP`, a host barrier before each iteration, the slower rank reported), and
//! a host clock times how long enqueueing one dispatch and one combine takes. What each row's
//! times include, on the same routing:
//! - nvlink-one-sided: dispatch is one kernel that quantizes and stores each token's slot into
//!   the ranks owning its experts; combine is one kernel that publishes the experts' rows (read
//!   in place) and pulls and sums them. Eager launches and CUDA graph replays.
//! - nvlink-two-sided: dispatch is plan (the count exchange), then the dense all-to-all-v,
//!   which quantizes each token on the way; combine is send and reduce. Eager launches and
//!   CUDA graph replays.
//! - allgather-rs: dispatch is the quantization kernel and three NCCL all-gathers (slot images,
//!   ids, weights) of all `max_tokens` rows of every rank to every rank, no count exchange;
//!   combine is an NCCL reduce-scatter of `ranks * max_tokens` f32 rows per rank. Eager only.
//! - NCCL all-to-all-v: grouped `ncclSend`/`ncclRecv` through `cudarc::nccl` moving each rank's
//!   remote slots (dispatch) and remote output rows (combine), with the counts known to the host
//!   beforehand (a real all-to-all-v must first exchange them, so this favours NCCL); no
//!   quantization.
//! - the peer-copy ceiling: `moe_copy_16b` with the same grid cap as the one-sided kernels,
//!   16-byte stores of the all-to-alls' remote dispatch bytes into the next rank's memory (its
//!   dispatch) and 16-byte loads of their remote combine bytes from there (its combine).
//!
//! "Remote MB" is what the busiest rank moves to or from peers: for the all-to-alls its tokens
//! for other ranks times the slot bytes (dispatch) and the output row bytes (combine); for
//! allgather-rs `(ranks - 1) * max_tokens` gathered rows of image, ids and weights (dispatch)
//! and `(ranks - 1) * max_tokens * hidden` f32 values (what a ring reduce-scatter moves per
//! rank). GB/s divides those bytes by the eager time. "Speed-up vs NCCL" is the NCCL
//! all-to-all-v's eager time over the row's; "ceiling / row" is the ceiling's time over the
//! row's, for dispatch and combine (1 would be as fast as a bare copy of the all-to-all's remote
//! bytes). "SMs" are the blocks the one-sided kernels launch with (one per SM) and the grid cap
//! of the two-sided kernels; NCCL picks its own.
//!
//! Prints one Markdown table per grid cap, one row per scheme, tokens per rank and backend. Run
//! on a GPU host: `cargo xtask bench`, or `cargo xtask gpu-bundle` here and
//! `bash gpu-bundle/bench.sh` there. `MOE_BENCH_BLOCKS=32,132,32x1024` sweeps the grid cap (and,
//! with `x`, the threads per block) of the one-sided kernels and the ceiling, and the grid cap
//! of the two-sided kernels (NCCL and allgather-rs do not depend on it and are measured again per
//! table; unset, one table on every SM x 1024, the backends' default `CommSms`);
//! `MOE_BENCH_TOKENS=1,128` and `MOE_BENCH_SCHEMES=bf16` measure fewer cells (the
//! defaults are the shape's token counts and schemes above). `MOE_BENCH_PHASES=1` prints, instead
//! of the tables, where the one-sided kernels' time goes: per cell and rank, the median time from
//! each kernel's earliest block to each of its phases (`moe_kernels::one_sided::TracePoint`,
//! stamped by the kernels in eager calls). `MOE_BENCH_LAUNCH=processes` runs every rank as a
//! process of its own (this binary again, with torchrun's environment, joined over the TCP
//! control plane on 127.0.0.1, each on `LOCAL_RANK`'s GPU, shared with `MOE_SHARE_GPUS=1`) and
//! measures the one-sided and two-sided rows the same way, a barrier in memory the processes
//! share before each iteration; rank 0 prints the table. Without the `cuda` feature or two GPUs
//! it says why and exits.

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
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    use backend_allgather_rs::cuda::{CudaAllGatherRank, group_of, new_comm_id};
    use backend_nvlink_one_sided::cuda::{self as one_sided, CudaOneSidedRank, Phase as OneSidedPhase};
    use backend_nvlink_two_sided::cuda::{CudaTwoSidedRank, Phase as TwoSidedPhase};
    use moe_a2a::control::{TcpConfig, TcpControlPlane};
    use moe_a2a::experts::Experts;
    use moe_a2a::harness::{Cell, Routing, SHAPES, make_inputs};
    use moe_a2a::host::{HostRank, HostWorldConfig, SymmetricMemory, run_host_world};
    use moe_a2a::quant::QuantScheme;
    use moe_a2a::routing::SendPlan;
    use moe_a2a::runner::MoeLayer;
    use moe_a2a::shm::MemfdMemory;
    use moe_a2a::{
        CudaRank, InputDtype, LayerConfig, ParallelConfig, PrepareFinalize, PrepareInput, QuantConfig, RankContext,
        Receipt, Tensor,
    };
    use moe_kernels::bench_env::{env_list, positive_count, scheme_among};
    use moe_kernels::buffer::DeviceBuffer;
    use moe_kernels::cudarc::driver::sys::CUevent_flags;
    use moe_kernels::cudarc::driver::{CudaEvent, CudaGraph, CudaSlice};
    use moe_kernels::cudarc::nccl::{Comm, Id};
    use moe_kernels::device::CudaDevice;
    use moe_kernels::launch::CommSms;
    use moe_kernels::one_sided::{OneSidedLaunch, TRACE_WORDS, TracePoint};
    use moe_kernels::tensor::upload_tensor;
    use moe_kernels::two_sided::TwoSidedLaunch;
    use moe_kernels::world::{CudaWorld, CudaWorldRank};
    use moe_peer::PeerLayout;

    const WARMUP: usize = 5;
    const ITERS: usize = 30;
    const TOKENS: [usize; 4] = [1, 128, 512, 4096];
    const SCHEMES: [QuantScheme; 3] = [QuantScheme::Bf16, QuantScheme::Fp8Block128, QuantScheme::Nvfp4];
    /// How long a one- or two-sided kernel, or allgather-rs's host, waits for a peer before
    /// reporting a timeout.
    const TIMEOUT: Duration = Duration::from_secs(10);

    type Res<T> = Result<T, String>;

    /// Who measures: every rank as a thread of this process, or this process's rank of a
    /// world of one process per rank.
    enum Team {
        Threads(usize),
        Process(ProcessRank),
    }

    /// This process's rank of a world of processes, and what it measures with.
    struct ProcessRank {
        host: HostRank,
        device: CudaWorldRank,
        /// Word `r` on every rank: the last barrier rank `r` reached, in memory the processes
        /// share, so a barrier releases the ranks within microseconds as a thread barrier does
        /// (the TCP control plane's takes a round trip per rank).
        gate: SymmetricMemory,
        epoch: AtomicU32,
    }

    impl ProcessRank {
        fn all(&self) -> Vec<usize> {
            (0..self.host.world_size()).collect()
        }

        fn barrier(&self) -> Res<()> {
            let epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
            let me = self.host.rank();
            for peer in self.all() {
                self.gate.release_flag(peer, 4 * me, epoch);
            }
            for peer in self.all() {
                self.gate
                    .acquire_until("bench barrier", 4 * peer, peer, |w| (w >= epoch).then_some(()))
                    .map_err(err)?;
            }
            Ok(())
        }
    }

    impl Team {
        fn ranks(&self) -> usize {
            match self {
                Team::Threads(ranks) => *ranks,
                Team::Process(p) => p.host.world_size(),
            }
        }

        /// Whether this process prints the tables: rank 0 of processes.
        fn prints(&self) -> bool {
            match self {
                Team::Threads(_) => true,
                Team::Process(p) => p.host.rank() == 0,
            }
        }

        /// A zeroed `bytes`-byte workspace on every rank (collective with processes).
        fn workspaces(&self, world: &CudaWorld, bytes: usize) -> Res<Arc<Vec<DeviceBuffer>>> {
            match self {
                Team::Threads(_) => world.symmetric_alloc(bytes).map(Arc::new).map_err(err),
                Team::Process(p) => p
                    .device
                    .symmetric_workspace(&p.host, &p.all(), "bench workspace", bytes)
                    .map_err(err),
            }
        }
    }

    fn err(e: impl std::fmt::Display) -> String {
        e.to_string()
    }

    fn median(mut v: Vec<f32>) -> f32 {
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    }

    /// Medians of one rank, in microseconds.
    #[derive(Clone, Copy, Debug)]
    struct Times {
        dispatch: f32,
        combine: f32,
        /// Host time to enqueue one dispatch and one combine.
        host: f32,
        /// Host time to enqueue one dispatch, and one combine.
        host_dispatch: f32,
        host_combine: f32,
        /// The median over calls of the combine's host time less the same call's dispatch's:
        /// for a `Measured` whose dispatch and combine are two ways of making one call, taken
        /// in turn, what the second adds, with the drift between calls cancelled.
        host_combine_over_dispatch: f32,
    }

    impl Times {
        /// The slower rank bounds the step. Folded from the first rank's, not from zeros:
        /// `host_combine_over_dispatch` may be negative.
        fn worst(all: &[Times]) -> Times {
            all.iter()
                .copied()
                .reduce(|a, t| Times {
                    dispatch: a.dispatch.max(t.dispatch),
                    combine: a.combine.max(t.combine),
                    host: a.host.max(t.host),
                    host_dispatch: a.host_dispatch.max(t.host_dispatch),
                    host_combine: a.host_combine.max(t.host_combine),
                    host_combine_over_dispatch: a.host_combine_over_dispatch.max(t.host_combine_over_dispatch),
                })
                .unwrap_or(Times::NONE)
        }

        /// The medians as numbers, in field order, for an exchange between processes.
        fn to_vec(self) -> Vec<f32> {
            vec![
                self.dispatch,
                self.combine,
                self.host,
                self.host_dispatch,
                self.host_combine,
                self.host_combine_over_dispatch,
            ]
        }

        /// The medians from [`Self::to_vec`]'s numbers.
        fn from_slice(v: &[f32]) -> Option<Times> {
            match *v {
                [
                    dispatch,
                    combine,
                    host,
                    host_dispatch,
                    host_combine,
                    host_combine_over_dispatch,
                ] => Some(Times {
                    dispatch,
                    combine,
                    host,
                    host_dispatch,
                    host_combine,
                    host_combine_over_dispatch,
                }),
                _ => None,
            }
        }

        /// Not measured.
        const NONE: Times = Times {
            dispatch: f32::NAN,
            combine: f32::NAN,
            host: f32::NAN,
            host_dispatch: f32::NAN,
            host_combine: f32::NAN,
            host_combine_over_dispatch: f32::NAN,
        };
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

        /// Tokens the busiest rank sends to other ranks.
        fn max_remote(&self) -> usize {
            (0..self.ranks()).map(|r| self.remote(r)).max().unwrap_or(0)
        }

        fn input(&self, r: usize) -> Res<PrepareInput<'_>> {
            let inp = &self.inputs[r];
            PrepareInput::new(&self.layer, self.tokens, &inp.tokens, &inp.topk_ids, &inp.topk_weights).map_err(err)
        }
    }

    /// Events around a region of a rank's stream.
    struct Clock {
        gpu: Arc<CudaDevice>,
        events: Vec<CudaEvent>,
    }

    impl Clock {
        fn new(gpu: &Arc<CudaDevice>, marks: usize) -> Res<Clock> {
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

    /// One rank of what a row measures (a backend, the NCCL baseline or the ceiling), built
    /// with its inputs uploaded.
    trait Measured {
        /// The rank's GPU, on whose stream the events time the calls.
        fn device(&self) -> &Arc<CudaDevice>;
        /// Enqueues one dispatch without waiting for the host.
        fn enqueue_dispatch(&mut self) -> Res<()>;
        /// Enqueues one combine without waiting for the host.
        fn enqueue_combine(&mut self) -> Res<()>;
        /// Waits for the rank's stream after a call and reports how the call ended.
        fn wait(&self) -> Res<()>;
        /// Dispatch and combine captured as CUDA graphs, where the row measures graphs.
        fn graphs(&self) -> Res<Option<(CudaGraph, CudaGraph)>> {
            Ok(None)
        }
    }

    impl Measured for CudaOneSidedRank {
        fn device(&self) -> &Arc<CudaDevice> {
            self.gpu()
        }

        fn enqueue_dispatch(&mut self) -> Res<()> {
            self.launch(OneSidedPhase::Dispatch).map_err(err)
        }

        fn enqueue_combine(&mut self) -> Res<()> {
            self.launch(OneSidedPhase::Combine).map_err(err)
        }

        fn wait(&self) -> Res<()> {
            self.finish(OneSidedPhase::Combine).map_err(err)
        }

        fn graphs(&self) -> Res<Option<(CudaGraph, CudaGraph)>> {
            Ok(Some((
                self.capture(OneSidedPhase::Dispatch).map_err(err)?,
                self.capture(OneSidedPhase::Combine).map_err(err)?,
            )))
        }
    }

    /// The one-sided backend as `prepare` on device tensors runs it: the dispatch, then the
    /// received regions taken as the Standard format's tensors in place (only swizzled scales
    /// take a pass on the GPU).
    struct OneSidedDelivered {
        backend: CudaOneSidedRank,
    }

    impl OneSidedDelivered {
        fn enqueue(&self) -> moe_a2a::Result<()> {
            self.backend.launch(OneSidedPhase::Dispatch)?;
            self.backend.delivered().map(drop)
        }
    }

    impl Measured for OneSidedDelivered {
        fn device(&self) -> &Arc<CudaDevice> {
            self.backend.gpu()
        }

        fn enqueue_dispatch(&mut self) -> Res<()> {
            self.enqueue().map_err(err)
        }

        fn enqueue_combine(&mut self) -> Res<()> {
            self.backend.enqueue_combine()
        }

        fn wait(&self) -> Res<()> {
            Measured::wait(&self.backend)
        }

        fn graphs(&self) -> Res<Option<(CudaGraph, CudaGraph)>> {
            Ok(Some((
                self.backend.gpu().capture_graph(|| self.enqueue()).map_err(err)?,
                self.backend.capture(OneSidedPhase::Combine).map_err(err)?,
            )))
        }
    }

    /// The one-sided backend with its kernels stamping their phases (eager calls): each call
    /// resets the stamps first and its `wait` keeps them.
    struct TracedOneSided {
        backend: CudaOneSidedRank,
        words: DeviceBuffer,
        samples: Arc<std::sync::Mutex<Vec<[u64; TRACE_WORDS]>>>,
    }

    impl Measured for TracedOneSided {
        fn device(&self) -> &Arc<CudaDevice> {
            self.backend.gpu()
        }

        fn enqueue_dispatch(&mut self) -> Res<()> {
            let reset: Vec<u8> = TracePoint::reset_words().iter().flat_map(|w| w.to_le_bytes()).collect();
            self.words.upload(0, &reset).map_err(err)?;
            self.backend.launch(OneSidedPhase::Dispatch).map_err(err)
        }

        fn enqueue_combine(&mut self) -> Res<()> {
            self.backend.launch(OneSidedPhase::Combine).map_err(err)
        }

        fn wait(&self) -> Res<()> {
            Measured::wait(&self.backend)?;
            let mut bytes = [0u8; 8 * TRACE_WORDS];
            self.words.download(0, &mut bytes).map_err(err)?;
            let mut words = [0u64; TRACE_WORDS];
            for (w, b) in words.iter_mut().zip(bytes.chunks_exact(8)) {
                *w = u64::from_le_bytes(b.try_into().expect("8 bytes"));
            }
            self.samples.lock().unwrap_or_else(|e| e.into_inner()).push(words);
            Ok(())
        }
    }

    impl Measured for CudaTwoSidedRank {
        fn device(&self) -> &Arc<CudaDevice> {
            self.gpu()
        }

        fn enqueue_dispatch(&mut self) -> Res<()> {
            self.launch(TwoSidedPhase::Dispatch).map_err(err)
        }

        fn enqueue_combine(&mut self) -> Res<()> {
            self.launch(TwoSidedPhase::Combine).map_err(err)
        }

        fn wait(&self) -> Res<()> {
            self.finish(TwoSidedPhase::Combine).map_err(err)
        }

        fn graphs(&self) -> Res<Option<(CudaGraph, CudaGraph)>> {
            Ok(Some((
                self.capture(TwoSidedPhase::Dispatch).map_err(err)?,
                self.capture(TwoSidedPhase::Combine).map_err(err)?,
            )))
        }
    }

    impl Measured for CudaAllGatherRank {
        fn device(&self) -> &Arc<CudaDevice> {
            self.gpu()
        }

        fn enqueue_dispatch(&mut self) -> Res<()> {
            self.launch_dispatch().map_err(err)
        }

        fn enqueue_combine(&mut self) -> Res<()> {
            self.launch_combine().map_err(err)
        }

        fn wait(&self) -> Res<()> {
            self.gpu().stream().synchronize().map_err(err)
        }
    }

    /// NCCL all-to-all-v through grouped send/recv: each rank sends `counts[me][peer]` slots to
    /// every other rank (dispatch) and gets one output row back for each (combine).
    struct NcclA2a {
        gpu: Arc<CudaDevice>,
        comm: Comm,
        /// Per peer, tokens this rank sends to it and receives from it (none to itself).
        to: Vec<usize>,
        from: Vec<usize>,
        slot: usize,
        row: usize,
        slots_out: Vec<CudaSlice<u8>>,
        slots_in: Vec<CudaSlice<u8>>,
        rows_out: Vec<CudaSlice<u8>>,
        rows_in: Vec<CudaSlice<u8>>,
    }

    impl NcclA2a {
        fn new(world: &CudaWorld, case: &Case, me: usize, id: Id) -> Res<NcclA2a> {
            let ranks = case.ranks();
            let d = case.layer.dispatch_layout();
            let gpu = world.gpu(me).map_err(err)?.clone();
            let stream = gpu.stream().clone();
            // NCCL takes the device from the thread's current context.
            gpu.context().bind_to_thread().map_err(err)?;
            let comm = Comm::from_rank(stream.clone(), me, ranks, id).map_err(|e| format!("NCCL init: {e:?}"))?;
            let to: Vec<usize> = (0..ranks)
                .map(|p| if p == me { 0 } else { case.counts[me][p] })
                .collect();
            let from: Vec<usize> = (0..ranks)
                .map(|p| if p == me { 0 } else { case.counts[p][me] })
                .collect();
            // NCCL memory needs no peer mapping, so the stream allocator is fine.
            let buffers = |counts: &[usize], bytes: usize| -> Res<Vec<CudaSlice<u8>>> {
                counts
                    .iter()
                    .map(|c| stream.alloc_zeros::<u8>((c * bytes).max(1)).map_err(err))
                    .collect()
            };
            Ok(NcclA2a {
                slots_out: buffers(&to, d.slot_bytes())?,
                slots_in: buffers(&from, d.slot_bytes())?,
                rows_out: buffers(&from, d.combine_row_bytes)?,
                rows_in: buffers(&to, d.combine_row_bytes)?,
                gpu,
                comm,
                to,
                from,
                slot: d.slot_bytes(),
                row: d.combine_row_bytes,
            })
        }
    }

    /// Sends `out_counts[p] * bytes` bytes of `send[p]` to and receives `in_counts[p] * bytes`
    /// into `recv[p]` from every peer `p`, as one NCCL group.
    fn exchange(
        comm: &Comm,
        send: &[CudaSlice<u8>],
        out_counts: &[usize],
        recv: &mut [CudaSlice<u8>],
        in_counts: &[usize],
        bytes: usize,
    ) -> Res<()> {
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
    }

    impl Measured for NcclA2a {
        fn device(&self) -> &Arc<CudaDevice> {
            &self.gpu
        }

        fn enqueue_dispatch(&mut self) -> Res<()> {
            exchange(
                &self.comm,
                &self.slots_out,
                &self.to,
                &mut self.slots_in,
                &self.from,
                self.slot,
            )
        }

        fn enqueue_combine(&mut self) -> Res<()> {
            exchange(
                &self.comm,
                &self.rows_out,
                &self.from,
                &mut self.rows_in,
                &self.to,
                self.row,
            )
        }

        fn wait(&self) -> Res<()> {
            self.gpu.stream().synchronize().map_err(err)
        }
    }

    /// A peer-copy ceiling on one rank, as its dispatch: `bytes` bytes from `src` to `dst` with
    /// 16-byte vectors, one of the two on the next rank's GPU; its combine is empty.
    struct PeerCopy<'a> {
        gpu: Arc<CudaDevice>,
        src: &'a DeviceBuffer,
        dst: &'a DeviceBuffer,
        launch: OneSidedLaunch,
    }

    impl Measured for PeerCopy<'_> {
        fn device(&self) -> &Arc<CudaDevice> {
            &self.gpu
        }

        fn enqueue_dispatch(&mut self) -> Res<()> {
            // SAFETY: `src` and `dst` hold the same number of bytes, one on this GPU and one on
            // the next rank's, which this GPU reaches (peer access, checked in `run`); both
            // outlive the measurement, which waits for the stream after every call.
            unsafe {
                self.gpu
                    .copy_16b(self.src.ptr(), self.dst.ptr(), self.src.bytes(), self.launch)
            }
            .map_err(err)
        }

        fn enqueue_combine(&mut self) -> Res<()> {
            Ok(())
        }

        fn wait(&self) -> Res<()> {
            self.gpu.stream().synchronize().map_err(err)
        }
    }

    /// One rank's call tensors on its GPU.
    struct DeviceInputs {
        tokens: Tensor,
        ids: Tensor,
        weights: Tensor,
        out: Tensor,
    }

    impl DeviceInputs {
        fn new(gpu: &Arc<CudaDevice>, case: &Case, r: usize) -> Res<DeviceInputs> {
            let inp = &case.inputs[r];
            let up = |t: &Tensor| upload_tensor(gpu, t).map_err(err);
            Ok(DeviceInputs {
                tokens: up(&inp.tokens)?,
                ids: up(&inp.topk_ids)?,
                weights: up(&inp.topk_weights)?,
                out: up(&Tensor::zeros(inp.tokens.dtype(), inp.tokens.shape()))?,
            })
        }
    }

    /// Experts that enqueue nothing (the delivered rows stay unread, the output unwritten), so
    /// that the runner and the backend driven by hand differ only by what the runner adds (with
    /// the CUDA reference experts, the difference spread over -11.8 to +10.7 us between runs of
    /// one binary: docs/BENCHMARKS.md, sixth session of 2026-12-07).
    #[derive(Debug)]
    struct EnqueueNothing;

    impl Experts for EnqueueNothing {
        fn activation_format(&self) -> moe_a2a::ActivationFormat {
            moe_a2a::ActivationFormat::Standard
        }
        fn apply(&self, _: &moe_a2a::Dispatched, _: &moe_a2a::ExpertOwnership, _: &mut Tensor) -> moe_a2a::Result<()> {
            Ok(())
        }
    }

    /// A backend from the registry driven by hand on device tensors, as an engine without the
    /// layer runner would: its dispatch is `prepare` then the experts into
    /// `Prepared::expert_output`, its combine `finalize`.
    struct RawLayer {
        gpu: Arc<CudaDevice>,
        layer: LayerConfig,
        backend: Box<dyn PrepareFinalize>,
        experts: Arc<dyn Experts>,
        ownership: moe_a2a::ExpertOwnership,
        inputs: DeviceInputs,
        /// Between dispatch and combine: the call's receipt and the experts' output.
        pending: Option<(Receipt, Tensor)>,
    }

    impl Measured for RawLayer {
        fn device(&self) -> &Arc<CudaDevice> {
            &self.gpu
        }

        fn enqueue_dispatch(&mut self) -> Res<()> {
            let i = &self.inputs;
            let input = PrepareInput::new(
                &self.layer,
                self.backend.max_tokens_per_rank(),
                &i.tokens,
                &i.ids,
                &i.weights,
            )
            .map_err(err)?;
            let prepared = self.backend.prepare(input).map_err(err)?;
            let mut expert_output = prepared
                .expert_output
                .ok_or("the backend offered no expert output on device tensors")?;
            self.experts
                .apply(&prepared.dispatched, &self.ownership, &mut expert_output)
                .map_err(err)?;
            self.pending = Some((prepared.receipt, expert_output));
            Ok(())
        }

        fn enqueue_combine(&mut self) -> Res<()> {
            let (receipt, expert_output) = self.pending.take().ok_or("combine without a dispatch")?;
            self.backend
                .finalize(receipt, &expert_output, &mut self.inputs.out)
                .map_err(err)
        }

        fn wait(&self) -> Res<()> {
            self.gpu.stream().synchronize().map_err(err)
        }
    }

    /// Rank `r`'s context for the registry's backends: a GPU rank over `host`.
    fn rank_context(world: &Arc<CudaWorld>, team: &Team, hosts: &[HostRank], r: usize) -> Res<RankContext> {
        let (host, device) = match team {
            Team::Threads(_) => (hosts[r].clone(), CudaWorldRank::new(world.clone(), r).map_err(err)?),
            Team::Process(p) => (p.host.clone(), p.device.clone()),
        };
        Ok(RankContext::Cuda(CudaRank::new(host, Arc::new(device))))
    }

    /// One call made two ways in turn on one rank: by hand as its dispatch, through the runner
    /// as its combine, so that [`Times::host_combine_over_dispatch`] is the runner's host time
    /// per call over the backend's, call by call.
    struct RawThenRunner {
        raw: RawLayer,
        /// The same backend and experts through `MoeLayer::forward`, on inputs of its own.
        runner: MoeLayer,
        runner_inputs: DeviceInputs,
    }

    impl Measured for RawThenRunner {
        fn device(&self) -> &Arc<CudaDevice> {
            &self.raw.gpu
        }

        fn enqueue_dispatch(&mut self) -> Res<()> {
            self.raw.enqueue_dispatch()?;
            self.raw.enqueue_combine()
        }

        fn enqueue_combine(&mut self) -> Res<()> {
            let i = &mut self.runner_inputs;
            self.runner
                .forward(&i.tokens, &i.ids, &i.weights, &mut i.out)
                .map_err(err)
        }

        fn wait(&self) -> Res<()> {
            self.raw.wait()
        }
    }

    /// `backend` with experts that enqueue nothing, on device tensors, driven by hand and through
    /// `MoeLayer::forward` (two layers of one workspace group), call after call in turn and
    /// eagerly: dispatch / host_dispatch are the hand-driven call's, combine / host_combine the
    /// runner's.
    fn runner_against_raw(world: &Arc<CudaWorld>, team: &Team, case: &Case, backend: &str) -> Res<Times> {
        let hosts = match team {
            Team::Threads(ranks) => thread_hosts(*ranks)?,
            Team::Process(_) => Vec::new(),
        };
        let experts: Arc<dyn Experts> = Arc::new(EnqueueNothing);
        let (times, _) = measure(team, |r| {
            let ctx = rank_context(world, team, &hosts, r)?;
            let gpu = world.gpu(r).map_err(err)?.clone();
            let raw = RawLayer {
                backend: moe_a2a::registry().construct(backend, &case.layer, &ctx).map_err(err)?,
                experts: experts.clone(),
                ownership: case.layer.ownership(r),
                layer: case.layer.clone(),
                inputs: DeviceInputs::new(&gpu, case, r)?,
                pending: None,
                gpu: gpu.clone(),
            };
            let runner =
                MoeLayer::new(moe_a2a::registry(), backend, case.layer.clone(), experts.clone(), ctx).map_err(err)?;
            Ok(RawThenRunner {
                raw,
                runner,
                runner_inputs: DeviceInputs::new(&gpu, case, r)?,
            })
        })?;
        Ok(times)
    }

    /// Times `WARMUP + ITERS` calls of `m`, a host barrier before each, replaying `graphs`
    /// where given and launching eagerly otherwise; returns this rank's medians.
    fn timed<M: Measured>(
        barrier: &dyn Fn() -> Res<()>,
        clock: &Clock,
        m: &mut M,
        graphs: Option<&(CudaGraph, CudaGraph)>,
    ) -> Res<Times> {
        let (mut d, mut c, mut h) = (Vec::new(), Vec::new(), Vec::new());
        let (mut hd, mut hc, mut over) = (Vec::new(), Vec::new(), Vec::new());
        for it in 0..WARMUP + ITERS {
            barrier()?;
            clock.mark(0)?;
            let start = Instant::now();
            match graphs {
                Some((dispatch, _)) => dispatch.launch().map_err(err)?,
                None => m.enqueue_dispatch()?,
            }
            let host_dispatch = start.elapsed().as_secs_f32() * 1e6;
            clock.mark(1)?;
            let start = Instant::now();
            match graphs {
                Some((_, combine)) => combine.launch().map_err(err)?,
                None => m.enqueue_combine()?,
            }
            let host_combine = start.elapsed().as_secs_f32() * 1e6;
            clock.mark(2)?;
            m.wait()?;
            if it >= WARMUP {
                d.push(clock.us(0, 1)?);
                c.push(clock.us(1, 2)?);
                h.push(host_dispatch + host_combine);
                hd.push(host_dispatch);
                hc.push(host_combine);
                over.push(host_combine - host_dispatch);
            }
        }
        Ok(Times {
            dispatch: median(d),
            combine: median(c),
            host: median(h),
            host_dispatch: median(hd),
            host_combine: median(hc),
            host_combine_over_dispatch: median(over),
        })
    }

    /// Builds every rank's `M` at once with `build(rank)` (one thread per rank, so `!Send`
    /// state such as an NCCL communicator is made where it is used; with processes, this
    /// process's rank only), then times eager calls and, where `M` captured them, graph
    /// replays; returns the slower rank's medians.
    fn measure<M: Measured>(team: &Team, build: impl Fn(usize) -> Res<M> + Sync) -> Res<(Times, Option<Times>)> {
        let set_up = |r: usize| {
            build(r).and_then(|m| {
                let graphs = m.graphs()?;
                let clock = Clock::new(m.device(), 3)?;
                Ok((m, graphs, clock))
            })
        };
        let ranks = match team {
            Team::Threads(ranks) => *ranks,
            Team::Process(p) => return measure_process(p, set_up(p.host.rank())),
        };
        let barrier = Barrier::new(ranks);
        let wait = || {
            barrier.wait();
            Ok(())
        };
        // Set by a rank whose build failed, so the others stop instead of waiting for it.
        let failed = AtomicBool::new(false);
        let results: Vec<Res<(Times, Option<Times>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..ranks)
                .map(|r| {
                    let (set_up, barrier, wait, failed) = (&set_up, &barrier, &wait, &failed);
                    s.spawn(move || -> Res<(Times, Option<Times>)> {
                        let built = set_up(r);
                        if built.is_err() {
                            failed.store(true, Ordering::SeqCst);
                        }
                        // Everything allocated, loaded and captured on every rank before any
                        // rank launches a kernel that waits on a peer: mapping memory while a
                        // peer's kernel spins waiting for this rank deadlocks.
                        barrier.wait();
                        let (mut m, graphs, clock) = built?;
                        if failed.load(Ordering::SeqCst) {
                            return Err("not measured: another rank failed to set up".to_string());
                        }
                        let eager = timed(wait, &clock, &mut m, None)?;
                        let graph = graphs
                            .as_ref()
                            .map(|g| timed(wait, &clock, &mut m, Some(g)))
                            .transpose()?;
                        // Every rank's last call is complete before any rank frees memory
                        // that peers' kernels (NCCL's included) may still touch.
                        barrier.wait();
                        Ok((eager, graph))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });
        let mut done = Vec::new();
        let mut errors = Vec::new();
        for (r, result) in results.into_iter().enumerate() {
            match result {
                Ok(t) => done.push(t),
                Err(e) => errors.push(format!("rank {r}: {e}")),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        let eager: Vec<Times> = done.iter().map(|t| t.0).collect();
        let graph: Option<Vec<Times>> = done.iter().map(|t| t.1).collect();
        Ok((Times::worst(&eager), graph.map(|g| Times::worst(&g))))
    }

    /// One rank's `M` as [`measure`] sets it up: with its graphs, where it captures them, and
    /// the events that time it.
    type SetUp<M> = (M, Option<(CudaGraph, CudaGraph)>, Clock);

    /// [`measure`] on this process's rank, `built` as it set up: every rank learns whether
    /// every rank set up before any launches, and every rank's medians through the control
    /// plane.
    fn measure_process<M: Measured>(p: &ProcessRank, built: Res<SetUp<M>>) -> Res<(Times, Option<Times>)> {
        let all = p.all();
        let failed = p
            .host
            .all_gather(&all, "bench: set up", vec![u8::from(built.is_err())])
            .map_err(err)?;
        let (mut m, graphs, clock) = built?;
        if let Some(r) = failed.iter().position(|f| f.first() != Some(&0)) {
            return Err(format!("not measured: rank {r} failed to set up"));
        }
        let wait = || p.barrier();
        let eager = timed(&wait, &clock, &mut m, None)?;
        let graph = graphs
            .as_ref()
            .map(|g| timed(&wait, &clock, &mut m, Some(g)))
            .transpose()?;
        p.barrier()?;
        let mine = [eager.to_vec(), graph.unwrap_or(Times::NONE).to_vec()].concat();
        let per_part = mine.len() / 2;
        let every = p.host.all_gather(&all, "bench: times", mine).map_err(err)?;
        let times = |part: usize| -> Res<Vec<Times>> {
            every
                .iter()
                .map(|v| {
                    v.get(per_part * part..per_part * (part + 1))
                        .and_then(Times::from_slice)
                        .ok_or_else(|| format!("a rank sent {} times, not {}", v.len(), 2 * per_part))
                })
                .collect()
        };
        Ok((
            Times::worst(&times(0)?),
            graph.map(|_| times(1).map(|t| Times::worst(&t))).transpose()?,
        ))
    }

    /// Also returns the blocks rank 0's dispatch and combine launch with.
    fn one_sided(
        world: &CudaWorld,
        team: &Team,
        case: &Case,
        launch: OneSidedLaunch,
    ) -> Res<(Times, Option<Times>, (u32, u32))> {
        let layout = backend_nvlink_one_sided::WorkspaceLayout::for_layer(&case.layer, &case.layer.dispatch_layout());
        let workspaces = team.workspaces(world, layout.bytes())?;
        let blocks = std::sync::Mutex::new((0, 0));
        let (eager, graph) = measure(team, |r| {
            let mut b =
                CudaOneSidedRank::new(&case.layer, world, workspaces.clone(), r, TIMEOUT, launch).map_err(err)?;
            b.upload_inputs(case.input(r)?).map_err(err)?;
            if r == 0 {
                let (dispatch, _) = one_sided::grid(&b, OneSidedPhase::Dispatch).map_err(err)?;
                let (combine, _) = one_sided::grid(&b, OneSidedPhase::Combine).map_err(err)?;
                *blocks.lock().unwrap_or_else(|e| e.into_inner()) = (dispatch, combine);
            }
            Ok(b)
        })?;
        Ok((eager, graph, blocks.into_inner().unwrap_or_else(|e| e.into_inner())))
    }

    /// Each rank's median time (us) from the kernel's earliest block to every trace point, the
    /// dispatch points from the dispatch's start and the combine points from the combine's.
    fn one_sided_phases(world: &CudaWorld, case: &Case, launch: OneSidedLaunch) -> Res<Vec<Vec<f32>>> {
        let layout = backend_nvlink_one_sided::WorkspaceLayout::for_layer(&case.layer, &case.layer.dispatch_layout());
        let workspaces = Arc::new(world.symmetric_alloc(layout.bytes()).map_err(err)?);
        let samples: Vec<_> = (0..case.ranks())
            .map(|_| Arc::new(std::sync::Mutex::new(Vec::new())))
            .collect();
        measure(&Team::Threads(case.ranks()), |r| {
            let mut backend =
                CudaOneSidedRank::new(&case.layer, world, workspaces.clone(), r, TIMEOUT, launch).map_err(err)?;
            backend.upload_inputs(case.input(r)?).map_err(err)?;
            let words = DeviceBuffer::zeroed(world.gpu(r).map_err(err)?, 8 * TRACE_WORDS).map_err(err)?;
            one_sided::set_trace(&mut backend, words.ptr());
            Ok(TracedOneSided {
                backend,
                words,
                samples: samples[r].clone(),
            })
        })?;
        Ok(samples
            .iter()
            .map(|rank| {
                let rank = rank.lock().unwrap_or_else(|e| e.into_inner());
                // The warm-up calls' stamps are left out, as from the timings.
                let measured = &rank[rank.len().saturating_sub(ITERS)..];
                TracePoint::ALL
                    .iter()
                    .map(|&point| {
                        let start = point.kernel_start();
                        median(
                            measured
                                .iter()
                                .map(|w| w[point as usize].saturating_sub(w[start as usize]) as f32 / 1e3)
                                .collect(),
                        )
                    })
                    .collect()
            })
            .collect())
    }

    fn one_sided_delivered(
        world: &CudaWorld,
        team: &Team,
        case: &Case,
        launch: OneSidedLaunch,
    ) -> Res<(Times, Option<Times>)> {
        let layout = backend_nvlink_one_sided::WorkspaceLayout::for_layer(&case.layer, &case.layer.dispatch_layout());
        let workspaces = team.workspaces(world, layout.bytes())?;
        measure(team, |r| {
            let mut backend =
                CudaOneSidedRank::new(&case.layer, world, workspaces.clone(), r, TIMEOUT, launch).map_err(err)?;
            backend.upload_inputs(case.input(r)?).map_err(err)?;
            Ok(OneSidedDelivered { backend })
        })
    }

    fn two_sided(world: &CudaWorld, team: &Team, case: &Case, max_blocks: u32) -> Res<(Times, Option<Times>)> {
        let layout = backend_nvlink_two_sided::WorkspaceLayout::for_layer(&case.layer, &case.layer.dispatch_layout());
        let workspaces = team.workspaces(world, layout.bytes())?;
        let launch = TwoSidedLaunch { max_blocks };
        measure(team, |r| {
            let mut b =
                CudaTwoSidedRank::new(&case.layer, world, workspaces.clone(), r, TIMEOUT, launch).map_err(err)?;
            b.upload_inputs(case.input(r)?).map_err(err)?;
            Ok(b)
        })
    }

    fn allgather(world: &CudaWorld, case: &Case) -> Res<Times> {
        let ranks = case.ranks();
        // One communicator serves every rank only if the dispatch group is the whole world,
        // which EP over all ranks gives.
        if let Some(r) = (0..ranks).find(|&r| group_of(&case.layer, r).len() != ranks) {
            return Err(format!(
                "allgather-rs: rank {r}'s dispatch group is {:?}, not all {ranks} ranks; the benchmark makes one NCCL communicator for the world",
                group_of(&case.layer, r)
            ));
        }
        let id = new_comm_id().map_err(err)?;
        let hosts = thread_hosts(ranks)?;
        let (eager, _) = measure(&Team::Threads(ranks), |r| {
            let gpu = world.gpu(r).map_err(err)?.clone();
            // NCCL takes the device from the thread's current context, and `new` does not
            // make this GPU's current before joining the communicator.
            gpu.context().bind_to_thread().map_err(err)?;
            let mut b = CudaAllGatherRank::new(&case.layer, gpu, &hosts[r], id).map_err(err)?;
            b.upload_inputs(case.input(r)?).map_err(err)?;
            Ok(b)
        })?;
        Ok(eager)
    }

    /// Control-plane ranks for `ranks` rank threads (allgather-rs bounds its waits by their
    /// timeout and names a missing rank through them), taken out of a host world to serve
    /// `measure`'s own rank threads.
    fn thread_hosts(ranks: usize) -> Res<Vec<HostRank>> {
        let config = HostWorldConfig {
            ranks,
            timeout: TIMEOUT,
        };
        run_host_world(config, Ok)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)
    }

    fn nccl(world: &CudaWorld, case: &Case) -> Res<Times> {
        let id = Id::new().map_err(|e| format!("NCCL unique id: {e:?}"))?;
        let (eager, _) = measure(&Team::Threads(case.ranks()), |r| NcclA2a::new(world, case, r, id))?;
        Ok(eager)
    }

    /// The peer-copy ceiling: each rank copies its remote slot bytes into a buffer on the next
    /// rank, all ranks at once.
    /// The peer-copy ceilings of the all-to-alls' remote bytes, measured one after the other
    /// (so one rank's reads never share the links with another's writes): dispatch, every rank
    /// writing its dispatch slots into the next rank's memory; combine, every rank reading its
    /// combine rows from there.
    fn ceiling(world: &CudaWorld, case: &Case, launch: OneSidedLaunch) -> Res<Times> {
        let ranks = case.ranks();
        let d = case.layer.dispatch_layout();
        let copies = |row_bytes: usize, peer_is_src: bool| -> Res<Times> {
            let on = |r: usize, peer: bool| if peer { (r + 1) % ranks } else { r };
            let buffers = |peer: bool| -> Res<Vec<DeviceBuffer>> {
                (0..ranks)
                    .map(|r| DeviceBuffer::zeroed(world.gpu(on(r, peer))?, (case.remote(r) * row_bytes).max(16)))
                    .collect::<Result<_, _>>()
                    .map_err(err)
            };
            let (src, dst) = (buffers(peer_is_src)?, buffers(!peer_is_src)?);
            let (times, _) = measure(&Team::Threads(ranks), |r| {
                Ok(PeerCopy {
                    gpu: world.gpu(r).map_err(err)?.clone(),
                    src: &src[r],
                    dst: &dst[r],
                    launch,
                })
            })?;
            Ok(times)
        };
        let (write, read) = (copies(d.slot_bytes(), false)?, copies(d.combine_row_bytes, true)?);
        Ok(Times {
            dispatch: write.dispatch,
            combine: read.dispatch,
            host: write.host.max(read.host),
            ..Times::NONE
        })
    }

    /// One table row: a backend's times and the bytes its busiest rank moves, in MB.
    struct Row {
        backend: &'static str,
        /// The SMs the row's kernels take: their blocks (dispatch / combine), one per SM.
        sms: String,
        mb: (f32, f32),
        eager: Times,
        graph: Option<Times>,
    }

    /// One table row; the speed-up over NCCL is "-" without the NCCL baseline `base`.
    fn print_row(case: &Case, row: &Row, base: Option<&Times>, ceiling: Option<&Times>) {
        let (e, (d_mb, c_mb)) = (row.eager, row.mb);
        let graph = row
            .graph
            .map_or("-".to_string(), |g| format!("{:.1} / {:.1}", g.dispatch, g.combine));
        let host = match row.graph {
            Some(g) => format!("{:.1} / {:.1}", e.host, g.host),
            None => format!("{:.1} / -", e.host),
        };
        let speed_up = base.map_or("-".to_string(), |b| {
            format!("{:.2} / {:.2}", b.dispatch / e.dispatch, b.combine / e.combine)
        });
        let ceiling = ceiling.map_or("-".to_string(), |c| {
            format!("{:.2} / {:.2}", c.dispatch / e.dispatch, c.combine / e.combine)
        });
        println!(
            "| {} | {} | {} | {} | {d_mb:.2} / {c_mb:.2} | {:.1} | {:.1} | {graph} | {host} | {:.1} / {:.1} | {speed_up} | {ceiling} |",
            case.scheme,
            case.tokens,
            row.backend,
            row.sms,
            e.dispatch,
            e.combine,
            d_mb * 1e3 / e.dispatch,
            c_mb * 1e3 / e.combine,
        );
    }

    /// One entry of `MOE_BENCH_BLOCKS`: `BLOCKS` (default threads) or `BLOCKSxTHREADS`.
    fn parse_launch(entry: &str) -> Res<OneSidedLaunch> {
        let (blocks, threads) = entry.split_once('x').unwrap_or((entry, ""));
        let number = |v: &str| {
            v.parse::<u32>()
                .map_err(|e| format!("want BLOCKS or BLOCKSxTHREADS, e.g. 32x1024 ({e})"))
        };
        Ok(OneSidedLaunch {
            max_blocks: number(blocks)?,
            threads_per_block: if threads.is_empty() {
                CommSms::DEFAULT_THREADS_PER_BLOCK
            } else {
                number(threads)?
            },
        })
    }

    /// One table per grid: for every scheme and token count, each one-sided trace point's
    /// median time since its kernel's start, per rank.
    fn print_phases(
        world: &CudaWorld,
        ranks: usize,
        launch: OneSidedLaunch,
        schemes: &[QuantScheme],
        token_counts: &[usize],
    ) -> Res<()> {
        println!(
            "{ranks} ranks, hidden 7168, 256 experts, top-8, uniform routing, one-sided kernels on at most {} blocks of {} threads, eager calls; us from the kernel's earliest block to each point (moe_kernels::one_sided::TracePoint), median of {ITERS} after {WARMUP} warm-up",
            launch.max_blocks, launch.threads_per_block
        );
        println!();
        let ranks_header: String = (0..ranks).map(|r| format!(" rank {r} |")).collect();
        println!("| scheme | tokens/rank | point |{ranks_header}");
        println!("|---|---|---|{}", "---|".repeat(ranks));
        for &scheme in schemes {
            for &tokens in token_counts {
                let case = Case::new(scheme, tokens, ranks)?;
                let phases = one_sided_phases(world, &case, launch)?;
                for (i, point) in TracePoint::ALL.iter().enumerate() {
                    let cells: String = phases.iter().map(|rank| format!(" {:.1} |", rank[i])).collect();
                    println!("| {scheme} | {tokens} | {point:?} |{cells}");
                }
            }
        }
        println!();
        Ok(())
    }

    pub fn run() -> Res<()> {
        if std::env::var("MOE_BENCH_LAUNCH").is_ok_and(|v| v == "processes") {
            return match std::env::var_os("RANK") {
                None => launch_processes(),
                Some(_) => run_as_process(),
            };
        }
        let gpus = moe_kernels::probe::gpu_count()?;
        let share = moe_kernels::probe::required(moe_kernels::probe::SHARE_GPUS_ENV);
        let ranks = bench_ranks(gpus, share)?;
        // Ranks sharing GPUs measure the host's cost and the kernels' work, not the paths
        // between GPUs; NCCL (the baseline, allgather-rs) needs a GPU per rank and is left out.
        let shared = ranks > gpus;
        let world = Arc::new(CudaWorld::on_devices(&moe_kernels::probe::rank_devices(ranks)?).map_err(err)?);
        // The one-sided and two-sided rows and the ceiling store into peers' memory.
        world
            .peers()
            .check_all_pairs(&(0..ranks).collect::<Vec<_>>())
            .map_err(err)?;
        if std::env::var("MOE_BENCH_PHASES").is_ok_and(|v| v == "1") {
            let (sweep, token_counts, schemes) = cells(&world)?;
            for &launch in &sweep {
                print_phases(&world, ranks, launch, &schemes, &token_counts)?;
            }
            return Ok(());
        }
        tables(&world, &Team::Threads(ranks), shared, gpus)
    }

    /// The ranks to measure: `MOE_BENCH_RANKS`, or every GPU (at least 2 when ranks may share).
    fn bench_ranks(gpus: usize, share: bool) -> Res<usize> {
        let ranks = match std::env::var("MOE_BENCH_RANKS") {
            Ok(v) => v.parse().map_err(|e| format!("MOE_BENCH_RANKS `{v}`: {e}"))?,
            Err(_) if share => gpus.max(2),
            Err(_) => gpus,
        };
        if ranks < 2 || (ranks > gpus && !share) {
            return Err(format!(
                "needs 2 or more GPUs and at most the {gpus} this machine has, asked for {ranks} (MOE_SHARE_GPUS=1 puts several ranks on a GPU)"
            ));
        }
        Ok(ranks)
    }

    /// The grids, token counts and schemes the environment asks for.
    fn cells(world: &CudaWorld) -> Res<(Vec<OneSidedLaunch>, Vec<usize>, Vec<QuantScheme>)> {
        // Unset: what the backends use by default (every SM of the GPU, 1024 threads per block).
        let rank = (0..world.ranks()).find(|&r| world.gpu(r).is_ok()).unwrap_or(0);
        let every_sm = world.comm_grid(rank).map_err(err)?.into();
        Ok((
            env_list("MOE_BENCH_BLOCKS", &[every_sm], parse_launch)?,
            env_list("MOE_BENCH_TOKENS", &TOKENS, positive_count)?,
            env_list("MOE_BENCH_SCHEMES", &SCHEMES, scheme_among(&SCHEMES))?,
        ))
    }

    /// `MOE_BENCH_LAUNCH=processes`, in the parent: starts one process per rank (this binary,
    /// with torchrun's environment on 127.0.0.1) and waits for them, bounded; rank 0 prints.
    fn launch_processes() -> Res<()> {
        let gpus = moe_kernels::probe::gpu_count()?;
        let ranks = bench_ranks(gpus, moe_kernels::probe::required(moe_kernels::probe::SHARE_GPUS_ENV))?;
        let exe = std::env::current_exe().map_err(err)?;
        let port = TcpConfig::free_local_port().map_err(|e| format!("no free port: {e}"))?;
        let run_id = std::process::id().to_string();
        let mut children = Vec::new();
        for rank in 0..ranks {
            let child = Command::new(&exe)
                .envs(TcpConfig::local_launch_env(port, rank, ranks, &run_id))
                .env("MOE_TIMEOUT_MS", TIMEOUT.as_millis().to_string())
                .stdout(if rank == 0 { Stdio::inherit() } else { Stdio::null() })
                .spawn()
                .map_err(|e| format!("starting rank {rank}: {e}"));
            match child {
                Ok(c) => children.push(c),
                Err(e) => {
                    for c in &mut children {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    return Err(e);
                }
            }
        }
        let deadline = Instant::now() + PROCESS_LIMIT;
        let mut failed = Vec::new();
        for (rank, child) in children.iter_mut().enumerate() {
            loop {
                match child.try_wait() {
                    Ok(Some(status)) if status.success() => break,
                    Ok(Some(status)) => {
                        failed.push(format!("rank {rank} exited with {status}"));
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        failed.push(format!("rank {rank} killed after {PROCESS_LIMIT:?}"));
                        break;
                    }
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// How long the processes of `MOE_BENCH_LAUNCH=processes` may run.
    const PROCESS_LIMIT: Duration = Duration::from_secs(540);

    /// `MOE_BENCH_LAUNCH=processes`, in a rank's process: joins the world and its GPU, then
    /// measures the peer-memory rows with the other processes.
    fn run_as_process() -> Res<()> {
        let config = TcpConfig::from_env().map_err(err)?;
        let plane = TcpControlPlane::connect(&config).map_err(err)?;
        let host = HostRank::over_shared(Arc::new(plane), Arc::new(MemfdMemory));
        let ordinal = moe_kernels::probe::process_device(config.local_rank, config.local_world_size)?;
        let device = CudaWorldRank::join(&host, ordinal).map_err(err)?;
        let world = device.world().clone();
        let all: Vec<usize> = (0..host.world_size()).collect();
        world.peers().check_all_pairs(&all).map_err(err)?;
        let gate = host.symmetric_alloc(&all, "bench barrier", all.len()).map_err(err)?;
        let shared = world.ranks_sharing_a_gpu(&all).is_some();
        let gpus = moe_kernels::probe::gpu_count()?;
        let team = Team::Process(ProcessRank {
            host,
            device,
            gate,
            epoch: AtomicU32::new(0),
        });
        tables(&world, &team, shared, gpus)
    }

    /// One table per grid of `MOE_BENCH_BLOCKS`: every row for every scheme and token count
    /// (with processes, the peer-memory backends' rows only).
    fn tables(world: &Arc<CudaWorld>, team: &Team, shared: bool, gpus: usize) -> Res<()> {
        let ranks = team.ranks();
        let threads_only = matches!(team, Team::Threads(_));
        let (sweep, token_counts, schemes) = cells(world)?;
        let say = |line: String| {
            if team.prints() {
                println!("{line}");
            }
        };
        for &launch in &sweep {
            let (max_blocks, threads) = (launch.max_blocks, launch.threads_per_block);
            let launched = if threads_only {
                "threads of one process"
            } else {
                "one process per rank"
            };
            say(format!(
                "{ranks} ranks ({launched}), hidden 7168, 256 experts, top-8, uniform routing, one-sided kernels and the ceiling on at most {max_blocks} blocks of {threads} threads, two-sided on at most {max_blocks} blocks; median of {ITERS} after {WARMUP} warm-up, slower rank; times in us"
            ));
            if shared {
                say(format!(
                    "The {ranks} ranks share {gpus} GPU(s), each on its share of the SMs: kernel times are not times between GPUs, and the NCCL rows (a GPU per rank) are left out."
                ));
            }
            if !threads_only {
                say("With processes, the rows of the peer-memory backends only.".to_string());
            }
            say(String::new());
            say("| scheme | tokens/rank | backend | SMs (dispatch / combine) | remote MB/rank (dispatch / combine) | dispatch | combine | graph (dispatch / combine) | host us/call (eager / graph) | GB/s (dispatch / combine) | speed-up vs NCCL (dispatch / combine) | ceiling / row (dispatch / combine) |".to_string());
            say("|---|---|---|---|---|---|---|---|---|---|---|---|".to_string());
            for &scheme in &schemes {
                for &tokens in &token_counts {
                    let case = Case::new(scheme, tokens, ranks)?;
                    let d = case.layer.dispatch_layout();
                    let mb = |bytes: usize| bytes as f32 / 1e6;
                    let remote = case.max_remote();
                    let a2a_mb = (mb(remote * d.slot_bytes()), mb(remote * d.combine_row_bytes));
                    let (max, k, h) = (
                        case.layer.dispatch_tokens_bound(),
                        case.layer.moe.top_k,
                        case.layer.moe.hidden,
                    );
                    // Every peer's max_tokens rows of image, ids (i32) and weights (f32); f32
                    // output rows for the reduce-scatter.
                    let gathered_mb = (
                        mb((ranks - 1) * max * (d.ids_offset() + 8 * k)),
                        mb((ranks - 1) * max * h * 4),
                    );
                    let base = if shared || !threads_only {
                        None
                    } else {
                        Some(nccl(world, &case)?)
                    };
                    let (one, one_graph, (d_blocks, c_blocks)) = one_sided(world, team, &case, launch)?;
                    let one_sms = format!("{d_blocks} / {c_blocks}");
                    let (delivered, delivered_graph) = one_sided_delivered(world, team, &case, launch)?;
                    let (two, two_graph) = two_sided(world, team, &case, max_blocks)?;
                    let gathered = if shared || !threads_only {
                        None
                    } else {
                        Some(allgather(world, &case)?)
                    };
                    let ceil = if threads_only {
                        Some(ceiling(world, &case, launch)?)
                    } else {
                        None
                    };
                    let mut rows = vec![
                        Row {
                            backend: backend_nvlink_one_sided::NAME,
                            sms: one_sms.clone(),
                            mb: a2a_mb,
                            eager: one,
                            graph: one_graph,
                        },
                        Row {
                            backend: "nvlink-one-sided + device tensors",
                            sms: one_sms.clone(),
                            mb: a2a_mb,
                            eager: delivered,
                            graph: delivered_graph,
                        },
                        Row {
                            backend: backend_nvlink_two_sided::NAME,
                            sms: format!("<= {max_blocks} / <= {max_blocks}"),
                            mb: a2a_mb,
                            eager: two,
                            graph: two_graph,
                        },
                    ];
                    if let (Some(gathered), Some(base)) = (gathered, base) {
                        rows.push(Row {
                            backend: backend_allgather_rs::NAME,
                            sms: "NCCL's".to_string(),
                            mb: gathered_mb,
                            eager: gathered,
                            graph: None,
                        });
                        rows.push(Row {
                            backend: "NCCL all-to-all-v",
                            sms: "NCCL's".to_string(),
                            mb: a2a_mb,
                            eager: base,
                            graph: None,
                        });
                    }
                    if let Some(ceil) = ceil {
                        rows.push(Row {
                            backend: "peer-copy ceiling (write / read)",
                            sms: format!("{max_blocks} / {max_blocks}"),
                            mb: a2a_mb,
                            eager: ceil,
                            graph: None,
                        });
                    }
                    if team.prints() {
                        for row in &rows {
                            print_row(&case, row, base.as_ref(), ceil.as_ref());
                        }
                    }
                }
            }
            say(String::new());
        }
        say("`MoeLayer::forward` on device tensors against the same backend driven by hand (prepare, the experts into `Prepared::expert_output`, finalize), with experts that enqueue nothing, eager, the two taking turns call by call: kernel us is the stream's time for the whole call, host us the time to enqueue it; the runner's host us per call is the median over calls of its call's host time less the hand-driven call's just before; medians of the slower rank".to_string());
        say(String::new());
        say("| scheme | tokens/rank | backend | by hand: kernel / host us | MoeLayer::forward: kernel / host us | runner's host us per call |".to_string());
        say("|---|---|---|---|---|---|".to_string());
        for &scheme in &schemes {
            for &tokens in &token_counts {
                let case = Case::new(scheme, tokens, ranks)?;
                for backend in [backend_nvlink_one_sided::NAME, backend_nvlink_two_sided::NAME] {
                    let t = runner_against_raw(world, team, &case, backend)?;
                    say(format!(
                        "| {scheme} | {tokens} | {backend} | {:.1} / {:.1} | {:.1} / {:.1} | {:+.1} |",
                        t.dispatch, t.host_dispatch, t.combine, t.host_combine, t.host_combine_over_dispatch
                    ));
                }
            }
        }
        say(String::new());
        Ok(())
    }
}
