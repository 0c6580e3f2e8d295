//! allgather-rs on two GPUs through NCCL against the host platform: with the reference experts
//! run on what each GPU rank received, the combined output is bit-identical to the host
//! platform's (two ranks: one f32 addition per element either way). A rank that never
//! dispatches makes its peer's dispatch (host tensors) or `finish` (device tensors) fail
//! within a few timeouts with a timeout naming it, instead of waiting in NCCL for good, and
//! every later call fail on the aborted communicator. A member that never joins the NCCL
//! communicator makes the one that did fail within its timeout, saying so, instead of waiting in
//! NCCL's initialization for good (one GPU). Without the GPUs a trial needs it is reported as
//! ignored with the reason; `MOE_REQUIRE_GPU=1` makes that a failure.

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
    let label = |name: String, skip: &Option<String>| match skip {
        Some(reason) => format!("{name} [ignored: {reason}]"),
        None => name,
    };
    let mut trials: Vec<Trial> = cells()
        .into_iter()
        .map(|c| {
            let name = label(
                format!(
                    "gpu_matches_host {}",
                    c.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
                ),
                &skip,
            );
            Trial::test(name, move || cases::matches_host(&c)).with_ignored_flag(skip.is_some())
        })
        .collect();
    for (tensors, on_device) in [("host_tensors", false), ("device_tensors", true)] {
        trials.push(
            Trial::test(
                label(format!("a_silent_rank_is_named_in_the_timeout {tensors}"), &skip),
                move || cases::silent_rank(on_device),
            )
            .with_ignored_flag(skip.is_some()),
        );
    }
    // Only rank 0 of the communicator runs: one GPU.
    let skip_one = moe_kernels::probe::gpu_skip_reason(1);
    trials.push(
        Trial::test(
            label(
                "a_member_that_never_joins_fails_nccl_init_within_the_timeout".to_string(),
                &skip_one,
            ),
            cases::never_joins,
        )
        .with_ignored_flag(skip_one.is_some()),
    );
    libtest_mimic::run(&args, trials).exit();
}

#[cfg(not(feature = "cuda"))]
mod cases {
    use super::*;

    fn missing() -> Failed {
        "built without the `cuda` feature (cargo test --features cuda)".into()
    }

    pub fn matches_host(_: &Cell) -> Result<(), Failed> {
        Err(missing())
    }

    pub fn silent_rank(_: bool) -> Result<(), Failed> {
        Err(missing())
    }

    pub fn never_joins() -> Result<(), Failed> {
        Err(missing())
    }
}

#[cfg(feature = "cuda")]
mod cases {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use backend_allgather_rs::cuda::{CudaAllGatherRank, new_comm_id};
    use moe_core::experts::{Experts, ReferenceExperts};
    use moe_core::harness::{CALLS_PER_CELL, make_inputs, run_on_host};
    use moe_core::host::{HostWorldConfig, run_host_world};
    use moe_core::{MoeError, PrepareInput, Registry, Tensor};
    use moe_kernels::KernelError;
    use moe_kernels::device::CudaDevice;
    use moe_kernels::nccl::NcclComm;
    use moe_kernels::tensor::upload_tensor;
    use moe_kernels::world::CudaWorld;

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
        let gpu: Vec<Result<Vec<Vec<u8>>, MoeError>> = run_host_world(HostWorldConfig::new(RANKS), |host| {
            let r = host.rank();
            let mut b = CudaAllGatherRank::new(
                &layer,
                world.gpu(r).map_err(|e| MoeError::Device(e.to_string()))?.clone(),
                &host,
                id,
            )?;
            let ownership = layer.ownership(r);
            let mut outs = Vec::new();
            for inputs in &calls {
                let inp = &inputs[c.parallel.dp_rank(r)];
                let input = PrepareInput::new(&layer, max, &inp.tokens, &inp.topk_ids, &inp.topk_weights)?;
                let dispatched = b.dispatch(input)?;
                let mut y = Tensor::zeros(c.input_dtype.dtype(), &[RANKS * max, layer.moe.hidden]);
                experts.apply(&dispatched, &ownership, &mut y)?;
                let mut out = Tensor::zeros(c.input_dtype.dtype(), inp.tokens.shape());
                out.poison();
                b.combine(&y, &mut out)?;
                outs.push(out.bytes().to_vec());
            }
            Ok(outs)
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
    /// The bound of every wait in the silent-rank trials. It bounds joining the NCCL
    /// communicator at construction too, so it leaves room for NCCL's initialization.
    const TIMEOUT: Duration = Duration::from_secs(3);
    /// How long rank 0's timed-out call may take at most: a timeout waiting for the stream,
    /// the abort, and a timeout waiting for rank 1 at the barrier, with room for a slow abort.
    const RETURNS_WITHIN: Duration = Duration::from_secs(10);

    /// What rank 0 saw: its first call's result and how long it took, and a later call's.
    type Observed = (Result<(), MoeError>, Duration, Result<(), MoeError>);

    /// Both ranks construct (joining NCCL's communicator is collective), then only rank 0
    /// dispatches: host tensors (`dispatch` waits for the stream), or device tensors
    /// (`dispatch_device` enqueues, `finish` waits). Rank 1 keeps its layer, silent, until rank
    /// 0 is done, then drops it (its communicator is aborted there, with nothing in flight).
    pub fn silent_rank(on_device: bool) -> Result<(), Failed> {
        let mut c = cells().remove(0);
        c.shape = SHAPES[0];
        let layer = c.layer().map_err(fail)?;
        let inputs = make_inputs(&c, &layer, 0);
        let max = layer.dispatch_tokens_bound();
        let world = CudaWorld::new(RANKS).map_err(fail)?;
        let id = new_comm_id().map_err(fail)?;
        let rank0_done = AtomicBool::new(false);
        let config = HostWorldConfig {
            ranks: RANKS,
            timeout: TIMEOUT,
        };
        let out: Vec<Result<Option<Observed>, MoeError>> = run_host_world(config, |host| {
            let r = host.rank();
            let gpu = world.gpu(r).map_err(|e| MoeError::Device(e.to_string()))?.clone();
            let inp = &inputs[c.parallel.dp_rank(r)];
            if r == 1 {
                let built = CudaAllGatherRank::new(&layer, gpu, &host, id);
                let start = Instant::now();
                while !rank0_done.load(Ordering::Acquire) && start.elapsed() < 10 * RETURNS_WITHIN {
                    std::thread::sleep(Duration::from_millis(1));
                }
                return built.map(|_| None);
            }
            let observed = (|| -> Result<Observed, MoeError> {
                // Uploaded (allocating) before any collective runs.
                let device_inputs = if on_device {
                    Some([
                        upload_tensor(&gpu, &inp.tokens)?,
                        upload_tensor(&gpu, &inp.topk_ids)?,
                        upload_tensor(&gpu, &inp.topk_weights)?,
                    ])
                } else {
                    None
                };
                let mut b = CudaAllGatherRank::new(&layer, gpu, &host, id)?;
                let call = |b: &mut CudaAllGatherRank| match &device_inputs {
                    None => {
                        let input = PrepareInput::new(&layer, max, &inp.tokens, &inp.topk_ids, &inp.topk_weights)?;
                        b.dispatch(input).map(|_| ())
                    }
                    Some([tokens, ids, weights]) => {
                        b.dispatch_device(PrepareInput::new(&layer, max, tokens, ids, weights)?)?;
                        b.finish()
                    }
                };
                let start = Instant::now();
                let first = call(&mut b);
                let took = start.elapsed();
                Ok((first, took, call(&mut b)))
            })();
            rank0_done.store(true, Ordering::Release);
            observed.map(Some)
        });
        let mut out = out.into_iter();
        let rank0 = out.next().expect("rank 0's result");
        match out.next().expect("rank 1's result") {
            Ok(None) => {}
            other => return Err(fail(format!("rank 1 (silent) did not construct cleanly: {other:?}"))),
        }
        let (first, took, later) = match rank0 {
            Ok(Some(observed)) => observed,
            other => return Err(fail(format!("rank 0 did not get to dispatch: {other:?}"))),
        };
        match first {
            Err(MoeError::Timeout {
                rank: 0,
                ref op,
                ref waited_for,
                timeout: TIMEOUT,
            }) if waited_for == &[1] && op == "allgather-rs dispatch" => {}
            Err(e) => return Err(fail(format!("expected a dispatch timeout naming rank 1, got: {e}"))),
            Ok(()) => return Err(fail("rank 0's dispatch completed although rank 1 never dispatched")),
        }
        if took > RETURNS_WITHIN {
            return Err(fail(format!(
                "rank 0's timeout came after {took:?}; with a {TIMEOUT:?} bound it is due within {RETURNS_WITHIN:?}"
            )));
        }
        match later {
            Err(MoeError::Device(m)) if m.contains("aborted") && m.contains("construct the layer again") => Ok(()),
            other => Err(fail(format!(
                "a call after the timeout must fail on the aborted communicator, got: {other:?}"
            ))),
        }
    }

    /// How long rank 0 waits for rank 1 to join in the never-joins trial.
    const JOIN_TIMEOUT: Duration = Duration::from_secs(2);
    /// How long its failure may take at most: the timeout, then the abort of its half-built
    /// communicator (which stops NCCL's join and waits for its thread).
    const JOIN_FAILS_WITHIN: Duration = Duration::from_secs(15);

    /// Rank 0 of a 2-rank communicator joins on GPU 0 and rank 1 never does (its thread failed
    /// before joining, or never constructed): rank 0 gives up once the timeout ran out, aborts
    /// its half-built communicator and says so, naming itself and the communicator's size.
    pub fn never_joins() -> Result<(), Failed> {
        let gpu = Arc::new(CudaDevice::new(0).map_err(fail)?);
        let id = new_comm_id().map_err(fail)?;
        let start = Instant::now();
        let joined = NcclComm::new(&gpu, 0, 2, &id, JOIN_TIMEOUT);
        let took = start.elapsed();
        match joined {
            Err(
                e @ KernelError::NcclInitTimeout {
                    rank: 0,
                    ranks: 2,
                    timeout: JOIN_TIMEOUT,
                },
            ) => {
                let message = e.to_string();
                if !message.starts_with("rank 0 of a 2-rank NCCL communicator waited 2s for the other members to join")
                {
                    return Err(fail(format!(
                        "the error does not name rank 0 of 2 and the wait: {message}"
                    )));
                }
            }
            Err(e) => {
                return Err(fail(format!(
                    "expected the join to time out naming rank 0 of a 2-rank communicator, got: {e}"
                )));
            }
            Ok(_) => return Err(fail("rank 0 joined a 2-rank communicator that rank 1 never joined")),
        }
        if took < JOIN_TIMEOUT || took > JOIN_FAILS_WITHIN {
            return Err(fail(format!(
                "the join failed after {took:?}; with a {JOIN_TIMEOUT:?} bound it is due between {JOIN_TIMEOUT:?} and {JOIN_FAILS_WITHIN:?}"
            )));
        }
        Ok(())
    }
}
