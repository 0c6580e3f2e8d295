//! The one-sided protocol on two GPUs against the host platform: for the same inputs, each GPU
//! rank receives the same number of tokens from each source, and — with the reference experts
//! run on what the GPU delivered — combines to exactly the bits the host platform produces
//! (same slots' rows, same f32 order), also when dispatch and combine are captured in CUDA
//! graphs and replayed, and when a few small blocks each take many tokens (the batched and
//! grid-stride paths that large calls take on the default grid). The workspace regions handed
//! out in place as the Standard tensors
//! equal the rows read out slot by slot, padding included. Three layers of different layouts
//! constructed through the registry on the same ranks share one workspace, grown to the union
//! when the larger one is constructed, and alternate calls on it with the host platform's bits.
//! Calls with the kernels stamping their phases into trace words stamp every phase in order.
//! A rank that never dispatches makes its peer's dispatch
//! fail with a timeout naming it, instead of hanging; a peer that announces more tokens than a
//! rank holds fails the call on both ranks, and the next call succeeds. Without two GPUs each trial is reported as
//! ignored with the reason; `MOE_REQUIRE_GPU=1` makes that a failure. With `MOE_SHARE_GPUS=1`
//! both ranks run on one GPU when there is only one (the kernels and the protocol, not the
//! path between GPUs).

use moe_core::harness::Routing;
use moe_peer::trials::CudaSuite;

fn main() {
    let mut suite = CudaSuite::new(backend_nvlink_one_sided::NAME, cases::run);
    // bf16, and fp8-block128 with a rank that has no tokens (it routes nothing).
    let empty_first = suite
        .cells()
        .into_iter()
        .filter(|c| c.routing == Routing::EmptyFirstReplica);
    for c in std::iter::once(suite.cells().remove(0)).chain(empty_first) {
        suite.gpu(
            c.trial_name("traced_calls_stamp_every_phase_in_order_and_match_host"),
            move || cases::traced(&c),
        );
    }
    suite.gpu(
        "a_peer_that_announces_more_tokens_than_a_rank_holds_fails_the_call_on_every_rank_and_the_next_succeeds".into(),
        cases::announced_too_many,
    );
    suite.run()
}

#[cfg(not(feature = "cuda"))]
mod cases {
    use moe_core::harness::Cell;
    use moe_peer::trials::{TrialResult, WITHOUT_CUDA};

    pub use moe_peer::trials::built_without_cuda as run;

    pub fn traced(_: &Cell) -> TrialResult {
        Err(WITHOUT_CUDA.into())
    }

    pub fn announced_too_many() -> TrialResult {
        Err(WITHOUT_CUDA.into())
    }
}

#[cfg(feature = "cuda")]
mod cases {
    use std::sync::Arc;
    use std::time::Duration;

    use backend_nvlink_one_sided::cuda::{CudaOneSidedRank, Phase, set_trace};
    use moe_core::harness::{self, CALLS_PER_CELL, Cell};
    use moe_core::{Activations, Dispatched, LayerConfig, MoeError, PrepareInput, Prepared, ScaleLayout, Tensor};
    use moe_kernels::buffer::DeviceBuffer;
    use moe_kernels::cudarc::driver::CudaGraph;
    use moe_kernels::one_sided::{OneSidedLaunch, TRACE_WORDS, TracePoint};
    use moe_kernels::world::CudaWorld;
    use moe_peer::cuda::trials::{self, ProtocolRank, ProtocolUnderTest};
    use moe_peer::trials::{CudaCase, TrialResult};

    /// Runs `case` for the one-sided protocol.
    pub fn run(case: CudaCase) -> TrialResult {
        trials::run::<OneSided>(case)
    }

    /// Rank 0 tells rank 1 it sent one token more than a rank may, and sends none (its input
    /// is empty and its send counter for rank 1 starts past `max_tokens`), as a corrupt peer's
    /// memory might: rank 1's call fails naming it (`CorruptPeerData`; every row from it
    /// padding, none of its ids checked as if filled), rank 0's is abandoned by rank 1, and the
    /// next call gives the oracle's numbers (dispatch leaves the counters at zero).
    pub fn announced_too_many() -> TrialResult {
        let c = trials::integrity_cell::<OneSided>();
        let max = c.layer().map_err(|e| e.to_string())?.dispatch_tokens_bound() as u32;
        trials::a_corrupt_peer_fails_the_call_on_every_rank_and_the_next_succeeds::<OneSided>(&c, 0, &|b, corrupt| {
            if !corrupt {
                return Ok(());
            }
            let counters = b.gpu.buffers().send_counters();
            counters
                .upload(4, &(max + 1).to_le_bytes())
                .map_err(|e| MoeError::Device(e.to_string()))
        })
    }

    /// The one-sided protocol as the shared protocol trials see it.
    struct OneSided;

    /// Whether the kernels stamp their phases into trace words, checked after every call
    /// (eager calls only).
    #[derive(Clone, Copy, Debug, Default)]
    struct Traced(bool);

    /// A one-sided GPU rank, with its trace words where its kernels stamp their phases.
    struct CudaPeerRank {
        gpu: CudaOneSidedRank,
        layer: LayerConfig,
        trace: Option<DeviceBuffer>,
    }

    impl ProtocolRank for CudaPeerRank {
        fn upload_inputs(&mut self, input: PrepareInput<'_>) -> Result<(), MoeError> {
            self.gpu.upload_inputs(input)
        }
        fn capture(&self, p: Phase) -> Result<CudaGraph, MoeError> {
            self.gpu.capture(p)
        }
        fn finish(&self, p: Phase) -> Result<(), MoeError> {
            self.gpu.finish(p)
        }
        /// Also checks the in-place views of a Standard delivery against its rows.
        fn dispatch(&mut self, input: PrepareInput<'_>) -> Result<(Dispatched, Vec<usize>), MoeError> {
            let (dispatched, recv) = self.gpu.dispatch(input)?;
            if self.layer.activation_format == moe_core::ActivationFormat::Standard {
                in_place_views_match(&self.gpu.delivered()?, &dispatched, &self.layer)?;
            }
            Ok((dispatched, recv))
        }
        fn received(&self) -> Result<(Dispatched, Vec<usize>), MoeError> {
            self.gpu.received()
        }
        fn combine(&mut self, expert_output: &Tensor, out: &mut Tensor) -> Result<(), MoeError> {
            self.gpu.combine(expert_output, out)
        }
        fn upload_expert_output(&self, expert_output: &Tensor) -> Result<(), MoeError> {
            self.gpu.upload_expert_output(expert_output)
        }
        fn download_output(&self, out: &mut Tensor) -> Result<(), MoeError> {
            self.gpu.download_output(out)
        }
        fn expert_owners(&self) -> &DeviceBuffer {
            self.gpu.expert_owners()
        }
        fn before_call(&self) -> Result<(), MoeError> {
            if let Some(words) = &self.trace {
                let reset: Vec<u8> = TracePoint::reset_words().iter().flat_map(|w| w.to_le_bytes()).collect();
                words.upload(0, &reset).map_err(|e| MoeError::Device(e.to_string()))?;
            }
            Ok(())
        }
        fn after_call(&self, tokens: usize) -> Result<(), MoeError> {
            match &self.trace {
                Some(words) => check_trace(words, tokens),
                None => Ok(()),
            }
        }
    }

    impl ProtocolUnderTest for OneSided {
        type Protocol = backend_nvlink_one_sided::OneSided;
        type Options = Traced;
        type Rank = CudaPeerRank;

        /// 3 blocks of 64 threads.
        fn small_grid() -> OneSidedLaunch {
            OneSidedLaunch {
                max_blocks: 3,
                threads_per_block: 64,
            }
        }

        fn new_rank(
            layer: &LayerConfig,
            world: &CudaWorld,
            workspaces: Arc<Vec<DeviceBuffer>>,
            rank: usize,
            timeout: Duration,
            launch: OneSidedLaunch,
            Traced(traced): Traced,
        ) -> Result<CudaPeerRank, MoeError> {
            let mut gpu = CudaOneSidedRank::new(layer, world, workspaces, rank, timeout, launch)?;
            let trace = if traced {
                let words = DeviceBuffer::zeroed(
                    world.gpu(rank).map_err(|e| MoeError::Device(e.to_string()))?,
                    8 * TRACE_WORDS,
                )
                .map_err(|e| MoeError::Device(e.to_string()))?;
                set_trace(&mut gpu, words.ptr());
                Some(words)
            } else {
                None
            };
            Ok(CudaPeerRank {
                gpu,
                layer: layer.clone(),
                trace,
            })
        }

        /// The in-place tensors (the experts' output and the top-k ids) lie in the group's
        /// workspace.
        fn check_handed_out(prepared: &Prepared, workspace: &DeviceBuffer) -> Result<(), MoeError> {
            let in_workspace = match (&prepared.expert_output, &prepared.dispatched) {
                (Some(y), Dispatched::Standard { topk_ids, .. }) => inside(y, workspace) && inside(topk_ids, workspace),
                _ => false,
            };
            if !in_workspace {
                return Err(MoeError::Convention(
                    "the in-place tensors are not in the group's workspace".into(),
                ));
            }
            Ok(())
        }

        /// `harness::filled_rows`, sorted: one-sided GPU dispatch numbers slots with atomics.
        fn filled_rows(d: &Dispatched) -> Result<Vec<Vec<u8>>, MoeError> {
            let mut rows = harness::filled_rows(d)?;
            rows.sort();
            Ok(rows)
        }
    }

    /// Calls with the kernels stamping their phases: the outputs still match the host, and
    /// every point is stamped, in the order a call passes them.
    pub fn traced(c: &Cell) -> TrialResult {
        trials::compare_with_host::<OneSided>(c, CALLS_PER_CELL, false, None, Traced(true))
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

    /// Whether device tensor `t` lies in `buffer`.
    fn inside(t: &Tensor, buffer: &DeviceBuffer) -> bool {
        t.device_region().is_some_and(|r| {
            r.address() >= buffer.ptr() && r.address() + r.len() as u64 <= buffer.ptr() + buffer.bytes() as u64
        })
    }
}
