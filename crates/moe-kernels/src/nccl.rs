//! [`NcclComm`], an NCCL communicator whose collectives take device addresses, for allgather-rs.
//! cudarc's `Comm` takes only its own `CudaSlice`s, which come from the stream-ordered pool; the
//! backend hands its gathered buffers out as tensors and reduces the caller's tensors in place,
//! so it works on `DeviceBuffer`s and raw addresses.
//!
//! The collectives only enqueue on the GPU's stream: no allocation, no wait for the GPU. Where
//! the host does wait for the stream, [`poll_until`] bounds the wait and [`NcclComm::abort`]
//! releases this rank's NCCL kernels when a peer never joined. The waits inside NCCL's host
//! side are bounded too: the communicator is nonblocking, so joining it and launching a
//! collective (which waits for the other members at the join and at the first collectives, when
//! NCCL connects them) run in NCCL's background threads while the caller polls, for at most the
//! timeout given to [`NcclComm::new`], then aborts the communicator.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::nccl::result::NcclStatus;
use cudarc::nccl::{Id, result as nccl_result, sys as nccl_sys};

use moe_core::MoeError;
use moe_core::host::HostRank;

use crate::device::CudaDevice;
use crate::driver::driver;
use crate::error::KernelError;
use crate::gather::narrow;

/// One all-gather of [`NcclComm::all_gather`]: every rank's `bytes` bytes at `send` land at
/// `recv + rank * bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatherPart {
    pub send: u64,
    pub recv: u64,
    pub bytes: usize,
}

/// `NCCL_VERSION(major, minor, patch)` of nccl.h: the code NCCL compares releases by (releases
/// up to 2.8 used a narrower one).
const fn nccl_version(major: u32, minor: u32, patch: u32) -> u32 {
    if major <= 2 && minor <= 8 {
        major * 1000 + minor * 100 + patch
    } else {
        major * 10000 + minor * 100 + patch
    }
}

/// The release whose `ncclConfig_t` [`nonblocking_config`] declares: the layout of cudarc's
/// `nccl-02026` bindings, NCCL 2.26. NCCL copies a config up to its `size`, compares its
/// version only with the releases that added fields (all x.y.0, so the patch level changes
/// nothing) and gives the fields of later releases their defaults: newer libraries (2.28 on the
/// GPU hosts) take it as it is.
const CONFIG_VERSION: u32 = nccl_version(2, 26, 0);
/// `NCCL_API_MAGIC`: NCCL rejects a config without it as not made by `NCCL_CONFIG_INITIALIZER`.
const CONFIG_MAGIC: u32 = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`: the field takes NCCL's default, or its environment variable's.
const CONFIG_UNDEF_INT: c_int = c_int::MIN;

/// What `ncclConfig_t config = NCCL_CONFIG_INITIALIZER; config.blocking = 0;` gives. Every
/// field is spelled out, so bindings of another layout fail to compile here instead of handing
/// NCCL a config whose `size` and `version` disagree with its fields.
fn nonblocking_config() -> nccl_sys::ncclConfig_t {
    nccl_sys::ncclConfig_t {
        size: std::mem::size_of::<nccl_sys::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: CONFIG_UNDEF_INT,
        minCTAs: CONFIG_UNDEF_INT,
        maxCTAs: CONFIG_UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: CONFIG_UNDEF_INT,
        trafficClass: CONFIG_UNDEF_INT,
    }
}

/// What `ncclCommGetAsyncError` returning `call` with the state `state` says: `Ok(true)` once
/// the communicator is ready, `Ok(false)` while NCCL still works on it in the background
/// (ncclInProgress), the error otherwise (of the query itself, or of the communicator).
fn comm_state(call: nccl_sys::ncclResult_t, state: nccl_sys::ncclResult_t) -> Result<bool, nccl_sys::ncclResult_t> {
    use nccl_sys::ncclResult_t as R;
    match (call, state) {
        (R::ncclSuccess, R::ncclSuccess) => Ok(true),
        (R::ncclSuccess, R::ncclInProgress) => Ok(false),
        (R::ncclSuccess, error) | (error, _) => Err(error),
    }
}

/// Polls the state of `comm` while it is ncclInProgress, for at most `timeout`: `Ok(true)` once
/// it is ready, `Ok(false)` when the time ran out first, the error state otherwise.
fn await_ready(comm: nccl_sys::ncclComm_t, timeout: Duration) -> Result<bool, nccl_sys::ncclResult_t> {
    poll_until(timeout, || {
        let mut state = nccl_sys::ncclResult_t::ncclInProgress;
        // SAFETY: `comm` is a handle NCCL gave out and nothing released (ready or still being
        // built); `state` is a local the call writes.
        let call = unsafe { nccl_sys::ncclCommGetAsyncError(comm, &mut state) };
        comm_state(call, state)
    })
}

/// One rank's NCCL communicator, with collectives on device addresses, enqueued on its GPU's
/// stream. Collective: every member joins at once (each from its own thread), and every member
/// must make the same calls in the same order, or the others' collectives wait on their streams
/// (NCCL bounds no wait): whoever waits for the stream bounds that wait (see [`poll_until`])
/// and then [`Self::abort`]s the communicator, which makes this rank's NCCL kernels exit.
///
/// The communicator is nonblocking (`blocking = 0`, NCCL's fault-tolerance mode, in which
/// `ncclCommAbort` may be called at any point): NCCL's host-side work that waits for the other
/// members, joining the communicator and the launch of a collective (which connects the members
/// at their first collectives), runs in a background thread of NCCL, and the call returns
/// ncclInProgress. The calls here then poll the communicator's state until it is ready, for at
/// most the timeout given to [`Self::new`], before returning (NCCL allows no other call on the
/// communicator, and no work on its stream, until then); when the time runs out they abort the
/// communicator and fail with [`KernelError::NcclInitTimeout`] or [`KernelError::NcclTimeout`].
/// `NCCL_COMM_BLOCKING=1` in the environment overrides the config and makes these waits
/// unbounded again.
#[derive(Debug)]
pub struct NcclComm {
    /// `None` once aborted.
    comm: Option<nccl_sys::ncclComm_t>,
    gpu: Arc<CudaDevice>,
    rank: usize,
    ranks: usize,
    /// The bound of each wait for NCCL's background work: the join, and each call's launch.
    timeout: Duration,
}

// SAFETY: the handle is what makes the communicator !Send (a raw pointer). NCCL allows a
// communicator to be used from any thread as long as calls on it are not concurrent; every
// call here takes `&mut self`, and the type is not Sync.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Rank `rank` of `ranks` joins the communicator `id` (made once with `Id::new` and handed
    /// to every member) on `gpu`, waiting at most `timeout` for every member to join; `timeout`
    /// also bounds NCCL's work for each later call (see the type's docs). When a member has not
    /// joined by then, this rank aborts its half-built communicator and fails with
    /// [`KernelError::NcclInitTimeout`]; so `timeout` must leave room for NCCL's initialization
    /// itself (on the order of a second).
    pub fn new(
        gpu: &Arc<CudaDevice>,
        rank: usize,
        ranks: usize,
        id: &Id,
        timeout: Duration,
    ) -> Result<Self, KernelError> {
        if rank >= ranks {
            return Err(KernelError::InvalidArgument(format!(
                "NCCL rank {rank} of a {ranks}-rank communicator: ranks are 0..{ranks}"
            )));
        }
        // NCCL takes the device from the thread's current context.
        gpu.context().bind_to_thread().map_err(driver("bind context"))?;
        let mut comm: nccl_sys::ncclComm_t = std::ptr::null_mut();
        let unique = nccl_sys::ncclUniqueId {
            internal: *id.internal(),
        };
        let (n, r) = (narrow("ranks", ranks)? as c_int, narrow("rank", rank)? as c_int);
        let mut config = nonblocking_config();
        // SAFETY: `comm` is a local the call initializes and `config` one it reads (NCCL copies
        // it); the id is a value NCCL made.
        let started = unsafe { nccl_result::comm_init_rank_config(&mut comm, n, unique, r, &mut config) };
        // The handle is out while NCCL still joins (ncclInProgress), so that a timeout can abort it.
        let joined = match started {
            Ok(_) => await_ready(comm, timeout),
            Err(e) => Err(e.0),
        };
        let error = match joined {
            Ok(true) => {
                return Ok(NcclComm {
                    comm: Some(comm),
                    gpu: gpu.clone(),
                    rank,
                    ranks,
                    timeout,
                });
            }
            Ok(false) => KernelError::NcclInitTimeout { rank, ranks, timeout },
            // Read before the abort, which may leave errors of its own.
            Err(code) => Self::failure(comm, "ncclCommInitRankConfig", code),
        };
        if !comm.is_null() {
            // SAFETY: the handle came from ncclCommInitRankConfig and is dropped here: the abort
            // stops NCCL's background join and joins its thread before freeing the communicator.
            // The join's error is the one to report; a failed abort leaves nothing more to do.
            let _ = unsafe { nccl_result::comm_abort(comm) };
        }
        Err(error)
    }

    /// This member's rank in the communicator.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of members.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Fails with [`KernelError::NcclAborted`] naming `op` once the communicator was aborted.
    pub fn ensure_live(&self, op: &'static str) -> Result<(), KernelError> {
        self.handle(op).map(|_| ())
    }

    fn handle(&self, op: &'static str) -> Result<nccl_sys::ncclComm_t, KernelError> {
        self.comm.ok_or(KernelError::NcclAborted { op })
    }

    /// Aborts the communicator (`ncclCommAbort`): this rank's NCCL kernels still on the stream
    /// (a collective a peer never joined) exit without completing, so the stream drains, NCCL's
    /// background work on it stops, and every later call fails with
    /// [`KernelError::NcclAborted`]. The peers' communicators are not touched: each rank aborts
    /// its own. Does nothing once aborted.
    pub fn abort(&mut self) -> Result<(), KernelError> {
        let Some(comm) = self.comm else {
            return Ok(());
        };
        // NCCL frees the communicator's device memory in the current context.
        self.gpu.context().bind_to_thread().map_err(driver("bind context"))?;
        self.comm = None;
        // SAFETY: the handle came from ncclCommInitRankConfig and `self.comm` no longer holds
        // it, so it is released exactly once. ncclCommAbort blocks even on a nonblocking
        // communicator (it joins NCCL's background work): it never leaves ncclInProgress to
        // wait for, and the handle is gone once it returns.
        unsafe { nccl_result::comm_abort(comm) }.map_err(|e| KernelError::Nccl {
            op: "ncclCommAbort",
            message: format!("{:?}", e.0),
        })?;
        Ok(())
    }

    /// The error `code` of `op`, with NCCL's last error text.
    fn failure(comm: nccl_sys::ncclComm_t, op: &'static str, code: nccl_sys::ncclResult_t) -> KernelError {
        // SAFETY: NCCL returns a static C string; it keeps one last error for the process and
        // does not read the handle, which may be null (a join that failed at once).
        let last = unsafe { nccl_sys::ncclGetLastError(comm) };
        let detail = if last.is_null() {
            String::new()
        } else {
            // SAFETY: non-null, NUL-terminated, valid until the next NCCL call.
            unsafe { CStr::from_ptr(last) }.to_string_lossy().into_owned()
        };
        KernelError::Nccl {
            op,
            message: if detail.is_empty() {
                format!("{code:?}")
            } else {
                format!("{code:?}: {detail}")
            },
        }
    }

    fn error(comm: nccl_sys::ncclComm_t, op: &'static str) -> impl Fn(nccl_result::NcclError) -> KernelError {
        move |e| Self::failure(comm, op, e.0)
    }

    /// Finishes `op`, which returned `r`. A call NCCL still carries out in the background
    /// (ncclInProgress, as the launch of a group or of a collective outside one) is waited for,
    /// at most the timeout, by polling the communicator's state: NCCL allows no other call on
    /// the communicator, and no work on its stream (which the launch has not reached yet),
    /// before it is ready. A call that returned ncclSuccess is done and costs no poll. A
    /// timeout is returned as [`KernelError::NcclTimeout`] without aborting (see
    /// [`Self::abort_on_timeout`]).
    fn settle(
        &self,
        comm: nccl_sys::ncclComm_t,
        op: &'static str,
        r: Result<NcclStatus, nccl_result::NcclError>,
    ) -> Result<(), KernelError> {
        match r.map_err(Self::error(comm, op))? {
            NcclStatus::Success => Ok(()),
            NcclStatus::InProgress => match await_ready(comm, self.timeout) {
                Ok(true) => Ok(()),
                Ok(false) => Err(KernelError::NcclTimeout {
                    op,
                    rank: self.rank,
                    ranks: self.ranks,
                    timeout: self.timeout,
                }),
                Err(code) => Err(Self::failure(comm, op, code)),
            },
            NcclStatus::NumResults => Err(KernelError::Nccl {
                op,
                message: "ncclNumResults, which is no result code (NCCL returns it for no call)".to_string(),
            }),
        }
    }

    /// Aborts the communicator when `result` is a timeout of [`Self::settle`]: only the abort
    /// stops NCCL's background work, and no call may follow on a communicator still in
    /// progress. Called once the thread's NCCL group is closed: an abort inside an open group
    /// would be deferred to the group's end.
    fn abort_on_timeout(&mut self, result: Result<(), KernelError>) -> Result<(), KernelError> {
        if matches!(result, Err(KernelError::NcclTimeout { .. })) {
            // The timeout is the error to report; an abort that could not start leaves the
            // handle to Drop, which tries again.
            let _ = self.abort();
        }
        result
    }

    fn stream(&self) -> nccl_sys::cudaStream_t {
        self.gpu.stream().cu_stream() as nccl_sys::cudaStream_t
    }

    /// Enqueues the all-gathers of `parts` (parts of zero bytes are skipped) as one NCCL group,
    /// which NCCL runs as one launch.
    ///
    /// # Safety
    /// For each part, `send` must be `bytes` readable bytes and `recv` `ranks * bytes` writable
    /// bytes on this GPU, not overlapping except as NCCL's in-place form, valid until the
    /// collective ran on the stream; every member must enqueue the same parts.
    pub unsafe fn all_gather(&mut self, parts: &[GatherPart]) -> Result<(), KernelError> {
        let parts: Vec<&GatherPart> = parts.iter().filter(|p| p.bytes > 0).collect();
        self.grouped("ncclAllGather", parts.len(), |i, comm, stream| {
            let part = parts[i];
            // SAFETY: the caller guarantees both ranges; bytes are counted as ncclUint8.
            unsafe {
                nccl_result::all_gather(
                    part.send as *const c_void,
                    part.recv as *mut c_void,
                    part.bytes,
                    nccl_sys::ncclDataType_t::ncclUint8,
                    comm,
                    stream,
                )
            }
        })
    }

    /// Enqueues `calls` collectives as one NCCL group, which NCCL runs as one launch:
    /// `enqueue(i, comm, stream)` enqueues the `i`th. The group is closed whatever happened
    /// inside it; a timeout there (the common case: the launch) is what leaves the communicator
    /// in progress, so it wins, and aborts the communicator.
    fn grouped(
        &mut self,
        op: &'static str,
        calls: usize,
        mut enqueue: impl FnMut(
            usize,
            nccl_sys::ncclComm_t,
            nccl_sys::cudaStream_t,
        ) -> Result<NcclStatus, nccl_result::NcclError>,
    ) -> Result<(), KernelError> {
        let comm = self.handle(op)?;
        self.gpu.context().bind_to_thread().map_err(driver("bind context"))?;
        let opened = nccl_result::group_start().map_err(Self::error(comm, "ncclGroupStart"))?;
        let mut enqueued = self.settle(comm, "ncclGroupStart", Ok(opened));
        for i in 0..calls {
            if enqueued.is_err() {
                break;
            }
            let r = enqueue(i, comm, self.stream());
            enqueued = self.settle(comm, op, r);
        }
        let ended = self.settle(comm, "ncclGroupEnd", nccl_result::group_end());
        let result = match ended {
            Err(timeout @ KernelError::NcclTimeout { .. }) => Err(timeout),
            ended => enqueued.and(ended),
        };
        self.abort_on_timeout(result)
    }

    /// Enqueues an f32 sum reduce-scatter: every rank gives `ranks * count` values at `send`
    /// and gets the sum of every rank's block `rank` at `recv` (`count` values).
    ///
    /// # Safety
    /// `send` must hold `ranks * count` f32 and `recv` room for `count` f32, on this GPU, valid
    /// until the collective ran on the stream; every member must make the same call.
    pub unsafe fn reduce_scatter_sum_f32(&mut self, send: u64, recv: u64, count: usize) -> Result<(), KernelError> {
        let comm = self.handle("ncclReduceScatter")?;
        self.gpu.context().bind_to_thread().map_err(driver("bind context"))?;
        // SAFETY: the caller guarantees both ranges.
        let r = unsafe {
            nccl_result::reduce_scatter(
                send as *const c_void,
                recv as *mut c_void,
                count,
                nccl_sys::ncclDataType_t::ncclFloat32,
                nccl_sys::ncclRedOp_t::ncclSum,
                comm,
                self.stream(),
            )
        };
        let launched = self.settle(comm, "ncclReduceScatter", r);
        self.abort_on_timeout(launched)
    }
}

/// The element types [`NcclComm::all_reduce_sum`] sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SumType {
    Bf16,
    F16,
    F32,
}

impl SumType {
    fn nccl(self) -> nccl_sys::ncclDataType_t {
        match self {
            SumType::Bf16 => nccl_sys::ncclDataType_t::ncclBfloat16,
            SumType::F16 => nccl_sys::ncclDataType_t::ncclFloat16,
            SumType::F32 => nccl_sys::ncclDataType_t::ncclFloat32,
        }
    }
}

/// One broadcast of [`NcclComm::broadcasts`]: member `root`'s `bytes` bytes at `at` land at
/// `at` on every member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BroadcastPart {
    pub root: usize,
    pub at: u64,
    pub bytes: usize,
}

impl NcclComm {
    /// Enqueues an in-place sum of `count` values of type `ty` at `at` over the communicator.
    ///
    /// # Safety
    /// `at` must hold `count` values on this GPU, valid until the collective ran on the
    /// stream; every member must make the same call.
    pub unsafe fn all_reduce_sum(&mut self, at: u64, count: usize, ty: SumType) -> Result<(), KernelError> {
        let comm = self.handle("ncclAllReduce")?;
        self.gpu.context().bind_to_thread().map_err(driver("bind context"))?;
        // SAFETY: the caller guarantees the range; NCCL's in-place form (send == recv).
        let r = unsafe {
            nccl_result::all_reduce(
                at as *const c_void,
                at as *mut c_void,
                count,
                ty.nccl(),
                nccl_sys::ncclRedOp_t::ncclSum,
                comm,
                self.stream(),
            )
        };
        let launched = self.settle(comm, "ncclAllReduce", r);
        self.abort_on_timeout(launched)
    }

    /// Enqueues the broadcasts of `parts` (parts of zero bytes are skipped) as one NCCL group,
    /// in place: each part's root sends the bytes it holds at `at`, and the others receive them
    /// at their `at`.
    ///
    /// # Safety
    /// Each part's range must be `bytes` bytes on this GPU, valid until the collectives ran on
    /// the stream, the parts must not overlap, and every member must enqueue the same parts.
    pub unsafe fn broadcasts(&mut self, parts: &[BroadcastPart]) -> Result<(), KernelError> {
        let parts = parts
            .iter()
            .filter(|p| p.bytes > 0)
            .map(|p| Ok((p, narrow("root", p.root)? as c_int)))
            .collect::<Result<Vec<_>, KernelError>>()?;
        self.grouped("ncclBroadcast", parts.len(), |i, comm, stream| {
            let (part, root) = parts[i];
            // SAFETY: the caller guarantees the range; bytes are counted as ncclUint8.
            unsafe {
                nccl_result::broadcast(
                    part.at as *const c_void,
                    part.at as *mut c_void,
                    part.bytes,
                    nccl_sys::ncclDataType_t::ncclUint8,
                    root,
                    comm,
                    stream,
                )
            }
        })
    }
}

/// A communicator id the first member of `group` makes and every member receives through
/// `host`'s control plane as its 128 bytes (so across processes and hosts too), checked before
/// use; `op` names it in errors. Collective over `group`.
pub fn share_id(host: &HostRank, group: &[usize], op: &str) -> moe_core::Result<Id> {
    let bytes = host.share_bytes_from_first(group, op, || {
        new_id_bytes().map_err(|e| format!("making the NCCL id: {e}"))
    })?;
    id_from_bytes(&bytes).ok_or_else(|| MoeError::ControlPlane {
        rank: host.rank(),
        detail: format!("{op}: rank {} sent {} bytes, an NCCL id has 128", group[0], bytes.len()),
    })
}

/// A new communicator id as its 128 bytes.
fn new_id_bytes() -> Result<Vec<u8>, KernelError> {
    let id = Id::new().map_err(|e| KernelError::Driver {
        op: "ncclGetUniqueId",
        message: format!("{:?}", e.0),
    })?;
    Ok(id.internal().map(|b| b as u8).to_vec())
}

/// The communicator id whose 128 bytes are `bytes` (from a peer), `None` when they are not 128.
fn id_from_bytes(bytes: &[u8]) -> Option<Id> {
    let bytes: &[u8; 128] = bytes.try_into().ok()?;
    Some(Id::uninit(bytes.map(|b| b as c_char)))
}

/// How long dropping a communicator waits for this rank's collectives still on the stream.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

impl Drop for NcclComm {
    /// Unless already aborted: waits (at most [`DRAIN_TIMEOUT`]) for this rank's collectives
    /// still on the stream, which the peers' matching ones may need, then aborts the
    /// communicator: what is still in flight then (a collective a peer never joined) is
    /// abandoned rather than waited for.
    fn drop(&mut self) {
        if self.comm.is_none() {
            return;
        }
        let stream = self.gpu.stream().cu_stream();
        if self.gpu.context().bind_to_thread().is_ok() {
            let _ = poll_until(DRAIN_TIMEOUT, || {
                // SAFETY: a query on this GPU's live stream.
                match unsafe { cudarc::driver::sys::cuStreamQuery(stream) } {
                    cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => Ok::<_, std::convert::Infallible>(false),
                    _ => Ok(true),
                }
            });
        }
        let _ = self.abort();
    }
}

/// How long [`poll_until`] yields between polls before it sleeps between them instead.
const SPIN: Duration = Duration::from_millis(2);
/// How long [`poll_until`] sleeps between polls after [`SPIN`].
const POLL_INTERVAL: Duration = Duration::from_micros(100);

/// Polls `done` until it returns `Ok(true)` or fails, for at most `timeout` from the call:
/// `Ok(false)` when the time ran out with `done` still false (it is polled at least once, the
/// last time when `timeout` had passed). Between polls it yields the thread for the first
/// [`SPIN`], then sleeps [`POLL_INTERVAL`], so a short wait costs little latency and a long
/// one little CPU.
///
/// The bounded replacement of a blocking stream or event synchronization: `done` queries the
/// stream or an event recorded on it (`CudaEvent::try_is_complete`).
pub fn poll_until<E>(timeout: Duration, mut done: impl FnMut() -> Result<bool, E>) -> Result<bool, E> {
    let start = Instant::now();
    loop {
        let waited = start.elapsed();
        if done()? {
            return Ok(true);
        }
        if waited >= timeout {
            return Ok(false);
        }
        if waited < SPIN {
            std::thread::yield_now();
        } else {
            std::thread::sleep(POLL_INTERVAL.min(timeout - waited));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_crosses_a_control_plane_as_its_128_bytes_and_other_lengths_are_refused() {
        let bytes: Vec<u8> = (0..128u8).collect();
        let id = id_from_bytes(&bytes).unwrap();
        assert_eq!(id.internal().map(|b| b as u8).to_vec(), bytes);
        assert!(id_from_bytes(&bytes[..127]).is_none());
        assert!(id_from_bytes(&[bytes.clone(), vec![0]].concat()).is_none());
    }

    #[test]
    fn nccl_version_encodes_releases_as_nccl_h_does() {
        assert_eq!(nccl_version(2, 8, 4), 2804);
        assert_eq!(nccl_version(2, 9, 6), 20906);
        assert_eq!(nccl_version(2, 26, 0), 22600);
        assert_eq!(nccl_version(2, 28, 3), 22803);
        assert!(
            CONFIG_VERSION <= nccl_version(2, 28, 3),
            "the config must declare no release newer than the GPU hosts' NCCL 2.28.3"
        );
    }

    #[test]
    fn the_config_is_nccl_config_initializer_of_2_26_with_blocking_off() {
        let c = nonblocking_config();
        // sizeof(ncclConfig_t) of NCCL 2.26 on a 64-bit target: through trafficClass.
        assert_eq!(c.size, 48);
        assert_eq!(c.size, std::mem::size_of::<nccl_sys::ncclConfig_t>());
        assert_eq!(c.magic, 0xcafe_beef);
        assert_eq!(c.version, 22600);
        assert_eq!(c.blocking, 0);
        for (field, value) in [
            ("cgaClusterSize", c.cgaClusterSize),
            ("minCTAs", c.minCTAs),
            ("maxCTAs", c.maxCTAs),
            ("splitShare", c.splitShare),
            ("trafficClass", c.trafficClass),
        ] {
            assert_eq!(value, i32::MIN, "{field} must be NCCL_CONFIG_UNDEF_INT");
        }
        assert!(c.netName.is_null(), "netName must be NCCL_CONFIG_UNDEF_PTR");
    }

    #[test]
    fn the_communicator_state_is_ready_in_progress_or_an_error() {
        use nccl_sys::ncclResult_t as R;
        assert_eq!(comm_state(R::ncclSuccess, R::ncclSuccess), Ok(true));
        assert_eq!(comm_state(R::ncclSuccess, R::ncclInProgress), Ok(false));
        assert_eq!(comm_state(R::ncclSuccess, R::ncclRemoteError), Err(R::ncclRemoteError));
        // A query that failed says nothing of the state it left.
        assert_eq!(
            comm_state(R::ncclInvalidArgument, R::ncclInProgress),
            Err(R::ncclInvalidArgument)
        );
        assert_eq!(
            comm_state(R::ncclInvalidArgument, R::ncclSuccess),
            Err(R::ncclInvalidArgument)
        );
    }

    #[test]
    fn poll_until_returns_as_soon_as_done_holds() {
        let mut polls = 0;
        let start = Instant::now();
        let done = poll_until(Duration::from_secs(10), || {
            polls += 1;
            Ok::<_, ()>(polls == 5)
        });
        assert_eq!(done, Ok(true));
        assert_eq!(polls, 5);
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    }

    #[test]
    fn poll_until_gives_up_after_the_timeout_having_polled_to_the_end() {
        let timeout = Duration::from_millis(30);
        let start = Instant::now();
        let mut last = start;
        let done = poll_until(timeout, || {
            last = Instant::now();
            Ok::<_, ()>(false)
        });
        assert_eq!(done, Ok(false));
        assert!(start.elapsed() >= timeout);
        assert!(last - start >= timeout, "the last poll came {:?} in", last - start);
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    }

    #[test]
    fn poll_until_polls_once_with_no_time_and_passes_errors_through() {
        let mut polls = 0;
        let done = poll_until(Duration::ZERO, || {
            polls += 1;
            Ok::<_, ()>(false)
        });
        assert_eq!((done, polls), (Ok(false), 1));
        assert_eq!(
            poll_until(Duration::from_secs(10), || Err::<bool, _>("query failed")),
            Err("query failed")
        );
    }
}
