//! The workspace the layers of one EP group share on a rank: grown to the union of their
//! layouts, never shrunk, rebuilt collectively; its layers take turns on it.
//!
//! A peer-memory backend sizes its workspace from a layout of its own (the type `L`, which says
//! through [`GroupLayout`] how two layouts combine) and keeps it in memory of its platform (the
//! type `M`: the host platform's [`SymmetricMemory`], every rank's device buffer on GPUs). Every
//! layer the backend constructs on a rank for the same EP group joins one [`WorkspaceGroup`]:
//!
//! | concern | how |
//! |---|---|
//! | admission | [`WorkspaceGroup::admit`]: the first layer fixes the values the protocol shares (top_k, expert count); a layer that disagrees is refused with [`MoeError::WorkspaceGroupMismatch`] |
//! | growth | a layer the current workspace does not cover makes the group rebuild it for the union of both layouts (collectively: every member admits the same layers in the same order), never smaller |
//! | generations | each rebuild starts a new [`Workspace::generation`]; layers follow the group to the current one when a call starts, and a call whose prepare ran on an older one fails ([`rebuilt_since_dispatch`]) |
//! | turns | the layers share the workspace's counters, flags and regions, so one call (prepare, then finalize) runs at a time ([`WorkspaceGroup::begin_call`] gives the call a [`CallTicket`], which its receipt carries to finalize, [`WorkspaceGroup::finish_call`]) |
//!
//! Each backend keys its groups by its own name ([`WorkspaceGroup::of`] on the host), so two
//! backends never share a workspace: their layouts mean different bytes.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::host::{HostRank, SymmetricMemory};
use crate::{LayerConfig, MoeError, Result};

/// What a workspace group needs of a backend's workspace layout: how two layouts combine.
pub trait GroupLayout: Copy + PartialEq + Debug {
    /// The smallest layout that serves both.
    fn union(self, other: Self) -> Self;

    /// Whether `self` holds everything `other` needs.
    fn covers(&self, other: &Self) -> bool {
        self.union(*other) == *self
    }
}

/// The values every layer of a group must share, fixed by the first layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GroupKey {
    top_k: usize,
    num_experts: usize,
}

impl GroupKey {
    fn of(layer: &LayerConfig) -> Self {
        GroupKey {
            top_k: layer.moe.top_k,
            num_experts: layer.moe.num_experts,
        }
    }

    /// Fails unless a layer of key `asked` may join a group of key `self`.
    fn admits(self, asked: Self) -> Result<()> {
        let mismatch = |field, group: usize, asked: usize| MoeError::WorkspaceGroupMismatch {
            field,
            group: group.to_string(),
            asked: asked.to_string(),
        };
        if self.top_k != asked.top_k {
            return Err(mismatch("top_k", self.top_k, asked.top_k));
        }
        if self.num_experts != asked.num_experts {
            return Err(mismatch("num_experts", self.num_experts, asked.num_experts));
        }
        Ok(())
    }
}

/// One generation of a group's workspace: its layout and the memory that holds it.
#[derive(Clone, Debug)]
pub struct Workspace<L, M> {
    /// 1 for the first workspace, +1 per rebuild: a call whose prepare ran on another
    /// generation than its finalize is refused.
    pub generation: u64,
    pub layout: L,
    pub memory: M,
}

/// The workspace one rank shares among the layers of its EP group: layout `L`, in memory `M`.
/// The layers hold the group and look up the current [`Workspace`] when they run.
#[derive(Debug)]
pub struct WorkspaceGroup<L, M> {
    /// Unique in the process, so a ticket of another group is told apart.
    id: u64,
    key: Option<GroupKey>,
    current: Option<Workspace<L, M>>,
    /// Calls begun so far, numbering the tickets.
    calls: u64,
    /// The call (prepare done, finalize not yet) that holds the workspace.
    in_flight: Option<CallTicket>,
    /// Layers that joined so far, numbering them in construction order, which every member
    /// shares (see `crate::call::CallId`).
    layers: u32,
}

/// One call's hold on a group's workspace, from its prepare ([`WorkspaceGroup::begin_call`])
/// to its finalize ([`WorkspaceGroup::finish_call`]): the call's receipt carries it, so
/// finalize ends exactly the call the receipt belongs to, and a receipt handed to the wrong
/// layer is recognized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallTicket {
    group: u64,
    layer: LayerId,
    call: u64,
}

fn next_group_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A layer's identity within its group, for the turn-taking check ([`LayerId::next`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerId(u64);

impl LayerId {
    /// A new identity, unique in the process.
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        LayerId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// A handle to one rank's workspace group on the host platform.
pub type SharedGroup<L> = Arc<Mutex<WorkspaceGroup<L, SymmetricMemory>>>;

impl<L, M> Default for WorkspaceGroup<L, M> {
    /// A group no layer has joined yet.
    fn default() -> Self {
        WorkspaceGroup {
            id: next_group_id(),
            key: None,
            current: None,
            calls: 0,
            in_flight: None,
            layers: 0,
        }
    }
}

impl<L: GroupLayout, M> WorkspaceGroup<L, M> {
    /// The group of the one layer `layer` over `memory`, which holds `layout` (at least the
    /// layer's): for a layer given a workspace of its own.
    pub fn with_memory(layer: &LayerConfig, layout: L, memory: M) -> Self {
        WorkspaceGroup {
            id: next_group_id(),
            key: Some(GroupKey::of(layer)),
            current: Some(Workspace {
                generation: 1,
                layout,
                memory,
            }),
            calls: 0,
            in_flight: None,
            layers: 0,
        }
    }

    /// Admits a layer that needs `needed`: fails with [`MoeError::WorkspaceGroupMismatch`]
    /// when its top_k or expert count differs from the group's, and when the current workspace
    /// does not cover `needed`, has `rebuild` make the memory of the union of both layouts and
    /// starts a new generation. The group never shrinks; a failed rebuild leaves it as it was.
    ///
    /// Collective: every member of the EP group admits the same layers in the same order, so
    /// every member decides alike and they rebuild together (`rebuild` may wait for the others
    /// and must leave no member using the old memory).
    pub fn admit(&mut self, layer: &LayerConfig, needed: L, rebuild: impl FnOnce(L) -> Result<M>) -> Result<()> {
        let key = GroupKey::of(layer);
        if let Some(group) = self.key {
            group.admits(key)?;
        }
        let (layout, generation) = match &self.current {
            Some(w) if w.layout.covers(&needed) => {
                self.key = Some(key);
                return Ok(());
            }
            Some(w) => (w.layout.union(needed), w.generation + 1),
            None => (needed, 1),
        };
        let memory = rebuild(layout)?;
        self.current = Some(Workspace {
            generation,
            layout,
            memory,
        });
        self.key = Some(key);
        Ok(())
    }

    /// Starts a call of `layer` (at its prepare) and returns its ticket, for the call's receipt:
    /// the group's layers share the workspace's counters, flags and regions, so they take
    /// turns, one call (prepare, then finalize) at a time; fails while another call holds the
    /// workspace.
    pub fn begin_call(&mut self, layer: LayerId) -> Result<CallTicket> {
        let detail = match self.in_flight {
            None => {
                self.calls += 1;
                let ticket = CallTicket {
                    group: self.id,
                    layer,
                    call: self.calls,
                };
                self.in_flight = Some(ticket);
                return Ok(ticket);
            }
            Some(held) if held.layer == layer => {
                "this layer's previous call was prepared but not finalized: finalize it \
                 before preparing the next (one call at a time per layer)"
                    .to_string()
            }
            Some(_) => "another layer's call on the workspace this layer shares with it (one per EP group) was \
                 prepared but not finalized: the layers of an EP group take turns, one call (prepare, then \
                 finalize) at a time; finalize that call first"
                .to_string(),
        };
        Err(MoeError::InvalidInput { op: "prepare", detail })
    }

    /// Ends the call of `ticket` when its prepare failed (it returned no receipt).
    pub fn end_call(&mut self, ticket: CallTicket) {
        if self.in_flight == Some(ticket) {
            self.in_flight = None;
        }
    }

    /// At `layer`'s finalize of the call whose receipt carried `ticket`: ends that call's turn,
    /// or refuses the receipt and leaves the turn as it is. A receipt of another layer's call
    /// is refused and its call keeps the workspace: it ran its dispatch and no combine, so the
    /// peers are waiting for a combine it can never run (its receipt is consumed here), and a
    /// next call would start while they are a round behind. The group then refuses every
    /// prepare, saying so, until its layers are constructed again: deterministic, where going
    /// on would hang or mix rounds. A receipt of another group, or of a call already over, is
    /// refused and changes nothing.
    pub fn finish_call(&mut self, layer: LayerId, ticket: CallTicket) -> Result<()> {
        let detail = if ticket.group != self.id || self.in_flight != Some(ticket) {
            "the receipt is not of this group's call in flight (it is another EP group's, or its call was \
             finalized already): pass each call's receipt, once, to the finalize of the layer that prepared it"
        } else if ticket.layer != layer {
            "the receipt is another layer's call on the workspace this layer shares: that call can no longer \
             be finalized (its receipt was consumed here) and the ranks of the EP group are out of step, so \
             the layers sharing this workspace run no more calls; construct them again, and pass each call's \
             receipt to the finalize of the layer that prepared it"
        } else {
            self.in_flight = None;
            return Ok(());
        };
        Err(MoeError::InvalidInput {
            op: "finalize",
            detail: detail.to_string(),
        })
    }

    /// The current workspace.
    pub fn current(&self) -> &Workspace<L, M> {
        self.current
            .as_ref()
            .expect("moe invariant violated: workspace used before a layer was admitted")
    }
}

impl<L: GroupLayout + Send + 'static> WorkspaceGroup<L, SymmetricMemory> {
    /// The host group of `rank` for backend `backend`'s layers of the EP group `ranks` that
    /// name it `name` (`None`: the default group; see `LayerConfig::workspace_group`), created
    /// empty on first use. Keyed by the backend's name too: another backend's layouts mean
    /// other bytes, so it never shares the workspace.
    pub fn of(rank: &HostRank, backend: &str, ranks: &[usize], name: Option<&str>) -> SharedGroup<L> {
        let key = format!("{backend}/workspace/{ranks:?}/{name:?}");
        let cell: Arc<SharedGroup<L>> = rank.rank_state(&key, || Arc::new(Mutex::new(WorkspaceGroup::default())));
        cell.as_ref().clone()
    }
}

/// A layer's place in its workspace group: the group, and the layer's identity in its turns.
/// Cheap to clone (the group is shared).
#[derive(Debug)]
pub struct Membership<L, M> {
    group: Arc<Mutex<WorkspaceGroup<L, M>>>,
    id: LayerId,
    /// The layer's place among the group's layers, in construction order.
    index: u32,
}

impl<L, M> Clone for Membership<L, M> {
    fn clone(&self) -> Self {
        Membership {
            group: self.group.clone(),
            id: self.id,
            index: self.index,
        }
    }
}

impl<L: GroupLayout, M: Clone> Membership<L, M> {
    /// A new layer of `group`, which has admitted it ([`WorkspaceGroup::admit`]).
    pub fn new(group: Arc<Mutex<WorkspaceGroup<L, M>>>) -> Self {
        let index = {
            let mut g = lock(&group);
            g.layers += 1;
            g.layers - 1
        };
        Membership {
            group,
            id: LayerId::next(),
            index,
        }
    }

    /// The layer's place among its group's layers, in construction order: the same on every
    /// member, as every member constructs the same layers in the same order.
    pub fn layer_index(&self) -> u32 {
        self.index
    }

    /// The group's current workspace: its generation, layout and memory.
    pub fn current(&self) -> (u64, L, M) {
        let g = lock(&self.group);
        let w = g.current();
        (w.generation, w.layout, w.memory.clone())
    }

    /// The group's workspace of `generation` (its layout and memory), the one a call's
    /// dispatch ran on; fails naming `op` when a larger layer's admission rebuilt it since
    /// ([`rebuilt_since_dispatch`]).
    pub fn workspace_of(&self, generation: u64, op: &'static str) -> Result<(L, M)> {
        let (current, layout, memory) = self.current();
        if current != generation {
            return Err(rebuilt_since_dispatch(op));
        }
        Ok((layout, memory))
    }

    /// The group's current workspace when it is newer than `generation`: what a layer that
    /// last ran on `generation` must follow at its next call's start.
    pub fn newer_than(&self, generation: u64) -> Option<(u64, L, M)> {
        // Checked under the lock before anything is cloned: a call's start on an unchanged
        // group (the steady state) copies nothing.
        let g = lock(&self.group);
        let w = g.current();
        (w.generation != generation).then(|| (w.generation, w.layout, w.memory.clone()))
    }

    /// Runs a prepare on a turn of its own ([`WorkspaceGroup::begin_call`]), handing it the
    /// call's ticket for its receipt; the turn ends at once when `prepare` fails (there is no
    /// receipt to finalize).
    pub fn prepare<T>(&self, prepare: impl FnOnce(CallTicket) -> Result<T>) -> Result<T> {
        let ticket = lock(&self.group).begin_call(self.id)?;
        let prepared = prepare(ticket);
        if prepared.is_err() {
            lock(&self.group).end_call(ticket);
        }
        prepared
    }

    /// Runs `abandon` on a turn of its own, which ends with it: a call this layer runs no
    /// prepare for, marked abandoned so its peers fail it too (see
    /// `PrepareFinalize::abandon`). Fails, running nothing, while another call holds the
    /// workspace.
    pub fn abandon(&self, abandon: impl FnOnce() -> Result<()>) -> Result<()> {
        let ticket = lock(&self.group).begin_call(self.id)?;
        let abandoned = abandon();
        lock(&self.group).end_call(ticket);
        abandoned
    }

    /// Ends the call whose receipt carried `ticket`, at this layer's finalize
    /// ([`WorkspaceGroup::finish_call`]).
    pub fn finish_call(&self, ticket: CallTicket) -> Result<()> {
        lock(&self.group).finish_call(self.id, ticket)
    }
}

/// Locks a group (a panic elsewhere while it was locked leaves it consistent: every update is
/// one assignment).
pub fn lock<L, M>(group: &Mutex<WorkspaceGroup<L, M>>) -> MutexGuard<'_, WorkspaceGroup<L, M>> {
    group.lock().unwrap_or_else(|e| e.into_inner())
}

/// The error of a call on a workspace a larger layer's construction replaced since the call's
/// dispatch (`op`: the step refused).
pub fn rebuilt_since_dispatch(op: &'static str) -> MoeError {
    MoeError::InvalidInput {
        op,
        detail: "the shared workspace was rebuilt (a larger layer was constructed) between prepare and finalize; construct every layer before running any".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ActivationFormat, InputDtype, MoeConfig, ParallelConfig, QuantConfig, quant::QuantScheme};

    /// A layout of two sizes that combine by their maximum.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Sizes {
        rows: usize,
        row_bytes: usize,
    }

    impl GroupLayout for Sizes {
        fn union(self, other: Self) -> Self {
            Sizes {
                rows: self.rows.max(other.rows),
                row_bytes: self.row_bytes.max(other.row_bytes),
            }
        }
    }

    fn sizes(rows: usize, row_bytes: usize) -> Sizes {
        Sizes { rows, row_bytes }
    }

    fn layer(top_k: usize, num_experts: usize) -> LayerConfig {
        LayerConfig::new(
            MoeConfig::new(num_experts, top_k, 16, 4, InputDtype::Bf16),
            QuantConfig::new(QuantScheme::Bf16),
            ParallelConfig::ep(2),
            ActivationFormat::Standard,
        )
        .expect("a valid layer")
    }

    /// A group whose memory records the layouts it was built for, in order.
    type Recording = WorkspaceGroup<Sizes, Vec<Sizes>>;

    fn admit(group: &mut Recording, layer: &LayerConfig, needed: Sizes) -> Result<()> {
        let built = group.current.as_ref().map(|w| w.memory.clone()).unwrap_or_default();
        group.admit(layer, needed, |layout| Ok([built, vec![layout]].concat()))
    }

    #[test]
    fn covers_is_holding_the_union() {
        assert!(sizes(4, 64).covers(&sizes(2, 64)));
        assert!(!sizes(4, 16).covers(&sizes(2, 64)));
    }

    #[test]
    fn the_group_grows_to_the_union_never_shrinks_and_counts_rebuilds() {
        let l = layer(2, 8);
        let (small, large) = (sizes(4, 64), sizes(8, 16));
        let mut group = Recording::default();
        admit(&mut group, &l, small).unwrap();
        assert_eq!((group.current().generation, group.current().layout), (1, small));
        admit(&mut group, &l, sizes(2, 32)).unwrap();
        assert_eq!(group.current().generation, 1, "a covered layer rebuilds nothing");
        admit(&mut group, &l, large).unwrap();
        let union = small.union(large);
        assert_eq!((group.current().generation, group.current().layout), (2, union));
        admit(&mut group, &l, small).unwrap();
        admit(&mut group, &l, large).unwrap();
        let w = group.current();
        assert_eq!(
            (w.generation, w.layout),
            (2, union),
            "never shrinks, never rebuilds again"
        );
        assert_eq!(w.memory, [small, union], "one rebuild per growth, to the union");
    }

    #[test]
    fn a_layer_of_another_top_k_or_expert_count_is_refused_and_changes_nothing() {
        let mut group = Recording::default();
        admit(&mut group, &layer(2, 8), sizes(4, 64)).unwrap();
        for (other, field) in [(layer(1, 8), "top_k"), (layer(2, 6), "num_experts")] {
            let e = admit(&mut group, &other, sizes(16, 64)).unwrap_err();
            assert!(
                matches!(&e, MoeError::WorkspaceGroupMismatch { field: f, .. } if *f == field),
                "{e}"
            );
            assert!(e.to_string().contains("LayerConfig::with_workspace_group(name)"), "{e}");
        }
        let w = group.current();
        assert_eq!((w.generation, w.layout), (1, sizes(4, 64)));
    }

    #[test]
    fn a_failed_rebuild_leaves_the_group_as_it_was() {
        let l = layer(2, 8);
        let mut group = Recording::default();
        let failed = group.admit(&l, sizes(4, 64), |_| Err(MoeError::Device("no memory".into())));
        assert!(failed.is_err() && group.current.is_none() && group.key.is_none());
        admit(&mut group, &l, sizes(4, 64)).unwrap();
        let failed = group.admit(&l, sizes(8, 64), |_| Err(MoeError::Device("no memory".into())));
        assert!(failed.is_err());
        let w = group.current();
        assert_eq!((w.generation, w.layout), (1, sizes(4, 64)));
    }

    /// Layers of a group share the workspace's counters, flags and regions: a second call
    /// prepared before the first is finalized would overwrite what the first's experts read.
    #[test]
    fn a_second_call_before_the_first_is_finalized_is_refused() {
        let mut group = Recording::default();
        let (a, b) = (LayerId::next(), LayerId::next());
        let first = group.begin_call(a).unwrap();
        let other = group.begin_call(b).unwrap_err();
        assert!(
            other.to_string().contains("the layers of an EP group take turns"),
            "{other}"
        );
        let same = group.begin_call(a).unwrap_err();
        assert!(
            same.to_string()
                .contains("previous call was prepared but not finalized"),
            "{same}"
        );
        group.finish_call(a, first).unwrap();
        let second = group.begin_call(b).unwrap();
        group.end_call(second);
        group.begin_call(a).unwrap();
    }

    /// A receipt carries its call's ticket: finalize ends exactly that call, and refuses,
    /// without touching the turn, a receipt of another group, of a call already finalized, or
    /// of another layer (whose call then holds the workspace for good).
    #[test]
    fn finalize_ends_the_call_its_receipt_belongs_to() {
        let (mut group, mut elsewhere) = (Recording::default(), Recording::default());
        let (a, b) = (LayerId::next(), LayerId::next());
        let foreign = elsewhere.begin_call(a).unwrap();
        let call = group.begin_call(a).unwrap();
        let refused = group.finish_call(a, foreign).unwrap_err();
        assert!(refused.to_string().contains("another EP group's"), "{refused}");
        assert!(
            group.begin_call(b).is_err(),
            "a foreign receipt ended this group's call"
        );
        group.finish_call(a, call).unwrap();
        let again = group.finish_call(a, call).unwrap_err();
        assert!(again.to_string().contains("finalized already"), "{again}");

        let call = group.begin_call(a).unwrap();
        let wrong_layer = group.finish_call(b, call).unwrap_err();
        assert!(
            wrong_layer.to_string().contains("another layer's call"),
            "{wrong_layer}"
        );
        for layer in [a, b] {
            let held = group.begin_call(layer).unwrap_err();
            assert!(held.to_string().contains("not finalized"), "{held}");
        }
        elsewhere.finish_call(a, foreign).unwrap();
    }

    /// Two backends on the same ranks keep separate groups, and one backend's EP groups too,
    /// and the groups layers name.
    #[test]
    fn host_groups_are_per_backend_per_ep_group_and_per_name() {
        let out = crate::host::run_host_world(crate::host::HostWorldConfig::new(2), |rank| {
            let a = WorkspaceGroup::<Sizes, _>::of(&rank, "one", &[0, 1], None);
            let same = WorkspaceGroup::<Sizes, _>::of(&rank, "one", &[0, 1], None);
            let other_backend = WorkspaceGroup::<Sizes, _>::of(&rank, "two", &[0, 1], None);
            let other_ranks = WorkspaceGroup::<Sizes, _>::of(&rank, "one", &[rank.rank()], None);
            let named = WorkspaceGroup::<Sizes, _>::of(&rank, "one", &[0, 1], Some("top-1"));
            let same_name = WorkspaceGroup::<Sizes, _>::of(&rank, "one", &[0, 1], Some("top-1"));
            Ok((
                Arc::ptr_eq(&a, &same),
                Arc::ptr_eq(&a, &other_backend),
                Arc::ptr_eq(&a, &other_ranks),
                Arc::ptr_eq(&a, &named),
                Arc::ptr_eq(&named, &same_name),
            ))
        });
        for r in out {
            assert_eq!(r.expect("rank ran"), (true, false, false, false, true));
        }
    }
}
