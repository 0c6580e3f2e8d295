//! A peer-memory protocol on NVIDIA GPUs: [`CudaPeerRank`], one rank of any [`CudaProtocol`] on its
//! GPU, and [`CudaPeer`], its `PrepareFinalize` (module `backend`), over the workspace groups of
//! module `group`.
//!
//! A [`CudaPeerRank`] runs the same workspace layout, slots, counters, flags and round counter as
//! the host platform, with the protocol's kernels. The host-tensor methods (`dispatch`,
//! `received`, `combine`, the uploads and downloads) stage through host memory so that host
//! experts (the reference experts) can run in between. The steady-state path neither
//! synchronizes with the host nor allocates: [`CudaPeerRank::dispatch_device`] /
//! [`CudaPeerRank::combine_device`] on device tensors, [`CudaPeerRank::launch`] / [`CudaPeerRank::capture`].
//! Errors the kernels record (a timed-out wait, a bad id in a device input) reach the host
//! through a host-mapped status word: [`CudaPeerRank::check_status`] reads it without waiting,
//! [`CudaPeerRank::finish`] after the stream drained.
//!
//! # The shared workspace
//!
//! A rank runs on the workspace of a [`CudaWorkspaceGroup`]: its own one ([`CudaPeerRank::new`]), or
//! the one every layer constructed on the rank shares with the other layers of its EP group
//! ([`workspace_group`], [`admit`], [`CudaPeerRank::in_group`]; the registry's constructor does
//! this), grown to the union of their layouts when a larger layer is admitted. A rank holds the
//! group, not its memory: it records the generation its kernel parameters address, and the
//! first step of each call ([`CudaPeerRank::upload_inputs`], [`CudaPeerRank::dispatch_device`]) re-points
//! them at a newer generation (host work only: no allocation, nothing enqueued). Every later
//! step refuses to run on a workspace rebuilt since the call's dispatch, as the host platform's
//! finalize does. A rebuild frees the old workspace once every member's stream has drained, so
//! tensors handed out in place keep it alive until they are dropped, and CUDA graphs, which keep
//! addressing the workspace they were captured on, are captured only after every layer is
//! constructed.

mod backend;
mod group;
#[cfg(feature = "trials")]
pub mod trials;

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_core::slots::ReceivedRows;
use moe_core::workspace_group::{GroupLayout, Membership, lock};
use moe_core::{DispatchLayout, Dispatched, ExpertPlacement, LayerConfig, MoeError, PrepareInput, Result, Tensor};
use moe_kernels::batched::BatchedDelivery;
use moe_kernels::buffer::DeviceBuffer;
use moe_kernels::cudarc::driver::CudaGraph;
use moe_kernels::device::CudaDevice;
use moe_kernels::peer_call::{MAX_RANKS, PeerCall, PeerKernels};
use moe_kernels::source::QuantSpec;
use moe_kernels::status::KernelStatus;
use moe_kernels::tensor::{finalize_addresses, prepare_addresses};
use moe_kernels::world::CudaWorld;

pub use backend::CudaPeer;
pub use group::{CudaMembership, CudaWorkspaceGroup, SharedCudaGroup, admit, build_collectively, workspace_group};

use moe_core::call::{Abandon, CallId, LayerDigest};

use crate::{PeerLayout, PeerProtocol, Phase};

/// One kernel of protocol `P`.
pub type Step<P> = <<P as CudaProtocol>::Params as PeerKernels>::Step;
/// The grid protocol `P`'s kernels launch with.
pub type Launch<P> = <<P as CudaProtocol>::Params as PeerKernels>::Launch;

/// A size or offset inside a workspace's small sections or one row, as the kernels' 32-bit
/// parameter (far below 2 GiB).
pub fn small_offset(x: usize) -> i32 {
    i32::try_from(x).expect("moe invariant violated: a row size or section offset above 2 GiB")
}

/// An offset anywhere in a workspace (which `DeviceBuffer` allocated, so it fits), as the
/// kernels' 64-bit parameter.
pub fn large_offset(x: usize) -> i64 {
    i64::try_from(x).expect("moe invariant violated: a workspace offset above 2^63")
}

/// A peer-memory protocol's GPU side: its kernel parameter block, the kernels of each phase,
/// the buffers its kernels need beyond the shared ones, and its delivery.
pub trait CudaProtocol: PeerProtocol {
    /// The kernels' parameter block (`#[repr(C)]`, passed by value), which launches them.
    type Params: PeerKernels;
    /// What the protocol holds beyond the shared buffers (its own buffers, its delivery).
    type Buffers: Debug + Send + Sync;

    /// The kernels of `phase`, in stream order.
    fn steps(phase: Phase) -> &'static [Step<Self>];

    /// What the protocol asks of a layer beyond the registry's checks (on every rank).
    fn check_layer(_layer: &LayerConfig, _dispatch: &DispatchLayout) -> Result<()> {
        Ok(())
    }

    /// Allocates the protocol's buffers, loads its kernels (now, not at the first launch:
    /// loading a module while a peer's kernel spins waiting for this rank can deadlock) and
    /// builds its parameter block around `shared.call`; [`Self::address`] sets the offsets.
    fn build(shared: &SharedBuffers<'_>, place: &Self::Place) -> Result<(Self::Buffers, Self::Params)>;

    /// Sets the offsets of `params` for a workspace laid out as `place` says (the shared layer
    /// sets the workspaces' addresses, `PeerCall::peers`).
    fn address(params: &mut Self::Params, place: &Self::Place);

    /// The rows the last dispatch delivered to the rank (downloaded, in the host platform's
    /// order) and the tokens each source sent it.
    fn received_rows(rank: &CudaPeerRank<Self>) -> Result<(ReceivedRows, Vec<usize>)>;

    /// Enqueues what the delivery of the last dispatch needs and returns the received rows as
    /// device tensors in the layer's activation format.
    fn delivered(rank: &CudaPeerRank<Self>) -> Result<Dispatched>;

    /// Device address of the `[rows, hidden]` Standard rows the combine reads: experts that
    /// write there spare the combine a copy.
    fn expert_rows_ptr(rank: &CudaPeerRank<Self>) -> u64;

    /// [`Self::expert_rows_ptr`] as a device tensor (keeping its buffer alive).
    fn expert_output_tensor(rank: &CudaPeerRank<Self>) -> Result<Tensor>;

    /// The BatchedExperts delivery and reduction, when the layer delivers that format.
    fn batched(_buffers: &Self::Buffers) -> Option<&BatchedDelivery> {
        None
    }
}

/// Points `params` at `workspaces` (every rank's), laid out as `place` says.
fn address<P: CudaProtocol>(params: &mut P::Params, place: &P::Place, workspaces: &[DeviceBuffer]) {
    for (base, w) in params.call().peers.iter_mut().zip(workspaces) {
        *base = w.ptr();
    }
    P::address(params, place);
}

/// What every peer-memory protocol's kernels read and write besides the workspaces, set up by
/// [`CudaPeerRank::in_group`] and handed to [`CudaProtocol::build`].
#[derive(Debug)]
pub struct SharedBuffers<'a> {
    pub layer: &'a LayerConfig,
    pub dispatch: DispatchLayout,
    pub gpu: &'a Arc<CudaDevice>,
    pub me: usize,
    pub ep: usize,
    /// Tokens per rank and call the layer's buffers hold.
    pub max_tokens: usize,
    /// The head of the protocol's parameter block, filled but for the workspaces' addresses:
    /// the rank's own buffers (tokens `[max_tokens, hidden]` 16-bit; ids, weights and each
    /// top-k copy's target rank and slot, `[max_tokens, top_k]` 32-bit each; each expert's
    /// owner; the combine's output `[max_tokens, hidden]`), the status word and its mirror,
    /// the bound of every wait and the layer's call tag.
    pub call: PeerCall,
}

/// One rank of protocol `P` on its GPU.
#[derive(Debug)]
pub struct CudaPeerRank<P: CudaProtocol> {
    layer: LayerConfig,
    dispatch: DispatchLayout,
    /// The layer's place in the workspace of generation `generation`, which `params` address.
    place: P::Place,
    own: P::Layout,
    generation: u64,
    /// The layer in its EP group's shared workspace.
    member: CudaMembership<P::Layout>,
    /// The layer's call identity (its number is the device's round, which the host does not
    /// track).
    call: CallId,
    gpu: Arc<CudaDevice>,
    me: usize,
    launch: Launch<P>,
    params: P::Params,
    /// The tokens of the last call's dispatch.
    n_tokens: usize,
    tokens: DeviceBuffer,
    ids: DeviceBuffer,
    weights: DeviceBuffer,
    /// Each expert's EP rank, by which the host checks what the peers send.
    placement: ExpertPlacement,
    /// `[num_experts]` i32: the same on the GPU, by which the kernels route and check what the
    /// peers send.
    owner: DeviceBuffer,
    // Held for the params' addresses (the kernels read them; this side never does).
    _send_target: DeviceBuffer,
    _send_slot: DeviceBuffer,
    out: DeviceBuffer,
    buffers: P::Buffers,
    /// The phases named in errors ("one-sided dispatch", "one-sided combine"), and both, for
    /// a status read between them; built once, so no call formats them.
    ops: [String; 3],
    /// Last: its mirror outlives every buffer above, whose Drop waits for the stream.
    status: KernelStatus,
}

impl<P: CudaProtocol> CudaPeerRank<P> {
    /// Rank `me` of `world` (allocates and loads its kernels: construct every rank before any
    /// rank dispatches) on a workspace of its own: `workspaces[r]` the workspace of rank `r` (at
    /// least the layer's layout's bytes, from `CudaWorld::symmetric_alloc`), shared by every
    /// rank.
    ///
    /// Fails with [`MoeError::Unsupported`] naming the first pair of ranks of `world` that
    /// cannot reach each other's memory (see `PeerMatrix::check_all_pairs`).
    pub fn new(
        layer: &LayerConfig,
        world: &CudaWorld,
        workspaces: Arc<Vec<DeviceBuffer>>,
        me: usize,
        timeout: Duration,
        launch: Launch<P>,
    ) -> Result<Self> {
        let layout = P::Layout::for_layer(layer, &layer.dispatch_layout());
        let group = CudaWorkspaceGroup::with_memory(layer, layout, workspaces);
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
        group: SharedCudaGroup<P::Layout>,
        me: usize,
        timeout: Duration,
        launch: Launch<P>,
    ) -> Result<Self> {
        let dispatch = layer.dispatch_layout();
        let own = P::Layout::for_layer(layer, &dispatch);
        let (generation, layout, workspaces) = {
            let g = lock(&group);
            let w = g.current();
            (w.generation, w.layout, w.memory.clone())
        };
        let ep = layer.parallel.world_size();
        if ep != world.ranks() || ep > MAX_RANKS || workspaces.len() != ep || me >= ep {
            return Err(MoeError::InvalidInput {
                op: "CudaPeerRank::new",
                detail: format!(
                    "{} with {ep} EP ranks needs one GPU and one workspace per rank and a rank below {ep} (world {}, workspaces {}, rank {me}, at most {MAX_RANKS} ranks)",
                    P::NAME,
                    world.ranks(),
                    workspaces.len()
                ),
            });
        }
        P::check_layer(layer, &dispatch)?;
        world
            .peers()
            .check_all_pairs(&layer.parallel.world_group())
            .map_err(|e| MoeError::Unsupported(format!("{} on GPUs: {e}", P::NAME)))?;
        if !layout.covers(&own) || layout.ranks() != own.ranks() {
            return Err(MoeError::InvalidInput {
                op: "CudaPeerRank::in_group",
                detail: format!(
                    "the group's workspace ({layout:?}) does not hold this layer's ({own:?}): admit the layer to the group of its EP group first (moe_peer::cuda::admit)"
                ),
            });
        }
        if let Some(w) = workspaces.iter().find(|w| w.bytes() < layout.bytes()) {
            return Err(MoeError::InvalidInput {
                op: "CudaPeerRank::new",
                detail: format!(
                    "a workspace of {} bytes, the layout needs {}; allocate the layer's layout's bytes per rank",
                    w.bytes(),
                    layout.bytes()
                ),
            });
        }
        let place = P::place(layout, own);
        let gpu = world.gpu(me).map_err(|e| MoeError::Device(e.to_string()))?.clone();
        let (max, k, h) = (layer.dispatch_tokens_bound(), layer.moe.top_k, layer.moe.hidden);
        let alloc = |bytes: usize| DeviceBuffer::zeroed(&gpu, bytes);
        let placement = layer.placement();
        let owner: Vec<u8> = (0..layer.moe.num_experts)
            .flat_map(|e| (placement.owner(e) as i32).to_le_bytes())
            .collect();
        let owner = DeviceBuffer::from_bytes(&gpu, &owner)?;
        let tokens = alloc(max * h * 2)?;
        let ids = alloc(max * k * 4)?;
        let weights = alloc(max * k * 4)?;
        let send_target = alloc(max * k * 4)?;
        let send_slot = alloc(max * k * 4)?;
        let out = alloc(max * dispatch.combine_row_bytes)?;
        let status = KernelStatus::new(&gpu, me, timeout)?;
        let clock_khz = gpu.clock_khz()?;
        let member = Membership::new(group);
        let call = CallId::new(0, member.layer_index(), LayerDigest::new(&dispatch, max, &placement));
        let as_i32 = |v: usize| v as i32;
        let shared = SharedBuffers {
            layer,
            dispatch,
            gpu: &gpu,
            me,
            ep,
            max_tokens: max,
            call: PeerCall {
                peers: [0; MAX_RANKS],
                tokens: tokens.ptr(),
                ids: ids.ptr(),
                weights: weights.ptr(),
                owner: owner.ptr(),
                send_target: send_target.ptr(),
                send_slot: send_slot.ptr(),
                status: status.word_ptr(),
                status_mirror: status.mirror_ptr(),
                out: out.ptr(),
                timeout_cycles: (timeout.as_secs_f64() * clock_khz as f64 * 1e3) as i64,
                ep: as_i32(ep),
                me: as_i32(me),
                max_tokens: as_i32(max),
                n_tokens: 0,
                top_k: as_i32(k),
                hidden: as_i32(h),
                input_bf16: i32::from(layer.moe.input_dtype == moe_core::InputDtype::Bf16),
                num_experts: as_i32(layer.moe.num_experts),
                combine_slot_bytes: as_i32(own.bounds().combine_slot_bytes),
                combine_row_bytes: as_i32(dispatch.combine_row_bytes),
                fp8_static_scale: layer.quant.params.fp8_static_scale,
                nvfp4_global_scale: layer.quant.params.nvfp4_global_scale,
                call_tag: call.tag(),
                abandon_advances: 0,
            },
        };
        let (buffers, mut params) = P::build(&shared, &place)?;
        address::<P>(&mut params, &place, &workspaces);
        Ok(CudaPeerRank {
            layer: layer.clone(),
            dispatch,
            place,
            own,
            generation,
            member,
            call,
            gpu,
            me,
            launch,
            params,
            n_tokens: 0,
            tokens,
            ids,
            weights,
            placement,
            owner,
            _send_target: send_target,
            _send_slot: send_slot,
            out,
            buffers,
            ops: ["dispatch", "combine", "dispatch or combine"].map(|half| format!("{} {half}", P::PROTOCOL)),
            status,
        })
    }

    /// The table of each expert's EP rank (`[num_experts]` i32) the kernels route by and check
    /// the peers' ids against; a test overwrites it to play a peer whose memory is corrupt.
    pub fn expert_owners(&self) -> &DeviceBuffer {
        &self.owner
    }

    /// The rank's GPU (for timing with events on its stream).
    pub fn gpu(&self) -> &Arc<CudaDevice> {
        &self.gpu
    }

    /// The rank's index in its EP group.
    pub fn me(&self) -> usize {
        self.me
    }

    /// The layer this rank serves.
    pub fn layer(&self) -> &LayerConfig {
        &self.layer
    }

    /// The layer's slot layout.
    pub fn dispatch_layout(&self) -> DispatchLayout {
        self.dispatch
    }

    /// The layer's place in the workspace its parameters address.
    pub fn place(&self) -> &P::Place {
        &self.place
    }

    /// The kernels' parameter block.
    pub fn params(&self) -> &P::Params {
        &self.params
    }

    /// The kernels' parameter block, to change what the protocol lets a caller change (a
    /// trace buffer).
    ///
    /// # Safety
    /// Every address in the block stays one the kernels may read and write: change only
    /// fields the protocol documents as the caller's, with addresses that outlive the calls.
    pub unsafe fn params_mut(&mut self) -> &mut P::Params {
        &mut self.params
    }

    /// The grid the rank's kernels launch with.
    pub fn launch_grid(&self) -> Launch<P> {
        self.launch
    }

    /// The protocol's own buffers.
    pub fn buffers(&self) -> &P::Buffers {
        &self.buffers
    }

    /// The layer in its workspace group: its turns (`Membership::prepare`, `finish_call`).
    pub fn member(&self) -> &CudaMembership<P::Layout> {
        &self.member
    }

    /// The layout of the group's current workspace (the union of its layers').
    pub fn workspace_layout(&self) -> P::Layout {
        self.member.current().1
    }

    /// Rows of each of the layer's receive matrices (`ep * max_tokens`).
    pub fn rows(&self) -> usize {
        self.own.bounds().rows()
    }

    /// Re-points the kernel parameters at the group's current workspace when a larger layer's
    /// admission rebuilt it since this layer's last call (host work only). The first step of
    /// every call.
    fn follow_group(&mut self) {
        if let Some((generation, layout, memory)) = self.member.newer_than(self.generation) {
            self.place = P::place(layout, self.own);
            address::<P>(&mut self.params, &self.place, &memory);
            self.generation = generation;
        }
    }

    /// Every rank's workspace, which the parameters address; fails (naming `op`) when the group
    /// was rebuilt since this call's dispatch.
    pub fn workspaces(&self, op: &'static str) -> Result<Arc<Vec<DeviceBuffer>>> {
        Ok(self.member.workspace_of(self.generation, op)?.1)
    }

    /// Uploads this call's tokens, ids and weights: the first step of a call on host inputs,
    /// which follows the group to its current workspace.
    pub fn upload_inputs(&mut self, input: PrepareInput<'_>) -> Result<()> {
        self.follow_group();
        self.tokens.upload(0, input.tokens().bytes())?;
        self.ids.upload(0, input.topk_ids().bytes())?;
        self.weights.upload(0, input.topk_weights().bytes())?;
        self.set_token_count(input.num_tokens());
        Ok(())
    }

    /// Enqueues a protocol phase. Nothing waits for the host; call [`Self::finish`] to learn
    /// how it ended. Fails when the group's workspace was rebuilt since the last
    /// [`Self::upload_inputs`].
    pub fn launch(&self, phase: Phase) -> Result<()> {
        self.workspaces(phase.call_step())?;
        self.launch_with(phase, &self.params)
    }

    fn launch_with(&self, phase: Phase, params: &P::Params) -> Result<()> {
        P::steps(phase)
            .iter()
            .try_for_each(|&step| self.launch_step(step, params))
    }

    fn launch_step(&self, step: Step<P>, params: &P::Params) -> Result<()> {
        // SAFETY: `params` addresses this rank's buffers (allocated in `in_group` for the
        // layer's tokens per rank, held by `self`) or the caller's device tensors of the shapes
        // `dispatch_device` / `combine_device` checked, and every peer's workspace of the
        // group's current generation (callers checked the generation; the group holds it),
        // whose layout covers this layer's (checked in `in_group` and by the group's
        // admission); ep is within the kernels' limit (checked in `in_group`); `P::build`
        // loaded the module.
        unsafe { params.launch(&self.gpu, &QuantSpec::of_layer(&self.layer), step, self.launch) }?;
        Ok(())
    }

    /// Enqueues the marking of a call abandoned for `why` in every flag this rank raises at its
    /// peers, so every peer's same call fails naming this rank: a new call (`starts`, which
    /// follows the group to its current workspace as a call's first step does), or the call in
    /// flight.
    pub fn abandon(&mut self, why: Abandon, starts: bool) -> Result<()> {
        if starts {
            self.follow_group();
        }
        self.mark_abandoned(why, starts)
    }

    fn mark_abandoned(&self, why: Abandon, starts: bool) -> Result<()> {
        if !starts {
            self.workspaces("finalize")?;
        }
        let mut params = self.params;
        let call = params.call();
        call.call_tag = self.call.abandoned(why).0 & !0xffff;
        call.abandon_advances = u32::from(starts);
        self.launch_step(P::Params::ABANDON, &params)
    }

    /// `error`, which refused a call before any of its kernels ran (`starts`: a new call, else
    /// the call in flight), after marking that call abandoned so its peers fail it too.
    fn abandoned(&mut self, error: MoeError, starts: bool) -> MoeError {
        if starts {
            self.follow_group();
        }
        self.abandoned_in_place(error, starts)
    }

    /// [`Self::abandoned`] without following the group (the call in flight, or one that
    /// followed it already).
    fn abandoned_in_place(&self, error: MoeError, starts: bool) -> MoeError {
        // When the marking fails too (the GPU is in error), this rank's reason still comes
        // first; its peers' waits stay bounded.
        let _ = self.mark_abandoned(Abandon::of(&error), starts);
        error
    }

    /// `error`, which a call of this rank's reported, after following it: a peer past the call
    /// that abandoned it is reported as such ([`crate::abandonment_behind`]); otherwise, when
    /// the peers are past the call, this rank's round counter moves up to theirs so its next
    /// call runs with them (the stream has drained: the status was read after it).
    fn followed(&self, error: MoeError) -> MoeError {
        let error = crate::abandonment_behind(
            error,
            |peer| P::flags(&self.place, peer),
            |flag| {
                let mut word = [0u8; 4];
                self.workspaces("prepare").ok()?[self.me]
                    .download(flag, &mut word)
                    .ok()?;
                Some(u32::from_le_bytes(word))
            },
        );
        let MoeError::PeerMovedOn { ahead, .. } = &error else {
            return error;
        };
        let moved = self.workspaces("prepare").and_then(|w| {
            let mine = &w[self.me];
            let mut round = [0u8; 4];
            mine.download(crate::ROUND_OFFSET, &mut round)?;
            let round = crate::round_following(u32::from_le_bytes(round), *ahead);
            Ok(mine.upload(crate::ROUND_OFFSET, &round.to_le_bytes())?)
        });
        match moved {
            Ok(()) => error,
            Err(e) => e,
        }
    }

    /// Waits for the stream and reports an error the kernels recorded (a timed-out wait of
    /// `phase`, naming the rank it waited for; a peer's call word of another call, abandoned or
    /// past this one; a bad id or weight in a device input), which it clears.
    pub fn finish(&self, phase: Phase) -> Result<()> {
        let op = match phase {
            Phase::Dispatch => &self.ops[0],
            Phase::Combine => &self.ops[1],
        };
        self.status.finish(op).map_err(|e| self.followed(e))
    }

    /// Reports an error the kernels recorded so far, without waiting for the stream when there
    /// is none: work still running can record one later (see [`Self::finish`]). An error read
    /// is cleared, so the rank's next call runs.
    pub fn check_status(&self) -> Result<()> {
        self.status.check(&self.ops[2]).map_err(|e| self.followed(e))
    }

    /// Enqueues the quantization and dispatch of device-resident inputs (on this rank's GPU),
    /// read in place; nothing waits for the host. Ids are checked by the kernels (see
    /// [`Self::check_status`]). The inputs must stay unchanged until the dispatch has run on
    /// the stream. The first step of a call on device inputs, which follows the group to its
    /// current workspace.
    pub fn dispatch_device(&mut self, input: PrepareInput<'_>) -> Result<()> {
        let [tokens, ids, weights] = match prepare_addresses(&self.gpu, &self.layer, &input) {
            Ok(addresses) => addresses,
            Err(e) => return Err(self.abandoned(e, true)),
        };
        self.follow_group();
        self.set_token_count(input.num_tokens());
        let mut params = self.params;
        let call = params.call();
        (call.tokens, call.ids, call.weights) = (tokens, ids, weights);
        self.launch_with(Phase::Dispatch, &params)
    }

    /// Sets the tokens of the coming call (at most the layer's tokens per rank, which the
    /// capability record bounds far below `i32::MAX`).
    fn set_token_count(&mut self, tokens: usize) {
        self.n_tokens = tokens;
        self.params.call().n_tokens = tokens as i32;
    }

    /// Enqueues the combine of the experts' device-resident rows (`[ranks * max_tokens,
    /// hidden]` in the Standard format, `[local_experts, ranks * max_tokens, hidden]` in
    /// BatchedExperts) into `out` (`[n, hidden]` on this rank's GPU, n the tokens of the last
    /// dispatch); nothing waits for the host. Standard rows already at the protocol's
    /// `expert_rows_ptr` (the experts wrote into [`Self::expert_output_tensor`]) are not
    /// copied.
    pub fn combine_device(&self, expert_output: &Tensor, out: &Tensor) -> Result<()> {
        // Before any copy: a call whose workspace was rebuilt enqueues nothing.
        self.workspaces("finalize")?;
        let rows = self.rows();
        let n = self.n_tokens;
        let dst = P::expert_rows_ptr(self);
        let batched = P::batched(&self.buffers);
        let lead = match batched {
            Some(b) => vec![b.local_experts(), rows],
            None => vec![rows],
        };
        let [src, out] = match finalize_addresses(&self.gpu, &self.layer, &lead, n, expert_output, out) {
            Ok(addresses) => addresses,
            Err(e) => return Err(self.abandoned_in_place(e, false)),
        };
        if let Some(batched) = batched {
            // SAFETY: `src` was checked to be [local_experts, rows, hidden] of the input dtype
            // on this GPU, which the caller keeps unchanged until the combine has run; `dst`
            // holds the layer's `rows` rows of combine_slot_bytes (the protocol's promise),
            // apart from any tensor the caller owns; the delivery was launched by this call's
            // prepare.
            unsafe {
                batched.reduce(
                    src,
                    dst,
                    self.dispatch.combine_slot_bytes(),
                    self.layer.moe.input_dtype.dtype(),
                )
            }?;
        } else if src != dst {
            // SAFETY: `expert_output` was checked to be [rows, hidden] of the input dtype on
            // this GPU, exactly the rows `dst` holds (the protocol's promise); the caller keeps
            // it alive and unchanged until the combine has run, as for any enqueued work.
            unsafe {
                self.gpu
                    .copy_on_device_async(dst, src, rows * self.dispatch.combine_row_bytes)
            }?;
        }
        let mut params = self.params;
        params.call().out = out;
        self.launch_with(Phase::Combine, &params)
    }

    /// Where the experts' Standard rows go, `[ranks * max_tokens, hidden]` of the input dtype
    /// (row of the token received in the protocol's order): experts that write their output
    /// here spare the combine a copy.
    pub fn expert_output_tensor(&self) -> Result<Tensor> {
        P::expert_output_tensor(self)
    }

    /// The last dispatch's rows as device tensors in the layer's activation format (enqueues
    /// what the protocol's delivery needs).
    pub fn delivered(&self) -> Result<Dispatched> {
        P::delivered(self)
    }

    /// Quantizes and dispatches on the GPU; returns what this rank received (Standard format,
    /// downloaded) and the tokens each source sent it.
    pub fn dispatch(&mut self, input: PrepareInput<'_>) -> Result<(Dispatched, Vec<usize>)> {
        let (received, recv) = self.dispatch_rows(input)?;
        Ok((self.standard(received)?, recv))
    }

    /// [`Self::dispatch`], returning the received rows before they take a format. A received
    /// id that is neither -1 nor an expert of this rank fails the call, abandoned at every
    /// peer, and nothing is returned (the peers' ids are checked on the host as on the host
    /// platform; the one-sided kernel has padded such rows already).
    pub fn dispatch_rows(&mut self, input: PrepareInput<'_>) -> Result<(ReceivedRows, Vec<usize>)> {
        self.dispatch_and_wait(input)?;
        let (received, recv) = P::received_rows(self)?;
        if let Err(e) = received.check_ids("prepare", self.me, &self.placement) {
            return Err(self.abandoned_in_place(e, false));
        }
        Ok((received, recv))
    }

    fn dispatch_and_wait(&mut self, input: PrepareInput<'_>) -> Result<()> {
        if let Err(e) = self.upload_inputs(input) {
            return Err(self.abandoned(e, true));
        }
        self.launch(Phase::Dispatch)?;
        self.finish(Phase::Dispatch)
    }

    /// What the last dispatch delivered to this rank (downloaded, Standard format, in the host
    /// platform's order) and the tokens each source sent it.
    pub fn received(&self) -> Result<(Dispatched, Vec<usize>)> {
        let (received, recv) = P::received_rows(self)?;
        Ok((self.standard(received)?, recv))
    }

    /// Received rows as the Standard format's tensors.
    fn standard(&self, rows: ReceivedRows) -> Result<Dispatched> {
        rows.into_standard(self.layer.quant.received_scale_layout(self.layer.moe.input_dtype))
    }

    /// Uploads the experts' rows (`[ranks * max_tokens, hidden]`, Standard format) to where the
    /// combine reads them.
    pub fn upload_expert_output(&self, expert_output: &Tensor) -> Result<()> {
        let dtype = self.layer.moe.input_dtype.dtype();
        expert_output.expect("combine", "expert_output", dtype, &[self.rows(), self.dispatch.hidden])?;
        self.workspaces("finalize")?;
        // SAFETY: the protocol's expert rows hold [rows, hidden] of the input dtype on this GPU
        // (its promise), exactly the bytes of `expert_output`, checked above.
        unsafe { self.gpu.copy_to_device(P::expert_rows_ptr(self), expert_output.bytes()) }?;
        Ok(())
    }

    /// Downloads the combined output of the last combine into `out` (`[n, hidden]`).
    pub fn download_output(&self, out: &mut Tensor) -> Result<()> {
        let dtype = self.layer.moe.input_dtype.dtype();
        let n = self.n_tokens;
        out.expect("combine", "out", dtype, &[n, self.dispatch.hidden])?;
        Ok(self.out.download(0, out.bytes_mut())?)
    }

    /// Combines the experts' rows on the GPU into `out` (`[n, hidden]`, n the tokens of the
    /// last dispatch).
    pub fn combine(&mut self, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let dtype = self.layer.moe.input_dtype.dtype();
        let staged = out
            .expect("combine", "out", dtype, &[self.n_tokens, self.dispatch.hidden])
            .and_then(|()| self.upload_expert_output(expert_output));
        if let Err(e) = staged {
            return Err(self.abandoned_in_place(e, false));
        }
        self.launch(Phase::Combine)?;
        self.finish(Phase::Combine)?;
        self.download_output(out)
    }

    /// Captures a phase as a CUDA graph on this rank's stream. The round counter lives in
    /// device memory, so replays stay in step with the peers; the token count of the last
    /// upload is baked in, like an engine's graph per batch size, and so is the workspace:
    /// capture after every layer of the group is constructed (a rebuild frees the workspace a
    /// graph addresses). Capture on every rank before any rank replays: instantiating a graph
    /// allocates device memory (see `CudaDevice::capture_graph`).
    pub fn capture(&self, phase: Phase) -> Result<CudaGraph> {
        self.gpu.capture_graph(|| self.launch(phase))
    }
}
