//! The workspace groups of GPU ranks: the layers of one EP group on a rank share one workspace,
//! every rank's device buffer of the group's current generation (entry `r` on rank `r`'s GPU,
//! mapped into this rank's process), kept per backend, world and EP group in the rank's control-plane state, and rebuilt
//! after every member drained its stream and passed a barrier over the EP group.

use std::sync::{Arc, Mutex};

use moe_core::host::HostRank;
use moe_core::workspace_group::{GroupLayout, Membership, WorkspaceGroup, lock};
use moe_core::{LayerConfig, MoeError, Result};
use moe_kernels::buffer::DeviceBuffer;
use moe_kernels::world::{CudaWorld, CudaWorldRank};

/// A workspace group of layout `L` on one GPU rank (see `moe_core::workspace_group`): its
/// memory is every rank's device buffer of the current generation, entry `r` on rank `r`'s GPU.
pub type CudaWorkspaceGroup<L> = WorkspaceGroup<L, Arc<Vec<DeviceBuffer>>>;

/// A handle to one GPU rank's workspace group, shared by its layers.
pub type SharedCudaGroup<L> = Arc<Mutex<CudaWorkspaceGroup<L>>>;

/// A layer's place in its GPU workspace group of layout `L`.
pub type CudaMembership<L> = Membership<L, Arc<Vec<DeviceBuffer>>>;

/// What the host rank's state holds per (backend, CUDA world, EP group).
struct CudaGroupCell<L> {
    group: SharedCudaGroup<L>,
    /// The world whose address is in the cell's key, held so that no other world takes that
    /// address while the cell lives.
    _world: Arc<CudaWorld>,
}

/// The workspace group GPU rank `device` shares among `backend`'s layers of the EP group
/// `ranks` of its world that name it `name` (`None`: the default group; see
/// `LayerConfig::workspace_group`): kept in the state of its control-plane rank `host` (one per host world,
/// as on the host platform), created empty on first use. Keyed by the backend's name too:
/// another backend's layouts mean other bytes, so it never shares the workspace.
pub fn workspace_group<L: GroupLayout + Send + Sync + 'static>(
    device: &CudaWorldRank,
    host: &HostRank,
    backend: &str,
    ranks: &[usize],
    name: Option<&str>,
) -> SharedCudaGroup<L> {
    let key = format!(
        "{backend}/gpu-workspace/{:p}/{ranks:?}/{name:?}",
        Arc::as_ptr(device.world())
    );
    host.rank_state(&key, || CudaGroupCell {
        group: Arc::new(Mutex::new(WorkspaceGroup::default())),
        _world: device.world().clone(),
    })
    .group
    .clone()
}

/// Admits `layer`, which needs `needed`, to `group` on GPU rank `device` (collective over the
/// layer's EP group, whose group it is: every member admits the same layers in the same order;
/// see `WorkspaceGroup::admit`). When the workspace must grow, every member first drains its
/// stream and waits for the others, so no kernel of the group runs on the old workspace when it
/// is freed (the group's layers hold none of it between calls), then the group's first member
/// allocates the union's, `bytes(&union)` bytes, on every member's GPU
/// (`CudaWorldRank::symmetric_workspace`). `op` names the workspace in errors.
pub fn admit<L: GroupLayout>(
    device: &CudaWorldRank,
    group: &SharedCudaGroup<L>,
    layer: &LayerConfig,
    needed: L,
    bytes: impl FnOnce(&L) -> usize,
    host: &HostRank,
    op: &str,
) -> Result<()> {
    let ranks = layer.parallel.world_group();
    lock(group).admit(layer, needed, |layout| {
        device
            .gpu()
            .stream()
            .synchronize()
            .map_err(|e| MoeError::Device(format!("{op} rebuild: stream sync: {e}")))?;
        host.barrier(&ranks, &format!("{op} rebuild"))?;
        device.symmetric_workspace(host, &ranks, op, bytes(&layout))
    })
}

/// Builds one rank of a peer-memory protocol: `build` finds its workspace (a group's, see
/// [`admit`]) and allocates and loads whatever else the rank needs, then every member waits for
/// the others, even when its own build failed, so no rank's kernels spin on a peer while that
/// peer still allocates or loads modules (which can hang both). Collective over `group`.
///
/// First checks that every ordered pair of `group` reaches each other's memory
/// (`PeerMatrix::check_all_pairs`): when one does not, every member fails alike with
/// [`MoeError::Unsupported`] naming that pair, before `build` allocates or waits for anyone.
pub fn build_collectively<T>(
    device: &CudaWorldRank,
    host: &HostRank,
    group: &[usize],
    op: &str,
    build: impl FnOnce() -> Result<T>,
) -> Result<T> {
    device
        .world()
        .peers()
        .check_all_pairs(group)
        .map_err(|e| MoeError::Unsupported(format!("{op}: {e}")))?;
    let built = build();
    host.barrier(group, op)?;
    built
}
