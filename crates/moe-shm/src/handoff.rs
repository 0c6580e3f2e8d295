//! Handing a segment's descriptor to the peers that map it: each rank listens on a Unix-domain
//! socket in Linux's abstract namespace (no file, gone when closed) and sends its descriptor
//! with SCM_RIGHTS to every peer that connects and names itself; every wait ends by a deadline.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
    recvmsg, sendmsg,
};

/// What a rank sends with its descriptor: this tag, then its world rank (u32 little-endian).
const TAG: &[u8; 8] = b"moe-shm1";
const HEADER: usize = TAG.len() + 4;

/// Why a descriptor did not change hands.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("{what}: {source}")]
    Os { what: String, source: io::Error },
    #[error("rank(s) {missing:?} did not fetch this rank's segment within the timeout")]
    NotFetched { missing: Vec<usize> },
    #[error("rank {from} did not hand over its segment within the timeout")]
    NotHanded { from: usize },
    #[error("a connection to this rank's segment sent {got}, not the rank of a member that has not fetched it yet")]
    Stranger { got: String },
    #[error("rank {from}'s socket answered with {got}, not its segment")]
    BadAnswer { from: usize, got: String },
}

fn os(what: impl Into<String>) -> impl FnOnce(io::Error) -> HandoffError {
    let what = what.into();
    move |source| HandoffError::Os { what, source }
}

/// Time left until `deadline`, at least a millisecond (a zero timeout means none to std).
fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// A socket this rank's peers fetch its descriptor from.
#[derive(Debug)]
pub struct Offer {
    listener: UnixListener,
    name: Vec<u8>,
}

impl Offer {
    /// Listens on a new abstract name, unique on this host: the process, a counter and the time.
    pub fn bind() -> Result<Offer, HandoffError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let name = format!(
            "moe-shm/{}/{}/{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
        .into_bytes();
        let addr = SocketAddr::from_abstract_name(&name).map_err(os("naming the segment's socket"))?;
        let listener = UnixListener::bind_addr(&addr).map_err(os("binding the segment's socket"))?;
        listener
            .set_nonblocking(true)
            .map_err(os("making the segment's socket non-blocking"))?;
        Ok(Offer { listener, name })
    }

    /// The abstract name peers connect to.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Sends `fd`, with this rank's world rank `me`, to each of `peers` (world ranks) as it
    /// connects and names itself, until all have it or `deadline` passes.
    pub fn serve(&self, fd: BorrowedFd<'_>, me: usize, peers: &[usize], deadline: Instant) -> Result<(), HandoffError> {
        let mut missing: Vec<usize> = peers.to_vec();
        while !missing.is_empty() {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(HandoffError::NotFetched { missing });
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => return Err(os("accepting a peer on the segment's socket")(e)),
            };
            // A stranger's connection (another rank number, or one that says nothing in time)
            // is dropped; the members' still get the descriptor.
            match Self::hand_over(&stream, fd, me, &missing, deadline) {
                Ok(peer) => missing.retain(|&r| r != peer),
                Err(HandoffError::Stranger { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads the connecting peer's rank (one of `missing`) and sends it `fd`; returns the rank.
    fn hand_over(
        stream: &UnixStream,
        fd: BorrowedFd<'_>,
        me: usize,
        missing: &[usize],
        deadline: Instant,
    ) -> Result<usize, HandoffError> {
        stream
            .set_nonblocking(false)
            .map_err(os("configuring a peer's connection"))?;
        stream
            .set_read_timeout(Some(left(deadline)))
            .map_err(os("configuring a peer's connection"))?;
        stream
            .set_write_timeout(Some(left(deadline)))
            .map_err(os("configuring a peer's connection"))?;
        let mut said = [0u8; 4];
        (&*stream)
            .read_exact(&mut said)
            .map_err(os("reading a peer's rank on the segment's socket"))?;
        let peer = u32::from_le_bytes(said) as usize;
        if !missing.contains(&peer) {
            return Err(HandoffError::Stranger {
                got: format!("rank {peer}"),
            });
        }
        let mut header = [0u8; HEADER];
        header[..TAG.len()].copy_from_slice(TAG);
        header[TAG.len()..].copy_from_slice(&(me as u32).to_le_bytes());
        let fds = [fd];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        let sent = sendmsg(
            stream.as_fd(),
            &[IoSlice::new(&header)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(|e| os(format!("sending the segment to rank {peer}"))(e.into()))?;
        if sent != HEADER {
            return Err(os(format!("sending the segment to rank {peer}"))(io::Error::other(
                format!("{sent} of {HEADER} bytes sent"),
            )));
        }
        Ok(peer)
    }
}

/// Fetches the descriptor rank `from` offers under `name`, saying this rank is `me`, by
/// `deadline`.
pub fn fetch(name: &[u8], me: usize, from: usize, deadline: Instant) -> Result<OwnedFd, HandoffError> {
    let addr = SocketAddr::from_abstract_name(name).map_err(os(format!("naming rank {from}'s socket")))?;
    let stream = UnixStream::connect_addr(&addr).map_err(os(format!(
        "connecting to rank {from}'s segment socket (ranks that share memory must run on one host, in one network namespace)"
    )))?;
    stream
        .set_read_timeout(Some(left(deadline)))
        .map_err(os("configuring the connection"))?;
    stream
        .set_write_timeout(Some(left(deadline)))
        .map_err(os("configuring the connection"))?;
    (&stream)
        .write_all(&(me as u32).to_le_bytes())
        .map_err(os(format!("naming this rank to rank {from}")))?;
    let mut header = [0u8; HEADER];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        stream.as_fd(),
        &mut [IoSliceMut::new(&mut header)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::WAITALL,
    );
    let got = match got {
        Ok(got) => got,
        Err(e) if e == rustix::io::Errno::AGAIN => return Err(HandoffError::NotHanded { from }),
        Err(e) => return Err(os(format!("receiving rank {from}'s segment"))(e.into())),
    };
    let mut fds: Vec<OwnedFd> = control
        .drain()
        .filter_map(|m| match m {
            RecvAncillaryMessage::ScmRights(fds) => Some(fds),
            _ => None,
        })
        .flatten()
        .collect();
    let says = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if got.bytes != HEADER || &header[..TAG.len()] != TAG || says != from || fds.len() != 1 {
        return Err(HandoffError::BadAnswer {
            from,
            got: format!(
                "{} bytes ({:?}) and {} descriptor(s)",
                got.bytes,
                String::from_utf8_lossy(&header[..got.bytes.min(HEADER)]),
                fds.len()
            ),
        });
    }
    Ok(fds.remove(0))
}

#[cfg(test)]
mod tests {
    use moe_core::host::WordMemory;

    use super::*;
    use crate::segment::Segment;

    /// Rank 0 offers a segment of 4 words to rank 1 on a thread while `fetching` runs; returns
    /// what `fetching` returned, the segment, and its descriptor.
    fn offered<T: Send>(fetching: impl FnOnce(&Offer, Instant) -> T + Send) -> (T, Segment, OwnedFd, Offer) {
        let offer = Offer::bind().unwrap();
        let (segment, fd) = Segment::create(4).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = std::thread::scope(|s| {
            let server = s.spawn(|| offer.serve(fd.as_fd(), 0, &[1], deadline));
            let got = fetching(&offer, deadline);
            server.join().unwrap().unwrap();
            got
        });
        (got, segment, fd, offer)
    }

    #[test]
    fn a_descriptor_changes_hands_and_a_missing_peer_is_named() {
        let (theirs, segment, fd, offer) = offered(|offer, deadline| fetch(offer.name(), 1, 0, deadline).unwrap());
        let mapped = Segment::map(theirs.as_fd(), 4).unwrap();
        segment.words()[3].store(7, Ordering::Release);
        assert_eq!(mapped.words()[3].load(Ordering::Acquire), 7);
        let e = offer
            .serve(fd.as_fd(), 0, &[2, 3], Instant::now() + Duration::from_millis(50))
            .unwrap_err();
        assert!(
            matches!(&e, HandoffError::NotFetched { missing } if missing == &[2, 3]),
            "{e}"
        );
    }

    #[test]
    fn a_connection_naming_another_rank_gets_nothing_and_the_member_still_does() {
        offered(|offer, deadline| {
            let e = fetch(offer.name(), 5, 0, deadline).unwrap_err();
            assert!(matches!(&e, HandoffError::BadAnswer { from: 0, .. }), "{e}");
            fetch(offer.name(), 1, 0, deadline).unwrap();
        });
    }

    #[test]
    fn nobody_listening_is_an_error_at_once() {
        let e = fetch(b"moe-shm/nobody", 1, 0, Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("one host"), "{e}");
    }
}
