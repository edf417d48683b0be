//! Parsing by direct packet access, shared by the tc programs and `lb_xdp` (katran `pckt_parsing.h`): Ethernet,
//! IPv4 (options skipped) or IPv6 (extension headers walked), and the TCP / UDP / SCTP header, into a [`Packet`].
//!
//! **Strict:** every length field is checked against the others and against the packet before anything is
//! believed. A packet whose IPv4 total length is shorter than its header or longer than the packet, whose IPv6
//! payload length is 0 or longer than the packet, whose extension headers run past the payload, whose UDP length
//! is under 8 or beyond the datagram, whose TCP data offset is under 5 or beyond the segment, or whose L4 header is
//! not all there, is [`MALFORMED`]: the callers pass it untouched, never forward it and never create state for it.
//! Lengths always come from the IP header, never from the frame, which may carry Ethernet padding.
//!
//! **Direct access:** reads go through `data`/`data_end` pointers, each checked against `data_end` right before
//! use (the verifier's condition). At tc the headers may lie past the linear area of a non-linear skb: the parser
//! then answers [`NEEDS_PULL`] with the length it needs in `Packet::pull_len`, the caller pulls that much
//! (`bpf_skb_pull_data`) and parses again. Everything here is inlined into the program's entry point: as an
//! argument of a BPF-to-BPF call, LLVM passes the context's 32-bit `data`/`data_end` loads and zero-extends them
//! in the callee with shifts, which kernel 6.18 refuses ("pointer arithmetic on pkt_end prohibited").

use core::mem::size_of;

use lb_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP, v4_mapped};

pub const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv6 extension headers walked before giving up (RFC 8200 order has at most hop-by-hop, destination options,
/// routing, fragment, AH, destination options before the upper layer).
const MAX_EXT_HEADERS: usize = 6;
/// Headers (Ethernet, IP, extension headers) that end further into the packet than this are not parsed (the
/// packet is [`OTHER`]): it bounds every offset for the verifier.
pub const MAX_HEADERS: u32 = 1024;

/// [`parse`]'s results.
pub const PARSED: u32 = 0;
/// Not IPv4/IPv6 with TCP/UDP/SCTP: not the load balancer's business.
pub const OTHER: u32 = 1;
/// A later fragment: no L4 header, so no ports to match. Addresses, protocol and identification are filled in
/// (`Packet::frag` is `FRAG_LATER`) for the `LB_FRAGMENTS` lookup.
pub const FRAGMENT: u32 = 2;
/// Truncated or inconsistent headers.
pub const MALFORMED: u32 = 3;
/// The headers are in the packet but not all in the linear area: pull `Packet::pull_len` bytes and parse again
/// (tc only; an XDP frame is always linear).
pub const NEEDS_PULL: u32 = 4;

/// `Packet::frag`.
pub const FRAG_NONE: u8 = 0;
/// Offset 0 with more fragments: carries the L4 header, handled by its ports.
pub const FRAG_FIRST: u8 = 1;
/// Offset > 0: no L4 header; `sport`/`dport` are 0 and `l4` is where the fragment's data starts.
pub const FRAG_LATER: u8 = 2;

/// A parsed packet: where its headers are and the flow they name. Part of the per-CPU scratch value (a map value:
/// plain integers, no `bool`).
#[repr(C)]
pub struct Packet {
    /// Addresses in lb's 16-byte form (IPv4-mapped for IPv4).
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports, host byte order (0 for a later fragment).
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 1 for IPv4, 0 for IPv6.
    pub v4: u8,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// `FRAG_NONE`, `FRAG_FIRST` or `FRAG_LATER`.
    pub frag: u8,
    /// Offset of the L3 header (the Ethernet header's length) and of the L4 header (or a later fragment's data).
    pub l3: u32,
    pub l4: u32,
    /// The IPv4 header length (IHL * 4); 40 for IPv6 (extension headers count towards `l4`, not here).
    pub l3_len: u32,
    /// The L4 header's length: TCP data offset * 4, 8 for UDP, 12 for SCTP.
    pub l4_len: u32,
    /// Where the IP packet ends by its own length fields (Ethernet padding may follow).
    pub ip_end: u32,
    /// The fragment Identification (IPv4: 16 bits, IPv6: 32 bits), host order; 0 when not a fragment.
    pub frag_id: u32,
    /// With [`NEEDS_PULL`]: how many bytes must be linear.
    pub pull_len: u32,
}

impl Packet {
    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        self.v4 != 0
    }
}

/// A program's packet, as the parser reads it.
pub trait Frame {
    /// The start and end of the directly readable (linear) bytes.
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length (at tc `skb->len`, which may exceed the linear bytes).
    fn packet_len(&self) -> u32;
}

impl Frame for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        aya_ebpf::programs::TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        aya_ebpf::programs::TcContext::data_end(self)
    }
    #[inline(always)]
    fn packet_len(&self) -> u32 {
        self.len()
    }
}

impl Frame for aya_ebpf::programs::XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        aya_ebpf::programs::XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        aya_ebpf::programs::XdpContext::data_end(self)
    }
    #[inline(always)]
    fn packet_len(&self) -> u32 {
        (aya_ebpf::programs::XdpContext::data_end(self)
            - aya_ebpf::programs::XdpContext::data(self)) as u32
    }
}

/// A pointer to a `T` at `off` of the frame, when all of it is in the linear bytes.
#[inline(always)]
pub fn ptr_at<T, F: Frame>(f: &F, off: u32) -> Option<*mut T> {
    let start = f.data();
    let end = f.data_end();
    let at = start + off as usize;
    if at + size_of::<T>() > end {
        return None;
    }
    Some(at as *mut T)
}

/// Reads a `T` at `off` (unaligned).
#[inline(always)]
pub fn read<T: Copy, F: Frame>(f: &F, off: u32) -> Option<T> {
    // SAFETY: `ptr_at` checked that the bytes are inside the linear frame; unaligned read.
    ptr_at::<T, F>(f, off).map(|p| unsafe { p.read_unaligned() })
}

/// Why a read failed: the bytes are past the packet's end (malformed) or only past the linear area (pull).
#[inline(always)]
fn short<F: Frame>(f: &F, p: &mut Packet, need: u32) -> u32 {
    if need <= f.packet_len() {
        p.pull_len = need;
        NEEDS_PULL
    } else {
        MALFORMED
    }
}

#[inline(always)]
fn is_l4(proto: u8) -> bool {
    proto == PROTO_TCP || proto == PROTO_UDP || proto == PROTO_SCTP
}

/// Parses the frame into `p`. Returns [`PARSED`], [`OTHER`], [`FRAGMENT`], [`MALFORMED`] or [`NEEDS_PULL`].
#[inline(always)]
pub fn parse<F: Frame>(f: &F, p: &mut Packet) -> u32 {
    let Some(eth_proto) = read::<u16, F>(f, 12) else {
        return OTHER;
    };
    let l3 = ETH_HLEN;
    p.l3 = l3;
    p.tcp_flags = 0;
    p.frag = FRAG_NONE;
    p.frag_id = 0;
    p.pull_len = 0;
    p.sport = 0;
    p.dport = 0;
    let len = f.packet_len();
    match u16::from_be(eth_proto) {
        ETH_P_IP => {
            let Some(ip) = ptr_at::<[u8; 20], F>(f, l3) else {
                return short(f, p, l3 + 20);
            };
            let ip = ip.cast::<u8>();
            // SAFETY: `ptr_at` checked that the 20-byte fixed header is in the linear frame.
            let (vihl, total, frag, proto, src, dst) = unsafe {
                (
                    *ip,
                    u32::from(u16::from_be(ip.add(2).cast::<u16>().read_unaligned())),
                    u16::from_be(ip.add(6).cast::<u16>().read_unaligned()),
                    *ip.add(9),
                    ip.add(12).cast::<[u8; 4]>().read_unaligned(),
                    ip.add(16).cast::<[u8; 4]>().read_unaligned(),
                )
            };
            if vihl >> 4 != 4 {
                return MALFORMED;
            }
            let ihl = u32::from(vihl & 0x0f) * 4;
            if ihl < 20 || total < ihl || l3 + total > len {
                return MALFORMED;
            }
            p.v4 = 1;
            p.l3_len = ihl;
            p.l4 = l3 + ihl;
            p.ip_end = l3 + total;
            p.proto = proto;
            p.saddr = v4_mapped(src);
            p.daddr = v4_mapped(dst);
            if !is_l4(proto) {
                return OTHER;
            }
            // A non-zero fragment offset: a later fragment, followed through `LB_FRAGMENTS`. The first fragment
            // (offset 0, MF set) carries the ports and is handled like any packet.
            if frag & 0x3fff != 0 {
                // SAFETY: as above (the identification is in the fixed header).
                p.frag_id = u32::from(u16::from_be(unsafe {
                    ip.add(4).cast::<u16>().read_unaligned()
                }));
                if frag & 0x1fff != 0 {
                    p.frag = FRAG_LATER;
                    return FRAGMENT;
                }
                p.frag = FRAG_FIRST;
            }
        }
        ETH_P_IPV6 => {
            let Some(ip) = ptr_at::<[u8; 40], F>(f, l3) else {
                return short(f, p, l3 + 40);
            };
            let ip = ip.cast::<u8>();
            // SAFETY: `ptr_at` checked that the 40-byte fixed header is in the linear frame.
            let (v, payload, next, src, dst) = unsafe {
                (
                    *ip,
                    u32::from(u16::from_be(ip.add(4).cast::<u16>().read_unaligned())),
                    *ip.add(6),
                    ip.add(8).cast::<[u8; 16]>().read_unaligned(),
                    ip.add(24).cast::<[u8; 16]>().read_unaligned(),
                )
            };
            if v >> 4 != 6 {
                return MALFORMED;
            }
            // A payload length of 0 would be a jumbogram (RFC 2675), which lb does not parse.
            if payload == 0 || l3 + 40 + payload > len {
                return MALFORMED;
            }
            p.v4 = 0;
            p.l3_len = 40;
            p.ip_end = l3 + 40 + payload;
            p.saddr = src;
            p.daddr = dst;
            let mut next = next;
            let mut off = l3 + 40;
            let mut i = 0;
            while i < MAX_EXT_HEADERS {
                if !matches!(next, 0 | 43 | 60 | 44 | 51) {
                    break;
                }
                // Every extension header must fit in the payload, and (for the verifier) start within
                // MAX_HEADERS.
                if off + 8 > p.ip_end {
                    return MALFORMED;
                }
                if off > MAX_HEADERS {
                    return OTHER;
                }
                match next {
                    // Fragment header: next header, reserved, offset (13 bits) and M flag, identification (32
                    // bits). A non-zero offset means a later fragment; what follows the header is then data, not
                    // the upper-layer header. An atomic fragment (offset 0, M clear) is a whole datagram.
                    44 => {
                        let Some(hdr) = read::<[u8; 8], F>(f, off) else {
                            return short(f, p, off + 8);
                        };
                        let off_m = u16::from_be_bytes([hdr[2], hdr[3]]);
                        next = hdr[0];
                        off += 8;
                        if off_m & 0xfff9 != 0 {
                            p.frag_id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                            p.frag = FRAG_FIRST;
                        }
                        if off_m & 0xfff8 != 0 {
                            if !is_l4(next) {
                                return OTHER;
                            }
                            p.proto = next;
                            p.l4 = off;
                            p.frag = FRAG_LATER;
                            return FRAGMENT;
                        }
                    }
                    // Authentication header: length in 4-octet units, minus 2.
                    51 => {
                        let Some(hdr) = read::<[u8; 2], F>(f, off) else {
                            return short(f, p, off + 2);
                        };
                        next = hdr[0];
                        off += (u32::from(hdr[1]) + 2) * 4;
                    }
                    // Hop-by-hop, routing, destination options: length in 8-octet units, not counting the first.
                    _ => {
                        let Some(hdr) = read::<[u8; 2], F>(f, off) else {
                            return short(f, p, off + 2);
                        };
                        next = hdr[0];
                        off += (u32::from(hdr[1]) + 1) * 8;
                    }
                }
                i += 1;
            }
            if off > p.ip_end {
                return MALFORMED;
            }
            if off > MAX_HEADERS || !is_l4(next) {
                return OTHER;
            }
            p.proto = next;
            p.l4 = off;
        }
        _ => return OTHER,
    }
    l4_header(f, p)
}

/// The L4 header: all of its fixed part inside the IP packet and the linear bytes, its own length field
/// consistent.
#[inline(always)]
fn l4_header<F: Frame>(f: &F, p: &mut Packet) -> u32 {
    let l4 = p.l4;
    // For the verifier: every offset added to a packet pointer must be bounded.
    if l4 > MAX_HEADERS {
        return OTHER;
    }
    let fixed = if p.proto == PROTO_TCP {
        20
    } else if p.proto == PROTO_UDP {
        8
    } else {
        12
    };
    if l4 + fixed > p.ip_end {
        return MALFORMED;
    }
    let room = p.ip_end - l4;
    // One read per protocol, each right after its own bounds check: with one pointer checked for a size chosen
    // by protocol, LLVM 22 merged the checks into one with a selected size, which kernel 6.18's verifier cannot
    // follow ("invalid access to packet, off=66 size=1").
    if p.proto == PROTO_TCP {
        let Some(h) = read::<[u8; 20], F>(f, l4) else {
            return short(f, p, l4 + 20);
        };
        let hlen = u32::from(h[12] >> 4) * 4;
        if hlen < 20 || hlen > room {
            return MALFORMED;
        }
        p.sport = u16::from_be_bytes([h[0], h[1]]);
        p.dport = u16::from_be_bytes([h[2], h[3]]);
        p.l4_len = hlen;
        p.tcp_flags = h[13];
    } else if p.proto == PROTO_UDP {
        let Some(h) = read::<[u8; 8], F>(f, l4) else {
            return short(f, p, l4 + 8);
        };
        let ulen = u32::from(u16::from_be_bytes([h[4], h[5]]));
        // A first fragment's UDP length covers the whole datagram, which ends in a later fragment.
        if ulen < 8 || (p.frag == FRAG_NONE && ulen > room) {
            return MALFORMED;
        }
        p.sport = u16::from_be_bytes([h[0], h[1]]);
        p.dport = u16::from_be_bytes([h[2], h[3]]);
        p.l4_len = 8;
    } else {
        let Some(h) = read::<[u8; 12], F>(f, l4) else {
            return short(f, p, l4 + 12);
        };
        p.sport = u16::from_be_bytes([h[0], h[1]]);
        p.dport = u16::from_be_bytes([h[2], h[3]]);
        p.l4_len = 12;
    }
    PARSED
}
