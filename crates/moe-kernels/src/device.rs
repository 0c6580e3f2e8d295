//! One GPU: its context and stream, the kernels compiled for it (cached per specialization),
//! and launchers for the quantization kernels.
//!
//! # Kernel caches
//!
//! Every kernel module (a source file and its specialization, [`Module`]) is compiled by NVRTC
//! once per process and architecture, and loaded once per process and device, however many
//! `CudaDevice`s (worlds, engines rebuilding their world, test harnesses) are opened on that device:
//!
//! | what | keyed by | where | shared by |
//! |---|---|---|---|
//! | PTX (NVRTC's output) | module, architecture | [`PtxCache::global`] | every device of the architecture |
//! | the loaded `CudaModule` | device ordinal, module | `LOADED`, in this file | every `CudaDevice` of the device |
//! | a kernel's `CudaFunction` and its most threads per block | module, kernel name | each `CudaDevice` | that `CudaDevice`'s launches |
//!
//! A loaded module belongs to a CUDA context. `CudaDevice::new` and `CudaDevice::with_stream` both use the
//! device's primary context (cudarc's `CudaContext::new` retains it with
//! `cuDevicePrimaryCtxRetain`, and `with_stream` refuses a stream of any other context), so every
//! `CudaDevice` of a device runs in the same context and can launch modules another `CudaDevice` loaded. The
//! cache loads each module through a `CudaContext` of its own (a retain of the same primary
//! context, checked to be the loading `CudaDevice`'s): the primary context stays retained, and the
//! module valid, after every `CudaDevice` is dropped, and no `CudaDevice`'s context handle (with the errors
//! cudarc records on it) is shared with another `CudaDevice`. The caches are never emptied: modules
//! stay loaded until the process exits (a `cudaDeviceReset` / `cuDevicePrimaryCtxReset` in the
//! process would invalidate them, as it does every stream and allocation of the context).
//!
//! Both process-wide caches build each key once: the first caller compiles (or loads) while
//! holding that key's slot, later and concurrent callers of the key wait for it and share the
//! result, and other keys proceed in parallel, so ranks (threads, each with its own `CudaDevice`)
//! loading at once neither compile a module twice nor wait for each other's devices (see
//! `crate::cache`). A launch takes neither: it finds its function and thread limit in its
//! `CudaDevice`'s own table, filled on the kernel's first use.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    DriverError, LaunchConfig, PushKernelArg, sys,
};
use cudarc::nvrtc::Ptx;
use moe_core::{InputDtype, LayerConfig, MoeError};
use moe_quant::QuantParams;

use crate::cache::OnceMap;
use crate::driver::{count_driver_allocations, driver};
use crate::error::KernelError;
use crate::nvrtc::PtxCache;
use crate::source::{Module, QUANTIZE_TOKENS, QuantSpec, arch_for};

/// Modules loaded in each device's primary context, by device ordinal and module, for the
/// whole process (see the module doc).
static LOADED: LazyLock<OnceMap<(usize, Module), Arc<CudaModule>>> = LazyLock::new(OnceMap::default);

impl QuantSpec {
    /// The quantization specialization of a layer's wire scheme.
    pub fn of_layer(layer: &LayerConfig) -> Self {
        QuantSpec {
            scheme: layer.quant.wire_scheme(layer.moe.input_dtype),
            hidden: layer.moe.hidden,
            input_bf16: layer.moe.input_dtype == InputDtype::Bf16,
        }
    }
}

/// Threads per block of the quantization kernel.
const QUANT_BLOCK: u32 = 256;

/// Bytes of page-locked host memory each [`CudaDevice`] stages copies of host slices through.
const STAGING_BYTES: usize = 4 << 20;

/// Page-locked host memory that copies between host slices and device memory pass through, a
/// chunk at a time, so they never take the driver's path for pageable memory: that path is
/// shared by a context's copies, and with ranks sharing a GPU (one context) a rank's download
/// waiting for its combine, itself waiting for the other rank, kept that rank's upload from
/// starting.
#[derive(Debug)]
struct PinnedStaging {
    ptr: *mut u8,
}

// SAFETY: the memory is owned by this value and only touched through `&mut self` (under the
// CudaDevice's mutex).
unsafe impl Send for PinnedStaging {}

impl PinnedStaging {
    fn new() -> Result<Self, KernelError> {
        // SAFETY: the caller made the GPU's context current; the allocation is owned by the
        // returned value and freed once, in Drop.
        let ptr = unsafe { cudarc::driver::result::malloc_host(STAGING_BYTES, sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(driver("cuMemHostAlloc"))?;
        count_driver_allocations(1);
        Ok(PinnedStaging { ptr: ptr.cast() })
    }

    fn chunk(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of STAGING_BYTES bytes, borrowed mutably with self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(STAGING_BYTES)) }
    }
}

impl Drop for PinnedStaging {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from cuMemHostAlloc and is freed only here; every copy through it
        // waited for its stream before returning.
        let _ = unsafe { cudarc::driver::result::free_host(self.ptr.cast()) };
    }
}

/// One device (its primary context) with its stream and the kernels it has used.
#[derive(Debug)]
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    staging: Mutex<PinnedStaging>,
    /// The event [`Self::order_before`] and [`Self::order_after`] record on one stream and make
    /// the other wait for: a wait keeps the record it was made after, so one event serves
    /// every ordering (an event created and destroyed per ordering cost two more driver calls
    /// each time, and an engine orders once per device array it passes).
    ordering: Mutex<CudaEvent>,
    /// Kernels by module and name: a launch costs no `cuModuleGetFunction` nor attribute query,
    /// and takes no process-wide lock.
    functions: Mutex<HashMap<(Module, &'static str), Kernel>>,
}

/// A loaded kernel and the most threads a block of it may have (its registers decide), a
/// multiple of 32.
#[derive(Clone, Debug)]
struct Kernel {
    function: CudaFunction,
    max_threads: u32,
}

impl CudaDevice {
    /// Opens device `ordinal` (its primary context) with a stream of its own.
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        let ctx = CudaContext::new(ordinal).map_err(driver("cuCtxCreate"))?;
        let stream = ctx.new_stream().map_err(driver("cuStreamCreate"))?;
        Self::open(ordinal, ctx, stream)
    }

    /// Opens device `ordinal` and orders every launch and copy on the caller's `stream`, so
    /// the library's work falls in line with the engine's (no event or synchronization between
    /// them). The stream must belong to the device's primary context, the one a CUDA runtime
    /// (PyTorch, an engine) uses; a stream of another context is refused.
    ///
    /// # Safety
    /// `stream` must be a valid stream handle that outlives the returned `CudaDevice` and everything
    /// built on it; the `CudaDevice` never destroys it.
    pub unsafe fn with_stream(ordinal: usize, stream: sys::CUstream) -> Result<Self, KernelError> {
        let ctx = CudaContext::new(ordinal).map_err(driver("cuCtxCreate"))?;
        let mut owner: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the caller guarantees the handle is a live stream; the query writes a local.
        unsafe { sys::cuStreamGetCtx(stream, &mut owner) }
            .result()
            .map_err(driver("cuStreamGetCtx"))?;
        if owner != ctx.cu_ctx() {
            return Err(KernelError::InvalidArgument(format!(
                "the stream given for GPU {ordinal} belongs to another CUDA context than the GPU's primary context: create it on device {ordinal} with the CUDA runtime (or in the primary context), or let moe-a2a create its own stream"
            )));
        }
        // SAFETY: the caller guarantees the stream outlives this CudaDevice; a borrowed stream is not
        // destroyed when cudarc's handle drops.
        let stream = unsafe { ctx.wrap_borrowed_stream(stream) };
        Self::open(ordinal, ctx, stream)
    }

    fn open(ordinal: usize, ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self, KernelError> {
        let (major, minor) = ctx.compute_capability().map_err(driver("compute capability"))?;
        ctx.bind_to_thread().map_err(driver("bind context"))?;
        Ok(CudaDevice {
            ordinal,
            staging: Mutex::new(PinnedStaging::new()?),
            ordering: Mutex::new(ctx.new_event(None).map_err(driver("cuEventCreate"))?),
            ctx,
            stream,
            arch: arch_for(major, minor),
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// Orders the work enqueued later on `stream` (another stream of this GPU, an engine's)
    /// after the work enqueued on this device's stream so far, without the host waiting: how a
    /// consumer reads the library's device tensors on its own stream.
    ///
    /// # Safety
    /// `stream` must be a live stream of this GPU's primary context (or one of CUDA's special
    /// handles, legacy or per-thread default).
    pub unsafe fn order_before(&self, stream: sys::CUstream) -> Result<(), KernelError> {
        // SAFETY: the caller guarantees the stream.
        unsafe { self.order(self.stream.cu_stream(), stream) }
    }

    /// Orders the work enqueued later on this device's stream after the work enqueued on
    /// `stream` so far, without the host waiting: how the library reads an engine's device
    /// tensors written on the engine's stream (the mirror of [`Self::order_before`]).
    ///
    /// # Safety
    /// As for [`Self::order_before`].
    pub unsafe fn order_after(&self, stream: sys::CUstream) -> Result<(), KernelError> {
        // SAFETY: the caller guarantees the stream.
        unsafe { self.order(stream, self.stream.cu_stream()) }
    }

    /// Makes `consumer` wait for the work enqueued on `producer` so far (nothing where they are
    /// one stream).
    ///
    /// # Safety
    /// Both are live streams of this GPU's primary context, or CUDA's special handles.
    unsafe fn order(&self, producer: sys::CUstream, consumer: sys::CUstream) -> Result<(), KernelError> {
        if producer == consumer {
            return Ok(());
        }
        let event = self.ordering.lock().unwrap_or_else(|p| p.into_inner());
        self.ctx.bind_to_thread().map_err(driver("bind context"))?;
        // SAFETY: the event is this context's and alive while the lock is held; the caller
        // guarantees both streams. Recording and waiting under one lock keeps another thread's
        // record from coming between them.
        unsafe {
            cudarc::driver::result::event::record(event.cu_event(), producer).map_err(driver("cuEventRecord"))?;
            cudarc::driver::result::stream::wait_event(
                consumer,
                event.cu_event(),
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .map_err(driver("cuStreamWaitEvent"))
        }
    }

    /// Copies `data` to device address `dst`, ordered after the stream's earlier work, through
    /// the GPU's page-locked staging; returns when the copy is done.
    ///
    /// # Safety
    /// `dst..dst + data.len()` must be live device memory of this GPU's context.
    pub unsafe fn copy_to_device(&self, dst: u64, data: &[u8]) -> Result<(), KernelError> {
        self.ctx.bind_to_thread().map_err(driver("bind context"))?;
        let mut staging = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = 0;
        while done < data.len() {
            let chunk = staging.chunk(data.len() - done);
            let n = chunk.len();
            chunk.copy_from_slice(&data[done..done + n]);
            // SAFETY: the caller guarantees the destination; the staging chunk stays borrowed
            // until the stream is synchronized below.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst + done as u64, &*chunk, self.stream.cu_stream()) }
                .map_err(driver("cuMemcpyHtoDAsync"))?;
            self.stream.synchronize().map_err(driver("stream sync"))?;
            done += n;
        }
        Ok(())
    }

    /// Copies `out.len()` bytes from device address `src` into `out`, ordered after the
    /// stream's earlier work, through the GPU's page-locked staging.
    ///
    /// # Safety
    /// `src..src + out.len()` must be live device memory of this GPU's context.
    pub unsafe fn copy_to_host(&self, src: u64, out: &mut [u8]) -> Result<(), KernelError> {
        self.ctx.bind_to_thread().map_err(driver("bind context"))?;
        let mut staging = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = 0;
        while done < out.len() {
            let chunk = staging.chunk(out.len() - done);
            let n = chunk.len();
            // SAFETY: the caller guarantees the source; the staging chunk stays borrowed until
            // the stream is synchronized below.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(&mut *chunk, src + done as u64, self.stream.cu_stream())
            }
            .map_err(driver("cuMemcpyDtoHAsync"))?;
            self.stream.synchronize().map_err(driver("stream sync"))?;
            out[done..done + n].copy_from_slice(chunk);
            done += n;
        }
        Ok(())
    }

    /// Enqueues a copy of `bytes` bytes from device address `src` to device address `dst` on
    /// this GPU's stream; returns without waiting.
    ///
    /// # Safety
    /// Both ranges must be live device memory reachable from this GPU, and neither be freed,
    /// nor `src` written, before the copy has run on the stream.
    pub unsafe fn copy_on_device_async(&self, dst: u64, src: u64, bytes: usize) -> Result<(), KernelError> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(driver("bind context"))?;
        // SAFETY: the caller guarantees both ranges until the copy has run.
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(driver("cuMemcpyDtoDAsync"))
    }

    /// Captures what `enqueue` puts on this GPU's stream as a CUDA graph, instantiated and
    /// uploaded. Capture on every rank before any rank replays: instantiating a graph allocates
    /// device memory (see `crate::buffer`).
    pub fn capture_graph(&self, enqueue: impl FnOnce() -> moe_core::Result<()>) -> moe_core::Result<CudaGraph> {
        let graph_err = |e: DriverError| MoeError::Device(format!("CUDA graph capture: {e}"));
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(graph_err)?;
        let enqueued = enqueue();
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(graph_err)?;
        enqueued?;
        let graph = graph.ok_or_else(|| MoeError::Device("CUDA graph capture recorded nothing".to_string()))?;
        graph.upload().map_err(graph_err)?;
        Ok(graph)
    }

    /// The device's name and NVRTC architecture, for reports.
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|e| format!("<{e}>"));
        format!("GPU {} ({name}, {})", self.ordinal, self.arch)
    }

    /// The device's context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch of this `CudaDevice` is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's UUID, which names it across processes (ordinals depend on each
    /// process's `CUDA_VISIBLE_DEVICES`).
    pub fn uuid(&self) -> Result<[u8; 16], KernelError> {
        uuid_of(self.ctx.cu_device())
    }

    /// SM clock in kHz, to turn wait bounds into cycles.
    pub fn clock_khz(&self) -> Result<i64, KernelError> {
        self.ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)
            .map(i64::from)
            .map_err(driver("clock rate"))
    }

    /// Number of SMs (streaming multiprocessors), what [`crate::launch::CommSms`] resolves
    /// against.
    pub fn sm_count(&self) -> Result<u32, KernelError> {
        self.ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map(|n| n.max(0) as u32)
            .map_err(driver("multiprocessor count"))
    }

    /// The module loaded on this device, compiled and loaded on its first use by any `CudaDevice` of
    /// the process (cached per architecture, then per device: see the module doc).
    fn module(&self, module: &Module) -> Result<Arc<CudaModule>, KernelError> {
        // Keyed by ordinal: every CudaDevice of a device runs in its primary context (`new` and
        // `with_stream` ensure it), the context the cached module is loaded in.
        LOADED.get_or_try_init((self.ordinal, *module), || {
            let ptx = PtxCache::global().get(module, &self.arch)?;
            let ctx = CudaContext::new(self.ordinal).map_err(driver("cuDevicePrimaryCtxRetain"))?;
            assert!(
                ctx.cu_ctx() == self.ctx.cu_ctx(),
                "moe invariant violated: GPU {} runs in a context other than its primary context, so modules cached for the device cannot serve it",
                self.ordinal
            );
            ctx.load_module(Ptx::clone(&ptx)).map_err(driver("cuModuleLoadData"))
        })
    }

    /// Compiles and loads `module` now, unless a `CudaDevice` of this device already did in this
    /// process: do this for every module a rank will use before any rank launches a kernel
    /// that waits on peers, because loading a module maps memory into peer contexts and can
    /// wait for their running kernels.
    pub fn preload(&self, module: &Module) -> Result<(), KernelError> {
        self.module(module).map(|_| ())
    }

    fn kernel(&self, module: &Module, name: &'static str) -> Result<Kernel, KernelError> {
        let mut cache = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = cache.get(&(*module, name)) {
            return Ok(k.clone());
        }
        let function = self
            .module(module)?
            .load_function(name)
            .map_err(driver("cuModuleGetFunction"))?;
        let most = function
            .get_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)
            .map_err(driver("cuFuncGetAttribute(max threads per block)"))?;
        let kernel = Kernel {
            function,
            max_threads: (most.max(32) as u32) / 32 * 32,
        };
        cache.insert((*module, name), kernel.clone());
        Ok(kernel)
    }

    /// Launches kernel `name` of `module`, whose only parameter is a params struct `P` passed
    /// by value, on `blocks` blocks (at least one) of `threads` threads, on this GPU's stream.
    ///
    /// # Safety
    /// The kernel must take exactly one `P` by value (the C struct `P` mirrors), and every
    /// address in `params` must be live device memory of the sizes the kernel derives from it.
    pub(crate) unsafe fn launch_with_params<P: DeviceRepr>(
        &self,
        module: &Module,
        name: &'static str,
        params: &P,
        blocks: u32,
        threads: u32,
    ) -> Result<(), KernelError> {
        let f = self.function(module, name)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks.max(1), 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(params);
        // SAFETY: the kernel's parameter list is one `P` by value and `params` addresses what
        // it touches (this function's contract).
        unsafe { b.launch(cfg) }.map_err(driver(name))?;
        Ok(())
    }

    pub(crate) fn function(&self, module: &Module, name: &'static str) -> Result<CudaFunction, KernelError> {
        Ok(self.kernel(module, name)?.function)
    }

    /// The most threads a block of kernel `name` may have, a multiple of 32.
    pub(crate) fn max_threads(&self, module: &Module, name: &'static str) -> Result<u32, KernelError> {
        Ok(self.kernel(module, name)?.max_threads)
    }

    /// Quantizes `x` (`[n, spec.hidden]` 16-bit input values) on the GPU with at most
    /// `max_blocks` blocks of `threads` threads (each block takes every `blocks`-th token, several
    /// per pass when they are small; `u32::MAX` blocks gives one block per token; see
    /// [`Self::quantize_raw_on`]) and returns the payload and scale bytes, `[n, payload_bytes]`
    /// and `[n, scale_bytes]`.
    pub fn quantize(
        &self,
        spec: &QuantSpec,
        params: &QuantParams,
        x: &[u16],
        max_blocks: u32,
        threads: u32,
    ) -> Result<(Vec<u8>, Vec<u8>), KernelError> {
        let wire = spec
            .scheme
            .wire_layout(spec.hidden)
            .map_err(|e| KernelError::InvalidArgument(e.to_string()))?;
        if !x.len().is_multiple_of(spec.hidden) {
            return Err(KernelError::InvalidArgument(format!(
                "{} input values are not whole tokens of {}",
                x.len(),
                spec.hidden
            )));
        }
        let n = x.len() / spec.hidden;
        let s = &self.stream;
        let x_dev = s.clone_htod(x).map_err(driver("copy tokens to device"))?;
        let mut payload = s
            .alloc_zeros::<u8>((n * wire.payload_bytes).max(1))
            .map_err(driver("alloc payload"))?;
        let mut scales = s
            .alloc_zeros::<u8>((n * wire.scale_bytes).max(1))
            .map_err(driver("alloc scales"))?;
        count_driver_allocations(3);
        {
            let (x_ptr, _x) = x_dev.device_ptr(s);
            let (payload_ptr, _payload) = payload.device_ptr_mut(s);
            let (scales_ptr, _scales) = scales.device_ptr_mut(s);
            // SAFETY: `x_dev` holds n * hidden values and the outputs n rows of the scheme's
            // wire sizes (at least one byte each, so the addresses are valid), on this device.
            unsafe {
                self.quantize_raw_on(
                    spec,
                    params,
                    x_ptr,
                    n,
                    payload_ptr,
                    wire.payload_bytes,
                    scales_ptr,
                    wire.scale_bytes,
                    max_blocks,
                    threads,
                )
            }?;
        }
        let mut payload = s.clone_dtoh(&payload).map_err(driver("copy payload to host"))?;
        let mut scales = s.clone_dtoh(&scales).map_err(driver("copy scales to host"))?;
        payload.truncate(n * wire.payload_bytes);
        scales.truncate(n * wire.scale_bytes);
        Ok((payload, scales))
    }

    /// Quantizes `n` tokens at device address `x` into `payload` / `scales` (device
    /// addresses, one token every `*_stride` bytes), ordered on this GPU's stream, one block
    /// of 256 threads per token.
    ///
    /// # Safety
    /// `x` must hold `n * spec.hidden` 16-bit values, and `payload` / `scales` must be valid for
    /// `n` rows of their strides (strides at least the scheme's per-token sizes), on this device.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn quantize_raw(
        &self,
        spec: &QuantSpec,
        params: &QuantParams,
        x: u64,
        n: usize,
        payload: u64,
        payload_stride: usize,
        scales: u64,
        scale_stride: usize,
    ) -> Result<(), KernelError> {
        // SAFETY: this function's contract is the callee's.
        unsafe {
            self.quantize_raw_on(
                spec,
                params,
                x,
                n,
                payload,
                payload_stride,
                scales,
                scale_stride,
                u32::MAX,
                QUANT_BLOCK,
            )
        }
    }

    /// [`Self::quantize_raw`] on at most `max_blocks` blocks of `threads` threads (a multiple of
    /// 32 from 32 to 1024; fewer where the kernel's registers do not allow that many), each
    /// block taking every `blocks`-th token in batches, as the dispatch kernels do.
    ///
    /// # Safety
    /// As [`Self::quantize_raw`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn quantize_raw_on(
        &self,
        spec: &QuantSpec,
        params: &QuantParams,
        x: u64,
        n: usize,
        payload: u64,
        payload_stride: usize,
        scales: u64,
        scale_stride: usize,
        max_blocks: u32,
        threads: u32,
    ) -> Result<(), KernelError> {
        if n == 0 {
            return Ok(());
        }
        if threads == 0 || threads > 1024 || !threads.is_multiple_of(32) {
            return Err(KernelError::InvalidArgument(format!(
                "{threads} threads per block for the quantization kernel: use a multiple of 32 from 32 to 1024"
            )));
        }
        let module = Module::Quant(*spec);
        let f = self.function(&module, QUANTIZE_TOKENS)?;
        let threads = threads.min(self.max_threads(&module, QUANTIZE_TOKENS)?);
        let (n_i, pb, sb) = (n as i32, payload_stride as i32, scale_stride as i32);
        let cfg = LaunchConfig {
            grid_dim: ((n.min(u32::MAX as usize) as u32).min(max_blocks.max(1)), 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(&x)
            .arg(&n_i)
            .arg(&payload)
            .arg(&pb)
            .arg(&scales)
            .arg(&sb)
            .arg(&params.fp8_static_scale)
            .arg(&params.nvfp4_global_scale);
        // SAFETY: the argument list matches `moe_quantize_tokens`; the caller guarantees the
        // buffers (this function's contract).
        unsafe { b.launch(cfg) }.map_err(driver("launch moe_quantize_tokens"))?;
        Ok(())
    }

    /// Swizzles a row-major `[rows, cols]` scale matrix into the 128x4 layout on the GPU.
    pub fn swizzle_128x4(&self, linear: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>, KernelError> {
        if linear.len() != rows * cols {
            return Err(KernelError::InvalidArgument(format!(
                "{} scale bytes are not a [{rows}, {cols}] matrix",
                linear.len()
            )));
        }
        let s = &self.stream;
        let len = moe_quant::swizzle::swizzled_len(rows, cols);
        let src = s.clone_htod(linear).map_err(driver("copy scales to device"))?;
        let mut out = s.alloc_zeros::<u8>(len.max(1)).map_err(driver("alloc swizzled"))?;
        count_driver_allocations(2);
        {
            let (src_ptr, _src) = src.device_ptr(s);
            let (out_ptr, _out) = out.device_ptr_mut(s);
            // SAFETY: `src` holds rows * cols bytes and `out` swizzled_len(rows, cols) bytes
            // (at least one), both on this device.
            unsafe { self.swizzle_128x4_raw(src_ptr, rows, cols, out_ptr) }?;
        }
        let mut out = s.clone_dtoh(&out).map_err(driver("copy swizzled to host"))?;
        out.truncate(len);
        Ok(out)
    }
}

/// The UUID of device `device` (see [`CudaDevice::uuid`]).
pub(crate) fn uuid_of(device: sys::CUdevice) -> Result<[u8; 16], KernelError> {
    let mut uuid = sys::CUuuid { bytes: [0; 16] };
    // SAFETY: a query about a valid device handle into a local.
    unsafe { sys::cuDeviceGetUuid_v2(&mut uuid, device) }
        .result()
        .map_err(driver("cuDeviceGetUuid"))?;
    Ok(uuid.bytes.map(|b| b as u8))
}
