//! The two-sided protocol on NVIDIA GPUs: the same workspace layout, count matrix, slots,
//! flags and round counter as the host platform, run by the kernels of `moe-kernels`
//! (two_sided.cu), so for the same inputs both deliver the same rows in the same order and
//! combine to the same bits.
//!
//! The plan kernel numbers each token's sends as [`moe_core::routing::SendPlan`] does (per
//! destination rank, in token order), so source `s`'s `slot`-th token to rank `r` lands in the
//! row the host puts it in, `CountMatrix::dispatch_row(s, r) + slot`.
//!
//! The host-tensor methods (`dispatch`, `received`, `combine`, the uploads and downloads) stage
//! through host memory so that host experts (the reference experts) can run in between. The
//! steady-state path neither synchronizes with the host nor allocates: `dispatch_device` /
//! `combine_device` on device tensors, `launch`/`capture`. Errors the kernels record (a
//! timed-out wait, a bad id in a device input) reach the host through a host-mapped status
//! word: [`GpuTwoSided::check_status`] reads it without waiting, [`GpuTwoSided::finish`] after
//! the stream drained.

use std::sync::Arc;
use std::time::Duration;

use moe_core::slots::ReceivedRows;
use moe_core::{DispatchLayout, Dispatched, LayerConfig, MoeError, PrepareInput, Result, Tensor};
use moe_kernels::KernelError;
use moe_kernels::cudarc::driver::CudaGraph;
use moe_kernels::deliver::{ReceivedSlots, StandardDelivery};
use moe_kernels::gpu::Gpu;
use moe_kernels::platform::{
    CudaWorld, DeviceBuffer, KernelStatus, device_tensor, finalize_addresses, prepare_addresses,
};
use moe_kernels::source::{Module, QuantSpec};
use moe_kernels::two_sided::{MAX_RANKS, TwoSidedLaunch, TwoSidedParams, TwoSidedStep};

use crate::{CountMatrix, WorkspaceLayout};

fn device(e: KernelError) -> MoeError {
    MoeError::Device(e.to_string())
}

/// One rank's two-sided backend on its GPU.
#[derive(Debug)]
pub struct GpuTwoSided {
    layer: LayerConfig,
    dispatch: DispatchLayout,
    layout: WorkspaceLayout,
    gpu: Arc<Gpu>,
    me: usize,
    launch: TwoSidedLaunch,
    params: TwoSidedParams,
    /// Every rank's workspace; held so the peers' addresses in `params` stay valid.
    workspaces: Arc<Vec<DeviceBuffer>>,
    tokens: DeviceBuffer,
    images: DeviceBuffer,
    ids: DeviceBuffer,
    weights: DeviceBuffer,
    // Held for the params' addresses (the kernels read them; this side never does).
    _owner: DeviceBuffer,
    _send_target: DeviceBuffer,
    _send_slot: DeviceBuffer,
    _done: DeviceBuffer,
    expert_out: Arc<DeviceBuffer>,
    out: DeviceBuffer,
    /// Last: its mirror outlives every buffer above, whose Drop waits for the stream.
    status: KernelStatus,
}

/// The two halves of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Dispatch,
    Combine,
}

impl Phase {
    fn op(self) -> &'static str {
        match self {
            Phase::Dispatch => "two-sided dispatch",
            Phase::Combine => "two-sided combine",
        }
    }

    /// The kernels of the phase, in stream order.
    fn steps(self) -> &'static [TwoSidedStep] {
        match self {
            Phase::Dispatch => &[TwoSidedStep::Begin, TwoSidedStep::Plan, TwoSidedStep::Dispatch],
            Phase::Combine => &[
                TwoSidedStep::Begin,
                TwoSidedStep::CombineSend,
                TwoSidedStep::CombineReduce,
            ],
        }
    }
}

/// A size or offset inside the workspace's small sections or one slot (far below 2 GiB).
fn small(x: usize) -> i32 {
    i32::try_from(x).expect("moe invariant violated: a slot size or section offset above 2 GiB")
}

/// An offset anywhere in a workspace (which `DeviceBuffer` allocated, so it fits).
fn large(x: usize) -> i64 {
    i64::try_from(x).expect("moe invariant violated: a workspace offset above 2^63")
}

impl GpuTwoSided {
    /// Rank `me` of `world` (allocates and loads its kernels: construct every rank before any
    /// rank dispatches), with `workspaces[r]` the workspace of rank `r` (all of
    /// `WorkspaceLayout::for_layer(layer, ..).bytes()` bytes, from `CudaWorld::symmetric_alloc`),
    /// shared by every rank's `GpuTwoSided`.
    ///
    /// Fails with [`MoeError::Unsupported`] naming the first pair of ranks of `world` that
    /// cannot reach each other's memory (see `PeerMatrix::check_all_pairs`).
    pub fn new(
        layer: &LayerConfig,
        world: &CudaWorld,
        workspaces: Arc<Vec<DeviceBuffer>>,
        me: usize,
        timeout: Duration,
        launch: TwoSidedLaunch,
    ) -> Result<Self> {
        let dispatch = layer.dispatch_layout();
        let layout = WorkspaceLayout::for_layer(layer, &dispatch);
        let ep = layer.parallel.world_size();
        if ep != world.ranks() || ep > MAX_RANKS || workspaces.len() != ep || me >= ep {
            return Err(MoeError::InvalidInput {
                op: "GpuTwoSided::new",
                detail: format!(
                    "{ep} EP ranks need one GPU and one workspace each and a rank below {ep} (world {}, workspaces {}, rank {me}, at most {MAX_RANKS} ranks)",
                    world.ranks(),
                    workspaces.len()
                ),
            });
        }
        world
            .peers()
            .check_all_pairs(&layer.parallel.world_group())
            .map_err(|e| MoeError::Unsupported(format!("GpuTwoSided::new: {e}")))?;
        if let Some(w) = workspaces.iter().find(|w| w.bytes() < layout.bytes()) {
            return Err(MoeError::InvalidInput {
                op: "GpuTwoSided::new",
                detail: format!(
                    "a workspace of {} bytes, the layout needs {}; allocate WorkspaceLayout::for_layer(..).bytes() per rank",
                    w.bytes(),
                    layout.bytes()
                ),
            });
        }
        let gpu = world.gpu(me).clone();
        let (max, k, h) = (layout.max_tokens, layer.moe.top_k, layer.moe.hidden);
        let alloc = |bytes: usize| DeviceBuffer::zeroed(&gpu, bytes).map_err(device);
        let placement = layer.placement();
        let owner: Vec<u8> = (0..layer.moe.num_experts)
            .flat_map(|e| (placement.owner(e) as i32).to_le_bytes())
            .collect();
        let owner = DeviceBuffer::from_bytes(&gpu, &owner).map_err(device)?;
        let tokens = alloc(max * h * 2)?;
        let images = alloc(max * dispatch.ids_offset())?;
        let ids = alloc(max * k * 4)?;
        let weights = alloc(max * k * 4)?;
        let send_target = alloc(max * k * 4)?;
        let send_slot = alloc(max * k * 4)?;
        let done = alloc(4)?;
        let expert_out = Arc::new(alloc(layout.rows() * dispatch.combine_row_bytes)?);
        let out = alloc(max * dispatch.combine_row_bytes)?;
        let status = KernelStatus::new(&gpu, me, timeout).map_err(device)?;
        let clock_khz = gpu.clock_khz().map_err(device)?;
        // Loaded now, not at the first launch: loading a module while a peer's kernel spins
        // waiting for this rank can deadlock (see moe_kernels::platform).
        gpu.preload(&Module::Quant(QuantSpec::of_layer(layer)))
            .map_err(device)?;
        gpu.preload(&Module::TwoSided).map_err(device)?;
        let mut peers = [0u64; MAX_RANKS];
        for (p, w) in peers.iter_mut().zip(workspaces.iter()) {
            *p = w.ptr();
        }
        let params = TwoSidedParams {
            peers,
            images: images.ptr(),
            ids: ids.ptr(),
            weights: weights.ptr(),
            owner: owner.ptr(),
            send_target: send_target.ptr(),
            send_slot: send_slot.ptr(),
            done: done.ptr(),
            status: status.word_ptr(),
            status_mirror: status.mirror_ptr(),
            expert_out: expert_out.ptr(),
            out: out.ptr(),
            dispatch_region_off: large(layout.dispatch_region()),
            combine_region_off: large(layout.combine_region()),
            timeout_cycles: (timeout.as_secs_f64() * clock_khz as f64 * 1e3) as i64,
            ep: ep as i32,
            me: me as i32,
            max_tokens: small(max),
            n_tokens: 0,
            top_k: k as i32,
            hidden: small(h),
            input_bf16: i32::from(layer.moe.input_dtype == moe_core::InputDtype::Bf16),
            slot_bytes: small(dispatch.slot_bytes()),
            image_bytes: small(dispatch.ids_offset()),
            weights_offset: small(dispatch.weights_offset()),
            combine_slot_bytes: small(dispatch.combine_slot_bytes()),
            combine_row_bytes: small(dispatch.combine_row_bytes),
            round_off: small(layout.round_offset()),
            counts_off: small(layout.counts_row_offset(0)),
            counts_flag_off: small(layout.counts_flag_offset(0)),
            data_flag_off: small(layout.data_flag_offset(0)),
            combine_flag_off: small(layout.combine_flag_offset(0)),
            num_experts: small(layer.moe.num_experts),
        };
        Ok(GpuTwoSided {
            layer: layer.clone(),
            dispatch,
            layout,
            gpu,
            me,
            launch,
            params,
            workspaces,
            tokens,
            images,
            ids,
            weights,
            _owner: owner,
            _send_target: send_target,
            _send_slot: send_slot,
            _done: done,
            status,
            expert_out,
            out,
        })
    }

    /// The rank's GPU (for timing with events on its stream).
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Uploads this call's tokens, ids and weights.
    pub fn upload_inputs(&mut self, input: PrepareInput<'_>) -> Result<()> {
        self.tokens.upload(0, input.tokens().bytes()).map_err(device)?;
        self.ids.upload(0, input.topk_ids().bytes()).map_err(device)?;
        self.weights.upload(0, input.topk_weights().bytes()).map_err(device)?;
        self.params.n_tokens = small(input.num_tokens());
        Ok(())
    }

    /// Enqueues the quantization of the uploaded tokens into their slot images.
    pub fn launch_quantize(&self) -> Result<()> {
        self.quantize_from(self.tokens.ptr())
    }

    /// Enqueues the quantization of `n_tokens` tokens at device address `tokens`.
    fn quantize_from(&self, tokens: u64) -> Result<()> {
        let d = self.dispatch;
        let image = d.ids_offset();
        // SAFETY: `tokens` holds n <= max_tokens tokens of `hidden` 16-bit values (this rank's
        // upload buffer, or device inputs `dispatch_device` checked) and `images` max_tokens rows
        // of `image` bytes, with the scales at `scales_offset` inside each row.
        unsafe {
            self.gpu.quantize_raw(
                &QuantSpec::of_layer(&self.layer),
                &self.layer.quant.params,
                tokens,
                self.params.n_tokens as usize,
                self.images.ptr(),
                image,
                self.images.ptr() + d.scales_offset() as u64,
                image,
            )
        }
        .map_err(device)
    }

    /// Enqueues a protocol phase: `Dispatch` (begin + plan + dispatch) or `Combine` (begin +
    /// send + reduce). Nothing waits for the host; call [`Self::finish`] to learn how it ended.
    pub fn launch(&self, phase: Phase) -> Result<()> {
        self.launch_with(phase, &self.params)
    }

    fn launch_with(&self, phase: Phase, params: &TwoSidedParams) -> Result<()> {
        for step in phase.steps() {
            // SAFETY: `params` addresses this rank's buffers (allocated in `new` for max_tokens
            // tokens, `layout.rows()` expert rows and the layer's experts, held by `self`) or
            // the caller's device tensors of the shapes `dispatch_device` / `combine_device`
            // checked, and every peer's workspace of the layout's size (checked in `new`, held
            // in `self.workspaces`); the plan kernel checks ids against num_experts and owners
            // are below ep; n_tokens <= max_tokens (PrepareInput).
            unsafe { self.gpu.two_sided_call(*step, params, self.launch) }.map_err(device)?;
        }
        Ok(())
    }

    /// Waits for the stream and reports an error the kernels recorded (a timed-out wait of
    /// `phase`, naming the rank it waited for, or a bad id in a device input).
    pub fn finish(&self, phase: Phase) -> Result<()> {
        self.status.finish(phase.op())
    }

    /// Reports an error the kernels recorded so far, without waiting for the stream: work still
    /// running can record one later (see [`Self::finish`]).
    pub fn check_status(&self) -> Result<()> {
        self.status.check("two-sided dispatch or combine")
    }

    /// Enqueues the quantization and dispatch of device-resident inputs (on this rank's GPU),
    /// read in place; nothing waits for the host. Ids are checked by the plan kernel (see
    /// [`Self::check_status`]). The inputs must stay unchanged until the dispatch has run on
    /// the stream.
    pub fn dispatch_device(&mut self, input: PrepareInput<'_>) -> Result<()> {
        let [tokens, ids, weights] = prepare_addresses(&self.gpu, &self.layer, &input)?;
        self.params.n_tokens = small(input.num_tokens());
        self.quantize_from(tokens)?;
        let params = TwoSidedParams {
            ids,
            weights,
            ..self.params
        };
        self.launch_with(Phase::Dispatch, &params)
    }

    /// Enqueues the combine of the experts' device-resident rows (`[ranks * max_tokens,
    /// hidden]`, Standard format) into `out` (`[n, hidden]` on this rank's GPU, n the tokens
    /// of the last dispatch); nothing waits for the host. Rows already in
    /// [`Self::expert_output_tensor`] are not copied.
    pub fn combine_device(&self, expert_output: &Tensor, out: &Tensor) -> Result<()> {
        let rows = self.layout.rows();
        let n = self.params.n_tokens as usize;
        let [src, out] = finalize_addresses(&self.gpu, &self.layer, &[rows], n, expert_output, out)?;
        if src != self.expert_out.ptr() {
            // SAFETY: `expert_output` was checked to be [rows, hidden] of the input dtype on
            // this GPU, the size of `expert_out`; the caller keeps it alive and unchanged until
            // the combine has run, as for any enqueued work.
            unsafe {
                self.expert_out
                    .copy_from_device_async(0, src, rows * self.dispatch.combine_row_bytes)
            }
            .map_err(device)?;
        }
        let params = TwoSidedParams { out, ..self.params };
        self.launch_with(Phase::Combine, &params)
    }

    /// Where the experts' rows go, `[ranks * max_tokens, hidden]`: experts that write their
    /// output here spare the combine a copy.
    pub fn expert_output_tensor(&self) -> Result<Tensor> {
        device_tensor(
            &self.expert_out,
            0,
            self.layer.moe.input_dtype.dtype(),
            &[self.layout.rows(), self.dispatch.hidden],
        )
    }

    /// A delivery of this layer's layout for this rank's received rows (allocates: construct
    /// it with the backend, before any rank dispatches).
    pub fn new_delivery(&self) -> Result<StandardDelivery> {
        StandardDelivery::new(
            &self.gpu,
            self.dispatch,
            self.layout.rows(),
            self.layer.quant.received_scale_layout(self.layer.moe.input_dtype),
        )
        .map_err(device)
    }

    /// Enqueues the delivery of the last dispatch's rows as Standard tensors on the GPU
    /// (`delivery` from [`Self::new_delivery`]): rows dense in source order, as the host
    /// platform delivers them.
    pub fn deliver(&self, delivery: &StandardDelivery) -> Result<()> {
        let (l, me) = (self.layout, self.me);
        let base = self.workspaces[me].ptr();
        let from = ReceivedSlots {
            slots: base + l.dispatch_region() as u64,
            // Column `me` of the [ep, ep] count matrix: what each source sent here.
            counts: base + (l.counts_row_offset(0) + 4 * me) as u64,
            counts_stride: l.ep,
            sources: l.ep,
            rows_per_source: None,
        };
        // SAFETY: the slots and the count matrix are this rank's workspace of the layer's
        // layout, held by `self`, with `layout.rows()` rows, which is what `new_delivery`
        // sized the delivery for.
        unsafe { delivery.launch(&from) }.map_err(device)
    }

    /// Quantizes and dispatches on the GPU; returns what this rank received (Standard format,
    /// downloaded) and the tokens each source sent it.
    pub fn dispatch(&mut self, input: PrepareInput<'_>) -> Result<(Dispatched, Vec<usize>)> {
        self.upload_inputs(input)?;
        self.launch_quantize()?;
        self.launch(Phase::Dispatch)?;
        self.finish(Phase::Dispatch)?;
        self.received()
    }

    /// What the last dispatch delivered to this rank (downloaded, Standard format: rows
    /// `[0, received)` dense, grouped by source in rank order, then padding, as the host
    /// platform's `prepare`) and the tokens each source sent it.
    pub fn received(&self) -> Result<(Dispatched, Vec<usize>)> {
        let (d, l, me) = (self.dispatch, self.layout, self.me);
        let mut raw = vec![0u8; 4 * l.ep * l.ep];
        self.workspaces[me]
            .download(l.counts_row_offset(0), &mut raw)
            .map_err(device)?;
        let counts = CountMatrix::new(
            l.ep,
            raw.chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
        );
        let recv: Vec<usize> = (0..l.ep).map(|s| counts.get(s, me)).collect();
        let mut slots = vec![0u8; counts.received(me) * d.slot_bytes()];
        self.workspaces[me]
            .download(l.dispatch_region(), &mut slots)
            .map_err(device)?;
        let mut received = ReceivedRows::new(d, l.rows());
        for (r, slot) in slots.chunks_exact(d.slot_bytes()).enumerate() {
            received.fill(r, slot);
        }
        let scale_layout = self.layer.quant.received_scale_layout(self.layer.moe.input_dtype);
        Ok((received.into_standard(scale_layout)?, recv))
    }

    /// Uploads the experts' rows (`[ranks * max_tokens, hidden]`, Standard format).
    pub fn upload_expert_output(&self, expert_output: &Tensor) -> Result<()> {
        let dtype = self.layer.moe.input_dtype.dtype();
        expert_output.expect(
            "combine",
            "expert_output",
            dtype,
            &[self.layout.rows(), self.dispatch.hidden],
        )?;
        self.expert_out.upload(0, expert_output.bytes()).map_err(device)
    }

    /// Downloads the combined output of the last combine into `out` (`[n, hidden]`).
    pub fn download_output(&self, out: &mut Tensor) -> Result<()> {
        let dtype = self.layer.moe.input_dtype.dtype();
        out.expect(
            "combine",
            "out",
            dtype,
            &[self.params.n_tokens as usize, self.dispatch.hidden],
        )?;
        self.out.download(0, out.bytes_mut()).map_err(device)
    }

    /// Combines the experts' rows on the GPU into `out` (`[n, hidden]`, n the tokens of the
    /// last dispatch).
    pub fn combine(&mut self, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        self.upload_expert_output(expert_output)?;
        self.launch(Phase::Combine)?;
        self.finish(Phase::Combine)?;
        self.download_output(out)
    }

    /// Captures a phase (with the quantization before it, for `Dispatch`) as a CUDA graph on
    /// this rank's stream. The round counter and the count matrix live in device memory, so
    /// replays stay in step with the peers; the token count of the last upload is baked in,
    /// like an engine's graph per batch size. Capture on every rank before any rank replays:
    /// instantiating a graph allocates device memory (see `moe_kernels::platform`).
    pub fn capture(&self, phase: Phase) -> Result<CudaGraph> {
        self.gpu.capture_graph(|| match phase {
            Phase::Dispatch => self.launch_quantize().and_then(|()| self.launch(Phase::Dispatch)),
            Phase::Combine => self.launch(Phase::Combine),
        })
    }
}
