//! A peer-memory protocol on the host platform: [`HostPeer`] is the `PrepareFinalize` of any
//! [`PeerProtocol`] on host ranks, over the workspace group its EP group's layers share.

use moe_core::call::{Abandon, CallId, LayerDigest, PeerWord};
use moe_core::config::ExpertPlacement;
use moe_core::host::SymmetricMemory;
use moe_core::routing::SendPlan;
use moe_core::slots::{self, ReceivedRows};
use moe_core::workspace_group::{self, CallTicket, Membership, WorkspaceGroup};
use moe_core::{
    ActivationFormat, DType, DispatchLayout, LayerConfig, MoeError, PrepareFinalize, PrepareInput, Prepared,
    RankContext, Receipt, Result, Tensor,
};

use crate::{PeerLayout, PeerProtocol};

/// One layer's backend of protocol `P` on one host rank.
#[derive(Debug)]
pub struct HostPeer<P: PeerProtocol> {
    layer: LayerConfig,
    dispatch: DispatchLayout,
    placement: ExpertPlacement,
    /// What its calls' words say of the layer (see `moe_core::call`).
    digest: LayerDigest,
    /// The layer's own workspace layout, placed in the group's by `P::place`.
    own: P::Layout,
    ep: usize,
    /// The layer in its EP group's shared workspace.
    member: Membership<P::Layout, SymmetricMemory>,
}

/// A dispatch on the host, as [`PeerProtocol::host_dispatch`] sees it: the call has started,
/// the tokens are quantized and planned.
#[derive(Debug)]
pub struct HostDispatch<'a, P: PeerProtocol> {
    pub layer: &'a LayerConfig,
    pub dispatch: DispatchLayout,
    pub placement: &'a ExpertPlacement,
    /// The layer's place in the group's workspace of this call.
    pub place: P::Place,
    /// The group's workspace, seen from this rank.
    pub mem: &'a SymmetricMemory,
    /// This call's identity, which its flags carry.
    pub id: CallId,
    pub me: usize,
    pub ep: usize,
    /// Each token's quantized payload and scales (`dispatch.ids_offset()` bytes per token).
    pub images: &'a [u8],
    /// The tokens' top-k ids and weights, `[tokens, top_k]` row-major.
    pub ids: &'a [i32],
    pub weights: &'a [f32],
    /// Where each token goes: rank and slot per copy.
    pub plan: &'a SendPlan,
}

impl<P: PeerProtocol> HostDispatch<'_, P> {
    /// The slot bytes of token `t` for rank `target`: its image, then its routing (ids masked
    /// for `target`, weights), written into `slot` (`dispatch.slot_bytes()` long).
    pub fn fill_slot(&self, t: usize, target: usize, slot: &mut [u8]) {
        let (image, k) = (self.dispatch.ids_offset(), self.dispatch.top_k);
        slot[..image].copy_from_slice(&self.images[t * image..(t + 1) * image]);
        slots::write_routing(
            &self.dispatch,
            &self.ids[t * k..(t + 1) * k],
            &self.weights[t * k..(t + 1) * k],
            Some((target, self.placement)),
            &mut slot[image..],
        );
    }
}

/// A combine on the host, as [`PeerProtocol::host_combine`] and [`PeerProtocol::host_reply`]
/// see it.
#[derive(Debug)]
pub struct HostCombine<'a, P: PeerProtocol> {
    pub dispatch: DispatchLayout,
    pub place: P::Place,
    pub mem: &'a SymmetricMemory,
    /// The identity of the call, which its dispatch started.
    pub id: CallId,
    pub me: usize,
    pub ep: usize,
    pub plan: &'a SendPlan,
}

/// Raises this rank's flag (at `flag_offset(me)`) on every member of the group with the
/// word of `call` (release), then waits, bounded, until every member raised its own here
/// (acquire) for the same call; fails as soon as a member's word says it runs another call,
/// abandoned this one or is past it ([`PeerWord`]). `op` names the wait in errors.
pub fn signal_and_wait(
    mem: &SymmetricMemory,
    op: &str,
    flag_offset: impl Fn(usize) -> usize,
    call: CallId,
) -> Result<()> {
    let members = mem.group().len();
    for peer in 0..members {
        mem.release_flag(peer, flag_offset(mem.me()), call.word().0);
    }
    let rank = mem.group()[mem.me()];
    for peer in 0..members {
        let peer_rank = mem.group()[peer];
        mem.acquire_until(op, flag_offset(peer), peer, |word| {
            PeerWord::read(call, word).decide(rank, peer_rank, op, call)
        })??;
    }
    Ok(())
}

/// Per-call state carried from prepare to finalize.
#[derive(Debug)]
struct HostReceipt<E> {
    /// The call's turn on the workspace group.
    ticket: CallTicket,
    call: CallId,
    /// The workspace generation the dispatch ran on; finalize refuses another.
    generation: u64,
    plan: SendPlan,
    exchange: E,
    /// BatchedExperts only: the received row of each row of each local expert.
    batched_rows: Option<Vec<Vec<usize>>>,
}

impl<P: PeerProtocol> HostPeer<P> {
    /// Constructs the backend for one host rank in the rank's workspace group for the layer's
    /// EP group, growing it when the layer needs more (collective: every rank of the EP group
    /// constructs the same layers in the same order).
    pub fn construct(layer: &LayerConfig, ctx: &RankContext) -> Result<Box<dyn PrepareFinalize>> {
        let rank = ctx.host(P::NAME)?;
        let dispatch = layer.dispatch_layout();
        let own = P::Layout::for_layer(layer, &dispatch);
        let ep_group = layer.parallel.world_group();
        let group = WorkspaceGroup::of(rank, P::NAME, &ep_group, layer.workspace_group.as_deref());
        let op = format!("{} workspace rebuild", P::PROTOCOL);
        workspace_group::lock(&group).admit(layer, own, |layout| {
            // Every member must be done with the old workspace before any member drops it.
            rank.barrier(&ep_group, &op)?;
            rank.symmetric_alloc(&ep_group, &op, layout.bytes().div_ceil(4))
        })?;
        let placement = layer.placement();
        Ok(Box::new(HostPeer::<P> {
            layer: layer.clone(),
            digest: LayerDigest::new(&dispatch, layer.dispatch_tokens_bound(), &placement),
            dispatch,
            placement,
            own,
            ep: ep_group.len(),
            member: Membership::new(group),
        }))
    }

    /// Dispatch of one call (the turn is taken), on the group's current workspace. The call
    /// starts first: whatever fails after, this rank marks the call abandoned where its peers
    /// wait, so they fail it too.
    fn prepare_call(&self, input: PrepareInput<'_>, ticket: CallTicket) -> Result<Prepared> {
        let (generation, layout, mem) = self.member.current();
        let place = P::place(layout, self.own);
        let call = self.start_call(&mem);
        self.dispatch_call(input, ticket, generation, place, &mem, call)
            .map_err(|e| self.abandonment_behind(&place, &mem, e))
            .inspect_err(|e| self.abandon_call(place, &mem, call, e))
    }

    /// Starts the group's next call on this rank: advances the round counter and returns the
    /// call's identity.
    fn start_call(&self, mem: &SymmetricMemory) -> CallId {
        let round = next_round(mem);
        CallId::new(round, self.member.layer_index(), self.digest)
    }

    /// Marks `call` abandoned for `why` in every flag this rank raises at its peers, so every
    /// peer's wait of the call fails naming this rank; when a peer is already past the call,
    /// moves this rank's round counter up to the peers' so its next call runs with theirs.
    fn abandon_call(&self, place: P::Place, mem: &SymmetricMemory, call: CallId, why: &MoeError) {
        let word = call.abandoned(Abandon::of(why));
        for peer in 0..mem.group().len() {
            for flag in P::flags(&place, mem.me()) {
                mem.release_flag(peer, flag, word.0);
            }
        }
        P::forget(&place, mem);
        if let MoeError::PeerMovedOn { ahead, .. } = why {
            let round = crate::round_following(current_round(mem), *ahead);
            mem.store_u32(mem.me(), crate::ROUND_OFFSET, round);
        }
    }

    /// `error`, or the abandonment of a peer it says is past the call ([`crate::abandonment_behind`]).
    fn abandonment_behind(&self, place: &P::Place, mem: &SymmetricMemory, error: MoeError) -> MoeError {
        crate::abandonment_behind(
            error,
            |peer| {
                mem.group()
                    .iter()
                    .position(|&r| r == peer)
                    .map_or_else(Vec::new, |source| P::flags(place, source))
            },
            |flag| Some(mem.load_u32(mem.me(), flag)),
        )
    }

    fn dispatch_call(
        &self,
        input: PrepareInput<'_>,
        ticket: CallTicket,
        generation: u64,
        place: P::Place,
        mem: &SymmetricMemory,
        call: CallId,
    ) -> Result<Prepared> {
        input.require_host(P::NAME)?;
        let d = self.dispatch;
        // Quantize before the first store: a quantization error then leaves every peer's
        // workspace untouched but for the abandoned marks.
        let images = slots::encode_tokens(&d, &self.layer.quant.params, &input)?;
        let ids = input.topk_ids().to_i32();
        let weights = input.topk_weights().to_f32();
        let plan = SendPlan::new(&ids, d.top_k, &self.placement);
        let dispatch = HostDispatch::<P> {
            layer: &self.layer,
            dispatch: d,
            placement: &self.placement,
            place,
            mem,
            id: call,
            me: mem.me(),
            ep: self.ep,
            images: &images,
            ids: &ids,
            weights: &weights,
            plan: &plan,
        };
        let (received, exchange) = P::host_dispatch(&dispatch)?;
        received.check_ids("prepare", mem.me(), &self.placement)?;
        let (dispatched, batched_rows) = format_received(&self.layer, received, mem.me())?;
        Ok(Prepared {
            dispatched,
            receipt: Receipt::new(
                P::NAME,
                HostReceipt {
                    ticket,
                    call,
                    generation,
                    plan,
                    exchange,
                    batched_rows,
                },
            ),
            expert_output: None,
        })
    }

    /// Combine of one call (the turn is released first, whatever the outcome).
    fn finalize_call(&self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let state: HostReceipt<P::Exchange> = receipt.into_state(P::NAME)?;
        self.member.finish_call(state.ticket)?;
        // Checked before the first store: the receipt's counts place every reply.
        let (layout, mem) = self.member.workspace_of(state.generation, "finalize")?;
        let place = P::place(layout, self.own);
        self.combine_call(&state, place, &mem, expert_output, out)
            .map_err(|e| self.abandonment_behind(&place, &mem, e))
            .inspect_err(|e| self.abandon_call(place, &mem, state.call, e))
    }

    fn combine_call(
        &self,
        state: &HostReceipt<P::Exchange>,
        place: P::Place,
        mem: &SymmetricMemory,
        expert_output: &Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        let (h, dtype) = (self.dispatch.hidden, self.layer.moe.input_dtype.dtype());
        let n = state.plan.num_tokens();
        out.expect("finalize", "out", dtype, &[n, h])?;
        let rows = self.ep * self.layer.dispatch_tokens_bound();
        let staged = combine_rows(state.batched_rows.as_deref(), expert_output, rows, h, dtype)?;
        let call = HostCombine::<P> {
            dispatch: self.dispatch,
            place,
            mem,
            id: state.call,
            me: mem.me(),
            ep: self.ep,
            plan: &state.plan,
        };
        P::host_combine(&call, &state.exchange, staged.as_ref().unwrap_or(expert_output))?;
        let mut row = Tensor::zeros(dtype, &[h]);
        let mut acc = vec![0f32; h];
        for t in 0..n {
            acc.fill(0.0);
            for (_, target, slot) in state.plan.sends_of(t) {
                P::host_reply(&call, &state.exchange, target, slot, row.bytes_mut());
                acc.iter_mut().zip(row.to_f32()).for_each(|(a, v)| *a += v);
            }
            out.store_f32(t * h, &acc);
        }
        Ok(())
    }
}

/// The round of the call in progress (its combine flags carry the dispatch's round).
fn current_round(mem: &SymmetricMemory) -> u32 {
    mem.load_u32(mem.me(), crate::ROUND_OFFSET)
}

/// Advances the round counter for a new call (at its dispatch) and returns the new round.
fn next_round(mem: &SymmetricMemory) -> u32 {
    let round = current_round(mem).wrapping_add(1);
    mem.store_u32(mem.me(), crate::ROUND_OFFSET, round);
    round
}

/// The rows rank `me` received, in the layer's activation format, and for BatchedExperts the
/// received row of each row of each local expert.
pub(crate) fn format_received(
    layer: &LayerConfig,
    received: ReceivedRows,
    me: usize,
) -> Result<(moe_core::Dispatched, Option<Vec<Vec<usize>>>)> {
    let scale_layout = layer.quant.received_scale_layout(layer.moe.input_dtype);
    Ok(match layer.activation_format {
        ActivationFormat::Standard => (received.into_standard(scale_layout)?, None),
        ActivationFormat::BatchedExperts => {
            let (dispatched, sources) = received.into_batched(&layer.placement(), me, scale_layout)?;
            (dispatched, Some(sources))
        }
    })
}

/// One combine row per received row (`rows` of them): `Some` in BatchedExperts format, where
/// the row is the f32 sum of the token's rows over this rank's experts (`batched_rows[expert]`
/// lists the received row of each of the expert's rows); `None` in Standard format, where the
/// experts' output already is one row per received row. Checks the output's shape.
pub(crate) fn combine_rows(
    batched_rows: Option<&[Vec<usize>]>,
    expert_output: &Tensor,
    rows: usize,
    h: usize,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let Some(sources) = batched_rows else {
        expert_output.expect("finalize", "expert_output", dtype, &[rows, h])?;
        return Ok(None);
    };
    slots::reduce_batched(sources, expert_output, rows, h, dtype).map(Some)
}

impl<P: PeerProtocol> PrepareFinalize for HostPeer<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }
    fn activation_format(&self) -> ActivationFormat {
        self.layer.activation_format
    }
    /// `true`: every rank that owns one of a token's experts sends its weighted partial sum
    /// back, and combine adds all of them (under TP+DP+EP each TP rank dispatches its replica's
    /// tokens itself).
    fn output_is_reduced(&self) -> bool {
        true
    }
    fn max_tokens_per_rank(&self) -> usize {
        self.layer.dispatch_tokens_bound()
    }
    fn num_dispatchers(&self) -> usize {
        self.ep
    }
    fn workspace_bytes(&self) -> usize {
        self.member.current().1.bytes()
    }

    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared> {
        self.member.clone().prepare(|ticket| self.prepare_call(input, ticket))
    }

    fn abandon(&mut self, prepared: Option<Receipt>, reason: &MoeError) -> Result<()> {
        let Some(receipt) = prepared else {
            return self.member.abandon(|| {
                let (_, layout, mem) = self.member.current();
                let call = self.start_call(&mem);
                self.abandon_call(P::place(layout, self.own), &mem, call, reason);
                Ok(())
            });
        };
        let state: HostReceipt<P::Exchange> = receipt.into_state(P::NAME)?;
        self.member.finish_call(state.ticket)?;
        let (layout, mem) = self.member.workspace_of(state.generation, "finalize")?;
        self.abandon_call(P::place(layout, self.own), &mem, state.call, reason);
        Ok(())
    }

    /// The receipt's call ends when finalize takes it (see `WorkspaceGroup::finish_call`),
    /// whatever happens after.
    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        self.finalize_call(receipt, expert_output, out)
    }
}
