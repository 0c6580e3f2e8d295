//! The TCP control plane with one OS process per rank, configured from the environment
//! launchers set (`MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`): the ranks gather over
//! the world and over sub-groups, and a rank killed with SIGKILL is named in its peers' errors
//! at once (within 5 s, their timeout being 20 s). Each rank is this test binary run again with `MOE_PROCESS_CHILD` set to
//! the scenario, which makes the test it runs act as that rank and exit.

use std::process::Child;
use std::time::{Duration, Instant};

use moe_a2a::control::{ControlPlane, TcpConfig, TcpControlPlane};
use moe_a2a_tests::processes::{finish, free_port, kill_once_it_says, millis_after, spawn_rank};

/// What a rank does in `scenario` (in a child process), printing what the parent checks.
fn act_as_rank(scenario: &str) {
    let config = TcpConfig::from_env().expect("the launcher's environment");
    let plane = TcpControlPlane::connect(&config).expect("joins the world");
    let r = plane.rank();
    match scenario {
        "gather" => {
            let world: Vec<usize> = (0..plane.world_size()).collect();
            let all = plane.all_gather(&world, "world", vec![r as u8]).expect("world gather");
            let pair = if r.is_multiple_of(2) { [0, 2] } else { [1, 3] };
            let pairs = plane.all_gather(&pair, "pair", vec![r as u8]).expect("pair gather");
            plane.barrier(&world, "end").expect("barrier");
            println!("RESULT rank {r} world {all:?} pair {pairs:?}");
        }
        "killed" => {
            if r == 2 {
                println!("JOINED");
                // Waits to be killed; bounded, in case nobody does.
                std::thread::sleep(Duration::from_secs(60));
                return;
            }
            let started = Instant::now();
            let err = plane
                .all_gather(&[0, 1, 2], "waiting for rank 2", vec![])
                .expect_err("rank 2 was killed");
            println!("ERROR after {} ms: {err}", started.elapsed().as_millis());
        }
        other => panic!("unknown scenario {other}"),
    }
}

#[test]
fn ranks_in_processes_gather_over_the_world_and_sub_groups() {
    if let Ok(scenario) = std::env::var("MOE_PROCESS_CHILD") {
        return act_as_rank(&scenario);
    }
    let port = free_port();
    let test = "ranks_in_processes_gather_over_the_world_and_sub_groups";
    let ranks: Vec<Child> = (0..4).map(|r| spawn_rank(test, "gather", port, r, 4)).collect();
    for (r, child) in ranks.into_iter().enumerate() {
        let (ok, out) = finish(child, Duration::from_secs(30));
        assert!(ok, "rank {r} failed:\n{out}");
        let pair = if r.is_multiple_of(2) {
            "[[0], [2]]"
        } else {
            "[[1], [3]]"
        };
        let want = format!("RESULT rank {r} world [[0], [1], [2], [3]] pair {pair}");
        assert!(out.contains(&want), "rank {r}:\n{out}");
    }
}

#[test]
fn a_rank_killed_with_sigkill_is_named_in_its_peers_errors() {
    if let Ok(scenario) = std::env::var("MOE_PROCESS_CHILD") {
        return act_as_rank(&scenario);
    }
    let port = free_port();
    let test = "a_rank_killed_with_sigkill_is_named_in_its_peers_errors";
    let mut ranks: Vec<Child> = (0..3).map(|r| spawn_rank(test, "killed", port, r, 3)).collect();
    // Once it joined and the others wait on it.
    kill_once_it_says(ranks.pop().expect("rank 2"), "JOINED");
    for (r, child) in ranks.into_iter().enumerate() {
        let (ok, out) = finish(child, Duration::from_secs(30));
        assert!(ok, "rank {r} failed:\n{out}");
        assert!(out.contains("rank 2 closed its connection"), "rank {r}:\n{out}");
        let ms = millis_after(&out, "ERROR after ").unwrap_or(u64::MAX);
        assert!(ms < 5000, "rank {r} noticed only after {ms} ms:\n{out}");
    }
}
