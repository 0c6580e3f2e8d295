//! The command line of `cargo xtask`, parsed with std alone, and its usage text.
//!
//! Flags take their value as `--flag VALUE` or `--flag=VALUE`; list-valued flags may be repeated
//! or given a comma-separated list. Names (backends, schemes, shapes) are checked against the
//! registry by the subcommand, which knows the valid ones.

/// The text `cargo xtask --help` prints.
pub const USAGE: &str = "\
cargo xtask: project automation for moe-a2a

USAGE:
    cargo xtask <COMMAND> [FLAGS]

COMMANDS:
    test-matrix    Run every cell of the test matrix (backend x quantization x parallel layout x
                   shape x format) on host ranks (or GPUs) against the f64 oracle; one row per
                   cell: `executed`, `rejected` with the registry's reason, or `FAILED` with the
                   error. Exits non-zero if any cell failed.
    matrix-doc     Print the capability matrix (Markdown) rendered from the backends' records.
    bench          Run the GPU benchmarks on this machine's GPUs, Markdown tables on stdout:
                   crates/moe-a2a/benches/gpu_a2a.rs (every backend, the NCCL baseline and the
                   peer-copy ceiling in one run), then crates/moe-kernels/benches/gpu_quantize.rs
                   (the quantization kernel alone, one GPU). MOE_BENCH_* variables pass through.
    gpu-bundle     Build the GPU test binaries (release, --features cuda) into gpu-bundle/ with a
                   run.sh, for a GPU host without a Rust toolchain (under 64 MiB).
    launch         Start N processes of a command as the ranks of one world on this machine,
                   with the environment torchrun sets (MASTER_ADDR, MASTER_PORT, RANK,
                   WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, and MOE_RUN_ID), each line of
                   output prefixed with its rank; exits non-zero if any rank does.
    help           Print this text (also -h, --help).

test-matrix FLAGS:
    --list             List the cells with what the capability records say (`would execute` or
                       `rejected: reason`) without running anything.
    --backend NAME     Only cells of these backends (repeatable, or a comma list).
    --scheme NAME      Only cells whose quant scheme is NAME: bf16, fp16, fp8-per-tensor,
                       fp8-per-token, fp8-block128, nvfp4, mxfp8 (repeatable, or a comma list).
    --ranks N          Only cells with a world of N ranks (repeatable, or a comma list).
    --shape NAME       Only cells of these layer shapes (repeatable, or a comma list).
    --platform NAME    host (default) or cuda: run each cell on one GPU per rank, only the cells
                       whose world fits the machine's GPUs, one cell at a time, and check each
                       against the same cell on the host (same rows received by the experts,
                       outputs within the tolerance; `vs_host` is the largest difference).
                       With MOE_SHARE_GPUS=1, cells of backends that allow it run on fewer GPUs
                       than ranks, ranks sharing GPUs (the protocols, not the paths between GPUs).
    --launch HOW       threads (default): every cell's ranks are threads of one world; processes:
                       each rank is a process of its own (this binary again), joined over the TCP
                       control plane on 127.0.0.1 with workspaces in memory the processes share
                       (with --platform cuda: each on LOCAL_RANK's GPU, workspaces exported and
                       mapped across the processes), and judged against the oracle and, bit for
                       bit, against the same cell with threads on the host.
    --json             Print one JSON object per cell, then a summary object (one per line).
    --jobs N           Run N cells at a time (default: the available parallelism); every cell
                       runs its own rank threads.

launch FLAGS: cargo xtask launch -n N [--port P] -- COMMAND [ARGS...]
    -n N               Ranks (processes) to start.
    --port P           MASTER_PORT (default: a free port).

matrix-doc FLAGS:
    --write            Replace the table between `<!-- capability-matrix:start -->` and
                       `<!-- capability-matrix:end -->` in README.md instead of printing it.

Progress goes to stderr: every ~2 s on a terminal, every 100 cells otherwise.
";

/// A parsed command line.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// `test-matrix`: run (or list) the cells of the test matrix.
    TestMatrix(TestMatrix),
    /// `matrix-doc`: print or write the capability matrix.
    MatrixDoc(MatrixDoc),
    /// `launch`: start the ranks of one world as processes.
    Launch(Launch),
    /// `gpu-bundle`: build the GPU test binaries into one folder with a run script.
    GpuBundle,
    /// `bench`: run the GPU benchmark.
    Bench,
    /// `help`, `-h`, `--help`: print [`USAGE`].
    Help,
}

/// Flags of `test-matrix`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TestMatrix {
    /// `--list`: print the cells and their capability verdicts without running them.
    pub list: bool,
    /// `--backend NAME`: keep only cells of these backends (empty: all).
    pub backends: Vec<String>,
    /// `--scheme NAME`: keep only cells whose `QuantScheme::name` is one of these (empty: all).
    pub schemes: Vec<String>,
    /// `--ranks N`: keep only cells whose world has one of these sizes (empty: all).
    pub ranks: Vec<usize>,
    /// `--shape NAME`: keep only cells of these shapes (empty: all).
    pub shapes: Vec<String>,
    /// `--json`: machine-readable output, one JSON object per line.
    pub json: bool,
    /// `--jobs N`: cells run at once; `None` means the available parallelism.
    pub jobs: Option<usize>,
    /// `--platform NAME`: where the cells run.
    pub platform: Platform,
    /// `--launch HOW`: what a cell's ranks are.
    pub launch: RankLaunch,
}

/// What a cell's ranks are.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum RankLaunch {
    /// Threads of one process.
    #[default]
    Threads,
    /// One process each, over the TCP control plane.
    Processes,
}

/// The platforms `test-matrix` runs on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    #[default]
    Host,
    Cuda,
}

/// Flags of `matrix-doc`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MatrixDoc {
    /// `--write`: update README.md in place instead of printing.
    pub write: bool,
}

/// Parses the arguments after `cargo xtask`.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let command = match args.next() {
        None => return Err("no command given".to_string()),
        Some(c) => c,
    };
    let mut rest = Args::new(args);
    match command.as_str() {
        "help" | "-h" | "--help" => Ok(Command::Help),
        "test-matrix" => {
            let mut f = TestMatrix::default();
            while let Some(flag) = rest.next_flag()? {
                match flag.as_str() {
                    "--list" => f.list = true,
                    "--json" => f.json = true,
                    "--backend" => f.backends.extend(split(&rest.value(&flag)?)),
                    "--scheme" => f.schemes.extend(split(&rest.value(&flag)?)),
                    "--shape" => f.shapes.extend(split(&rest.value(&flag)?)),
                    "--ranks" => {
                        for v in split(&rest.value(&flag)?) {
                            f.ranks.push(number(&flag, &v)?);
                        }
                    }
                    "--platform" => {
                        f.platform = match rest.value(&flag)?.as_str() {
                            "host" => Platform::Host,
                            "cuda" => Platform::Cuda,
                            other => return Err(format!("unknown platform `{other}`; platforms: host, cuda")),
                        }
                    }
                    "--launch" => {
                        f.launch = match rest.value(&flag)?.as_str() {
                            "threads" => RankLaunch::Threads,
                            "processes" => RankLaunch::Processes,
                            other => {
                                return Err(format!("unknown launch `{other}`; launches: threads, processes"));
                            }
                        }
                    }
                    "--jobs" => {
                        let v = rest.value(&flag)?;
                        let n = number(&flag, &v)?;
                        if n == 0 {
                            return Err("`--jobs` must be at least 1".to_string());
                        }
                        f.jobs = Some(n);
                    }
                    "-h" | "--help" => return Ok(Command::Help),
                    other => return Err(format!("unknown flag `{other}` for test-matrix")),
                }
            }
            Ok(Command::TestMatrix(f))
        }
        "matrix-doc" => {
            let mut f = MatrixDoc::default();
            while let Some(flag) = rest.next_flag()? {
                match flag.as_str() {
                    "--write" => f.write = true,
                    "-h" | "--help" => return Ok(Command::Help),
                    other => return Err(format!("unknown flag `{other}` for matrix-doc")),
                }
            }
            Ok(Command::MatrixDoc(f))
        }
        "launch" => {
            let mut ranks = None;
            let mut port = None;
            loop {
                let Some(arg) = rest.args.next() else {
                    return Err("launch needs `-- COMMAND` after its flags".into());
                };
                match arg.as_str() {
                    "--" => break,
                    "-n" => ranks = Some(number("-n", &rest.value("-n")?)?),
                    "--port" => {
                        let p = number("--port", &rest.value("--port")?)?;
                        port = Some(u16::try_from(p).map_err(|_| format!("`--port` {p} is not a TCP port"))?);
                    }
                    "-h" | "--help" => return Ok(Command::Help),
                    other => return Err(format!("unknown flag `{other}` for launch")),
                }
            }
            let command: Vec<String> = rest.args.by_ref().collect();
            match (ranks, command.is_empty()) {
                (Some(ranks), false) if ranks > 0 => Ok(Command::Launch(Launch { ranks, port, command })),
                (_, true) => Err("launch needs a command after `--`".into()),
                _ => Err("launch needs `-n N` with N at least 1".into()),
            }
        }
        "gpu-bundle" | "bench" => match rest.next_flag()? {
            None if command == "bench" => Ok(Command::Bench),
            None => Ok(Command::GpuBundle),
            Some(flag) if flag == "-h" || flag == "--help" => Ok(Command::Help),
            Some(other) => Err(format!("unknown flag `{other}` for {command}")),
        },
        other => Err(format!(
            "unknown command `{other}`; commands: test-matrix, matrix-doc, bench, gpu-bundle, launch, help"
        )),
    }
}

/// `launch`'s settings.
#[derive(Debug, PartialEq, Eq)]
pub struct Launch {
    pub ranks: usize,
    pub port: Option<u16>,
    /// The program and its arguments.
    pub command: Vec<String>,
}

/// The remaining arguments, with `--flag=value` split into flag and pending value.
struct Args<I> {
    args: I,
    pending: Option<String>,
}

impl<I: Iterator<Item = String>> Args<I> {
    fn new(args: I) -> Self {
        Args { args, pending: None }
    }

    fn next_flag(&mut self) -> Result<Option<String>, String> {
        if let Some(v) = self.pending.take() {
            return Err(format!("unexpected value `{v}`"));
        }
        let Some(arg) = self.args.next() else {
            return Ok(None);
        };
        if !arg.starts_with('-') {
            return Err(format!("unexpected argument `{arg}`"));
        }
        match arg.split_once('=') {
            Some((flag, value)) => {
                self.pending = Some(value.to_string());
                Ok(Some(flag.to_string()))
            }
            None => Ok(Some(arg)),
        }
    }

    fn value(&mut self, flag: &str) -> Result<String, String> {
        self.pending
            .take()
            .or_else(|| self.args.next())
            .ok_or_else(|| format!("`{flag}` needs a value"))
    }
}

fn split(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn number(flag: &str, v: &str) -> Result<usize, String> {
    v.parse()
        .map_err(|_| format!("`{flag}` takes a whole number, got `{v}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Command, String> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn list_valued_flags_accumulate_from_repeats_and_commas() {
        let Command::TestMatrix(f) =
            parse_str("test-matrix --backend a,b --backend=c --scheme nvfp4 --ranks 2,4 --jobs=3 --json").unwrap()
        else {
            panic!("not test-matrix");
        };
        assert_eq!(f.backends, ["a", "b", "c"]);
        assert_eq!(f.schemes, ["nvfp4"]);
        assert_eq!(f.ranks, [2, 4]);
        assert_eq!(f.jobs, Some(3));
        assert!(f.json && !f.list);
    }

    #[test]
    fn launch_is_threads_unless_processes_are_asked_for() {
        let launch = |line: &str| match parse_str(line).unwrap() {
            Command::TestMatrix(f) => f.launch,
            other => panic!("{other:?}"),
        };
        assert_eq!(launch("test-matrix"), RankLaunch::Threads);
        assert_eq!(
            launch("test-matrix --launch processes --ranks 2"),
            RankLaunch::Processes
        );
    }

    #[test]
    fn bad_command_lines_say_what_is_wrong() {
        let cases = [
            ("test-matrix --ranks two", "`--ranks` takes a whole number, got `two`"),
            ("test-matrix --backend", "`--backend` needs a value"),
            ("test-matrix --jobs 0", "`--jobs` must be at least 1"),
            ("test-matrix --list=yes", "unexpected value `yes`"),
            (
                "test-matrix --frobnicate",
                "unknown flag `--frobnicate` for test-matrix",
            ),
            ("bench --fast", "unknown flag `--fast` for bench"),
            (
                "test-matrix --platform tpu",
                "unknown platform `tpu`; platforms: host, cuda",
            ),
            (
                "test-matrix --launch mpi",
                "unknown launch `mpi`; launches: threads, processes",
            ),
            ("frobnicate", "unknown command `frobnicate`"),
            ("", "no command given"),
        ];
        for (line, want) in cases {
            let got = parse_str(line).unwrap_err();
            assert!(got.contains(want), "`{line}`: expected `{want}`, got `{got}`");
        }
    }

    #[test]
    fn help_and_matrix_doc() {
        assert_eq!(parse_str("--help").unwrap(), Command::Help);
        assert_eq!(parse_str("test-matrix -h").unwrap(), Command::Help);
        assert_eq!(
            parse_str("matrix-doc --write").unwrap(),
            Command::MatrixDoc(MatrixDoc { write: true })
        );
    }

    #[test]
    fn launch_takes_the_ranks_and_the_command_after_the_separator() {
        assert_eq!(
            parse_str("launch -n 4 -- worker --layers 2"),
            Ok(Command::Launch(Launch {
                ranks: 4,
                port: None,
                command: vec!["worker".into(), "--layers".into(), "2".into()],
            }))
        );
        assert!(parse_str("launch -n 2").unwrap_err().contains("COMMAND"));
        assert!(parse_str("launch -- worker").unwrap_err().contains("-n N"));
    }
}
