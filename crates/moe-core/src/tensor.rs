//! A minimal tensor: dtype, shape and storage. Host storage today; device storage joins the
//! same enum with the CUDA platform, so contract signatures do not change.

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

/// Where a tensor's bytes live.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Storage {
    /// Ordinary process memory, little-endian.
    Host(Vec<u8>),
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

    /// The host bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Host(b) => b,
        }
    }

    /// The host bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.storage {
            Storage::Host(b) => b,
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

    /// A copy of leading-dimension rows `[start, end)`.
    pub fn slice_rows(&self, start: usize, end: usize) -> Tensor {
        let n = self.row_len() * self.dtype.size();
        let mut shape = self.shape.clone();
        shape[0] = end - start;
        Tensor {
            dtype: self.dtype,
            shape,
            storage: Storage::Host(self.bytes()[start * n..end * n].to_vec()),
        }
    }

    /// Checks dtype and shape, naming the operation and argument on mismatch.
    pub fn expect(&self, op: &'static str, arg: &str, dtype: DType, shape: &[usize]) -> Result<()> {
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
mod tests {
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

    #[test]
    fn f32_round_trip_through_bf16_rounds_to_nearest_even() {
        let t = Tensor::from_f32(DType::Bf16, &[2], &[1.0 + 1.0 / 256.0, 3.0]);
        assert_eq!(t.to_f32(), [1.0, 3.0]);
    }
}
