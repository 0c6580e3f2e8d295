//! The platform a rank runs on, as the backends see it.

use std::fmt;

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
}

impl RankContext {
    /// The platform kind.
    pub fn kind(&self) -> PlatformKind {
        match self {
            RankContext::Host(_) => PlatformKind::Host,
        }
    }

    /// The host handle, for backends' host protocol implementations.
    pub fn host(&self, backend: &str) -> crate::error::Result<&HostRank> {
        match self {
            RankContext::Host(h) => Ok(h),
            #[allow(unreachable_patterns)]
            other => Err(crate::error::MoeError::Unsupported(format!(
                "backend `{backend}` has no implementation for the {} platform",
                other.kind()
            ))),
        }
    }

    /// This rank's index in the world.
    pub fn rank(&self) -> usize {
        match self {
            RankContext::Host(h) => h.rank(),
        }
    }

    /// Number of ranks in the world.
    pub fn world_size(&self) -> usize {
        match self {
            RankContext::Host(h) => h.world_size(),
        }
    }
}
