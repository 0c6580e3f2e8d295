//! The bridge between `moe_core` tensors and device addresses: the checked addresses of a
//! call's device tensors ([`prepare_addresses`], [`finalize_addresses`]), and tensors over this
//! crate's device buffers ([`device_tensor`], [`workspace_tensor`] over one rank's workspace of
//! a symmetric set, [`upload_tensor`]) and over memory the engine owns ([`borrowed_tensor`]).

use std::sync::Arc;

use moe_core::{DType, DeviceMemory, DeviceRegion, MoeError, Tensor};

use crate::buffer::DeviceBuffer;
use crate::device::CudaDevice;

fn address_on(
    gpu: &CudaDevice,
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
    gpu: &CudaDevice,
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
    gpu: &CudaDevice,
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
    let memory = Arc::new(RankWorkspace {
        all: workspaces.clone(),
        rank,
    });
    tensor_over(memory, offset, dtype, shape)
}

/// A tensor of `dtype` and `shape` over bytes `[offset, offset + its size)` of `memory`.
fn tensor_over(
    memory: Arc<dyn DeviceMemory>,
    offset: usize,
    dtype: DType,
    shape: &[usize],
) -> moe_core::Result<Tensor> {
    let len = shape.iter().product::<usize>() * dtype.size();
    Tensor::on_device(dtype, shape, DeviceRegion::new(memory, offset, len)?)
}

/// A tensor over bytes `[offset, offset + its size)` of `buffer` (sharing it).
pub fn device_tensor(
    buffer: &Arc<DeviceBuffer>,
    offset: usize,
    dtype: DType,
    shape: &[usize],
) -> moe_core::Result<Tensor> {
    tensor_over(buffer.clone(), offset, dtype, shape)
}

/// A copy of a host tensor in a new buffer on `gpu` (allocates and synchronizes: for set-up and
/// tests, not for a call's path).
pub fn upload_tensor(gpu: &Arc<CudaDevice>, host: &Tensor) -> moe_core::Result<Tensor> {
    host.expect("upload_tensor", "host", host.dtype(), host.shape())?;
    let buffer = DeviceBuffer::from_bytes(gpu, host.bytes()).map_err(|e| MoeError::Device(e.to_string()))?;
    device_tensor(&Arc::new(buffer), 0, host.dtype(), host.shape())
}

/// Device memory the engine owns (a C caller's allocation, a PyTorch or CuPy tensor), borrowed:
/// the library reads and writes it on its GPU's stream and never frees it.
#[derive(Debug)]
struct BorrowedMemory {
    gpu: Arc<CudaDevice>,
    address: u64,
    len: usize,
}

impl DeviceMemory for BorrowedMemory {
    fn ordinal(&self) -> usize {
        self.gpu.ordinal()
    }
    fn address(&self) -> u64 {
        self.address
    }
    fn len(&self) -> usize {
        self.len
    }
    fn read(&self, offset: usize, out: &mut [u8]) -> moe_core::Result<()> {
        if offset.checked_add(out.len()).is_none_or(|end| end > self.len) {
            return Err(MoeError::InvalidInput {
                op: "read",
                detail: format!("bytes {offset}..+{} of {} borrowed bytes", out.len(), self.len),
            });
        }
        // SAFETY: `borrowed_tensor`'s caller keeps `address..address + len` live on this GPU
        // while the tensor exists; the range was checked above.
        unsafe { self.gpu.copy_to_host(self.address + offset as u64, out) }.map_err(|e| MoeError::Device(e.to_string()))
    }
}

/// A tensor over the engine's device memory at `address` on `gpu`, of `dtype` and `shape`.
///
/// # Safety
/// `address..address + size` must be device memory of `gpu`'s context that the caller keeps
/// alive, and unchanged except by the library's work, while the tensor and the work enqueued
/// on it are in use.
pub unsafe fn borrowed_tensor(
    gpu: &Arc<CudaDevice>,
    address: u64,
    dtype: DType,
    shape: &[usize],
) -> moe_core::Result<Tensor> {
    let memory = Arc::new(BorrowedMemory {
        gpu: gpu.clone(),
        address,
        len: shape.iter().product::<usize>() * dtype.size(),
    });
    tensor_over(memory, 0, dtype, shape)
}
