//! The platform a rank runs on, as the backends see it.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use crate::error::{MoeError, Result};
use crate::host::HostRank;
use crate::tensor::{DType, Tensor};

/// Kinds of platform a backend can declare support for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PlatformKind {
    /// Ranks are threads of one process; workspaces are ordinary memory.
    Host,
    /// One NVIDIA GPU per rank; workspaces are peer-mapped device memory.
    Cuda,
}

impl PlatformKind {
    /// Short name used in the matrix and in messages.
    pub const fn name(self) -> &'static str {
        match self {
            PlatformKind::Host => "host",
            PlatformKind::Cuda => "cuda",
        }
    }
}

impl fmt::Display for PlatformKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One rank's handle to its platform, passed to backend constructors.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum RankContext {
    Host(HostRank),
    Cuda(CudaRank),
}

/// A rank on a GPU. The host rank carries the control plane (barriers, exchanging workspace
/// addresses and communicator ids at construction, and the layer runner's group operations on
/// host tensors); the device handle is the GPU platform's ([`GpuRank`]: what the layer runner
/// needs for device tensors), otherwise type-erased so that moe-core does not depend on CUDA
/// (backends downcast it to `moe_kernels::world::CudaWorldRank` with [`CudaRank::device`]).
#[derive(Clone)]
pub struct CudaRank {
    host: HostRank,
    device: Arc<dyn GpuRank>,
}

impl fmt::Debug for CudaRank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaRank")
            .field("host", &self.host)
            .field("gpu", &self.device.ordinal())
            .finish_non_exhaustive()
    }
}

impl CudaRank {
    /// A GPU rank with its control-plane host rank and the GPU platform's handle.
    pub fn new(host: HostRank, device: Arc<dyn GpuRank>) -> Self {
        CudaRank { host, device }
    }

    /// The control-plane rank.
    pub fn host(&self) -> &HostRank {
        &self.host
    }

    /// The GPU platform's handle, if it is a `T`.
    pub fn device<T: Any>(&self) -> Option<&T> {
        self.device.as_any().downcast_ref::<T>()
    }

    /// What the layer runner uses of the GPU platform.
    pub fn gpu(&self) -> &Arc<dyn GpuRank> {
        &self.device
    }
}

/// What the layer runner (`MoeLayer::forward`) needs of a GPU platform for device tensors:
/// memory on the rank's GPU and the collectives of the parallel wrapping, on the rank's stream.
/// The CUDA platform's rank handle (`moe_kernels::world::CudaWorldRank`) implements it over
/// NCCL; a platform of an engine's own would implement it over its communicator.
pub trait GpuRank: Any + Send + Sync + fmt::Debug {
    /// The handle itself, for [`CudaRank::device`]'s downcast.
    fn as_any(&self) -> &dyn Any;
    /// The ordinal of the GPU this rank's device tensors live on.
    fn ordinal(&self) -> usize;
    /// A new zeroed tensor on this rank's GPU (allocates and may wait for the rank's stream:
    /// not for a call's path).
    fn zeros(&self, dtype: DType, shape: &[usize]) -> Result<Tensor>;
    /// Readies the collectives below over `group` (world ranks, this rank among them), once per
    /// group: collective over the group through `host`, bounded by its timeout. Where they
    /// cannot run (ranks of the group sharing a GPU, which NCCL refuses), it succeeds on every
    /// member alike, and the collectives over the group fail saying why.
    fn join_group(&self, host: &HostRank, group: &[usize]) -> Result<()>;
    /// Whether the collectives over `group` can run: a group of one rank, or one this rank
    /// joined whose collectives exist; otherwise the error they would fail with.
    fn collectives(&self, group: &[usize]) -> Result<()>;
    /// Sums `t` (on this rank's GPU) element-wise over `group` in place, in its dtype, enqueued
    /// on the rank's stream. Collective over the group.
    fn all_reduce_sum(&self, group: &[usize], t: &Tensor) -> Result<()>;
    /// Gives every member of `group` the rows `rows[m]` of member `m`'s `out` (a row range per
    /// member, in group order, together covering `out`), enqueued on the rank's stream.
    /// Collective over the group.
    fn all_gather_rows(&self, group: &[usize], rows: &[std::ops::Range<usize>], out: &Tensor) -> Result<()>;
    /// Copies host tensor `src` into `dst` (on this rank's GPU, the same dtype and shape),
    /// ordered after the rank's stream's earlier work; returns when the copy is done (for
    /// set-up and tests, not a call's path).
    fn copy_to_device(&self, src: &Tensor, dst: &Tensor) -> Result<()>;
    /// A copy of host tensor `src` on this rank's GPU (allocates and waits: set-up and tests).
    fn upload(&self, src: &Tensor) -> Result<Tensor> {
        let t = self.zeros(src.dtype(), src.shape())?;
        self.copy_to_device(src, &t)?;
        Ok(t)
    }
}

impl RankContext {
    /// The platform kind.
    pub fn kind(&self) -> PlatformKind {
        match self {
            RankContext::Host(_) => PlatformKind::Host,
            RankContext::Cuda(_) => PlatformKind::Cuda,
        }
    }

    /// The host handle, for backends' host protocol implementations.
    pub fn host(&self, backend: &str) -> Result<&HostRank> {
        match self {
            RankContext::Host(h) => Ok(h),
            other => Err(MoeError::Unsupported(format!(
                "backend `{backend}` has no implementation for the {} platform",
                other.kind()
            ))),
        }
    }

    /// The rank that carries barriers and the runner's group operations, on every platform.
    pub fn control(&self) -> &HostRank {
        match self {
            RankContext::Host(h) => h,
            RankContext::Cuda(c) => c.host(),
        }
    }

    /// This rank's index in the world.
    pub fn rank(&self) -> usize {
        self.control().rank()
    }

    /// Number of ranks in the world.
    pub fn world_size(&self) -> usize {
        self.control().world_size()
    }
}
