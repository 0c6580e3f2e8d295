//! The host platform with one OS process per rank, over the TCP control plane configured from
//! the launchers' environment: every built-in backend runs a layer through the layer runner
//! with workspaces in memfd segments the processes share (`HostRank::over_shared`), giving the
//! oracle's numbers bit-identical with the threads world on the same inputs; without shared
//! memory (`HostRank::over`) a peer-memory backend is refused saying what to do. Calls agree
//! across processes as across threads: a refused input on one process fails that call on
//! every rank at once, and a killed process is named by its peer at once. Each rank is this
//! test binary run again with `MOE_PROCESS_CHILD` set to the scenario.

use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use moe_a2a::control::{TcpConfig, TcpControlPlane};
use moe_a2a::experts::ReferenceExperts;
use moe_a2a::harness::{make_inputs, matches_oracle};
use moe_a2a::host::{HostRank, HostWorldConfig, run_host_world};
use moe_a2a::quant::{QuantParams, QuantScheme};
use moe_a2a::runner::MoeLayer;
use moe_a2a::shm::MemfdMemory;
use moe_a2a::{MoeError, ParallelConfig, QuantConfig, RankContext, Tensor};
use moe_a2a_tests::processes::{finish, free_port, kill_once_it_says, millis_after, spawn_rank};
use moe_a2a_tests::{Cell, cell, layers_on, registry};

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

/// This process's rank, joined from the launchers' environment; with workspaces in memory the
/// processes share when `shared`.
fn join(shared: bool) -> HostRank {
    let config = TcpConfig::from_env().expect("the launcher's environment");
    let plane = Arc::new(TcpControlPlane::connect(&config).expect("joins the world"));
    if shared {
        HostRank::over_shared(plane, Arc::new(MemfdMemory))
    } else {
        HostRank::over(plane)
    }
}

/// The default cell of `backend` over the `RANKS` ranks, as EP.
fn ep_cell(backend: &str) -> Cell {
    let mut c = cell(backend);
    c.parallel = ParallelConfig::ep(RANKS);
    c.reseeded()
}

/// What a rank does in `scenario` (`shared:BACKEND`: workspaces in shared memory;
/// `plain:BACKEND`: none), in a child process.
fn act_as_rank(scenario: &str) {
    let (shared, backend) = scenario.split_once(':').expect("a scenario is MEMORY:BACKEND");
    if shared == "killed" {
        return act_while_a_peer_is_killed(backend);
    }
    if shared == "refused" {
        return act_with_a_refused_input_on_rank_0(backend);
    }
    let rank = join(shared == "shared");
    let r = rank.rank();
    let c = ep_cell(backend);
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

/// Rank 1 builds the layer and waits to be killed; rank 0 runs a call, which waits for rank 1's
/// dispatch in shared memory, and prints how it ended.
fn act_while_a_peer_is_killed(backend: &str) {
    let rank = join(true);
    let r = rank.rank();
    let c = ep_cell(backend);
    let layer = c.layer().expect("a valid layer");
    let mut moe_layer = layers_on(std::slice::from_ref(&c), &rank)
        .expect("the layer is built on both ranks")
        .remove(0);
    if r == 1 {
        println!("JOINED");
        // Waits to be killed; bounded, in case nobody does.
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let inputs = make_inputs(&c, &layer, 0);
    let inp = &inputs[r];
    let mut out = Tensor::zeros(inp.tokens.dtype(), inp.tokens.shape());
    let started = std::time::Instant::now();
    let err = moe_layer
        .forward(&inp.tokens, &inp.topk_ids, &inp.topk_weights, &mut out)
        .expect_err("rank 1 was killed");
    println!("ERROR after {} ms: {err}", started.elapsed().as_millis());
}

#[test]
fn a_rank_killed_during_a_call_in_shared_memory_is_named_at_once_and_leaves_no_segment() {
    if let Ok(scenario) = std::env::var("MOE_PROCESS_CHILD") {
        return act_as_rank(&scenario);
    }
    let port = free_port();
    let test = "a_rank_killed_during_a_call_in_shared_memory_is_named_at_once_and_leaves_no_segment";
    let survivor = spawn_rank(test, "killed:nvlink-one-sided", port, 0, RANKS);
    // Once it built its layer and rank 0 waits on its dispatch.
    kill_once_it_says(spawn_rank(test, "killed:nvlink-one-sided", port, 1, RANKS), "JOINED");
    let (ok, out) = finish(survivor, Duration::from_secs(60));
    assert!(ok && out.contains("rank 1 closed its connection"), "rank 0:\n{out}");
    let ms = millis_after(&out, "ERROR after ").unwrap_or(u64::MAX);
    // The ranks' timeout is 20 s: the closed connection ends the wait, not the timeout.
    assert!(ms < 5000, "rank 0 noticed only after {ms} ms:\n{out}");
    // The workspaces were memfd segments, which never have a name in /dev/shm.
    let left: Vec<_> = std::fs::read_dir("/dev/shm")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.iter().all(|n| !n.to_string_lossy().contains("moe")),
        "left in /dev/shm: {left:?}"
    );
}

/// Both ranks build two layers (bf16, then nvfp4 with other expert weights); rank 0 passes an
/// expert id out of range in the first layer's call. Rank 0 gets its own error and rank 1
/// fails the same call naming rank 0, at once; the second layer's call then gives the oracle's
/// numbers on both ranks.
fn act_with_a_refused_input_on_rank_0(backend: &str) {
    let rank = join(true);
    let r = rank.rank();
    let cells: Vec<_> = [(QuantScheme::Bf16, 1u64), (QuantScheme::Nvfp4, 2)]
        .into_iter()
        .map(|(scheme, seed)| {
            let mut c = ep_cell(backend);
            c.quant = QuantConfig::new(scheme).with_params(QuantParams {
                fp8_static_scale: 0.05,
                nvfp4_global_scale: 448.0 * 6.0 / 100.0,
            });
            let mut c = c.reseeded();
            c.seed ^= seed;
            c
        })
        .collect();
    let mut layers = layers_on(&cells, &rank).expect("the layers are built on both ranks");
    let first = make_inputs(&cells[0], &cells[0].layer().expect("valid"), 0);
    let mut inp = first[r].clone();
    if r == 0 {
        let mut ids = inp.topk_ids.to_i32();
        ids[0] = 990_797_655;
        inp.topk_ids = Tensor::from_i32(inp.topk_ids.shape(), &ids);
    }
    let mut out = Tensor::zeros(inp.tokens.dtype(), inp.tokens.shape());
    let started = std::time::Instant::now();
    let refused = layers[0].forward(&inp.tokens, &inp.topk_ids, &inp.topk_weights, &mut out);
    let waited = started.elapsed().as_millis();
    let second = make_inputs(&cells[1], &cells[1].layer().expect("valid"), 0);
    let inp = &second[r];
    let mut out = Tensor::zeros(inp.tokens.dtype(), inp.tokens.shape());
    layers[1]
        .forward(&inp.tokens, &inp.topk_ids, &inp.topk_weights, &mut out)
        .expect("the next call runs on every rank");
    matches_oracle(&cells[1], inp, &out, &format!("rank {r}")).expect("the oracle's numbers");
    match refused {
        Err(MoeError::InvalidInput { .. }) if r == 0 => println!("RESULT rank {r} refused its input"),
        Err(MoeError::PeerAbandoned { peer: 0, .. }) if r != 0 => {
            println!("RESULT rank {r} failed the call naming rank 0 after {waited} ms");
        }
        other => println!("UNEXPECTED rank {r}: {other:?}"),
    }
}

#[test]
fn a_refused_input_on_one_process_fails_that_call_on_every_rank_and_the_next_call_succeeds() {
    if let Ok(scenario) = std::env::var("MOE_PROCESS_CHILD") {
        return act_as_rank(&scenario);
    }
    for backend in moe_a2a::BUILTIN_BACKENDS {
        let port = free_port();
        let test = "a_refused_input_on_one_process_fails_that_call_on_every_rank_and_the_next_call_succeeds";
        let scenario = format!("refused:{backend}");
        let ranks: Vec<Child> = (0..RANKS)
            .map(|r| spawn_rank(test, &scenario, port, r, RANKS))
            .collect();
        for (r, child) in ranks.into_iter().enumerate() {
            let (ok, out) = finish(child, Duration::from_secs(60));
            let want = if r == 0 {
                "RESULT rank 0 refused its input".to_string()
            } else {
                format!("RESULT rank {r} failed the call naming rank 0 after ")
            };
            assert!(ok && out.contains(&want), "{backend} rank {r}:\n{out}");
            // At once, not at the ranks' 20 s timeout.
            if let Some(ms) = millis_after(&out, "naming rank 0 after ") {
                assert!(ms < 5000, "{backend} rank {r} failed only after {ms} ms");
            }
        }
    }
}

/// One test per scenario: the rank processes of `$scenario`, each printing `$want(rank)`.
macro_rules! process_test {
    ($name:ident, $scenario:expr, $want:expr) => {
        #[test]
        fn $name() {
            if let Ok(scenario) = std::env::var("MOE_PROCESS_CHILD") {
                return act_as_rank(&scenario);
            }
            run_ranks(stringify!($name), $scenario, $want);
        }
    };
}

fn identical(r: usize) -> String {
    format!("RESULT rank {r} oracle ok, identical to threads: true")
}

process_test!(
    allgather_rs_runs_across_processes_bit_identical_with_threads,
    "plain:allgather-rs",
    identical
);
process_test!(
    nvlink_one_sided_runs_across_processes_in_shared_memory_bit_identical_with_threads,
    "shared:nvlink-one-sided",
    identical
);
process_test!(
    nvlink_two_sided_runs_across_processes_in_shared_memory_bit_identical_with_threads,
    "shared:nvlink-two-sided",
    identical
);
process_test!(
    a_peer_memory_backend_without_shared_memory_is_refused_saying_what_to_do,
    "plain:nvlink-one-sided",
    |r| format!("REFUSED rank {r}: one-sided workspace rebuild needs memory the ranks share")
);
