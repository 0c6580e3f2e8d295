//! The Standard delivery kernel (`moe_deliver_standard`) on a GPU: received slots become the
//! Standard tensors exactly (filled rows their payload, ids and weights; padding rows ids -1
//! and weights 0), and a row whose ids a peer corrupted (an expert of another rank) is
//! delivered as padding while the rank's status names its source. Without a GPU each trial is
//! reported as ignored with the reason; `MOE_REQUIRE_GPU=1` makes that a failure.

use libtest_mimic::Failed;
use support::GpuTrials;

mod support;

fn main() {
    let mut trials = GpuTrials::new();
    trials.add(
        "standard_delivery_pads_a_row_with_a_foreign_id_and_names_its_source",
        cases::foreign_id,
    );
    trials.run()
}

#[cfg(not(feature = "cuda"))]
mod cases {
    use super::*;

    pub fn foreign_id() -> Result<(), Failed> {
        support::no_gpu()
    }
}

#[cfg(feature = "cuda")]
mod cases {
    use std::sync::Arc;
    use std::time::Duration;

    use moe_core::{DispatchLayout, Dispatched, InputDtype, MoeConfig, MoeError, QuantConfig};
    use moe_kernels::buffer::DeviceBuffer;
    use moe_kernels::deliver::{IdCheck, ReceivedSlots, StandardDelivery};
    use moe_kernels::device::CudaDevice;
    use moe_kernels::status::KernelStatus;

    use super::*;
    use support::{failed, gpu};

    /// 8 experts over 2 ranks; this is rank 1, owning experts 4..8.
    const ME: usize = 1;
    const EXPERTS: usize = 8;
    /// Source 0 sent 3 rows, source 1 sent 2; 8 rows in all, dense in source order.
    const COUNTS: [u32; 2] = [3, 2];
    const ROWS: usize = 8;
    /// Source 1's first row, whose ids the peer corrupted.
    const CORRUPT_ROW: usize = 3;

    /// The slots' bytes: row r's payload is r in every byte, its ids are -1 and an expert of
    /// this rank (or, when `corrupt`, an expert of rank 0 in the corrupt row), weights r + 0.5.
    fn slots(d: &DispatchLayout, corrupt: bool) -> Vec<u8> {
        let mut image = vec![0u8; ROWS * d.slot_bytes()];
        for (r, slot) in image.chunks_exact_mut(d.slot_bytes()).enumerate() {
            slot[..d.wire.payload_bytes].fill(r as u8);
            let id: i32 = if corrupt && r == CORRUPT_ROW {
                2
            } else {
                4 + (r % 4) as i32
            };
            for (k, id) in [-1, id].into_iter().enumerate() {
                slot[d.ids_offset() + 4 * k..][..4].copy_from_slice(&id.to_le_bytes());
                let w = if id < 0 { 0.0f32 } else { r as f32 + 0.5 };
                slot[d.weights_offset() + 4 * k..][..4].copy_from_slice(&w.to_le_bytes());
            }
        }
        image
    }

    /// Delivers `image` and returns the delivery read back and the status it left.
    fn deliver(
        gpu: &Arc<CudaDevice>,
        d: DispatchLayout,
        image: &[u8],
    ) -> Result<(Dispatched, moe_core::Result<()>), Failed> {
        let slots = DeviceBuffer::from_bytes(gpu, image).map_err(failed)?;
        let counts: Vec<u8> = COUNTS.iter().flat_map(|c| c.to_le_bytes()).collect();
        let counts = DeviceBuffer::from_bytes(gpu, &counts).map_err(failed)?;
        let owner: Vec<u8> = (0..EXPERTS).flat_map(|e| ((e / 4) as i32).to_le_bytes()).collect();
        let owner = DeviceBuffer::from_bytes(gpu, &owner).map_err(failed)?;
        let status = KernelStatus::new(gpu, ME, Duration::from_secs(1)).map_err(failed)?;
        let delivery = StandardDelivery::new(gpu, d, ROWS, None).map_err(failed)?;
        let from = ReceivedSlots {
            slots: slots.ptr(),
            counts: counts.ptr(),
            counts_stride: 1,
            sources: COUNTS.len(),
            rows_per_source: None,
            ids: IdCheck {
                owner: owner.ptr(),
                num_experts: EXPERTS,
                me: ME,
                status: status.word_ptr(),
                status_mirror: status.mirror_ptr(),
            },
        };
        // SAFETY: `slots` holds ROWS slots of `d`, `counts` one u32 per source, `owner` one i32
        // per expert, and the status its words; all live until the stream is read below.
        unsafe { delivery.launch(&from) }.map_err(failed)?;
        let dispatched = delivery.dispatched().map_err(failed)?.to_host().map_err(failed)?;
        Ok((dispatched, status.finish("prepare")))
    }

    pub fn foreign_id() -> Result<(), Failed> {
        let gpu = gpu()?;
        let moe = MoeConfig::new(EXPERTS, 2, 64, 4, InputDtype::Bf16);
        let d = DispatchLayout::new(&moe, &QuantConfig::unquantized(InputDtype::Bf16)).map_err(failed)?;
        let filled: u32 = COUNTS.iter().sum();
        for corrupt in [false, true] {
            let image = slots(&d, corrupt);
            let (dispatched, status) = deliver(&gpu, d, &image)?;
            let Dispatched::Standard {
                activations,
                topk_ids,
                topk_weights,
            } = &dispatched
            else {
                return Err("the Standard delivery delivered another format".into());
            };
            let (ids, weights) = (topk_ids.to_i32(), topk_weights.to_f32());
            for r in 0..ROWS {
                let delivered = r < filled as usize && !(corrupt && r == CORRUPT_ROW);
                let slot = &image[r * d.slot_bytes()..][..d.slot_bytes()];
                for k in 0..2 {
                    let want_id = if delivered {
                        i32::from_le_bytes(slot[d.ids_offset() + 4 * k..][..4].try_into().unwrap())
                    } else {
                        -1
                    };
                    let want_w = if delivered {
                        f32::from_le_bytes(slot[d.weights_offset() + 4 * k..][..4].try_into().unwrap())
                    } else {
                        0.0
                    };
                    if ids[r * 2 + k] != want_id || weights[r * 2 + k] != want_w {
                        return Err(format!(
                            "corrupt={corrupt}: row {r} slot {k}: got id {} weight {}, want {want_id} {want_w}",
                            ids[r * 2 + k],
                            weights[r * 2 + k]
                        )
                        .into());
                    }
                }
                if delivered && activations.data().row_bytes(r) != &slot[..d.wire.payload_bytes] {
                    return Err(format!("corrupt={corrupt}: row {r}'s payload differs from its slot").into());
                }
            }
            match (corrupt, status) {
                (false, Ok(())) => {}
                (true, Err(MoeError::CorruptPeerData { detail, .. }))
                    if detail.contains("rank 1 sent rank 1 a row") => {}
                (_, other) => return Err(format!("corrupt={corrupt}: status {other:?}").into()),
            }
        }
        Ok(())
    }
}
