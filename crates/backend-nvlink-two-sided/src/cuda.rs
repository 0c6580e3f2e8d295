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
use moe_core::{Dispatched, Result, Tensor};
use moe_kernels::buffer::DeviceBuffer;
use moe_kernels::deliver::{IdCheck, ReceivedSlots, StandardDelivery};
use moe_kernels::source::{Module, QuantSpec};
use moe_kernels::tensor::device_tensor;
use moe_kernels::two_sided::{TwoSidedParams, TwoSidedStep};
use moe_peer::cuda::{CudaPeerRank, CudaProtocol, SharedBuffers, large_offset, small_offset};

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

impl CudaProtocol for TwoSided {
    type Params = TwoSidedParams;
    type Buffers = TwoSidedBuffers;

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
            call: shared.call,
            done: done.ptr(),
            expert_out: expert_out.ptr(),
            // The section and region offsets are set by `address`.
            dispatch_region_off: 0,
            combine_region_off: 0,
            // The layer's own row sizes, which `LayerRows` packs its rows at.
            slot_bytes: small_offset(own.slot_bytes),
            image_bytes: small_offset(d.ids_offset()),
            weights_offset: small_offset(d.weights_offset()),
            round_off: 0,
            counts_off: 0,
            counts_flag_off: 0,
            data_flag_off: 0,
            combine_flag_off: 0,
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
    fn address(params: &mut TwoSidedParams, rows: &LayerRows) {
        let g = &rows.group;
        params.dispatch_region_off = large_offset(g.dispatch_region());
        params.combine_region_off = large_offset(g.combine_region());
        params.round_off = small_offset(moe_peer::ROUND_OFFSET);
        params.counts_off = small_offset(g.counts_row_offset(0));
        params.counts_flag_off = small_offset(g.counts_flag_offset(0));
        params.data_flag_off = small_offset(g.data_flag_offset(0));
        params.combine_flag_off = small_offset(g.combine_flag_offset(0));
    }

    /// Rows `[0, received)` dense, grouped by source in rank order, then padding, as the host
    /// platform's `prepare`.
    fn received_rows(rank: &CudaTwoSidedRank) -> Result<(ReceivedRows, Vec<usize>)> {
        let workspaces = rank.workspaces("prepare")?;
        let (d, rows, me) = (rank.dispatch_layout(), *rank.place(), rank.me());
        let l = rows.group;
        let mut raw = vec![0u8; 4 * l.bounds.ep * l.bounds.ep];
        workspaces[me].download(l.counts_row_offset(0), &mut raw)?;
        let counts = CountMatrix::checked(
            l.bounds.ep,
            raw.chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
            rows.own.bounds.max_tokens,
        )?;
        let recv: Vec<usize> = (0..l.bounds.ep).map(|s| counts.get(s, me)).collect();
        let mut slots = vec![0u8; counts.received(me) * d.slot_bytes()];
        workspaces[me].download(rows.dispatch_row_offset(0), &mut slots)?;
        let mut received = ReceivedRows::new(d, rows.rows());
        // Rows are dense in source order.
        let sources = recv.iter().enumerate().flat_map(|(s, &n)| std::iter::repeat_n(s, n));
        for (r, (slot, source)) in slots.chunks_exact(d.slot_bytes()).zip(sources).enumerate() {
            received.fill(r, source, slot);
        }
        Ok((received, recv))
    }

    /// The delivery of the last dispatch's rows as Standard tensors on the GPU, in buffers of
    /// the layer's own: rows dense in source order, as the host platform delivers them.
    fn delivered(rank: &CudaTwoSidedRank) -> Result<Dispatched> {
        let workspaces = rank.workspaces("prepare")?;
        let (rows, me) = (*rank.place(), rank.me());
        let call = rank.params().call;
        let l = rows.group;
        let base = workspaces[me].ptr();
        let from = ReceivedSlots {
            slots: base + rows.dispatch_row_offset(0) as u64,
            // Column `me` of the [ep, ep] count matrix: what each source sent here.
            counts: base + (l.counts_row_offset(0) + 4 * me) as u64,
            counts_stride: l.bounds.ep,
            sources: l.bounds.ep,
            rows_per_source: None,
            ids: IdCheck {
                owner: call.owner,
                num_experts: call.num_experts as usize,
                me,
                status: call.status,
                status_mirror: call.status_mirror,
            },
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
