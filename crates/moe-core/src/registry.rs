//! The backend registry: every backend crate submits one [`BackendRegistration`] through
//! `inventory`; selection validates the request against the backend's capability record before
//! constructing anything.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::OnceLock;

use moe_quant::QuantScheme;

use crate::config::{ActivationFormat, LayerConfig, ParallelMode, ScaleLayout};
use crate::contract::PrepareFinalize;
use crate::error::{MoeError, Result};
use crate::platform::{PlatformKind, RankContext};

/// Size limits a backend declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most ranks in the layer's world.
    pub max_ranks: usize,
    /// Largest top_k.
    pub max_top_k: usize,
    /// `hidden` must be a multiple of this.
    pub hidden_multiple_of: usize,
    /// Largest `max_tokens_per_rank`.
    pub max_tokens_per_rank: usize,
}

/// What a backend can do, as data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Schemes it dispatches.
    pub quant_schemes: &'static [QuantScheme],
    /// Whether it can send unquantized activations for experts that quantize themselves.
    pub deferred_quant: bool,
    /// Whether it can deliver nvfp4/mxfp8 scales in the 128x4 swizzled layout.
    pub swizzled_scales: bool,
    /// Layouts `prepare` can deliver.
    pub activation_formats: &'static [ActivationFormat],
    /// Parallel arrangements it handles.
    pub parallel_modes: &'static [ParallelMode],
    /// Platforms it runs on.
    pub platforms: &'static [PlatformKind],
    /// Whether every pair of ranks must reach each other's memory (NVLink peer access).
    pub needs_all_pairs_peer_access: bool,
    /// Whether on GPUs each rank of a dispatch group needs a GPU of its own (NCCL refuses two
    /// ranks on one device); otherwise ranks may share one (tests on fewer GPUs than ranks).
    pub gpu_per_rank: bool,
    /// Whether all ranks must be on one node.
    pub single_node: bool,
    pub limits: Limits,
}

/// Builds one rank's backend object for a validated layer.
pub type Constructor = fn(&LayerConfig, &RankContext) -> Result<Box<dyn PrepareFinalize>>;

/// One backend, as submitted by its crate.
#[derive(Debug)]
pub struct BackendRegistration {
    /// Unique name (`--backend` value).
    pub name: &'static str,
    /// One line on what it is and when to pick it.
    pub description: &'static str,
    pub capabilities: Capabilities,
    pub construct: Constructor,
}

inventory::collect!(BackendRegistration);

/// Registers a backend: `moe_core::register_backend!(BackendRegistration { .. });` at the top
/// level of the backend crate.
#[macro_export]
macro_rules! register_backend {
    ($registration:expr) => {
        $crate::inventory::submit! { $registration }
    };
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

impl Capabilities {
    /// Every way `layer` on `platform` falls outside this record, as sentences.
    pub fn violations(&self, layer: &LayerConfig, platform: PlatformKind) -> Vec<String> {
        let mut v = Vec::new();
        let q = &layer.quant;
        if !self.quant_schemes.contains(&q.scheme) {
            v.push(format!(
                "quant scheme `{}` is not supported (supported: {})",
                q.scheme,
                list(self.quant_schemes)
            ));
        }
        if q.defer_input_quant && !self.deferred_quant {
            v.push("deferred input quantization is not supported".to_string());
        }
        if q.scale_layout == ScaleLayout::Swizzled128x4 && !self.swizzled_scales {
            v.push("128x4-swizzled scales are not supported (only linear)".to_string());
        }
        if !self.activation_formats.contains(&layer.activation_format) {
            v.push(format!(
                "activation format `{}` is not supported (supported: {})",
                layer.activation_format,
                list(self.activation_formats)
            ));
        }
        let mode = layer.parallel.mode();
        if !self.parallel_modes.contains(&mode) {
            v.push(format!(
                "parallel mode `{mode}` is not supported (supported: {})",
                list(self.parallel_modes)
            ));
        }
        if !self.platforms.contains(&platform) {
            v.push(format!(
                "platform `{platform}` is not supported (supported: {})",
                list(self.platforms)
            ));
        }
        let l = &self.limits;
        let ranks = layer.parallel.world_size();
        if ranks > l.max_ranks {
            v.push(format!("{ranks} ranks exceed the limit of {}", l.max_ranks));
        }
        if layer.moe.top_k > l.max_top_k {
            v.push(format!(
                "top_k {} exceeds the limit of {}",
                layer.moe.top_k, l.max_top_k
            ));
        }
        if !layer.moe.hidden.is_multiple_of(l.hidden_multiple_of) {
            v.push(format!(
                "hidden {} is not a multiple of {}",
                layer.moe.hidden, l.hidden_multiple_of
            ));
        }
        if layer.moe.max_tokens_per_rank > l.max_tokens_per_rank {
            v.push(format!(
                "max_tokens_per_rank {} exceeds the limit of {}",
                layer.moe.max_tokens_per_rank, l.max_tokens_per_rank
            ));
        }
        v
    }
}

/// Describes a request in one phrase, for messages.
pub fn describe_request(layer: &LayerConfig, platform: PlatformKind) -> String {
    format!(
        "{} dispatch in {} format, {} on {platform}, {} experts top-{} hidden {}",
        layer.quant, layer.activation_format, layer.parallel, layer.moe.num_experts, layer.moe.top_k, layer.moe.hidden
    )
}

/// The registered backends, indexed by name.
#[derive(Debug)]
pub struct Registry {
    by_name: BTreeMap<&'static str, Vec<&'static BackendRegistration>>,
}

impl Registry {
    /// The registry of every backend linked into this binary.
    pub fn global() -> &'static Registry {
        static GLOBAL: OnceLock<Registry> = OnceLock::new();
        GLOBAL.get_or_init(|| Registry::from_registrations(inventory::iter::<BackendRegistration>))
    }

    /// A registry over the given registrations; duplicates are kept and reported on use.
    pub fn from_registrations(regs: impl IntoIterator<Item = &'static BackendRegistration>) -> Self {
        let mut by_name: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for r in regs {
            by_name.entry(r.name).or_default().push(r);
        }
        Registry { by_name }
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.by_name.keys().copied().collect()
    }

    /// The registration called `name`.
    pub fn get(&self, name: &str) -> Result<&'static BackendRegistration> {
        match self.by_name.get(name).map(Vec::as_slice) {
            Some([one]) => Ok(one),
            Some(many) => Err(MoeError::DuplicateBackend {
                name: many[0].name,
                count: many.len(),
                descriptions: many.iter().map(|r| r.description).collect(),
            }),
            None => Err(MoeError::UnknownBackend {
                asked: name.to_string(),
                registered: self.names(),
            }),
        }
    }

    /// Unique registrations, sorted by name (duplicated names are left out).
    pub fn registrations(&self) -> impl Iterator<Item = &'static BackendRegistration> + '_ {
        self.by_name.values().filter(|v| v.len() == 1).map(|v| v[0])
    }

    /// Backends whose records accept the request.
    pub fn accepting(&self, layer: &LayerConfig, platform: PlatformKind) -> Vec<&'static str> {
        self.registrations()
            .filter(|r| r.capabilities.violations(layer, platform).is_empty())
            .map(|r| r.name)
            .collect()
    }

    /// Checks the request against `name`'s record without constructing anything.
    pub fn check(
        &self,
        name: &str,
        layer: &LayerConfig,
        platform: PlatformKind,
    ) -> Result<&'static BackendRegistration> {
        let reg = self.get(name)?;
        let reasons = reg.capabilities.violations(layer, platform);
        if reasons.is_empty() {
            Ok(reg)
        } else {
            Err(MoeError::Incompatible {
                backend: reg.name,
                asked: describe_request(layer, platform),
                reasons,
                alternatives: self.accepting(layer, platform),
            })
        }
    }

    /// Validates, then constructs `name` for this rank.
    pub fn construct(&self, name: &str, layer: &LayerConfig, ctx: &RankContext) -> Result<Box<dyn PrepareFinalize>> {
        let reg = self.check(name, layer, ctx.kind())?;
        (reg.construct)(layer, ctx)
    }

    /// The capability matrix as a Markdown table, one row per backend.
    pub fn render_matrix(&self) -> String {
        let mut s = String::from(
            "| backend | quant schemes | deferred | swizzled scales | formats | parallel modes | platforms | peer access | GPU per rank | limits |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
        let yes = |b: bool| if b { "yes" } else { "no" };
        for r in self.registrations() {
            let c = &r.capabilities;
            let l = &c.limits;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | ranks <= {}, top_k <= {}, hidden % {} == 0, tokens/rank <= {} |",
                r.name,
                list(c.quant_schemes),
                yes(c.deferred_quant),
                yes(c.swizzled_scales),
                list(c.activation_formats),
                list(c.parallel_modes),
                list(c.platforms),
                if c.needs_all_pairs_peer_access {
                    "all pairs"
                } else {
                    "none"
                },
                yes(c.gpu_per_rank),
                l.max_ranks,
                l.max_top_k,
                l.hidden_multiple_of,
                l.max_tokens_per_rank
            );
        }
        s
    }
}
