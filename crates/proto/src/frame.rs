//! Frames of the peer protocol.
//!
//! Request header, 48 bytes: magic u32 "TRQ1" | op u8 | flags u8 | reserved u16 |
//! id u64 | volume u64 | extent index u64 | offset u32 | length u32 | epoch u64.
//! A WRITE carries `length` bytes of payload after the header.
//!
//! Reply header, 24 bytes: magic u32 "TRP1" | status u32 | id u64 | length u32 |
//! reserved u32, then `length` bytes: a READ's data, an error's message, or an
//! op's result.

use thiserror::Error;
use torus_types::{Epoch, ExtentId, VolumeId};

pub const REQUEST_MAGIC: u32 = u32::from_be_bytes(*b"TRQ1");
pub const REPLY_MAGIC: u32 = u32::from_be_bytes(*b"TRP1");
pub const REQUEST_HEADER_LEN: usize = 48;
pub const REPLY_HEADER_LEN: usize = 24;
/// Largest payload either side accepts.
pub const MAX_PAYLOAD: u32 = 64 << 20;

/// Request flag: make this write durable before replying (NBD's FUA).
pub const FLAG_FUA: u8 = 1;
/// Request flag on FILL: no payload; absent blocks in the range become zero.
pub const FLAG_ZERO_FILL: u8 = 2;
/// Request flag on READ: fail with ABSENT rather than read never-written blocks as zeroes.
pub const FLAG_PRESENT_ONLY: u8 = 4;
/// Request flag on ZERO: the range's whole blocks become absent ("never
/// written here") instead of zero, so that reads of a layered volume fall
/// through to an older layer (its writer's resync).
pub const FLAG_DISCARD: u8 = 8;
/// The state byte of a BLOCK_SUMS entry for a block that holds data (0 is
/// absent, 2 zero).
pub const BLOCK_DATA: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Read = 1,
    Write = 2,
    Flush = 3,
    /// Zero a range, freeing whole blocks (TRIM and WRITE_ZEROES).
    Zero = 4,
    /// Announce a writer's epoch for a volume: older epochs are refused from now on.
    Fence = 5,
    /// Delete every extent of a volume held by the node.
    DeleteVolume = 6,
    /// List the extents the node holds: reply is (volume u64, index u64, blocks u64)*.
    ListExtents = 7,
    Ping = 8,
    /// Copy blocks in without overwriting any written here (rebalance, repair).
    /// Payload: the data, unless FLAG_ZERO_FILL (then absent blocks become zero).
    Fill = 9,
    /// The checksum table of an extent: per block, crc32c u32 LE, state u8
    /// (0 absent, 1 data, 2 zero), 3 zero bytes; empty if the node holds none of it.
    BlockSums = 10,
    /// Delete one extent replica.
    DeleteExtent = 11,
    /// Replace the corrupt blocks of an aligned range with the payload (a good
    /// replica's copy); blocks that verify are left alone. Reply: u64 blocks replaced.
    Repair = 12,
    /// Whether the node holds a copy of the extent: reply u8 1 or 0.
    Holds = 13,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            4 => Op::Zero,
            5 => Op::Fence,
            6 => Op::DeleteVolume,
            7 => Op::ListExtents,
            8 => Op::Ping,
            9 => Op::Fill,
            10 => Op::BlockSums,
            11 => Op::DeleteExtent,
            12 => Op::Repair,
            13 => Op::Holds,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    Io = 1,
    Checksum = 2,
    NoSpace = 3,
    /// The epoch was older than one the node has seen; payload: the current epoch (u64).
    Fenced = 4,
    OutOfRange = 5,
    Invalid = 6,
    /// The node's store failed and refuses writes.
    Failed = 7,
    /// A PRESENT_ONLY read found blocks the node has not received.
    Absent = 8,
    /// The node has been cut off from the metadata store for longer than its
    /// lease and refuses writes until it is back (retry later).
    Isolated = 9,
}

impl Status {
    pub fn from_u32(v: u32) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::Io,
            2 => Status::Checksum,
            3 => Status::NoSpace,
            4 => Status::Fenced,
            5 => Status::OutOfRange,
            6 => Status::Invalid,
            7 => Status::Failed,
            8 => Status::Absent,
            9 => Status::Isolated,
            _ => return None,
        })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unknown op {0}")]
    UnknownOp(u8),
    #[error("unknown status {0}")]
    UnknownStatus(u32),
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub op: Op,
    pub flags: u8,
    pub id: u64,
    pub extent: ExtentId,
    pub offset: u32,
    pub len: u32,
    pub epoch: Epoch,
}

impl RequestHeader {
    pub fn new(op: Op, extent: ExtentId, offset: u32, len: u32, epoch: Epoch) -> Self {
        RequestHeader { op, flags: 0, id: 0, extent, offset, len, epoch }
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> usize {
        if matches!(self.op, Op::Write | Op::Repair) || (self.op == Op::Fill && self.flags & FLAG_ZERO_FILL == 0) {
            self.len as usize
        } else {
            0
        }
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        b[4] = self.op as u8;
        b[5] = self.flags;
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.extent.volume.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.extent.index.to_le_bytes());
        b[32..36].copy_from_slice(&self.offset.to_le_bytes());
        b[36..40].copy_from_slice(&self.len.to_le_bytes());
        b[40..48].copy_from_slice(&self.epoch.0.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, FrameError> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let magic = u32_at(0);
        if magic != REQUEST_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let op = Op::from_u8(b[4]).ok_or(FrameError::UnknownOp(b[4]))?;
        let h = RequestHeader {
            op,
            flags: b[5],
            id: u64_at(8),
            extent: ExtentId::new(VolumeId(u64_at(16)), u64_at(24)),
            offset: u32_at(32),
            len: u32_at(36),
            epoch: Epoch(u64_at(40)),
        };
        if h.len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(h.len));
        }
        Ok(h)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyHeader {
    pub status: Status,
    pub id: u64,
    pub len: u32,
}

impl ReplyHeader {
    pub fn encode(&self) -> [u8; REPLY_HEADER_LEN] {
        let mut b = [0u8; REPLY_HEADER_LEN];
        b[0..4].copy_from_slice(&REPLY_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&(self.status as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; REPLY_HEADER_LEN]) -> Result<Self, FrameError> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let magic = u32_at(0);
        if magic != REPLY_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let status = Status::from_u32(u32_at(4)).ok_or(FrameError::UnknownStatus(u32_at(4)))?;
        let len = u32_at(16);
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        Ok(ReplyHeader { status, id: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")), len })
    }
}

/// Encodes an extent listing (ListExtents reply payload).
pub fn encode_extent_list(items: &[(ExtentId, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.len() * 24);
    for (id, blocks) in items {
        out.extend_from_slice(&id.volume.0.to_le_bytes());
        out.extend_from_slice(&id.index.to_le_bytes());
        out.extend_from_slice(&blocks.to_le_bytes());
    }
    out
}

pub fn decode_extent_list(b: &[u8]) -> Vec<(ExtentId, u64)> {
    b.chunks_exact(24)
        .map(|c| {
            let u = |i: usize| u64::from_le_bytes(c[i..i + 8].try_into().expect("8 bytes"));
            (ExtentId::new(VolumeId(u(0)), u(8)), u(16))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let mut h = RequestHeader::new(Op::Write, ExtentId::new(VolumeId(3), 99), 4096, 8192, Epoch(42));
        h.id = 7;
        h.flags = FLAG_FUA;
        assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
        assert_eq!(h.payload_len(), 8192);
    }

    #[test]
    fn reply_round_trip() {
        let r = ReplyHeader { status: Status::Fenced, id: 1 << 40, len: 8 };
        assert_eq!(ReplyHeader::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn rejects_garbage() {
        let mut b = RequestHeader::new(Op::Read, ExtentId::new(VolumeId(1), 0), 0, 1, Epoch(0)).encode();
        b[4] = 200;
        assert_eq!(RequestHeader::decode(&b), Err(FrameError::UnknownOp(200)));
        b[0] = 0;
        assert!(matches!(RequestHeader::decode(&b), Err(FrameError::BadMagic(_))));
        let mut b = RequestHeader::new(Op::Read, ExtentId::new(VolumeId(1), 0), 0, 1, Epoch(0)).encode();
        b[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(RequestHeader::decode(&b), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn extent_list_round_trip() {
        let items = vec![(ExtentId::new(VolumeId(1), 2), 3), (ExtentId::new(VolumeId(4), 5), 6)];
        assert_eq!(decode_extent_list(&encode_extent_list(&items)), items);
    }
}
