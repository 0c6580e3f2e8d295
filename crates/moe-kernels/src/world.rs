//! The CUDA platform: ranks on GPUs, the peer-to-peer paths between them, and symmetric
//! workspaces the ranks store into. Two kinds of world:
//!
//! - **One process drives every rank** ([`CudaWorld::new`], [`CudaWorld::on_devices`],
//!   [`CudaWorld::with_streams`]): a GPU per rank (tests may let ranks share one), peer access
//!   enabled at construction wherever the driver offers it. A workspace is every rank's
//!   `cuMemAlloc` buffer, allocated by its group's first member.
//! - **One process per rank** ([`CudaWorld::across_processes`]): this process drives its own
//!   rank's GPU; every rank's GPU identity (host, UUID, ordinal) and its row of the peer matrix
//!   come through the control plane. A workspace is each rank's own allocation from the driver's
//!   virtual memory management, exported as a file descriptor, handed to the group's other
//!   processes over Unix-domain sockets (`moe_shm::exchange_descriptors`) and mapped there.
//!
//! A world builds whether or not its GPUs reach each other: it records which ordered pairs of
//! ranks have a peer-to-peer path ([`PeerMatrix`]), so backends that go through NCCL
//! (allgather-rs) run on any machine and across hosts. The peer-memory protocols
//! (nvlink-one-sided, nvlink-two-sided) check at construction that every ordered pair of their
//! group is reachable ([`PeerMatrix::check_all_pairs`]) and otherwise fail naming the first
//! missing pair (ranks on different hosts never are).
//!
//! The workspaces are [`DeviceBuffer`]s: see [`crate::buffer`] for why they never come from the
//! stream-ordered allocator and why they are allocated before any rank launches a kernel that
//! waits on peers.

use std::os::fd::AsFd;
use std::sync::Arc;

use cudarc::driver::sys;
use moe_core::MoeError;
use moe_core::control::ControlPlane;
use moe_core::host::HostRank;
use moe_shm::Host;

use crate::buffer::DeviceBuffer;
use crate::collectives::Groups;
use crate::device::{CudaDevice, uuid_of};
use crate::driver::driver;
use crate::error::KernelError;
use crate::launch::{CommGrid, CommSms};

/// Which ranks of a world reach which others' memory, as the driver reported at construction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerMatrix {
    /// The GPU ordinal of each rank.
    ordinals: Vec<usize>,
    /// `reachable[from][to]`: rank `from`'s kernels can load and store rank `to`'s device
    /// memory (peer access enabled, or `from == to`).
    reachable: Vec<Vec<bool>>,
}

impl PeerMatrix {
    /// Checks that every member of `group` (world ranks) reaches every other member's memory,
    /// as a peer-memory protocol over `group` needs; the error names the first ordered pair
    /// that does not, in group order.
    pub fn check_all_pairs(&self, group: &[usize]) -> Result<(), KernelError> {
        let ranks = self.ordinals.len();
        if let Some(&r) = group.iter().find(|&&r| r >= ranks) {
            return Err(KernelError::InvalidArgument(format!(
                "group {group:?} lists rank {r}, the world has ranks 0..{ranks}; pass world ranks"
            )));
        }
        for &from in group {
            if let Some(&to) = group.iter().find(|&&to| !self.reachable[from][to]) {
                return Err(KernelError::NoPeerAccess {
                    from_rank: from,
                    from_gpu: self.ordinals[from],
                    to_rank: to,
                    to_gpu: self.ordinals[to],
                });
            }
        }
        Ok(())
    }
}

/// The ranks of a world and their GPUs: every rank's GPU identity, the GPUs this process drives
/// (every rank's, or only its own rank's: see the module doc), which ordered pairs of ranks
/// reach each other's memory ([`Self::peers`]), and how many SMs of each GPU the communication
/// kernels take ([`CommSms`]: every SM unless [`CudaWorld::with_comm_sms`] says fewer).
#[derive(Debug)]
pub struct CudaWorld {
    members: Vec<RankGpu>,
    /// Entry `r`: rank `r`'s GPU when this process drives it.
    local: Vec<Option<Arc<CudaDevice>>>,
    peers: PeerMatrix,
    comm_sms: CommSms,
}

/// What a world knows of one rank's GPU, wherever the rank runs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RankGpu {
    host: Host,
    uuid: [u8; 16],
    /// The ordinal in the rank's own process, for messages.
    ordinal: usize,
}

const RANK_GPU_TAG: &[u8; 8] = b"moe-gpu1";

impl RankGpu {
    fn of(gpu: &CudaDevice, host: &Host) -> Result<RankGpu, KernelError> {
        Ok(RankGpu {
            host: host.clone(),
            uuid: gpu.uuid()?,
            ordinal: gpu.ordinal(),
        })
    }

    /// Whether both are the same GPU of the same host.
    fn same_gpu(&self, other: &RankGpu) -> bool {
        self.uuid == other.uuid && self.host.same(&other.host)
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = RANK_GPU_TAG.to_vec();
        b.extend_from_slice(&(self.ordinal as u32).to_le_bytes());
        b.extend_from_slice(&self.uuid);
        self.host.encode(&mut b);
        b
    }

    /// The identity in `bytes`, `None` unless they are exactly one.
    fn decode(bytes: &[u8]) -> Option<RankGpu> {
        let rest = bytes.strip_prefix(RANK_GPU_TAG.as_slice())?;
        let (ordinal, rest) = rest.split_first_chunk::<4>()?;
        let (uuid, rest) = rest.split_first_chunk::<16>()?;
        let (host, rest) = Host::decode(rest)?;
        rest.is_empty().then(|| RankGpu {
            host,
            uuid: *uuid,
            ordinal: u32::from_le_bytes(*ordinal) as usize,
        })
    }
}

impl CudaWorld {
    /// Ranks on devices `0..ranks`, each with a stream of its own; builds whether or not the
    /// GPUs reach each other (see [`Self::peers`]).
    pub fn new(ranks: usize) -> Result<Self, KernelError> {
        Self::on_devices(&(0..ranks).collect::<Vec<_>>())
    }

    /// Rank `r` on device `devices[r]`, each with a stream of its own. A device may hold
    /// several ranks (a protocol test on a machine with fewer GPUs than ranks): they reach each
    /// other's memory without peer access and split the GPU's SMs (see [`Self::comm_grid`]).
    pub fn on_devices(devices: &[usize]) -> Result<Self, KernelError> {
        let count = cudarc::driver::CudaContext::device_count().map_err(driver("cuDeviceGetCount"))? as usize;
        if let Some(missing) = devices.iter().find(|&&d| d >= count) {
            return Err(KernelError::InvalidArgument(format!(
                "a rank was placed on GPU {missing}, this machine has {count} (GPUs 0 to {})",
                count.saturating_sub(1)
            )));
        }
        let gpus: Vec<Arc<CudaDevice>> = devices
            .iter()
            .map(|&d| CudaDevice::new(d).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Self::connect(gpus)
    }

    /// Rank `r` on the device of `streams[r]`, ordering all its work on that stream (see
    /// [`CudaDevice::with_stream`]); builds whether or not the GPUs reach each other (see
    /// [`Self::peers`]).
    ///
    /// # Safety
    /// Every stream must be a valid handle that outlives the world and everything built on it.
    pub unsafe fn with_streams(streams: &[sys::CUstream]) -> Result<Self, KernelError> {
        let gpus: Vec<Arc<CudaDevice>> = streams
            .iter()
            .map(|&stream| {
                let mut device: sys::CUdevice = 0;
                // SAFETY: the caller guarantees the stream is live; the query writes a local.
                unsafe { sys::cuStreamGetDevice(stream, &mut device) }
                    .result()
                    .map_err(driver("cuStreamGetDevice"))?;
                // SAFETY: the caller guarantees each stream (this function's contract).
                unsafe { CudaDevice::with_stream(device as usize, stream) }.map(Arc::new)
            })
            .collect::<Result<_, _>>()?;
        Self::connect(gpus)
    }

    /// This process's rank of a world of one process per rank, on `gpu` (the device of the
    /// engine's stream, or `LOCAL_RANK`'s): every rank's GPU identity and its row of the peer
    /// matrix travel through `plane` (collective over the whole world, bounded by its
    /// timeout), so every rank ends with the same world. A rank reaches another's memory when
    /// both run on one host and either share the GPU or this process's driver offers a path
    /// between the two GPUs; where the other GPU is not visible here (`CUDA_VISIBLE_DEVICES`),
    /// the path is assumed, and mapping that rank's workspace fails naming this GPU if there
    /// is none.
    pub fn across_processes(plane: &dyn ControlPlane, gpu: Arc<CudaDevice>) -> moe_core::Result<Self> {
        let (me, ranks) = (plane.rank(), plane.world_size());
        let all: Vec<usize> = (0..ranks).collect();
        let device = |e: KernelError| MoeError::Device(format!("CUDA world, rank {me}: {e}"));
        let mine = RankGpu::of(&gpu, &Host::this()).map_err(device)?;
        let members = plane
            .all_gather(&all, "CUDA world: every rank's GPU", mine.encode())?
            .iter()
            .enumerate()
            .map(|(r, bytes)| {
                RankGpu::decode(bytes).ok_or_else(|| MoeError::ControlPlane {
                    rank: me,
                    detail: format!(
                        "CUDA world: rank {r} sent a malformed GPU record ({} bytes)",
                        bytes.len()
                    ),
                })
            })
            .collect::<moe_core::Result<Vec<_>>>()?;
        let row = members
            .iter()
            .map(|theirs| reaches(&gpu, &mine, theirs).map(u8::from))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(device)?;
        let rows = plane.all_gather(&all, "CUDA world: peer paths", row)?;
        let reachable = rows
            .iter()
            .enumerate()
            .map(|(r, row)| {
                if row.len() == ranks && row.iter().all(|&b| b <= 1) {
                    Ok(row.iter().map(|&b| b == 1).collect())
                } else {
                    Err(MoeError::ControlPlane {
                        rank: me,
                        detail: format!(
                            "CUDA world: rank {r} sent a malformed row of the peer matrix ({} bytes)",
                            row.len()
                        ),
                    })
                }
            })
            .collect::<moe_core::Result<Vec<Vec<bool>>>>()?;
        let mut local = vec![None; ranks];
        local[me] = Some(gpu);
        Ok(CudaWorld {
            peers: PeerMatrix {
                ordinals: members.iter().map(|m| m.ordinal).collect(),
                reachable,
            },
            members,
            local,
            comm_sms: CommSms::default(),
        })
    }

    /// Enables peer access for every ordered pair of GPUs the driver offers it for and records
    /// which pairs have it; a pair without a path is not an error here.
    fn connect(gpus: Vec<Arc<CudaDevice>>) -> Result<Self, KernelError> {
        let mut reachable = vec![vec![false; gpus.len()]; gpus.len()];
        for (from, a) in gpus.iter().enumerate() {
            for (to, b) in gpus.iter().enumerate() {
                if a.ordinal() == b.ordinal() {
                    reachable[from][to] = true;
                    continue;
                }
                if !can_access_peer(a, b.context().cu_device())? {
                    continue;
                }
                a.context().bind_to_thread().map_err(driver("bind context"))?;
                // SAFETY: both contexts are alive for the world's lifetime; enabling twice only
                // returns the "already enabled" status, which is accepted below.
                let r = unsafe { sys::cuCtxEnablePeerAccess(b.context().cu_ctx(), 0) };
                if r != sys::CUresult::CUDA_SUCCESS && r != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
                    return Err(KernelError::Driver {
                        op: "cuCtxEnablePeerAccess",
                        message: format!("{r:?} (GPU {} -> GPU {})", a.ordinal(), b.ordinal()),
                    });
                }
                reachable[from][to] = true;
            }
        }
        let host = Host::this();
        let members = gpus
            .iter()
            .map(|g| RankGpu::of(g, &host))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CudaWorld {
            peers: PeerMatrix {
                ordinals: members.iter().map(|m| m.ordinal).collect(),
                reachable,
            },
            members,
            local: gpus.into_iter().map(Some).collect(),
            comm_sms: CommSms::default(),
        })
    }

    /// The world with the communication kernels of the peer-memory backends (nvlink-one-sided,
    /// nvlink-two-sided) on at most `sms` of each GPU, so the engine can leave the others to
    /// compute it overlaps with communication. Every backend built on the world uses it;
    /// fails if a GPU of the world cannot run it (0 SMs, more than it has, threads per block not
    /// a multiple of 32 from 32 to 1024).
    pub fn with_comm_sms(mut self, sms: CommSms) -> Result<Self, KernelError> {
        self.comm_sms = sms;
        for rank in 0..self.ranks() {
            self.comm_grid(rank)?;
        }
        Ok(self)
    }

    /// The grid of `rank`'s communication kernels: the world's [`CommSms`] on its share of its
    /// GPU (all of it unless other ranks of the world are on it too, in this process or in
    /// others).
    pub fn comm_grid(&self, rank: usize) -> Result<CommGrid, KernelError> {
        let gpu = self.gpu(rank)?;
        let ranks_on_device = self.members.iter().filter(|m| m.same_gpu(&self.members[rank])).count();
        self.comm_sms
            .resolve(gpu.ordinal(), gpu.sm_count()?, ranks_on_device as u32)
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.members.len()
    }

    /// The GPU of `rank`, when this process drives it.
    pub fn gpu(&self, rank: usize) -> Result<&Arc<CudaDevice>, KernelError> {
        self.local.get(rank).and_then(Option::as_ref).ok_or_else(|| {
            let here: Vec<usize> = (0..self.ranks()).filter(|&r| self.local[r].is_some()).collect();
            KernelError::InvalidArgument(format!(
                "rank {rank}'s GPU is not driven by this process, which drives rank(s) {here:?} of a world of {}",
                self.ranks()
            ))
        })
    }

    /// Two ranks of `group` (world ranks) on the same GPU, if any, and that GPU's ordinal in
    /// the first one's process.
    pub fn ranks_sharing_a_gpu(&self, group: &[usize]) -> Option<(usize, usize, usize)> {
        let gpu = |r: usize| self.members.get(r);
        group.iter().enumerate().find_map(|(i, &a)| {
            let x = gpu(a)?;
            group[i + 1..]
                .iter()
                .find(|&&b| gpu(b).is_some_and(|y| x.same_gpu(y)))
                .map(|&b| (a, b, x.ordinal))
        })
    }

    /// Which ranks reach which others' memory.
    pub fn peers(&self) -> &PeerMatrix {
        &self.peers
    }

    /// A zeroed `bytes`-byte workspace on every rank, for a world whose ranks this process all
    /// drives; entry `r` lives on rank `r`'s GPU and is reachable from the ranks
    /// [`Self::peers`] says reach rank `r`.
    pub fn symmetric_alloc(&self, bytes: usize) -> Result<Vec<DeviceBuffer>, KernelError> {
        (0..self.ranks())
            .map(|r| DeviceBuffer::zeroed(self.gpu(r)?, bytes))
            .collect()
    }
}

/// Whether `gpu`'s rank reaches the memory of the rank on `theirs` (see
/// [`CudaWorld::across_processes`]).
fn reaches(gpu: &CudaDevice, mine: &RankGpu, theirs: &RankGpu) -> Result<bool, KernelError> {
    if !mine.host.same(&theirs.host) {
        return Ok(false);
    }
    if mine.uuid == theirs.uuid {
        return Ok(true);
    }
    let count = cudarc::driver::CudaContext::device_count().map_err(driver("cuDeviceGetCount"))?;
    for ordinal in 0..count {
        let mut device: sys::CUdevice = 0;
        // SAFETY: a query for an ordinal below the device count into a local.
        unsafe { sys::cuDeviceGet(&mut device, ordinal) }
            .result()
            .map_err(driver("cuDeviceGet"))?;
        if uuid_of(device)? == theirs.uuid {
            return can_access_peer(gpu, device);
        }
    }
    Ok(true)
}

/// Whether `gpu`'s device can access the memory of `device`, as the driver says.
fn can_access_peer(gpu: &CudaDevice, device: sys::CUdevice) -> Result<bool, KernelError> {
    let mut can = 0;
    // SAFETY: plain query on two valid device handles into a local integer.
    unsafe { sys::cuDeviceCanAccessPeer(&mut can, gpu.context().cu_device(), device) }
        .result()
        .map_err(driver("cuDeviceCanAccessPeer"))?;
    Ok(can != 0)
}

/// What a GPU rank's `moe_core::CudaRank` carries as its device handle: the world and this
/// rank's index in it, a rank this process drives. Backends downcast to it to find their GPU
/// and their peers'.
#[derive(Clone, Debug)]
pub struct CudaWorldRank {
    world: Arc<CudaWorld>,
    rank: usize,
    gpu: Arc<CudaDevice>,
    /// The layer runner's collectives, per group (see [`crate::collectives`]).
    groups: Arc<Groups>,
}

impl CudaWorldRank {
    /// Rank `rank` of `world`, which this process must drive.
    pub fn new(world: Arc<CudaWorld>, rank: usize) -> Result<Self, KernelError> {
        let gpu = world.gpu(rank)?.clone();
        Ok(CudaWorldRank {
            world,
            rank,
            gpu,
            groups: Arc::default(),
        })
    }

    /// This process's rank of a world of one process per rank (see
    /// [`CudaWorld::across_processes`]), on GPU `ordinal` with a stream of its own; `host` is
    /// the rank's control plane. Collective over the whole world.
    pub fn join(host: &HostRank, ordinal: usize) -> moe_core::Result<CudaWorldRank> {
        let me = host.rank();
        let gpu = CudaDevice::new(ordinal)
            .map(Arc::new)
            .map_err(|e| MoeError::Device(format!("rank {me} on GPU {ordinal}: {e}")))?;
        let world = Arc::new(CudaWorld::across_processes(host, gpu)?);
        CudaWorldRank::new(world, me).map_err(|e| MoeError::Device(e.to_string()))
    }

    /// The device handle of a GPU rank, for `backend`'s constructor.
    pub fn of<'a>(rank: &'a moe_core::CudaRank, backend: &str) -> moe_core::Result<&'a CudaWorldRank> {
        rank.device::<CudaWorldRank>().ok_or_else(|| {
            MoeError::Unsupported(format!(
                "{backend} on GPUs needs the rank's device handle to be moe_kernels::world::CudaWorldRank"
            ))
        })
    }

    /// The world.
    pub fn world(&self) -> &Arc<CudaWorld> {
        &self.world
    }

    /// This rank's index in the world.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// This rank's GPU.
    pub fn gpu(&self) -> &Arc<CudaDevice> {
        &self.gpu
    }

    /// The groups whose collectives this rank joined.
    pub(crate) fn groups(&self) -> &Groups {
        &self.groups
    }

    /// The grid of this rank's communication kernels (see [`CudaWorld::with_comm_sms`]).
    pub fn comm_grid(&self) -> moe_core::Result<CommGrid> {
        self.world
            .comm_grid(self.rank)
            .map_err(|e| MoeError::Device(e.to_string()))
    }

    /// A zeroed `bytes`-byte workspace on the GPU of every member of `group` (world ranks, in
    /// group order), entry `r` reachable from this rank at its address. Collective over
    /// `group` through `host`, this rank's control plane: every member calls it, with the same
    /// sizes. When this process drives every member, the group's first member allocates them
    /// all (`cuMemAlloc`); otherwise each member allocates its own as shareable memory and maps
    /// the others' (see the module doc). A member whose allocation fails fails every member,
    /// named, before any waits for its memory.
    pub fn symmetric_workspace(
        &self,
        host: &HostRank,
        group: &[usize],
        op: &str,
        bytes: usize,
    ) -> moe_core::Result<Arc<Vec<DeviceBuffer>>> {
        if group.iter().all(|&r| self.world.gpu(r).is_ok()) {
            return host.share_from_first(group, op, || {
                group
                    .iter()
                    .map(|&r| DeviceBuffer::zeroed(self.world.gpu(r)?, bytes))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Arc::new)
                    .map_err(|e| format!("allocating: {e}"))
            });
        }
        let own = DeviceBuffer::exportable(&self.gpu, bytes).map_err(|e| e.to_string());
        let (own, fd) = agreed(host, group, op, "allocate its workspace", own)?;
        let theirs = moe_shm::exchange_descriptors(host, group, op, fd.as_fd(), bytes as u64)?;
        let mut own = Some(own);
        let mapped = group
            .iter()
            .zip(theirs)
            .map(|(&member, fd)| match fd {
                None => own
                    .take()
                    .ok_or_else(|| format!("rank {member} is listed twice in {group:?}")),
                Some(fd) => {
                    DeviceBuffer::import(&self.gpu, fd.as_fd(), bytes).map_err(|e| format!("rank {member}'s: {e}"))
                }
            })
            .collect::<Result<Vec<_>, String>>();
        agreed(host, group, op, "map every member's workspace", mapped).map(Arc::new)
    }
}

/// `step`'s result on this rank, once every member of `group` knows whether every member's
/// step succeeded (collective, through `host`): a member that failed fails every member alike,
/// named with its reason, so no member goes on to wait for it.
fn agreed<T>(host: &HostRank, group: &[usize], op: &str, step: &str, result: Result<T, String>) -> moe_core::Result<T> {
    let status = result.as_ref().err().map_or_else(Vec::new, |e| e.clone().into_bytes());
    let statuses = host.all_gather(group, op, status)?;
    if let Some((member, why)) = group.iter().zip(&statuses).find(|(_, s)| !s.is_empty()) {
        return Err(MoeError::Device(format!(
            "{op}: rank {member} could not {step}: {}",
            String::from_utf8_lossy(why)
        )));
    }
    result.map_err(|e| MoeError::Device(format!("{op}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranks on GPUs `ordinals`, every ordered pair reachable but those in `missing`.
    fn matrix(ordinals: &[usize], missing: &[(usize, usize)]) -> PeerMatrix {
        let n = ordinals.len();
        PeerMatrix {
            ordinals: ordinals.to_vec(),
            reachable: (0..n)
                .map(|from| (0..n).map(|to| !missing.contains(&(from, to))).collect())
                .collect(),
        }
    }

    #[test]
    fn a_gpu_record_round_trips_and_every_truncation_or_extension_is_refused() {
        let record = RankGpu {
            host: Host::this(),
            uuid: [7; 16],
            ordinal: 3,
        };
        let bytes = record.encode();
        assert_eq!(RankGpu::decode(&bytes), Some(record.clone()));
        for cut in 0..bytes.len() {
            assert_eq!(RankGpu::decode(&bytes[..cut]), None, "truncated at {cut}");
        }
        assert_eq!(RankGpu::decode(&[bytes.clone(), vec![0]].concat()), None);
        let mut other = bytes;
        other[..8].copy_from_slice(b"moe-shm2");
        assert_eq!(RankGpu::decode(&other), None, "another record's tag");
        let shared = RankGpu {
            ordinal: 0,
            ..record.clone()
        };
        assert!(record.same_gpu(&shared), "the ordinal is the process's, not the GPU's");
        assert!(!record.same_gpu(&RankGpu {
            uuid: [8; 16],
            ..record.clone()
        }));
    }

    #[test]
    fn a_member_whose_step_failed_fails_every_member_naming_it() {
        use moe_core::host::{HostWorldConfig, run_host_world};
        let results = run_host_world(HostWorldConfig::new(3), |host| {
            let r = host.rank();
            let step = if r == 1 {
                Err("out of memory".to_string())
            } else {
                Ok(r)
            };
            let failed = agreed(&host, &[0, 1, 2], "ws", "allocate", step).map_err(|e| e.to_string());
            let all_ok = agreed(&host, &[0, 1, 2], "ws", "allocate", Ok(r))?;
            Ok((failed, all_ok))
        });
        for (r, result) in results.into_iter().enumerate() {
            let (failed, all_ok) = result.unwrap();
            assert_eq!(
                failed.unwrap_err(),
                "GPU error: ws: rank 1 could not allocate: out of memory",
                "rank {r}"
            );
            assert_eq!(all_ok, r);
        }
    }

    #[test]
    fn a_group_whose_pairs_all_reach_each_other_passes() {
        let peers = matrix(&[0, 1, 2, 3], &[]);
        assert!(peers.check_all_pairs(&[0, 1, 2, 3]).is_ok());
        assert!(peers.check_all_pairs(&[2]).is_ok());
    }

    #[test]
    fn one_missing_direction_names_that_ordered_pair_and_points_to_allgather_rs() {
        // Rank 2 cannot reach rank 1; rank 1 reaches rank 2.
        let peers = matrix(&[4, 5, 6, 7], &[(2, 1)]);
        let e = peers.check_all_pairs(&[0, 1, 2, 3]).unwrap_err();
        assert!(
            matches!(
                e,
                KernelError::NoPeerAccess {
                    from_rank: 2,
                    from_gpu: 6,
                    to_rank: 1,
                    to_gpu: 5
                }
            ),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.starts_with("rank 2 (GPU 6) cannot access the memory of rank 1 (GPU 5)"),
            "{text}"
        );
        assert!(text.contains("use the allgather-rs backend"), "{text}");
    }

    #[test]
    fn the_first_missing_pair_in_group_order_is_named_and_other_groups_are_unaffected() {
        let peers = matrix(&[0, 1, 2, 3], &[(3, 0), (1, 3)]);
        let first = |group: &[usize]| match peers.check_all_pairs(group) {
            Err(KernelError::NoPeerAccess { from_rank, to_rank, .. }) => Some((from_rank, to_rank)),
            Err(e) => panic!("{e}"),
            Ok(()) => None,
        };
        assert_eq!(first(&[0, 1, 2, 3]), Some((1, 3)));
        assert_eq!(first(&[3, 2, 1, 0]), Some((3, 0)));
        assert_eq!(first(&[0, 1, 2]), None, "the pairs without a path involve rank 3");
    }

    #[test]
    fn a_group_rank_outside_the_world_is_an_invalid_argument() {
        let e = matrix(&[0, 1], &[]).check_all_pairs(&[0, 2]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid kernel argument: group [0, 2] lists rank 2, the world has ranks 0..2; pass world ranks"
        );
    }
}
