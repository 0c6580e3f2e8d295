//! The C ABI of moe-a2a (`include/moe_a2a.h`, generated from this crate by cbindgen).
//!
//! | handle | what it is | made by |
//! |---|---|---|
//! | `MoeWorld` | this process's rank, joined over the TCP control plane | `moe_world_from_env`, `moe_world_connect` |
//! | `MoeLayer` | one layer's prepare/finalize (vLLM's `FusedMoEPrepareAndFinalize`) | `moe_layer_new` |
//! | `MoeRunner` | one whole layer with the engine's experts as a callback | `moe_runner_new` |
//!
//! `moe_backends` and `moe_capability_matrix` say which backends are linked and what each
//! supports, before anything is built.
//!
//! Every function returns a `MoeStatus`; on failure `moe_last_error` holds the message on the
//! calling thread. No panic crosses the boundary (a caught one is `MOE_STATUS_INTERNAL`).
//! Tensors cross as `MoeTensor` descriptors; bad input gets its error on this rank and marks
//! the call abandoned, so the peers' same call fails too, naming this rank. Ranks are processes,
//! one per rank: on the host platform (workspaces in memory the processes of a host share) or,
//! with the feature `cuda` and `moe_world_use_gpu`, each on its GPU and the caller's stream.

pub mod layer;
pub mod registry;
pub mod runner;
pub mod status;
pub mod types;
pub mod world;
