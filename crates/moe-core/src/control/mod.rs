//! The control plane: what ranks do outside the data path (who they are, an all-gather of
//! bytes, a barrier, over any sub-group of the world, each bounded by a timeout, and an abort
//! that wakes every waiter with its reason), as one trait, [`ControlPlane`], with three kinds
//! of implementation:
//!
//! | implementation | ranks are | where |
//! |---|---|---|
//! | in-process | threads of one process ([`HostRank`](crate::host::HostRank)) | `crate::host` |
//! | TCP rendezvous | processes, on one host or several, launched by torchrun, mpirun, srun or [`TcpConfig::from_env`]'s environment | [`tcp`] |
//! | engine-supplied | whatever the engine's own communicator connects | the engine implements the trait |
//!
//! Group operations are collective: every member of `group` (world ranks in ascending order,
//! this rank among them) calls the same operation on the same group, the same number of times.

pub mod tcp;
mod wire;

use std::fmt::Debug;
use std::time::Duration;

use crate::error::{MoeError, Result};
use crate::host::HostRank;

pub use tcp::{TcpConfig, TcpControlPlane};

/// What ranks do outside the data path, whatever connects them.
pub trait ControlPlane: Send + Sync + Debug {
    /// This rank's index in the world.
    fn rank(&self) -> usize;
    /// Ranks in the world.
    fn world_size(&self) -> usize;
    /// The bound of every wait.
    fn timeout(&self) -> Duration;
    /// Gathers one byte string from every member of `group`, in group order; `op` names the
    /// operation in errors. Fails within the timeout naming the members that did not come, and
    /// with the reason once the world is aborted.
    fn all_gather(&self, group: &[usize], op: &str, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>>;
    /// Waits until every member of `group` arrives.
    fn barrier(&self, group: &[usize], op: &str) -> Result<()> {
        self.all_gather(group, op, Vec::new()).map(drop)
    }
    /// Aborts the world: every rank's pending and later operations fail with `reason`.
    fn abort(&self, reason: MoeError);
    /// Why the world was aborted, if it was (by any rank, or because one left without a word):
    /// the data path's waits poll it, so they end at once rather than at their timeout.
    fn aborted(&self) -> Option<MoeError> {
        None
    }
}

/// Fails unless `group` is a non-empty, ascending list of ranks of a world of `world_size`
/// ranks that holds `rank`, naming `op`; returns the rank's position in the group.
pub fn position_in(group: &[usize], rank: usize, world_size: usize, op: &str) -> Result<usize> {
    let ascending = group.windows(2).all(|w| w[0] < w[1]);
    match group.iter().position(|&r| r == rank) {
        Some(at) if ascending && group.iter().all(|&r| r < world_size) => Ok(at),
        _ => Err(MoeError::InvalidInput {
            op: "group operation",
            detail: format!(
                "{op}: rank {rank} called it on group {group:?}, which must list ranks of the world of {world_size} in ascending order, this rank among them"
            ),
        }),
    }
}

/// The in-process control plane: the ranks are threads of one host world.
impl ControlPlane for HostRank {
    fn rank(&self) -> usize {
        HostRank::rank(self)
    }
    fn world_size(&self) -> usize {
        HostRank::world_size(self)
    }
    fn timeout(&self) -> Duration {
        HostRank::timeout(self)
    }
    fn all_gather(&self, group: &[usize], op: &str, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        position_in(group, self.rank(), self.world_size(), op)?;
        let all = HostRank::all_gather(self, group, op, bytes)?;
        Ok(all.iter().map(|v| v.as_ref().clone()).collect())
    }
    fn barrier(&self, group: &[usize], op: &str) -> Result<()> {
        position_in(group, self.rank(), self.world_size(), op)?;
        HostRank::barrier(self, group, op)
    }
    fn abort(&self, reason: MoeError) {
        HostRank::abort(self, reason);
    }
    fn aborted(&self) -> Option<MoeError> {
        HostRank::aborted(self)
    }
}

/// The checks every control plane passes, written once: the TCP rendezvous, the in-process
/// world and the tests' engine-supplied plane run them.
#[cfg(test)]
pub(crate) mod conformance {
    use std::time::Instant;

    use super::*;

    /// Every rank's plane of a world of `ranks`, and a way to run `f` on every rank at once.
    pub trait World {
        fn run<T: Send>(&self, ranks: usize, timeout: Duration, f: &(dyn Fn(&dyn ControlPlane) -> T + Sync)) -> Vec<T>;
    }

    /// All-gathers over the world and over sub-groups deliver every member's bytes in group
    /// order, repeatedly, and a barrier passes.
    pub fn gathers_in_group_order(world: &impl World) {
        let out = world.run(4, Duration::from_secs(10), &|plane| {
            let r = plane.rank();
            let mut seen = Vec::new();
            for call in 0..3u8 {
                seen.push(plane.all_gather(&[0, 1, 2, 3], "world", vec![r as u8, call]).unwrap());
                let pair = if r.is_multiple_of(2) { [0, 2] } else { [1, 3] };
                seen.push(plane.all_gather(&pair, "pair", vec![r as u8; r + 1]).unwrap());
            }
            plane.barrier(&[0, 1, 2, 3], "end").unwrap();
            (r, seen)
        });
        for (r, seen) in out {
            for call in 0..3u8 {
                let world = &seen[2 * call as usize];
                assert_eq!(world, &(0..4u8).map(|m| vec![m, call]).collect::<Vec<_>>(), "rank {r}");
                let pair = if r.is_multiple_of(2) { [0usize, 2] } else { [1, 3] };
                let want: Vec<Vec<u8>> = pair.iter().map(|&m| vec![m as u8; m + 1]).collect();
                assert_eq!(&seen[2 * call as usize + 1], &want, "rank {r}");
            }
        }
    }

    /// A member that never comes is named in the others' error within about the timeout.
    pub fn a_missing_member_is_named_within_the_timeout(world: &impl World) {
        let out = world.run(3, Duration::from_millis(500), &|plane| {
            let started = Instant::now();
            let res = (plane.rank() != 2).then(|| plane.all_gather(&[0, 1, 2], "gather", vec![1]));
            (res, started.elapsed())
        });
        for (res, waited) in out.into_iter().take(2) {
            match res {
                Some(Err(MoeError::Timeout { waited_for, .. })) => assert_eq!(waited_for, [2]),
                other => panic!("expected a timeout naming rank 2, got {other:?}"),
            }
            assert!(waited < Duration::from_secs(5), "failed only after {waited:?}");
        }
    }

    /// An abort wakes a member waiting for another, with the reason, at once.
    pub fn an_abort_wakes_every_waiter_with_its_reason(world: &impl World) {
        let out = world.run(3, Duration::from_secs(30), &|plane| {
            let started = Instant::now();
            let res = match plane.rank() {
                0 => {
                    std::thread::sleep(Duration::from_millis(200));
                    plane.abort(MoeError::Device("the engine stopped".into()));
                    plane.all_gather(&[0, 1], "after the abort", vec![])
                }
                1 => plane.all_gather(&[0, 1], "waiting", vec![]),
                _ => Ok(Vec::new()),
            };
            (res, started.elapsed(), plane.aborted().map(|e| e.to_string()))
        });
        for (r, (res, waited, aborted)) in out.into_iter().take(2).enumerate() {
            let e = res.expect_err("aborted");
            assert!(e.to_string().contains("the engine stopped"), "rank {r}: {e}");
            assert!(waited < Duration::from_secs(10), "rank {r} woke only after {waited:?}");
            // What the data path's waits poll.
            assert!(
                aborted.as_deref().is_some_and(|a| a.contains("the engine stopped")),
                "rank {r}: aborted() is {aborted:?}"
            );
        }
    }

    /// Expands to one `#[test]` per check of this module for the world `$world`.
    macro_rules! conformance_tests {
        ($world:expr) => {
            #[test]
            fn gathers_in_group_order() {
                $crate::control::conformance::gathers_in_group_order(&$world);
            }

            #[test]
            fn names_a_missing_member_within_the_timeout() {
                $crate::control::conformance::a_missing_member_is_named_within_the_timeout(&$world);
            }

            #[test]
            fn abort_wakes_every_waiter_with_its_reason() {
                $crate::control::conformance::an_abort_wakes_every_waiter_with_its_reason(&$world);
            }

            #[test]
            fn refuses_a_malformed_group() {
                $crate::control::conformance::a_malformed_group_is_refused(&$world);
            }
        };
    }
    pub(crate) use conformance_tests;

    /// A group that does not hold the rank, or is not ascending, is refused.
    pub fn a_malformed_group_is_refused(world: &impl World) {
        let out = world.run(2, Duration::from_secs(5), &|plane| {
            let other = 1 - plane.rank();
            (
                plane.all_gather(&[other], "not a member", vec![]).is_err(),
                plane.all_gather(&[1, 0], "descending", vec![]).is_err(),
            )
        });
        assert!(out.iter().all(|&(a, b)| a && b), "{out:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::conformance::{self, World};
    use super::*;
    use crate::host::{HostWorldConfig, run_host_world};

    struct Threads;

    impl World for Threads {
        fn run<T: Send>(&self, ranks: usize, timeout: Duration, f: &(dyn Fn(&dyn ControlPlane) -> T + Sync)) -> Vec<T> {
            run_host_world(HostWorldConfig { ranks, timeout }, |rank| Ok(f(&rank)))
                .into_iter()
                .map(|r| r.expect("no rank panics"))
                .collect()
        }
    }

    mod in_process {
        use super::Threads;

        super::conformance::conformance_tests!(Threads);
    }

    /// An engine's own control plane: a board of contributions in memory, keyed by group and
    /// sequence number, as an engine would implement the trait over its communicator (neither
    /// the threads world nor TCP).
    mod engine_supplied {
        use std::collections::HashMap;
        use std::sync::{Arc, Condvar, Mutex};
        use std::time::Instant;

        use super::*;

        /// One contribution per member, as they come.
        type Slots = Vec<Option<Vec<u8>>>;

        /// Each operation's contributions so far (by group and sequence number), and the
        /// abort's reason.
        #[derive(Debug, Default)]
        struct Contributions {
            parts: HashMap<(Vec<usize>, u64), Slots>,
            aborted: Option<String>,
        }

        #[derive(Debug, Default)]
        struct Board {
            parts: Mutex<Contributions>,
            cv: Condvar,
        }

        #[derive(Debug)]
        struct EnginePlane {
            rank: usize,
            world_size: usize,
            timeout: Duration,
            board: Arc<Board>,
            seqs: Mutex<HashMap<Vec<usize>, u64>>,
        }

        impl ControlPlane for EnginePlane {
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
                let at = position_in(group, self.rank, self.world_size, op)?;
                let seq = {
                    let mut seqs = self.seqs.lock().unwrap();
                    let s = seqs.entry(group.to_vec()).or_insert(0);
                    *s += 1;
                    *s
                };
                let key = (group.to_vec(), seq);
                let deadline = Instant::now() + self.timeout;
                let mut board = self.board.parts.lock().unwrap();
                board
                    .parts
                    .entry(key.clone())
                    .or_insert_with(|| vec![None; group.len()])[at] = Some(bytes);
                self.board.cv.notify_all();
                loop {
                    if let Some(reason) = &board.aborted {
                        return Err(MoeError::ControlPlane {
                            rank: self.rank,
                            detail: reason.clone(),
                        });
                    }
                    let parts = &board.parts[&key];
                    if parts.iter().all(Option::is_some) {
                        return Ok(parts.iter().flatten().cloned().collect());
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        let waited_for = group
                            .iter()
                            .zip(parts)
                            .filter(|(_, p)| p.is_none())
                            .map(|(&r, _)| r)
                            .collect();
                        return Err(MoeError::Timeout {
                            rank: self.rank,
                            op: op.to_string(),
                            waited_for,
                            timeout: self.timeout,
                        });
                    }
                    board = self.board.cv.wait_timeout(board, deadline - now).unwrap().0;
                }
            }
            fn abort(&self, reason: MoeError) {
                self.board
                    .parts
                    .lock()
                    .unwrap()
                    .aborted
                    .get_or_insert(reason.to_string());
                self.board.cv.notify_all();
            }
            fn aborted(&self) -> Option<MoeError> {
                let board = self.board.parts.lock().unwrap();
                board.aborted.clone().map(MoeError::Device)
            }
        }

        struct Engine;

        impl World for Engine {
            fn run<T: Send>(
                &self,
                ranks: usize,
                timeout: Duration,
                f: &(dyn Fn(&dyn ControlPlane) -> T + Sync),
            ) -> Vec<T> {
                let board = Arc::new(Board::default());
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..ranks)
                        .map(|rank| {
                            let board = board.clone();
                            s.spawn(move || {
                                f(&EnginePlane {
                                    rank,
                                    world_size: ranks,
                                    timeout,
                                    board,
                                    seqs: Mutex::default(),
                                })
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
                })
            }
        }

        conformance::conformance_tests!(Engine);
    }
}
