//! torus-proto: the peer protocol, the data path between clients
//! (`torusblk`) and storage nodes (`torusd`), and later between nodes.
//!
//! A compact binary protocol over TCP: fixed-size little-endian headers,
//! pipelined, replies matched to requests by id and sent in any order
//! (docs/format.md has the byte layout). [`frame`] is the codec (pure, no
//! I/O); [`client`] is a pipelined client over one connection; [`transport`]
//! is the seam that lets tests replace TCP with in-memory nodes.
//!
//! Depends on torus-types only; knows nothing of disks, etcd or NBD.

pub mod client;
pub mod frame;
pub mod tls;
pub mod transport;

pub use client::{PeerClient, PeerError};
pub use frame::{
    Op, ReplyHeader, RequestHeader, Status, BLOCK_DATA, FLAG_DISCARD, MAX_PAYLOAD, REPLY_HEADER_LEN, REQUEST_HEADER_LEN,
};
pub use transport::{Link, Tcp, Transport};
