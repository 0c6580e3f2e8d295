//! Run-time compilation of the kernel sources with NVRTC, and the process's PTX cache.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx, compile_ptx_with_opts};

use crate::cache::OnceMap;
use crate::error::KernelError;
use crate::source::Module;

/// PTX by module (and specialization) and architecture, each compiled by NVRTC once.
///
/// PTX depends only on the module's source and options and on the architecture, not on a
/// device or context, so one compilation serves every device of that architecture (and every
/// `CudaDevice` opened on them). [`PtxCache::global`] is the one every `CudaDevice` compiles through; entries
/// are kept for the life of the process (one per module, specialization and architecture in
/// use). Concurrent callers of one (module, arch) wait for one compilation;
/// different modules compile in parallel. A failed compilation is not kept: the caller gets
/// its error and the next caller compiles again.
pub struct PtxCache {
    ptx: OnceMap<(Module, String), Arc<Ptx>>,
    compilations: AtomicUsize,
}

impl PtxCache {
    /// An empty cache (the process's is [`PtxCache::global`]).
    pub fn new() -> Self {
        PtxCache {
            ptx: OnceMap::default(),
            compilations: AtomicUsize::new(0),
        }
    }

    /// The process-wide cache, which every `CudaDevice` compiles through.
    pub fn global() -> &'static PtxCache {
        static GLOBAL: LazyLock<PtxCache> = LazyLock::new(PtxCache::new);
        &GLOBAL
    }

    /// `module` compiled for `arch`: compiled on the first call for that pair, the same PTX
    /// afterwards.
    pub fn get(&self, module: &Module, arch: &str) -> Result<Arc<Ptx>, KernelError> {
        self.ptx.get_or_try_init((*module, arch.to_string()), || {
            self.compilations.fetch_add(1, Ordering::Relaxed);
            compile(module, arch).map(Arc::new)
        })
    }

    /// How many NVRTC compilations this cache has run, failed ones included.
    pub fn compilations(&self) -> usize {
        self.compilations.load(Ordering::Relaxed)
    }
}

impl Default for PtxCache {
    fn default() -> Self {
        PtxCache::new()
    }
}

impl fmt::Debug for PtxCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PtxCache")
            .field("compilations", &self.compilations())
            .finish_non_exhaustive()
    }
}

/// Whether `libnvrtc` can be loaded on this machine.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by name; no NVRTC function is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles one module (and specialization) for `arch`, every call (see [`PtxCache`] for
/// compiling once).
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
