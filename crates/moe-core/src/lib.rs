//! moe-core: the contract between a mixture-of-experts layer and the transports that move its
//! tokens between ranks.
//!
//! | concept | where |
//! |---|---|
//! | configs (quantization, MoE shape, parallel layout) and the dispatch layout | [`config`] |
//! | prepare/finalize contract, its conventions, `Prepared` and the receipt | [`contract`] |
//! | call integrity: a call's identity in the words peers wait on, abandoned calls | [`call`] |
//! | the control plane: rank, world size, all-gather, barrier, abort, over threads or TCP | [`control`] |
//! | backend registry and capability records | [`registry`] |
//! | the `Experts` trait and reference experts | [`experts`] |
//! | the layer runner (SP chunking, TP all-reduce, format check) | [`runner`] |
//! | the f64 CPU reference MoE (the oracle) | [`reference`] |
//! | routing and slot math shared by backends | [`routing`] |
//! | the bytes of a dispatch slot and the received rows, shared by backends | [`slots`] |
//! | the host platform: ranks as threads, group operations, symmetric memory | [`host`] |
//! | the workspace the layers of an EP group share: growth to the union, generations, turns | [`workspace_group`] |
//! | cells of the test matrix, shared by conformance tests and `cargo xtask test-matrix` (feature `harness`) | `harness` |
//!
//! A backend crate implements [`contract::PrepareFinalize`] and registers itself with
//! [`register_backend!`]; engines pick backends by name through [`registry::Registry`], and a
//! request the backend cannot serve fails at construction with the reason and the registered
//! alternatives.
#![forbid(unsafe_code)]

pub mod call;
pub mod config;
pub mod contract;
pub mod control;
pub mod error;
pub mod experts;
#[cfg(any(test, feature = "harness"))]
pub mod harness;
pub mod host;
pub mod platform;
pub mod reference;
pub mod registry;
pub mod routing;
pub mod runner;
pub mod slots;
pub mod tensor;
pub mod workspace_group;

pub use inventory;
pub use moe_quant as quant;

pub use config::{
    ActivationFormat, DispatchLayout, ExpertOwnership, ExpertPlacement, InputDtype, LayerConfig, MoeConfig,
    ParallelConfig, ParallelMode, QuantConfig, ScaleLayout,
};
pub use contract::{Activations, Dispatched, PrepareFinalize, PrepareInput, Prepared, Receipt};
pub use error::{MoeError, Result};
pub use platform::{CudaRank, GpuRank, PlatformKind, RankContext};
pub use registry::{BackendRegistration, Capabilities, Limits, Registry};
pub use tensor::{DType, DeviceMemory, DeviceRegion, Location, Tensor};
