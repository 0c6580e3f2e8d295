//! allgather-rs on NVIDIA GPUs: the quantized tokens, their scales, top-k ids and weights are
//! all-gathered with NCCL over the dispatch group, each rank contributing `max_tokens` rows
//! (padding rows carry ids -1 and weights 0), so no rank needs the others' counts first and
//! nothing waits for the host; the experts' rows are reduce-scattered back in f32.
//!
//! # Buffers
//!
//! Everything is allocated with `cuMemAlloc` at construction, nothing per call (`max` is
//! `max_tokens`, `g` the dispatch group's size):
//! - send buffers: `[max, payload_bytes]` and `[max, scale_bytes]` (the quantized tokens),
//!   `[max, top_k]` ids and weights;
//! - gathered buffers, `g * max` rows of each: they are the Standard delivery's tensors
//!   ([`CudaAllGatherRank::delivery`]), with the scales swizzled into a buffer of their own when the
//!   experts take the 128x4 layout;
//! - the combine's `[g * max, hidden]` expert output in the input dtype
//!   ([`CudaAllGatherRank::expert_output_tensor`]), the same rows in f32, and `[max, hidden]` f32 for
//!   this rank's sums;
//! - staging for host tensors, and the status word of the routing kernel.
//!
//! # What a call enqueues (all on the rank's stream)
//!
//! Dispatch: `moe_gather_routing` (this rank's top-k rows into the send buffers, rows above the
//! tokens re-padded only where an earlier call left rows, ids checked), `moe_quantize_tokens`
//! (the tokens, read in place, straight into the payload and scale send buffers), one NCCL
//! group of four all-gathers (one launch), `moe_gather_mask_foreign` under EP (ids of experts
//! other ranks own become -1, weight 0), and `moe_swizzle_128x4` for swizzled scales.
//! Combine: `moe_gather_widen` (the experts' rows to f32, read in place), an NCCL f32 sum
//! reduce-scatter, and `moe_gather_narrow` (this rank's tokens, rounded as the host rounds,
//! into the output). Results are bit-identical to the host platform's allgather-rs when the
//! group has at most two ranks (one f32 addition per element either way; NCCL sums larger
//! groups in its own order), except the payload of a NaN that went through a sum: the GPU
//! returns its canonical NaN.
//!
//! Device tensors ([`CudaAllGatherRank::dispatch_device`], [`CudaAllGatherRank::combine_device`]) are
//! read and written in place: no host synchronization, no allocation, no copy; the delivery and
//! the expert output tensor are views of this rank's buffers, valid until its next dispatch.
//! Host tensors ([`CudaAllGatherRank::dispatch`], [`CudaAllGatherRank::combine`]) are uploaded into the
//! staging buffers, run through the same steps and downloaded, so host experts run in between.
//! `upload_inputs`, `launch_dispatch` and `launch_combine` are that path's steps, for
//! benchmarks.
//!
//! # Errors found on the GPU
//!
//! An id of a device input outside `[0, num_experts)` or repeated in its row is dropped by the
//! routing kernel (-1, weight 0: the call completes without it on every rank) and recorded;
//! [`CudaAllGatherRank::finish`] waits for the stream, reports and clears it. Later calls do not
//! fail on it: a rank that skipped its part of a collective would leave its peers' NCCL
//! collectives waiting on their streams until they time out (the same holds for a call one
//! rank refuses for its arguments: give every rank tensors of the layer's shapes).
//!
//! # Timeouts
//!
//! NCCL bounds no wait: a collective a member of the group never enters spins on the others'
//! streams for good. So wherever the host waits for the stream ([`CudaAllGatherRank::finish`], the
//! host tensors' uploads and downloads, the warm-up at construction) it records an event and
//! polls it, for at most the rank's timeout (`HostRank::timeout`, the bound of every wait of
//! the control plane), and only while a collective is in flight; the device path's calls wait
//! for nothing on the GPU. When the time runs out the rank
//! 1. aborts its NCCL communicator (`ncclCommAbort`): its NCCL kernels exit and the stream
//!    drains, and every later call fails saying the layer must be constructed again;
//! 2. names the ranks missing with a barrier over its dispatch group on the control plane,
//!    bounded by the timeout again, which each member reaches only once its own wait timed out:
//!    a rank that never entered the collective never arrives, and the barrier's timeout names
//!    it;
//! 3. returns [`MoeError::Timeout`] (the error the peer-memory backends return for a peer their
//!    kernels waited for in vain) with the rank, the collectives in flight (`allgather-rs
//!    dispatch`, `allgather-rs combine`, or both) and the ranks missing. When every member
//!    reached the barrier (each timed out: calls NCCL could not match, or a stalled transport)
//!    it names every other member.
//!
//! A rank thus returns within about twice its timeout. The bound counts from when the host
//! starts waiting, over everything on the stream: on a stream shared with an engine's long
//! work, set the timeout above that work.
//!
//! The waits inside NCCL's host side have the same bound. The communicator is nonblocking
//! ([`NcclComm`]): joining it at construction, and the launch of each collective, run in NCCL's
//! threads while the rank polls. A member that never joins (its construction failed before, or
//! it never constructs) makes the others abort their half-built communicators after the
//! timeout and fail saying so: the timeout must leave room for NCCL's initialization (about a
//! second). A launch waits for the other members only at the first collectives, the warm-up
//! at construction, where NCCL connects them; one that times out aborts the communicator and
//! is reported as above. Each call of the device path thus waits for NCCL's host-side launch
//! of its collectives (on a nonblocking communicator NCCL launches from a thread of its own,
//! which the call polls until it is done), never for the GPU.

mod backend;

use std::sync::Arc;
use std::time::Duration;

use moe_core::host::HostRank;
use moe_core::quant::swizzle;
use moe_core::{
    Activations, DType, DispatchLayout, Dispatched, LayerConfig, Location, MoeError, PrepareInput, Result, ScaleLayout,
    Tensor,
};
use moe_kernels::KernelError;
use moe_kernels::buffer::DeviceBuffer;
use moe_kernels::cudarc::driver::CudaEvent;
use moe_kernels::cudarc::nccl::Id;
use moe_kernels::deliver::standard_tensors;
use moe_kernels::device::CudaDevice;
use moe_kernels::gather::{MaskForeign, Routing};
use moe_kernels::nccl::{GatherPart, NcclComm, poll_until};
use moe_kernels::source::{Module, QuantSpec};
use moe_kernels::status::STATUS_BAD_ID;
use moe_kernels::tensor::{device_tensor, finalize_addresses, prepare_addresses};

use crate::NAME;

pub use backend::CudaAllGather;

/// The collectives a wait can find in flight, as timeouts name them.
const DISPATCH: &str = "allgather-rs dispatch";
const COMBINE: &str = "allgather-rs combine";
const DISPATCH_AND_COMBINE: &str = "allgather-rs dispatch/combine";
const WARM_UP: &str = "allgather-rs construction (NCCL warm-up)";

/// What is in flight once `op` is enqueued after `before` (see `CudaAllGatherRank::in_flight`).
fn in_flight_after(before: Option<&'static str>, op: &'static str) -> &'static str {
    match before {
        Some(b) if b != op => DISPATCH_AND_COMBINE,
        _ => op,
    }
}

/// The error of world rank `rank` whose `op` did not complete within `timeout`, given what the
/// check over `group` returned: a barrier each member reaches only once its own wait timed out.
/// The members the barrier timed out waiting for are named (those that never entered the
/// collective, and any that started waiting more than a timeout later); when every member
/// arrived, each timed out in a collective of its own (calls NCCL could not match, or a stalled
/// transport) and every other member is named; any other failure of the check (a rank that
/// panicked) is returned as it is.
fn timed_out(rank: usize, group: &[usize], op: &str, timeout: Duration, check: Result<()>) -> MoeError {
    let waited_for = match check {
        Err(MoeError::Timeout { waited_for, .. }) => waited_for,
        Err(other) => return other,
        Ok(()) => group.iter().copied().filter(|&r| r != rank).collect(),
    };
    MoeError::Timeout {
        rank,
        op: op.to_string(),
        waited_for,
        timeout,
    }
}

/// One rank's all-gather backend on its GPU.
#[derive(Debug)]
pub struct CudaAllGatherRank {
    layer: LayerConfig,
    dispatch: DispatchLayout,
    spec: QuantSpec,
    gpu: Arc<CudaDevice>,
    /// Declared before the buffers, which its collectives use: its Drop waits (boundedly) for
    /// them, then aborts the communicator (unless a timeout aborted it already).
    comm: NcclComm,
    /// The control plane: the bound of every wait for the stream, and the barrier that names
    /// the ranks missing from a collective that timed out (see the module doc).
    host: HostRank,
    /// Recorded on the stream where the host waits for it, then polled.
    idle: CudaEvent,
    /// The collectives enqueued since the stream was last seen idle, as a timeout names them;
    /// `None` when nothing on the stream can wait for a peer.
    in_flight: Option<&'static str>,
    group: Vec<usize>,
    /// World rank.
    rank: usize,
    max_tokens: usize,
    /// Tokens of the staged host inputs.
    staged_tokens: usize,
    /// Tokens of the last dispatch: the rows the combine writes.
    n_tokens: usize,
    /// Leading rows of the id and weight send buffers a dispatch may have filled; the rows
    /// above hold padding (every row, before the first dispatch: the buffers start zeroed).
    routed_rows: usize,
    staged: Staging,
    send: Rows,
    gathered: GatheredRows,
    /// The scales in the 128x4 layout (`swizzled_len(g * max, scales_per_token)` bytes), when
    /// the experts take them so.
    swizzled: Option<Arc<DeviceBuffer>>,
    /// `[num_experts]` i32, the EP rank of each expert (under EP only).
    owner: Option<DeviceBuffer>,
    /// `[g * max, hidden]` in the input dtype: where the experts may write their rows.
    expert_out: Arc<DeviceBuffer>,
    /// `[g * max, hidden]` f32: the experts' rows widened for the reduce-scatter.
    wide: DeviceBuffer,
    /// `[max, hidden]` f32: this rank's sums.
    reduced: DeviceBuffer,
    /// u32: 0, or `STATUS_BAD_ID | token` of the first bad device input row since the last
    /// `finish`.
    status: DeviceBuffer,
    /// The Standard delivery as device tensors over `gathered` (and `swizzled`).
    delivery: Dispatched,
    /// `expert_out` as a `[g * max, hidden]` tensor.
    expert_output: Tensor,
}

/// Host tensors' copies on the GPU.
#[derive(Debug)]
struct Staging {
    /// `[max, hidden]` 16-bit input rows.
    tokens: DeviceBuffer,
    /// `[max, top_k]` i32 and f32.
    ids: DeviceBuffer,
    weights: DeviceBuffer,
    /// `[max, hidden]` 16-bit output rows.
    out: DeviceBuffer,
}

/// This rank's rows of each gathered part: `[max, payload_bytes]`, `[max, scale_bytes]`,
/// `[max, top_k]` i32 ids and f32 weights.
#[derive(Debug)]
struct Rows {
    payload: DeviceBuffer,
    scales: DeviceBuffer,
    ids: DeviceBuffer,
    weights: DeviceBuffer,
}

/// Every member's rows, `g * max` of each part, member `i`'s at row `i * max`.
#[derive(Debug)]
struct GatheredRows {
    payload: Arc<DeviceBuffer>,
    scales: Arc<DeviceBuffer>,
    ids: Arc<DeviceBuffer>,
    weights: Arc<DeviceBuffer>,
}

/// The dispatch group of `rank`: its DP group, or every rank under sequence parallelism.
pub fn group_of(layer: &LayerConfig, rank: usize) -> Vec<usize> {
    let p = layer.parallel;
    if p.sp { p.world_group() } else { p.dp_group(rank) }
}

/// Fails unless `address` is a multiple of `align` (the kernels access the elements in place).
fn aligned(op: &'static str, arg: &str, address: u64, align: u64) -> Result<()> {
    if address.is_multiple_of(align) {
        return Ok(());
    }
    Err(MoeError::InvalidInput {
        op,
        detail: format!(
            "`{arg}` starts at device address {address:#x}; {NAME} reads and writes its elements in place, which needs {align}-byte alignment: pass a tensor at an aligned offset"
        ),
    })
}

impl CudaAllGatherRank {
    /// World rank `host.rank()` on `gpu`, joining the NCCL communicator `id` of its dispatch
    /// group (collective: every member of the group constructs at the same time, each on its
    /// own thread). Loads its kernels, allocates every buffer, and runs each collective once
    /// with the steady-state sizes, so NCCL sets up its connections here rather than in a call.
    /// `host` is the rank's control plane: its timeout bounds every wait (joining the NCCL
    /// communicator, NCCL's launches, the stream), so it must leave room for NCCL's
    /// initialization, and its barrier names the ranks missing when a collective times out
    /// (see the module doc).
    pub fn new(layer: &LayerConfig, gpu: Arc<CudaDevice>, host: &HostRank, id: Id) -> Result<Self> {
        let rank = host.rank();
        let d = layer.dispatch_layout();
        let group = group_of(layer, rank);
        let me = group
            .iter()
            .position(|&r| r == rank)
            .expect("a rank is in its own group");
        let (g, max, k, h) = (
            group.len(),
            layer.dispatch_tokens_bound(),
            layer.moe.top_k,
            layer.moe.hidden,
        );
        let (pb, sb) = (d.wire.payload_bytes, d.wire.scale_bytes);
        let spec = QuantSpec::of_layer(layer);
        let scale_layout = layer.quant.received_scale_layout(layer.moe.input_dtype);
        let swizzle = scale_layout == Some(ScaleLayout::Swizzled128x4);
        gpu.preload(&Module::Quant(spec))?;
        gpu.load_gather()?;
        if swizzle {
            gpu.preload_swizzle()?;
        }
        let alloc = |bytes: usize| DeviceBuffer::zeroed(&gpu, bytes);
        let shared = |bytes: usize| alloc(bytes).map(Arc::new);
        let owner = if layer.parallel.ep {
            let placement = layer.placement();
            let owner: Vec<u8> = (0..layer.moe.num_experts)
                .flat_map(|e| (placement.owner(e) as i32).to_le_bytes())
                .collect();
            Some(DeviceBuffer::from_bytes(&gpu, &owner)?)
        } else {
            None
        };
        let rows = g * max;
        let gathered = GatheredRows {
            payload: shared(rows * pb)?,
            scales: shared(rows * sb)?,
            ids: shared(rows * k * 4)?,
            weights: shared(rows * k * 4)?,
        };
        let swizzled = if swizzle {
            Some(shared(swizzle::swizzled_len(rows, d.wire.scales_per_token))?)
        } else {
            None
        };
        let expert_out = shared(rows * h * 2)?;
        let staged = Staging {
            tokens: alloc(max * h * 2)?,
            ids: alloc(max * k * 4)?,
            weights: alloc(max * k * 4)?,
            out: alloc(max * h * 2)?,
        };
        let send = Rows {
            payload: alloc(max * pb)?,
            scales: alloc(max * sb)?,
            ids: alloc(max * k * 4)?,
            weights: alloc(max * k * 4)?,
        };
        let (wide, reduced, status) = (alloc(rows * h * 4)?, alloc(max * h * 4)?, alloc(4)?);
        let dtype = layer.moe.input_dtype.dtype();
        let delivery = delivery_tensors(&d, rows, scale_layout, &gathered, swizzled.as_ref())?;
        let expert_output = device_tensor(&expert_out, 0, dtype, &[rows, h])?;
        let idle = gpu
            .context()
            .new_event(None)
            .map_err(|e| MoeError::Device(format!("rank {rank}: creating {NAME}'s event: {e}")))?;
        // Joined after everything else that can fail: a member that never joins makes the
        // others wait for it until their timeout.
        let comm = NcclComm::new(&gpu, me, g, &id, host.timeout())?;
        let mut this = CudaAllGatherRank {
            layer: layer.clone(),
            dispatch: d,
            spec,
            comm,
            host: host.clone(),
            idle,
            in_flight: None,
            group,
            rank,
            max_tokens: max,
            staged_tokens: 0,
            n_tokens: 0,
            routed_rows: max,
            staged,
            send,
            gathered,
            swizzled,
            owner,
            expert_out,
            wide,
            reduced,
            status,
            delivery,
            expert_output,
            gpu,
        };
        this.warm_up()?;
        Ok(this)
    }

    /// Runs the all-gathers and the reduce-scatter once on the (zeroed) buffers and waits:
    /// NCCL connects and allocates lazily, at a communicator's first collectives, which must
    /// not happen on a call's path. What the gathered buffers then hold is overwritten by the
    /// first dispatch.
    fn warm_up(&mut self) -> Result<()> {
        let parts = self.gather_parts();
        let count = self.max_tokens * self.dispatch.hidden;
        // SAFETY: the parts are this rank's send and gathered buffers, allocated in `new` for
        // `max` and `g * max` rows; `wide` holds g * max * hidden f32 and `reduced`
        // max * hidden; every member of the group runs the same warm-up in `new`.
        let launch = unsafe { self.comm.all_gather(&parts) };
        self.launched(WARM_UP, launch)?;
        // SAFETY: as above.
        let launch = unsafe {
            self.comm
                .reduce_scatter_sum_f32(self.wide.ptr(), self.reduced.ptr(), count)
        };
        self.launched(WARM_UP, launch)?;
        self.in_flight = Some(WARM_UP);
        self.wait_idle()
    }

    /// What launching collectives of `op` (as a timeout names what is in flight) returned. A
    /// launch NCCL did not finish within the timeout (a member missing from the first
    /// collectives, where NCCL connects them) aborted the communicator already, and is reported
    /// as a wait for the stream that timed out, with the ranks missing named.
    fn launched(&mut self, op: &'static str, launch: std::result::Result<(), KernelError>) -> Result<()> {
        match launch {
            Err(KernelError::NcclTimeout { timeout, .. }) => Err(self.time_out(op, timeout)),
            launch => Ok(launch?),
        }
    }

    /// Waits until the stream has run everything enqueued so far, for at most the rank's
    /// timeout, when a collective is in flight; on timeout aborts the communicator and names
    /// the ranks missing (see the module doc). With no collective in flight it returns at once:
    /// nothing on the stream waits for a peer then.
    fn wait_idle(&mut self) -> Result<()> {
        let Some(op) = self.in_flight else {
            return Ok(());
        };
        let rank = self.rank;
        let query = |e| MoeError::Device(format!("rank {rank}: waiting for {op} on the stream: {e}"));
        self.idle.record(self.gpu.stream()).map_err(query)?;
        let timeout = self.host.timeout();
        let idle = &self.idle;
        if poll_until(timeout, || idle.try_is_complete()).map_err(query)? {
            self.in_flight = None;
            return Ok(());
        }
        Err(self.time_out(op, timeout))
    }

    /// After `op` did not complete within `timeout`: aborts the communicator, so that this
    /// rank's NCCL kernels exit and the stream drains, then names the ranks missing with a
    /// barrier over the group (see [`timed_out`]).
    fn time_out(&mut self, op: &'static str, timeout: Duration) -> MoeError {
        let rank = self.rank;
        let released = match self.comm.abort() {
            Err(e) => Err(format!("aborting its NCCL communicator failed ({e})")),
            Ok(()) => {
                let idle = &self.idle;
                match poll_until(timeout, || idle.try_is_complete()) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!(
                        "its stream still had not drained {timeout:?} after its NCCL communicator was aborted"
                    )),
                    Err(e) => Err(format!(
                        "querying its stream after aborting its NCCL communicator failed ({e})"
                    )),
                }
            }
        };
        self.in_flight = None;
        let error = timed_out(rank, &self.group, op, timeout, self.host.barrier(&self.group, op));
        match released {
            Ok(()) => error,
            Err(why) => MoeError::Device(format!(
                "{error}; then {why}: the GPU's stream may stay busy, and dropping this layer may block"
            )),
        }
    }

    /// The rank's GPU (for timing with events on its stream).
    pub fn gpu(&self) -> &Arc<CudaDevice> {
        &self.gpu
    }

    fn group_rows(&self) -> usize {
        self.group.len() * self.max_tokens
    }

    fn gather_parts(&self) -> [GatherPart; 4] {
        let d = &self.dispatch;
        let max = self.max_tokens;
        let part = |send: &DeviceBuffer, recv: &DeviceBuffer, row_bytes: usize| GatherPart {
            send: send.ptr(),
            recv: recv.ptr(),
            bytes: max * row_bytes,
        };
        [
            part(&self.send.payload, &self.gathered.payload, d.wire.payload_bytes),
            part(&self.send.scales, &self.gathered.scales, d.wire.scale_bytes),
            part(&self.send.ids, &self.gathered.ids, 4 * d.top_k),
            part(&self.send.weights, &self.gathered.weights, 4 * d.top_k),
        ]
    }

    fn check_tokens(&self, n: usize) -> Result<()> {
        if n > self.max_tokens {
            return Err(MoeError::TooManyTokens {
                tokens: n,
                max: self.max_tokens,
            });
        }
        Ok(())
    }

    /// Enqueues the dispatch of `n` tokens at device addresses `tokens` (`[n, hidden]` input
    /// dtype), `ids` (`[n, top_k]` i32) and `weights` (`[n, top_k]` f32) on this GPU.
    fn enqueue_dispatch(&mut self, [tokens, ids, weights]: [u64; 3], n: usize) -> Result<()> {
        self.comm.ensure_live(DISPATCH)?;
        let d = self.dispatch;
        let (k, rows) = (d.top_k, self.group_rows());
        let pad_end = n.max(self.routed_rows);
        let routing = Routing {
            ids,
            weights,
            n_tokens: n,
            out_ids: self.send.ids.ptr(),
            out_weights: self.send.weights.ptr(),
            pad_end,
            top_k: k,
            num_experts: self.layer.moe.num_experts,
            status: self.status.ptr(),
        };
        // SAFETY: the inputs hold n <= max rows (checked by the callers), the send buffers max
        // rows >= pad_end, the status word 4 bytes.
        unsafe { self.gpu.gather_routing(&routing) }?;
        self.routed_rows = n;
        self.n_tokens = n;
        // SAFETY: `tokens` holds n tokens of `hidden` 16-bit values; the payload and scale
        // send buffers hold max >= n rows of exactly their strides.
        unsafe {
            self.gpu.quantize_raw(
                &self.spec,
                &self.layer.quant.params,
                tokens,
                n,
                self.send.payload.ptr(),
                d.wire.payload_bytes,
                self.send.scales.ptr(),
                d.wire.scale_bytes,
            )
        }?;
        // SAFETY: each part's send buffer holds max rows and its gathered buffer g * max
        // (allocated in `new`); every member of the group enqueues the same parts.
        let launch = unsafe { self.comm.all_gather(&self.gather_parts()) };
        let in_flight = in_flight_after(self.in_flight, DISPATCH);
        self.launched(in_flight, launch)?;
        self.in_flight = Some(in_flight);
        if let Some(owner) = &self.owner {
            let mask = MaskForeign {
                ids: self.gathered.ids.ptr(),
                weights: self.gathered.weights.ptr(),
                entries: rows * k,
                owner: owner.ptr(),
                num_experts: self.layer.moe.num_experts,
                rank: self.rank,
            };
            // SAFETY: the gathered ids and weights hold g * max * top_k values, `owner` one
            // i32 per expert.
            unsafe { self.gpu.gather_mask_foreign(&mask) }?;
        }
        if let Some(swizzled) = &self.swizzled {
            // SAFETY: the gathered scales are the [g * max, scales_per_token] byte matrix
            // (one-byte scales: the layer validated the swizzle's scheme), `swizzled` its
            // swizzled_len bytes.
            unsafe {
                self.gpu.swizzle_128x4_raw(
                    self.gathered.scales.ptr(),
                    rows,
                    d.wire.scales_per_token,
                    swizzled.ptr(),
                )
            }?;
        }
        Ok(())
    }

    /// Enqueues the dispatch of device-resident inputs (on this rank's GPU), read in place;
    /// nothing waits for the host. Ids are checked by the routing kernel (see
    /// [`Self::finish`]). The inputs must stay unchanged until the dispatch has run on the
    /// stream; [`Self::delivery`] then holds what this rank's experts get.
    pub fn dispatch_device(&mut self, input: PrepareInput<'_>) -> Result<()> {
        let n = input.num_tokens();
        self.check_tokens(n)?;
        let addresses = prepare_addresses(&self.gpu, &self.layer, &input)?;
        for (arg, address, align) in [
            ("tokens", addresses[0], 2),
            ("topk_ids", addresses[1], 4),
            ("topk_weights", addresses[2], 4),
        ] {
            aligned("prepare", arg, address, align)?;
        }
        self.enqueue_dispatch(addresses, n)
    }

    /// The last dispatch's rows as the Standard format's device tensors (`g * max_tokens`
    /// rows, member `i`'s tokens at row `i * max_tokens`, padding rows with ids -1): views of
    /// this rank's buffers, overwritten by its next dispatch.
    pub fn delivery(&self) -> Dispatched {
        self.delivery.clone()
    }

    /// Where the experts may write their output, `[g * max_tokens, hidden]` in the input dtype
    /// (a view of this rank's buffer): [`Self::combine_device`] reads it in place, like any
    /// other device tensor of that shape.
    pub fn expert_output_tensor(&self) -> Tensor {
        self.expert_output.clone()
    }

    /// Enqueues the combine of the experts' rows at device address `src` (`[g * max, hidden]`
    /// input dtype) into `out` (`[n, hidden]`, n the last dispatch's tokens).
    fn enqueue_combine(&mut self, src: u64, out: u64) -> Result<()> {
        self.comm.ensure_live(COMBINE)?;
        let h = self.dispatch.hidden;
        let bf16 = self.layer.moe.input_dtype.dtype() == DType::Bf16;
        // SAFETY: `src` holds g * max * hidden 16-bit values (checked by the callers) and
        // `wide` as many f32.
        unsafe { self.gpu.gather_widen(src, self.wide.ptr(), self.group_rows() * h, bf16) }?;
        // SAFETY: `wide` holds g * (max * hidden) f32, `reduced` max * hidden; every member of
        // the group enqueues the same reduce-scatter.
        let launch = unsafe {
            self.comm
                .reduce_scatter_sum_f32(self.wide.ptr(), self.reduced.ptr(), self.max_tokens * h)
        };
        let in_flight = in_flight_after(self.in_flight, COMBINE);
        self.launched(in_flight, launch)?;
        self.in_flight = Some(in_flight);
        // SAFETY: `reduced` holds max >= n rows of f32, `out` n rows of 16-bit values
        // (checked by the callers).
        unsafe { self.gpu.gather_narrow(self.reduced.ptr(), out, self.n_tokens * h, bf16) }?;
        Ok(())
    }

    /// Enqueues the combine of the experts' device-resident rows (`[g * max_tokens, hidden]`,
    /// Standard format, on this rank's GPU: [`Self::expert_output_tensor`] or any other) into
    /// `out` (`[n, hidden]` on this rank's GPU, n the tokens of the last dispatch), both read
    /// and written in place; nothing waits for the host. `expert_output` must stay unchanged
    /// until the combine has run on the stream.
    pub fn combine_device(&mut self, expert_output: &Tensor, out: &Tensor) -> Result<()> {
        let [src, dst] = finalize_addresses(
            &self.gpu,
            &self.layer,
            &[self.group_rows()],
            self.n_tokens,
            expert_output,
            out,
        )?;
        aligned("finalize", "expert_output", src, 2)?;
        aligned("finalize", "out", dst, 2)?;
        self.enqueue_combine(src, dst)
    }

    /// Waits for this rank's stream (for at most the rank's timeout while a collective is in
    /// flight: see the module doc) and reports a bad id the routing kernel found in a device
    /// input since the last `finish` (then clears it).
    pub fn finish(&mut self) -> Result<()> {
        self.comm.ensure_live("allgather-rs wait")?;
        self.wait_idle()?;
        let mut word = [0u8; 4];
        self.status.download(0, &mut word)?;
        let code = u32::from_le_bytes(word);
        if code == 0 {
            return Ok(());
        }
        self.status.upload(0, &[0; 4])?;
        let e = self.layer.moe.num_experts;
        if code & STATUS_BAD_ID == 0 {
            return Err(MoeError::Device(format!(
                "rank {}: {NAME}'s routing kernel left the unknown status {code:#x}",
                self.rank
            )));
        }
        Err(MoeError::InvalidInput {
            op: "prepare",
            detail: format!(
                "rank {}: token {} of a device input lists an expert id outside [0, {e}) or the same id twice in its top-k row (found by {NAME}'s routing kernel, which dropped that id, so the call completed without it): pass ids in [0, {e}), each at most once per row",
                self.rank,
                code & !STATUS_BAD_ID
            ),
        })
    }

    /// Uploads this call's host tensors into the staging buffers (waits for the stream, as
    /// [`Self::finish`] does, then for the copies).
    pub fn upload_inputs(&mut self, input: PrepareInput<'_>) -> Result<()> {
        if input.location() != Location::Host {
            return Err(MoeError::InvalidInput {
                op: "prepare",
                detail: format!(
                    "upload_inputs stages host tensors, and the inputs are on {}: pass device inputs to dispatch_device",
                    input.location()
                ),
            });
        }
        let n = input.num_tokens();
        self.check_tokens(n)?;
        self.wait_idle()?;
        let s = &self.staged;
        s.tokens.upload(0, input.tokens().bytes())?;
        s.ids.upload(0, input.topk_ids().bytes())?;
        s.weights.upload(0, input.topk_weights().bytes())?;
        self.staged_tokens = n;
        Ok(())
    }

    /// Enqueues the dispatch of the staged host inputs ([`Self::upload_inputs`]) on this
    /// rank's stream; nothing waits for the host.
    pub fn launch_dispatch(&mut self) -> Result<()> {
        let s = &self.staged;
        let addresses = [s.tokens.ptr(), s.ids.ptr(), s.weights.ptr()];
        self.enqueue_dispatch(addresses, self.staged_tokens)
    }

    /// Enqueues the combine of whatever the expert output buffer holds into the staged output
    /// rows, on this rank's stream; nothing waits for the host.
    pub fn launch_combine(&mut self) -> Result<()> {
        let (src, out) = (self.expert_out.ptr(), self.staged.out.ptr());
        self.enqueue_combine(src, out)
    }

    /// Quantizes this rank's host tokens and all-gathers tokens, ids and weights over the
    /// group; returns what this rank's experts get (Standard format, downloaded).
    pub fn dispatch(&mut self, input: PrepareInput<'_>) -> Result<Dispatched> {
        self.upload_inputs(input)?;
        self.launch_dispatch()?;
        self.wait_idle()?;
        delivery_on_host(&self.delivery)
    }

    /// Reduce-scatters the experts' host rows (`[g * max_tokens, hidden]`) in f32 and writes
    /// this rank's tokens into the host tensor `out` (`[n, hidden]`).
    pub fn combine(&mut self, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let dtype = self.layer.moe.input_dtype.dtype();
        let (h, n) = (self.dispatch.hidden, self.n_tokens);
        expert_output.expect("combine", "expert_output", dtype, &[self.group_rows(), h])?;
        out.expect("combine", "out", dtype, &[n, h])?;
        self.wait_idle()?;
        self.expert_out.upload(0, expert_output.bytes())?;
        self.launch_combine()?;
        self.wait_idle()?;
        Ok(self.staged.out.download(0, out.bytes_mut())?)
    }
}

/// The Standard delivery's device tensors over the gathered buffers: `[rows, payload_bytes]`,
/// the scales (linear `[rows, scale_bytes]`, or the swizzled buffer), `[rows, top_k]` ids and
/// weights.
fn delivery_tensors(
    d: &DispatchLayout,
    rows: usize,
    scale_layout: Option<ScaleLayout>,
    gathered: &GatheredRows,
    swizzled: Option<&Arc<DeviceBuffer>>,
) -> Result<Dispatched> {
    let k = d.top_k;
    standard_tensors(
        d,
        scale_layout,
        device_tensor(&gathered.payload, 0, DType::U8, &[rows, d.wire.payload_bytes])?,
        device_tensor(&gathered.scales, 0, DType::U8, &[rows, d.wire.scale_bytes])?,
        swizzled,
        device_tensor(&gathered.ids, 0, DType::I32, &[rows, k])?,
        device_tensor(&gathered.weights, 0, DType::F32, &[rows, k])?,
    )
}

/// A copy of a device Standard delivery in host memory (synchronizes).
fn delivery_on_host(delivery: &Dispatched) -> Result<Dispatched> {
    let Dispatched::Standard {
        activations,
        topk_ids,
        topk_weights,
    } = delivery
    else {
        return Err(MoeError::Device(
            "moe invariant violated: allgather-rs delivers the Standard format only".to_string(),
        ));
    };
    let scales = match activations {
        Activations::Unscaled { .. } => None,
        Activations::Scaled { scales, layout, .. } => Some((scales.to_host()?, *layout)),
    };
    Ok(Dispatched::Standard {
        activations: Activations::new(activations.scheme(), activations.data().to_host()?, scales),
        topk_ids: topk_ids.to_host()?,
        topk_weights: topk_weights.to_host()?,
    })
}

/// A fresh NCCL communicator id, made once per group and handed to each member.
pub fn new_comm_id() -> Result<Id> {
    Id::new().map_err(|e| MoeError::Device(format!("NCCL ncclGetUniqueId: {:?}", e.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(300);

    #[test]
    fn the_ranks_the_barrier_missed_are_named_with_the_collective() {
        let check = Err(MoeError::Timeout {
            rank: 0,
            op: DISPATCH.to_string(),
            waited_for: vec![2],
            timeout: TIMEOUT,
        });
        let e = timed_out(0, &[0, 1, 2], DISPATCH, TIMEOUT, check);
        assert_eq!(
            e.to_string(),
            "rank 0 timed out after 300ms in allgather-rs dispatch waiting for rank(s) [2]; check that every rank of the group calls allgather-rs dispatch the same number of times"
        );
    }

    #[test]
    fn when_every_member_reached_the_barrier_the_others_are_named() {
        let e = timed_out(2, &[1, 2, 3], COMBINE, TIMEOUT, Ok(()));
        assert_eq!(
            e,
            MoeError::Timeout {
                rank: 2,
                op: COMBINE.to_string(),
                waited_for: vec![1, 3],
                timeout: TIMEOUT,
            }
        );
    }

    #[test]
    fn a_rank_that_panicked_is_reported_as_the_barrier_reported_it() {
        let panicked = MoeError::RankPanicked {
            rank: 1,
            message: "expert kernel failed".to_string(),
        };
        assert_eq!(
            timed_out(0, &[0, 1], DISPATCH, TIMEOUT, Err(panicked.clone())),
            panicked
        );
    }

    #[test]
    fn a_timeout_names_the_collectives_in_flight() {
        assert_eq!(in_flight_after(None, DISPATCH), DISPATCH);
        assert_eq!(in_flight_after(Some(DISPATCH), DISPATCH), DISPATCH);
        assert_eq!(in_flight_after(Some(COMBINE), COMBINE), COMBINE);
        assert_eq!(in_flight_after(Some(DISPATCH), COMBINE), DISPATCH_AND_COMBINE);
        assert_eq!(in_flight_after(Some(COMBINE), DISPATCH), DISPATCH_AND_COMBINE);
        assert_eq!(
            in_flight_after(Some(DISPATCH_AND_COMBINE), DISPATCH),
            DISPATCH_AND_COMBINE
        );
    }
}
