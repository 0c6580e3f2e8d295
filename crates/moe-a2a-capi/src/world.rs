//! `MoeWorld`: this process's rank in a world of processes joined over the TCP control plane,
//! with workspaces in memory the processes of a host share.

use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::time::Duration;

use moe_a2a::control::{ControlPlane, TcpConfig, TcpControlPlane};
use moe_a2a::host::HostRank;
use moe_a2a::shm::MemfdMemory;
use moe_a2a::{Location, MoeError, RankContext, Tensor};

use crate::status::{Failure, MoeStatus, guarded};
use crate::types::{MoeDevice, MoeTensor, borrowed, c_str, free, give, handle};

/// This process's rank in a world (opaque; `moe_world_from_env`, `moe_world_connect`).
#[derive(Debug)]
pub struct MoeWorld {
    place: Place,
}

/// Where a rank's layers run: the host platform, or its GPU (feature `cuda`); and how the
/// tensors C or Python describe become the library's there.
#[derive(Clone, Debug)]
pub struct Place {
    ctx: RankContext,
    #[cfg(feature = "cuda")]
    gpu: Option<Arc<moe_kernels::device::CudaDevice>>,
}

/// A result's destination: a tensor the library writes, and for host memory the caller's
/// descriptor it is copied into at the end (device memory is written in place).
#[derive(Debug)]
pub struct Output {
    pub tensor: Tensor,
    host: Option<MoeTensor>,
}

impl Output {
    /// Copies a host result into the caller's memory.
    ///
    /// # Safety
    /// As [`MoeTensor::store`], for the descriptor `Place::output` was given.
    pub unsafe fn finish(self, arg: &str) -> Result<(), Failure> {
        match self.host {
            // SAFETY: this function's contract.
            Some(descriptor) => unsafe { descriptor.store(arg, &self.tensor) },
            None => Ok(()),
        }
    }
}

impl Place {
    /// The rank, as a layer's context.
    pub fn context(&self) -> RankContext {
        self.ctx.clone()
    }

    /// The GPU platform for tensors at `at` (this rank's GPU, for tensors on it).
    pub fn gpu_rank(&self, at: Location) -> Option<&dyn moe_a2a::GpuRank> {
        moe_a2a::runner::gpu_of(&self.ctx, at)
    }

    /// The CUDA stream the rank's work runs on (0 on the host platform): what a DLPack
    /// consumer passes to the producer.
    pub fn stream(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.stream().cu_stream() as usize;
        }
        0
    }

    /// Orders the work enqueued later on the caller's `stream` (a CUDA stream of this rank's
    /// GPU; 1 and 2 are the legacy and per-thread default streams) after this rank's work so
    /// far, without the host waiting. Nothing to order on the host platform.
    ///
    /// # Safety
    /// `stream` is a live stream of this rank's GPU.
    pub unsafe fn order_before(&self, stream: usize) -> Result<(), Failure> {
        #[cfg(feature = "cuda")]
        // SAFETY: this function's contract.
        return self.order_streams(stream, |gpu, s| unsafe { gpu.order_before(s) });
        #[cfg(not(feature = "cuda"))]
        {
            let _ = stream;
            Ok(())
        }
    }

    /// Orders this rank's work enqueued later after the work enqueued so far on the caller's
    /// `stream` (a CUDA stream of this rank's GPU; 0 the legacy default stream), without the
    /// host waiting: how the rank reads arrays a producer wrote on its own stream. Nothing to
    /// order on the host platform.
    ///
    /// # Safety
    /// `stream` is a live stream of this rank's GPU.
    pub unsafe fn order_after(&self, stream: usize) -> Result<(), Failure> {
        #[cfg(feature = "cuda")]
        // SAFETY: this function's contract.
        return self.order_streams(stream, |gpu, s| unsafe { gpu.order_after(s) });
        #[cfg(not(feature = "cuda"))]
        {
            let _ = stream;
            Ok(())
        }
    }

    /// `order` on this rank's GPU and `stream`; nothing on the host platform.
    #[cfg(feature = "cuda")]
    fn order_streams(
        &self,
        stream: usize,
        order: impl FnOnce(
            &moe_kernels::device::CudaDevice,
            moe_kernels::cudarc::driver::sys::CUstream,
        ) -> Result<(), moe_kernels::KernelError>,
    ) -> Result<(), Failure> {
        let Some(gpu) = &self.gpu else {
            return Ok(());
        };
        order(gpu, stream as moe_kernels::cudarc::driver::sys::CUstream).map_err(|e| Failure {
            status: MoeStatus::Device,
            message: e.to_string(),
        })
    }

    /// Copies `src` into `dst` (same dtype and shape, both in host memory or both on this
    /// rank's GPU; on the GPU enqueued on the rank's stream).
    pub fn copy(&self, src: &Tensor, dst: &mut Tensor, arg: &str) -> Result<(), Failure> {
        if src.dtype() != dst.dtype() || src.shape() != dst.shape() {
            return Err(Failure::invalid(format!(
                "{arg} is {:?} {:?}; the layer needs {:?} {:?}",
                src.dtype(),
                src.shape(),
                dst.dtype(),
                dst.shape()
            )));
        }
        match (src.location(), dst.location()) {
            (Location::Host, Location::Host) => {
                dst.bytes_mut().copy_from_slice(src.bytes());
                Ok(())
            }
            #[cfg(feature = "cuda")]
            (Location::Device(a), Location::Device(b))
                if a == b && self.gpu.as_ref().is_some_and(|g| g.ordinal() == a) =>
            {
                let gpu = self.gpu.as_ref().expect("checked above");
                let bytes = src.len() * src.dtype().size();
                let at = |t: &Tensor| t.device_region().map_or(0, |r| r.address());
                // SAFETY: both tensors are device memory of this GPU holding `bytes` bytes
                // (their regions were checked at creation and are alive while borrowed here).
                unsafe { gpu.copy_on_device_async(at(dst), at(src), bytes) }.map_err(|e| Failure {
                    status: MoeStatus::Device,
                    message: e.to_string(),
                })
            }
            (from, to) => Err(Failure::invalid(format!(
                "{arg} is in {from}, the layer needs it in {to}"
            ))),
        }
    }

    /// The tensor `d` describes, as argument `arg`: a copy of host memory, or the caller's
    /// memory on this rank's GPU, read in place.
    ///
    /// # Safety
    /// As [`MoeTensor::to_host_tensor`]; device memory stays alive and unchanged until the work
    /// enqueued on it has run.
    pub unsafe fn input(&self, d: &MoeTensor, arg: &str) -> Result<Tensor, Failure> {
        if d.device_type == MoeDevice::Cuda as i32 {
            // SAFETY: this function's contract.
            return unsafe { self.on_gpu(d, arg) };
        }
        // SAFETY: this function's contract.
        unsafe { d.to_host_tensor(arg) }
    }

    /// Where a result described by `d` (argument `arg`) is written: a host tensor copied into
    /// the caller's memory by [`Output::finish`], or the caller's device memory itself.
    ///
    /// # Safety
    /// As [`Self::input`], the memory writable.
    pub unsafe fn output(&self, d: &MoeTensor, arg: &str) -> Result<Output, Failure> {
        if d.device_type == MoeDevice::Cuda as i32 {
            return Ok(Output {
                // SAFETY: this function's contract.
                tensor: unsafe { self.on_gpu(d, arg) }?,
                host: None,
            });
        }
        // SAFETY: this function's contract.
        let (dtype, shape, _) = unsafe { d.host_layout(arg) }?;
        Ok(Output {
            tensor: Tensor::zeros(dtype, &shape),
            host: Some(MoeTensor {
                strides: std::ptr::null(),
                ..*d
            }),
        })
    }

    /// The caller's device memory `d` describes, on this rank's GPU.
    ///
    /// # Safety
    /// As [`Self::input`].
    #[cfg(feature = "cuda")]
    unsafe fn on_gpu(&self, d: &MoeTensor, arg: &str) -> Result<Tensor, Failure> {
        // SAFETY: this function's contract.
        let (dtype, shape, _) = unsafe { d.layout(arg) }?;
        let gpu = self.gpu.as_ref().ok_or_else(|| Failure {
            status: MoeStatus::Unsupported,
            message: format!(
                "`{arg}` is on GPU {}, and this rank runs on the host: join its GPU first (moe_world_use_gpu), or pass host tensors",
                d.device_id
            ),
        })?;
        if usize::try_from(d.device_id).ok() != Some(gpu.ordinal()) {
            return Err(Failure::invalid(format!(
                "`{arg}` is on GPU {}, this rank runs on GPU {}: pass tensors of the rank's GPU",
                d.device_id,
                gpu.ordinal()
            )));
        }
        // SAFETY: the descriptor's memory is on this GPU (checked above; the caller vouches
        // for the address) and stays alive per this function's contract.
        Ok(unsafe { moe_kernels::tensor::borrowed_tensor(gpu, d.data as u64, dtype, &shape) }?)
    }

    /// Without the `cuda` feature, device tensors are refused.
    ///
    /// # Safety
    /// None needed; `unsafe` for the same signature as the GPU build.
    #[cfg(not(feature = "cuda"))]
    unsafe fn on_gpu(&self, d: &MoeTensor, arg: &str) -> Result<Tensor, Failure> {
        Err(Failure {
            status: MoeStatus::Unsupported,
            message: format!(
                "`{arg}` is on GPU {}: this build of the library has no GPU platform; build it with the feature `cuda`, or pass host tensors",
                d.device_id
            ),
        })
    }
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
            place: Place {
                ctx: RankContext::Host(HostRank::over_shared(plane, Arc::new(MemfdMemory))),
                #[cfg(feature = "cuda")]
                gpu: None,
            },
        })
    }

    /// Moves this rank onto GPU `ordinal`, its work ordered on `stream` (the engine's, a
    /// `CUstream` of the GPU's primary context) or, when null, on a stream of its own.
    /// Collective over the world: every rank learns every rank's GPU. Layers built afterwards
    /// take device tensors (and still host tensors).
    ///
    /// # Safety
    /// `stream` is null or a live stream of GPU `ordinal` that outlives the world and its layers.
    #[cfg(feature = "cuda")]
    pub unsafe fn use_gpu(&mut self, ordinal: usize, stream: *mut std::ffi::c_void) -> Result<(), Failure> {
        use moe_kernels::device::CudaDevice;
        use moe_kernels::world::{CudaWorld, CudaWorldRank};
        let RankContext::Host(host) = &self.place.ctx else {
            return Err(Failure::invalid(
                "this rank runs on a GPU already; a world joins one GPU per rank",
            ));
        };
        let device = |e: moe_kernels::KernelError| Failure {
            status: MoeStatus::Device,
            message: format!("rank {} on GPU {ordinal}: {e}", host.rank()),
        };
        let gpu = if stream.is_null() {
            CudaDevice::new(ordinal)
        } else {
            // SAFETY: this function's contract.
            unsafe { CudaDevice::with_stream(ordinal, stream.cast()) }
        }
        .map(Arc::new)
        .map_err(device)?;
        let world = Arc::new(CudaWorld::across_processes(host, gpu.clone())?);
        let rank = CudaWorldRank::new(world, host.rank()).map_err(device)?;
        self.place = Place {
            ctx: RankContext::Cuda(moe_a2a::CudaRank::new(host.clone(), Arc::new(rank))),
            gpu: Some(gpu),
        };
        Ok(())
    }

    /// Without the `cuda` feature there is no GPU platform to join.
    ///
    /// # Safety
    /// None needed; `unsafe` for the same signature as the GPU build.
    #[cfg(not(feature = "cuda"))]
    pub unsafe fn use_gpu(&mut self, ordinal: usize, _stream: *mut std::ffi::c_void) -> Result<(), Failure> {
        Err(Failure {
            status: MoeStatus::Unsupported,
            message: format!(
                "GPU {ordinal} asked for: this build of the library has no GPU platform; build it with the feature `cuda`"
            ),
        })
    }

    /// Aborts the world for `reason`: every rank's pending and later operations fail with it,
    /// promptly (their waits poll it), whichever rank they wait for.
    pub fn abort(&self, reason: &str) {
        let rank = self.rank();
        self.place.ctx.control().abort(MoeError::ControlPlane {
            rank,
            detail: format!("rank {rank} aborted the world: {reason}"),
        });
    }

    /// Where this rank's layers run.
    pub fn place(&self) -> &Place {
        &self.place
    }

    /// The rank, as a layer's context.
    pub fn context(&self) -> RankContext {
        self.place.context()
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.place.ctx.rank()
    }

    /// Ranks in the world.
    pub fn world_size(&self) -> usize {
        self.place.ctx.control().world_size()
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

/// Moves this rank onto GPU `device_id` (collective over the world), its work ordered on
/// `cuda_stream` (a `CUstream` / `cudaStream_t` of that GPU's primary context, as the CUDA
/// runtime and PyTorch create them), or on a stream of its own when NULL. Layers built
/// afterwards take tensors on that GPU (`MOE_DEVICE_CUDA`), read and written in place on the
/// stream without waiting for it, and still host tensors. Fails with `MOE_STATUS_UNSUPPORTED`
/// in a build without the GPU platform (feature `cuda`).
///
/// # Safety
/// `world` is NULL or a live world used by no other thread; `cuda_stream` is NULL or a live
/// stream of GPU `device_id` that outlives the world and its layers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_world_use_gpu(
    world: *mut MoeWorld,
    device_id: i32,
    cuda_stream: *mut c_void,
) -> MoeStatus {
    guarded(|| {
        // SAFETY: this function's contract.
        let world = unsafe { handle("world", world) }?;
        let ordinal = usize::try_from(device_id)
            .map_err(|_| Failure::invalid(format!("`device_id` = {device_id} is negative")))?;
        // SAFETY: this function's contract.
        unsafe { world.use_gpu(ordinal, cuda_stream) }
    })
}

/// Aborts the world for `reason` (NUL-terminated, may be NULL), as an engine does on a fatal
/// error: every rank's pending and later calls fail with `MOE_STATUS_PEER_FAILED` naming this
/// rank and the reason, promptly rather than at their timeout. The world cannot be used again.
///
/// # Safety
/// `world` is NULL or a live world; `reason` is NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn moe_world_abort(world: *const MoeWorld, reason: *const c_char) -> MoeStatus {
    guarded(|| {
        // SAFETY: this function's contract.
        let world = unsafe { borrowed("world", world) }?;
        // SAFETY: this function's contract.
        let reason = unsafe { crate::types::reason(reason) }?;
        world.abort(reason);
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
