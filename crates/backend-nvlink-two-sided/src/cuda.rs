//! The two-sided protocol on NVIDIA GPUs: the same workspace layout, count matrix, slots,
//! flags and round counter as the host platform, run by the kernels of `moe-kernels`
//! (two_sided.cu), as a [`CudaProtocol`] of the peer-memory layer (which owns the rank, its
//! workspace group and its `PrepareFinalize`), so for the same inputs both platforms deliver
//! the same rows in the same order and combine to the same bits.
//!
//! The plan kernel numbers each token's sends as [`moe_core::routing::SendPlan`] does (per
//! destination rank, in token order), so source `s`'s `slot`-th token to rank `r` lands in the
//! row the host puts it in, `CountMatrix::dispatch_row(s, r) + slot`. The dispatch kernel
//! quantizes each token on the way into its slots (the kernels are specialized on the wire
//! scheme), bit for bit as the host's `slots::encode_tokens`.
//!
//! The round counter, count matrix and flags are the group's; each layer packs its own rows
//! from the start of the group's regions ([`LayerRows`]), so the kernels take the group's
//! section and region offsets and the layer's `max_tokens` and row sizes. Nothing a layer hands
//! out lies in the workspace (the delivery and the experts' output are buffers of the layer's
//! own), so no tensor keeps an old workspace alive.

use std::sync::Arc;

use moe_core::slots::ReceivedRows;
use moe_core::{Dispatched, LayerConfig, Result, Tensor};
use moe_kernels::KernelError;
use moe_kernels::buffer::DeviceBuffer;
use moe_kernels::deliver::{ReceivedSlots, StandardDelivery};
use moe_kernels::device::CudaDevice;
use moe_kernels::source::{Module, QuantSpec};
use moe_kernels::tensor::device_tensor;
use moe_kernels::two_sided::{MAX_RANKS, TwoSidedLaunch, TwoSidedParams, TwoSidedStep};
use moe_peer::cuda::{CudaPeerRank, CudaProtocol, SharedBuffers};

pub use moe_peer::Phase;

use crate::{CountMatrix, LayerRows, TwoSided};

/// One rank's two-sided backend on its GPU.
pub type CudaTwoSidedRank = CudaPeerRank<TwoSided>;

/// What the two-sided kernels hold beyond the peer-memory layer's buffers.
#[derive(Debug)]
pub struct TwoSidedBuffers {
    // Held for the params' address (the kernels' completion counter; this side never reads it).
    _done: DeviceBuffer,
    /// The experts' rows the combine sends back, `[ranks * max_tokens, hidden]`.
    expert_out: Arc<DeviceBuffer>,
    /// The received rows as Standard tensors, dense in source order.
    delivery: StandardDelivery,
}

/// A size or offset inside the workspace's small sections or one slot (far below 2 GiB).
fn small(x: usize) -> i32 {
    i32::try_from(x).expect("moe invariant violated: a slot size or section offset above 2 GiB")
}

/// An offset anywhere in a workspace (which `DeviceBuffer` allocated, so it fits).
fn large(x: usize) -> i64 {
    i64::try_from(x).expect("moe invariant violated: a workspace offset above 2^63")
}

impl CudaProtocol for TwoSided {
    type Params = TwoSidedParams;
    type Launch = TwoSidedLaunch;
    type Step = TwoSidedStep;
    type Buffers = TwoSidedBuffers;
    const MAX_RANKS: usize = MAX_RANKS;
    const ABANDON: TwoSidedStep = TwoSidedStep::Abandon;

    /// Plan + dispatch; send + reduce.
    fn steps(phase: Phase) -> &'static [TwoSidedStep] {
        match phase {
            Phase::Dispatch => &[TwoSidedStep::Plan, TwoSidedStep::Dispatch],
            Phase::Combine => &[TwoSidedStep::CombineSend, TwoSidedStep::CombineReduce],
        }
    }

    fn build(shared: &SharedBuffers<'_>, rows: &LayerRows) -> Result<(TwoSidedBuffers, TwoSidedParams)> {
        let (layer, gpu, own, d) = (shared.layer, shared.gpu, rows.own, shared.dispatch);
        let done = DeviceBuffer::zeroed(gpu, 4)?;
        let expert_out = Arc::new(DeviceBuffer::zeroed(gpu, rows.rows() * d.combine_row_bytes)?);
        let delivery = StandardDelivery::new(
            gpu,
            d,
            rows.rows(),
            layer.quant.received_scale_layout(layer.moe.input_dtype),
        )?;
        gpu.preload(&Module::TwoSided(QuantSpec::of_layer(layer)))?;
        let params = TwoSidedParams {
            // Set by `address`, with the section and region offsets.
            peers: [0u64; MAX_RANKS],
            tokens: shared.tokens,
            ids: shared.ids,
            weights: shared.weights,
            owner: shared.owner,
            send_target: shared.send_target,
            send_slot: shared.send_slot,
            done: done.ptr(),
            status: shared.status,
            status_mirror: shared.status_mirror,
            expert_out: expert_out.ptr(),
            out: shared.out,
            dispatch_region_off: 0,
            combine_region_off: 0,
            timeout_cycles: shared.timeout_cycles,
            ep: shared.ep as i32,
            me: shared.me as i32,
            max_tokens: small(shared.max_tokens),
            n_tokens: 0,
            top_k: layer.moe.top_k as i32,
            hidden: small(layer.moe.hidden),
            input_bf16: i32::from(layer.moe.input_dtype == moe_core::InputDtype::Bf16),
            // The layer's own row sizes, which `LayerRows` packs its rows at.
            slot_bytes: small(own.slot_bytes),
            image_bytes: small(d.ids_offset()),
            weights_offset: small(d.weights_offset()),
            combine_slot_bytes: small(own.combine_slot_bytes),
            combine_row_bytes: small(d.combine_row_bytes),
            round_off: 0,
            counts_off: 0,
            counts_flag_off: 0,
            data_flag_off: 0,
            combine_flag_off: 0,
            num_experts: small(layer.moe.num_experts),
            fp8_static_scale: layer.quant.params.fp8_static_scale,
            nvfp4_global_scale: layer.quant.params.nvfp4_global_scale,
            call_tag: shared.call_tag,
            abandon_advances: 0,
        };
        let buffers = TwoSidedBuffers {
            _done: done,
            expert_out,
            delivery,
        };
        Ok((buffers, params))
    }

    /// The sections and regions of the group's layout; the rows per source and row sizes, the
    /// layer's, were set in `build`.
    fn address(params: &mut TwoSidedParams, rows: &LayerRows, workspaces: &[DeviceBuffer]) {
        for (p, w) in params.peers.iter_mut().zip(workspaces) {
            *p = w.ptr();
        }
        let g = &rows.group;
        params.dispatch_region_off = large(g.dispatch_region());
        params.combine_region_off = large(g.combine_region());
        params.round_off = small(moe_peer::ROUND_OFFSET);
        params.counts_off = small(g.counts_row_offset(0));
        params.counts_flag_off = small(g.counts_flag_offset(0));
        params.data_flag_off = small(g.data_flag_offset(0));
        params.combine_flag_off = small(g.combine_flag_offset(0));
    }

    moe_peer::call_fields_by_name!(TwoSidedParams);

    unsafe fn launch(
        gpu: &CudaDevice,
        layer: &LayerConfig,
        step: TwoSidedStep,
        params: &TwoSidedParams,
        launch: TwoSidedLaunch,
    ) -> std::result::Result<(), KernelError> {
        // SAFETY: the caller's contract (`CudaProtocol::launch`); the plan kernel checks ids
        // against num_experts and owners are below ep; n_tokens <= max_tokens (PrepareInput);
        // the slots are the layer's DispatchLayout, of the spec whose module `build` loaded.
        unsafe { gpu.two_sided_call(&QuantSpec::of_layer(layer), step, params, launch) }
    }

    fn rows(rows: &LayerRows) -> usize {
        rows.rows()
    }

    /// Rows `[0, received)` dense, grouped by source in rank order, then padding, as the host
    /// platform's `prepare`.
    fn received_rows(rank: &CudaTwoSidedRank) -> Result<(ReceivedRows, Vec<usize>)> {
        let workspaces = rank.workspaces("prepare")?;
        let (d, rows, me) = (rank.dispatch_layout(), *rank.place(), rank.me());
        let l = rows.group;
        let mut raw = vec![0u8; 4 * l.ep * l.ep];
        workspaces[me].download(l.counts_row_offset(0), &mut raw)?;
        let counts = CountMatrix::checked(
            l.ep,
            raw.chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
            rows.own.max_tokens,
        )?;
        let recv: Vec<usize> = (0..l.ep).map(|s| counts.get(s, me)).collect();
        let mut slots = vec![0u8; counts.received(me) * d.slot_bytes()];
        workspaces[me].download(rows.dispatch_row_offset(0), &mut slots)?;
        let mut received = ReceivedRows::new(d, rows.rows());
        for (r, slot) in slots.chunks_exact(d.slot_bytes()).enumerate() {
            received.fill(r, slot);
        }
        Ok((received, recv))
    }

    /// The delivery of the last dispatch's rows as Standard tensors on the GPU, in buffers of
    /// the layer's own: rows dense in source order, as the host platform delivers them.
    fn delivered(rank: &CudaTwoSidedRank) -> Result<Dispatched> {
        let workspaces = rank.workspaces("prepare")?;
        let (rows, me) = (*rank.place(), rank.me());
        let l = rows.group;
        let base = workspaces[me].ptr();
        let from = ReceivedSlots {
            slots: base + rows.dispatch_row_offset(0) as u64,
            // Column `me` of the [ep, ep] count matrix: what each source sent here.
            counts: base + (l.counts_row_offset(0) + 4 * me) as u64,
            counts_stride: l.ep,
            sources: l.ep,
            rows_per_source: None,
        };
        let delivery = &rank.buffers().delivery;
        // SAFETY: the slots and the count matrix are in this rank's workspace of the group's
        // current generation (the group holds it; a rebuild drains this stream before freeing
        // it), where the layer's `rows.rows()` rows of its slot_bytes lie densely from the
        // dispatch region's start, which is what `build` sized the delivery for.
        unsafe { delivery.launch(&from) }?;
        delivery.dispatched()
    }

    /// A buffer of the layer's own.
    fn expert_rows_ptr(rank: &CudaTwoSidedRank) -> u64 {
        rank.buffers().expert_out.ptr()
    }

    fn expert_output_tensor(rank: &CudaTwoSidedRank) -> Result<Tensor> {
        device_tensor(
            &rank.buffers().expert_out,
            0,
            rank.layer().moe.input_dtype.dtype(),
            &[rank.rows(), rank.dispatch_layout().hidden],
        )
    }
}
