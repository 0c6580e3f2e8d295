//! Device memory from the driver's virtual memory management, for ranks in other processes:
//! an allocation made shareable as a POSIX file descriptor ([`ShareableHandle`]), and the same
//! allocation mapped into another process's address space from that descriptor.
//!
//! The descriptor travels over a Unix-domain socket (SCM_RIGHTS, `moe_shm::exchange_descriptors`),
//! so no ptrace capability is needed, as it would be for `cuMemGetHandleForAddressRange` or
//! legacy IPC handles between containers. Sizes are rounded up to the allocation granularity of
//! the device; the exporter and every importer round the same size the same way.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use cudarc::driver::sys;

use crate::device::CudaDevice;
use crate::driver::{count_driver_allocations, driver};
use crate::error::KernelError;

/// How an allocation is shared with other processes. Only POSIX file descriptors today (ranks
/// on one host); a fabric handle for multi-node NVLink would be another variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareableHandle {
    /// A file descriptor, passed to same-host peers over a Unix-domain socket.
    PosixFd,
}

impl ShareableHandle {
    fn driver_type(self) -> sys::CUmemAllocationHandleType {
        match self {
            ShareableHandle::PosixFd => sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        }
    }
}

/// Physical memory mapped at `ptr` in this process: `reserved` bytes of address space, unmapped,
/// freed and released on drop (the physical memory goes when its last handle, in any process,
/// is released).
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: u64,
    reserved: usize,
    handle: sys::CUmemGenericAllocationHandle,
}

impl Mapping {
    /// The mapped address.
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// A new allocation of at least `bytes` bytes on `gpu`, shareable as `kind`, mapped for
    /// `gpu` to read and write. The context of `gpu` must be current.
    pub(crate) fn create(gpu: &CudaDevice, bytes: usize, kind: ShareableHandle) -> Result<Mapping, KernelError> {
        let prop = properties(gpu, kind);
        let size = rounded(gpu, &prop, bytes)?;
        let mut handle = 0;
        // SAFETY: `prop` describes a pinned allocation on this device; the handle is owned by the
        // mapping built below, or released here on failure.
        unsafe { sys::cuMemCreate(&mut handle, size, &prop, 0) }
            .result()
            .map_err(driver("cuMemCreate"))?;
        count_driver_allocations(1);
        Self::map(gpu, handle, size, &prop)
    }

    /// The allocation of `bytes` bytes another process shared as the descriptor `fd`, mapped
    /// for `gpu` to read and write. The context of `gpu` must be current.
    pub(crate) fn import(
        gpu: &CudaDevice,
        fd: BorrowedFd<'_>,
        bytes: usize,
        kind: ShareableHandle,
    ) -> Result<Mapping, KernelError> {
        let prop = properties(gpu, kind);
        let size = rounded(gpu, &prop, bytes)?;
        let mut handle = 0;
        // SAFETY: for POSIX descriptors the driver takes the descriptor's number as the
        // pointer-sized handle and does not keep it (the caller closes it).
        unsafe {
            sys::cuMemImportFromShareableHandle(&mut handle, fd.as_raw_fd() as usize as *mut _, kind.driver_type())
        }
        .result()
        .map_err(driver("cuMemImportFromShareableHandle"))?;
        count_driver_allocations(1);
        Self::map(gpu, handle, size, &prop)
    }

    /// Reserves `size` bytes of address space, maps `handle` there and gives `gpu` access;
    /// releases what it made on failure.
    fn map(
        gpu: &CudaDevice,
        handle: sys::CUmemGenericAllocationHandle,
        size: usize,
        prop: &sys::CUmemAllocationProp,
    ) -> Result<Mapping, KernelError> {
        let mut ptr = 0;
        // SAFETY: reserves fresh address space, aligned to the granularity `size` is a multiple of.
        let reserved = unsafe { sys::cuMemAddressReserve(&mut ptr, size, 0, 0, 0) }.result();
        if let Err(e) = reserved {
            // SAFETY: `handle` is owned here and not used after this.
            let _ = unsafe { sys::cuMemRelease(handle) };
            return Err(driver("cuMemAddressReserve")(e));
        }
        // From here on, Drop undoes whatever part was done (unmapping a range never mapped is
        // an error the drop ignores).
        let mapping = Mapping {
            ptr,
            reserved: size,
            handle,
        };
        // SAFETY: the reserved range and the allocation are both `size` bytes, owned by `mapping`.
        unsafe { sys::cuMemMap(ptr, size, 0, handle, 0) }
            .result()
            .map_err(driver("cuMemMap"))?;
        let access = sys::CUmemAccessDesc {
            location: prop.location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the range is mapped above; one descriptor, for this device.
        unsafe { sys::cuMemSetAccess(ptr, size, &access, 1) }
            .result()
            .map_err(|e| KernelError::Driver {
                op: "cuMemSetAccess",
                message: format!(
                    "{e:?}: GPU {} cannot map this memory (a peer's GPU it has no peer-to-peer path to?)",
                    gpu.ordinal()
                ),
            })?;
        Ok(mapping)
    }

    /// The allocation as a descriptor for another process (a new descriptor each call).
    pub(crate) fn export(&self, kind: ShareableHandle) -> Result<OwnedFd, KernelError> {
        let mut fd: i32 = -1;
        // SAFETY: for POSIX descriptors the driver writes an int through the pointer; the
        // descriptor is new and owned by the caller.
        unsafe { sys::cuMemExportToShareableHandle((&mut fd as *mut i32).cast(), self.handle, kind.driver_type(), 0) }
            .result()
            .map_err(driver("cuMemExportToShareableHandle"))?;
        // SAFETY: the driver returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range and the handle are owned by this mapping and undone once, here; the
        // owner synchronized the streams that used them and made the context current.
        unsafe {
            let _ = sys::cuMemUnmap(self.ptr, self.reserved);
            let _ = sys::cuMemAddressFree(self.ptr, self.reserved);
            let _ = sys::cuMemRelease(self.handle);
        }
    }
}

/// A pinned allocation on `gpu`'s device, shareable as `kind`.
fn properties(gpu: &CudaDevice, kind: ShareableHandle) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: kind.driver_type(),
        location: sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: gpu.context().cu_device(),
        },
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

/// `bytes` (at least one) rounded up to the device's allocation granularity for `prop`.
fn rounded(gpu: &CudaDevice, prop: &sys::CUmemAllocationProp, bytes: usize) -> Result<usize, KernelError> {
    let mut granularity = 0;
    // SAFETY: a query into a local about a valid property record.
    unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut granularity,
            prop,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    }
    .result()
    .map_err(driver("cuMemGetAllocationGranularity"))?;
    if granularity == 0 {
        return Err(KernelError::Driver {
            op: "cuMemGetAllocationGranularity",
            message: format!("GPU {} reported a granularity of 0", gpu.ordinal()),
        });
    }
    Ok(bytes.max(1).div_ceil(granularity) * granularity)
}
