//! The 128x4 scale-factor layout read by tcgen05 / CUTLASS block-scaled GEMMs
//! (FlashInfer `SfLayout.layout_128x4`), and conversion from and to the linear row-major layout
//! that travels on the wire.
//!
//! A `[rows, cols]` u8 scale matrix is padded to `[round_up(rows, 128), round_up(cols, 4)]` with
//! zeros and stored as tiles of 128 rows x 4 columns (512 bytes), row tiles outermost. Inside a
//! tile, row `r` (0..128) and column `c` (0..4) sit at `(r % 32) * 16 + (r / 32) * 4 + c`.
//! Scales are swizzled after the all-to-all because the 128-row padding does not follow tokens.

/// Bytes of the swizzled form of a `[rows, cols]` matrix, padding included.
pub fn swizzled_len(rows: usize, cols: usize) -> usize {
    rows.next_multiple_of(128) * cols.next_multiple_of(4)
}

/// Offset of element `(row, col)` of a matrix with `cols` columns in its swizzled form.
pub fn offset_128x4(row: usize, col: usize, cols: usize) -> usize {
    let col_tiles = cols.div_ceil(4);
    (row / 128) * col_tiles * 512 + (col / 4) * 512 + (row % 32) * 16 + (row % 128 / 32) * 4 + col % 4
}

/// Swizzles the row-major `[rows, cols]` matrix `linear`; padding bytes are zero.
///
/// # Panics
///
/// If `linear.len() != rows * cols`.
pub fn swizzle_128x4(linear: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    assert_eq!(
        linear.len(),
        rows * cols,
        "linear scales must hold rows * cols = {rows} * {cols} bytes"
    );
    let mut swizzled = vec![0; swizzled_len(rows, cols)];
    for row in 0..rows {
        for col in 0..cols {
            swizzled[offset_128x4(row, col, cols)] = linear[row * cols + col];
        }
    }
    swizzled
}

/// The inverse of [`swizzle_128x4`]: the row-major `[rows, cols]` matrix, padding dropped.
///
/// # Panics
///
/// If `swizzled.len() != swizzled_len(rows, cols)`.
pub fn unswizzle_128x4(swizzled: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    assert_eq!(
        swizzled.len(),
        swizzled_len(rows, cols),
        "swizzled scales must hold swizzled_len({rows}, {cols}) bytes"
    );
    let mut linear = vec![0; rows * cols];
    for row in 0..rows {
        for col in 0..cols {
            linear[row * cols + col] = swizzled[offset_128x4(row, col, cols)];
        }
    }
    linear
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The torch formulation: pad to `[mp, kp]`, view as `[mp/128, 4, 32, kp/4, 4]`, permute to
    /// `(0, 3, 2, 1, 4)` and flatten, written as nested loops in output order.
    fn swizzle_by_permutation(linear: &[u8], rows: usize, cols: usize) -> Vec<u8> {
        let (mp, kp) = (rows.next_multiple_of(128), cols.next_multiple_of(4));
        let padded = |m: usize, k: usize| {
            if m < rows && k < cols { linear[m * cols + k] } else { 0 }
        };
        let mut out = Vec::with_capacity(mp * kp);
        for m_tile in 0..mp / 128 {
            for k_tile in 0..kp / 4 {
                for outer in 0..32 {
                    for inner in 0..4 {
                        for k in 0..4 {
                            out.push(padded(m_tile * 128 + inner * 32 + outer, k_tile * 4 + k));
                        }
                    }
                }
            }
        }
        out
    }

    /// Distinct non-zero bytes, so misplaced elements and padding are both visible.
    fn pattern(rows: usize, cols: usize) -> Vec<u8> {
        (0..rows * cols).map(|i| (i % 255 + 1) as u8).collect()
    }

    #[test]
    fn lengths_round_up_to_whole_tiles() {
        assert_eq!(swizzled_len(1, 1), 512);
        assert_eq!(swizzled_len(128, 4), 512);
        assert_eq!(swizzled_len(129, 4), 1024);
        assert_eq!(swizzled_len(256, 448), 256 * 448);
        assert_eq!(swizzled_len(3, 7), 128 * 8);
        assert_eq!(swizzled_len(0, 5), 0);
    }

    #[test]
    fn known_offsets() {
        assert_eq!(offset_128x4(0, 0, 8), 0);
        assert_eq!(offset_128x4(0, 3, 8), 3);
        assert_eq!(offset_128x4(1, 0, 8), 16);
        assert_eq!(offset_128x4(32, 0, 8), 4);
        assert_eq!(offset_128x4(127, 3, 8), 31 * 16 + 3 * 4 + 3);
        assert_eq!(offset_128x4(0, 4, 8), 512);
        assert_eq!(offset_128x4(128, 0, 8), 1024);
        assert_eq!(offset_128x4(128, 0, 7), 1024);
    }

    #[test]
    fn matches_the_permutation_formulation() {
        for (rows, cols) in [(1, 1), (128, 4), (130, 6), (300, 9), (256, 448), (7, 224)] {
            let linear = pattern(rows, cols);
            assert_eq!(
                swizzle_128x4(&linear, rows, cols),
                swizzle_by_permutation(&linear, rows, cols),
                "[{rows}, {cols}]"
            );
        }
    }

    #[test]
    fn padding_is_zero_and_every_element_lands_once() {
        let (rows, cols) = (130, 6);
        let swizzled = swizzle_128x4(&pattern(rows, cols), rows, cols);
        let mut hits = vec![0u32; swizzled.len()];
        for row in 0..rows {
            for col in 0..cols {
                hits[offset_128x4(row, col, cols)] += 1;
            }
        }
        for (offset, (&byte, &hit)) in swizzled.iter().zip(&hits).enumerate() {
            assert!(hit <= 1, "offset {offset} written {hit} times");
            assert_eq!(byte == 0, hit == 0, "offset {offset}");
        }
    }

    #[test]
    #[should_panic(expected = "linear scales must hold rows * cols = 2 * 3 bytes")]
    fn swizzle_rejects_a_mis_sized_input() {
        swizzle_128x4(&[0; 5], 2, 3);
    }

    #[test]
    #[should_panic(expected = "swizzled scales must hold swizzled_len(2, 3) bytes")]
    fn unswizzle_rejects_a_mis_sized_input() {
        unswizzle_128x4(&[0; 6], 2, 3);
    }

    proptest! {
        #[test]
        fn unswizzle_inverts_swizzle(rows in 0usize..300, cols in 0usize..20, seed in any::<u8>()) {
            let linear: Vec<u8> = (0..rows * cols).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            let swizzled = swizzle_128x4(&linear, rows, cols);
            prop_assert_eq!(swizzled.len(), swizzled_len(rows, cols));
            prop_assert_eq!(&swizzled, &swizzle_by_permutation(&linear, rows, cols));
            prop_assert_eq!(unswizzle_128x4(&swizzled, rows, cols), linear);
        }
    }
}
