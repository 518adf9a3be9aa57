//! The kernel NBD driver, configured through generic netlink (the `nbd`
//! family of drivers/block/nbd.c, as `nbd-client -N` does): CONNECT hands
//! the kernel connected sockets and the device's size and flags, RECONFIGURE
//! changes its size, DISCONNECT ends it. The keeper serves NBD's transmission
//! phase on the other end of each socket pair; there is no handshake (the
//! kernel starts in transmission) and no TCP hop.
//!
//! The messages are built and parsed here, by hand: a netlink message header,
//! a generic netlink header, then attributes (type, length, payload, padded
//! to 4 bytes; nested ones flagged NLA_F_NESTED).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const NETLINK_GENERIC: i32 = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLA_F_NESTED: u16 = 1 << 15;

const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// Whether this host has the kernel NBD driver loaded.
pub fn available() -> bool {
    std::path::Path::new("/sys/module/nbd").exists()
}

/// Attributes of one message, encoded as they go.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn raw(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }
    fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.raw(ty, &v.to_ne_bytes())
    }
    fn u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.raw(ty, &v.to_ne_bytes())
    }
    fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.raw(ty, &b)
    }
    fn nested(&mut self, ty: u16, inner: &Attrs) -> &mut Self {
        self.raw(ty | NLA_F_NESTED, &inner.0)
    }
}

/// The attributes of each data message of a reply, as (type, payload) pairs.
type Replies = Vec<Vec<(u16, Vec<u8>)>>;

/// One generic netlink request: headers plus attributes.
fn message(family: u16, flags: u16, seq: u32, cmd: u8, version: u8, attrs: &Attrs) -> Vec<u8> {
    let len = 16 + 4 + attrs.0.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[cmd, version, 0, 0]);
    m.extend_from_slice(&attrs.0);
    m
}

/// The attributes of a generic netlink payload (after the 4-byte genl header), by type.
fn parse_attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

/// A reply: the attributes of a data message, or an error (0 = a bare ack).
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Data(Vec<(u16, Vec<u8>)>),
    Ack,
}

fn parse_replies(buf: &[u8]) -> io::Result<Vec<Reply>> {
    let mut out = Vec::new();
    let mut b = buf;
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        if len < 16 || len > b.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
        }
        let body = &b[16..len];
        match ty {
            NLMSG_ERROR => {
                let code = body.get(..4).map(|e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]])).unwrap_or(-libc::EIO);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                out.push(Reply::Ack);
            }
            NLMSG_DONE => out.push(Reply::Ack),
            _ => {
                let attrs = parse_attrs(body.get(4..).unwrap_or_default());
                out.push(Reply::Data(attrs.into_iter().map(|(t, v)| (t, v.to_vec())).collect()));
            }
        }
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    Ok(out)
}

/// A generic netlink socket.
pub struct Genl {
    fd: OwnedFd,
    seq: u32,
}

impl Genl {
    pub fn open() -> io::Result<Genl> {
        // SAFETY: plain socket(2); the fd is owned from here on.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_GENERIC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor.
        Ok(Genl { fd: unsafe { OwnedFd::from_raw_fd(fd) }, seq: 1 })
    }

    /// Sends one request and collects replies until its ack (or error).
    fn request(&mut self, family: u16, cmd: u8, version: u8, attrs: &Attrs) -> io::Result<Replies> {
        self.seq += 1;
        let msg = message(family, NLM_F_ACK, self.seq, cmd, version, attrs);
        // SAFETY: msg is a valid buffer of msg.len() bytes; the kernel is the default destination.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut data = Vec::new();
        let mut buf = vec![0u8; 32 << 10];
        loop {
            // SAFETY: buf is a valid writable buffer.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for r in parse_replies(&buf[..n as usize])? {
                match r {
                    Reply::Data(a) => data.push(a),
                    Reply::Ack => return Ok(data),
                }
            }
        }
    }

    /// The id of a generic netlink family, e.g. "nbd".
    pub fn family(&mut self, name: &str) -> io::Result<u16> {
        let mut a = Attrs::default();
        a.str(CTRL_ATTR_FAMILY_NAME, name);
        let replies = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &a)?;
        replies
            .iter()
            .flatten()
            .find(|(t, v)| *t == CTRL_ATTR_FAMILY_ID && v.len() >= 2)
            .map(|(_, v)| u16::from_ne_bytes([v[0], v[1]]))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no generic netlink family {name:?}")))
    }
}

/// What CONNECT gives the kernel.
#[derive(Clone, Debug)]
pub struct Connect {
    /// Shown in /sys/block/nbdN/backend: which volume a device serves.
    pub backend: String,
    pub size: u64,
    pub block_size: u64,
    /// NBD transmission flags (HAS_FLAGS, SEND_FLUSH, ...), as the handshake would send them.
    pub flags: u64,
    /// Seconds a request may take before the kernel gives up on it (0: never).
    pub timeout: u64,
    /// Seconds the kernel waits for new sockets (RECONFIGURE) after a connection dies.
    pub dead_conn_timeout: u64,
}

fn connect_attrs(c: &Connect, fds: &[RawFd]) -> Attrs {
    let mut socks = Attrs::default();
    for fd in fds {
        let mut item = Attrs::default();
        item.u32(NBD_SOCK_FD, *fd as u32);
        socks.nested(NBD_SOCK_ITEM, &item);
    }
    let mut a = Attrs::default();
    a.u64(NBD_ATTR_SIZE_BYTES, c.size)
        .u64(NBD_ATTR_BLOCK_SIZE_BYTES, c.block_size)
        .u64(NBD_ATTR_SERVER_FLAGS, c.flags)
        .u64(NBD_ATTR_TIMEOUT, c.timeout)
        .u64(NBD_ATTR_DEAD_CONN_TIMEOUT, c.dead_conn_timeout)
        .str(NBD_ATTR_BACKEND_IDENTIFIER, &c.backend)
        .nested(NBD_ATTR_SOCKETS, &socks);
    a
}

/// Connects a free /dev/nbdN to the given sockets; returns N.
pub fn connect(c: &Connect, fds: &[RawFd]) -> io::Result<u32> {
    let mut g = Genl::open()?;
    let family = g.family("nbd")?;
    let replies = g.request(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, &connect_attrs(c, fds))?;
    replies
        .iter()
        .flatten()
        .find(|(t, v)| *t == NBD_ATTR_INDEX && v.len() >= 4)
        .map(|(_, v)| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "the kernel did not say which nbd device it used"))
}

/// Gives /dev/nbd`index` a new size.
pub fn resize(index: u32, size: u64) -> io::Result<()> {
    let mut g = Genl::open()?;
    let family = g.family("nbd")?;
    let mut a = Attrs::default();
    a.u32(NBD_ATTR_INDEX, index).u64(NBD_ATTR_SIZE_BYTES, size);
    g.request(family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, &a).map(drop)
}

/// Disconnects /dev/nbd`index` (the kernel sends NBD_CMD_DISC on its sockets).
pub fn disconnect(index: u32) -> io::Result<()> {
    let mut g = Genl::open()?;
    let family = g.family("nbd")?;
    let mut a = Attrs::default();
    a.u32(NBD_ATTR_INDEX, index);
    g.request(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, &a).map(drop)
}

/// The backend identifier /dev/nbd`index` was connected with, if any.
pub fn backend_of(index: u32) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/backend")).ok().map(|s| s.trim_end().to_string())
}

/// The index of `/dev/nbdN`.
pub fn index_of(dev: &std::path::Path) -> Option<u32> {
    dev.file_name()?.to_str()?.strip_prefix("nbd")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nested_attributes_flagged() {
        let mut a = Attrs::default();
        a.str(2, "nbd");
        assert_eq!(a.0, [8, 0, 2, 0, b'n', b'b', b'd', 0]);
        let mut inner = Attrs::default();
        inner.u32(NBD_SOCK_FD, 7);
        let mut outer = Attrs::default();
        outer.nested(NBD_SOCK_ITEM, &inner);
        assert_eq!(outer.0, [12, 0, 1, 0x80, 8, 0, 1, 0, 7, 0, 0, 0]);
        let mut odd = Attrs::default();
        odd.raw(9, &[1, 2, 3, 4, 5]);
        assert_eq!(odd.0.len(), 12, "9 bytes padded to 12");
        assert_eq!(odd.0[0], 9, "the length excludes the padding");
    }

    #[test]
    fn a_connect_request_carries_size_flags_and_every_socket() {
        let c = Connect {
            backend: "torus:v".into(),
            size: 1 << 30,
            block_size: 4096,
            flags: 0x1ed,
            timeout: 0,
            dead_conn_timeout: 30,
        };
        let msg = message(0x22, NLM_F_ACK, 5, NBD_CMD_CONNECT, NBD_GENL_VERSION, &connect_attrs(&c, &[3, 4]));
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize, msg.len());
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), 0x22);
        assert_eq!(u16::from_ne_bytes([msg[6], msg[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(&msg[16..18], &[NBD_CMD_CONNECT, NBD_GENL_VERSION]);
        let attrs = parse_attrs(&msg[20..]);
        let get = |t: u16| attrs.iter().find(|(ty, _)| *ty == t).map(|(_, v)| *v).expect("attribute present");
        assert_eq!(u64::from_ne_bytes(get(NBD_ATTR_SIZE_BYTES).try_into().unwrap()), 1 << 30);
        assert_eq!(u64::from_ne_bytes(get(NBD_ATTR_SERVER_FLAGS).try_into().unwrap()), 0x1ed);
        assert_eq!(u64::from_ne_bytes(get(NBD_ATTR_DEAD_CONN_TIMEOUT).try_into().unwrap()), 30);
        assert_eq!(get(NBD_ATTR_BACKEND_IDENTIFIER), b"torus:v\0");
        let socks = parse_attrs(get(NBD_ATTR_SOCKETS));
        let fds: Vec<u32> = socks
            .iter()
            .map(|(t, item)| {
                assert_eq!(*t, NBD_SOCK_ITEM);
                let inner = parse_attrs(item);
                u32::from_ne_bytes(inner[0].1.try_into().unwrap())
            })
            .collect();
        assert_eq!(fds, [3, 4]);
    }

    #[test]
    fn replies_errors_and_acks_are_told_apart() {
        let mut err = vec![0u8; 36];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_replies(&err).expect_err("an error").raw_os_error(), Some(libc::ENOENT));
        err[16..20].copy_from_slice(&0i32.to_ne_bytes());
        assert_eq!(parse_replies(&err).expect("an ack"), vec![Reply::Ack]);
    }

    #[test]
    fn the_kernel_answers_our_generic_netlink_requests() {
        // The controller family exists on every Linux kernel: a real round trip.
        let mut g = Genl::open().expect("a generic netlink socket");
        assert_eq!(g.family("nlctrl").expect("nlctrl resolves"), GENL_ID_CTRL);
        match g.family("nbd") {
            Ok(id) => assert!(available() && id > GENL_ID_CTRL, "nbd resolved to {id}"),
            Err(e) => assert!(!available(), "nbd is loaded but did not resolve: {e}"),
        }
        assert_eq!(index_of(std::path::Path::new("/dev/nbd12")), Some(12));
        assert_eq!(index_of(std::path::Path::new("/dev/loop1")), None);
    }
}
