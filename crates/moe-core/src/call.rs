//! Call integrity: the ranks of a group agree on every call, or that call fails on each of
//! them, naming who disagreed.
//!
//! A call's identity ([`CallId`]) is its number in the group's sequence of calls, the layer
//! (its index among the group's layers, which every rank constructs in the same order) and a
//! digest of its dispatch layout and expert placement ([`LayerDigest`]). It travels in the 32-bit words the peers wait on anyway (the
//! protocols' flags), as a [`CallWord`]:
//!
//! | bits | normal call | abandoned call |
//! |---|---|---|
//! | 0..16 | sequence number (mod 2^16) | sequence number |
//! | 16..23 | layer index (mod 128) | layer index |
//! | 23..31 | layer digest | why ([`Abandon`]) |
//! | 31 | 0 | 1 |
//!
//! A rank waiting on a peer's word reads it as [`PeerWord`]: the peer has not reached this
//! call yet (wait on), it is at this call with the same identity (go on), with another
//! identity (fail: the ranks run different calls), it abandoned this call (fail, naming it and
//! why), or it is already past this call (fail: its peers gave up on it, and this rank follows
//! them so its next call runs with theirs). A rank that cannot run a call — its input is
//! refused, or a wait timed out — still marks it abandoned in every word its peers read, so no
//! peer pairs this call with another.

use std::fmt;

use crate::config::{DispatchLayout, ExpertPlacement};
use crate::error::MoeError;

/// Bits of the sequence number a word carries.
const SEQ_BITS: u32 = 16;
const SEQ_MASK: u32 = (1 << SEQ_BITS) - 1;
/// Bits of the layer index.
const LAYER_BITS: u32 = 7;
const LAYER_MASK: u32 = (1 << LAYER_BITS) - 1;
/// Bits of the digest, or of the reason of an abandoned call.
const TAG_SHIFT: u32 = SEQ_BITS + LAYER_BITS;
const TAG_MASK: u32 = 0xff;
const ABANDONED: u32 = 1 << 31;

/// What a call is, as every rank of its group must agree: its number in the group's sequence
/// of calls (mod 2^16), its layer's index among the group's layers (mod 128) and its layer's
/// [`LayerDigest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallId {
    pub seq: u16,
    pub layer: u8,
    pub digest: u8,
}

impl CallId {
    /// Call `round` of layer `layer_index` (its place among its group's layers), whose digest
    /// is `digest`.
    pub fn new(round: u32, layer_index: u32, digest: LayerDigest) -> Self {
        CallId {
            seq: (round & SEQ_MASK) as u16,
            layer: (layer_index & LAYER_MASK) as u8,
            digest: digest.0,
        }
    }

    /// The word of this call going as planned.
    pub fn word(self) -> CallWord {
        CallWord(self.base() | u32::from(self.digest) << TAG_SHIFT)
    }

    /// The word of this call abandoned, for `why`.
    pub fn abandoned(self, why: Abandon) -> CallWord {
        CallWord(self.base() | (why as u32) << TAG_SHIFT | ABANDONED)
    }

    /// The bits of this call's words but its number: the layer's, the same for all its calls
    /// (what GPU kernels add to the round to make each call's word).
    pub fn tag(self) -> u32 {
        self.word().0 & !SEQ_MASK
    }

    /// The call a normal word (one [`CallId::word`] made) stands for.
    pub fn from_word(word: u32) -> Self {
        CallId {
            seq: (word & SEQ_MASK) as u16,
            layer: (word >> SEQ_BITS & LAYER_MASK) as u8,
            digest: (word >> TAG_SHIFT & TAG_MASK) as u8,
        }
    }

    fn base(self) -> u32 {
        u32::from(self.seq) | u32::from(self.layer) << SEQ_BITS
    }

    /// How many calls `seq` is ahead of this one (mod 2^16), when it is: a peer at `seq` has
    /// passed this call.
    fn ahead_by(self, seq: u16) -> Option<u16> {
        let ahead = seq.wrapping_sub(self.seq);
        (1..1 << (SEQ_BITS - 1)).contains(&ahead).then_some(ahead)
    }
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "call {} of layer #{} (layer digest {:#04x})",
            self.seq, self.layer, self.digest
        )
    }
}

/// 8 bits of FNV-1a over what fixes the bytes a layer's calls move and where they go: its
/// dispatch layout, its tokens per rank and its expert placement. Ranks whose layers disagree
/// on the layout would read each other's slots at other offsets; on the placement, they would
/// send tokens to ranks that do not hold their experts (or, gathering every token, compute some
/// twice and some never). Computed once per layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerDigest(u8);

impl LayerDigest {
    /// The digest of a layer that dispatches `layout` with at most `max_tokens` tokens per rank
    /// to the experts' owners in `placement`.
    pub fn new(layout: &DispatchLayout, max_tokens: usize, placement: &ExpertPlacement) -> Self {
        let fields = [
            layout.scheme as u64,
            layout.wire.payload_bytes as u64,
            layout.wire.scale_bytes as u64,
            layout.top_k as u64,
            layout.hidden as u64,
            layout.combine_row_bytes as u64,
            max_tokens as u64,
        ];
        let owners = (0..placement.num_experts()).map(|e| placement.owner(e) as u64);
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in fields.into_iter().chain(owners).flat_map(u64::to_le_bytes) {
            h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        LayerDigest((h ^ h >> 8 ^ h >> 16 ^ h >> 24 ^ h >> 32 ^ h >> 40 ^ h >> 48 ^ h >> 56) as u8)
    }
}

/// A call's identity as one 32-bit word, normal or abandoned (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallWord(pub u32);

/// Why a rank abandoned a call, as its peers learn it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Abandon {
    /// Its input was refused (shapes, ids, weights, placement).
    InvalidInput = 1,
    /// It was passed more tokens than the layer holds.
    TooManyTokens = 2,
    /// One of its waits timed out.
    Timeout = 3,
    /// A peer failed the call first (abandoned it, or disagreed on it).
    PeerFailed = 4,
    /// Its GPU reported an error.
    Device = 5,
    /// Any other error.
    Other = 6,
}

impl Abandon {
    /// The category of `error`, which made a rank abandon its call.
    pub fn of(error: &MoeError) -> Self {
        match error {
            MoeError::InvalidInput { .. } | MoeError::Quant(_) | MoeError::ForeignReceipt { .. } => {
                Abandon::InvalidInput
            }
            MoeError::TooManyTokens { .. } => Abandon::TooManyTokens,
            MoeError::Timeout { .. } => Abandon::Timeout,
            MoeError::CallMismatch { .. }
            | MoeError::PeerAbandoned { .. }
            | MoeError::PeerMovedOn { .. }
            | MoeError::GroupOpMismatch { .. } => Abandon::PeerFailed,
            MoeError::Device(_) => Abandon::Device,
            MoeError::CorruptPeerData { .. } => Abandon::PeerFailed,
            _ => Abandon::Other,
        }
    }

    /// The reason an abandoned word's bits stand for.
    pub fn from_bits(bits: u32) -> Self {
        match bits {
            1 => Abandon::InvalidInput,
            2 => Abandon::TooManyTokens,
            3 => Abandon::Timeout,
            4 => Abandon::PeerFailed,
            5 => Abandon::Device,
            _ => Abandon::Other,
        }
    }
}

impl fmt::Display for Abandon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Abandon::InvalidInput => "its input was refused",
            Abandon::TooManyTokens => "it was passed more tokens than the layer holds",
            Abandon::Timeout => "one of its waits timed out",
            Abandon::PeerFailed => "another rank failed the call first",
            Abandon::Device => "its GPU reported an error",
            Abandon::Other => "it failed",
        })
    }
}

/// What a peer's word says about this rank's call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerWord {
    /// The peer has not reached this call yet: wait on.
    Behind,
    /// The peer is at this call, with the same identity.
    Same,
    /// The peer is at this call's number with another identity.
    Mismatch(CallId),
    /// The peer abandoned this call.
    Abandoned(Abandon),
    /// The peer is this many calls past this one: its peers gave up on it.
    Ahead(u16),
}

impl PeerWord {
    /// Reads `word`, a peer's, against this rank's call `ours`.
    pub fn read(ours: CallId, word: u32) -> PeerWord {
        let seq = (word & SEQ_MASK) as u16;
        if seq != ours.seq {
            return ours.ahead_by(seq).map_or(PeerWord::Behind, PeerWord::Ahead);
        }
        let layer = (word >> SEQ_BITS & LAYER_MASK) as u8;
        let tag = word >> TAG_SHIFT & TAG_MASK;
        if word & ABANDONED != 0 {
            return PeerWord::Abandoned(Abandon::from_bits(tag));
        }
        let theirs = CallId {
            seq,
            layer,
            digest: tag as u8,
        };
        if theirs == ours {
            PeerWord::Same
        } else {
            PeerWord::Mismatch(theirs)
        }
    }

    /// `None` to wait on, `Some(Ok)` to go on, `Some(Err)` with the error of rank `rank`'s
    /// `op` of call `ours` when the word of `peer` says the call failed.
    pub fn decide(self, rank: usize, peer: usize, op: &str, ours: CallId) -> Option<Result<(), MoeError>> {
        let op = op.to_string();
        match self {
            PeerWord::Behind => None,
            PeerWord::Same => Some(Ok(())),
            PeerWord::Mismatch(theirs) => Some(Err(MoeError::CallMismatch {
                rank,
                peer,
                op,
                ours,
                theirs,
            })),
            PeerWord::Abandoned(why) => Some(Err(MoeError::PeerAbandoned {
                rank,
                peer,
                op,
                call: ours,
                why,
            })),
            PeerWord::Ahead(by) => Some(Err(MoeError::PeerMovedOn {
                rank,
                peer,
                op,
                call: ours,
                ahead: by,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InputDtype, MoeConfig, QuantConfig};
    use moe_quant::QuantScheme;

    fn layout(hidden: usize, scheme: QuantScheme) -> DispatchLayout {
        DispatchLayout::new(
            &MoeConfig::new(16, 2, hidden, 8, InputDtype::Bf16),
            &QuantConfig::new(scheme),
        )
        .unwrap()
    }

    /// The digest of a layer of 16 experts over 2 ranks, placed contiguously.
    fn digest(layout: &DispatchLayout, max_tokens: usize) -> LayerDigest {
        LayerDigest::new(layout, max_tokens, &ExpertPlacement::contiguous(16, 2))
    }

    #[test]
    fn a_word_reads_back_as_its_own_call_and_abandonment() {
        let id = CallId::new(0x1_2345, 130, digest(&layout(256, QuantScheme::Nvfp4), 8));
        assert_eq!((id.seq, id.layer), (0x2345, 2));
        assert_eq!(PeerWord::read(id, id.word().0), PeerWord::Same);
        for why in [Abandon::InvalidInput, Abandon::Timeout, Abandon::Device] {
            assert_eq!(PeerWord::read(id, id.abandoned(why).0), PeerWord::Abandoned(why));
        }
    }

    #[test]
    fn another_layer_layout_or_placement_at_the_same_number_is_a_mismatch() {
        let l = layout(256, QuantScheme::Bf16);
        let ours = CallId::new(7, 1, digest(&l, 8));
        let alternating = ExpertPlacement::from_map(&[0, 1].repeat(8), 16, 2).unwrap();
        for theirs in [
            CallId::new(7, 2, digest(&l, 8)),
            CallId::new(7, 1, digest(&l, 16)),
            CallId::new(7, 1, digest(&layout(128, QuantScheme::Bf16), 8)),
            CallId::new(7, 1, LayerDigest::new(&l, 8, &alternating)),
        ] {
            assert_ne!(theirs, ours);
            assert_eq!(PeerWord::read(ours, theirs.word().0), PeerWord::Mismatch(theirs));
        }
    }

    #[test]
    fn earlier_calls_are_waited_for_and_later_ones_are_ahead_across_the_wrap() {
        let l = layout(256, QuantScheme::Bf16);
        assert_eq!(
            PeerWord::read(CallId::new(1, 0, digest(&l, 8)), 0),
            PeerWord::Behind,
            "a fresh workspace"
        );
        let ours = CallId::new(0xffff, 0, digest(&l, 8));
        assert_eq!(
            PeerWord::read(ours, CallId::new(0xfffe, 0, digest(&l, 8)).word().0),
            PeerWord::Behind
        );
        assert_eq!(
            PeerWord::read(ours, CallId::new(0x1_0000, 0, digest(&l, 8)).word().0),
            PeerWord::Ahead(1)
        );
        assert_eq!(
            PeerWord::read(
                ours,
                CallId::new(0x1_0002, 3, digest(&l, 8)).abandoned(Abandon::Timeout).0
            ),
            PeerWord::Ahead(3)
        );
    }
}
