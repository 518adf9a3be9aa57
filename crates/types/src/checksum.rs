//! Block checksums: CRC32C over the data of one block.
//!
//! Every block a node stores carries one; it is checked on every read.

/// The unit of checksumming and of the local store's bookkeeping.
pub const BLOCK_SIZE: usize = 4096;

/// CRC32C (Castagnoli) of a block's bytes, hardware-accelerated where the CPU has it.
pub fn block_checksum(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // RFC 3720 B.4: 32 bytes of zeroes.
        assert_eq!(block_checksum(&[0u8; 32]), 0x8a91_36aa);
    }
}
