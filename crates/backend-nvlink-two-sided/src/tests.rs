//! Cells of the shared harness run through this crate's own registration, and a direct check
//! of the dense receive layout and the reverse all-to-all-v. (What the layers of an EP group
//! sharing a workspace guarantee is `moe_peer::trials`', run for this protocol in lib.rs.)

use moe_core::harness::{Cell, Outcome, Routing, SHAPES, Shape, run_cell};
use moe_core::host::{HostWorldConfig, run_host_world};
use moe_core::quant::QuantScheme;
use moe_core::{
    ActivationFormat, DType, Dispatched, ExpertPlacement, InputDtype, LayerConfig, MoeConfig, ParallelConfig,
    PrepareInput, QuantConfig, RankContext, Registry, ScaleLayout, Tensor,
};
use moe_peer::trials::harness_params;

use super::NAME;

fn shape(name: &str) -> Shape {
    *SHAPES.iter().find(|s| s.name == name).expect("a matrix shape")
}

fn cell(edit: impl FnOnce(&mut Cell)) -> Cell {
    moe_peer::trials::host_cell(NAME, edit)
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
            .with_params(harness_params())
            .with_scale_layout(ScaleLayout::Swizzled128x4);
    }));
}

#[test]
fn deferred_fp8_block128() {
    executes(&cell(|c| {
        c.quant = QuantConfig::new(QuantScheme::Fp8Block128)
            .with_params(harness_params())
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
