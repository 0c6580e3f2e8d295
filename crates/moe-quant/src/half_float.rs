//! 16-bit float codecs for the unscaled schemes, on top of the `half` crate.
//!
//! Both round to nearest even and turn every NaN into the canonical `0x7fff`, which is what PTX
//! `cvt.rn.bf16.f32` and `cvt.rn.f16.f32` produce (checked on an H100); `half` alone would keep
//! the NaN's sign and payload. Overflow rounds to ±Inf and ±Inf stays ±Inf.

/// bfloat16 (`QuantScheme::Bf16` elements).
pub mod bf16 {
    /// The NaN every NaN encodes to.
    pub const CANONICAL_NAN: u16 = 0x7fff;

    /// Encodes `x` with round-to-nearest-even; NaN gives [`CANONICAL_NAN`].
    pub fn from_f32(x: f32) -> u16 {
        if x.is_nan() {
            CANONICAL_NAN
        } else {
            half::bf16::from_f32(x).to_bits()
        }
    }

    /// Decodes `bits` exactly (every bfloat16 is an f32).
    pub fn to_f32(bits: u16) -> f32 {
        half::bf16::from_bits(bits).to_f32()
    }
}

/// IEEE binary16 (`QuantScheme::Fp16` elements).
pub mod fp16 {
    /// The NaN every NaN encodes to.
    pub const CANONICAL_NAN: u16 = 0x7fff;

    /// Encodes `x` with round-to-nearest-even, overflow to ±Inf; NaN gives [`CANONICAL_NAN`].
    pub fn from_f32(x: f32) -> u16 {
        if x.is_nan() {
            CANONICAL_NAN
        } else {
            half::f16::from_f32(x).to_bits()
        }
    }

    /// Decodes `bits` exactly (every binary16 is an f32).
    pub fn to_f32(bits: u16) -> f32 {
        half::f16::from_bits(bits).to_f32()
    }
}

#[cfg(test)]
mod tests {
    use super::{bf16, fp16};
    use proptest::prelude::*;

    /// Checks that `code` is a correctly rounded (nearest, ties to even) encoding of the finite
    /// `x`, by comparing it with the neighbouring codes in f64.
    fn assert_nearest_even(x: f32, code: u16, decode: fn(u16) -> f32) {
        let exact = f64::from(x);
        let chosen = f64::from(decode(code));
        let err = (exact - chosen).abs();
        for neighbour in [code.wrapping_sub(1), code.wrapping_add(1)] {
            let other = f64::from(decode(neighbour));
            if other.is_nan() || (other.is_infinite() && !chosen.is_infinite()) {
                continue;
            }
            let other_err = (exact - other).abs();
            assert!(
                err < other_err || (err == other_err && code.is_multiple_of(2)),
                "{x:e} -> {code:#06x} ({chosen:e}) but {neighbour:#06x} ({other:e}) is as near"
            );
        }
    }

    #[test]
    fn bf16_known_vectors() {
        let cases: [(f32, u16); 13] = [
            (1.0, 0x3f80),
            (-2.0, 0xc000),
            (3.140625, 0x4049),
            (464.0, 0x43e8),
            (65520.0, 0x4780),
            // 0x3f808000 is halfway between 0x3f80 and 0x3f81: ties to even.
            (f32::from_bits(0x3f80_8000), 0x3f80),
            (f32::from_bits(0x3f81_8000), 0x3f82),
            (f32::from_bits(0x3f80_8001), 0x3f81),
            (-0.0, 0x8000),
            (f32::INFINITY, 0x7f80),
            (f32::MAX, 0x7f80),
            (f32::NAN, 0x7fff),
            (f32::from_bits(0xffc0_0001), 0x7fff),
        ];
        for (x, bits) in cases {
            assert_eq!(bf16::from_f32(x), bits, "{x:e}");
        }
        assert_eq!(bf16::to_f32(0x4049), 3.140625);
        assert!(bf16::to_f32(0x7fff).is_nan());
    }

    #[test]
    fn fp16_known_vectors() {
        let cases: [(f32, u16); 11] = [
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (464.0, 0x5f40),
            (65504.0, 0x7bff),
            // 65520 is halfway between 65504 and the first overflow value: rounds to Inf.
            (65520.0, 0x7c00),
            (2f32.powi(-24), 0x0001),
            (2f32.powi(-25), 0x0000),
            (1e-30, 0x0000),
            (-0.0, 0x8000),
            (f32::NEG_INFINITY, 0xfc00),
            (-f32::NAN, 0x7fff),
        ];
        for (x, bits) in cases {
            assert_eq!(fp16::from_f32(x), bits, "{x:e}");
        }
        assert_eq!(fp16::to_f32(0x5f40), 464.0);
    }

    #[test]
    fn every_non_nan_code_re_encodes_to_itself() {
        for bits in 0..=u16::MAX {
            for (decode, encode) in [
                (bf16::to_f32 as fn(u16) -> f32, bf16::from_f32 as fn(f32) -> u16),
                (fp16::to_f32, fp16::from_f32),
            ] {
                let x = decode(bits);
                if x.is_nan() {
                    assert_eq!(encode(x), 0x7fff);
                } else {
                    assert_eq!(encode(x), bits, "{bits:#06x}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn bf16_rounds_to_nearest_even(x in -3.0e38f32..3.0e38) {
            assert_nearest_even(x, bf16::from_f32(x), bf16::to_f32);
        }

        #[test]
        fn fp16_rounds_to_nearest_even(x in -65519.0f32..65519.0) {
            assert_nearest_even(x, fp16::from_f32(x), fp16::to_f32);
        }
    }
}
