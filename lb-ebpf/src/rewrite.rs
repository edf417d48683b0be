//! Rewriting a parsed packet's addresses and ports with incremental checksum updates (katran `csum_helpers.h`,
//! cilium `bpf/lib/csum.h`), for the tc programs.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use lb_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::packet::{FRAG_LATER, FRAG_NONE, Packet};
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
        if p.is_v4() {
            let c: u16 = ctx.load(p.l4 as usize + 6).map_err(|_| RewriteError)?;
            l4_enabled = c != 0;
        }
    }
    let csum_off = csum_off.unwrap_or(0);
    let l3 = p.l3 as usize;
    let (s_off, d_off, alen) = if p.is_v4() {
        (l3 + 12, l3 + 16, 4)
    } else {
        (l3 + 8, l3 + 24, 16)
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
            p.l4 as usize,
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
            p.l4 as usize + 2,
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
        if sctp_crc_update(ctx, p.l4 as usize, p.ip_end as usize, old, new) != 0 {
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
    if p.is_v4() {
        // l3/l4_csum_replace with size 0 take `to` as a precomputed checksum difference.
        ctx.l3_csum_replace(p.l3 as usize + 10, 0, diff as u64, 0)
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
