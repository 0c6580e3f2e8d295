//! Shared pieces of the cross-backend tests: the conformance suite, written once and
//! instantiated for every built-in backend by [`conformance_suite!`].

pub use moe_a2a::harness::Cell;
use moe_a2a::harness::{Outcome, SHAPES, Shape, run_cell};
use moe_a2a::{ParallelConfig, PlatformKind, Registry};

pub use moe_a2a;

/// One OS process per rank for the process tests (shared with the GPU process tests).
pub use moe_a2a::harness::processes;

/// One rank's layers, one `MoeLayer` per cell with the cell's reference experts, constructed in
/// the same order on every rank.
pub fn layers_on(cells: &[Cell], rank: &moe_a2a::host::HostRank) -> moe_a2a::Result<Vec<moe_a2a::runner::MoeLayer>> {
    cells
        .iter()
        .map(|c| {
            let experts = std::sync::Arc::new(moe_a2a::experts::ReferenceExperts::new(
                c.expert_function(),
                c.format,
                c.quant,
            ));
            moe_a2a::runner::MoeLayer::new(
                registry(),
                &c.backend,
                c.layer()?,
                experts,
                moe_a2a::RankContext::Host(rank.clone()),
            )
        })
        .collect()
}

/// The registry of this test binary.
pub fn registry() -> &'static Registry {
    moe_a2a::registry()
}

/// The default cell of `backend` ([`Cell::new`]).
pub fn cell(backend: &str) -> Cell {
    Cell::new(backend)
}

/// The shape called `name`.
pub fn shape(name: &str) -> Shape {
    *SHAPES.iter().find(|s| s.name == name).expect("a matrix shape")
}

/// Runs `cell`; if the backend's record accepts it the cell must execute within tolerance,
/// otherwise it must be rejected. Returns whether it executed.
pub fn check(cell: &Cell) -> bool {
    let accepts = cell
        .layer()
        .map(|l| registry().check(&cell.backend, &l, PlatformKind::Host).is_ok())
        .unwrap_or(false);
    match run_cell(registry(), cell) {
        Outcome::Executed { .. } if accepts => true,
        Outcome::Rejected { .. } if !accepts => false,
        other => panic!("{cell}: declared support = {accepts}, outcome {other:?}"),
    }
}

/// Instantiates the conformance suite for one backend.
#[macro_export]
macro_rules! conformance_suite {
    ($module:ident, $backend:expr) => {
        mod $module {
            use $crate::moe_a2a::harness::Routing;
            use $crate::moe_a2a::quant::QuantScheme;
            use $crate::moe_a2a::{ActivationFormat, ParallelConfig, QuantConfig};
            use $crate::{cell, check, shape};

            const BACKEND: &str = $backend;

            #[test]
            fn every_supported_parallel_mode_matches_the_oracle() {
                let mut executed = 0;
                for parallel in $crate::moe_a2a::harness::parallel_variants() {
                    executed += check(&$crate::Cell {
                        parallel,
                        ..cell(BACKEND)
                    }) as usize;
                }
                assert!(executed >= 3, "{BACKEND} executed only {executed} parallel modes");
            }

            #[test]
            fn every_scheme_matches_the_oracle() {
                for (input_dtype, quant) in $crate::moe_a2a::harness::quant_variants() {
                    let c = $crate::Cell {
                        input_dtype,
                        quant,
                        shape: shape("top1"),
                        ..cell(BACKEND)
                    };
                    assert!(check(&c), "{c} was rejected");
                }
            }

            #[test]
            fn skewed_routing_sends_every_token_to_one_expert() {
                for parallel in [ParallelConfig::ep(2), ParallelConfig::ep(4)] {
                    check(&$crate::Cell {
                        parallel,
                        routing: Routing::Skewed,
                        ..cell(BACKEND)
                    });
                }
            }

            #[test]
            fn all_experts_of_every_token_on_one_rank() {
                let c = $crate::Cell {
                    parallel: ParallelConfig::ep(4),
                    routing: Routing::AllOnOneRank,
                    shape: shape("deepseek-v3"),
                    ..cell(BACKEND)
                };
                assert!(check(&c));
            }

            #[test]
            fn a_rank_with_zero_tokens() {
                for parallel in [ParallelConfig::ep(2), ParallelConfig::ep(4)] {
                    assert!(check(&$crate::Cell {
                        parallel,
                        routing: Routing::EmptyFirstReplica,
                        ..cell(BACKEND)
                    }));
                }
            }

            #[test]
            fn an_explicit_expert_map() {
                for parallel in [
                    ParallelConfig::ep(4),
                    ParallelConfig {
                        tp: 2,
                        dp: 2,
                        ep: true,
                        sp: true,
                    },
                ] {
                    let c = $crate::Cell {
                        parallel,
                        placement: $crate::moe_a2a::harness::Placement::RoundRobin,
                        shape: shape("deepseek-v3"),
                        ..cell(BACKEND)
                    };
                    assert!(check(&c), "{c} was rejected");
                }
            }

            #[test]
            fn top_k_of_one() {
                let c = $crate::Cell {
                    parallel: ParallelConfig::ep(4),
                    shape: shape("top1"),
                    ..cell(BACKEND)
                };
                assert!(check(&c));
            }

            #[test]
            fn deferred_quantization_matches_the_oracle() {
                let quant = QuantConfig::new(QuantScheme::Nvfp4).deferred();
                assert!(check(&$crate::Cell {
                    quant,
                    ..cell(BACKEND)
                }));
            }

            #[test]
            fn batched_format_is_served_exactly_when_declared() {
                for scheme in [QuantScheme::Bf16, QuantScheme::Nvfp4] {
                    check(&$crate::Cell {
                        quant: QuantConfig::new(scheme),
                        format: ActivationFormat::BatchedExperts,
                        ..cell(BACKEND)
                    });
                }
            }

            #[test]
            fn too_many_tokens_is_an_error_and_nothing_is_written() {
                $crate::too_many_tokens(BACKEND);
            }

            #[test]
            fn results_are_bitwise_reproducible() {
                $crate::reproducible(BACKEND);
            }
        }
    };
}

/// Every rank passes one token more than the layer's bound: each gets `TooManyTokens`, its
/// output keeps the poison, and the next, valid call works (nothing half-sent).
pub fn too_many_tokens(backend: &str) {
    use moe_a2a::harness::make_inputs;
    use moe_a2a::host::{HostWorldConfig, run_host_world};
    use moe_a2a::runner::MoeLayer;
    use moe_a2a::{MoeError, RankContext, Tensor};
    use std::sync::Arc;

    let mut c = cell(backend);
    c.shape.tokens = c.shape.max_tokens_per_rank + 1;
    let layer = c.layer().expect("valid layer");
    let over = make_inputs(&c, &layer, 0);
    let mut ok_cell = c.clone();
    ok_cell.shape.tokens = c.shape.max_tokens_per_rank;
    let ok = make_inputs(&ok_cell, &layer, 1);
    let experts = Arc::new(moe_a2a::experts::ReferenceExperts::new(
        c.expert_function(),
        c.format,
        c.quant,
    ));
    let results = run_host_world(HostWorldConfig::new(2), |rank| {
        let r = rank.rank();
        let mut moe = MoeLayer::new(
            registry(),
            backend,
            layer.clone(),
            experts.clone(),
            RankContext::Host(rank),
        )?;
        let inp = &over[c.parallel.dp_rank(r)];
        let mut out = Tensor::zeros(c.input_dtype.dtype(), inp.tokens.shape());
        out.poison();
        let err = moe
            .forward(&inp.tokens, &inp.topk_ids, &inp.topk_weights, &mut out)
            .unwrap_err();
        assert!(matches!(err, MoeError::TooManyTokens { tokens: 17, max: 16 }), "{err}");
        assert_eq!(out.first_poisoned(), Some(0), "output touched by a refused call");
        assert!(
            out.bytes().iter().all(|&b| b == moe_a2a::tensor::POISON_BYTE),
            "output touched by a refused call"
        );
        let inp = &ok[c.parallel.dp_rank(r)];
        let mut out = Tensor::zeros(c.input_dtype.dtype(), inp.tokens.shape());
        moe.forward(&inp.tokens, &inp.topk_ids, &inp.topk_weights, &mut out)?;
        Ok(err.to_string())
    });
    for r in results {
        let msg = r.expect("the valid call after the refused one works");
        assert!(msg.contains("at most 16 tokens per rank"), "{msg}");
    }
}

/// Two runs of the same cell give the same bits on every rank.
pub fn reproducible(backend: &str) {
    let c = Cell {
        parallel: ParallelConfig::ep(4),
        ..cell(backend)
    };
    let a = outputs(&c);
    let b = outputs(&c);
    assert_eq!(a, b, "{c}: outputs differ between identical runs");
}

/// Every rank's output bits of one call of `cell`.
pub fn outputs(c: &Cell) -> Vec<Vec<u8>> {
    use moe_a2a::harness::make_inputs;
    use moe_a2a::host::{HostWorldConfig, run_host_world};
    use moe_a2a::runner::MoeLayer;
    use moe_a2a::{RankContext, Tensor};
    use std::sync::Arc;

    let layer = c.layer().expect("valid layer");
    let inputs = make_inputs(c, &layer, 0);
    let experts = Arc::new(moe_a2a::experts::ReferenceExperts::new(
        c.expert_function(),
        c.format,
        c.quant,
    ));
    run_host_world(HostWorldConfig::new(c.parallel.world_size()), |rank| {
        let r = rank.rank();
        let mut moe = MoeLayer::new(
            registry(),
            &c.backend,
            layer.clone(),
            experts.clone(),
            RankContext::Host(rank),
        )?;
        let inp = &inputs[c.parallel.dp_rank(r)];
        let mut out = Tensor::zeros(c.input_dtype.dtype(), inp.tokens.shape());
        moe.forward(&inp.tokens, &inp.topk_ids, &inp.topk_weights, &mut out)?;
        Ok(out.bytes().to_vec())
    })
    .into_iter()
    .map(|r| r.expect("run"))
    .collect()
}
