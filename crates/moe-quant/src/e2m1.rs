//! FP4 E2M1 codec (the nvfp4 element): 1 sign bit (bit 3), 2 exponent bits and 1 mantissa bit,
//! magnitudes `[0, 0.5, 1, 1.5, 2, 3, 4, 6]` for codes 0..=7, no infinities and no NaN.
//!
//! Encoding rounds to nearest with ties to the even code (the code whose mantissa bit is 0),
//! saturates at ±6 (±Inf included) and keeps the sign of zero results. E2M1 has no NaN, so NaN
//! encodes to +6 (`0x7`) whatever its sign: it becomes the largest value of its block and leaves
//! the block's other elements intact.

/// Largest magnitude.
pub const MAX: f32 = 6.0;

/// Magnitudes of codes 0..=7.
const MAGNITUDES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// Encodes `x` into the low 4 bits of the result (see the module docs).
pub fn from_f32(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7;
    }
    let sign = if x.is_sign_negative() { 0x8 } else { 0 };
    let a = x.abs();
    // Each bound is the midpoint between two neighbouring magnitudes. A value exactly on a
    // midpoint belongs to the even code, so the comparison is `<=` where the lower neighbour is
    // even and `<` where it is odd.
    let magnitude = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    sign | magnitude
}

/// Decodes the low 4 bits of `code` exactly; the high 4 bits are ignored.
pub fn to_f32(code: u8) -> f32 {
    let magnitude = MAGNITUDES[usize::from(code & 0x7)];
    if code & 0x8 == 0 { magnitude } else { -magnitude }
}

/// Packs two codes into a byte: element `2i` (`lo`) in the low nibble, element `2i + 1` (`hi`)
/// in the high nibble. Bits of `lo` and `hi` above the nibble are ignored.
pub fn pack(lo: u8, hi: u8) -> u8 {
    (lo & 0xf) | (hi << 4)
}

/// The inverse of [`pack`]: `(low nibble, high nibble)`.
pub fn unpack(byte: u8) -> (u8, u8) {
    (byte & 0xf, byte >> 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Nearest code by exhaustive search in f64, ties to the even code, saturating at 6.
    fn nearest_by_search(x: f32) -> u8 {
        if x.is_nan() {
            return 0x7;
        }
        let sign = if x.is_sign_negative() { 0x8 } else { 0 };
        // Saturation is part of the definition; the search below covers rounding inside ±6
        // (far outside, f64 distances to all codes round to the same value).
        if x.abs() >= 6.0 {
            return sign | 0x7;
        }
        let a = f64::from(x.abs());
        let mut best = 0u8;
        for candidate in 1..8u8 {
            let d_best = (a - f64::from(MAGNITUDES[usize::from(best)])).abs();
            let d_candidate = (a - f64::from(MAGNITUDES[usize::from(candidate)])).abs();
            if d_candidate < d_best || (d_candidate == d_best && candidate.is_multiple_of(2)) {
                best = candidate;
            }
        }
        sign | best
    }

    #[test]
    fn every_code_decodes_and_re_encodes_to_itself() {
        // No exceptions: e2m1 has no NaN, and -0 (0x8) keeps its sign.
        for code in 0..16u8 {
            assert_eq!(from_f32(to_f32(code)), code, "{code:#x}");
        }
        assert_eq!(to_f32(0x7), 6.0);
        assert_eq!(to_f32(0xf), -6.0);
        assert!(to_f32(0x8).is_sign_negative() && to_f32(0x8) == 0.0);
    }

    #[test]
    fn known_vectors() {
        let cases: [(f32, u8); 18] = [
            (0.25, 0x0),
            (0.250_000_03, 0x1),
            (0.75, 0x2),
            (1.25, 0x2),
            (1.75, 0x4),
            (2.5, 0x4),
            (3.5, 0x6),
            (5.0, 0x6),
            (5.000_001, 0x7),
            (7.0, 0x7),
            (-5.0, 0xe),
            (-0.25, 0x8),
            (-0.0, 0x8),
            (1e-30, 0x0),
            (f32::INFINITY, 0x7),
            (f32::NEG_INFINITY, 0xf),
            (f32::NAN, 0x7),
            (-f32::NAN, 0x7),
        ];
        for (x, code) in cases {
            assert_eq!(from_f32(x), code, "{x:e}");
        }
    }

    #[test]
    fn every_midpoint_and_its_neighbours_round_as_the_search_does() {
        for pair in MAGNITUDES.windows(2) {
            let mid = (pair[0] + pair[1]) / 2.0;
            for x in [mid.next_down(), mid, mid.next_up()] {
                assert_eq!(from_f32(x), nearest_by_search(x), "{x:e}");
                assert_eq!(from_f32(-x), nearest_by_search(-x), "{:e}", -x);
            }
        }
    }

    #[test]
    fn packing_puts_the_even_element_in_the_low_nibble() {
        assert_eq!(pack(0x1, 0xe), 0xe1);
        assert_eq!(unpack(0xe1), (0x1, 0xe));
        for lo in 0..16u8 {
            for hi in 0..16u8 {
                assert_eq!(unpack(pack(lo, hi)), (lo, hi));
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
        fn encoding_matches_exhaustive_search_in_range(x in -8.0f32..8.0) {
            prop_assert_eq!(from_f32(x), nearest_by_search(x));
        }
    }
}
