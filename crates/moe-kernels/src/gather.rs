//! The device side of allgather-rs: launchers of its kernels (`kernels/gather.cu`: routing rows
//! into the send buffers, EP masking of the gathered ids, and the f32 widening and narrowing
//! around the combine's reduce-scatter) and [`NcclComm`], an NCCL communicator whose
//! collectives take device addresses. cudarc's `Comm` takes only its own `CudaSlice`s, which
//! come from the stream-ordered pool; the backend hands its gathered buffers out as tensors and
//! reduces the caller's tensors in place, so it works on `DeviceBuffer`s and raw addresses.
//!
//! The launchers and collectives only enqueue on the GPU's stream: no allocation, no wait for
//! the GPU. Where the host does wait for the stream, [`poll_until`] bounds the wait and
//! [`NcclComm::abort`] releases this rank's NCCL kernels when a peer never joined. The waits
//! inside NCCL's host side are bounded too: the communicator is nonblocking, so joining it and
//! launching a collective (which waits for the other members at the join and at the first
//! collectives, when NCCL connects them) run in NCCL's background threads while the caller
//! polls, for at most the timeout given to [`NcclComm::new`], then aborts the communicator.

use std::ffi::{CStr, c_int, c_void};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use cudarc::nccl::result::NcclStatus;
use cudarc::nccl::{Id, result as nccl_result, sys as nccl_sys};

use crate::error::KernelError;
use crate::gpu::{Gpu, driver};
use crate::source::{GATHER_MASK_FOREIGN, GATHER_NARROW, GATHER_ROUTING, GATHER_WIDEN, Module};

/// The status word's flag for a top-k row the routing kernel refused (the low bits hold the
/// token), the same as the protocol kernels' (`platform::STATUS_BAD_ID`).
pub const STATUS_BAD_ID: u32 = crate::platform::STATUS_BAD_ID;

/// Threads per block of every gather kernel.
const BLOCK: u32 = 256;
/// Most blocks a gather kernel uses (8 per SM of an H100/H200); larger calls grid-stride.
const MAX_BLOCKS: u64 = 1056;

/// A grid of one thread per item, at most [`MAX_BLOCKS`] blocks.
fn grid(items: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.div_ceil(u64::from(BLOCK)).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn narrow(what: &str, x: usize) -> Result<i32, KernelError> {
    i32::try_from(x).map_err(|_| {
        KernelError::InvalidArgument(format!("{what} = {x} does not fit the gather kernels' 32-bit sizes"))
    })
}

/// Mirrors `struct GatherRoutingParams` in gather.cu field for field (`repr(C)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RoutingParams {
    ids: u64,
    weights: u64,
    out_ids: u64,
    out_weights: u64,
    status: u64,
    n_tokens: i32,
    pad_end: i32,
    top_k: i32,
    num_experts: i32,
}

// The kernel's `static_assert` checks the same size, so a field added on one side only fails to
// build instead of shifting the others.
const _: () = assert!(std::mem::size_of::<RoutingParams>() == 56);

// SAFETY: plain old data with the C layout of the kernel's struct; passed by value.
unsafe impl DeviceRepr for RoutingParams {}

/// Mirrors `struct GatherMaskParams` in gather.cu field for field (`repr(C)`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct MaskParams {
    ids: u64,
    weights: u64,
    owner: u64,
    entries: u64,
    num_experts: i32,
    rank: i32,
}

// The kernel's `static_assert` checks the same size, so a field added on one side only fails to
// build instead of shifting the others.
const _: () = assert!(std::mem::size_of::<MaskParams>() == 40);

// SAFETY: plain old data with the C layout of the kernel's struct; passed by value.
unsafe impl DeviceRepr for MaskParams {}

/// One call of [`Gpu::gather_routing`]: this rank's top-k rows into its send buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing {
    /// `[n_tokens, top_k]` i32 ids and f32 weights (a device input, or staged host input).
    pub ids: u64,
    pub weights: u64,
    pub n_tokens: usize,
    /// The send buffers, `[max_tokens, top_k]` i32 and f32.
    pub out_ids: u64,
    pub out_weights: u64,
    /// Rows `[0, pad_end)` are written: the input's rows, then padding (ids -1, weights 0).
    /// At least `n_tokens`; the rows above it must hold padding already.
    pub pad_end: usize,
    pub top_k: usize,
    pub num_experts: usize,
    /// A `u32` that keeps the first bad row: `STATUS_BAD_ID | token`.
    pub status: u64,
}

/// One call of [`Gpu::gather_mask_foreign`]: the gathered ids of experts other ranks own
/// become -1 with weight 0.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskForeign {
    /// `entries` i32 ids and f32 weights, rewritten in place.
    pub ids: u64,
    pub weights: u64,
    pub entries: usize,
    /// `[num_experts]` i32: the EP rank that owns each expert.
    pub owner: u64,
    pub num_experts: usize,
    /// The EP rank whose experts stay.
    pub rank: usize,
}

impl Gpu {
    /// Compiles and loads the gather kernels (once per device; do it at construction, before
    /// any collective runs).
    pub fn load_gather(&self) -> Result<(), KernelError> {
        self.preload(&Module::Gather)
    }

    /// Enqueues `moe_gather_routing`: rows `[0, n_tokens)` of the input into the send buffers,
    /// each id outside `[0, num_experts)` or repeated in its row dropped (-1, weight 0) and
    /// recorded in the status word, rows `[n_tokens, pad_end)` as padding.
    ///
    /// # Safety
    /// The input must hold `n_tokens * top_k` ids and weights, the outputs `pad_end * top_k`
    /// of each, and `status` one `u32`, all on this device, and stay valid until the kernel ran.
    pub unsafe fn gather_routing(&self, r: &Routing) -> Result<(), KernelError> {
        if r.pad_end < r.n_tokens {
            return Err(KernelError::InvalidArgument(format!(
                "routing rows up to {} of {} tokens: pad_end must cover the tokens",
                r.pad_end, r.n_tokens
            )));
        }
        let entries = (r.pad_end as u64) * (r.top_k as u64);
        if entries == 0 {
            return Ok(());
        }
        let p = RoutingParams {
            ids: r.ids,
            weights: r.weights,
            out_ids: r.out_ids,
            out_weights: r.out_weights,
            status: r.status,
            n_tokens: narrow("n_tokens", r.n_tokens)?,
            pad_end: narrow("pad_end", r.pad_end)?,
            top_k: narrow("top_k", r.top_k)?,
            num_experts: narrow("num_experts", r.num_experts)?,
        };
        let f = self.function(&Module::Gather, GATHER_ROUTING)?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(&p);
        // SAFETY: the kernel takes one GatherRoutingParams by value and touches the entries
        // below pad_end * top_k (inputs below n_tokens * top_k); the caller guarantees the
        // buffers (this function's contract).
        unsafe { b.launch(grid(entries)) }.map_err(driver(GATHER_ROUTING))?;
        Ok(())
    }

    /// Enqueues `moe_gather_mask_foreign`: the id convention for `rank` over `entries` ids.
    ///
    /// # Safety
    /// `ids` and `weights` must hold `entries` values each and `owner` `num_experts` i32 ranks,
    /// on this device, valid until the kernel ran.
    pub unsafe fn gather_mask_foreign(&self, m: &MaskForeign) -> Result<(), KernelError> {
        if m.entries == 0 {
            return Ok(());
        }
        let p = MaskParams {
            ids: m.ids,
            weights: m.weights,
            owner: m.owner,
            entries: m.entries as u64,
            num_experts: narrow("num_experts", m.num_experts)?,
            rank: narrow("rank", m.rank)?,
        };
        let f = self.function(&Module::Gather, GATHER_MASK_FOREIGN)?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(&p);
        // SAFETY: the kernel takes one GatherMaskParams by value, touches `entries` ids and
        // weights and reads `owner` only at ids in [0, num_experts); the caller guarantees the
        // buffers.
        unsafe { b.launch(grid(m.entries as u64)) }.map_err(driver(GATHER_MASK_FOREIGN))?;
        Ok(())
    }

    /// Enqueues `moe_gather_widen`: `count` 16-bit values at `src` (bf16 when `bf16`, else
    /// fp16) to f32 at `dst`, exactly as `moe_core::Tensor::to_f32` widens them.
    ///
    /// # Safety
    /// `src` must hold `count` 16-bit values (2-byte aligned) and `dst` room for `count` f32
    /// (4-byte aligned), on this device, valid until the kernel ran.
    pub unsafe fn gather_widen(&self, src: u64, dst: u64, count: usize, bf16: bool) -> Result<(), KernelError> {
        // SAFETY: the caller's contract.
        unsafe { self.convert(GATHER_WIDEN, src, dst, count, bf16) }
    }

    /// Enqueues `moe_gather_narrow`: `count` f32 values at `src` to 16-bit values at `dst`
    /// rounded exactly as `moe_core::Tensor::store_f32` rounds them (a zero as +0.0, the sign a
    /// sum from +0.0 gives).
    ///
    /// # Safety
    /// `src` must hold `count` f32 (4-byte aligned) and `dst` room for `count` 16-bit values
    /// (2-byte aligned), on this device, valid until the kernel ran.
    pub unsafe fn gather_narrow(&self, src: u64, dst: u64, count: usize, bf16: bool) -> Result<(), KernelError> {
        // SAFETY: the caller's contract.
        unsafe { self.convert(GATHER_NARROW, src, dst, count, bf16) }
    }

    /// # Safety
    /// See [`Self::gather_widen`] and [`Self::gather_narrow`].
    unsafe fn convert(
        &self,
        name: &'static str,
        src: u64,
        dst: u64,
        count: usize,
        bf16: bool,
    ) -> Result<(), KernelError> {
        if count == 0 {
            return Ok(());
        }
        let f = self.function(&Module::Gather, name)?;
        let (count, bf16) = (count as u64, i32::from(bf16));
        let mut b = self.stream().launch_builder(&f);
        b.arg(&src).arg(&dst).arg(&count).arg(&bf16);
        // SAFETY: matches `(const u16*, u32*, u64, int)` / `(const u32*, u16*, u64, int)`; the
        // kernel touches `count` values of each side, which the caller guarantees.
        unsafe { b.launch(grid(count.div_ceil(8))) }.map_err(driver(name))?;
        Ok(())
    }
}

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
    gpu: Arc<Gpu>,
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
    pub fn new(gpu: &Arc<Gpu>, rank: usize, ranks: usize, id: &Id, timeout: Duration) -> Result<Self, KernelError> {
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
        let comm = self.handle("ncclAllGather")?;
        self.gpu.context().bind_to_thread().map_err(driver("bind context"))?;
        let opened = nccl_result::group_start().map_err(Self::error(comm, "ncclGroupStart"))?;
        let mut enqueued = self.settle(comm, "ncclGroupStart", Ok(opened));
        for part in parts.iter().filter(|p| p.bytes > 0) {
            if enqueued.is_err() {
                break;
            }
            // SAFETY: the caller guarantees both ranges; bytes are counted as ncclUint8.
            let r = unsafe {
                nccl_result::all_gather(
                    part.send as *const c_void,
                    part.recv as *mut c_void,
                    part.bytes,
                    nccl_sys::ncclDataType_t::ncclUint8,
                    comm,
                    self.stream(),
                )
            };
            enqueued = self.settle(comm, "ncclAllGather", r);
        }
        // The group is closed whatever happened inside it; a timeout there (the common case:
        // the launch) is what leaves the communicator in progress, so it wins.
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
