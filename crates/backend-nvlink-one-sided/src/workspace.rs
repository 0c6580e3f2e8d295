//! The one-sided workspace: its byte layout and the group of layers that share it.
//!
//! Per rank, in bytes (every section 128-byte aligned):
//!
//! | section | contents | written by |
//! |---|---|---|
//! | round | `u32` round counter, +1 per call (at dispatch; combine uses the same round) | this rank |
//! | recv counts | `u32[ep]`: tokens source `s` sent here this round | source `s` |
//! | dispatch flags | `u32[ep]`: round value, stored with release after `s`'s data | source `s` |
//! | combine flags | `u32[ep]`: round value, stored when `s`'s combine rows are staged | source `s` |
//! | padded tails | `u32[ep]`: the last rows of `s`'s ids and weights known to be padding | this rank |
//! | payload region | `[ep, max_tokens, payload_bytes]`: source `s`'s token in slot `t` | source `s` |
//! | scales region | `[ep, max_tokens, scale_bytes]` | source `s` |
//! | ids region | `[ep, max_tokens, top_k]` i32, -1 where this rank computes nothing | source `s`, this rank |
//! | weights region | `[ep, max_tokens, top_k]` f32, 0.0 beside every -1 id | source `s`, this rank |
//! | combine region | `[ep, max_tokens, combine_slot_bytes]`: this rank's output rows for `s`'s slots | this rank, read by `s` |
//!
//! The received tokens are field-major, each field a dense row-major matrix over all
//! `ep * max_tokens` slots: exactly the Standard format's tensors, so on GPUs the experts read
//! them in place (no delivery copy). For that the slots no token filled must read as padding
//! (ids -1, weights 0.0) although earlier rounds filled them: after every dispatch, once all
//! peers are done writing, the receiver resets the rows between this round's count and its
//! padded tail, and records the new tail. A zeroed workspace has a tail of 0 (no row known to
//! be padding), so the first dispatch resets every unfilled row.
//!
//! Rank-major receive buffers are `num_local_experts` times smaller than expert-major ones.

use std::sync::{Arc, Mutex};

use moe_core::config::round_up;
use moe_core::host::{HostRank, SymmetricMemory};
use moe_core::slots::ReceivedRows;
use moe_core::{DispatchLayout, LayerConfig, MoeError, Result};

const SECTION_ALIGN: usize = 128;

/// Sizes that fix the byte layout of the workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkspaceLayout {
    pub ep: usize,
    pub max_tokens: usize,
    pub payload_bytes: usize,
    pub scale_bytes: usize,
    pub top_k: usize,
    pub combine_slot_bytes: usize,
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

    /// Where the field lies in a slot of `dispatch` (offset, bytes): a layer's rows are its own
    /// sizes, at the (possibly wider) strides of the group's layout.
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

impl WorkspaceLayout {
    /// The layout one layer needs.
    pub fn for_layer(layer: &LayerConfig, dispatch: &DispatchLayout) -> Self {
        WorkspaceLayout {
            ep: layer.parallel.world_size(),
            max_tokens: layer.dispatch_tokens_bound(),
            payload_bytes: dispatch.wire.payload_bytes,
            scale_bytes: dispatch.wire.scale_bytes,
            top_k: dispatch.top_k,
            combine_slot_bytes: dispatch.combine_slot_bytes(),
        }
    }

    /// The smallest layout that serves both.
    pub fn union(self, other: Self) -> Self {
        WorkspaceLayout {
            ep: self.ep.max(other.ep),
            max_tokens: self.max_tokens.max(other.max_tokens),
            payload_bytes: self.payload_bytes.max(other.payload_bytes),
            scale_bytes: self.scale_bytes.max(other.scale_bytes),
            top_k: self.top_k.max(other.top_k),
            combine_slot_bytes: self.combine_slot_bytes.max(other.combine_slot_bytes),
        }
    }

    /// Whether `self` holds everything `other` needs.
    pub fn covers(&self, other: &Self) -> bool {
        self.union(*other) == *self
    }

    fn flags_bytes(&self) -> usize {
        round_up(4 * self.ep, SECTION_ALIGN)
    }

    fn slots(&self) -> usize {
        self.ep * self.max_tokens
    }

    /// Offset of the round counter.
    pub const fn round_offset(&self) -> usize {
        0
    }
    /// Offset of `recv_counts[source]`.
    pub fn recv_count_offset(&self, source: usize) -> usize {
        SECTION_ALIGN + 4 * source
    }
    /// Offset of `dispatch_flags[source]`.
    pub fn dispatch_flag_offset(&self, source: usize) -> usize {
        SECTION_ALIGN + self.flags_bytes() + 4 * source
    }
    /// Offset of `combine_flags[source]`.
    pub fn combine_flag_offset(&self, source: usize) -> usize {
        SECTION_ALIGN + 2 * self.flags_bytes() + 4 * source
    }
    /// Offset of `padded_tails[source]`: how many of `source`'s last slots hold padding ids.
    pub fn padded_tail_offset(&self, source: usize) -> usize {
        SECTION_ALIGN + 3 * self.flags_bytes() + 4 * source
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
        let mut at = SECTION_ALIGN + 4 * self.flags_bytes();
        for f in Field::ALL {
            if f == field {
                return at;
            }
            at += round_up(self.slots() * self.row_bytes(f), SECTION_ALIGN);
        }
        unreachable!("every field is in Field::ALL")
    }
    /// Offset of `field` of `source`'s slot `slot`.
    pub fn field_offset(&self, field: Field, source: usize, slot: usize) -> usize {
        debug_assert!(source < self.ep && slot < self.max_tokens);
        self.region(field) + (source * self.max_tokens + slot) * self.row_bytes(field)
    }
    /// Offset of the combine region.
    pub fn combine_region(&self) -> usize {
        self.region(Field::Weights) + round_up(self.slots() * self.row_bytes(Field::Weights), SECTION_ALIGN)
    }
    /// Offset of combine slot `slot` of `source`.
    pub fn combine_slot_offset(&self, source: usize, slot: usize) -> usize {
        debug_assert!(source < self.ep && slot < self.max_tokens);
        self.combine_region() + (source * self.max_tokens + slot) * self.combine_slot_bytes
    }
    /// Bytes per rank.
    pub fn bytes(&self) -> usize {
        self.combine_region() + round_up(self.slots() * self.combine_slot_bytes, SECTION_ALIGN)
    }

    /// Gathers the rows the sources filled (`counts[s]` each) into the [`ReceivedRows`] of a
    /// layer of `dispatch` with `max_tokens` tokens per rank (at most the layout's), reading
    /// this rank's workspace through `load` (an offset and the bytes to fill). Row
    /// `s * max_tokens + t` is source `s`'s slot `t`.
    pub fn received_rows(
        &self,
        dispatch: DispatchLayout,
        max_tokens: usize,
        counts: &[usize],
        mut load: impl FnMut(usize, &mut [u8]),
    ) -> ReceivedRows {
        let mut received = ReceivedRows::new(dispatch, self.ep * max_tokens);
        let mut slot = vec![0u8; dispatch.slot_bytes()];
        for (s, &count) in counts.iter().enumerate() {
            for t in 0..count {
                for field in Field::ALL {
                    let (at, len) = field.in_slot(&dispatch);
                    load(self.field_offset(field, s, t), &mut slot[at..at + len]);
                }
                received.fill(s * max_tokens + t, &slot);
            }
        }
        received
    }
}

impl WorkspaceLayout {
    /// After a dispatch, once every source's data is here: resets the ids and weights of the
    /// slots between each source's `counts[s]` and its padded tail to padding, and records the
    /// new tail (see the module docs). `mem` is the group's memory, seen from this rank.
    pub fn pad_unfilled(&self, mem: &SymmetricMemory, counts: &[usize]) {
        let me = mem.me();
        let padding_ids = vec![0xffu8; self.row_bytes(Field::Ids)];
        let padding_weights = vec![0u8; self.row_bytes(Field::Weights)];
        for (s, &count) in counts.iter().enumerate() {
            let tail = mem.load_u32(me, self.padded_tail_offset(s)) as usize;
            for t in count..self.max_tokens - tail.min(self.max_tokens) {
                mem.store_bytes(me, self.field_offset(Field::Ids, s, t), &padding_ids);
                mem.store_bytes(me, self.field_offset(Field::Weights, s, t), &padding_weights);
            }
            mem.store_u32(me, self.padded_tail_offset(s), (self.max_tokens - count) as u32);
        }
    }
}

/// The values every layer of a group must share, fixed by the first layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GroupKey {
    top_k: usize,
    num_experts: usize,
}

/// The workspace one rank shares among the layers of its EP group.
#[derive(Debug)]
pub struct WorkspaceGroup {
    key: Option<GroupKey>,
    layout: Option<WorkspaceLayout>,
    memory: Option<SymmetricMemory>,
    /// Incremented by every rebuild, so a receipt from before a rebuild is refused.
    pub generation: u64,
}

/// A handle to one rank's workspace group.
pub type SharedGroup = Arc<Mutex<WorkspaceGroup>>;

impl WorkspaceGroup {
    /// The group of `rank` for the EP group `ranks` (created empty on first use).
    pub fn of(rank: &HostRank, ranks: &[usize]) -> SharedGroup {
        let key = format!("nvlink-one-sided/workspace/{ranks:?}");
        let cell: Arc<SharedGroup> = rank.rank_state(&key, || {
            Arc::new(Mutex::new(WorkspaceGroup {
                key: None,
                layout: None,
                memory: None,
                generation: 0,
            }))
        });
        cell.as_ref().clone()
    }

    /// Admits a layer: checks it agrees with the group, and grows the workspace to the union of
    /// layouts when it does not fit (collectively, with a barrier over the EP group only).
    pub fn admit(
        &mut self,
        rank: &HostRank,
        ranks: &[usize],
        layer: &LayerConfig,
        needed: WorkspaceLayout,
    ) -> Result<()> {
        let key = GroupKey {
            top_k: layer.moe.top_k,
            num_experts: layer.moe.num_experts,
        };
        match self.key {
            None => self.key = Some(key),
            Some(k) if k.top_k != key.top_k => {
                return Err(MoeError::WorkspaceGroupMismatch {
                    field: "top_k",
                    group: k.top_k.to_string(),
                    asked: key.top_k.to_string(),
                });
            }
            Some(k) if k.num_experts != key.num_experts => {
                return Err(MoeError::WorkspaceGroupMismatch {
                    field: "num_experts",
                    group: k.num_experts.to_string(),
                    asked: key.num_experts.to_string(),
                });
            }
            Some(_) => {}
        }
        if let Some(l) = self.layout
            && l.covers(&needed)
        {
            return Ok(());
        }
        let layout = self.layout.map_or(needed, |l| l.union(needed));
        // Every member must be done with the old workspace before any member drops it.
        rank.barrier(ranks, "one-sided workspace rebuild")?;
        let memory = rank.symmetric_alloc(ranks, "one-sided workspace rebuild", layout.bytes().div_ceil(4))?;
        self.layout = Some(layout);
        self.memory = Some(memory);
        self.generation += 1;
        Ok(())
    }

    /// The current layout and memory.
    pub fn current(&self) -> (WorkspaceLayout, SymmetricMemory) {
        (
            self.layout
                .expect("moe invariant violated: workspace used before admit"),
            self.memory
                .clone()
                .expect("moe invariant violated: workspace used before admit"),
        )
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
            payload_bytes: 64,
            scale_bytes: 4,
            top_k: 2,
            combine_slot_bytes: 32,
        };
        assert!(l.recv_count_offset(2) + 4 <= l.dispatch_flag_offset(0));
        assert!(l.dispatch_flag_offset(2) + 4 <= l.combine_flag_offset(0));
        assert!(l.combine_flag_offset(2) + 4 <= l.padded_tail_offset(0));
        assert!(l.padded_tail_offset(2) + 4 <= l.field_offset(Field::Payload, 0, 0));
        let mut end = l.field_offset(Field::Payload, 0, 0);
        for f in Field::ALL {
            assert!(end <= l.field_offset(f, 0, 0), "{f:?} overlaps the region before it");
            assert_eq!(l.region(f) % SECTION_ALIGN, 0);
            end = l.field_offset(f, 2, 4) + l.row_bytes(f);
            assert_eq!(end, l.region(f) + 15 * l.row_bytes(f), "{f:?} is not dense");
        }
        assert!(end <= l.combine_slot_offset(0, 0));
        assert_eq!(l.combine_slot_offset(2, 4) + 32, l.combine_region() + 3 * 5 * 32);
        // 128 (round) + 4 * 128 (counts, two flag arrays, tails) + 1024 (payload 960) + 128
        // (scales 60) + 2 * 128 (ids, weights 120) + 512 (combine 480), each rounded.
        assert_eq!(l.bytes(), 128 + 4 * 128 + 1024 + 128 + 2 * 128 + 512);
    }

    /// The regions are the experts' tensors as they are, so a slot a larger earlier round
    /// filled must read as padding again once a round leaves it empty.
    #[test]
    fn stale_ids_of_a_shrinking_round_read_as_padding() {
        use moe_core::host::{HostWorldConfig, run_host_world};
        let l = WorkspaceLayout {
            ep: 2,
            max_tokens: 4,
            payload_bytes: 16,
            scale_bytes: 0,
            top_k: 2,
            combine_slot_bytes: 16,
        };
        let ids_of = |mem: &SymmetricMemory| {
            let mut bytes = vec![0u8; 2 * 4 * 8];
            mem.load_bytes(0, l.region(Field::Ids), &mut bytes);
            bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>()
        };
        let out = run_host_world(HostWorldConfig::new(1), |rank| {
            let mem = rank.symmetric_alloc(&[0], "workspace", l.bytes().div_ceil(4))?;
            // A fresh (zeroed) workspace: every slot past the counts becomes padding.
            l.pad_unfilled(&mem, &[1, 0]);
            let first = ids_of(&mem);
            // A round fills three slots of source 0 and two of source 1, the next fewer.
            for (s, count) in [(0, 3), (1, 2)] {
                for t in 0..count {
                    mem.store_bytes(0, l.field_offset(Field::Ids, s, t), &[7, 0, 0, 0, 9, 0, 0, 0]);
                }
            }
            l.pad_unfilled(&mem, &[3, 2]);
            l.pad_unfilled(&mem, &[1, 2]);
            Ok((first, ids_of(&mem)))
        });
        let (first, second) = out.into_iter().next().unwrap().unwrap();
        assert_eq!(&first[2..], &[-1; 14], "the unfilled slots of a fresh workspace");
        let mut expected = vec![-1; 16];
        expected[..2].copy_from_slice(&[7, 9]);
        expected[8..12].copy_from_slice(&[7, 9, 7, 9]);
        assert_eq!(second, expected);
    }

    #[test]
    fn union_grows_every_dimension_and_never_shrinks() {
        let a = WorkspaceLayout {
            ep: 2,
            max_tokens: 64,
            payload_bytes: 4096,
            scale_bytes: 64,
            top_k: 8,
            combine_slot_bytes: 14336,
        };
        let b = WorkspaceLayout {
            ep: 2,
            max_tokens: 128,
            payload_bytes: 14336,
            scale_bytes: 0,
            top_k: 8,
            combine_slot_bytes: 14336,
        };
        let u = a.union(b);
        assert_eq!(
            u,
            WorkspaceLayout {
                ep: 2,
                max_tokens: 128,
                payload_bytes: 14336,
                scale_bytes: 64,
                top_k: 8,
                combine_slot_bytes: 14336
            }
        );
        assert!(u.covers(&a) && u.covers(&b) && !a.covers(&b));
        assert_eq!(u.union(a), u);
    }
}
