//! A deliberately minimal raw NBD client, for sending malformed input and
//! checking exactly what the server answers. Real clients (nbdinfo, nbdcopy,
//! qemu, fio) are used for everything else.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;

pub struct Raw {
    pub s: TcpStream,
}

impl Raw {
    /// Connects and reads the server's greeting; returns the handshake flags.
    pub fn connect(addr: &str) -> (Raw, u16) {
        let s = TcpStream::connect(addr).expect("connect to NBD server");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut r = Raw { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        (r, u16::from_be_bytes([g[16], g[17]]))
    }

    /// Connects and opens `name` with GO (fixed newstyle, no zeroes); panics, naming `what`, if refused.
    pub fn open(addr: &str, name: &str, what: &str) -> Raw {
        let (mut r, _) = Raw::connect(addr);
        r.send(&3u32.to_be_bytes());
        r.go(name).unwrap_or_else(|e| panic!("{what}: GO {name}: {e:?}"));
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Reads one option reply: (option, reply type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), 0x0003_e889_0455_65a9, "option reply magic");
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d).expect("option reply data");
        (u32::from_be_bytes(h[8..12].try_into().unwrap()), u32::from_be_bytes(h[12..16].try_into().unwrap()), d)
    }

    /// NBD_OPT_GO for `name`; returns (size, flags) or the error reply (type, message).
    pub fn go(&mut self, name: &str) -> Result<(u64, u16), (u32, String)> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &d);
        let mut export = None;
        loop {
            let (_, kind, data) = self.option_reply();
            match kind {
                1 => return Ok(export.expect("NBD_INFO_EXPORT before ACK")),
                3 => {
                    if u16::from_be_bytes([data[0], data[1]]) == 0 {
                        export = Some((
                            u64::from_be_bytes(data[2..10].try_into().unwrap()),
                            u16::from_be_bytes([data[10], data[11]]),
                        ));
                    }
                }
                k if k & (1 << 31) != 0 => return Err((k, String::from_utf8_lossy(&data).into_owned())),
                k => panic!("unexpected reply type {k}"),
            }
        }
    }

    /// Sends a transmission request (with payload for writes).
    pub fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Reads a simple reply: (error, cookie), plus `data_len` bytes if it succeeded.
    pub fn reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("simple reply");
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6744_6698, "simple reply magic");
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = vec![0u8; if err == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut d).expect("reply data");
        (err, cookie, d)
    }

    /// True if the server has closed the connection (reads EOF or reset).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}
