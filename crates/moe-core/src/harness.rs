//! Cells of the test matrix: one (backend, quantization, parallel layout, shape, format,
//! routing) combination run on host ranks through the layer runner and compared with the f64
//! oracle. Shared by the conformance tests and `cargo xtask test-matrix`, so both judge a cell
//! the same way.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_quant::{QuantParams, QuantScheme, swizzle};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::ExpertOwnership;
use crate::config::{ActivationFormat, InputDtype, LayerConfig, MoeConfig, ParallelConfig, QuantConfig, ScaleLayout};
use crate::contract::{Activations, Dispatched, PrepareFinalize, PrepareInput, Prepared, Receipt};
use crate::error::{MoeError, Result};
use crate::experts::{DiagonalExperts, ExpertFunction, Experts, ReferenceExperts, SwigluExperts};
use crate::host::{HostRank, HostWorldConfig, run_host_world};
use crate::platform::{GpuRank, PlatformKind, RankContext};
use crate::reference::{max_relative_error, reference_moe, roundtrip_tokens};
use crate::registry::Registry;
use crate::runner::MoeLayer;
use crate::tensor::{DType, Location, Tensor};

/// The largest tolerated error of a cell, relative to the largest output magnitude.
///
/// The oracle sees the same quantization round trip as the data path, so the tolerance covers
/// only the data path's own rounding: each rank's partial sum rounded to the input dtype, the
/// f32 sum over ranks, the final rounding, and (for non-reduced backends) the TP all-reduce of
/// rounded partials. It is the same for every scheme and depends on the output dtype alone.
pub fn tolerance(input: InputDtype) -> f64 {
    match input {
        // 8 bits of mantissa, 2^-9 relative per rounding; the matrix's worst cell measured
        // 6.8e-3 (2026-11-23), so this keeps more than 2x headroom over the data path.
        InputDtype::Bf16 => 1.6e-2,
        // 11 bits of mantissa; worst measured 7.6e-4.
        InputDtype::F16 => 2e-3,
    }
}

/// How top-k ids are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// Distinct experts uniformly at random.
    Uniform,
    /// Every token picks experts `0..top_k`: all traffic to the first expert's rank.
    Skewed,
    /// Every token's experts all live on the last EP rank.
    AllOnOneRank,
    /// Uniform, but DP replica 0 has no tokens.
    EmptyFirstReplica,
}

impl Routing {
    /// Short name.
    pub const fn name(self) -> &'static str {
        match self {
            Routing::Uniform => "uniform",
            Routing::Skewed => "skewed",
            Routing::AllOnOneRank => "all-on-one-rank",
            Routing::EmptyFirstReplica => "empty-replica",
        }
    }
}

/// How experts are placed on EP ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Contiguous blocks by rank (no expert map).
    Contiguous,
    /// An explicit expert map: expert `e` on rank `e % ep`.
    RoundRobin,
}

/// The expert math a shape uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertKind {
    /// Per-element scale and bias (cheap at hidden 7168).
    Diagonal,
    /// SwiGLU MLP with this intermediate size.
    Swiglu { inter: usize },
}

/// A layer shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub name: &'static str,
    pub num_experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    /// Tokens each DP replica passes per call.
    pub tokens: usize,
    pub max_tokens_per_rank: usize,
    pub experts: ExpertKind,
}

/// The shapes of the matrix.
pub const SHAPES: [Shape; 3] = [
    Shape {
        name: "small-swiglu",
        num_experts: 8,
        top_k: 2,
        hidden: 256,
        tokens: 12,
        max_tokens_per_rank: 16,
        experts: ExpertKind::Swiglu { inter: 32 },
    },
    Shape {
        name: "top1",
        num_experts: 6,
        top_k: 1,
        hidden: 128,
        tokens: 9,
        max_tokens_per_rank: 9,
        experts: ExpertKind::Diagonal,
    },
    Shape {
        name: "deepseek-v3",
        num_experts: 256,
        top_k: 8,
        hidden: 7168,
        tokens: 6,
        max_tokens_per_rank: 8,
        experts: ExpertKind::Diagonal,
    },
];

/// One combination to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub backend: String,
    pub input_dtype: InputDtype,
    pub quant: QuantConfig,
    pub parallel: ParallelConfig,
    pub format: ActivationFormat,
    pub shape: Shape,
    pub routing: Routing,
    pub placement: Placement,
    pub seed: u64,
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<24} {:<24} {:<30} {:<15} {:<12}",
            self.backend,
            format!("{} ({} in)", self.quant, self.input_dtype),
            self.parallel.to_string(),
            self.format.name(),
            self.shape.name
        )?;
        if self.routing != Routing::Uniform {
            write!(f, " {}", self.routing.name())?;
        }
        if self.placement == Placement::RoundRobin {
            f.write_str(" round-robin-experts")?;
        }
        Ok(())
    }
}

/// What happened to a cell.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Ran and matched the oracle; the largest error and the tolerance it was held to. Off the
    /// host platform, also what the same cell on the host gave: the experts received the same
    /// rows, and the outputs differ by at most `vs_host` (relative to the largest output).
    Executed {
        max_error: f64,
        tolerance: f64,
        vs_host: Option<f64>,
    },
    /// The backend's record refuses the request; the construction error's message.
    Rejected { reason: String },
    /// It ran and broke, or was refused by a backend that declares support.
    Failed { error: String },
}

impl Cell {
    /// A cell of `backend` with the defaults tests start from: bf16 inputs and dispatch, EP over
    /// 2 ranks, the small SwiGLU shape, uniform routing, contiguous placement, Standard format,
    /// seeded from its description.
    pub fn new(backend: &str) -> Self {
        Cell {
            backend: backend.to_string(),
            input_dtype: InputDtype::Bf16,
            quant: QuantConfig::new(QuantScheme::Bf16),
            parallel: ParallelConfig::ep(2),
            format: ActivationFormat::Standard,
            shape: SHAPES[0],
            routing: Routing::Uniform,
            placement: Placement::Contiguous,
            seed: 0,
        }
        .reseeded()
    }

    /// The same cell with its seed derived from its (edited) description.
    pub fn reseeded(mut self) -> Self {
        self.seed = seed_of(&self.to_string());
        self
    }

    /// A cell of the GPU protocol tests of the peer-memory backends: `backend` over `ranks` EP
    /// ranks, `scheme` with the matrix's static fp8 and nvfp4 global scales, shape
    /// `SHAPES[shape]`, `routing`.
    pub fn protocol(backend: &str, ranks: usize, scheme: QuantScheme, shape: usize, routing: Routing) -> Cell {
        let mut quant = QuantConfig::new(scheme);
        quant.params.nvfp4_global_scale = 448.0 * 6.0 / 100.0;
        quant.params.fp8_static_scale = 0.05;
        Cell {
            quant,
            parallel: ParallelConfig::ep(ranks),
            shape: SHAPES[shape],
            routing,
            ..Cell::new(backend)
        }
        .reseeded()
    }

    /// The cells a peer-memory backend's GPU protocol test compares with the host platform
    /// (see [`Cell::protocol`]): every wire scheme at the DeepSeek-V3 shape, fp16 inputs and
    /// nvfp4 with swizzled scales at the small shape, every token to one rank at full capacity
    /// (that rank's receive region is full), all tokens on one rank, a rank without tokens, and
    /// the top-1 shape.
    pub fn protocol_cells(backend: &str, ranks: usize) -> Vec<Cell> {
        let base = |scheme: QuantScheme, shape: usize, routing: Routing| {
            Cell::protocol(backend, ranks, scheme, shape, routing)
        };
        let mut v = Vec::new();
        // fp16 needs fp16 inputs: below.
        for scheme in QuantScheme::ALL {
            if scheme == QuantScheme::Fp16 {
                continue;
            }
            v.push(base(scheme, 2, Routing::Uniform));
        }
        v.push(Cell {
            input_dtype: InputDtype::F16,
            quant: QuantConfig::new(QuantScheme::Fp16),
            ..base(QuantScheme::Bf16, 0, Routing::Uniform)
        });
        v.push(Cell {
            quant: QuantConfig::new(QuantScheme::Nvfp4).with_scale_layout(ScaleLayout::Swizzled128x4),
            ..base(QuantScheme::Bf16, 0, Routing::Uniform)
        });
        let mut full = base(QuantScheme::Bf16, 0, Routing::Skewed);
        full.shape.tokens = full.shape.max_tokens_per_rank;
        v.push(full);
        v.push(base(QuantScheme::Nvfp4, 2, Routing::AllOnOneRank));
        v.push(base(QuantScheme::Fp8Block128, 2, Routing::EmptyFirstReplica));
        v.push(base(QuantScheme::Bf16, 1, Routing::Uniform));
        v
    }

    /// The name of test `test` on this cell: the test, then the cell's description on one line
    /// with single spaces (the description pads its columns for tables).
    pub fn trial_name(&self, test: &str) -> String {
        format!(
            "{test} {}",
            self.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
        )
    }

    /// Cells of `backend` over `ranks` EP ranks with many more tokens per rank than the SMs a
    /// GPU test gives the kernels, so each block routes and quantizes batches of tokens over
    /// several passes and the grid-stride loops turn: 70 tokens of the top-1 shape for the
    /// schemes whose quantization differs most (none, one scale per token, per 128-element
    /// block, nvfp4), and 20 of the DeepSeek-V3 shape in bf16.
    pub fn many_tokens(backend: &str, ranks: usize) -> Vec<Cell> {
        let cell = |scheme: QuantScheme, shape: Shape, tokens: usize| {
            let mut quant = QuantConfig::new(scheme);
            quant.params.fp8_static_scale = 0.05;
            quant.params.nvfp4_global_scale = 448.0 * 6.0 / 100.0;
            Cell {
                quant,
                parallel: ParallelConfig::ep(ranks),
                shape: Shape {
                    tokens,
                    max_tokens_per_rank: tokens + tokens / 8,
                    ..shape
                },
                ..Cell::new(backend)
            }
            .reseeded()
        };
        let mut cells: Vec<Cell> = [
            QuantScheme::Bf16,
            QuantScheme::Fp8PerToken,
            QuantScheme::Fp8Block128,
            QuantScheme::Nvfp4,
        ]
        .into_iter()
        .map(|scheme| cell(scheme, SHAPES[1], 70))
        .collect();
        cells.push(cell(QuantScheme::Bf16, SHAPES[2], 20));
        cells
    }

    /// The validated layer config of this cell.
    pub fn layer(&self) -> Result<LayerConfig> {
        let s = &self.shape;
        let mut moe = MoeConfig::new(
            s.num_experts,
            s.top_k,
            s.hidden,
            s.max_tokens_per_rank,
            self.input_dtype,
        );
        if self.placement == Placement::RoundRobin {
            let ep = self.parallel.world_size() as u32;
            moe.expert_map = Some((0..s.num_experts as u32).map(|e| e % ep).collect());
        }
        LayerConfig::new(moe, self.quant, self.parallel, self.format)
    }

    /// The cell's experts when they are diagonal (the kind the CUDA reference experts run).
    pub fn diagonal_experts(&self) -> Option<DiagonalExperts> {
        (self.shape.experts == ExpertKind::Diagonal).then(|| self.diagonal())
    }

    fn diagonal(&self) -> DiagonalExperts {
        DiagonalExperts::random(self.shape.num_experts, self.shape.hidden, self.seed ^ 0xD1A6)
    }

    /// The expert math of this cell.
    pub fn expert_function(&self) -> Arc<dyn ExpertFunction> {
        let s = &self.shape;
        match s.experts {
            ExpertKind::Diagonal => Arc::new(self.diagonal()),
            ExpertKind::Swiglu { inter } => Arc::new(SwigluExperts::random(
                s.num_experts,
                s.hidden,
                inter,
                self.seed ^ 0x5716,
            )),
        }
    }
}

/// Inputs of one DP replica for one call.
#[derive(Clone, Debug)]
pub struct ReplicaInputs {
    pub tokens: Tensor,
    pub topk_ids: Tensor,
    pub topk_weights: Tensor,
}

/// Fails unless `out` is the oracle's MoE output for `inp` (cell `c`'s experts, its
/// quantization round trip) within the cell's tolerance, every element written; `what` names
/// the call in the message.
pub fn matches_oracle(c: &Cell, inp: &ReplicaInputs, out: &Tensor, what: &str) -> std::result::Result<(), String> {
    if let Some(i) = out.first_poisoned() {
        return Err(format!("{what}: output element {i} was never written"));
    }
    let x = crate::reference::roundtrip_tokens(&c.quant, &inp.tokens).map_err(|e| format!("{what}: {e}"))?;
    let want = crate::reference::reference_moe(
        c.expert_function().as_ref(),
        &x,
        &inp.topk_ids.to_i32(),
        &inp.topk_weights.to_f32(),
        c.shape.top_k,
    );
    let err = crate::reference::max_relative_error(&out.to_f32(), &want);
    let tol = tolerance(c.input_dtype);
    if err > tol {
        return Err(format!("{what}: max relative error {err:.3e} above {tol:.1e}"));
    }
    Ok(())
}

/// Fresh random inputs for every replica of `cell`, for call number `call`.
pub fn make_inputs(cell: &Cell, layer: &LayerConfig, call: u64) -> Vec<ReplicaInputs> {
    let s = &cell.shape;
    let placement = layer.placement();
    let ep = placement.ep_size();
    (0..cell.parallel.dp)
        .map(|d| {
            let mut rng = ChaCha8Rng::seed_from_u64(cell.seed ^ (call << 32) ^ ((d as u64 + 1) * 0x9E37_79B9));
            let n = if cell.routing == Routing::EmptyFirstReplica && d == 0 {
                0
            } else {
                s.tokens
            };
            let mut x = Vec::with_capacity(n * s.hidden);
            for _ in 0..n {
                // Per-token magnitudes over three decades exercise per-token and block scales.
                let mag = 10f32.powf(rng.random_range(-1.0f32..2.0));
                x.extend((0..s.hidden).map(|_| rng.random_range(-1.0f32..1.0) * mag));
            }
            let last_rank_experts = placement.experts_of(ep - 1);
            let mut ids = Vec::with_capacity(n * s.top_k);
            let mut weights = Vec::with_capacity(n * s.top_k);
            for _ in 0..n {
                let row: Vec<i32> = match cell.routing {
                    Routing::Uniform | Routing::EmptyFirstReplica => {
                        let mut all: Vec<i32> = (0..s.num_experts as i32).collect();
                        all.partial_shuffle(&mut rng, s.top_k);
                        all[..s.top_k].to_vec()
                    }
                    Routing::Skewed => (0..s.top_k as i32).collect(),
                    Routing::AllOnOneRank => {
                        let mut pool: Vec<i32> = last_rank_experts.iter().map(|&e| e as i32).collect();
                        let mut extra: Vec<i32> = (0..s.num_experts as i32).filter(|e| !pool.contains(e)).collect();
                        extra.shuffle(&mut rng);
                        pool.shuffle(&mut rng);
                        // Fill from other ranks only when the last rank owns fewer than top_k.
                        pool.extend(extra);
                        pool[..s.top_k].to_vec()
                    }
                };
                let w: Vec<f32> = (0..s.top_k).map(|_| rng.random_range(0.05f32..1.0)).collect();
                let sum: f32 = w.iter().sum();
                weights.extend(w.iter().map(|v| v / sum));
                ids.extend(row);
            }
            ReplicaInputs {
                tokens: Tensor::from_f32(cell.input_dtype.dtype(), &[n, s.hidden], &x),
                topk_ids: Tensor::from_i32(&[n, s.top_k], &ids),
                topk_weights: Tensor::from_f32(DType::F32, &[n, s.top_k], &weights),
            }
        })
        .collect()
}

/// Where a cell runs: the platform kind the registry checks, and how each host rank (every
/// platform's control plane) becomes the rank context the backends are constructed with.
#[derive(Clone, Copy)]
pub struct CellPlatform<'a> {
    pub kind: PlatformKind,
    pub rank_context: &'a (dyn Fn(HostRank) -> RankContext + Sync),
}

impl fmt::Debug for CellPlatform<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CellPlatform")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// The host platform: ranks are threads, backends run their host protocols.
pub const HOST: CellPlatform<'static> = CellPlatform {
    kind: PlatformKind::Host,
    rank_context: &RankContext::Host,
};

/// The rows of a Standard delivery that hold a token, each its payload, linear scales, ids and
/// weights bytes, in delivery order (read back from a device if it lives on one): what two
/// deliveries of the same tokens must agree on whatever their padding rows hold. Fails unless
/// every other row is padding (all ids -1, weights 0.0), so stale ids of another call or
/// another layer show up, and for swizzled scales, which have no per-row bytes.
pub fn filled_rows(d: &Dispatched) -> Result<Vec<Vec<u8>>> {
    let Dispatched::Standard {
        activations,
        topk_ids,
        topk_weights,
    } = d
    else {
        return Err(MoeError::Convention("filled_rows reads a Standard delivery".into()));
    };
    let (ids, weights, data) = (
        topk_ids.to_host()?,
        topk_weights.to_host()?,
        activations.data().to_host()?,
    );
    let (rows, k, all_ids) = (ids.shape()[0], ids.shape()[1], ids.to_i32());
    let scales = match activations {
        Activations::Unscaled { .. } => None,
        Activations::Scaled {
            scales,
            layout: ScaleLayout::Linear,
            ..
        } => Some(scales.to_host()?),
        Activations::Scaled { layout, .. } => {
            return Err(MoeError::Convention(format!(
                "filled_rows reads linear scales, the delivery's are {layout:?}"
            )));
        }
    };
    let mut filled = Vec::new();
    for r in 0..rows {
        if all_ids[r * k..(r + 1) * k].iter().all(|&i| i < 0) {
            if weights.row_bytes(r).iter().any(|&b| b != 0) {
                return Err(MoeError::Convention(format!("padding row {r} has a weight")));
            }
            continue;
        }
        let mut row = data.row_bytes(r).to_vec();
        if let Some(s) = &scales {
            row.extend_from_slice(s.row_bytes(r));
        }
        row.extend_from_slice(ids.row_bytes(r));
        row.extend_from_slice(weights.row_bytes(r));
        filled.push(row);
    }
    Ok(filled)
}

/// What one rank saw in one call: what its experts received and its output.
#[derive(Clone, Debug)]
pub struct CallRecord {
    pub received: Dispatched,
    pub out: Tensor,
}

/// What [`Altered`] changes in the backend it wraps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alteration {
    /// Reports the opposite `output_is_reduced`: the runner then reduces a reduced output
    /// again, or skips the reduce an unreduced one needs.
    FlippedReduction,
    /// Leaves the last row of a host `out` poisoned, as a backend that forgot to write it.
    ForgetsLastRow,
}

/// A backend that wraps another and changes one thing ([`Alteration`]), for the regression
/// tests that the layer runner reduces exactly once and that the judge notices an unwritten
/// row: each must fail the numeric check.
#[derive(Debug)]
pub struct Altered {
    pub inner: Box<dyn PrepareFinalize>,
    pub alteration: Alteration,
}

impl PrepareFinalize for Altered {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn activation_format(&self) -> ActivationFormat {
        self.inner.activation_format()
    }
    fn output_is_reduced(&self) -> bool {
        self.inner.output_is_reduced() != (self.alteration == Alteration::FlippedReduction)
    }
    fn max_tokens_per_rank(&self) -> usize {
        self.inner.max_tokens_per_rank()
    }
    fn num_dispatchers(&self) -> usize {
        self.inner.num_dispatchers()
    }
    fn workspace_bytes(&self) -> usize {
        self.inner.workspace_bytes()
    }
    fn prepare(&mut self, input: PrepareInput<'_>) -> Result<Prepared> {
        self.inner.prepare(input)
    }
    fn abandon(&mut self, prepared: Option<Receipt>, reason: &MoeError) -> Result<()> {
        self.inner.abandon(prepared, reason)
    }
    fn finalize(&mut self, receipt: Receipt, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        self.inner.finalize(receipt, expert_output, out)?;
        let rows = out.shape().first().copied().unwrap_or(0);
        if self.alteration == Alteration::ForgetsLastRow && out.location() == Location::Host && rows > 0 {
            out.row_bytes_mut(rows - 1).fill(crate::tensor::POISON_BYTE);
        }
        Ok(())
    }
    fn wait(&mut self) -> Result<()> {
        self.inner.wait()
    }
}

/// The experts of one rank, recording what they are given.
#[derive(Debug)]
struct RecordingExperts {
    inner: Arc<ReferenceExperts>,
    received: Mutex<Vec<Dispatched>>,
    /// On device tensors: the rank's GPU, where the host reference experts' output is copied.
    gpu: Option<Arc<dyn GpuRank>>,
}

impl Experts for RecordingExperts {
    fn activation_format(&self) -> ActivationFormat {
        self.inner.activation_format()
    }
    /// On device tensors, reads the delivery back (the workspace holds it only until the next
    /// call), runs the host reference experts and copies their output to the GPU.
    fn apply(&self, dispatched: &Dispatched, ownership: &ExpertOwnership, out: &mut Tensor) -> Result<()> {
        let received = dispatched.to_host()?;
        let on_gpu = match (out.location(), &self.gpu) {
            (Location::Host, _) => None,
            (Location::Device(_), Some(gpu)) => Some(gpu),
            (Location::Device(o), None) => {
                return Err(MoeError::Convention(format!(
                    "the experts got an output on GPU {o} on a rank without a GPU"
                )));
            }
        };
        match on_gpu {
            None => self.inner.apply(&received, ownership, out)?,
            Some(gpu) => {
                let mut host_out = Tensor::zeros(out.dtype(), out.shape());
                self.inner.apply(&received, ownership, &mut host_out)?;
                gpu.copy_to_device(&host_out, out)?;
            }
        }
        self.received.lock().unwrap_or_else(|e| e.into_inner()).push(received);
        Ok(())
    }
}

/// A rank's call tensors on its GPU for the matrix: allocated by the first call (and again
/// when a shape changes), overwritten by the later ones, so a cell's calls do not allocate
/// device memory each.
struct DeviceStaging {
    gpu: Arc<dyn GpuRank>,
    tensors: Vec<Tensor>,
}

impl DeviceStaging {
    /// Copies of `host` (tokens, ids, weights, out) on the GPU, sharing the staging tensors.
    /// The runner waited for the previous call, so nothing still reads them.
    fn stage(&mut self, host: [&Tensor; 4]) -> Result<[Tensor; 4]> {
        for (i, h) in host.iter().enumerate() {
            match self.tensors.get(i) {
                Some(t) if t.dtype() == h.dtype() && t.shape() == h.shape() => self.gpu.copy_to_device(h, t)?,
                _ => {
                    let t = self.gpu.upload(h)?;
                    if i < self.tensors.len() {
                        self.tensors[i] = t;
                    } else {
                        self.tensors.push(t);
                    }
                }
            }
        }
        match &self.tensors[..] {
            [a, b, c, d] => Ok([a.clone(), b.clone(), c.clone(), d.clone()]),
            other => Err(MoeError::Convention(format!("{} staging tensors, not 4", other.len()))),
        }
    }
}

/// Runs `cell`'s layer through the layer runner on `platform` for each call of `calls` and
/// returns every rank's records in call order, each output checked to be fully written
/// (poisoned before the call).
pub fn run_on(
    registry: &Registry,
    platform: CellPlatform<'_>,
    cell: &Cell,
    layer: &LayerConfig,
    experts: &Arc<ReferenceExperts>,
    calls: &[Vec<ReplicaInputs>],
) -> Vec<Result<Vec<CallRecord>>> {
    let world = HostWorldConfig {
        ranks: cell.parallel.world_size(),
        timeout: Duration::from_secs(30),
    };
    run_host_world(world, |rank| {
        let r = rank.rank();
        run_rank(registry, cell, layer, experts, calls, r, (platform.rank_context)(rank))
    })
}

/// Rank `r`'s part of [`run_on`], in `ctx`: wherever the other ranks run (threads of this
/// process, or processes of their own).
pub fn run_rank(
    registry: &Registry,
    cell: &Cell,
    layer: &LayerConfig,
    experts: &Arc<ReferenceExperts>,
    calls: &[Vec<ReplicaInputs>],
    r: usize,
    ctx: RankContext,
) -> Result<Vec<CallRecord>> {
    let gpu = match &ctx {
        RankContext::Cuda(rank) => Some(rank.gpu().clone()),
        _ => None,
    };
    let recording = Arc::new(RecordingExperts {
        inner: experts.clone(),
        received: Mutex::new(Vec::new()),
        gpu: gpu.clone(),
    });
    let mut moe = MoeLayer::new(registry, &cell.backend, layer.clone(), recording.clone(), ctx)?;
    // On a GPU rank every call runs on device tensors where the layer allows (see
    // `MoeLayer::device_tensors`: a TP group whose ranks share a GPU has no collectives).
    let mut device = gpu.filter(|_| moe.device_tensors().is_ok()).map(|gpu| DeviceStaging {
        gpu,
        tensors: Vec::new(),
    });
    let mut outs = Vec::new();
    for inputs in calls {
        let inp = &inputs[cell.parallel.dp_rank(r)];
        let mut out = Tensor::zeros(cell.input_dtype.dtype(), inp.tokens.shape());
        out.poison();
        match &mut device {
            None => moe.forward(&inp.tokens, &inp.topk_ids, &inp.topk_weights, &mut out)?,
            Some(staging) => {
                let [tokens, ids, weights, mut on_gpu] =
                    staging.stage([&inp.tokens, &inp.topk_ids, &inp.topk_weights, &out])?;
                moe.forward(&tokens, &ids, &weights, &mut on_gpu)?;
                moe.wait()?;
                out = on_gpu.to_host()?;
            }
        }
        if let Some(i) = out.first_poisoned() {
            return Err(MoeError::Convention(format!(
                "output element {i} (token {}, column {}) was never written",
                i / cell.shape.hidden,
                i % cell.shape.hidden
            )));
        }
        outs.push(out);
    }
    let received = std::mem::take(&mut *recording.received.lock().unwrap_or_else(|e| e.into_inner()));
    if received.len() != outs.len() {
        return Err(MoeError::Convention(format!(
            "the experts ran {} times in {} calls",
            received.len(),
            outs.len()
        )));
    }
    Ok(received
        .into_iter()
        .zip(outs)
        .map(|(received, out)| CallRecord { received, out })
        .collect())
}

/// Runs rank `rank.rank()` of `cell` on its platform (host or GPU), its peers wherever they are
/// (the test matrix's process launch: each rank a process), and judges what this rank saw: its
/// outputs against the oracle, and what its experts received and its outputs against the same
/// cell in a threads world on the host platform, exactly. `Ok` gives the largest relative error
/// against the oracle.
pub fn judge_rank(registry: &Registry, cell: &Cell, rank: RankContext) -> std::result::Result<f64, String> {
    let r = rank.rank();
    let layer = cell.layer().map_err(|e| e.to_string())?;
    let function = cell.expert_function();
    let experts = Arc::new(ReferenceExperts::new(function.clone(), cell.format, cell.quant));
    let calls: Vec<Vec<ReplicaInputs>> = (0..CALLS_PER_CELL).map(|c| make_inputs(cell, &layer, c)).collect();
    let records = run_rank(registry, cell, &layer, &experts, &calls, r, rank).map_err(|e| format!("rank {r}: {e}"))?;
    let want = oracle_outputs(cell, function.as_ref(), &calls).map_err(|e| e.to_string())?;
    let worst = oracle_error(cell, &want, r, records.iter().map(|c| &c.out))?;
    let threads = run_on(registry, HOST, cell, &layer, &experts, &calls)
        .swap_remove(r)
        .map_err(|e| format!("the threads world's run failed on rank {r}: {e}"))?;
    let scale_cols = layer.dispatch_layout().wire.scale_bytes;
    for (c, (t, p)) in threads.iter().zip(&records).enumerate() {
        if received_unordered(&t.received, scale_cols) != received_unordered(&p.received, scale_cols) {
            return Err(format!(
                "call {c}, rank {r}: the experts received other rows than with threads"
            ));
        }
        if t.out.bytes() != p.out.bytes() {
            return Err(format!(
                "call {c}, rank {r}: the output differs from the threads world's"
            ));
        }
    }
    Ok(worst)
}

/// The oracle's output of every call of `calls` (outer) for every replica's inputs (inner).
fn oracle_outputs(
    cell: &Cell,
    function: &dyn ExpertFunction,
    calls: &[Vec<ReplicaInputs>],
) -> Result<Vec<Vec<Vec<f64>>>> {
    calls
        .iter()
        .map(|inputs| {
            inputs
                .iter()
                .map(|inp| {
                    let x = roundtrip_tokens(&cell.quant, &inp.tokens)?;
                    Ok(reference_moe(
                        function,
                        &x,
                        &inp.topk_ids.to_i32(),
                        &inp.topk_weights.to_f32(),
                        cell.shape.top_k,
                    ))
                })
                .collect()
        })
        .collect()
}

/// The largest relative error of rank `r`'s outputs (one per call) against the oracle's
/// (`want`, from [`oracle_outputs`]), or why one exceeds the tolerance.
fn oracle_error<'a>(
    cell: &Cell,
    want: &[Vec<Vec<f64>>],
    r: usize,
    outs: impl Iterator<Item = &'a Tensor>,
) -> std::result::Result<f64, String> {
    let tol = tolerance(cell.input_dtype);
    let mut worst = 0f64;
    for (c, (want, out)) in want.iter().zip(outs).enumerate() {
        let err = max_relative_error(&out.to_f32(), &want[cell.parallel.dp_rank(r)]);
        if err > tol {
            return Err(format!(
                "call {c}, rank {r}: max relative error {err:.3e} exceeds the tolerance {tol:.1e}"
            ));
        }
        worst = worst.max(err);
    }
    Ok(worst)
}

/// [`run_on`] the host platform, outputs only: the reference the GPU tests compare with, bit
/// for bit.
pub fn run_on_host(
    registry: &Registry,
    cell: &Cell,
    layer: &LayerConfig,
    experts: &Arc<ReferenceExperts>,
    calls: &[Vec<ReplicaInputs>],
) -> Vec<Result<Vec<Tensor>>> {
    run_on(registry, HOST, cell, layer, experts, calls)
        .into_iter()
        .map(|rank| rank.map(|calls| calls.into_iter().map(|c| c.out).collect()))
        .collect()
}

/// Calls per cell: the second call checks that round counters and reused workspaces work.
pub const CALLS_PER_CELL: u64 = 2;

/// Runs `cell` on host ranks and judges it.
pub fn run_cell(registry: &Registry, cell: &Cell) -> Outcome {
    run_cell_on(registry, HOST, cell)
}

/// Runs `cell` on `platform` and judges it against the oracle; off the host platform, also
/// against the same cell on the host (the cross-platform check): every rank's experts must
/// receive the same rows in every call (in any order), and the outputs must agree within the
/// tolerance.
pub fn run_cell_on(registry: &Registry, platform: CellPlatform<'_>, cell: &Cell) -> Outcome {
    match run_cell_inner(registry, platform, cell) {
        Ok(o) => o,
        Err(e) => Outcome::Failed { error: e.to_string() },
    }
}

fn run_cell_inner(registry: &Registry, platform: CellPlatform<'_>, cell: &Cell) -> Result<Outcome> {
    let layer = cell.layer()?;
    match registry.check(&cell.backend, &layer, platform.kind) {
        Err(e @ MoeError::Incompatible { .. }) => {
            return Ok(Outcome::Rejected { reason: e.to_string() });
        }
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    let function = cell.expert_function();
    let experts = Arc::new(ReferenceExperts::new(function.clone(), cell.format, cell.quant));
    let calls: Vec<Vec<ReplicaInputs>> = (0..CALLS_PER_CELL).map(|c| make_inputs(cell, &layer, c)).collect();
    let results = run_on(registry, platform, cell, &layer, &experts, &calls);
    let mut worst = 0f64;
    let tol = tolerance(cell.input_dtype);
    let mut per_rank = Vec::new();
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(outs) => per_rank.push(outs),
            Err(e @ MoeError::RankPanicked { .. }) => return Err(e),
            Err(e) => {
                return Ok(Outcome::Failed {
                    error: format!("rank {r}: {e}"),
                });
            }
        }
    }
    let vs_host = match platform.kind {
        PlatformKind::Host => None,
        _ => match compare_with_host(registry, cell, &layer, &experts, &calls, &per_rank)? {
            Ok(diff) => Some(diff),
            Err(error) => return Ok(Outcome::Failed { error }),
        },
    };
    let want = oracle_outputs(cell, function.as_ref(), &calls)?;
    for (r, outs) in per_rank.iter().enumerate() {
        match oracle_error(cell, &want, r, outs.iter().map(|c| &c.out)) {
            Ok(err) => worst = worst.max(err),
            Err(error) => return Ok(Outcome::Failed { error }),
        }
    }
    Ok(Outcome::Executed {
        max_error: worst,
        tolerance: tol,
        vs_host,
    })
}

/// What a rank's experts received, free of row order: per group (the whole Standard delivery, or
/// each local expert of a Batched one) the sorted received rows, each the bytes of its payload,
/// linear scales (`scale_cols` bytes per row), and top-k ids and weights (Standard) or router
/// weight (Batched); a Standard padding row (every id -1) without its activations, which the
/// contract leaves unspecified (on device tensors they are a previous call's). The order of a
/// source's rows is not part of the contract: one-sided GPU dispatch numbers slots with atomics,
/// so it varies from run to run.
fn received_unordered(d: &Dispatched, scale_cols: usize) -> Vec<Vec<Vec<u8>>> {
    let linear_scales = |rows: usize| -> Option<Vec<u8>> {
        match d.activations() {
            Activations::Unscaled { .. } => None,
            Activations::Scaled { scales, layout, .. } => Some(match layout {
                ScaleLayout::Linear => scales.bytes().to_vec(),
                // One swizzled matrix per group of `rows` rows.
                ScaleLayout::Swizzled128x4 => scales
                    .bytes()
                    .chunks(swizzle::swizzled_len(rows, scale_cols).max(1))
                    .flat_map(|m| swizzle::unswizzle_128x4(m, rows, scale_cols))
                    .collect(),
            }),
        }
    };
    let data = d.activations().data().bytes();
    match d {
        Dispatched::Standard {
            topk_ids, topk_weights, ..
        } => {
            let rows = topk_ids.shape()[0];
            let scales = linear_scales(rows);
            let payload = data.len() / rows.max(1);
            let ids = topk_ids.to_i32();
            let k = topk_ids.row_len();
            let mut all: Vec<Vec<u8>> = (0..rows)
                .map(|i| {
                    // A padding row's activations are unspecified (the contract): its ids and
                    // weights are what it holds.
                    let padding = ids[i * k..(i + 1) * k].iter().all(|&e| e == -1);
                    let mut row = Vec::new();
                    if !padding {
                        row.extend_from_slice(&data[i * payload..(i + 1) * payload]);
                        if let Some(s) = &scales {
                            row.extend_from_slice(&s[i * scale_cols..(i + 1) * scale_cols]);
                        }
                    }
                    row.extend_from_slice(topk_ids.row_bytes(i));
                    row.extend_from_slice(topk_weights.row_bytes(i));
                    row
                })
                .collect();
            all.sort();
            vec![all]
        }
        Dispatched::Batched {
            expert_counts, weights, ..
        } => {
            let (experts, max_rows) = (weights.shape()[0], weights.shape()[1]);
            let scales = linear_scales(max_rows);
            let payload = data.len() / (experts * max_rows).max(1);
            let counts = expert_counts.to_i32();
            let w = weights.to_f32();
            (0..experts)
                .map(|e| {
                    let mut rows: Vec<Vec<u8>> = (0..counts[e].max(0) as usize)
                        .map(|i| {
                            let at = e * max_rows + i;
                            let mut row = data[at * payload..(at + 1) * payload].to_vec();
                            if let Some(s) = &scales {
                                row.extend_from_slice(&s[at * scale_cols..(at + 1) * scale_cols]);
                            }
                            row.extend_from_slice(&w[at].to_le_bytes());
                            row
                        })
                        .collect();
                    rows.sort();
                    rows
                })
                .collect()
        }
    }
}

/// The cross-platform check: runs the cell on the host and compares what every rank's experts
/// received (exactly) and the outputs (within the tolerance). `Ok(Err(why))` is a mismatch;
/// `Ok(Ok(d))` gives the largest output difference relative to the largest host output.
fn compare_with_host(
    registry: &Registry,
    cell: &Cell,
    layer: &LayerConfig,
    experts: &Arc<ReferenceExperts>,
    calls: &[Vec<ReplicaInputs>],
    records: &[Vec<CallRecord>],
) -> Result<std::result::Result<f64, String>> {
    let tol = tolerance(cell.input_dtype);
    let mut worst = 0f64;
    for (r, host) in run_on(registry, HOST, cell, layer, experts, calls)
        .into_iter()
        .enumerate()
    {
        let host = host.map_err(|e| MoeError::Convention(format!("the host reference run failed on rank {r}: {e}")))?;
        let scale_cols = layer.dispatch_layout().wire.scale_bytes;
        for (c, (h, g)) in host.iter().zip(&records[r]).enumerate() {
            if received_unordered(&h.received, scale_cols) != received_unordered(&g.received, scale_cols) {
                return Ok(Err(format!(
                    "call {c}, rank {r}: the experts received different rows than on the host platform"
                )));
            }
            let want: Vec<f64> = h.out.to_f32().iter().map(|&v| f64::from(v)).collect();
            let diff = max_relative_error(&g.out.to_f32(), &want);
            if diff > tol {
                return Ok(Err(format!(
                    "call {c}, rank {r}: the output differs from the host platform's by {diff:.3e} (tolerance {tol:.1e})"
                )));
            }
            worst = worst.max(diff);
        }
    }
    Ok(Ok(worst))
}

/// The quantization variants of the matrix: every scheme, plus swizzled scales and deferred
/// quantization where they apply.
pub fn quant_variants() -> Vec<(InputDtype, QuantConfig)> {
    let params = QuantParams {
        fp8_static_scale: 0.05,
        nvfp4_global_scale: 448.0 * 6.0 / 100.0,
    };
    let mut v = vec![
        (InputDtype::Bf16, QuantConfig::new(QuantScheme::Bf16)),
        (InputDtype::F16, QuantConfig::new(QuantScheme::Fp16)),
    ];
    for scheme in [
        QuantScheme::Fp8PerTensor,
        QuantScheme::Fp8PerToken,
        QuantScheme::Fp8Block128,
        QuantScheme::Nvfp4,
        QuantScheme::Mxfp8,
    ] {
        v.push((InputDtype::Bf16, QuantConfig::new(scheme).with_params(params)));
    }
    v.push((
        InputDtype::Bf16,
        QuantConfig::new(QuantScheme::Nvfp4)
            .with_params(params)
            .with_scale_layout(ScaleLayout::Swizzled128x4),
    ));
    v.push((
        InputDtype::Bf16,
        QuantConfig::new(QuantScheme::Fp8Block128)
            .with_params(params)
            .deferred(),
    ));
    v.push((
        InputDtype::Bf16,
        QuantConfig::new(QuantScheme::Nvfp4).with_params(params).deferred(),
    ));
    v
}

/// The parallel layouts of the matrix: one of every [`crate::config::ParallelMode`], EP at 2, 4 and 8 ranks.
pub fn parallel_variants() -> Vec<ParallelConfig> {
    vec![
        ParallelConfig {
            tp: 1,
            dp: 1,
            ep: false,
            sp: false,
        },
        ParallelConfig::ep(2),
        ParallelConfig::ep(4),
        ParallelConfig::ep(8),
        ParallelConfig {
            tp: 1,
            dp: 2,
            ep: false,
            sp: false,
        },
        ParallelConfig {
            tp: 2,
            dp: 1,
            ep: false,
            sp: false,
        },
        ParallelConfig {
            tp: 2,
            dp: 2,
            ep: false,
            sp: false,
        },
        ParallelConfig {
            tp: 2,
            dp: 2,
            ep: true,
            sp: false,
        },
        ParallelConfig {
            tp: 2,
            dp: 2,
            ep: true,
            sp: true,
        },
    ]
}

/// Every cell of the matrix for the registered backends: each backend x quant variant x
/// parallel layout x shape x activation format.
pub fn matrix_cells(registry: &Registry) -> Vec<Cell> {
    let mut cells = Vec::new();
    for backend in registry.names() {
        for (input_dtype, quant) in quant_variants() {
            for parallel in parallel_variants() {
                for shape in SHAPES {
                    for format in [ActivationFormat::Standard, ActivationFormat::BatchedExperts] {
                        let mut cell = Cell {
                            backend: backend.to_string(),
                            input_dtype,
                            quant,
                            parallel,
                            format,
                            shape,
                            routing: Routing::Uniform,
                            placement: Placement::Contiguous,
                            seed: 0,
                        };
                        cell.seed = seed_of(&cell.to_string());
                        cells.push(cell);
                    }
                }
            }
        }
    }
    cells
}

/// A stable seed from a cell's description (FNV-1a), so a failing cell reruns identically.
pub fn seed_of(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// One OS process per rank for the process tests: each rank is the calling test binary run
/// again, on one test, with the launchers' environment and a variable naming the scenario.
pub mod processes {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A port nothing listens on now.
    pub fn free_port() -> u16 {
        crate::control::TcpConfig::free_local_port().expect("a free port")
    }

    /// This test binary's test `test` as rank `rank` of a world of `world` whose rank 0
    /// listens on `port`, with `scenario` in `MOE_PROCESS_CHILD` and a 20 s timeout.
    pub fn spawn_rank(test: &str, scenario: &str, port: u16, rank: usize, world: usize) -> Child {
        Command::new(std::env::current_exe().expect("the test binary"))
            .args(["--exact", test, "--nocapture", "--test-threads", "1"])
            .env("MOE_PROCESS_CHILD", scenario)
            .envs(crate::control::TcpConfig::local_launch_env(
                port,
                rank,
                world,
                &port.to_string(),
            ))
            .env("MOE_TIMEOUT_MS", "20000")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning a rank")
    }

    /// Waits at most `limit` for `child` (killing it after): whether it succeeded, and its
    /// stdout.
    pub fn finish(mut child: Child, limit: Duration) -> (bool, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("polling a rank") {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        if let Some(stdout) = child.stdout.take() {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                out.push_str(&line);
                out.push('\n');
            }
        }
        let _ = child.wait();
        (status.is_some_and(|s| s.success()), out)
    }

    /// Kills `child` (SIGKILL on Unix) once it has printed a line containing `ready` and 300 ms
    /// more have passed, for its peers to be waiting on it; fails if it does not print it
    /// within its first 20 lines.
    pub fn kill_once_it_says(mut child: Child, ready: &str) {
        let stdout = child.stdout.take().expect("the rank's stdout");
        // The test harness prints its own lines first.
        let said = BufReader::new(stdout)
            .lines()
            .take(20)
            .map_while(|l| l.ok())
            .any(|l| l.contains(ready));
        assert!(said, "the rank to kill never said `{ready}`");
        std::thread::sleep(Duration::from_millis(300));
        child.kill().expect("killing the rank");
        let _ = child.wait();
    }

    /// The milliseconds a rank printed after `label` (as in "ERROR after 12 ms"), if it did.
    pub fn millis_after(out: &str, label: &str) -> Option<u64> {
        out.split(label).nth(1)?.split(' ').next()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token rows are listed in order with their scales, ids and weights; padding rows are
    /// skipped, and one that keeps a weight is an error.
    #[test]
    fn filled_rows_lists_the_token_rows_and_refuses_padding_with_a_weight() {
        let delivery = |weights: [f32; 4]| Dispatched::Standard {
            activations: Activations::new(
                QuantScheme::Fp8PerToken,
                Tensor::from_bytes(DType::U8, &[2, 2], vec![1, 2, 3, 4]).unwrap(),
                Some((
                    Tensor::from_bytes(DType::U8, &[2, 1], vec![8, 9]).unwrap(),
                    ScaleLayout::Linear,
                )),
            ),
            topk_ids: Tensor::from_i32(&[2, 2], &[-1, -1, 4, -1]),
            topk_weights: Tensor::from_f32(DType::F32, &[2, 2], &weights),
        };
        let rows = filled_rows(&delivery([0.0, 0.0, 0.5, 0.0])).unwrap();
        let mut want = vec![3, 4, 9];
        want.extend(4i32.to_le_bytes());
        want.extend((-1i32).to_le_bytes());
        want.extend(0.5f32.to_le_bytes());
        want.extend(0.0f32.to_le_bytes());
        assert_eq!(rows, vec![want]);
        let stale = filled_rows(&delivery([0.25, 0.0, 0.5, 0.0])).unwrap_err();
        assert!(stale.to_string().contains("padding row 0 has a weight"), "{stale}");
    }
    use crate::config::ParallelMode;

    #[test]
    fn received_rows_compare_in_any_order_but_not_with_other_bytes_save_a_padding_rows_activations() {
        let standard = |data: &[u8], ids: &[i32]| Dispatched::Standard {
            activations: Activations::new(
                QuantScheme::Bf16,
                Tensor::from_bytes(DType::U8, &[2, 2], data.to_vec()).expect("4 bytes"),
                None,
            ),
            topk_ids: Tensor::from_i32(&[2, 1], ids),
            topk_weights: Tensor::from_f32(DType::F32, &[2, 1], &[0.5, 0.0]),
        };
        let a = standard(&[1, 2, 3, 4], &[7, -1]);
        let rows_swapped = Dispatched::Standard {
            activations: Activations::new(
                QuantScheme::Bf16,
                Tensor::from_bytes(DType::U8, &[2, 2], vec![3, 4, 1, 2]).expect("4 bytes"),
                None,
            ),
            topk_ids: Tensor::from_i32(&[2, 1], &[-1, 7]),
            topk_weights: Tensor::from_f32(DType::F32, &[2, 1], &[0.0, 0.5]),
        };
        assert_eq!(received_unordered(&a, 0), received_unordered(&rows_swapped, 0));
        assert_ne!(
            received_unordered(&a, 0),
            received_unordered(&standard(&[1, 9, 3, 4], &[7, -1]), 0)
        );
        // Row 1 is padding (every id -1): the contract leaves its activations unspecified.
        assert_eq!(
            received_unordered(&a, 0),
            received_unordered(&standard(&[1, 2, 3, 5], &[7, -1]), 0)
        );
        assert_ne!(
            received_unordered(&a, 0),
            received_unordered(&standard(&[1, 2, 3, 4], &[6, -1]), 0)
        );
    }

    #[test]
    fn the_matrix_covers_every_parallel_mode() {
        let modes: Vec<ParallelMode> = parallel_variants().iter().map(|p| p.mode()).collect();
        for m in ParallelMode::ALL {
            assert!(modes.contains(&m), "no matrix layout in mode {m}");
        }
    }
}
