//! Quantization of one token into its wire payload and scales, and the inverse, exactly as
//! `docs/QUANT_SPEC.md` specifies (that document is normative; comments here say why).

use crate::scheme::{FP8_BLOCK, MXFP8_BLOCK, NVFP4_BLOCK};
use crate::{QuantError, QuantScheme, WireBuffer, bf16, e2m1, e4m3, e8m0, fp16};

/// Scheme parameters that are not derived from the token itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantParams {
    /// Dequant scale `s` of [`QuantScheme::Fp8PerTensor`]: `x ≈ e4m3(q) * s`, quantized as
    /// `q = e4m3(x / s)`. Must be finite and positive when that scheme is used.
    pub fp8_static_scale: f32,
    /// Encode global scale `gs` of [`QuantScheme::Nvfp4`] (conventionally
    /// [`nvfp4_global_scale`] of the tensor's amax), shared by all experts; dequantization divides
    /// by it. Must lie in `(0, `[`QuantParams::MAX_NVFP4_GLOBAL_SCALE`]`]` when that scheme is
    /// used.
    pub nvfp4_global_scale: f32,
}

impl QuantParams {
    /// Largest accepted nvfp4 global scale, 2^118: with the smallest non-zero block scale 2^-9,
    /// the element multiplier `gs / sf` stays finite (at most 2^127), so a zero element can
    /// never meet an infinite multiplier.
    pub const MAX_NVFP4_GLOBAL_SCALE: f32 = f32::from_bits((127 + 118) << 23);
}

impl Default for QuantParams {
    fn default() -> Self {
        QuantParams {
            fp8_static_scale: 1.0,
            nvfp4_global_scale: 1.0,
        }
    }
}

/// `448 * 6 / amax` in f32, the nvfp4 encode global scale that maps `amax` to the largest
/// product of an e4m3 block scale (448) and an e2m1 element (6).
///
/// An `amax` that is zero, negative, infinite or NaN gives 1.0: such a tensor has no finite
/// non-zero element, every block scale of it is 0 and any positive global scale encodes it the
/// same. An `amax` below `2688 / 2^118` (about 8e-33) gives
/// [`QuantParams::MAX_NVFP4_GLOBAL_SCALE`].
pub fn nvfp4_global_scale(amax: f32) -> f32 {
    if !(amax.is_finite() && amax > 0.0) {
        return 1.0;
    }
    ((e4m3::MAX * e2m1::MAX) / amax).min(QuantParams::MAX_NVFP4_GLOBAL_SCALE)
}

/// Quantizes one token (`hidden = x.len()`) into `payload` and `scales`, whose lengths must be
/// the `payload_bytes` and `scale_bytes` of [`QuantScheme::wire_layout`]. Every byte of both
/// buffers is written. f32 scales are little-endian, as are bf16/fp16 elements.
///
/// # Errors
///
/// The layout errors of [`QuantScheme::wire_layout`], [`QuantError::BufferLength`] for a
/// mis-sized buffer, and [`QuantError::InvalidFp8StaticScale`] /
/// [`QuantError::InvalidNvfp4GlobalScale`] for an unusable parameter of the scheme in use.
/// Nothing is written when an error is returned.
pub fn quantize_token(
    scheme: QuantScheme,
    params: &QuantParams,
    x: &[f32],
    payload: &mut [u8],
    scales: &mut [u8],
) -> Result<(), QuantError> {
    check_buffers(scheme, x.len(), payload.len(), scales.len())?;
    match scheme {
        QuantScheme::Bf16 => encode_u16(x, payload, bf16::from_f32),
        QuantScheme::Fp16 => encode_u16(x, payload, fp16::from_f32),
        QuantScheme::Fp8PerTensor => encode_e4m3(x, fp8_static_scale(params)?, payload),
        QuantScheme::Fp8PerToken => quantize_fp8_blocks(x, x.len(), payload, scales),
        QuantScheme::Fp8Block128 => quantize_fp8_blocks(x, FP8_BLOCK, payload, scales),
        QuantScheme::Nvfp4 => quantize_nvfp4(x, nvfp4_scale(params)?, payload, scales),
        QuantScheme::Mxfp8 => quantize_mxfp8(x, payload, scales),
    }
    Ok(())
}

/// Dequantizes one token (`hidden = out.len()`) from `payload` and `scales` laid out as
/// [`quantize_token`] writes them. Scales are used as they come; this does not validate them.
///
/// # Errors
///
/// As [`quantize_token`]; nothing is written when an error is returned.
pub fn dequantize_token(
    scheme: QuantScheme,
    params: &QuantParams,
    payload: &[u8],
    scales: &[u8],
    out: &mut [f32],
) -> Result<(), QuantError> {
    check_buffers(scheme, out.len(), payload.len(), scales.len())?;
    match scheme {
        QuantScheme::Bf16 => decode_u16(payload, out, bf16::to_f32),
        QuantScheme::Fp16 => decode_u16(payload, out, fp16::to_f32),
        QuantScheme::Fp8PerTensor => {
            let s = fp8_static_scale(params)?;
            decode_e4m3_blocks(payload, out.len(), [s].into_iter(), out);
        }
        QuantScheme::Fp8PerToken => decode_e4m3_blocks(payload, out.len(), f32_scales(scales), out),
        QuantScheme::Fp8Block128 => decode_e4m3_blocks(payload, FP8_BLOCK, f32_scales(scales), out),
        QuantScheme::Nvfp4 => dequantize_nvfp4(payload, scales, nvfp4_scale(params)?, out),
        QuantScheme::Mxfp8 => {
            let block_scales = scales.iter().map(|&code| e8m0::to_f32(code));
            decode_e4m3_blocks(payload, MXFP8_BLOCK, block_scales, out);
        }
    }
    Ok(())
}

/// Quantizes then dequantizes `x`: the values a receiver reconstructs, which is what the CPU
/// oracle computes with.
///
/// # Errors
///
/// As [`quantize_token`], minus the buffer errors.
pub fn roundtrip_token(scheme: QuantScheme, params: &QuantParams, x: &[f32]) -> Result<Vec<f32>, QuantError> {
    let layout = scheme.wire_layout(x.len())?;
    let mut payload = vec![0; layout.payload_bytes];
    let mut scales = vec![0; layout.scale_bytes];
    quantize_token(scheme, params, x, &mut payload, &mut scales)?;
    let mut out = vec![0.0; x.len()];
    dequantize_token(scheme, params, &payload, &scales, &mut out)?;
    Ok(out)
}

fn check_buffers(scheme: QuantScheme, hidden: usize, payload_len: usize, scales_len: usize) -> Result<(), QuantError> {
    let layout = scheme.wire_layout(hidden)?;
    for (buffer, expected, got) in [
        (WireBuffer::Payload, layout.payload_bytes, payload_len),
        (WireBuffer::Scales, layout.scale_bytes, scales_len),
    ] {
        if expected != got {
            return Err(QuantError::BufferLength {
                scheme,
                buffer,
                hidden,
                expected,
                got,
            });
        }
    }
    Ok(())
}

fn fp8_static_scale(params: &QuantParams) -> Result<f32, QuantError> {
    let value = params.fp8_static_scale;
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(QuantError::InvalidFp8StaticScale { value })
    }
}

fn nvfp4_scale(params: &QuantParams) -> Result<f32, QuantError> {
    let value = params.nvfp4_global_scale;
    if value > 0.0 && value <= QuantParams::MAX_NVFP4_GLOBAL_SCALE {
        Ok(value)
    } else {
        Err(QuantError::InvalidNvfp4GlobalScale { value })
    }
}

fn encode_u16(x: &[f32], payload: &mut [u8], encode: fn(f32) -> u16) {
    for (bytes, &v) in payload.as_chunks_mut::<2>().0.iter_mut().zip(x) {
        *bytes = encode(v).to_le_bytes();
    }
}

fn decode_u16(payload: &[u8], out: &mut [f32], decode: fn(u16) -> f32) {
    for (y, &bytes) in out.iter_mut().zip(payload.as_chunks::<2>().0) {
        *y = decode(u16::from_le_bytes(bytes));
    }
}

/// Largest magnitude among the finite elements; NaN and ±Inf do not take part, so one
/// non-finite element cannot wipe out the resolution of the rest of its block.
fn finite_amax(block: &[f32]) -> f32 {
    block
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0, |amax: f32, v| amax.max(v.abs()))
}

/// The f32 dequant scale of an fp8 block, `amax / 448`. Every such quotient `s` satisfies
/// `(448 * s) / 448 == s` in f32 (checked exhaustively over all finite amax), so requantizing a
/// dequantized block, whose amax is `448 * s`, reproduces `s` and the roundtrip is idempotent.
fn fp8_block_scale(amax: f32) -> f32 {
    amax / e4m3::MAX
}

fn quantize_fp8_blocks(x: &[f32], block: usize, payload: &mut [u8], scales: &mut [u8]) {
    let blocks = x.chunks_exact(block).zip(payload.chunks_exact_mut(block));
    for ((xb, qb), scale_bytes) in blocks.zip(scales.as_chunks_mut::<4>().0) {
        let scale = fp8_block_scale(finite_amax(xb));
        *scale_bytes = scale.to_le_bytes();
        if scale == 0.0 {
            qb.fill(0);
        } else {
            encode_e4m3(xb, scale, qb);
        }
    }
}

/// `q = e4m3(x / scale)` element-wise: a division, never a multiplication by `1 / scale`.
fn encode_e4m3(x: &[f32], scale: f32, payload: &mut [u8]) {
    for (q, &v) in payload.iter_mut().zip(x) {
        *q = e4m3::from_f32(v / scale);
    }
}

/// `y = dec(q) * scale` with one scale per `block` codes.
fn decode_e4m3_blocks(payload: &[u8], block: usize, block_scales: impl Iterator<Item = f32>, out: &mut [f32]) {
    let blocks = payload.chunks_exact(block).zip(block_scales);
    for ((qb, scale), yb) in blocks.zip(out.chunks_exact_mut(block)) {
        for (y, &q) in yb.iter_mut().zip(qb) {
            *y = e4m3::to_f32(q) * scale;
        }
    }
}

fn f32_scales(scales: &[u8]) -> impl Iterator<Item = f32> {
    scales.as_chunks::<4>().0.iter().map(|&bytes| f32::from_le_bytes(bytes))
}

fn quantize_nvfp4(x: &[f32], gs: f32, payload: &mut [u8], scales: &mut [u8]) {
    let blocks = x
        .chunks_exact(NVFP4_BLOCK)
        .zip(payload.chunks_exact_mut(NVFP4_BLOCK / 2));
    for ((xb, pb), sf_code) in blocks.zip(scales.iter_mut()) {
        *sf_code = e4m3::from_f32(gs * (finite_amax(xb) / e2m1::MAX));
        let sf = e4m3::to_f32(*sf_code);
        if sf == 0.0 {
            pb.fill(0);
            continue;
        }
        // Finite: gs <= 2^118 and sf >= 2^-9.
        let r = gs / sf;
        for (byte, &[even, odd]) in pb.iter_mut().zip(xb.as_chunks::<2>().0) {
            *byte = e2m1::pack(e2m1::from_f32(even * r), e2m1::from_f32(odd * r));
        }
    }
}

fn dequantize_nvfp4(payload: &[u8], scales: &[u8], gs: f32, out: &mut [f32]) {
    let blocks = payload.chunks_exact(NVFP4_BLOCK / 2).zip(scales);
    for ((pb, &sf_code), yb) in blocks.zip(out.chunks_exact_mut(NVFP4_BLOCK)) {
        let sf = e4m3::to_f32(sf_code);
        for (&byte, pair) in pb.iter().zip(yb.as_chunks_mut::<2>().0) {
            let (even, odd) = e2m1::unpack(byte);
            // e2m1 * e4m3 has at most 6 significant bits, so only the division rounds.
            pair[0] = (e2m1::to_f32(even) * sf) / gs;
            pair[1] = (e2m1::to_f32(odd) * sf) / gs;
        }
    }
}

fn quantize_mxfp8(x: &[f32], payload: &mut [u8], scales: &mut [u8]) {
    let blocks = x.chunks_exact(MXFP8_BLOCK).zip(payload.chunks_exact_mut(MXFP8_BLOCK));
    for ((xb, qb), code) in blocks.zip(scales.iter_mut()) {
        *code = e8m0::for_e4m3_amax(finite_amax(xb));
        encode_e4m3(xb, e8m0::to_f32(*code), qb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn quantize(scheme: QuantScheme, params: &QuantParams, x: &[f32]) -> (Vec<u8>, Vec<u8>) {
        let layout = scheme.wire_layout(x.len()).unwrap();
        let mut payload = vec![0; layout.payload_bytes];
        let mut scales = vec![0; layout.scale_bytes];
        quantize_token(scheme, params, x, &mut payload, &mut scales).unwrap();
        (payload, scales)
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// Params that every scheme accepts, with the nvfp4 global scale derived from `x`.
    fn params_for(x: &[f32]) -> QuantParams {
        QuantParams {
            fp8_static_scale: 0.75,
            nvfp4_global_scale: nvfp4_global_scale(finite_amax(x)),
        }
    }

    /// `sign * m * 2^e` with `m` in [1, 2) and `e` in `-spread..=spread`.
    fn random_token(rng: &mut ChaCha8Rng, hidden: usize, spread: i32) -> Vec<f32> {
        (0..hidden)
            .map(|_| {
                let v = rng.random_range(1.0f32..2.0) * 2f32.powi(rng.random_range(-spread..=spread));
                if rng.random() { -v } else { v }
            })
            .collect()
    }

    #[test]
    fn global_scale_is_448_times_6_over_amax() {
        assert_eq!(nvfp4_global_scale(2688.0), 1.0);
        assert_eq!(nvfp4_global_scale(448.0), 6.0);
        assert_eq!(nvfp4_global_scale(1.0), 2688.0);
        assert_eq!(nvfp4_global_scale(3.0), 2688.0f32 / 3.0);
        for amax in [0.0, -0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert_eq!(nvfp4_global_scale(amax), 1.0, "{amax}");
        }
        assert_eq!(QuantParams::MAX_NVFP4_GLOBAL_SCALE, 2f32.powi(118));
        assert_eq!(nvfp4_global_scale(1e-40), QuantParams::MAX_NVFP4_GLOBAL_SCALE);
    }

    #[test]
    fn golden_bf16_and_fp16() {
        let x = [1.0, -2.0, f32::NAN, 3.140625];
        let (payload, scales) = quantize(QuantScheme::Bf16, &QuantParams::default(), &x);
        assert_eq!(payload, [0x80, 0x3f, 0x00, 0xc0, 0xff, 0x7f, 0x49, 0x40]);
        assert!(scales.is_empty());
        let (payload, _) = quantize(QuantScheme::Fp16, &QuantParams::default(), &x);
        assert_eq!(payload, [0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7f, 0x48, 0x42]);
    }

    #[test]
    fn golden_fp8_per_tensor() {
        let params = QuantParams {
            fp8_static_scale: 0.5,
            ..QuantParams::default()
        };
        let x = [1.0, -3.0, 300.0, f32::NAN];
        let (payload, _) = quantize(QuantScheme::Fp8PerTensor, &params, &x);
        assert_eq!(payload, [0x40, 0xcc, 0x7e, 0x7f]);
        let y = roundtrip_token(QuantScheme::Fp8PerTensor, &params, &x).unwrap();
        assert_eq!(&y[..3], [1.0, -3.0, 224.0]);
        assert!(y[3].is_nan());
    }

    #[test]
    fn golden_fp8_per_token() {
        let x = [0.5, -3.0, 7.0, 0.0];
        let (payload, scales) = quantize(QuantScheme::Fp8PerToken, &QuantParams::default(), &x);
        assert_eq!(payload, [0x60, 0xf4, 0x7e, 0x00]);
        assert_eq!(scales, 2f32.powi(-6).to_le_bytes());
        let y = roundtrip_token(QuantScheme::Fp8PerToken, &QuantParams::default(), &x).unwrap();
        assert_eq!(y, x);
    }

    #[test]
    fn golden_fp8_block128_with_a_zero_block() {
        let mut x = vec![0.0; 256];
        x[0] = 7.0;
        x[1] = -0.5;
        let (payload, scales) = quantize(QuantScheme::Fp8Block128, &QuantParams::default(), &x);
        assert_eq!(payload[..2], [0x7e, 0xe0]);
        assert!(payload[2..].iter().all(|&q| q == 0));
        assert_eq!(scales[..4], 2f32.powi(-6).to_le_bytes());
        assert_eq!(scales[4..], [0; 4]);
    }

    #[test]
    fn golden_nvfp4() {
        let params = QuantParams {
            nvfp4_global_scale: 1.0,
            ..QuantParams::default()
        };
        let mut x = [0.0; 16];
        x[..3].copy_from_slice(&[12.0, -1.0, 0.3]);
        let (payload, scales) = quantize(QuantScheme::Nvfp4, &params, &x);
        // amax 12 -> 12 / 6 = 2 -> sf 0x40; r = 1 / 2; 12 * r = 6 (0x7), -0.5 (0x9), 0.15 -> 0.
        assert_eq!(scales, [0x40]);
        assert_eq!(payload, [0x97, 0, 0, 0, 0, 0, 0, 0]);
        let y = roundtrip_token(QuantScheme::Nvfp4, &params, &x).unwrap();
        assert_eq!(y[..3], [12.0, -1.0, 0.0]);
    }

    #[test]
    fn golden_mxfp8() {
        let mut x = [0.0; 32];
        x[..2].copy_from_slice(&[1000.0, -0.5]);
        let (payload, scales) = quantize(QuantScheme::Mxfp8, &QuantParams::default(), &x);
        // 1000 = 1.95 * 2^9 -> e = 9 - 7 = 2 (code 129); 1000 / 4 = 250 -> 256 (0x78).
        assert_eq!(scales, [129]);
        assert_eq!(payload[..2], [0x78, 0xa0]);
        let y = roundtrip_token(QuantScheme::Mxfp8, &QuantParams::default(), &x).unwrap();
        assert_eq!(y[..2], [1024.0, -0.5]);
    }

    /// Inputs found by search such that the other natural f32 operation orders (multiplying by a
    /// reciprocal, regrouping a product) give different bits: they pin the order the spec fixes.
    #[test]
    fn golden_vectors_pin_the_f32_operation_order() {
        let f = f32::from_bits;

        // x / s; x * (1 / s) gives 0x3a.
        let params = QuantParams {
            fp8_static_scale: f(0x3c49_85f0),
            ..QuantParams::default()
        };
        let (payload, _) = quantize(QuantScheme::Fp8PerTensor, &params, &[f(0x3c6f_4f0c)]);
        assert_eq!(payload, [0x39]);

        // x / (amax / 448); x * (448 / amax) gives 0x38 and 0x76 for elements 1 and 2, and
        // x * (1 / (amax / 448)) gives 0x3b for element 3.
        let x = [f(0x406c_cccd), f(0x3c0f_c57d), f(0x3ff5_41d5), f(0x3c31_999a)];
        let (payload, _) = quantize(QuantScheme::Fp8PerToken, &QuantParams::default(), &x);
        assert_eq!(payload, [0x7e, 0x39, 0x77, 0x3a]);

        let gs = f(0x4291_4c1c);
        let params = QuantParams {
            nvfp4_global_scale: gs,
            ..QuantParams::default()
        };
        let mut x = [0.0f32; 48];
        // sf = e4m3(gs * (amax / 6)); gs * (amax * (1 / 6)) gives 0x12.
        x[0] = f(0x3b48_db6c);
        // (gs * amax) / 6 gives 0x13.
        x[16] = f(0x3b5e_0000);
        // A block with sf 0x32 (0.625): x * (gs / sf) gives code 1 where x * ((1 / sf) * gs),
        // (x * gs) / sf and x / (sf / gs) give 2.
        x[32] = 0.625 * 6.0 / gs;
        x[33] = f(0x3bd3_6db6);
        let (payload, scales) = quantize(QuantScheme::Nvfp4, &params, &x);
        assert_eq!(scales, [0x11, 0x12, 0x32]);
        assert_eq!(payload[16], 0x17);

        // (e2m1 * sf) / gs; e2m1 * (sf / gs) gives 0x3e09_6db6.
        let mut out = [0.0f32; 16];
        let mut payload = [0u8; 8];
        payload[0] = 0x05;
        dequantize_token(QuantScheme::Nvfp4, &params, &payload, &[0x45], &mut out).unwrap();
        assert_eq!(out[0].to_bits(), 0x3e09_6db7);
    }

    #[test]
    fn mis_sized_buffers_are_rejected_and_left_untouched() {
        let x = [1.0f32; 32];
        let params = QuantParams::default();
        let mut payload = vec![0xaa; 15];
        let mut scales = vec![0xaa; 2];
        let err = quantize_token(QuantScheme::Nvfp4, &params, &x, &mut payload, &mut scales);
        assert_eq!(
            err,
            Err(QuantError::BufferLength {
                scheme: QuantScheme::Nvfp4,
                buffer: WireBuffer::Payload,
                hidden: 32,
                expected: 16,
                got: 15,
            })
        );
        assert_eq!(
            err.unwrap_err().to_string(),
            "nvfp4 payload buffer for hidden 32 has 15 bytes but needs exactly 16; \
             size it with QuantScheme::wire_layout"
        );
        assert!(payload.iter().chain(&scales).all(|&b| b == 0xaa));

        let mut payload = vec![0xaa; 32];
        let mut scales = vec![0xaa; 3];
        let err = quantize_token(QuantScheme::Fp8PerToken, &params, &x, &mut payload, &mut scales);
        assert_eq!(
            err.unwrap_err().to_string(),
            "fp8-per-token scales buffer for hidden 32 has 3 bytes but needs exactly 4; \
             size it with QuantScheme::wire_layout"
        );
        assert!(payload.iter().chain(&scales).all(|&b| b == 0xaa));

        let mut out = vec![7.0f32; 32];
        let err = dequantize_token(QuantScheme::Mxfp8, &params, &[0; 32], &[], &mut out);
        assert_eq!(
            err,
            Err(QuantError::BufferLength {
                scheme: QuantScheme::Mxfp8,
                buffer: WireBuffer::Scales,
                hidden: 32,
                expected: 1,
                got: 0,
            })
        );
        assert!(out.iter().all(|&v| v == 7.0));
        assert_eq!(
            dequantize_token(QuantScheme::Bf16, &params, &[0; 4], &[], &mut [0.0; 0]),
            Err(QuantError::ZeroHidden {
                scheme: QuantScheme::Bf16
            })
        );
    }

    #[test]
    fn unusable_scale_params_are_rejected() {
        let x = [1.0f32; 32];
        for bad in [0.0, -0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let params = QuantParams {
                fp8_static_scale: bad,
                nvfp4_global_scale: bad,
            };
            let err = roundtrip_token(QuantScheme::Fp8PerTensor, &params, &x).unwrap_err();
            assert!(matches!(err, QuantError::InvalidFp8StaticScale { value } if value.to_bits() == bad.to_bits()));
            let err = roundtrip_token(QuantScheme::Nvfp4, &params, &x).unwrap_err();
            assert!(matches!(err, QuantError::InvalidNvfp4GlobalScale { value } if value.to_bits() == bad.to_bits()));
            let mut out = [5.0f32; 32];
            let err = dequantize_token(QuantScheme::Nvfp4, &params, &[0; 16], &[0; 2], &mut out);
            assert!(err.is_err());
            assert_eq!(out, [5.0; 32]);
            // Schemes that do not use a parameter do not look at it.
            for scheme in [QuantScheme::Bf16, QuantScheme::Fp8PerToken, QuantScheme::Mxfp8] {
                assert!(roundtrip_token(scheme, &params, &x).is_ok(), "{scheme}");
            }
        }
        let params = QuantParams {
            fp8_static_scale: 0.0,
            nvfp4_global_scale: f32::NAN,
        };
        assert_eq!(
            roundtrip_token(QuantScheme::Fp8PerTensor, &params, &x)
                .unwrap_err()
                .to_string(),
            "fp8-per-tensor needs a finite positive QuantParams::fp8_static_scale but got 0; \
             pass the tensor's dequant scale, amax / 448"
        );
        assert_eq!(
            roundtrip_token(QuantScheme::Nvfp4, &params, &x)
                .unwrap_err()
                .to_string(),
            "nvfp4 needs QuantParams::nvfp4_global_scale in (0, 2^118] but got NaN; \
             compute it with nvfp4_global_scale(amax)"
        );
    }

    #[test]
    fn nvfp4_global_scale_is_accepted_up_to_2_pow_118() {
        let max = QuantParams::MAX_NVFP4_GLOBAL_SCALE;
        let params = |gs| QuantParams {
            nvfp4_global_scale: gs,
            ..QuantParams::default()
        };
        let too_big = max.next_up();
        assert_eq!(
            roundtrip_token(QuantScheme::Nvfp4, &params(too_big), &[1.0; 16]),
            Err(QuantError::InvalidNvfp4GlobalScale { value: too_big })
        );
        // At the bound, the smallest non-zero block scale 2^-9 gives the multiplier 2^127:
        // zeros stay zero and the block maximum 6 * 2^-127 maps to 6.
        let mut x = [0.0f32; 16];
        x[0] = 6.0 * 2f32.powi(-127);
        let (payload, scales) = quantize(QuantScheme::Nvfp4, &params(max), &x);
        assert_eq!(scales, [0x01]);
        assert_eq!(payload, [0x07, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn all_zero_tokens_give_zero_bytes_and_positive_zeros() {
        let x = vec![0.0f32; 256];
        for scheme in QuantScheme::ALL {
            let (payload, scales) = quantize(scheme, &QuantParams::default(), &x);
            assert!(payload.iter().all(|&b| b == 0), "{scheme} payload");
            assert!(scales.iter().all(|&b| b == 0), "{scheme} scales");
            let y = roundtrip_token(scheme, &QuantParams::default(), &x).unwrap();
            assert_eq!(bits(&y), vec![0; 256], "{scheme}");
        }
    }

    #[test]
    fn negative_zero_keeps_its_sign_unless_its_block_scale_is_zero() {
        let x = vec![-0.0f32; 128];
        for scheme in QuantScheme::ALL {
            let y = roundtrip_token(scheme, &QuantParams::default(), &x).unwrap();
            let zero_scale_block = matches!(
                scheme,
                QuantScheme::Fp8PerToken | QuantScheme::Fp8Block128 | QuantScheme::Nvfp4
            );
            let expected = if zero_scale_block { 0.0f32 } else { -0.0 };
            assert_eq!(bits(&y), bits(&vec![expected; 128]), "{scheme}");
        }
    }

    #[test]
    fn nan_and_inf_elements() {
        // Finite amax 1.0, so every scheme has a non-zero scale.
        let mut x = vec![0.0f32; 128];
        x[..5].copy_from_slice(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0, -0.5]);
        let params = QuantParams {
            fp8_static_scale: 1.0 / 448.0,
            nvfp4_global_scale: 6.0,
        };
        for scheme in QuantScheme::ALL {
            let y = roundtrip_token(scheme, &params, &x).unwrap();
            // Where ±Inf lands: 448 (or 6) block-scale units, which is also where the finite
            // amax 1.0 lands except in mxfp8, whose power-of-two scale leaves headroom.
            let top = match scheme {
                QuantScheme::Bf16 | QuantScheme::Fp16 => f32::INFINITY,
                QuantScheme::Mxfp8 => 448.0 * 2f32.powi(-8),
                _ => y[3],
            };
            if scheme == QuantScheme::Nvfp4 {
                // e2m1 has no NaN: NaN encodes to +6, the block's largest value.
                assert_eq!(y[0], top, "{scheme}");
            } else {
                assert!(y[0].is_nan(), "{scheme}");
            }
            assert_eq!([y[1], y[2]], [top, -top], "{scheme}");
            assert!((y[3] - 1.0).abs() <= 1.0 / 16.0, "{scheme}: {}", y[3]);
            assert_eq!(y[4], -0.5, "{scheme}");
        }
        let (payload, _) = quantize(QuantScheme::Fp8PerToken, &params, &x);
        assert_eq!(payload[..5], [0x7f, 0x7e, 0xfe, 0x7e, 0xf6]);
        let (payload, scales) = quantize(QuantScheme::Nvfp4, &params, &x);
        assert_eq!(scales[0], 0x38);
        assert_eq!(payload[..3], [0x77, 0x7f, 0x0d]);
    }

    #[test]
    fn blocks_without_finite_non_zero_elements_dequantize_to_zero_or_saturate() {
        let mut x = vec![0.0f32; 128];
        x[..3].copy_from_slice(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        let params = QuantParams::default();
        for scheme in [QuantScheme::Fp8PerToken, QuantScheme::Fp8Block128, QuantScheme::Nvfp4] {
            let (payload, scales) = quantize(scheme, &params, &x);
            assert!(payload.iter().chain(&scales).all(|&b| b == 0), "{scheme}");
        }
        // mxfp8 takes 2^-127 as the scale of an amax-0 block and encodes the elements with it.
        let (payload, scales) = quantize(QuantScheme::Mxfp8, &params, &x);
        assert_eq!(scales, [0, 0, 0, 0]);
        assert_eq!(payload[..4], [0x7f, 0x7e, 0xfe, 0x00]);
    }

    #[test]
    fn saturation_edges() {
        let unit = QuantParams::default();
        let x = [448.0, 449.0, 464.0, 1e30, f32::NEG_INFINITY, -448.0];
        let y = roundtrip_token(QuantScheme::Fp8PerTensor, &unit, &x).unwrap();
        assert_eq!(y, [448.0, 448.0, 448.0, 448.0, -448.0, -448.0]);

        // amax 448 gives scale exactly 1, so e4m3 values come back unchanged.
        let x = [448.0, -2f32.powi(-9), 1.75, -240.0];
        let y = roundtrip_token(QuantScheme::Fp8PerToken, &unit, &x).unwrap();
        assert_eq!(y, x);

        let mut block = [0.0f32; 16];
        // gs * amax / 6 = 2.1 rounds down to sf = 2, so 12.6 * (1 / 2) = 6.3 saturates to 6.
        block[0] = 12.6;
        block[1] = -12.0;
        let y = roundtrip_token(QuantScheme::Nvfp4, &unit, &block).unwrap();
        assert_eq!(y[..2], [12.0, -12.0]);
        // gs * amax / 6 = 1000 saturates sf to 448, and the elements saturate to 6 * 448.
        block[0] = 6000.0;
        block[1] = -7000.0;
        let y = roundtrip_token(QuantScheme::Nvfp4, &unit, &block).unwrap();
        assert_eq!(y[..2], [2688.0, -2688.0]);

        // mxfp8: amax exactly 448 * 2^e keeps e, so the largest element maps to code 0x7e.
        let mut block = [0.0f32; 32];
        block[0] = 448.0 * 8.0;
        block[1] = -448.0 * 8.0;
        let (payload, scales) = quantize(QuantScheme::Mxfp8, &unit, &block);
        assert_eq!(scales, [130]);
        assert_eq!(payload[..2], [0x7e, 0xfe]);
    }

    #[test]
    fn error_stays_within_the_format_bounds_on_random_tokens() {
        let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
        let hidden = 7168;
        for _ in 0..4 {
            let x = random_token(&mut rng, hidden, 4);
            let amax = finite_amax(&x);
            let params = QuantParams {
                fp8_static_scale: amax / 448.0,
                nvfp4_global_scale: nvfp4_global_scale(amax),
            };
            let f32_slack = 2f32.powi(-20);
            for scheme in QuantScheme::ALL {
                let y = roundtrip_token(scheme, &params, &x).unwrap();
                let block = scheme.block_size().unwrap_or(hidden);
                for (xb, yb) in x.chunks(block).zip(y.chunks(block)) {
                    let block_amax = finite_amax(xb);
                    let (relative, absolute) = match scheme {
                        QuantScheme::Bf16 => (2f32.powi(-8), 0.0),
                        QuantScheme::Fp16 => (2f32.powi(-11), 0.0),
                        QuantScheme::Fp8PerTensor => (2f32.powi(-4), amax / 448.0 * 2f32.powi(-10)),
                        QuantScheme::Fp8PerToken | QuantScheme::Fp8Block128 => {
                            (2f32.powi(-4), block_amax / 448.0 * 2f32.powi(-10))
                        }
                        // Half the e2m1 spacing is at most a quarter of the scaled value, or
                        // 0.25 of a block-scale unit (at most (amax / 6) * (1 + 2^-4)).
                        QuantScheme::Nvfp4 => (0.25, 0.25 * block_amax / 6.0 * (1.0 + 1.0 / 16.0)),
                        // 2^e < amax / 224, and a half e4m3 subnormal step is 2^-10.
                        QuantScheme::Mxfp8 => (2f32.powi(-4), block_amax / 224.0 * 2f32.powi(-10)),
                    };
                    for (&xv, &yv) in xb.iter().zip(yb) {
                        let bound = (relative + f32_slack) * xv.abs() + absolute * (1.0 + f32_slack);
                        assert!((yv - xv).abs() <= bound, "{scheme}: {xv} -> {yv}, bound {bound}");
                    }
                }
            }
        }
    }

    #[test]
    fn fp8_block_scale_is_reproduced_by_requantization() {
        // Requantizing a dequantized block sees amax' = 448 * s; the scale rule must map it
        // back to s. Strided over every finite f32 binade.
        for amax_bits in (1..0x7f80_0000u32).step_by(4099) {
            let s = fp8_block_scale(f32::from_bits(amax_bits));
            assert_eq!(fp8_block_scale(e4m3::MAX * s).to_bits(), s.to_bits(), "{amax_bits:#x}");
        }
    }

    #[test]
    fn nvfp4_is_not_idempotent_when_a_block_scale_is_e4m3_subnormal() {
        // The documented exception: gs * amax / 6 = 0.75 * 2^-8 rounds to sf = 2^-8 (a
        // subnormal e4m3), the block maximum 4.5 * 2^-8 then maps to 4 * sf instead of 6 * sf,
        // and requantizing 2^-6 picks sf = 2^-9.
        let params = QuantParams::default();
        let mut x = [0.0f32; 16];
        x[0] = 4.5 * 2f32.powi(-8);
        let once = roundtrip_token(QuantScheme::Nvfp4, &params, &x).unwrap();
        assert_eq!(once[0], 2f32.powi(-6));
        let twice = roundtrip_token(QuantScheme::Nvfp4, &params, &once).unwrap();
        assert_eq!(twice[0], 6.0 * 2f32.powi(-9));
    }

    /// Activation-like elements: magnitudes within 2^-6..2^7 of each other, plus zeros and
    /// non-finite values. The magnitude range keeps every nvfp4 block scale an e4m3 normal, the
    /// condition under which the spec promises idempotence.
    fn element() -> impl Strategy<Value = f32> {
        prop_oneof![
            12 => (any::<bool>(), -6i32..=6, 1.0f32..2.0)
                .prop_map(|(neg, e, m)| if neg { -m * 2f32.powi(e) } else { m * 2f32.powi(e) }),
            1 => Just(0.0f32),
            1 => prop::sample::select(vec![-0.0f32, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
        ]
    }

    fn token() -> impl Strategy<Value = Vec<f32>> {
        (1usize..=3).prop_flat_map(|blocks| prop::collection::vec(element(), blocks * 128))
    }

    proptest! {
        #[test]
        fn roundtrip_is_idempotent_for_every_scheme(x in token(), static_exp in -8i32..=8) {
            let params = QuantParams {
                fp8_static_scale: 1.3 * 2f32.powi(static_exp),
                ..params_for(&x)
            };
            for scheme in QuantScheme::ALL {
                let once = roundtrip_token(scheme, &params, &x).unwrap();
                let twice = roundtrip_token(scheme, &params, &once).unwrap();
                prop_assert_eq!(bits(&twice), bits(&once), "{}", scheme);
            }
        }

        #[test]
        fn quantize_writes_every_byte(x in token()) {
            let params = params_for(&x);
            for scheme in QuantScheme::ALL {
                let (payload, scales) = quantize(scheme, &params, &x);
                let mut poisoned_payload = vec![0xa5; payload.len()];
                let mut poisoned_scales = vec![0xa5; scales.len()];
                quantize_token(scheme, &params, &x, &mut poisoned_payload, &mut poisoned_scales)
                    .unwrap();
                prop_assert_eq!(&poisoned_payload, &payload, "{}", scheme);
                prop_assert_eq!(&poisoned_scales, &scales, "{}", scheme);
            }
        }
    }
}
