//! Whether GPUs (and NVRTC) are there to run on, with the reason when they are not: GPU tests
//! report that reason as "ignored", and `MOE_REQUIRE_GPU=1` turns the skip into a failure.

/// Set to `1` on GPU machines: a missing GPU then fails the tests instead of skipping them.
pub const REQUIRE_GPU_ENV: &str = "MOE_REQUIRE_GPU";
/// Set to `1` to run protocol tests of more ranks than the machine has GPUs with ranks sharing
/// GPUs (rank `r` on GPU `r % count`, with `CUDA_DEVICE_MAX_CONNECTIONS=32`: see
/// [`rank_devices`]): it checks the kernels and the protocols on one GPU, not the paths between
/// GPUs. Tests through NCCL still need a GPU per rank.
pub const SHARE_GPUS_ENV: &str = "MOE_SHARE_GPUS";
/// Set to `1` where NVRTC must be present (CI installs it): compile tests then fail without it.
pub const REQUIRE_NVRTC_ENV: &str = "MOE_REQUIRE_NVRTC";

/// Number of CUDA devices, or why there are none to use.
pub fn gpu_count() -> Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only tries to dlopen libcuda by name; no driver function is called.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("no NVIDIA driver (libcuda.so) on this machine".to_string());
        }
        match cudarc::driver::CudaContext::device_count() {
            Ok(n) if n > 0 => Ok(n as usize),
            Ok(_) => Err("the NVIDIA driver reports no devices".to_string()),
            Err(e) => Err(format!("the NVIDIA driver failed to count devices: {e}")),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("built without the `cuda` feature (cargo test --features cuda)".to_string())
    }
}

/// Whether NVRTC can compile here, or why not.
pub fn nvrtc_status() -> Result<(), String> {
    #[cfg(feature = "cuda")]
    {
        if crate::nvrtc::nvrtc_available() {
            Ok(())
        } else {
            Err("libnvrtc.so.13 not found (pip install nvidia-cuda-nvrtc==13.0.88 and add its lib folder to LD_LIBRARY_PATH)".to_string())
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("built without the `cuda` feature (cargo test --features cuda)".to_string())
    }
}

/// Whether the environment variable `name` is set to `1`.
pub fn required(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// Why GPU tests that need `gpus` devices cannot run here, or `None` when they can. With
/// `MOE_REQUIRE_GPU=1` it is `None` (the tests then run and fail with the reason instead of
/// being skipped), except where `MOE_SHARE_GPUS=1` says the machine has fewer GPUs on purpose:
/// a test that needs a GPU per rank is then skipped on a machine with at least one.
pub fn gpu_skip_reason(gpus: usize) -> Option<String> {
    match gpu_count() {
        Ok(n) if n >= gpus => None,
        Ok(n) if required(SHARE_GPUS_ENV) => Some(format!(
            "needs a GPU for each of its {gpus} ranks, this machine has {n} ({SHARE_GPUS_ENV}=1)"
        )),
        _ if required(REQUIRE_GPU_ENV) => None,
        Ok(n) => Some(format!("needs {gpus} GPUs, this machine has {n}")),
        Err(reason) => Some(reason),
    }
}

/// Why a protocol test of `ranks` ranks cannot run here, or `None` when it can: as
/// [`gpu_skip_reason`], except that with `MOE_SHARE_GPUS=1` one GPU is enough (see
/// [`rank_devices`]).
pub fn ranks_skip_reason(ranks: usize) -> Option<String> {
    if required(SHARE_GPUS_ENV) {
        gpu_skip_reason(1)
    } else {
        gpu_skip_reason(ranks)
    }
}

/// The hardware queues a GPU gives a process's streams; `CUDA_DEVICE_MAX_CONNECTIONS` sets
/// it (8 by default).
const CONNECTIONS_ENV: &str = "CUDA_DEVICE_MAX_CONNECTIONS";
/// The most hardware queues CUDA gives a process on one GPU.
const MAX_CONNECTIONS: usize = 32;

/// The GPU of each of `ranks` ranks for a protocol test: rank `r` on GPU `r`, or on GPU
/// `r % count` with `MOE_SHARE_GPUS=1` where the machine has fewer than `ranks`.
///
/// Ranks sharing a GPU wait for each other, so their streams must not share a hardware queue
/// (a kernel waiting for a peer would hold back the peer's kernel queued behind it): sharing
/// needs `CUDA_DEVICE_MAX_CONNECTIONS=32`. With the default 8, 8 ranks on one H200 timed out
/// where 32 passed.
pub fn rank_devices(ranks: usize) -> Result<Vec<usize>, String> {
    let count = gpu_count()?;
    if count < ranks {
        if !required(SHARE_GPUS_ENV) {
            return Err(format!(
                "{ranks} ranks need {ranks} GPUs, this machine has {count} (set {SHARE_GPUS_ENV}=1 to put several ranks on a GPU)"
            ));
        }
        let connections = std::env::var(CONNECTIONS_ENV)
            .ok()
            .and_then(|v| v.parse::<usize>().ok());
        if connections != Some(MAX_CONNECTIONS) {
            return Err(format!(
                "{ranks} ranks sharing {count} GPU(s) need {CONNECTIONS_ENV}={MAX_CONNECTIONS} (it is {}): their streams must not share a hardware queue, or a kernel waiting for a peer holds back the peer's kernel behind it",
                connections.map_or("unset, 8".to_string(), |c| c.to_string())
            ));
        }
    }
    Ok((0..ranks).map(|r| r % count).collect())
}

/// The GPU of a rank that is a process of its own, `local_rank` of the `local_ranks` processes
/// of its host: GPU `local_rank`, as launchers assign them; or, with `MOE_SHARE_GPUS=1` on a
/// host with fewer GPUs than processes, GPU `local_rank % gpus`. Kernels of several processes
/// run at the same time on one GPU only under the CUDA MPS daemon (docs/GPU_RUNS.md).
pub fn process_device(local_rank: usize, local_ranks: usize) -> Result<usize, String> {
    let count = gpu_count()?;
    if count == 0 {
        return Err("this host has no GPU".to_string());
    }
    if local_rank < count {
        return Ok(local_rank);
    }
    if !required(SHARE_GPUS_ENV) {
        return Err(format!(
            "local rank {local_rank} of {local_ranks} needs GPU {local_rank}, this host has {count} (set {SHARE_GPUS_ENV}=1 to put several ranks on a GPU)"
        ));
    }
    Ok(local_rank % count)
}

/// The name a GPU trial is listed under: `name`, and where the trial is skipped (`skip`, a
/// reason from [`gpu_skip_reason`] or [`ranks_skip_reason`]) the reason, so that a listing says
/// why the trial is ignored.
pub fn trial_label(name: String, skip: Option<&str>) -> String {
    match skip {
        Some(reason) => format!("{name} [ignored: {reason}]"),
        None => name,
    }
}
