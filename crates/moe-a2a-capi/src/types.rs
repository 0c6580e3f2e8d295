//! The C-facing types: codes for dtypes, devices, schemes and formats, and the tensor, layer
//! and delivery descriptors, with their checked conversions to and from the library's types.
//!
//! Codes arrive from C as plain integers and are checked here: a value outside an enum would be
//! undefined behaviour if it were read as a Rust enum, so the structs C fills hold `int32_t`.

use std::ffi::{CStr, c_char, c_void};

use moe_a2a::quant::{QuantParams, QuantScheme};
use moe_a2a::{
    ActivationFormat, Activations, DType, Dispatched, InputDtype, LayerConfig, Location, MoeConfig, ParallelConfig,
    QuantConfig, ScaleLayout, Tensor,
};

use crate::status::Failure;

/// The most dimensions a tensor descriptor holds.
pub const MOE_MAX_DIMS: usize = 4;

/// Element types (`MoeTensor::dtype`, `MoeLayerSpec::input_dtype`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeDtype {
    Bf16 = 0,
    F16 = 1,
    F32 = 2,
    I32 = 3,
    U8 = 4,
}

/// Where a tensor lives (`MoeTensor::device_type`): DLPack's device codes.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeDevice {
    Cpu = 1,
    Cuda = 2,
}

/// Dispatch quantization schemes (`MoeLayerSpec::quant_scheme`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeQuant {
    Bf16 = 0,
    Fp16 = 1,
    Fp8PerTensor = 2,
    Fp8PerToken = 3,
    Fp8Block128 = 4,
    Nvfp4 = 5,
    Mxfp8 = 6,
}

/// The layout the experts consume (`MoeLayerSpec::activation_format`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeFormat {
    /// One row per received token, with its top-k ids and weights (vLLM's Standard).
    Standard = 0,
    /// Expert-major rows with per-expert counts (vLLM's BatchedExperts).
    BatchedExperts = 1,
}

/// Where a block-scaled delivery's scales sit (`MoeDelivery::scale_layout`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeScaleLayout {
    /// The scheme has no scales.
    None = 0,
    /// `[rows, scale_bytes]`, row-major.
    Linear = 1,
    /// The 128x4 swizzle CUTLASS and tcgen05 kernels consume.
    Swizzled128x4 = 2,
}

/// A dense row-major tensor the caller owns (or, in a `MoeDelivery`, the library owns).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MoeTensor {
    /// Address of element 0: host memory, or memory of GPU `device_id`.
    pub data: *mut c_void,
    /// A `MOE_DTYPE_*` code.
    pub dtype: i32,
    /// Dimensions used, 1 to `MOE_MAX_DIMS`.
    pub ndim: i32,
    pub shape: [i64; MOE_MAX_DIMS],
    /// NULL for a contiguous row-major tensor (as DLPack); else `ndim` strides in elements,
    /// which must describe that same layout (other layouts are refused, naming the tensor).
    pub strides: *const i64,
    /// `MOE_DEVICE_CPU` or `MOE_DEVICE_CUDA`.
    pub device_type: i32,
    /// The GPU's ordinal for `MOE_DEVICE_CUDA`; 0 for the CPU.
    pub device_id: i32,
}

/// One MoE layer, as every rank builds it (`moe_layer_new`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MoeLayerSpec {
    /// Experts in the whole model layer.
    pub num_experts: u32,
    /// Experts per token.
    pub top_k: u32,
    /// Elements per token.
    pub hidden: u32,
    /// The most tokens one rank passes to one call.
    pub max_tokens_per_rank: u32,
    /// `MOE_DTYPE_BF16` or `MOE_DTYPE_F16`: the activations in and out of the layer.
    pub input_dtype: i32,
    /// A `MOE_QUANT_*` code: how tokens travel.
    pub quant_scheme: i32,
    /// The dequant scale of `MOE_QUANT_FP8_PER_TENSOR` (0: 1.0).
    pub fp8_static_scale: f32,
    /// The encode global scale of `MOE_QUANT_NVFP4` (0: 1.0), `448 * 6 / amax` for the
    /// calibrated amax of the activations.
    pub nvfp4_global_scale: f32,
    /// Nonzero: send unquantized activations and let the experts quantize.
    pub defer_input_quant: i32,
    /// Nonzero: deliver block scales in the 128x4 swizzle.
    pub swizzled_scales: i32,
    /// Tensor-parallel ranks per replica (1 without TP).
    pub tp: u32,
    /// Data-parallel replicas; `tp * dp` is the world size.
    pub dp: u32,
    /// Nonzero: experts are split over all ranks (expert parallelism).
    pub ep: i32,
    /// Nonzero: sequence-parallel MoE (each TP rank dispatches 1/tp of its replica's tokens).
    pub sp: i32,
    /// A `MOE_FORMAT_*` code: what the experts consume.
    pub activation_format: i32,
    /// NULL: the layer shares its backend's default workspace group; else the name of the
    /// group whose layers share one workspace (layers differing in top_k or expert count need
    /// groups of their own). Set alike on every rank.
    pub workspace_group: *const c_char,
    /// NULL: experts in contiguous blocks by EP rank; else `num_experts` entries, each expert's
    /// EP rank (a placement from load balancing). Set alike on every rank; needs `ep`.
    pub expert_map: *const u32,
}

impl Default for MoeLayerSpec {
    /// The zero-initialized spec, as C's `MoeLayerSpec spec = {0};`: every count 0 (set them),
    /// bf16 in and on the wire, default scales, Standard format, no group name or expert map.
    fn default() -> Self {
        MoeLayerSpec {
            num_experts: 0,
            top_k: 0,
            hidden: 0,
            max_tokens_per_rank: 0,
            input_dtype: MoeDtype::Bf16 as i32,
            quant_scheme: MoeQuant::Bf16 as i32,
            fp8_static_scale: 0.0,
            nvfp4_global_scale: 0.0,
            defer_input_quant: 0,
            swizzled_scales: 0,
            tp: 0,
            dp: 0,
            ep: 0,
            sp: 0,
            activation_format: MoeFormat::Standard as i32,
            workspace_group: std::ptr::null(),
            expert_map: std::ptr::null(),
        }
    }
}

/// What `moe_layer_info` reports of a layer's backend (vLLM's prepare/finalize queries).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MoeLayerInfo {
    /// A `MOE_FORMAT_*` code.
    pub activation_format: i32,
    /// Nonzero when finalize leaves the complete result; zero when the TP ranks' outputs still
    /// need an all-reduce (which `moe_runner_forward` applies).
    pub output_is_reduced: i32,
    pub max_tokens_per_rank: u64,
    /// Ranks that send tokens to this one.
    pub num_dispatchers: u64,
    /// The `MOE_DTYPE_*` top-k ids must have.
    pub topk_ids_dtype: i32,
    /// Bytes of workspace this rank holds for the backend.
    pub workspace_bytes: u64,
}

/// What a prepare delivered, in the layer's format. Every tensor is owned by the library and
/// valid until the layer's next prepare; a tensor whose `data` is NULL is absent.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MoeDelivery {
    /// A `MOE_FORMAT_*` code.
    pub format: i32,
    /// The `MOE_QUANT_*` scheme the activations are in.
    pub scheme: i32,
    /// The received activations as the wire scheme's bytes, `MOE_DTYPE_U8` `[rows,
    /// payload_bytes]` (Batched: `[local_experts, max_rows, payload_bytes]`); in a 16-bit
    /// scheme a row is the token's `hidden` elements.
    pub activations: MoeTensor,
    /// The activations' scales, absent when the scheme has none.
    pub scales: MoeTensor,
    /// A `MOE_SCALE_LAYOUT_*` code.
    pub scale_layout: i32,
    /// Standard: `[rows, top_k]` global expert ids, -1 for experts this rank does not compute.
    pub topk_ids: MoeTensor,
    /// Standard: `[rows, top_k]` router weights, 0 where the id is -1.
    pub topk_weights: MoeTensor,
    /// Batched: `[local_experts]`, rows `[0, count)` of each expert hold tokens.
    pub expert_counts: MoeTensor,
    /// Batched: `[local_experts, max_rows]` router weights.
    pub expert_weights: MoeTensor,
    /// Where the experts write their output, in the layer's input dtype: `[rows, hidden]`
    /// (Standard) or `[local_experts, max_rows, hidden]` (Batched). Passing it back to
    /// finalize as it is spares a copy.
    pub expert_output: MoeTensor,
}

/// Checks a code C passed for one of the enums above.
fn code<T: Copy>(field: &str, value: i32, table: &[(i32, T)]) -> Result<T, Failure> {
    table.iter().find(|(c, _)| *c == value).map(|(_, t)| *t).ok_or_else(|| {
        let allowed: Vec<String> = table.iter().map(|(c, _)| c.to_string()).collect();
        Failure::invalid(format!(
            "`{field}` = {value} is not one of the codes this library defines ({}); use the header's constants",
            allowed.join(", ")
        ))
    })
}

const DTYPES: [(i32, DType); 5] = [
    (MoeDtype::Bf16 as i32, DType::Bf16),
    (MoeDtype::F16 as i32, DType::F16),
    (MoeDtype::F32 as i32, DType::F32),
    (MoeDtype::I32 as i32, DType::I32),
    (MoeDtype::U8 as i32, DType::U8),
];

const SCHEMES: [(i32, QuantScheme); 7] = [
    (MoeQuant::Bf16 as i32, QuantScheme::Bf16),
    (MoeQuant::Fp16 as i32, QuantScheme::Fp16),
    (MoeQuant::Fp8PerTensor as i32, QuantScheme::Fp8PerTensor),
    (MoeQuant::Fp8PerToken as i32, QuantScheme::Fp8PerToken),
    (MoeQuant::Fp8Block128 as i32, QuantScheme::Fp8Block128),
    (MoeQuant::Nvfp4 as i32, QuantScheme::Nvfp4),
    (MoeQuant::Mxfp8 as i32, QuantScheme::Mxfp8),
];

const FORMATS: [(i32, ActivationFormat); 2] = [
    (MoeFormat::Standard as i32, ActivationFormat::Standard),
    (MoeFormat::BatchedExperts as i32, ActivationFormat::BatchedExperts),
];

/// The code `table` gives `value` (-1 for none: every value of the library has one).
fn code_of<T: PartialEq>(table: &[(i32, T)], value: T) -> i32 {
    table.iter().find(|(_, v)| *v == value).map_or(-1, |(c, _)| *c)
}

/// The code of `dtype`.
pub fn dtype_code(dtype: DType) -> i32 {
    code_of(&DTYPES, dtype)
}

/// The code of `format`.
pub fn format_code(format: ActivationFormat) -> i32 {
    code_of(&FORMATS, format)
}

fn scheme_code(scheme: QuantScheme) -> i32 {
    code_of(&SCHEMES, scheme)
}

/// Reads a NUL-terminated UTF-8 string C passed as argument `arg`.
///
/// # Safety
/// `text` is NULL or points to a NUL-terminated string that outlives the call.
pub unsafe fn c_str<'a>(arg: &str, text: *const c_char) -> Result<&'a str, Failure> {
    if text.is_null() {
        return Err(Failure::invalid(format!(
            "`{arg}` is NULL; pass a NUL-terminated string"
        )));
    }
    // SAFETY: not NULL, and NUL-terminated per this function's contract.
    unsafe { CStr::from_ptr(text) }
        .to_str()
        .map_err(|e| Failure::invalid(format!("`{arg}` is not UTF-8: {e}")))
}

/// The reason C passed for giving up on a call or a world (`reason`, NULL for none given).
///
/// # Safety
/// `reason` is NULL or points to a NUL-terminated string that outlives the call.
pub unsafe fn reason<'a>(reason: *const c_char) -> Result<&'a str, Failure> {
    if reason.is_null() {
        return Ok("no reason given");
    }
    // SAFETY: not NULL, so NUL-terminated per this function's contract.
    unsafe { c_str("reason", reason) }
}

impl MoeTensor {
    /// No tensor (data NULL).
    pub const ABSENT: MoeTensor = MoeTensor {
        data: std::ptr::null_mut(),
        dtype: -1,
        ndim: 0,
        shape: [0; MOE_MAX_DIMS],
        strides: std::ptr::null(),
        device_type: MoeDevice::Cpu as i32,
        device_id: 0,
    };

    /// The descriptor of `tensor`, for C to read: its bytes stay where they are.
    pub fn of(tensor: &Tensor) -> MoeTensor {
        let host = match tensor.location() {
            Location::Host => tensor.bytes().as_ptr() as *mut c_void,
            Location::Device(_) => std::ptr::null_mut(),
        };
        Self::describing(tensor, host)
    }

    /// The descriptor of `tensor`, for C to write.
    pub fn of_mut(tensor: &mut Tensor) -> MoeTensor {
        let host = match tensor.location() {
            Location::Host => tensor.bytes_mut().as_mut_ptr().cast(),
            Location::Device(_) => std::ptr::null_mut(),
        };
        Self::describing(tensor, host)
    }

    /// `tensor`'s descriptor, with `host` as the address of host bytes.
    fn describing(tensor: &Tensor, host: *mut c_void) -> MoeTensor {
        let mut shape = [0i64; MOE_MAX_DIMS];
        for (s, &d) in shape.iter_mut().zip(tensor.shape()) {
            *s = d as i64;
        }
        let (data, device_type, device_id) = match tensor.location() {
            Location::Host => (host, MoeDevice::Cpu, 0),
            Location::Device(ordinal) => (
                tensor.device_region().map_or(0, |r| r.address()) as usize as *mut c_void,
                MoeDevice::Cuda,
                ordinal as i32,
            ),
        };
        MoeTensor {
            data,
            dtype: dtype_code(tensor.dtype()),
            ndim: tensor.shape().len() as i32,
            shape,
            strides: std::ptr::null(),
            device_type: device_type as i32,
            device_id,
        }
    }

    /// The dtype, shape and byte size this descriptor claims, checked; `arg` names it in errors.
    ///
    /// # Safety
    /// `strides`, when not NULL, points to `ndim` readable values.
    pub unsafe fn layout(&self, arg: &str) -> Result<(DType, Vec<usize>, usize), Failure> {
        let dtype = code(&format!("{arg}.dtype"), self.dtype, &DTYPES)?;
        if !(1..=MOE_MAX_DIMS as i32).contains(&self.ndim) {
            return Err(Failure::invalid(format!(
                "`{arg}.ndim` = {} is outside 1..={MOE_MAX_DIMS}",
                self.ndim
            )));
        }
        let ndim = self.ndim as usize;
        let mut shape = Vec::with_capacity(ndim);
        for (i, &d) in self.shape[..ndim].iter().enumerate() {
            let d =
                usize::try_from(d).map_err(|_| Failure::invalid(format!("`{arg}.shape[{i}]` = {d} is negative")))?;
            shape.push(d);
        }
        let elements = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n.checked_mul(dtype.size()).is_some_and(|b| b <= isize::MAX as usize))
            .ok_or_else(|| Failure::invalid(format!("`{arg}` has shape {shape:?}, larger than memory")))?;
        if !self.strides.is_null() {
            // SAFETY: not NULL, so `ndim` values per this function's contract.
            let strides = unsafe { std::slice::from_raw_parts(self.strides, ndim) };
            let mut want = 1i64;
            for i in (0..ndim).rev() {
                // A dimension of size 1 may carry any stride (DLPack producers differ there).
                if shape[i] != 1 && strides[i] != want {
                    return Err(Failure::invalid(format!(
                        "`{arg}` has strides {strides:?} for shape {shape:?}; only contiguous row-major tensors are accepted: pass a contiguous copy"
                    )));
                }
                want *= shape[i] as i64;
            }
        }
        if self.data.is_null() && elements > 0 {
            return Err(Failure::invalid(format!("`{arg}.data` is NULL for shape {shape:?}")));
        }
        Ok((dtype, shape, elements * dtype.size()))
    }

    /// A host tensor holding a copy of the caller's tensor `arg`.
    ///
    /// # Safety
    /// As [`Self::layout`]; `data` points to the bytes the descriptor claims, readable for the
    /// call.
    pub unsafe fn to_host_tensor(&self, arg: &str) -> Result<Tensor, Failure> {
        // SAFETY: this function's contract.
        let (dtype, shape, bytes) = unsafe { self.host_layout(arg) }?;
        let copy = if bytes == 0 {
            Vec::new()
        } else {
            // SAFETY: `data` holds `bytes` readable bytes, checked non-NULL by `layout`.
            unsafe { std::slice::from_raw_parts(self.data as *const u8, bytes) }.to_vec()
        };
        Ok(Tensor::from_bytes(dtype, &shape, copy)?)
    }

    /// Copies a host tensor's bytes into the caller's tensor `arg`, which must have its dtype
    /// and shape.
    ///
    /// # Safety
    /// As [`Self::layout`]; `data` points to the bytes the descriptor claims, writable and not
    /// aliased by `from` for the call.
    pub unsafe fn store(&self, arg: &str, from: &Tensor) -> Result<(), Failure> {
        // SAFETY: this function's contract.
        let (dtype, shape, bytes) = unsafe { self.host_layout(arg) }?;
        if dtype != from.dtype() || shape != from.shape() {
            return Err(Failure::invalid(format!(
                "`{arg}` is {dtype:?} {shape:?}, the result is {:?} {:?}",
                from.dtype(),
                from.shape()
            )));
        }
        if bytes > 0 {
            // SAFETY: `data` holds `bytes` writable bytes (checked non-NULL by `layout`), and
            // `from` is a tensor of the library's, apart from it.
            unsafe { std::ptr::copy_nonoverlapping(from.bytes().as_ptr(), self.data as *mut u8, bytes) };
        }
        Ok(())
    }

    /// As [`Self::layout`], for a tensor that must be in host memory.
    ///
    /// # Safety
    /// As [`Self::layout`].
    pub unsafe fn host_layout(&self, arg: &str) -> Result<(DType, Vec<usize>, usize), Failure> {
        self.on_cpu(arg)?;
        // SAFETY: this function's contract.
        unsafe { self.layout(arg) }
    }

    fn on_cpu(&self, arg: &str) -> Result<(), Failure> {
        match self.device_type {
            d if d == MoeDevice::Cpu as i32 => Ok(()),
            d if d == MoeDevice::Cuda as i32 => Err(Failure {
                status: crate::status::MoeStatus::Unsupported,
                message: format!(
                    "`{arg}` is on GPU {}: this build of the C library runs the host platform only; pass host tensors",
                    self.device_id
                ),
            }),
            other => Err(Failure::invalid(format!(
                "`{arg}.device_type` = {other} is neither MOE_DEVICE_CPU (1) nor MOE_DEVICE_CUDA (2)"
            ))),
        }
    }
}

impl MoeLayerSpec {
    /// The layer this spec describes, validated.
    ///
    /// # Safety
    /// `workspace_group` is NULL or a NUL-terminated string; `expert_map` is NULL or
    /// `num_experts` readable values.
    pub unsafe fn layer_config(&self) -> Result<LayerConfig, Failure> {
        let input_dtype = code(
            "input_dtype",
            self.input_dtype,
            &[
                (MoeDtype::Bf16 as i32, InputDtype::Bf16),
                (MoeDtype::F16 as i32, InputDtype::F16),
            ],
        )?;
        let scheme = code("quant_scheme", self.quant_scheme, &SCHEMES)?;
        let format = code("activation_format", self.activation_format, &FORMATS)?;
        let mut moe = MoeConfig::new(
            self.num_experts as usize,
            self.top_k as usize,
            self.hidden as usize,
            self.max_tokens_per_rank as usize,
            input_dtype,
        );
        if !self.expert_map.is_null() {
            // SAFETY: not NULL, so `num_experts` values per this function's contract.
            let map = unsafe { std::slice::from_raw_parts(self.expert_map, self.num_experts as usize) };
            moe.expert_map = Some(map.to_vec());
        }
        // A zero-initialized spec means the defaults; any other value is checked as given.
        let or_default = |value: f32, default: f32| if value == 0.0 { default } else { value };
        let defaults = QuantParams::default();
        let mut quant = QuantConfig::new(scheme).with_params(QuantParams {
            fp8_static_scale: or_default(self.fp8_static_scale, defaults.fp8_static_scale),
            nvfp4_global_scale: or_default(self.nvfp4_global_scale, defaults.nvfp4_global_scale),
        });
        if self.swizzled_scales != 0 {
            quant = quant.with_scale_layout(ScaleLayout::Swizzled128x4);
        }
        if self.defer_input_quant != 0 {
            quant = quant.deferred();
        }
        let parallel = ParallelConfig {
            tp: self.tp as usize,
            dp: self.dp as usize,
            ep: self.ep != 0,
            sp: self.sp != 0,
        };
        let layer = LayerConfig::new(moe, quant, parallel, format)?;
        Ok(if self.workspace_group.is_null() {
            layer
        } else {
            // SAFETY: not NULL, so NUL-terminated per this function's contract.
            layer.with_workspace_group(unsafe { c_str("workspace_group", self.workspace_group) }?)
        })
    }
}

impl MoeDelivery {
    /// The descriptors of `dispatched`, with `expert_output` where the experts write.
    pub fn of(dispatched: &Dispatched, expert_output: &mut Tensor) -> MoeDelivery {
        let activations: &Activations = dispatched.activations();
        let (scales, scale_layout) = match activations {
            Activations::Scaled { scales, layout, .. } => (
                MoeTensor::of(scales),
                match layout {
                    ScaleLayout::Linear => MoeScaleLayout::Linear,
                    ScaleLayout::Swizzled128x4 => MoeScaleLayout::Swizzled128x4,
                },
            ),
            Activations::Unscaled { .. } => (MoeTensor::ABSENT, MoeScaleLayout::None),
        };
        let mut delivery = MoeDelivery {
            format: format_code(dispatched.format()),
            scheme: scheme_code(activations.scheme()),
            activations: MoeTensor::of(activations.data()),
            scales,
            scale_layout: scale_layout as i32,
            topk_ids: MoeTensor::ABSENT,
            topk_weights: MoeTensor::ABSENT,
            expert_counts: MoeTensor::ABSENT,
            expert_weights: MoeTensor::ABSENT,
            expert_output: MoeTensor::of_mut(expert_output),
        };
        match dispatched {
            Dispatched::Standard {
                topk_ids, topk_weights, ..
            } => {
                delivery.topk_ids = MoeTensor::of(topk_ids);
                delivery.topk_weights = MoeTensor::of(topk_weights);
            }
            Dispatched::Batched {
                expert_counts, weights, ..
            } => {
                delivery.expert_counts = MoeTensor::of(expert_counts);
                delivery.expert_weights = MoeTensor::of(weights);
            }
        }
        delivery
    }
}

/// The value behind a pointer C passed as argument `arg`.
///
/// # Safety
/// `p` is NULL or points to a live, properly aligned `T` that nothing else mutates during the
/// call.
pub unsafe fn borrowed<'a, T>(arg: &str, p: *const T) -> Result<&'a T, Failure> {
    // SAFETY: this function's contract.
    unsafe { p.as_ref() }.ok_or_else(|| Failure::invalid(format!("`{arg}` is NULL")))
}

/// The handle behind a pointer C passed as argument `arg`, for a call that changes it.
///
/// # Safety
/// `p` is NULL or a handle this library returned and that is not freed, used by no other
/// thread during the call.
pub unsafe fn handle<'a, T>(arg: &str, p: *mut T) -> Result<&'a mut T, Failure> {
    // SAFETY: this function's contract.
    unsafe { p.as_mut() }.ok_or_else(|| Failure::invalid(format!("`{arg}` is NULL")))
}

/// Stores a new handle owning `value` in `*out`, which C passed as argument `arg`.
///
/// # Safety
/// `out` is NULL or points to writable storage for a pointer.
pub unsafe fn give<T>(arg: &str, out: *mut *mut T, value: T) -> Result<(), Failure> {
    if out.is_null() {
        return Err(Failure::invalid(format!(
            "`{arg}` is NULL; pass where to store the handle"
        )));
    }
    // SAFETY: not NULL, and writable per this function's contract.
    unsafe { out.write(Box::into_raw(Box::new(value))) };
    Ok(())
}

/// Frees a handle `give` stored (NULL is ignored). A panic while dropping it is caught and
/// becomes the thread's last error, as in every other function.
///
/// # Safety
/// `p` is NULL or a handle `give` stored and not freed since.
pub unsafe fn free<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: `p` came from Box::into_raw in `give` and is freed once.
        let owned = unsafe { Box::from_raw(p) };
        let _ = crate::status::guarded(move || {
            drop(owned);
            Ok(())
        });
    }
}
