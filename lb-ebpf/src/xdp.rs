//! The XDP fast path (`lb_xdp`, attached with `--xdp` on the same interfaces as the tc programs). It runs before
//! tc ingress and handles only what it can finish on its own; everything else returns `XDP_PASS`, and tc handles
//! the packet exactly as without XDP.
//!
//! What it does, in order (katran's `process_packet` shape: each step "done, or continue"):
//! 1. parse (`packet::parse`, strict: a malformed packet passes untouched): Ethernet, IPv4 without options or IPv6
//!    without extension headers, TCP or UDP, not a fragment; anything else passes (fragments, options, extension
//!    headers, SCTP, ICMP and non-IP are tc's; a well-formed one may still meet step 4);
//! 2. a reply of an SNATed flow (backend -> node SNAT address:port, the SNAT reply entry) with a learned L2 header
//!    for its reply leg: both reverse translations (destination back to the client, source back to the VIP), TTL /
//!    hop limit down, MACs from the learned header, out through `XDP_TX` or `bpf_redirect` (`reason::XDP_REPLY`);
//! 3. an established flow (its forward entry) with SNAT (a remote backend under the Cluster policy, rule 6) whose
//!    backend still exists (rule 12) and whose forward leg has a learned L2 header: DNAT to the backend and SNAT
//!    to the node address and port of its SNAT entry, the same rewrite tc ingress + tc egress make
//!    (`reason::XDP_FORWARD`, counted in the service's and backend's packet counters as tc counts them);
//! 4. no conntrack entry: a packet to a frontend with `loadBalancerSourceRanges` from a source outside them is
//!    dropped here (rule 9, `reason::SOURCE_RANGE` and the service's drop counter, as tc counts it);
//! 5. everything else passes.
//!
//! **Learned L2:** tc egress sees
//! every SNATed packet leave with its final Ethernet header, filled in by the kernel's neighbour subsystem, and
//! records it in `LB_XDP_L2` under the conntrack key it used (the SNAT entry's for the forward leg, the reply
//! entry's for the reply leg) when `CONFIG_FLAG_XDP` is set. A new flow's first packets (the SYN, the SYN-ACK and the first
//! packet of each direction after them, until its TCP entries are established and its headers learned) therefore
//! take the tc path, which is what teaches XDP the headers. A header is used for `XDP_L2_FRESH_S`; after that the
//! flow's next packet goes through tc again (XDP-sent packets skip tc egress), which records it anew, so a changed
//! neighbour or route is followed within that time.
//!
//! **Conntrack** stays tc's: XDP only reads entries and refreshes `last_seen_jiffies` on both entries it used, as tc
//! does for a packet it follows. It takes TCP packets only from established flows (`CT_FLAG_ESTABLISHED`) and without
//! SYN, FIN or RST: every lifetime change (SYN -> established, FIN/RST -> closing) happens in tc, in one place.
//!
//! **Checksums:** XDP has no `bpf_l3/l4_csum_replace`, so the IPv4 header checksum and the TCP/UDP checksum
//! (pseudo-header included) are updated incrementally (RFC 1624: `HC' = ~(~HC + ~m + m')` per changed 16-bit
//! word), over the words as they sit in memory; the one's complement sum does not depend on byte order as long as
//! every word is read and the result written the same way. This assumes a complete checksum in the packet, which
//! is what a NIC delivers. A generic-mode (SKB) frame larger than `MAX_FRAME` is a GRO aggregate (its checksum
//! field holds only the pseudo-header sum, CHECKSUM_PARTIAL, and it would not fit the egress MTU as one frame):
//! those pass to tc.
//!
//! **Scratch:** per-packet state lives in `LB_XDP_SCRATCH`, a per-CPU map of its own (see `scratch.rs` for why not
//! a slot of tc's `LB_SCRATCH`).

#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values are passed to the map helpers as references into the scratch map value, as in tc.rs"
)]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_redirect,
    programs::XdpContext,
};
use lb_common::{
    CT_DIR_FWD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_ESTABLISHED, CT_FLAG_SNAT,
    CT_FLAG_SNAT_PAIR, CtKey, CtValue, HZ_UNKNOWN_ASSUMED, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL,
    SVC_FLAG_SOURCE_RANGES, XDP_L2_FRESH_S, reason,
};

use crate::csum::{apply_delta, sum_diff16, word, word_diff};
use crate::ct;
use crate::events;
use crate::maps::{LB_CONFIG, LB_SERVICES, LB_SRC_RANGES, LB_XDP_L2};
use crate::packet::{self, ETH_HLEN, FRAG_NONE, Packet, TCP_FIN, TCP_RST, TCP_SYN};
use crate::scratch::{self, XdpScratch};
use crate::select::lookup_backend;
use crate::stats;

/// Where the L4 header starts: IPv4 without options, IPv6 without extension headers (anything else passes).
const L4_V4: usize = ETH_HLEN as usize + 20;
const L4_V6: usize = ETH_HLEN as usize + 40;
/// The largest frame XDP translates: a 1500-byte MTU plus the Ethernet header. Larger frames in generic mode are
/// GRO aggregates (see the module doc); with jumbo frames those flows simply stay on the tc path.
const MAX_FRAME: usize = 1514;

/// [`parse`]'s results.
const PARSED: u32 = 0;
const NOT_PARSED: u32 = 1;
const SOURCE_RANGE_ONLY: u32 = 2;

/// The XDP entry point's core. Returns the XDP action.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let Some(s) = scratch::xdp() else {
        return XDP_PASS;
    };
    match parse(ctx, &mut s.pkt) {
        PARSED => {}
        SOURCE_RANGE_ONLY => return source_range_checked(ctx, s),
        _ => return XDP_PASS,
    }
    let action = fast_path(ctx, s);
    if action != XDP_PASS {
        return action;
    }
    source_range_checked(ctx, s)
}

/// Reads a `T` at `off` of the frame, bounds-checked for the verifier.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    packet::ptr_at::<T, XdpContext>(ctx, off as u32)
}

/// Parses the frame into `p` (`packet::parse`, strict); `PARSED` only for what the fast path handles (Ethernet,
/// IPv4 without options or IPv6 without extension headers, TCP or UDP, not a fragment), `NOT_PARSED` for a
/// packet that is malformed, not a service's kind, or tc's; `SOURCE_RANGE_ONLY` for a well-formed packet the
/// fast path leaves to tc but whose source may still be checked against the source ranges.
///
/// Inlined into the entry point: as an argument of a BPF-to-BPF call, LLVM passes the context's 32-bit `data` /
/// `data_end` fields already loaded and zero-extends them in the callee with shifts, which kernel 6.18 refuses
/// ("R2 pointer arithmetic on pkt_end prohibited").
#[inline(always)]
fn parse(ctx: &XdpContext, p: &mut Packet) -> u32 {
    if packet::parse(ctx, p) != packet::PARSED {
        return NOT_PARSED;
    }
    let fixed_l4 = if p.is_v4() { L4_V4 } else { L4_V6 };
    if p.frag != FRAG_NONE
        || (p.proto != PROTO_TCP && p.proto != PROTO_UDP)
        || p.l4 as usize != fixed_l4
    {
        return SOURCE_RANGE_ONLY;
    }
    PARSED
}

/// Steps 2 and 3 of the module doc. Returns `XDP_TX` / `XDP_REDIRECT` when the packet was translated and sent,
/// `XDP_PASS` otherwise (including a hit that cannot take the fast path: tc follows it).
#[inline(always)]
fn fast_path(ctx: &XdpContext, s: &mut XdpScratch) -> u32 {
    if ctx.data_end() - ctx.data() > MAX_FRAME {
        return XDP_PASS;
    }
    s.hz = LB_CONFIG
        .get_ptr(0)
        .map_or(u64::from(HZ_UNKNOWN_ASSUMED), |c| {
            // SAFETY: an array slot is valid for the program run; read by value.
            ct::hz(unsafe { &*c })
        });
    // One lookup in the ingress key direction: a reply to this node's SNAT address and port
    // (`CT_FLAG_SNAT_PAIR`), or a client's packet of an established flow.
    pkt_key(&mut s.key, &s.pkt, CT_DIR_FWD);
    let Some(first) = ct::lookup(&s.key, &mut s.ct, s.hz) else {
        return XDP_PASS;
    };
    if !usable(&s.ct, &s.pkt) {
        return XDP_PASS;
    }
    let k = &mut s.other;
    let why = if s.ct.flags & CT_FLAG_SNAT_PAIR != 0 {
        // The reply leg's entry, as tc egress would look it up after tc ingress restored the client as
        // destination: (backend, client) -> source back to the VIP.
        k.saddr = s.pkt.saddr;
        k.daddr = s.ct.new_daddr;
        k.sport = s.pkt.sport;
        k.dport = s.ct.new_dport;
        reason::XDP_REPLY
    } else {
        // An established flow of a remote backend.
        if s.ct.flags & CT_FLAG_SNAT == 0 {
            return XDP_PASS;
        }
        // Rule 12: a flow whose backend is gone is tc's to end (RST).
        let alive = lookup_backend(s.ct.backend_id)
            .is_some_and(|b| b.value.addr == s.ct.new_daddr && b.value.port == s.ct.new_dport);
        if !alive {
            return XDP_PASS;
        }
        // The forward leg's SNAT entry, keyed by the DNATed packet as tc egress sees it.
        k.saddr = s.pkt.saddr;
        k.daddr = s.ct.new_daddr;
        k.sport = s.pkt.sport;
        k.dport = s.ct.new_dport;
        reason::XDP_FORWARD
    };
    k.proto = s.pkt.proto;
    k.dir = CT_DIR_REPLY;
    k._pad = [0; 2];
    let Some(second) = ct::lookup(&s.other, &mut s.ct2, s.hz) else {
        return XDP_PASS;
    };
    // The SNAT entry for a forward packet, the reply entry for a reply: the pair flag says which.
    let want_pair = why == reason::XDP_FORWARD;
    if (s.ct2.flags & CT_FLAG_SNAT_PAIR != 0) != want_pair || !usable(&s.ct2, &s.pkt) {
        return XDP_PASS;
    }
    // Source from the second entry (the SNAT address, or the VIP), destination from the first (the backend, or
    // the client).
    let n = &mut s.nat;
    n.saddr = s.ct2.new_saddr;
    n.sport = s.ct2.new_sport;
    n.daddr = s.ct.new_daddr;
    n.dport = s.ct.new_dport;
    n._pad = 0;
    send(ctx, s, first, second, why)
}

/// Whether an entry lets the packet take the fast path: TCP only between the handshake and the first FIN/RST
/// (tc owns every lifetime change, see the module doc).
#[inline(always)]
fn usable(ct: &CtValue, p: &Packet) -> bool {
    if ct.flags & CT_FLAG_CLOSING != 0 {
        return false;
    }
    if p.proto == PROTO_TCP {
        return p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
            && ct.flags & CT_FLAG_ESTABLISHED != 0;
    }
    true
}

/// With the learned L2 header of `s.other`'s leg: rewrites the packet by `s.nat`, refreshes both entries, counts,
/// and returns the action that sends it; `XDP_PASS` when the header is unknown or stale, or the TTL runs out.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    s: &mut XdpScratch,
    first: *mut CtValue,
    second: *mut CtValue,
    why: u32,
) -> u32 {
    let Some(l2) = LB_XDP_L2.get_ptr(&s.other) else {
        return XDP_PASS;
    };
    // SAFETY: read at once, by value, from a successful lookup.
    s.l2 = unsafe { l2.read() };
    let now = ct::now();
    // Wrapping: an older build's nanosecond stamp (larger than any jiffies) reads as stale, so tc learns it again.
    if now.wrapping_sub(s.l2.learned_jiffies) >= XDP_L2_FRESH_S * s.hz || s.l2.ifindex == 0 {
        return XDP_PASS;
    }
    if rewrite(ctx, s) != 0 {
        // Nothing was written before the checks that fail (TTL, bounds): the packet is intact for tc.
        return XDP_PASS;
    }
    // SAFETY: both pointers come from lookups in this run; a racing LRU eviction can only make the write land in
    // a recycled entry, which its own next lookup re-validates (as in tc.rs's `touch`).
    unsafe {
        (*first).last_seen_jiffies = now;
        (*second).last_seen_jiffies = now;
    }
    if why == reason::XDP_FORWARD {
        stats::count_packet(
            s.ct.service_id,
            s.ct.backend_id,
            (ctx.data_end() - ctx.data()) as u32,
        );
    }
    stats::count_reason(why);
    if s.l2.ifindex == ingress_ifindex(ctx) {
        XDP_TX
    } else {
        // SAFETY: no pointer arguments; flags 0.
        unsafe { bpf_redirect(s.l2.ifindex, 0) as u32 }
    }
}

#[inline(always)]
fn ingress_ifindex(ctx: &XdpContext) -> u32 {
    ctx.ingress_ifindex() as u32
}

/// Rewrites addresses, ports, TTL / hop limit, checksums and MACs. Returns 0, or -1 with the packet untouched
/// (too short, TTL would expire: the stack answers that one with an ICMP error).
#[inline(always)]
fn rewrite(ctx: &XdpContext, s: &mut XdpScratch) -> i32 {
    match rewrite_inner(ctx, s) {
        Some(()) => 0,
        None => -1,
    }
}

#[inline(always)]
fn rewrite_inner(ctx: &XdpContext, s: &mut XdpScratch) -> Option<()> {
    let p = &s.pkt;
    let n = &s.nat;
    let eth = ptr_at::<[u8; 12]>(ctx, 0)?;
    let l4 = if p.v4 != 0 { L4_V4 } else { L4_V6 };
    let csum_off = if p.proto == PROTO_TCP {
        l4 + 16
    } else {
        l4 + 6
    };
    let ports = ptr_at::<[u16; 2]>(ctx, l4)?;
    let csum = ptr_at::<u16>(ctx, csum_off)?;
    let new_sport = n.sport.to_be();
    let new_dport = n.dport.to_be();
    // The L4 checksum's change: addresses (pseudo-header) and ports. For IPv4 the 16-byte forms share the mapped
    // prefix, whose words cancel.
    let mut delta = sum_diff16(&p.saddr, &n.saddr) + sum_diff16(&p.daddr, &n.daddr);
    // SAFETY: bounds checked by `ptr_at`.
    let [old_sport, old_dport] = unsafe { ports.read_unaligned() };
    delta += word_diff(old_sport, new_sport) + word_diff(old_dport, new_dport);
    if p.v4 != 0 {
        let ip = ptr_at::<[u8; 20]>(ctx, ETH_HLEN as usize)?.cast::<u8>();
        // SAFETY: bounds checked by `ptr_at` (20 bytes from `ip`).
        unsafe {
            if *ip.add(8) <= 1 {
                return None;
            }
            // TTL and protocol share a word; only the TTL changes.
            let ttl_word = ip.add(8).cast::<u16>();
            let old_ttl = ttl_word.read_unaligned();
            *ip.add(8) -= 1;
            let mut ip_delta = word_diff(old_ttl, ttl_word.read_unaligned());
            let saddr = ip.add(12).cast::<[u16; 2]>();
            let daddr = ip.add(16).cast::<[u16; 2]>();
            let [s0, s1] = saddr.read_unaligned();
            let [d0, d1] = daddr.read_unaligned();
            ip_delta += word_diff(s0, word(&n.saddr, 12)) + word_diff(s1, word(&n.saddr, 14));
            ip_delta += word_diff(d0, word(&n.daddr, 12)) + word_diff(d1, word(&n.daddr, 14));
            let check = ip.add(10).cast::<u16>();
            check.write_unaligned(apply_delta(check.read_unaligned(), ip_delta));
            saddr.write_unaligned([word(&n.saddr, 12), word(&n.saddr, 14)]);
            daddr.write_unaligned([word(&n.daddr, 12), word(&n.daddr, 14)]);
        }
    } else {
        let ip = ptr_at::<[u8; 40]>(ctx, ETH_HLEN as usize)?.cast::<u8>();
        // SAFETY: bounds checked by `ptr_at` (40 bytes from `ip`).
        unsafe {
            if *ip.add(7) <= 1 {
                return None;
            }
            *ip.add(7) -= 1;
            ip.add(8).cast::<[u8; 16]>().write_unaligned(n.saddr);
            ip.add(24).cast::<[u8; 16]>().write_unaligned(n.daddr);
        }
    }
    // SAFETY: bounds checked by `ptr_at`.
    unsafe {
        let old = csum.read_unaligned();
        // An IPv4 UDP datagram without a checksum (0) keeps none.
        if !(p.proto == PROTO_UDP && old == 0) {
            let mut new = apply_delta(old, delta);
            // A computed 0 is sent as 0xffff for UDP (0 means "none" for IPv4 and is invalid for IPv6).
            if p.proto == PROTO_UDP && new == 0 {
                new = 0xffff;
            }
            csum.write_unaligned(new);
        }
        ports.write_unaligned([new_sport, new_dport]);
        let mac = eth.cast::<u8>();
        mac.cast::<[u8; 6]>().write_unaligned(s.l2.dmac);
        mac.add(6).cast::<[u8; 6]>().write_unaligned(s.l2.smac);
    }
    Some(())
}

/// [`source_range`], and its drop reported to `lb-agent monitor` (from here, not from inside it: the entry's frame
/// leaves a subprogram called from a subprogram too little of the 512-byte stack).
#[inline(always)]
fn source_range_checked(ctx: &XdpContext, s: &mut XdpScratch) -> u32 {
    let action = source_range(s);
    if action == XDP_DROP {
        let _ = events::xdp_source_range_drop(ctx, s);
    }
    action
}

/// Step 4: a new flow to a frontend with source ranges, from outside them, drops here (rule 9), counted as tc
/// counts it. Everything else passes.
#[inline(never)]
fn source_range(s: &mut XdpScratch) -> u32 {
    let p = &s.pkt;
    s.svc_key.addr = p.daddr;
    s.svc_key.port = p.dport;
    s.svc_key.proto = p.proto;
    s.svc_key.scope = SCOPE_EXTERNAL;
    let Some(svc) = LB_SERVICES.get_ptr(&s.svc_key) else {
        return XDP_PASS;
    };
    // SAFETY: read at once, by value (LB_SERVICES is BPF_F_NO_PREALLOC: see maps.rs).
    let (flags, service_id) = unsafe { ((*svc).flags, (*svc).service_id) };
    if flags & SVC_FLAG_SOURCE_RANGES == 0 {
        return XDP_PASS;
    }
    s.range.service_id = service_id.to_be_bytes();
    s.range.addr = p.saddr;
    if LB_SRC_RANGES
        .get(&aya_ebpf::maps::lpm_trie::Key::new(32 + 128, s.range))
        .is_some()
    {
        return XDP_PASS;
    }
    stats::count_reason(reason::SOURCE_RANGE);
    stats::count_service_drop(service_id);
    XDP_DROP
}

/// The key of the packet's own tuple, in direction `dir`.
#[inline(always)]
fn pkt_key(k: &mut CtKey, p: &Packet, dir: u8) {
    ct::set_key(k, &p.saddr, &p.daddr, p.sport, p.dport, p.proto, dir);
}
