//! moe-a2a: the crate engines depend on. It re-exports the contract from `moe-core` and links
//! every built-in backend, so their registrations are never dropped by the linker.
//!
//! ```
//! use moe_a2a::{Registry, BUILTIN_BACKENDS};
//! let names = moe_a2a::registry().names();
//! for b in BUILTIN_BACKENDS {
//!     assert!(names.contains(&b));
//! }
//! ```
#![forbid(unsafe_code)]

// Every Rust example of the README runs as a doc-test.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExamples;

pub use moe_core::*;
/// Workspaces the processes of ranks on one host share (`shm::MemfdMemory`, for
/// `host::HostRank::over_shared`).
pub use moe_shm as shm;

// Naming each backend crate keeps its `inventory` registration in every binary that links this
// crate.
use backend_allgather_rs as _;
use backend_nvlink_one_sided as _;
use backend_nvlink_two_sided as _;

/// The backends this crate links, sorted by name.
pub const BUILTIN_BACKENDS: [&str; 3] = [
    backend_allgather_rs::NAME,
    backend_nvlink_one_sided::NAME,
    backend_nvlink_two_sided::NAME,
];

/// The registry of every backend linked into this binary (the built-in ones and any other
/// backend crate the binary links).
pub fn registry() -> &'static Registry {
    Registry::global()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_the_builtin_backends_are_registered() {
        assert_eq!(registry().names(), BUILTIN_BACKENDS);
    }
}
