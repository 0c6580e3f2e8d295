//! The two-sided workspace: its byte layout, and the count matrix that places every row of the
//! dense all-to-all-v.
//!
//! Per rank, in bytes (every section 128-byte aligned):
//!
//! | section | contents | written by |
//! |---|---|---|
//! | round | `u32` round counter, +1 per dispatch and per combine | this rank |
//! | counts | `u32[ep][ep]`: row `s` is source `s`'s send count to every rank, this round | source `s` (row `s`) |
//! | counts flags | `u32[ep]`: round value, stored with release after `s` wrote its counts row | source `s` |
//! | data flags | `u32[ep]`: round value, stored with release after `s` wrote its rows | source `s` |
//! | combine flags | `u32[ep]`: round value, stored with release after `r` wrote its replies | receiver `r` |
//! | dispatch region | `[ep * max_tokens, slot_bytes]`, dense: source `s` at rows `[dispatch_row(s, me), +counts[s][me])` | source `s` |
//! | combine region | `[ep * max_tokens, combine_slot_bytes]`, dense: receiver `r`'s replies at rows `[reply_row(me, r), +counts[me][r])` | receiver `r` |
//!
//! Both regions hold `ep * max_tokens` rows because that bounds either side of the exchange: a
//! rank receives at most `max_tokens` tokens from each of `ep` sources, and gets back at most
//! one reply per (token, destination rank) pair, `ep` per token.

use moe_core::config::round_up;
use moe_core::host::SymmetricMemory;
use moe_core::{DispatchLayout, LayerConfig};

const SECTION_ALIGN: usize = 128;

/// Sizes that fix the byte layout of one layer's workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkspaceLayout {
    pub ep: usize,
    pub max_tokens: usize,
    pub slot_bytes: usize,
    pub combine_slot_bytes: usize,
}

impl WorkspaceLayout {
    /// The layout one layer needs.
    pub fn for_layer(layer: &LayerConfig, dispatch: &DispatchLayout) -> Self {
        WorkspaceLayout {
            ep: layer.parallel.world_size(),
            max_tokens: layer.dispatch_tokens_bound(),
            slot_bytes: dispatch.slot_bytes(),
            combine_slot_bytes: dispatch.combine_slot_bytes(),
        }
    }

    fn counts_bytes(&self) -> usize {
        round_up(4 * self.ep * self.ep, SECTION_ALIGN)
    }
    fn flags_bytes(&self) -> usize {
        round_up(4 * self.ep, SECTION_ALIGN)
    }
    fn counts_section(&self) -> usize {
        SECTION_ALIGN
    }
    fn flags_section(&self) -> usize {
        self.counts_section() + self.counts_bytes()
    }
    fn dispatch_region(&self) -> usize {
        self.flags_section() + 3 * self.flags_bytes()
    }
    fn combine_region(&self) -> usize {
        self.dispatch_region() + round_up(self.rows() * self.slot_bytes, SECTION_ALIGN)
    }

    /// Rows of each receive region.
    pub fn rows(&self) -> usize {
        self.ep * self.max_tokens
    }
    /// Offset of the round counter.
    pub const fn round_offset(&self) -> usize {
        0
    }
    /// Offset of row `source` of the count matrix (`ep` u32 values).
    pub fn counts_row_offset(&self, source: usize) -> usize {
        debug_assert!(source < self.ep);
        self.counts_section() + 4 * self.ep * source
    }
    /// Offset of `counts_flags[source]`.
    pub fn counts_flag_offset(&self, source: usize) -> usize {
        debug_assert!(source < self.ep);
        self.flags_section() + 4 * source
    }
    /// Offset of `data_flags[source]`.
    pub fn data_flag_offset(&self, source: usize) -> usize {
        debug_assert!(source < self.ep);
        self.flags_section() + self.flags_bytes() + 4 * source
    }
    /// Offset of `combine_flags[receiver]`.
    pub fn combine_flag_offset(&self, receiver: usize) -> usize {
        debug_assert!(receiver < self.ep);
        self.flags_section() + 2 * self.flags_bytes() + 4 * receiver
    }
    /// Offset of row `row` of the dispatch receive region.
    pub fn dispatch_row_offset(&self, row: usize) -> usize {
        debug_assert!(row < self.rows());
        self.dispatch_region() + row * self.slot_bytes
    }
    /// Offset of row `row` of the combine receive region.
    pub fn combine_row_offset(&self, row: usize) -> usize {
        debug_assert!(row < self.rows());
        self.combine_region() + row * self.combine_slot_bytes
    }
    /// Bytes per rank.
    pub fn bytes(&self) -> usize {
        self.combine_region() + round_up(self.rows() * self.combine_slot_bytes, SECTION_ALIGN)
    }
}

/// The `[ep, ep]` send counts of one round: `get(s, r)` tokens go from source `s` to rank `r`.
///
/// Every rank holds the whole matrix after the count exchange, so each one computes the same
/// dense offsets on its own, with no further round trip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountMatrix {
    ep: usize,
    counts: Vec<u32>,
}

impl CountMatrix {
    /// A matrix from its row-major values.
    pub fn new(ep: usize, counts: Vec<u32>) -> Self {
        assert_eq!(
            counts.len(),
            ep * ep,
            "moe invariant violated: a count matrix over {ep} ranks needs {} values",
            ep * ep
        );
        CountMatrix { ep, counts }
    }

    /// This rank's copy of the matrix, read from its workspace after every counts flag.
    pub fn load(layout: &WorkspaceLayout, mem: &SymmetricMemory) -> Self {
        let mut counts = vec![0u32; layout.ep * layout.ep];
        mem.load_bytes(
            mem.me(),
            layout.counts_row_offset(0),
            bytemuck::cast_slice_mut(&mut counts),
        );
        CountMatrix::new(layout.ep, counts)
    }

    /// Tokens source `source` sends to rank `receiver`.
    pub fn get(&self, source: usize, receiver: usize) -> usize {
        self.counts[source * self.ep + receiver] as usize
    }

    /// The first row of `source`'s tokens in `receiver`'s dispatch region: sources are packed
    /// in rank order, so it is what every lower source sends there.
    pub fn dispatch_row(&self, source: usize, receiver: usize) -> usize {
        (0..source).map(|s| self.get(s, receiver)).sum()
    }

    /// Rows of `receiver`'s dispatch region that hold tokens; the rest are padding.
    pub fn received(&self, receiver: usize) -> usize {
        self.dispatch_row(self.ep, receiver)
    }

    /// The first row of `receiver`'s replies in `sender`'s combine region: the reverse
    /// all-to-all-v packs replies in receiver order, so it is what `sender` sent to every lower
    /// rank.
    pub fn reply_row(&self, sender: usize, receiver: usize) -> usize {
        (0..receiver).map(|r| self.get(sender, r)).sum()
    }

    /// Rows of `sender`'s combine region that hold replies.
    pub fn sent(&self, sender: usize) -> usize {
        self.reply_row(sender, self.ep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_do_not_overlap_and_the_size_is_exact() {
        let l = WorkspaceLayout {
            ep: 3,
            max_tokens: 5,
            slot_bytes: 96,
            combine_slot_bytes: 32,
        };
        assert_eq!(l.round_offset(), 0);
        assert_eq!(l.counts_row_offset(0), 128);
        assert_eq!(l.counts_row_offset(2) + 4 * 3, 128 + 36);
        assert_eq!(l.counts_flag_offset(0), 256);
        assert_eq!(l.data_flag_offset(0), 384);
        assert_eq!(l.combine_flag_offset(0), 512);
        assert!(l.combine_flag_offset(2) + 4 <= l.dispatch_row_offset(0));
        assert_eq!(l.dispatch_row_offset(0), 640);
        assert_eq!(l.dispatch_row_offset(14) + 96, 640 + 15 * 96);
        assert_eq!(l.combine_row_offset(0), 640 + 1536);
        assert_eq!(l.combine_row_offset(14) + 32, 640 + 1536 + 15 * 32);
        // 128 (round) + 128 (3x3 counts, 36 bytes) + 3 * 128 (flag arrays)
        // + 1536 (15 dispatch rows, 1440 bytes) + 512 (15 combine rows, 480 bytes).
        assert_eq!(l.bytes(), 128 + 128 + 3 * 128 + 1536 + 512);
        assert_eq!(l.bytes() % SECTION_ALIGN, 0);
    }

    #[test]
    fn a_large_count_matrix_pushes_the_flags_back() {
        let l = WorkspaceLayout {
            ep: 64,
            max_tokens: 1,
            slot_bytes: 16,
            combine_slot_bytes: 16,
        };
        // 64 * 64 * 4 = 16 KiB of counts, 256 bytes per flag array.
        assert_eq!(l.counts_row_offset(63) + 4 * 64, 128 + 16384);
        assert_eq!(l.counts_flag_offset(0), 128 + 16384);
        assert_eq!(l.combine_flag_offset(63) + 4, 128 + 16384 + 3 * 256);
        assert_eq!(l.bytes(), 128 + 16384 + 3 * 256 + 1024 + 1024);
    }

    #[test]
    fn offsets_pack_sources_in_rank_order_and_replies_in_receiver_order() {
        // Rows: sources; columns: receivers.
        let m = CountMatrix::new(3, vec![1, 4, 0, 2, 0, 3, 5, 1, 2]);
        assert_eq!([0, 1, 2].map(|s| m.dispatch_row(s, 0)), [0, 1, 3]);
        assert_eq!([0, 1, 2].map(|s| m.dispatch_row(s, 1)), [0, 4, 4]);
        assert_eq!([0, 1, 2].map(|s| m.dispatch_row(s, 2)), [0, 0, 3]);
        assert_eq!([0, 1, 2].map(|r| m.received(r)), [8, 5, 5]);
        assert_eq!([0, 1, 2].map(|r| m.reply_row(2, r)), [0, 5, 6]);
        assert_eq!([0, 1, 2].map(|s| m.sent(s)), [5, 5, 8]);
    }
}
