//! The two-sided protocol on two GPUs against the host platform: for the same inputs, each GPU
//! rank receives the same number of tokens from each source, the same rows in the same order
//! (the host's dense layout, bit for bit), and — with the reference experts run on what the GPU
//! delivered — combines to exactly the bits the host platform produces (same rows, same f32
//! order), also when dispatch and combine are captured in CUDA graphs and replayed, and when a
//! few blocks each take many tokens (the grid-stride paths large calls take). Three layers of
//! different layouts constructed through the registry on the same ranks share one workspace,
//! grown to the union when the larger one is constructed, and alternate calls on it with the
//! host platform's rows and bits. A rank that never dispatches makes its peer's dispatch fail
//! with a timeout naming it, instead of hanging. Without two GPUs each trial is reported as
//! ignored with the reason; `MOE_REQUIRE_GPU=1` makes that a failure. With `MOE_SHARE_GPUS=1`
//! both ranks run on one GPU when there is only one (the kernels and the protocol, not the
//! path between GPUs).

use moe_peer::trials::CudaSuite;

fn main() {
    CudaSuite::new(backend_nvlink_two_sided::NAME, cases::run).run()
}

#[cfg(not(feature = "cuda"))]
mod cases {
    pub use moe_peer::trials::built_without_cuda as run;
}

#[cfg(feature = "cuda")]
mod cases {
    use std::sync::Arc;
    use std::time::Duration;

    use backend_nvlink_two_sided::WorkspaceLayout;
    use backend_nvlink_two_sided::cuda::CudaTwoSidedRank;
    use moe_core::harness::ReplicaInputs;
    use moe_core::routing::SendPlan;
    use moe_core::slots::{self, ReceivedRows};
    use moe_core::{Activations, Dispatched, LayerConfig, MoeError, PrepareInput, Prepared, Tensor};
    use moe_kernels::buffer::DeviceBuffer;
    use moe_kernels::two_sided::TwoSidedLaunch;
    use moe_kernels::world::CudaWorld;
    use moe_peer::PeerLayout;
    use moe_peer::cuda::trials::{self, ProtocolUnderTest};
    use moe_peer::trials::{CudaCase, TrialResult};

    /// Runs `case` for the two-sided protocol.
    pub fn run(case: CudaCase) -> TrialResult {
        trials::run::<TwoSided>(case)
    }

    /// The two-sided protocol as the shared protocol trials see it.
    struct TwoSided;

    impl ProtocolUnderTest for TwoSided {
        type Protocol = backend_nvlink_two_sided::TwoSided;
        type Options = ();
        type Rank = CudaTwoSidedRank;

        /// 3 blocks.
        fn small_grid() -> TwoSidedLaunch {
            TwoSidedLaunch { max_blocks: 3 }
        }

        fn new_rank(
            layer: &LayerConfig,
            world: &CudaWorld,
            workspaces: Arc<Vec<DeviceBuffer>>,
            rank: usize,
            timeout: Duration,
            launch: TwoSidedLaunch,
            (): (),
        ) -> Result<CudaTwoSidedRank, MoeError> {
            CudaTwoSidedRank::new(layer, world, workspaces, rank, timeout, launch)
        }

        /// Nothing handed out may lie in the group's workspace: no tensor keeps a workspace
        /// alive across a rebuild.
        fn check_handed_out(prepared: &Prepared, workspace: &DeviceBuffer) -> Result<(), MoeError> {
            let handed_out = match (&prepared.expert_output, &prepared.dispatched) {
                (
                    Some(y),
                    Dispatched::Standard {
                        activations,
                        topk_ids,
                        topk_weights,
                    },
                ) => {
                    let scales = match activations {
                        Activations::Scaled { scales, .. } => Some(scales),
                        Activations::Unscaled { .. } => None,
                    };
                    [y, activations.data(), topk_ids, topk_weights]
                        .into_iter()
                        .chain(scales)
                        .collect::<Vec<_>>()
                }
                _ => {
                    return Err(MoeError::Convention(
                        "expected a Standard delivery and the combine's buffer".into(),
                    ));
                }
            };
            if handed_out
                .iter()
                .any(|t| t.device_region().is_none() || overlaps(t, workspace))
            {
                return Err(MoeError::Convention(
                    "a tensor handed out is not a device tensor of the layer's own, or lies in the group's workspace"
                        .into(),
                ));
            }
            Ok(())
        }

        /// The same rows in the same order as the host platform (its dense layout, bit for bit).
        fn check_received(
            layer: &LayerConfig,
            inputs: &[ReplicaInputs],
            rank: usize,
            received: &Dispatched,
        ) -> Result<(), String> {
            if *received != host_received(layer, inputs, rank).map_err(|e| e.to_string())? {
                return Err(
                    "the received rows differ from the host platform's (payload, scales, ids, weights or row order)"
                        .into(),
                );
            }
            Ok(())
        }
    }

    fn prepare_input<'a>(
        layer: &LayerConfig,
        max_tokens: usize,
        inp: &'a ReplicaInputs,
    ) -> Result<PrepareInput<'a>, MoeError> {
        PrepareInput::new(layer, max_tokens, &inp.tokens, &inp.topk_ids, &inp.topk_weights)
    }

    /// What the host platform's `prepare` delivers to rank `r` when source `s` passes
    /// `inputs[s]`, built with moe-core's slot codec: sources in rank order, each one's tokens
    /// to `r` in token order (the slots its SendPlan numbers), then padding rows.
    fn host_received(layer: &LayerConfig, inputs: &[ReplicaInputs], r: usize) -> Result<Dispatched, MoeError> {
        let d = layer.dispatch_layout();
        let layout = WorkspaceLayout::for_layer(layer, &d);
        let (placement, k, image) = (layer.placement(), d.top_k, d.ids_offset());
        let mut rows = ReceivedRows::new(d, layout.rows());
        let mut slot = vec![0u8; d.slot_bytes()];
        let mut next = 0;
        for (source, inp) in inputs.iter().enumerate() {
            let images = slots::encode_tokens(
                &d,
                &layer.quant.params,
                &prepare_input(layer, layout.bounds.max_tokens, inp)?,
            )?;
            let (ids, weights) = (inp.topk_ids.to_i32(), inp.topk_weights.to_f32());
            let plan = SendPlan::new(&ids, k, &placement);
            for t in 0..plan.num_tokens() {
                if plan.sends_of(t).any(|(_, target, _)| target == r) {
                    slot[..image].copy_from_slice(&images[t * image..(t + 1) * image]);
                    let (ids, weights) = (&ids[t * k..(t + 1) * k], &weights[t * k..(t + 1) * k]);
                    slots::write_routing(&d, ids, weights, Some((r, &placement)), &mut slot[image..]);
                    rows.fill(next, source, &slot);
                    next += 1;
                }
            }
        }
        rows.into_standard(layer.quant.received_scale_layout(layer.moe.input_dtype))
    }

    /// Whether device tensor `t` overlaps `buffer`.
    fn overlaps(t: &Tensor, buffer: &DeviceBuffer) -> bool {
        t.device_region().is_some_and(|r| {
            r.address() < buffer.ptr() + buffer.bytes() as u64 && buffer.ptr() < r.address() + r.len() as u64
        })
    }
}
