//! `cargo xtask gpu-bundle`: builds the GPU test binaries in release mode into one
//! self-contained folder with a `run.sh` (every GPU test) and a `sanitize.sh`
//! (compute-sanitizer memcheck and racecheck on a representative subset), small enough to copy to a GPU host that has no Rust
//! toolchain (the device tool carries at most 64 MiB).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// Where the bundle is written (ignored by git).
pub const BUNDLE_DIR: &str = "gpu-bundle";

/// The most the device tool carries.
const MAX_BUNDLE_BYTES: u64 = 64 << 20;

const RUN_SH: &str = r#"#!/usr/bin/env bash
# Runs every GPU test binary of this bundle. Extra arguments go to each binary (libtest flags,
# e.g. a name filter). MOE_REQUIRE_GPU=1: a missing GPU or NVRTC is a failure, not a skip.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
# Never use NVLink multicast: it can take a shared host's GPUs down.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MOE_REQUIRE_GPU=1 MOE_REQUIRE_NVRTC=1
# Load kernels when modules load, never lazily at a launch that peers may be waiting on.
export CUDA_MODULE_LOADING=EAGER
nvidia-smi -L || true
status=0
for t in bin/*; do
    echo "=== $t"
    "$t" "$@" || status=1
done
exit $status
"#;

const SANITIZE_SH: &str = r#"#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck on a representative subset: the quantization kernel
# (nvfp4, the most involved scheme) and the one-sided protocol on 2 GPUs (dispatch + combine,
# two calls). Exits non-zero on any reported error or hazard.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export MOE_REQUIRE_GPU=1 MOE_REQUIRE_NVRTC=1 CUDA_MODULE_LOADING=EAGER
sanitizer="${COMPUTE_SANITIZER:-/usr/local/cuda/bin/compute-sanitizer}"
status=0
for tool in memcheck racecheck; do
    for run in "gpu_quant nvfp4 hidden=7168 in=bf16" "gpu_one_sided top1" "gpu_one_sided deepseek-v3"; do
        bin="${run%% *}"
        filter="${run#* }"
        echo "=== $tool: $bin '$filter'"
        "$sanitizer" --tool "$tool" --error-exitcode 9 bin/"$bin"-* "$filter" || status=1
    done
done
exit $status
"#;

/// Builds the bundle.
pub fn run() -> Result<ExitCode, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = Command::new(&cargo)
        .args([
            "test",
            "--release",
            "-p",
            "moe-kernels",
            "-p",
            "backend-nvlink-one-sided",
            "--features",
            "moe-kernels/cuda,backend-nvlink-one-sided/cuda",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {cargo}: {e}"))?;
    if !out.status.success() {
        return Err("building the GPU test binaries failed".to_string());
    }
    let executables = executables(&String::from_utf8_lossy(&out.stdout));
    if executables.is_empty() {
        return Err("cargo reported no test executables".to_string());
    }
    let dir = Path::new(BUNDLE_DIR);
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| format!("clearing {BUNDLE_DIR}: {e}"))?;
    }
    fs::create_dir_all(dir.join("bin")).map_err(|e| format!("creating {BUNDLE_DIR}/bin: {e}"))?;
    let mut total = 0;
    for exe in &executables {
        let name = exe
            .file_name()
            .ok_or_else(|| format!("{} has no file name", exe.display()))?;
        let dst = dir.join("bin").join(name);
        total += fs::copy(exe, &dst).map_err(|e| format!("copying {}: {e}", exe.display()))?;
    }
    for (name, text) in [("run.sh", RUN_SH), ("sanitize.sh", SANITIZE_SH)] {
        let path = dir.join(name);
        fs::write(&path, text).map_err(|e| format!("writing {name}: {e}"))?;
        make_executable(&path)?;
    }
    println!(
        "gpu-bundle: {} test binaries, {:.1} MiB, in {BUNDLE_DIR}/ (run: bash {BUNDLE_DIR}/run.sh)",
        executables.len(),
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
    fn executables_are_read_from_cargo_messages() {
        let messages = concat!(
            "{\"reason\":\"compiler-artifact\",\"executable\":null}\n",
            "{\"reason\":\"compiler-artifact\",\"executable\":\"/t/release/deps/gpu_quant-1a\",\"fresh\":true}\n",
            "{\"reason\":\"build-finished\",\"success\":true}\n"
        );
        assert_eq!(executables(messages), [PathBuf::from("/t/release/deps/gpu_quant-1a")]);
    }
}
