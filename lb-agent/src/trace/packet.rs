//! Crafted test packets (Ethernet + IPv4/IPv6 + TCP/UDP/SCTP) with valid checksums, for `lb-agent trace` and the
//! BPF_PROG_TEST_RUN fixtures, and a parser for what the programs hand back.

use std::net::{IpAddr, SocketAddr};

use crate::state::Protocol;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_RST: u8 = 0x04;

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// The one's-complement sum of `data` (odd length padded with zero), not folded.
pub fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [b] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(*b) << 8);
    }
    acc
}

/// Folds and complements a sum into a checksum field value.
pub fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum(&s.octets(), acc);
            acc = sum(&d.octets(), acc);
        }
        (s, d) => {
            acc = sum(&addr16(s), acc);
            acc = sum(&addr16(d), acc);
        }
    }
    acc.wrapping_add(u32::from(proto)).wrapping_add(len as u32)
}

/// CRC32c (Castagnoli), as SCTP uses it (RFC 4960 appendix B), bitwise.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Builds an Ethernet frame from `src` to `dst` (same family) carrying one segment / datagram / SCTP packet with
/// `payload`. TCP gets `tcp_flags` and sequence number 1000.
pub fn build(
    proto: Protocol,
    src: SocketAddr,
    dst: SocketAddr,
    tcp_flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    match proto {
        Protocol::Tcp => {
            l4.extend_from_slice(&1000u32.to_be_bytes());
            l4.extend_from_slice(&0u32.to_be_bytes());
            l4.extend_from_slice(&[0x50, tcp_flags, 0xff, 0xff, 0, 0, 0, 0]);
        }
        Protocol::Udp => {
            l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        Protocol::Sctp => {
            // Verification tag, checksum (filled below).
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
        }
    }
    l4.extend_from_slice(payload);
    let pnum = proto.number();
    match proto {
        Protocol::Sctp => {
            let c = crc32c(&l4);
            l4[8..12].copy_from_slice(&c.to_le_bytes());
        }
        _ => {
            let off = if proto == Protocol::Tcp { 16 } else { 6 };
            let c = fold(sum(&l4, pseudo_sum(src.ip(), dst.ip(), pnum, l4.len())));
            let c = if c == 0 && proto == Protocol::Udp {
                0xffff
            } else {
                c
            };
            l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    let mut frame = Vec::new();
    frame.extend_from_slice(&DST_MAC);
    frame.extend_from_slice(&SRC_MAC);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 1, 0x40, 0, 64, pnum, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = fold(sum(&ip, 0));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        (s, d) => {
            frame.extend_from_slice(&0x86ddu16.to_be_bytes());
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            frame.extend_from_slice(&[pnum, 64]);
            frame.extend_from_slice(&addr16(s));
            frame.extend_from_slice(&addr16(d));
        }
    }
    frame.extend_from_slice(&l4);
    frame
}

/// What a frame carries, as far as the tests look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub proto: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// TCP flags, or the ICMP/ICMPv6 (type, code) as `type << 8 | code`.
    pub flags: u16,
    /// Whether the IPv4 header checksum and the L4 checksum (TCP, UDP, ICMP, ICMPv6; SCTP CRC32c) verify.
    pub checksums_ok: bool,
}

/// Parses a frame built by [`build`] or rewritten by the programs; `None` if it is not one.
pub fn parse(frame: &[u8]) -> Option<Parsed> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let (src, dst, proto, l4, ip_ok) = match ethertype {
        0x0800 => {
            let ip = frame.get(14..34)?;
            let ihl = usize::from(ip[0] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let hdr = frame.get(14..14 + ihl)?;
            let ip_ok = fold(sum(hdr, 0)) == 0;
            let s = IpAddr::from([ip[12], ip[13], ip[14], ip[15]]);
            let d = IpAddr::from([ip[16], ip[17], ip[18], ip[19]]);
            (s, d, ip[9], frame.get(14 + ihl..14 + total)?, ip_ok)
        }
        0x86dd => {
            let ip = frame.get(14..54)?;
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let s: [u8; 16] = ip[8..24].try_into().ok()?;
            let d: [u8; 16] = ip[24..40].try_into().ok()?;
            (
                IpAddr::from(s),
                IpAddr::from(d),
                ip[6],
                frame.get(54..54 + len)?,
                true,
            )
        }
        _ => return None,
    };
    let (sport, dport, flags, l4_ok) = match proto {
        6 | 17 => {
            let ok = if proto == 17 && src.is_ipv4() && l4[6] == 0 && l4[7] == 0 {
                true
            } else {
                fold(sum(l4, pseudo_sum(src, dst, proto, l4.len()))) == 0
            };
            let flags = if proto == 6 {
                u16::from(*l4.get(13)?)
            } else {
                0
            };
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
                flags,
                ok,
            )
        }
        132 => {
            let mut copy = l4.to_vec();
            let want = u32::from_le_bytes(copy.get(8..12)?.try_into().ok()?);
            copy[8..12].fill(0);
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
                0,
                crc32c(&copy) == want,
            )
        }
        1 => (
            0,
            0,
            u16::from_be_bytes([l4[0], l4[1]]),
            fold(sum(l4, 0)) == 0,
        ),
        58 => (
            0,
            0,
            u16::from_be_bytes([l4[0], l4[1]]),
            fold(sum(l4, pseudo_sum(src, dst, 58, l4.len()))) == 0,
        ),
        _ => return None,
    };
    Some(Parsed {
        proto,
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
        flags,
        checksums_ok: ip_ok && l4_ok,
    })
}

/// The 16 bytes of an IPv6 address (IPv4 as mapped; only used for IPv6 frames).
fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}
