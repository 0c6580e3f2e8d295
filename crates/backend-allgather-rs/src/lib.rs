//! allgather-rs: all-gather the (quantized) tokens, their scales, top-k ids and weights over
//! the dispatch group, let every rank's experts run on every gathered token, and reduce-scatter
//! the expert outputs back.
//!
//! The dispatch group is the rank's DP group (the ranks with its `tp_rank`), or every rank under
//! sequence parallelism. Each rank contributes `max_tokens` rows plus its count, so receivers
//! never need the counts before the transfer (no host synchronization on GPUs). After the
//! reduce-scatter a rank holds the sum over its dispatch group; that is the complete result
//! when the group spans every rank (tp = 1, or SP), and a partial sum to be all-reduced over
//! the TP group otherwise, which `output_is_reduced` reports.
#![deny(unsafe_code)]

// The kernel and NCCL launches on device addresses cross the FFI boundary into moe-kernels'
// launchers.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
pub mod cuda;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use moe_core::call::{Abandon, CallId, LayerDigest, PeerWord};
use moe_core::host::HostRank;
use moe_core::quant::QuantScheme;
use moe_core::registry::{BackendRegistration, Capabilities, Limits};
use moe_core::slots::{self, ReceivedRows};
use moe_core::{
    ActivationFormat, DispatchLayout, ExpertPlacement, LayerConfig, MoeError, ParallelMode, PlatformKind,
    PrepareFinalize, PrepareInput, Prepared, RankContext, Receipt, Result, Tensor,
};

/// The registered name.
pub const NAME: &str = "allgather-rs";

/// What this backend declares.
pub const CAPABILITIES: Capabilities = Capabilities {
    quant_schemes: &QuantScheme::ALL,
    deferred_quant: true,
    swizzled_scales: true,
    activation_formats: &[ActivationFormat::Standard],
    parallel_modes: &[
        ParallelMode::Single,
        ParallelMode::Ep,
        ParallelMode::Dp,
        ParallelMode::Tp,
        ParallelMode::TpDp,
        ParallelMode::TpDpEp,
        ParallelMode::Sp,
    ],
    platforms: &[PlatformKind::Host, PlatformKind::Cuda],
    needs_all_pairs_peer_access: false,
    gpu_per_rank: true,
    single_node: false,
    limits: Limits {
        max_ranks: 1024,
        max_top_k: 64,
        hidden_multiple_of: 1,
        max_tokens_per_rank: 1 << 20,
    },
};

moe_core::register_backend!(BackendRegistration {
    name: NAME,
    description: "all-gather dispatch and reduce-scatter combine; any topology and parallel mode, moves group_size times more data than an all-to-all",
    capabilities: CAPABILITIES,
    construct: AllGather::construct,
});

/// One layer's all-gather backend on one rank.
#[derive(Debug)]
pub struct AllGather {
    layer: LayerConfig,
    dispatch: DispatchLayout,
    /// `Some` under EP: ids of experts other ranks own are masked to -1.
    placement: Option<ExpertPlacement>,
    rank: HostRank,
    group: Vec<usize>,
    /// The calls of every layer of this rank's dispatch group so far (see `moe_core::call`).
    calls: Arc<AtomicU32>,
    /// The layer's place among its dispatch group's layers, in construction order.
    layer_index: u32,
    /// What its calls' words say of the layer (see `moe_core::call`).
    digest: LayerDigest,
}

#[derive(Debug)]
struct AllGatherReceipt {
    tokens: usize,
    call: CallId,
}

/// Bytes of the header each rank's contribution to an exchange starts with: the call's word.
const HEADER: usize = 4;

/// The most exchanges one call repeats while peers still contribute to earlier calls (each
/// such peer then fails its earlier call and comes to this one).
const MAX_CATCH_UP: usize = 8;

#[cfg(feature = "cuda")]
fn construct_on_gpu(layer: &LayerConfig, rank: &moe_core::CudaRank) -> Result<Box<dyn PrepareFinalize>> {
    cuda::CudaAllGather::construct(layer, rank)
}

#[cfg(not(feature = "cuda"))]
fn construct_on_gpu(_: &LayerConfig, _: &moe_core::CudaRank) -> Result<Box<dyn PrepareFinalize>> {
    Err(moe_core::MoeError::built_without_cuda(NAME))
}

impl AllGather {
    /// Constructs the backend for one rank.
    pub fn construct(layer: &LayerConfig, ctx: &RankContext) -> Result<Box<dyn PrepareFinalize>> {
        if let RankContext::Cuda(rank) = ctx {
            return construct_on_gpu(layer, rank);
        }
        let rank = ctx.host(NAME)?;
        let p = layer.parallel;
        let group = if p.sp { p.world_group() } else { p.dp_group(rank.rank()) };
        let calls = rank.rank_state(&format!("{NAME}/calls/{group:?}"), || AtomicU32::new(0));
        let layers = rank.rank_state(&format!("{NAME}/layers/{group:?}"), || AtomicU32::new(0));
        let dispatch = layer.dispatch_layout();
        Ok(Box::new(AllGather {
            layer: layer.clone(),
            digest: LayerDigest::new(&dispatch, layer.dispatch_tokens_bound(), &layer.placement()),
            dispatch,
            placement: p.ep.then(|| layer.placement()),
            rank: rank.clone(),
            group,
            calls,
            layer_index: layers.fetch_add(1, Ordering::Relaxed),
        }))
    }

    /// Starts the dispatch group's next call on this rank.
    fn start_call(&self) -> CallId {
        let round = self.calls.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        CallId::new(round, self.layer_index, self.digest)
    }

    /// Gathers every member's contribution to call `call` (`payload`, after the call's word:
    /// `abandoned` with the reason when this rank cannot run the call), each checked to be of
    /// the same call and `len` bytes long. A member still at an earlier call (it came late) is
    /// waited for: the exchange repeats until its contribution to this call comes, as that
    /// member fails its earlier call on seeing this one. Fails naming the member that runs
    /// another call or abandoned this one, and, when a member is already past this call,
    /// moves this rank's call counter up to that member's.
    fn exchange(
        &self,
        op: &'static str,
        call: CallId,
        abandoned: Option<&MoeError>,
        payload: Vec<u8>,
        len: usize,
    ) -> Result<Vec<Arc<Vec<u8>>>> {
        let word = match abandoned {
            None => call.word(),
            Some(why) => call.abandoned(Abandon::of(why)),
        };
        let mut mine = word.0.to_le_bytes().to_vec();
        mine.extend_from_slice(&payload);
        let mut late = Vec::new();
        for _ in 0..MAX_CATCH_UP {
            let all = self.rank.all_gather(&self.group, op, mine.clone())?;
            late.clear();
            for (&peer, theirs) in self.group.iter().zip(&all) {
                let Some(header) = theirs.get(..HEADER) else {
                    return Err(short(op, peer, theirs.len()));
                };
                let word = u32::from_le_bytes(header.try_into().expect("4 bytes"));
                let verdict = PeerWord::read(call, word);
                if let PeerWord::Ahead(by) = verdict {
                    // That member repeats its exchange until this rank's contribution to its
                    // call comes: this rank's next call is that one.
                    self.calls.fetch_add(u32::from(by) - 1, Ordering::Relaxed);
                }
                match verdict.decide(self.rank.rank(), peer, op, call) {
                    None => late.push(peer),
                    Some(Err(e)) => return Err(e),
                    Some(Ok(())) if abandoned.is_none() && theirs.len() != HEADER + len => {
                        return Err(short(op, peer, theirs.len()));
                    }
                    Some(Ok(())) => {}
                }
            }
            if late.is_empty() {
                return Ok(all);
            }
        }
        Err(MoeError::Timeout {
            rank: self.rank.rank(),
            op: format!("{op} of {call}, still at earlier calls after {MAX_CATCH_UP} exchanges"),
            waited_for: late,
            timeout: self.rank.timeout(),
        })
    }
}

impl PrepareFinalize for AllGather {
    fn name(&self) -> &'static str {
        NAME
    }
    fn activation_format(&self) -> ActivationFormat {
        ActivationFormat::Standard
    }
    fn output_is_reduced(&self) -> bool {
        self.group.len() == self.layer.parallel.world_size()
    }
    fn max_tokens_per_rank(&self) -> usize {
        self.layer.dispatch_tokens_bound()
    }
    fn num_dispatchers(&self) -> usize {
        self.group.len()
    }
    fn workspace_bytes(&self) -> usize {
        0
    }

    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared> {
        let call = self.start_call();
        let mine = input.require_host(self.name()).and_then(|()| self.slots(&input));
        let (abandoned, payload) = match &mine {
            Ok(slots) => (None, slots.clone()),
            Err(e) => (Some(e), Vec::new()),
        };
        let d = self.dispatch;
        let max = self.max_tokens_per_rank();
        let all = self.exchange("allgather dispatch", call, abandoned, payload, max * d.slot_bytes());
        // This rank's own reason first: its peers fail the call naming it.
        mine?;
        let all = all?;
        let mut received = ReceivedRows::new(d, self.group.len() * max);
        for (g, theirs) in all.iter().enumerate() {
            for (t, slot) in theirs[HEADER..].chunks_exact(d.slot_bytes()).enumerate() {
                received.fill(g * max + t, self.group[g], slot);
            }
        }
        if let Some(placement) = &self.placement {
            received.mask_foreign(self.rank.rank(), placement);
        }
        let scale_layout = self.layer.quant.received_scale_layout(self.layer.moe.input_dtype);
        Ok(Prepared {
            dispatched: received.into_standard(scale_layout)?,
            receipt: Receipt::new(
                NAME,
                AllGatherReceipt {
                    tokens: input.num_tokens(),
                    call,
                },
            ),
            expert_output: None,
        })
    }

    fn abandon(&mut self, prepared: Option<Receipt>, reason: &MoeError) -> Result<()> {
        let (max, ranks, h) = (self.max_tokens_per_rank(), self.group.len(), self.dispatch.hidden);
        let exchanged = match prepared {
            None => {
                let call = self.start_call();
                self.exchange(
                    "allgather dispatch",
                    call,
                    Some(reason),
                    Vec::new(),
                    max * self.dispatch.slot_bytes(),
                )
            }
            Some(receipt) => {
                let state: AllGatherReceipt = receipt.into_state(NAME)?;
                self.exchange(
                    "allgather combine",
                    state.call,
                    Some(reason),
                    Vec::new(),
                    4 * ranks * max * h,
                )
            }
        };
        match exchanged {
            Ok(_) => Ok(()),
            // A peer that abandoned the call too, or already left it, needs nothing more.
            Err(MoeError::PeerAbandoned { .. } | MoeError::PeerMovedOn { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let state: AllGatherReceipt = receipt.into_state(NAME)?;
        let h = self.dispatch.hidden;
        let dtype = self.layer.moe.input_dtype.dtype();
        let (ranks, max) = (self.group.len(), self.max_tokens_per_rank());
        let checked = expert_output
            .expect("finalize", "expert_output", dtype, &[ranks * max, h])
            .and_then(|()| out.expect("finalize", "out", dtype, &[state.tokens, h]));
        let (abandoned, payload) = match &checked {
            Ok(()) => (
                None,
                expert_output.to_f32().iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            Err(e) => (Some(e), Vec::new()),
        };
        let all = self.exchange("allgather combine", state.call, abandoned, payload, 4 * ranks * max * h);
        checked?;
        let all = all?;
        // The reduce-scatter: this rank's rows of every member's f32 partial sums, summed in
        // group order so every member gets the same bits.
        let me = self.group.iter().position(|&r| r == self.rank.rank()).unwrap_or(0);
        let rows = 4 * max * h;
        let mut sum = vec![0f32; state.tokens * h];
        for theirs in &all {
            let part = &theirs[HEADER + me * rows..HEADER + me * rows + 4 * state.tokens * h];
            for (acc, v) in sum.iter_mut().zip(part.chunks_exact(4)) {
                *acc += f32::from_le_bytes(v.try_into().expect("4 bytes"));
            }
        }
        out.store_f32(0, &sum);
        Ok(())
    }
}

impl AllGather {
    /// This rank's `max_tokens` slots of a call's dispatch, the unused ones padding (ids -1),
    /// so receivers need no counts up front.
    fn slots(&self, input: &PrepareInput<'_>) -> Result<Vec<u8>> {
        let d = self.dispatch;
        let (k, max, n) = (d.top_k, self.max_tokens_per_rank(), input.num_tokens());
        let (image_bytes, slot_bytes) = (d.ids_offset(), d.slot_bytes());
        let images = slots::encode_tokens(&d, &self.layer.quant.params, input)?;
        let ids = input.topk_ids().to_i32();
        let weights = input.topk_weights().to_f32();
        // `max` slots, the unused ones padding (ids -1), so receivers need no counts up front.
        let mut mine = vec![0u8; max * slot_bytes];
        let padding_ids = vec![-1i32; k];
        let padding_weights = vec![0f32; k];
        for (t, slot) in mine.chunks_exact_mut(slot_bytes).enumerate() {
            let (image, tail) = slot.split_at_mut(image_bytes);
            if t < n {
                image.copy_from_slice(&images[t * image_bytes..(t + 1) * image_bytes]);
                slots::write_routing(&d, &ids[t * k..(t + 1) * k], &weights[t * k..(t + 1) * k], None, tail);
            } else {
                slots::write_routing(&d, &padding_ids, &padding_weights, None, tail);
            }
        }
        Ok(mine)
    }
}

/// A contribution of `peer` too short for what every member sends in `op`.
fn short(op: &'static str, peer: usize, len: usize) -> MoeError {
    MoeError::CorruptPeerData {
        op,
        detail: format!("rank {peer} contributed {len} bytes, not what every member of the call sends"),
    }
}
