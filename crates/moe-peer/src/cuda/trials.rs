//! The GPU trials of every peer-memory protocol, written once so that every protocol is held to
//! the same checks: calls on GPU ranks against the host platform ([`compare_with_host`]),
//! layers of different layouts on one growing workspace
//! ([`layers_share_one_growing_workspace`]), and a silent peer named in a timeout
//! ([`a_silent_rank_is_named_in_the_timeout`]); [`run`] runs a case of the suite
//! (`crate::trials::CudaSuite`). Each protocol's GPU test driver describes its protocol with a
//! [`ProtocolUnderTest`]; what differs between the protocols (where the in-place tensors may
//! lie, what a rank's delivery must equal) is in that description.

use std::fmt::Display;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use moe_core::experts::{Experts, ReferenceExperts};
use moe_core::harness::{
    self, CALLS_PER_CELL, Cell, HOST, ReplicaInputs, Routing, SHAPES, make_inputs, run_on, run_on_host,
};
use moe_core::host::{HostWorldConfig, run_host_world};
use moe_core::quant::QuantScheme;
use moe_core::routing::SendPlan;
use moe_core::runner::MoeLayer;
use moe_core::workspace_group::GroupLayout;
use moe_core::{
    CudaRank, DType, Dispatched, LayerConfig, MoeError, PrepareFinalize, PrepareInput, Prepared, RankContext, Registry,
    Result, Tensor,
};
use moe_kernels::cudarc::driver::CudaGraph;

use moe_kernels::buffer::DeviceBuffer;
use moe_kernels::tensor::{device_tensor, upload_tensor};
use moe_kernels::world::{CudaWorld, CudaWorldRank};

use super::{CudaProtocol, workspace_group};
use crate::trials::{CudaCase, GPU_RANKS, TrialResult};
use crate::{PeerLayout, PeerProtocol, Phase};

/// The kernel grid of the protocol under test `T`.
pub type Launch<T> = super::Launch<<T as ProtocolUnderTest>::Protocol>;

/// The workspace layout of the protocol under test `T`.
type Layout<T> = <<T as ProtocolUnderTest>::Protocol as crate::PeerProtocol>::Layout;

/// The bytes of the workspace `layer` needs alone under protocol `T`.
fn layout_bytes<T: ProtocolUnderTest>(layer: &LayerConfig) -> usize {
    Layout::<T>::for_layer(layer, &layer.dispatch_layout()).bytes()
}

/// One GPU rank of a peer-memory protocol as the tests drive it: the calls of the backend's
/// `cuda` rank type that [`compare_with_host`] makes, eagerly or through CUDA graphs.
pub trait ProtocolRank {
    /// Copies a call's inputs to the GPU (before a dispatch replayed from a graph).
    fn upload_inputs(&mut self, input: PrepareInput<'_>) -> Result<()>;
    /// Captures `phase` of a call in a CUDA graph.
    fn capture(&self, phase: Phase) -> Result<CudaGraph>;
    /// Waits until `phase` of the current call completed on this rank.
    fn finish(&self, phase: Phase) -> Result<()>;
    /// An eager dispatch: what this rank received (on the host) and the tokens from each source.
    fn dispatch(&mut self, input: PrepareInput<'_>) -> Result<(Dispatched, Vec<usize>)>;
    /// What the last dispatch delivered and the tokens from each source.
    fn received(&self) -> Result<(Dispatched, Vec<usize>)>;
    /// An eager combine of the experts' output into `out`.
    fn combine(&mut self, expert_output: &Tensor, out: &mut Tensor) -> Result<()>;
    /// Copies the experts' output to the GPU (before a combine replayed from a graph).
    fn upload_expert_output(&self, expert_output: &Tensor) -> Result<()>;
    /// Copies the last combine's output to `out`.
    fn download_output(&self, out: &mut Tensor) -> Result<()>;
    /// The table of each expert's EP rank the kernels route by and check received ids against
    /// (`[num_experts]` i32), which a trial overwrites to play a corrupt peer.
    fn expert_owners(&self) -> &DeviceBuffer;
    /// Runs before each call's dispatch (a rank that records the call resets its record).
    fn before_call(&self) -> Result<()> {
        Ok(())
    }
    /// Runs after each call's combine, `tokens` the tokens this rank passed (a rank that
    /// records the call checks its record).
    fn after_call(&self, _tokens: usize) -> Result<()> {
        Ok(())
    }
}

/// Every protocol's GPU rank is driven as it is.
impl<P: CudaProtocol> ProtocolRank for super::CudaPeerRank<P> {
    fn upload_inputs(&mut self, input: PrepareInput<'_>) -> Result<()> {
        super::CudaPeerRank::upload_inputs(self, input)
    }
    fn capture(&self, phase: Phase) -> Result<CudaGraph> {
        super::CudaPeerRank::capture(self, phase)
    }
    fn finish(&self, phase: Phase) -> Result<()> {
        super::CudaPeerRank::finish(self, phase)
    }
    fn dispatch(&mut self, input: PrepareInput<'_>) -> Result<(Dispatched, Vec<usize>)> {
        super::CudaPeerRank::dispatch(self, input)
    }
    fn received(&self) -> Result<(Dispatched, Vec<usize>)> {
        super::CudaPeerRank::received(self)
    }
    fn combine(&mut self, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        super::CudaPeerRank::combine(self, expert_output, out)
    }
    fn upload_expert_output(&self, expert_output: &Tensor) -> Result<()> {
        super::CudaPeerRank::upload_expert_output(self, expert_output)
    }
    fn download_output(&self, out: &mut Tensor) -> Result<()> {
        super::CudaPeerRank::download_output(self, out)
    }
    fn expert_owners(&self) -> &DeviceBuffer {
        super::CudaPeerRank::expert_owners(self)
    }
}

/// A peer-memory protocol under test: its GPU protocol, the GPU ranks the tests drive, and the
/// checks that differ between protocols.
pub trait ProtocolUnderTest {
    /// The protocol.
    type Protocol: CudaProtocol;
    /// What a trial asks of each rank beyond the protocol's calls; the default for the trials
    /// that ask nothing.
    type Options: Copy + Send + Sync + Default;
    /// One GPU rank of the protocol.
    type Rank: ProtocolRank;

    /// A grid of a few small blocks: far fewer threads than the cells of
    /// `Cell::many_tokens` have tokens, so that each takes many.
    fn small_grid() -> Launch<Self>;

    /// Rank `rank` of `layer` on `world`, on `workspaces` (one per rank, of the layer's
    /// layout's bytes), waiting at most `timeout` for its peers.
    fn new_rank(
        layer: &LayerConfig,
        world: &CudaWorld,
        workspaces: Arc<Vec<DeviceBuffer>>,
        rank: usize,
        timeout: Duration,
        launch: Launch<Self>,
        options: Self::Options,
    ) -> Result<Self::Rank>;
    /// Fails unless the device tensors `prepared` hands out lie where the protocol puts them,
    /// `workspace` being this rank's buffer of the group's workspace.
    fn check_handed_out(prepared: &Prepared, workspace: &DeviceBuffer) -> Result<()>;
    /// The filled rows of a delivery, as two deliveries of the same tokens must agree on them
    /// (see `moe_core::harness::filled_rows`).
    fn filled_rows(d: &Dispatched) -> Result<Vec<Vec<u8>>> {
        harness::filled_rows(d)
    }
    /// Fails unless what rank `rank` received, `received`, is what the protocol delivers
    /// there when source `s` passes `inputs[s]` (beyond the tokens per source and the output,
    /// which every protocol is held to).
    fn check_received(
        _layer: &LayerConfig,
        _inputs: &[ReplicaInputs],
        _rank: usize,
        _received: &Dispatched,
    ) -> TrialResult {
        Ok(())
    }
}

/// The bound of every wait in a trial's calls: `MOE_TIMEOUT_MS`, 5 s by default. Under
/// compute-sanitizer a rank's instrumented kernel can run far longer than that while its peer
/// on the same GPU waits for it (`sanitize.sh` raises the bound).
fn wait_bound() -> Result<Duration, String> {
    match std::env::var("MOE_TIMEOUT_MS") {
        Err(_) => Ok(Duration::from_secs(5)),
        Ok(v) => v
            .parse()
            .map(Duration::from_millis)
            .map_err(|_| format!("MOE_TIMEOUT_MS={v:?} is not a number of milliseconds")),
    }
}

fn text(e: impl Display) -> String {
    e.to_string()
}

fn device_error(e: impl Display) -> MoeError {
    MoeError::Device(e.to_string())
}

/// Runs `case` of the GPU suite for protocol `U`.
pub fn run<U: ProtocolUnderTest>(case: CudaCase) -> TrialResult {
    let options = U::Options::default();
    match case {
        CudaCase::MatchesHost(c) => compare_with_host::<U>(&c, CALLS_PER_CELL, false, None, options),
        CudaCase::MatchesHostOnASmallGrid(c) => {
            compare_with_host::<U>(&c, CALLS_PER_CELL, false, Some(U::small_grid()), options)
        }
        // Three calls replaying graphs captured once, with fresh inputs each.
        CudaCase::GraphReplay(c) => compare_with_host::<U>(&c, 3, true, None, options),
        CudaCase::SharedWorkspace => {
            layers_share_one_growing_workspace::<U>(&shared_cells(<U::Protocol as PeerProtocol>::NAME))
        }
        CudaCase::CallIntegrity => {
            a_call_that_fails_on_one_rank_fails_on_every_rank_and_the_next_succeeds::<U>(&integrity_cell::<U>())
        }
        CudaCase::PeerOnAnotherLayer => a_peer_running_another_layers_call_hands_these_experts_no_foreign_id::<U>(
            &shared_cells(<U::Protocol as PeerProtocol>::NAME),
        ),
        CudaCase::CorruptPeer(tokens) => {
            let mut c = integrity_cell::<U>();
            if let Some(tokens) = tokens {
                c.shape.max_tokens_per_rank = tokens;
                c.shape.tokens = tokens;
                c = c.reseeded();
            }
            a_peer_with_a_corrupt_expert_table_fails_the_call_on_every_rank_and_the_next_succeeds::<U>(&c)
        }
        CudaCase::SilentRank => {
            let mut c = Cell::protocol_cells(<U::Protocol as PeerProtocol>::NAME, GPU_RANKS).remove(0);
            c.shape = SHAPES[0];
            a_silent_rank_is_named_in_the_timeout::<U>(&c)
        }
    }
}

/// The cell of the call-integrity trials: bf16, Standard, uniform routing, on [`GPU_RANKS`].
pub fn integrity_cell<U: ProtocolUnderTest>() -> Cell {
    Cell::protocol(
        <U::Protocol as PeerProtocol>::NAME,
        GPU_RANKS,
        QuantScheme::Bf16,
        1,
        Routing::Uniform,
    )
    .reseeded()
}

/// The layers of [`layers_share_one_growing_workspace`], in construction order: a small bf16
/// layer; an nvfp4 layer of three times the tokens per rank (smaller slots, more rows: neither
/// layout covers the other, so it grows the group to their union); a bf16 layer of half the
/// hidden size and fewer tokens per rank, which the union covers.
fn shared_cells(backend: &str) -> [Cell; 3] {
    let cell = |scheme: QuantScheme, max_tokens: usize, tokens: usize| {
        let mut c = Cell::protocol(backend, GPU_RANKS, scheme, 0, Routing::Uniform);
        c.shape.max_tokens_per_rank = max_tokens;
        c.shape.tokens = tokens;
        c.reseeded()
    };
    let mut half = cell(QuantScheme::Bf16, 8, 7);
    half.shape.hidden = SHAPES[1].hidden;
    [
        cell(QuantScheme::Bf16, 16, 5),
        cell(QuantScheme::Nvfp4, 48, 40),
        half.reseeded(),
    ]
}

/// One call on one rank: what it received, the tokens from each source, the output bytes.
struct CallRun {
    received: Dispatched,
    recv: Vec<usize>,
    out: Vec<u8>,
}

/// `calls` calls of `c` on GPU ranks of protocol `P` against the host platform with the same
/// inputs: each rank receives the tokens each source sent it, passes `P`'s check of its
/// delivery, and — with the reference experts run on what it received — combines to exactly
/// the host platform's output bits. `graph`: dispatch and combine each captured once in a CUDA
/// graph and replayed for every call; `launch`: the kernels' grid, `None` for the world's
/// default (every SM); `options`: what each rank is asked beyond the protocol.
pub fn compare_with_host<P: ProtocolUnderTest>(
    c: &Cell,
    calls: u64,
    graph: bool,
    launch: Option<Launch<P>>,
    options: P::Options,
) -> TrialResult {
    let layer = c.layer().map_err(text)?;
    let ranks = layer.parallel.world_size();
    let calls: Vec<_> = (0..calls).map(|i| make_inputs(c, &layer, i)).collect();
    let experts = Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant));

    let host = run_on_host(Registry::global(), c, &layer, &experts, &calls);

    let world = CudaWorld::on_devices(&moe_kernels::probe::rank_devices(ranks)?).map_err(text)?;
    let launch: Launch<P> = match launch {
        Some(launch) => launch,
        None => world.comm_grid(0).map_err(text)?.into(),
    };
    let max_tokens = layer.dispatch_tokens_bound();
    let bound = wait_bound()?;
    let workspaces = Arc::new(world.symmetric_alloc(layout_bytes::<P>(&layer)).map_err(text)?);
    // Every rank allocates, loads its kernels and captures its graphs before any rank starts
    // waiting on its peers (see moe_kernels::buffer).
    let constructed = Barrier::new(ranks);
    let gpu: Vec<Result<Vec<CallRun>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|r| {
                let (world, workspaces, layer, calls, experts) = (&world, workspaces.clone(), &layer, &calls, &experts);
                let constructed = &constructed;
                s.spawn(move || -> Result<Vec<CallRun>> {
                    let built = P::new_rank(layer, world, workspaces, r, bound, launch, options).and_then(|mut b| {
                        if !graph {
                            return Ok((b, None));
                        }
                        let first = &calls[0][r];
                        b.upload_inputs(PrepareInput::new(
                            layer,
                            max_tokens,
                            &first.tokens,
                            &first.topk_ids,
                            &first.topk_weights,
                        )?)?;
                        let graphs = (b.capture(Phase::Dispatch)?, b.capture(Phase::Combine)?);
                        Ok((b, Some(graphs)))
                    });
                    constructed.wait();
                    let (mut b, graphs) = built?;
                    let replay = |g: &CudaGraph| g.launch().map_err(|e| MoeError::Device(format!("graph launch: {e}")));
                    let ownership = layer.ownership(r);
                    let mut runs = Vec::new();
                    for inputs in calls {
                        let inp = &inputs[r];
                        let input =
                            PrepareInput::new(layer, max_tokens, &inp.tokens, &inp.topk_ids, &inp.topk_weights)?;
                        b.before_call()?;
                        let (received, recv) = match &graphs {
                            None => b.dispatch(input)?,
                            Some((dispatch, _)) => {
                                b.upload_inputs(input)?;
                                replay(dispatch)?;
                                b.finish(Phase::Dispatch)?;
                                b.received()?
                            }
                        };
                        let mut y = Tensor::zeros(c.input_dtype.dtype(), &[ranks * max_tokens, layer.moe.hidden]);
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
                        b.after_call(inp.tokens.shape()[0])?;
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
        return Err(errors.join("\n"));
    }
    for (r, (g, h)) in gpu.into_iter().zip(host).enumerate() {
        let g = g.map_err(|e| format!("GPU rank {r}: {e}"))?;
        let h = h.map_err(|e| format!("host rank {r}: {e}"))?;
        for (call, (run, host_out)) in g.iter().zip(&h).enumerate() {
            let sent_here: Vec<usize> = calls[call]
                .iter()
                .map(|inp| SendPlan::new(&inp.topk_ids.to_i32(), layer.moe.top_k, &layer.placement()).counts()[r])
                .collect();
            if run.recv != sent_here {
                return Err(format!(
                    "call {call} rank {r}: received {:?} tokens per source, sent {sent_here:?}",
                    run.recv
                ));
            }
            P::check_received(&layer, &calls[call], r, &run.received)
                .map_err(|e| format!("call {call} rank {r}: {e}"))?;
            if let Some(i) = run.out.iter().zip(host_out.bytes()).position(|(a, b)| a != b) {
                return Err(format!(
                    "call {call} rank {r}: output byte {i} differs (GPU 0x{:02x}, host 0x{:02x})",
                    run.out[i],
                    host_out.bytes()[i]
                ));
            }
        }
    }
    Ok(())
}

/// Rank 0 of `cell` dispatches while rank 1 never does: the dispatch fails with a timeout
/// naming rank 1 instead of hanging.
pub fn a_silent_rank_is_named_in_the_timeout<P: ProtocolUnderTest>(cell: &Cell) -> TrialResult {
    let layer = cell.layer().map_err(text)?;
    let inputs = make_inputs(cell, &layer, 0);
    let world = CudaWorld::on_devices(&moe_kernels::probe::rank_devices(layer.parallel.world_size())?).map_err(text)?;
    let launch: Launch<P> = world.comm_grid(0).map_err(text)?.into();
    let workspaces = Arc::new(world.symmetric_alloc(layout_bytes::<P>(&layer)).map_err(text)?);
    let mut b = P::new_rank(
        &layer,
        &world,
        workspaces,
        0,
        Duration::from_millis(300),
        launch,
        P::Options::default(),
    )
    .map_err(text)?;
    let inp = &inputs[0];
    let input = PrepareInput::new(
        &layer,
        layer.dispatch_tokens_bound(),
        &inp.tokens,
        &inp.topk_ids,
        &inp.topk_weights,
    )
    .map_err(text)?;
    // Rank 1 never dispatches: rank 0 waits for it in vain.
    match b.dispatch(input) {
        Err(MoeError::Timeout {
            rank: 0, waited_for, ..
        }) if waited_for == [1] => Ok(()),
        Err(e) => Err(format!("expected a timeout naming rank 1, got: {e}")),
        Ok(_) => Err("dispatch completed although rank 1 never dispatched".to_string()),
    }
}

/// Calls per layer in [`layers_share_one_growing_workspace`].
const SHARED_CALLS: u64 = 3;

/// Whether call `call` of layer `j` runs on device tensors (else host tensors): neighbouring
/// layers take different paths, and so does each layer from call to call.
fn on_device(call: u64, j: usize) -> bool {
    (call as usize + j) % 2 == 1
}

/// A device-path call's tensors, allocated before any rank launches (see moe_kernels::buffer).
struct Staged {
    tokens: Tensor,
    ids: Tensor,
    weights: Tensor,
    out: Tensor,
    expert_output: Tensor,
    expert_output_buffer: Arc<DeviceBuffer>,
}

/// Uploads a call's inputs and a zeroed output, and allocates the experts' output.
fn stage(device: &CudaWorldRank, layer: &LayerConfig, inp: &ReplicaInputs) -> Result<Staged> {
    let gpu = device.gpu();
    let dtype = layer.moe.input_dtype.dtype();
    let rows = layer.parallel.world_size() * layer.dispatch_tokens_bound();
    let expert_output_buffer =
        Arc::new(DeviceBuffer::zeroed(gpu, rows * layer.moe.hidden * dtype.size()).map_err(device_error)?);
    Ok(Staged {
        tokens: upload_tensor(gpu, &inp.tokens)?,
        ids: upload_tensor(gpu, &inp.topk_ids)?,
        weights: upload_tensor(gpu, &inp.topk_weights)?,
        out: upload_tensor(gpu, &Tensor::zeros(dtype, inp.tokens.shape()))?,
        expert_output: device_tensor(&expert_output_buffer, 0, dtype, &[rows, layer.moe.hidden])?,
        expert_output_buffer,
    })
}

/// One call of layer `b` of protocol `P` on host or device tensors: its delivery (on the host)
/// and output. On device tensors, what `prepare` hands out must pass `P`'s check against the
/// group's workspace (`workspace`, this rank's).
fn call<P: ProtocolUnderTest>(
    b: &mut dyn PrepareFinalize,
    layer: &LayerConfig,
    experts: &ReferenceExperts,
    r: usize,
    inp: &ReplicaInputs,
    staged: Option<&mut Staged>,
    workspace: &DeviceBuffer,
) -> Result<(Dispatched, Vec<u8>)> {
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
        // As many rows as the delivery has: a backend may deliver more than the layer's own.
        let Dispatched::Standard { topk_ids, .. } = &prepared.dispatched else {
            return Err(MoeError::Convention("expected a Standard delivery".into()));
        };
        let mut y = Tensor::zeros(dtype, &[topk_ids.shape()[0], layer.moe.hidden]);
        experts.apply(&prepared.dispatched, &layer.ownership(r), &mut y)?;
        let mut out = Tensor::zeros(dtype, inp.tokens.shape());
        out.poison();
        b.finalize(prepared.receipt, &y, &mut out)?;
        return Ok((prepared.dispatched, out.bytes().to_vec()));
    };
    let prepared = b.prepare(PrepareInput::new(layer, max, &st.tokens, &st.ids, &st.weights)?)?;
    P::check_handed_out(&prepared, workspace)?;
    let received = prepared.dispatched.to_host()?;
    let mut y = Tensor::zeros(dtype, &[layer.parallel.world_size() * max, layer.moe.hidden]);
    experts.apply(&received, &layer.ownership(r), &mut y)?;
    st.expert_output_buffer.upload(0, y.bytes()).map_err(device_error)?;
    b.finalize(prepared.receipt, &st.expert_output, &mut st.out)?;
    b.wait()?;
    Ok((received, st.out.to_host()?.bytes().to_vec()))
}

/// Layers of `cells` (of different layouts, small first) through the registry's constructor
/// on the same GPU ranks of protocol `P`, so the second grows the rank's workspace group and
/// the third fits in it (the trial fails unless their layouts are so): a call prepared before the growth fails in finalize, a layer of
/// another top_k is refused, every layer reports the union's workspace, which the group holds
/// once per rank (generation 2); then calls alternate between the layers, each on host or
/// device tensors in turn, and each delivers the rows (padding included, as `P` compares them)
/// and the output bits of the host platform.
pub fn layers_share_one_growing_workspace<P: ProtocolUnderTest>(cells: &[Cell; 3]) -> TrialResult {
    let layers: Vec<LayerConfig> = cells.iter().map(|c| c.layer()).collect::<Result<_>>().map_err(text)?;
    let own: Vec<Layout<P>> = layers
        .iter()
        .map(|l| Layout::<P>::for_layer(l, &l.dispatch_layout()))
        .collect();
    let union = own[0].union(own[1]);
    if own[0].covers(&own[1]) || own[1].covers(&own[0]) || !union.covers(&own[2]) {
        return Err(format!(
            "the second layout must grow the first and the third fit their union: {own:?}"
        ));
    }
    let ranks = layers[0].parallel.world_size();
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

    let world = Arc::new(CudaWorld::on_devices(&moe_kernels::probe::rank_devices(ranks)?).map_err(text)?);
    let mut other_top_k = cells[0].clone();
    other_top_k.shape.top_k = 1;
    let other_top_k = other_top_k.layer().map_err(text)?;
    let config = HostWorldConfig {
        ranks,
        timeout: Duration::from_secs(60),
    };
    let union_bytes = union.bytes();
    let gpu = run_host_world(config, |rank| {
        let r = rank.rank();
        let group_ranks: Vec<usize> = (0..ranks).collect();
        let device = CudaWorldRank::new(world.clone(), r).map_err(|e| MoeError::Device(e.to_string()))?;
        let ctx = RankContext::Cuda(CudaRank::new(rank.clone(), Arc::new(device.clone())));
        let registry = Registry::global();
        let mut first = registry.construct(<P::Protocol as crate::PeerProtocol>::NAME, &layers[0], &ctx)?;
        let inp = &calls[0][0][r];
        let early = first.prepare(PrepareInput::new(
            &layers[0],
            first.max_tokens_per_rank(),
            &inp.tokens,
            &inp.topk_ids,
            &inp.topk_weights,
        )?)?;
        let second = registry.construct(<P::Protocol as crate::PeerProtocol>::NAME, &layers[1], &ctx)?;
        let dtype = layers[0].moe.input_dtype.dtype();
        let rows = ranks * first.max_tokens_per_rank();
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
        match registry.construct(<P::Protocol as crate::PeerProtocol>::NAME, &other_top_k, &ctx) {
            Err(MoeError::WorkspaceGroupMismatch { field: "top_k", .. }) => {}
            other => {
                return Err(MoeError::Convention(format!(
                    "a layer of another top_k gave {other:?}, not the group mismatch"
                )));
            }
        }
        let mut built = vec![first, second];
        for layer in &layers[2..] {
            built.push(registry.construct(<P::Protocol as crate::PeerProtocol>::NAME, layer, &ctx)?);
        }
        let reported: Vec<usize> = built.iter().map(|b| b.workspace_bytes()).collect();
        let group = workspace_group::<Layout<P>>(
            &device,
            &rank,
            <P::Protocol as crate::PeerProtocol>::NAME,
            &group_ranks,
            None,
        );
        let (generation, layout, workspaces) = {
            let g = group.lock().unwrap_or_else(|e| e.into_inner());
            let w = g.current();
            (w.generation, w.layout, w.memory.clone())
        };
        let sizes: Vec<usize> = workspaces.iter().map(|w| w.bytes()).collect();
        if (generation, layout) != (2, union)
            || reported != vec![union_bytes; layers.len()]
            || sizes != vec![union_bytes; ranks]
        {
            return Err(MoeError::Convention(format!(
                "rank {r}: generation {generation}, layout {layout:?}, layers report {reported:?} bytes, buffers {sizes:?}; expected one rebuild to {union:?} ({union_bytes} bytes)"
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
        rank.barrier(&group_ranks, "device calls staged")?;
        let mut seen = Vec::new();
        for (call, staged) in calls.iter().zip(staged.iter_mut()) {
            for (j, (inputs, st)) in call.iter().zip(staged.iter_mut()).enumerate() {
                seen.push(self::call::<P>(
                    built[j].as_mut(),
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
        let g = g.map_err(|e| format!("GPU rank {r}: {e}"))?;
        for (i, (received, out)) in g.iter().enumerate() {
            let (call, j) = (i / cells.len(), i % cells.len());
            let want = &host[j][r].as_ref().map_err(|e| format!("host rank {r}: {e}"))?[call];
            let what = format!(
                "rank {r} call {call} of layer {j} on {} tensors",
                if on_device(call as u64, j) { "device" } else { "host" }
            );
            if P::filled_rows(received).map_err(|e| format!("{what}: {e}"))?
                != P::filled_rows(&want.received).map_err(text)?
            {
                return Err(format!("{what}: other rows than on the host platform"));
            }
            if let Some(i) = out.iter().zip(want.out.bytes()).position(|(a, b)| a != b) {
                return Err(format!(
                    "{what}: output byte {i} differs (GPU 0x{:02x}, host 0x{:02x})",
                    out[i],
                    want.out.bytes()[i]
                ));
            }
        }
    }
    Ok(())
}

/// `inp` with an expert id out of range in its first slot.
fn with_bad_id(inp: &ReplicaInputs, num_experts: usize) -> ReplicaInputs {
    let mut ids = inp.topk_ids.to_i32();
    ids[0] = num_experts as i32 + 7;
    ReplicaInputs {
        topk_ids: Tensor::from_i32(inp.topk_ids.shape(), &ids),
        ..inp.clone()
    }
}

/// The first error of a call on device tensors: its prepare's, its finalize's or its wait's.
fn device_call(b: &mut dyn PrepareFinalize, layer: &LayerConfig, st: &mut Staged) -> Result<()> {
    device_call_inspecting(b, layer, st, |_| Ok(()))
}

/// [`device_call`], with `inspect` run on what `prepare` handed out before the finalize (its
/// error ends the call there).
fn device_call_inspecting(
    b: &mut dyn PrepareFinalize,
    layer: &LayerConfig,
    st: &mut Staged,
    inspect: impl FnOnce(&Prepared) -> Result<()>,
) -> Result<()> {
    let prepared = b.prepare(PrepareInput::new(
        layer,
        b.max_tokens_per_rank(),
        &st.tokens,
        &st.ids,
        &st.weights,
    )?)?;
    inspect(&prepared)?;
    b.finalize(prepared.receipt, &st.expert_output, &mut st.out)?;
    b.wait()
}

/// Two GPU ranks of protocol `P` with two layers of different layouts in one workspace group
/// (the first two of `cells`), on device tensors. In the first call rank 1 runs the first
/// layer's call and rank 0 the second's, so rank 0 writes rows of the other layout into rank
/// 1's workspace: both calls fail (each rank sees the other's word of another layer), and every
/// top-k id rank 1's `prepare` hands its experts is -1 or an expert of rank 1, whatever the
/// workspace holds (the experts may run before the host reads the status; the workspace is
/// fresh, so rows nobody wrote hold id 0, an expert of rank 0). Each rank's error names the
/// other rank. The second call, both on the first layer, succeeds on both ranks.
pub fn a_peer_running_another_layers_call_hands_these_experts_no_foreign_id<P: ProtocolUnderTest>(
    cells: &[Cell; 3],
) -> TrialResult {
    let name = <P::Protocol as PeerProtocol>::NAME;
    let layers = [cells[0].layer().map_err(text)?, cells[1].layer().map_err(text)?];
    let ranks = layers[0].parallel.world_size();
    let inputs = [
        make_inputs(&cells[0], &layers[0], 0),
        make_inputs(&cells[1], &layers[1], 0),
    ];
    let later = make_inputs(&cells[0], &layers[0], 1);
    let placement = layers[0].placement();
    let experts = layers[0].moe.num_experts;
    let world = Arc::new(CudaWorld::on_devices(&moe_kernels::probe::rank_devices(ranks)?).map_err(text)?);
    let config = HostWorldConfig {
        ranks,
        timeout: wait_bound()? + Duration::from_secs(60),
    };
    let outcomes = run_host_world(config, |rank| -> Result<[Result<()>; 2]> {
        let r = rank.rank();
        let group: Vec<usize> = (0..ranks).collect();
        let device = CudaWorldRank::new(world.clone(), r).map_err(|e| MoeError::Device(e.to_string()))?;
        let ctx = RankContext::Cuda(CudaRank::new(rank.clone(), Arc::new(device.clone())));
        let mut built = Vec::new();
        for layer in &layers {
            built.push(Registry::global().construct(name, layer, &ctx)?);
        }
        let mine = if r == 0 { 1 } else { 0 };
        let mut first = stage(&device, &layers[mine], &inputs[mine][r])?;
        let mut second = stage(&device, &layers[0], &later[r])?;
        rank.barrier(&group, "built")?;
        // Whether rank 1 checked what its prepare handed out.
        let mut checked = false;
        let mixed = device_call_inspecting(built[mine].as_mut(), &layers[mine], &mut first, |prepared| {
            if r != 1 {
                return Ok(());
            }
            let Dispatched::Standard { topk_ids, .. } = &prepared.dispatched else {
                return Err(MoeError::Convention("expected a Standard delivery".into()));
            };
            let ids = topk_ids.to_host()?.to_i32();
            checked = true;
            let ours = |id: i32| id == -1 || (id >= 0 && (id as usize) < experts && placement.owner(id as usize) == 1);
            match ids.into_iter().find(|&id| !ours(id)) {
                Some(id) => Err(MoeError::Convention(format!(
                    "prepare handed the experts id {id}, neither -1 nor an expert of rank 1"
                ))),
                None => Ok(()),
            }
        });
        let mixed = match mixed {
            Err(e) if !checked && r == 1 => Err(MoeError::Convention(format!(
                "prepare failed before handing anything out: {e}"
            ))),
            other => other,
        };
        rank.barrier(&group, "mixed call done")?;
        let next = device_call(built[0].as_mut(), &layers[0], &mut second);
        Ok([mixed, next])
    });
    for (r, outcome) in outcomes.into_iter().enumerate() {
        let [mixed, next] = outcome.map_err(|e| format!("GPU rank {r}: {e}"))?;
        let other = 1 - r;
        match mixed {
            Err(MoeError::Convention(detail)) => return Err(format!("GPU rank {r}, the mixed call: {detail}")),
            // Each rank finds the other's word of another layer, or the other's call abandoned
            // once it found that: either way the error names the other rank.
            Err(MoeError::CallMismatch { rank, peer, .. } | MoeError::PeerAbandoned { rank, peer, .. })
                if rank == r && peer == other => {}
            Err(e) => {
                return Err(format!(
                    "GPU rank {r}, the mixed call: expected an error naming rank {other}'s other call, got: {e}"
                ));
            }
            Ok(_) => {
                return Err(format!(
                    "GPU rank {r}, the mixed call: succeeded, and should have failed"
                ));
            }
        }
        next.map_err(|e| format!("GPU rank {r}, the call after it: {e}"))?;
    }
    Ok(())
}

/// On GPU ranks of protocol `P` (the layer runner on host tensors, and the raw backend on
/// device tensors), each of these fails one call on every rank, and the next call gives the
/// oracle's numbers on every rank: rank 0's host input with a bad id (its peers' call fails
/// naming it, abandoned); rank 1 coming after its peers' timeout (it fails at once, its peers
/// are past the call); rank 0's device input with a bad id (found by the dispatch kernel, which
/// publishes the call abandoned).
pub fn a_call_that_fails_on_one_rank_fails_on_every_rank_and_the_next_succeeds<P: ProtocolUnderTest>(
    cell: &Cell,
) -> TrialResult {
    let name = <P::Protocol as PeerProtocol>::NAME;
    let layer = cell.layer().map_err(text)?;
    let ranks = layer.parallel.world_size();
    let calls: Vec<_> = (0..8).map(|i| make_inputs(cell, &layer, i)).collect();
    let experts: Arc<dyn Experts> = Arc::new(ReferenceExperts::new(cell.expert_function(), cell.format, cell.quant));
    let world = Arc::new(CudaWorld::on_devices(&moe_kernels::probe::rank_devices(ranks)?).map_err(text)?);
    let config = HostWorldConfig {
        ranks,
        timeout: Duration::from_secs(2),
    };
    let results = run_host_world(config, |rank| {
        let r = rank.rank();
        let group: Vec<usize> = (0..ranks).collect();
        let device = CudaWorldRank::new(world.clone(), r).map_err(|e| MoeError::Device(e.to_string()))?;
        let ctx = || RankContext::Cuda(CudaRank::new(rank.clone(), Arc::new(device.clone())));
        let mut runner = MoeLayer::new(Registry::global(), name, layer.clone(), experts.clone(), ctx())?;
        let mut raw = Registry::global().construct(name, &layer, &ctx())?;
        let device_input = match r {
            0 => with_bad_id(&calls[5][r], layer.moe.num_experts),
            _ => calls[5][r].clone(),
        };
        // Every allocation before any rank launches a kernel that waits on its peers.
        let mut staged = stage(&device, &layer, &device_input)?;
        rank.barrier(&group, "built")?;
        let mut outcomes = Vec::new();
        for (i, inputs) in calls.iter().enumerate() {
            let inp = match (i, r) {
                (1, 0) => with_bad_id(&inputs[r], layer.moe.num_experts),
                _ => inputs[r].clone(),
            };
            if (i, r) == (3, 1) {
                std::thread::sleep(Duration::from_secs(3));
            }
            if i == 5 {
                outcomes.push(device_call(raw.as_mut(), &layer, &mut staged).map(|()| Tensor::zeros(DType::U8, &[0])));
                continue;
            }
            let mut out = Tensor::zeros(inp.tokens.dtype(), inp.tokens.shape());
            out.poison();
            outcomes.push(
                runner
                    .forward(&inp.tokens, &inp.topk_ids, &inp.topk_weights, &mut out)
                    .map(|()| out),
            );
        }
        Ok(outcomes)
    });
    for (r, outcomes) in results.into_iter().enumerate() {
        let outcomes = outcomes.map_err(|e| format!("GPU rank {r}: {e}"))?;
        for (i, outcome) in outcomes.iter().enumerate() {
            let what = format!("GPU rank {r} call {i}");
            let failed_as = |expected: &dyn Fn(&MoeError) -> bool| match outcome {
                Err(e) if expected(e) => Ok(()),
                Err(e) => Err(format!("{what}: unexpected error: {e}")),
                Ok(_) => Err(format!("{what}: succeeded, and should have failed")),
            };
            match (i, r) {
                (1 | 5, 0) => failed_as(&|e| matches!(e, MoeError::InvalidInput { .. }))?,
                (1 | 5, _) => failed_as(&|e| matches!(e, MoeError::PeerAbandoned { peer: 0, .. }))?,
                (3, _) => failed_as(&|e| {
                    matches!(
                        e,
                        MoeError::Timeout { .. } | MoeError::PeerMovedOn { .. } | MoeError::PeerAbandoned { .. }
                    )
                })?,
                _ => {
                    let out = outcome.as_ref().map_err(|e| format!("{what}: {e}"))?;
                    harness::matches_oracle(cell, &calls[i][r], out, &what)?;
                }
            }
        }
    }
    Ok(())
}

/// Two GPU ranks of protocol `P`, three calls: in the second, rank 0's expert table (the one its
/// kernels route by) says every expert is rank 1's, as a corrupt peer's memory might, and rank 1
/// has no tokens. Rank 1 is sent rows listing rank 0's experts: its call fails with
/// `CorruptPeerData` (its experts are handed nothing), and rank 0's same call fails, abandoned
/// by rank 1. With rank 0's table restored, the third call
/// gives the oracle's numbers on both ranks, as does the first.
pub fn a_peer_with_a_corrupt_expert_table_fails_the_call_on_every_rank_and_the_next_succeeds<P: ProtocolUnderTest>(
    c: &Cell,
) -> TrialResult {
    let layer = c.layer().map_err(text)?;
    let (ranks, placement) = (layer.parallel.world_size(), layer.placement());
    let table = |owner: &dyn Fn(usize) -> usize| -> Vec<u8> {
        (0..layer.moe.num_experts)
            .flat_map(|e| (owner(e) as i32).to_le_bytes())
            .collect()
    };
    let (true_table, corrupt_table) = (table(&|e| placement.owner(e)), table(&|_| ranks - 1));
    a_corrupt_peer_fails_the_call_on_every_rank_and_the_next_succeeds::<P>(c, 1, &|b, corrupt| {
        let table = if corrupt { &corrupt_table } else { &true_table };
        b.expert_owners().upload(0, table).map_err(device_error)
    })
}

/// Two GPU ranks of protocol `P`, three calls: before the second, `corrupt(rank 0, true)`
/// corrupts what rank 0's kernels read (after it, `corrupt(rank 0, false)` restores it), and
/// rank `empty` has no tokens in it. Rank 1's second call must fail with `CorruptPeerData` and
/// rank 0's, abandoned by rank 1; the first and third calls give the oracle's numbers on both
/// ranks.
///
/// The ranks finish each call before any starts the next: rank 1, its call failed at dispatch,
/// would otherwise dispatch the third call into rank 0's slots while rank 0 still reads the
/// second call's in place (a peer that abandoned a call does not wait for this rank's combine,
/// so the rows of a failed call stay as they were only until the peers' next dispatch).
pub fn a_corrupt_peer_fails_the_call_on_every_rank_and_the_next_succeeds<P: ProtocolUnderTest>(
    c: &Cell,
    empty_rank: usize,
    corrupt: &(dyn Fn(&P::Rank, bool) -> Result<()> + Sync),
) -> TrialResult {
    let layer = c.layer().map_err(text)?;
    let ranks = layer.parallel.world_size();
    let calls: Vec<_> = (0..3).map(|i| make_inputs(c, &layer, i)).collect();
    let experts = Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant));
    let world = CudaWorld::on_devices(&moe_kernels::probe::rank_devices(ranks)?).map_err(text)?;
    let launch: Launch<P> = world.comm_grid(0).map_err(text)?.into();
    let max_tokens = layer.dispatch_tokens_bound();
    let bound = wait_bound()?;
    let workspaces = Arc::new(world.symmetric_alloc(layout_bytes::<P>(&layer)).map_err(text)?);
    let empty = ReplicaInputs {
        tokens: Tensor::zeros(c.input_dtype.dtype(), &[0, layer.moe.hidden]),
        topk_ids: Tensor::zeros(DType::I32, &[0, layer.moe.top_k]),
        topk_weights: Tensor::zeros(DType::F32, &[0, layer.moe.top_k]),
    };
    // Bounded waits between the ranks' threads: a rank that returns early fails its peers'
    // next wait instead of leaving them waiting.
    let config = HostWorldConfig {
        ranks,
        timeout: bound + Duration::from_secs(60),
    };
    let outcomes = run_host_world(config, |rank| -> Result<Vec<Result<Tensor>>> {
        let r = rank.rank();
        let group: Vec<usize> = (0..ranks).collect();
        let built = P::new_rank(
            &layer,
            &world,
            workspaces.clone(),
            r,
            bound,
            launch,
            P::Options::default(),
        );
        rank.barrier(&group, "constructed")?;
        let mut b = built?;
        let ownership = layer.ownership(r);
        let mut outcomes = Vec::new();
        for (i, inputs) in calls.iter().enumerate() {
            let inp = if (i, r) == (1, empty_rank) { &empty } else { &inputs[r] };
            let corrupted = (i, r) == (1, 0);
            let mut call = || -> Result<Tensor> {
                if corrupted {
                    corrupt(&b, true)?;
                }
                let input = PrepareInput::new(&layer, max_tokens, &inp.tokens, &inp.topk_ids, &inp.topk_weights)?;
                let (received, _) = b.dispatch(input)?;
                let mut y = Tensor::zeros(c.input_dtype.dtype(), &[ranks * max_tokens, layer.moe.hidden]);
                experts.apply(&received, &ownership, &mut y)?;
                let mut out = Tensor::zeros(c.input_dtype.dtype(), inp.tokens.shape());
                out.poison();
                b.combine(&y, &mut out)?;
                Ok(out)
            };
            let outcome = call();
            let restored = if corrupted { corrupt(&b, false) } else { Ok(()) };
            outcomes.push(outcome);
            rank.barrier(&group, "call done")?;
            restored?;
        }
        Ok(outcomes)
    });
    for (r, outcomes) in outcomes.into_iter().enumerate() {
        let outcomes = outcomes.map_err(|e| format!("GPU rank {r}: {e}"))?;
        for (i, outcome) in outcomes.iter().enumerate() {
            let what = format!("GPU rank {r} call {i}");
            match (i, r, outcome) {
                (1, 1, Err(MoeError::CorruptPeerData { .. })) => {}
                (1, 0, Err(MoeError::PeerAbandoned { peer: 1, .. })) => {}
                (1, _, Err(e)) => return Err(format!("{what}: unexpected error: {e}")),
                (1, _, Ok(_)) => return Err(format!("{what}: succeeded, and should have failed")),
                (_, _, Err(e)) => return Err(format!("{what}: {e}")),
                (_, _, Ok(out)) => harness::matches_oracle(c, &calls[i][r], out, &what)?,
            }
        }
    }
    Ok(())
}
