//! `cargo xtask launch -n N -- COMMAND`: the ranks of one world as processes on this machine,
//! for a machine without torchrun. Each process gets the environment torchrun sets
//! (`MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`) and
//! a run id of its own (`MOE_RUN_ID`), which `moe_core::control::TcpConfig::from_env` reads.
//! Each line a rank prints comes out prefixed with `[rank r]`. When a rank fails, the others
//! get a grace period to notice (their control plane names it) and are then killed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moe_a2a::control::TcpConfig;

use crate::flags::Launch;

/// How long the other ranks may run on after one failed.
const GRACE: Duration = Duration::from_secs(30);

pub fn run(f: &Launch) -> Result<ExitCode, String> {
    let port = match f.port {
        Some(p) => p,
        None => TcpConfig::free_local_port().map_err(|e| format!("no free port for MASTER_PORT: {e}"))?,
    };
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string();
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut printers = Vec::new();
    for rank in 0..f.ranks {
        let mut child = Command::new(&f.command[0])
            .args(&f.command[1..])
            .envs(TcpConfig::local_launch_env(port, rank, f.ranks, &run_id))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting rank {rank} (`{}`): {e}", f.command.join(" ")))?;
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            printers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                    println!("[rank {rank}] {line}");
                }
            }));
        }
        children.push((rank, child));
    }
    let mut failed: Vec<usize> = Vec::new();
    let mut deadline: Option<Instant> = None;
    while !children.is_empty() {
        let mut running = Vec::new();
        for (rank, mut child) in children {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => {}
                Ok(Some(status)) => {
                    eprintln!("launch: rank {rank} exited with {status}");
                    failed.push(rank);
                    deadline.get_or_insert(Instant::now() + GRACE);
                }
                Ok(None) if deadline.is_some_and(|d| Instant::now() >= d) => {
                    eprintln!("launch: rank {rank} still ran {GRACE:?} after a rank failed; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    failed.push(rank);
                }
                Ok(None) => running.push((rank, child)),
                Err(e) => return Err(format!("waiting for rank {rank}: {e}")),
            }
        }
        children = running;
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in printers {
        let _ = p.join();
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        failed.sort_unstable();
        eprintln!("launch: rank(s) {failed:?} failed");
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(ranks: usize, script: &str) -> ExitCode {
        run(&Launch {
            ranks,
            port: None,
            command: vec!["sh".into(), "-c".into(), script.into()],
        })
        .expect("launches")
    }

    #[test]
    fn every_rank_gets_the_launchers_environment() {
        let script = r#"test "$WORLD_SIZE" = 3 && test "$RANK" -lt 3 && test "$LOCAL_RANK" = "$RANK" && test -n "$MASTER_PORT" && test -n "$MOE_RUN_ID""#;
        assert_eq!(launch(3, script), ExitCode::SUCCESS);
    }

    #[test]
    fn a_failing_rank_fails_the_launch() {
        assert_eq!(launch(2, r#"test "$RANK" = 0"#), ExitCode::FAILURE);
    }
}
