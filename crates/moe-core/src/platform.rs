//! The platform a rank runs on, as the backends see it.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use crate::error::{MoeError, Result};
use crate::host::HostRank;

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
/// host tensors); the device handle is the GPU platform's, type-erased so that moe-core does not
/// depend on CUDA (backends downcast it to `moe_kernels::world::CudaWorldRank`).
#[derive(Clone)]
pub struct CudaRank {
    host: HostRank,
    device: Arc<dyn Any + Send + Sync>,
}

impl fmt::Debug for CudaRank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaRank")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl CudaRank {
    /// A GPU rank with its control-plane host rank and the GPU platform's handle.
    pub fn new(host: HostRank, device: Arc<dyn Any + Send + Sync>) -> Self {
        CudaRank { host, device }
    }

    /// The control-plane rank.
    pub fn host(&self) -> &HostRank {
        &self.host
    }

    /// The GPU platform's handle, if it is a `T`.
    pub fn device<T: Any>(&self) -> Option<&T> {
        self.device.downcast_ref::<T>()
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
