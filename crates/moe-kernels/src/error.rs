//! Errors of kernel compilation and the CUDA platform.

use std::time::Duration;

/// What can go wrong building or running kernels.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// The crate was built without the `cuda` feature.
    #[error("moe-kernels was built without the `cuda` feature; rebuild with `--features cuda` to use GPUs")]
    NotCompiledWithCuda,
    /// NVRTC could not be loaded.
    #[error(
        "libnvrtc.so.13 could not be loaded; install the CUDA 13.0 toolkit or `pip install nvidia-cuda-nvrtc==13.0.88` and add its lib folder to LD_LIBRARY_PATH"
    )]
    NvrtcUnavailable,
    /// NVRTC rejected a kernel: the module, the options and the compiler's log.
    #[error(
        "NVRTC failed to compile {module} ({nvrtc}) with options {options:?}:\n{}",
        indent(log)
    )]
    Compile {
        module: String,
        nvrtc: String,
        options: Vec<String>,
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {op}: {message}")]
    Driver { op: &'static str, message: String },
    /// An NCCL call failed.
    #[error("NCCL error in {op}: {message}")]
    Nccl { op: &'static str, message: String },
    /// Joining an NCCL communicator did not complete within the timeout: some member never
    /// joined. This rank aborted its half-built communicator.
    #[error(
        "rank {rank} of a {ranks}-rank NCCL communicator waited {timeout:?} for the other members to join, and not all of them did (a member whose thread fails before it joins, or that never constructs its layer, leaves the others waiting); this rank aborted its half-built communicator: construct the layer on every rank of the group at the same time, and look at the other ranks' errors for the one that failed first"
    )]
    NcclInitTimeout {
        rank: usize,
        ranks: usize,
        timeout: Duration,
    },
    /// NCCL was still carrying out a call on a nonblocking communicator (its launch, which
    /// connects the members at their first collectives) when the timeout ran out. This rank
    /// aborted its communicator.
    #[error(
        "{op} on rank {rank} of a {ranks}-rank NCCL communicator was still in progress after {timeout:?} (NCCL connects the members at their first collectives, which waits until every member makes the same call); this rank aborted its communicator: check that every rank of the group makes the same calls, then construct the layer again (on every rank of its group)"
    )]
    NcclTimeout {
        op: &'static str,
        rank: usize,
        ranks: usize,
        timeout: Duration,
    },
    /// A call on an NCCL communicator this rank aborted after one of its collectives timed out.
    #[error(
        "{op} on an NCCL communicator that was aborted after a collective on it did not complete within the timeout: an aborted communicator runs no more collectives, so construct the layer again (on every rank of its group)"
    )]
    NcclAborted { op: &'static str },
    /// A peer-memory protocol was asked of a group in which one rank cannot reach another's
    /// memory: the first such ordered pair.
    #[error(
        "rank {from_rank} (GPU {from_gpu}) cannot access the memory of rank {to_rank} (GPU {to_gpu}): the driver reports no peer-to-peer path (cuDeviceCanAccessPeer); nvlink-one-sided and nvlink-two-sided load and store peers' memory directly and need peer access between every ordered pair of ranks of their group, so use the allgather-rs backend (it goes through NCCL) on these GPUs, or a machine with NVLink or PCIe peer-to-peer between them"
    )]
    NoPeerAccess {
        from_rank: usize,
        from_gpu: usize,
        to_rank: usize,
        to_gpu: usize,
    },
    /// A [`crate::launch::CommSms`] setting a GPU cannot run.
    #[error(
        "communication kernels on GPU {device} ({device_sms} SMs{}) were set to use {asked}: {fix}",
        shared_sms(*device_sms, *ranks_on_device)
    )]
    CommSms {
        device: usize,
        device_sms: u32,
        ranks_on_device: u32,
        asked: String,
        fix: String,
    },
    /// Arguments outside what a kernel accepts.
    #[error("invalid kernel argument: {0}")]
    InvalidArgument(String),
}

fn indent(log: &str) -> String {
    log.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

/// How a GPU's SMs split among the ranks that share it, for [`KernelError::CommSms`]; nothing
/// for a GPU of one rank.
fn shared_sms(device_sms: u32, ranks_on_device: u32) -> String {
    if ranks_on_device > 1 {
        format!(
            ", {} for each of its {ranks_on_device} ranks",
            device_sms / ranks_on_device
        )
    } else {
        String::new()
    }
}

/// A kernel or driver error met while serving a contract call: `MoeError::Device` with the
/// kernel error's message. The one conversion every backend's `?` goes through.
#[cfg(feature = "cuda")]
impl From<KernelError> for moe_core::MoeError {
    fn from(e: KernelError) -> Self {
        moe_core::MoeError::Device(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compile_errors_show_the_module_options_and_the_indented_log() {
        let e = KernelError::Compile {
            module: "quant.cu[nvfp4 hidden=7168 in=bf16]".to_string(),
            nvrtc: "NVRTC_ERROR_COMPILATION".to_string(),
            options: vec!["--gpu-architecture=sm_90a".to_string()],
            log: "quant.cu(3): error: identifier \"x\" is undefined\n1 error detected".to_string(),
        };
        assert_eq!(
            e.to_string(),
            "NVRTC failed to compile quant.cu[nvfp4 hidden=7168 in=bf16] (NVRTC_ERROR_COMPILATION) with options [\"--gpu-architecture=sm_90a\"]:\n    quant.cu(3): error: identifier \"x\" is undefined\n    1 error detected"
        );
    }

    #[test]
    fn an_aborted_communicator_says_why_and_to_construct_again() {
        let e = KernelError::NcclAborted { op: "ncclAllGather" };
        assert_eq!(
            e.to_string(),
            "ncclAllGather on an NCCL communicator that was aborted after a collective on it did not complete within the timeout: an aborted communicator runs no more collectives, so construct the layer again (on every rank of its group)"
        );
    }

    #[test]
    fn a_join_that_timed_out_names_the_rank_and_says_what_to_do() {
        let e = KernelError::NcclInitTimeout {
            rank: 0,
            ranks: 2,
            timeout: Duration::from_secs(2),
        };
        assert_eq!(
            e.to_string(),
            "rank 0 of a 2-rank NCCL communicator waited 2s for the other members to join, and not all of them did (a member whose thread fails before it joins, or that never constructs its layer, leaves the others waiting); this rank aborted its half-built communicator: construct the layer on every rank of the group at the same time, and look at the other ranks' errors for the one that failed first"
        );
    }

    #[test]
    fn a_launch_that_timed_out_names_the_call_and_the_rank() {
        let e = KernelError::NcclTimeout {
            op: "ncclGroupEnd",
            rank: 1,
            ranks: 4,
            timeout: Duration::from_millis(300),
        };
        assert_eq!(
            e.to_string(),
            "ncclGroupEnd on rank 1 of a 4-rank NCCL communicator was still in progress after 300ms (NCCL connects the members at their first collectives, which waits until every member makes the same call); this rank aborted its communicator: check that every rank of the group makes the same calls, then construct the layer again (on every rank of its group)"
        );
    }

    #[test]
    fn no_peer_access_names_the_ordered_pair_and_points_to_allgather_rs() {
        let e = KernelError::NoPeerAccess {
            from_rank: 1,
            from_gpu: 3,
            to_rank: 0,
            to_gpu: 2,
        };
        assert_eq!(
            e.to_string(),
            "rank 1 (GPU 3) cannot access the memory of rank 0 (GPU 2): the driver reports no peer-to-peer path (cuDeviceCanAccessPeer); nvlink-one-sided and nvlink-two-sided load and store peers' memory directly and need peer access between every ordered pair of ranks of their group, so use the allgather-rs backend (it goes through NCCL) on these GPUs, or a machine with NVLink or PCIe peer-to-peer between them"
        );
    }
}
