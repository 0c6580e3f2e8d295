//! examples/c/moe_layer.c, compiled with the system C compiler against include/moe_a2a.h and
//! this crate's shared library, run as two processes over the TCP rendezvous on 127.0.0.1 for
//! every built-in backend: every rank's checks pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use moe_a2a::control::TcpConfig;
use moe_a2a::harness::processes::finish;

const RANKS: usize = 2;

/// The directory holding this package's shared library: the test binary's own (`deps`, where
/// `cargo test` leaves it), else the profile's (where `cargo build` puts it).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary");
    let deps = exe.parent().expect("the test binary lies in <target>/<profile>/deps");
    [Some(deps), deps.parent()]
        .into_iter()
        .flatten()
        .find(|dir| dir.join("libmoe_a2a_capi.so").exists())
        .unwrap_or_else(|| {
            panic!(
                "no libmoe_a2a_capi.so in {} or its parent: cargo builds it with this package's tests",
                deps.display()
            )
        })
        .to_path_buf()
}

/// Compiles the example with `$CC` (default `cc`) and warnings as errors.
fn compile_example() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let libs = library_dir();
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("moe_layer");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let output = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(root.join("include"))
        .arg(root.join("examples/c/moe_layer.c"))
        .arg("-L")
        .arg(&libs)
        .arg(format!("-Wl,-rpath,{}", libs.display()))
        .args(["-lmoe_a2a_capi", "-lm", "-o"])
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler `{cc}`: {e}"));
    assert!(
        output.status.success(),
        "{cc} failed on examples/c/moe_layer.c:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}

#[test]
fn the_c_example_runs_a_two_rank_layer_across_processes_on_every_backend() {
    let exe = compile_example();
    for backend in moe_a2a::BUILTIN_BACKENDS {
        let port = TcpConfig::free_local_port().expect("a free port");
        let ranks: Vec<_> = (0..RANKS)
            .map(|rank| {
                Command::new(&exe)
                    .arg(backend)
                    .envs(TcpConfig::local_launch_env(port, rank, RANKS, &port.to_string()))
                    .env("MOE_TIMEOUT_MS", "20000")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("starting a rank of the C example")
            })
            .collect();
        for (rank, child) in ranks.into_iter().enumerate() {
            let (ok, out) = finish(child, Duration::from_secs(60));
            assert!(ok, "{backend}, rank {rank} failed:\n{out}");
            for check in ["prepare/finalize via", "runner via"] {
                assert!(
                    out.lines().any(|l| l.contains(check) && l.ends_with(": ok")),
                    "{backend}, rank {rank}: no passing `{check}` line:\n{out}"
                );
            }
            // The registry's refusal reaches C with the library's message.
            if backend != "allgather-rs" {
                assert!(
                    out.contains("MOE_STATUS_UNSUPPORTED")
                        && out.contains("registered backends that accept it: allgather-rs"),
                    "{backend}, rank {rank}: the top_k 64 refusal is missing:\n{out}"
                );
            }
        }
    }
}
