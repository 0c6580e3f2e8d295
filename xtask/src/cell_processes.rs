//! `test-matrix --launch processes`: each rank of a cell is a process of its own, this binary
//! started again with the environment torchrun sets and the cell's place in
//! `harness::matrix_cells`. The ranks join over the TCP control plane on 127.0.0.1: on the host
//! platform with their workspaces in memfd segments they share (`HostRank::over_shared`), with
//! `--platform cuda` each on its GPU (`LOCAL_RANK`'s, shared with `MOE_SHARE_GPUS=1`) with
//! workspaces exported and mapped across the processes (`CudaWorldRank::join`). Each judges its
//! own part (`harness::judge_rank`): its outputs against the oracle, and what its experts
//! received and its outputs against the same cell run with threads on the host, bit for bit.

use std::io::Read;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moe_a2a::control::{TcpConfig, TcpControlPlane};
use moe_a2a::harness::{self, Cell, Outcome};
use moe_a2a::host::HostRank;
use moe_a2a::shm::MemfdMemory;
use moe_a2a::{CudaRank, PlatformKind, RankContext, Registry};
use moe_kernels::world::CudaWorldRank;

/// Set in a rank process: the cell's index in `harness::matrix_cells`.
pub const CELL_ENV: &str = "MOE_MATRIX_CELL";
/// Set in a rank process: the cell as the matrix prints it, to check the index against.
const CELL_NAME_ENV: &str = "MOE_MATRIX_CELL_NAME";
/// Set in a rank process of `--platform cuda`: run on this process's GPU.
const CUDA_ENV: &str = "MOE_MATRIX_CUDA";
/// The bound of the ranks' waits, in milliseconds.
const RANK_TIMEOUT_MS: u64 = 30_000;
/// How long a cell's processes may run before they are killed.
const CELL_LIMIT: Duration = Duration::from_secs(120);
/// What a rank process prints as its verdict.
const VERDICT: &str = "MATRIX-RANK";

/// Runs `cell` with one process per rank on `platform` and gathers the ranks' verdicts.
pub fn run(registry: &Registry, cell: &Cell, platform: PlatformKind) -> Outcome {
    let mut attempt = 1;
    loop {
        let outcome = run_ranks(registry, cell, platform).unwrap_or_else(|error| Outcome::Failed { error });
        match outcome {
            // The port chosen for rank 0 was free when chosen, but another process (a rank of
            // another cell, connecting from an ephemeral port) can take it before rank 0 binds
            // it: the cell runs again on a new port.
            Outcome::Failed { error } if error.contains(PORT_TAKEN) && attempt < PORT_ATTEMPTS => attempt += 1,
            outcome => return outcome,
        }
    }
}

/// How many ports a cell tries for rank 0 before its failure stands.
const PORT_ATTEMPTS: usize = 3;
/// What rank 0's control plane says when its port was taken (`TcpControlPlane::connect`).
const PORT_TAKEN: &str = "Address already in use";

fn run_ranks(registry: &Registry, cell: &Cell, platform: PlatformKind) -> Result<Outcome, String> {
    let index = harness::matrix_cells(registry)
        .iter()
        .position(|c| c == cell)
        .ok_or_else(|| format!("{cell} is not a cell of the matrix"))?;
    let exe = std::env::current_exe().map_err(|e| format!("this binary's path: {e}"))?;
    let port = TcpConfig::free_local_port().map_err(|e| format!("no free port for MASTER_PORT: {e}"))?;
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string();
    let ranks = cell.parallel.world_size();
    let mut children = Vec::new();
    for rank in 0..ranks {
        let mut command = Command::new(&exe);
        if platform == PlatformKind::Cuda {
            command.env(CUDA_ENV, "1");
        }
        let child = command
            .env(CELL_ENV, index.to_string())
            .env(CELL_NAME_ENV, cell.to_string())
            .envs(TcpConfig::local_launch_env(port, rank, ranks, &run_id))
            .env("MOE_TIMEOUT_MS", RANK_TIMEOUT_MS.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match child {
            Ok(child) => children.push(child),
            Err(e) => {
                kill_all(&mut children);
                return Err(format!("starting rank {rank}: {e}"));
            }
        }
    }
    let outputs = wait_all(children);
    let mut worst = 0f64;
    for (rank, (status, stdout, stderr)) in outputs.iter().enumerate() {
        let said = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{VERDICT} {rank} ")))
            .ok_or_else(|| format!("rank {rank} ({status}) gave no verdict: {}", last_lines(stderr)))?;
        match said.strip_prefix("ok ") {
            Some(err) => {
                let err: f64 = err.parse().map_err(|_| format!("rank {rank}'s verdict `{said}`"))?;
                worst = worst.max(err);
            }
            None => {
                return Ok(Outcome::Failed {
                    error: said.to_string(),
                });
            }
        }
    }
    Ok(Outcome::Executed {
        max_error: worst,
        tolerance: harness::tolerance(cell.input_dtype),
        vs_host: None,
    })
}

/// Each child's exit status, stdout and stderr; a child still running after [`CELL_LIMIT`] is
/// killed.
fn wait_all(mut children: Vec<Child>) -> Vec<(String, String, String)> {
    let deadline = Instant::now() + CELL_LIMIT;
    // Drained on threads, so a chatty rank cannot block on a full pipe.
    let readers: Vec<_> = children
        .iter_mut()
        .map(|c| {
            let (mut out, mut err) = (c.stdout.take(), c.stderr.take());
            std::thread::spawn(move || {
                let mut o = String::new();
                let mut e = String::new();
                if let Some(s) = out.as_mut() {
                    let _ = s.read_to_string(&mut o);
                }
                if let Some(s) = err.as_mut() {
                    let _ = s.read_to_string(&mut e);
                }
                (o, e)
            })
        })
        .collect();
    let mut statuses: Vec<Option<String>> = vec![None; children.len()];
    while statuses.iter().any(Option::is_none) {
        for (s, child) in statuses.iter_mut().zip(children.iter_mut()) {
            if s.is_none()
                && let Ok(Some(status)) = child.try_wait()
            {
                *s = Some(status.to_string());
            }
        }
        if Instant::now() >= deadline {
            for (s, child) in statuses.iter_mut().zip(children.iter_mut()) {
                if s.is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                    *s = Some(format!("killed after {CELL_LIMIT:?}"));
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    statuses
        .into_iter()
        .zip(readers)
        .map(|(status, reader)| {
            let (o, e) = reader.join().unwrap_or_default();
            (status.unwrap_or_default(), o, e)
        })
        .collect()
}

fn kill_all(children: &mut [Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// In a rank process ([`CELL_ENV`] set to `index`): joins the world, runs this rank's part of
/// the cell and prints its verdict.
pub fn act_as_rank(registry: &Registry, index: &str) -> ExitCode {
    let verdict = rank_verdict(registry, index);
    let rank = std::env::var("RANK").unwrap_or_default();
    match verdict {
        Ok(err) => println!("{VERDICT} {rank} ok {err:e}"),
        Err(e) => println!("{VERDICT} {rank} rank {rank}: {}", e.replace('\n', " ")),
    }
    ExitCode::SUCCESS
}

fn rank_verdict(registry: &Registry, index: &str) -> Result<f64, String> {
    let cells = harness::matrix_cells(registry);
    let cell = index
        .parse::<usize>()
        .ok()
        .and_then(|i| cells.get(i))
        .ok_or_else(|| format!("{CELL_ENV}={index} is not a cell of the matrix"))?;
    let name = std::env::var(CELL_NAME_ENV).unwrap_or_default();
    if cell.to_string() != name {
        return Err(format!("cell {index} is {cell}, the parent meant {name}"));
    }
    let config = TcpConfig::from_env().map_err(|e| e.to_string())?;
    let plane = TcpControlPlane::connect(&config).map_err(|e| e.to_string())?;
    let host = HostRank::over_shared(Arc::new(plane), Arc::new(MemfdMemory));
    let rank = if std::env::var_os(CUDA_ENV).is_some() {
        let ordinal = moe_kernels::probe::process_device(config.local_rank, config.local_world_size)?;
        let device = CudaWorldRank::join(&host, ordinal).map_err(|e| e.to_string())?;
        RankContext::Cuda(CudaRank::new(host, Arc::new(device)))
    } else {
        RankContext::Host(host)
    };
    harness::judge_rank(registry, cell, rank)
}
