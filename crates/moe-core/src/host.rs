//! The host platform: N ranks as threads of one process.
//!
//! It runs the same protocols as the GPU: a rank's symmetric workspace is a buffer of 32-bit
//! words that the other ranks store into and load from, counters and flags are atomics with
//! release/acquire ordering, and every wait is bounded. Group operations (barrier, all-gather,
//! all-reduce, reduce-scatter) work on any sub-group of ranks, such as a TP or DP group.
//!
//! A rank that panics marks the world aborted; every rank waiting on anything returns
//! [`MoeError::RankPanicked`] naming it instead of hanging.

use std::any::Any;
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::control::ControlPlane;
use crate::error::{MoeError, Result};

/// A value exchanged through a group operation.
type Shared = Arc<dyn Any + Send + Sync>;

/// How long a rank waits for its peers before giving up, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// Settings of a host world.
#[derive(Clone, Copy, Debug)]
pub struct HostWorldConfig {
    pub ranks: usize,
    /// Bound of every wait.
    pub timeout: Duration,
}

impl HostWorldConfig {
    /// `ranks` ranks with the default timeout.
    pub fn new(ranks: usize) -> Self {
        HostWorldConfig {
            ranks,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Runs `f` on every rank, one thread each, and returns each rank's result in rank order.
///
/// A panic on a rank becomes that rank's `Err(RankPanicked)`, and the other ranks' pending and
/// future waits fail with the same error.
pub fn run_host_world<T, F>(config: HostWorldConfig, f: F) -> Vec<Result<T>>
where
    T: Send,
    F: Fn(HostRank) -> Result<T> + Sync,
{
    let world = Arc::new(World {
        ranks: config.ranks,
        timeout: config.timeout,
        plane: None,
        memory: None,
        abort: Mutex::new(None),
        rendezvous: Mutex::new(HashMap::new()),
        state: Mutex::new(HashMap::new()),
    });
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..config.ranks)
            .map(|rank| {
                let world = world.clone();
                let f = &f;
                std::thread::Builder::new()
                    .name(format!("moe-rank-{rank}"))
                    .spawn_scoped(s, move || {
                        let handle = HostRank {
                            rank,
                            world: world.clone(),
                        };
                        match catch_unwind(AssertUnwindSafe(|| f(handle))) {
                            Ok(r) => r,
                            Err(payload) => {
                                let message = panic_message(payload.as_ref());
                                let e = MoeError::RankPanicked { rank, message };
                                world.abort(e.clone());
                                Err(e)
                            }
                        }
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank threads catch their panics"))
            .collect()
    })
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

struct World {
    ranks: usize,
    timeout: Duration,
    /// `Some` for a rank in a process of its own: the group operations go through this control
    /// plane (bytes and f32 values only).
    plane: Option<Arc<dyn ControlPlane>>,
    /// With `plane`: where workspaces the ranks' processes share come from, if anywhere.
    memory: Option<Arc<dyn ProcessMemory>>,
    abort: Mutex<Option<MoeError>>,
    rendezvous: Mutex<HashMap<Vec<usize>, Arc<Rendezvous>>>,
    state: Mutex<HashMap<(usize, String), Shared>>,
}

impl World {
    /// Aborts the world with `reason` (the first reason stays) and wakes every waiter.
    fn abort(&self, reason: MoeError) {
        lock(&self.abort).get_or_insert(reason);
        for rv in lock(&self.rendezvous).values() {
            rv.cv.notify_all();
        }
    }

    fn aborted(&self) -> Option<MoeError> {
        let own = lock(&self.abort).clone();
        own.or_else(|| self.plane.as_ref().and_then(|p| p.aborted()))
    }

    /// [`HostRank::wait_for`] for rank `rank`.
    fn wait_for(&self, rank: usize, op: &str, peer: usize, ready: impl Fn() -> bool) -> Result<()> {
        let start = Instant::now();
        let mut spins = 0u32;
        while !ready() {
            spins += 1;
            if spins.is_multiple_of(64) {
                if let Some(e) = self.aborted() {
                    return Err(e);
                }
                if start.elapsed() >= self.timeout {
                    return Err(MoeError::Timeout {
                        rank,
                        op: op.to_string(),
                        waited_for: vec![peer],
                        timeout: self.timeout,
                    });
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        Ok(())
    }
}

/// A rank of a world that does not keep the world alive. The world's per-rank state (a
/// workspace group, and the memory it holds) keeps its rank so, or the world would hold itself
/// and never be dropped: its memory would leak and, across processes, its control plane would
/// never say goodbye, cutting off peers still at work when the process exits.
#[derive(Clone)]
struct WeakRank {
    rank: usize,
    world: Weak<World>,
}

impl WeakRank {
    fn wait_for(&self, op: &str, peer: usize, ready: impl Fn() -> bool) -> Result<()> {
        match self.world.upgrade() {
            Some(world) => world.wait_for(self.rank, op, peer, ready),
            None => Err(MoeError::Convention(format!(
                "{op}: rank {}'s world is gone, but a workspace of it is still in use",
                self.rank
            ))),
        }
    }
}

/// Locks a mutex, ignoring poisoning: world state stays consistent because panics are caught
/// outside every critical section.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One generation-counted exchange point per group.
struct Rendezvous {
    state: Mutex<RendezvousState>,
    cv: Condvar,
}

struct RendezvousState {
    generation: u64,
    deposited: Vec<Option<Shared>>,
    arrived: usize,
    /// How many times each member has entered, so a member that times out can tell who came
    /// while it waited, even one that has given up again since.
    entries: Vec<u64>,
    last: Arc<Vec<Shared>>,
}

impl RendezvousState {
    /// Takes back the value of member `me`, who gives up waiting: the exchange it left stays
    /// open for the others, and its next exchange on the group starts afresh rather than
    /// counting twice (a group built again after a timeout exchanges on the same point).
    fn withdraw(&mut self, me: usize) {
        if self.deposited[me].take().is_some() {
            self.arrived -= 1;
        }
    }
}

/// One rank's handle to the host world. Cheap to clone.
#[derive(Clone)]
pub struct HostRank {
    rank: usize,
    world: Arc<World>,
}

impl std::fmt::Debug for HostRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRank")
            .field("rank", &self.rank)
            .field("world_size", &self.world.ranks)
            .finish()
    }
}

impl HostRank {
    /// This rank's index in the world.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world.ranks
    }

    /// The bound of every wait.
    pub fn timeout(&self) -> Duration {
        self.world.timeout
    }

    /// Aborts the world: every rank's pending and later waits fail with `reason`.
    pub fn abort(&self, reason: MoeError) {
        if let Some(plane) = &self.world.plane {
            plane.abort(reason.clone());
        }
        self.world.abort(reason);
    }

    /// Why the world was aborted, if it was: by a rank here, or (across processes) by the
    /// control plane.
    pub fn aborted(&self) -> Option<MoeError> {
        self.world.aborted()
    }

    /// This process's rank of a world whose ranks are processes, connected by `plane` (a
    /// [`crate::control::TcpControlPlane`], or the engine's own): group operations of bytes and
    /// f32 values (barrier, all-gather, all-reduce, reduce-scatter) go through it, so backends
    /// built on those (allgather-rs on the host) run across processes. What needs memory the
    /// ranks share (`symmetric_alloc`, `exchange` of other values) fails saying so.
    pub fn over(plane: Arc<dyn ControlPlane>) -> HostRank {
        Self::in_process_of_its_own(plane, None)
    }

    /// [`Self::over`], with workspaces in memory the ranks' processes share (`memory`, for
    /// example `moe_shm::MemfdMemory` for ranks on one host): `symmetric_alloc` works as with
    /// threads, so the peer-memory backends run across processes too.
    pub fn over_shared(plane: Arc<dyn ControlPlane>, memory: Arc<dyn ProcessMemory>) -> HostRank {
        Self::in_process_of_its_own(plane, Some(memory))
    }

    fn in_process_of_its_own(plane: Arc<dyn ControlPlane>, memory: Option<Arc<dyn ProcessMemory>>) -> HostRank {
        HostRank {
            rank: plane.rank(),
            world: Arc::new(World {
                ranks: plane.world_size(),
                timeout: plane.timeout(),
                plane: Some(plane),
                memory,
                abort: Mutex::new(None),
                rendezvous: Mutex::new(HashMap::new()),
                state: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The error of an operation that needs memory the ranks share, on a rank in a process of
    /// its own.
    fn not_across_processes(&self, op: &str) -> MoeError {
        MoeError::Unsupported(format!(
            "{op} needs memory the ranks share, and rank {} runs in a process of its own (HostRank::over): across processes the host platform has group operations of bytes and f32 values only, and workspaces only where the rank was given memory the processes share (HostRank::over_shared with moe_shm::MemfdMemory, for ranks on one host)",
            self.rank
        ))
    }

    fn position(&self, group: &[usize], op: &str) -> usize {
        group.iter().position(|&r| r == self.rank).unwrap_or_else(|| {
            panic!(
                "moe invariant violated: rank {} called {op} on group {group:?} it is not in",
                self.rank
            )
        })
    }

    /// Exchanges one value per rank of `group` (ranks in ascending order); every member gets all
    /// values in group order. A member that times out takes its value back (the exchange stays
    /// open for the others, and its next one on the group starts afresh) and names the members
    /// that did not come while it waited.
    pub fn exchange(&self, group: &[usize], op: &str, value: Shared) -> Result<Arc<Vec<Shared>>> {
        if self.world.plane.is_some() {
            return Err(self.not_across_processes(op));
        }
        let me = self.position(group, op);
        if let Some(e) = self.world.aborted() {
            return Err(e);
        }
        let rv = lock(&self.world.rendezvous)
            .entry(group.to_vec())
            .or_insert_with(|| {
                Arc::new(Rendezvous {
                    state: Mutex::new(RendezvousState {
                        generation: 0,
                        deposited: vec![None; group.len()],
                        arrived: 0,
                        entries: vec![0; group.len()],
                        last: Arc::new(Vec::new()),
                    }),
                    cv: Condvar::new(),
                })
            })
            .clone();
        let mut st = lock(&rv.state);
        let generation = st.generation;
        st.deposited[me] = Some(value);
        st.arrived += 1;
        st.entries[me] += 1;
        if st.arrived == group.len() {
            let values = st
                .deposited
                .iter_mut()
                .map(|v| v.take().expect("every member deposited"))
                .collect();
            st.last = Arc::new(values);
            st.arrived = 0;
            st.generation += 1;
            rv.cv.notify_all();
            return Ok(st.last.clone());
        }
        // Who was there when this member came, and how often each had entered: the members
        // missing at a timeout are those that were not there and have not come since.
        let present: Vec<bool> = st.deposited.iter().map(Option::is_some).collect();
        let entries = st.entries.clone();
        let deadline = Instant::now() + self.world.timeout;
        while st.generation == generation {
            if let Some(e) = self.world.aborted() {
                st.withdraw(me);
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                let waited_for = group
                    .iter()
                    .enumerate()
                    .filter(|&(m, _)| !present[m] && st.entries[m] == entries[m])
                    .map(|(_, &r)| r)
                    .collect();
                st.withdraw(me);
                return Err(MoeError::Timeout {
                    rank: self.rank,
                    op: op.to_string(),
                    waited_for,
                    timeout: self.world.timeout,
                });
            }
            let slice = (deadline - now).min(Duration::from_millis(50));
            st = rv.cv.wait_timeout(st, slice).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(st.last.clone())
    }

    /// Waits until every rank of `group` arrives.
    pub fn barrier(&self, group: &[usize], op: &str) -> Result<()> {
        if let Some(plane) = &self.world.plane {
            return plane.barrier(group, op);
        }
        self.exchange(group, op, Arc::new(())).map(|_| ())
    }

    /// Gathers one vector per member, in group order.
    pub fn all_gather<T: Clone + Send + Sync + 'static>(
        &self,
        group: &[usize],
        op: &str,
        data: Vec<T>,
    ) -> Result<Vec<Arc<Vec<T>>>> {
        if let Some(plane) = &self.world.plane {
            let bytes = to_wire(data).ok_or_else(|| self.not_across_processes(op))?;
            return plane
                .all_gather(group, op, bytes)?
                .into_iter()
                .zip(group)
                .map(|(part, &member)| {
                    from_wire(part).map(Arc::new).ok_or(MoeError::GroupOpMismatch {
                        rank: self.rank,
                        peer: member,
                        op: op.to_string(),
                    })
                })
                .collect();
        }
        let all = self.exchange(group, op, Arc::new(data))?;
        all.iter()
            .zip(group)
            .map(|(v, &member)| {
                v.clone().downcast::<Vec<T>>().map_err(|_| MoeError::GroupOpMismatch {
                    rank: self.rank,
                    peer: member,
                    op: op.to_string(),
                })
            })
            .collect()
    }

    /// A device resource (a workspace, a communicator id) that the first member of `group` makes
    /// and every member receives (collective): `make` runs on the first member only, and its
    /// failure reaches every member as a device error naming that rank, so none waits for a
    /// resource that will not come.
    pub fn share_from_first<T: Clone + Send + Sync + 'static>(
        &self,
        group: &[usize],
        op: &str,
        make: impl FnOnce() -> std::result::Result<T, String>,
    ) -> Result<T> {
        let first = group[0];
        let made = (self.rank() == first).then(make);
        let shared = self.all_gather(group, op, vec![made])?;
        match shared[0][0].clone() {
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) => Err(MoeError::Device(format!("{op}: rank {first}: {e}"))),
            None => unreachable!("moe invariant violated: the first member of a group always makes the value"),
        }
    }

    /// Bytes (a communicator id) that the first member of `group` makes and every member
    /// receives, through the control plane, so across processes too (collective): `make` runs
    /// on the first member only, and its failure reaches every member as a device error naming
    /// that rank.
    pub fn share_bytes_from_first(
        &self,
        group: &[usize],
        op: &str,
        make: impl FnOnce() -> std::result::Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>> {
        let first = group[0];
        // The first member's part: 0 and the bytes, or 1 and its error's text.
        let part = match (self.rank() == first).then(make) {
            None => Vec::new(),
            Some(Ok(bytes)) => [&[0u8][..], &bytes].concat(),
            Some(Err(e)) => [&[1u8][..], e.as_bytes()].concat(),
        };
        let shared = self.all_gather(group, op, part)?;
        match shared[0].split_first() {
            Some((0, bytes)) => Ok(bytes.to_vec()),
            Some((1, why)) => Err(MoeError::Device(format!(
                "{op}: rank {first}: {}",
                String::from_utf8_lossy(why)
            ))),
            _ => Err(MoeError::GroupOpMismatch {
                rank: self.rank,
                peer: first,
                op: op.to_string(),
            }),
        }
    }

    /// Element-wise sum over the group, accumulated in group order so every member gets the
    /// same bits.
    pub fn all_reduce_sum(&self, group: &[usize], op: &str, data: &mut [f32]) -> Result<()> {
        let all = self.all_gather(group, op, data.to_vec())?;
        data.fill(0.0);
        for part in &all {
            for (d, v) in data.iter_mut().zip(part.iter()) {
                *d += v;
            }
        }
        Ok(())
    }

    /// Sums `data` (`group.len()` equal chunks) over the group and returns this member's chunk.
    pub fn reduce_scatter_sum(&self, group: &[usize], op: &str, data: Vec<f32>) -> Result<Vec<f32>> {
        let me = self.position(group, op);
        if !data.len().is_multiple_of(group.len()) {
            return Err(MoeError::InvalidInput {
                op: "reduce-scatter",
                detail: format!(
                    "{op}: {} values do not split over the group's {} ranks",
                    data.len(),
                    group.len()
                ),
            });
        }
        let chunk = data.len() / group.len();
        let all = self.all_gather(group, op, data)?;
        if let Some(m) = all.iter().position(|part| part.len() != chunk * group.len()) {
            return Err(MoeError::GroupOpMismatch {
                rank: self.rank,
                peer: group[m],
                op: op.to_string(),
            });
        }
        let mut out = vec![0.0f32; chunk];
        for part in &all {
            for (d, v) in out.iter_mut().zip(&part[me * chunk..(me + 1) * chunk]) {
                *d += v;
            }
        }
        Ok(out)
    }

    /// Allocates `words` zeroed 32-bit words on every member of `group` and hands every member
    /// access to all of them (collective).
    pub fn symmetric_alloc(&self, group: &[usize], op: &str, words: usize) -> Result<SymmetricMemory> {
        let me = self.position(group, op);
        let buffers = match (&self.world.plane, &self.world.memory) {
            (Some(plane), Some(memory)) => {
                let buffers = memory.symmetric_alloc(plane.as_ref(), group, op, words)?;
                if buffers.len() != group.len() || buffers.iter().any(|b| b.words().len() != words) {
                    return Err(MoeError::ControlPlane {
                        rank: self.rank,
                        detail: format!(
                            "{op}: the process memory returned {} buffers for a group of {}, not each of {words} words",
                            buffers.len(),
                            group.len()
                        ),
                    });
                }
                buffers
            }
            (Some(_), None) => return Err(self.not_across_processes(op)),
            (None, _) => {
                let local: Arc<dyn WordMemory> = Arc::new(zeroed_words(words));
                let all = self.exchange(group, op, Arc::new(local))?;
                all.iter()
                    .map(|v| {
                        v.clone()
                            .downcast::<Arc<dyn WordMemory>>()
                            .expect("symmetric_alloc exchanges buffers")
                            .as_ref()
                            .clone()
                    })
                    .collect()
            }
        };
        Ok(SymmetricMemory {
            me,
            buffers,
            rank: WeakRank {
                rank: self.rank,
                world: Arc::downgrade(&self.world),
            },
            group: group.to_vec(),
        })
    }

    /// Per-rank state shared by every layer on this rank under `key` (for example a workspace
    /// group), created by `init` on first use.
    pub fn rank_state<T: Any + Send + Sync>(&self, key: &str, init: impl FnOnce() -> T) -> Arc<T> {
        let mut m = lock(&self.world.state);
        m.entry((self.rank, key.to_string()))
            .or_insert_with(|| Arc::new(init()))
            .clone()
            .downcast::<T>()
            .unwrap_or_else(|_| panic!("moe invariant violated: rank state `{key}` has another type"))
    }

    /// Spins until `ready()` holds, for at most the world timeout; `peer` is the rank whose
    /// store is awaited and is named in the timeout error.
    pub fn wait_for(&self, op: &str, peer: usize, ready: impl Fn() -> bool) -> Result<()> {
        self.world.wait_for(self.rank, op, peer, ready)
    }
}

/// The bytes a group operation across processes sends for `data`: bytes as they are, f32
/// values little-endian; `None` for any other type.
fn to_wire<T: 'static>(data: Vec<T>) -> Option<Vec<u8>> {
    let data: Box<dyn Any> = Box::new(data);
    let data = match data.downcast::<Vec<u8>>() {
        Ok(bytes) => return Some(*bytes),
        Err(other) => other,
    };
    let floats = data.downcast::<Vec<f32>>().ok()?;
    Some(floats.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// The values of type `T` that `bytes` (from [`to_wire`] on a peer) stand for, `None` when they
/// do not fit `T`.
fn from_wire<T: 'static>(bytes: Vec<u8>) -> Option<Vec<T>> {
    let values: Box<dyn Any> = if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        if !bytes.len().is_multiple_of(4) {
            return None;
        }
        let floats: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Box::new(floats)
    } else {
        Box::new(bytes)
    };
    values.downcast::<Vec<T>>().ok().map(|v| *v)
}

/// Where one rank's workspace words live: this process's heap for ranks that are threads, or
/// a segment the ranks' processes map (see [`ProcessMemory`]).
pub trait WordMemory: Send + Sync {
    /// The words, zero when allocated.
    fn words(&self) -> &[AtomicU32];
}

impl WordMemory for Box<[AtomicU32]> {
    fn words(&self) -> &[AtomicU32] {
        self
    }
}

/// `words` zeroed words on this process's heap.
fn zeroed_words(words: usize) -> Box<[AtomicU32]> {
    (0..words).map(|_| AtomicU32::new(0)).collect()
}

/// Memory the processes of a world's ranks share, behind [`HostRank::symmetric_alloc`] for ranks
/// in processes of their own ([`HostRank::over_shared`]): `moe_shm::MemfdMemory` for ranks on
/// one host, or an engine's own.
pub trait ProcessMemory: Send + Sync {
    /// Allocates `words` zeroed words for this rank and maps every member's, in `group`'s order
    /// (collective over `group`, through `plane`, bounded by its timeout); `op` names the
    /// operation in errors.
    fn symmetric_alloc(
        &self,
        plane: &dyn ControlPlane,
        group: &[usize],
        op: &str,
        words: usize,
    ) -> Result<Vec<Arc<dyn WordMemory>>>;
}

/// A buffer of 32-bit words on each rank of a group, reachable by every member: the host twin
/// of a peer-mapped GPU workspace. Offsets are in bytes and must be 4-byte aligned.
#[derive(Clone)]
pub struct SymmetricMemory {
    me: usize,
    buffers: Vec<Arc<dyn WordMemory>>,
    rank: WeakRank,
    group: Vec<usize>,
}

impl std::fmt::Debug for SymmetricMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SymmetricMemory")
            .field("group", &self.group)
            .field("bytes_per_rank", &self.bytes_per_rank())
            .finish()
    }
}

impl SymmetricMemory {
    /// This rank's index in the group.
    pub fn me(&self) -> usize {
        self.me
    }

    /// The group's ranks (world indices).
    pub fn group(&self) -> &[usize] {
        &self.group
    }

    /// Bytes of each member's buffer.
    pub fn bytes_per_rank(&self) -> usize {
        self.buffers[self.me].words().len() * 4
    }

    fn word(&self, member: usize, byte_offset: usize) -> &AtomicU32 {
        debug_assert_eq!(byte_offset % 4, 0);
        let buf = self.buffers[member].words();
        buf.get(byte_offset / 4).unwrap_or_else(|| {
            panic!(
                "moe invariant violated: workspace access at byte {byte_offset} of member {member}, past its {} bytes",
                buf.len() * 4
            )
        })
    }

    /// Stores bytes into `member`'s buffer (relaxed; publish with a release flag store). Any
    /// offset and length: a word the bytes cover only in part is merged atomically, so
    /// neighbouring rows of other writers survive (GPU stores have byte granularity too).
    pub fn store_bytes(&self, member: usize, byte_offset: usize, data: &[u8]) {
        let words = self.words_of(member, byte_offset, data.len(), "store");
        let mut at = byte_offset;
        for piece in Self::word_pieces(byte_offset, data) {
            let word = &words[at / 4 - byte_offset / 4];
            let lo = at % 4;
            if piece.len() == 4 {
                word.store(
                    u32::from_le_bytes([piece[0], piece[1], piece[2], piece[3]]),
                    Ordering::Relaxed,
                );
            } else {
                let merge = |old: u32| {
                    let mut w = old.to_le_bytes();
                    w[lo..lo + piece.len()].copy_from_slice(piece);
                    Some(u32::from_le_bytes(w))
                };
                // The closure always returns Some: the update cannot fail.
                let _ = word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, merge);
            }
            at += piece.len();
        }
    }

    /// Loads bytes from `member`'s buffer (relaxed; order after an acquire flag load), from any
    /// offset.
    pub fn load_bytes(&self, member: usize, byte_offset: usize, out: &mut [u8]) {
        let words = self.words_of(member, byte_offset, out.len(), "load");
        let mut at = byte_offset;
        let mut rest = out;
        while !rest.is_empty() {
            let lo = at % 4;
            let n = (4 - lo).min(rest.len());
            let w = words[at / 4 - byte_offset / 4].load(Ordering::Relaxed).to_le_bytes();
            let (piece, tail) = rest.split_at_mut(n);
            piece.copy_from_slice(&w[lo..lo + n]);
            rest = tail;
            at += n;
        }
    }

    /// The words of `member` that bytes `[byte_offset, byte_offset + len)` touch.
    fn words_of(&self, member: usize, byte_offset: usize, len: usize, op: &str) -> &[AtomicU32] {
        let end = byte_offset + len;
        let words = self.buffers[member].words();
        assert!(
            end.div_ceil(4) <= words.len(),
            "moe invariant violated: workspace {op} of bytes {byte_offset}..{end} on member {member}, past its {} bytes",
            words.len() * 4
        );
        &words[byte_offset / 4..end.div_ceil(4)]
    }

    /// `data` cut at the word boundaries of the buffer it is stored at `byte_offset` of.
    fn word_pieces(byte_offset: usize, data: &[u8]) -> impl Iterator<Item = &[u8]> {
        let head = ((4 - byte_offset % 4) % 4).min(data.len());
        let (first, rest) = data.split_at(head);
        std::iter::once(first).filter(|p| !p.is_empty()).chain(rest.chunks(4))
    }

    /// Relaxed store of one word (counters).
    pub fn store_u32(&self, member: usize, byte_offset: usize, v: u32) {
        self.word(member, byte_offset).store(v, Ordering::Relaxed);
    }

    /// Relaxed load of one word.
    pub fn load_u32(&self, member: usize, byte_offset: usize) -> u32 {
        self.word(member, byte_offset).load(Ordering::Relaxed)
    }

    /// Release store of a flag: every store this thread made before it is visible to a member
    /// that acquires the flag.
    pub fn release_flag(&self, member: usize, byte_offset: usize, v: u32) {
        self.word(member, byte_offset).store(v, Ordering::Release);
    }

    /// Waits (bounded) until `decide`, given this rank's word at `byte_offset` (read with
    /// acquire ordering), returns a verdict, and returns it; `peer` (a group index) is the
    /// member expected to store the word.
    pub fn acquire_until<R>(
        &self,
        op: &str,
        byte_offset: usize,
        peer: usize,
        decide: impl Fn(u32) -> Option<R>,
    ) -> Result<R> {
        let w = self.word(self.me, byte_offset);
        let verdict = std::cell::RefCell::new(None);
        self.rank.wait_for(op, self.group[peer], || {
            let decided = decide(w.load(Ordering::Acquire));
            let ready = decided.is_some();
            if ready {
                *verdict.borrow_mut() = decided;
            }
            ready
        })?;
        verdict
            .into_inner()
            .ok_or_else(|| MoeError::Convention(format!("{op}: a wait ended without its verdict")))
    }

    /// Waits (bounded) until this rank's flag at `byte_offset` equals `value`, with acquire
    /// ordering; `peer` (a group index) is the member expected to store it.
    pub fn acquire_flag(&self, op: &str, byte_offset: usize, peer: usize, value: u32) -> Result<()> {
        let w = self.word(self.me, byte_offset);
        self.rank
            .wait_for(op, self.group[peer], || w.load(Ordering::Acquire) == value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(n: usize, ms: u64) -> HostWorldConfig {
        HostWorldConfig {
            ranks: n,
            timeout: Duration::from_millis(ms),
        }
    }

    #[test]
    fn bytes_the_first_member_makes_reach_every_member_and_so_does_its_failure() {
        let out = run_host_world(world(3, 5000), |r| {
            if r.rank() == 1 {
                return Ok((Ok(Vec::new()), Ok(Vec::new())));
            }
            let made = r.share_bytes_from_first(&[0, 2], "id", || Ok(vec![7, 8, 9]));
            let failed = r.share_bytes_from_first(&[0, 2], "bad id", || Err("no network".to_string()));
            Ok((made, failed.map_err(|e| e.to_string())))
        });
        for (r, got) in out.into_iter().enumerate().filter(|(r, _)| *r != 1) {
            let (made, failed) = got.unwrap();
            assert_eq!(made.unwrap(), vec![7, 8, 9], "rank {r}");
            assert_eq!(failed.unwrap_err(), "GPU error: bad id: rank 0: no network", "rank {r}");
        }
    }

    #[test]
    fn unaligned_byte_rows_round_trip_and_spare_their_neighbours() {
        let out = run_host_world(world(2, 5000), |r| {
            let mem = r.symmetric_alloc(&[0, 1], "bytes", 8)?;
            if r.rank() == 0 {
                // Rows of 3 bytes, written out of order by both ranks: no row may clobber the
                // bytes of its neighbours that share a word with it.
                for row in [4usize, 0, 2] {
                    mem.store_bytes(1, 3 * row, &[row as u8 + 1; 3]);
                }
            } else {
                for row in [1usize, 5, 3] {
                    mem.store_bytes(1, 3 * row, &[row as u8 + 1; 3]);
                }
            }
            r.barrier(&[0, 1], "stored")?;
            let mut all = [0u8; 18];
            mem.load_bytes(1, 0, &mut all);
            let mut one = [0u8; 2];
            mem.load_bytes(1, 7, &mut one);
            Ok((all, one))
        });
        let expected: Vec<u8> = (1..=6u8).flat_map(|v| [v; 3]).collect();
        for rank in out {
            let (all, one) = rank.unwrap();
            assert_eq!(all.as_slice(), expected.as_slice());
            assert_eq!(one, [3, 3]);
        }
    }

    #[test]
    fn all_reduce_and_reduce_scatter_over_sub_groups() {
        let out = run_host_world(world(4, 5000), |r| {
            let group: Vec<usize> = if r.rank() < 2 { vec![0, 1] } else { vec![2, 3] };
            let mut v = vec![r.rank() as f32; 3];
            r.all_reduce_sum(&group, "test", &mut v)?;
            let rs = r.reduce_scatter_sum(&[0, 1, 2, 3], "rs", (0..8).map(|i| i as f32).collect())?;
            Ok((v, rs))
        });
        let out: Vec<_> = out.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(out[0].0, [1.0; 3]);
        assert_eq!(out[3].0, [5.0; 3]);
        assert_eq!(out[1].1, [8.0, 12.0]);
    }

    #[test]
    fn share_from_first_runs_make_once_and_hands_its_error_to_every_member() {
        let made = std::sync::atomic::AtomicUsize::new(0);
        let out = run_host_world(world(3, 5000), |r| {
            let group = [1, 2];
            if !group.contains(&r.rank()) {
                return Ok((0, String::new()));
            }
            let value = r.share_from_first(&group, "value", || {
                made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(40 + r.rank())
            })?;
            let failure = r
                .share_from_first::<usize>(&group, "failure", || Err("no memory".to_string()))
                .unwrap_err()
                .to_string();
            Ok((value, failure))
        });
        for (rank, res) in out.into_iter().enumerate().skip(1) {
            let (value, failure) = res.unwrap();
            assert_eq!(value, 41, "rank {rank} gets the first member's value");
            assert!(failure.contains("failure: rank 1: no memory"), "rank {rank}: {failure}");
        }
        assert_eq!(made.into_inner(), 1);
    }

    #[test]
    fn a_missing_rank_is_named_in_the_timeout() {
        let out = run_host_world(world(3, 200), |r| {
            if r.rank() == 2 {
                return Ok(());
            }
            r.barrier(&[0, 1, 2], "barrier")
        });
        // Whichever of ranks 0 and 1 gives up first, the other still counts it as arrived.
        for res in &out[..2] {
            match res {
                Err(MoeError::Timeout { waited_for, .. }) => assert_eq!(waited_for, &[2]),
                other => panic!("expected a timeout naming rank 2, got {other:?}"),
            }
        }
    }

    #[test]
    fn members_that_timed_out_can_exchange_again_with_the_late_rank() {
        let timed_out = std::sync::atomic::AtomicUsize::new(0);
        let out = run_host_world(world(3, 300), |r| {
            let group = [0, 1, 2];
            if r.rank() == 2 {
                // Rank 2 misses the first barrier: it comes only once both others gave up on it.
                let start = Instant::now();
                while timed_out.load(Ordering::Acquire) < 2 && start.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                return r.barrier(&group, "again");
            }
            let first = r.barrier(&group, "first");
            timed_out.fetch_add(1, Ordering::Release);
            match first {
                Err(MoeError::Timeout { waited_for, .. }) if waited_for == [2] => {}
                other => panic!("expected a timeout naming rank 2, got {other:?}"),
            }
            r.barrier(&group, "again")
        });
        for (rank, res) in out.iter().enumerate() {
            assert!(res.is_ok(), "rank {rank}: {res:?}");
        }
    }

    #[test]
    fn a_panicking_rank_releases_the_waiting_ones() {
        let start = Instant::now();
        let out = run_host_world(world(3, 20_000), |r| {
            if r.rank() == 1 {
                panic!("rank one fails");
            }
            r.barrier(&[0, 1, 2], "barrier")
        });
        assert!(start.elapsed() < Duration::from_secs(10), "waiters were not released");
        for res in &out {
            match res {
                Err(MoeError::RankPanicked { rank: 1, message }) => {
                    assert_eq!(message, "rank one fails")
                }
                other => panic!("expected RankPanicked from rank 1, got {other:?}"),
            }
        }
    }

    #[test]
    fn symmetric_memory_publishes_with_release_acquire() {
        let out = run_host_world(world(2, 5000), |r| {
            let mem = r.symmetric_alloc(&[0, 1], "alloc", 8)?;
            let peer = 1 - mem.me();
            mem.store_bytes(peer, 4, &[r.rank() as u8 + 10; 7]);
            mem.release_flag(peer, 0, 1);
            mem.acquire_flag("test", 0, peer, 1)?;
            let mut got = [0u8; 7];
            mem.load_bytes(mem.me(), 4, &mut got);
            Ok(got)
        });
        assert_eq!(out[0].as_ref().unwrap(), &[11u8; 7]);
        assert_eq!(out[1].as_ref().unwrap(), &[10u8; 7]);
    }

    #[test]
    fn a_flag_wait_names_the_silent_peer() {
        let out = run_host_world(world(2, 100), |r| {
            let mem = r.symmetric_alloc(&[0, 1], "alloc", 1)?;
            if r.rank() == 0 {
                mem.acquire_flag("dispatch", 0, 1, 7)
            } else {
                Ok(())
            }
        });
        match &out[0] {
            Err(MoeError::Timeout { waited_for, op, .. }) => {
                assert_eq!((waited_for.as_slice(), op.as_str()), (&[1][..], "dispatch"))
            }
            other => panic!("expected a timeout naming rank 1, got {other:?}"),
        }
    }

    /// A one-rank world's control plane that records being dropped.
    #[derive(Debug)]
    struct DropWatch(Arc<std::sync::atomic::AtomicBool>);

    impl ControlPlane for DropWatch {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            1
        }
        fn timeout(&self) -> Duration {
            Duration::from_secs(1)
        }
        fn all_gather(&self, _group: &[usize], _op: &str, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
            Ok(vec![bytes])
        }
        fn abort(&self, _reason: MoeError) {}
    }

    impl Drop for DropWatch {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// Heap words, as if shared by the processes of a one-rank world.
    struct HeapMemory;

    impl ProcessMemory for HeapMemory {
        fn symmetric_alloc(
            &self,
            _plane: &dyn ControlPlane,
            _group: &[usize],
            _op: &str,
            words: usize,
        ) -> Result<Vec<Arc<dyn WordMemory>>> {
            Ok(vec![Arc::new(zeroed_words(words))])
        }
    }

    #[test]
    fn a_world_whose_rank_state_holds_its_workspace_is_dropped_with_its_last_rank() {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rank = HostRank::over_shared(Arc::new(DropWatch(dropped.clone())), Arc::new(HeapMemory));
        // What a workspace group does: the rank's state holds the rank's workspace.
        let mem = rank.symmetric_alloc(&[0], "workspace", 4).unwrap();
        rank.rank_state("workspace", move || mem);
        drop(rank);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the world outlived its last rank: its control plane never said goodbye"
        );
    }
}
