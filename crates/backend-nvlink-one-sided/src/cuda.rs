//! The one-sided protocol on NVIDIA GPUs: the same workspace layout, slots, counters, flags and
//! round counter as the host platform, run by the kernels of `moe-kernels` (one_sided.cu).
//!
//! Dispatch quantizes on the way (one kernel); the experts write their rows straight into this
//! rank's combine region ([`GpuOneSided::expert_output_ptr`]), where the peers pull them from,
//! so combine has no staging copy.
//!
//! The host-tensor methods (`dispatch`, `received`, `combine`, the uploads and downloads) stage
//! through host memory so that host experts (the reference experts) can run in between. The
//! steady-state path neither synchronizes with the host nor allocates: `dispatch_device` /
//! `combine_device` on device tensors, `launch`/`capture`, and the device addresses. Errors
//! the kernels record (a timed-out wait, a bad id in a device input) reach the host through a
//! host-mapped status word: [`GpuOneSided::check_status`] reads it without waiting,
//! [`GpuOneSided::finish`] after the stream drained.
//!
//! # The shared workspace
//!
//! A layer runs on the workspace of a [`GpuWorkspaceGroup`]: its own one ([`GpuOneSided::new`]),
//! or the one every layer constructed on the rank shares with the other layers of its EP group
//! ([`gpu_workspace_group`], [`admit`], [`GpuOneSided::in_group`]; the registry's constructor
//! does this), grown to the union of their layouts when a larger layer is admitted. A layer
//! holds the group, not its memory: it records the generation its kernel parameters address,
//! and the first step of each call ([`GpuOneSided::upload_inputs`],
//! [`GpuOneSided::dispatch_device`]) re-points them at a newer generation (host work only: no
//! allocation, nothing enqueued). Every later step refuses to run on a workspace rebuilt since
//! the call's dispatch, as the host platform's finalize does. A rebuild frees the old workspace
//! once every member's stream has drained, so tensors handed out in place keep it alive until
//! they are dropped, and CUDA graphs, which keep addressing the workspace they were captured
//! on, are captured only after every layer is constructed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_core::host::HostRank;
use moe_core::slots::ReceivedRows;
use moe_core::{
    ActivationFormat, DType, DispatchLayout, Dispatched, LayerConfig, MoeError, PrepareInput, Result, ScaleLayout,
    Tensor, quant::swizzle,
};
use moe_kernels::KernelError;
use moe_kernels::batched::{BatchedDelivery, StandardRows};
use moe_kernels::cudarc::driver::CudaGraph;
use moe_kernels::deliver::standard_tensors;
use moe_kernels::gpu::Gpu;
use moe_kernels::one_sided::{MAX_RANKS, OneSidedLaunch, OneSidedParams, OneSidedStep};
use moe_kernels::platform::{
    self, CudaRankDevice, CudaWorld, DeviceBuffer, KernelStatus, finalize_addresses, prepare_addresses,
    workspace_tensor,
};
use moe_kernels::source::QuantSpec;

use moe_core::workspace_group::{GroupLayout, Membership, lock};

use crate::{Field, LayerSlots, WorkspaceLayout};

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

/// The workspace group GPU rank `device` shares among the one-sided layers of the EP group
/// `ranks` of its world (see `CudaRankDevice::workspace_group`).
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
        "one-sided GPU workspace",
    )
}

/// One rank's one-sided backend on its GPU.
#[derive(Debug)]
pub struct GpuOneSided {
    layer: LayerConfig,
    dispatch: DispatchLayout,
    /// The layer's slots in the workspace of generation `generation`, which `params` address.
    slots: LayerSlots,
    generation: u64,
    /// The layer in its EP group's shared workspace.
    member: GpuMembership,
    gpu: Arc<Gpu>,
    me: usize,
    launch: OneSidedLaunch,
    params: OneSidedParams,
    tokens: DeviceBuffer,
    ids: DeviceBuffer,
    weights: DeviceBuffer,
    // Held for the params' addresses (the kernels read them; this side never does).
    _owner: DeviceBuffer,
    _send_target: DeviceBuffer,
    _send_slot: DeviceBuffer,
    _counters: DeviceBuffer,
    out: DeviceBuffer,
    /// The 128x4 swizzle of the received scales, when Standard-format experts want it.
    swizzled_scales: Option<Arc<DeviceBuffer>>,
    /// The BatchedExperts delivery and reduction, when the experts want that format.
    batched: Option<BatchedDelivery>,
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
    /// The kernel that runs the phase.
    fn step(self) -> OneSidedStep {
        match self {
            Phase::Dispatch => OneSidedStep::Dispatch,
            Phase::Combine => OneSidedStep::Combine,
        }
    }

    fn op(self) -> &'static str {
        match self {
            Phase::Dispatch => "one-sided dispatch",
            Phase::Combine => "one-sided combine",
        }
    }

    /// The contract's step the phase belongs to.
    fn call_step(self) -> &'static str {
        match self {
            Phase::Dispatch => "prepare",
            Phase::Combine => "finalize",
        }
    }
}

fn off(x: usize) -> i32 {
    i32::try_from(x).expect("moe invariant violated: a workspace offset above 2 GiB")
}

/// Points `params` at `workspaces` (every rank's), laid out as `slots` says: the sections and
/// regions of the group's layout. The row sizes and slots per source, the layer's, are set once
/// in `new`.
fn address_workspace(params: &mut OneSidedParams, slots: &LayerSlots, workspaces: &[DeviceBuffer]) {
    for (p, w) in params.peers.iter_mut().zip(workspaces) {
        *p = w.ptr();
    }
    let g = &slots.group;
    params.round_off = off(g.round_offset());
    params.recv_count_off = off(g.recv_count_offset(0));
    params.dispatch_flag_off = off(g.dispatch_flag_offset(0));
    params.combine_flag_off = off(g.combine_flag_offset(0));
    params.padded_tail_off = off(g.padded_tail_offset(0));
    params.payload_region_off = off(g.region(Field::Payload));
    params.scales_region_off = off(g.region(Field::Scales));
    params.ids_region_off = off(g.region(Field::Ids));
    params.weights_region_off = off(g.region(Field::Weights));
    params.combine_region_off = off(g.combine_region());
}

impl GpuOneSided {
    /// Rank `me` of `world` (allocates and loads its kernels: construct every rank before any
    /// rank dispatches) on a workspace of its own: `workspaces[r]` the workspace of rank `r` (at
    /// least `WorkspaceLayout::for_layer(layer, ..).bytes()` bytes, from
    /// `CudaWorld::symmetric_alloc`), shared by every rank's `GpuOneSided`.
    ///
    /// Fails with [`MoeError::Unsupported`] naming the first pair of ranks of `world` that
    /// cannot reach each other's memory (see `PeerMatrix::check_all_pairs`).
    pub fn new(
        layer: &LayerConfig,
        world: &CudaWorld,
        workspaces: Arc<Vec<DeviceBuffer>>,
        me: usize,
        timeout: Duration,
        launch: OneSidedLaunch,
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
        launch: OneSidedLaunch,
    ) -> Result<Self> {
        let dispatch = layer.dispatch_layout();
        let own = WorkspaceLayout::for_layer(layer, &dispatch);
        let (generation, layout, workspaces) = {
            let g = lock(&group);
            let w = g.current();
            (w.generation, w.layout, w.memory.clone())
        };
        let ep = layer.parallel.world_size();
        if ep != world.ranks() || ep > MAX_RANKS || workspaces.len() != ep {
            return Err(MoeError::InvalidInput {
                op: "GpuOneSided::new",
                detail: format!(
                    "{ep} EP ranks need one GPU and one workspace each (world {}, workspaces {}, at most {MAX_RANKS})",
                    world.ranks(),
                    workspaces.len()
                ),
            });
        }
        if dispatch.combine_slot_bytes() != dispatch.combine_row_bytes {
            return Err(MoeError::InvalidInput {
                op: "GpuOneSided::new",
                detail: format!(
                    "hidden {} gives {}-byte output rows, not a multiple of 16: the experts write rows in place in the combine region, which needs 16-byte rows (use a hidden size that is a multiple of 8)",
                    layer.moe.hidden, dispatch.combine_row_bytes
                ),
            });
        }
        world
            .peers()
            .check_all_pairs(&layer.parallel.world_group())
            .map_err(|e| MoeError::Unsupported(format!("GpuOneSided::new: {e}")))?;
        if !layout.covers(&own) {
            return Err(MoeError::InvalidInput {
                op: "GpuOneSided::in_group",
                detail: format!(
                    "the group's workspace ({layout:?}) does not hold this layer's ({own:?}): admit the layer to the group first (cuda::admit)"
                ),
            });
        }
        if let Some(w) = workspaces.iter().find(|w| w.bytes() < layout.bytes()) {
            return Err(MoeError::InvalidInput {
                op: "GpuOneSided::new",
                detail: format!(
                    "a workspace of {} bytes, the layout needs {}",
                    w.bytes(),
                    layout.bytes()
                ),
            });
        }
        let slots = LayerSlots::new(layout, own);
        let gpu = world.gpu(me).clone();
        let (max, k, h) = (own.max_tokens, layer.moe.top_k, layer.moe.hidden);
        let alloc = |bytes: usize| DeviceBuffer::zeroed(&gpu, bytes).map_err(device);
        let placement = layer.placement();
        let owner: Vec<i32> = (0..layer.moe.num_experts).map(|e| placement.owner(e) as i32).collect();
        let owner: Vec<u8> = owner.iter().flat_map(|o| o.to_le_bytes()).collect();
        let owner = DeviceBuffer::from_bytes(&gpu, &owner).map_err(device)?;
        let tokens = alloc(max * h * 2)?;
        let ids = alloc(max * k * 4)?;
        let weights = alloc(max * k * 4)?;
        let send_target = alloc(max * k * 4)?;
        let send_slot = alloc(max * k * 4)?;
        let counters = alloc((ep + 1) * 4)?;
        let out = alloc(max * dispatch.combine_row_bytes)?;
        let status = KernelStatus::new(&gpu, me, timeout).map_err(device)?;
        let swizzled_scales = match (
            layer.activation_format,
            layer.quant.received_scale_layout(layer.moe.input_dtype),
        ) {
            (ActivationFormat::Standard, Some(ScaleLayout::Swizzled128x4)) => {
                gpu.preload_swizzle().map_err(device)?;
                let len = swizzle::swizzled_len(ep * max, dispatch.wire.scales_per_token);
                Some(Arc::new(alloc(len)?))
            }
            _ => None,
        };
        let batched = match layer.activation_format {
            ActivationFormat::BatchedExperts => Some(
                BatchedDelivery::new(
                    &gpu,
                    dispatch,
                    ep * max,
                    &layer.placement(),
                    me,
                    layer.quant.received_scale_layout(layer.moe.input_dtype),
                )
                .map_err(device)?,
            ),
            ActivationFormat::Standard => None,
        };
        let clock_khz = gpu.clock_khz().map_err(device)?;
        gpu.load_one_sided(&QuantSpec::of_layer(layer)).map_err(device)?;
        let mut params = OneSidedParams {
            peers: [0u64; MAX_RANKS],
            ep: ep as i32,
            me: me as i32,
            max_tokens: max as i32,
            n_tokens: 0,
            top_k: k as i32,
            hidden: h as i32,
            input_bf16: i32::from(layer.moe.input_dtype == moe_core::InputDtype::Bf16),
            num_experts: layer.moe.num_experts as i32,
            payload_bytes: off(own.payload_bytes),
            scale_bytes: off(own.scale_bytes),
            combine_slot_bytes: off(own.combine_slot_bytes),
            combine_row_bytes: off(dispatch.combine_row_bytes),
            // Set by `address_workspace`, with `peers`.
            round_off: 0,
            recv_count_off: 0,
            dispatch_flag_off: 0,
            combine_flag_off: 0,
            padded_tail_off: 0,
            payload_region_off: 0,
            scales_region_off: 0,
            ids_region_off: 0,
            weights_region_off: 0,
            combine_region_off: 0,
            tokens: tokens.ptr(),
            ids: ids.ptr(),
            weights: weights.ptr(),
            owner: owner.ptr(),
            send_target: send_target.ptr(),
            send_slot: send_slot.ptr(),
            counters: counters.ptr(),
            status: status.word_ptr(),
            status_mirror: status.mirror_ptr(),
            out: out.ptr(),
            trace: 0,
            timeout_cycles: (timeout.as_secs_f64() * clock_khz as f64 * 1e3) as i64,
            fp8_static_scale: layer.quant.params.fp8_static_scale,
            nvfp4_global_scale: layer.quant.params.nvfp4_global_scale,
        };
        address_workspace(&mut params, &slots, &workspaces);
        Ok(GpuOneSided {
            layer: layer.clone(),
            dispatch,
            slots,
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
            _counters: counters,
            status,
            out,
            swizzled_scales,
            batched,
        })
    }

    /// Has every later call stamp its phases into `words` (the device address of
    /// `moe_kernels::one_sided::TRACE_WORDS` u64 words on this rank's GPU, reset by the caller
    /// before each call to `TracePoint::reset_words`), or stop (0): for profiling where a call's
    /// time goes. The caller keeps the words alive while calls may stamp them.
    pub fn set_trace(&mut self, words: u64) {
        self.params.trace = words;
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
            self.slots = LayerSlots::new(layout, self.slots.own);
            address_workspace(&mut self.params, &self.slots, &memory);
            self.generation = generation;
        }
    }

    /// Every rank's workspace, which the parameters address; fails (naming `op`) when the group
    /// was rebuilt since this call's dispatch.
    fn workspaces(&self, op: &'static str) -> Result<Arc<Vec<DeviceBuffer>>> {
        Ok(self.member.workspace_of(self.generation, op)?.1)
    }

    /// The blocks and threads per block `phase`'s kernel launches with for the current inputs
    /// (one block per SM: the SMs it takes).
    pub fn grid(&self, phase: Phase) -> Result<(u32, u32)> {
        let step = phase.step();
        let spec = QuantSpec::of_layer(&self.layer);
        self.gpu
            .one_sided_grid(&spec, step, &self.params, self.launch)
            .map_err(device)
    }

    /// Uploads this call's tokens, ids and weights: the first step of a call on host inputs,
    /// which follows the group to its current workspace.
    pub fn upload_inputs(&mut self, input: PrepareInput<'_>) -> Result<()> {
        self.follow_group();
        self.tokens.upload(0, input.tokens().bytes()).map_err(device)?;
        self.ids.upload(0, input.topk_ids().bytes()).map_err(device)?;
        self.weights.upload(0, input.topk_weights().bytes()).map_err(device)?;
        self.params.n_tokens = input.num_tokens() as i32;
        Ok(())
    }

    /// Enqueues a protocol phase, one kernel each: `Dispatch` (quantize and send) or `Combine`
    /// (publish the experts' rows, then pull and sum). Nothing waits for the host; call
    /// [`Self::finish`] to learn how it ended. Fails when the group's workspace was rebuilt
    /// since the last [`Self::upload_inputs`].
    pub fn launch(&self, phase: Phase) -> Result<()> {
        self.workspaces(phase.call_step())?;
        self.launch_with(phase, &self.params)
    }

    fn launch_with(&self, phase: Phase, params: &OneSidedParams) -> Result<()> {
        let step = phase.step();
        let spec = QuantSpec::of_layer(&self.layer);
        // SAFETY: `params` addresses this rank's buffers (allocated in `new` for max_tokens
        // tokens and held by `self`) or the caller's device tensors of the shapes
        // `dispatch_device` / `combine_device` checked, and every peer's workspace of the
        // group's current generation (callers checked the generation; the group holds it),
        // whose layout covers this layer's (checked in `in_group` and by the group's
        // admission); ep and top_k are within the kernels' limits (checked in `new`); `new`
        // loaded the kernels.
        unsafe { self.gpu.one_sided_call(&spec, step, params, self.launch) }.map_err(device)?;
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
        self.status.check("one-sided dispatch or combine")
    }

    /// Enqueues the quantization and dispatch of device-resident inputs (on this rank's GPU),
    /// read in place; nothing waits for the host. Ids are checked by the kernel (see
    /// [`Self::check_status`]). The inputs must stay unchanged until the dispatch has run on
    /// the stream. The first step of a call on device inputs, which follows the group to its
    /// current workspace.
    pub fn dispatch_device(&mut self, input: PrepareInput<'_>) -> Result<()> {
        let [tokens, ids, weights] = prepare_addresses(&self.gpu, &self.layer, &input)?;
        self.follow_group();
        self.params.n_tokens = input.num_tokens() as i32;
        let params = OneSidedParams {
            tokens,
            ids,
            weights,
            ..self.params
        };
        self.launch_with(Phase::Dispatch, &params)
    }

    /// Enqueues the combine of the experts' device-resident rows (`[ranks * max_tokens,
    /// hidden]`, Standard format) into `out` (`[n, hidden]` on this rank's GPU, n the tokens
    /// of the last dispatch); nothing waits for the host. Rows already at
    /// [`Self::expert_output_ptr`] (the experts wrote into [`Self::expert_output_tensor`])
    /// are not copied.
    pub fn combine_device(&self, expert_output: &Tensor, out: &Tensor) -> Result<()> {
        let workspaces = self.workspaces("finalize")?;
        let rows = self.slots.rows();
        let n = self.params.n_tokens as usize;
        if let Some(batched) = &self.batched {
            let lead = [batched.local_experts(), rows];
            let [src, out] = finalize_addresses(&self.gpu, &self.layer, &lead, n, expert_output, out)?;
            // SAFETY: `src` was checked to be [local_experts, rows, hidden] of the input dtype
            // on this GPU, which the caller keeps unchanged until the combine has run; the
            // combine region holds the layer's `rows` rows of combine_slot_bytes in this rank's
            // workspace (the group holds it), apart from any tensor the caller owns; the
            // delivery was launched by this call's prepare.
            unsafe {
                batched.reduce(
                    src,
                    self.expert_output_ptr(),
                    self.dispatch.combine_slot_bytes(),
                    self.layer.moe.input_dtype.dtype(),
                )
            }
            .map_err(device)?;
            return self.launch_with(Phase::Combine, &OneSidedParams { out, ..self.params });
        }
        let [src, out] = finalize_addresses(&self.gpu, &self.layer, &[rows], n, expert_output, out)?;
        if src != self.expert_output_ptr() {
            // SAFETY: `expert_output` was checked to be [rows, hidden] of the input dtype on
            // this GPU, exactly the layer's combine rows; the caller keeps it alive and
            // unchanged until the combine has run, as for any enqueued work.
            unsafe {
                workspaces[self.me].copy_from_device_async(
                    self.slots.group.combine_region(),
                    src,
                    rows * self.dispatch.combine_row_bytes,
                )
            }
            .map_err(device)?;
        }
        let params = OneSidedParams { out, ..self.params };
        self.launch_with(Phase::Combine, &params)
    }

    /// Enqueues what the Standard format's tensors need beyond the regions the dispatch filled
    /// (the scales' 128x4 swizzle, when the experts want it) and returns the last dispatch's
    /// rows as device tensors, in place in this rank's workspace: `[ranks * max_tokens, ..]`,
    /// row `s * max_tokens + t` the token source `s` sent in slot `t`, unfilled rows padding.
    /// They stay valid until this rank's next combine lets the peers dispatch again (and keep
    /// the workspace alive: drop them before constructing another layer).
    pub fn received_tensors(&self) -> Result<Dispatched> {
        let workspaces = self.workspaces("prepare")?;
        let d = self.dispatch;
        let (rows, k) = (self.slots.rows(), d.top_k);
        let region_offset = |field: Field| self.slots.group.region(field);
        if let Some(batched) = &self.batched {
            let region = |field: Field| workspaces[self.me].ptr() + region_offset(field) as u64;
            let from = StandardRows::field_major(
                region(Field::Payload),
                region(Field::Scales),
                region(Field::Ids),
                region(Field::Weights),
                &d,
                rows,
            );
            // SAFETY: the regions hold the layer's dense `rows` rows in this rank's workspace
            // (the group holds it), filled by the dispatch before on this stream, with ids -1
            // in every unfilled row (the dispatch's padding reset) and only this rank's
            // experts otherwise; the delivery was built for `rows` rows of the layer's layout.
            unsafe { batched.launch(&from) }.map_err(device)?;
            return batched.dispatched();
        }
        let region = |field: Field, dtype: DType, cols: usize| {
            workspace_tensor(&workspaces, self.me, region_offset(field), dtype, &[rows, cols])
        };
        let scale_layout = self.layer.quant.received_scale_layout(self.layer.moe.input_dtype);
        if let (Some(ScaleLayout::Swizzled128x4), Some(swizzled)) = (scale_layout, &self.swizzled_scales) {
            let linear = workspaces[self.me].ptr() + region_offset(Field::Scales) as u64;
            // SAFETY: the scales region holds the layer's linear [rows, scales_per_token]
            // matrix (the workspace is held by `workspaces`) and `swizzled` its swizzled_len
            // bytes (allocated in `new` for these rows).
            unsafe {
                self.gpu
                    .swizzle_128x4_raw(linear, rows, d.wire.scales_per_token, swizzled.ptr())
            }
            .map_err(device)?;
        }
        standard_tensors(
            &d,
            scale_layout,
            region(Field::Payload, DType::U8, d.wire.payload_bytes)?,
            region(Field::Scales, DType::U8, d.wire.scale_bytes)?,
            self.swizzled_scales.as_ref(),
            region(Field::Ids, DType::I32, k)?,
            region(Field::Weights, DType::F32, k)?,
        )
    }

    /// [`Self::expert_output_ptr`] as a device tensor `[ranks * max_tokens, hidden]`: experts
    /// that write their output here spare the combine a copy.
    pub fn expert_output_tensor(&self) -> Result<Tensor> {
        workspace_tensor(
            &self.workspaces("prepare")?,
            self.me,
            self.slots.group.combine_region(),
            self.layer.moe.input_dtype.dtype(),
            &[self.slots.rows(), self.dispatch.hidden],
        )
    }

    /// Quantizes and dispatches on the GPU; returns what this rank received (Standard format,
    /// downloaded) and the tokens each source sent it.
    pub fn dispatch(&mut self, input: PrepareInput<'_>) -> Result<(Dispatched, Vec<usize>)> {
        self.dispatch_and_wait(input)?;
        self.received()
    }

    /// [`Self::dispatch`], returning the received rows before they take a format.
    pub fn dispatch_rows(&mut self, input: PrepareInput<'_>) -> Result<(ReceivedRows, Vec<usize>)> {
        self.dispatch_and_wait(input)?;
        self.received_rows()
    }

    fn dispatch_and_wait(&mut self, input: PrepareInput<'_>) -> Result<()> {
        self.upload_inputs(input)?;
        self.launch(Phase::Dispatch)?;
        self.finish(Phase::Dispatch)
    }

    /// What the last dispatch delivered to this rank (downloaded, Standard format) and the
    /// tokens each source sent it.
    pub fn received(&self) -> Result<(Dispatched, Vec<usize>)> {
        let (received, recv) = self.received_rows()?;
        let scale_layout = self.layer.quant.received_scale_layout(self.layer.moe.input_dtype);
        Ok((received.into_standard(scale_layout)?, recv))
    }

    /// The rows the last dispatch delivered to this rank (downloaded; row `s * max_tokens + t`
    /// is source `s`'s slot `t`) and the tokens each source sent it.
    pub fn received_rows(&self) -> Result<(ReceivedRows, Vec<usize>)> {
        let ws = self.download_workspace(0, self.slots.group.combine_region())?;
        let recv: Vec<usize> = (0..self.slots.own.ep)
            .map(|s| {
                let o = self.slots.group.recv_count_offset(s);
                u32::from_le_bytes(ws[o..o + 4].try_into().expect("4 bytes")) as usize
            })
            .collect();
        let received = self.slots.received_rows(self.dispatch, &recv, |at, bytes| {
            bytes.copy_from_slice(&ws[at..at + bytes.len()])
        });
        Ok((received, recv))
    }

    /// Where the experts write their output: `[ranks * max_tokens, hidden]` rows of the input
    /// dtype (Standard format, the row of the token received from source `s` in slot `t` at
    /// `s * max_tokens + t`), in this rank's combine region of the workspace of the last
    /// dispatch. Write them after the dispatch completed on this rank's stream (stream order
    /// does it) and before the combine.
    pub fn expert_output_ptr(&self) -> u64 {
        self.params.peers[self.me] + self.slots.group.combine_region() as u64
    }

    /// Uploads the experts' rows (`[ranks * max_tokens, hidden]`, Standard format) to
    /// [`Self::expert_output_ptr`].
    pub fn upload_expert_output(&self, expert_output: &Tensor) -> Result<()> {
        let dtype = self.layer.moe.input_dtype.dtype();
        let rows = self.slots.rows();
        expert_output.expect("combine", "expert_output", dtype, &[rows, self.dispatch.hidden])?;
        self.workspaces("finalize")?[self.me]
            .upload(self.slots.group.combine_region(), expert_output.bytes())
            .map_err(device)
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

    /// Captures a phase as a CUDA graph on this rank's stream. The round counter lives in device
    /// memory, so replays stay in step with the peers; the token count of the last upload is
    /// baked in, like an engine's graph per batch size, and so is the workspace: capture after
    /// every layer of the group is constructed (a rebuild frees the workspace a graph
    /// addresses). Capture on every rank before any rank replays (see `Gpu::capture_graph`).
    pub fn capture(&self, phase: Phase) -> Result<CudaGraph> {
        self.gpu.capture_graph(|| self.launch(phase))
    }

    /// This rank's workspace bytes `[offset, offset + len)`.
    fn download_workspace(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.workspaces("prepare")?[self.me]
            .download(offset, &mut v)
            .map_err(device)?;
        Ok(v)
    }
}
