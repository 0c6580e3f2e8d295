//! Cells of the shared harness run through this crate's own registration, a direct check of
//! the dense receive layout and the reverse all-to-all-v, and layers of different layouts
//! sharing their EP group's workspace.

use std::sync::Arc;

use moe_core::experts::{Experts, ReferenceExperts};
use moe_core::harness::{Cell, HOST, Outcome, ReplicaInputs, Routing, SHAPES, Shape, make_inputs, run_cell, run_on};
use moe_core::host::{HostWorldConfig, run_host_world};
use moe_core::quant::{QuantParams, QuantScheme};
use moe_core::reference::{max_relative_error, reference_moe, roundtrip_tokens};
use moe_core::workspace_group::GroupLayout;
use moe_core::{
    ActivationFormat, DType, Dispatched, ExpertPlacement, InputDtype, LayerConfig, MoeConfig, MoeError, ParallelConfig,
    PrepareFinalize, PrepareInput, QuantConfig, RankContext, Registry, Result, ScaleLayout, Tensor,
};

use super::{NAME, WorkspaceLayout};

fn shape(name: &str) -> Shape {
    *SHAPES.iter().find(|s| s.name == name).expect("a matrix shape")
}

/// Scales that suit the harness's inputs (magnitudes up to 100), as its quant variants use.
fn params() -> QuantParams {
    QuantParams {
        fp8_static_scale: 0.05,
        nvfp4_global_scale: 448.0 * 6.0 / 100.0,
    }
}

/// The default cell of this backend ([`Cell::new`]), changed by `edit`.
fn cell(edit: impl FnOnce(&mut Cell)) -> Cell {
    let mut c = Cell::new(NAME);
    edit(&mut c);
    c.reseeded()
}

fn executes(c: &Cell) {
    match run_cell(Registry::global(), c) {
        Outcome::Executed { .. } => {}
        other => panic!("{c}: {other:?}"),
    }
}

#[test]
fn expert_parallel_over_2_4_and_8_ranks() {
    for ep in [2, 4, 8] {
        executes(&cell(|c| c.parallel = ParallelConfig::ep(ep)));
    }
}

#[test]
fn tensor_and_data_parallel_attention_with_expert_parallel_moe() {
    executes(&cell(|c| {
        c.parallel = ParallelConfig {
            tp: 2,
            dp: 2,
            ep: true,
            sp: false,
        }
    }));
}

#[test]
fn sequence_parallel() {
    executes(&cell(|c| {
        c.parallel = ParallelConfig {
            tp: 2,
            dp: 2,
            ep: true,
            sp: true,
        }
    }));
}

#[test]
fn nvfp4_with_swizzled_scales() {
    executes(&cell(|c| {
        c.parallel = ParallelConfig::ep(4);
        c.quant = QuantConfig::new(QuantScheme::Nvfp4)
            .with_params(params())
            .with_scale_layout(ScaleLayout::Swizzled128x4);
    }));
}

#[test]
fn deferred_fp8_block128() {
    executes(&cell(|c| {
        c.quant = QuantConfig::new(QuantScheme::Fp8Block128)
            .with_params(params())
            .deferred()
    }));
}

#[test]
fn deepseek_v3_with_every_expert_on_one_rank() {
    executes(&cell(|c| {
        c.parallel = ParallelConfig::ep(4);
        c.shape = shape("deepseek-v3");
        c.routing = Routing::AllOnOneRank;
    }));
}

#[test]
fn a_replica_with_zero_tokens() {
    for parallel in [
        ParallelConfig::ep(2),
        ParallelConfig::ep(4),
        ParallelConfig {
            tp: 2,
            dp: 2,
            ep: true,
            sp: false,
        },
    ] {
        executes(&cell(|c| {
            c.parallel = parallel;
            c.routing = Routing::EmptyFirstReplica;
        }));
    }
}

/// Every rank sends every token to the first rank: its dense region fills to the last row.
#[test]
fn skewed_routing_at_full_capacity() {
    for ep in [2, 4, 8] {
        executes(&cell(|c| {
            c.parallel = ParallelConfig::ep(ep);
            c.routing = Routing::Skewed;
            c.shape.tokens = c.shape.max_tokens_per_rank;
        }));
    }
}

#[test]
fn batched_experts_format_is_rejected() {
    let c = cell(|c| c.format = ActivationFormat::BatchedExperts);
    match run_cell(Registry::global(), &c) {
        Outcome::Rejected { reason } => assert!(reason.contains("batched-experts"), "{reason}"),
        other => panic!("{c}: {other:?}"),
    }
}

/// EP4, 8 experts (two per rank), top-2, hidden 16, at most 4 tokens per rank; rank `r` has
/// `r` tokens, so rank 0 sends nothing and the per-source counts differ.
#[test]
fn received_rows_are_dense_by_source_and_replies_return_to_their_token() {
    const EP: usize = 4;
    const H: usize = 16;
    let moe = MoeConfig::new(8, 2, H, 4, InputDtype::Bf16);
    let layer = LayerConfig::new(
        moe,
        QuantConfig::new(QuantScheme::Bf16),
        ParallelConfig::ep(EP),
        ActivationFormat::Standard,
    )
    .expect("valid layer");
    let placement = ExpertPlacement::contiguous(8, EP);
    // Token `t` of rank `r`: values exact in bf16, even when doubled.
    let tokens = |r: usize| -> Vec<f32> { (0..r * H).map(|i| ((r * 4 * H + i) % 256) as f32 * 0.125).collect() };
    let ids = |r: usize| -> Vec<i32> {
        (0..r)
            .flat_map(|t| [(r + t) % 8, (r + 2 * t + 3) % 8])
            .map(|e| e as i32)
            .collect()
    };
    let weights = |r: usize| -> Vec<f32> { (0..r).flat_map(|_| [0.25, 0.75]).collect() };

    let results = run_host_world(HostWorldConfig::new(EP), |rank| {
        let me = rank.rank();
        let mut pf = Registry::global().construct(NAME, &layer, &RankContext::Host(rank))?;
        // round 128 + counts 128 (64 bytes) + 3 flag arrays of 128 + 16 dispatch rows of 64
        // bytes (32 payload, 16 ids, 16 weights) + 16 combine rows of 32 bytes.
        assert_eq!(pf.workspace_bytes(), 128 + 128 + 3 * 128 + 16 * 64 + 16 * 32);
        let x = Tensor::from_f32(DType::Bf16, &[me, H], &tokens(me));
        let (ti, tw) = (
            Tensor::from_i32(&[me, 2], &ids(me)),
            Tensor::from_f32(DType::F32, &[me, 2], &weights(me)),
        );
        // Two calls: the second runs on the round counters and buffers the first left behind.
        for _ in 0..2 {
            let prepared = pf.prepare(PrepareInput::new(&layer, 4, &x, &ti, &tw)?)?;
            let Dispatched::Standard {
                activations,
                topk_ids,
                topk_weights,
            } = &prepared.dispatched
            else {
                panic!("two-sided delivers Standard rows");
            };
            let mut want_payload = Vec::new();
            let (mut want_ids, mut want_w) = (Vec::new(), Vec::new());
            for s in 0..EP {
                let (sx, si, sw) = (Tensor::from_f32(DType::Bf16, &[s, H], &tokens(s)), ids(s), weights(s));
                for t in 0..s {
                    let row = &si[2 * t..2 * t + 2];
                    if row.iter().any(|&e| placement.owner(e as usize) == me) {
                        want_payload.extend_from_slice(sx.row_bytes(t));
                        for j in 0..2 {
                            let mine = placement.owner(row[j] as usize) == me;
                            want_ids.push(if mine { row[j] } else { -1 });
                            want_w.push(if mine { sw[2 * t + j] } else { 0.0 });
                        }
                    }
                }
            }
            want_payload.resize(EP * 4 * 2 * H, 0);
            want_ids.resize(EP * 4 * 2, -1);
            want_w.resize(EP * 4 * 2, 0.0);
            assert_eq!(activations.data().bytes(), &want_payload[..], "rank {me}: payload rows");
            assert_eq!(topk_ids.to_i32(), want_ids, "rank {me}: ids");
            assert_eq!(topk_weights.to_f32(), want_w, "rank {me}: weights");

            // Each receiver echoes its received tokens, so each token comes back once per rank
            // it went to.
            let echo = Tensor::from_bytes(DType::Bf16, &[EP * 4, H], activations.data().bytes().to_vec())?;
            let mut out = Tensor::zeros(DType::Bf16, &[me, H]);
            out.poison();
            pf.finalize(prepared.receipt, &echo, &mut out)?;
            let got = out.to_f32();
            let xs = tokens(me);
            let my_ids = ids(me);
            for t in 0..me {
                let mut ranks: Vec<usize> = my_ids[2 * t..2 * t + 2]
                    .iter()
                    .map(|&e| placement.owner(e as usize))
                    .collect();
                ranks.dedup();
                for i in 0..H {
                    assert_eq!(
                        got[t * H + i],
                        ranks.len() as f32 * xs[t * H + i],
                        "rank {me} token {t} column {i}"
                    );
                }
            }
        }
        Ok(())
    });
    for (r, res) in results.into_iter().enumerate() {
        res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
    }
}

/// A receipt passed to another layer's finalize is refused, naming the mistake, before
/// anything is sent. It is consumed there, so `a`'s call can never run the combine its peers
/// wait for: the group refuses every later call, saying so, instead of starting one a round
/// ahead of them.
#[test]
fn a_receipt_from_another_layer_is_refused_and_the_group_refuses_every_later_call() {
    let layer = cell(|_| {}).layer().expect("valid layer");
    let results = run_host_world(HostWorldConfig::new(2), |rank| {
        let ctx = RankContext::Host(rank);
        let mut a = Registry::global().construct(NAME, &layer, &ctx)?;
        let mut b = Registry::global().construct(NAME, &layer, &ctx)?;
        let x = Tensor::zeros(DType::Bf16, &[0, 256]);
        let (ti, tw) = (
            Tensor::from_i32(&[0, 2], &[]),
            Tensor::from_f32(DType::F32, &[0, 2], &[]),
        );
        let input = || PrepareInput::new(&layer, 16, &x, &ti, &tw);
        let expert_out = Tensor::zeros(DType::Bf16, &[32, 256]);
        let mut out = Tensor::zeros(DType::Bf16, &[0, 256]);
        let lost = a.prepare(input()?)?;
        let mut refused = vec![b.finalize(lost.receipt, &expert_out, &mut out).unwrap_err().to_string()];
        for layer in [&mut a, &mut b] {
            refused.push(layer.prepare(input()?).map(drop).unwrap_err().to_string());
        }
        Ok(refused)
    });
    for (r, res) in results.into_iter().enumerate() {
        let refused = res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert!(refused[0].contains("another layer's call"), "rank {r}: {}", refused[0]);
        for msg in &refused[1..] {
            assert!(msg.contains("not finalized"), "rank {r}: {msg}");
        }
    }
}

/// The layers of [`layers_of_different_layouts_share_one_workspace_and_alternate_calls`], in
/// construction order: a bf16 layer; an nvfp4 layer of more tokens per rank (smaller slots,
/// more rows: neither layout covers the other, so it grows the group to their union); a bf16
/// layer of half the hidden size and fewer tokens per rank, which the union covers.
fn shared_cells() -> [Cell; 3] {
    let layer = |quant: QuantConfig, hidden: usize, max_tokens: usize, tokens: usize| {
        cell(|c| {
            c.quant = quant;
            c.shape.hidden = hidden;
            c.shape.max_tokens_per_rank = max_tokens;
            c.shape.tokens = tokens;
        })
    };
    [
        layer(QuantConfig::new(QuantScheme::Bf16), 256, 16, 5),
        layer(QuantConfig::new(QuantScheme::Nvfp4).with_params(params()), 256, 24, 20),
        layer(QuantConfig::new(QuantScheme::Bf16), 128, 8, 7),
    ]
}

fn own_layout(layer: &LayerConfig) -> WorkspaceLayout {
    WorkspaceLayout::for_layer(layer, &layer.dispatch_layout())
}

fn reference_experts(c: &Cell) -> Arc<ReferenceExperts> {
    Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant))
}

/// One call of layer `b` on rank `r` with the reference experts: what they received and the
/// output (poisoned before the call, so an element never written shows).
fn run_call(
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
    let mut y = Tensor::zeros(dtype, &[b.num_dispatchers() * max, layer.moe.hidden]);
    experts.apply(&prepared.dispatched, &layer.ownership(r), &mut y)?;
    let mut out = Tensor::zeros(dtype, inp.tokens.shape());
    out.poison();
    b.finalize(prepared.receipt, &y, &mut out)?;
    Ok((prepared.dispatched, out))
}

/// Fails unless `out` is the oracle's MoE output for `inp` within the cell's tolerance.
fn assert_matches_oracle(c: &Cell, experts: &ReferenceExperts, inp: &ReplicaInputs, out: &Tensor, what: &str) {
    assert_eq!(
        out.first_poisoned(),
        None,
        "{what}: an output element was never written"
    );
    let x = roundtrip_tokens(&c.quant, &inp.tokens).expect("quantizable");
    let want = reference_moe(
        experts.function().as_ref(),
        &x,
        &inp.topk_ids.to_i32(),
        &inp.topk_weights.to_f32(),
        c.shape.top_k,
    );
    let err = max_relative_error(&out.to_f32(), &want);
    let tol = moe_core::harness::tolerance(c.input_dtype);
    assert!(err <= tol, "{what}: max relative error {err:.3e} above {tol:.1e}");
}

/// Three layers of different layouts (nvfp4 and bf16, other tokens per rank, another hidden
/// size) constructed on the same ranks share one workspace, the union of the first two's
/// layouts (the third is covered and rebuilds nothing), and run calls interleaved layer by
/// layer: each call delivers the rows and gives the output bits the layer gives on a workspace
/// of its own, and matches the oracle.
#[test]
fn layers_of_different_layouts_share_one_workspace_and_alternate_calls() {
    let cells = shared_cells();
    let layers: Vec<LayerConfig> = cells.iter().map(|c| c.layer().expect("a valid layer")).collect();
    let own: Vec<WorkspaceLayout> = layers.iter().map(own_layout).collect();
    assert!(!own[0].covers(&own[1]) && !own[1].covers(&own[0]));
    let union = own[0].union(own[1]);
    assert!(union.covers(&own[2]) && union.bytes() > own[0].bytes().max(own[1].bytes()));
    let experts: Vec<_> = cells.iter().map(reference_experts).collect();
    let calls: Vec<Vec<Vec<ReplicaInputs>>> = (0..3)
        .map(|i| cells.iter().zip(&layers).map(|(c, l)| make_inputs(c, l, i)).collect())
        .collect();
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
            built.push(Registry::global().construct(NAME, l, &ctx)?);
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
    for (r, got) in shared.into_iter().enumerate() {
        let (bytes, seen) = got.expect("rank ran");
        assert_eq!(
            bytes,
            [union.bytes(); 3],
            "rank {r}: every layer on the union's workspace"
        );
        for (i, (received, out)) in seen.iter().enumerate() {
            let (call, j) = (i / cells.len(), i % cells.len());
            let want = &alone[j][r].as_ref().expect("the layer ran alone")[call];
            let what = format!("rank {r} call {call} of layer {j}");
            assert!(received == &want.received, "{what}: other rows than alone");
            assert!(out.bytes() == want.out.bytes(), "{what}: other output bits than alone");
            assert_matches_oracle(&cells[j], &experts[j], &calls[call][j][r], out, &what);
        }
    }
}

/// The layers of a group share its top_k and expert count: the workspace's slots and the
/// expert owners are laid out for them.
#[test]
fn a_layer_of_another_top_k_or_expert_count_is_refused_by_the_group() {
    let base = cell(|_| {});
    let other = |edit: fn(&mut Shape)| {
        let mut c = base.clone();
        edit(&mut c.shape);
        c.layer().expect("a valid layer")
    };
    let (top_k, experts) = (other(|s| s.top_k = 1), other(|s| s.num_experts = 4));
    let layer = base.layer().expect("a valid layer");
    let results = run_host_world(HostWorldConfig::new(2), |rank| {
        let ctx = RankContext::Host(rank);
        let first = Registry::global().construct(NAME, &layer, &ctx)?;
        let refused = [&top_k, &experts].map(|l| Registry::global().construct(NAME, l, &ctx).unwrap_err());
        Ok((refused, first.workspace_bytes()))
    });
    for r in results {
        let ([top_k, experts], bytes) = r.expect("both ranks run");
        assert!(
            matches!(&top_k, MoeError::WorkspaceGroupMismatch { field: "top_k", .. }),
            "{top_k}"
        );
        assert!(
            matches!(
                &experts,
                MoeError::WorkspaceGroupMismatch {
                    field: "num_experts",
                    ..
                }
            ),
            "{experts}"
        );
        assert_eq!(bytes, own_layout(&layer).bytes(), "a refused layer grows nothing");
    }
}

/// The layers of a group share its round counter, counts, flags and regions: a second call
/// prepared, by the same layer or another, before the first is finalized is refused before
/// anything is sent, and the first call still finalizes.
#[test]
fn a_second_prepare_before_finalize_is_refused() {
    let cells = shared_cells();
    let layers: Vec<LayerConfig> = cells[..2].iter().map(|c| c.layer().expect("a valid layer")).collect();
    let experts: Vec<_> = cells[..2].iter().map(reference_experts).collect();
    let inputs: Vec<_> = cells.iter().zip(&layers).map(|(c, l)| make_inputs(c, l, 0)).collect();
    let results = run_host_world(HostWorldConfig::new(2), |rank| {
        let r = rank.rank();
        let ctx = RankContext::Host(rank);
        let mut a = Registry::global().construct(NAME, &layers[0], &ctx)?;
        let mut b = Registry::global().construct(NAME, &layers[1], &ctx)?;
        let input = |j: usize, max: usize| {
            let inp = &inputs[j][r];
            PrepareInput::new(&layers[j], max, &inp.tokens, &inp.topk_ids, &inp.topk_weights)
        };
        let first = a.prepare(input(0, a.max_tokens_per_rank())?)?;
        let same = a.prepare(input(0, a.max_tokens_per_rank())?).unwrap_err();
        let other = b.prepare(input(1, b.max_tokens_per_rank())?).unwrap_err();
        let dtype = layers[0].moe.input_dtype.dtype();
        let mut y = Tensor::zeros(dtype, &[2 * a.max_tokens_per_rank(), layers[0].moe.hidden]);
        experts[0].apply(&first.dispatched, &layers[0].ownership(r), &mut y)?;
        let mut out = Tensor::zeros(dtype, inputs[0][r].tokens.shape());
        a.finalize(first.receipt, &y, &mut out)?;
        let (_, after) = run_call(b.as_mut(), &layers[1], &experts[1], r, &inputs[1][r])?;
        Ok((same.to_string(), other.to_string(), out, after))
    });
    for (r, res) in results.into_iter().enumerate() {
        let (same, other, out, after) = res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert!(same.contains("previous call was prepared but not finalized"), "{same}");
        assert!(other.contains("the layers of an EP group take turns"), "{other}");
        assert_matches_oracle(&cells[0], &experts[0], &inputs[0][r], &out, "the first call");
        assert_matches_oracle(&cells[1], &experts[1], &inputs[1][r], &after, "the next call");
    }
}

/// A larger layer constructed between a prepare and its finalize rebuilds the workspace the
/// call's rows and counts were in: the finalize is refused before anything is sent, and every
/// layer's next call runs on the new workspace.
#[test]
fn a_rebuild_between_prepare_and_finalize_fails_the_finalize() {
    let cells = shared_cells();
    let layers: Vec<LayerConfig> = cells[..2].iter().map(|c| c.layer().expect("a valid layer")).collect();
    let experts: Vec<_> = cells[..2].iter().map(reference_experts).collect();
    let inputs: Vec<_> = cells.iter().zip(&layers).map(|(c, l)| make_inputs(c, l, 0)).collect();
    let results = run_host_world(HostWorldConfig::new(2), |rank| {
        let r = rank.rank();
        let ctx = RankContext::Host(rank);
        let mut a = Registry::global().construct(NAME, &layers[0], &ctx)?;
        let inp = &inputs[0][r];
        let early = a.prepare(PrepareInput::new(
            &layers[0],
            a.max_tokens_per_rank(),
            &inp.tokens,
            &inp.topk_ids,
            &inp.topk_weights,
        )?)?;
        let small = a.workspace_bytes();
        let mut b = Registry::global().construct(NAME, &layers[1], &ctx)?;
        let dtype = layers[0].moe.input_dtype.dtype();
        let y = Tensor::zeros(dtype, &[2 * a.max_tokens_per_rank(), layers[0].moe.hidden]);
        let mut out = Tensor::zeros(dtype, inp.tokens.shape());
        let stale = a.finalize(early.receipt, &y, &mut out).unwrap_err();
        let grown = a.workspace_bytes();
        let (_, again) = run_call(a.as_mut(), &layers[0], &experts[0], r, inp)?;
        let (_, other) = run_call(b.as_mut(), &layers[1], &experts[1], r, &inputs[1][r])?;
        Ok((stale, small, grown, again, other))
    });
    let union = own_layout(&layers[0]).union(own_layout(&layers[1])).bytes();
    for (r, res) in results.into_iter().enumerate() {
        let (stale, small, grown, again, other) = res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert!(
            matches!(&stale, MoeError::InvalidInput { op: "finalize", detail } if detail.contains("rebuilt")),
            "{stale}"
        );
        assert_eq!((small, grown), (own_layout(&layers[0]).bytes(), union));
        assert_matches_oracle(&cells[0], &experts[0], &inputs[0][r], &again, "the call after");
        assert_matches_oracle(&cells[1], &experts[1], &inputs[1][r], &other, "the larger layer");
    }
}
