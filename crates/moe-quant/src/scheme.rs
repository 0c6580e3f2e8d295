//! The activation formats a token can be dispatched in, and the one function of (scheme, hidden)
//! that gives their per-token wire sizes.

use std::fmt;

use crate::QuantError;

/// Elements per f32 scale in [`QuantScheme::Fp8Block128`] (DeepSeek 1x128 activation blocks).
pub(crate) const FP8_BLOCK: usize = 128;
/// Elements per e4m3 scale in [`QuantScheme::Nvfp4`].
pub(crate) const NVFP4_BLOCK: usize = 16;
/// Elements per e8m0 scale in [`QuantScheme::Mxfp8`].
pub(crate) const MXFP8_BLOCK: usize = 32;

/// The activation formats a token can be dispatched in.
///
/// Fieldless so it can key capability records; everything a scheme needs at run time besides the
/// token itself lives in [`crate::QuantParams`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantScheme {
    /// bfloat16 elements, no scales.
    Bf16,
    /// IEEE binary16 elements, no scales.
    Fp16,
    /// fp8 e4m3 elements with one static dequant scale per tensor, replicated and not sent.
    Fp8PerTensor,
    /// fp8 e4m3 elements with one dynamic f32 scale per token.
    Fp8PerToken,
    /// fp8 e4m3 elements with one dynamic f32 scale per 128 elements.
    Fp8Block128,
    /// e2m1 element pairs with one e4m3 scale per 16 elements and a replicated f32 global scale.
    Nvfp4,
    /// fp8 e4m3 elements with one e8m0 (power of two) scale per 32 elements.
    Mxfp8,
}

impl QuantScheme {
    /// Every scheme, in declaration order.
    pub const ALL: [QuantScheme; 7] = [
        QuantScheme::Bf16,
        QuantScheme::Fp16,
        QuantScheme::Fp8PerTensor,
        QuantScheme::Fp8PerToken,
        QuantScheme::Fp8Block128,
        QuantScheme::Nvfp4,
        QuantScheme::Mxfp8,
    ];

    /// The stable lowercase name used in logs, capability matrices and [`QuantScheme::from_name`].
    pub const fn name(self) -> &'static str {
        match self {
            QuantScheme::Bf16 => "bf16",
            QuantScheme::Fp16 => "fp16",
            QuantScheme::Fp8PerTensor => "fp8-per-tensor",
            QuantScheme::Fp8PerToken => "fp8-per-token",
            QuantScheme::Fp8Block128 => "fp8-block128",
            QuantScheme::Nvfp4 => "nvfp4",
            QuantScheme::Mxfp8 => "mxfp8",
        }
    }

    /// The scheme whose [`QuantScheme::name`] is exactly `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scheme| scheme.name() == name)
    }

    /// Elements per scale for the block-scaled schemes; `None` for the others, including
    /// [`QuantScheme::Fp8PerToken`] whose one scale covers the whole token.
    pub const fn block_size(self) -> Option<usize> {
        match self {
            QuantScheme::Fp8Block128 => Some(FP8_BLOCK),
            QuantScheme::Nvfp4 => Some(NVFP4_BLOCK),
            QuantScheme::Mxfp8 => Some(MXFP8_BLOCK),
            QuantScheme::Bf16 | QuantScheme::Fp16 | QuantScheme::Fp8PerTensor | QuantScheme::Fp8PerToken => None,
        }
    }

    /// Whether tokens carry scales on the wire. The per-tensor fp8 scale is replicated on every
    /// rank, so it is not sent.
    pub const fn has_scales(self) -> bool {
        self.scale_dtype().is_some()
    }

    /// The element type of the scales sent with each token, if any.
    pub const fn scale_dtype(self) -> Option<ScaleDtype> {
        match self {
            QuantScheme::Fp8PerToken | QuantScheme::Fp8Block128 => Some(ScaleDtype::F32),
            QuantScheme::Nvfp4 => Some(ScaleDtype::E4m3),
            QuantScheme::Mxfp8 => Some(ScaleDtype::E8m0),
            QuantScheme::Bf16 | QuantScheme::Fp16 | QuantScheme::Fp8PerTensor => None,
        }
    }

    /// Per-token wire sizes of this scheme at `hidden` elements: the only place sizes are derived.
    ///
    /// # Errors
    ///
    /// [`QuantError::ZeroHidden`] for `hidden == 0`, and
    /// [`QuantError::HiddenNotBlockMultiple`] when a block-scaled scheme's block does not divide
    /// `hidden`.
    pub fn wire_layout(self, hidden: usize) -> Result<WireLayout, QuantError> {
        if hidden == 0 {
            return Err(QuantError::ZeroHidden { scheme: self });
        }
        let scales_per_token = match self.block_size() {
            Some(block) if !hidden.is_multiple_of(block) => {
                let below = hidden / block * block;
                return Err(QuantError::HiddenNotBlockMultiple {
                    scheme: self,
                    hidden,
                    block,
                    below: (below > 0).then_some(below),
                    above: below + block,
                });
            }
            Some(block) => hidden / block,
            None => usize::from(self.has_scales()),
        };
        let payload_bytes = match self {
            QuantScheme::Bf16 | QuantScheme::Fp16 => 2 * hidden,
            QuantScheme::Fp8PerTensor | QuantScheme::Fp8PerToken | QuantScheme::Fp8Block128 | QuantScheme::Mxfp8 => {
                hidden
            }
            QuantScheme::Nvfp4 => hidden / 2,
        };
        let scale_dtype = self.scale_dtype();
        Ok(WireLayout {
            payload_bytes,
            scale_bytes: scale_dtype.map_or(0, |dtype| scales_per_token * dtype.size_bytes()),
            scale_dtype,
            scales_per_token,
        })
    }
}

impl fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Element type of the scales that travel with a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleDtype {
    /// IEEE binary32, little-endian on the wire.
    F32,
    /// fp8 e4m3 (always non-negative here), one byte.
    E4m3,
    /// Unsigned power of two `2^(code - 127)`, one byte.
    E8m0,
}

impl ScaleDtype {
    /// Bytes per scale.
    pub const fn size_bytes(self) -> usize {
        match self {
            ScaleDtype::F32 => 4,
            ScaleDtype::E4m3 | ScaleDtype::E8m0 => 1,
        }
    }
}

/// Per-token wire sizes of one scheme at one hidden size (see [`QuantScheme::wire_layout`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireLayout {
    /// Bytes of quantized elements.
    pub payload_bytes: usize,
    /// Bytes of scales (`scales_per_token * scale size`), 0 for unscaled schemes.
    pub scale_bytes: usize,
    /// Element type of the scales, `None` for unscaled schemes.
    pub scale_dtype: Option<ScaleDtype>,
    /// Number of scales per token, 0 for unscaled schemes.
    pub scales_per_token: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let names: Vec<&str> = QuantScheme::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "bf16",
                "fp16",
                "fp8-per-tensor",
                "fp8-per-token",
                "fp8-block128",
                "nvfp4",
                "mxfp8"
            ]
        );
        for scheme in QuantScheme::ALL {
            assert_eq!(QuantScheme::from_name(scheme.name()), Some(scheme));
            assert_eq!(scheme.to_string(), scheme.name());
        }
        assert_eq!(QuantScheme::from_name("NVFP4"), None);
        assert_eq!(QuantScheme::from_name("fp8"), None);
    }

    #[test]
    fn block_sizes_and_scale_presence() {
        let table: Vec<(Option<usize>, bool)> = QuantScheme::ALL
            .iter()
            .map(|s| (s.block_size(), s.has_scales()))
            .collect();
        assert_eq!(
            table,
            [
                (None, false),
                (None, false),
                (None, false),
                (None, true),
                (Some(128), true),
                (Some(16), true),
                (Some(32), true),
            ]
        );
    }

    fn layout(payload: usize, scales: usize, dtype: Option<ScaleDtype>, n: usize) -> WireLayout {
        WireLayout {
            payload_bytes: payload,
            scale_bytes: scales,
            scale_dtype: dtype,
            scales_per_token: n,
        }
    }

    #[test]
    fn wire_layout_at_7168() {
        use ScaleDtype::*;
        let expected = [
            layout(14336, 0, None, 0),
            layout(14336, 0, None, 0),
            layout(7168, 0, None, 0),
            layout(7168, 4, Some(F32), 1),
            layout(7168, 224, Some(F32), 56),
            layout(3584, 448, Some(E4m3), 448),
            layout(7168, 224, Some(E8m0), 224),
        ];
        for (scheme, want) in QuantScheme::ALL.into_iter().zip(expected) {
            assert_eq!(scheme.wire_layout(7168), Ok(want), "{scheme}");
        }
    }

    #[test]
    fn wire_layout_at_256() {
        use ScaleDtype::*;
        let expected = [
            layout(512, 0, None, 0),
            layout(512, 0, None, 0),
            layout(256, 0, None, 0),
            layout(256, 4, Some(F32), 1),
            layout(256, 8, Some(F32), 2),
            layout(128, 16, Some(E4m3), 16),
            layout(256, 8, Some(E8m0), 8),
        ];
        for (scheme, want) in QuantScheme::ALL.into_iter().zip(expected) {
            assert_eq!(scheme.wire_layout(256), Ok(want), "{scheme}");
        }
    }

    #[test]
    fn unblocked_schemes_accept_any_positive_hidden() {
        assert_eq!(QuantScheme::Bf16.wire_layout(7), Ok(layout(14, 0, None, 0)));
        assert_eq!(
            QuantScheme::Fp8PerToken.wire_layout(1),
            Ok(layout(1, 4, Some(ScaleDtype::F32), 1))
        );
    }

    #[test]
    fn zero_hidden_is_rejected_for_every_scheme() {
        for scheme in QuantScheme::ALL {
            assert_eq!(scheme.wire_layout(0), Err(QuantError::ZeroHidden { scheme }));
        }
        assert_eq!(
            QuantScheme::Bf16.wire_layout(0).unwrap_err().to_string(),
            "hidden size 0 is not allowed for bf16; use a hidden size of at least 1"
        );
        assert_eq!(
            QuantScheme::Mxfp8.wire_layout(0).unwrap_err().to_string(),
            "hidden size 0 is not allowed for mxfp8; use a positive multiple of 32"
        );
    }

    #[test]
    fn hidden_off_the_block_grid_is_rejected_with_the_nearest_sizes() {
        let err = QuantScheme::Nvfp4.wire_layout(100).unwrap_err();
        assert_eq!(
            err,
            QuantError::HiddenNotBlockMultiple {
                scheme: QuantScheme::Nvfp4,
                hidden: 100,
                block: 16,
                below: Some(96),
                above: 112,
            }
        );
        assert_eq!(
            err.to_string(),
            "hidden size 100 is not a multiple of the nvfp4 block of 16 elements; \
             use hidden 96 or 112"
        );
        assert_eq!(
            QuantScheme::Fp8Block128.wire_layout(7000).unwrap_err().to_string(),
            "hidden size 7000 is not a multiple of the fp8-block128 block of 128 elements; \
             use hidden 6912 or 7040"
        );
        assert_eq!(
            QuantScheme::Mxfp8.wire_layout(8).unwrap_err().to_string(),
            "hidden size 8 is not a multiple of the mxfp8 block of 32 elements; use hidden 32"
        );
    }
}
