//! The trials every peer-memory protocol is held to, written once (feature `trials`, enabled
//! only by the protocols' tests):
//! - on the host platform, what the layers of an EP group sharing one workspace guarantee:
//!   [`peer_conformance_tests!`](crate::peer_conformance_tests) expands, in a protocol crate's
//!   unit tests, to one test per trial here;
//! - on GPUs, the suite each protocol's GPU test driver runs ([`CudaSuite`]), its cases run by
//!   `cuda::trials::run` (feature `cuda`).
//!
//! Errors are strings, as the test harnesses take them; a trial never panics.

use std::sync::Arc;

use libtest_mimic::{Arguments, Failed, Trial};
use moe_core::experts::{Experts, ReferenceExperts};
use moe_core::harness::{self, Cell, HOST, ReplicaInputs, Shape, make_inputs, run_on};
use moe_core::host::{HostWorldConfig, run_host_world};
use moe_core::quant::{QuantParams, QuantScheme};
use moe_core::workspace_group::GroupLayout;
use moe_core::{
    DType, Dispatched, LayerConfig, MoeError, PrepareFinalize, PrepareInput, QuantConfig, RankContext, Registry,
    Result, Tensor,
};
use moe_kernels::probe::{ranks_skip_reason, trial_label};

use crate::{PeerLayout, PeerProtocol};

/// What a trial gives: `Err` with what went wrong.
pub type TrialResult = std::result::Result<(), String>;

/// Expands, in a protocol crate's unit tests, to one `#[test]` per host trial of this module
/// for `$protocol` (a path from the crate root, such as `crate::OneSided`).
#[macro_export]
macro_rules! peer_conformance_tests {
    ($protocol:path) => {
        mod peer_conformance {
            use $crate::trials as t;

            #[test]
            fn a_receipt_from_another_layer_is_refused_and_the_group_refuses_every_later_call() {
                t::passes(
                    t::a_receipt_from_another_layer_is_refused_and_the_group_refuses_every_later_call::<$protocol>(),
                );
            }

            #[test]
            fn a_second_prepare_before_finalize_is_refused() {
                t::passes(t::a_second_prepare_before_finalize_is_refused::<$protocol>());
            }

            #[test]
            fn a_rebuild_between_prepare_and_finalize_fails_the_finalize() {
                t::passes(t::a_rebuild_between_prepare_and_finalize_fails_the_finalize::<
                    $protocol,
                >());
            }

            #[test]
            fn a_layer_of_another_top_k_or_expert_count_is_refused_by_the_group() {
                t::passes(t::a_layer_of_another_top_k_or_expert_count_is_refused_by_the_group::<$protocol>());
            }

            #[test]
            fn a_layer_of_another_top_k_runs_in_a_workspace_group_of_its_own() {
                t::passes(t::a_layer_of_another_top_k_runs_in_a_workspace_group_of_its_own::<$protocol>());
            }

            #[test]
            fn layers_of_different_layouts_share_one_workspace_and_alternate_calls() {
                t::passes(t::layers_of_different_layouts_share_one_workspace_and_alternate_calls::<$protocol>());
            }

            #[test]
            fn a_peer_that_sends_foreign_ids_fails_the_call_on_every_rank_and_the_next_succeeds() {
                t::passes(
                    t::a_peer_that_sends_foreign_ids_fails_the_call_on_every_rank_and_the_next_succeeds::<$protocol>(),
                );
            }
        }
    };
}

/// Fails the calling test with the trial's message.
#[track_caller]
pub fn passes(result: TrialResult) {
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn ensure(holds: bool, what: impl FnOnce() -> String) -> TrialResult {
    if holds { Ok(()) } else { Err(what()) }
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Scales that suit the harness's inputs (magnitudes up to 100), as its quant variants use.
pub fn harness_params() -> QuantParams {
    QuantParams {
        fp8_static_scale: 0.05,
        nvfp4_global_scale: 448.0 * 6.0 / 100.0,
    }
}

/// The default cell of `backend` on the host platform ([`Cell::new`]), changed by `edit`.
pub fn host_cell(backend: &str, edit: impl FnOnce(&mut Cell)) -> Cell {
    let mut c = Cell::new(backend);
    edit(&mut c);
    c.reseeded()
}

/// Layers of three layouts of `backend`, in construction order: a bf16 layer; an nvfp4 layer
/// of more tokens per rank (smaller slots, more rows: neither layout covers the other, so it
/// grows the group to their union); a bf16 layer of half the hidden size and fewer tokens per
/// rank, which the union covers.
pub fn shared_cells(backend: &str) -> [Cell; 3] {
    let layer = |quant: QuantConfig, hidden: usize, max_tokens: usize, tokens: usize| {
        host_cell(backend, |c| {
            c.quant = quant;
            c.shape.hidden = hidden;
            c.shape.max_tokens_per_rank = max_tokens;
            c.shape.tokens = tokens;
        })
    };
    [
        layer(QuantConfig::new(QuantScheme::Bf16), 256, 16, 5),
        layer(
            QuantConfig::new(QuantScheme::Nvfp4).with_params(harness_params()),
            256,
            24,
            20,
        ),
        layer(QuantConfig::new(QuantScheme::Bf16), 128, 8, 7),
    ]
}

/// Layers of [`shared_cells`], their reference experts, and inputs: `calls[i][j][r]` for call
/// `i` of layer `j` on rank `r`.
type SharedLayers = (
    Vec<Cell>,
    Vec<LayerConfig>,
    Vec<Arc<ReferenceExperts>>,
    Vec<Vec<Vec<ReplicaInputs>>>,
);

/// The first `n` layers of [`shared_cells`] of `backend`, with inputs for `calls` calls.
fn shared_layers(backend: &str, n: usize, calls: u64) -> std::result::Result<SharedLayers, String> {
    let cells: Vec<Cell> = shared_cells(backend).into_iter().take(n).collect();
    let layers: Vec<LayerConfig> = cells.iter().map(|c| c.layer()).collect::<Result<_>>().map_err(text)?;
    let calls = (0..calls)
        .map(|i| cells.iter().zip(&layers).map(|(c, l)| make_inputs(c, l, i)).collect())
        .collect();
    let experts = cells.iter().map(reference_experts).collect();
    Ok((cells, layers, experts, calls))
}

/// The layout `layer` needs alone under protocol `P`.
fn own_layout<P: PeerProtocol>(layer: &LayerConfig) -> P::Layout {
    P::Layout::for_layer(layer, &layer.dispatch_layout())
}

/// The reference experts of cell `c`.
pub fn reference_experts(c: &Cell) -> Arc<ReferenceExperts> {
    Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant))
}

/// The rows of a Standard delivery: the experts' output has as many (a backend may deliver
/// more than the layer's own `ranks * max_tokens`).
fn standard_rows(d: &Dispatched) -> Result<usize> {
    match d {
        Dispatched::Standard { topk_ids, .. } => Ok(topk_ids.shape()[0]),
        Dispatched::Batched { .. } => Err(MoeError::Convention(
            "the trials' layers ask for the Standard format, and a BatchedExperts delivery came".into(),
        )),
    }
}

/// One call of layer `b` on rank `r` with the reference experts: what they received and the
/// output (poisoned before the call, so an element never written shows).
pub fn run_call(
    b: &mut dyn PrepareFinalize,
    layer: &LayerConfig,
    experts: &ReferenceExperts,
    r: usize,
    inp: &ReplicaInputs,
) -> Result<(Dispatched, Tensor)> {
    let max = b.max_tokens_per_rank();
    let prepared = b.prepare(PrepareInput::new(
        layer,
        max,
        &inp.tokens,
        &inp.topk_ids,
        &inp.topk_weights,
    )?)?;
    let dtype = layer.moe.input_dtype.dtype();
    let rows = standard_rows(&prepared.dispatched)?;
    let mut y = Tensor::zeros(dtype, &[rows, layer.moe.hidden]);
    experts.apply(&prepared.dispatched, &layer.ownership(r), &mut y)?;
    let mut out = Tensor::zeros(dtype, inp.tokens.shape());
    out.poison();
    b.finalize(prepared.receipt, &y, &mut out)?;
    Ok((prepared.dispatched, out))
}

/// Each rank's result, or the first rank's error.
fn every_rank<T>(results: Vec<Result<T>>) -> std::result::Result<Vec<T>, String> {
    results
        .into_iter()
        .enumerate()
        .map(|(r, res)| res.map_err(|e| format!("rank {r}: {e}")))
        .collect()
}

/// A receipt passed to another layer's finalize is refused, naming the mistake, before
/// anything is sent. It is consumed there, so the first layer's call can never run the combine
/// its peers wait for: the group refuses every later call, saying so, instead of starting one a
/// round ahead of them.
pub fn a_receipt_from_another_layer_is_refused_and_the_group_refuses_every_later_call<P: PeerProtocol>() -> TrialResult
{
    let layer = host_cell(P::NAME, |_| {}).layer().map_err(text)?;
    let (h, k) = (layer.moe.hidden, layer.moe.top_k);
    let results = run_host_world(HostWorldConfig::new(2), |rank| {
        let ctx = RankContext::Host(rank);
        let mut a = Registry::global().construct(P::NAME, &layer, &ctx)?;
        let mut b = Registry::global().construct(P::NAME, &layer, &ctx)?;
        let x = Tensor::zeros(DType::Bf16, &[0, h]);
        let (ids, weights) = (
            Tensor::from_i32(&[0, k], &[]),
            Tensor::from_f32(DType::F32, &[0, k], &[]),
        );
        let max = a.max_tokens_per_rank();
        let input = || PrepareInput::new(&layer, max, &x, &ids, &weights);
        let expert_out = Tensor::zeros(DType::Bf16, &[2 * max, h]);
        let mut out = Tensor::zeros(DType::Bf16, &[0, h]);
        let lost = a.prepare(input()?)?;
        let mut refused = vec![b.finalize(lost.receipt, &expert_out, &mut out).map(drop)];
        for layer in [&mut a, &mut b] {
            refused.push(layer.prepare(input()?).map(drop));
        }
        Ok(refused)
    });
    for (r, refused) in every_rank(results)?.into_iter().enumerate() {
        let message = |i: usize| match &refused[i] {
            Ok(()) => Err(format!("rank {r}: call {i} was not refused")),
            Err(e) => Ok(e.to_string()),
        };
        let first = message(0)?;
        ensure(first.contains("another layer's call"), || format!("rank {r}: {first}"))?;
        for i in 1..refused.len() {
            let later = message(i)?;
            ensure(later.contains("not finalized"), || format!("rank {r}: {later}"))?;
        }
    }
    Ok(())
}

/// The layers of a group share its round counter, flags and regions: a second call prepared,
/// by the same layer or another, before the first is finalized is refused before anything is
/// sent, and the first call still finalizes.
pub fn a_second_prepare_before_finalize_is_refused<P: PeerProtocol>() -> TrialResult {
    let (cells, layers, experts, calls) = shared_layers(P::NAME, 2, 1)?;
    let inputs = &calls[0];
    let results = run_host_world(HostWorldConfig::new(2), |rank| {
        let r = rank.rank();
        let ctx = RankContext::Host(rank);
        let mut a = Registry::global().construct(P::NAME, &layers[0], &ctx)?;
        let mut b = Registry::global().construct(P::NAME, &layers[1], &ctx)?;
        let input = |j: usize, max: usize| {
            let inp = &inputs[j][r];
            PrepareInput::new(&layers[j], max, &inp.tokens, &inp.topk_ids, &inp.topk_weights)
        };
        let first = a.prepare(input(0, a.max_tokens_per_rank())?)?;
        let same = a.prepare(input(0, a.max_tokens_per_rank())?).map(drop);
        let other = b.prepare(input(1, b.max_tokens_per_rank())?).map(drop);
        let dtype = layers[0].moe.input_dtype.dtype();
        let rows = standard_rows(&first.dispatched)?;
        let mut y = Tensor::zeros(dtype, &[rows, layers[0].moe.hidden]);
        experts[0].apply(&first.dispatched, &layers[0].ownership(r), &mut y)?;
        let mut out = Tensor::zeros(dtype, inputs[0][r].tokens.shape());
        a.finalize(first.receipt, &y, &mut out)?;
        let (_, after) = run_call(b.as_mut(), &layers[1], &experts[1], r, &inputs[1][r])?;
        Ok((same, other, out, after))
    });
    for (r, (same, other, out, after)) in every_rank(results)?.into_iter().enumerate() {
        let (same, other) = (
            same.err().map(text).unwrap_or_default(),
            other.err().map(text).unwrap_or_default(),
        );
        ensure(same.contains("previous call was prepared but not finalized"), || {
            format!("rank {r}: the same layer's second prepare gave `{same}`")
        })?;
        ensure(other.contains("the layers of an EP group take turns"), || {
            format!("rank {r}: another layer's prepare gave `{other}`")
        })?;
        harness::matches_oracle(&cells[0], &inputs[0][r], &out, "the first call")?;
        harness::matches_oracle(&cells[1], &inputs[1][r], &after, "the next call")?;
    }
    Ok(())
}

/// A larger layer constructed between a prepare and its finalize rebuilds the workspace the
/// call's rows and flags were in: the finalize is refused before anything is sent, and every
/// layer's next call runs on the new workspace.
pub fn a_rebuild_between_prepare_and_finalize_fails_the_finalize<P: PeerProtocol>() -> TrialResult {
    let (cells, layers, experts, calls) = shared_layers(P::NAME, 2, 1)?;
    let inputs = &calls[0];
    let results = run_host_world(HostWorldConfig::new(2), |rank| {
        let r = rank.rank();
        let ctx = RankContext::Host(rank);
        let mut a = Registry::global().construct(P::NAME, &layers[0], &ctx)?;
        let inp = &inputs[0][r];
        let early = a.prepare(PrepareInput::new(
            &layers[0],
            a.max_tokens_per_rank(),
            &inp.tokens,
            &inp.topk_ids,
            &inp.topk_weights,
        )?)?;
        let small = a.workspace_bytes();
        let mut b = Registry::global().construct(P::NAME, &layers[1], &ctx)?;
        let dtype = layers[0].moe.input_dtype.dtype();
        let y = Tensor::zeros(dtype, &[2 * a.max_tokens_per_rank(), layers[0].moe.hidden]);
        let mut out = Tensor::zeros(dtype, inp.tokens.shape());
        let stale = a.finalize(early.receipt, &y, &mut out);
        let grown = a.workspace_bytes();
        let (_, again) = run_call(a.as_mut(), &layers[0], &experts[0], r, inp)?;
        let (_, other) = run_call(b.as_mut(), &layers[1], &experts[1], r, &inputs[1][r])?;
        Ok((stale, small, grown, again, other))
    });
    let (alone, union) = (
        own_layout::<P>(&layers[0]).bytes(),
        own_layout::<P>(&layers[0]).union(own_layout::<P>(&layers[1])).bytes(),
    );
    for (r, (stale, small, grown, again, other)) in every_rank(results)?.into_iter().enumerate() {
        ensure(
            matches!(&stale, Err(MoeError::InvalidInput { op: "finalize", detail }) if detail.contains("rebuilt")),
            || format!("rank {r}: the finalize after the rebuild gave {stale:?}"),
        )?;
        ensure((small, grown) == (alone, union), || {
            format!("rank {r}: workspace of {small} then {grown} bytes, expected {alone} then {union}")
        })?;
        harness::matches_oracle(&cells[0], &inputs[0][r], &again, "the call after")?;
        harness::matches_oracle(&cells[1], &inputs[1][r], &other, "the larger layer")?;
    }
    Ok(())
}

/// The layers of a group share its top_k and expert count: the workspace's slots and the
/// expert owners are laid out for them, so a layer of another is refused and grows nothing.
pub fn a_layer_of_another_top_k_or_expert_count_is_refused_by_the_group<P: PeerProtocol>() -> TrialResult {
    let base = host_cell(P::NAME, |_| {});
    let other = |edit: fn(&mut Shape)| {
        let mut c = base.clone();
        edit(&mut c.shape);
        c.layer().map_err(text)
    };
    let (top_k, experts) = (other(|s| s.top_k = 1)?, other(|s| s.num_experts = 4)?);
    let layer = base.layer().map_err(text)?;
    let results = run_host_world(HostWorldConfig::new(2), |rank| {
        let ctx = RankContext::Host(rank);
        let first = Registry::global().construct(P::NAME, &layer, &ctx)?;
        let refused = [&top_k, &experts].map(|l| Registry::global().construct(P::NAME, l, &ctx).map(drop));
        Ok((refused, first.workspace_bytes()))
    });
    for (r, ([top_k, experts], bytes)) in every_rank(results)?.into_iter().enumerate() {
        ensure(
            matches!(&top_k, Err(e @ MoeError::WorkspaceGroupMismatch { field: "top_k", .. })
                if e.to_string().contains("LayerConfig::with_workspace_group")),
            || format!("rank {r}: a layer of another top_k gave {top_k:?}"),
        )?;
        ensure(
            matches!(
                &experts,
                Err(MoeError::WorkspaceGroupMismatch {
                    field: "num_experts",
                    ..
                })
            ),
            || format!("rank {r}: a layer of another expert count gave {experts:?}"),
        )?;
        let own = own_layout::<P>(&layer).bytes();
        ensure(bytes == own, || {
            format!("rank {r}: {bytes} workspace bytes, expected {own}: a refused layer grows nothing")
        })?;
    }
    Ok(())
}

/// A layer of another top_k than the group's, named into a workspace group of its own
/// (`LayerConfig::with_workspace_group`), is constructed beside the group's layer, and the two
/// layers' calls, alternating, give the oracle's numbers.
pub fn a_layer_of_another_top_k_runs_in_a_workspace_group_of_its_own<P: PeerProtocol>() -> TrialResult {
    let cells = [host_cell(P::NAME, |_| {}), host_cell(P::NAME, |c| c.shape.top_k = 1)];
    let layers = [
        cells[0].layer().map_err(text)?,
        cells[1].layer().map_err(text)?.with_workspace_group("top-1"),
    ];
    let experts: Vec<_> = cells.iter().map(reference_experts).collect();
    let calls: Vec<Vec<_>> = (0..2)
        .map(|i| cells.iter().zip(&layers).map(|(c, l)| make_inputs(c, l, i)).collect())
        .collect();
    let results = run_host_world(HostWorldConfig::new(2), |rank| {
        let r = rank.rank();
        let ctx = RankContext::Host(rank);
        let mut built = Vec::new();
        for l in &layers {
            built.push(Registry::global().construct(P::NAME, l, &ctx)?);
        }
        let mut outs = Vec::new();
        for call in &calls {
            for (j, b) in built.iter_mut().enumerate() {
                outs.push(run_call(b.as_mut(), &layers[j], &experts[j], r, &call[j][r])?.1);
            }
        }
        Ok(outs)
    });
    for (r, outs) in every_rank(results)?.into_iter().enumerate() {
        for (i, out) in outs.iter().enumerate() {
            let (call, j) = (i / 2, i % 2);
            harness::matches_oracle(
                &cells[j],
                &calls[call][j][r],
                out,
                &format!("rank {r} call {call} of layer {j}"),
            )?;
        }
    }
    Ok(())
}

/// The three layers of [`shared_cells`] constructed on the same ranks share one workspace, the
/// union of the first two's layouts (the third is covered and rebuilds nothing), and run calls
/// interleaved layer by layer: each call delivers the rows and gives the output bits the layer
/// gives on a workspace of its own, and matches the oracle.
pub fn layers_of_different_layouts_share_one_workspace_and_alternate_calls<P: PeerProtocol>() -> TrialResult {
    let (cells, layers, experts, calls) = shared_layers(P::NAME, 3, 3)?;
    let own: Vec<P::Layout> = layers.iter().map(own_layout::<P>).collect();
    let union = own[0].union(own[1]);
    ensure(
        !own[0].covers(&own[1]) && !own[1].covers(&own[0]) && union.covers(&own[2]),
        || format!("the second layout must grow the first and the third fit their union: {own:?}"),
    )?;
    let alone: Vec<_> = (0..cells.len())
        .map(|j| {
            let calls: Vec<_> = calls.iter().map(|call| call[j].clone()).collect();
            run_on(Registry::global(), HOST, &cells[j], &layers[j], &experts[j], &calls)
        })
        .collect();
    let shared = run_host_world(HostWorldConfig::new(2), |rank| {
        let r = rank.rank();
        let ctx = RankContext::Host(rank);
        let mut built = Vec::new();
        for l in &layers {
            built.push(Registry::global().construct(P::NAME, l, &ctx)?);
        }
        let bytes: Vec<usize> = built.iter().map(|b| b.workspace_bytes()).collect();
        let mut seen = Vec::new();
        for call in &calls {
            for (j, (b, inputs)) in built.iter_mut().zip(call).enumerate() {
                seen.push(run_call(b.as_mut(), &layers[j], &experts[j], r, &inputs[r])?);
            }
        }
        Ok((bytes, seen))
    });
    for (r, (bytes, seen)) in every_rank(shared)?.into_iter().enumerate() {
        ensure(bytes == [union.bytes(); 3], || {
            format!(
                "rank {r}: layers on {bytes:?} workspace bytes, expected the union's {}",
                union.bytes()
            )
        })?;
        for (i, (received, out)) in seen.iter().enumerate() {
            let (call, j) = (i / cells.len(), i % cells.len());
            let want = &alone[j][r]
                .as_ref()
                .map_err(|e| format!("rank {r} of layer {j} alone: {e}"))?[call];
            let what = format!("rank {r} call {call} of layer {j}");
            ensure(received == &want.received, || format!("{what}: other rows than alone"))?;
            ensure(out.bytes() == want.out.bytes(), || {
                format!("{what}: other output bits than alone")
            })?;
            harness::matches_oracle(&cells[j], &calls[call][j][r], out, &what)?;
        }
    }
    Ok(())
}

/// The ranks of the GPU trials.
pub const GPU_RANKS: usize = 2;

/// A GPU trial every peer-memory protocol runs (see `cuda::trials::run`).
#[derive(Debug)]
pub enum CudaCase {
    /// Calls of a cell on GPU ranks against the host platform.
    MatchesHost(Cell),
    /// The same on a grid of a few small blocks, each taking many tokens.
    MatchesHostOnASmallGrid(Cell),
    /// The same with dispatch and combine captured in CUDA graphs and replayed.
    GraphReplay(Cell),
    /// Layers of different layouts constructed through the registry share one growing
    /// workspace and alternate calls on host and device tensors.
    SharedWorkspace,
    /// A rank that never dispatches is named in its peer's timeout.
    SilentRank,
    /// A call that fails on one rank (a bad input on the host or the device, a rank after its
    /// peers' timeout) fails on every rank, and the next call succeeds.
    CallIntegrity,
    /// A peer running another layer's call into the shared workspace: the call fails on both
    /// ranks, the experts are handed no id out of their layer's range, and the next call
    /// succeeds.
    PeerOnAnotherLayer,
    /// A peer whose expert table is corrupt sends rows of experts the receiver does not own:
    /// the receiver fails the call naming it and hands no such id on, the sender fails the
    /// same call, and the next call succeeds; with this many tokens per rank where given (a
    /// call large enough that a protocol splits its check, as nvlink-one-sided's dispatch
    /// does among a block per 16 Ki slot ids).
    CorruptPeer(Option<usize>),
}

/// Tokens per rank of the large corrupt-peer trial: top-1 on 2 ranks, 80 000 slot ids, which
/// nvlink-one-sided's dispatch checks with 5 blocks besides its last (the whole grid of the rank
/// without tokens).
const CORRUPT_LARGE_TOKENS: usize = 40_000;

/// The trials of a peer-memory protocol's GPU test driver: the cases every protocol runs, and
/// any the driver adds. Without [`GPU_RANKS`] GPUs (or one GPU and `MOE_SHARE_GPUS=1`) each
/// GPU trial is reported as ignored with the reason; `MOE_REQUIRE_GPU=1` makes that a failure.
#[derive(Debug)]
pub struct CudaSuite {
    backend: &'static str,
    skip: Option<String>,
    trials: Vec<Trial>,
}

impl CudaSuite {
    /// Every protocol's cases for `backend`, each run by `run` (the driver's
    /// `cuda::trials::run` of its protocol, or [`built_without_cuda`]).
    pub fn new(backend: &'static str, run: fn(CudaCase) -> TrialResult) -> Self {
        let mut suite = CudaSuite {
            backend,
            skip: ranks_skip_reason(GPU_RANKS),
            trials: Vec::new(),
        };
        for c in suite.cells() {
            suite.gpu(c.trial_name("gpu_matches_host"), move || run(CudaCase::MatchesHost(c)));
        }
        for c in Cell::many_tokens(backend, GPU_RANKS) {
            let name = format!(
                "{} {} tokens",
                c.trial_name("gpu_matches_host_on_a_small_grid"),
                c.shape.tokens
            );
            suite.gpu(name, move || run(CudaCase::MatchesHostOnASmallGrid(c)));
        }
        // bf16 and nvfp4 (the scheme with the most quantization work) at the DeepSeek-V3 shape.
        for c in [suite.cells().remove(0), suite.cells().remove(4)] {
            suite.gpu(c.trial_name("graph_replay_matches_host"), move || {
                run(CudaCase::GraphReplay(c))
            });
        }
        suite.gpu(
            "layers_of_different_layouts_share_one_growing_workspace".into(),
            move || run(CudaCase::SharedWorkspace),
        );
        suite.gpu("a_silent_rank_is_named_in_the_timeout".into(), move || {
            run(CudaCase::SilentRank)
        });
        suite.gpu(
            "a_call_that_fails_on_one_rank_fails_on_every_rank_and_the_next_succeeds".into(),
            move || run(CudaCase::CallIntegrity),
        );
        suite.gpu(
            "a_peer_running_another_layers_call_hands_these_experts_no_foreign_id".into(),
            move || run(CudaCase::PeerOnAnotherLayer),
        );
        let corrupt = "a_peer_with_a_corrupt_expert_table_fails_the_call_on_every_rank_and_the_next_succeeds";
        suite.gpu(corrupt.into(), move || run(CudaCase::CorruptPeer(None)));
        suite.gpu(format!("{corrupt} {CORRUPT_LARGE_TOKENS} tokens"), move || {
            run(CudaCase::CorruptPeer(Some(CORRUPT_LARGE_TOKENS)))
        });
        suite
    }

    /// The protocol cells of the suite's backend on [`GPU_RANKS`] ranks
    /// ([`Cell::protocol_cells`]).
    pub fn cells(&self) -> Vec<Cell> {
        Cell::protocol_cells(self.backend, GPU_RANKS)
    }

    /// Adds a GPU trial.
    pub fn gpu(&mut self, name: String, test: impl FnOnce() -> TrialResult + Send + 'static) {
        let ignored = self.skip.is_some();
        self.trials.push(
            Trial::test(trial_label(name, self.skip.as_deref()), move || {
                test().map_err(Failed::from)
            })
            .with_ignored_flag(ignored),
        );
    }

    /// Runs the trials one at a time (they share the GPUs, and one trial's spinning kernels
    /// must not meet another trial's allocations) and exits with their outcome.
    pub fn run(self) -> ! {
        let mut args = Arguments::from_args();
        args.test_threads.get_or_insert(1);
        libtest_mimic::run(&args, self.trials).exit()
    }
}

/// Why a GPU trial fails in a driver built without the `cuda` feature.
pub const WITHOUT_CUDA: &str = "built without the `cuda` feature (cargo test --features cuda)";

/// Every case's outcome in a driver built without the `cuda` feature.
pub fn built_without_cuda(_: CudaCase) -> TrialResult {
    Err(WITHOUT_CUDA.into())
}

/// Protocol `P` as a rank whose memory is corrupt plays it: its second dispatch on a thread
/// routes by an expert table that says every expert is the last rank's, so that rank is sent
/// rows listing experts it does not own. Everything else is `P`'s.
#[derive(Debug)]
struct CorruptSecondDispatch<P>(std::marker::PhantomData<P>);

thread_local! {
    /// The dispatches [`CorruptSecondDispatch`] ran on this thread (a rank's).
    static DISPATCHES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

impl<P: PeerProtocol> PeerProtocol for CorruptSecondDispatch<P> {
    const NAME: &'static str = P::NAME;
    const PROTOCOL: &'static str = P::PROTOCOL;
    const DESCRIPTION: &'static str = P::DESCRIPTION;
    const CAPABILITIES: moe_core::registry::Capabilities = P::CAPABILITIES;
    type Layout = P::Layout;
    type Place = P::Place;
    type Exchange = P::Exchange;

    fn place(group: Self::Layout, own: Self::Layout) -> Self::Place {
        P::place(group, own)
    }
    fn flags(place: &Self::Place, source: usize) -> Vec<usize> {
        P::flags(place, source)
    }
    fn forget(place: &Self::Place, mem: &moe_core::host::SymmetricMemory) {
        P::forget(place, mem)
    }
    fn host_dispatch(call: &crate::HostDispatch<'_, Self>) -> Result<(moe_core::slots::ReceivedRows, Self::Exchange)> {
        let as_p = |placement, plan| crate::HostDispatch::<P> {
            layer: call.layer,
            dispatch: call.dispatch,
            placement,
            place: call.place,
            mem: call.mem,
            id: call.id,
            me: call.me,
            ep: call.ep,
            images: call.images,
            ids: call.ids,
            weights: call.weights,
            plan,
        };
        if DISPATCHES.with(|n| n.replace(n.get() + 1)) != 1 {
            return P::host_dispatch(&as_p(call.placement, call.plan));
        }
        let experts = call.placement.num_experts();
        let all_on_last = moe_core::ExpertPlacement::from_map(&vec![call.ep as u32 - 1; experts], experts, call.ep)?;
        let plan = moe_core::routing::SendPlan::new(call.ids, call.dispatch.top_k, &all_on_last);
        P::host_dispatch(&as_p(&all_on_last, &plan))
    }
    fn host_combine(call: &crate::HostCombine<'_, Self>, exchange: &Self::Exchange, rows: &Tensor) -> Result<()> {
        P::host_combine(&as_protocol(call), exchange, rows)
    }
    fn host_reply(
        call: &crate::HostCombine<'_, Self>,
        exchange: &Self::Exchange,
        target: usize,
        slot: usize,
        row: &mut [u8],
    ) {
        P::host_reply(&as_protocol(call), exchange, target, slot, row)
    }
}

/// A combine of [`CorruptSecondDispatch`] as `P`'s.
fn as_protocol<'a, P: PeerProtocol>(
    call: &crate::HostCombine<'a, CorruptSecondDispatch<P>>,
) -> crate::HostCombine<'a, P> {
    crate::HostCombine {
        dispatch: call.dispatch,
        place: call.place,
        mem: call.mem,
        id: call.id,
        me: call.me,
        ep: call.ep,
        plan: call.plan,
    }
}

/// Two host ranks, three calls; rank 0 is [`CorruptSecondDispatch`] of `P`. In the second call
/// rank 1 is sent rows listing rank 0's experts: it fails that call with `CorruptPeerData`
/// naming rank 0 (its experts are handed nothing), and rank 0's same call fails, abandoned by
/// rank 1. The first and third calls give the oracle's numbers on both ranks.
pub fn a_peer_that_sends_foreign_ids_fails_the_call_on_every_rank_and_the_next_succeeds<P: PeerProtocol>() -> TrialResult
{
    let cell = host_cell(P::NAME, |c| c.shape.tokens = 6);
    let layer = cell.layer().map_err(text)?;
    let calls: Vec<_> = (0..3).map(|i| make_inputs(&cell, &layer, i)).collect();
    let experts = reference_experts(&cell);
    let results = run_host_world(HostWorldConfig::new(2), |rank| {
        let r = rank.rank();
        let ctx = RankContext::Host(rank);
        let mut b = match r {
            0 => crate::HostPeer::<CorruptSecondDispatch<P>>::construct(&layer, &ctx)?,
            _ => crate::HostPeer::<P>::construct(&layer, &ctx)?,
        };
        Ok(calls
            .iter()
            .map(|inputs| run_call(b.as_mut(), &layer, &experts, r, &inputs[r]).map(|(_, out)| out))
            .collect::<Vec<_>>())
    });
    for (r, outcomes) in every_rank(results)?.into_iter().enumerate() {
        for (i, outcome) in outcomes.iter().enumerate() {
            let what = format!("rank {r} call {i}");
            match (i, r, outcome) {
                (1, 1, Err(MoeError::CorruptPeerData { detail, .. })) => {
                    ensure(detail.starts_with("rank 0 sent rank 1"), || format!("{what}: {detail}"))?
                }
                (1, 0, Err(MoeError::PeerAbandoned { peer: 1, .. })) => {}
                (1, _, Err(e)) => return Err(format!("{what}: unexpected error: {e}")),
                (1, _, Ok(_)) => return Err(format!("{what}: succeeded, and should have failed")),
                (_, _, Err(e)) => return Err(format!("{what}: {e}")),
                (_, _, Ok(out)) => harness::matches_oracle(&cell, &calls[i][r], out, &what)?,
            }
        }
    }
    Ok(())
}
