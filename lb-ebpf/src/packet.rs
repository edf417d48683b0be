//! Packet access for the tc programs: parsing (Ethernet, IPv4 / IPv6 with extension headers, TCP / UDP / SCTP
//! ports) and rewriting addresses and ports with incremental checksum updates (katran `pckt_parsing.h` and
//! `csum_helpers.h`, cilium `bpf/lib/csum.h`).
//!
//! Everything goes through `bpf_skb_load_bytes` / `bpf_skb_store_bytes` rather than direct packet access: offsets
//! here are variable (IPv4 options, IPv6 extension headers), and the helpers check bounds at run time, so the
//! verifier only needs constant lengths, and a truncated packet is an error return, never an out-of-bounds read.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use lb_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP, v4_mapped};

use crate::sctp::sctp_crc_update;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv6 extension headers walked before giving up (RFC 8200 order has at most hop-by-hop, destination options,
/// routing, fragment, AH, destination options before the upper layer).
const MAX_EXT_HEADERS: usize = 6;

/// A parsed packet: where its headers are and the flow they name. Part of `tc::Scratch`, a map value.
#[repr(C)]
pub struct Packet {
    pub v4: bool,
    /// Offset of the L3 and L4 headers.
    pub l3: usize,
    pub l4: usize,
    pub proto: u8,
    /// Addresses in lb's 16-byte form (IPv4-mapped for IPv4).
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports, host byte order.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// The IPv4 header length (IHL * 4); 40 for IPv6.
    pub l3_len: usize,
    /// `FRAG_NONE`, `FRAG_FIRST` (offset 0, more fragments follow) or `FRAG_LATER` (offset > 0: no L4 header,
    /// `sport`/`dport` are 0 and `l4` is where the fragment's data starts).
    pub frag: u8,
    /// The fragment Identification (IPv4: 16 bits, IPv6: 32 bits), host order; 0 when not a fragment.
    pub frag_id: u32,
    /// Where the IP packet ends by its own length field (Ethernet padding may follow): the SCTP packet's length
    /// is `ip_end - l4`.
    pub ip_end: usize,
}

/// `Packet::frag`.
pub const FRAG_NONE: u8 = 0;
pub const FRAG_FIRST: u8 = 1;
pub const FRAG_LATER: u8 = 2;

/// Why parsing stopped.
pub enum NotParsed {
    /// Not IPv4/IPv6 with TCP/UDP/SCTP: not the load balancer's business.
    Other,
    /// A later fragment: no L4 header, so no ports to match. The packet's addresses, protocol and
    /// identification are filled in (`Packet::frag` is `FRAG_LATER`) for the `LB_FRAGMENTS` lookup.
    Fragment,
    /// Truncated or inconsistent headers.
    Malformed,
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, NotParsed> {
    ctx.load::<T>(off).map_err(|_| NotParsed::Malformed)
}

/// Parses the packet at the start of `ctx` (tc sees the Ethernet header) into `p`. Not inlined, for the stack (see
/// [`rewrite`]), and therefore with plain types in its signature: a Rust enum in a BPF function's signature becomes
/// a BTF union with a member at a non-zero offset, which kernel 6.18 rejects ("Invalid member bits_offset").
#[inline(never)]
pub fn parse_into(ctx: &TcContext, p: &mut Packet) -> u32 {
    match parse(ctx, p) {
        Ok(()) => PARSED,
        Err(NotParsed::Other) => NOT_PARSED_OTHER,
        Err(NotParsed::Fragment) => NOT_PARSED_FRAGMENT,
        Err(NotParsed::Malformed) => NOT_PARSED_MALFORMED,
    }
}

/// [`parse_into`]'s results.
pub const PARSED: u32 = 0;
pub const NOT_PARSED_OTHER: u32 = 1;
pub const NOT_PARSED_FRAGMENT: u32 = 2;
pub const NOT_PARSED_MALFORMED: u32 = 3;

#[inline(always)]
fn parse(ctx: &TcContext, p: &mut Packet) -> Result<(), NotParsed> {
    let eth_proto = u16::from_be(ctx.load::<u16>(12).map_err(|_| NotParsed::Other)?);
    let l3 = ETH_HLEN;
    p.v4 = true;
    p.l3 = l3;
    p.tcp_flags = 0;
    p.frag = FRAG_NONE;
    p.frag_id = 0;
    match eth_proto {
        ETH_P_IP => {
            let vihl: u8 = load(ctx, l3)?;
            if vihl >> 4 != 4 {
                return Err(NotParsed::Malformed);
            }
            let ihl = usize::from(vihl & 0x0f) * 4;
            if ihl < 20 {
                return Err(NotParsed::Malformed);
            }
            p.ip_end = l3 + usize::from(u16::from_be(load::<u16>(ctx, l3 + 2)?));
            // Identification, then flags and fragment offset.
            let id_frag: [u8; 4] = load(ctx, l3 + 4)?;
            let frag = u16::from_be_bytes([id_frag[2], id_frag[3]]);
            p.proto = load(ctx, l3 + 9)?;
            if !is_l4(p.proto) {
                return Err(NotParsed::Other);
            }
            let src: [u8; 4] = load(ctx, l3 + 12)?;
            let dst: [u8; 4] = load(ctx, l3 + 16)?;
            p.saddr = v4_mapped(src);
            p.daddr = v4_mapped(dst);
            p.l3_len = ihl;
            p.l4 = l3 + ihl;
            // A non-zero fragment offset: a later fragment, followed through `LB_FRAGMENTS`. The first fragment
            // (offset 0, MF set) carries the ports and is handled like any packet.
            if frag & 0x3fff != 0 {
                p.frag_id = u32::from(u16::from_be_bytes([id_frag[0], id_frag[1]]));
                if frag & 0x1fff != 0 {
                    p.frag = FRAG_LATER;
                    p.sport = 0;
                    p.dport = 0;
                    return Err(NotParsed::Fragment);
                }
                p.frag = FRAG_FIRST;
            }
        }
        ETH_P_IPV6 => {
            let v: u8 = load(ctx, l3)?;
            if v >> 4 != 6 {
                return Err(NotParsed::Malformed);
            }
            p.v4 = false;
            p.ip_end = l3 + 40 + usize::from(u16::from_be(load::<u16>(ctx, l3 + 4)?));
            p.saddr = load(ctx, l3 + 8)?;
            p.daddr = load(ctx, l3 + 24)?;
            p.l3_len = 40;
            let mut next: u8 = load(ctx, l3 + 6)?;
            let mut off = l3 + 40;
            let mut i = 0;
            while i < MAX_EXT_HEADERS {
                match next {
                    // Hop-by-hop, routing, destination options: length in 8-octet units, not counting the first.
                    0 | 43 | 60 => {
                        let hdr: [u8; 2] = load(ctx, off)?;
                        next = hdr[0];
                        off += (usize::from(hdr[1]) + 1) * 8;
                    }
                    // Fragment header: next header, reserved, offset (13 bits) and M flag, identification (32
                    // bits). A non-zero offset means a later fragment; what follows the header is then data, not
                    // the upper-layer header. An atomic fragment (offset 0, M clear) is a whole datagram.
                    44 => {
                        let hdr: [u8; 8] = load(ctx, off)?;
                        let off_m = u16::from_be_bytes([hdr[2], hdr[3]]);
                        next = hdr[0];
                        off += 8;
                        if off_m & 0xfff9 != 0 {
                            p.frag_id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                            p.frag = FRAG_FIRST;
                        }
                        if off_m & 0xfff8 != 0 {
                            if !is_l4(next) {
                                return Err(NotParsed::Other);
                            }
                            p.proto = next;
                            p.l4 = off;
                            p.frag = FRAG_LATER;
                            p.sport = 0;
                            p.dport = 0;
                            return Err(NotParsed::Fragment);
                        }
                    }
                    // Authentication header: length in 4-octet units, minus 2.
                    51 => {
                        let hdr: [u8; 2] = load(ctx, off)?;
                        next = hdr[0];
                        off += (usize::from(hdr[1]) + 2) * 4;
                    }
                    _ => break,
                }
                i += 1;
            }
            if !is_l4(next) {
                return Err(NotParsed::Other);
            }
            p.proto = next;
            p.l4 = off;
        }
        _ => return Err(NotParsed::Other),
    }
    let ports: [u8; 4] = load(ctx, p.l4)?;
    p.sport = u16::from_be_bytes([ports[0], ports[1]]);
    p.dport = u16::from_be_bytes([ports[2], ports[3]]);
    if p.proto == PROTO_TCP {
        p.tcp_flags = load(ctx, p.l4 + 13)?;
    } else if p.proto == PROTO_UDP {
        // The UDP header is 8 bytes; make sure all of it is there before anything rewrites its checksum.
        let _: u16 = load(ctx, p.l4 + 6)?;
    } else {
        // SCTP common header: ports, verification tag, checksum.
        let _: u32 = load(ctx, p.l4 + 8)?;
    }
    Ok(())
}

#[inline(always)]
fn is_l4(proto: u8) -> bool {
    proto == PROTO_TCP || proto == PROTO_UDP || proto == PROTO_SCTP
}

/// Rewriting failed (a helper refused: the packet is not writable or too short). The caller drops the packet: it
/// may be half rewritten.
pub struct RewriteError;

/// The offset of the L4 checksum, or `None` for SCTP (CRC32c, not an Internet checksum; see [`rewrite`]).
#[inline(always)]
fn l4_csum_off(p: &Packet) -> Option<usize> {
    match p.proto {
        PROTO_TCP => Some(p.l4 + 16),
        PROTO_UDP => Some(p.l4 + 6),
        _ => None,
    }
}

/// The addresses and ports a packet is rewritten to (lb's forms: 16-byte addresses, host-order ports). Part of
/// `tc::Scratch`, a map value.
#[repr(C)]
pub struct Nat {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// Rewrites the source and destination to the given ones, updating the IPv4 header checksum and the TCP/UDP
/// checksum (pseudo-header included) incrementally. An IPv4 UDP datagram without a checksum (0) keeps none.
///
/// SCTP's CRC32c covers the SCTP packet only, not an IP pseudo-header, so address rewrites leave it valid; a port
/// rewrite changes it by an amount that depends only on the old and new ports and the packet's length
/// ([`lb_common::crc32c_port_delta`], see `sctp::sctp_crc_update`). A fragment's SCTP ports cannot change: the length
/// of the datagram, which the update needs, is not known from its first fragment (the caller drops those before).
///
/// Not inlined: a BPF-to-BPF call gets its own stack frame, and with every caller inlining it the programs
/// exceeded the 512-byte stack (LLVM 22: "Looks like the BPF stack limit is exceeded").
/// Returns 0 on success, -1 when a helper failed (see [`parse_into`] for why not a `Result`).
#[inline(never)]
pub fn rewrite(ctx: &TcContext, p: &mut Packet, nat: &Nat) -> i32 {
    match rewrite_inner(ctx, p, nat) {
        Ok(()) => 0,
        Err(RewriteError) => -1,
    }
}

#[inline(always)]
fn rewrite_inner(ctx: &TcContext, p: &mut Packet, nat: &Nat) -> Result<(), RewriteError> {
    let (saddr, sport, daddr, dport) = (&nat.saddr, nat.sport, &nat.daddr, nat.dport);
    // A later fragment has no L4 header: the datagram's L4 checksum (pseudo-header included) is in the first
    // fragment, which was updated when it was translated. Only addresses change here (its ports are 0 on both
    // sides).
    let csum_off = if p.frag == FRAG_LATER {
        None
    } else {
        l4_csum_off(p)
    };
    let mut l4_flags = u64::from(BPF_F_PSEUDO_HDR);
    let mut l4_enabled = csum_off.is_some();
    if p.proto == PROTO_UDP && l4_enabled {
        // A zero checksum means "none" for IPv4 UDP, and an update must not turn a computed 0 into "none".
        l4_flags |= u64::from(BPF_F_MARK_MANGLED_0);
        if p.v4 {
            let c: u16 = ctx.load(p.l4 + 6).map_err(|_| RewriteError)?;
            l4_enabled = c != 0;
        }
    }
    let csum_off = csum_off.unwrap_or(0);
    let (s_off, d_off, alen) = if p.v4 {
        (p.l3 + 12, p.l3 + 16, 4)
    } else {
        (p.l3 + 8, p.l3 + 24, 16)
    };
    if *saddr != p.saddr {
        rewrite_addr(
            ctx, p, s_off, alen, &p.saddr, saddr, csum_off, l4_enabled, l4_flags,
        )?;
        p.saddr = *saddr;
    }
    if *daddr != p.daddr {
        rewrite_addr(
            ctx, p, d_off, alen, &p.daddr, daddr, csum_off, l4_enabled, l4_flags,
        )?;
        p.daddr = *daddr;
    }
    if sport == p.sport && dport == p.dport {
        return Ok(());
    }
    let sctp = p.proto == PROTO_SCTP;
    if sctp && p.frag != FRAG_NONE {
        return Err(RewriteError);
    }
    // SCTP has no Internet checksum field to compensate the new bytes in `skb->csum` (CHECKSUM_COMPLETE), so its
    // stores ask the helper to update it.
    let store_flags = if sctp {
        u64::from(BPF_F_RECOMPUTE_CSUM)
    } else {
        0
    };
    let (old_sport, old_dport) = (p.sport, p.dport);
    if sport != p.sport {
        rewrite_port(
            ctx,
            p.l4,
            p.sport,
            sport,
            csum_off,
            l4_enabled,
            l4_flags,
            store_flags,
        )?;
        p.sport = sport;
    }
    if dport != p.dport {
        rewrite_port(
            ctx,
            p.l4 + 2,
            p.dport,
            dport,
            csum_off,
            l4_enabled,
            l4_flags,
            store_flags,
        )?;
        p.dport = dport;
    }
    if sctp {
        let old = (u32::from(old_sport) << 16) | u32::from(old_dport);
        let new = (u32::from(sport) << 16) | u32::from(dport);
        if sctp_crc_update(ctx, p.l4, p.ip_end, old, new) != 0 {
            return Err(RewriteError);
        }
    }
    Ok(())
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite_addr(
    ctx: &TcContext,
    p: &Packet,
    off: usize,
    alen: usize,
    old: &[u8; 16],
    new: &[u8; 16],
    csum_off: usize,
    l4_enabled: bool,
    l4_flags: u64,
) -> Result<(), RewriteError> {
    // The checksum difference of the whole 16-byte forms: for IPv4-mapped addresses the first 12 bytes are equal
    // and cancel out, so the same call serves both families.
    let mut from = *old;
    let mut to = *new;
    // SAFETY: both buffers are 16-byte stack arrays, a multiple of 4 as the helper requires; it only reads them.
    let diff =
        unsafe { bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0) };
    if diff < 0 {
        return Err(RewriteError);
    }
    if p.v4 {
        // l3/l4_csum_replace with size 0 take `to` as a precomputed checksum difference.
        ctx.l3_csum_replace(p.l3 + 10, 0, diff as u64, 0)
            .map_err(|_| RewriteError)?;
    }
    if l4_enabled {
        ctx.l4_csum_replace(csum_off, 0, diff as u64, l4_flags)
            .map_err(|_| RewriteError)?;
    }
    if alen == 4 {
        let v4: [u8; 4] = [new[12], new[13], new[14], new[15]];
        ctx.store(off, &v4, 0).map_err(|_| RewriteError)
    } else {
        ctx.store(off, new, 0).map_err(|_| RewriteError)
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite_port(
    ctx: &TcContext,
    off: usize,
    old: u16,
    new: u16,
    csum_off: usize,
    l4_enabled: bool,
    l4_flags: u64,
    store_flags: u64,
) -> Result<(), RewriteError> {
    if l4_enabled {
        // Ports are not in the pseudo-header: plain 2-byte replace.
        let flags = (l4_flags & !u64::from(BPF_F_PSEUDO_HDR)) | 2;
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old.to_be()),
            u64::from(new.to_be()),
            flags,
        )
        .map_err(|_| RewriteError)?;
    }
    ctx.store(off, &new.to_be(), store_flags)
        .map_err(|_| RewriteError)
}

/// Folds a 32-bit one's-complement sum from `bpf_csum_diff` to the 16-bit checksum field value. The helper adds
/// 16-bit words as the CPU reads them (little-endian here), so the result goes into the packet in native byte order
/// (`to_ne_bytes`), never `to_be_bytes`.
#[inline(always)]
pub fn fold(sum: u64) -> u16 {
    let mut s = sum & 0xffff_ffff;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The one's-complement sum of the first `N` bytes of `buf` (N a multiple of 4), seeded with `seed`.
#[inline(always)]
pub fn csum<const N: usize>(buf: &mut [u8], seed: u32) -> Result<u32, RewriteError> {
    if buf.len() < N {
        return Err(RewriteError);
    }
    // SAFETY: `buf` holds at least N bytes (checked above); the helper only reads `to` (N bytes); `from` is null
    // with size 0.
    let r = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.as_mut_ptr().cast(),
            N as u32,
            seed,
        )
    };
    if r < 0 {
        Err(RewriteError)
    } else {
        Ok(r as u32)
    }
}
