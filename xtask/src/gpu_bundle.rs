//! `cargo xtask gpu-bundle`: builds the GPU test binaries in release mode into one
//! self-contained folder with a `run.sh` (every GPU test), a `sanitize.sh` (compute-sanitizer
//! memcheck and racecheck on a representative subset) and a `bench.sh` (the GPU benchmarks and
//! the NCCL baseline from `../shared/baselines`), small enough to copy to a GPU host that has no Rust
//! toolchain (the device tool carries at most 64 MiB).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// Where the bundle is written (ignored by git).
pub const BUNDLE_DIR: &str = "gpu-bundle";

/// The most the device tool carries.
const MAX_BUNDLE_BYTES: u64 = 64 << 20;

const RUN_SH: &str = r#"#!/usr/bin/env bash
# Runs every GPU test binary of this bundle, then the test matrix on this machine's GPUs, then
# the Python package's GPU checks where its wheel was carried. Extra arguments go to each test
# binary (libtest flags, e.g. a name filter) and skip the rest. MOE_REQUIRE_GPU=1: a missing GPU
# or NVRTC is a failure, not a skip.
# For a bounded session on a lent machine: MOE_RUN_DEADLINE=S starts no step after S seconds and
# stops a step at S; MOE_RUN_LOGS=DIR keeps each step's whole output in DIR/gpu-logs.tar.gz (one
# file, for tools that bring back few) and prints only its summary lines.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
# Never use NVLink multicast: it can take a shared host's GPUs down.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MOE_REQUIRE_GPU=1 MOE_REQUIRE_NVRTC=1
# Load kernels when modules load, never lazily at a launch that peers may be waiting on.
export CUDA_MODULE_LOADING=EAGER
# MOE_SHARE_GPUS=1 runs the peer-memory protocols' tests and matrix cells with ranks sharing
# GPUs where there are fewer GPUs than ranks; their streams then need a hardware queue each.
[[ "${MOE_SHARE_GPUS:-0}" == 1 ]] && export CUDA_DEVICE_MAX_CONNECTIONS=32
nvidia-smi -L || true
status=0
logs=""
if [[ -n "${MOE_RUN_LOGS:-}" ]]; then
    logs=$(mktemp -d)
    # Packed after every step too: a run killed from outside (a lent machine's time limit)
    # runs no EXIT trap, and keeps what its finished steps logged.
    trap 'tar czf "$MOE_RUN_LOGS/gpu-logs.tar.gz" -C "$logs" .' EXIT
fi
# step NAME COMMAND...: runs one step within the deadline, its output whole or summarized.
step() {
    local name=$1
    shift
    local bound=()
    if [[ -n "${MOE_RUN_DEADLINE:-}" ]]; then
        local left=$((MOE_RUN_DEADLINE - SECONDS))
        if ((left <= 0)); then
            echo "=== $name: not started, MOE_RUN_DEADLINE=${MOE_RUN_DEADLINE} s passed"
            status=1
            return
        fi
        bound=(timeout --kill-after=5 "$left")
    fi
    echo "=== $name"
    local code=0
    if [[ -n "$logs" ]]; then
        "${bound[@]}" "$@" >"$logs/$name.log" 2>&1 || code=$?
        grep -E '^test result|FAILED|panicked|^cells|executed|every check passed|^\| nvlink' "$logs/$name.log" | head -20
        tar czf "$MOE_RUN_LOGS/gpu-logs.tar.gz" -C "$logs" .
    else
        "${bound[@]}" "$@" || code=$?
    fi
    if ((code != 0)); then
        echo "=== $name: exit $code, ${SECONDS} s into the run"
        status=1
    fi
}
for t in bin/*; do
    step "$(basename "$t")" "$t" "$@"
done
if [[ $# -eq 0 ]]; then
    step test-matrix-threads matrix/xtask test-matrix --platform cuda
    # One process per rank, each on LOCAL_RANK's GPU (shared with MOE_SHARE_GPUS=1), workspaces
    # exported and mapped across the processes. No MPS daemon is needed: the processes' kernels
    # take turns on a shared GPU and every wait is bounded (docs/GPU_RUNS.md).
    step test-matrix-processes matrix/xtask test-matrix --platform cuda --launch processes --ranks 2
    # The Python package, where a wheel built with the GPU platform (`maturin build --features
    # cuda --out python/dist`) was carried beside the bundle and PyTorch is installed: the
    # PyTorch check, and Python's host cost on PyTorch's default stream and on a side stream.
    wheel=$(ls ../python/dist/*.whl 2>/dev/null | head -1)
    if [[ -n "$wheel" ]] && python3 -c "import torch" 2>/dev/null; then
        pylib=$(mktemp -d)
        pip install -q --no-index --no-deps --target "$pylib" "$wheel" >/dev/null 2>&1
        step python-torch env PYTHONPATH="$pylib" python3 ../python/tests/test_gpu_torch.py
        step python-host-cost env PYTHONPATH="$pylib" python3 ../python/benches/host_cost.py --gpu
        step python-host-cost-side-stream env PYTHONPATH="$pylib" python3 ../python/benches/host_cost.py --gpu --side-stream
    else
        echo "=== python: skipped (no wheel in ../python/dist, or no PyTorch)"
    fi
fi
exit $status
"#;

const SANITIZE_SH: &str = r#"#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck on a representative subset: the quantization kernel
# (nvfp4, the most involved scheme, also at a hidden size ending in a half unit with unaligned
# rows; fp8-per-token at a ragged size, its token-wide amax pass), the CUDA reference experts (nvfp4, swizzled scales), the
# BatchedExperts delivery and reduction (nvfp4, swizzled scales, 3 local experts), the
# one- and two-sided protocols on 2 GPUs (dispatch + combine, two calls; and the device-tensor
# path with its delivery kernel, nvfp4) and allgather-rs (NCCL, nvfp4: host tensors, and the
# device-tensor path with its gather kernels). Exits non-zero on any reported error or hazard.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MOE_REQUIRE_GPU=1 MOE_REQUIRE_NVRTC=1 CUDA_MODULE_LOADING=EAGER
sanitizer="${COMPUTE_SANITIZER:-/usr/local/cuda/bin/compute-sanitizer}"
# With one GPU the peer-memory protocols' ranks share it (as run.sh's MOE_SHARE_GPUS=1 does);
# NCCL refuses two ranks on one GPU, so allgather-rs's runs then wait for a machine with two.
# The sanitizer at times runs one rank's kernel to its end before the other's starts, so a
# trial whose ranks wait on each other can time out there: on one GPU only the sanitizer's
# own findings (its exit code 9) count for those runs, and a timed-out trial is reported.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if (( gpus < 2 )); then
    export MOE_SHARE_GPUS=1 CUDA_DEVICE_MAX_CONNECTIONS=32 MOE_TIMEOUT_MS=30000
fi
status=0
for tool in memcheck racecheck; do
    for run in "gpu_quant nvfp4 hidden=7168 in=bf16" "gpu_quant nvfp4 hidden=48 in=fp16" \
        "gpu_quant fp8-per-token hidden=100 in=bf16" "gpu_one_sided top1" "gpu_one_sided deepseek-v3" \
        "gpu_two_sided top1" "gpu_two_sided deepseek-v3" \
        "gpu_experts nvfp4+swizzled" "gpu_batched nvfp4+swizzled experts=3" "gpu_device_path nvfp4 --skip allgather-rs" \
        "gpu_allgather nvfp4" "gpu_device_path allgather-rs nvfp4" "gpu_deliver standard_delivery"; do
        bin="${run%% *}"
        filter="${run#* }"
        # The test binary's arguments: a filter (up to a --skip) and, after it, a name to skip.
        args=("${filter%% --skip *}")
        [[ "$filter" == *" --skip "* ]] && args+=(--skip "${filter##* --skip }")
        echo "=== $tool: $bin ${args[*]}"
        if (( gpus < 2 )) && [[ "$bin" == gpu_allgather || "$filter" == allgather-rs* ]]; then
            echo "skipped: NCCL needs a GPU per rank, this machine has $gpus"
            continue
        fi
        # NCCL probes kernels built for other architectures (cudaFuncGetAttributes returns
        # "no kernel image" for them, which NCCL expects); report memory errors, not those.
        api=()
        [[ "$bin" == gpu_allgather || "$filter" == allgather-rs* ]] && api=(--report-api-errors no)
        "$sanitizer" --tool "$tool" "${api[@]}" --error-exitcode 9 bin/"$bin"-* "${args[@]}"
        code=$?
        if (( code != 0 && code != 9 && gpus < 2 )) && [[ "$bin" == gpu_one_sided || "$bin" == gpu_two_sided || "$bin" == gpu_device_path ]]; then
            echo "inconclusive: a trial failed with ranks sharing the GPU under the sanitizer (exit $code), which reported no error"
        elif (( code != 0 )); then
            status=1
        fi
    done
done
exit $status
"#;

const BENCH_SH: &str = r#"#!/usr/bin/env bash
# The GPU benchmark (backends, the NCCL baseline through cudarc and the peer-copy ceiling in one
# run), then the same NCCL all-to-all-v through PyTorch as a cross-check of the baseline.
# Benchmark binaries of older commits copied into old-bench/ after the bundle was built (cargo
# bench --no-run at that commit) run in turns with this bundle's gpu_a2a, twice, so that old and
# new are measured in one run on one machine, as docs/BENCHMARKS.md compares them.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_MODULE_LOADING=EAGER
nvidia-smi -L || true
status=0
for b in bench/*; do
    echo "=== $b"
    "$b" || status=1
done
old=(old-bench/*)
if [[ -e "${old[0]}" ]]; then
    for round in 1 2; do
        for b in "${old[@]}" bench/gpu_a2a-*; do
            echo "=== $b, round $round"
            "$b" || status=1
        done
    done
fi
if [[ -f nccl_torch_a2a.py ]]; then
    echo "=== NCCL baseline (shared/baselines/nccl_torch_a2a.py)"
    python3 nccl_torch_a2a.py || status=1
fi
exit $status
"#;

/// Where the NCCL baseline script lives, beside the checkout.
const NCCL_BASELINE: &str = "../shared/baselines/nccl_torch_a2a.py";

/// Runs `cargo <verb> ...` (`test` or `bench` with `--no-run`, or `build`; release profile)
/// and returns the executables it built.
fn build(cargo: &str, verb: &str, packages: &[&str], features: &str) -> Result<Vec<PathBuf>, String> {
    let mut args = vec![verb];
    if verb != "bench" {
        // `cargo bench` builds with the release profile already and takes no --release.
        args.push("--release");
    }
    for p in packages {
        args.extend(["-p", p]);
    }
    if !features.is_empty() {
        args.extend(["--features", features]);
    }
    if verb != "build" {
        args.push("--no-run");
    }
    args.push("--message-format=json-render-diagnostics");
    let out = Command::new(cargo)
        .args(&args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {cargo}: {e}"))?;
    if !out.status.success() {
        return Err(format!("`cargo {}` failed", args.join(" ")));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    // `cargo bench` also builds each library's unit tests, `cargo build` the libraries: keep
    // the benchmark and binary targets only.
    let messages: String = stdout
        .lines()
        .filter(|l| match verb {
            "bench" => l.contains("\"kind\":[\"bench\"]"),
            "build" => l.contains("\"kind\":[\"bin\"]"),
            _ => true,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let exes = executables(&messages);
    if exes.is_empty() {
        return Err(format!("`cargo {}` reported no executables", args.join(" ")));
    }
    Ok(exes)
}

/// Copies `exes` into `dir`; returns the bytes copied.
fn copy_into(dir: &Path, exes: &[PathBuf]) -> Result<u64, String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut total = 0;
    for exe in exes {
        let name = exe
            .file_name()
            .ok_or_else(|| format!("{} has no file name", exe.display()))?;
        total += fs::copy(exe, dir.join(name)).map_err(|e| format!("copying {}: {e}", exe.display()))?;
    }
    Ok(total)
}

/// Runs the GPU benchmarks here (the backends' `gpu_a2a`, then the quantization kernel's
/// `gpu_quantize`), with NVLink multicast off, kernels loaded eagerly and NVRTC from the CUDA
/// install when it is where the GPU hosts have it.
pub fn bench() -> Result<ExitCode, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let nvrtc = "/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64";
    let library_path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{nvrtc}:{p}"),
        _ => nvrtc.to_string(),
    };
    let mut all_passed = true;
    for (package, bench) in [("moe-a2a", "gpu_a2a"), ("moe-kernels", "gpu_quantize")] {
        let status = Command::new(&cargo)
            .args(["bench", "-p", package, "--features", "cuda", "--bench", bench])
            .env("NCCL_NVLS_ENABLE", "0")
            .env("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
            .env("NVSHMEM_DISABLE_NVLS", "1")
            .env("CUDA_MODULE_LOADING", "EAGER")
            .env("LD_LIBRARY_PATH", &library_path)
            .status()
            .map_err(|e| format!("running {cargo}: {e}"))?;
        all_passed &= status.success();
    }
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Builds the bundle.
pub fn run() -> Result<ExitCode, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let features = "moe-kernels/cuda,backend-nvlink-one-sided/cuda,backend-nvlink-two-sided/cuda,backend-allgather-rs/cuda,moe-a2a/cuda";
    let mut tests = build(
        &cargo,
        "test",
        &[
            "moe-kernels",
            "backend-nvlink-one-sided",
            "backend-nvlink-two-sided",
            "backend-allgather-rs",
            "moe-a2a",
        ],
        features,
    )?;
    // The C ABI's GPU test only: its other tests compile C, and GPU hosts may have no compiler.
    let capi = build(&cargo, "test", &["moe-a2a-capi"], "moe-a2a-capi/cuda")?;
    tests.extend(
        capi.into_iter()
            .filter(|exe| exe.file_name().is_some_and(|n| n.to_string_lossy().starts_with("gpu_"))),
    );
    let benches = build(
        &cargo,
        "bench",
        &["moe-a2a", "moe-kernels"],
        "moe-a2a/cuda,moe-kernels/cuda",
    )?;
    // xtask itself, for `test-matrix --platform cuda` (it always has the GPU backends).
    let matrix = build(&cargo, "build", &["xtask"], "")?;
    let dir = Path::new(BUNDLE_DIR);
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| format!("clearing {BUNDLE_DIR}: {e}"))?;
    }
    let mut total = copy_into(&dir.join("bin"), &tests)?;
    total += copy_into(&dir.join("bench"), &benches)?;
    total += copy_into(&dir.join("matrix"), &matrix)?;
    if Path::new(NCCL_BASELINE).exists() {
        total +=
            fs::copy(NCCL_BASELINE, dir.join("nccl_torch_a2a.py")).map_err(|e| format!("copying the baseline: {e}"))?;
    }
    for (name, text) in [("run.sh", RUN_SH), ("sanitize.sh", SANITIZE_SH), ("bench.sh", BENCH_SH)] {
        let path = dir.join(name);
        fs::write(&path, text).map_err(|e| format!("writing {name}: {e}"))?;
        make_executable(&path)?;
    }
    println!(
        "gpu-bundle: {} test and {} benchmark binaries, {:.1} MiB, in {BUNDLE_DIR}/ (bash {BUNDLE_DIR}/run.sh | sanitize.sh | bench.sh)",
        tests.len(),
        benches.len(),
        total as f64 / (1 << 20) as f64
    );
    if total > MAX_BUNDLE_BYTES {
        return Err(format!(
            "the bundle is {total} bytes, over the {MAX_BUNDLE_BYTES}-byte limit"
        ));
    }
    Ok(ExitCode::SUCCESS)
}

fn make_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// The `"executable"` paths of cargo's JSON messages.
fn executables(messages: &str) -> Vec<PathBuf> {
    const KEY: &str = "\"executable\":\"";
    messages
        .lines()
        .filter_map(|line| {
            let start = line.find(KEY)? + KEY.len();
            let end = start + line[start..].find('"')?;
            Some(PathBuf::from(&line[start..end]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundle_scripts_are_bash_without_syntax_errors() {
        for (name, text) in [("run.sh", RUN_SH), ("sanitize.sh", SANITIZE_SH), ("bench.sh", BENCH_SH)] {
            let checked = std::process::Command::new("bash")
                .args(["-n", "-c", text])
                .output()
                .expect("bash runs");
            assert!(
                checked.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&checked.stderr)
            );
        }
    }

    #[test]
    fn executables_are_read_from_cargo_messages() {
        let messages = concat!(
            "{\"reason\":\"compiler-artifact\",\"executable\":null}\n",
            "{\"reason\":\"compiler-artifact\",\"executable\":\"/t/release/deps/gpu_quant-1a\",\"fresh\":true}\n",
            "{\"reason\":\"build-finished\",\"success\":true}\n"
        );
        assert_eq!(executables(messages), [PathBuf::from("/t/release/deps/gpu_quant-1a")]);
    }
}
