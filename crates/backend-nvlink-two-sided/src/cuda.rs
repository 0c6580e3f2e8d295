//! The two-sided protocol on NVIDIA GPUs: the same workspace layout, count matrix, slots,
//! flags and round counter as the host platform, run by the kernels of `moe-kernels`
//! (two_sided.cu), so for the same inputs both deliver the same rows in the same order and
//! combine to the same bits.
//!
//! The plan kernel numbers each token's sends as [`moe_core::routing::SendPlan`] does (per
//! destination rank, in token order), so source `s`'s `slot`-th token to rank `r` lands in the
//! row the host puts it in, `CountMatrix::dispatch_row(s, r) + slot`. The dispatch kernel
//! quantizes each token on the way into its slots (the kernels are specialized on the wire
//! scheme), bit for bit as the host's `slots::encode_tokens`.
//!
//! The host-tensor methods (`dispatch`, `received`, `combine`, the uploads and downloads) stage
//! through host memory so that host experts (the reference experts) can run in between. The
//! steady-state path neither synchronizes with the host nor allocates: `dispatch_device` /
//! `combine_device` on device tensors, `launch`/`capture`. Errors the kernels record (a
//! timed-out wait, a bad id in a device input) reach the host through a host-mapped status
//! word: [`GpuTwoSided::check_status`] reads it without waiting, [`GpuTwoSided::finish`] after
//! the stream drained.
//!
//! # The shared workspace
//!
//! A layer runs on the workspace of a [`GpuWorkspaceGroup`]: its own one ([`GpuTwoSided::new`]),
//! or the one every layer constructed on the rank shares with the other layers of its EP group
//! ([`gpu_workspace_group`], [`admit`], [`GpuTwoSided::in_group`]; the registry's constructor
//! does this), grown to the union of their layouts when a larger layer is admitted. The round
//! counter, count matrix and flags are the group's; each layer packs its own rows from the
//! start of the group's regions ([`LayerRows`]), so the kernels take the group's section and
//! region offsets and the layer's `max_tokens` and row sizes. A layer holds the group, not its
//! memory: it records the generation its kernel parameters address, and the first step of
//! each call ([`GpuTwoSided::upload_inputs`], [`GpuTwoSided::dispatch_device`]) re-points them
//! at a newer generation (host work only: no allocation, nothing enqueued). Every later step
//! refuses to run on a workspace rebuilt since the call's dispatch, as the host platform's
//! finalize does. A rebuild frees the old workspace once every member's stream has drained.
//! Nothing this layer hands out lies in the workspace (the delivery and the experts' output
//! are buffers of the layer's own), so no tensor keeps an old one alive; CUDA graphs, which
//! keep addressing the workspace they were captured on, are captured only after every layer
//! is constructed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_core::host::HostRank;
use moe_core::slots::ReceivedRows;
use moe_core::workspace_group::{GroupLayout, Membership, lock};
use moe_core::{DispatchLayout, Dispatched, LayerConfig, MoeError, PrepareInput, Result, Tensor};
use moe_kernels::KernelError;
use moe_kernels::cudarc::driver::CudaGraph;
use moe_kernels::deliver::{ReceivedSlots, StandardDelivery};
use moe_kernels::gpu::Gpu;
use moe_kernels::platform::{
    self, CudaRankDevice, CudaWorld, DeviceBuffer, KernelStatus, device_tensor, finalize_addresses, prepare_addresses,
};
use moe_kernels::source::{Module, QuantSpec};
use moe_kernels::two_sided::{MAX_RANKS, TwoSidedLaunch, TwoSidedParams, TwoSidedStep};

use crate::{CountMatrix, LayerRows, WorkspaceLayout};

fn device(e: KernelError) -> MoeError {
    MoeError::Device(e.to_string())
}

/// The workspace group of one GPU rank: every rank's device buffer of the current generation
/// (entry `r` on rank `r`'s GPU).
pub type GpuWorkspaceGroup = platform::GpuWorkspaceGroup<WorkspaceLayout>;

/// A handle to one GPU rank's workspace group, shared by its layers.
pub type SharedGpuGroup = platform::SharedGpuGroup<WorkspaceLayout>;

/// A layer's place in its GPU workspace group.
pub type GpuMembership = platform::GpuMembership<WorkspaceLayout>;

/// The workspace group GPU rank `device` shares among the two-sided layers of the EP group
/// `ranks` of its world (see `CudaRankDevice::workspace_group`; never one-sided's).
pub fn gpu_workspace_group(host: &HostRank, device: &CudaRankDevice, ranks: &[usize]) -> SharedGpuGroup {
    device.workspace_group(host, crate::NAME, ranks)
}

/// Admits `layer` to `group` on GPU rank `device` (collective over the layer's EP group; see
/// `CudaRankDevice::admit`, which drains every member's stream and waits for the others
/// before the workspace is rebuilt).
pub fn admit(group: &SharedGpuGroup, layer: &LayerConfig, host: &HostRank, device: &CudaRankDevice) -> Result<()> {
    let needed = WorkspaceLayout::for_layer(layer, &layer.dispatch_layout());
    device.admit(
        group,
        layer,
        needed,
        WorkspaceLayout::bytes,
        host,
        "two-sided GPU workspace",
    )
}

/// One rank's two-sided backend on its GPU.
#[derive(Debug)]
pub struct GpuTwoSided {
    layer: LayerConfig,
    dispatch: DispatchLayout,
    /// The layer's rows in the workspace of generation `generation`, which `params` address.
    rows: LayerRows,
    generation: u64,
    /// The layer in its EP group's shared workspace.
    member: GpuMembership,
    gpu: Arc<Gpu>,
    me: usize,
    launch: TwoSidedLaunch,
    params: TwoSidedParams,
    tokens: DeviceBuffer,
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

    /// The contract's step the phase belongs to.
    fn call_step(self) -> &'static str {
        match self {
            Phase::Dispatch => "prepare",
            Phase::Combine => "finalize",
        }
    }

    /// The kernels of the phase, in stream order.
    fn steps(self) -> &'static [TwoSidedStep] {
        match self {
            Phase::Dispatch => &[TwoSidedStep::Plan, TwoSidedStep::Dispatch],
            Phase::Combine => &[TwoSidedStep::CombineSend, TwoSidedStep::CombineReduce],
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

/// Points `params` at `workspaces` (every rank's), laid out as `rows` says: the sections and
/// regions of the group's layout. The rows per source and row sizes, the layer's, are set once
/// in `in_group`.
fn address_workspace(params: &mut TwoSidedParams, rows: &LayerRows, workspaces: &[DeviceBuffer]) {
    for (p, w) in params.peers.iter_mut().zip(workspaces) {
        *p = w.ptr();
    }
    let g = &rows.group;
    params.dispatch_region_off = large(g.dispatch_region());
    params.combine_region_off = large(g.combine_region());
    params.round_off = small(g.round_offset());
    params.counts_off = small(g.counts_row_offset(0));
    params.counts_flag_off = small(g.counts_flag_offset(0));
    params.data_flag_off = small(g.data_flag_offset(0));
    params.combine_flag_off = small(g.combine_flag_offset(0));
}

impl GpuTwoSided {
    /// Rank `me` of `world` (allocates and loads its kernels: construct every rank before any
    /// rank dispatches) on a workspace of its own: `workspaces[r]` the workspace of rank `r`
    /// (at least `WorkspaceLayout::for_layer(layer, ..).bytes()` bytes, from
    /// `CudaWorld::symmetric_alloc`), shared by every rank's `GpuTwoSided`.
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
        let layout = WorkspaceLayout::for_layer(layer, &layer.dispatch_layout());
        let group = GpuWorkspaceGroup::with_memory(layer, layout, workspaces);
        Self::in_group(layer, world, Arc::new(Mutex::new(group)), me, timeout, launch)
    }

    /// Rank `me` of `world` (allocates and loads its kernels: construct every rank before any
    /// rank dispatches) on the workspace of `group`, which has admitted the layer ([`admit`]),
    /// and whatever workspace the group has when each call starts.
    ///
    /// Fails with [`MoeError::Unsupported`] naming the first pair of ranks of `world` that
    /// cannot reach each other's memory (see `PeerMatrix::check_all_pairs`).
    pub fn in_group(
        layer: &LayerConfig,
        world: &CudaWorld,
        group: SharedGpuGroup,
        me: usize,
        timeout: Duration,
        launch: TwoSidedLaunch,
    ) -> Result<Self> {
        let dispatch = layer.dispatch_layout();
        let own = WorkspaceLayout::for_layer(layer, &dispatch);
        let (generation, layout, workspaces) = {
            let g = lock(&group);
            let w = g.current();
            (w.generation, w.layout, w.memory.clone())
        };
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
        if !layout.covers(&own) || layout.ep != own.ep {
            return Err(MoeError::InvalidInput {
                op: "GpuTwoSided::in_group",
                detail: format!(
                    "the group's workspace ({layout:?}) does not hold this layer's ({own:?}): admit the layer to the group of its EP group first (cuda::admit)"
                ),
            });
        }
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
        let rows = LayerRows::new(layout, own);
        let gpu = world.gpu(me).clone();
        let (max, k, h) = (own.max_tokens, layer.moe.top_k, layer.moe.hidden);
        let alloc = |bytes: usize| DeviceBuffer::zeroed(&gpu, bytes).map_err(device);
        let placement = layer.placement();
        let owner: Vec<u8> = (0..layer.moe.num_experts)
            .flat_map(|e| (placement.owner(e) as i32).to_le_bytes())
            .collect();
        let owner = DeviceBuffer::from_bytes(&gpu, &owner).map_err(device)?;
        let tokens = alloc(max * h * 2)?;
        let ids = alloc(max * k * 4)?;
        let weights = alloc(max * k * 4)?;
        let send_target = alloc(max * k * 4)?;
        let send_slot = alloc(max * k * 4)?;
        let done = alloc(4)?;
        let expert_out = Arc::new(alloc(rows.rows() * dispatch.combine_row_bytes)?);
        let out = alloc(max * dispatch.combine_row_bytes)?;
        let status = KernelStatus::new(&gpu, me, timeout).map_err(device)?;
        let clock_khz = gpu.clock_khz().map_err(device)?;
        // Loaded now, not at the first launch: loading a module while a peer's kernel spins
        // waiting for this rank can deadlock (see moe_kernels::platform).
        gpu.preload(&Module::TwoSided(QuantSpec::of_layer(layer)))
            .map_err(device)?;
        let mut params = TwoSidedParams {
            // Set by `address_workspace`, with the section and region offsets.
            peers: [0u64; MAX_RANKS],
            tokens: tokens.ptr(),
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
            dispatch_region_off: 0,
            combine_region_off: 0,
            timeout_cycles: (timeout.as_secs_f64() * clock_khz as f64 * 1e3) as i64,
            ep: ep as i32,
            me: me as i32,
            max_tokens: small(max),
            n_tokens: 0,
            top_k: k as i32,
            hidden: small(h),
            input_bf16: i32::from(layer.moe.input_dtype == moe_core::InputDtype::Bf16),
            // The layer's own row sizes, which `LayerRows` packs its rows at.
            slot_bytes: small(own.slot_bytes),
            image_bytes: small(dispatch.ids_offset()),
            weights_offset: small(dispatch.weights_offset()),
            combine_slot_bytes: small(own.combine_slot_bytes),
            combine_row_bytes: small(dispatch.combine_row_bytes),
            round_off: 0,
            counts_off: 0,
            counts_flag_off: 0,
            data_flag_off: 0,
            combine_flag_off: 0,
            num_experts: small(layer.moe.num_experts),
            fp8_static_scale: layer.quant.params.fp8_static_scale,
            nvfp4_global_scale: layer.quant.params.nvfp4_global_scale,
        };
        address_workspace(&mut params, &rows, &workspaces);
        Ok(GpuTwoSided {
            layer: layer.clone(),
            dispatch,
            rows,
            generation,
            member: Membership::new(group),
            gpu,
            me,
            launch,
            params,
            tokens,
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

    /// The layer in its workspace group: its turns (`Membership::prepare`, `finish_call`).
    pub fn member(&self) -> &GpuMembership {
        &self.member
    }

    /// The layout of the group's current workspace (the union of its layers').
    pub fn workspace_layout(&self) -> WorkspaceLayout {
        self.member.current().1
    }

    /// Re-points the kernel parameters at the group's current workspace when a larger layer's
    /// admission rebuilt it since this layer's last call (host work only). The first step of
    /// every call.
    fn follow_group(&mut self) {
        if let Some((generation, layout, memory)) = self.member.newer_than(self.generation) {
            self.rows = LayerRows::new(layout, self.rows.own);
            address_workspace(&mut self.params, &self.rows, &memory);
            self.generation = generation;
        }
    }

    /// Every rank's workspace, which the parameters address; fails (naming `op`) when the group
    /// was rebuilt since this call's dispatch.
    fn workspaces(&self, op: &'static str) -> Result<Arc<Vec<DeviceBuffer>>> {
        Ok(self.member.workspace_of(self.generation, op)?.1)
    }

    /// Uploads this call's tokens, ids and weights: the first step of a call on host inputs,
    /// which follows the group to its current workspace.
    pub fn upload_inputs(&mut self, input: PrepareInput<'_>) -> Result<()> {
        self.follow_group();
        self.tokens.upload(0, input.tokens().bytes()).map_err(device)?;
        self.ids.upload(0, input.topk_ids().bytes()).map_err(device)?;
        self.weights.upload(0, input.topk_weights().bytes()).map_err(device)?;
        self.params.n_tokens = small(input.num_tokens());
        Ok(())
    }

    /// Enqueues a protocol phase: `Dispatch` (plan + dispatch) or `Combine` (send + reduce).
    /// Nothing waits for the host; call [`Self::finish`] to learn how it ended. Fails when the
    /// group's workspace was rebuilt since the last [`Self::upload_inputs`].
    pub fn launch(&self, phase: Phase) -> Result<()> {
        self.workspaces(phase.call_step())?;
        self.launch_with(phase, &self.params)
    }

    fn launch_with(&self, phase: Phase, params: &TwoSidedParams) -> Result<()> {
        let spec = QuantSpec::of_layer(&self.layer);
        for step in phase.steps() {
            // SAFETY: `params` addresses this rank's buffers (allocated in `in_group` for
            // max_tokens tokens, `rows.rows()` expert rows and the layer's experts, held by
            // `self`) or the caller's device tensors of the shapes `dispatch_device` /
            // `combine_device` checked, and every peer's workspace of the group's current
            // generation (callers checked the generation; the group holds it), whose layout covers this
            // layer's rows at the offsets `address_workspace` set (checked in `in_group` and by
            // the group's admission); the plan kernel checks ids against num_experts and
            // owners are below ep; n_tokens <= max_tokens (PrepareInput); the slots are the
            // layer's DispatchLayout, of `spec`, whose module `in_group` loaded.
            unsafe { self.gpu.two_sided_call(&spec, *step, params, self.launch) }.map_err(device)?;
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
    /// the stream. The first step of a call on device inputs, which follows the group to its
    /// current workspace.
    pub fn dispatch_device(&mut self, input: PrepareInput<'_>) -> Result<()> {
        let [tokens, ids, weights] = prepare_addresses(&self.gpu, &self.layer, &input)?;
        self.follow_group();
        self.params.n_tokens = small(input.num_tokens());
        let params = TwoSidedParams {
            tokens,
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
        // Before the copy below: a call whose workspace was rebuilt enqueues nothing.
        self.workspaces("finalize")?;
        let rows = self.rows.rows();
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
            &[self.rows.rows(), self.dispatch.hidden],
        )
    }

    /// A delivery of this layer's layout for this rank's received rows (allocates: construct
    /// it with the backend, before any rank dispatches).
    pub fn new_delivery(&self) -> Result<StandardDelivery> {
        StandardDelivery::new(
            &self.gpu,
            self.dispatch,
            self.rows.rows(),
            self.layer.quant.received_scale_layout(self.layer.moe.input_dtype),
        )
        .map_err(device)
    }

    /// Enqueues the delivery of the last dispatch's rows as Standard tensors on the GPU
    /// (`delivery` from [`Self::new_delivery`]): rows dense in source order, as the host
    /// platform delivers them.
    pub fn deliver(&self, delivery: &StandardDelivery) -> Result<()> {
        let workspaces = self.workspaces("prepare")?;
        let (l, me) = (self.rows.group, self.me);
        let base = workspaces[me].ptr();
        let from = ReceivedSlots {
            slots: base + self.rows.dispatch_row_offset(0) as u64,
            // Column `me` of the [ep, ep] count matrix: what each source sent here.
            counts: base + (l.counts_row_offset(0) + 4 * me) as u64,
            counts_stride: l.ep,
            sources: l.ep,
            rows_per_source: None,
        };
        // SAFETY: the slots and the count matrix are in this rank's workspace of the group's
        // current generation (the group holds it; a rebuild drains this stream before freeing
        // it), where the layer's `rows.rows()` rows of its slot_bytes lie densely from the
        // dispatch region's start, which is what `new_delivery` sized the delivery for.
        unsafe { delivery.launch(&from) }.map_err(device)
    }

    /// Quantizes and dispatches on the GPU; returns what this rank received (Standard format,
    /// downloaded) and the tokens each source sent it.
    pub fn dispatch(&mut self, input: PrepareInput<'_>) -> Result<(Dispatched, Vec<usize>)> {
        self.upload_inputs(input)?;
        self.launch(Phase::Dispatch)?;
        self.finish(Phase::Dispatch)?;
        self.received()
    }

    /// What the last dispatch delivered to this rank (downloaded, Standard format: rows
    /// `[0, received)` dense, grouped by source in rank order, then padding, as the host
    /// platform's `prepare`) and the tokens each source sent it.
    pub fn received(&self) -> Result<(Dispatched, Vec<usize>)> {
        let workspaces = self.workspaces("prepare")?;
        let (d, l, me) = (self.dispatch, self.rows.group, self.me);
        let mut raw = vec![0u8; 4 * l.ep * l.ep];
        workspaces[me]
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
        workspaces[me]
            .download(self.rows.dispatch_row_offset(0), &mut slots)
            .map_err(device)?;
        let mut received = ReceivedRows::new(d, self.rows.rows());
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
            &[self.rows.rows(), self.dispatch.hidden],
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

    /// Captures a phase as a CUDA graph on this rank's stream. The round counter and the count matrix live in device memory, so
    /// replays stay in step with the peers; the token count of the last upload is baked in,
    /// like an engine's graph per batch size, and so is the workspace: capture after every
    /// layer of the group is constructed (a rebuild frees the workspace a graph addresses).
    /// Capture on every rank before any rank replays: instantiating a graph allocates device
    /// memory (see `moe_kernels::platform`).
    pub fn capture(&self, phase: Phase) -> Result<CudaGraph> {
        self.gpu.capture_graph(|| self.launch(phase))
    }
}
