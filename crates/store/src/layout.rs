//! On-disk layout of one extent replica (see docs/format.md).
//!
//! Format 2 (every extent created now), one file, so that one fdatasync
//! makes a flush durable: `<vol>/<index>.extent` holds a 4096-byte header at
//! 0, one 8-byte entry per block from 4096, and the extent's bytes from
//! [`DATA_OFFSET`] (sparse).
//!
//! Format 1 (extents of older stores, still read and written): the bytes in
//! `<vol>/<index>.dat` at their own offsets, header and entries in
//! `<vol>/<index>.sum`.
//!
//! Header: magic "TRSX" (4) | format u32 | dirty u32 | block size u32 |
//! reserved | crc32c of bytes 0..4092 at 4092. Entry: crc32c of the block's
//! data u32 | state u8 | reserved 3 bytes. All integers little-endian.

use std::path::{Path, PathBuf};
use torus_types::BLOCK_SIZE;

pub const HEADER_SIZE: u64 = 4096;
pub const ENTRY_SIZE: usize = 8;
pub const MAGIC: &[u8; 4] = b"TRSX";

/// Where a format 2 file keeps the extent's byte 0: past the largest table
/// (4 KiB + 8 bytes per block of a 1 GiB extent = 2 MiB + 4 KiB), rounded up
/// so that data stays aligned for the page cache's large folios.
pub const DATA_OFFSET: u64 = 4 << 20;
const _: () = assert!(HEADER_SIZE + (crate::MAX_EXTENT_SIZE / BLOCK_SIZE as u64) * ENTRY_SIZE as u64 <= DATA_OFFSET);

/// How an extent's files are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Two files: `.dat` (data at its own offsets) and `.sum` (header and table).
    TwoFiles = 1,
    /// One `.extent` file: header and table, then data from [`DATA_OFFSET`].
    OneFile = 2,
}

impl Format {
    fn from_u32(v: u32) -> Option<Format> {
        match v {
            1 => Some(Format::TwoFiles),
            2 => Some(Format::OneFile),
            _ => None,
        }
    }
}

/// The file holding an extent's data in a volume's directory, and the offset
/// of the extent's byte 0 in it: the format 2 file if there is one, else the
/// format 1 data file. For tools and tests that look at the disk directly.
pub fn data_file(vol_dir: &Path, index: u64) -> (PathBuf, u64) {
    let one = vol_dir.join(format!("{index}.extent"));
    if one.exists() {
        (one, DATA_OFFSET)
    } else {
        (vol_dir.join(format!("{index}.dat")), 0)
    }
}

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

pub fn encode_header(format: Format, dirty: bool) -> [u8; HEADER_SIZE as usize] {
    let mut h = [0u8; HEADER_SIZE as usize];
    h[0..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&(format as u32).to_le_bytes());
    h[8..12].copy_from_slice(&(dirty as u32).to_le_bytes());
    h[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    let crc = crc32c_of(&h[..4092]);
    h[4092..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes the header of a file of `format`; returns the dirty flag, or why
/// it is not valid.
pub fn decode_header(h: &[u8], format: Format) -> Result<bool, String> {
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
    let found = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    match Format::from_u32(found) {
        Some(f) if f == format => {}
        Some(f) => return Err(format!("header says format {} in a format {} file", f as u32, format as u32)),
        None => return Err(format!("unknown format {found}")),
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
        for format in [Format::TwoFiles, Format::OneFile] {
            let mut h = encode_header(format, true);
            assert_eq!(decode_header(&h, format), Ok(true));
            assert_eq!(decode_header(&encode_header(format, false), format), Ok(false));
            h[100] ^= 1;
            assert!(decode_header(&h, format).is_err());
        }
        let two = encode_header(Format::TwoFiles, false);
        assert!(decode_header(&two, Format::OneFile).is_err(), "a header of the other format is refused");
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
