//! Run-time compilation of the kernel sources with NVRTC.

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx, compile_ptx_with_opts};

use crate::error::KernelError;
use crate::source::Module;

/// Whether `libnvrtc` can be loaded on this machine.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by name; no NVRTC function is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles one module (and specialization) for `arch`.
pub fn compile(module: &Module, arch: &str) -> Result<Ptx, KernelError> {
    if !nvrtc_available() {
        return Err(KernelError::NvrtcUnavailable);
    }
    let options = module.nvrtc_options(arch);
    let opts = CompileOptions {
        options: options.clone(),
        name: Some(module.file().to_string()),
        ..Default::default()
    };
    compile_ptx_with_opts(module.source(), opts).map_err(|e| match e {
        CompileError::CompileError { nvrtc, log, .. } => KernelError::Compile {
            module: module.to_string(),
            nvrtc: format!("{nvrtc:?}"),
            options,
            log: log.to_string_lossy().into_owned(),
        },
        other => KernelError::Compile {
            module: module.to_string(),
            nvrtc: format!("{other:?}"),
            options,
            log: String::new(),
        },
    })
}
