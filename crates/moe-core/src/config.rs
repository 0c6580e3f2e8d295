//! Configs: quantization, MoE shape, parallel layout, expert placement, and the dispatch layout
//! computed from them in one place.

use std::fmt;

use moe_quant::{QuantParams, QuantScheme, WireLayout};

use crate::error::{Result, invalid};

/// The dtype of the activations that enter and leave the MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InputDtype {
    Bf16,
    F16,
}

impl InputDtype {
    /// The unquantized scheme that sends this dtype as is.
    pub const fn passthrough_scheme(self) -> QuantScheme {
        match self {
            InputDtype::Bf16 => QuantScheme::Bf16,
            InputDtype::F16 => QuantScheme::Fp16,
        }
    }

    /// The tensor dtype of activations in this dtype.
    pub const fn dtype(self) -> crate::tensor::DType {
        match self {
            InputDtype::Bf16 => crate::tensor::DType::Bf16,
            InputDtype::F16 => crate::tensor::DType::F16,
        }
    }
}

impl fmt::Display for InputDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InputDtype::Bf16 => "bf16",
            InputDtype::F16 => "fp16",
        })
    }
}

/// Where the scale factors of block-scaled formats sit after receipt.
///
/// Scales always travel linear (the 128-row padding of the swizzle would break the per-token
/// payload); `Swizzled128x4` asks the backend to swizzle them after receipt for experts that
/// consume the tcgen05/CUTLASS layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScaleLayout {
    Linear,
    Swizzled128x4,
}

/// How activations are quantized for dispatch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantConfig {
    /// The format the experts want their input in.
    pub scheme: QuantScheme,
    /// Scale and global-scale values of the scheme.
    pub params: QuantParams,
    /// Layout of received scales (only meaningful for nvfp4 and mxfp8).
    pub scale_layout: ScaleLayout,
    /// Send unquantized activations and let the experts quantize (vLLM's `defer_input_quant`).
    pub defer_input_quant: bool,
}

impl QuantConfig {
    /// Unquantized dispatch in the input dtype.
    pub fn unquantized(dtype: InputDtype) -> Self {
        Self::new(dtype.passthrough_scheme())
    }

    /// A scheme with unit scales, linear scale layout, quantized before dispatch.
    pub fn new(scheme: QuantScheme) -> Self {
        QuantConfig {
            scheme,
            params: QuantParams::default(),
            scale_layout: ScaleLayout::Linear,
            defer_input_quant: false,
        }
    }

    /// The same config with deferred input quantization.
    pub fn deferred(mut self) -> Self {
        self.defer_input_quant = true;
        self
    }

    /// The same config with swizzled received scales.
    pub fn with_scale_layout(mut self, layout: ScaleLayout) -> Self {
        self.scale_layout = layout;
        self
    }

    /// The same config with the given scale parameters.
    pub fn with_params(mut self, params: QuantParams) -> Self {
        self.params = params;
        self
    }

    /// The scheme actually put on the wire: the input dtype when quantization is deferred.
    pub fn wire_scheme(&self, input: InputDtype) -> QuantScheme {
        if self.defer_input_quant {
            input.passthrough_scheme()
        } else {
            self.scheme
        }
    }

    /// The scale layout received activations are delivered in (always linear without scales).
    pub fn received_scale_layout(&self, input: InputDtype) -> Option<ScaleLayout> {
        self.wire_scheme(input).has_scales().then_some(self.scale_layout)
    }

    /// Checks the config against the input dtype.
    pub fn validate(&self, input: InputDtype) -> Result<()> {
        let unquantized = matches!(self.scheme, QuantScheme::Bf16 | QuantScheme::Fp16);
        if unquantized && self.scheme != input.passthrough_scheme() {
            return Err(invalid(
                "quant.scheme",
                self.scheme,
                format!(
                    "an unquantized scheme sends the {input} input as is; use `{}` for {input} inputs",
                    input.passthrough_scheme()
                ),
            ));
        }
        if unquantized && self.defer_input_quant {
            return Err(invalid(
                "quant.defer_input_quant",
                true,
                format!(
                    "`{}` is not quantized, so there is nothing to defer; leave it false",
                    self.scheme
                ),
            ));
        }
        let block_scaled = matches!(self.scheme, QuantScheme::Nvfp4 | QuantScheme::Mxfp8);
        if self.scale_layout == ScaleLayout::Swizzled128x4 && !block_scaled {
            return Err(invalid(
                "quant.scale_layout",
                "Swizzled128x4",
                format!(
                    "the 128x4 swizzle applies to nvfp4 and mxfp8 scales only, not `{}`; use ScaleLayout::Linear",
                    self.scheme
                ),
            ));
        }
        for (field, v) in [
            ("quant.params.fp8_static_scale", self.params.fp8_static_scale),
            ("quant.params.nvfp4_global_scale", self.params.nvfp4_global_scale),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(field, v, "must be a finite positive number"));
            }
        }
        Ok(())
    }
}

impl fmt::Display for QuantConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.scheme)?;
        if self.scale_layout == ScaleLayout::Swizzled128x4 {
            f.write_str("+swizzled")?;
        }
        if self.defer_input_quant {
            f.write_str("+deferred")?;
        }
        Ok(())
    }
}

/// The shape of one MoE layer.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Global number of experts.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Hidden size (elements per token).
    pub hidden: usize,
    /// The most tokens one rank passes to a single `prepare`.
    pub max_tokens_per_rank: usize,
    /// Activation dtype in and out of the layer.
    pub input_dtype: InputDtype,
    /// Expert -> EP rank; `None` places experts in contiguous blocks by rank.
    pub expert_map: Option<Vec<u32>>,
}

impl MoeConfig {
    /// A layer with contiguous expert placement.
    pub fn new(
        num_experts: usize,
        top_k: usize,
        hidden: usize,
        max_tokens_per_rank: usize,
        input_dtype: InputDtype,
    ) -> Self {
        MoeConfig {
            num_experts,
            top_k,
            hidden,
            max_tokens_per_rank,
            input_dtype,
            expert_map: None,
        }
    }

    /// Checks sizes; the expert map is checked against the EP size by [`LayerConfig::new`].
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("moe.num_experts", self.num_experts),
            ("moe.top_k", self.top_k),
            ("moe.hidden", self.hidden),
            ("moe.max_tokens_per_rank", self.max_tokens_per_rank),
        ] {
            if v == 0 {
                return Err(invalid(field, v, "must be at least 1"));
            }
        }
        if self.top_k > self.num_experts {
            return Err(invalid(
                "moe.top_k",
                self.top_k,
                format!(
                    "a token picks distinct experts, so top_k must not exceed num_experts ({})",
                    self.num_experts
                ),
            ));
        }
        if self.num_experts > i32::MAX as usize {
            return Err(invalid("moe.num_experts", self.num_experts, "expert ids are int32"));
        }
        Ok(())
    }
}

/// How the layer's ranks are arranged.
///
/// World = `tp * dp` ranks; rank `r` has `dp_rank = r / tp`, `tp_rank = r % tp`. The TP ranks of
/// one DP replica hold the same tokens. With `ep` the experts are split over all ranks (EP size =
/// world); without it every rank holds a tensor-parallel shard of every expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParallelConfig {
    pub tp: usize,
    pub dp: usize,
    pub ep: bool,
    /// Sequence-parallel MoE: each TP rank dispatches 1/tp of its replica's tokens.
    pub sp: bool,
}

/// The named arrangements a backend declares support for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParallelMode {
    /// One rank, nothing to communicate.
    Single,
    /// Expert parallel over all ranks, tp = 1.
    Ep,
    /// Data parallel, experts tensor-sharded over all ranks (no EP).
    Dp,
    /// Tensor parallel, experts tensor-sharded (no EP).
    Tp,
    /// Tensor and data parallel, experts tensor-sharded (no EP).
    TpDp,
    /// Tensor and data parallel attention, expert parallel MoE over all ranks.
    TpDpEp,
    /// Sequence-parallel MoE: TP+DP+EP with each TP rank dispatching 1/tp of the tokens.
    Sp,
}

impl ParallelMode {
    /// Every mode, in display order.
    pub const ALL: [ParallelMode; 7] = [
        ParallelMode::Single,
        ParallelMode::Ep,
        ParallelMode::Dp,
        ParallelMode::Tp,
        ParallelMode::TpDp,
        ParallelMode::TpDpEp,
        ParallelMode::Sp,
    ];

    /// Short name used in the matrix and in messages.
    pub const fn name(self) -> &'static str {
        match self {
            ParallelMode::Single => "single",
            ParallelMode::Ep => "ep",
            ParallelMode::Dp => "dp",
            ParallelMode::Tp => "tp",
            ParallelMode::TpDp => "tp+dp",
            ParallelMode::TpDpEp => "tp+dp+ep",
            ParallelMode::Sp => "sp",
        }
    }
}

impl fmt::Display for ParallelMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl ParallelConfig {
    /// Expert parallel over `ranks` ranks (tp = 1).
    pub const fn ep(ranks: usize) -> Self {
        ParallelConfig {
            tp: 1,
            dp: ranks,
            ep: true,
            sp: false,
        }
    }

    /// Number of ranks.
    pub const fn world_size(&self) -> usize {
        self.tp * self.dp
    }

    /// Checks the combination.
    pub fn validate(&self) -> Result<()> {
        if self.tp == 0 {
            return Err(invalid("parallel.tp", self.tp, "must be at least 1"));
        }
        if self.dp == 0 {
            return Err(invalid("parallel.dp", self.dp, "must be at least 1"));
        }
        if self.ep && self.world_size() < 2 {
            return Err(invalid(
                "parallel.ep",
                true,
                "expert parallelism needs at least 2 ranks (tp * dp >= 2); set ep = false for one rank",
            ));
        }
        if self.sp && !(self.ep && self.tp > 1 && self.dp > 1) {
            return Err(invalid(
                "parallel.sp",
                true,
                format!(
                    "sequence parallelism needs ep = true, tp > 1 and dp > 1 (got ep = {}, tp = {}, dp = {})",
                    self.ep, self.tp, self.dp
                ),
            ));
        }
        Ok(())
    }

    /// The named arrangement of this config.
    pub fn mode(&self) -> ParallelMode {
        match (self.ep, self.sp, self.tp > 1, self.dp > 1) {
            (_, true, _, _) => ParallelMode::Sp,
            (true, false, true, _) => ParallelMode::TpDpEp,
            (true, false, false, _) => ParallelMode::Ep,
            (false, _, false, false) => ParallelMode::Single,
            (false, _, false, true) => ParallelMode::Dp,
            (false, _, true, false) => ParallelMode::Tp,
            (false, _, true, true) => ParallelMode::TpDp,
        }
    }

    /// `dp_rank` of a rank.
    pub const fn dp_rank(&self, rank: usize) -> usize {
        rank / self.tp
    }

    /// `tp_rank` of a rank.
    pub const fn tp_rank(&self, rank: usize) -> usize {
        rank % self.tp
    }

    /// The TP group of a rank: the ranks of its DP replica.
    pub fn tp_group(&self, rank: usize) -> Vec<usize> {
        let base = self.dp_rank(rank) * self.tp;
        (base..base + self.tp).collect()
    }

    /// The DP group of a rank: the ranks with its `tp_rank`, one per replica.
    pub fn dp_group(&self, rank: usize) -> Vec<usize> {
        let t = self.tp_rank(rank);
        (0..self.dp).map(|d| d * self.tp + t).collect()
    }

    /// All ranks (the EP group when `ep`).
    pub fn world_group(&self) -> Vec<usize> {
        (0..self.world_size()).collect()
    }
}

impl fmt::Display for ParallelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (tp={} dp={}", self.mode(), self.tp, self.dp)?;
        if self.ep {
            write!(f, " ep={}", self.world_size())?;
        }
        f.write_str(")")
    }
}

/// Which expert lives on which EP rank, and its index among that rank's experts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertPlacement {
    owner: Vec<u32>,
    local_index: Vec<u32>,
    local_counts: Vec<usize>,
}

impl ExpertPlacement {
    /// Contiguous blocks: ranks `[0, E % ep)` own `E / ep + 1` experts, the others `E / ep`.
    pub fn contiguous(num_experts: usize, ep: usize) -> Self {
        let base = num_experts / ep;
        let rem = num_experts % ep;
        let owner = (0..num_experts)
            .map(|e| {
                let r = if e < rem * (base + 1) {
                    e / (base + 1)
                } else {
                    rem + (e - rem * (base + 1)) / base.max(1)
                };
                r as u32
            })
            .collect();
        Self::from_owners(owner, ep)
    }

    /// An explicit map `expert -> rank`.
    pub fn from_map(map: &[u32], num_experts: usize, ep: usize) -> Result<Self> {
        if map.len() != num_experts {
            return Err(invalid(
                "moe.expert_map",
                format!("{} entries", map.len()),
                format!("needs one owner rank per expert ({num_experts})"),
            ));
        }
        if let Some((e, r)) = map.iter().enumerate().find(|(_, r)| **r as usize >= ep) {
            return Err(invalid(
                "moe.expert_map",
                format!("expert {e} -> rank {r}"),
                format!("owner ranks must be below the EP size {ep}"),
            ));
        }
        Ok(Self::from_owners(map.to_vec(), ep))
    }

    fn from_owners(owner: Vec<u32>, ep: usize) -> Self {
        let mut local_counts = vec![0usize; ep];
        let local_index = owner
            .iter()
            .map(|&r| {
                let i = local_counts[r as usize];
                local_counts[r as usize] += 1;
                i as u32
            })
            .collect();
        ExpertPlacement {
            owner,
            local_index,
            local_counts,
        }
    }

    /// The EP rank that owns `expert`.
    #[inline]
    pub fn owner(&self, expert: usize) -> usize {
        self.owner[expert] as usize
    }

    /// The expert's index among its owner's experts.
    #[inline]
    pub fn local_index(&self, expert: usize) -> usize {
        self.local_index[expert] as usize
    }

    /// How many experts `rank` owns.
    pub fn local_count(&self, rank: usize) -> usize {
        self.local_counts[rank]
    }

    /// Number of experts.
    pub fn num_experts(&self) -> usize {
        self.owner.len()
    }

    /// Number of EP ranks.
    pub fn ep_size(&self) -> usize {
        self.local_counts.len()
    }

    /// The global ids of the experts `rank` owns, in local-index order.
    pub fn experts_of(&self, rank: usize) -> Vec<usize> {
        (0..self.owner.len()).filter(|&e| self.owner(e) == rank).collect()
    }
}

/// The activation layout `prepare` delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActivationFormat {
    /// `[rows, hidden]`, one row per received token, with its top-k ids and weights.
    Standard,
    /// `[local_experts, max_tokens_per_expert, hidden]` plus per-expert counts.
    BatchedExperts,
}

impl ActivationFormat {
    /// Short name used in the matrix and in messages.
    pub const fn name(self) -> &'static str {
        match self {
            ActivationFormat::Standard => "standard",
            ActivationFormat::BatchedExperts => "batched-experts",
        }
    }
}

impl fmt::Display for ActivationFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Per-token byte sizes of one dispatched token, computed in one place from the configs.
///
/// Each part is padded to 16 bytes so that every part of every slot starts 16-byte aligned
/// (the GPU copies in 16-byte vectors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DispatchLayout {
    /// The scheme on the wire.
    pub scheme: QuantScheme,
    /// Wire sizes of the activation part.
    pub wire: WireLayout,
    pub top_k: usize,
    pub hidden: usize,
    /// Bytes of one combine row (the expert output in the input dtype).
    pub combine_row_bytes: usize,
}

/// Alignment of every part of a slot.
pub const SLOT_ALIGN: usize = 16;

/// Rounds `x` up to a multiple of `align`.
pub const fn round_up(x: usize, align: usize) -> usize {
    x.div_ceil(align) * align
}

impl DispatchLayout {
    /// The layout of `moe` dispatched with `quant`.
    pub fn new(moe: &MoeConfig, quant: &QuantConfig) -> Result<Self> {
        let scheme = quant.wire_scheme(moe.input_dtype);
        let wire = scheme.wire_layout(moe.hidden)?;
        Ok(DispatchLayout {
            scheme,
            wire,
            top_k: moe.top_k,
            hidden: moe.hidden,
            combine_row_bytes: moe.hidden * 2,
        })
    }

    /// Offset of the activation payload within a slot.
    pub const fn payload_offset(&self) -> usize {
        0
    }
    /// Offset of the scales within a slot.
    pub const fn scales_offset(&self) -> usize {
        round_up(self.wire.payload_bytes, SLOT_ALIGN)
    }
    /// Offset of the int32 top-k ids within a slot.
    pub const fn ids_offset(&self) -> usize {
        self.scales_offset() + round_up(self.wire.scale_bytes, SLOT_ALIGN)
    }
    /// Offset of the f32 top-k weights within a slot.
    pub const fn weights_offset(&self) -> usize {
        self.ids_offset() + round_up(4 * self.top_k, SLOT_ALIGN)
    }
    /// Bytes of one dispatch slot: payload, scales, ids and weights, each 16-byte aligned.
    pub const fn slot_bytes(&self) -> usize {
        self.weights_offset() + round_up(4 * self.top_k, SLOT_ALIGN)
    }
    /// Bytes of one combine slot.
    pub const fn combine_slot_bytes(&self) -> usize {
        round_up(self.combine_row_bytes, SLOT_ALIGN)
    }
}

/// Everything a backend is built from for one layer on one rank.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerConfig {
    pub moe: MoeConfig,
    pub quant: QuantConfig,
    pub parallel: ParallelConfig,
    /// The format the experts consume, which the backend must deliver.
    pub activation_format: ActivationFormat,
    /// The workspace group the layer joins in backends whose layers share a workspace (the
    /// peer-memory ones): `None`, the default, joins the group of its backend and EP group;
    /// layers of one name share their own (see [`LayerConfig::with_workspace_group`]).
    pub workspace_group: Option<String>,
}

impl LayerConfig {
    /// Validates every part and their combination.
    pub fn new(
        moe: MoeConfig,
        quant: QuantConfig,
        parallel: ParallelConfig,
        activation_format: ActivationFormat,
    ) -> Result<Self> {
        moe.validate()?;
        parallel.validate()?;
        quant.validate(moe.input_dtype)?;
        quant.scheme.wire_layout(moe.hidden)?;
        if let Some(map) = &moe.expert_map {
            if !parallel.ep {
                return Err(invalid(
                    "moe.expert_map",
                    "Some(..)",
                    "an expert map places experts on EP ranks; it needs parallel.ep = true",
                ));
            }
            ExpertPlacement::from_map(map, moe.num_experts, parallel.world_size())?;
        }
        Ok(LayerConfig {
            moe,
            quant,
            parallel,
            activation_format,
            workspace_group: None,
        })
    }

    /// The layer in the workspace group called `name` instead of the default one: every layer
    /// of a group shares one workspace, sized for the largest, and their calls take turns; the
    /// layers of a group must agree on top_k and the expert count. A layer that differs there
    /// from the others gets a group of its own this way. Set it alike on every rank.
    pub fn with_workspace_group(mut self, name: impl Into<String>) -> Self {
        self.workspace_group = Some(name.into());
        self
    }

    /// The dispatch layout.
    pub fn dispatch_layout(&self) -> DispatchLayout {
        DispatchLayout::new(&self.moe, &self.quant).expect("validated in LayerConfig::new")
    }

    /// Expert placement over the EP group (all ranks); without EP every rank is "rank 0" of a
    /// one-rank placement and computes a shard of every expert.
    pub fn placement(&self) -> ExpertPlacement {
        let ep = if self.parallel.ep {
            self.parallel.world_size()
        } else {
            1
        };
        match &self.moe.expert_map {
            Some(map) => {
                ExpertPlacement::from_map(map, self.moe.num_experts, ep).expect("validated in LayerConfig::new")
            }
            None => ExpertPlacement::contiguous(self.moe.num_experts, ep),
        }
    }

    /// What `rank` computes.
    pub fn ownership(&self, rank: usize) -> ExpertOwnership {
        if self.parallel.ep {
            ExpertOwnership::Ep {
                placement: std::sync::Arc::new(self.placement()),
                rank,
            }
        } else {
            ExpertOwnership::TensorSharded {
                shard: rank,
                shards: self.parallel.world_size(),
                num_experts: self.moe.num_experts,
            }
        }
    }

    /// Tokens one rank dispatches per call at most (1/tp of the replica's tokens under SP).
    pub fn dispatch_tokens_bound(&self) -> usize {
        if self.parallel.sp {
            self.moe.max_tokens_per_rank.div_ceil(self.parallel.tp)
        } else {
            self.moe.max_tokens_per_rank
        }
    }
}

/// Which experts, or which part of every expert, one rank computes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpertOwnership {
    /// Whole experts: those `placement` gives to `rank`.
    Ep {
        placement: std::sync::Arc<ExpertPlacement>,
        rank: usize,
    },
    /// Shard `shard` of `shards` of every expert (tensor parallel experts).
    TensorSharded {
        shard: usize,
        shards: usize,
        num_experts: usize,
    },
}

impl ExpertOwnership {
    /// The local index of `expert` if this rank computes (part of) it.
    pub fn local_index(&self, expert: usize) -> Option<usize> {
        match self {
            ExpertOwnership::Ep { placement, rank } => {
                (placement.owner(expert) == *rank).then(|| placement.local_index(expert))
            }
            ExpertOwnership::TensorSharded { num_experts, .. } => (expert < *num_experts).then_some(expert),
        }
    }

    /// The global ids of the experts this rank computes, in local-index order.
    pub fn local_experts(&self) -> Vec<usize> {
        match self {
            ExpertOwnership::Ep { placement, rank } => placement.experts_of(*rank),
            ExpertOwnership::TensorSharded { num_experts, .. } => (0..*num_experts).collect(),
        }
    }

    /// `(shard, shards)` of each expert this rank computes.
    pub fn shard(&self) -> (usize, usize) {
        match self {
            ExpertOwnership::Ep { .. } => (0, 1),
            ExpertOwnership::TensorSharded { shard, shards, .. } => (*shard, *shards),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_placement_splits_remainder_over_the_first_ranks() {
        let p = ExpertPlacement::contiguous(10, 4);
        let owners: Vec<usize> = (0..10).map(|e| p.owner(e)).collect();
        assert_eq!(owners, [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]);
        assert_eq!(p.local_index(4), 1);
        assert_eq!((0..4).map(|r| p.local_count(r)).collect::<Vec<_>>(), [3, 3, 2, 2]);
    }

    #[test]
    fn fewer_experts_than_ranks_leaves_ranks_empty() {
        let p = ExpertPlacement::contiguous(2, 4);
        assert_eq!((0..2).map(|e| p.owner(e)).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(p.local_count(3), 0);
    }

    #[test]
    fn modes_and_groups() {
        let c = ParallelConfig {
            tp: 2,
            dp: 2,
            ep: true,
            sp: false,
        };
        assert_eq!(c.mode(), ParallelMode::TpDpEp);
        assert_eq!(c.tp_group(3), [2, 3]);
        assert_eq!(c.dp_group(3), [1, 3]);
        assert_eq!(ParallelConfig::ep(4).mode(), ParallelMode::Ep);
        let sp = ParallelConfig { sp: true, ..c };
        assert_eq!(sp.mode(), ParallelMode::Sp);
    }

    #[test]
    fn sp_without_tp_and_dp_is_rejected() {
        let bad = ParallelConfig {
            tp: 1,
            dp: 4,
            ep: true,
            sp: true,
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("`parallel.sp`") && e.contains("tp > 1"), "{e}");
    }

    #[test]
    fn top_k_above_experts_is_rejected() {
        let m = MoeConfig::new(4, 5, 128, 8, InputDtype::Bf16);
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("`moe.top_k` = 5"), "{e}");
    }

    #[test]
    fn slot_parts_are_16_byte_aligned() {
        let moe = MoeConfig::new(256, 8, 7168, 128, InputDtype::Bf16);
        let l = DispatchLayout::new(&moe, &QuantConfig::new(QuantScheme::Nvfp4)).unwrap();
        assert_eq!(l.scales_offset(), 3584);
        assert_eq!(l.ids_offset(), 3584 + 448);
        assert_eq!(l.weights_offset(), 3584 + 448 + 32);
        assert_eq!(l.slot_bytes(), 3584 + 448 + 64);
        let moe = MoeConfig::new(8, 3, 16, 4, InputDtype::Bf16);
        let l = DispatchLayout::new(&moe, &QuantConfig::new(QuantScheme::Nvfp4)).unwrap();
        assert_eq!(
            [l.scales_offset(), l.ids_offset(), l.weights_offset(), l.slot_bytes()],
            [16, 32, 48, 64]
        );
    }
}
