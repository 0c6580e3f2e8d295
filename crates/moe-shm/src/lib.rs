//! Workspaces in memory the processes of ranks on one host share.
//!
//! - [`MemfdMemory`], for the host platform across processes: a `moe_core::host::ProcessMemory`,
//!   given to `HostRank::over_shared`, so the peer-memory backends run with one process per
//!   rank as they do with threads. Each rank's workspace is a memfd segment ([`segment`]):
//!   anonymous, so nothing is ever left in `/dev/shm` or on disk, whether the process exits,
//!   fails or is killed; the memory goes when the last process that maps it does.
//! - [`exchange_descriptors`], what MemfdMemory and the CUDA platform's workspaces across
//!   processes (device memory exported as a file descriptor) both do: each rank hands its
//!   descriptor to each peer over a Unix-domain socket in the abstract namespace with
//!   SCM_RIGHTS ([`handoff`]); the sockets' names, the size offered and the host's identity
//!   travel through the control plane.
//!
//! No ptrace capability, no file, no name that outlives the call. What a peer sends is checked
//! before use: its record, its host, the size it offers (and, for a segment, its descriptor's
//! size and seals).
#![deny(unsafe_code)]

pub mod handoff;
// Mapping a descriptor and viewing the mapping as atomic words.
#[allow(unsafe_code)]
pub mod segment;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use moe_core::control::{ControlPlane, position_in};
use moe_core::host::{ProcessMemory, WordMemory};
use moe_core::{MoeError, Result};

use crate::handoff::{Offer, fetch};
use crate::segment::Segment;

/// Workspaces as memfd segments the ranks' processes map: for ranks on one host (a rank on
/// another host is refused at allocation, naming it).
#[derive(Debug, Default, Clone, Copy)]
pub struct MemfdMemory;

impl ProcessMemory for MemfdMemory {
    fn symmetric_alloc(
        &self,
        plane: &dyn ControlPlane,
        group: &[usize],
        op: &str,
        words: usize,
    ) -> Result<Vec<Arc<dyn WordMemory>>> {
        let me = plane.rank();
        let fail = |detail: String| MoeError::ControlPlane {
            rank: me,
            detail: format!("{op}: {detail}"),
        };
        let (own, fd) = Segment::create(words).map_err(|e| fail(format!("this rank's workspace segment: {e}")))?;
        let theirs = exchange_descriptors(plane, group, op, fd.as_fd(), 4 * words as u64)?;
        let own: Arc<dyn WordMemory> = Arc::new(own);
        group
            .iter()
            .zip(theirs)
            .map(|(&member, fd)| match fd {
                None => Ok(own.clone()),
                Some(fd) => Segment::map(fd.as_fd(), words)
                    .map(|segment| Arc::new(segment) as Arc<dyn WordMemory>)
                    .map_err(|e| fail(format!("rank {member}'s workspace segment: {e}"))),
            })
            .collect()
    }
}

/// Gives `fd`, a `bytes`-byte workspace of this rank, to every other member of `group` (world
/// ranks, ascending) and returns each member's descriptor in group order (`None` for this
/// rank). Collective over `group`, bounded by the plane's timeout. Fails on every member when
/// one offers another size (the ranks construct different layers) or runs on another host
/// (naming both hosts and pointing to allgather-rs, which crosses hosts).
pub fn exchange_descriptors(
    plane: &dyn ControlPlane,
    group: &[usize],
    op: &str,
    fd: BorrowedFd<'_>,
    bytes: u64,
) -> Result<Vec<Option<OwnedFd>>> {
    let me = plane.rank();
    let at = position_in(group, me, plane.world_size(), op)?;
    let deadline = Instant::now() + plane.timeout();
    let fail = |detail: String| MoeError::ControlPlane {
        rank: me,
        detail: format!("{op}: {detail}"),
    };
    let offer = Offer::bind().map_err(|e| fail(e.to_string()))?;
    let host = Host::this();
    let mine = Record {
        host: host.clone(),
        bytes,
        socket: offer.name().to_vec(),
    };
    let records = plane.all_gather(group, op, mine.encode())?;
    let records = check_records(&records, group, at, &host, bytes, op)?;
    let peers: Vec<usize> = group.iter().copied().filter(|&r| r != me).collect();
    std::thread::scope(|s| {
        let server = s.spawn(|| offer.serve(fd, me, &peers, deadline));
        let fetched: Result<Vec<Option<OwnedFd>>> = group
            .iter()
            .zip(&records)
            .map(|(&member, record)| {
                if member == me {
                    return Ok(None);
                }
                fetch(&record.socket, me, member, deadline)
                    .map(Some)
                    .map_err(|e| fail(format!("rank {member}'s workspace: {e}")))
            })
            .collect();
        let served = server
            .join()
            .unwrap_or_else(|_| Err(handoff::HandoffError::NotFetched { missing: peers.clone() }));
        let fetched = fetched?;
        served.map_err(|e| fail(e.to_string()))?;
        Ok(fetched)
    })
}

/// Which host a rank runs on: its kernel's boot id (one per running kernel, shared by the
/// containers on it) and, for messages, its host name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    boot_id: String,
    name: String,
}

impl Host {
    /// The host this process runs on.
    pub fn this() -> Host {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let name = rustix::system::uname().nodename().to_string_lossy().into_owned();
        Host { boot_id, name }
    }

    /// Whether `other` is this host (by boot id; by name where either has none).
    pub fn same(&self, other: &Host) -> bool {
        if self.boot_id.is_empty() || other.boot_id.is_empty() {
            self.name == other.name
        } else {
            self.boot_id == other.boot_id
        }
    }

    /// The host name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Appends the host to `out`, for a peer's [`Self::decode`].
    pub fn encode(&self, out: &mut Vec<u8>) {
        for part in [self.boot_id.as_bytes(), self.name.as_bytes()] {
            put_part(out, part);
        }
    }

    /// The host at the start of `bytes` (from [`Self::encode`]), and the bytes after it; `None`
    /// when they do not start with one.
    pub fn decode(bytes: &[u8]) -> Option<(Host, &[u8])> {
        let (boot_id, rest) = take_part(bytes)?;
        let (name, rest) = take_part(rest)?;
        let host = Host {
            boot_id: String::from_utf8(boot_id.to_vec()).ok()?,
            name: String::from_utf8(name.to_vec()).ok()?,
        };
        Some((host, rest))
    }
}

/// Appends `part` with its length (u32 little-endian) before it.
fn put_part(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u32).to_le_bytes());
    out.extend_from_slice(part);
}

/// The part [`put_part`] wrote at the start of `bytes`, and the bytes after it.
fn take_part(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, tail) = bytes.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    (len <= tail.len()).then(|| tail.split_at(len))
}

/// What a rank tells its peers before the handoff.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    host: Host,
    /// The size of the workspace offered.
    bytes: u64,
    socket: Vec<u8>,
}

const RECORD_TAG: &[u8; 8] = b"moe-shm2";

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut b = RECORD_TAG.to_vec();
        b.extend_from_slice(&self.bytes.to_le_bytes());
        self.host.encode(&mut b);
        put_part(&mut b, &self.socket);
        b
    }

    /// The record in `bytes`, `None` unless they are exactly one record.
    fn decode(bytes: &[u8]) -> Option<Record> {
        let rest = bytes.strip_prefix(RECORD_TAG.as_slice())?;
        let (size, rest) = rest.split_first_chunk::<8>()?;
        let (host, rest) = Host::decode(rest)?;
        let (socket, rest) = take_part(rest)?;
        rest.is_empty().then(|| Record {
            host,
            bytes: u64::from_le_bytes(*size),
            socket: socket.to_vec(),
        })
    }
}

/// The peers' records, each checked: well formed, for the same size, on this host.
fn check_records(
    gathered: &[Vec<u8>],
    group: &[usize],
    at: usize,
    host: &Host,
    bytes: u64,
    op: &str,
) -> Result<Vec<Record>> {
    let me = group[at];
    gathered
        .iter()
        .zip(group)
        .map(|(sent, &member)| {
            let record = Record::decode(sent).ok_or_else(|| MoeError::ControlPlane {
                rank: me,
                detail: format!("{op}: rank {member} sent a malformed workspace record ({} bytes)", sent.len()),
            })?;
            if record.bytes != bytes {
                return Err(MoeError::ControlPlane {
                    rank: me,
                    detail: format!(
                        "{op}: rank {member} offers a workspace of {} bytes where this rank's has {bytes}: the ranks construct different layers",
                        record.bytes
                    ),
                });
            }
            if !record.host.same(host) {
                return Err(MoeError::Unsupported(format!(
                    "{op}: rank {me} (host {}) and rank {member} (host {}) run on different hosts, and a workspace is shared by memory only between ranks on one host; across hosts use allgather-rs",
                    host.name, record.host.name
                )));
            }
            Ok(record)
        })
        .collect()
}

#[cfg(test)]
mod tests;
