//! The kernels' status word: how a rank's kernels report its first error to the host (a wait
//! on a peer that timed out, a top-k row with a bad expert id), and the `moe_core` error each
//! code stands for.

use std::sync::Arc;
use std::time::Duration;

use moe_core::MoeError;

use crate::buffer::{DeviceBuffer, HostMappedWord};
use crate::device::CudaDevice;
use crate::error::KernelError;

/// The status word's flag for a top-k row a dispatch kernel refused (the low bits hold the
/// token); values `1..=64` are `1 +` the peer a wait timed out on.
pub const STATUS_BAD_ID: u32 = 0x4000_0000;

/// The error a kernel status word holds, for rank `rank`'s operation `op` whose waits were
/// bounded by `timeout`.
pub fn status_result(code: u32, rank: usize, op: &str, timeout: Duration) -> moe_core::Result<()> {
    match code {
        0 => Ok(()),
        c if c & STATUS_BAD_ID != 0 => Err(MoeError::InvalidInput {
            op: "prepare",
            detail: format!(
                "rank {rank}: token {} of a device input lists an expert id outside [0, num_experts) or the same id twice in its top-k row (found by the dispatch kernel; that id was not dispatched, and this rank stops waiting on peers: rebuild the layer)",
                c & !STATUS_BAD_ID
            ),
        }),
        peer => Err(MoeError::Timeout {
            rank,
            op: op.to_string(),
            waited_for: vec![peer as usize - 1],
            timeout,
        }),
    }
}

/// Where a protocol's kernels record the first error of a rank (see [`status_result`]): a
/// device word the kernels update atomically, and its host-mapped mirror the host reads
/// without synchronizing.
#[derive(Debug)]
pub struct KernelStatus {
    word: DeviceBuffer,
    /// Dropped after `word`, whose Drop waits for the stream that may still store to it.
    mirror: HostMappedWord,
    rank: usize,
    timeout: Duration,
}

impl KernelStatus {
    /// The status of rank `rank` on `gpu`, whose kernels bound their waits by `timeout`
    /// (allocates: at construction).
    pub fn new(gpu: &Arc<CudaDevice>, rank: usize, timeout: Duration) -> Result<Self, KernelError> {
        Ok(KernelStatus {
            word: DeviceBuffer::zeroed(gpu, 4)?,
            mirror: HostMappedWord::new(gpu)?,
            rank,
            timeout,
        })
    }

    /// The device word (the kernels' `status`).
    pub fn word_ptr(&self) -> u64 {
        self.word.ptr()
    }

    /// The mirror's device address (the kernels' `status_mirror`).
    pub fn mirror_ptr(&self) -> u64 {
        self.mirror.device_ptr()
    }

    /// Waits for the stream and reports the error recorded by `op`'s kernels, if any.
    pub fn finish(&self, op: &str) -> moe_core::Result<()> {
        let mut word = [0u8; 4];
        self.word
            .download(0, &mut word)
            .map_err(|e| MoeError::Device(e.to_string()))?;
        status_result(u32::from_le_bytes(word), self.rank, op, self.timeout)
    }

    /// Reports an error recorded so far by `op`'s kernels, without waiting for the stream:
    /// work still running can record one later (see [`Self::finish`]).
    pub fn check(&self, op: &str) -> moe_core::Result<()> {
        status_result(self.mirror.read(), self.rank, op, self.timeout)
    }
}
