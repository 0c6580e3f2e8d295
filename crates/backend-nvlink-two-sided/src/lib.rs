//! nvlink-two-sided (being written).
#![forbid(unsafe_code)]

/// The registered name.
pub const NAME: &str = "nvlink-two-sided";
