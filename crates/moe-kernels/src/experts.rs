//! The diagonal reference experts on the GPU: [`CudaDiagonalExperts`] computes what
//! [`ReferenceExperts`] computes with a [`DiagonalExperts`] function, bit for bit, reading the
//! device tensors a GPU backend delivered in place (`kernels/experts.cu`). `apply` only enqueues
//! one kernel on the GPU's stream: no allocation, no copy, no host synchronization, so it can be
//! captured in a CUDA graph with the backend's kernels.
//!
//! The host experts refuse rows that break the id convention of [`moe_core::contract`] (an id of
//! `-1` that carries a weight, an expert this rank does not compute) from `apply`. The kernel
//! finds them while the host has long returned, so it records the first one in (row, slot)
//! order in device memory and skips the slot; [`CudaDiagonalExperts::check`] waits for the
//! stream and returns it as the error the host experts would have returned.
//!
//! [`ReferenceExperts`]: moe_core::experts::ReferenceExperts

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use moe_core::experts::{DiagonalExperts, ExpertFunction, Experts};
use moe_core::quant::{QuantScheme, WireLayout, roundtrip_token, swizzle};
use moe_core::{
    ActivationFormat, Activations, DType, Dispatched, ExpertOwnership, InputDtype, LayerConfig, Location, MoeError,
    QuantConfig, Result, ScaleLayout, Tensor,
};

use crate::buffer::DeviceBuffer;
use crate::device::CudaDevice;
use crate::source::{DIAGONAL_EXPERTS_BATCHED, DIAGONAL_EXPERTS_STANDARD, ExpertsSpec, Module};

/// Most top-k slots per Standard row (`MOE_EXPERTS_MAX_TOP_K`: the kernel stages a row's slots
/// in shared memory).
pub const MAX_TOP_K: usize = 64;
/// Most rows per call (Standard rows, or local experts times rows per expert): the kernel's
/// violation key holds a row index below 2^24.
pub const MAX_ROWS: usize = 1 << 24;
/// Threads per block: one block computes one row at a time.
const BLOCK: u32 = 256;
/// Most blocks per launch (8 per SM of an H100/H200); larger calls grid-stride.
const MAX_BLOCKS: usize = 1056;
/// The status word when no row broke the id convention (no key reaches it, see `violation`).
const NO_VIOLATION: u64 = u64::MAX;

const APPLY: &str = "CudaDiagonalExperts::apply";
const NEW: &str = "CudaDiagonalExperts::new";

/// The kernels' parameter block; mirrors `struct ExpertsParams` in experts.cu field for field
/// (`repr(C)`, same order and types). Pointers are device addresses, 0 where the format has no
/// such tensor.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
struct ExpertsParams {
    payload: u64,
    scales: u64,
    ids: u64,
    weights: u64,
    counts: u64,
    expert_scale: u64,
    expert_bias: u64,
    local_of: u64,
    out: u64,
    status: u64,
    rows: i32,
    matrices: i32,
    top_k: i32,
    num_experts: i32,
    swizzled: i32,
    out_bf16: i32,
    shard_begin: i32,
    shard_end: i32,
    fp8_static_scale: f32,
    nvfp4_global_scale: f32,
}

// The kernel's `static_assert` checks the same size, so a field added on one side only fails to
// build instead of shifting the others.
const _: () = assert!(std::mem::size_of::<ExpertsParams>() == 120);

// SAFETY: plain old data with the C layout of the kernel's struct; passed by value.
unsafe impl DeviceRepr for ExpertsParams {}

/// [`DiagonalExperts`] on one GPU, for one rank's [`ExpertOwnership`], consuming device tensors
/// on that GPU.
#[derive(Debug)]
pub struct CudaDiagonalExperts {
    gpu: Arc<CudaDevice>,
    rules: CallRules,
    ownership: ExpertOwnership,
    spec: ExpertsSpec,
    /// `[local experts, hidden]` f32 diagonals and biases, in local-index order.
    expert_scale: DeviceBuffer,
    expert_bias: DeviceBuffer,
    /// `[num_experts]` i32 local indices (see `local_map`).
    local_of: DeviceBuffer,
    /// The u64 violation key the kernel keeps the lowest of, [`NO_VIOLATION`] when none.
    status: DeviceBuffer,
}

impl CudaDiagonalExperts {
    /// Rank `rank`'s experts of `layer` (its format, quantization, input dtype and the experts
    /// it owns), as [`Self::new`].
    pub fn for_layer(
        gpu: &Arc<CudaDevice>,
        function: &DiagonalExperts,
        layer: &LayerConfig,
        rank: usize,
    ) -> Result<Self> {
        Self::new(
            gpu,
            function,
            layer.activation_format,
            layer.quant,
            layer.moe.input_dtype,
            &layer.ownership(rank),
        )
    }

    /// Experts computing `function` on `gpu` for `ownership`, consuming `format` rows of a layer
    /// quantized by `quant` with `input` activations (which together fix the received scheme and
    /// the output dtype). Compiles the kernels and uploads the diagonals and biases of the
    /// experts this rank computes, once.
    ///
    /// # Errors
    ///
    /// What the host experts would refuse on their first row (a hidden size the schemes do not
    /// accept, an unusable fp8 static or nvfp4 global scale), an ownership of another number of
    /// experts, sizes beyond the kernels' `i32` indices, and NVRTC or driver failures.
    pub fn new(
        gpu: &Arc<CudaDevice>,
        function: &DiagonalExperts,
        format: ActivationFormat,
        quant: QuantConfig,
        input: InputDtype,
        ownership: &ExpertOwnership,
    ) -> Result<Self> {
        let (hidden, num_experts) = (function.hidden(), function.num_experts());
        let spec = experts_spec(&quant, input, hidden);
        // The checks the host experts make when they decode (and requantize) a row, made once.
        for scheme in [Some(spec.wire), spec.requantize].into_iter().flatten() {
            roundtrip_token(scheme, &quant.params, &vec![0.0; hidden])?;
        }
        if hidden > i32::MAX as usize || num_experts > i32::MAX as usize {
            return Err(MoeError::InvalidInput {
                op: NEW,
                detail: format!(
                    "{num_experts} experts of hidden size {hidden}: the kernels index both with i32; split the layer"
                ),
            });
        }
        let local = local_experts(ownership, num_experts)?;
        let (shard, shards) = ownership.shard();
        let rules = CallRules {
            at: Location::Device(gpu.ordinal()),
            format,
            wire: spec.wire,
            wire_layout: spec.wire.wire_layout(hidden)?,
            requantize: spec.requantize.is_some(),
            hidden,
            out_dtype: input.dtype(),
            local_experts: local.len(),
            num_experts,
            shard: shard_bounds(hidden, shard, shards),
            fp8_static_scale: quant.params.fp8_static_scale,
            nvfp4_global_scale: quant.params.nvfp4_global_scale,
        };
        gpu.preload(&Module::Experts(spec))?;
        let rows = |values: &[f32]| -> Vec<u8> {
            local
                .iter()
                .flat_map(|&e| &values[e * hidden..(e + 1) * hidden])
                .flat_map(|v| v.to_le_bytes())
                .collect()
        };
        let local_of: Vec<u8> = local_map(ownership, num_experts)
            .iter()
            .flat_map(|i| i.to_le_bytes())
            .collect();
        let upload = |bytes: &[u8]| DeviceBuffer::from_bytes(gpu, bytes);
        Ok(CudaDiagonalExperts {
            gpu: gpu.clone(),
            rules,
            ownership: ownership.clone(),
            spec,
            expert_scale: upload(&rows(function.scale()))?,
            expert_bias: upload(&rows(function.bias()))?,
            local_of: upload(&local_of)?,
            status: upload(&NO_VIOLATION.to_le_bytes())?,
        })
    }

    /// Waits for the work enqueued on the GPU's stream so far and reports the first row, in
    /// (row, slot) order, that broke the id convention in the `apply` calls since the last
    /// check, with the host experts' message; then clears the record. Call it from the thread
    /// that applies: an `apply` enqueued by another thread while it runs may go unreported.
    ///
    /// # Errors
    ///
    /// [`MoeError::Convention`] for a recorded violation (whose call's output is unspecified),
    /// [`MoeError::Device`] when the stream failed.
    pub fn check(&self) -> Result<()> {
        let mut key = [0u8; 8];
        self.status.download(0, &mut key)?;
        let key = u64::from_le_bytes(key);
        if key == NO_VIOLATION {
            return Ok(());
        }
        self.status.upload(0, &NO_VIOLATION.to_le_bytes())?;
        Err(violation(key))
    }

    fn tables(&self) -> DeviceTables {
        DeviceTables {
            expert_scale: self.expert_scale.ptr(),
            expert_bias: self.expert_bias.ptr(),
            local_of: self.local_of.ptr(),
            status: self.status.ptr(),
        }
    }
}

impl Experts for CudaDiagonalExperts {
    fn activation_format(&self) -> ActivationFormat {
        self.rules.format
    }

    /// Enqueues the experts on the GPU's stream; the output is ready for work ordered after it
    /// there. Every tensor must be on this GPU. Rows that break the id convention are reported
    /// by [`CudaDiagonalExperts::check`], not here.
    fn apply(&self, dispatched: &Dispatched, ownership: &ExpertOwnership, out: &mut Tensor) -> Result<()> {
        if *ownership != self.ownership {
            return Err(MoeError::InvalidInput {
                op: APPLY,
                detail: format!(
                    "these experts were built for {:?} and hold only those experts' weights on the GPU, but the call is for {ownership:?}: build one CudaDiagonalExperts per rank",
                    self.ownership
                ),
            });
        }
        let shape = self.rules.check(dispatched, out)?;
        let rows = shape.rows * shape.matrices;
        if rows == 0 {
            return Ok(());
        }
        let params = self.rules.params(dispatched, out, &shape, &self.tables());
        let name = match dispatched {
            Dispatched::Standard { .. } => DIAGONAL_EXPERTS_STANDARD,
            Dispatched::Batched { .. } => DIAGONAL_EXPERTS_BATCHED,
        };
        let f = self.gpu.function(&Module::Experts(self.spec), name)?;
        let cfg = LaunchConfig {
            grid_dim: (rows.min(MAX_BLOCKS) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.gpu.stream().launch_builder(&f);
        b.arg(&params);
        // SAFETY: both kernels take one `ExpertsParams` by value. `CallRules::check` verified
        // that every tensor is on this GPU, with the dtype, shape and alignment the kernel reads
        // and writes for `shape` (rows, matrices, top_k, the wire layout, swizzled scale
        // lengths), and the tables are this object's buffers of `local_experts * hidden` f32,
        // `num_experts` i32 and one u64. The tensors' memory stays valid for the kernel: the
        // platform's `DeviceBuffer` synchronizes this stream before it frees.
        unsafe { b.launch(cfg) }.map_err(|e| MoeError::Device(format!("launch {name}: {e}")))?;
        Ok(())
    }
}

/// The module specialization for a layer: the scheme the rows arrive in, and the experts' own
/// scheme when they quantize themselves (`ReferenceExperts::decode_rows`' condition).
fn experts_spec(quant: &QuantConfig, input: InputDtype, hidden: usize) -> ExpertsSpec {
    let wire = quant.wire_scheme(input);
    ExpertsSpec {
        wire,
        hidden,
        requantize: (quant.defer_input_quant && wire != quant.scheme).then_some(quant.scheme),
    }
}

/// `DiagonalExperts::forward_shard`'s part of the hidden dimension: shard `shard` of `shards`
/// takes `ceil(hidden / shards)` elements, the last ones fewer or none.
fn shard_bounds(hidden: usize, shard: usize, shards: usize) -> Range<usize> {
    let per = hidden.div_ceil(shards);
    (shard * per).min(hidden)..((shard + 1) * per).min(hidden)
}

/// The global ids of the experts `ownership` computes, checked against the function's experts.
fn local_experts(ownership: &ExpertOwnership, num_experts: usize) -> Result<Vec<usize>> {
    let (of, ok) = match ownership {
        ExpertOwnership::Ep { placement, rank } => (
            placement.num_experts(),
            placement.num_experts() == num_experts && *rank < placement.ep_size(),
        ),
        ExpertOwnership::TensorSharded {
            shard,
            shards,
            num_experts: n,
        } => (*n, *n == num_experts && shard < shards),
    };
    if !ok {
        return Err(MoeError::InvalidInput {
            op: NEW,
            detail: format!(
                "the function has {num_experts} experts, the ownership {ownership:?} places {of} (or names a rank or shard outside its group): build both from the same layer"
            ),
        });
    }
    Ok(ownership.local_experts())
}

/// `[num_experts]` i32: each expert's local index on this rank, `-1` where the rank does not
/// compute it (what the kernel checks ids against).
fn local_map(ownership: &ExpertOwnership, num_experts: usize) -> Vec<i32> {
    (0..num_experts)
        .map(|e| ownership.local_index(e).map_or(-1, |i| i as i32))
        .collect()
}

/// The host experts' error for a violation key the kernel recorded (`report_violation` in
/// experts.cu): row in bits 39..63, slot in 33..38, kind in 32, the weight's bits or the id
/// below. Keys are below [`NO_VIOLATION`] because rows are below 2^24.
fn violation(key: u64) -> MoeError {
    let (row, slot, value) = (key >> 39, (key >> 33) & 0x3f, key as u32);
    MoeError::Convention(if key >> 32 & 1 == 0 {
        format!(
            "row {row} slot {slot}: id -1 carries weight {}, expected 0.0",
            f32::from_bits(value)
        )
    } else {
        format!(
            "row {row} slot {slot}: expert {} is not computed on this rank but was not replaced by -1",
            value as i32
        )
    })
}

/// Device addresses of the experts' own buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DeviceTables {
    expert_scale: u64,
    expert_bias: u64,
    local_of: u64,
    status: u64,
}

/// What every call's tensors must be, fixed at construction.
#[derive(Clone, Debug, PartialEq)]
struct CallRules {
    at: Location,
    format: ActivationFormat,
    wire: QuantScheme,
    wire_layout: WireLayout,
    /// The kernel reads the payload as 16-bit elements to requantize it.
    requantize: bool,
    hidden: usize,
    out_dtype: DType,
    local_experts: usize,
    num_experts: usize,
    shard: Range<usize>,
    fp8_static_scale: f32,
    nvfp4_global_scale: f32,
}

/// One call's dimensions, read from its checked tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CallShape {
    /// Rows per matrix: every row (Standard), or rows per local expert (BatchedExperts).
    rows: usize,
    /// 1 (Standard) or the local experts (BatchedExperts).
    matrices: usize,
    /// Slots per Standard row; 0 for BatchedExperts.
    top_k: usize,
    /// The scales are in the 128x4 layout, each matrix on its own.
    swizzled: bool,
}

impl CallRules {
    /// Checks what the kernel will read and write: where, dtypes, shapes, sizes and alignment.
    fn check(&self, d: &Dispatched, out: &Tensor) -> Result<CallShape> {
        let invalid = |detail: String| MoeError::InvalidInput { op: APPLY, detail };
        if d.format() != self.format {
            return Err(invalid(format!(
                "the delivery is in {} format, these experts consume {}: build them with the backend's activation format",
                d.format(),
                self.format
            )));
        }
        let at = self.at;
        let (rows, matrices, top_k) = match d {
            Dispatched::Standard {
                topk_ids, topk_weights, ..
            } => {
                let (rows, k) = dims2(topk_ids, "topk_ids", "[rows, top_k]")?;
                topk_ids.expect_at(APPLY, "topk_ids", DType::I32, &[rows, k], at)?;
                topk_weights.expect_at(APPLY, "topk_weights", DType::F32, &[rows, k], at)?;
                if k > MAX_TOP_K {
                    return Err(invalid(format!(
                        "top_k = {k}: the GPU experts take at most {MAX_TOP_K} slots per row; use the host ReferenceExperts"
                    )));
                }
                (rows, 1, k)
            }
            Dispatched::Batched {
                expert_counts, weights, ..
            } => {
                let (_, max_rows) = dims2(weights, "weights", "[local_experts, max_rows]")?;
                let local = self.local_experts;
                weights.expect_at(APPLY, "weights", DType::F32, &[local, max_rows], at)?;
                expert_counts.expect_at(APPLY, "expert_counts", DType::I32, &[local], at)?;
                (max_rows, local, 0)
            }
        };
        if rows.checked_mul(matrices).is_none_or(|n| n > MAX_ROWS) {
            return Err(invalid(format!(
                "{matrices} x {rows} rows: the GPU experts take at most {MAX_ROWS} rows per call; split the call"
            )));
        }
        let lead: &[usize] = match d {
            Dispatched::Standard { .. } => &[rows],
            Dispatched::Batched { .. } => &[matrices, rows],
        };
        let with_last = |last: usize| [lead, &[last]].concat();

        let act = d.activations();
        if act.scheme() != self.wire {
            return Err(invalid(format!(
                "the activations are {}, these experts were built for {} rows: build them with the layer's QuantConfig and input dtype",
                act.scheme(),
                self.wire
            )));
        }
        let wire = &self.wire_layout;
        act.data()
            .expect_at(APPLY, "activations", DType::U8, &with_last(wire.payload_bytes), at)?;
        let swizzled = match act {
            Activations::Unscaled { .. } if wire.scale_bytes == 0 => false,
            Activations::Scaled { scales, layout, .. } if wire.scale_bytes > 0 => match layout {
                ScaleLayout::Linear => {
                    scales.expect_at(APPLY, "scales", DType::U8, &with_last(wire.scale_bytes), at)?;
                    false
                }
                ScaleLayout::Swizzled128x4 => {
                    if wire.scale_bytes != wire.scales_per_token {
                        return Err(invalid(format!(
                            "{} scales are f32, and the 128x4 swizzle is a layout of one-byte scales (nvfp4, mxfp8): deliver them linear",
                            self.wire
                        )));
                    }
                    let len = matrices * swizzle::swizzled_len(rows, wire.scales_per_token);
                    scales.expect_at(APPLY, "scales", DType::U8, &[len], at)?;
                    true
                }
            },
            _ => {
                return Err(invalid(format!(
                    "{} activations {} scales: build them with Activations::new",
                    self.wire,
                    if wire.scale_bytes > 0 { "need" } else { "have no" }
                )));
            }
        };
        out.expect_at(APPLY, "out", self.out_dtype, &with_last(self.hidden), at)?;

        let mut aligned = vec![(out, "out", 2)];
        match d {
            Dispatched::Standard {
                topk_ids, topk_weights, ..
            } => aligned.extend([(topk_ids, "topk_ids", 4), (topk_weights, "topk_weights", 4)]),
            Dispatched::Batched {
                expert_counts, weights, ..
            } => aligned.extend([(expert_counts, "expert_counts", 4), (weights, "weights", 4)]),
        }
        if self.requantize {
            aligned.push((act.data(), "activations", 2));
        }
        for (t, arg, align) in aligned {
            let address = device_address(t);
            if !address.is_multiple_of(align) {
                return Err(invalid(format!(
                    "`{arg}` starts at device address {address:#x}, and the kernel accesses its {:?} elements in place, which needs {align}-byte alignment: pass a tensor at an aligned offset",
                    t.dtype()
                )));
            }
        }
        Ok(CallShape {
            rows,
            matrices,
            top_k,
            swizzled,
        })
    }

    /// The kernel's parameters for a call `check` accepted.
    fn params(&self, d: &Dispatched, out: &Tensor, shape: &CallShape, tables: &DeviceTables) -> ExpertsParams {
        let act = d.activations();
        let (ids, weights, counts) = match d {
            Dispatched::Standard {
                topk_ids, topk_weights, ..
            } => (device_address(topk_ids), device_address(topk_weights), 0),
            Dispatched::Batched {
                expert_counts, weights, ..
            } => (0, device_address(weights), device_address(expert_counts)),
        };
        // Sizes fit: rows and matrices are bounded by MAX_ROWS and the local experts, top_k by
        // MAX_TOP_K, the hidden size and the expert count were checked at construction.
        ExpertsParams {
            payload: device_address(act.data()),
            scales: match act {
                Activations::Unscaled { .. } => 0,
                Activations::Scaled { scales, .. } => device_address(scales),
            },
            ids,
            weights,
            counts,
            expert_scale: tables.expert_scale,
            expert_bias: tables.expert_bias,
            local_of: tables.local_of,
            out: device_address(out),
            status: tables.status,
            rows: shape.rows as i32,
            matrices: shape.matrices as i32,
            top_k: shape.top_k as i32,
            num_experts: self.num_experts as i32,
            swizzled: i32::from(shape.swizzled),
            out_bf16: i32::from(self.out_dtype == DType::Bf16),
            shard_begin: self.shard.start as i32,
            shard_end: self.shard.end as i32,
            fp8_static_scale: self.fp8_static_scale,
            nvfp4_global_scale: self.nvfp4_global_scale,
        }
    }
}

/// The two dimensions of a 2-D tensor, or an error naming the layout it must have.
fn dims2(t: &Tensor, arg: &str, layout: &str) -> Result<(usize, usize)> {
    match *t.shape() {
        [a, b] => Ok((a, b)),
        _ => Err(MoeError::InvalidInput {
            op: APPLY,
            detail: format!("`{arg}` must be 2-D {layout}, got shape {:?}", t.shape()),
        }),
    }
}

/// The device address of a tensor `CallRules::check` placed on the GPU.
fn device_address(t: &Tensor) -> u64 {
    t.device_region()
        .expect("moe invariant violated: CallRules::check placed every tensor on the GPU")
        .address()
}

#[cfg(test)]
mod tests {
    use moe_core::experts::ReferenceExperts;
    use moe_core::{DeviceMemory, DeviceRegion, ExpertPlacement};

    use super::*;

    /// Device memory stood in for by an address: the checks read addresses, never bytes.
    #[derive(Debug)]
    struct FakeDevice {
        address: u64,
        len: usize,
    }

    impl DeviceMemory for FakeDevice {
        fn ordinal(&self) -> usize {
            0
        }
        fn address(&self) -> u64 {
            self.address
        }
        fn len(&self) -> usize {
            self.len
        }
        fn read(&self, _: usize, _: &mut [u8]) -> Result<()> {
            unreachable!("the checks never read device bytes")
        }
    }

    fn on_device(t: &Tensor, address: u64) -> Tensor {
        let len = t.len() * t.dtype().size();
        let region = DeviceRegion::new(Arc::new(FakeDevice { address, len }), 0, len).unwrap();
        Tensor::on_device(t.dtype(), t.shape(), region).unwrap()
    }

    fn ep_ownership() -> ExpertOwnership {
        ExpertOwnership::Ep {
            placement: Arc::new(ExpertPlacement::contiguous(8, 3)),
            rank: 1,
        }
    }

    fn rules(format: ActivationFormat, wire: QuantScheme, requantize: bool) -> CallRules {
        CallRules {
            at: Location::Device(0),
            format,
            wire,
            wire_layout: wire.wire_layout(256).unwrap(),
            requantize,
            hidden: 256,
            out_dtype: DType::Bf16,
            local_experts: 3,
            num_experts: 8,
            shard: 0..256,
            fp8_static_scale: 0.5,
            nvfp4_global_scale: 2.0,
        }
    }

    /// A Standard delivery of `rows` rows, top-2, with its scales in `layout`.
    fn standard(scheme: QuantScheme, rows: usize, layout: ScaleLayout) -> (Dispatched, Tensor) {
        let w = scheme.wire_layout(256).unwrap();
        let data = Tensor::zeros(DType::U8, &[rows, w.payload_bytes]);
        let scales = scheme.has_scales().then(|| match layout {
            ScaleLayout::Linear => (Tensor::zeros(DType::U8, &[rows, w.scale_bytes]), layout),
            ScaleLayout::Swizzled128x4 => (
                Tensor::zeros(DType::U8, &[swizzle::swizzled_len(rows, w.scales_per_token)]),
                layout,
            ),
        });
        let d = Dispatched::Standard {
            activations: Activations::new(scheme, data, scales),
            topk_ids: Tensor::from_i32(&[rows, 2], &vec![3; rows * 2]),
            topk_weights: Tensor::from_f32(DType::F32, &[rows, 2], &vec![0.5; rows * 2]),
        };
        (d, Tensor::zeros(DType::Bf16, &[rows, 256]))
    }

    /// Every tensor of `d` on the fake GPU, at distinct addresses.
    fn to_device(d: &Dispatched) -> Dispatched {
        let dev = |t: &Tensor, k: u64| on_device(t, 0x10_0000 * k);
        let act = |a: &Activations| match a {
            Activations::Unscaled { scheme, data } => Activations::new(*scheme, dev(data, 1), None),
            Activations::Scaled {
                scheme,
                data,
                scales,
                layout,
            } => Activations::new(*scheme, dev(data, 1), Some((dev(scales, 2), *layout))),
        };
        match d {
            Dispatched::Standard {
                activations,
                topk_ids,
                topk_weights,
            } => Dispatched::Standard {
                activations: act(activations),
                topk_ids: dev(topk_ids, 3),
                topk_weights: dev(topk_weights, 4),
            },
            Dispatched::Batched {
                activations,
                expert_counts,
                weights,
            } => Dispatched::Batched {
                activations: act(activations),
                expert_counts: dev(expert_counts, 5),
                weights: dev(weights, 6),
            },
        }
    }

    const TABLES: DeviceTables = DeviceTables {
        expert_scale: 0xa000,
        expert_bias: 0xb000,
        local_of: 0xc000,
        status: 0xd000,
    };

    #[test]
    fn shard_bounds_are_where_forward_shard_writes() {
        for (hidden, shards) in [(256, 3), (128, 1), (7, 4), (5, 8), (7168, 8)] {
            let f = DiagonalExperts::random(2, hidden, 7);
            let x = vec![1.0f32; hidden];
            let mut y = vec![f32::NAN; hidden];
            let mut covered = 0;
            for shard in 0..shards {
                f.forward_shard(1, shard, shards, &x, &mut y);
                let bounds = shard_bounds(hidden, shard, shards);
                for (i, v) in y.iter().enumerate() {
                    assert_eq!(
                        *v != 0.0,
                        bounds.contains(&i),
                        "hidden {hidden} shard {shard}/{shards} element {i}"
                    );
                }
                covered += bounds.len();
            }
            assert_eq!(covered, hidden);
        }
    }

    #[test]
    fn local_map_inverts_the_local_experts() {
        let ep = ep_ownership();
        let local = local_experts(&ep, 8).unwrap();
        assert_eq!(local, [3, 4, 5]);
        assert_eq!(local_map(&ep, 8), [-1, -1, -1, 0, 1, 2, -1, -1]);
        let tp = ExpertOwnership::TensorSharded {
            shard: 2,
            shards: 3,
            num_experts: 4,
        };
        assert_eq!(local_experts(&tp, 4).unwrap(), [0, 1, 2, 3]);
        assert_eq!(local_map(&tp, 4), [0, 1, 2, 3]);
        let err = local_experts(&tp, 5).unwrap_err().to_string();
        assert!(err.contains("5 experts") && err.contains("places 4"), "{err}");
    }

    #[test]
    fn spec_requantizes_exactly_when_the_host_experts_do() {
        let nvfp4 = QuantConfig::new(QuantScheme::Nvfp4);
        let spec = experts_spec(&nvfp4, InputDtype::Bf16, 256);
        assert_eq!((spec.wire, spec.requantize), (QuantScheme::Nvfp4, None));
        let spec = experts_spec(&nvfp4.deferred(), InputDtype::F16, 256);
        assert_eq!(
            (spec.wire, spec.requantize),
            (QuantScheme::Fp16, Some(QuantScheme::Nvfp4))
        );
        let bf16 = QuantConfig::unquantized(InputDtype::Bf16);
        assert_eq!(experts_spec(&bf16, InputDtype::Bf16, 256).requantize, None);
    }

    /// The key `report_violation` in experts.cu records.
    fn kernel_key(row: u64, slot: u64, kind: u64, value: u32) -> u64 {
        row << 39 | slot << 33 | kind << 32 | u64::from(value)
    }

    #[test]
    fn violations_read_as_the_host_experts_report_them() {
        let quant = QuantConfig::new(QuantScheme::Bf16);
        let host = ReferenceExperts::new(
            Arc::new(DiagonalExperts::random(8, 256, 1)),
            ActivationFormat::Standard,
            quant,
        );
        // The host experts index the placement with the id, so an id beyond the experts is
        // asked of a tensor-parallel ownership, which checks the range.
        let tp = ExpertOwnership::TensorSharded {
            shard: 0,
            shards: 2,
            num_experts: 8,
        };
        let cases = [
            (-1, 0.25f32, 0, 0.25f32.to_bits(), ep_ownership()),
            (-7, f32::NAN, 0, f32::NAN.to_bits(), ep_ownership()),
            (6, 1.0, 1, 6, ep_ownership()),
            (99, 1.0, 1, 99, tp),
        ];
        for (id, weight, kind, value, ownership) in cases {
            let (d, mut out) = standard(QuantScheme::Bf16, 5, ScaleLayout::Linear);
            let Dispatched::Standard {
                activations,
                mut topk_ids,
                mut topk_weights,
            } = d
            else {
                unreachable!()
            };
            let mut ids = topk_ids.to_i32();
            let mut weights = topk_weights.to_f32();
            ids[2 * 3 + 1] = id;
            weights[2 * 3 + 1] = weight;
            topk_ids = Tensor::from_i32(&[5, 2], &ids);
            topk_weights = Tensor::from_f32(DType::F32, &[5, 2], &weights);
            let d = Dispatched::Standard {
                activations,
                topk_ids,
                topk_weights,
            };
            let want = host.apply(&d, &ownership, &mut out).unwrap_err();
            assert_eq!(violation(kernel_key(3, 1, kind, value)), want);
        }
        // The largest key the kernel can record is still below the "none" word.
        assert!(kernel_key(MAX_ROWS as u64 - 1, MAX_TOP_K as u64 - 1, 1, u32::MAX) < NO_VIOLATION);
    }

    #[test]
    fn host_tensors_are_refused_naming_the_argument_and_the_gpu() {
        let rules = rules(ActivationFormat::Standard, QuantScheme::Nvfp4, false);
        let (d, out) = standard(QuantScheme::Nvfp4, 4, ScaleLayout::Linear);
        let err = rules.check(&d, &out).unwrap_err().to_string();
        assert!(
            err.contains("CudaDiagonalExperts::apply")
                && err.contains("`topk_ids` is in host memory, this call needs it in GPU 0"),
            "{err}"
        );
        let d = to_device(&d);
        let err = rules.check(&d, &out).unwrap_err().to_string();
        assert!(err.contains("`out` is in host memory"), "{err}");
        rules.check(&d, &on_device(&out, 0x1000)).unwrap();
    }

    #[test]
    fn a_standard_call_reads_its_shape_and_addresses() {
        let rules = rules(ActivationFormat::Standard, QuantScheme::Nvfp4, false);
        let (d, out) = standard(QuantScheme::Nvfp4, 130, ScaleLayout::Swizzled128x4);
        let (d, out) = (to_device(&d), on_device(&out, 0x1000));
        let shape = rules.check(&d, &out).unwrap();
        assert_eq!(
            shape,
            CallShape {
                rows: 130,
                matrices: 1,
                top_k: 2,
                swizzled: true
            }
        );
        let p = rules.params(&d, &out, &shape, &TABLES);
        assert_eq!(
            (p.payload, p.scales, p.ids, p.weights, p.counts, p.out),
            (0x10_0000, 0x20_0000, 0x30_0000, 0x40_0000, 0, 0x1000)
        );
        assert_eq!((p.rows, p.matrices, p.top_k, p.swizzled, p.out_bf16), (130, 1, 2, 1, 1));
        assert_eq!((p.local_of, p.status, p.num_experts), (0xc000, 0xd000, 8));
    }

    #[test]
    fn a_batched_call_needs_one_matrix_per_local_expert() {
        let rules = rules(ActivationFormat::BatchedExperts, QuantScheme::Mxfp8, false);
        let w = QuantScheme::Mxfp8.wire_layout(256).unwrap();
        let (local, rows) = (3, 5);
        let batched = |scale_len: usize| Dispatched::Batched {
            activations: Activations::new(
                QuantScheme::Mxfp8,
                Tensor::zeros(DType::U8, &[local, rows, w.payload_bytes]),
                Some((Tensor::zeros(DType::U8, &[scale_len]), ScaleLayout::Swizzled128x4)),
            ),
            expert_counts: Tensor::from_i32(&[local], &[5, 0, 2]),
            weights: Tensor::zeros(DType::F32, &[local, rows]),
        };
        let out = on_device(&Tensor::zeros(DType::Bf16, &[local, rows, 256]), 0x1000);
        let d = to_device(&batched(local * 128 * 8));
        let shape = rules.check(&d, &out).unwrap();
        assert_eq!(
            (shape.rows, shape.matrices, shape.top_k, shape.swizzled),
            (5, 3, 0, true)
        );
        let p = rules.params(&d, &out, &shape, &TABLES);
        assert_eq!((p.ids, p.weights, p.counts), (0, 0x60_0000, 0x50_0000));

        // One swizzled matrix for all rows is the Standard layout, not the Batched one.
        let err = rules
            .check(&to_device(&batched(128 * 8)), &out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`scales` must be U8 [3072]"), "{err}");
    }

    #[test]
    fn mismatched_calls_say_what_the_experts_were_built_for() {
        let rules = rules(ActivationFormat::Standard, QuantScheme::Fp8Block128, false);
        let out = on_device(&Tensor::zeros(DType::Bf16, &[4, 256]), 0x1000);
        let (d, _) = standard(QuantScheme::Mxfp8, 4, ScaleLayout::Linear);
        let err = rules.check(&to_device(&d), &out).unwrap_err().to_string();
        assert!(
            err.contains("the activations are mxfp8") && err.contains("built for fp8-block128"),
            "{err}"
        );

        let (d, _) = standard(QuantScheme::Fp8Block128, 4, ScaleLayout::Swizzled128x4);
        let err = rules.check(&to_device(&d), &out).unwrap_err().to_string();
        assert!(
            err.contains("scales are f32") && err.contains("deliver them linear"),
            "{err}"
        );

        let batched = self::rules(ActivationFormat::BatchedExperts, QuantScheme::Fp8Block128, false);
        let (d, _) = standard(QuantScheme::Fp8Block128, 4, ScaleLayout::Linear);
        let err = batched.check(&to_device(&d), &out).unwrap_err().to_string();
        assert!(
            err.contains("standard format, these experts consume batched-experts"),
            "{err}"
        );
    }

    #[test]
    fn misaligned_tensors_are_refused() {
        let rules = rules(ActivationFormat::Standard, QuantScheme::Bf16, true);
        let (d, out) = standard(QuantScheme::Bf16, 4, ScaleLayout::Linear);
        let d = to_device(&d);
        let err = rules.check(&d, &on_device(&out, 0x1001)).unwrap_err().to_string();
        assert!(
            err.contains("`out` starts at device address 0x1001") && err.contains("2-byte"),
            "{err}"
        );
        let Dispatched::Standard {
            topk_ids, topk_weights, ..
        } = &d
        else {
            unreachable!()
        };
        let d = Dispatched::Standard {
            activations: Activations::new(
                QuantScheme::Bf16,
                on_device(&Tensor::zeros(DType::U8, &[4, 512]), 0x2001),
                None,
            ),
            topk_ids: topk_ids.clone(),
            topk_weights: topk_weights.clone(),
        };
        let err = rules.check(&d, &on_device(&out, 0x1000)).unwrap_err().to_string();
        assert!(err.contains("`activations` starts at device address 0x2001"), "{err}");
    }
}
