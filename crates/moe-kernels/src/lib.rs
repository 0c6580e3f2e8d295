//! moe-kernels: the CUDA side of moe-a2a.
//!
//! This crate will hold the CUDA C / inline PTX sources of the dispatch, combine and
//! quantization kernels, their NVRTC compilation and per-device cache, and the CUDA platform
//! (a context and stream per rank, peer-mapped symmetric workspaces from `cuMemAlloc`, NCCL
//! communicators). The host platform in `moe-core` already runs the same protocols with the
//! same layouts, so the kernels slot in behind the existing contract.
//!
//! Today it provides the build switch only: the `cuda` feature pulls in `cudarc` with a fixed
//! CUDA 13.0 API level and dynamic loading, so `cargo check --features cuda` builds on machines
//! without the CUDA toolkit and CI proves the GPU dependency set stays buildable.
#![forbid(unsafe_code)]

/// The CUDA bindings this crate builds on (driver, NVRTC, NCCL), loaded at run time.
#[cfg(feature = "cuda")]
pub use cudarc;

/// Whether this build includes the CUDA platform.
pub const fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

#[cfg(test)]
mod tests {
    #[test]
    fn cuda_switch_follows_the_feature() {
        assert_eq!(super::cuda_compiled(), cfg!(feature = "cuda"));
    }
}
