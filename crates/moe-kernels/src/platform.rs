//! The CUDA platform: one GPU per rank in one process, peer access enabled at construction
//! wherever the driver offers it, and symmetric workspaces the ranks store into.
//!
//! A world builds whether or not its GPUs reach each other: it records which ordered pairs of
//! ranks have a peer-to-peer path ([`PeerMatrix`]), so backends that go through NCCL
//! (allgather-rs) run on any machine. The peer-memory protocols (nvlink-one-sided,
//! nvlink-two-sided) check at construction that every ordered pair of their group is reachable
//! ([`PeerMatrix::check_all_pairs`]) and otherwise fail naming the first missing pair.
//!
//! Workspaces come from `cuMemAlloc`: memory from the stream-ordered pool allocator is not
//! reachable by peers after `cuCtxEnablePeerAccess` (a peer's store faults with an illegal
//! address), so it must never back a workspace.
//!
//! Allocate before any rank launches a kernel that waits on peers: mapping a new allocation
//! into peer contexts can wait for those peers' running kernels, which wait for this rank.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::result;
use cudarc::driver::sys;
use moe_core::{DType, DeviceMemory, DeviceRegion, MoeError, Tensor};

use crate::error::KernelError;
use crate::gpu::{Gpu, driver};
use crate::launch::{CommGrid, CommSms};

thread_local! {
    static DRIVER_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// How many driver allocations the calling thread has made so far through this crate
/// ([`DeviceBuffer`]s, [`HostMappedWord`]s, and the stream-ordered buffers of the helpers on
/// host slices such as `Gpu::quantize`). An engine (or a test) reads it around `prepare` and `finalize` to check
/// that its steady state allocates nothing: each rank runs on its own thread, so the count
/// is that rank's alone.
pub fn driver_allocations_on_this_thread() -> u64 {
    DRIVER_ALLOCATIONS.with(Cell::get)
}

pub(crate) fn count_driver_allocations(n: u64) {
    DRIVER_ALLOCATIONS.with(|c| c.set(c.get() + n));
}

/// Device memory from `cuMemAlloc`, freed on drop; reachable by peers with peer access.
#[derive(Debug)]
pub struct DeviceBuffer {
    gpu: Arc<Gpu>,
    ptr: u64,
    bytes: usize,
}

impl DeviceBuffer {
    /// `bytes` zeroed bytes on `gpu` (at least one, so the address is valid).
    pub fn zeroed(gpu: &Arc<Gpu>, bytes: usize) -> Result<Self, KernelError> {
        gpu.context().bind_to_thread().map_err(driver("bind context"))?;
        let len = bytes.max(1);
        // SAFETY: the context is current on this thread; the allocation is owned by the
        // returned buffer and freed once, in Drop.
        let ptr = unsafe { result::malloc_sync(len) }.map_err(driver("cuMemAlloc"))?;
        count_driver_allocations(1);
        // SAFETY: `ptr` is a live allocation of `len` bytes in the current context.
        unsafe { result::memset_d8_async(ptr, 0, len, gpu.stream().cu_stream()) }.map_err(driver("cuMemsetD8Async"))?;
        gpu.stream().synchronize().map_err(driver("stream sync"))?;
        Ok(DeviceBuffer {
            gpu: gpu.clone(),
            ptr,
            bytes,
        })
    }

    /// A buffer holding a copy of `data`.
    pub fn from_bytes(gpu: &Arc<Gpu>, data: &[u8]) -> Result<Self, KernelError> {
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
    pub fn new(gpu: &Gpu) -> Result<Self, KernelError> {
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
    pub fn new(gpu: &Arc<Gpu>, rank: usize, timeout: Duration) -> Result<Self, KernelError> {
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

fn address_on(
    gpu: &Gpu,
    op: &'static str,
    arg: &str,
    t: &Tensor,
    dtype: DType,
    shape: &[usize],
) -> moe_core::Result<u64> {
    t.expect_at(op, arg, dtype, shape, moe_core::Location::Device(gpu.ordinal()))?;
    Ok(t.device_region().map_or(0, |r| r.address()))
}

/// The device addresses of `prepare`'s tokens, ids and weights, checked to be on `gpu` with
/// `layer`'s shapes and dtypes.
pub fn prepare_addresses(
    gpu: &Gpu,
    layer: &moe_core::LayerConfig,
    input: &moe_core::PrepareInput<'_>,
) -> moe_core::Result<[u64; 3]> {
    let (n, k, h) = (input.num_tokens(), layer.moe.top_k, layer.moe.hidden);
    let dtype = layer.moe.input_dtype.dtype();
    Ok([
        address_on(gpu, "prepare", "tokens", input.tokens(), dtype, &[n, h])?,
        address_on(gpu, "prepare", "topk_ids", input.topk_ids(), DType::I32, &[n, k])?,
        address_on(
            gpu,
            "prepare",
            "topk_weights",
            input.topk_weights(),
            DType::F32,
            &[n, k],
        )?,
    ])
}

/// The device addresses of `finalize`'s expert output (`[rows, hidden]` in the Standard
/// format, `[local_experts, rows, hidden]` in BatchedExperts: `lead` is the dims before hidden)
/// and `out` (`[n, hidden]`), checked to be on `gpu` in `layer`'s input dtype.
pub fn finalize_addresses(
    gpu: &Gpu,
    layer: &moe_core::LayerConfig,
    lead: &[usize],
    n: usize,
    expert_output: &Tensor,
    out: &Tensor,
) -> moe_core::Result<[u64; 2]> {
    let (h, dtype) = (layer.moe.hidden, layer.moe.input_dtype.dtype());
    let expert_shape: Vec<usize> = lead.iter().copied().chain([h]).collect();
    Ok([
        address_on(gpu, "finalize", "expert_output", expert_output, dtype, &expert_shape)?,
        address_on(gpu, "finalize", "out", out, dtype, &[n, h])?,
    ])
}

/// One rank's workspace out of a symmetric set, as device memory that keeps the set alive.
#[derive(Debug)]
struct RankWorkspace {
    all: Arc<Vec<DeviceBuffer>>,
    rank: usize,
}

impl DeviceMemory for RankWorkspace {
    fn ordinal(&self) -> usize {
        self.all[self.rank].ordinal()
    }
    fn address(&self) -> u64 {
        self.all[self.rank].address()
    }
    fn len(&self) -> usize {
        self.all[self.rank].bytes()
    }
    fn read(&self, offset: usize, out: &mut [u8]) -> moe_core::Result<()> {
        self.all[self.rank].read(offset, out)
    }
}

/// A tensor over bytes `[offset, offset + its size)` of rank `rank`'s workspace of a symmetric
/// set (sharing the set).
pub fn workspace_tensor(
    workspaces: &Arc<Vec<DeviceBuffer>>,
    rank: usize,
    offset: usize,
    dtype: DType,
    shape: &[usize],
) -> moe_core::Result<Tensor> {
    let len = shape.iter().product::<usize>() * dtype.size();
    let memory = Arc::new(RankWorkspace {
        all: workspaces.clone(),
        rank,
    });
    Tensor::on_device(dtype, shape, DeviceRegion::new(memory, offset, len)?)
}

/// A tensor over bytes `[offset, offset + its size)` of `buffer` (sharing it).
pub fn device_tensor(
    buffer: &Arc<DeviceBuffer>,
    offset: usize,
    dtype: DType,
    shape: &[usize],
) -> moe_core::Result<Tensor> {
    let len = shape.iter().product::<usize>() * dtype.size();
    let region = DeviceRegion::new(buffer.clone(), offset, len)?;
    Tensor::on_device(dtype, shape, region)
}

/// A copy of a host tensor in a new buffer on `gpu` (allocates and synchronizes: for set-up and
/// tests, not for a call's path).
pub fn upload_tensor(gpu: &Arc<Gpu>, host: &Tensor) -> moe_core::Result<Tensor> {
    host.expect("upload_tensor", "host", host.dtype(), host.shape())?;
    let buffer = DeviceBuffer::from_bytes(gpu, host.bytes()).map_err(|e| MoeError::Device(e.to_string()))?;
    device_tensor(&Arc::new(buffer), 0, host.dtype(), host.shape())
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.gpu.stream().synchronize().is_ok() && self.gpu.context().bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc in this context and is freed only here; the
            // stream that used it is idle.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Which ranks of a world reach which others' memory, as the driver reported at construction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerMatrix {
    /// The GPU ordinal of each rank.
    ordinals: Vec<usize>,
    /// `reachable[from][to]`: rank `from`'s kernels can load and store rank `to`'s device
    /// memory (peer access enabled, or `from == to`).
    reachable: Vec<Vec<bool>>,
}

impl PeerMatrix {
    /// Checks that every member of `group` (world ranks) reaches every other member's memory,
    /// as a peer-memory protocol over `group` needs; the error names the first ordered pair
    /// that does not, in group order.
    pub fn check_all_pairs(&self, group: &[usize]) -> Result<(), KernelError> {
        let ranks = self.ordinals.len();
        if let Some(&r) = group.iter().find(|&&r| r >= ranks) {
            return Err(KernelError::InvalidArgument(format!(
                "group {group:?} lists rank {r}, the world has ranks 0..{ranks}; pass world ranks"
            )));
        }
        for &from in group {
            if let Some(&to) = group.iter().find(|&&to| !self.reachable[from][to]) {
                return Err(KernelError::NoPeerAccess {
                    from_rank: from,
                    from_gpu: self.ordinals[from],
                    to_rank: to,
                    to_gpu: self.ordinals[to],
                });
            }
        }
        Ok(())
    }
}

/// A GPU per rank (or ranks sharing GPUs: [`Self::on_devices`]), with peer access enabled between every ordered pair of GPUs the driver
/// offers it for ([`Self::peers`] says which), and how many SMs of each the communication
/// kernels take ([`CommSms`]: every SM unless [`CudaWorld::with_comm_sms`] says fewer).
#[derive(Debug)]
pub struct CudaWorld {
    gpus: Vec<Arc<Gpu>>,
    peers: PeerMatrix,
    comm_sms: CommSms,
}

impl CudaWorld {
    /// Ranks on devices `0..ranks`, each with a stream of its own; builds whether or not the
    /// GPUs reach each other (see [`Self::peers`]).
    pub fn new(ranks: usize) -> Result<Self, KernelError> {
        Self::on_devices(&(0..ranks).collect::<Vec<_>>())
    }

    /// Rank `r` on device `devices[r]`, each with a stream of its own. A device may hold
    /// several ranks (a protocol test on a machine with fewer GPUs than ranks): they reach each
    /// other's memory without peer access and split the GPU's SMs (see [`Self::comm_grid`]).
    pub fn on_devices(devices: &[usize]) -> Result<Self, KernelError> {
        let count = cudarc::driver::CudaContext::device_count().map_err(driver("cuDeviceGetCount"))? as usize;
        if let Some(missing) = devices.iter().find(|&&d| d >= count) {
            return Err(KernelError::InvalidArgument(format!(
                "a rank was placed on GPU {missing}, this machine has {count} (GPUs 0 to {})",
                count.saturating_sub(1)
            )));
        }
        let gpus: Vec<Arc<Gpu>> = devices
            .iter()
            .map(|&d| Gpu::new(d).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Self::connect(gpus)
    }

    /// Rank `r` on the device of `streams[r]`, ordering all its work on that stream (see
    /// [`Gpu::with_stream`]); builds whether or not the GPUs reach each other (see
    /// [`Self::peers`]).
    ///
    /// # Safety
    /// Every stream must be a valid handle that outlives the world and everything built on it.
    pub unsafe fn with_streams(streams: &[sys::CUstream]) -> Result<Self, KernelError> {
        let gpus: Vec<Arc<Gpu>> = streams
            .iter()
            .map(|&stream| {
                let mut device: sys::CUdevice = 0;
                // SAFETY: the caller guarantees the stream is live; the query writes a local.
                unsafe { sys::cuStreamGetDevice(stream, &mut device) }
                    .result()
                    .map_err(driver("cuStreamGetDevice"))?;
                // SAFETY: the caller guarantees each stream (this function's contract).
                unsafe { Gpu::with_stream(device as usize, stream) }.map(Arc::new)
            })
            .collect::<Result<_, _>>()?;
        Self::connect(gpus)
    }

    /// Enables peer access for every ordered pair of GPUs the driver offers it for and records
    /// which pairs have it; a pair without a path is not an error here.
    fn connect(gpus: Vec<Arc<Gpu>>) -> Result<Self, KernelError> {
        let mut reachable = vec![vec![false; gpus.len()]; gpus.len()];
        for (from, a) in gpus.iter().enumerate() {
            for (to, b) in gpus.iter().enumerate() {
                if a.ordinal() == b.ordinal() {
                    reachable[from][to] = true;
                    continue;
                }
                let mut can = 0;
                // SAFETY: plain query on two valid device handles into a local integer.
                unsafe { sys::cuDeviceCanAccessPeer(&mut can, a.context().cu_device(), b.context().cu_device()) }
                    .result()
                    .map_err(driver("cuDeviceCanAccessPeer"))?;
                if can == 0 {
                    continue;
                }
                a.context().bind_to_thread().map_err(driver("bind context"))?;
                // SAFETY: both contexts are alive for the world's lifetime; enabling twice only
                // returns the "already enabled" status, which is accepted below.
                let r = unsafe { sys::cuCtxEnablePeerAccess(b.context().cu_ctx(), 0) };
                if r != sys::CUresult::CUDA_SUCCESS && r != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
                    return Err(KernelError::Driver {
                        op: "cuCtxEnablePeerAccess",
                        message: format!("{r:?} (GPU {} -> GPU {})", a.ordinal(), b.ordinal()),
                    });
                }
                reachable[from][to] = true;
            }
        }
        let ordinals = gpus.iter().map(|g| g.ordinal()).collect();
        Ok(CudaWorld {
            gpus,
            peers: PeerMatrix { ordinals, reachable },
            comm_sms: CommSms::default(),
        })
    }

    /// The world with the communication kernels of the peer-memory backends (nvlink-one-sided,
    /// nvlink-two-sided) on at most `sms` of each GPU, so the engine can leave the others to
    /// compute it overlaps with communication. Every backend built on the world uses it;
    /// fails if a GPU of the world cannot run it (0 SMs, more than it has, threads per block not
    /// a multiple of 32 from 32 to 1024).
    pub fn with_comm_sms(mut self, sms: CommSms) -> Result<Self, KernelError> {
        self.comm_sms = sms;
        for rank in 0..self.ranks() {
            self.comm_grid(rank)?;
        }
        Ok(self)
    }

    /// The grid of `rank`'s communication kernels: the world's [`CommSms`] on its share of its
    /// GPU (all of it unless other ranks of the world are on it too).
    pub fn comm_grid(&self, rank: usize) -> Result<CommGrid, KernelError> {
        let gpu = self.gpu(rank);
        let ranks_on_device = self.gpus.iter().filter(|g| g.ordinal() == gpu.ordinal()).count();
        self.comm_sms
            .resolve(gpu.ordinal(), gpu.sm_count()?, ranks_on_device as u32)
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.gpus.len()
    }

    /// The GPU of `rank`.
    pub fn gpu(&self, rank: usize) -> &Arc<Gpu> {
        &self.gpus[rank]
    }

    /// Two ranks of `group` (world ranks) on the same GPU, if any.
    pub fn ranks_sharing_a_gpu(&self, group: &[usize]) -> Option<(usize, usize)> {
        group.iter().enumerate().find_map(|(i, &a)| {
            group[i + 1..]
                .iter()
                .find(|&&b| self.gpu(a).ordinal() == self.gpu(b).ordinal())
                .map(|&b| (a, b))
        })
    }

    /// Which ranks reach which others' memory.
    pub fn peers(&self) -> &PeerMatrix {
        &self.peers
    }

    /// A zeroed `bytes`-byte workspace on every rank; entry `r` lives on rank `r`'s GPU and is
    /// reachable from the ranks [`Self::peers`] says reach rank `r`.
    pub fn symmetric_alloc(&self, bytes: usize) -> Result<Vec<DeviceBuffer>, KernelError> {
        self.gpus.iter().map(|g| DeviceBuffer::zeroed(g, bytes)).collect()
    }
}

/// What a GPU rank's `moe_core::CudaRank` carries as its device handle: the world and this
/// rank's index in it. Backends downcast to it to find their GPU and their peers'.
#[derive(Clone, Debug)]
pub struct CudaRankDevice {
    pub world: Arc<CudaWorld>,
    pub rank: usize,
}

impl CudaRankDevice {
    /// The device handle of a GPU rank, for `backend`'s constructor.
    pub fn of<'a>(rank: &'a moe_core::CudaRank, backend: &str) -> moe_core::Result<&'a CudaRankDevice> {
        rank.device::<CudaRankDevice>().ok_or_else(|| {
            MoeError::Unsupported(format!(
                "{backend} on GPUs needs the rank's device handle to be moe_kernels::platform::CudaRankDevice"
            ))
        })
    }

    /// This rank's GPU.
    pub fn gpu(&self) -> &Arc<Gpu> {
        self.world.gpu(self.rank)
    }

    /// The grid of this rank's communication kernels (see [`CudaWorld::with_comm_sms`]).
    pub fn comm_grid(&self) -> moe_core::Result<CommGrid> {
        self.world
            .comm_grid(self.rank)
            .map_err(|e| MoeError::Device(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranks on GPUs `ordinals`, every ordered pair reachable but those in `missing`.
    fn matrix(ordinals: &[usize], missing: &[(usize, usize)]) -> PeerMatrix {
        let n = ordinals.len();
        PeerMatrix {
            ordinals: ordinals.to_vec(),
            reachable: (0..n)
                .map(|from| (0..n).map(|to| !missing.contains(&(from, to))).collect())
                .collect(),
        }
    }

    #[test]
    fn a_group_whose_pairs_all_reach_each_other_passes() {
        let peers = matrix(&[0, 1, 2, 3], &[]);
        assert!(peers.check_all_pairs(&[0, 1, 2, 3]).is_ok());
        assert!(peers.check_all_pairs(&[2]).is_ok());
    }

    #[test]
    fn one_missing_direction_names_that_ordered_pair_and_points_to_allgather_rs() {
        // Rank 2 cannot reach rank 1; rank 1 reaches rank 2.
        let peers = matrix(&[4, 5, 6, 7], &[(2, 1)]);
        let e = peers.check_all_pairs(&[0, 1, 2, 3]).unwrap_err();
        assert!(
            matches!(
                e,
                KernelError::NoPeerAccess {
                    from_rank: 2,
                    from_gpu: 6,
                    to_rank: 1,
                    to_gpu: 5
                }
            ),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.starts_with("rank 2 (GPU 6) cannot access the memory of rank 1 (GPU 5)"),
            "{text}"
        );
        assert!(text.contains("use the allgather-rs backend"), "{text}");
    }

    #[test]
    fn the_first_missing_pair_in_group_order_is_named_and_other_groups_are_unaffected() {
        let peers = matrix(&[0, 1, 2, 3], &[(3, 0), (1, 3)]);
        let first = |group: &[usize]| match peers.check_all_pairs(group) {
            Err(KernelError::NoPeerAccess { from_rank, to_rank, .. }) => Some((from_rank, to_rank)),
            Err(e) => panic!("{e}"),
            Ok(()) => None,
        };
        assert_eq!(first(&[0, 1, 2, 3]), Some((1, 3)));
        assert_eq!(first(&[3, 2, 1, 0]), Some((3, 0)));
        assert_eq!(first(&[0, 1, 2]), None, "the pairs without a path involve rank 3");
    }

    #[test]
    fn a_group_rank_outside_the_world_is_an_invalid_argument() {
        let e = matrix(&[0, 1], &[]).check_all_pairs(&[0, 2]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid kernel argument: group [0, 2] lists rank 2, the world has ranks 0..2; pass world ranks"
        );
    }
}
