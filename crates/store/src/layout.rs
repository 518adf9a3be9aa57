//! On-disk layout of one extent replica (see docs/format.md).
//!
//! `<vol>/<index>.dat`: the extent's bytes at their offsets, sparse.
//! `<vol>/<index>.sum`: a 4096-byte header, then one 8-byte entry per block.
//!
//! Header: magic "TRSX" (4) | format u32 | dirty u32 | reserved | crc32c of
//! bytes 0..4092 at 4092. Entry: crc32c of the block's data u32 | state u8 |
//! reserved 3 bytes. All integers little-endian.

use torus_types::BLOCK_SIZE;

pub const HEADER_SIZE: u64 = 4096;
pub const ENTRY_SIZE: usize = 8;
pub const MAGIC: &[u8; 4] = b"TRSX";
pub const FORMAT: u32 = 1;

/// What a block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// Never written here: reads as zeroes. (For a clone, this will mean "look in the parent".)
    Absent = 0,
    /// Data whose CRC32C is in the entry.
    Data = 1,
    /// Trimmed or zeroed: reads as zeroes, the data file has a hole.
    Zero = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub crc: u32,
    pub state: BlockState,
}

impl Entry {
    pub const ABSENT: Entry = Entry { crc: 0, state: BlockState::Absent };
    pub const ZERO: Entry = Entry { crc: 0, state: BlockState::Zero };

    pub fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.crc.to_le_bytes());
        out[4] = self.state as u8;
        out[5..8].fill(0);
    }

    /// Decodes an entry; `None` if its state byte is not one we wrote.
    pub fn decode(b: &[u8]) -> Option<Entry> {
        let crc = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let state = match b[4] {
            0 => BlockState::Absent,
            1 => BlockState::Data,
            2 => BlockState::Zero,
            _ => return None,
        };
        if b[5..8] != [0, 0, 0] {
            return None;
        }
        Some(Entry { crc, state })
    }
}

pub fn encode_header(dirty: bool) -> [u8; HEADER_SIZE as usize] {
    let mut h = [0u8; HEADER_SIZE as usize];
    h[0..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&FORMAT.to_le_bytes());
    h[8..12].copy_from_slice(&(dirty as u32).to_le_bytes());
    h[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    let crc = crc32c_of(&h[..4092]);
    h[4092..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes a header; returns the dirty flag, or why it is not valid.
pub fn decode_header(h: &[u8]) -> Result<bool, String> {
    if h.len() < HEADER_SIZE as usize {
        return Err(format!("header is {} bytes, expected {HEADER_SIZE}", h.len()));
    }
    if &h[0..4] != MAGIC {
        return Err("bad magic".into());
    }
    let crc = u32::from_le_bytes([h[4092], h[4093], h[4094], h[4095]]);
    if crc != crc32c_of(&h[..4092]) {
        return Err("header checksum mismatch".into());
    }
    let format = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if format != FORMAT {
        return Err(format!("unknown format {format}"));
    }
    let bs = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if bs as usize != BLOCK_SIZE {
        return Err(format!("block size {bs}, expected {BLOCK_SIZE}"));
    }
    Ok(u32::from_le_bytes([h[8], h[9], h[10], h[11]]) != 0)
}

fn crc32c_of(b: &[u8]) -> u32 {
    torus_types::block_checksum(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_damage() {
        let mut h = encode_header(true);
        assert_eq!(decode_header(&h), Ok(true));
        assert_eq!(decode_header(&encode_header(false)), Ok(false));
        h[100] ^= 1;
        assert!(decode_header(&h).is_err());
    }

    #[test]
    fn entry_round_trip() {
        let mut b = [0u8; 8];
        let e = Entry { crc: 0xdead_beef, state: BlockState::Data };
        e.encode(&mut b);
        assert_eq!(Entry::decode(&b), Some(e));
        b[4] = 9;
        assert_eq!(Entry::decode(&b), None);
    }
}
