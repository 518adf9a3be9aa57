#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (crates/testkit/tests/fuzz.rs):
valid inputs that the mutations start from. Run from the repository root."""
import os
import struct

def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF

def put(target, name, data):
    os.makedirs(f"fuzz/corpus/{target}", exist_ok=True)
    with open(f"fuzz/corpus/{target}/{name}", "wb") as f:
        f.write(data)

# NBD handshake: client flags (FIXED_NEWSTYLE | NO_ZEROES), then options.
IHAVEOPT = 0x49484156454F5054
def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data
def info_req(name, reqs=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(reqs)) + b"".join(struct.pack(">H", r) for r in reqs)
flags = struct.pack(">I", 3)
put("nbd_handshake", "go", flags + opt(7, info_req(b"x", (3,))))
put("nbd_handshake", "list-info-go", flags + opt(3) + opt(6, info_req(b"x", (0, 1, 2, 3))) + opt(7, info_req(b"x")))
put("nbd_handshake", "export-name", flags + opt(1, b"x"))
put("nbd_handshake", "unknown-then-abort", flags + opt(8) + opt(9, b"\0" * 8) + opt(10, info_req(b"nope")) + opt(2))
def meta_req(name, queries):
    return struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)) + b"".join(struct.pack(">I", len(q)) + q for q in queries)
put("nbd_handshake", "structured-meta-go", flags + opt(8) + opt(9, meta_req(b"x", [b"base:"])) + opt(10, meta_req(b"x", [b"base:allocation", b"qemu:dirty-bitmap:a"])) + opt(7, info_req(b"x")))
put("nbd_handshake", "meta-before-structured", flags + opt(10, meta_req(b"x", [b"base:allocation"])) + opt(9, meta_req(b"x", [])) + opt(2))

# NBD transmission: requests (magic, flags, type, cookie, offset, length [, payload]).
def req(kind, offset, length, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, cookie, offset, length) + payload
put("nbd_requests", "write-read-flush", req(1, 4096, 4096, payload=b"\x5a" * 4096) + req(0, 4096, 4096, cookie=2) + req(3, 0, 0, cookie=3) + req(2, 0, 0, cookie=4))
put("nbd_requests", "unaligned-fua", req(1, 100, 10, flags=1, payload=b"0123456789") + req(0, 90, 30, cookie=2))
put("nbd_requests", "trim-zeroes", req(4, 0, 65536) + req(6, 65536, 8192, cookie=2) + req(6, 0, 4096, flags=2, cookie=3) + req(0, 0, 1 << 20, cookie=4))
put("nbd_requests", "block-status-fast-zero", req(7, 0, 1 << 20) + req(7, 4096, 8192, flags=8, cookie=2) + req(6, 0, 65536, flags=16, cookie=3) + req(6, 0, 4096, flags=18, cookie=4) + req(7, 1 << 20, 4096, cookie=5))
put("nbd_requests", "edges", req(0, (1 << 20) - 4096, 8192) + req(1, 1 << 20, 1, payload=b"x") + req(9, 0, 0, cookie=3))

# Peer protocol: a request header (48 bytes, little-endian), a reply header (24 bytes), an extent list.
def peer_req(op, flags=0, rid=7, vol=1, index=0, offset=0, length=4096, epoch=3):
    return struct.pack("<IBB2xQQQIIQ", 0x54525131, op, flags, rid, vol, index, offset, length, epoch)
def peer_reply(status=0, rid=7, length=0):
    return struct.pack("<IIQI4x", 0x54525031, status, rid, length)
put("peer_frames", "write", peer_req(2, flags=1))
put("peer_frames", "read", peer_req(1, flags=4, length=65536))
put("peer_frames", "reply", peer_reply(length=8) + struct.pack("<QQQ", 1, 2, 3) * 2)

# Store: an extent's checksum table (4 KiB header, then 8-byte entries) over 64 KiB of 0x5a.
# The target opens each input as a format 1 table (`.sum`) and as the start of a format 2 file.
def header(dirty, fmt=1):
    h = bytearray(4096)
    h[0:4] = b"TRSX"
    h[4:8] = struct.pack("<I", fmt)
    h[8:12] = struct.pack("<I", 1 if dirty else 0)
    h[12:16] = struct.pack("<I", 4096)
    h[4092:] = struct.pack("<I", crc32c(bytes(h[:4092])))
    return bytes(h)
good = crc32c(b"\x5a" * 4096)
def entry(crc, state):
    return struct.pack("<IB3x", crc, state)
put("store_table", "clean", header(False) + entry(good, 1) * 16)
put("store_table", "dirty-some-cut", header(True) + (entry(good, 1) + entry(0x1234, 1)) * 8)
put("store_table", "zero-absent-past-end", header(False) + entry(0, 2) * 4 + entry(0, 0) * 4 + entry(good, 1) * 24)
put("store_table", "header-only", header(True))
put("store_table", "format2-clean", header(False, 2) + entry(good, 1) * 16)
put("store_table", "format2-dirty-some-cut", header(True, 2) + (entry(good, 1) + entry(0x1234, 1)) * 8)
