//! allgather-rs on two GPUs through NCCL against the host platform: with the reference experts
//! run on what each GPU rank received, the combined output is bit-identical to the host
//! platform's (two ranks: one f32 addition per element either way). Without two GPUs each
//! trial is reported as ignored with the reason; `MOE_REQUIRE_GPU=1` makes that a failure.

use libtest_mimic::{Arguments, Failed, Trial};
use moe_core::harness::{Cell, Routing, SHAPES};
use moe_core::quant::QuantScheme;
use moe_core::{ParallelConfig, QuantConfig};

const RANKS: usize = 2;

fn cells() -> Vec<Cell> {
    let base = |scheme: QuantScheme, shape: usize, parallel: ParallelConfig, routing: Routing| {
        let mut quant = QuantConfig::new(scheme);
        quant.params.nvfp4_global_scale = 448.0 * 6.0 / 100.0;
        quant.params.fp8_static_scale = 0.05;
        Cell {
            quant,
            parallel,
            shape: SHAPES[shape],
            routing,
            ..Cell::new(backend_allgather_rs::NAME)
        }
        .reseeded()
    };
    let ep2 = ParallelConfig::ep(RANKS);
    let dp2 = ParallelConfig {
        tp: 1,
        dp: RANKS,
        ep: false,
        sp: false,
    };
    vec![
        base(QuantScheme::Bf16, 2, ep2, Routing::Uniform),
        base(QuantScheme::Nvfp4, 2, ep2, Routing::Uniform),
        base(QuantScheme::Fp8Block128, 2, ep2, Routing::EmptyFirstReplica),
        base(QuantScheme::Mxfp8, 0, ep2, Routing::Skewed),
        base(QuantScheme::Bf16, 0, dp2, Routing::Uniform),
    ]
}

fn main() {
    let mut args = Arguments::from_args();
    // One trial at a time: trials share the GPUs.
    args.test_threads.get_or_insert(1);
    let skip = moe_kernels::probe::gpu_skip_reason(RANKS);
    let trials = cells()
        .into_iter()
        .map(|c| {
            let name = format!(
                "gpu_matches_host {}",
                c.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
            );
            let name = match &skip {
                Some(reason) => format!("{name} [ignored: {reason}]"),
                None => name,
            };
            Trial::test(name, move || cases::matches_host(&c)).with_ignored_flag(skip.is_some())
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

#[cfg(not(feature = "cuda"))]
mod cases {
    use super::*;

    pub fn matches_host(_: &Cell) -> Result<(), Failed> {
        Err("built without the `cuda` feature (cargo test --features cuda)".into())
    }
}

#[cfg(feature = "cuda")]
mod cases {
    use std::sync::Arc;

    use backend_allgather_rs::cuda::{GpuAllGather, new_comm_id};
    use moe_core::experts::{Experts, ReferenceExperts};
    use moe_core::harness::{CALLS_PER_CELL, make_inputs, run_on_host};
    use moe_core::{MoeError, PrepareInput, Registry, Tensor};
    use moe_kernels::platform::CudaWorld;

    use super::*;

    fn fail(e: impl std::fmt::Display) -> Failed {
        e.to_string().into()
    }

    pub fn matches_host(c: &Cell) -> Result<(), Failed> {
        let layer = c.layer().map_err(fail)?;
        let calls: Vec<_> = (0..CALLS_PER_CELL).map(|i| make_inputs(c, &layer, i)).collect();
        let experts = Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant));
        let host = run_on_host(Registry::global(), c, &layer, &experts, &calls);

        let world = CudaWorld::new(RANKS).map_err(fail)?;
        // Both ranks form one dispatch group here (EP over 2 ranks, or DP over 2 with tp = 1).
        let id = new_comm_id().map_err(fail)?;
        let max = layer.dispatch_tokens_bound();
        let gpu: Vec<Result<Vec<Vec<u8>>, MoeError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..RANKS)
                .map(|r| {
                    let (world, layer, calls, experts) = (&world, &layer, &calls, &experts);
                    s.spawn(move || -> Result<_, MoeError> {
                        let mut b = GpuAllGather::new(layer, world.gpu(r).clone(), r, id)?;
                        let ownership = layer.ownership(r);
                        let mut outs = Vec::new();
                        for inputs in calls {
                            let inp = &inputs[c.parallel.dp_rank(r)];
                            let input = PrepareInput::new(layer, max, &inp.tokens, &inp.topk_ids, &inp.topk_weights)?;
                            let dispatched = b.dispatch(input)?;
                            let mut y = Tensor::zeros(c.input_dtype.dtype(), &[RANKS * max, layer.moe.hidden]);
                            experts.apply(&dispatched, &ownership, &mut y)?;
                            let mut out = Tensor::zeros(c.input_dtype.dtype(), inp.tokens.shape());
                            out.poison();
                            b.combine(&y, &mut out)?;
                            outs.push(out.bytes().to_vec());
                        }
                        Ok(outs)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });
        for (r, (g, h)) in gpu.into_iter().zip(host).enumerate() {
            let g = g.map_err(|e| fail(format!("GPU rank {r}: {e}")))?;
            let h = h.map_err(|e| fail(format!("host rank {r}: {e}")))?;
            for (call, (gpu_out, host_out)) in g.iter().zip(&h).enumerate() {
                if let Some(i) = gpu_out.iter().zip(host_out.bytes()).position(|(a, b)| a != b) {
                    return Err(fail(format!(
                        "call {call} rank {r}: output byte {i} differs (GPU 0x{:02x}, host 0x{:02x})",
                        gpu_out[i],
                        host_out.bytes()[i]
                    )));
                }
            }
        }
        Ok(())
    }
}
