//! The frames of the TCP control plane: `[length: u32][kind: u8][body]`, little-endian, the
//! length counting the kind and the body. Every field read from a peer is bounds-checked; a
//! frame that does not parse is an error, never a panic.

use std::io::{self, Read, Write};

/// The first word of every hello: a connection that does not start with it is a stranger's.
pub const MAGIC: u32 = 0x4145_4f4d;
/// The protocol version; both ends must speak the same.
pub const VERSION: u16 = 1;
/// The largest frame accepted (a gathered payload of 1 GiB).
const MAX_FRAME: usize = 1 << 30;

/// A frame between a member and rank 0, the hub.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// A member's first frame.
    Hello {
        magic: u32,
        version: u16,
        world_size: u32,
        run_id: u64,
        rank: u32,
    },
    /// The hub's answer once every rank joined.
    Welcome,
    /// The hub refuses the member, or gives up the world, for `reason`.
    Refused { reason: String },
    /// A member's contribution to its `seq`-th operation on `group`.
    Gather {
        group: Vec<u32>,
        op: String,
        seq: u64,
        bytes: Vec<u8>,
    },
    /// Every member's contribution, in group order.
    Gathered {
        group: Vec<u32>,
        seq: u64,
        parts: Vec<Vec<u8>>,
    },
    /// The operation timed out waiting for `missing`.
    TimedOut {
        group: Vec<u32>,
        seq: u64,
        missing: Vec<u32>,
    },
    /// `peer` called another operation at this point of the group's sequence.
    Mismatch { group: Vec<u32>, seq: u64, peer: u32 },
    /// The world is aborted, for `reason`.
    Abort { reason: String },
    /// A member leaves normally: its connection closing is not a failure.
    Bye,
}

#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
    fn ranks(&mut self, v: &[u32]) -> &mut Self {
        self.u32(v.len() as u32);
        for &r in v {
            self.u32(r);
        }
        self
    }
}

struct In<'a>(&'a [u8]);

impl In<'_> {
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.0.len() < n {
            return Err(malformed("a field runs past the frame"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().map_err(|_| malformed("u16"))?,
        ))
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| malformed("u32"))?,
        ))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| malformed("u64"))?,
        ))
    }
    fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?).map_err(|_| malformed("a string is not UTF-8"))
    }
    fn ranks(&mut self) -> io::Result<Vec<u32>> {
        let n = self.u32()? as usize;
        if n > self.0.len() / 4 {
            return Err(malformed("a rank list runs past the frame"));
        }
        (0..n).map(|_| self.u32()).collect()
    }
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed control-plane frame: {what}"),
    )
}

impl Frame {
    fn encode(&self) -> Vec<u8> {
        let mut o = Out::default();
        match self {
            Frame::Hello {
                magic,
                version,
                world_size,
                run_id,
                rank,
            } => o
                .u8(1)
                .u32(*magic)
                .u16(*version)
                .u32(*world_size)
                .u64(*run_id)
                .u32(*rank),
            Frame::Welcome => o.u8(2),
            Frame::Refused { reason } => o.u8(3).bytes(reason.as_bytes()),
            Frame::Gather { group, op, seq, bytes } => o.u8(4).ranks(group).bytes(op.as_bytes()).u64(*seq).bytes(bytes),
            Frame::Gathered { group, seq, parts } => {
                o.u8(5).ranks(group).u64(*seq).u32(parts.len() as u32);
                for p in parts {
                    o.bytes(p);
                }
                &mut o
            }
            Frame::TimedOut { group, seq, missing } => o.u8(6).ranks(group).u64(*seq).ranks(missing),
            Frame::Mismatch { group, seq, peer } => o.u8(7).ranks(group).u64(*seq).u32(*peer),
            Frame::Abort { reason } => o.u8(8).bytes(reason.as_bytes()),
            Frame::Bye => o.u8(9),
        };
        o.0
    }

    fn decode(body: &[u8]) -> io::Result<Frame> {
        let mut i = In(body);
        let frame = match i.u8()? {
            1 => Frame::Hello {
                magic: i.u32()?,
                version: i.u16()?,
                world_size: i.u32()?,
                run_id: i.u64()?,
                rank: i.u32()?,
            },
            2 => Frame::Welcome,
            3 => Frame::Refused { reason: i.string()? },
            4 => Frame::Gather {
                group: i.ranks()?,
                op: i.string()?,
                seq: i.u64()?,
                bytes: i.bytes()?,
            },
            5 => {
                let (group, seq) = (i.ranks()?, i.u64()?);
                let n = i.u32()? as usize;
                if n > i.0.len() / 4 {
                    return Err(malformed("a part list runs past the frame"));
                }
                let parts = (0..n).map(|_| i.bytes()).collect::<io::Result<_>>()?;
                Frame::Gathered { group, seq, parts }
            }
            6 => Frame::TimedOut {
                group: i.ranks()?,
                seq: i.u64()?,
                missing: i.ranks()?,
            },
            7 => Frame::Mismatch {
                group: i.ranks()?,
                seq: i.u64()?,
                peer: i.u32()?,
            },
            8 => Frame::Abort { reason: i.string()? },
            9 => Frame::Bye,
            kind => return Err(malformed(&format!("unknown kind {kind}"))),
        };
        if !i.0.is_empty() {
            return Err(malformed("bytes after the last field"));
        }
        Ok(frame)
    }

    /// Writes the frame.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let body = self.encode();
        let mut framed = (body.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(&body);
        w.write_all(&framed)?;
        w.flush()
    }

    /// Reads one frame.
    pub fn read_from(r: &mut impl Read) -> io::Result<Frame> {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(malformed(&format!("a frame of {len} bytes")));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        Frame::decode(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_reads_back_as_written() {
        let frames = [
            Frame::Hello {
                magic: MAGIC,
                version: VERSION,
                world_size: 4,
                run_id: 7,
                rank: 3,
            },
            Frame::Welcome,
            Frame::Refused { reason: "no".into() },
            Frame::Gather {
                group: vec![0, 2],
                op: "dispatch".into(),
                seq: 9,
                bytes: vec![1, 2, 3],
            },
            Frame::Gathered {
                group: vec![0, 2],
                seq: 9,
                parts: vec![vec![], vec![5]],
            },
            Frame::TimedOut {
                group: vec![0, 1],
                seq: 1,
                missing: vec![1],
            },
            Frame::Mismatch {
                group: vec![0, 1],
                seq: 2,
                peer: 1,
            },
            Frame::Abort { reason: "stop".into() },
            Frame::Bye,
        ];
        for f in frames {
            let mut buf = Vec::new();
            f.write_to(&mut buf).unwrap();
            assert_eq!(Frame::read_from(&mut buf.as_slice()).unwrap(), f);
        }
    }

    #[test]
    fn truncated_and_oversized_frames_are_errors() {
        let mut buf = Vec::new();
        Frame::Gather {
            group: vec![0, 1],
            op: "x".into(),
            seq: 1,
            bytes: vec![0; 16],
        }
        .write_to(&mut buf)
        .unwrap();
        for cut in 1..buf.len() {
            assert!(Frame::read_from(&mut &buf[..cut]).is_err(), "cut at {cut}");
        }
        let huge = [0xff, 0xff, 0xff, 0x7f, 1];
        assert!(Frame::read_from(&mut huge.as_slice()).is_err());
        // A rank list claiming more entries than the frame holds.
        let lying = [9u8, 0, 0, 0, 6, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        assert!(Frame::read_from(&mut lying.as_slice()).is_err());
    }
}
