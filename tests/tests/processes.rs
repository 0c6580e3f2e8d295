//! The host platform with one OS process per rank, over the TCP control plane configured from
//! the launchers' environment (`HostRank::over`): allgather-rs runs a layer through the layer
//! runner and gives the oracle's numbers, bit-identical with the threads world on the same
//! inputs; a peer-memory backend, which needs memory the ranks share, is refused saying so.
//! Each rank is this test binary run again with `MOE_PROCESS_CHILD` set to the scenario.

use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use moe_a2a::control::{TcpConfig, TcpControlPlane};
use moe_a2a::experts::ReferenceExperts;
use moe_a2a::harness::{make_inputs, matches_oracle};
use moe_a2a::host::{HostRank, HostWorldConfig, run_host_world};
use moe_a2a::runner::MoeLayer;
use moe_a2a::{ParallelConfig, RankContext, Tensor};
use moe_a2a_tests::processes::{finish, free_port, spawn_rank};
use moe_a2a_tests::{cell, registry};

const RANKS: usize = 2;

/// Runs `scenario` on `RANKS` processes; each must succeed and print `want(rank)`.
fn run_ranks(test: &str, scenario: &str, want: impl Fn(usize) -> String) {
    let port = free_port();
    let ranks: Vec<Child> = (0..RANKS).map(|r| spawn_rank(test, scenario, port, r, RANKS)).collect();
    for (r, child) in ranks.into_iter().enumerate() {
        let (ok, out) = finish(child, Duration::from_secs(60));
        assert!(ok && out.contains(&want(r)), "rank {r} (exit ok: {ok}):\n{out}");
    }
}

/// What a rank does in `scenario`, in a child process.
fn act_as_rank(backend: &str) {
    let config = TcpConfig::from_env().expect("the launcher's environment");
    let plane = TcpControlPlane::connect(&config).expect("joins the world");
    let rank = HostRank::over(Arc::new(plane));
    let r = rank.rank();
    let mut c = cell(backend);
    c.parallel = ParallelConfig::ep(RANKS);
    let c = c.reseeded();
    let layer = c.layer().expect("a valid layer");
    let experts = Arc::new(ReferenceExperts::new(c.expert_function(), c.format, c.quant));
    let built = MoeLayer::new(
        registry(),
        backend,
        layer.clone(),
        experts.clone(),
        RankContext::Host(rank),
    );
    let mut moe_layer = match built {
        Ok(l) => l,
        Err(e) => {
            println!("REFUSED rank {r}: {e}");
            return;
        }
    };
    let inputs = make_inputs(&c, &layer, 0);
    let inp = &inputs[r];
    let mut out = Tensor::zeros(inp.tokens.dtype(), inp.tokens.shape());
    out.poison();
    moe_layer
        .forward(&inp.tokens, &inp.topk_ids, &inp.topk_weights, &mut out)
        .expect("the layer runs across processes");
    matches_oracle(&c, inp, &out, &format!("rank {r}")).expect("the oracle's numbers");
    // The same call in the threads world, on the same inputs.
    let threads = run_host_world(HostWorldConfig::new(RANKS), |rank| {
        let mut l = MoeLayer::new(
            registry(),
            backend,
            layer.clone(),
            experts.clone(),
            RankContext::Host(rank.clone()),
        )?;
        let inp = &inputs[rank.rank()];
        let mut out = Tensor::zeros(inp.tokens.dtype(), inp.tokens.shape());
        l.forward(&inp.tokens, &inp.topk_ids, &inp.topk_weights, &mut out)?;
        Ok(out)
    });
    let same = threads[r].as_ref().expect("the threads world runs").bytes() == out.bytes();
    println!("RESULT rank {r} oracle ok, identical to threads: {same}");
}

#[test]
fn allgather_rs_runs_across_processes_bit_identical_with_threads() {
    if let Ok(backend) = std::env::var("MOE_PROCESS_CHILD") {
        return act_as_rank(&backend);
    }
    run_ranks(
        "allgather_rs_runs_across_processes_bit_identical_with_threads",
        "allgather-rs",
        |r| format!("RESULT rank {r} oracle ok, identical to threads: true"),
    );
}

#[test]
fn a_peer_memory_backend_across_processes_is_refused_saying_why() {
    if let Ok(backend) = std::env::var("MOE_PROCESS_CHILD") {
        return act_as_rank(&backend);
    }
    run_ranks(
        "a_peer_memory_backend_across_processes_is_refused_saying_why",
        "nvlink-one-sided",
        |r| format!("REFUSED rank {r}: one-sided workspace rebuild needs memory the ranks share"),
    );
}
