//! What every module that calls the CUDA driver shares: `driver`, which turns a failed call
//! into a [`KernelError`] naming it, and the count of the driver allocations each thread made
//! through this crate. It sits below `device` and everything built on a `CudaDevice` (buffers, worlds,
//! launchers), which all depend on it and on nothing above them.

use std::cell::Cell;

use cudarc::driver::DriverError;

use crate::error::KernelError;

thread_local! {
    static DRIVER_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// How many driver allocations the calling thread has made so far through this crate
/// ([`DeviceBuffer`](crate::buffer::DeviceBuffer)s,
/// [`HostMappedWord`](crate::buffer::HostMappedWord)s, and the stream-ordered buffers of the
/// helpers on host slices such as `CudaDevice::quantize`). An engine (or a test) reads it around
/// `prepare` and `finalize` to check that its steady state allocates nothing: each rank runs on
/// its own thread, so the count is that rank's alone.
pub fn driver_allocations_on_this_thread() -> u64 {
    DRIVER_ALLOCATIONS.with(Cell::get)
}

pub(crate) fn count_driver_allocations(n: u64) {
    DRIVER_ALLOCATIONS.with(|c| c.set(c.get() + n));
}

pub(crate) fn driver(op: &'static str) -> impl Fn(DriverError) -> KernelError {
    move |e| KernelError::Driver {
        op,
        message: e.to_string(),
    }
}
