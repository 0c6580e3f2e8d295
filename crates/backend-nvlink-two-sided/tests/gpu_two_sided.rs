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

use libtest_mimic::{Arguments, Failed, Trial};
use moe_core::harness::Cell;
use moe_kernels::probe::trial_label;

const RANKS: usize = 2;

fn cells() -> Vec<Cell> {
    Cell::protocol_cells(backend_nvlink_two_sided::NAME, RANKS)
}

fn main() {
    let mut args = Arguments::from_args();
    // One trial at a time: trials share the GPUs, and one trial's spinning kernels must not
    // meet another trial's allocations (see moe_kernels::platform).
    args.test_threads.get_or_insert(1);
    let skip = moe_kernels::probe::ranks_skip_reason(RANKS);
    let gpu_trial = |name: String, test: Box<dyn FnOnce() -> Result<(), Failed> + Send>| {
        Trial::test(trial_label(name, skip.as_deref()), test).with_ignored_flag(skip.is_some())
    };
    let mut trials: Vec<Trial> = cells()
        .into_iter()
        .map(|c| {
            gpu_trial(
                c.trial_name("gpu_matches_host"),
                Box::new(move || cases::matches_host(&c)),
            )
        })
        .collect();
    for c in Cell::many_tokens(backend_nvlink_two_sided::NAME, RANKS) {
        let name = format!(
            "{} {} tokens",
            c.trial_name("gpu_matches_host_on_a_small_grid"),
            c.shape.tokens
        );
        trials.push(gpu_trial(
            name,
            Box::new(move || cases::matches_host_on_a_small_grid(&c)),
        ));
    }
    // bf16 and nvfp4 (the scheme with the most quantization work) at the DeepSeek-V3 shape.
    for c in [cells().remove(0), cells().remove(4)] {
        trials.push(gpu_trial(
            c.trial_name("graph_replay_matches_host"),
            Box::new(move || cases::graph_replay(&c)),
        ));
    }
    trials.push(gpu_trial(
        "layers_of_different_layouts_share_one_growing_workspace".to_string(),
        Box::new(cases::shared_workspace),
    ));
    trials.push(gpu_trial(
        "a_silent_rank_is_named_in_the_timeout".to_string(),
        Box::new(cases::timeout),
    ));
    libtest_mimic::run(&args, trials).exit();
}

#[cfg(not(feature = "cuda"))]
mod cases {
    use super::*;

    pub fn matches_host(_: &Cell) -> Result<(), Failed> {
        Err(moe_kernels_missing())
    }

    pub fn matches_host_on_a_small_grid(_: &Cell) -> Result<(), Failed> {
        Err(moe_kernels_missing())
    }

    pub fn graph_replay(_: &Cell) -> Result<(), Failed> {
        Err(moe_kernels_missing())
    }

    pub fn timeout() -> Result<(), Failed> {
        Err(moe_kernels_missing())
    }

    pub fn shared_workspace() -> Result<(), Failed> {
        Err(moe_kernels_missing())
    }

    fn moe_kernels_missing() -> Failed {
        "built without the `cuda` feature (cargo test --features cuda)".into()
    }
}

#[cfg(feature = "cuda")]
mod cases {
    use std::sync::Arc;
    use std::time::Duration;

    use backend_nvlink_two_sided::WorkspaceLayout;
    use backend_nvlink_two_sided::cuda::GpuTwoSided;
    use moe_core::harness::{CALLS_PER_CELL, ReplicaInputs, Routing, SHAPES};
    use moe_core::quant::QuantScheme;
    use moe_core::routing::SendPlan;
    use moe_core::slots::{self, ReceivedRows};
    use moe_core::workspace_group::GroupLayout;
    use moe_core::{Activations, Dispatched, LayerConfig, MoeError, PrepareInput, Prepared, Tensor};
    use moe_kernels::platform::{CudaWorld, DeviceBuffer};
    use moe_kernels::two_sided::TwoSidedLaunch;
    use moe_peer::gpu::trials::{self as protocol_tests, ProtocolUnderTest};

    use super::*;

    /// The two-sided protocol as the shared protocol trials see it.
    struct TwoSided;

    impl ProtocolUnderTest for TwoSided {
        type Protocol = backend_nvlink_two_sided::TwoSided;
        type Options = ();
        type Rank = GpuTwoSided;

        fn new_rank(
            layer: &LayerConfig,
            world: &CudaWorld,
            workspaces: Arc<Vec<DeviceBuffer>>,
            rank: usize,
            timeout: Duration,
            launch: TwoSidedLaunch,
            (): (),
        ) -> Result<GpuTwoSided, MoeError> {
            GpuTwoSided::new(layer, world, workspaces, rank, timeout, launch)
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
        for inp in inputs {
            let images = slots::encode_tokens(&d, &layer.quant.params, &prepare_input(layer, layout.max_tokens, inp)?)?;
            let (ids, weights) = (inp.topk_ids.to_i32(), inp.topk_weights.to_f32());
            let plan = SendPlan::new(&ids, k, &placement);
            for t in 0..plan.num_tokens() {
                if plan.sends_of(t).any(|(_, target, _)| target == r) {
                    slot[..image].copy_from_slice(&images[t * image..(t + 1) * image]);
                    let (ids, weights) = (&ids[t * k..(t + 1) * k], &weights[t * k..(t + 1) * k]);
                    slots::write_routing(&d, ids, weights, Some((r, &placement)), &mut slot[image..]);
                    rows.fill(next, &slot);
                    next += 1;
                }
            }
        }
        rows.into_standard(layer.quant.received_scale_layout(layer.moe.input_dtype))
    }

    pub fn matches_host(c: &Cell) -> Result<(), Failed> {
        Ok(protocol_tests::compare_with_host::<TwoSided>(
            c,
            CALLS_PER_CELL,
            false,
            None,
            (),
        )?)
    }

    /// 3 blocks: far fewer than the cells of `Cell::many_tokens` have tokens.
    pub fn matches_host_on_a_small_grid(c: &Cell) -> Result<(), Failed> {
        let launch = TwoSidedLaunch { max_blocks: 3 };
        Ok(protocol_tests::compare_with_host::<TwoSided>(
            c,
            CALLS_PER_CELL,
            false,
            Some(launch),
            (),
        )?)
    }

    /// Dispatch (with its quantization) and combine each captured once in a CUDA graph and
    /// replayed for three calls with fresh inputs: still bit-identical to the host platform.
    pub fn graph_replay(c: &Cell) -> Result<(), Failed> {
        Ok(protocol_tests::compare_with_host::<TwoSided>(c, 3, true, None, ())?)
    }

    /// Rank 1 never dispatches: rank 0 waits for its counts in vain.
    pub fn timeout() -> Result<(), Failed> {
        let mut c = cells().remove(0);
        c.shape = SHAPES[0];
        Ok(protocol_tests::a_silent_rank_is_named_in_the_timeout::<TwoSided>(&c)?)
    }

    /// Whether device tensor `t` overlaps `buffer`.
    fn overlaps(t: &Tensor, buffer: &DeviceBuffer) -> bool {
        t.device_region().is_some_and(|r| {
            r.address() < buffer.ptr() + buffer.bytes() as u64 && buffer.ptr() < r.address() + r.len() as u64
        })
    }

    /// The layers of [`shared_workspace`], in construction order: a small bf16 layer; an nvfp4
    /// layer of three times the tokens per rank (smaller slots, more rows: neither layout covers
    /// the other, so it grows the group to their union); a bf16 layer of half the hidden size
    /// and fewer tokens per rank, which the union covers.
    fn shared_cells() -> [Cell; 3] {
        let cell = |scheme: QuantScheme, shape: usize, max_tokens: usize, tokens: usize| {
            let mut c = Cell::protocol(backend_nvlink_two_sided::NAME, RANKS, scheme, shape, Routing::Uniform);
            c.shape.max_tokens_per_rank = max_tokens;
            c.shape.tokens = tokens;
            c.reseeded()
        };
        let mut half = cell(QuantScheme::Bf16, 0, 8, 7);
        half.shape.hidden = SHAPES[1].hidden;
        [
            cell(QuantScheme::Bf16, 0, 16, 5),
            cell(QuantScheme::Nvfp4, 0, 48, 40),
            half.reseeded(),
        ]
    }

    /// Three layers of different layouts: the second grows the workspace group and the third
    /// fits in it (see `protocol_tests::layers_share_one_growing_workspace`).
    pub fn shared_workspace() -> Result<(), Failed> {
        Ok(protocol_tests::layers_share_one_growing_workspace::<TwoSided>(
            &shared_cells(),
            |own| {
                let union = own[0].union(own[1]);
                if own[0].covers(&own[1]) || own[1].covers(&own[0]) || !union.covers(&own[2]) {
                    return Err("the second layer must grow the workspace and the third fit the union".to_string());
                }
                Ok(union)
            },
        )?)
    }
}
