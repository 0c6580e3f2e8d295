//! The TCP rendezvous control plane: one process per rank, on one host or several. Rank 0
//! listens at `MASTER_ADDR:MASTER_PORT`; every other rank connects to it and says who it is
//! (protocol version, world size, run id, rank); once every rank joined, rank 0 welcomes them.
//! Rank 0 is the hub of every group operation: members send it their contribution, and it
//! answers each member with every contribution once the group's are all there.
//!
//! Every wait is bounded by the timeout: joining (rank 0 unreachable, a rank that never
//! connects), and each operation (the hub names the members that did not come). A hello of
//! another protocol version, world size or run id, a rank out of range or twice, ends the
//! world's bootstrap with that reason on every rank that joined; a connection that does not
//! start with a hello (a stranger's) is closed and the bootstrap goes on. A rank whose
//! connection closes without saying goodbye (its process exited or was killed) aborts the
//! world: every pending and later operation of every rank fails naming it.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::wire::{Frame, MAGIC, VERSION};
use super::{ControlPlane, position_in};
use crate::error::{MoeError, Result};
use crate::host::DEFAULT_TIMEOUT;

/// How long a member waits beyond the timeout for the hub's verdict on an operation (the hub
/// names the missing members; its verdict needs this margin to arrive).
const VERDICT_GRACE: Duration = Duration::from_secs(2);
/// How often the hub checks pending operations against the timeout.
const SWEEP_INTERVAL: Duration = Duration::from_millis(20);
/// How long a new connection may take to say hello before it counts as a stranger's.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and who a rank is in a TCP rendezvous world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpConfig {
    /// The address rank 0 listens on and the others connect to.
    pub master_addr: String,
    pub master_port: u16,
    pub rank: usize,
    pub world_size: usize,
    /// This rank's index among the ranks of its host (its GPU, by default).
    pub local_rank: usize,
    /// Ranks on this rank's host.
    pub local_world_size: usize,
    /// Tells this run's ranks from another's that reach the same address.
    pub run_id: u64,
    /// The bound of every wait.
    pub timeout: Duration,
}

/// Where a launcher puts a process's place in the world: its rank, the world's size, and the
/// same on its host.
#[derive(Debug)]
struct Launcher {
    name: &'static str,
    rank: &'static str,
    world_size: &'static str,
    local_rank: &'static str,
    local_world_size: &'static str,
}

/// The launchers whose variables [`TcpConfig::from_env`] reads, in this order: the first whose
/// rank variable is set places the process.
const LAUNCHERS: [Launcher; 4] = [
    Launcher {
        name: "torchrun",
        rank: "RANK",
        world_size: "WORLD_SIZE",
        local_rank: "LOCAL_RANK",
        local_world_size: "LOCAL_WORLD_SIZE",
    },
    Launcher {
        name: "Open MPI's mpirun",
        rank: "OMPI_COMM_WORLD_RANK",
        world_size: "OMPI_COMM_WORLD_SIZE",
        local_rank: "OMPI_COMM_WORLD_LOCAL_RANK",
        local_world_size: "OMPI_COMM_WORLD_LOCAL_SIZE",
    },
    Launcher {
        name: "MPICH's or Intel MPI's mpirun",
        rank: "PMI_RANK",
        world_size: "PMI_SIZE",
        local_rank: "MPI_LOCALRANKID",
        local_world_size: "MPI_LOCALNRANKS",
    },
    Launcher {
        name: "Slurm's srun",
        rank: "SLURM_PROCID",
        world_size: "SLURM_NTASKS",
        local_rank: "SLURM_LOCALID",
        local_world_size: "SLURM_NTASKS_PER_NODE",
    },
];

impl TcpConfig {
    /// From the environment launchers set: `MASTER_ADDR` and `MASTER_PORT` (required: rank 0's
    /// address), and the process's place from the first launcher's variables that are set:
    /// torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE` (also what
    /// `cargo xtask launch` sets), Open MPI's `OMPI_COMM_WORLD_*`, MPICH's or Intel MPI's
    /// `PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`, `MPI_LOCALNRANKS`, or Slurm's `SLURM_PROCID`,
    /// `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE` (the local ones default to the
    /// world's: one host). The run id comes from `MOE_RUN_ID`, torchrun's
    /// `TORCHELASTIC_RUN_ID`, Slurm's `SLURM_JOB_ID` and `SLURM_STEP_ID`, or PMIx's
    /// `PMIX_NAMESPACE` (default: none); the timeout from `MOE_TIMEOUT_MS` (default 20 s).
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`TcpConfig::from_env`], reading each variable through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let required = |name: &'static str| {
            var(name).ok_or_else(|| MoeError::InvalidConfig {
                field: name,
                value: "unset".into(),
                rule: "set by the launcher (torchrun, mpirun or srun wrappers, `cargo xtask launch`); set it, or build the TcpConfig explicitly".into(),
            })
        };
        let number = |name: &'static str, text: String| {
            text.trim().parse::<u64>().map_err(|e| MoeError::InvalidConfig {
                field: name,
                value: text.clone(),
                rule: format!("a non-negative integer ({e})"),
            })
        };
        let master_addr = required("MASTER_ADDR")?;
        let master_port = number("MASTER_PORT", required("MASTER_PORT")?)?;
        let launcher = LAUNCHERS.iter().find(|l| var(l.rank).is_some()).ok_or_else(|| {
            let names: Vec<String> = LAUNCHERS.iter().map(|l| format!("{} ({})", l.rank, l.name)).collect();
            MoeError::InvalidConfig {
                field: "RANK",
                value: "unset".into(),
                rule: format!(
                    "set by the launcher; none of {} is set: start the process with one of them, or build the TcpConfig explicitly",
                    names.join(", ")
                ),
            }
        })?;
        let rank = number(launcher.rank, required(launcher.rank)?)? as usize;
        let world_size = number(launcher.world_size, required(launcher.world_size)?)? as usize;
        let local_rank = var(launcher.local_rank)
            .map(|v| number(launcher.local_rank, v))
            .transpose()?;
        let local_world_size = var(launcher.local_world_size)
            .map(|v| number(launcher.local_world_size, v))
            .transpose()?;
        let timeout = var("MOE_TIMEOUT_MS")
            .map(|v| number("MOE_TIMEOUT_MS", v).map(Duration::from_millis))
            .transpose()?
            .unwrap_or(DEFAULT_TIMEOUT);
        let slurm_step = var("SLURM_JOB_ID").map(|job| format!("{job}.{}", var("SLURM_STEP_ID").unwrap_or_default()));
        let run_id = var("MOE_RUN_ID")
            .or_else(|| var("TORCHELASTIC_RUN_ID"))
            .or(slurm_step)
            .or_else(|| var("PMIX_NAMESPACE"))
            .map_or(0, |id| fnv(id.as_bytes()));
        let config = TcpConfig {
            master_addr,
            master_port: u16::try_from(master_port).map_err(|_| MoeError::InvalidConfig {
                field: "MASTER_PORT",
                value: master_port.to_string(),
                rule: "a TCP port, at most 65535".into(),
            })?,
            rank,
            world_size,
            local_rank: local_rank.map_or(rank, |r| r as usize),
            local_world_size: local_world_size.map_or(world_size, |n| n as usize),
            run_id,
            timeout,
        };
        config.validate()?;
        Ok(config)
    }

    /// A port on 127.0.0.1 nothing listens on now, for rank 0 of ranks started on this host
    /// (another process may still take it before rank 0 binds it).
    pub fn free_local_port() -> std::io::Result<u16> {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
    }

    /// The environment torchrun gives rank `rank` of `world_size` processes on this host whose
    /// rank 0 listens on `127.0.0.1:port`, `run_id` telling the run from others: what
    /// [`Self::from_env`] reads, for starting ranks as processes (`cargo xtask launch`, the
    /// process tests and benchmark).
    pub fn local_launch_env(port: u16, rank: usize, world_size: usize, run_id: &str) -> Vec<(&'static str, String)> {
        vec![
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", port.to_string()),
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", world_size.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("LOCAL_WORLD_SIZE", world_size.to_string()),
            ("MOE_RUN_ID", run_id.to_string()),
        ]
    }

    fn validate(&self) -> Result<()> {
        let rule = |field: &'static str, value: usize, rule: String| {
            Err(MoeError::InvalidConfig {
                field,
                value: value.to_string(),
                rule,
            })
        };
        if self.world_size == 0 {
            return rule("world_size", 0, "at least 1".into());
        }
        if self.rank >= self.world_size {
            return rule("rank", self.rank, format!("below the world size, {}", self.world_size));
        }
        if self.local_world_size == 0 || self.local_rank >= self.local_world_size {
            return rule(
                "local_rank",
                self.local_rank,
                format!("below the local world size, {}", self.local_world_size),
            );
        }
        Ok(())
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A rank of a TCP rendezvous world (see the module docs).
#[derive(Debug)]
pub struct TcpControlPlane {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    role: Role,
    /// Each group's operations so far on this rank: the sequence number of the next.
    seqs: Mutex<HashMap<Vec<usize>, u64>>,
}

#[derive(Debug)]
enum Role {
    Hub(Arc<Hub>),
    Member(Arc<Member>),
}

impl TcpControlPlane {
    /// Joins the world `config` describes (collective: every rank of the world calls it);
    /// returns once every rank joined, or fails within the timeout saying why.
    pub fn connect(config: &TcpConfig) -> Result<Self> {
        config.validate()?;
        let role = if config.rank == 0 {
            Role::Hub(Hub::start(config)?)
        } else {
            Role::Member(Member::join(config)?)
        };
        Ok(TcpControlPlane {
            rank: config.rank,
            world_size: config.world_size,
            timeout: config.timeout,
            role,
            seqs: Mutex::new(HashMap::new()),
        })
    }

    fn next_seq(&self, group: &[usize]) -> u64 {
        let mut seqs = lock(&self.seqs);
        let seq = seqs.entry(group.to_vec()).or_insert(0);
        *seq += 1;
        *seq
    }
}

impl ControlPlane for TcpControlPlane {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn all_gather(&self, group: &[usize], op: &str, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        position_in(group, self.rank, self.world_size, op)?;
        let seq = self.next_seq(group);
        match &self.role {
            Role::Hub(hub) => hub.gather_here(group, op, seq, bytes),
            Role::Member(member) => member.gather(group, op, seq, bytes),
        }
    }
    fn abort(&self, reason: MoeError) {
        match &self.role {
            Role::Hub(hub) => hub.abort(&reason.to_string()),
            Role::Member(member) => member.abort(&reason.to_string()),
        }
    }
    fn aborted(&self) -> Option<MoeError> {
        let reason = match &self.role {
            Role::Hub(hub) => lock(&hub.state).aborted.clone(),
            Role::Member(member) => lock(&member.inbox).aborted.clone(),
        };
        reason.map(|r| failure(self.rank, format!("the world was aborted: {r}")))
    }
}

impl Drop for TcpControlPlane {
    fn drop(&mut self) {
        match &self.role {
            Role::Hub(hub) => hub.stop(),
            Role::Member(member) => member.leave(),
        }
    }
}

/// The error of rank `rank`'s control plane, for `detail`.
fn failure(rank: usize, detail: impl Into<String>) -> MoeError {
    MoeError::ControlPlane {
        rank,
        detail: detail.into(),
    }
}

fn ranks_u32(group: &[usize]) -> Vec<u32> {
    group.iter().map(|&r| r as u32).collect()
}

/// An operation: its group and its sequence number on that group.
type OpKey = (Vec<usize>, u64);

/// Rank 0: the listener during the bootstrap, then the hub of every group operation.
#[derive(Debug)]
struct Hub {
    timeout: Duration,
    /// The writing end of each member's connection (none for rank 0).
    members: Vec<Option<Mutex<TcpStream>>>,
    state: Mutex<HubState>,
    cv: Condvar,
    stopped: AtomicBool,
    /// Set by the first abort, which tells every member.
    aborting: AtomicBool,
}

#[derive(Debug, Default)]
struct HubState {
    /// Operations some member has contributed to, by group and sequence number.
    pending: HashMap<OpKey, Pending>,
    /// Rank 0's own finished operations, for its waiting call.
    done: HashMap<OpKey, Result<Vec<Vec<u8>>>>,
    aborted: Option<String>,
    /// Members that said goodbye.
    left: Vec<usize>,
}

#[derive(Debug)]
struct Pending {
    op: String,
    parts: Vec<Option<Vec<u8>>>,
    /// The first member whose operation's name differs from the first contribution's.
    mismatch: Option<usize>,
    since: Instant,
}

impl Hub {
    fn start(config: &TcpConfig) -> Result<Arc<Self>> {
        let me = 0;
        let addr = format!("{}:{}", config.master_addr, config.master_port);
        let listener =
            TcpListener::bind(&addr).map_err(|e| failure(me, format!("rank 0 cannot listen on {addr}: {e}")))?;
        let joined = accept_members(&listener, config)?;
        let mut members: Vec<Option<Mutex<TcpStream>>> = (0..config.world_size).map(|_| None).collect();
        let mut readers = Vec::new();
        for (rank, stream) in joined {
            readers.push((rank, stream.try_clone().map_err(|e| failure(me, e.to_string()))?));
            members[rank] = Some(Mutex::new(stream));
        }
        let hub = Arc::new(Hub {
            timeout: config.timeout,
            members,
            state: Mutex::new(HubState::default()),
            cv: Condvar::new(),
            stopped: AtomicBool::new(false),
            aborting: AtomicBool::new(false),
        });
        for m in hub.members.iter().flatten() {
            Frame::Welcome
                .write_to(&mut *lock(m))
                .map_err(|e| failure(me, format!("rank 0 could not welcome a member: {e}")))?;
        }
        for (rank, stream) in readers {
            let hub = hub.clone();
            std::thread::Builder::new()
                .name(format!("moe-control-hub-{rank}"))
                .spawn(move || hub.serve(rank, stream))
                .map_err(|e| failure(me, e.to_string()))?;
        }
        let sweeper = hub.clone();
        std::thread::Builder::new()
            .name("moe-control-sweep".into())
            .spawn(move || sweeper.sweep())
            .map_err(|e| failure(me, e.to_string()))?;
        Ok(hub)
    }

    /// Reads member `rank`'s frames until its connection closes.
    fn serve(&self, rank: usize, mut stream: TcpStream) {
        loop {
            match Frame::read_from(&mut stream) {
                Ok(Frame::Gather { group, op, seq, bytes }) => {
                    let group: Vec<usize> = group.iter().map(|&r| r as usize).collect();
                    self.contribute(rank, &group, &op, seq, bytes);
                }
                Ok(Frame::Abort { reason }) => self.abort(&reason),
                Ok(Frame::Bye) => {
                    lock(&self.state).left.push(rank);
                    self.cv.notify_all();
                    return;
                }
                Ok(other) => {
                    self.abort(&format!("rank {rank} sent an unexpected {other:?}"));
                    return;
                }
                Err(e) => {
                    if !self.stopped.load(Ordering::Relaxed) {
                        self.abort(&format!(
                            "rank {rank} closed its connection to rank 0 without leaving (its process exited or was killed: {e})"
                        ));
                    }
                    return;
                }
            }
        }
    }

    /// Records member `rank`'s contribution; answers every member once the group's are all in.
    fn contribute(&self, rank: usize, group: &[usize], op: &str, seq: u64, bytes: Vec<u8>) {
        let mut st = lock(&self.state);
        if let Some(reason) = &st.aborted {
            let reason = reason.clone();
            drop(st);
            self.send(rank, &Frame::Abort { reason });
            return;
        }
        let Some(at) = group.iter().position(|&r| r == rank) else {
            return;
        };
        let key = (group.to_vec(), seq);
        let pending = st.pending.entry(key.clone()).or_insert_with(|| Pending {
            op: op.to_string(),
            parts: vec![None; group.len()],
            mismatch: None,
            since: Instant::now(),
        });
        if pending.op != op && pending.mismatch.is_none() {
            pending.mismatch = Some(rank);
        }
        pending.parts[at] = Some(bytes);
        if pending.parts.iter().any(Option::is_none) {
            return;
        }
        let Some(pending) = st.pending.remove(&key) else {
            return;
        };
        drop(st);
        let verdict = match pending.mismatch {
            Some(peer) => Err(peer),
            None => Ok(pending.parts.into_iter().flatten().collect::<Vec<_>>()),
        };
        let g = ranks_u32(group);
        let frame = match &verdict {
            Ok(parts) => Frame::Gathered {
                group: g,
                seq,
                parts: parts.clone(),
            },
            Err(peer) => Frame::Mismatch {
                group: g,
                seq,
                peer: *peer as u32,
            },
        };
        // The members' answers go out before rank 0 learns the operation is over: rank 0 may
        // then leave, closing their connections.
        for &m in group.iter().filter(|&&m| m != 0) {
            self.send(m, &frame);
        }
        if group.contains(&0) {
            let here = verdict.map_err(|peer| MoeError::GroupOpMismatch {
                rank: 0,
                peer,
                op: op.to_string(),
            });
            lock(&self.state).done.insert(key, here);
            self.cv.notify_all();
        }
    }

    /// Fails every operation pending longer than the timeout, naming the missing members.
    fn sweep(&self) {
        while !self.stopped.load(Ordering::Relaxed) {
            std::thread::sleep(SWEEP_INTERVAL);
            let mut st = lock(&self.state);
            let expired: Vec<_> = st
                .pending
                .iter()
                .filter(|(_, p)| p.since.elapsed() >= self.timeout)
                .map(|(k, _)| k.clone())
                .collect();
            let (mut answers, mut here) = (Vec::new(), Vec::new());
            for key in expired {
                let Some(p) = st.pending.remove(&key) else {
                    continue;
                };
                let (group, seq) = key.clone();
                let missing: Vec<usize> = group
                    .iter()
                    .zip(&p.parts)
                    .filter(|(_, part)| part.is_none())
                    .map(|(&r, _)| r)
                    .collect();
                let came: Vec<usize> = group
                    .iter()
                    .zip(&p.parts)
                    .filter(|(_, part)| part.is_some())
                    .map(|(&r, _)| r)
                    .collect();
                if came.contains(&0) {
                    let timeout = MoeError::Timeout {
                        rank: 0,
                        op: p.op.clone(),
                        waited_for: missing.clone(),
                        timeout: self.timeout,
                    };
                    here.push((key, Err(timeout)));
                }
                let frame = Frame::TimedOut {
                    group: ranks_u32(&group),
                    seq,
                    missing: ranks_u32(&missing),
                };
                answers.extend(came.into_iter().filter(|&m| m != 0).map(|m| (m, frame.clone())));
            }
            drop(st);
            // As in `contribute`: the members first.
            for (m, frame) in answers {
                self.send(m, &frame);
            }
            if !here.is_empty() {
                lock(&self.state).done.extend(here);
                self.cv.notify_all();
            }
        }
    }

    fn send(&self, rank: usize, frame: &Frame) {
        if let Some(Some(m)) = self.members.get(rank) {
            // A member gone is noticed by its reader; nothing more to do here.
            let _ = frame.write_to(&mut *lock(m));
        }
    }

    /// Rank 0's own contribution to an operation, and its wait for the answer.
    fn gather_here(&self, group: &[usize], op: &str, seq: u64, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.contribute(0, group, op, seq, bytes);
        let key = (group.to_vec(), seq);
        let deadline = Instant::now() + self.timeout + VERDICT_GRACE;
        let mut st = lock(&self.state);
        loop {
            if let Some(reason) = &st.aborted {
                return Err(failure(0, format!("the world was aborted: {reason}")));
            }
            if let Some(done) = st.done.remove(&key) {
                return done;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MoeError::Timeout {
                    rank: 0,
                    op: op.to_string(),
                    waited_for: group.iter().copied().filter(|&r| r != 0).collect(),
                    timeout: self.timeout,
                });
            }
            st = self
                .cv
                .wait_timeout(st, (deadline - now).min(SWEEP_INTERVAL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn abort(&self, reason: &str) {
        if self.aborting.swap(true, Ordering::AcqRel) {
            return;
        }
        // The members first, as in `contribute`.
        for rank in 1..self.members.len() {
            self.send(
                rank,
                &Frame::Abort {
                    reason: reason.to_string(),
                },
            );
        }
        lock(&self.state).aborted = Some(reason.to_string());
        self.cv.notify_all();
    }

    /// Rank 0 hosts every group operation, its own or not: it stays until every member has
    /// left (or the world was aborted, or the timeout passed), so members still running
    /// operations among themselves are not cut off when rank 0 is done first.
    fn stop(&self) {
        let deadline = Instant::now() + self.timeout;
        let members = self.members.iter().flatten().count();
        let mut st = lock(&self.state);
        while st.left.len() < members && st.aborted.is_none() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(st);
        self.stopped.store(true, Ordering::Relaxed);
        for m in self.members.iter().flatten() {
            // The readers see their connections close and end.
            let _ = lock(m).shutdown(Shutdown::Both);
        }
    }
}

/// Accepts the world's other ranks, each with a valid hello, within the timeout; a bad hello
/// ends the bootstrap on every rank that joined.
fn accept_members(listener: &TcpListener, config: &TcpConfig) -> Result<Vec<(usize, TcpStream)>> {
    let deadline = Instant::now() + config.timeout;
    listener.set_nonblocking(true).map_err(|e| failure(0, e.to_string()))?;
    let mut joined: Vec<(usize, TcpStream)> = Vec::new();
    let refuse_all = |joined: &mut Vec<(usize, TcpStream)>, reason: &str| {
        for (_, s) in joined.iter_mut() {
            let _ = Frame::Refused {
                reason: reason.to_string(),
            }
            .write_to(s);
        }
        failure(0, reason.to_string())
    };
    while joined.len() + 1 < config.world_size {
        let now = Instant::now();
        if now >= deadline {
            let missing: Vec<usize> = (1..config.world_size)
                .filter(|r| !joined.iter().any(|(j, _)| j == r))
                .collect();
            let reason = format!(
                "rank(s) {missing:?} never connected to rank 0 at {}:{} within {:?}: start every rank with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE",
                config.master_addr, config.master_port, config.timeout
            );
            return Err(refuse_all(&mut joined, &reason));
        }
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => {
                return Err(refuse_all(
                    &mut joined,
                    &format!("rank 0 could not accept a connection: {e}"),
                ));
            }
        };
        let hello = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(HELLO_TIMEOUT.min(deadline - now))))
            .and_then(|()| Frame::read_from(&mut stream));
        let (version, world_size, run_id, rank) = match hello {
            Ok(Frame::Hello {
                magic: MAGIC,
                version,
                world_size,
                run_id,
                rank,
            }) => (version, world_size as usize, run_id, rank as usize),
            // A stranger's connection: not ours, and not a reason to stop.
            _ => continue,
        };
        let refusal = if version != VERSION {
            Some(format!(
                "rank {rank} speaks control-plane protocol version {version}, rank 0 speaks {VERSION}: run the same build on every rank"
            ))
        } else if world_size != config.world_size {
            Some(format!(
                "rank {rank} was started for a world of {world_size} ranks, rank 0 for {}: give every rank the same WORLD_SIZE",
                config.world_size
            ))
        } else if run_id != config.run_id {
            Some(format!(
                "rank {rank} belongs to another run (run id {run_id:#x}, rank 0's is {:#x}): give every rank of a run the same MOE_RUN_ID",
                config.run_id
            ))
        } else if rank == 0 || rank >= config.world_size {
            Some(format!(
                "a rank said it is rank {rank}, which is not a rank in 1..{} of this world",
                config.world_size
            ))
        } else if joined.iter().any(|(r, _)| *r == rank) {
            Some(format!(
                "two processes said they are rank {rank}: give every process its own RANK"
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            let _ = Frame::Refused { reason: reason.clone() }.write_to(&mut stream);
            return Err(refuse_all(&mut joined, &reason));
        }
        let _ = stream.set_read_timeout(None);
        let _ = stream.set_nodelay(true);
        joined.push((rank, stream));
    }
    Ok(joined)
}

/// A rank other than 0: its connection to the hub and the answers it received.
#[derive(Debug)]
struct Member {
    rank: usize,
    timeout: Duration,
    writer: Mutex<TcpStream>,
    inbox: Mutex<Inbox>,
    cv: Condvar,
    leaving: AtomicBool,
}

#[derive(Debug, Default)]
struct Inbox {
    answers: HashMap<OpKey, Result<Vec<Vec<u8>>>>,
    aborted: Option<String>,
}

impl Member {
    fn join(config: &TcpConfig) -> Result<Arc<Self>> {
        let me = config.rank;
        let deadline = Instant::now() + config.timeout;
        let addr = format!("{}:{}", config.master_addr, config.master_port);
        let mut stream = connect_until(&addr, deadline, me)?;
        Frame::Hello {
            magic: MAGIC,
            version: VERSION,
            world_size: config.world_size as u32,
            run_id: config.run_id,
            rank: me as u32,
        }
        .write_to(&mut stream)
        .map_err(|e| failure(me, format!("rank {me} could not greet rank 0 at {addr}: {e}")))?;
        // Rank 0 decides at its own deadline, and says why: its verdict needs the grace.
        let remaining = deadline.saturating_duration_since(Instant::now()) + VERDICT_GRACE;
        stream
            .set_read_timeout(Some(remaining))
            .map_err(|e| failure(me, e.to_string()))?;
        match Frame::read_from(&mut stream) {
            Ok(Frame::Welcome) => {}
            Ok(Frame::Refused { reason }) => return Err(failure(me, format!("rank 0 refused the world: {reason}"))),
            Ok(other) => return Err(failure(me, format!("rank 0 answered the hello with {other:?}"))),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(failure(
                    me,
                    format!(
                        "rank 0 at {addr} did not complete the world within {:?}: some rank never connected",
                        config.timeout
                    ),
                ));
            }
            Err(e) => {
                return Err(failure(
                    me,
                    format!("rank 0 at {addr} closed the connection during the bootstrap: {e}"),
                ));
            }
        }
        stream.set_read_timeout(None).map_err(|e| failure(me, e.to_string()))?;
        let reader = stream.try_clone().map_err(|e| failure(me, e.to_string()))?;
        let member = Arc::new(Member {
            rank: me,
            timeout: config.timeout,
            writer: Mutex::new(stream),
            inbox: Mutex::new(Inbox::default()),
            cv: Condvar::new(),
            leaving: AtomicBool::new(false),
        });
        let m = member.clone();
        std::thread::Builder::new()
            .name(format!("moe-control-{me}"))
            .spawn(move || m.receive(reader))
            .map_err(|e| failure(me, e.to_string()))?;
        Ok(member)
    }

    /// Reads the hub's frames until the connection closes.
    fn receive(&self, mut stream: TcpStream) {
        loop {
            let frame = match Frame::read_from(&mut stream) {
                Ok(frame) => frame,
                Err(e) => {
                    if !self.leaving.load(Ordering::Relaxed) {
                        self.aborted(&format!(
                            "rank 0 closed its connection (its process exited or was killed: {e})"
                        ));
                    }
                    return;
                }
            };
            let mut inbox = lock(&self.inbox);
            let group = |g: &[u32]| g.iter().map(|&r| r as usize).collect::<Vec<_>>();
            match frame {
                Frame::Gathered { group: g, seq, parts } => {
                    inbox.answers.insert((group(&g), seq), Ok(parts));
                }
                Frame::TimedOut { group: g, seq, missing } => {
                    let err = MoeError::Timeout {
                        rank: self.rank,
                        op: format!("group operation {seq} on {:?}", group(&g)),
                        waited_for: missing.iter().map(|&r| r as usize).collect(),
                        timeout: self.timeout,
                    };
                    inbox.answers.insert((group(&g), seq), Err(err));
                }
                Frame::Mismatch { group: g, seq, peer } => {
                    let err = MoeError::GroupOpMismatch {
                        rank: self.rank,
                        peer: peer as usize,
                        op: format!("group operation {seq} on {:?}", group(&g)),
                    };
                    inbox.answers.insert((group(&g), seq), Err(err));
                }
                Frame::Abort { reason } => {
                    inbox.aborted.get_or_insert(reason);
                }
                other => {
                    inbox
                        .aborted
                        .get_or_insert(format!("rank 0 sent an unexpected {other:?}"));
                }
            }
            self.cv.notify_all();
        }
    }

    fn gather(&self, group: &[usize], op: &str, seq: u64, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        if let Some(reason) = &lock(&self.inbox).aborted {
            return Err(failure(self.rank, format!("the world was aborted: {reason}")));
        }
        let frame = Frame::Gather {
            group: ranks_u32(group),
            op: op.to_string(),
            seq,
            bytes,
        };
        if let Err(e) = frame.write_to(&mut *lock(&self.writer)) {
            let reason = format!("rank {} lost its connection to rank 0: {e}", self.rank);
            self.aborted(&reason);
            return Err(failure(self.rank, reason));
        }
        let key = (group.to_vec(), seq);
        let deadline = Instant::now() + self.timeout + VERDICT_GRACE;
        let mut inbox = lock(&self.inbox);
        loop {
            if let Some(answer) = inbox.answers.remove(&key) {
                return answer.map_err(|e| match e {
                    MoeError::Timeout {
                        rank,
                        waited_for,
                        timeout,
                        ..
                    } => MoeError::Timeout {
                        rank,
                        op: op.to_string(),
                        waited_for,
                        timeout,
                    },
                    MoeError::GroupOpMismatch { rank, peer, .. } => MoeError::GroupOpMismatch {
                        rank,
                        peer,
                        op: op.to_string(),
                    },
                    other => other,
                });
            }
            if let Some(reason) = &inbox.aborted {
                return Err(failure(self.rank, format!("the world was aborted: {reason}")));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MoeError::Timeout {
                    rank: self.rank,
                    op: op.to_string(),
                    waited_for: group.iter().copied().filter(|&r| r != self.rank).collect(),
                    timeout: self.timeout,
                });
            }
            inbox = self
                .cv
                .wait_timeout(inbox, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn aborted(&self, reason: &str) {
        lock(&self.inbox).aborted.get_or_insert_with(|| reason.to_string());
        self.cv.notify_all();
    }

    fn abort(&self, reason: &str) {
        self.aborted(reason);
        let _ = Frame::Abort {
            reason: reason.to_string(),
        }
        .write_to(&mut *lock(&self.writer));
    }

    fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        let mut w = lock(&self.writer);
        let _ = Frame::Bye.write_to(&mut *w);
        let _ = w.shutdown(Shutdown::Both);
    }
}

/// Connects to `addr`, retrying while rank 0 is not listening yet, until `deadline`.
fn connect_until(addr: &str, deadline: Instant, me: usize) -> Result<TcpStream> {
    let mut last = String::from("no address");
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(failure(
                me,
                format!(
                    "rank {me} could not reach rank 0 at {addr}: {last}; check MASTER_ADDR and MASTER_PORT, and that rank 0 runs"
                ),
            ));
        }
        let addrs: Vec<SocketAddr> = match addr.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                last = e.to_string();
                Vec::new()
            }
        };
        for a in &addrs {
            match TcpStream::connect_timeout(a, (deadline - now).min(Duration::from_secs(1))) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => last = e.to_string(),
            }
        }
        std::thread::sleep(Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::conformance::{self, World};
    use super::*;

    /// A port nothing listens on now.
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    fn config(port: u16, rank: usize, world_size: usize, timeout: Duration) -> TcpConfig {
        TcpConfig {
            master_addr: "127.0.0.1".into(),
            master_port: port,
            rank,
            world_size,
            local_rank: rank,
            local_world_size: world_size,
            run_id: 7,
            timeout,
        }
    }

    /// Each rank connects from a thread of its own, as a process would.
    struct Tcp;

    impl World for Tcp {
        fn run<T: Send>(&self, ranks: usize, timeout: Duration, f: &(dyn Fn(&dyn ControlPlane) -> T + Sync)) -> Vec<T> {
            let port = free_port();
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..ranks)
                    .map(|r| {
                        s.spawn(move || {
                            let plane = TcpControlPlane::connect(&config(port, r, ranks, timeout)).expect("joins");
                            f(&plane)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
            })
        }
    }

    mod conformance_over_tcp {
        use super::Tcp;

        super::conformance::conformance_tests!(Tcp);
    }

    /// Joins `configs` from threads; each rank's result of `connect`.
    fn join_all(configs: Vec<TcpConfig>) -> Vec<Result<TcpControlPlane>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = configs
                .into_iter()
                .map(|c| s.spawn(move || TcpControlPlane::connect(&c)))
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        })
    }

    fn message(r: &Result<TcpControlPlane>) -> String {
        match r {
            Ok(_) => "joined".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rank_0_done_first_stays_until_the_members_have_left() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let planes = join_all((0..3).map(|r| config(port, r, 3, t)).collect());
        let mut planes: Vec<TcpControlPlane> = planes.into_iter().map(|p| p.expect("joins")).collect();
        let members = planes.split_off(1);
        let rank0 = planes.pop().expect("rank 0");
        std::thread::scope(|s| {
            // Rank 0 is done and drops its plane while ranks 1 and 2 still gather.
            let leaving = s.spawn(move || drop(rank0));
            std::thread::sleep(Duration::from_millis(100));
            let results: Vec<_> = members
                .into_iter()
                .map(|p| s.spawn(move || p.all_gather(&[1, 2], "after rank 0", vec![p.rank() as u8])))
                .collect();
            for r in results {
                assert_eq!(r.join().unwrap().expect("the hub still serves"), vec![vec![1], vec![2]]);
            }
            leaving.join().unwrap();
        });
    }

    #[test]
    fn a_rank_started_for_another_world_size_fails_the_bootstrap_on_every_rank() {
        let port = free_port();
        let t = Duration::from_secs(5);
        let mut other = config(port, 1, 3, t);
        other.local_world_size = 3;
        let out = join_all(vec![config(port, 0, 2, t), other]);
        for r in &out {
            let m = message(r);
            assert!(m.contains("world of 3 ranks, rank 0 for 2"), "{m}");
        }
    }

    #[test]
    fn a_rank_of_another_run_fails_the_bootstrap_on_every_rank() {
        let port = free_port();
        let t = Duration::from_secs(5);
        let mut stranger = config(port, 1, 2, t);
        stranger.run_id = 8;
        let out = join_all(vec![config(port, 0, 2, t), stranger]);
        for r in &out {
            let m = message(r);
            assert!(m.contains("another run"), "{m}");
        }
    }

    #[test]
    fn two_processes_of_the_same_rank_fail_the_bootstrap() {
        let port = free_port();
        let t = Duration::from_secs(5);
        let out = join_all(vec![
            config(port, 0, 3, t),
            config(port, 1, 3, t),
            config(port, 1, 3, t),
        ]);
        assert!(
            message(&out[0]).contains("two processes said they are rank 1"),
            "{}",
            message(&out[0])
        );
        for r in &out[1..] {
            let m = message(r);
            assert!(m.contains("rank 1"), "{m}");
        }
    }

    #[test]
    fn another_protocol_version_is_refused_with_the_versions() {
        let port = free_port();
        let t = Duration::from_secs(5);
        let out = std::thread::scope(|s| {
            let hub = s.spawn(move || TcpControlPlane::connect(&config(port, 0, 2, t)));
            let mut old = connect_until(&format!("127.0.0.1:{port}"), Instant::now() + t, 1).expect("reaches rank 0");
            Frame::Hello {
                magic: MAGIC,
                version: VERSION + 1,
                world_size: 2,
                run_id: 7,
                rank: 1,
            }
            .write_to(&mut old)
            .unwrap();
            let answer = Frame::read_from(&mut old).unwrap();
            (message(&hub.join().unwrap()), answer)
        });
        assert!(out.0.contains("protocol version"), "{}", out.0);
        assert!(
            matches!(&out.1, Frame::Refused { reason } if reason.contains("protocol version")),
            "{:?}",
            out.1
        );
    }

    #[test]
    fn a_strangers_connection_is_ignored_and_the_world_forms() {
        let port = free_port();
        let t = Duration::from_secs(10);
        let out = std::thread::scope(|s| {
            let ranks: Vec<_> = (0..2)
                .map(|r| {
                    s.spawn(move || {
                        if r == 1 {
                            // The stranger comes first.
                            std::thread::sleep(Duration::from_millis(300));
                        }
                        let plane = TcpControlPlane::connect(&config(port, r, 2, t))?;
                        plane.all_gather(&[0, 1], "after", vec![r as u8])
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(100));
            let mut stranger =
                connect_until(&format!("127.0.0.1:{port}"), Instant::now() + t, 9).expect("reaches rank 0");
            stranger.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            ranks.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        for r in out {
            assert_eq!(r.expect("the world formed"), vec![vec![0], vec![1]]);
        }
    }

    #[test]
    fn an_unreachable_rank_0_is_an_error_within_the_timeout() {
        let started = Instant::now();
        let e = TcpControlPlane::connect(&config(free_port(), 1, 2, Duration::from_millis(500))).unwrap_err();
        assert!(e.to_string().contains("could not reach rank 0"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_rank_that_never_connects_is_named_on_every_rank_that_did() {
        let port = free_port();
        let t = Duration::from_millis(800);
        let out = join_all(vec![config(port, 0, 3, t), config(port, 1, 3, t)]);
        for r in &out {
            let m = message(r);
            assert!(m.contains("rank(s) [2] never connected"), "{m}");
        }
    }

    /// A member whose connection closes without goodbye (its process was killed) aborts the
    /// world: a peer waiting on it fails at once, naming it.
    #[test]
    fn a_killed_rank_is_named_in_its_peers_errors_at_once() {
        let port = free_port();
        let t = Duration::from_secs(30);
        let out = std::thread::scope(|s| {
            let peers: Vec<_> = [0usize, 1]
                .into_iter()
                .map(|r| {
                    s.spawn(move || {
                        let plane = TcpControlPlane::connect(&config(port, r, 3, t))?;
                        let started = Instant::now();
                        let res = plane.all_gather(&[0, 1, 2], "waiting for rank 2", vec![]);
                        Ok::<_, MoeError>((res, started.elapsed()))
                    })
                })
                .collect();
            // Rank 2 joins by hand and then vanishes without a goodbye.
            let mut killed =
                connect_until(&format!("127.0.0.1:{port}"), Instant::now() + t, 2).expect("reaches rank 0");
            Frame::Hello {
                magic: MAGIC,
                version: VERSION,
                world_size: 3,
                run_id: 7,
                rank: 2,
            }
            .write_to(&mut killed)
            .unwrap();
            assert_eq!(Frame::read_from(&mut killed).unwrap(), Frame::Welcome);
            std::thread::sleep(Duration::from_millis(200));
            drop(killed);
            peers.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        for r in out {
            let (res, waited) = r.expect("joined");
            let e = res.expect_err("aborted").to_string();
            assert!(e.contains("rank 2 closed its connection"), "{e}");
            assert!(waited < Duration::from_secs(10), "noticed only after {waited:?}");
        }
    }

    #[test]
    fn the_environment_we_launch_ranks_with_configures_each_rank_of_one_run() {
        let config = |rank: usize, run: &str| {
            let env = TcpConfig::local_launch_env(29511, rank, 3, run);
            TcpConfig::from_vars(|name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())).unwrap()
        };
        let (a, c) = (config(0, "run-7"), config(2, "run-7"));
        assert_eq!(
            (
                c.master_addr.as_str(),
                c.master_port,
                c.rank,
                c.world_size,
                c.local_rank,
                c.local_world_size
            ),
            ("127.0.0.1", 29511, 2, 3, 2, 3)
        );
        assert!(a.run_id != 0 && a.run_id == c.run_id, "one run id for the run's ranks");
        assert_ne!(config(0, "run-8").run_id, a.run_id);
    }

    #[test]
    fn the_launchers_environment_configures_a_rank() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let c = TcpConfig::from_vars(vars(&[
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("RANK", "5"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("TORCHELASTIC_RUN_ID", "job-42"),
        ]))
        .unwrap();
        assert_eq!(
            (
                c.master_addr.as_str(),
                c.master_port,
                c.rank,
                c.world_size,
                c.local_rank,
                c.local_world_size
            ),
            ("10.0.0.1", 29500, 5, 16, 1, 4)
        );
        assert_ne!(c.run_id, 0);
        let missing =
            TcpConfig::from_vars(vars(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "1"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(missing.to_string().contains("`RANK` = unset"), "{missing}");
        let outside = TcpConfig::from_vars(vars(&[
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
        ]))
        .unwrap_err();
        assert!(outside.to_string().contains("below the world size"), "{outside}");
    }

    #[test]
    fn mpirun_and_srun_environments_configure_a_rank_too() {
        let place = |pairs: &[(&str, &str)]| {
            let mut all = vec![("MASTER_ADDR", "h"), ("MASTER_PORT", "29500")];
            all.extend_from_slice(pairs);
            let c = TcpConfig::from_vars(|name: &str| all.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
                .unwrap();
            (c.rank, c.world_size, c.local_rank, c.local_world_size, c.run_id != 0)
        };
        let open_mpi = [
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "3"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
            ("PMIX_NAMESPACE", "prterun-node-1234@1"),
        ];
        assert_eq!(place(&open_mpi), (3, 8, 3, 4, true));
        let mpich = [
            ("PMI_RANK", "1"),
            ("PMI_SIZE", "2"),
            ("MPI_LOCALRANKID", "1"),
            ("MPI_LOCALNRANKS", "2"),
        ];
        assert_eq!(place(&mpich), (1, 2, 1, 2, false));
        let slurm = [
            ("SLURM_PROCID", "6"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "2"),
            ("SLURM_NTASKS_PER_NODE", "4"),
            ("SLURM_JOB_ID", "991"),
            ("SLURM_STEP_ID", "0"),
        ];
        assert_eq!(place(&slurm), (6, 8, 2, 4, true));
        // torchrun's variables win where a wrapper sets them beside MPI's.
        let both = [
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ];
        assert_eq!(place(&both), (0, 2, 0, 2, false));
        // A launcher's rank without its world size names the variable.
        let e = TcpConfig::from_vars(|name: &str| match name {
            "MASTER_ADDR" => Some("h".into()),
            "MASTER_PORT" => Some("1".into()),
            "SLURM_PROCID" => Some("0".into()),
            _ => None,
        })
        .unwrap_err();
        assert!(e.to_string().contains("`SLURM_NTASKS` = unset"), "{e}");
    }
}
