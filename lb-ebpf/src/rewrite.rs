//! Rewriting a parsed packet's addresses and ports with incremental checksum updates (katran `csum_helpers.h`,
//! cilium `bpf/lib/csum.h`), for the tc programs.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use lb_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::csum::{apply_delta, sum_diff16, to_wsum};
use crate::packet::{self, FRAG_LATER, FRAG_NONE, MAX_HEADERS, Packet};
use crate::sctp::sctp_crc_update;

/// Rewriting failed (a helper refused: the packet is not writable or too short). The caller drops the packet: it
/// may be half rewritten.
pub struct RewriteError;

/// The offset of the L4 checksum, or `None` for SCTP (CRC32c, not an Internet checksum; see [`rewrite`]).
#[inline(always)]
fn l4_csum_off(p: &Packet) -> Option<usize> {
    match p.proto {
        PROTO_TCP => Some(p.l4 as usize + 16),
        PROTO_UDP => Some(p.l4 as usize + 6),
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
/// The headers are in the linear area (`tc::parse` pulled them), so addresses and ports are stored directly and the
/// IPv4 header checksum is updated inline (RFC 1624, `csum.rs`): it is never left to the device, and its change is
/// compensated inside the header, so `skb->csum` stays right. The L4 checksum goes through `bpf_l4_csum_replace`,
/// with the address difference computed inline (no `bpf_csum_diff`): only the kernel knows `skb->ip_summed`, and a
/// CHECKSUM_PARTIAL field (a GRO aggregate, a packet from a local veth) holds the pseudo-header sum only, which a
/// port change must not touch, while a CHECKSUM_COMPLETE packet's `skb->csum` must follow the pseudo-header change.
/// The stores come before the helpers, which invalidate packet pointers. Saved against the helper-only rewrite:
/// `bpf_csum_diff`, `bpf_l3_csum_replace` and one `bpf_skb_store_bytes` per field (four to six helper calls).
///
/// SCTP's CRC32c covers the SCTP packet only, not an IP pseudo-header, so address rewrites leave it valid; a port
/// rewrite changes it by an amount that depends only on the old and new ports and the packet's length
/// ([`lb_common::crc32c_port_delta`], see `sctp::sctp_crc_update`). A fragment's SCTP ports cannot change: the length
/// of the datagram, which the update needs, is not known from its first fragment (the caller drops those before).
///
/// Not inlined: a BPF-to-BPF call gets its own stack frame, and with every caller inlining it the programs
/// exceeded the 512-byte stack (LLVM 22: "Looks like the BPF stack limit is exceeded").
/// Returns 0 on success, -1 when a helper failed (plain types in the signature: a Rust enum becomes a BTF union
/// with a member at a non-zero offset, which kernel 6.18 rejects, "Invalid member bits_offset").
#[inline(never)]
pub fn rewrite(ctx: &TcContext, p: &mut Packet, nat: &Nat) -> i32 {
    match rewrite_inner(ctx, p, nat) {
        Ok(()) => 0,
        Err(RewriteError) => -1,
    }
}

/// An offset read back from the scratch map, bounded again for the verifier (the parser never accepts headers
/// past `MAX_HEADERS`), so that it can index the packet.
#[inline(always)]
fn bounded(off: u32) -> Result<u32, RewriteError> {
    if off > MAX_HEADERS {
        Err(RewriteError)
    } else {
        Ok(off)
    }
}

/// Stores `v` at `off` of the linear packet.
#[inline(always)]
fn put<T: Copy>(ctx: &TcContext, off: u32, v: T) -> Result<(), RewriteError> {
    let ptr = packet::ptr_at::<T, TcContext>(ctx, off).ok_or(RewriteError)?;
    // SAFETY: `ptr_at` checked that the bytes are inside the linear packet; unaligned write.
    unsafe { ptr.write_unaligned(v) };
    Ok(())
}

#[inline(always)]
fn rewrite_inner(ctx: &TcContext, p: &mut Packet, nat: &Nat) -> Result<(), RewriteError> {
    let (saddr, sport, daddr, dport) = (&nat.saddr, nat.sport, &nat.daddr, nat.dport);
    let l3 = bounded(p.l3)?;
    let l4 = bounded(p.l4)?;
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
        if p.is_v4() {
            let c: u16 = packet::read(ctx, l4 + 6).ok_or(RewriteError)?;
            l4_enabled = c != 0;
        }
    }
    let csum_off = csum_off.unwrap_or(0);
    let v4 = p.is_v4();
    let (s_off, d_off) = if v4 {
        (l3 + 12, l3 + 16)
    } else {
        (l3 + 8, l3 + 24)
    };
    let mut addr_delta = 0;
    if *saddr != p.saddr {
        addr_delta += sum_diff16(&p.saddr, saddr);
        store_addr(ctx, s_off, v4, saddr)?;
        p.saddr = *saddr;
    }
    if *daddr != p.daddr {
        addr_delta += sum_diff16(&p.daddr, daddr);
        store_addr(ctx, d_off, v4, daddr)?;
        p.daddr = *daddr;
    }
    if addr_delta != 0 && v4 {
        let check: u16 = packet::read(ctx, l3 + 10).ok_or(RewriteError)?;
        put(ctx, l3 + 10, apply_delta(check, addr_delta))?;
    }
    let sctp = p.proto == PROTO_SCTP;
    let (old_sport, old_dport) = (p.sport, p.dport);
    let ports_change = sport != p.sport || dport != p.dport;
    if ports_change && sctp && p.frag != FRAG_NONE {
        return Err(RewriteError);
    }
    if ports_change && !sctp {
        if sport != p.sport {
            put(ctx, l4, sport.to_be())?;
        }
        if dport != p.dport {
            put(ctx, l4 + 2, dport.to_be())?;
        }
    }
    // Helpers from here on (packet pointers are invalid after each).
    if addr_delta != 0 && l4_enabled {
        ctx.l4_csum_replace(csum_off, 0, u64::from(to_wsum(addr_delta)), l4_flags)
            .map_err(|_| RewriteError)?;
    }
    if !ports_change {
        return Ok(());
    }
    // SCTP has no Internet checksum field to compensate the new bytes in `skb->csum` (CHECKSUM_COMPLETE), so its
    // stores go through the helper, which updates it.
    if sport != p.sport {
        port_csum(ctx, p.sport, sport, csum_off, l4_enabled, l4_flags)?;
        if sctp {
            ctx.store(l4 as usize, &sport.to_be(), u64::from(BPF_F_RECOMPUTE_CSUM))
                .map_err(|_| RewriteError)?;
        }
        p.sport = sport;
    }
    if dport != p.dport {
        port_csum(ctx, p.dport, dport, csum_off, l4_enabled, l4_flags)?;
        if sctp {
            ctx.store(
                l4 as usize + 2,
                &dport.to_be(),
                u64::from(BPF_F_RECOMPUTE_CSUM),
            )
            .map_err(|_| RewriteError)?;
        }
        p.dport = dport;
    }
    if sctp {
        let old = (u32::from(old_sport) << 16) | u32::from(old_dport);
        let new = (u32::from(sport) << 16) | u32::from(dport);
        if sctp_crc_update(ctx, l4 as usize, p.ip_end as usize, old, new) != 0 {
            return Err(RewriteError);
        }
    }
    Ok(())
}

/// Stores an address (4 bytes of the 16-byte form for IPv4).
#[inline(always)]
fn store_addr(ctx: &TcContext, off: u32, v4: bool, a: &[u8; 16]) -> Result<(), RewriteError> {
    if v4 {
        put(ctx, off, [a[12], a[13], a[14], a[15]])
    } else {
        put(ctx, off, *a)
    }
}

/// The L4 checksum's update for one port (ports are not in the pseudo-header: a plain 2-byte replace, which the
/// kernel skips for CHECKSUM_PARTIAL).
#[inline(always)]
fn port_csum(
    ctx: &TcContext,
    old: u16,
    new: u16,
    csum_off: usize,
    l4_enabled: bool,
    l4_flags: u64,
) -> Result<(), RewriteError> {
    if !l4_enabled {
        return Ok(());
    }
    let flags = (l4_flags & !u64::from(BPF_F_PSEUDO_HDR)) | 2;
    ctx.l4_csum_replace(
        csum_off,
        u64::from(old.to_be()),
        u64::from(new.to_be()),
        flags,
    )
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
