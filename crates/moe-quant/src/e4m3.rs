//! OCP fp8 E4M3 ("e4m3fn") codec: 1 sign, 4 exponent (bias 7) and 3 mantissa bits, no
//! infinities, NaN at `0x7f` / `0xff`, largest finite magnitude 448.
//!
//! Encoding rounds to nearest even and saturates, with the exact results of PTX
//! `cvt.rn.satfinite.e4m3x2.f32` (checked on an H100): ±Inf and anything at or beyond ±448 give
//! ±448, and every NaN, whatever its sign, gives `0x7f`.

/// Largest finite magnitude.
pub const MAX: f32 = 448.0;
/// Code of +448.
pub const MAX_CODE: u8 = 0x7e;
/// The NaN code every NaN encodes to.
pub const NAN_CODE: u8 = 0x7f;

/// Smallest normal magnitude, 2^-6; below it values are multiples of 2^-9.
const MIN_NORMAL: f32 = 1.0 / 64.0;
/// 2^9: one unit of the subnormal grid is 2^-9.
const SUBNORMAL_STEPS: f32 = 512.0;
/// f32 exponent bias minus e4m3 exponent bias.
const REBIAS: u32 = 127 - 7;
/// f32 mantissa bits dropped when keeping e4m3's 3.
const DROPPED_BITS: u32 = 23 - 3;

/// Encodes `x` with round-to-nearest-even and saturation (see the module docs).
pub fn from_f32(x: f32) -> u8 {
    if x.is_nan() {
        return NAN_CODE;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    let magnitude = if a >= MAX {
        MAX_CODE
    } else if a < MIN_NORMAL {
        // Scaling by a power of two is exact here, so the only rounding is the one to an integer
        // count of 2^-9 steps; a result of 8 is the code of 2^-6, the smallest normal.
        (a * SUBNORMAL_STEPS).round_ties_even() as u8
    } else {
        let bits = a.to_bits();
        let truncated = (((bits >> 23) - REBIAS) << 3) | ((bits & 0x7f_ffff) >> DROPPED_BITS);
        let rest = bits & ((1 << DROPPED_BITS) - 1);
        let half = 1 << (DROPPED_BITS - 1);
        // A carry out of the mantissa lands in the exponent field, which is the correct next
        // value; it cannot reach 0x7f because a < 448.
        let round_up = rest > half || (rest == half && truncated & 1 == 1);
        (truncated + u32::from(round_up)) as u8
    };
    sign | magnitude
}

/// Decodes `code` exactly; both NaN codes decode to a positive quiet NaN, as the hardware
/// conversion does.
pub fn to_f32(code: u8) -> f32 {
    let magnitude = code & 0x7f;
    if magnitude == NAN_CODE {
        return f32::NAN;
    }
    let exponent = u32::from(magnitude >> 3);
    let mantissa = u32::from(magnitude & 0x7);
    let value = if exponent == 0 {
        mantissa as f32 / SUBNORMAL_STEPS
    } else {
        f32::from_bits(((exponent + REBIAS) << 23) | (mantissa << DROPPED_BITS))
    };
    if code & 0x80 == 0 { value } else { -value }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The e4m3 value of a non-NaN magnitude code, from the format definition in f64.
    fn defined_value(magnitude: u8) -> f64 {
        let exponent = i32::from(magnitude >> 3);
        let mantissa = f64::from(magnitude & 7) / 8.0;
        if exponent == 0 {
            mantissa * 2f64.powi(-6)
        } else {
            (1.0 + mantissa) * 2f64.powi(exponent - 7)
        }
    }

    /// Nearest finite code by exhaustive search, ties to the even code, saturating at 448.
    fn nearest_by_search(x: f32) -> u8 {
        if x.is_nan() {
            return 0x7f;
        }
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        // Saturation is part of the definition; the search below covers rounding inside ±448
        // (far outside, f64 distances to all codes round to the same value).
        if x.abs() >= 448.0 {
            return sign | 0x7e;
        }
        let a = f64::from(x.abs());
        let mut best = 0u8;
        for candidate in 1..=0x7e {
            let d_best = (a - defined_value(best)).abs();
            let d_candidate = (a - defined_value(candidate)).abs();
            if d_candidate < d_best || (d_candidate == d_best && candidate.is_multiple_of(2)) {
                best = candidate;
            }
        }
        sign | best
    }

    #[test]
    fn decoding_matches_the_format_definition() {
        for code in 0..=255u8 {
            let decoded = to_f32(code);
            if code & 0x7f == 0x7f {
                assert!(decoded.is_nan() && decoded.is_sign_positive(), "{code:#04x}");
            } else {
                let sign = if code & 0x80 == 0 { 1.0 } else { -1.0 };
                assert_eq!(f64::from(decoded), sign * defined_value(code & 0x7f));
                assert_eq!(decoded.is_sign_negative(), code & 0x80 != 0, "{code:#04x}");
            }
        }
    }

    #[test]
    fn every_code_re_encodes_to_itself_except_negative_nan() {
        for code in 0..=255u8 {
            let back = from_f32(to_f32(code));
            if code == 0xff {
                // 0xff decodes to NaN and every NaN encodes to the canonical 0x7f.
                assert_eq!(back, NAN_CODE);
            } else {
                // Includes 0x80 (-0.0), which keeps its sign, and 0x7f (NaN).
                assert_eq!(back, code, "{code:#04x}");
            }
        }
    }

    #[test]
    fn known_vectors() {
        let cases: [(f32, u8); 24] = [
            (448.0, 0x7e),
            (-448.0, 0xfe),
            (1.0, 0x38),
            (-2.0, 0xc0),
            (0.0, 0x00),
            (-0.0, 0x80),
            (2f32.powi(-9), 0x01),
            (7.0 * 2f32.powi(-9), 0x07),
            (2f32.powi(-6), 0x08),
            // 2^-10 is halfway between 0 and 2^-9: ties to the even code 0x00.
            (2f32.powi(-10), 0x00),
            // 3 * 2^-10 is halfway between codes 1 and 2: ties to 0x02.
            (3.0 * 2f32.powi(-10), 0x02),
            (-3.0 * 2f32.powi(-10), 0x82),
            // Halfway between 1.0 (0x38) and 1.125 (0x39): to 0x38.
            (1.0625, 0x38),
            // Halfway between 1.125 (0x39) and 1.25 (0x3a): to 0x3a.
            (1.1875, 0x3a),
            // Halfway between 416 (0x7d) and 448 (0x7e): to 0x7e.
            (432.0, 0x7e),
            (464.0, 0x7e),
            (480.0, 0x7e),
            (500.0, 0x7e),
            (f32::MAX, 0x7e),
            (f32::INFINITY, 0x7e),
            (f32::NEG_INFINITY, 0xfe),
            (1e-30, 0x00),
            (f32::NAN, 0x7f),
            (-f32::NAN, 0x7f),
        ];
        for (x, code) in cases {
            assert_eq!(from_f32(x), code, "{x:e}");
        }
        assert_eq!(to_f32(0x7e), 448.0);
        assert_eq!(to_f32(0x01), 2f32.powi(-9));
    }

    #[test]
    fn every_midpoint_and_its_neighbours_round_as_the_search_does() {
        for magnitude in 0..0x7eu8 {
            let low = defined_value(magnitude);
            let high = defined_value(magnitude + 1);
            let mid = ((low + high) / 2.0) as f32;
            assert_eq!(f64::from(mid), (low + high) / 2.0, "midpoints are exact in f32");
            for x in [mid.next_down(), mid, mid.next_up()] {
                assert_eq!(from_f32(x), nearest_by_search(x), "{x:e}");
                assert_eq!(from_f32(-x), nearest_by_search(-x), "{:e}", -x);
            }
        }
    }

    proptest! {
        #[test]
        fn encoding_matches_exhaustive_search_on_any_f32(bits in any::<u32>()) {
            let x = f32::from_bits(bits);
            prop_assert_eq!(from_f32(x), nearest_by_search(x));
        }

        #[test]
        fn encoding_matches_exhaustive_search_in_range(x in -500.0f32..500.0) {
            prop_assert_eq!(from_f32(x), nearest_by_search(x));
        }
    }
}
