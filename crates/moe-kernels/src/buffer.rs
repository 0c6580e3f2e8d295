//! Device memory this crate allocates itself: [`DeviceBuffer`], the memory of workspaces and
//! of device tensors, and [`HostMappedWord`], a word of page-locked host memory every device
//! reaches.
//!
//! Workspaces come from `cuMemAlloc` for ranks of one process, or from the driver's virtual
//! memory management for ranks in other processes ([`DeviceBuffer::exportable`] and
//! [`DeviceBuffer::import`], see [`crate::vmm`]): memory from the stream-ordered pool allocator
//! is not reachable by peers after `cuCtxEnablePeerAccess` (a peer's store faults with an
//! illegal address), so it must never back a workspace.
//!
//! Allocate before any rank launches a kernel that waits on peers: mapping a new allocation
//! into peer contexts can wait for those peers' running kernels, which wait for this rank.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use cudarc::driver::result;
use cudarc::driver::sys;
use moe_core::{DeviceMemory, MoeError};

use crate::device::CudaDevice;
use crate::driver::{count_driver_allocations, driver};
use crate::error::KernelError;
use crate::vmm::{Mapping, ShareableHandle};

/// Device memory this process reaches at one address, released on drop: from `cuMemAlloc`
/// (reachable by peers of this process with peer access), or a mapping of memory shared across
/// processes (see [`crate::vmm`]).
#[derive(Debug)]
pub struct DeviceBuffer {
    /// The GPU whose stream orders this process's copies to and from the buffer (for an
    /// imported buffer, the importing rank's GPU, which reaches the memory).
    gpu: Arc<CudaDevice>,
    ptr: u64,
    bytes: usize,
    backing: Backing,
}

#[derive(Debug)]
enum Backing {
    /// `cuMemAlloc`, freed with `cuMemFree`.
    Alloc,
    /// A virtual-memory mapping, unmapped and released when dropped.
    Mapped(Mapping),
}

impl DeviceBuffer {
    /// `bytes` zeroed bytes on `gpu` (at least one, so the address is valid).
    pub fn zeroed(gpu: &Arc<CudaDevice>, bytes: usize) -> Result<Self, KernelError> {
        gpu.context().bind_to_thread().map_err(driver("bind context"))?;
        // SAFETY: the context is current on this thread; the allocation is owned by the
        // returned buffer and freed once, in Drop.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(driver("cuMemAlloc"))?;
        count_driver_allocations(1);
        Self::zero(gpu, ptr, bytes, Backing::Alloc)
    }

    /// `bytes` zeroed bytes on `gpu` that ranks in other processes on this host can map, and
    /// a descriptor of them to give to those ranks (see [`Self::import`]).
    pub fn exportable(gpu: &Arc<CudaDevice>, bytes: usize) -> Result<(Self, OwnedFd), KernelError> {
        gpu.context().bind_to_thread().map_err(driver("bind context"))?;
        let mapping = Mapping::create(gpu, bytes, ShareableHandle::PosixFd)?;
        let fd = mapping.export(ShareableHandle::PosixFd)?;
        Ok((Self::zero(gpu, mapping.ptr(), bytes, Backing::Mapped(mapping))?, fd))
    }

    /// The `bytes`-byte buffer a rank in another process made with [`Self::exportable`], from
    /// its descriptor `fd`, mapped for `gpu`'s kernels to read and write (directly when it is
    /// on `gpu`, over the peer-to-peer path otherwise). Not zeroed: its owner zeroed it.
    pub fn import(gpu: &Arc<CudaDevice>, fd: BorrowedFd<'_>, bytes: usize) -> Result<Self, KernelError> {
        gpu.context().bind_to_thread().map_err(driver("bind context"))?;
        let mapping = Mapping::import(gpu, fd, bytes, ShareableHandle::PosixFd)?;
        Ok(DeviceBuffer {
            gpu: gpu.clone(),
            ptr: mapping.ptr(),
            bytes,
            backing: Backing::Mapped(mapping),
        })
    }

    /// The buffer at `ptr`, which `backing` owns, after zeroing its `bytes` bytes (at least
    /// one) on `gpu`'s stream.
    fn zero(gpu: &Arc<CudaDevice>, ptr: u64, bytes: usize, backing: Backing) -> Result<Self, KernelError> {
        let buffer = DeviceBuffer {
            gpu: gpu.clone(),
            ptr,
            bytes,
            backing,
        };
        // SAFETY: `ptr` is a live allocation of at least `bytes.max(1)` bytes in the current
        // context, owned by `buffer`.
        unsafe { result::memset_d8_async(ptr, 0, bytes.max(1), gpu.stream().cu_stream()) }
            .map_err(driver("cuMemsetD8Async"))?;
        gpu.stream().synchronize().map_err(driver("stream sync"))?;
        Ok(buffer)
    }

    /// A buffer holding a copy of `data`.
    pub fn from_bytes(gpu: &Arc<CudaDevice>, data: &[u8]) -> Result<Self, KernelError> {
        let b = Self::zeroed(gpu, data.len())?;
        b.upload(0, data)?;
        Ok(b)
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), KernelError> {
        if offset + len > self.bytes {
            return Err(KernelError::InvalidArgument(format!(
                "bytes {offset}..{} of a {}-byte device buffer",
                offset + len,
                self.bytes
            )));
        }
        Ok(())
    }

    /// Copies `data` to `offset`, ordered after the GPU's stream's earlier work; returns when
    /// the copy is done.
    ///
    /// Copies go on the rank's own stream, never the legacy default stream: a synchronous
    /// `cuMemcpy` could wait on work that spins until this very rank arrives.
    pub fn upload(&self, offset: usize, data: &[u8]) -> Result<(), KernelError> {
        self.check(offset, data.len())?;
        // SAFETY: the range was checked against this live allocation of the GPU's context.
        unsafe { self.gpu.copy_to_device(self.ptr + offset as u64, data) }
    }

    /// Copies `out.len()` bytes from `offset`, ordered after the GPU's stream's earlier work.
    pub fn download(&self, offset: usize, out: &mut [u8]) -> Result<(), KernelError> {
        self.check(offset, out.len())?;
        // SAFETY: the range was checked against this live allocation of the GPU's context.
        unsafe { self.gpu.copy_to_host(self.ptr + offset as u64, out) }
    }
}

impl DeviceBuffer {
    /// Enqueues a copy of `bytes` bytes from device address `src` to `offset` on this buffer's
    /// GPU's stream; returns without waiting.
    ///
    /// # Safety
    /// `src` must be valid for `bytes` bytes, reachable from this GPU, and not be freed or
    /// written before the copy has run on the stream.
    pub unsafe fn copy_from_device_async(&self, offset: usize, src: u64, bytes: usize) -> Result<(), KernelError> {
        self.check(offset, bytes)?;
        if bytes == 0 {
            return Ok(());
        }
        self.gpu.context().bind_to_thread().map_err(driver("bind context"))?;
        // SAFETY: the destination range was checked against this live allocation; the caller
        // guarantees the source range.
        unsafe { result::memcpy_dtod_async(self.ptr + offset as u64, src, bytes, self.gpu.stream().cu_stream()) }
            .map_err(driver("cuMemcpyDtoDAsync"))
    }
}

/// A word in page-locked host memory mapped into every device: kernels store a status into it
/// that the host reads at any time without synchronizing with a stream, or the host stores a
/// value a stream waits for (`cuStreamWaitValue32`). Only plain stores and loads on either
/// side (no device atomics, which PCIe does not carry to host memory).
#[derive(Debug)]
pub struct HostMappedWord {
    host: *mut u32,
    device: u64,
}

// SAFETY: the word is plain page-locked memory owned by this value; the host only reads it with
// volatile loads, and the device writes whole aligned words.
unsafe impl Send for HostMappedWord {}
// SAFETY: see Send; shared access is volatile reads only.
unsafe impl Sync for HostMappedWord {}

impl HostMappedWord {
    /// A zeroed word, mapped into every context of the process.
    pub fn new(gpu: &CudaDevice) -> Result<Self, KernelError> {
        gpu.context().bind_to_thread().map_err(driver("bind context"))?;
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the context is current; the allocation is owned by the returned value and
        // freed once, in Drop.
        let host = unsafe { result::malloc_host(4, flags) }.map_err(driver("cuMemHostAlloc"))? as *mut u32;
        count_driver_allocations(1);
        // SAFETY: `host` is a live, aligned 4-byte allocation.
        unsafe { std::ptr::write_volatile(host, 0) };
        let mut device = 0;
        // SAFETY: `host` was allocated with DEVICEMAP in this process; the query writes a local.
        let mapped = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host.cast(), 0) }.result();
        if let Err(e) = mapped {
            // SAFETY: `host` came from cuMemHostAlloc above and is not used after this.
            let _ = unsafe { result::free_host(host.cast()) };
            return Err(driver("cuMemHostGetDevicePointer")(e));
        }
        Ok(HostMappedWord { host, device })
    }

    /// The address kernels store to.
    pub fn device_ptr(&self) -> u64 {
        self.device
    }

    /// The word as last stored (no synchronization).
    pub fn read(&self) -> u32 {
        // SAFETY: `host` is live for self's lifetime; a volatile load of an aligned word.
        unsafe { std::ptr::read_volatile(self.host) }
    }

    /// Stores `value` for the devices to see.
    pub fn write(&self, value: u32) {
        // SAFETY: `host` is live for self's lifetime; a volatile store of an aligned word.
        unsafe { std::ptr::write_volatile(self.host, value) };
    }
}

impl Drop for HostMappedWord {
    fn drop(&mut self) {
        // SAFETY: `host` came from cuMemHostAlloc and is freed only here. A kernel still running
        // could store to it: owners drop it after their GPU buffers, whose Drop synchronizes
        // the stream.
        let _ = unsafe { result::free_host(self.host.cast()) };
    }
}

impl DeviceMemory for DeviceBuffer {
    fn ordinal(&self) -> usize {
        self.gpu.ordinal()
    }
    fn address(&self) -> u64 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.bytes
    }
    fn read(&self, offset: usize, out: &mut [u8]) -> moe_core::Result<()> {
        self.download(offset, out).map_err(|e| MoeError::Device(e.to_string()))
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let idle = self.gpu.stream().synchronize().is_ok() && self.gpu.context().bind_to_thread().is_ok();
        // The placeholder left behind owns nothing.
        match std::mem::replace(&mut self.backing, Backing::Alloc) {
            // SAFETY: `ptr` came from cuMemAlloc in this context and is freed only here; the
            // stream that used it is idle.
            Backing::Alloc if idle => drop(unsafe { result::free_sync(self.ptr) }),
            // Unmapped and released by the mapping's Drop, now that the stream is idle.
            Backing::Mapped(mapping) if idle => drop(mapping),
            // A stream that could not be synchronized may still use the memory: keep it.
            Backing::Mapped(mapping) => std::mem::forget(mapping),
            Backing::Alloc => {}
        }
    }
}
