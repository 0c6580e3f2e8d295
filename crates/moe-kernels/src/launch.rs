//! How many SMs (blocks) the communication kernels of the peer-memory backends take: a setting
//! of the deployment ([`CommSms`]), resolved against each GPU's SM count into a [`CommGrid`].
//! Pure arithmetic, tested without CUDA; the CUDA platform reads the SM counts and applies it.

use crate::error::KernelError;

/// Vectors of a token each combine thread of either protocol sums (`MOE_PULL_VECTORS` in
/// common.cuh): one work item of the combines.
pub const PULL_VECTORS: u64 = 2;

/// The combines' work items: one per (token, group of [`PULL_VECTORS`] vectors of 8 elements).
pub fn combine_items(tokens: i32, hidden: i32) -> u64 {
    tokens.max(1) as u64 * (hidden as u64 / 8).div_ceil(PULL_VECTORS)
}

/// How much of each GPU the communication kernels of nvlink-one-sided and nvlink-two-sided may
/// use: at most `sms` blocks per kernel, each of `threads_per_block` threads, so the engine can
/// leave SMs to compute it overlaps with communication. Set once per world
/// (`moe_kernels::world::CudaWorld::with_comm_sms`), which checks it against every GPU.
///
/// The default, [`CommSms::every_sm`], is every SM of the device with 1024 threads per block:
/// 132 x 1024 on H100/H200 SXM, 114 x 1024 on H100 PCIe. On 2x H200 at 4096 tokens one block of
/// 1024 threads per SM beat 8 blocks of 256 per SM for bf16 combine (181.9 vs 192.1 us) and
/// fp8-block128 dispatch (127.2 vs 136.2 us), within 4% elsewhere; docs/BENCHMARKS.md has the
/// sweeps over fewer SMs.
///
/// `threads_per_block` applies to the one-sided kernels (a kernel whose registers do not allow
/// that many threads gets fewer); the two-sided kernels have fixed block sizes and take the
/// block count only. allgather-rs runs on NCCL and is not affected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommSms {
    /// At most this many SMs; `None`: every SM of the device.
    sms: Option<u32>,
    threads_per_block: u32,
}

impl Default for CommSms {
    fn default() -> Self {
        Self::every_sm()
    }
}

impl CommSms {
    /// Threads per block unless set: one block fills an SM.
    pub const DEFAULT_THREADS_PER_BLOCK: u32 = 1024;

    /// Every SM of each device, 1024 threads per block (the default).
    pub const fn every_sm() -> Self {
        CommSms {
            sms: None,
            threads_per_block: Self::DEFAULT_THREADS_PER_BLOCK,
        }
    }

    /// At most `sms` SMs of each device (from 1 to the device's SM count), 1024 threads per
    /// block.
    pub const fn at_most(sms: u32) -> Self {
        CommSms {
            sms: Some(sms),
            threads_per_block: Self::DEFAULT_THREADS_PER_BLOCK,
        }
    }

    /// The same SMs with blocks of `threads` threads (a multiple of 32 from 32 to 1024).
    pub const fn with_threads_per_block(self, threads: u32) -> Self {
        CommSms {
            threads_per_block: threads,
            ..self
        }
    }

    /// The grid of one rank on GPU `device`, which has `device_sms` SMs and runs
    /// `ranks_on_device` ranks (more than one only where ranks share a GPU, as in tests on a
    /// machine with fewer GPUs than ranks): the ranks on a GPU split its SMs evenly, so their
    /// kernels, which wait for each other, all fit on it at once. Fails if that share cannot
    /// run the setting.
    pub fn resolve(&self, device: usize, device_sms: u32, ranks_on_device: u32) -> Result<CommGrid, KernelError> {
        let refuse = |asked: String, fix: String| KernelError::CommSms {
            device,
            device_sms,
            ranks_on_device,
            asked,
            fix,
        };
        let share = device_sms / ranks_on_device.max(1);
        if share == 0 {
            return Err(refuse(
                format!("{ranks_on_device} ranks"),
                "put at most one rank per SM on a GPU".to_string(),
            ));
        }
        let blocks = match self.sms {
            None => share,
            Some(0) => {
                return Err(refuse(
                    "0 SMs".to_string(),
                    format!("give them at least 1 SM (at most {share}), or CommSms::every_sm() for all of them"),
                ));
            }
            Some(n) if n > share => {
                return Err(refuse(
                    format!("{n} SMs"),
                    format!("give them at most {share}, or CommSms::every_sm() for all of them"),
                ));
            }
            Some(n) => n,
        };
        let t = self.threads_per_block;
        if t == 0 || t > 1024 || !t.is_multiple_of(32) {
            return Err(refuse(
                format!("{t} threads per block"),
                format!(
                    "use a multiple of 32 from 32 to 1024 (the default is {})",
                    Self::DEFAULT_THREADS_PER_BLOCK
                ),
            ));
        }
        Ok(CommGrid {
            blocks,
            threads_per_block: t,
        })
    }
}

/// A [`CommSms`] on one GPU: the most blocks a communication kernel uses, and their threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommGrid {
    /// At least 1, at most the device's SM count.
    pub blocks: u32,
    /// A multiple of 32 from 32 to 1024.
    pub threads_per_block: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_combine_item_is_a_token_s_group_of_two_vectors_and_no_tokens_still_launch_one_row() {
        // hidden 7168: 896 vectors of 8 elements, 448 groups of two.
        assert_eq!(combine_items(4096, 7168), 4096 * 448);
        // hidden 136: 17 vectors, the last group holds one.
        assert_eq!(combine_items(3, 136), 3 * 9);
        assert_eq!(combine_items(0, 7168), 448);
    }

    #[test]
    fn the_default_is_every_sm_of_the_device_with_1024_threads() {
        assert_eq!(CommSms::default(), CommSms::every_sm());
        for (sms, gpu) in [(132, "H100/H200 SXM"), (114, "H100 PCIe"), (148, "B200")] {
            assert_eq!(
                CommSms::default().resolve(0, sms, 1).unwrap(),
                CommGrid {
                    blocks: sms,
                    threads_per_block: 1024
                },
                "{gpu}"
            );
        }
    }

    #[test]
    fn a_limit_and_threads_within_the_device_are_kept() {
        let grid = CommSms::at_most(32)
            .with_threads_per_block(512)
            .resolve(0, 132, 1)
            .unwrap();
        assert_eq!(
            grid,
            CommGrid {
                blocks: 32,
                threads_per_block: 512
            }
        );
        assert_eq!(CommSms::at_most(114).resolve(0, 114, 1).unwrap().blocks, 114);
        assert_eq!(
            CommSms::at_most(1)
                .with_threads_per_block(32)
                .resolve(0, 114, 1)
                .unwrap()
                .blocks,
            1
        );
    }

    #[test]
    fn zero_sms_or_more_than_the_device_has_are_refused_with_the_fix() {
        assert_eq!(
            CommSms::at_most(0).resolve(1, 114, 1).unwrap_err().to_string(),
            "communication kernels on GPU 1 (114 SMs) were set to use 0 SMs: give them at least 1 SM (at most 114), or CommSms::every_sm() for all of them"
        );
        assert_eq!(
            CommSms::at_most(132).resolve(0, 114, 1).unwrap_err().to_string(),
            "communication kernels on GPU 0 (114 SMs) were set to use 132 SMs: give them at most 114, or CommSms::every_sm() for all of them"
        );
    }

    #[test]
    fn ranks_sharing_a_gpu_split_its_sms_evenly() {
        assert_eq!(CommSms::every_sm().resolve(0, 132, 2).unwrap().blocks, 66);
        assert_eq!(CommSms::every_sm().resolve(0, 132, 8).unwrap().blocks, 16);
        assert_eq!(CommSms::at_most(32).resolve(0, 132, 2).unwrap().blocks, 32);
        assert_eq!(
            CommSms::at_most(100).resolve(0, 132, 2).unwrap_err().to_string(),
            "communication kernels on GPU 0 (132 SMs, 66 for each of its 2 ranks) were set to use 100 SMs: give them at most 66, or CommSms::every_sm() for all of them"
        );
        assert_eq!(
            CommSms::every_sm().resolve(0, 2, 3).unwrap_err().to_string(),
            "communication kernels on GPU 0 (2 SMs, 0 for each of its 3 ranks) were set to use 3 ranks: put at most one rank per SM on a GPU"
        );
    }

    #[test]
    fn threads_not_a_multiple_of_32_from_32_to_1024_are_refused() {
        for threads in [0, 16, 100, 1056, 2048] {
            let e = CommSms::every_sm()
                .with_threads_per_block(threads)
                .resolve(0, 132, 1)
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "communication kernels on GPU 0 (132 SMs) were set to use {threads} threads per block: use a multiple of 32 from 32 to 1024 (the default is 1024)"
                )
            );
        }
    }
}
