//! E8M0 (UE8M0) scale codec of the MX formats: code `c` in 0..=254 is the power of two
//! `2^(c - 127)`, code 255 is NaN. There is no sign and no zero.

/// The NaN code.
pub const NAN_CODE: u8 = 0xff;

/// f32 mantissa bits of 1.75, the mantissa of the e4m3 maximum 448 = 1.75 * 2^8.
const MANTISSA_OF_1_75: u32 = 0x60_0000;
/// Exponent of 448 = 1.75 * 2^8.
const E4M3_MAX_EXPONENT: i32 = 8;

/// Decodes `code` exactly: `2^(code - 127)` (code 0 is the f32 subnormal 2^-127), NaN for 255.
pub fn to_f32(code: u8) -> f32 {
    match code {
        NAN_CODE => f32::NAN,
        0 => f32::from_bits(1 << 22),
        _ => f32::from_bits(u32::from(code) << 23),
    }
}

/// The scale code of an mxfp8 block whose largest finite magnitude is `amax`: the smallest `e`
/// in `-127..=127` with `amax <= 448 * 2^e`, so that dividing the block by `2^e` never exceeds
/// the e4m3 maximum; returned biased, as `e + 127`.
///
/// Computed exactly from the bits of `amax` (`amax = m * 2^E`, `1 <= m < 2`): `e = E - 8` when
/// `m <= 1.75`, else `E - 7`, clamped to the range. Zero and f32-subnormal `amax` give code 0
/// (`2^-127`), because `448 * 2^-127` already exceeds every subnormal. `amax` must be finite and
/// non-negative; its sign bit is ignored.
pub fn for_e4m3_amax(amax: f32) -> u8 {
    debug_assert!(amax.is_finite(), "mxfp8 amax {amax} must be finite");
    let bits = amax.to_bits() & 0x7fff_ffff;
    let biased_exponent = (bits >> 23) as i32;
    if biased_exponent == 0 {
        return 0;
    }
    let above_1_75 = bits & 0x7f_ffff > MANTISSA_OF_1_75;
    (biased_exponent - E4M3_MAX_EXPONENT + i32::from(above_1_75)).clamp(0, 254) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_powers_of_two() {
        assert_eq!(to_f32(127), 1.0);
        assert_eq!(to_f32(128), 2.0);
        assert_eq!(to_f32(126), 0.5);
        assert_eq!(to_f32(254), 2f32.powi(127));
        assert_eq!(to_f32(1), 2f32.powi(-126));
        assert_eq!(f64::from(to_f32(0)), 2f64.powi(-127));
        assert!(to_f32(NAN_CODE).is_nan());
        for code in 0..=254u8 {
            assert_eq!(f64::from(to_f32(code)), 2f64.powi(i32::from(code) - 127), "{code}");
        }
    }

    #[test]
    fn known_block_scales() {
        let cases: [(f32, u8); 11] = [
            (0.0, 0),
            (448.0, 127),
            (448.000_03, 128),
            (449.0, 128),
            (896.0, 128),
            (224.0, 126),
            (1.0, 119),
            (1.75, 119),
            (1.750_000_1, 120),
            (1e-40, 0),
            (f32::MAX, 247),
        ];
        for (amax, code) in cases {
            assert_eq!(for_e4m3_amax(amax), code, "{amax:e}");
        }
    }

    proptest! {
        #[test]
        fn block_scale_is_the_smallest_power_that_fits(bits in 0u32..0x7f80_0000) {
            let amax = f64::from(f32::from_bits(bits));
            let code = for_e4m3_amax(f32::from_bits(bits));
            let exponent = i32::from(code) - 127;
            prop_assert!(code <= 254);
            prop_assert!(amax <= 448.0 * 2f64.powi(exponent));
            prop_assert!(code == 0 || amax > 448.0 * 2f64.powi(exponent - 1));
        }
    }
}
