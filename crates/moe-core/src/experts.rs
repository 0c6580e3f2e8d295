//! The `Experts` trait (the engine's expert kernels) and reference experts for tests and
//! benchmarks.
//!
//! Reference experts follow the contract exactly: they dequantize what they receive (or, with
//! deferred quantization, quantize it themselves first), skip ids of `-1`, refuse ids they do
//! not compute (a backend that breaks the id convention fails loudly), apply the router weights
//! and sum over their local experts in f32, and write their output in the input dtype.

use std::sync::Arc;

use moe_quant::{dequantize_token, quantize_token, swizzle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{ActivationFormat, ExpertOwnership, QuantConfig, ScaleLayout};
use crate::contract::{Activations, Dispatched};
use crate::error::{MoeError, Result};
use crate::tensor::Tensor;

/// The engine's expert computation for one rank.
pub trait Experts: Send + Sync + std::fmt::Debug {
    /// The layout these experts consume.
    fn activation_format(&self) -> ActivationFormat;
    /// Computes `out` from what `prepare` delivered: `[rows, hidden]` (Standard) or
    /// `[local_experts, max_rows, hidden]` (Batched), in the input dtype.
    fn apply(&self, dispatched: &Dispatched, ownership: &ExpertOwnership, out: &mut Tensor) -> Result<()>;
}

/// The math of a family of experts, at two precisions: f32 shards for the data path and f64
/// whole experts for the oracle.
pub trait ExpertFunction: Send + Sync + std::fmt::Debug {
    /// Elements per token.
    fn hidden(&self) -> usize;
    /// Number of experts.
    fn num_experts(&self) -> usize;
    /// Shard `shard` of `shards` of `expert` applied to `x`, written to `out`; summing every
    /// shard's output gives the whole expert.
    fn forward_shard(&self, expert: usize, shard: usize, shards: usize, x: &[f32], out: &mut [f32]);
    /// The whole expert in f64.
    fn forward_f64(&self, expert: usize, x: &[f64], out: &mut [f64]);
}

fn shard_range(len: usize, shard: usize, shards: usize) -> std::ops::Range<usize> {
    let per = len.div_ceil(shards);
    (shard * per).min(len)..((shard + 1) * per).min(len)
}

/// `y = d_e * x + b_e` per element: cheap enough for hidden 7168 and 256 experts. A shard
/// computes its slice of the hidden dimension.
#[derive(Debug, Clone)]
pub struct DiagonalExperts {
    hidden: usize,
    scale: Vec<f32>,
    bias: Vec<f32>,
}

impl DiagonalExperts {
    /// Random experts from `seed`.
    pub fn random(num_experts: usize, hidden: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = num_experts * hidden;
        DiagonalExperts {
            hidden,
            scale: (0..n).map(|_| rng.random_range(-1.5f32..1.5)).collect(),
            bias: (0..n).map(|_| rng.random_range(-0.25f32..0.25)).collect(),
        }
    }

    /// The diagonals `d_e`, `[num_experts, hidden]` row-major (for experts that run elsewhere,
    /// such as on a GPU).
    pub fn scale(&self) -> &[f32] {
        &self.scale
    }

    /// The biases `b_e`, `[num_experts, hidden]` row-major.
    pub fn bias(&self) -> &[f32] {
        &self.bias
    }
}

impl ExpertFunction for DiagonalExperts {
    fn hidden(&self) -> usize {
        self.hidden
    }
    fn num_experts(&self) -> usize {
        self.scale.len() / self.hidden
    }
    fn forward_shard(&self, expert: usize, shard: usize, shards: usize, x: &[f32], out: &mut [f32]) {
        let h = self.hidden;
        out.fill(0.0);
        for i in shard_range(h, shard, shards) {
            out[i] = self.scale[expert * h + i] * x[i] + self.bias[expert * h + i];
        }
    }
    fn forward_f64(&self, expert: usize, x: &[f64], out: &mut [f64]) {
        let h = self.hidden;
        for i in 0..h {
            out[i] = self.scale[expert * h + i] as f64 * x[i] + self.bias[expert * h + i] as f64;
        }
    }
}

/// A SwiGLU MLP per expert, `down(silu(gate x) * up x)`, for small hidden sizes. A shard
/// computes its slice of the intermediate dimension (a row-parallel down projection).
#[derive(Debug, Clone)]
pub struct SwigluExperts {
    hidden: usize,
    inter: usize,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

impl SwigluExperts {
    /// Random experts from `seed`, weights scaled so outputs stay near unit magnitude.
    pub fn random(num_experts: usize, hidden: usize, inter: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let a = (3.0 / hidden as f32).sqrt();
        let b = (3.0 / inter as f32).sqrt() * 2.0;
        let mut draw = |n: usize, s: f32| (0..n).map(|_| rng.random_range(-s..s)).collect::<Vec<f32>>();
        let gate = draw(num_experts * inter * hidden, a);
        let up = draw(num_experts * inter * hidden, a);
        let down = draw(num_experts * hidden * inter, b);
        SwigluExperts {
            hidden,
            inter,
            gate,
            up,
            down,
        }
    }
}

impl ExpertFunction for SwigluExperts {
    fn hidden(&self) -> usize {
        self.hidden
    }
    fn num_experts(&self) -> usize {
        self.gate.len() / (self.hidden * self.inter)
    }
    fn forward_shard(&self, expert: usize, shard: usize, shards: usize, x: &[f32], out: &mut [f32]) {
        let (h, n) = (self.hidden, self.inter);
        let range = shard_range(n, shard, shards);
        let mut act = vec![0f32; range.len()];
        for (a, j) in act.iter_mut().zip(range.clone()) {
            let row = (expert * n + j) * h;
            let g: f32 = self.gate[row..row + h].iter().zip(x).map(|(w, v)| w * v).sum();
            let u: f32 = self.up[row..row + h].iter().zip(x).map(|(w, v)| w * v).sum();
            *a = g / (1.0 + (-g).exp()) * u;
        }
        for (i, o) in out.iter_mut().enumerate() {
            let row = (expert * h + i) * n;
            *o = self.down[row + range.start..row + range.end]
                .iter()
                .zip(&act)
                .map(|(w, v)| w * v)
                .sum();
        }
    }
    fn forward_f64(&self, expert: usize, x: &[f64], out: &mut [f64]) {
        let (h, n) = (self.hidden, self.inter);
        let act: Vec<f64> = (0..n)
            .map(|j| {
                let row = (expert * n + j) * h;
                let dot = |w: &[f32]| -> f64 { w[row..row + h].iter().zip(x).map(|(w, v)| *w as f64 * v).sum() };
                let g = dot(&self.gate);
                g / (1.0 + (-g).exp()) * dot(&self.up)
            })
            .collect();
        for (i, o) in out.iter_mut().enumerate() {
            let row = (expert * h + i) * n;
            *o = self.down[row..row + n]
                .iter()
                .zip(&act)
                .map(|(w, v)| *w as f64 * v)
                .sum();
        }
    }
}

/// Experts that run an [`ExpertFunction`] on the host in the given activation format.
#[derive(Debug, Clone)]
pub struct ReferenceExperts {
    function: Arc<dyn ExpertFunction>,
    format: ActivationFormat,
    quant: QuantConfig,
}

impl ReferenceExperts {
    /// Experts consuming `format` with the layer's quantization config.
    pub fn new(function: Arc<dyn ExpertFunction>, format: ActivationFormat, quant: QuantConfig) -> Self {
        ReferenceExperts {
            function,
            format,
            quant,
        }
    }

    /// The expert math.
    pub fn function(&self) -> &Arc<dyn ExpertFunction> {
        &self.function
    }

    /// Decodes every row of a `[.., rows, payload]` activation block to f32, quantizing first
    /// when the experts own quantization (deferred).
    fn decode_rows(&self, act: &Activations, first_row: usize, rows: usize) -> Result<Vec<f32>> {
        let h = self.function.hidden();
        let scheme = act.scheme();
        let wire = scheme.wire_layout(h)?;
        let data = act.data().bytes();
        let scales: Vec<u8> = match act {
            Activations::Unscaled { .. } => Vec::new(),
            Activations::Scaled { scales, layout, .. } => match layout {
                ScaleLayout::Linear => {
                    scales.bytes()[first_row * wire.scale_bytes..(first_row + rows) * wire.scale_bytes].to_vec()
                }
                ScaleLayout::Swizzled128x4 => {
                    let cols = wire.scales_per_token;
                    // Each matrix of `rows` rows (the whole Standard block, or one expert's
                    // rows in Batched format) is swizzled on its own.
                    let block = swizzle::swizzled_len(rows, cols);
                    let start = (first_row / rows.max(1)) * block;
                    swizzle::unswizzle_128x4(&scales.bytes()[start..start + block], rows, cols)
                }
            },
        };
        let mut out = vec![0f32; rows * h];
        let mut tmp = vec![0u8; 0];
        let own = self.quant.scheme;
        let own_wire = own.wire_layout(h)?;
        for r in 0..rows {
            let p = &data[(first_row + r) * wire.payload_bytes..(first_row + r + 1) * wire.payload_bytes];
            let s = &scales[r * wire.scale_bytes..(r + 1) * wire.scale_bytes];
            let row = &mut out[r * h..(r + 1) * h];
            dequantize_token(scheme, &self.quant.params, p, s, row)?;
            if self.quant.defer_input_quant && scheme != own {
                let mut payload = vec![0u8; own_wire.payload_bytes];
                tmp.resize(own_wire.scale_bytes, 0);
                quantize_token(own, &self.quant.params, row, &mut payload, &mut tmp)?;
                dequantize_token(own, &self.quant.params, &payload, &tmp, row)?;
            }
        }
        Ok(out)
    }
}

impl Experts for ReferenceExperts {
    fn activation_format(&self) -> ActivationFormat {
        self.format
    }

    fn apply(&self, dispatched: &Dispatched, ownership: &ExpertOwnership, out: &mut Tensor) -> Result<()> {
        let h = self.function.hidden();
        let (shard, shards) = ownership.shard();
        let mut y = vec![0f32; h];
        match dispatched {
            Dispatched::Standard {
                activations,
                topk_ids,
                topk_weights,
            } => {
                let ids = topk_ids.to_i32();
                let weights = topk_weights.to_f32();
                let rows = topk_ids.shape()[0];
                let k = topk_ids.shape()[1];
                let x = self.decode_rows(activations, 0, rows)?;
                let mut acc = vec![0f32; h];
                for r in 0..rows {
                    acc.fill(0.0);
                    for j in 0..k {
                        let (id, w) = (ids[r * k + j], weights[r * k + j]);
                        if id < 0 {
                            if w != 0.0 {
                                return Err(MoeError::Convention(format!(
                                    "row {r} slot {j}: id -1 carries weight {w}, expected 0.0"
                                )));
                            }
                            continue;
                        }
                        if ownership.local_index(id as usize).is_none() {
                            return Err(MoeError::Convention(format!(
                                "row {r} slot {j}: expert {id} is not computed on this rank but was not replaced by -1"
                            )));
                        }
                        self.function
                            .forward_shard(id as usize, shard, shards, &x[r * h..(r + 1) * h], &mut y);
                        for (a, v) in acc.iter_mut().zip(&y) {
                            *a += w * v;
                        }
                    }
                    out.store_f32(r * h, &acc);
                }
            }
            Dispatched::Batched {
                activations,
                expert_counts,
                weights,
            } => {
                let counts = expert_counts.to_i32();
                let w = weights.to_f32();
                let max_rows = weights.shape()[1];
                let local = ownership.local_experts();
                let zeros = vec![0f32; h];
                for (li, &expert) in local.iter().enumerate() {
                    let count = counts[li] as usize;
                    let x = self.decode_rows(activations, li * max_rows, max_rows)?;
                    for r in 0..max_rows {
                        let row = li * max_rows + r;
                        if r < count {
                            self.function
                                .forward_shard(expert, shard, shards, &x[r * h..(r + 1) * h], &mut y);
                            let wr = w[row];
                            for v in y.iter_mut() {
                                *v *= wr;
                            }
                            out.store_f32(row * h, &y);
                        } else {
                            out.store_f32(row * h, &zeros);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
