//! A memfd segment of 32-bit words mapped shared into this process: created zeroed and sealed
//! at its size by the rank that owns it, mapped by its peers from the descriptor it hands them.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;

use moe_core::host::WordMemory;
use rustix::fs::{MemfdFlags, SealFlags, fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create};
use rustix::mm::{MapFlags, ProtFlags, mmap, munmap};

/// Why a segment could not be made or mapped.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("{words} words do not fit a segment of this machine's address space")]
    TooLarge { words: usize },
    #[error("the segment holds {held} bytes, {wanted} were agreed: a peer's descriptor is refused")]
    TooSmall { held: u64, wanted: usize },
    #[error(
        "the segment is not sealed against shrinking, so its owner could cut it under this rank's mapping: refused"
    )]
    NotSealed,
    #[error("{what}: {source}")]
    Os { what: &'static str, source: io::Error },
}

fn os(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> SegmentError {
    move |e| SegmentError::Os { what, source: e.into() }
}

/// `words` 32-bit words of a memfd, mapped shared; unmapped on drop. Peers that map the same
/// descriptor see the same words.
#[derive(Debug)]
pub struct Segment {
    /// The mapping's start (dangling, never read, for an empty segment).
    start: NonNull<AtomicU32>,
    words: usize,
}

// SAFETY: the mapping is reached only through `&[AtomicU32]` (`WordMemory::words`), and atomic
// words may be shared and sent between threads; the mapping stays valid until `Drop`, which
// needs `&mut self`.
unsafe impl Send for Segment {}
// SAFETY: as for `Send`: every access through a shared reference is atomic.
unsafe impl Sync for Segment {}

impl Segment {
    /// A new segment of `words` zeroed words, sealed at its size, and the descriptor that shares
    /// it.
    pub fn create(words: usize) -> Result<(Segment, OwnedFd), SegmentError> {
        let bytes = bytes_of(words)?;
        let fd = memfd_create("moe-workspace", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(os("memfd_create"))?;
        ftruncate(&fd, bytes as u64).map_err(os("ftruncate of the segment"))?;
        // No process that maps it can then shrink it under a peer (a fault on access) or grow it.
        fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(os("sealing the segment"))?;
        let segment = Segment::map(fd.as_fd(), words)?;
        Ok((segment, fd))
    }

    /// Maps `words` words of the segment behind `fd` (a peer's): refused unless it holds that
    /// many and is sealed against shrinking.
    pub fn map(fd: BorrowedFd<'_>, words: usize) -> Result<Segment, SegmentError> {
        let bytes = bytes_of(words)?;
        let held = fstat(fd).map_err(os("fstat of the segment"))?.st_size;
        if held < 0 || (held as u64) < bytes as u64 {
            return Err(SegmentError::TooSmall {
                held: held.max(0) as u64,
                wanted: bytes,
            });
        }
        let seals = fcntl_get_seals(fd).map_err(os("reading the segment's seals"))?;
        if !seals.contains(SealFlags::SHRINK) {
            return Err(SegmentError::NotSealed);
        }
        if bytes == 0 {
            return Ok(Segment {
                start: NonNull::dangling(),
                words: 0,
            });
        }
        // SAFETY: a new mapping at an address the kernel chooses (no hint), so no existing
        // memory is replaced; `fd` holds at least `bytes` bytes and cannot shrink (checked
        // above), so every mapped page is backed.
        let start = unsafe {
            mmap(
                std::ptr::null_mut(),
                bytes,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }
        .map_err(os("mmap of the segment"))?;
        let start = NonNull::new(start.cast::<AtomicU32>()).ok_or(SegmentError::Os {
            what: "mmap of the segment",
            source: io::Error::other("a null mapping"),
        })?;
        Ok(Segment { start, words })
    }
}

impl WordMemory for Segment {
    fn words(&self) -> &[AtomicU32] {
        // SAFETY: `start` begins a live shared mapping of `words * 4` bytes (or dangles for no
        // words), page-aligned and so aligned for AtomicU32, valid while `self` lives. Every
        // access to it, here and in peers' processes, is through atomic words.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.words) }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.words == 0 {
            return;
        }
        // SAFETY: `start` and `words * 4` are exactly the mapping `map` made, and no reference
        // into it outlives `self` (the slices `words` hands out borrow `self`).
        // A failure would leave the mapping until the process exits; nothing else can be done.
        let _ = unsafe { munmap(self.start.as_ptr().cast(), self.words * 4) };
    }
}

fn bytes_of(words: usize) -> Result<usize, SegmentError> {
    words
        .checked_mul(4)
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or(SegmentError::TooLarge { words })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn two_mappings_of_one_descriptor_see_the_same_words() {
        let (a, fd) = Segment::create(1000).unwrap();
        let b = Segment::map(fd.as_fd(), 1000).unwrap();
        assert!(
            a.words().iter().all(|w| w.load(Ordering::Relaxed) == 0),
            "created zeroed"
        );
        a.words()[999].store(0xdead_beef, Ordering::Release);
        assert_eq!(b.words()[999].load(Ordering::Acquire), 0xdead_beef);
    }

    #[test]
    fn a_descriptor_smaller_than_agreed_is_refused() {
        let (_a, fd) = Segment::create(10).unwrap();
        let e = Segment::map(fd.as_fd(), 11).unwrap_err();
        assert!(matches!(e, SegmentError::TooSmall { held: 40, wanted: 44 }), "{e}");
    }

    #[test]
    fn an_unsealed_descriptor_is_refused() {
        let fd = memfd_create("unsealed", MemfdFlags::CLOEXEC).unwrap();
        ftruncate(&fd, 64).unwrap();
        let e = Segment::map(fd.as_fd(), 16).unwrap_err();
        assert!(matches!(e, SegmentError::NotSealed), "{e}");
    }

    #[test]
    fn a_sealed_segment_cannot_be_shrunk() {
        let (_a, fd) = Segment::create(16).unwrap();
        assert!(ftruncate(&fd, 4).is_err());
    }
}
