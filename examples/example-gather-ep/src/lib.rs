//! example-gather-ep: a deliberately simple third-party backend, written against `moe-core`'s
//! public API only, to show what adding a backend takes.
//!
//! | step | what this backend does |
//! |---|---|
//! | `prepare` | all-gathers every EP rank's raw bf16/fp16 token rows, top-k ids and weights over the EP group (all ranks), each padded to `max_tokens_per_rank` rows with ids `-1` and weights `0`; then masks the ids of experts other ranks own with [`mask_foreign`] |
//! | experts | run on every gathered row; rows without a local expert are skipped by the id convention |
//! | `finalize` | all-gathers every rank's expert output and adds, for each of this rank's tokens, the rows of the ranks that own its experts, in f32, in the order of the token's top-k slots |
//!
//! It moves `ranks` times more data than an all-to-all and keeps no workspace between calls:
//! simple enough to read in one sitting, honest about what it supports (see [`CAPABILITIES`]),
//! and checked by the same test matrix as the built-in backends (`cargo xtask test-matrix
//! --backend example-gather-ep`).
//!
//! Linking it is what registers it: a binary names the crate (`use example_gather_ep as _;`)
//! so that the linker keeps its `inventory` submission.
#![forbid(unsafe_code)]

use moe_core::host::HostRank;
use moe_core::quant::{QuantScheme, bf16, fp16};
use moe_core::registry::{BackendRegistration, Capabilities, Limits};
use moe_core::routing::mask_foreign;
use moe_core::{
    ActivationFormat, Activations, DType, Dispatched, ExpertPlacement, InputDtype, LayerConfig, MoeError, ParallelMode,
    PlatformKind, PrepareFinalize, PrepareInput, Prepared, RankContext, Receipt, Result, Tensor,
};

/// The registered name.
pub const NAME: &str = "example-gather-ep";

/// What this backend declares: unquantized bf16/fp16 only, Standard format, EP over at most
/// four host ranks. Everything else is rejected by the registry before construction.
pub const CAPABILITIES: Capabilities = Capabilities {
    quant_schemes: &[QuantScheme::Bf16, QuantScheme::Fp16],
    deferred_quant: false,
    swizzled_scales: false,
    activation_formats: &[ActivationFormat::Standard],
    parallel_modes: &[ParallelMode::Ep],
    platforms: &[PlatformKind::Host],
    needs_all_pairs_peer_access: false,
    gpu_per_rank: false,
    single_node: true,
    limits: Limits {
        max_ranks: 4,
        max_top_k: 64,
        hidden_multiple_of: 1,
        max_tokens_per_rank: 1 << 16,
    },
};

moe_core::register_backend!(BackendRegistration {
    name: NAME,
    description: "example third-party backend: all-gather dispatch and all-gather combine over the EP group, bf16/fp16 only, at most 4 host ranks",
    capabilities: CAPABILITIES,
    construct: GatherEp::construct,
});

/// One layer's gather backend on one rank.
#[derive(Debug)]
pub struct GatherEp {
    input_dtype: InputDtype,
    scheme: QuantScheme,
    hidden: usize,
    top_k: usize,
    max_tokens: usize,
    placement: ExpertPlacement,
    rank: HostRank,
    /// The EP group: every rank of the world, in rank order.
    group: Vec<usize>,
}

/// Per-call state carried from `prepare` to `finalize`.
#[derive(Debug)]
struct GatherReceipt {
    /// This rank's unmasked top-k ids `[tokens, top_k]`: they say which ranks' rows to add.
    ids: Vec<i32>,
    tokens: usize,
}

impl GatherEp {
    /// Constructs the backend for one rank of a layer the registry has validated.
    pub fn construct(layer: &LayerConfig, ctx: &RankContext) -> Result<Box<dyn PrepareFinalize>> {
        let rank = match ctx {
            RankContext::Host(rank) => rank.clone(),
            _ => {
                return Err(MoeError::Unsupported(format!("{NAME} runs on host ranks only")));
            }
        };
        let d = layer.dispatch_layout();
        let hidden = layer.moe.hidden;
        if d.wire.payload_bytes != 2 * hidden || d.wire.scale_bytes != 0 {
            return Err(MoeError::Unsupported(format!(
                "{NAME} sends raw 16-bit tokens, but `{}` puts {} payload and {} scale bytes per token on the wire",
                d.scheme, d.wire.payload_bytes, d.wire.scale_bytes
            )));
        }
        Ok(Box::new(GatherEp {
            input_dtype: layer.moe.input_dtype,
            scheme: d.scheme,
            hidden,
            top_k: layer.moe.top_k,
            max_tokens: layer.moe.max_tokens_per_rank,
            placement: layer.placement(),
            rank,
            group: layer.parallel.world_group(),
        }))
    }

    /// Decodes one 16-bit element of the input dtype.
    fn decode(&self, lo: u8, hi: u8) -> f32 {
        let bits = u16::from_le_bytes([lo, hi]);
        match self.input_dtype {
            InputDtype::Bf16 => bf16::to_f32(bits),
            InputDtype::F16 => fp16::to_f32(bits),
        }
    }
}

impl PrepareFinalize for GatherEp {
    fn name(&self) -> &'static str {
        NAME
    }
    fn activation_format(&self) -> ActivationFormat {
        ActivationFormat::Standard
    }
    fn output_is_reduced(&self) -> bool {
        // The EP group is the whole world, so every contribution to a token is added here.
        true
    }
    fn max_tokens_per_rank(&self) -> usize {
        self.max_tokens
    }
    fn num_dispatchers(&self) -> usize {
        self.group.len()
    }
    fn workspace_bytes(&self) -> usize {
        // Gather buffers live for one call only; nothing is held between calls.
        0
    }

    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared> {
        let (h, k, max) = (self.hidden, self.top_k, self.max_tokens);
        let n = input.num_tokens();
        let row_bytes = 2 * h;
        let my_ids = input.topk_ids().to_i32();
        // This rank's rows, `max_tokens` of each part, little-endian: the 16-bit tokens (padding
        // rows zero), the top-k ids (padding -1), the weights (padding 0.0).
        let mine = input.require_host(self.name()).map(|()| {
            let mut rows = input.tokens().bytes().to_vec();
            rows.resize(max * row_bytes, 0);
            let ids = my_ids.iter().copied().chain(std::iter::repeat(-1));
            rows.extend(ids.take(max * k).flat_map(i32::to_le_bytes));
            let weights = input.topk_weights().to_f32().into_iter().chain(std::iter::repeat(0.0));
            rows.extend(weights.take(max * k).flat_map(f32::to_le_bytes));
            rows
        });
        // A rank that cannot run the call still takes part, saying why, so no peer waits for
        // it or pairs this call with its next.
        let (part, refused) = match mine {
            Ok(rows) => (Ok(rows), None),
            Err(e) => (Err(e.to_string()), Some(e)),
        };
        let all = self
            .rank
            .all_gather(&self.group, "example-gather-ep dispatch", contribution(part))?;
        if let Some(e) = refused {
            return Err(e);
        }
        let rows = self.group.len() * max;
        let part_bytes = max * (row_bytes + 8 * k);
        let mut tokens = Vec::with_capacity(rows * row_bytes);
        let mut ids = Vec::with_capacity(rows * k);
        let mut weights = Vec::with_capacity(rows * k);
        for (peer, r) in all.iter().enumerate() {
            // Nothing read from a peer is used before it is checked.
            let r = contributed(peer, "prepare", r, part_bytes)?;
            let (t, rest) = r.split_at(max * row_bytes);
            let (i, w) = rest.split_at(max * k * 4);
            tokens.extend_from_slice(t);
            ids.extend(i.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])));
            weights.extend(w.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        }
        let me = self.rank.rank();
        for (i, w) in ids.chunks_exact_mut(k).zip(weights.chunks_exact_mut(k)) {
            mask_foreign(i, w, me, &self.placement);
        }
        let data = Tensor::from_bytes(DType::U8, &[rows, row_bytes], tokens)?;
        Ok(Prepared {
            dispatched: Dispatched::Standard {
                activations: Activations::new(self.scheme, data, None),
                topk_ids: Tensor::from_i32(&[rows, k], &ids),
                topk_weights: Tensor::from_f32(DType::F32, &[rows, k], &weights),
            },
            receipt: Receipt::new(NAME, GatherReceipt { ids: my_ids, tokens: n }),
            expert_output: None,
        })
    }

    fn abandon(&mut self, prepared: Option<Receipt>, reason: &MoeError) -> Result<()> {
        let op = match prepared {
            None => "example-gather-ep dispatch",
            Some(_) => "example-gather-ep combine",
        };
        self.rank
            .all_gather(&self.group, op, contribution(Err(reason.to_string())))
            .map(drop)
    }

    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let state: GatherReceipt = receipt.into_state(NAME)?;
        let (h, k, max) = (self.hidden, self.top_k, self.max_tokens);
        let dtype = self.input_dtype.dtype();
        let checked = expert_output
            .expect("finalize", "expert_output", dtype, &[self.group.len() * max, h])
            .and_then(|()| out.expect("finalize", "out", dtype, &[state.tokens, h]));
        let outputs = self.rank.all_gather(
            &self.group,
            "example-gather-ep combine",
            contribution(
                checked
                    .clone()
                    .map(|()| expert_output.bytes().to_vec())
                    .map_err(|e| e.to_string()),
            ),
        )?;
        checked?;
        let outputs = outputs
            .iter()
            .enumerate()
            .map(|(peer, o)| contributed(peer, "finalize", o, expert_output.bytes().len()))
            .collect::<Result<Vec<_>>>()?;
        let me = self.rank.rank();
        let row_bytes = 2 * h;
        let mut sum = vec![0f32; h];
        for t in 0..state.tokens {
            sum.fill(0.0);
            // Each owner rank once, in the order of the token's top-k slots (the contract's
            // summation order); ranks owning none of its experts contribute nothing.
            let ids = &state.ids[t * k..(t + 1) * k];
            for (slot, &id) in ids.iter().enumerate() {
                let owner = self.placement.owner(id as usize);
                if ids[..slot].iter().any(|&e| self.placement.owner(e as usize) == owner) {
                    continue;
                }
                let at = (me * max + t) * row_bytes;
                let row = &outputs[owner][at..at + row_bytes];
                for (s, b) in sum.iter_mut().zip(row.chunks_exact(2)) {
                    *s += self.decode(b[0], b[1]);
                }
            }
            out.store_f32(t * h, &sum);
        }
        Ok(())
    }
}

/// One rank's part of a gather, as bytes (so the backend runs wherever its ranks are: threads
/// of one process, or processes joined by a control plane): `0` and its bytes, or `1` and why
/// it abandoned the call.
fn contribution(part: std::result::Result<Vec<u8>, String>) -> Vec<u8> {
    match part {
        Ok(bytes) => std::iter::once(0).chain(bytes).collect(),
        Err(reason) => std::iter::once(1).chain(reason.into_bytes()).collect(),
    }
}

/// What `peer` contributed to a gather of `op`, checked to be `len` bytes, or the error naming
/// it when it abandoned the call.
fn contributed<'a>(peer: usize, op: &'static str, c: &'a [u8], len: usize) -> Result<&'a [u8]> {
    match c.split_first() {
        Some((0, bytes)) if bytes.len() == len => Ok(bytes),
        Some((1, reason)) => Err(MoeError::InvalidInput {
            op,
            detail: format!(
                "rank {peer} abandoned this call ({}); every rank fails it",
                String::from_utf8_lossy(reason)
            ),
        }),
        _ => Err(MoeError::CorruptPeerData {
            op,
            detail: format!(
                "rank {peer} gathered {} bytes, where this layer's part is 1 + {len}",
                c.len()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use moe_core::harness::{Cell, Outcome, Routing, SHAPES, Shape, run_cell};
    use moe_core::quant::QuantScheme;
    use moe_core::{InputDtype, ParallelConfig, QuantConfig, Registry};

    use super::NAME;

    fn shape(name: &str) -> Shape {
        *SHAPES.iter().find(|s| s.name == name).expect("a matrix shape")
    }

    /// The default cell of this backend ([`Cell::new`]): bf16, EP over 2 ranks, the small
    /// SwiGLU shape.
    fn cell() -> Cell {
        Cell::new(NAME)
    }

    fn run(c: &Cell) -> Outcome {
        run_cell(Registry::global(), c)
    }

    fn assert_executed(c: &Cell) {
        match run(c) {
            Outcome::Executed {
                max_error, tolerance, ..
            } => assert!(max_error <= tolerance, "{c}: {max_error}"),
            other => panic!("{c}: expected executed, got {other:?}"),
        }
    }

    fn rejection(c: &Cell) -> String {
        match run(c) {
            Outcome::Rejected { reason } => reason,
            other => panic!("{c}: expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn is_registered_under_its_name() {
        assert!(Registry::global().names().contains(&NAME));
    }

    #[test]
    fn two_ranks_bf16_match_the_oracle() {
        assert_executed(&cell());
    }

    #[test]
    fn four_ranks_fp16_match_the_oracle() {
        let c = Cell {
            input_dtype: InputDtype::F16,
            quant: QuantConfig::new(QuantScheme::Fp16),
            parallel: ParallelConfig::ep(4),
            ..cell()
        };
        assert_executed(&c);
    }

    #[test]
    fn hard_routings_match_the_oracle() {
        for (routing, shape_name) in [
            (Routing::Skewed, "small-swiglu"),
            (Routing::AllOnOneRank, "deepseek-v3"),
            (Routing::EmptyFirstReplica, "top1"),
        ] {
            let c = Cell {
                parallel: ParallelConfig::ep(4),
                routing,
                shape: shape(shape_name),
                ..cell()
            };
            assert_executed(&c);
        }
    }

    #[test]
    fn nvfp4_is_rejected_with_the_supported_schemes() {
        let c = Cell {
            quant: QuantConfig::new(QuantScheme::Nvfp4),
            ..cell()
        };
        let reason = rejection(&c);
        assert!(
            reason.contains("backend `example-gather-ep` cannot serve nvfp4 dispatch"),
            "{reason}"
        );
        assert!(
            reason.contains("quant scheme `nvfp4` is not supported (supported: bf16, fp16)"),
            "{reason}"
        );
    }

    #[test]
    fn eight_ranks_are_rejected_with_the_limit() {
        let c = Cell {
            parallel: ParallelConfig::ep(8),
            ..cell()
        };
        let reason = rejection(&c);
        assert!(reason.contains("8 ranks exceed the limit of 4"), "{reason}");
    }

    #[test]
    fn tensor_parallel_is_rejected_with_the_supported_modes() {
        let c = Cell {
            parallel: ParallelConfig {
                tp: 2,
                dp: 1,
                ep: false,
                sp: false,
            },
            ..cell()
        };
        let reason = rejection(&c);
        assert!(
            reason.contains("parallel mode `tp` is not supported (supported: ep)"),
            "{reason}"
        );
    }
}
