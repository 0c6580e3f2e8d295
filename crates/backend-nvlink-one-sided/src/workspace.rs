//! The one-sided workspace: its byte layout and the group of layers that share it.
//!
//! Per rank, in bytes (every section 128-byte aligned):
//!
//! | section | contents | written by |
//! |---|---|---|
//! | round | `u32` round counter, +1 per dispatch and per combine | this rank |
//! | recv counts | `u32[ep]`: tokens source `s` sent here this round | source `s` |
//! | dispatch flags | `u32[ep]`: round value, stored with release after `s`'s data | source `s` |
//! | combine flags | `u32[ep]`: round value, stored when `s`'s combine rows are staged | source `s` |
//! | dispatch region | `[ep, max_tokens, slot_bytes]`, rank-major: source `s`'s token in slot `t` | source `s` |
//! | combine region | `[ep, max_tokens, combine_slot_bytes]`: this rank's output rows for `s`'s slots | this rank, read by `s` |
//!
//! Rank-major receive buffers are `num_local_experts` times smaller than expert-major ones.

use std::sync::{Arc, Mutex};

use moe_core::config::round_up;
use moe_core::host::{HostRank, SymmetricMemory};
use moe_core::{DispatchLayout, LayerConfig, MoeError, Result};

const SECTION_ALIGN: usize = 128;

/// Sizes that fix the byte layout of the workspace.
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

    /// The smallest layout that serves both.
    pub fn union(self, other: Self) -> Self {
        WorkspaceLayout {
            ep: self.ep.max(other.ep),
            max_tokens: self.max_tokens.max(other.max_tokens),
            slot_bytes: self.slot_bytes.max(other.slot_bytes),
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
    /// Offset of the dispatch region.
    pub fn dispatch_region(&self) -> usize {
        SECTION_ALIGN + 3 * self.flags_bytes()
    }
    /// Offset of the combine region.
    pub fn combine_region(&self) -> usize {
        self.dispatch_region() + round_up(self.ep * self.max_tokens * self.slot_bytes, SECTION_ALIGN)
    }
    /// Offset of dispatch slot `slot` of `source`.
    pub fn dispatch_slot_offset(&self, source: usize, slot: usize) -> usize {
        debug_assert!(source < self.ep && slot < self.max_tokens);
        self.dispatch_region() + (source * self.max_tokens + slot) * self.slot_bytes
    }
    /// Offset of combine slot `slot` of `source`.
    pub fn combine_slot_offset(&self, source: usize, slot: usize) -> usize {
        debug_assert!(source < self.ep && slot < self.max_tokens);
        self.combine_region() + (source * self.max_tokens + slot) * self.combine_slot_bytes
    }
    /// Bytes per rank.
    pub fn bytes(&self) -> usize {
        self.combine_region() + round_up(self.ep * self.max_tokens * self.combine_slot_bytes, SECTION_ALIGN)
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
            slot_bytes: 96,
            combine_slot_bytes: 32,
        };
        assert!(l.recv_count_offset(2) + 4 <= l.dispatch_flag_offset(0));
        assert!(l.dispatch_flag_offset(2) + 4 <= l.combine_flag_offset(0));
        assert!(l.combine_flag_offset(2) + 4 <= l.dispatch_slot_offset(0, 0));
        assert_eq!(l.dispatch_slot_offset(2, 4) + 96, l.dispatch_region() + 3 * 5 * 96);
        assert!(l.dispatch_slot_offset(2, 4) + 96 <= l.combine_slot_offset(0, 0));
        assert_eq!(l.combine_slot_offset(2, 4) + 32, l.combine_region() + 3 * 5 * 32);
        // 128 (round) + 3 * 128 (counts, two flag arrays) + 1536 (dispatch 1440, rounded)
        // + 512 (combine 480, rounded).
        assert_eq!(l.bytes(), 128 + 3 * 128 + 1536 + 512);
    }

    #[test]
    fn union_grows_every_dimension_and_never_shrinks() {
        let a = WorkspaceLayout {
            ep: 2,
            max_tokens: 64,
            slot_bytes: 4096,
            combine_slot_bytes: 14336,
        };
        let b = WorkspaceLayout {
            ep: 2,
            max_tokens: 128,
            slot_bytes: 14400,
            combine_slot_bytes: 14336,
        };
        let u = a.union(b);
        assert_eq!(
            u,
            WorkspaceLayout {
                ep: 2,
                max_tokens: 128,
                slot_bytes: 14400,
                combine_slot_bytes: 14336
            }
        );
        assert!(u.covers(&a) && u.covers(&b) && !a.covers(&b));
        assert_eq!(u.union(a), u);
    }
}
