//! Reference CPU quantizers for the activation payloads that MoE dispatch moves between GPUs.
//!
//! This crate is the numeric ground truth of the workspace: GPU kernels must reproduce its bytes
//! exactly, so every operation here is plain IEEE-754 binary32 arithmetic (round to nearest even,
//! no fused multiply-add, no approximate reciprocals) in the order written down in
//! `docs/QUANT_SPEC.md`. It knows nothing of experts or routing; it maps one token's `hidden` f32
//! values to wire bytes and back.
//!
//! * [`QuantScheme`] names the formats and [`QuantScheme::wire_layout`] is the single source of
//!   per-token wire sizes.
//! * [`quantize_token`], [`dequantize_token`] and [`roundtrip_token`] implement the schemes.
//! * [`e4m3`], [`e2m1`], [`e8m0`], [`bf16`] and [`fp16`] are the element codecs they are built on.
//! * [`swizzle`] converts block scales between the linear wire layout and the 128x4 layout that
//!   tcgen05 / CUTLASS block-scaled GEMMs read.

#![forbid(unsafe_code)]

pub mod e2m1;
pub mod e4m3;
pub mod e8m0;
mod error;
mod half_float;
mod scheme;
pub mod swizzle;
mod token;

pub use error::{QuantError, WireBuffer};
pub use half_float::{bf16, fp16};
pub use scheme::{QuantScheme, ScaleDtype, WireLayout};
pub use token::{QuantParams, dequantize_token, nvfp4_global_scale, quantize_token, roundtrip_token};
