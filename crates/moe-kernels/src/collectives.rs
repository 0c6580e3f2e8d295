//! The layer runner's collectives on the CUDA platform: `moe_core::GpuRank` for
//! [`CudaWorldRank`], over one NCCL communicator per group (its id made by the group's first
//! member and shared through the control plane as bytes, so across processes and hosts too).
//! A group whose ranks share a GPU has none, since NCCL refuses that: its collectives fail
//! saying why, and the runner takes host tensors there.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use moe_core::host::HostRank;
use moe_core::{DType, GpuRank, Location, MoeError, Tensor};

use crate::buffer::DeviceBuffer;
use crate::error::KernelError;
use crate::nccl::{self, BroadcastPart, NcclComm, SumType};
use crate::tensor::device_tensor;
use crate::world::CudaWorldRank;

/// The groups whose collectives a rank joined, each with its NCCL communicator or why it has
/// none.
#[derive(Debug, Default)]
pub(crate) struct Groups(Mutex<HashMap<Vec<usize>, GroupCollectives>>);

/// A group's collectives on one rank.
#[derive(Debug)]
enum GroupCollectives {
    Nccl(NcclComm),
    /// Why the group has none (its ranks share a GPU).
    Unavailable(String),
}

impl Groups {
    fn lock(&self) -> MutexGuard<'_, HashMap<Vec<usize>, GroupCollectives>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl CudaWorldRank {
    /// Runs `collective` on the communicator of `group` (joined before), for `op`.
    fn on_group(
        &self,
        group: &[usize],
        op: &str,
        collective: impl FnOnce(&mut NcclComm) -> Result<(), KernelError>,
    ) -> moe_core::Result<()> {
        match self.groups().lock().get_mut(group) {
            Some(GroupCollectives::Nccl(comm)) => {
                collective(comm).map_err(|e| MoeError::Device(format!("{op} over ranks {group:?}: {e}")))
            }
            Some(GroupCollectives::Unavailable(why)) => Err(MoeError::Unsupported(format!("{op}: {why}"))),
            None => Err(MoeError::InvalidInput {
                op: "GpuRank collective",
                detail: format!(
                    "{op} over ranks {group:?}, which rank {} has not joined (GpuRank::join_group at construction)",
                    self.rank()
                ),
            }),
        }
    }

    /// The device address of `t`, checked to be on this rank's GPU.
    fn address_of(&self, op: &str, t: &Tensor) -> moe_core::Result<u64> {
        match (t.location(), t.device_region()) {
            (Location::Device(o), Some(region)) if o == self.gpu().ordinal() => Ok(region.address()),
            (at, _) => Err(MoeError::InvalidInput {
                op: "GpuRank collective",
                detail: format!(
                    "{op}: the tensor is in {at}, this rank's tensors are on GPU {}",
                    self.gpu().ordinal()
                ),
            }),
        }
    }
}

impl GpuRank for CudaWorldRank {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn ordinal(&self) -> usize {
        self.gpu().ordinal()
    }

    fn zeros(&self, dtype: DType, shape: &[usize]) -> moe_core::Result<Tensor> {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        let buffer = DeviceBuffer::zeroed(self.gpu(), bytes).map_err(|e| MoeError::Device(e.to_string()))?;
        device_tensor(&Arc::new(buffer), 0, dtype, shape)
    }

    /// Joins an NCCL communicator over `group`, its id made by the group's first member and
    /// shared through the control plane as bytes (so across processes and hosts too).
    fn join_group(&self, host: &HostRank, group: &[usize]) -> moe_core::Result<()> {
        let Some(me) = group.iter().position(|&r| r == self.rank()) else {
            return Err(MoeError::InvalidInput {
                op: "GpuRank::join_group",
                detail: format!("rank {} joins group {group:?}, which does not list it", self.rank()),
            });
        };
        if group.len() < 2 || self.groups().lock().contains_key(group) {
            return Ok(());
        }
        let joined = match self.world().ranks_sharing_a_gpu(group) {
            Some((a, b, gpu)) => GroupCollectives::Unavailable(format!(
                "ranks {a} and {b} of group {group:?} share GPU {gpu}, and NCCL needs a GPU per rank: place them on different GPUs, or pass host tensors (the runner then reduces them through the control plane)"
            )),
            None => {
                let id = nccl::share_id(host, group, &format!("runner NCCL id of ranks {group:?}"))?;
                let comm = NcclComm::new(self.gpu(), me, group.len(), &id, host.timeout())
                    .map_err(|e| MoeError::Device(format!("joining the NCCL communicator of ranks {group:?}: {e}")))?;
                GroupCollectives::Nccl(comm)
            }
        };
        self.groups().lock().insert(group.to_vec(), joined);
        Ok(())
    }

    fn collectives(&self, group: &[usize]) -> moe_core::Result<()> {
        if group.len() < 2 {
            return Ok(());
        }
        self.on_group(group, "the TP collectives", |_| Ok(()))
    }

    fn copy_to_device(&self, src: &Tensor, dst: &Tensor) -> moe_core::Result<()> {
        let at = self.address_of("copy to the GPU", dst)?;
        src.expect("copy_to_device", "src", dst.dtype(), dst.shape())?;
        // SAFETY: `dst` is on this GPU (checked) with room for `src`'s bytes (same dtype and
        // shape, checked); the copy is ordered on the rank's stream and waited for.
        unsafe { self.gpu().copy_to_device(at, src.bytes()) }.map_err(|e| MoeError::Device(e.to_string()))
    }

    fn all_reduce_sum(&self, group: &[usize], t: &Tensor) -> moe_core::Result<()> {
        if group.len() < 2 {
            return Ok(());
        }
        let at = self.address_of("all-reduce", t)?;
        let ty = match t.dtype() {
            DType::Bf16 => SumType::Bf16,
            DType::F16 => SumType::F16,
            DType::F32 => SumType::F32,
            other => {
                return Err(MoeError::InvalidInput {
                    op: "GpuRank::all_reduce_sum",
                    detail: format!("sums bf16, fp16 or f32 tensors, got {other:?}"),
                });
            }
        };
        // SAFETY: `t` is `t.len()` values on this GPU (checked), which the caller keeps until
        // its stream ran the collective, as every device tensor of a call.
        self.on_group(group, "all-reduce", |comm| unsafe {
            comm.all_reduce_sum(at, t.len(), ty)
        })
    }

    fn all_gather_rows(&self, group: &[usize], rows: &[Range<usize>], out: &Tensor) -> moe_core::Result<()> {
        if group.len() < 2 {
            return Ok(());
        }
        let at = self.address_of("all-gather", out)?;
        let n = out.shape().first().copied().unwrap_or(0);
        let row_bytes = out.row_len() * out.dtype().size();
        let covered = rows.len() == group.len()
            && rows.first().is_none_or(|r| r.start == 0)
            && rows.windows(2).all(|w| w[0].end == w[1].start)
            && rows.last().is_none_or(|r| r.end == n);
        if !covered {
            return Err(MoeError::InvalidInput {
                op: "GpuRank::all_gather_rows",
                detail: format!(
                    "row ranges {rows:?} for {} members do not cover the {n} rows of `out` in order",
                    group.len()
                ),
            });
        }
        let parts: Vec<BroadcastPart> = rows
            .iter()
            .enumerate()
            .map(|(root, r)| BroadcastPart {
                root,
                at: at + (r.start * row_bytes) as u64,
                bytes: r.len() * row_bytes,
            })
            .collect();
        // SAFETY: the parts tile `out` (checked), which is on this GPU (checked) and kept by the
        // caller until its stream ran the collectives.
        self.on_group(group, "all-gather", |comm| unsafe { comm.broadcasts(&parts) })
    }
}
