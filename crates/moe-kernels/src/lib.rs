//! moe-kernels: the CUDA side of moe-a2a.
//!
//! | piece | where | needs |
//! |---|---|---|
//! | kernel sources (`kernels/*.cu`, `*.cuh`), specializations, NVRTC options | [`source`] | nothing |
//! | whether GPUs / NVRTC are present, and why not | [`probe`] | nothing |
//! | how many SMs the communication kernels take, per device | [`launch`] | nothing |
//! | NVRTC compilation, the process's PTX cache | `nvrtc` | `cuda` feature, libnvrtc at run time |
//! | the driver-error mapper and the per-thread count of driver allocations | `driver` | `cuda` feature |
//! | one GPU: context, stream, the process's loaded-module cache, kernel launchers | `device` | `cuda` feature, a GPU |
//! | `cuMemAlloc` device buffers (workspaces, device tensors) and host-mapped words | `buffer` | `cuda` feature, a GPU |
//! | the kernels' status word and the errors its codes stand for | `status` | `cuda` feature, a GPU |
//! | device addresses of a call's tensors, tensors over device buffers and workspaces | `tensor` | `cuda` feature, a GPU |
//! | the CUDA platform: a GPU per rank, which pairs have peer access, symmetric workspaces, the device handle of GPU ranks | `world` | `cuda` feature, GPUs |
//! | the one-sided protocol kernels' parameters and launchers | `one_sided` | `cuda` feature, GPUs |
//! | the two-sided protocol kernels' parameters and launchers | `two_sided` | `cuda` feature, GPUs |
//! | the diagonal reference experts on the GPU, reading device tensors in place | `experts` | `cuda` feature, a GPU |
//! | received slots into device-resident Standard tensors | `deliver` | `cuda` feature, GPUs |
//! | allgather-rs's kernels: routing, EP masking, f32 widening and narrowing | `gather` | `cuda` feature, GPUs |
//! | an NCCL communicator on device addresses, with bounded, abortable waits | `nccl` | `cuda` feature, GPUs |
//! | received Standard rows into device-resident BatchedExperts tensors, and the sum back | `batched` | `cuda` feature, a GPU |
//!
//! Kernels are CUDA C with no toolkit header, compiled at run time for the device's
//! architecture (`sm_90a` on Hopper) and specialized on what matters (scheme, hidden size,
//! input dtype). The quantization kernels are bit-exact with `moe-quant` (docs/QUANT_SPEC.md).
//! The `cuda` feature uses cudarc with a fixed CUDA 13.0 API level and dynamic loading, so it
//! builds on machines without CUDA.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bench_env;
#[cfg(feature = "cuda")]
mod cache;
mod error;
pub mod launch;
pub mod peer_call;
pub mod probe;
pub mod source;

#[cfg(feature = "cuda")]
pub mod batched;
#[cfg(feature = "cuda")]
pub mod buffer;
#[cfg(feature = "cuda")]
pub mod collectives;
#[cfg(feature = "cuda")]
pub mod deliver;
#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod driver;
#[cfg(feature = "cuda")]
pub mod experts;
#[cfg(feature = "cuda")]
pub mod gather;
#[cfg(feature = "cuda")]
pub mod nccl;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
pub mod one_sided;
#[cfg(feature = "cuda")]
pub mod status;
#[cfg(feature = "cuda")]
pub mod tensor;
#[cfg(feature = "cuda")]
pub mod two_sided;
#[cfg(feature = "cuda")]
pub mod vmm;
#[cfg(feature = "cuda")]
pub mod world;

pub use error::KernelError;

/// The CUDA bindings this crate builds on (driver, NVRTC, NCCL), loaded at run time.
#[cfg(feature = "cuda")]
pub use cudarc;
