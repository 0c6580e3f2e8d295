//! ep-worker started as two processes with the launchers' environment, as `cargo xtask launch`
//! or torchrun would: both ranks run their calls and pass the oracle, with allgather-rs and with
//! a peer-memory backend over workspaces the processes share.

use std::net::TcpListener;
use std::process::{Command, Output};
use std::thread;

fn launch(args: &[&str]) -> Vec<Output> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            thread::spawn(move || {
                Command::new(env!("CARGO_BIN_EXE_ep-worker"))
                    .args(&args)
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string())
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", "2")
                    .env("MOE_TIMEOUT_MS", "20000")
                    .output()
                    .expect("running ep-worker")
            })
        })
        .collect();
    ranks.into_iter().map(|h| h.join().expect("rank thread")).collect()
}

fn both_pass(args: &[&str], backend: &str) {
    for (r, out) in launch(args).iter().enumerate() {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rank {r}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for call in 0..2 {
            let line = format!("rank {r} of 2: call {call} of 8 via {backend}");
            assert!(stdout.contains(&line) && stdout.contains(": ok"), "rank {r}:\n{stdout}");
        }
    }
}

#[test]
fn two_workers_run_a_deepseek_v3_layer_and_pass_the_oracle() {
    both_pass(&["--tokens", "8", "--calls", "2"], "allgather-rs");
}

#[test]
fn two_workers_run_a_peer_memory_backend_in_shared_memory_and_pass_the_oracle() {
    both_pass(
        &["--tokens", "8", "--calls", "2", "--backend", "nvlink-two-sided"],
        "nvlink-two-sided",
    );
}
