//! The CUDA platform: one GPU per rank in one process, peer access enabled at construction
//! wherever the driver offers it, and symmetric workspaces the ranks store into.
//!
//! A world builds whether or not its GPUs reach each other: it records which ordered pairs of
//! ranks have a peer-to-peer path ([`PeerMatrix`]), so backends that go through NCCL
//! (allgather-rs) run on any machine. The peer-memory protocols (nvlink-one-sided,
//! nvlink-two-sided) check at construction that every ordered pair of their group is reachable
//! ([`PeerMatrix::check_all_pairs`]) and otherwise fail naming the first missing pair.
//!
//! The workspaces are [`DeviceBuffer`]s: see [`crate::buffer`] for why they come from
//! `cuMemAlloc` and why they are allocated before any rank launches a kernel that waits on peers.

use std::sync::Arc;

use cudarc::driver::sys;
use moe_core::MoeError;

use crate::buffer::DeviceBuffer;
use crate::device::CudaDevice;
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

/// A GPU per rank (or ranks sharing GPUs: [`Self::on_devices`]), with peer access enabled between every ordered pair of GPUs the driver
/// offers it for ([`Self::peers`] says which), and how many SMs of each the communication
/// kernels take ([`CommSms`]: every SM unless [`CudaWorld::with_comm_sms`] says fewer).
#[derive(Debug)]
pub struct CudaWorld {
    gpus: Vec<Arc<CudaDevice>>,
    peers: PeerMatrix,
    comm_sms: CommSms,
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
                let mut can = 0;
                // SAFETY: plain query on two valid device handles into a local integer.
                unsafe { sys::cuDeviceCanAccessPeer(&mut can, a.context().cu_device(), b.context().cu_device()) }
                    .result()
                    .map_err(driver("cuDeviceCanAccessPeer"))?;
                if can == 0 {
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
        let ordinals = gpus.iter().map(|g| g.ordinal()).collect();
        Ok(CudaWorld {
            gpus,
            peers: PeerMatrix { ordinals, reachable },
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
    /// GPU (all of it unless other ranks of the world are on it too).
    pub fn comm_grid(&self, rank: usize) -> Result<CommGrid, KernelError> {
        let gpu = self.gpu(rank);
        let ranks_on_device = self.gpus.iter().filter(|g| g.ordinal() == gpu.ordinal()).count();
        self.comm_sms
            .resolve(gpu.ordinal(), gpu.sm_count()?, ranks_on_device as u32)
    }

    /// Number of ranks.
    pub fn ranks(&self) -> usize {
        self.gpus.len()
    }

    /// The GPU of `rank`.
    pub fn gpu(&self, rank: usize) -> &Arc<CudaDevice> {
        &self.gpus[rank]
    }

    /// Two ranks of `group` (world ranks) on the same GPU, if any.
    pub fn ranks_sharing_a_gpu(&self, group: &[usize]) -> Option<(usize, usize)> {
        group.iter().enumerate().find_map(|(i, &a)| {
            group[i + 1..]
                .iter()
                .find(|&&b| self.gpu(a).ordinal() == self.gpu(b).ordinal())
                .map(|&b| (a, b))
        })
    }

    /// Which ranks reach which others' memory.
    pub fn peers(&self) -> &PeerMatrix {
        &self.peers
    }

    /// A zeroed `bytes`-byte workspace on every rank; entry `r` lives on rank `r`'s GPU and is
    /// reachable from the ranks [`Self::peers`] says reach rank `r`.
    pub fn symmetric_alloc(&self, bytes: usize) -> Result<Vec<DeviceBuffer>, KernelError> {
        self.gpus.iter().map(|g| DeviceBuffer::zeroed(g, bytes)).collect()
    }
}

/// What a GPU rank's `moe_core::CudaRank` carries as its device handle: the world and this
/// rank's index in it. Backends downcast to it to find their GPU and their peers'.
#[derive(Clone, Debug)]
pub struct CudaWorldRank {
    pub world: Arc<CudaWorld>,
    pub rank: usize,
}

impl CudaWorldRank {
    /// The device handle of a GPU rank, for `backend`'s constructor.
    pub fn of<'a>(rank: &'a moe_core::CudaRank, backend: &str) -> moe_core::Result<&'a CudaWorldRank> {
        rank.device::<CudaWorldRank>().ok_or_else(|| {
            MoeError::Unsupported(format!(
                "{backend} on GPUs needs the rank's device handle to be moe_kernels::world::CudaWorldRank"
            ))
        })
    }

    /// This rank's GPU.
    pub fn gpu(&self) -> &Arc<CudaDevice> {
        self.world.gpu(self.rank)
    }

    /// The grid of this rank's communication kernels (see [`CudaWorld::with_comm_sms`]).
    pub fn comm_grid(&self) -> moe_core::Result<CommGrid> {
        self.world
            .comm_grid(self.rank)
            .map_err(|e| MoeError::Device(e.to_string()))
    }
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
