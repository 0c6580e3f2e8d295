//! `cargo xtask test-matrix`: the project's main job. Every cell of
//! `moe_core::harness::matrix_cells` (each registered backend x quantization x parallel layout x
//! shape x format) runs on host ranks through the layer runner and is judged against the f64
//! oracle by `harness::run_cell`, the same judge the conformance tests use. One row per cell:
//!
//! ```text
//! <cell>  executed  max_err=1.2e-3 tol=2.5e-2
//! <cell>  rejected  quant scheme `nvfp4` is not supported (supported: bf16, fp16); accepted by: allgather-rs
//! <cell>  FAILED    rank 1 timed out after 30s in dispatch waiting for rank(s) [0]; ...
//! ```
//!
//! then a tally per backend and a summary line. `--list` prints the capability records' verdict
//! for each cell without running it.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use moe_a2a::harness::{self, Cell, CellPlatform, Outcome, SHAPES};
use moe_a2a::host::HostRank;
use moe_a2a::quant::QuantScheme;
use moe_a2a::{CudaRank, MoeError, PlatformKind, RankContext, Registry};
use moe_kernels::world::{CudaWorld, CudaWorldRank};

use crate::cell_processes;
use crate::flags::{Platform, RankLaunch, TestMatrix};
use crate::json::Object;

/// The cells the flags select, in matrix order; unknown names are errors that list the valid
/// ones.
pub fn select_cells(flags: &TestMatrix, registry: &Registry) -> Result<Vec<Cell>, String> {
    let names = registry.names();
    for b in &flags.backends {
        if !names.contains(&b.as_str()) {
            return Err(format!(
                "unknown backend `{b}`; registered backends: {}",
                names.join(", ")
            ));
        }
    }
    let mut schemes = Vec::new();
    for s in &flags.schemes {
        match QuantScheme::from_name(s) {
            Some(q) => schemes.push(q),
            None => {
                let valid: Vec<_> = QuantScheme::ALL.iter().map(|q| q.name()).collect();
                return Err(format!("unknown quant scheme `{s}`; schemes: {}", valid.join(", ")));
            }
        }
    }
    let mut sizes: Vec<usize> = harness::parallel_variants().iter().map(|p| p.world_size()).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for r in &flags.ranks {
        if !sizes.contains(r) {
            let valid: Vec<_> = sizes.iter().map(|s| s.to_string()).collect();
            return Err(format!(
                "no cell has {r} ranks; world sizes in the matrix: {}",
                valid.join(", ")
            ));
        }
    }
    for s in &flags.shapes {
        if !SHAPES.iter().any(|shape| shape.name == s) {
            let valid: Vec<_> = SHAPES.iter().map(|shape| shape.name).collect();
            return Err(format!("unknown shape `{s}`; shapes: {}", valid.join(", ")));
        }
    }
    Ok(harness::matrix_cells(registry)
        .into_iter()
        .filter(|c| flags.backends.is_empty() || flags.backends.contains(&c.backend))
        .filter(|c| schemes.is_empty() || schemes.contains(&c.quant.scheme))
        .filter(|c| flags.ranks.is_empty() || flags.ranks.contains(&c.parallel.world_size()))
        .filter(|c| flags.shapes.is_empty() || flags.shapes.iter().any(|s| s == c.shape.name))
        .collect())
}

/// What the capability records say about a cell: `Ok` if it would execute, `Err((full
/// message, compact one-line reason))` if it is rejected or cannot be built.
pub fn verdict(registry: &Registry, cell: &Cell, platform: PlatformKind) -> Result<(), Verdict> {
    let layer = cell.layer().map_err(|e| Verdict::Invalid(e.to_string()))?;
    match registry.check(&cell.backend, &layer, platform) {
        Ok(_) => Ok(()),
        Err(e) => {
            let full = e.to_string();
            let compact = match &e {
                MoeError::Incompatible {
                    reasons, alternatives, ..
                } => {
                    let mut s = reasons.join("; ");
                    if alternatives.is_empty() {
                        s.push_str("; no registered backend accepts it");
                    } else {
                        s.push_str("; accepted by: ");
                        s.push_str(&alternatives.join(", "));
                    }
                    s
                }
                _ => one_line(&full),
            };
            Err(Verdict::Rejected { full, compact })
        }
    }
}

/// Why a cell would not execute.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The backend's record refuses it.
    Rejected { full: String, compact: String },
    /// The cell's own config is invalid (a bug in the matrix).
    Invalid(String),
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Counts of one backend (or of all).
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    executed: usize,
    rejected: usize,
    failed: usize,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.executed += other.executed;
        self.rejected += other.rejected;
        self.failed += other.failed;
    }
}

/// The common JSON members of a cell.
fn cell_json(cell: &Cell) -> Object {
    Object::new()
        .str(
            "cell",
            &cell.to_string().split_whitespace().collect::<Vec<_>>().join(" "),
        )
        .str("backend", &cell.backend)
        .str("scheme", cell.quant.scheme.name())
        .str("quant", &cell.quant.to_string())
        .str("input_dtype", &cell.input_dtype.to_string())
        .str("parallel_mode", cell.parallel.mode().name())
        .int("ranks", cell.parallel.world_size() as u64)
        .int("tp", cell.parallel.tp as u64)
        .int("dp", cell.parallel.dp as u64)
        .bool("ep", cell.parallel.ep)
        .bool("sp", cell.parallel.sp)
        .str("format", cell.format.name())
        .str("shape", cell.shape.name)
        .str("routing", cell.routing.name())
        .int("seed", cell.seed)
}

fn tally_json(t: &Tally, executed_key: &str, failed_key: &str) -> Object {
    Object::new()
        .int(executed_key, t.executed as u64)
        .int("rejected", t.rejected as u64)
        .int(failed_key, t.failed as u64)
}

/// The `--list` output for `cells` and whether every cell's config was valid.
pub fn listing(registry: &Registry, cells: &[Cell], json: bool, platform: PlatformKind) -> (String, bool) {
    let mut out = String::new();
    let mut per_backend: BTreeMap<&str, Tally> = BTreeMap::new();
    for cell in cells {
        let t = per_backend.entry(cell.backend.as_str()).or_default();
        let v = verdict(registry, cell, platform);
        match &v {
            Ok(()) => t.executed += 1,
            Err(Verdict::Rejected { .. }) => t.rejected += 1,
            Err(Verdict::Invalid(_)) => t.failed += 1,
        }
        let line = if json {
            let o = cell_json(cell);
            match v {
                Ok(()) => o.str("verdict", "would-execute"),
                Err(Verdict::Rejected { full, compact }) => o
                    .str("verdict", "rejected")
                    .str("reason", &compact)
                    .str("message", &full),
                Err(Verdict::Invalid(e)) => o.str("verdict", "invalid").str("error", &e),
            }
            .finish()
        } else {
            match v {
                Ok(()) => format!("{cell}  would execute"),
                Err(Verdict::Rejected { compact, .. }) => format!("{cell}  rejected: {compact}"),
                Err(Verdict::Invalid(e)) => format!("{cell}  INVALID: {}", one_line(&e)),
            }
        };
        out.push_str(&line);
        out.push('\n');
    }
    let mut total = Tally::default();
    for t in per_backend.values() {
        total.add(*t);
    }
    if json {
        let mut backends = Object::new();
        for (b, t) in &per_backend {
            backends = backends.obj(b, tally_json(t, "would_execute", "invalid"));
        }
        let summary = Object::new()
            .bool("summary", true)
            .bool("list", true)
            .int("cells", cells.len() as u64)
            .obj("total", tally_json(&total, "would_execute", "invalid"))
            .obj("backends", backends);
        out.push_str(&summary.finish());
        out.push('\n');
    } else {
        for (b, t) in &per_backend {
            out.push_str(&format!(
                "  {b:<24} would execute {:>4}  rejected {:>4}  invalid {:>4}\n",
                t.executed, t.rejected, t.failed
            ));
        }
        out.push_str(&format!(
            "test-matrix --list: {} cells: would execute {}, rejected {}, invalid {}\n",
            cells.len(),
            total.executed,
            total.rejected,
            total.failed
        ));
    }
    (out, total.failed == 0)
}

/// One CUDA world per world size, made on first use and kept: contexts and compiled kernels
/// are reused by every cell of that size.
#[derive(Debug)]
struct CudaWorlds {
    worlds: Mutex<BTreeMap<usize, Arc<CudaWorld>>>,
}

impl CudaWorlds {
    fn get(&self, ranks: usize) -> Result<Arc<CudaWorld>, String> {
        let mut worlds = self.worlds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = worlds.get(&ranks) {
            return Ok(w.clone());
        }
        let world =
            Arc::new(CudaWorld::on_devices(&moe_kernels::probe::rank_devices(ranks)?).map_err(|e| e.to_string())?);
        worlds.insert(ranks, world.clone());
        Ok(world)
    }
}

/// Runs `cell` on the host, or on GPUs when `cuda` is given, turning a panic outside the rank
/// threads into a failure.
fn run_one(registry: &Registry, cell: &Cell, cuda: Option<&CudaWorlds>, launch: RankLaunch) -> Outcome {
    let run = || match cuda {
        // Rejected as with threads, before any process starts.
        _ if launch == RankLaunch::Processes => {
            let platform = if cuda.is_some() {
                PlatformKind::Cuda
            } else {
                PlatformKind::Host
            };
            match cell.layer().and_then(|l| registry.check(&cell.backend, &l, platform)) {
                Ok(_) => cell_processes::run(registry, cell, platform),
                Err(e @ MoeError::Incompatible { .. }) => Outcome::Rejected { reason: e.to_string() },
                Err(e) => Outcome::Failed { error: e.to_string() },
            }
        }
        None => harness::run_cell(registry, cell),
        Some(worlds) => match worlds.get(cell.parallel.world_size()) {
            Err(error) => Outcome::Failed { error },
            Ok(world) => {
                let devices = match (0..world.ranks())
                    .map(|r| CudaWorldRank::new(world.clone(), r).map(Arc::new))
                    .collect::<Result<Vec<_>, _>>()
                {
                    Ok(devices) => devices,
                    Err(e) => return Outcome::Failed { error: e.to_string() },
                };
                let rank_context = move |host: HostRank| {
                    let device = devices[host.rank()].clone();
                    RankContext::Cuda(CudaRank::new(host, device))
                };
                let platform = CellPlatform {
                    kind: PlatformKind::Cuda,
                    rank_context: &rank_context,
                };
                harness::run_cell_on(registry, platform, cell)
            }
        },
    };
    catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_string());
        Outcome::Failed {
            error: format!("panicked outside the rank threads: {msg}"),
        }
    })
}

/// One finished cell, as printed.
fn row(
    registry: &Registry,
    cell: &Cell,
    outcome: &Outcome,
    elapsed: Duration,
    json: bool,
    platform: PlatformKind,
) -> String {
    if json {
        let o = cell_json(cell).num("wall_s", elapsed.as_secs_f64());
        return match outcome {
            Outcome::Executed {
                max_error,
                tolerance,
                vs_host,
            } => {
                let o = o
                    .str("outcome", "executed")
                    .num("max_error", *max_error)
                    .num("tolerance", *tolerance);
                match vs_host {
                    Some(d) => o.num("vs_host", *d),
                    None => o,
                }
            }
            Outcome::Rejected { reason } => o
                .str("outcome", "rejected")
                .str("reason", &compact_reason(registry, cell, reason, platform))
                .str("message", reason),
            Outcome::Failed { error } => o.str("outcome", "failed").str("error", error),
        }
        .finish();
    }
    match outcome {
        Outcome::Executed {
            max_error,
            tolerance,
            vs_host,
        } => {
            let mut line = format!("{cell}  executed  max_err={max_error:.1e} tol={tolerance:.1e}");
            if let Some(d) = vs_host {
                line.push_str(&format!(" vs_host={d:.1e}"));
            }
            line
        }
        Outcome::Rejected { reason } => {
            format!("{cell}  rejected  {}", compact_reason(registry, cell, reason, platform))
        }
        Outcome::Failed { error } => format!("{cell}  FAILED    {}", one_line(error)),
    }
}

/// The one-line form of a rejection: from the structured record check, or the message's first
/// lines joined if the check no longer rejects (it always should).
fn compact_reason(registry: &Registry, cell: &Cell, full: &str, platform: PlatformKind) -> String {
    match verdict(registry, cell, platform) {
        Err(Verdict::Rejected { compact, .. }) => compact,
        _ => one_line(full),
    }
}

/// Reports progress on stderr: every ~2 s on a terminal, every 100 cells otherwise.
struct Progress {
    total: usize,
    start: Instant,
    last: Instant,
    terminal: bool,
}

impl Progress {
    fn tick(&mut self, done: usize, failed: usize) {
        let due = if self.terminal {
            self.last.elapsed() >= Duration::from_secs(2)
        } else {
            done.is_multiple_of(100)
        };
        if due && done < self.total {
            self.last = Instant::now();
            eprintln!(
                "[{done}/{}] {:.1} s, {failed} failed so far",
                self.total,
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

/// Runs the subcommand.
pub fn run(flags: &TestMatrix, registry: &Registry) -> Result<ExitCode, String> {
    let cells = select_cells(flags, registry)?;
    let platform = match flags.platform {
        Platform::Host => PlatformKind::Host,
        Platform::Cuda => PlatformKind::Cuda,
    };
    if flags.list {
        let (text, ok) = listing(registry, &cells, flags.json, platform);
        print!("{text}");
        return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    let (cells, cuda) = match flags.platform {
        Platform::Host => (cells, None),
        Platform::Cuda => {
            let gpus = moe_kernels::probe::gpu_count()?;
            if gpus == 0 {
                return Err("--platform cuda: this machine has no GPU".to_string());
            }
            // With MOE_SHARE_GPUS=1, ranks share GPUs for backends that allow it (the
            // protocols and kernels on fewer GPUs, not the paths between them).
            let share = moe_kernels::probe::required(moe_kernels::probe::SHARE_GPUS_ENV);
            let fits = |c: &Cell| {
                c.parallel.world_size() <= gpus
                    || (share && registry.get(&c.backend).is_ok_and(|r| !r.capabilities.gpu_per_rank))
            };
            let (fit, too_big): (Vec<Cell>, Vec<Cell>) = cells.into_iter().partition(fits);
            eprintln!(
                "--platform cuda: {} cells need more than this machine's {gpus} GPUs and are not run{}",
                too_big.len(),
                if share {
                    " (the others share GPUs where their world is larger)"
                } else {
                    ""
                }
            );
            let worlds = CudaWorlds {
                worlds: Mutex::new(BTreeMap::new()),
            };
            (fit, Some(worlds))
        }
    };
    // GPU cells run one at a time: a cell's ranks spin on their peers, and another cell's
    // allocations on the same GPUs must not meet them.
    let jobs = match &cuda {
        Some(_) => 1,
        None => flags
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .min(cells.len().max(1)),
    };
    let start = Instant::now();
    let mut progress = Progress {
        total: cells.len(),
        start,
        last: start,
        terminal: std::io::stderr().is_terminal(),
    };
    let mut per_backend: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut failures = Vec::new();
    let stdout = std::io::stdout();
    let mut stdout = stdout.lock();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        for j in 0..jobs {
            let (tx, next, cells, cuda) = (tx.clone(), &next, &cells, cuda.as_ref());
            std::thread::Builder::new()
                .name(format!("xtask-cell-{j}"))
                .spawn_scoped(s, move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(cell) = cells.get(i) else { break };
                        let t = Instant::now();
                        let outcome = run_one(registry, cell, cuda, flags.launch);
                        if tx.send((i, outcome, t.elapsed())).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| format!("spawning a worker thread: {e}"))?;
        }
        drop(tx);
        // Rows are printed in matrix order whatever order the workers finish in.
        let mut pending = BTreeMap::new();
        let mut printed = 0;
        let mut failed = 0;
        for (done, (i, outcome, elapsed)) in rx.iter().enumerate() {
            if matches!(outcome, Outcome::Failed { .. }) {
                failed += 1;
            }
            pending.insert(i, (outcome, elapsed));
            while let Some((outcome, elapsed)) = pending.remove(&printed) {
                let cell = &cells[printed];
                let line = row(registry, cell, &outcome, elapsed, flags.json, platform);
                let _ = writeln!(stdout, "{line}");
                let t = per_backend.entry(cell.backend.as_str()).or_default();
                match outcome {
                    Outcome::Executed { .. } => t.executed += 1,
                    Outcome::Rejected { .. } => t.rejected += 1,
                    Outcome::Failed { .. } => {
                        t.failed += 1;
                        failures.push(line);
                    }
                }
                printed += 1;
            }
            progress.tick(done + 1, failed);
        }
        Ok(())
    })?;
    let wall = start.elapsed().as_secs_f64();
    let mut total = Tally::default();
    for t in per_backend.values() {
        total.add(*t);
    }
    if flags.json {
        let mut backends = Object::new();
        for (b, t) in &per_backend {
            backends = backends.obj(b, tally_json(t, "executed", "failed"));
        }
        let summary = Object::new()
            .bool("summary", true)
            .int("cells", cells.len() as u64)
            .obj("total", tally_json(&total, "executed", "failed"))
            .obj("backends", backends)
            .num("wall_s", wall)
            .int("jobs", jobs as u64);
        let _ = writeln!(stdout, "{}", summary.finish());
    } else {
        if !failures.is_empty() {
            let _ = writeln!(stdout, "\nfailed cells:");
            for f in &failures {
                let _ = writeln!(stdout, "{f}");
            }
        }
        let _ = writeln!(stdout);
        for (b, t) in &per_backend {
            let _ = writeln!(
                stdout,
                "  {b:<24} executed {:>4}  rejected {:>4}  failed {:>4}",
                t.executed, t.rejected, t.failed
            );
        }
        let _ = writeln!(
            stdout,
            "test-matrix: {} cells: executed {}, rejected {}, failed {} in {wall:.1} s ({jobs} job{})",
            cells.len(),
            total.executed,
            total.rejected,
            total.failed,
            if jobs == 1 { "" } else { "s" }
        );
    }
    let _ = stdout.flush();
    Ok(if total.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use moe_a2a::BackendRegistration;

    use super::*;

    /// A registry of the example backend alone, so the snapshot does not move when another
    /// backend's record changes.
    fn example_only() -> Registry {
        Registry::from_registrations(
            moe_a2a::inventory::iter::<BackendRegistration>
                .into_iter()
                .filter(|r| r.name == example_gather_ep::NAME),
        )
    }

    #[test]
    fn listing_of_the_example_backend() {
        let registry = example_only();
        let flags = TestMatrix {
            ranks: vec![2, 8],
            shapes: vec!["top1".to_string()],
            ..TestMatrix::default()
        };
        let cells = select_cells(&flags, &registry).unwrap();
        let (text, ok) = listing(&registry, &cells, false, PlatformKind::Host);
        assert!(ok);
        insta::assert_snapshot!(text);
    }

    #[test]
    fn filters_select_by_backend_scheme_ranks_and_shape() {
        let flags = TestMatrix {
            backends: vec![example_gather_ep::NAME.to_string()],
            schemes: vec!["fp16".to_string()],
            ranks: vec![4],
            ..TestMatrix::default()
        };
        let cells = select_cells(&flags, moe_a2a::registry()).unwrap();
        assert!(!cells.is_empty());
        for c in &cells {
            assert_eq!(
                (c.backend.as_str(), c.quant.scheme, c.parallel.world_size()),
                (example_gather_ep::NAME, QuantScheme::Fp16, 4)
            );
        }
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        let registry = moe_a2a::registry();
        let cases = [
            (
                TestMatrix {
                    backends: vec!["nccl".into()],
                    ..Default::default()
                },
                "unknown backend `nccl`; registered backends: allgather-rs, example-gather-ep",
            ),
            (
                TestMatrix {
                    schemes: vec!["fp4".into()],
                    ..Default::default()
                },
                "unknown quant scheme `fp4`; schemes: bf16, fp16, fp8-per-tensor",
            ),
            (
                TestMatrix {
                    ranks: vec![3],
                    ..Default::default()
                },
                "no cell has 3 ranks; world sizes in the matrix: 1, 2, 4, 8",
            ),
            (
                TestMatrix {
                    shapes: vec!["huge".into()],
                    ..Default::default()
                },
                "unknown shape `huge`; shapes: small-swiglu",
            ),
        ];
        for (flags, want) in cases {
            let got = select_cells(&flags, registry).unwrap_err();
            assert!(got.contains(want), "expected `{want}`, got `{got}`");
        }
    }

    #[test]
    fn json_rows_carry_the_full_rejection_message() {
        let registry = example_only();
        let flags = TestMatrix {
            schemes: vec!["nvfp4".into()],
            ranks: vec![2],
            ..Default::default()
        };
        let cell = &select_cells(&flags, &registry).unwrap()[0];
        let (text, _) = listing(&registry, std::slice::from_ref(cell), true, PlatformKind::Host);
        let first = text.lines().next().unwrap();
        assert!(first.contains(r#""verdict":"rejected""#), "{first}");
        assert!(
            first.contains(r#""message":"backend `example-gather-ep` cannot serve nvfp4 dispatch"#),
            "{first}"
        );
        assert!(
            first.contains(r#"\n  - quant scheme `nvfp4` is not supported (supported: bf16, fp16)"#),
            "{first}"
        );
    }

    #[test]
    fn an_example_cell_runs_and_prints_an_executed_row() {
        let registry = moe_a2a::registry();
        let flags = TestMatrix {
            backends: vec![example_gather_ep::NAME.into()],
            schemes: vec!["bf16".into()],
            ranks: vec![2],
            shapes: vec!["top1".into()],
            ..Default::default()
        };
        let cells = select_cells(&flags, registry).unwrap();
        let cell = cells.iter().find(|c| c.parallel.ep).expect("an EP cell");
        let outcome = run_one(registry, cell, None, RankLaunch::Threads);
        let line = row(registry, cell, &outcome, Duration::ZERO, false, PlatformKind::Host);
        assert!(line.contains("  executed  max_err="), "{line}");
    }
}
