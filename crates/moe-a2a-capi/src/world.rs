//! `MoeWorld`: this process's rank in a world of processes joined over the TCP control plane,
//! with workspaces in memory the processes of a host share.

use std::ffi::c_char;
use std::sync::Arc;
use std::time::Duration;

use moe_a2a::RankContext;
use moe_a2a::control::{ControlPlane, TcpConfig, TcpControlPlane};
use moe_a2a::host::HostRank;
use moe_a2a::shm::MemfdMemory;

use crate::status::{Failure, MoeStatus, guarded};
use crate::types::{borrowed, c_str, free, give};

/// This process's rank in a world (opaque; `moe_world_from_env`, `moe_world_connect`).
#[derive(Debug)]
pub struct MoeWorld {
    rank: HostRank,
}

/// Where rank 0 listens and who this process is, for `moe_world_connect`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MoeTcpOptions {
    /// Rank 0's address (host name or IP), NUL-terminated.
    pub master_addr: *const c_char,
    /// Rank 0's port, 1 to 65535.
    pub master_port: u32,
    pub rank: u32,
    pub world_size: u32,
    /// This rank's index among the ranks of its host.
    pub local_rank: u32,
    /// Ranks on this rank's host.
    pub local_world_size: u32,
    /// Tells this run's ranks from another run's that reach the same address (0: none).
    pub run_id: u64,
    /// The bound of every wait, in milliseconds (0: 20 s).
    pub timeout_ms: u64,
}

impl MoeWorld {
    /// Joins the world `config` describes (collective: every rank joins).
    pub fn connect(config: &TcpConfig) -> moe_a2a::Result<MoeWorld> {
        let plane: Arc<dyn ControlPlane> = Arc::new(TcpControlPlane::connect(config)?);
        Ok(MoeWorld {
            rank: HostRank::over_shared(plane, Arc::new(MemfdMemory)),
        })
    }

    /// The rank, as a layer's context.
    pub fn context(&self) -> RankContext {
        RankContext::Host(self.rank.clone())
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank.rank()
    }

    /// Ranks in the world.
    pub fn world_size(&self) -> usize {
        self.rank.world_size()
    }
}

impl MoeTcpOptions {
    /// The configuration these options describe.
    ///
    /// # Safety
    /// `master_addr` is NULL or a NUL-terminated string.
    unsafe fn config(&self) -> Result<TcpConfig, Failure> {
        // SAFETY: this function's contract.
        let master_addr = unsafe { c_str("options.master_addr", self.master_addr) }?.to_string();
        let master_port = u16::try_from(self.master_port)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| {
                Failure::invalid(format!(
                    "`options.master_port` = {} is not a port (1 to 65535)",
                    self.master_port
                ))
            })?;
        let timeout = match self.timeout_ms {
            0 => moe_a2a::host::DEFAULT_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        Ok(TcpConfig {
            master_addr,
            master_port,
            rank: self.rank as usize,
            world_size: self.world_size as usize,
            local_rank: self.local_rank as usize,
            local_world_size: self.local_world_size as usize,
            run_id: self.run_id,
            timeout,
        })
    }
}

/// Joins the world the launcher's environment describes: `MASTER_ADDR`, `MASTER_PORT`, and the
/// rank and world size of torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`),
/// Open MPI, MPICH, Intel MPI or Slurm; `MOE_TIMEOUT_MS` bounds every wait. Collective: every
/// rank calls it; rank 0 listens, the others connect. The world's layers run the host platform,
/// their workspaces in memory the processes of a host share.
///
/// # Safety
/// `out` is NULL or points to writable storage for a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_world_from_env(out: *mut *mut MoeWorld) -> MoeStatus {
    guarded(|| {
        let world = MoeWorld::connect(&TcpConfig::from_env()?)?;
        // SAFETY: this function's contract.
        unsafe { give("out", out, world) }
    })
}

/// Joins the world `options` describes (collective, as `moe_world_from_env`).
///
/// # Safety
/// `options` is NULL or points to a `MoeTcpOptions` whose `master_addr` is NULL or a
/// NUL-terminated string; `out` is NULL or points to writable storage for a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_world_connect(options: *const MoeTcpOptions, out: *mut *mut MoeWorld) -> MoeStatus {
    guarded(|| {
        // SAFETY: this function's contract.
        let config = unsafe { borrowed("options", options)?.config() }?;
        let world = MoeWorld::connect(&config)?;
        // SAFETY: this function's contract.
        unsafe { give("out", out, world) }
    })
}

/// This process's rank and the world's size (either pointer may be NULL).
///
/// # Safety
/// `world` is NULL or a live world; `rank` and `world_size` are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_world_rank(world: *const MoeWorld, rank: *mut u32, world_size: *mut u32) -> MoeStatus {
    guarded(|| {
        // SAFETY: this function's contract.
        let world = unsafe { borrowed("world", world) }?;
        // SAFETY: each is NULL or writable, per this function's contract.
        unsafe {
            if let Some(r) = rank.as_mut() {
                *r = world.rank() as u32;
            }
            if let Some(n) = world_size.as_mut() {
                *n = world.world_size() as u32;
            }
        }
        Ok(())
    })
}

/// Leaves the world (NULL is ignored). Layers built on it keep their rank alive until they
/// are freed.
///
/// # Safety
/// `world` is NULL or a world not freed before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_world_free(world: *mut MoeWorld) {
    // SAFETY: this function's contract.
    unsafe { free(world) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::last_error;

    #[test]
    fn a_port_out_of_range_is_refused_naming_it() {
        let options = MoeTcpOptions {
            master_addr: c"127.0.0.1".as_ptr(),
            master_port: 70000,
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            run_id: 0,
            timeout_ms: 100,
        };
        let mut world = std::ptr::null_mut();
        // SAFETY: `options` and `world` are live locals.
        let status = unsafe { moe_world_connect(&options, &mut world) };
        assert_eq!(status, MoeStatus::InvalidArgument);
        assert!(last_error().contains("master_port` = 70000"), "{}", last_error());
        assert!(world.is_null());
    }

    #[test]
    fn a_world_of_one_joins_and_knows_its_rank() {
        let port = TcpConfig::free_local_port().unwrap();
        let options = MoeTcpOptions {
            master_addr: c"127.0.0.1".as_ptr(),
            master_port: u32::from(port),
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            run_id: 7,
            timeout_ms: 2000,
        };
        let mut world = std::ptr::null_mut();
        // SAFETY: live locals; the world is freed once.
        unsafe {
            assert_eq!(
                moe_world_connect(&options, &mut world),
                MoeStatus::Ok,
                "{}",
                last_error()
            );
            let (mut rank, mut size) = (9, 9);
            assert_eq!(moe_world_rank(world, &mut rank, &mut size), MoeStatus::Ok);
            assert_eq!((rank, size), (0, 1));
            moe_world_free(world);
        }
    }
}
