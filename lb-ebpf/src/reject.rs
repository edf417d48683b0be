//! Rejecting a packet (docs/semantics.md rule 8, and rule 12 for TCP): the packet is turned, in place, into the answer
//! the client's stack understands, and sent back out of the interface it came in on. TCP gets a RST (RFC 9293
//! §3.10.7.1: seq from the segment's ACK, or 0 with ACK = seq + length); UDP and SCTP get ICMP / ICMPv6 destination
//! port unreachable quoting the original IP header and 8 bytes of L4 (RFC 792, RFC 4443 §3.1).
//!
//! The IP header is rebuilt without options (IPv4) or extension headers (IPv6); checksums are computed from
//! scratch with `bpf_csum_diff` over [`RejectBufs`], which live in the per-CPU scratch map rather than on the stack
//! (kernel 6.18 counts every frame of the call chain against the 512-byte limit; see `tc`). The helper sums
//! native-order (little-endian) words, so the folded checksum is stored with `to_ne_bytes`.

use aya_ebpf::{
    EbpfContext as _,
    bindings::TC_ACT_REDIRECT,
    helpers::{
        bpf_redirect, bpf_skb_adjust_room, bpf_skb_change_tail, bpf_skb_load_bytes,
        bpf_skb_store_bytes,
    },
    programs::TcContext,
};
use lb_common::PROTO_TCP;

use crate::packet::{ETH_HLEN, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::rewrite::{RewriteError, csum, fold};

const BPF_ADJ_ROOM_MAC: u32 = 1;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const TTL: u8 = 64;
/// The Ethernet header's length as the helpers' offsets take it.
const ETH: usize = ETH_HLEN as usize;

/// The answer's headers while they are built (lengths are multiples of 4, as `bpf_csum_diff` requires).
#[repr(C)]
pub struct RejectBufs {
    /// The answer's IP header (IPv4 uses the first 20 bytes).
    ip: [u8; 40],
    /// The pseudo-header (IPv4 uses the first 12 bytes).
    pseudo: [u8; 40],
    /// The answer's L4 part: the TCP header (20 bytes) or the ICMP header and quote (36 / 56 bytes).
    l4: [u8; 56],
    /// The quoted IP header and 8 bytes of L4, as read from the packet.
    quote: [u8; 48],
}

/// Whether the packet may be answered at all. Never a RST for a RST (RFC 9293 3.10.7.1), and never an answer to
/// a source that cannot have sent it or cannot take one (RFC 1122 3.2.2, RFC 4443 2.4 (e)): the unspecified
/// address, loopback, multicast or broadcast (IPv4 224.0.0.0/3), 0.0.0.0/8, and in an IPv6 header `::`, `::1`,
/// `ff00::/8` and an IPv4-mapped address. The caller drops those instead.
#[inline(always)]
pub fn answerable(p: &Packet) -> bool {
    if p.proto == PROTO_TCP && p.tcp_flags & TCP_RST != 0 {
        return false;
    }
    let a = &p.saddr;
    if p.is_v4() {
        return a[12] != 0 && a[12] != 127 && a[12] < 224;
    }
    let head_zero = a[..10] == [0; 10];
    let unspecified_or_loopback = head_zero && a[10..15] == [0; 5] && a[15] <= 1;
    let v4_mapped = head_zero && a[10] == 0xff && a[11] == 0xff;
    !(unspecified_or_loopback || v4_mapped || a[0] == 0xff)
}

/// Turns the packet into the reject answer and redirects it back out of its interface; returns the tc verdict.
/// Not inlined, for the stack (see `packet::rewrite`).
/// Returns the verdict, or a negative number when the packet could not be turned into an answer (plain types in
/// the signature: see `packet::parse_into`).
#[inline(never)]
pub fn reject(ctx: &TcContext, p: &Packet, b: &mut RejectBufs) -> i32 {
    reject_inner(ctx, p, b).unwrap_or(-1)
}

#[inline(always)]
fn reject_inner(ctx: &TcContext, p: &Packet, b: &mut RejectBufs) -> Result<i32, RewriteError> {
    if p.proto == PROTO_TCP {
        tcp_rst(ctx, p, b)?;
    } else if p.is_v4() {
        icmp4_unreach(ctx, p, b)?;
    } else {
        icmp6_unreach(ctx, p, b)?;
    }
    swap_macs(ctx)?;
    // SAFETY: reads the context's own ifindex field; bpf_redirect takes plain integers.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain integers; the redirect happens after the program returns TC_ACT_REDIRECT.
    let rc = unsafe { bpf_redirect(ifindex, 0) };
    if rc == i64::from(TC_ACT_REDIRECT) {
        Ok(TC_ACT_REDIRECT)
    } else {
        Err(RewriteError)
    }
}

#[inline(always)]
fn swap_macs(ctx: &TcContext) -> Result<(), RewriteError> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| RewriteError)?;
    let swapped: [u8; 12] = [
        macs[6], macs[7], macs[8], macs[9], macs[10], macs[11], macs[0], macs[1], macs[2], macs[3],
        macs[4], macs[5],
    ];
    ctx.store(0, &swapped, 0).map_err(|_| RewriteError)
}

#[inline(always)]
fn change_tail(ctx: &TcContext, len: usize) -> Result<(), RewriteError> {
    // SAFETY: the program's own skb context; the helper checks the length.
    let rc = unsafe { bpf_skb_change_tail(ctx.as_ptr().cast(), len as u32, 0) };
    if rc != 0 { Err(RewriteError) } else { Ok(()) }
}

/// The RST answering a TCP segment: addresses and ports swapped, no options, no payload.
#[inline(always)]
fn tcp_rst(ctx: &TcContext, p: &Packet, b: &mut RejectBufs) -> Result<(), RewriteError> {
    let l4 = p.l4 as usize;
    let seq = u32::from_be(ctx.load::<u32>(l4 + 4).map_err(|_| RewriteError)?);
    let ack_seq = u32::from_be(ctx.load::<u32>(l4 + 8).map_err(|_| RewriteError)?);
    // The segment's length comes from the IP header (`ip_end`), never from the frame: Ethernet pads a bare SYN to
    // 60 bytes, and acknowledging the padding (seq + 7) makes the client drop the RST and wait out its connect.
    let payload = p.ip_end.saturating_sub(p.l4 + p.l4_len);
    let (rst_seq, rst_ack, flags) = if p.tcp_flags & TCP_ACK != 0 {
        (ack_seq, 0u32, 0x04u8)
    } else {
        let mut len = payload;
        if p.tcp_flags & TCP_SYN != 0 {
            len += 1;
        }
        if p.tcp_flags & TCP_FIN != 0 {
            len += 1;
        }
        (0, seq.wrapping_add(len), 0x14u8)
    };
    let tcp = &mut b.l4;
    *tcp = [0; 56];
    tcp[0..2].copy_from_slice(&p.dport.to_be_bytes());
    tcp[2..4].copy_from_slice(&p.sport.to_be_bytes());
    tcp[4..8].copy_from_slice(&rst_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&rst_ack.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = flags;
    if p.is_v4() {
        change_tail(ctx, ETH + 40)?;
        ipv4_header(&mut b.ip, p, 40, PROTO_TCP);
        pseudo4(&mut b.pseudo, p, PROTO_TCP, 20);
        let seed = csum::<12>(&mut b.pseudo, 0)?;
        let c = fold(u64::from(csum::<20>(&mut b.l4, seed)?)).to_ne_bytes();
        b.l4[16] = c[0];
        b.l4[17] = c[1];
        let c = fold(u64::from(csum::<20>(&mut b.ip, 0)?)).to_ne_bytes();
        b.ip[10] = c[0];
        b.ip[11] = c[1];
        store::<20>(ctx, ETH, &b.ip)?;
        store::<20>(ctx, ETH + 20, &b.l4)
    } else {
        change_tail(ctx, ETH + 60)?;
        ipv6_header(&mut b.ip, p, 20, PROTO_TCP);
        pseudo6(&mut b.pseudo, p, PROTO_TCP, 20);
        let seed = csum::<40>(&mut b.pseudo, 0)?;
        let c = fold(u64::from(csum::<20>(&mut b.l4, seed)?)).to_ne_bytes();
        b.l4[16] = c[0];
        b.l4[17] = c[1];
        store::<40>(ctx, ETH, &b.ip)?;
        store::<20>(ctx, ETH + 40, &b.l4)
    }
}

/// Reads `N` packet bytes at `off` into the front of `dst`.
#[inline(always)]
fn load_into<const N: usize, const M: usize>(
    ctx: &TcContext,
    off: usize,
    dst: &mut [u8; M],
) -> Result<(), RewriteError> {
    const { assert!(N <= M) };
    // SAFETY: `dst` holds at least N bytes (checked at compile time); the helper checks the packet bounds.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr().cast(),
            off as u32,
            dst.as_mut_ptr().cast(),
            N as u32,
        )
    };
    if rc != 0 { Err(RewriteError) } else { Ok(()) }
}

/// Writes the first `N` bytes of `src` into the packet at `off`.
#[inline(always)]
fn store<const N: usize>(ctx: &TcContext, off: usize, src: &[u8]) -> Result<(), RewriteError> {
    if src.len() < N {
        return Err(RewriteError);
    }
    // SAFETY: `src` holds at least N bytes (checked above); the helper checks the packet bounds.
    let rc = unsafe {
        bpf_skb_store_bytes(
            ctx.as_ptr().cast(),
            off as u32,
            src.as_ptr().cast(),
            N as u32,
            0,
        )
    };
    if rc != 0 { Err(RewriteError) } else { Ok(()) }
}

/// ICMP destination unreachable, code 3 (port unreachable), quoting the original IPv4 header (options dropped,
/// checksum kept as sent) and the first 8 bytes of L4.
#[inline(always)]
fn icmp4_unreach(ctx: &TcContext, p: &Packet, b: &mut RejectBufs) -> Result<(), RewriteError> {
    load_into::<20, 48>(ctx, p.l3 as usize, &mut b.quote)?;
    let mut l4 = [0u8; 8];
    load_into::<8, 8>(ctx, p.l4 as usize, &mut l4)?;
    b.quote[20..28].copy_from_slice(&l4);
    // Options are not quoted: say so in the quoted header (IHL 5), as the receiver parses it.
    b.quote[0] = 0x45;
    // Room for the new IP and ICMP headers in front of the quoted one, then cut the rest.
    // SAFETY: the program's own skb context; the helper checks the mode and length.
    let rc = unsafe { bpf_skb_adjust_room(ctx.as_ptr().cast(), 28, BPF_ADJ_ROOM_MAC, 0) };
    if rc != 0 {
        return Err(RewriteError);
    }
    change_tail(ctx, ETH + 56)?;
    let icmp = &mut b.l4;
    *icmp = [0; 56];
    icmp[0] = 3;
    icmp[1] = 3;
    icmp[8..36].copy_from_slice(&b.quote[..28]);
    let c = fold(u64::from(csum::<36>(&mut b.l4, 0)?)).to_ne_bytes();
    b.l4[2] = c[0];
    b.l4[3] = c[1];
    ipv4_header(&mut b.ip, p, 56, IPPROTO_ICMP);
    let c = fold(u64::from(csum::<20>(&mut b.ip, 0)?)).to_ne_bytes();
    b.ip[10] = c[0];
    b.ip[11] = c[1];
    store::<20>(ctx, ETH, &b.ip)?;
    store::<36>(ctx, ETH + 20, &b.l4)
}

/// ICMPv6 destination unreachable, code 4 (port unreachable), quoting the IPv6 header and 8 bytes of L4.
#[inline(always)]
fn icmp6_unreach(ctx: &TcContext, p: &Packet, b: &mut RejectBufs) -> Result<(), RewriteError> {
    load_into::<40, 48>(ctx, p.l3 as usize, &mut b.quote)?;
    let mut l4 = [0u8; 8];
    load_into::<8, 8>(ctx, p.l4 as usize, &mut l4)?;
    b.quote[40..48].copy_from_slice(&l4);
    // Extension headers are not quoted: the quoted header names the upper layer directly.
    b.quote[6] = p.proto;
    // SAFETY: the program's own skb context; the helper checks the mode and length.
    let rc = unsafe { bpf_skb_adjust_room(ctx.as_ptr().cast(), 48, BPF_ADJ_ROOM_MAC, 0) };
    if rc != 0 {
        return Err(RewriteError);
    }
    change_tail(ctx, ETH + 96)?;
    let icmp = &mut b.l4;
    icmp[..8].copy_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    icmp[8..56].copy_from_slice(&b.quote);
    pseudo6(&mut b.pseudo, p, IPPROTO_ICMPV6, 56);
    let seed = csum::<40>(&mut b.pseudo, 0)?;
    let c = fold(u64::from(csum::<56>(&mut b.l4, seed)?)).to_ne_bytes();
    b.l4[2] = c[0];
    b.l4[3] = c[1];
    ipv6_header(&mut b.ip, p, 56, IPPROTO_ICMPV6);
    store::<40>(ctx, ETH, &b.ip)?;
    store::<56>(ctx, ETH + 40, &b.l4)
}

/// An IPv4 header from the packet's destination back to its source, checksum 0 (the caller fills it).
#[inline(always)]
fn ipv4_header(h: &mut [u8; 40], p: &Packet, total_len: u16, proto: u8) {
    let l = total_len.to_be_bytes();
    h[..12].copy_from_slice(&[0x45, 0, l[0], l[1], 0, 0, 0x40, 0, TTL, proto, 0, 0]);
    h[12..16].copy_from_slice(&p.daddr[12..]);
    h[16..20].copy_from_slice(&p.saddr[12..]);
}

#[inline(always)]
fn ipv6_header(h: &mut [u8; 40], p: &Packet, payload_len: u16, proto: u8) {
    let l = payload_len.to_be_bytes();
    h[..8].copy_from_slice(&[0x60, 0, 0, 0, l[0], l[1], proto, TTL]);
    h[8..24].copy_from_slice(&p.daddr);
    h[24..40].copy_from_slice(&p.saddr);
}

/// The IPv4 pseudo-header of the answer (its source is the packet's destination), in the first 12 bytes.
#[inline(always)]
fn pseudo4(h: &mut [u8; 40], p: &Packet, proto: u8, len: u16) {
    let l = len.to_be_bytes();
    h[..4].copy_from_slice(&p.daddr[12..]);
    h[4..8].copy_from_slice(&p.saddr[12..]);
    h[8..12].copy_from_slice(&[0, proto, l[0], l[1]]);
}

#[inline(always)]
fn pseudo6(h: &mut [u8; 40], p: &Packet, proto: u8, len: u16) {
    h[..16].copy_from_slice(&p.daddr);
    h[16..32].copy_from_slice(&p.saddr);
    h[32..36].copy_from_slice(&u32::from(len).to_be_bytes());
    h[36..40].copy_from_slice(&[0, 0, 0, proto]);
}
