//! Errors of the reference quantizers; each message says what was asked, what is allowed and what
//! to do instead.

use std::fmt;

use crate::QuantScheme;

/// Why a token could not be laid out, quantized or dequantized.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum QuantError {
    /// A token of zero elements was asked for.
    #[error("hidden size 0 is not allowed for {scheme}; use {}", valid_hidden(*scheme))]
    ZeroHidden {
        /// The scheme that was asked for.
        scheme: QuantScheme,
    },
    /// The hidden size is not a multiple of the scheme's scale block.
    #[error(
        "hidden size {hidden} is not a multiple of the {scheme} block of {block} elements; \
         use hidden {}",
        nearest(*below, *above)
    )]
    HiddenNotBlockMultiple {
        /// The scheme that was asked for.
        scheme: QuantScheme,
        /// The hidden size that was asked for.
        hidden: usize,
        /// Elements per scale of `scheme`.
        block: usize,
        /// The largest valid hidden size below `hidden`, if there is one.
        below: Option<usize>,
        /// The smallest valid hidden size above `hidden`.
        above: usize,
    },
    /// A payload or scale buffer does not have the length the wire layout gives.
    #[error(
        "{scheme} {buffer} buffer for hidden {hidden} has {got} bytes but needs exactly \
         {expected}; size it with QuantScheme::wire_layout"
    )]
    BufferLength {
        /// The scheme that was asked for.
        scheme: QuantScheme,
        /// Which buffer is off.
        buffer: WireBuffer,
        /// The token's hidden size.
        hidden: usize,
        /// Length required by [`QuantScheme::wire_layout`].
        expected: usize,
        /// Length passed in.
        got: usize,
    },
    /// [`crate::QuantParams::fp8_static_scale`] is zero, negative, infinite or NaN.
    #[error(
        "fp8-per-tensor needs a finite positive QuantParams::fp8_static_scale but got {value}; \
         pass the tensor's dequant scale, amax / 448"
    )]
    InvalidFp8StaticScale {
        /// The scale that was passed.
        value: f32,
    },
    /// [`crate::QuantParams::nvfp4_global_scale`] is not in
    /// `(0, QuantParams::MAX_NVFP4_GLOBAL_SCALE]`.
    #[error(
        "nvfp4 needs QuantParams::nvfp4_global_scale in (0, 2^118] but got {value}; \
         compute it with nvfp4_global_scale(amax)"
    )]
    InvalidNvfp4GlobalScale {
        /// The global scale that was passed.
        value: f32,
    },
}

/// The two per-token wire buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireBuffer {
    /// Quantized elements.
    Payload,
    /// Scales.
    Scales,
}

impl fmt::Display for WireBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WireBuffer::Payload => "payload",
            WireBuffer::Scales => "scales",
        })
    }
}

fn valid_hidden(scheme: QuantScheme) -> String {
    match scheme.block_size() {
        Some(block) => format!("a positive multiple of {block}"),
        None => "a hidden size of at least 1".to_owned(),
    }
}

fn nearest(below: Option<usize>, above: usize) -> String {
    match below {
        Some(below) => format!("{below} or {above}"),
        None => above.to_string(),
    }
}
