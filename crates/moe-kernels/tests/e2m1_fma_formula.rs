//! The e2m1 codes of quant.cuh's nvfp4 fast path (`moe_e2m1_magnitude_biased`), computed the way
//! the kernel computes them, equal the table of docs/QUANT_SPEC.md 2.2 (`moe_quant::e2m1`): on
//! every f32 from 2^-3 to 8, where the codes change, in both signs, and on a stride through all
//! other bit patterns (subnormals, huge values, infinities). NaN is excluded: the kernel sends
//! units holding one to its generic path. The formula was also checked on all 2^32 patterns when
//! it was written (docs/GPU_RUNS.md, 2026-12-04); the GPU test `gpu_quant` checks the kernel
//! itself.

use moe_quant::e2m1;

/// PTX `.sat`: clamp to [0, 1], NaN to +0.
fn sat(x: f32) -> f32 {
    if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) }
}

/// 2^23: adding it rounds a value in [0, 2^22) to an integer, ties to even.
const ROUND: f32 = 8_388_608.0;

/// The kernel's instructions, one Rust operation each (`*` is `mul.rn`, `mul_add` is
/// `fma.rn`): rni(4 s1) + rni(2 s2 + s3), then the sign bit.
fn kernel_code(y: f32) -> u8 {
    let a = y.abs();
    let s1 = sat(a * 0.5);
    let s2 = sat(a.mul_add(0.5, -1.0));
    let s3 = sat(a.mul_add(0.5, -2.0));
    let t1 = s1.mul_add(4.0, ROUND).to_bits() - ROUND.to_bits();
    let t23 = (s2.mul_add(2.0, s3) + ROUND).to_bits() - ROUND.to_bits();
    let sign = if y.is_sign_negative() { 0x8 } else { 0 };
    (t1 + t23) as u8 | sign
}

fn check(bits: u32) {
    let y = f32::from_bits(bits);
    if y.is_nan() {
        return;
    }
    assert_eq!(
        kernel_code(y),
        e2m1::from_f32(y),
        "y = {y:e} (0x{bits:08x}): the kernel's e2m1 formula disagrees with the table"
    );
}

#[test]
fn the_kernel_e2m1_formula_matches_the_table_from_an_eighth_to_eight() {
    let (from, to) = (0.125f32.to_bits(), 8.0f32.to_bits());
    for bits in from..=to {
        check(bits);
        check(bits | 0x8000_0000);
    }
}

#[test]
fn the_kernel_e2m1_formula_matches_the_table_on_a_stride_through_every_f32() {
    // An odd stride visits every residue class of the low bits; 4099 steps through 2^32 in about
    // a million patterns, across every exponent.
    let mut bits: u64 = 0;
    while bits <= u64::from(u32::MAX) {
        check(bits as u32);
        bits += 4099;
    }
    for y in [
        0.0f32,
        -0.0,
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        6.0,
        5.0,
        0.25,
    ] {
        check(y.to_bits());
    }
}
