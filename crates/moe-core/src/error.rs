//! The error type of the MoE contract, the registry, the host platform and the layer runner.

use std::time::Duration;

use moe_quant::QuantError;

/// Everything that can go wrong between constructing a backend and reading the combined output.
///
/// Messages follow one rule: say what was asked, what is allowed, and what to do instead.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MoeError {
    // === Configuration ===
    /// A configuration field breaks a rule; `field` names it, `rule` states the rule.
    #[error("invalid config: `{field}` = {value}: {rule}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        rule: String,
    },
    /// The quantization layer rejected a format request.
    #[error(transparent)]
    Quant(#[from] QuantError),

    // === Registry ===
    /// No backend has this name.
    #[error("unknown backend `{asked}`; registered backends: {}", registered.join(", "))]
    UnknownBackend {
        asked: String,
        registered: Vec<&'static str>,
    },
    /// Two registrations share one name; the registry refuses both rather than pick one.
    #[error(
        "backend name `{name}` is registered {count} times ({}); rename one of the crates' registrations",
        descriptions.join(" | ")
    )]
    DuplicateBackend {
        name: &'static str,
        count: usize,
        descriptions: Vec<&'static str>,
    },
    /// The request is outside what the backend declares it supports.
    #[error("{}", render_incompatible(backend, asked, reasons, alternatives))]
    Incompatible {
        backend: &'static str,
        asked: String,
        reasons: Vec<String>,
        alternatives: Vec<&'static str>,
    },

    // === Contract use ===
    /// Inputs to prepare/finalize have the wrong shape, dtype or contents.
    #[error("invalid input to {op}: {detail}")]
    InvalidInput { op: &'static str, detail: String },
    /// More tokens than the backend was sized for; nothing was sent or written.
    #[error(
        "{tokens} tokens passed to prepare, but this layer was built for at most {max} tokens per rank; nothing was sent. Split the batch into chunks of at most {max} tokens, or construct the layer with a larger `max_tokens_per_rank`"
    )]
    TooManyTokens { tokens: usize, max: usize },
    /// A receipt from another backend or layer was passed to finalize.
    #[error(
        "finalize of `{backend}` got a receipt issued by `{issued_by}`; pass each layer's own receipt back to the same layer"
    )]
    ForeignReceipt {
        backend: &'static str,
        issued_by: &'static str,
    },
    /// The backend's activation format differs from the experts'.
    #[error(
        "backend `{backend}` delivers {backend_format} activations but the experts consume {experts_format}; construct the backend with the experts' format or choose experts for {backend_format}"
    )]
    FormatMismatch {
        backend: &'static str,
        backend_format: String,
        experts_format: String,
    },
    /// Layers sharing one workspace group disagree on a value the shared protocol fixes.
    #[error(
        "layer disagrees with its workspace group on `{field}`: the group was built with {group}, this layer asks for {asked}; layers that share a workspace must use the same {field}, so give this layer a workspace group of its own: `LayerConfig::with_workspace_group(name)` on every rank"
    )]
    WorkspaceGroupMismatch {
        field: &'static str,
        group: String,
        asked: String,
    },
    /// A received row violated the id/weight convention of the contract.
    #[error("contract convention violated: {0}")]
    Convention(String),

    // === Platform ===
    /// A bounded wait expired; `waited_for` are the ranks that did not arrive.
    #[error(
        "rank {rank} timed out after {timeout:?} in {op} waiting for rank(s) {waited_for:?}; check that every rank of the group calls {op} the same number of times"
    )]
    Timeout {
        rank: usize,
        op: String,
        waited_for: Vec<usize>,
        timeout: Duration,
    },
    /// Another rank panicked; every rank waiting on it gets this error instead of hanging.
    #[error(
        "rank {rank}'s {op} of {ours} found rank {peer} at {theirs}: the ranks of the group run different calls (a rank skipped a call or runs its layers in another order, or the ranks' layers differ in layout, tokens per rank or expert placement: another layer digest); every rank fails this call. Make every rank construct the same layers, with the same expert map, and run their calls in the same order"
    )]
    CallMismatch {
        rank: usize,
        peer: usize,
        op: String,
        ours: crate::call::CallId,
        theirs: crate::call::CallId,
    },
    #[error(
        "rank {rank}'s {op} met rank {peer} in another group operation, or with values of another size: the ranks of the group run different operations (a rank skipped a call, or runs its layers in another order)"
    )]
    GroupOpMismatch { rank: usize, peer: usize, op: String },
    #[error(
        "rank {rank}'s {op} of {call} failed because rank {peer} abandoned that call ({why}); every rank fails this call, and the group's next call runs normally. The reason is in rank {peer}'s own error"
    )]
    PeerAbandoned {
        rank: usize,
        peer: usize,
        op: String,
        call: crate::call::CallId,
        why: crate::call::Abandon,
    },
    #[error(
        "rank {rank}'s {op} of {call} found rank {peer} {ahead} call(s) further: its peers gave up on this call (this rank arrived after their timeout, or skipped a call). This rank now follows them: its next call runs with theirs"
    )]
    PeerMovedOn {
        rank: usize,
        peer: usize,
        op: String,
        call: crate::call::CallId,
        ahead: u16,
    },
    #[error(
        "data read from a peer in {op} is out of range: {detail}. A peer's memory is corrupt or it runs another layer; nothing was handed on"
    )]
    CorruptPeerData { op: &'static str, detail: String },
    #[error("control plane of rank {rank}: {detail}")]
    ControlPlane { rank: usize, detail: String },
    #[error("rank {rank} panicked: {message}")]
    RankPanicked { rank: usize, message: String },
    /// A GPU call failed (driver, NVRTC or a kernel argument); the message names the call.
    #[error("GPU error: {0}")]
    Device(String),
    /// The request needs a platform this build or machine does not have.
    #[error("{0}")]
    Unsupported(String),
}

impl MoeError {
    /// What a backend built without its GPU implementation answers when asked to construct on
    /// a GPU rank.
    pub fn built_without_cuda(backend: &str) -> Self {
        MoeError::Unsupported(format!(
            "{backend} was built without its GPU implementation; enable the `cuda` feature (moe-a2a/cuda)"
        ))
    }
}

fn render_incompatible(backend: &str, asked: &str, reasons: &[String], alternatives: &[&str]) -> String {
    let mut s = format!("backend `{backend}` cannot serve {asked}:");
    for r in reasons {
        s.push_str("\n  - ");
        s.push_str(r);
    }
    if alternatives.is_empty() {
        s.push_str("\nno registered backend accepts this request");
    } else {
        s.push_str("\nregistered backends that accept it: ");
        s.push_str(&alternatives.join(", "));
    }
    s
}

/// Shorthand for results in this crate.
pub type Result<T, E = MoeError> = std::result::Result<T, E>;

/// Builds an [`MoeError::InvalidConfig`].
pub(crate) fn invalid(field: &'static str, value: impl ToString, rule: impl Into<String>) -> MoeError {
    MoeError::InvalidConfig {
        field,
        value: value.to_string(),
        rule: rule.into(),
    }
}
