//! The kernels' status word: how a rank's kernels report its first error to the host (a wait
//! on a peer that timed out, a top-k row with a bad expert id), and the `moe_core` error each
//! code stands for.

use std::sync::Arc;
use std::time::Duration;

use moe_core::MoeError;
use moe_core::call::{Abandon, CallId};

use crate::buffer::{DeviceBuffer, HostMappedWord};
use crate::device::CudaDevice;
use crate::error::KernelError;

/// The status word's flag for a top-k row a dispatch kernel refused (the low bits hold the
/// token); values `1..=64` are `1 +` the peer a wait timed out on.
pub const STATUS_BAD_ID: u32 = 0x4000_0000;
/// The flag of a peer's call word that failed a wait: `kind << 24 | detail << 8 | (peer + 1)`.
pub const STATUS_CALL: u32 = 0x2000_0000;
/// The flag for a top-k row whose weight is not finite (the low bits hold the token).
pub const STATUS_BAD_WEIGHT: u32 = 0x1000_0000;

/// The error a kernel status holds (its code, and `ours`, the word of the call that recorded
/// it), for rank `rank`'s operation `op` whose waits were bounded by `timeout`.
pub fn status_result(code: u32, ours: u32, rank: usize, op: &str, timeout: Duration) -> moe_core::Result<()> {
    let token = code & 0x00ff_ffff;
    let ours = CallId::from_word(ours);
    let peer = (code & 0xff).saturating_sub(1) as usize;
    let detail = (code >> 8) & 0xffff;
    match code {
        0 => Ok(()),
        c if c & STATUS_BAD_ID != 0 => Err(MoeError::InvalidInput {
            op: "prepare",
            detail: format!(
                "rank {rank}: token {token} of a device input lists an expert id outside [0, num_experts) or the same id twice in its top-k row (found by the dispatch kernel); the call was abandoned on every rank"
            ),
        }),
        c if c & STATUS_BAD_WEIGHT != 0 => Err(MoeError::InvalidInput {
            op: "prepare",
            detail: format!(
                "rank {rank}: token {token} of a device input has a top-k weight that is not finite (found by the dispatch kernel); the call was abandoned on every rank"
            ),
        }),
        c if c & STATUS_CALL != 0 => Err(match (c >> 24) & 0xf {
            1 => MoeError::CallMismatch {
                rank,
                peer,
                op: op.to_string(),
                ours,
                theirs: CallId {
                    layer: (detail & 0x7f) as u8,
                    digest: (detail >> 7) as u8,
                    ..ours
                },
            },
            2 => MoeError::PeerAbandoned {
                rank,
                peer,
                op: op.to_string(),
                call: ours,
                why: Abandon::from_bits(detail >> 7),
            },
            3 => MoeError::PeerMovedOn {
                rank,
                peer,
                op: op.to_string(),
                call: ours,
                ahead: detail as u16,
            },
            4 if detail == 1 => MoeError::CorruptPeerData {
                op: "prepare",
                detail: format!(
                    "rank {peer} sent rank {rank} a row whose expert ids are neither -1 nor experts of rank {rank} (found by the kernel that received it); the row was handed on as padding and the call abandoned on every rank"
                ),
            },
            _ => MoeError::CorruptPeerData {
                op: "prepare",
                detail: format!("rank {peer} announced a token count above the layer's tokens per rank"),
            },
        }),
        c => Err(MoeError::Timeout {
            rank,
            op: op.to_string(),
            waited_for: vec![c as usize - 1],
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
            // The code, then the word of the call that recorded it.
            word: DeviceBuffer::zeroed(gpu, 8)?,
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

    /// Waits for the stream and reports the error recorded by `op`'s kernels, if any, which it
    /// then clears: the rank's next call runs.
    pub fn finish(&self, op: &str) -> moe_core::Result<()> {
        let mut words = [0u8; 8];
        self.word
            .download(0, &mut words)
            .map_err(|e| MoeError::Device(e.to_string()))?;
        let code = u32::from_le_bytes(words[..4].try_into().expect("4 bytes"));
        if code == 0 {
            return Ok(());
        }
        let ours = u32::from_le_bytes(words[4..].try_into().expect("4 bytes"));
        self.word
            .upload(0, &[0; 8])
            .map_err(|e| MoeError::Device(e.to_string()))?;
        self.mirror.write(0);
        status_result(code, ours, self.rank, op, self.timeout)
    }

    /// Reports an error recorded so far by `op`'s kernels without waiting for the stream when
    /// there is none (the steady state); when there is one, waits for the stream, reports it
    /// and clears it (see [`Self::finish`]).
    pub fn check(&self, op: &str) -> moe_core::Result<()> {
        match self.mirror.read() {
            0 => Ok(()),
            _ => self.finish(op),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CORRUPT: u32 = STATUS_CALL | 4 << 24;

    #[test]
    fn a_foreign_id_in_a_delivered_row_names_the_source_and_the_rank() {
        let e = status_result(CORRUPT | 1 << 8 | 2, 0, 0, "prepare", Duration::from_secs(1)).unwrap_err();
        let MoeError::CorruptPeerData { detail, .. } = &e else {
            panic!("{e:?}");
        };
        assert!(detail.contains("rank 1 sent rank 0 a row whose expert ids"), "{detail}");
    }

    #[test]
    fn a_count_above_the_layers_tokens_keeps_its_message() {
        let e = status_result(CORRUPT | 1, 0, 0, "prepare", Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("rank 0 announced a token count"), "{e}");
    }
}
