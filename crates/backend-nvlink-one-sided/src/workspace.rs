//! The one-sided workspace: its byte layout, and where each layer's slots lie in the workspace
//! its EP group's layers share.
//!
//! Per rank, in bytes (every section 128-byte aligned):
//!
//! | section | contents | written by |
//! |---|---|---|
//! | round | `u32` round counter, +1 per call (at dispatch; combine uses the same round) | this rank |
//! | dispatch words | `[u32; 2][ep]`: source `s`'s round (stored with release after `s`'s data) and the tokens it sent here in that round, in one 8-byte word | source `s` |
//! | combine flags | `u32[ep]`: round value, stored when `s`'s combine rows are staged | source `s` |
//! | padded tails | `u32[ep + 1]`: the last rows of `s`'s ids and weights known to be padding, then the `max_tokens` of the layer that counted them | this rank |
//! | payload region | `[ep, max_tokens, payload_bytes]`: source `s`'s token in slot `t` | source `s` |
//! | scales region | `[ep, max_tokens, scale_bytes]` | source `s` |
//! | ids region | `[ep, max_tokens, top_k]` i32, -1 where this rank computes nothing | source `s`, this rank |
//! | weights region | `[ep, max_tokens, top_k]` f32, 0.0 beside every -1 id | source `s`, this rank |
//! | combine region | `[ep, max_tokens, combine_slot_bytes]`: this rank's output rows for `s`'s slots | this rank, read by `s` |
//!
//! Layers with different layouts share one workspace per EP group
//! ([`WorkspaceGroup`](moe_core::workspace_group::WorkspaceGroup)), sized for the union of their
//! layouts ([`GroupLayout::union`]): the sections and region offsets
//! are the union's, and inside each region a round's layer lays out its own dense
//! `[ep, max_tokens, row]` matrix with its own `max_tokens` and row sizes ([`LayerSlots`]).
//! The round counter, counts and flags are the group's: its layers take turns, one call
//! (prepare to finalize) at a time, every rank in the same order.
//!
//! The received tokens are field-major, each field a dense row-major matrix over all
//! `ep * max_tokens` slots: exactly the Standard format's tensors, so on GPUs the experts read
//! them in place (no delivery copy). For that the slots no token filled must read as padding
//! (ids -1, weights 0.0) although earlier rounds filled them: after every dispatch, once all
//! peers are done writing, the receiver resets the rows between this round's count and its
//! padded tail, and records the new tail. Tails count rows of one layer's matrix, so they hold
//! only for layers of the same `max_tokens` (top_k, the ids' and weights' row, is the group's):
//! after a round of another `max_tokens` every unfilled row is reset. A zeroed workspace has no
//! such `max_tokens` (0), so the first dispatch resets every unfilled row.
//!
//! Rank-major receive buffers are `num_local_experts` times smaller than expert-major ones.

use moe_core::config::round_up;
use moe_core::host::SymmetricMemory;
use moe_core::slots::ReceivedRows;
use moe_core::workspace_group::{self, GroupLayout};
use moe_core::{DispatchLayout, LayerConfig};
use moe_peer::{ExchangeBounds, PeerLayout};

const SECTION_ALIGN: usize = 128;

/// Sizes that fix the byte layout of the workspace: one layer's, or the union of a group's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkspaceLayout {
    pub bounds: ExchangeBounds,
    pub payload_bytes: usize,
    pub scale_bytes: usize,
    pub top_k: usize,
}

/// The four received fields, in region order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Payload,
    Scales,
    Ids,
    Weights,
}

impl Field {
    pub const ALL: [Field; 4] = [Field::Payload, Field::Scales, Field::Ids, Field::Weights];

    /// Where the field lies in a slot of `dispatch` (offset, bytes): the row the layer stores in
    /// the field's region.
    pub fn in_slot(self, dispatch: &DispatchLayout) -> (usize, usize) {
        let k = 4 * dispatch.top_k;
        match self {
            Field::Payload => (dispatch.payload_offset(), dispatch.wire.payload_bytes),
            Field::Scales => (dispatch.scales_offset(), dispatch.wire.scale_bytes),
            Field::Ids => (dispatch.ids_offset(), k),
            Field::Weights => (dispatch.weights_offset(), k),
        }
    }
}

impl PeerLayout for WorkspaceLayout {
    fn for_layer(layer: &LayerConfig, dispatch: &DispatchLayout) -> Self {
        WorkspaceLayout {
            bounds: ExchangeBounds::for_layer(layer, dispatch),
            payload_bytes: dispatch.wire.payload_bytes,
            scale_bytes: dispatch.wire.scale_bytes,
            top_k: dispatch.top_k,
        }
    }
    fn bytes(&self) -> usize {
        self.combine_region() + round_up(self.slots() * self.bounds.combine_slot_bytes, SECTION_ALIGN)
    }
    fn bounds(&self) -> ExchangeBounds {
        self.bounds
    }
}

impl GroupLayout for WorkspaceLayout {
    fn union(self, other: Self) -> Self {
        WorkspaceLayout {
            bounds: self.bounds.union(other.bounds),
            payload_bytes: self.payload_bytes.max(other.payload_bytes),
            scale_bytes: self.scale_bytes.max(other.scale_bytes),
            top_k: self.top_k.max(other.top_k),
        }
    }
}

impl WorkspaceLayout {
    fn flags_bytes(&self) -> usize {
        round_up(4 * self.bounds.ep, SECTION_ALIGN)
    }

    /// The dispatch words: a GPU publishes a source's round and count with one 8-byte release
    /// store, so the count costs the receiver no second wait for visibility.
    fn dispatch_words_bytes(&self) -> usize {
        round_up(8 * self.bounds.ep, SECTION_ALIGN)
    }

    fn slots(&self) -> usize {
        self.bounds.rows()
    }

    /// Offset of source `source`'s dispatch flag: the low half of its dispatch word, 8-byte
    /// aligned.
    pub fn dispatch_flag_offset(&self, source: usize) -> usize {
        SECTION_ALIGN + 8 * source
    }
    /// Offset of the tokens `source` sent here this round: the high half of its dispatch word.
    pub fn recv_count_offset(&self, source: usize) -> usize {
        self.dispatch_flag_offset(source) + 4
    }
    /// Offset of `combine_flags[source]`.
    pub fn combine_flag_offset(&self, source: usize) -> usize {
        SECTION_ALIGN + self.dispatch_words_bytes() + 4 * source
    }
    /// Offset of `padded_tails[source]`: how many of `source`'s last slots hold padding ids.
    pub fn padded_tail_offset(&self, source: usize) -> usize {
        SECTION_ALIGN + self.dispatch_words_bytes() + self.flags_bytes() + 4 * source
    }
    /// Offset of the `max_tokens` the padded tails count slots of (`padded_tails[ep]`; the
    /// kernels find it there too).
    pub fn padded_frame_offset(&self) -> usize {
        self.padded_tail_offset(self.bounds.ep)
    }
    /// Bytes of one slot's `field`.
    pub fn row_bytes(&self, field: Field) -> usize {
        match field {
            Field::Payload => self.payload_bytes,
            Field::Scales => self.scale_bytes,
            Field::Ids | Field::Weights => 4 * self.top_k,
        }
    }
    /// Offset of the region of `field`.
    pub fn region(&self, field: Field) -> usize {
        let tails = round_up(4 * (self.bounds.ep + 1), SECTION_ALIGN);
        let mut at = SECTION_ALIGN + self.dispatch_words_bytes() + self.flags_bytes() + tails;
        for f in Field::ALL {
            if f == field {
                return at;
            }
            at += round_up(self.slots() * self.row_bytes(f), SECTION_ALIGN);
        }
        unreachable!("every field is in Field::ALL")
    }
    /// Offset of the combine region.
    pub fn combine_region(&self) -> usize {
        self.region(Field::Weights) + round_up(self.slots() * self.row_bytes(Field::Weights), SECTION_ALIGN)
    }
}

/// Where one layer's slots lie in its group's workspace: the sections and regions of the
/// group's layout, and in each region the dense `[ep, max_tokens, row]` matrix of the layer's
/// own layout, from the region's start. A layer alone in its group has `group == own`.
///
/// The layer's matrices are then exactly the Standard format's tensors of the layer, whatever
/// the other layers of the group: on GPUs they are handed out in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerSlots {
    /// The group's layout (the union of its layers'): sections and region offsets.
    pub group: WorkspaceLayout,
    /// The layer's own layout: slots per source and row sizes.
    pub own: WorkspaceLayout,
}

impl LayerSlots {
    /// The slots of a layer of layout `own` in a workspace of layout `group`, which must cover
    /// it (the group admitted the layer).
    pub fn new(group: WorkspaceLayout, own: WorkspaceLayout) -> Self {
        assert!(
            group.covers(&own),
            "moe invariant violated: a workspace of {group:?} cannot hold a layer of {own:?}"
        );
        LayerSlots { group, own }
    }

    /// Rows of each of the layer's matrices (`ep * max_tokens`): row `s * max_tokens + t` is
    /// source `s`'s slot `t`.
    pub fn rows(&self) -> usize {
        self.own.slots()
    }

    /// Offset of `field` of `source`'s slot `slot`.
    pub fn field_offset(&self, field: Field, source: usize, slot: usize) -> usize {
        debug_assert!(source < self.own.bounds.ep && slot < self.own.bounds.max_tokens);
        self.group.region(field) + (source * self.own.bounds.max_tokens + slot) * self.own.row_bytes(field)
    }

    /// Offset of combine slot `slot` of `source`.
    pub fn combine_slot_offset(&self, source: usize, slot: usize) -> usize {
        debug_assert!(source < self.own.bounds.ep && slot < self.own.bounds.max_tokens);
        self.group.combine_region() + (source * self.own.bounds.max_tokens + slot) * self.own.bounds.combine_slot_bytes
    }

    /// Gathers the rows the sources filled (`counts[s]` each) into the layer's [`ReceivedRows`]
    /// (`dispatch` is the layer's), reading this rank's workspace through `load` (an offset and
    /// the bytes to fill). Row `s * max_tokens + t` is source `s`'s slot `t`.
    pub fn received_rows(
        &self,
        dispatch: DispatchLayout,
        counts: &[usize],
        mut load: impl FnMut(usize, &mut [u8]),
    ) -> ReceivedRows {
        let max_tokens = self.own.bounds.max_tokens;
        let mut received = ReceivedRows::new(dispatch, self.rows());
        let mut slot = vec![0u8; dispatch.slot_bytes()];
        for (s, &count) in counts.iter().enumerate() {
            for t in 0..count {
                for field in Field::ALL {
                    let (at, len) = field.in_slot(&dispatch);
                    load(self.field_offset(field, s, t), &mut slot[at..at + len]);
                }
                received.fill(s * max_tokens + t, s, &slot);
            }
        }
        received
    }

    /// After a dispatch, once every source's data is here: resets the ids and weights of the
    /// slots between each source's `counts[s]` and its padded tail to padding (all of them
    /// when the tails count another `max_tokens`), and records the new tails (see the module
    /// docs). `mem` is the group's memory, seen from this rank. one_sided.cu's
    /// `moe_pad_unfilled` does the same on GPUs, and dispatch's checkers then check the ids
    /// the peers wrote (the host checks the ids it received in `ReceivedRows::check_ids`).
    pub fn pad_unfilled(&self, mem: &SymmetricMemory, counts: &[usize]) {
        let (me, max) = (mem.me(), self.own.bounds.max_tokens);
        let same_frame = mem.load_u32(me, self.group.padded_frame_offset()) as usize == max;
        let padding_ids = vec![0xffu8; self.own.row_bytes(Field::Ids)];
        let padding_weights = vec![0u8; self.own.row_bytes(Field::Weights)];
        for (s, &count) in counts.iter().enumerate() {
            let tail = match same_frame {
                true => (mem.load_u32(me, self.group.padded_tail_offset(s)) as usize).min(max),
                false => 0,
            };
            for t in count..max - tail {
                mem.store_bytes(me, self.field_offset(Field::Ids, s, t), &padding_ids);
                mem.store_bytes(me, self.field_offset(Field::Weights, s, t), &padding_weights);
            }
            mem.store_u32(me, self.group.padded_tail_offset(s), (max - count) as u32);
        }
        mem.store_u32(me, self.group.padded_frame_offset(), max as u32);
    }
}

/// A handle to one rank's workspace group on the host platform.
pub type SharedGroup = workspace_group::SharedGroup<WorkspaceLayout>;

#[cfg(test)]
mod tests {
    use moe_core::host::{HostWorldConfig, run_host_world};

    use super::*;

    fn layout(max_tokens: usize, payload_bytes: usize, scale_bytes: usize) -> WorkspaceLayout {
        WorkspaceLayout {
            bounds: ExchangeBounds {
                ep: 2,
                max_tokens,
                combine_slot_bytes: 16,
            },
            payload_bytes,
            scale_bytes,
            top_k: 2,
        }
    }

    #[test]
    fn sections_do_not_overlap_and_the_size_is_exact() {
        let l = WorkspaceLayout {
            bounds: ExchangeBounds {
                ep: 3,
                max_tokens: 5,
                combine_slot_bytes: 32,
            },
            payload_bytes: 64,
            scale_bytes: 4,
            top_k: 2,
        };
        let s = LayerSlots::new(l, l);
        for source in 0..3 {
            assert_eq!(l.dispatch_flag_offset(source) % 8, 0);
            assert_eq!(l.recv_count_offset(source), l.dispatch_flag_offset(source) + 4);
        }
        assert!(l.recv_count_offset(2) + 4 <= l.combine_flag_offset(0));
        assert!(l.combine_flag_offset(2) + 4 <= l.padded_tail_offset(0));
        assert_eq!(l.padded_frame_offset(), l.padded_tail_offset(3));
        assert!(l.padded_frame_offset() + 4 <= s.field_offset(Field::Payload, 0, 0));
        let mut end = s.field_offset(Field::Payload, 0, 0);
        for f in Field::ALL {
            assert!(end <= s.field_offset(f, 0, 0), "{f:?} overlaps the region before it");
            assert_eq!(l.region(f) % SECTION_ALIGN, 0);
            end = s.field_offset(f, 2, 4) + l.row_bytes(f);
            assert_eq!(end, l.region(f) + 15 * l.row_bytes(f), "{f:?} is not dense");
        }
        assert!(end <= s.combine_slot_offset(0, 0));
        assert_eq!(s.combine_slot_offset(2, 4) + 32, l.combine_region() + 3 * 5 * 32);
        // 128 (round) + 3 * 128 (dispatch words, combine flags, tails and their max_tokens) +
        // 1024 (payload 960) + 128 (scales 60) + 2 * 128 (ids, weights 120) + 512 (combine
        // 480), each rounded.
        assert_eq!(l.bytes(), 128 + 3 * 128 + 1024 + 128 + 2 * 128 + 512);
    }

    #[test]
    fn the_tails_section_keeps_room_for_their_max_tokens() {
        let small = layout(1, 16, 0);
        let l = WorkspaceLayout {
            bounds: ExchangeBounds { ep: 32, ..small.bounds },
            ..small
        };
        // 32 tails fill 128 bytes exactly; the max_tokens word after them takes a section.
        assert_eq!(l.padded_frame_offset(), l.padded_tail_offset(0) + 128);
        assert_eq!(l.region(Field::Payload), l.padded_tail_offset(0) + 256);
    }

    /// In a group's larger workspace a layer's rows are its own dense matrices (its slots per
    /// source, its row sizes), each from the start of the group's region.
    #[test]
    fn a_layer_in_a_larger_group_lays_out_its_own_dense_matrices() {
        let own = layout(3, 16, 4);
        let group = own.union(layout(8, 64, 0));
        let s = LayerSlots::new(group, own);
        assert_eq!(s.rows(), 6);
        for f in Field::ALL {
            assert_eq!(s.field_offset(f, 0, 0), group.region(f));
            assert_eq!(
                s.field_offset(f, 1, 2),
                group.region(f) + 5 * own.row_bytes(f),
                "{f:?}: row s * max_tokens + t"
            );
        }
        assert_eq!(s.combine_slot_offset(1, 0), group.combine_region() + 3 * 16);
        assert_eq!(
            LayerSlots::new(own, own).field_offset(Field::Ids, 1, 2),
            own.region(Field::Ids) + 5 * 8
        );
    }

    #[test]
    #[should_panic(expected = "cannot hold a layer")]
    fn a_group_that_does_not_cover_the_layer_is_an_invariant_violation() {
        LayerSlots::new(layout(3, 16, 4), layout(4, 16, 4));
    }

    /// `ids` of both sources' slots of a layer of `max_tokens`, read from rank 0's workspace.
    fn ids_of(mem: &SymmetricMemory, s: &LayerSlots) -> Vec<i32> {
        let mut bytes = vec![0u8; s.rows() * s.own.row_bytes(Field::Ids)];
        mem.load_bytes(0, s.group.region(Field::Ids), &mut bytes);
        bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// Fills the first `counts[s]` slots of each source `s` with ids 7 and 9.
    fn fill(mem: &SymmetricMemory, s: &LayerSlots, counts: &[usize]) {
        for (source, &count) in counts.iter().enumerate() {
            for t in 0..count {
                mem.store_bytes(0, s.field_offset(Field::Ids, source, t), &[7, 0, 0, 0, 9, 0, 0, 0]);
            }
        }
    }

    /// Ids `[7, 9]` in the first `counts[s]` of each source's `max_tokens` rows, -1 elsewhere.
    fn expected(max_tokens: usize, counts: &[usize]) -> Vec<i32> {
        let mut v = vec![-1; counts.len() * max_tokens * 2];
        for (s, &count) in counts.iter().enumerate() {
            for t in 0..count {
                v[(s * max_tokens + t) * 2..][..2].copy_from_slice(&[7, 9]);
            }
        }
        v
    }

    /// The regions are the experts' tensors as they are, so a slot a larger earlier round
    /// filled must read as padding again once a round leaves it empty.
    #[test]
    fn stale_ids_of_a_shrinking_round_read_as_padding() {
        let l = layout(4, 16, 0);
        let s = LayerSlots::new(l, l);
        let out = run_host_world(HostWorldConfig::new(1), |rank| {
            let mem = rank.symmetric_alloc(&[0], "workspace", l.bytes().div_ceil(4))?;
            // A fresh (zeroed) workspace: every slot past the counts becomes padding.
            fill(&mem, &s, &[1, 0]);
            s.pad_unfilled(&mem, &[1, 0]);
            let first = ids_of(&mem, &s);
            // A round fills three slots of source 0 and two of source 1, the next fewer.
            fill(&mem, &s, &[3, 2]);
            s.pad_unfilled(&mem, &[3, 2]);
            fill(&mem, &s, &[1, 2]);
            s.pad_unfilled(&mem, &[1, 2]);
            Ok((first, ids_of(&mem, &s)))
        });
        let (first, second) = out.into_iter().next().unwrap().unwrap();
        assert_eq!(first, expected(4, &[1, 0]), "the unfilled slots of a fresh workspace");
        assert_eq!(second, expected(4, &[1, 2]));
    }

    /// Layers of different `max_tokens` in one group lay their rows over each other's: a round
    /// of one must not trust the tails the other counted.
    #[test]
    fn layers_of_different_max_tokens_alternating_read_padding_in_every_unfilled_slot() {
        let (wide, narrow) = (layout(4, 16, 0), layout(2, 16, 0));
        let group = wide.union(narrow);
        let (w, n) = (LayerSlots::new(group, wide), LayerSlots::new(group, narrow));
        let out = run_host_world(HostWorldConfig::new(1), |rank| {
            let mem = rank.symmetric_alloc(&[0], "workspace", group.bytes().div_ceil(4))?;
            let mut seen = Vec::new();
            // Wide fills its source 0 (rows 0..3), which are the narrow layer's rows of both
            // sources; then narrow fills little, then wide again, then narrow twice.
            for (slots, counts) in [(&w, [3, 1]), (&n, [1, 0]), (&w, [0, 2]), (&n, [2, 1]), (&n, [0, 1])] {
                fill(&mem, slots, &counts);
                slots.pad_unfilled(&mem, &counts);
                seen.push(ids_of(&mem, slots));
            }
            Ok(seen)
        });
        let seen = out.into_iter().next().unwrap().unwrap();
        let want = [
            expected(4, &[3, 1]),
            expected(2, &[1, 0]),
            expected(4, &[0, 2]),
            expected(2, &[2, 1]),
            expected(2, &[0, 1]),
        ];
        for (i, (got, want)) in seen.iter().zip(want).enumerate() {
            assert_eq!(got, &want, "round {i}");
        }
    }

    #[test]
    fn union_grows_every_dimension_and_never_shrinks() {
        let a = WorkspaceLayout {
            bounds: ExchangeBounds {
                ep: 2,
                max_tokens: 64,
                combine_slot_bytes: 14336,
            },
            payload_bytes: 4096,
            scale_bytes: 64,
            top_k: 8,
        };
        let b = WorkspaceLayout {
            bounds: ExchangeBounds {
                ep: 2,
                max_tokens: 128,
                combine_slot_bytes: 14336,
            },
            payload_bytes: 14336,
            scale_bytes: 0,
            top_k: 8,
        };
        let u = a.union(b);
        assert_eq!(
            u,
            WorkspaceLayout {
                bounds: ExchangeBounds {
                    ep: 2,
                    max_tokens: 128,
                    combine_slot_bytes: 14336
                },
                payload_bytes: 14336,
                scale_bytes: 64,
                top_k: 8,
            }
        );
        assert!(u.covers(&a) && u.covers(&b) && !a.covers(&b));
        assert_eq!(u.union(a), u);
    }
}
