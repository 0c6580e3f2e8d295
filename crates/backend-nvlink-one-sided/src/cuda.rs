//! The one-sided protocol on NVIDIA GPUs: the same workspace layout, slots, counters, flags and
//! round counter as the host platform, run by the kernels of `moe-kernels` (one_sided.cu), as
//! a [`CudaProtocol`] of the peer-memory layer (which owns the rank, its workspace group and its
//! `PrepareFinalize`).
//!
//! Dispatch quantizes on the way (one kernel) straight into every destination's field-major
//! regions, which are the Standard format's tensors as they are: on device tensors `prepare`
//! hands them out in place (only swizzled scales take a pass). The experts write their rows
//! straight into this rank's combine region, where the peers pull them from, so combine has no
//! staging copy. BatchedExperts layers deliver through `moe_kernels::batched`, whose reduction
//! runs into the combine region before the combine.

use std::sync::Arc;

use moe_core::slots::ReceivedRows;
use moe_core::{ActivationFormat, DType, DispatchLayout, Dispatched, LayerConfig, MoeError, Result, ScaleLayout};
use moe_core::{Tensor, quant::swizzle};
use moe_kernels::batched::{BatchedDelivery, StandardRows};
use moe_kernels::buffer::DeviceBuffer;
use moe_kernels::deliver::standard_tensors;
use moe_kernels::one_sided::{OneSidedParams, OneSidedStep};
use moe_kernels::source::QuantSpec;
use moe_kernels::tensor::workspace_tensor;
use moe_peer::cuda::{CudaPeerRank, CudaProtocol, SharedBuffers, small_offset};

pub use moe_peer::Phase;

use crate::{Field, LayerSlots, OneSided};

/// One rank's one-sided backend on its GPU.
pub type CudaOneSidedRank = CudaPeerRank<OneSided>;

/// What the one-sided kernels hold beyond the peer-memory layer's buffers.
#[derive(Debug)]
pub struct OneSidedBuffers {
    /// The kernels' send counters (the params hold their address).
    counters: DeviceBuffer,
    /// The 128x4 swizzle of the received scales, when Standard-format experts want it.
    swizzled_scales: Option<Arc<DeviceBuffer>>,
    /// The BatchedExperts delivery and reduction, when the experts want that format.
    batched: Option<BatchedDelivery>,
}

impl OneSidedBuffers {
    /// The send counters dispatch numbers each target's slots with (`[ep + 1]` u32: one per
    /// target, then the blocks done; zero between calls, as each dispatch leaves them). A test
    /// overwrites one to play a peer whose memory is corrupt.
    pub fn send_counters(&self) -> &DeviceBuffer {
        &self.counters
    }
}

impl CudaProtocol for OneSided {
    type Params = OneSidedParams;
    type Buffers = OneSidedBuffers;

    /// One kernel each: quantize and send; publish the experts' rows, then pull and sum.
    fn steps(phase: Phase) -> &'static [OneSidedStep] {
        match phase {
            Phase::Dispatch => &[OneSidedStep::Dispatch],
            Phase::Combine => &[OneSidedStep::Combine],
        }
    }

    fn check_layer(layer: &LayerConfig, dispatch: &DispatchLayout) -> Result<()> {
        if dispatch.combine_slot_bytes() != dispatch.combine_row_bytes {
            return Err(MoeError::InvalidInput {
                op: "CudaPeerRank::new",
                detail: format!(
                    "hidden {} gives {}-byte output rows, not a multiple of 16: the experts write rows in place in the combine region, which needs 16-byte rows (use a hidden size that is a multiple of 8)",
                    layer.moe.hidden, dispatch.combine_row_bytes
                ),
            });
        }
        Ok(())
    }

    fn build(shared: &SharedBuffers<'_>, slots: &LayerSlots) -> Result<(OneSidedBuffers, OneSidedParams)> {
        let (layer, gpu, own) = (shared.layer, shared.gpu, slots.own);
        let (ep, max, d) = (shared.ep, shared.max_tokens, shared.dispatch);
        let scale_layout = layer.quant.received_scale_layout(layer.moe.input_dtype);
        let counters = DeviceBuffer::zeroed(gpu, (ep + 1) * 4)?;
        let swizzled_scales = match (layer.activation_format, scale_layout) {
            (ActivationFormat::Standard, Some(ScaleLayout::Swizzled128x4)) => {
                gpu.preload_swizzle()?;
                let len = swizzle::swizzled_len(ep * max, d.wire.scales_per_token);
                Some(Arc::new(DeviceBuffer::zeroed(gpu, len)?))
            }
            _ => None,
        };
        let batched = match layer.activation_format {
            ActivationFormat::BatchedExperts => Some(BatchedDelivery::new(
                gpu,
                d,
                ep * max,
                &layer.placement(),
                shared.me,
                scale_layout,
            )?),
            ActivationFormat::Standard => None,
        };
        gpu.load_one_sided(&QuantSpec::of_layer(layer))?;
        let params = OneSidedParams {
            call: shared.call,
            payload_bytes: small_offset(own.payload_bytes),
            scale_bytes: small_offset(own.scale_bytes),
            // The section and region offsets are set by `address`.
            round_off: 0,
            dispatch_flag_off: 0,
            combine_flag_off: 0,
            padded_tail_off: 0,
            payload_region_off: 0,
            scales_region_off: 0,
            ids_region_off: 0,
            weights_region_off: 0,
            combine_region_off: 0,
            counters: counters.ptr(),
            trace: 0,
        };
        let buffers = OneSidedBuffers {
            counters,
            swizzled_scales,
            batched,
        };
        Ok((buffers, params))
    }

    /// The sections and regions of the group's layout; the row sizes and slots per source, the
    /// layer's, were set in `build`.
    fn address(params: &mut OneSidedParams, slots: &LayerSlots) {
        let g = &slots.group;
        params.round_off = small_offset(moe_peer::ROUND_OFFSET);
        params.dispatch_flag_off = small_offset(g.dispatch_flag_offset(0));
        params.combine_flag_off = small_offset(g.combine_flag_offset(0));
        params.padded_tail_off = small_offset(g.padded_tail_offset(0));
        params.payload_region_off = small_offset(g.region(Field::Payload));
        params.scales_region_off = small_offset(g.region(Field::Scales));
        params.ids_region_off = small_offset(g.region(Field::Ids));
        params.weights_region_off = small_offset(g.region(Field::Weights));
        params.combine_region_off = small_offset(g.combine_region());
    }

    /// Row `s * max_tokens + t` is source `s`'s slot `t`.
    fn received_rows(rank: &CudaOneSidedRank) -> Result<(ReceivedRows, Vec<usize>)> {
        let slots = *rank.place();
        let mut ws = vec![0u8; slots.group.combine_region()];
        rank.workspaces("prepare")?[rank.me()].download(0, &mut ws)?;
        let recv = (0..slots.own.bounds.ep)
            .map(|s| {
                let o = slots.group.recv_count_offset(s);
                let count = u32::from_le_bytes(ws[o..o + 4].try_into().expect("4 bytes"));
                moe_peer::peer_count("prepare", s, count, slots.own.bounds.max_tokens)
            })
            .collect::<Result<Vec<usize>>>()?;
        let received = slots.received_rows(rank.dispatch_layout(), &recv, |at, bytes| {
            bytes.copy_from_slice(&ws[at..at + bytes.len()])
        });
        Ok((received, recv))
    }

    /// Standard: the regions the dispatch filled, in place in this rank's workspace
    /// (`[ranks * max_tokens, ..]`, row `s * max_tokens + t` the token source `s` sent in slot
    /// `t`, unfilled rows padding), the scales swizzled first when the experts want that. They
    /// stay valid until this rank's next combine lets the peers dispatch again, or, when a peer
    /// abandoned the call, until that peer's next dispatch (and keep the workspace alive: drop
    /// them before constructing another layer). BatchedExperts: the
    /// expert-major delivery of those regions.
    fn delivered(rank: &CudaOneSidedRank) -> Result<Dispatched> {
        let workspaces = rank.workspaces("prepare")?;
        let (d, slots, me) = (rank.dispatch_layout(), *rank.place(), rank.me());
        let (rows, k) = (slots.rows(), d.top_k);
        let buffers = rank.buffers();
        if let Some(batched) = &buffers.batched {
            let region = |field: Field| workspaces[me].ptr() + slots.group.region(field) as u64;
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
            unsafe { batched.launch(&from) }?;
            return batched.dispatched();
        }
        let region = |field: Field, dtype: DType, cols: usize| {
            workspace_tensor(&workspaces, me, slots.group.region(field), dtype, &[rows, cols])
        };
        let layer = rank.layer();
        let scale_layout = layer.quant.received_scale_layout(layer.moe.input_dtype);
        if let (Some(ScaleLayout::Swizzled128x4), Some(swizzled)) = (scale_layout, &buffers.swizzled_scales) {
            let linear = workspaces[me].ptr() + slots.group.region(Field::Scales) as u64;
            // SAFETY: the scales region holds the layer's linear [rows, scales_per_token]
            // matrix (the workspace is held by `workspaces`) and `swizzled` its swizzled_len
            // bytes (allocated in `build` for these rows).
            unsafe {
                rank.gpu()
                    .swizzle_128x4_raw(linear, rows, d.wire.scales_per_token, swizzled.ptr())
            }?;
        }
        standard_tensors(
            &d,
            scale_layout,
            region(Field::Payload, DType::U8, d.wire.payload_bytes)?,
            region(Field::Scales, DType::U8, d.wire.scale_bytes)?,
            buffers.swizzled_scales.as_ref(),
            region(Field::Ids, DType::I32, k)?,
            region(Field::Weights, DType::F32, k)?,
        )
    }

    /// This rank's combine region of the workspace of the last dispatch, where the peers pull
    /// the rows from (row of the token received from source `s` in slot `t` at
    /// `s * max_tokens + t`).
    fn expert_rows_ptr(rank: &CudaOneSidedRank) -> u64 {
        rank.params().call.peers[rank.me()] + rank.place().group.combine_region() as u64
    }

    fn expert_output_tensor(rank: &CudaOneSidedRank) -> Result<Tensor> {
        workspace_tensor(
            &rank.workspaces("prepare")?,
            rank.me(),
            rank.place().group.combine_region(),
            rank.layer().moe.input_dtype.dtype(),
            &[rank.rows(), rank.dispatch_layout().hidden],
        )
    }

    fn batched(buffers: &OneSidedBuffers) -> Option<&BatchedDelivery> {
        buffers.batched.as_ref()
    }
}

/// Has every later call of `rank` stamp its phases into `words` (the device address of
/// `moe_kernels::one_sided::TRACE_WORDS` u64 words on the rank's GPU, reset by the caller
/// before each call to `TracePoint::reset_words`), or stop (0): for profiling where a call's
/// time goes. The caller keeps the words alive while calls may stamp them.
pub fn set_trace(rank: &mut CudaOneSidedRank, words: u64) {
    // SAFETY: `trace` is the one field of the block that is the caller's: the kernels store
    // to it only when it is not 0, and this function's contract has the caller keep it alive.
    unsafe { rank.params_mut() }.trace = words;
}

/// The blocks and threads per block `phase`'s kernel launches with for `rank`'s current inputs
/// (one block per SM: the SMs it takes).
pub fn grid(rank: &CudaOneSidedRank, phase: Phase) -> Result<(u32, u32)> {
    let step = <OneSided as CudaProtocol>::steps(phase)[0];
    let spec = QuantSpec::of_layer(rank.layer());
    Ok(rank
        .gpu()
        .one_sided_grid(&spec, step, rank.params(), rank.launch_grid())?)
}
