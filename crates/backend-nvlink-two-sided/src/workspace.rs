//! The two-sided workspace: its byte layout, where each layer's rows lie in the workspace its EP
//! group's layers share, and the count matrix that places every row of the dense all-to-all-v.
//!
//! Per rank, in bytes (every section 128-byte aligned):
//!
//! | section | contents | written by |
//! |---|---|---|
//! | round | `u32` round counter, +1 per call (in dispatch) | this rank |
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
//!
//! Layers with different layouts share one workspace per EP group
//! ([`WorkspaceGroup`](moe_core::workspace_group::WorkspaceGroup)), sized for the union of their
//! layouts ([`GroupLayout::union`]: the largest `ep`, `max_tokens`, `slot_bytes` and
//! `combine_slot_bytes` of any of them). The sections and the regions' offsets are the union's;
//! inside each region a call's layer packs its own rows, `[ep * max_tokens, slot_bytes]` and
//! `[ep * max_tokens, combine_slot_bytes]` with its own `max_tokens` and row sizes, from the
//! region's start ([`LayerRows`]). The round counter, count matrix and flags are the group's:
//! its layers take turns, one call (prepare to finalize) at a time, every rank in the same
//! order. Every row a layer reads was written in the same call, so what another layer's call
//! left in the regions is never read.

use moe_core::config::round_up;
use moe_core::host::SymmetricMemory;
use moe_core::workspace_group::{self, GroupLayout};
use moe_core::{DispatchLayout, LayerConfig, Result};
use moe_peer::{ExchangeBounds, PeerLayout};

const SECTION_ALIGN: usize = 128;

/// Sizes that fix the byte layout of the workspace: one layer's, or the union of a group's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkspaceLayout {
    pub bounds: ExchangeBounds,
    /// A dispatch row: the token's quantized image and its top-k tail.
    pub slot_bytes: usize,
}

impl PeerLayout for WorkspaceLayout {
    fn for_layer(layer: &LayerConfig, dispatch: &DispatchLayout) -> Self {
        let bounds = ExchangeBounds::for_layer(layer, dispatch);
        WorkspaceLayout {
            bounds,
            slot_bytes: dispatch.slot_bytes(),
        }
    }
    fn bytes(&self) -> usize {
        self.combine_region() + round_up(self.rows() * self.bounds.combine_slot_bytes, SECTION_ALIGN)
    }
    fn bounds(&self) -> ExchangeBounds {
        self.bounds
    }
}

impl GroupLayout for WorkspaceLayout {
    fn union(self, other: Self) -> Self {
        let slot_bytes = self.slot_bytes.max(other.slot_bytes);
        WorkspaceLayout {
            bounds: self.bounds.union(other.bounds),
            slot_bytes,
        }
    }
}

impl WorkspaceLayout {
    fn counts_bytes(&self) -> usize {
        round_up(4 * self.bounds.ep * self.bounds.ep, SECTION_ALIGN)
    }
    fn flags_bytes(&self) -> usize {
        round_up(4 * self.bounds.ep, SECTION_ALIGN)
    }
    fn counts_section(&self) -> usize {
        SECTION_ALIGN
    }
    fn flags_section(&self) -> usize {
        self.counts_section() + self.counts_bytes()
    }

    /// Rows of each receive region: slots for `max_tokens` tokens from each of `ep` sources.
    pub fn rows(&self) -> usize {
        self.bounds.rows()
    }
    /// Offset of row `source` of the count matrix (`ep` u32 values).
    pub fn counts_row_offset(&self, source: usize) -> usize {
        debug_assert!(source < self.bounds.ep);
        self.counts_section() + 4 * self.bounds.ep * source
    }
    /// Offset of `counts_flags[source]`.
    pub fn counts_flag_offset(&self, source: usize) -> usize {
        debug_assert!(source < self.bounds.ep);
        self.flags_section() + 4 * source
    }
    /// Offset of `data_flags[source]`.
    pub fn data_flag_offset(&self, source: usize) -> usize {
        debug_assert!(source < self.bounds.ep);
        self.flags_section() + self.flags_bytes() + 4 * source
    }
    /// Offset of `combine_flags[receiver]`.
    pub fn combine_flag_offset(&self, receiver: usize) -> usize {
        debug_assert!(receiver < self.bounds.ep);
        self.flags_section() + 2 * self.flags_bytes() + 4 * receiver
    }
    /// Offset of the dispatch receive region.
    pub fn dispatch_region(&self) -> usize {
        self.flags_section() + 3 * self.flags_bytes()
    }
    /// Offset of the combine receive region.
    pub fn combine_region(&self) -> usize {
        self.dispatch_region() + round_up(self.rows() * self.slot_bytes, SECTION_ALIGN)
    }
}

/// Where one layer's rows lie in its group's workspace: the sections and regions of the
/// group's layout, and in each region the dense rows of the layer's own layout, from the
/// region's start. A layer alone in its group has `group == own`.
///
/// Every offset the protocol uses comes from here: the round counter, count matrix and flags
/// from [`Self::group`], the rows from [`Self::dispatch_row_offset`] and
/// [`Self::combine_row_offset`], which take the layer's row count and sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerRows {
    /// The group's layout (the union of its layers'): sections and region offsets.
    pub group: WorkspaceLayout,
    /// The layer's own layout: rows per region and row sizes.
    pub own: WorkspaceLayout,
}

impl LayerRows {
    /// The rows of a layer of layout `own` in a workspace of layout `group`, which must cover
    /// it (the group admitted the layer) and count the same ranks (groups are per EP group, and
    /// the `[ep, ep]` count matrix is the group's).
    pub fn new(group: WorkspaceLayout, own: WorkspaceLayout) -> Self {
        assert!(
            group.covers(&own) && group.bounds.ep == own.bounds.ep,
            "moe invariant violated: a workspace of {group:?} cannot hold a layer of {own:?}"
        );
        LayerRows { group, own }
    }

    /// Rows of each of the layer's receive regions (`ep * max_tokens`).
    pub fn rows(&self) -> usize {
        self.own.rows()
    }

    /// Offset of row `row` of the layer's dispatch rows.
    pub fn dispatch_row_offset(&self, row: usize) -> usize {
        debug_assert!(row < self.rows());
        self.group.dispatch_region() + row * self.own.slot_bytes
    }

    /// Offset of row `row` of the layer's combine rows.
    pub fn combine_row_offset(&self, row: usize) -> usize {
        debug_assert!(row < self.rows());
        self.group.combine_region() + row * self.own.bounds.combine_slot_bytes
    }
}

/// A handle to one rank's workspace group on the host platform.
pub type SharedGroup = workspace_group::SharedGroup<WorkspaceLayout>;

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

    /// This rank's copy of the matrix, read from its workspace (of layout `layout`, the
    /// group's) after every counts flag.
    pub fn load(layout: &WorkspaceLayout, max_tokens: usize, mem: &SymmetricMemory) -> Result<Self> {
        let mut counts = vec![0u32; layout.bounds.ep * layout.bounds.ep];
        mem.load_bytes(
            mem.me(),
            layout.counts_row_offset(0),
            bytemuck::cast_slice_mut(&mut counts),
        );
        CountMatrix::checked(layout.bounds.ep, counts, max_tokens)
    }

    /// The matrix of `counts` (`[ep, ep]`, row `s` written by rank `s`), each checked to be at
    /// most `max_tokens` before any is used as a length.
    pub fn checked(ep: usize, counts: Vec<u32>, max_tokens: usize) -> Result<Self> {
        for (i, &c) in counts.iter().enumerate() {
            moe_peer::peer_count("prepare", i / ep, c, max_tokens)?;
        }
        Ok(CountMatrix::new(ep, counts))
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
            bounds: ExchangeBounds {
                ep: 3,
                max_tokens: 5,
                combine_slot_bytes: 32,
            },
            slot_bytes: 96,
        };
        assert_eq!(l.counts_row_offset(0), 128, "the first section is the round counter's");
        assert_eq!(l.counts_row_offset(2) + 4 * 3, 128 + 36);
        assert_eq!(l.counts_flag_offset(0), 256);
        assert_eq!(l.data_flag_offset(0), 384);
        assert_eq!(l.combine_flag_offset(0), 512);
        let rows = LayerRows::new(l, l);
        assert!(l.combine_flag_offset(2) + 4 <= rows.dispatch_row_offset(0));
        assert_eq!(rows.dispatch_row_offset(0), 640);
        assert_eq!(rows.dispatch_row_offset(14) + 96, 640 + 15 * 96);
        assert_eq!(rows.combine_row_offset(0), 640 + 1536);
        assert_eq!(rows.combine_row_offset(14) + 32, 640 + 1536 + 15 * 32);
        // 128 (round) + 128 (3x3 counts, 36 bytes) + 3 * 128 (flag arrays)
        // + 1536 (15 dispatch rows, 1440 bytes) + 512 (15 combine rows, 480 bytes).
        assert_eq!(l.bytes(), 128 + 128 + 3 * 128 + 1536 + 512);
        assert_eq!(l.bytes() % SECTION_ALIGN, 0);
    }

    #[test]
    fn a_large_count_matrix_pushes_the_flags_back() {
        let l = WorkspaceLayout {
            bounds: ExchangeBounds {
                ep: 64,
                max_tokens: 1,
                combine_slot_bytes: 16,
            },
            slot_bytes: 16,
        };
        // 64 * 64 * 4 = 16 KiB of counts, 256 bytes per flag array.
        assert_eq!(l.counts_row_offset(63) + 4 * 64, 128 + 16384);
        assert_eq!(l.counts_flag_offset(0), 128 + 16384);
        assert_eq!(l.combine_flag_offset(63) + 4, 128 + 16384 + 3 * 256);
        assert_eq!(l.bytes(), 128 + 16384 + 3 * 256 + 1024 + 1024);
    }

    fn layout(max_tokens: usize, slot_bytes: usize, combine_slot_bytes: usize) -> WorkspaceLayout {
        WorkspaceLayout {
            bounds: ExchangeBounds {
                ep: 2,
                max_tokens,
                combine_slot_bytes,
            },
            slot_bytes,
        }
    }

    #[test]
    fn union_grows_every_dimension_and_never_shrinks() {
        let (a, b) = (layout(64, 4224, 14336), layout(128, 7296, 7168));
        let u = a.union(b);
        assert_eq!(u, layout(128, 7296, 14336));
        assert!(u.covers(&a) && u.covers(&b) && !a.covers(&b) && !b.covers(&a));
        assert_eq!(u.union(a), u);
        assert!(u.bytes() > a.bytes().max(b.bytes()));
    }

    /// In a group's larger workspace a layer's rows are its own dense matrices (its rows, its
    /// row sizes), each from the start of the group's region; the sections are the group's.
    #[test]
    fn a_layer_in_a_larger_group_packs_its_own_dense_rows_from_the_regions_start() {
        let own = layout(3, 48, 16);
        let group = own.union(layout(8, 32, 64));
        let rows = LayerRows::new(group, own);
        assert_eq!(rows.rows(), 6);
        assert_eq!(rows.dispatch_row_offset(0), group.dispatch_region());
        assert_eq!(rows.dispatch_row_offset(5), group.dispatch_region() + 5 * 48);
        assert_eq!(rows.combine_row_offset(0), group.combine_region());
        assert_eq!(rows.combine_row_offset(5), group.combine_region() + 5 * 16);
        // The layer's last rows end inside the group's regions.
        assert!(rows.dispatch_row_offset(5) + 48 <= group.combine_region());
        assert!(rows.combine_row_offset(5) + 16 <= group.bytes());
        // Alone, the same layer's combine rows start right after its own dispatch rows.
        assert_eq!(LayerRows::new(own, own).combine_row_offset(0), own.combine_region());
        assert!(own.combine_region() < group.combine_region());
    }

    #[test]
    #[should_panic(expected = "cannot hold a layer")]
    fn a_group_that_does_not_cover_the_layer_is_an_invariant_violation() {
        LayerRows::new(layout(3, 48, 16), layout(4, 48, 16));
    }

    #[test]
    #[should_panic(expected = "cannot hold a layer")]
    fn a_group_of_other_ranks_is_an_invariant_violation() {
        let own = layout(3, 48, 16);
        let bounds = ExchangeBounds { ep: 4, ..own.bounds };
        LayerRows::new(WorkspaceLayout { bounds, ..own }, own);
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
