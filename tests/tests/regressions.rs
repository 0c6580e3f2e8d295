//! Named regression tests for the bugs this project was seeded with.

use std::sync::Arc;

use backend_nvlink_one_sided::WorkspaceLayout;
use moe_a2a::harness::{Alteration, Altered, Cell, Outcome, Routing, make_inputs, run_cell};
use moe_a2a::host::{HostWorldConfig, run_host_world};
use moe_a2a::quant::QuantScheme;
use moe_a2a::registry::BackendRegistration;
use moe_a2a::runner::MoeLayer;
use moe_a2a::workspace_group::GroupLayout;
use moe_a2a::{
    ActivationFormat, Activations, Dispatched, LayerConfig, MoeError, ParallelConfig, PrepareFinalize, PrepareInput,
    QuantConfig, RankContext, Tensor,
};
use moe_a2a_tests::{cell, registry};
use moe_peer::{PeerLayout, PeerProtocol};

macro_rules! wrapped_backend {
    ($name:literal, $inner:literal, $caps:expr, $alteration:expr) => {
        moe_a2a::register_backend!(BackendRegistration {
            name: $name,
            description: concat!("test wrapper of ", $inner),
            capabilities: $caps,
            construct: |layer: &LayerConfig, ctx: &RankContext| {
                let reg = inner_registration($inner);
                Ok(Box::new(Altered {
                    inner: (reg.construct)(layer, ctx)?,
                    alteration: $alteration,
                }) as Box<dyn PrepareFinalize>)
            },
        });
    };
}

fn inner_registration(name: &str) -> &'static BackendRegistration {
    registry().get(name).expect("the wrapped backend is registered")
}

wrapped_backend!(
    "flipped-flag/nvlink-one-sided",
    "nvlink-one-sided",
    <backend_nvlink_one_sided::OneSided as PeerProtocol>::CAPABILITIES,
    Alteration::FlippedReduction
);
wrapped_backend!(
    "flipped-flag/allgather-rs",
    "allgather-rs",
    backend_allgather_rs::CAPABILITIES,
    Alteration::FlippedReduction
);
wrapped_backend!(
    "forgets-last-row/nvlink-one-sided",
    "nvlink-one-sided",
    <backend_nvlink_one_sided::OneSided as PeerProtocol>::CAPABILITIES,
    Alteration::ForgetsLastRow
);

fn tp_dp_ep(backend: &str) -> Cell {
    Cell {
        parallel: ParallelConfig {
            tp: 2,
            dp: 2,
            ep: true,
            sp: false,
        },
        ..cell(backend)
    }
}

#[test]
fn double_reduce_a_wrong_output_is_reduced_fails_the_numeric_check() {
    for (honest, flipped) in [
        ("nvlink-one-sided", "flipped-flag/nvlink-one-sided"),
        ("allgather-rs", "flipped-flag/allgather-rs"),
    ] {
        assert!(
            matches!(run_cell(registry(), &tp_dp_ep(honest)), Outcome::Executed { .. }),
            "{honest} must pass as the control"
        );
        match run_cell(registry(), &tp_dp_ep(flipped)) {
            Outcome::Failed { error } => assert!(error.contains("exceeds the tolerance"), "{flipped}: {error}"),
            other => panic!("{flipped}: a wrong output_is_reduced went unnoticed: {other:?}"),
        }
    }
}

#[test]
fn outputs_actually_written_an_unwritten_row_fails_the_cell() {
    match run_cell(registry(), &cell("forgets-last-row/nvlink-one-sided")) {
        Outcome::Failed { error } => assert!(error.contains("was never written"), "{error}"),
        other => panic!("an unwritten output row went unnoticed: {other:?}"),
    }
}

/// Runs prepare on every rank of an EP-2 world and returns what rank 0 received, finishing the
/// protocol with zero expert output.
fn received(backend: &str, quant: QuantConfig) -> Dispatched {
    let c = Cell { quant, ..cell(backend) };
    let layer = c.layer().expect("valid layer");
    let inputs = make_inputs(&c, &layer, 0);
    let mut got = run_host_world(HostWorldConfig::new(2), |rank| {
        let r = rank.rank();
        let mut b = registry().construct(backend, &layer, &RankContext::Host(rank))?;
        let inp = &inputs[r];
        let input = PrepareInput::new(
            &layer,
            b.max_tokens_per_rank(),
            &inp.tokens,
            &inp.topk_ids,
            &inp.topk_weights,
        )?;
        let prepared = b.prepare(input)?;
        let rows = match &prepared.dispatched {
            Dispatched::Standard { topk_ids, .. } => topk_ids.shape()[0],
            Dispatched::Batched { .. } => unreachable!("Standard was asked"),
        };
        let zeros = Tensor::zeros(layer.moe.input_dtype.dtype(), &[rows, layer.moe.hidden]);
        let mut out = Tensor::zeros(layer.moe.input_dtype.dtype(), inp.tokens.shape());
        b.finalize(prepared.receipt, &zeros, &mut out)?;
        Ok(prepared.dispatched)
    });
    got.swap_remove(0).expect("rank 0 ran")
}

#[test]
fn scale_tensor_absent_with_deferred_quantization() {
    for backend in moe_a2a::BUILTIN_BACKENDS {
        let deferred = received(backend, QuantConfig::new(QuantScheme::Nvfp4).deferred());
        match deferred.activations() {
            Activations::Unscaled { scheme, data } => {
                assert_eq!(*scheme, QuantScheme::Bf16, "{backend}");
                assert_eq!(data.shape()[1], 2 * 256, "{backend}: bf16 payload bytes");
            }
            other => panic!("{backend}: deferred nvfp4 delivered scales: {other:?}"),
        }
        let quantized = received(backend, QuantConfig::new(QuantScheme::Nvfp4));
        assert!(
            matches!(quantized.activations(), Activations::Scaled { .. }),
            "{backend}: nvfp4 without deferral must deliver scales"
        );
    }
}

fn layer_with(quant: QuantConfig, top_k: usize) -> LayerConfig {
    let mut c = Cell {
        quant,
        ..cell("nvlink-one-sided")
    };
    c.shape.top_k = top_k;
    c.layer().expect("valid layer")
}

fn expected_bytes(layer: &LayerConfig) -> usize {
    WorkspaceLayout::for_layer(layer, &layer.dispatch_layout()).bytes()
}

#[test]
fn workspace_overflow_across_an_nvfp4_layer_and_a_bf16_layer() {
    let nvfp4 = layer_with(QuantConfig::new(QuantScheme::Nvfp4), 2);
    let bf16 = layer_with(QuantConfig::new(QuantScheme::Bf16), 2);
    assert!(expected_bytes(&bf16) > expected_bytes(&nvfp4));
    let results = run_host_world(HostWorldConfig::new(2), |rank| {
        let ctx = RankContext::Host(rank);
        let first = registry().construct("nvlink-one-sided", &nvfp4, &ctx)?;
        let small = first.workspace_bytes();
        let second = registry().construct("nvlink-one-sided", &bf16, &ctx)?;
        let grown = (first.workspace_bytes(), second.workspace_bytes());
        let third = registry().construct("nvlink-one-sided", &nvfp4, &ctx)?;
        let after = third.workspace_bytes();
        let mismatch = registry()
            .construct(
                "nvlink-one-sided",
                &layer_with(QuantConfig::new(QuantScheme::Bf16), 3),
                &ctx,
            )
            .unwrap_err();
        Ok((small, grown, after, mismatch))
    });
    // Field-major regions: the union takes bf16's payload rows and nvfp4's scale rows.
    let union = WorkspaceLayout::for_layer(&bf16, &bf16.dispatch_layout())
        .union(WorkspaceLayout::for_layer(&nvfp4, &nvfp4.dispatch_layout()))
        .bytes();
    assert!(union > expected_bytes(&bf16));
    for r in results {
        let (small, grown, after, mismatch) = r.expect("rank ran");
        assert_eq!(small, expected_bytes(&nvfp4));
        assert_eq!(grown, (union, union), "the group grows to the union");
        assert_eq!(after, union, "a smaller layer never shrinks the group");
        assert!(
            matches!(&mismatch, MoeError::WorkspaceGroupMismatch { field: "top_k", .. }),
            "{mismatch}"
        );
    }
    // Both layers run at full capacity (every slot of every source used) on the shared workspace.
    run_layers_at_capacity(&[nvfp4, bf16]);
}

/// Runs each layer in turn on the same ranks with every token of every rank routed to rank 0,
/// filling all its slots, and compares with the oracle.
fn run_layers_at_capacity(layers: &[LayerConfig]) {
    let cells: Vec<Cell> = layers
        .iter()
        .map(|l| {
            let mut c = Cell {
                quant: l.quant,
                routing: Routing::Skewed,
                ..cell("nvlink-one-sided")
            };
            c.shape.top_k = l.moe.top_k;
            c.shape.tokens = c.shape.max_tokens_per_rank;
            c
        })
        .collect();
    let inputs: Vec<_> = cells.iter().zip(layers).map(|(c, l)| make_inputs(c, l, 0)).collect();
    let experts: Vec<_> = cells
        .iter()
        .map(|c| {
            Arc::new(moe_a2a::experts::ReferenceExperts::new(
                c.expert_function(),
                c.format,
                c.quant,
            ))
        })
        .collect();
    let outs = run_host_world(HostWorldConfig::new(2), |rank| {
        let r = rank.rank();
        let mut built = Vec::new();
        for (l, e) in layers.iter().zip(&experts) {
            built.push(MoeLayer::new(
                registry(),
                "nvlink-one-sided",
                l.clone(),
                e.clone(),
                RankContext::Host(rank.clone()),
            )?);
        }
        let mut outs = Vec::new();
        for (moe, inp) in built.iter_mut().zip(&inputs) {
            let inp = &inp[r];
            let mut out = Tensor::zeros(moe_a2a::DType::Bf16, inp.tokens.shape());
            moe.forward(&inp.tokens, &inp.topk_ids, &inp.topk_weights, &mut out)?;
            outs.push(out.to_f32());
        }
        Ok(outs)
    });
    for (r, got) in outs.into_iter().enumerate() {
        let got = got.expect("rank ran");
        for (i, c) in cells.iter().enumerate() {
            let inp = &inputs[i][r];
            let x = moe_a2a::reference::roundtrip_tokens(&c.quant, &inp.tokens).expect("quantizable");
            let want = moe_a2a::reference::reference_moe(
                experts[i].function().as_ref(),
                &x,
                &inp.topk_ids.to_i32(),
                &inp.topk_weights.to_f32(),
                c.shape.top_k,
            );
            let err = moe_a2a::reference::max_relative_error(&got[i], &want);
            assert!(
                err < moe_a2a::harness::tolerance(c.input_dtype),
                "layer {i} rank {r}: error {err}"
            );
        }
    }
}

#[test]
fn a_non_nvfp4_format_is_sized_by_its_own_wire_size() {
    for scheme in [
        QuantScheme::Fp8Block128,
        QuantScheme::Mxfp8,
        QuantScheme::Fp8PerToken,
        QuantScheme::Bf16,
    ] {
        let layer = layer_with(QuantConfig::new(scheme), 2);
        let d = layer.dispatch_layout();
        let wire = scheme.wire_layout(256).expect("valid hidden");
        let align = |x: usize| x.div_ceil(16) * 16;
        assert_eq!(
            d.slot_bytes(),
            align(wire.payload_bytes) + align(wire.scale_bytes) + 2 * align(4 * 2),
            "{scheme}: slot = payload + scales + ids + weights"
        );
        let bytes = run_host_world(HostWorldConfig::new(2), |rank| {
            Ok(registry()
                .construct("nvlink-one-sided", &layer, &RankContext::Host(rank))?
                .workspace_bytes())
        });
        for b in bytes {
            assert_eq!(b.expect("rank ran"), expected_bytes(&layer), "{scheme}");
        }
        run_layers_at_capacity(&[layer]);
    }
}

#[test]
fn two_layers_with_different_hidden_share_one_group() {
    let mut c = Cell {
        quant: QuantConfig::new(QuantScheme::Bf16),
        ..cell("nvlink-one-sided")
    };
    let a = c.layer().expect("valid");
    c.shape.hidden = 512;
    let b = c.layer().expect("valid");
    assert!(expected_bytes(&b) > expected_bytes(&a));
    let got = run_host_world(HostWorldConfig::new(2), |rank| {
        let ctx = RankContext::Host(rank);
        let x = registry().construct("nvlink-one-sided", &a, &ctx)?;
        let _y = registry().construct("nvlink-one-sided", &b, &ctx)?;
        Ok(x.workspace_bytes())
    });
    for g in got {
        assert_eq!(g.expect("rank ran"), expected_bytes(&b));
    }
}

#[test]
fn format_mismatch_between_backend_and_experts_is_refused() {
    let c = cell("nvlink-one-sided");
    let layer = c.layer().expect("valid");
    let batched = Arc::new(moe_a2a::experts::ReferenceExperts::new(
        c.expert_function(),
        ActivationFormat::BatchedExperts,
        c.quant,
    ));
    let errs = run_host_world(HostWorldConfig::new(2), |rank| {
        Ok(MoeLayer::new(
            registry(),
            "nvlink-one-sided",
            layer.clone(),
            batched.clone(),
            RankContext::Host(rank),
        )
        .unwrap_err())
    });
    for e in errs {
        let e = e.expect("rank ran");
        assert!(matches!(e, MoeError::FormatMismatch { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("delivers standard activations but the experts consume batched-experts"),
            "{e}"
        );
    }
}

/// `forward` given a 1-D `tokens` reported a wrong `out` of as many rows as `tokens` has
/// elements; it names `tokens`, on every backend.
#[test]
fn one_dimensional_tokens_in_forward_are_named_as_tokens() {
    for backend in moe_a2a::BUILTIN_BACKENDS {
        let c = cell(backend);
        let layer = c.layer().expect("valid");
        let experts = Arc::new(moe_a2a::experts::ReferenceExperts::new(
            c.expert_function(),
            c.format,
            c.quant,
        ));
        let errs = run_host_world(HostWorldConfig::new(2), |rank| {
            let r = rank.rank();
            let mut moe_layer = MoeLayer::new(
                registry(),
                backend,
                layer.clone(),
                experts.clone(),
                RankContext::Host(rank),
            )?;
            let inputs = make_inputs(&c, &layer, 0);
            let inp = &inputs[r];
            let flat = Tensor::from_bytes(
                inp.tokens.dtype(),
                &[inp.tokens.bytes().len() / 2],
                inp.tokens.bytes().to_vec(),
            )?;
            let mut out = Tensor::zeros(inp.tokens.dtype(), inp.tokens.shape());
            Ok(moe_layer
                .forward(&flat, &inp.topk_ids, &inp.topk_weights, &mut out)
                .unwrap_err())
        });
        for e in errs {
            let e = e.expect("rank ran").to_string();
            assert!(
                e.contains("`tokens` must be a [tokens,") && !e.contains("`out`"),
                "{backend}: {e}"
            );
        }
    }
}
