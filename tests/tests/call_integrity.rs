//! Every rank agrees on every call, on every built-in backend (host platform, through the
//! layer runner): a rank whose input is refused makes its peers fail the same call naming it;
//! a rank that skips a call, or runs another layer's call, makes that call fail on every rank;
//! a rank that arrives after its peers' timeout fails its call at once; and in each case the
//! group's next call succeeds on every rank with the oracle's numbers, without a new world.

use std::time::Duration;

use moe_a2a::harness::{Cell, Placement, ReplicaInputs, make_inputs, matches_oracle};
use moe_a2a::host::{HostWorldConfig, run_host_world};
use moe_a2a::quant::QuantScheme;
use moe_a2a::runner::MoeLayer;
use moe_a2a::{BUILTIN_BACKENDS, MoeError, ParallelConfig, QuantConfig, Tensor};
use moe_a2a_tests::layers_on;

const RANKS: usize = 4;

/// A layer of `backend` over `RANKS` EP ranks quantized with `scheme`, its expert weights
/// seeded by `seed` (two layers of other seeds compute other functions).
fn layer_cell(backend: &str, scheme: QuantScheme, seed: &str) -> Cell {
    let mut c = Cell::new(backend);
    c.parallel = ParallelConfig::ep(RANKS);
    c.quant = QuantConfig::new(scheme).with_params(moe_a2a::quant::QuantParams {
        fp8_static_scale: 0.05,
        nvfp4_global_scale: 448.0 * 6.0 / 100.0,
    });
    c.shape.tokens = 5;
    let mut c = c.reseeded();
    c.seed ^= moe_a2a::harness::seed_of(seed);
    c
}

/// A forward of `layer` on `inp`, returning the output.
fn forward(layer: &mut MoeLayer, inp: &ReplicaInputs) -> moe_a2a::Result<Tensor> {
    let mut out = Tensor::zeros(inp.tokens.dtype(), inp.tokens.shape());
    out.poison();
    layer.forward(&inp.tokens, &inp.topk_ids, &inp.topk_weights, &mut out)?;
    Ok(out)
}

/// Fails unless the call after the failed one, `got`, gave rank `r` the oracle's numbers for
/// `cell` on `inp`.
fn next_call_is_right(backend: &str, r: usize, cell: &Cell, inp: &ReplicaInputs, got: moe_a2a::Result<Tensor>) {
    let out = got.unwrap_or_else(|e| panic!("{backend} rank {r}, the next call: {e}"));
    matches_oracle(cell, inp, &out, &format!("{backend} rank {r}, the next call")).unwrap_or_else(|e| panic!("{e}"));
}

/// `inp` with expert id `id` in its first slot: out of range for the layer.
fn with_bad_id(inp: &ReplicaInputs, id: i32) -> ReplicaInputs {
    let mut ids = inp.topk_ids.to_i32();
    ids[0] = id;
    ReplicaInputs {
        topk_ids: Tensor::from_i32(inp.topk_ids.shape(), &ids),
        ..inp.clone()
    }
}

/// Fails unless `got` is an error that `expected` accepts.
fn failed_as(what: &str, got: &moe_a2a::Result<Tensor>, expected: impl Fn(&MoeError) -> bool) {
    match got {
        Err(e) if expected(e) => {}
        Err(e) => panic!("{what}: unexpected error: {e}"),
        Ok(_) => panic!("{what}: succeeded"),
    }
}

/// A bad expert id on rank 0 only: rank 0 gets its own error, every peer fails the same call
/// naming rank 0 at once (no timeout). The next call is on another layer (nvfp4, other expert
/// weights), and every rank gets the oracle's numbers: before, the peers' call paired with
/// rank 0's next one, on the other layer, and returned wrong numbers without an error.
#[test]
fn a_bad_input_on_one_rank_fails_that_call_on_every_rank_and_the_next_call_succeeds() {
    for backend in BUILTIN_BACKENDS {
        let cells = [
            layer_cell(backend, QuantScheme::Bf16, "first"),
            layer_cell(backend, QuantScheme::Nvfp4, "second"),
        ];
        let layers: Vec<_> = cells.iter().map(|c| c.layer().expect("valid")).collect();
        let inputs: Vec<_> = cells.iter().zip(&layers).map(|(c, l)| make_inputs(c, l, 0)).collect();
        let config = HostWorldConfig {
            ranks: RANKS,
            timeout: Duration::from_secs(20),
        };
        let results = run_host_world(config, |rank| {
            let r = rank.rank();
            let mut built = layers_on(&cells, &rank)?;
            let bad = if r == 0 {
                with_bad_id(&inputs[0][r], 990_797_655)
            } else {
                inputs[0][r].clone()
            };
            let started = std::time::Instant::now();
            let first = forward(&mut built[0], &bad);
            let waited = started.elapsed();
            let second = forward(&mut built[1], &inputs[1][r]);
            Ok((first, waited, second))
        });
        for (r, res) in results.into_iter().enumerate() {
            let (first, waited, second) = res.unwrap_or_else(|e| panic!("{backend} rank {r}: {e}"));
            let what = format!("{backend} rank {r}, the bad call");
            if r == 0 {
                failed_as(&what, &first, |e| matches!(e, MoeError::InvalidInput { .. }));
            } else {
                failed_as(&what, &first, |e| matches!(e, MoeError::PeerAbandoned { peer: 0, .. }));
            }
            assert!(waited < Duration::from_secs(10), "{what}: failed only after {waited:?}");
            next_call_is_right(backend, r, &cells[1], &inputs[1][r], second);
        }
    }
}

/// Rank 1 skips a call of the first layer and runs the second layer's call while its peers run
/// the first's: that call fails on every rank, naming the disagreement, instead of pairing the
/// two layers. Then every rank runs the second layer's call together, with the oracle's numbers.
#[test]
fn a_rank_that_skips_a_call_fails_that_call_on_every_rank_and_the_next_call_succeeds() {
    for backend in BUILTIN_BACKENDS {
        let cells = [
            layer_cell(backend, QuantScheme::Bf16, "first"),
            layer_cell(backend, QuantScheme::Bf16, "second"),
        ];
        let layers: Vec<_> = cells.iter().map(|c| c.layer().expect("valid")).collect();
        let inputs: Vec<_> = cells.iter().zip(&layers).map(|(c, l)| make_inputs(c, l, 0)).collect();
        let config = HostWorldConfig {
            ranks: RANKS,
            timeout: Duration::from_secs(20),
        };
        let results = run_host_world(config, |rank| {
            let r = rank.rank();
            let mut built = layers_on(&cells, &rank)?;
            let j = usize::from(r == 1);
            let mixed = forward(&mut built[j], &inputs[j][r]);
            let together = forward(&mut built[1], &inputs[1][r]);
            Ok((mixed, together))
        });
        for (r, res) in results.into_iter().enumerate() {
            let (mixed, together) = res.unwrap_or_else(|e| panic!("{backend} rank {r}: {e}"));
            failed_as(&format!("{backend} rank {r}, the mixed call"), &mixed, |e| {
                matches!(
                    e,
                    MoeError::CallMismatch { .. } | MoeError::PeerAbandoned { .. } | MoeError::PeerMovedOn { .. }
                )
            });
            next_call_is_right(backend, r, &cells[1], &inputs[1][r], together);
        }
    }
}

/// Rank 1 comes to the second call 3 s late, its peers' timeout being 2 s: they time out
/// naming it and go on to the third call; rank 1 fails its late call at once (its peers are
/// past it) and runs the third call with them, which succeeds on every rank with the oracle's
/// numbers. Before, every later call timed out on every rank until a new world was built.
#[test]
fn a_rank_that_arrives_after_the_timeout_fails_that_call_and_the_next_call_succeeds() {
    for backend in BUILTIN_BACKENDS {
        let cell = layer_cell(backend, QuantScheme::Bf16, "late");
        let layer = cell.layer().expect("valid");
        let calls: Vec<_> = (0..3).map(|i| make_inputs(&cell, &layer, i)).collect();
        let config = HostWorldConfig {
            ranks: RANKS,
            timeout: Duration::from_secs(2),
        };
        let results = run_host_world(config, |rank| {
            let r = rank.rank();
            let mut built = layers_on(std::slice::from_ref(&cell), &rank)?;
            let mut outs = Vec::new();
            for (i, inputs) in calls.iter().enumerate() {
                if i == 1 && r == 1 {
                    std::thread::sleep(Duration::from_millis(3000));
                }
                outs.push(forward(&mut built[0], &inputs[r]));
            }
            Ok(outs)
        });
        for (r, res) in results.into_iter().enumerate() {
            let outs = res.unwrap_or_else(|e| panic!("{backend} rank {r}: {e}"));
            let out = |i: usize| {
                outs[i]
                    .as_ref()
                    .unwrap_or_else(|e| panic!("{backend} rank {r} call {i}: {e}"))
            };
            matches_oracle(&cell, &calls[0][r], out(0), &format!("{backend} rank {r} call 0"))
                .unwrap_or_else(|e| panic!("{e}"));
            failed_as(&format!("{backend} rank {r} call 1"), &outs[1], |e| {
                matches!(
                    e,
                    MoeError::Timeout { .. } | MoeError::PeerMovedOn { .. } | MoeError::PeerAbandoned { .. }
                )
            });
            matches_oracle(&cell, &calls[2][r], out(2), &format!("{backend} rank {r} call 2"))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// Rank 1 places the first layer's experts round-robin while its peers place them in
/// contiguous blocks (an engine passing ranks different expert maps): that layer's call fails
/// on every rank, at least one naming the other layer digest, instead of sending tokens to
/// ranks that do not hold their experts (or, on allgather-rs, computing some tokens twice and
/// some never, without an error). Then every rank runs the second layer, placed alike, with
/// the oracle's numbers.
#[test]
fn ranks_that_place_experts_differently_fail_that_call_on_every_rank_and_the_next_call_succeeds() {
    for backend in BUILTIN_BACKENDS {
        let contiguous = layer_cell(backend, QuantScheme::Bf16, "placed");
        let round_robin = Cell {
            placement: Placement::RoundRobin,
            ..contiguous.clone()
        };
        let second = layer_cell(backend, QuantScheme::Bf16, "second");
        let layers = [contiguous.layer().expect("valid"), second.layer().expect("valid")];
        let inputs = [
            make_inputs(&contiguous, &layers[0], 0),
            make_inputs(&second, &layers[1], 0),
        ];
        let config = HostWorldConfig {
            ranks: RANKS,
            timeout: Duration::from_secs(20),
        };
        let results = run_host_world(config, |rank| {
            let r = rank.rank();
            let first = if r == 1 { &round_robin } else { &contiguous };
            let mut built = layers_on(&[first.clone(), second.clone()], &rank)?;
            let placed_apart = forward(&mut built[0], &inputs[0][r]);
            let placed_alike = forward(&mut built[1], &inputs[1][r]);
            Ok((placed_apart, placed_alike))
        });
        let mut named = false;
        for (r, res) in results.into_iter().enumerate() {
            let (placed_apart, placed_alike) = res.unwrap_or_else(|e| panic!("{backend} rank {r}: {e}"));
            named |= matches!(placed_apart, Err(MoeError::CallMismatch { .. }));
            failed_as(
                &format!("{backend} rank {r}, the call placed apart"),
                &placed_apart,
                |e| {
                    matches!(
                        e,
                        MoeError::CallMismatch { .. } | MoeError::PeerAbandoned { .. } | MoeError::PeerMovedOn { .. }
                    )
                },
            );
            next_call_is_right(backend, r, &second, &inputs[1][r], placed_alike);
        }
        assert!(named, "{backend}: no rank named the other placement's layer digest");
    }
}
