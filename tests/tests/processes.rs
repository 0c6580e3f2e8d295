//! The host platform with one OS process per rank, over the TCP control plane configured from
//! the launchers' environment (`HostRank::over`): allgather-rs runs a layer through the layer
//! runner and gives the oracle's numbers, bit-identical with the threads world on the same
//! inputs; a peer-memory backend, which needs memory the ranks share, is refused saying so.
//! Each rank is this test binary run again with `MOE_PROCESS_CHILD` set to the scenario.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_a2a::control::{TcpConfig, TcpControlPlane};
use moe_a2a::experts::ReferenceExperts;
use moe_a2a::harness::{make_inputs, matches_oracle};
use moe_a2a::host::{HostRank, HostWorldConfig, run_host_world};
use moe_a2a::runner::MoeLayer;
use moe_a2a::{ParallelConfig, RankContext, Tensor};
use moe_a2a_tests::{cell, registry};

const RANKS: usize = 2;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn spawn_rank(test: &str, scenario: &str, port: u16, rank: usize) -> Child {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env("MOE_PROCESS_CHILD", scenario)
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", RANKS.to_string())
        .env("MOE_TIMEOUT_MS", "20000")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning a rank")
}

/// Waits at most `limit` for `child` (killing it after): its success and stdout.
fn finish(mut child: Child, limit: Duration) -> (bool, String) {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("polling a rank") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    let _ = child.wait();
    (status.is_some_and(|s| s.success()), out)
}

/// Runs `scenario` on `RANKS` processes; each must succeed and print `want(rank)`.
fn run_ranks(test: &str, scenario: &str, want: impl Fn(usize) -> String) {
    let port = free_port();
    let ranks: Vec<Child> = (0..RANKS).map(|r| spawn_rank(test, scenario, port, r)).collect();
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
