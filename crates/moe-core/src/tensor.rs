//! A minimal tensor: dtype, shape and storage, in host memory or in a GPU's memory.
//!
//! Device storage is what lets a GPU backend take its inputs and hand its outputs over without a
//! round trip through the host: moe-core does not depend on CUDA, so the memory is whatever the
//! GPU platform (or the engine) exposes through [`DeviceMemory`]. Host code reads device
//! tensors only through [`Tensor::to_host`]; the `expect*` checks keep each one where its
//! reader can reach it.

use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};

use crate::error::{MoeError, Result};

/// Element types that cross the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    Bf16,
    F16,
    F32,
    I32,
    U8,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::U8 => 1,
        }
    }
}

/// Memory on a GPU, as its owner (the GPU platform, or an engine's allocator) exposes it.
pub trait DeviceMemory: Send + Sync + fmt::Debug {
    /// The CUDA device ordinal the memory lives on.
    fn ordinal(&self) -> usize;
    /// The device address of byte 0 (unified addressing: valid in every context of the process).
    fn address(&self) -> u64;
    /// Size in bytes.
    fn len(&self) -> usize;
    /// Whether the size is zero.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `out.len()` bytes at `offset` to the host, after the work already enqueued on the
    /// stream that writes this memory; returns once the bytes are in `out` (synchronizes).
    fn read(&self, offset: usize, out: &mut [u8]) -> Result<()>;
}

/// A byte range of device memory, holding the memory alive.
#[derive(Clone)]
pub struct DeviceRegion {
    memory: Arc<dyn DeviceMemory>,
    offset: usize,
    len: usize,
}

impl DeviceRegion {
    /// Bytes `[offset, offset + len)` of `memory`.
    pub fn new(memory: Arc<dyn DeviceMemory>, offset: usize, len: usize) -> Result<Self> {
        if offset.checked_add(len).is_none_or(|end| end > memory.len()) {
            return Err(MoeError::InvalidInput {
                op: "DeviceRegion::new",
                detail: format!(
                    "bytes {offset}..{} of {} bytes of device memory on GPU {}",
                    offset.saturating_add(len),
                    memory.len(),
                    memory.ordinal()
                ),
            });
        }
        Ok(DeviceRegion { memory, offset, len })
    }

    /// The device address of the first byte.
    pub fn address(&self) -> u64 {
        self.memory.address() + self.offset as u64
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.memory.ordinal()
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region's bytes, copied to the host (synchronizes; see [`DeviceMemory::read`]).
    pub fn read(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.len];
        self.memory.read(self.offset, &mut out)?;
        Ok(out)
    }

    fn sub(&self, offset: usize, len: usize) -> DeviceRegion {
        assert!(
            offset + len <= self.len,
            "moe invariant violated: sub-region {offset}+{len} of a {}-byte region",
            self.len
        );
        DeviceRegion {
            memory: self.memory.clone(),
            offset: self.offset + offset,
            len,
        }
    }
}

impl fmt::Debug for DeviceRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GPU {} @ {:#x} ({} bytes)", self.ordinal(), self.address(), self.len)
    }
}

impl PartialEq for DeviceRegion {
    /// Two regions are equal when they are the same bytes.
    fn eq(&self, other: &Self) -> bool {
        self.ordinal() == other.ordinal() && self.address() == other.address() && self.len == other.len
    }
}

/// Where a tensor's bytes live.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Storage {
    /// Ordinary process memory, little-endian.
    Host(Vec<u8>),
    /// GPU memory, little-endian; cloning the tensor shares the bytes.
    Device(DeviceRegion),
}

/// Where a tensor is, for checks and messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    Host,
    /// On the GPU with this ordinal.
    Device(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Host => f.write_str("host memory"),
            Location::Device(o) => write!(f, "GPU {o}"),
        }
    }
}

/// A dense row-major tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    storage: Storage,
}

/// The bit pattern [`Tensor::poison`] writes: a NaN no arithmetic produces for bf16/fp16
/// (all ones), so any element still holding it was never written.
pub const POISON_BYTE: u8 = 0xFF;

impl Tensor {
    /// A zero-filled host tensor.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Self {
        let n: usize = shape.iter().product();
        Tensor {
            dtype,
            shape: shape.to_vec(),
            storage: Storage::Host(vec![0; n * dtype.size()]),
        }
    }

    /// A host tensor from raw little-endian bytes.
    pub fn from_bytes(dtype: DType, shape: &[usize], bytes: Vec<u8>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if bytes.len() != n * dtype.size() {
            return Err(MoeError::InvalidInput {
                op: "Tensor::from_bytes",
                detail: format!(
                    "shape {shape:?} of {dtype:?} needs {} bytes, got {}",
                    n * dtype.size(),
                    bytes.len()
                ),
            });
        }
        Ok(Tensor {
            dtype,
            shape: shape.to_vec(),
            storage: Storage::Host(bytes),
        })
    }

    /// A bf16/f16/f32 tensor from f32 values, rounded to nearest even.
    pub fn from_f32(dtype: DType, shape: &[usize], values: &[f32]) -> Self {
        let mut t = Tensor::zeros(dtype, shape);
        t.store_f32(0, values);
        t
    }

    /// A tensor over device memory: `region` holds exactly its bytes.
    pub fn on_device(dtype: DType, shape: &[usize], region: DeviceRegion) -> Result<Self> {
        let n: usize = shape.iter().product();
        if region.len() != n * dtype.size() {
            return Err(MoeError::InvalidInput {
                op: "Tensor::on_device",
                detail: format!(
                    "shape {shape:?} of {dtype:?} needs {} bytes, the device region has {}",
                    n * dtype.size(),
                    region.len()
                ),
            });
        }
        Ok(Tensor {
            dtype,
            shape: shape.to_vec(),
            storage: Storage::Device(region),
        })
    }

    /// Where the bytes are.
    pub fn location(&self) -> Location {
        match &self.storage {
            Storage::Host(_) => Location::Host,
            Storage::Device(r) => Location::Device(r.ordinal()),
        }
    }

    /// The device region, for a tensor in GPU memory.
    pub fn device_region(&self) -> Option<&DeviceRegion> {
        match &self.storage {
            Storage::Host(_) => None,
            Storage::Device(r) => Some(r),
        }
    }

    /// The same tensor in host memory (a copy; for a device tensor this synchronizes with the
    /// stream that writes it).
    pub fn to_host(&self) -> Result<Tensor> {
        let bytes = match &self.storage {
            Storage::Host(b) => b.clone(),
            Storage::Device(r) => r.read()?,
        };
        Tensor::from_bytes(self.dtype, &self.shape, bytes)
    }

    /// An int32 tensor.
    pub fn from_i32(shape: &[usize], values: &[i32]) -> Self {
        let mut t = Tensor::zeros(DType::I32, shape);
        t.bytes_mut().copy_from_slice(bytemuck::cast_slice(values));
        t
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements per leading-dimension row.
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// The host bytes. A device tensor has none: check with [`Self::expect`] (which requires
    /// host memory) before reading, or copy with [`Self::to_host`].
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Host(b) => b,
            Storage::Device(r) => panic!("moe invariant violated: host read of a device tensor ({r:?})"),
        }
    }

    /// The host bytes, moved out of the tensor; a device tensor is given back unchanged.
    pub fn into_host_bytes(self) -> std::result::Result<Vec<u8>, Tensor> {
        match self.storage {
            Storage::Host(b) => Ok(b),
            device => Err(Tensor {
                storage: device,
                ..self
            }),
        }
    }

    /// The host bytes, writable (see [`Self::bytes`]).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.storage {
            Storage::Host(b) => b,
            Storage::Device(r) => panic!("moe invariant violated: host write to a device tensor ({r:?})"),
        }
    }

    /// Overwrites every byte with [`POISON_BYTE`].
    pub fn poison(&mut self) {
        self.bytes_mut().fill(POISON_BYTE);
    }

    /// Index of the first element that still holds the poison pattern.
    pub fn first_poisoned(&self) -> Option<usize> {
        let size = self.dtype.size();
        self.bytes()
            .chunks_exact(size)
            .position(|c| c.iter().all(|&b| b == POISON_BYTE))
    }

    /// Values as f32 (bf16/f16/f32 tensors).
    pub fn to_f32(&self) -> Vec<f32> {
        let b = self.bytes();
        match self.dtype {
            DType::Bf16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::I32 | DType::U8 => panic!("moe invariant violated: to_f32 on a {:?} tensor", self.dtype),
        }
    }

    /// Values of an int32 tensor.
    pub fn to_i32(&self) -> Vec<i32> {
        assert_eq!(
            self.dtype,
            DType::I32,
            "moe invariant violated: to_i32 on a {:?} tensor",
            self.dtype
        );
        self.bytes()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Writes f32 values (rounded to the tensor's float dtype) starting at element `at`.
    pub fn store_f32(&mut self, at: usize, values: &[f32]) {
        let dtype = self.dtype;
        let size = dtype.size();
        let dst = &mut self.bytes_mut()[at * size..(at + values.len()) * size];
        match dtype {
            DType::Bf16 => {
                for (c, v) in dst.chunks_exact_mut(2).zip(values) {
                    c.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
            DType::F16 => {
                for (c, v) in dst.chunks_exact_mut(2).zip(values) {
                    c.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
            DType::F32 => {
                for (c, v) in dst.chunks_exact_mut(4).zip(values) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
            DType::I32 | DType::U8 => {
                panic!("moe invariant violated: store_f32 on a {dtype:?} tensor")
            }
        }
    }

    /// The bytes of leading-dimension row `i`.
    pub fn row_bytes(&self, i: usize) -> &[u8] {
        let n = self.row_len() * self.dtype.size();
        &self.bytes()[i * n..(i + 1) * n]
    }

    /// The bytes of leading-dimension row `i`, writable.
    pub fn row_bytes_mut(&mut self, i: usize) -> &mut [u8] {
        let n = self.row_len() * self.dtype.size();
        &mut self.bytes_mut()[i * n..(i + 1) * n]
    }

    /// Leading-dimension rows `[start, end)`: a copy in host memory, a view of the same bytes
    /// on a device.
    pub fn slice_rows(&self, start: usize, end: usize) -> Tensor {
        let n = self.row_len() * self.dtype.size();
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        let storage = match &self.storage {
            Storage::Host(b) => Storage::Host(b[start * n..end * n].to_vec()),
            Storage::Device(r) => Storage::Device(r.sub(start * n, (end - start) * n)),
        };
        Tensor {
            dtype: self.dtype,
            shape,
            storage,
        }
    }

    /// Checks dtype and shape and that the tensor is in host memory (where the caller is about
    /// to read or write it), naming the operation and argument on mismatch.
    pub fn expect(&self, op: &'static str, arg: &str, dtype: DType, shape: &[usize]) -> Result<()> {
        self.expect_at(op, arg, dtype, shape, Location::Host)
    }

    /// Checks dtype, shape and location, naming the operation and argument on mismatch.
    pub fn expect_at(&self, op: &'static str, arg: &str, dtype: DType, shape: &[usize], at: Location) -> Result<()> {
        if self.location() != at {
            return Err(MoeError::InvalidInput {
                op,
                detail: format!(
                    "`{arg}` is in {}, this call needs it in {at}: pass the tensor where the backend's platform reads it (host tensors for backends on the host platform; device tensors on the rank's own GPU, or host tensors, for the cuda platform)",
                    self.location()
                ),
            });
        }
        self.expect_shape(op, arg, dtype, shape)
    }

    /// Checks dtype and shape wherever the tensor is.
    pub fn expect_shape(&self, op: &'static str, arg: &str, dtype: DType, shape: &[usize]) -> Result<()> {
        if self.dtype != dtype || self.shape != shape {
            return Err(MoeError::InvalidInput {
                op,
                detail: format!(
                    "`{arg}` must be {dtype:?} {shape:?}, got {:?} {:?}",
                    self.dtype, self.shape
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn poison_is_detected_until_written() {
        let mut t = Tensor::zeros(DType::Bf16, &[2, 3]);
        t.poison();
        assert_eq!(t.first_poisoned(), Some(0));
        t.store_f32(0, &[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(t.first_poisoned(), Some(5));
        t.store_f32(5, &[f32::NAN]);
        assert_eq!(
            t.first_poisoned(),
            None,
            "arithmetic NaN differs from the poison pattern"
        );
    }

    /// Device memory stood in for by host bytes: what moe-core does with a device tensor never
    /// touches the bytes except through `read`.
    #[derive(Debug)]
    pub(crate) struct BytesAtAddress {
        pub(crate) address: u64,
        pub(crate) bytes: Vec<u8>,
    }

    impl DeviceMemory for BytesAtAddress {
        fn ordinal(&self) -> usize {
            1
        }
        fn address(&self) -> u64 {
            self.address
        }
        fn len(&self) -> usize {
            self.bytes.len()
        }
        fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
            out.copy_from_slice(&self.bytes[offset..offset + out.len()]);
            Ok(())
        }
    }

    /// `host`'s bytes as a device tensor on GPU 1.
    pub(crate) fn on_fake_device(host: &Tensor) -> Tensor {
        let memory = Arc::new(BytesAtAddress {
            address: 0x9000_0000,
            bytes: host.bytes().to_vec(),
        });
        let region = DeviceRegion::new(memory, 0, host.bytes().len()).unwrap();
        Tensor::on_device(host.dtype(), host.shape(), region).unwrap()
    }

    fn device_tensor(values: &[f32]) -> Tensor {
        let host = Tensor::from_f32(DType::F32, &[values.len()], values);
        let memory = Arc::new(BytesAtAddress {
            address: 0x7000_0000,
            bytes: host.bytes().to_vec(),
        });
        let region = DeviceRegion::new(memory, 0, 4 * values.len()).unwrap();
        Tensor::on_device(DType::F32, &[values.len() / 2, 2], region).unwrap()
    }

    #[test]
    fn device_tensor_is_read_only_through_to_host() {
        let t = device_tensor(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(t.location(), Location::Device(1));
        assert_eq!(t.to_host().unwrap().to_f32(), [1.0, 2.0, 3.0, 4.0]);
        let err = t
            .expect("finalize", "out", DType::F32, &[2, 2])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`out` is in GPU 1") && err.contains("host memory"),
            "{err}"
        );
        t.expect_at("finalize", "out", DType::F32, &[2, 2], Location::Device(1))
            .unwrap();
    }

    #[test]
    fn device_rows_are_views_of_the_same_bytes() {
        let t = device_tensor(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let rows = t.slice_rows(1, 3);
        assert_eq!(rows.device_region().unwrap().address(), 0x7000_0000 + 8);
        assert_eq!(rows.to_host().unwrap().to_f32(), [3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn device_region_out_of_range_is_an_error() {
        let memory = Arc::new(BytesAtAddress {
            address: 0x1000,
            bytes: vec![0; 16],
        });
        assert!(DeviceRegion::new(memory.clone(), 8, 16).is_err());
        let region = DeviceRegion::new(memory, 0, 16).unwrap();
        assert!(Tensor::on_device(DType::F32, &[3], region).is_err());
    }

    #[test]
    fn f32_round_trip_through_bf16_rounds_to_nearest_even() {
        let t = Tensor::from_f32(DType::Bf16, &[2], &[1.0 + 1.0 / 256.0, 3.0]);
        assert_eq!(t.to_f32(), [1.0, 3.0]);
    }
}
