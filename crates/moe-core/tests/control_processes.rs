//! The TCP control plane with one OS process per rank, configured from the environment
//! launchers set (`MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`): the ranks gather over
//! the world and over sub-groups, and a rank killed with SIGKILL is named in its peers' errors
//! within the timeout. Each rank is this test binary run again with `MOE_CONTROL_CHILD` set to
//! the scenario, which makes the test it runs act as that rank and exit.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moe_core::control::{ControlPlane, TcpConfig, TcpControlPlane};

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs this binary's test `test` as rank `rank` of `world` in scenario `scenario`.
fn spawn_rank(test: &str, scenario: &str, port: u16, rank: usize, world: usize) -> Child {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env("MOE_CONTROL_CHILD", scenario)
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MOE_TIMEOUT_MS", "5000")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning a rank")
}

/// Waits at most `limit` for `child`, killing it after; its exit success and stdout.
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
    if let Ok(scenario) = std::env::var("MOE_CONTROL_CHILD") {
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
    if let Ok(scenario) = std::env::var("MOE_CONTROL_CHILD") {
        return act_as_rank(&scenario);
    }
    let port = free_port();
    let test = "a_rank_killed_with_sigkill_is_named_in_its_peers_errors";
    let mut ranks: Vec<Child> = (0..3).map(|r| spawn_rank(test, "killed", port, r, 3)).collect();
    let mut doomed = ranks.pop().expect("rank 2");
    let stdout = doomed.stdout.take().expect("rank 2's stdout");
    // The test harness prints its own lines first.
    let joined = BufReader::new(stdout)
        .lines()
        .take(20)
        .map_while(|l| l.ok())
        .any(|l| l.contains("JOINED"));
    assert!(joined, "rank 2 did not join");
    // Let the others start waiting on rank 2, then kill it (SIGKILL on Unix).
    std::thread::sleep(Duration::from_millis(300));
    doomed.kill().expect("killing rank 2");
    let _ = doomed.wait();
    for (r, child) in ranks.into_iter().enumerate() {
        let (ok, out) = finish(child, Duration::from_secs(30));
        assert!(ok, "rank {r} failed:\n{out}");
        assert!(out.contains("rank 2 closed its connection"), "rank {r}:\n{out}");
        let ms: u64 = out
            .split("ERROR after ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(u64::MAX);
        assert!(ms < 5000, "rank {r} noticed only after {ms} ms:\n{out}");
    }
}
