//! What every GPU test binary of moe-kernels does around its trials: one trial at a time on the
//! shared GPU, each listed with the reason it is ignored where this machine cannot run it
//! (`probe::gpu_skip_reason`; `MOE_REQUIRE_GPU=1` makes that a failure), and the stand-in a
//! build without the `cuda` feature runs.

use libtest_mimic::{Arguments, Failed, Trial};
use moe_kernels::probe;

/// The trials of one test binary, each needing one GPU.
pub struct GpuTrials {
    skip: Option<String>,
    trials: Vec<Trial>,
}

impl GpuTrials {
    pub fn new() -> GpuTrials {
        GpuTrials {
            skip: probe::gpu_skip_reason(1),
            trials: Vec::new(),
        }
    }

    /// Adds trial `name`.
    pub fn add(&mut self, name: impl Into<String>, run: impl FnOnce() -> Result<(), Failed> + Send + 'static) {
        let trial = Trial::test(probe::trial_label(name.into(), self.skip.as_deref()), run);
        self.trials.push(trial.with_ignored_flag(self.skip.is_some()));
    }

    /// Runs the trials the command line selects, one at a time, and exits.
    pub fn run(self) -> ! {
        let mut args = Arguments::from_args();
        args.test_threads.get_or_insert(1);
        libtest_mimic::run(&args, self.trials).exit()
    }
}

/// The device of GPU 0, made once for all the binary's trials.
#[cfg(feature = "cuda")]
pub fn gpu() -> Result<std::sync::Arc<moe_kernels::device::CudaDevice>, Failed> {
    use std::sync::{Arc, OnceLock};

    use moe_kernels::device::CudaDevice;

    static GPU: OnceLock<Result<Arc<CudaDevice>, String>> = OnceLock::new();
    GPU.get_or_init(|| {
        probe::gpu_count()?;
        CudaDevice::new(0).map(Arc::new).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(Failed::from)
}

/// A library error as the trial's failure.
#[cfg(feature = "cuda")]
pub fn failed(e: impl ToString) -> Failed {
    e.to_string().into()
}

/// What a trial gives in a build without the `cuda` feature (never run: such a build has no
/// GPU, so every trial is ignored).
#[cfg(not(feature = "cuda"))]
pub fn no_gpu() -> Result<(), Failed> {
    Err(probe::gpu_count().expect_err("no GPU without the cuda feature").into())
}
