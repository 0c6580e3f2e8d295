//! The CUDA platform with one OS process per rank (issue 17): each rank is this test binary run
//! again with the launchers' environment, joins the world over the TCP control plane and its
//! GPU (`CudaWorldRank::join`; ranks share the GPU with `MOE_SHARE_GPUS=1` where there are
//! fewer GPUs than ranks), and runs its layers through `MoeLayer::forward` on device tensors,
//! its workspace exported device memory the other process maps.
//!
//! - Three calls of nvlink-one-sided and of nvlink-two-sided with the CUDA reference experts give
//!   every rank the same bytes as the host platform's threads world with the host reference
//!   experts, on the same inputs.
//! - A rank killed (SIGKILL) while its peer's call waits on it: the peer's call fails within the
//!   timeout, naming it.
//!
//! Without a GPU each trial is reported as ignored with the reason; `MOE_REQUIRE_GPU=1` makes
//! that a failure.

use libtest_mimic::{Arguments, Failed, Trial};
use moe_kernels::probe::{ranks_skip_reason, trial_label};

const RANKS: usize = 2;

const BACKENDS: [&str; 2] = [backend_nvlink_one_sided::NAME, backend_nvlink_two_sided::NAME];

fn main() {
    let mut args = Arguments::from_args();
    // One trial at a time: its processes share the GPUs.
    args.test_threads.get_or_insert(1);
    let skip = ranks_skip_reason(RANKS);
    let trial = |name: String, test: Box<dyn FnOnce() -> Result<(), Failed> + Send>| {
        Trial::test(trial_label(name.clone(), skip.as_deref()), test).with_ignored_flag(skip.is_some())
    };
    let mut trials = Vec::new();
    for backend in BACKENDS {
        let name = format!("device_calls_across_processes_match_the_host_platform {backend}");
        let test = name.clone();
        trials.push(trial(name, Box::new(move || cases::device_calls(&test, backend))));
        let name = format!("a_rank_killed_during_a_device_call_is_named_by_its_peer {backend}");
        let test = name.clone();
        trials.push(trial(name, Box::new(move || cases::killed(&test, backend))));
    }
    libtest_mimic::run(&args, trials).exit();
}

#[cfg(not(feature = "cuda"))]
mod cases {
    use super::*;

    pub fn device_calls(_: &str, _: &str) -> Result<(), Failed> {
        Err("built without the `cuda` feature (cargo test --features cuda)".into())
    }

    pub fn killed(_: &str, _: &str) -> Result<(), Failed> {
        Err("built without the `cuda` feature (cargo test --features cuda)".into())
    }
}

#[cfg(feature = "cuda")]
mod cases {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use moe_core::control::{TcpConfig, TcpControlPlane};
    use moe_core::experts::ReferenceExperts;
    use moe_core::harness::processes::{finish, free_port, kill_once_it_says, millis_after, spawn_rank};
    use moe_core::harness::{Cell, Routing, SHAPES, make_inputs, run_on_host};
    use moe_core::host::HostRank;
    use moe_core::quant::QuantScheme;
    use moe_core::runner::MoeLayer;
    use moe_core::{CudaRank, MoeError, ParallelConfig, QuantConfig, RankContext, Registry, Result, Tensor};
    use moe_kernels::device::CudaDevice;
    use moe_kernels::experts::CudaDiagonalExperts;
    use moe_kernels::tensor::upload_tensor;
    use moe_kernels::world::CudaWorldRank;

    use super::*;

    /// Calls per trial.
    const CALLS: u64 = 3;
    /// Set in a rank's process (by `spawn_rank`): what it does.
    const CHILD_ENV: &str = "MOE_PROCESS_CHILD";

    /// nvfp4 EP over the ranks, the deepseek-v3 shape (diagonal experts, which the CUDA
    /// reference experts compute).
    fn cell(backend: &str) -> Cell {
        let mut quant = QuantConfig::new(QuantScheme::Nvfp4);
        quant.params.nvfp4_global_scale = 448.0 * 6.0 / 100.0;
        Cell {
            quant,
            parallel: ParallelConfig::ep(RANKS),
            shape: SHAPES[2],
            routing: Routing::Skewed,
            ..Cell::new(backend)
        }
        .reseeded()
    }

    /// This process's rank: the world joined over TCP, and on its GPU `backend`'s layer with the
    /// CUDA reference experts.
    struct Rank {
        host: HostRank,
        gpu: Arc<CudaDevice>,
        moe: MoeLayer,
        cell: Cell,
    }

    fn join(backend: &str) -> Result<Rank> {
        let config = TcpConfig::from_env()?;
        let host = HostRank::over(Arc::new(TcpControlPlane::connect(&config)?));
        let ordinal = moe_kernels::probe::process_device(config.local_rank, config.local_world_size)
            .map_err(moe_core::MoeError::Device)?;
        let device = CudaWorldRank::join(&host, ordinal)?;
        let c = cell(backend);
        let layer = c.layer()?;
        let function = c
            .diagonal_experts()
            .ok_or_else(|| moe_core::MoeError::Device("a diagonal shape".into()))?;
        let r = host.rank();
        let experts = CudaDiagonalExperts::for_layer(device.gpu(), &function, &layer, r)?;
        let gpu = device.gpu().clone();
        let ctx = RankContext::Cuda(CudaRank::new(host.clone(), Arc::new(device)));
        let moe = MoeLayer::new(Registry::global(), backend, layer, Arc::new(experts), ctx)?;
        Ok(Rank {
            host,
            gpu,
            moe,
            cell: c,
        })
    }

    /// The rank's call `call` on device tensors; its output read back.
    fn device_call(rank: &mut Rank, call: u64) -> Result<Tensor> {
        let (c, gpu) = (&rank.cell, &rank.gpu);
        let layer = c.layer()?;
        let inp = &make_inputs(c, &layer, call)[rank.host.rank()];
        let mut poisoned = Tensor::zeros(inp.tokens.dtype(), inp.tokens.shape());
        poisoned.poison();
        let (tokens, ids, weights) = (
            upload_tensor(gpu, &inp.tokens)?,
            upload_tensor(gpu, &inp.topk_ids)?,
            upload_tensor(gpu, &inp.topk_weights)?,
        );
        let mut out = upload_tensor(gpu, &poisoned)?;
        rank.moe.forward(&tokens, &ids, &weights, &mut out)?;
        rank.moe.wait()?;
        out.to_host()
    }

    /// In a rank's process: `CALLS` calls, each compared with the host platform's threads
    /// world, printing the verdict.
    fn act_device_calls(backend: &str) {
        let run = || -> Result<bool> {
            let mut rank = join(backend)?;
            let c = rank.cell.clone();
            let layer = c.layer()?;
            let calls: Vec<_> = (0..CALLS).map(|call| make_inputs(&c, &layer, call)).collect();
            let experts = Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant));
            let want = run_on_host(Registry::global(), &c, &layer, &experts, &calls).swap_remove(rank.host.rank())?;
            let mut same = true;
            for (call, record) in want.iter().enumerate() {
                same &= device_call(&mut rank, call as u64)?.bytes() == record.bytes();
            }
            Ok(same)
        };
        match run() {
            Ok(same) => println!("RESULT identical to the host platform: {same}"),
            Err(e) => println!("RESULT error: {e}"),
        }
    }

    pub fn device_calls(test: &str, backend: &str) -> std::result::Result<(), Failed> {
        if let Ok(scenario) = std::env::var(CHILD_ENV) {
            act_device_calls(scenario.trim_start_matches("device:"));
            return Ok(());
        }
        let port = free_port();
        let scenario = format!("device:{backend}");
        let ranks: Vec<_> = (0..RANKS)
            .map(|r| spawn_rank(test, &scenario, port, r, RANKS))
            .collect();
        for (r, child) in ranks.into_iter().enumerate() {
            let (ok, out) = finish(child, Duration::from_secs(120));
            if !ok || !out.contains("RESULT identical to the host platform: true") {
                return Err(format!("rank {r} (exit ok: {ok}):\n{out}").into());
            }
        }
        Ok(())
    }

    /// In a rank's process: rank 1 builds its layer and waits to be killed; rank 0 runs a call
    /// on device tensors, which waits for rank 1's flags, and prints how it ended.
    fn act_killed(backend: &str) {
        let run = || -> Result<String> {
            let mut rank = join(backend)?;
            if rank.host.rank() == 1 {
                println!("JOINED");
                // Waits to be killed; bounded, in case nobody does.
                std::thread::sleep(Duration::from_secs(60));
                return Ok("not killed".to_string());
            }
            let started = Instant::now();
            let ended = device_call(&mut rank, 0);
            let names_rank_1 = match &ended {
                Err(MoeError::Timeout { waited_for, .. }) => waited_for == &[1],
                Err(
                    MoeError::PeerAbandoned { peer, .. }
                    | MoeError::PeerMovedOn { peer, .. }
                    | MoeError::CallMismatch { peer, .. },
                ) => *peer == 1,
                _ => false,
            };
            Ok(format!(
                "ENDED after {} ms, naming rank 1: {names_rank_1}: {ended:?}",
                started.elapsed().as_millis()
            ))
        };
        match run() {
            Ok(said) => println!("{said}"),
            Err(e) => println!("ENDED with a set-up error: {e}"),
        }
    }

    pub fn killed(test: &str, backend: &str) -> std::result::Result<(), Failed> {
        if let Ok(scenario) = std::env::var(CHILD_ENV) {
            act_killed(scenario.trim_start_matches("killed:"));
            return Ok(());
        }
        let port = free_port();
        let scenario = format!("killed:{backend}");
        let survivor = spawn_rank(test, &scenario, port, 0, RANKS);
        kill_once_it_says(spawn_rank(test, &scenario, port, 1, RANKS), "JOINED");
        let (ok, out) = finish(survivor, Duration::from_secs(120));
        let ms = millis_after(&out, "ENDED after ").unwrap_or(u64::MAX);
        // The ranks' timeout is 20 s (spawn_rank): the wait ends by then, with slack for the
        // kernel's bound in cycles and the host's poll.
        if !ok || !out.contains("naming rank 1: true") || ms > 30_000 {
            return Err(format!("rank 0 (exit ok: {ok}, {ms} ms):\n{out}").into());
        }
        Ok(())
    }
}
