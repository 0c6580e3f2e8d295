//! Dispatch slots: the bytes of one dispatched token and the rows a rank receives.
//!
//! Every backend moves the same slot (see [`DispatchLayout`]): the quantized payload, its
//! scales, the top-k ids and the top-k weights, each 16-byte aligned. This module builds slots
//! and turns received slots into the [`Dispatched`] a backend hands to the experts, so the
//! bytes on the wire and the id convention are written once.

use moe_quant::{QuantParams, quantize_token, swizzle};

use crate::config::{DispatchLayout, ExpertPlacement, ScaleLayout};
use crate::contract::{Activations, Dispatched, PrepareInput};
use crate::error::{MoeError, Result};
use crate::routing::mask_foreign;
use crate::tensor::{DType, Tensor};

/// Quantizes every token of `input` into its slot image: payload then scales at their slot
/// offsets, `layout.ids_offset()` bytes per token.
pub fn encode_tokens(layout: &DispatchLayout, params: &QuantParams, input: &PrepareInput<'_>) -> Result<Vec<u8>> {
    let h = layout.hidden;
    let x = input.tokens().to_f32();
    let image_bytes = layout.ids_offset();
    let mut images = vec![0u8; input.num_tokens() * image_bytes];
    for (t, img) in images.chunks_exact_mut(image_bytes.max(1)).enumerate() {
        let (payload, rest) = img.split_at_mut(layout.scales_offset());
        quantize_token(
            layout.scheme,
            params,
            &x[t * h..(t + 1) * h],
            &mut payload[..layout.wire.payload_bytes],
            &mut rest[..layout.wire.scale_bytes],
        )?;
    }
    Ok(images)
}

/// Writes the routing part of a slot (`layout.slot_bytes() - layout.ids_offset()` bytes: ids,
/// then weights, each padded to 16 bytes). With `target`, ids that rank does not own become
/// `-1` with weight `0.0`; without, the row is written as given.
pub fn write_routing(
    layout: &DispatchLayout,
    ids: &[i32],
    weights: &[f32],
    target: Option<(usize, &ExpertPlacement)>,
    tail: &mut [u8],
) {
    let k = layout.top_k;
    let mut tid = ids.to_vec();
    let mut tw = weights.to_vec();
    if let Some((rank, placement)) = target {
        mask_foreign(&mut tid, &mut tw, rank, placement);
    }
    let weights_at = layout.weights_offset() - layout.ids_offset();
    tail.fill(0);
    tail[..4 * k].copy_from_slice(bytemuck::cast_slice(&tid));
    tail[weights_at..weights_at + 4 * k].copy_from_slice(bytemuck::cast_slice(&tw));
}

/// The rows a rank received, as separate payload, scale, id and weight arrays, and the rank
/// each came from. Rows never filled are padding: ids `-1`, weights `0.0`, zero payload.
#[derive(Clone, Debug)]
pub struct ReceivedRows {
    layout: DispatchLayout,
    rows: usize,
    /// The rank that sent each row (0 for padding rows).
    sources: Vec<u32>,
    payload: Vec<u8>,
    scales: Vec<u8>,
    ids: Vec<i32>,
    weights: Vec<f32>,
}

impl ReceivedRows {
    /// `rows` padding rows.
    pub fn new(layout: DispatchLayout, rows: usize) -> Self {
        ReceivedRows {
            layout,
            rows,
            sources: vec![0; rows],
            payload: vec![0; rows * layout.wire.payload_bytes],
            scales: vec![0; rows * layout.wire.scale_bytes],
            ids: vec![-1; rows * layout.top_k],
            weights: vec![0.0; rows * layout.top_k],
        }
    }

    /// Fills row `r` from the bytes of one slot, which rank `source` sent.
    pub fn fill(&mut self, r: usize, source: usize, slot: &[u8]) {
        self.sources[r] = source as u32;
        let d = &self.layout;
        let (pb, sb, k) = (d.wire.payload_bytes, d.wire.scale_bytes, d.top_k);
        self.payload[r * pb..(r + 1) * pb].copy_from_slice(&slot[..pb]);
        self.scales[r * sb..(r + 1) * sb].copy_from_slice(&slot[d.scales_offset()..d.scales_offset() + sb]);
        let ids = &slot[d.ids_offset()..d.ids_offset() + 4 * k];
        let weights = &slot[d.weights_offset()..d.weights_offset() + 4 * k];
        for j in 0..k {
            self.ids[r * k + j] = i32::from_le_bytes(ids[4 * j..4 * j + 4].try_into().expect("4 bytes"));
            self.weights[r * k + j] = f32::from_le_bytes(weights[4 * j..4 * j + 4].try_into().expect("4 bytes"));
        }
    }

    /// Fails unless every received id is -1 or an expert rank `rank` owns: ids come from peers'
    /// memory, and are checked before anything uses one as an index. `op` names the call.
    pub fn check_ids(&self, op: &'static str, rank: usize, placement: &ExpertPlacement) -> Result<()> {
        let k = self.layout.top_k;
        let foreign = |id: i32| {
            id != -1 && !(0..placement.num_experts() as i64).contains(&i64::from(id))
                || id >= 0 && placement.owner(id as usize) != rank
        };
        match self.ids.iter().position(|&id| foreign(id)) {
            None => Ok(()),
            Some(i) => Err(MoeError::CorruptPeerData {
                op,
                detail: format!(
                    "rank {} sent rank {rank} a row (received row {}) with expert id {} in top-k slot {}, which is neither -1 nor an expert of rank {rank}",
                    self.sources[i / k],
                    i / k,
                    self.ids[i],
                    i % k
                ),
            }),
        }
    }

    /// Applies the id convention for `rank` to every row.
    pub fn mask_foreign(&mut self, rank: usize, placement: &ExpertPlacement) {
        let k = self.layout.top_k;
        for (i, w) in self.ids.chunks_exact_mut(k).zip(self.weights.chunks_exact_mut(k)) {
            mask_foreign(i, w, rank, placement);
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Top-k ids, `[rows, top_k]`.
    pub fn ids(&self) -> &[i32] {
        &self.ids
    }

    /// Regroups the rows expert-major for batched experts: `[experts, rows, ..]` with one row
    /// per (local expert, received token) pair carrying that pair's weight. Returns the
    /// delivery and, per local expert, the received row of each of its rows.
    pub fn into_batched(
        self,
        placement: &ExpertPlacement,
        rank: usize,
        scale_layout: Option<ScaleLayout>,
    ) -> Result<(Dispatched, Vec<Vec<usize>>)> {
        let d = self.layout;
        let (pb, sb, k, rows) = (d.wire.payload_bytes, d.wire.scale_bytes, d.top_k, self.rows);
        let e_local = placement.local_count(rank);
        let mut sources: Vec<Vec<usize>> = vec![Vec::new(); e_local];
        let mut weights = vec![0f32; e_local * rows];
        let mut payload = vec![0u8; e_local * rows * pb];
        let mut scales = vec![0u8; e_local * rows * sb];
        for r in 0..rows {
            for j in 0..k {
                let id = self.ids[r * k + j];
                if id < 0 {
                    continue;
                }
                let li = placement.local_index(id as usize);
                let row = li * rows + sources[li].len();
                payload[row * pb..(row + 1) * pb].copy_from_slice(&self.payload[r * pb..(r + 1) * pb]);
                scales[row * sb..(row + 1) * sb].copy_from_slice(&self.scales[r * sb..(r + 1) * sb]);
                weights[row] = self.weights[r * k + j];
                sources[li].push(r);
            }
        }
        let counts: Vec<i32> = sources.iter().map(|s| s.len() as i32).collect();
        let dispatched = Dispatched::Batched {
            activations: activations(&d, scale_layout, payload, scales, &[e_local, rows])?,
            expert_counts: Tensor::from_i32(&[e_local], &counts),
            weights: Tensor::from_f32(DType::F32, &[e_local, rows], &weights),
        };
        Ok((dispatched, sources))
    }

    /// The Standard delivery: `[rows, ..]`.
    pub fn into_standard(self, scale_layout: Option<ScaleLayout>) -> Result<Dispatched> {
        let d = self.layout;
        let (rows, k) = (self.rows, d.top_k);
        Ok(Dispatched::Standard {
            activations: activations(&d, scale_layout, self.payload, self.scales, &[rows])?,
            topk_ids: Tensor::from_i32(&[rows, k], &self.ids),
            topk_weights: Tensor::from_f32(DType::F32, &[rows, k], &self.weights),
        })
    }
}

/// The combine side of [`ReceivedRows::into_batched`]: `expert_output` is the experts'
/// `[sources.len(), rows, h]` weighted rows of `dtype`, `sources` the received row of each
/// expert's rows as `into_batched` returned them; row `r` of the result is the f32 sum, from
/// `0.0` in ascending expert order, of `r`'s rows, rounded to `dtype` (rows no expert took are
/// zeros). Written once so that host backends and the GPU reduction's tests share one
/// definition of the order and the arithmetic, which the GPU matches bit for bit.
pub fn reduce_batched(
    sources: &[Vec<usize>],
    expert_output: &Tensor,
    rows: usize,
    h: usize,
    dtype: DType,
) -> Result<Tensor> {
    expert_output.expect("finalize", "expert_output", dtype, &[sources.len(), rows, h])?;
    let y = expert_output.to_f32();
    let mut acc = vec![0f32; rows * h];
    for (li, sources) in sources.iter().enumerate() {
        for (i, &r) in sources.iter().enumerate() {
            let src = &y[(li * rows + i) * h..(li * rows + i + 1) * h];
            acc[r * h..(r + 1) * h].iter_mut().zip(src).for_each(|(a, v)| *a += v);
        }
    }
    Ok(Tensor::from_f32(dtype, &[rows, h], &acc))
}

/// Wraps received payload and scale bytes with `lead` leading dims. Scales travel linear,
/// because the 128-row padding of the swizzled layout does not follow tokens; when the experts
/// consume the 128x4 layout each matrix of rows (the last leading dim) is swizzled here, after
/// receipt.
fn activations(
    d: &DispatchLayout,
    layout: Option<ScaleLayout>,
    payload: Vec<u8>,
    scales: Vec<u8>,
    lead: &[usize],
) -> Result<Activations> {
    let with_last = |last: usize| {
        let mut s = lead.to_vec();
        s.push(last);
        s
    };
    let data = Tensor::from_bytes(DType::U8, &with_last(d.wire.payload_bytes), payload)?;
    let scales = match layout {
        None => None,
        Some(ScaleLayout::Linear) => Some((
            Tensor::from_bytes(DType::U8, &with_last(d.wire.scale_bytes), scales)?,
            ScaleLayout::Linear,
        )),
        Some(ScaleLayout::Swizzled128x4) => {
            let rows = *lead.last().expect("at least one leading dim");
            let cols = d.wire.scales_per_token;
            let matrices = lead.iter().product::<usize>() / rows.max(1);
            let mut out = Vec::with_capacity(matrices * swizzle::swizzled_len(rows, cols));
            for m in 0..matrices {
                out.extend(swizzle::swizzle_128x4(
                    &scales[m * rows * cols..(m + 1) * rows * cols],
                    rows,
                    cols,
                ));
            }
            let len = out.len();
            Some((Tensor::from_bytes(DType::U8, &[len], out)?, ScaleLayout::Swizzled128x4))
        }
    };
    Ok(Activations::new(d.scheme, data, scales))
}

#[cfg(test)]
mod tests {
    use moe_quant::QuantScheme;

    use super::*;

    /// Rank 1 of 2 owns experts 3, 4 and 5 (local 0, 1, 2); bf16 rows of 2 elements, top-3.
    fn received(ids: &[[i32; 3]]) -> (ReceivedRows, ExpertPlacement) {
        let layout = DispatchLayout {
            scheme: QuantScheme::Bf16,
            wire: QuantScheme::Bf16.wire_layout(2).expect("valid"),
            top_k: 3,
            hidden: 2,
            combine_row_bytes: 4,
        };
        let mut rows = ReceivedRows::new(layout, ids.len());
        for (r, ids) in ids.iter().enumerate() {
            let mut slot = vec![0u8; layout.slot_bytes()];
            slot[..4].copy_from_slice(&[r as u8; 4]);
            let weights: Vec<f32> = (0..3).map(|j| (10 * r + j + 1) as f32).collect();
            write_routing(&layout, ids, &weights, None, &mut slot[layout.ids_offset()..]);
            rows.fill(r, r % 2, &slot);
        }
        (rows, ExpertPlacement::contiguous(6, 2))
    }

    #[test]
    fn a_foreign_id_is_refused_naming_the_rank_that_sent_it() {
        let (rows, placement) = received(&[[4, -1, -1], [3, 1, -1]]);
        let e = rows
            .check_ids("prepare", 1, &placement)
            .expect_err("expert 1 is rank 0's");
        let MoeError::CorruptPeerData { detail, .. } = &e else {
            panic!("expected CorruptPeerData, got {e}")
        };
        assert!(
            detail.starts_with("rank 1 sent rank 1 a row (received row 1) with expert id 1 in top-k slot 1"),
            "{detail}"
        );
        let (rows, placement) = received(&[[4, -1, -1], [-1, 5, 3]]);
        rows.check_ids("prepare", 1, &placement).expect("ids of rank 1 and -1");
    }

    #[test]
    fn batched_rows_are_expert_major_in_row_order_and_reduce_in_expert_order() {
        let (rows, placement) = received(&[[4, 5, 3], [-1, -1, -1], [4, -1, -1]]);
        let (dispatched, sources) = rows.into_batched(&placement, 1, None).expect("valid rows");
        assert_eq!(sources, [vec![0], vec![0, 2], vec![0]]);
        let Dispatched::Batched {
            activations,
            expert_counts,
            weights,
        } = dispatched
        else {
            panic!("a Batched delivery")
        };
        assert_eq!(expert_counts.to_i32(), [1, 2, 1]);
        // Each row carries its slot's weight; rows beyond the counts weigh 0.
        assert_eq!(weights.to_f32(), [3.0, 0.0, 0.0, 1.0, 21.0, 0.0, 2.0, 0.0, 0.0]);
        assert_eq!(activations.data().shape(), [3, 3, 4]);
        assert_eq!(&activations.data().bytes()[12..20], [0, 0, 0, 0, 2, 2, 2, 2]);

        // Row 0 takes 1 (expert 3), b (expert 4), -b (expert 5): in expert order 1 vanishes
        // into b, in slot order (b, -b, 1) it would survive. Rows beyond the counts are NaN,
        // which a sum that read them would show.
        let b = 1e8f32;
        let nan = f32::NAN;
        let y = [
            [1.0, 3.0, nan, nan, nan, nan],
            [b, b, 2.5, -4.0, nan, nan],
            [-b, -b, nan, nan, nan, nan],
        ]
        .concat();
        let expert_output = Tensor::from_f32(DType::Bf16, &[3, 3, 2], &y);
        let out = reduce_batched(&sources, &expert_output, 3, 2, DType::Bf16).expect("valid shapes");
        assert_eq!(out.to_f32(), [0.0, 0.0, 0.0, 0.0, 2.5, -4.0]);

        let err = reduce_batched(&sources, &Tensor::zeros(DType::Bf16, &[3, 2]), 3, 2, DType::Bf16)
            .expect_err("a Standard-shaped output is refused")
            .to_string();
        assert!(err.contains("expert_output"), "{err}");
    }
}
