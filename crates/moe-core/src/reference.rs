//! The CPU reference MoE in f64: the oracle every backend is compared with.
//!
//! It takes the tokens after the same quantize -> dequantize round trip the data path applies,
//! so a difference measures the data path (dispatch, experts' f32 math, combine, rounding of
//! partial sums), not quantization.

use moe_quant::roundtrip_token;

use crate::config::QuantConfig;
use crate::error::Result;
use crate::experts::ExpertFunction;
use crate::tensor::Tensor;

/// `tokens` `[n, hidden]` after the quantization round trip of `quant` (deferred or not: the
/// experts quantize deferred inputs themselves with the same scheme).
pub fn roundtrip_tokens(quant: &QuantConfig, tokens: &Tensor) -> Result<Vec<f32>> {
    let h = tokens.row_len();
    let x = tokens.to_f32();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(h.max(1)) {
        out.extend(roundtrip_token(quant.scheme, &quant.params, row)?);
    }
    Ok(out)
}

/// `out[t] = sum_k w[t,k] * expert_{id[t,k]}(x[t])` in f64, whole experts.
pub fn reference_moe(
    function: &dyn ExpertFunction,
    x: &[f32],
    topk_ids: &[i32],
    topk_weights: &[f32],
    top_k: usize,
) -> Vec<f64> {
    let h = function.hidden();
    let n = topk_ids.len() / top_k.max(1);
    let mut out = vec![0f64; n * h];
    let mut y = vec![0f64; h];
    for t in 0..n {
        let xt: Vec<f64> = x[t * h..(t + 1) * h].iter().map(|v| *v as f64).collect();
        for k in 0..top_k {
            let e = topk_ids[t * top_k + k] as usize;
            let w = topk_weights[t * top_k + k] as f64;
            function.forward_f64(e, &xt, &mut y);
            for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(&y) {
                *o += w * v;
            }
        }
    }
    out
}

/// Largest `|got - want|` relative to the largest `|want|` (at least 1e-3, so an all-small
/// result is not judged on noise).
pub fn max_relative_error(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            let d = (*g as f64 - w).abs();
            if d.is_nan() { f64::INFINITY } else { d / scale }
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experts::{DiagonalExperts, SwigluExperts};

    #[test]
    fn shards_of_every_expert_sum_to_the_whole_expert() {
        let fs: Vec<Box<dyn ExpertFunction>> = vec![
            Box::new(DiagonalExperts::random(3, 10, 1)),
            Box::new(SwigluExperts::random(3, 8, 12, 2)),
        ];
        for f in fs {
            let x: Vec<f32> = (0..f.hidden()).map(|i| (i as f32 * 0.37).sin()).collect();
            let xd: Vec<f64> = x.iter().map(|v| *v as f64).collect();
            for e in 0..3 {
                let mut whole = vec![0f64; f.hidden()];
                f.forward_f64(e, &xd, &mut whole);
                let mut sum = vec![0f32; f.hidden()];
                let mut part = vec![0f32; f.hidden()];
                for s in 0..4 {
                    f.forward_shard(e, s, 4, &x, &mut part);
                    sum.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
                }
                let err = max_relative_error(&sum, &whole);
                assert!(
                    err < 1e-5,
                    "{f:?} expert {e}: shards disagree with the whole, err {err}"
                );
            }
        }
    }

    #[test]
    fn relative_error_flags_nan() {
        assert_eq!(max_relative_error(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert!((max_relative_error(&[1.5, 2.0], &[1.0, 2.0]) - 0.25).abs() < 1e-12);
    }
}
