//! The per-packet datapath on the node's external interfaces, one core per direction (cilium `bpf/lib/lb.h` and
//! `nodeport.h`; katran `balancer.bpf.c`'s `process_packet` for the shape): each step is "done, or continue".
//!
//! [`ingress`]: parse -> conntrack (a reply to an SNAT address: destination back to the client; an established
//! flow: follow its entry, rule 12) -> service lookup (Internal frontend for this node's own pods and addresses,
//! kube-proxy's local-traffic detector; External otherwise; source ranges before that, rule 9) -> reject / drop
//! (rules 5, 8) -> backend (affinity, then Maglev over a node-independent hash of the 5-tuple, or random) ->
//! conntrack entries -> DNAT. The packet then goes on through the stack, routed to the backend.
//!
//! [`egress`]: a DNATed packet leaving towards a remote backend for an outside client gets the node's SNAT address
//! (rule 6); a reply leaving towards the client gets the VIP back as source.
//!
//! NAT is split as iptables splits it (DNAT at PREROUTING, SNAT at POSTROUTING) for a reason: the stack drops a
//! packet arriving with one of its own addresses as source (a martian), so the source may only become the node
//! address (SNAT) or the VIP (which may be the node's own NodePort address) once the packet is routed and leaving.
//! Conntrack holds up to four entries per flow, one per (direction, hook): `CT_DIR_FWD` (ingress, client -> VIP),
//! `CT_DIR_SNAT` (egress, client -> backend), `CT_DIR_SNAT_REPLY` (ingress, backend -> node address),
//! `CT_DIR_REPLY` (egress, backend -> client).
//!
//! Fragments: a first fragment is handled by its ports like any packet; when it is translated, `LB_FRAGMENTS`
//! remembers the rewritten addresses under (source, destination, identification, protocol, hook), and the later
//! fragments of that datagram (no L4 header, no ports) get the same addresses ([`follow_fragment`]). A later
//! fragment without an entry (its first fragment was not seen here, arrives after it, or was not a service's)
//! passes untouched, as before; an untranslated first fragment removes a stale entry of its key.
//!
//! Stack: kernel 6.18's verifier sums the frames of a BPF-to-BPF call chain and refuses more than 512 bytes
//! ("combined stack size of 3 calls is 624. Too large"). Every piece of per-packet state (the parsed packet, the
//! conntrack keys and entries being built, the chosen service and backend, the outcome, the reject buffers) lives
//! in one per-CPU [`Scratch`] value instead, looked up once by the entry point and passed down as `&mut Scratch`:
//! a pointer to a map value costs no stack, and map helpers take map values as keys and values directly.

#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values are passed to the map helpers as references into the scratch map value; by value, \
              Rust would copy them onto the stack first, which is what the scratch map exists to avoid"
)]

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use lb_common::{
    ALG_MAGLEV, AffinityKey, AffinityValue, BACKEND_FLAG_LOCAL, BackendValue,
    CONFIG_FLAG_PASS_UNTRACKED_TCP, CONFIG_FLAG_TRACE, CONFIG_FLAG_XDP, CT_DIR_FWD, CT_DIR_REPLY,
    CT_DIR_SNAT, CT_DIR_SNAT_REPLY, CT_FLAG_CLOSING, CT_FLAG_SNAT, CT_LIFETIME_CLOSING_S,
    CT_LIFETIME_OTHER_S, CT_LIFETIME_SYN_S, CT_LIFETIME_TCP_S, ConfigValue, CtKey, CtValue,
    FRAG_FLAG_COUNTED, FRAG_HOOK_EGRESS, FRAG_HOOK_INGRESS, FRAG_LIFETIME_S, FragKey, FragValue,
    PROTO_SCTP, PROTO_TCP, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_DROP_NO_BACKEND,
    SVC_FLAG_SOURCE_RANGES, ServiceKey, ServiceValue, SrcRangeData, TraceValue, VERDICT_DROP,
    VERDICT_FORWARD, VERDICT_PASS, VERDICT_REJECT, VIP_FLAG_CLUSTER_IP, XDP_L2_REFRESH_NS,
    XdpL2Value, is_v4_mapped, reason,
};

use crate::maps::{
    LB_AFFINITY, LB_CONFIG, LB_CONNTRACK, LB_FRAGMENTS, LB_LOCAL_NETS, LB_SCRATCH, LB_SERVICES,
    LB_SRC_RANGES, LB_SVC_CIDRS, LB_TRACE, LB_VIPS, LB_XDP_L2,
};
use crate::packet::{
    self, FRAG_FIRST, FRAG_NONE, NOT_PARSED_FRAGMENT, NOT_PARSED_OTHER, Nat, PARSED, Packet,
    TCP_FIN, TCP_RST, TCP_SYN,
};
use crate::reject::{self, RejectBufs};
use crate::select::{lookup_backend, mix64, pick_from_table};
use crate::stats;

const NS_PER_SEC: u64 = 1_000_000_000;
/// Fixed seed of the flow hash: every node must map a flow to the same slot (ECMP across nodes).
const FLOW_HASH_SEED: u64 = 0x6c62_5f66_6c6f_7731;
/// SNAT ports tried when the client's own port is taken on the node address towards that backend.
const SNAT_TRIES: u32 = 8;
const SNAT_PORT_MIN: u32 = 32768;
const SNAT_PORT_RANGE: u32 = 28232;

/// `LB_SCRATCH` slots: one per program, so an egress run never sees an ingress run's state even if the kernel ever
/// ran one inside the other on a CPU (tc programs run with bottom halves disabled, so today it does not).
pub const SCRATCH_INGRESS: u32 = 0;
pub const SCRATCH_EGRESS: u32 = 1;
pub const SCRATCH_SLOTS: usize = 2;

/// What happened to a packet, for the counters and `lb-agent trace`. Plain integers only (no `bool`, no enum): it
/// is part of a map value's BTF.
#[repr(C)]
pub struct Outcome {
    verdict: u32,
    reason: u32,
    service_id: u32,
    backend_id: u32,
    snat: u32,
    action: i32,
}

/// One packet run's working state (see the module doc for why it is a per-CPU map value and not on the stack).
#[repr(C)]
pub struct Scratch {
    cfg: ConfigValue,
    pkt: Packet,
    out: Outcome,
    /// The conntrack key being looked up or written.
    key: CtKey,
    /// The key of a hit entry's other direction, or of the entry written next to `key`.
    other: CtKey,
    /// A copy of the conntrack entry being followed, or the forward entry being written.
    ct: CtValue,
    /// The reply entry being written (the SNAT reply entry has the same value).
    rev: CtValue,
    /// The rewrite to apply.
    nat: Nat,
    /// The chosen service and backend of a new flow.
    svc_key: ServiceKey,
    svc: ServiceValue,
    backend_id: u32,
    /// Whether the new flow gets the node's SNAT address (rule 6), and that address for the packet's family.
    snat: u32,
    backend: BackendValue,
    snat_addr: [u8; 16],
    rej: RejectBufs,
    /// The fragment entry being looked up or written (first fragments and later fragments only).
    fkey: FragKey,
    fval: FragValue,
    /// The learned L2 header being written (egress, `CONFIG_FLAG_XDP` only).
    l2: XdpL2Value,
    /// `FRAG_HOOK_INGRESS` or `FRAG_HOOK_EGRESS`: which program runs, for the fragment keys.
    hook: u8,
}

impl Outcome {
    #[inline(always)]
    fn set(&mut self, verdict: u32, reason: u32, service_id: u32, action: i32) {
        self.verdict = verdict;
        self.reason = reason;
        self.service_id = service_id;
        self.backend_id = 0;
        self.snat = 0;
        self.action = action;
    }

    #[inline(always)]
    fn pass(&mut self, reason: u32) {
        self.set(VERDICT_PASS, reason, 0, TC_ACT_UNSPEC);
    }

    #[inline(always)]
    fn drop(&mut self, reason: u32, service_id: u32) {
        self.set(VERDICT_DROP, reason, service_id, TC_ACT_SHOT);
    }
}

/// This program's per-CPU scratch value.
#[inline(always)]
fn scratch(slot: u32) -> Option<&'static mut Scratch> {
    let ptr = LB_SCRATCH.get_ptr_mut(slot)?;
    // SAFETY: a per-CPU array slot is valid for the whole program run, and only this run uses it on this CPU
    // (one slot per program, and a tc program is not preempted by another run of itself on the same CPU).
    Some(unsafe { &mut *ptr })
}

/// tc ingress on an external interface. Returns the tc verdict.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let Some(s) = scratch(SCRATCH_INGRESS) else {
        return TC_ACT_UNSPEC;
    };
    config(&mut s.cfg);
    s.out.pass(reason::NONE);
    s.hook = FRAG_HOOK_INGRESS;
    match packet::parse_into(ctx, &mut s.pkt) {
        PARSED => {
            // The step's result is in `s.out`; the returned reason only keeps r0 a scalar (see `ingress_packet`).
            let _ = ingress_packet(ctx, s);
            forget_fragment(s);
        }
        NOT_PARSED_OTHER => {}
        NOT_PARSED_FRAGMENT => {
            let _ = follow_fragment(ctx, s);
        }
        _ => s.out.reason = reason::MALFORMED,
    }
    finish(s)
}

/// tc egress on an external interface. Returns the tc verdict.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let Some(s) = scratch(SCRATCH_EGRESS) else {
        return TC_ACT_UNSPEC;
    };
    config(&mut s.cfg);
    s.out.pass(reason::NONE);
    s.hook = FRAG_HOOK_EGRESS;
    match packet::parse_into(ctx, &mut s.pkt) {
        PARSED => {
            let _ = egress_packet(ctx, s);
            forget_fragment(s);
        }
        NOT_PARSED_FRAGMENT => {
            let _ = follow_fragment(ctx, s);
        }
        _ => {}
    }
    finish(s)
}

// Every `#[inline(never)]` step below writes its result into `s.out` and returns `s.out.reason`: kernel 6.18
// rejects a subprogram that exits with a stack pointer in r0 ("cannot return stack pointer to the caller"), which
// LLVM leaves there for functions returning `()` or a struct through a pointer.

/// Egress: the SNAT of a flow to a remote backend, or the reply of a local backend getting the VIP back.
#[inline(never)]
fn egress_packet(ctx: &TcContext, s: &mut Scratch) -> u32 {
    set_ct_key(&mut s.key, &s.pkt, CT_DIR_SNAT);
    if let Some(ptr) = ct_lookup(&s.key, &mut s.ct) {
        // The SNAT pair shares its lifetime like the other pair: the SNAT reply entry sees only the backend's
        // packets, and a connection whose backend has sent nothing since its SYN-ACK would otherwise lose it after
        // the SYN lifetime (60 s), so the backend's first word after a longer idle time would not come back.
        inverse_key(&mut s.other, &s.ct, s.pkt.proto, CT_DIR_SNAT_REPLY);
        let _ = touch(ptr, s);
        // Source only: the destination is already the backend.
        src_nat(&mut s.nat, &s.pkt, &s.ct);
        let _ = apply(ctx, s, reason::CONNTRACK);
        let _ = learn_l2(ctx, s);
        return s.out.reason;
    }
    set_ct_key(&mut s.key, &s.pkt, CT_DIR_REPLY);
    if let Some(ptr) = ct_lookup(&s.key, &mut s.ct) {
        inverse_key(&mut s.other, &s.ct, s.pkt.proto, CT_DIR_FWD);
        let _ = touch(ptr, s);
        src_nat(&mut s.nat, &s.pkt, &s.ct);
        let _ = apply(ctx, s, reason::REPLY);
        let _ = learn_l2(ctx, s);
        return s.out.reason;
    }
    s.out.reason
}

/// With the XDP fast path on (`CONFIG_FLAG_XDP`): records the Ethernet header and interface a translated packet of
/// an SNATed flow leaves with, under the conntrack key just used (`s.key`: `CT_DIR_SNAT` or `CT_DIR_REPLY`), for
/// `lb_xdp` (see xdp.rs, "Learned L2"). An unchanged entry is rewritten only once `XDP_L2_REFRESH_NS` old.
/// Returns 0.
#[inline(never)]
fn learn_l2(ctx: &TcContext, s: &mut Scratch) -> u32 {
    if s.cfg.flags & CONFIG_FLAG_XDP == 0
        || s.out.verdict != VERDICT_FORWARD
        || s.ct.flags & CT_FLAG_SNAT == 0
        || s.pkt.frag != FRAG_NONE
    {
        return 0;
    }
    let Ok(macs) = ctx.load::<[u8; 12]>(0) else {
        return 0;
    };
    // SAFETY: reads the context's own ifindex field (at egress: the device the packet leaves through).
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: no argument, no precondition.
    let now = unsafe { bpf_ktime_get_ns() };
    let l = &mut s.l2;
    l.ifindex = ifindex;
    l.dmac = [macs[0], macs[1], macs[2], macs[3], macs[4], macs[5]];
    l.smac = [macs[6], macs[7], macs[8], macs[9], macs[10], macs[11]];
    if let Some(old) = LB_XDP_L2.get_ptr(&s.key) {
        // SAFETY: read at once, by value, from a successful lookup.
        let old = unsafe { old.read() };
        if old.ifindex == l.ifindex
            && old.dmac == l.dmac
            && old.smac == l.smac
            && now.saturating_sub(old.learned_ns) < XDP_L2_REFRESH_NS
        {
            return 0;
        }
    }
    l.learned_ns = now;
    let _ = LB_XDP_L2.insert(&s.key, &s.l2, 0);
    0
}

/// Ingress, in order: a reply to the SNAT address, a reply to a client on this node, an established flow, and
/// otherwise a new flow ([`choose`] then [`install`]).
#[inline(never)]
fn ingress_packet(ctx: &TcContext, s: &mut Scratch) -> u32 {
    // A reply to this node's SNAT address: destination back to the client; the source becomes the VIP at egress.
    set_ct_key(&mut s.key, &s.pkt, CT_DIR_SNAT_REPLY);
    if let Some(ptr) = ct_lookup(&s.key, &mut s.ct) {
        let _ = snat_pair_key(s);
        let _ = touch(ptr, s);
        dst_nat(&mut s.nat, &s.pkt, &s.ct);
        let _ = apply(ctx, s, reason::REPLY);
        return s.out.reason;
    }
    // A reply for a client on this node (no SNAT): it will not leave through an external interface, so the
    // source becomes the VIP here.
    set_ct_key(&mut s.key, &s.pkt, CT_DIR_REPLY);
    if let Some(ptr) = ct_lookup(&s.key, &mut s.ct)
        && s.ct.flags & CT_FLAG_SNAT == 0
    {
        inverse_key(&mut s.other, &s.ct, s.pkt.proto, CT_DIR_FWD);
        let _ = touch(ptr, s);
        src_nat(&mut s.nat, &s.pkt, &s.ct);
        let _ = apply(ctx, s, reason::REPLY);
        return s.out.reason;
    }
    // An established flow follows its entry, not the current table (rule 12), unless a new SYN reuses the ports of
    // a closing flow.
    set_ct_key(&mut s.key, &s.pkt, CT_DIR_FWD);
    if let Some(ptr) = ct_lookup(&s.key, &mut s.ct) {
        let reopened = s.pkt.proto == PROTO_TCP
            && s.pkt.tcp_flags & TCP_SYN != 0
            && s.ct.flags & CT_FLAG_CLOSING != 0;
        if !reopened {
            return follow_established(ctx, s, ptr);
        }
    }
    if choose(ctx, s) != 0 {
        return install(ctx, s);
    }
    s.out.reason
}

/// Rule 12: the entry's backend must still exist with the same address (ids are reused); otherwise the flow ends.
#[inline(never)]
fn follow_established(ctx: &TcContext, s: &mut Scratch, ptr: *mut CtValue) -> u32 {
    let alive = lookup_backend(s.ct.backend_id)
        .is_some_and(|b| b.value.addr == s.ct.new_daddr && b.value.port == s.ct.new_dport);
    if !alive {
        remove_flow(s);
        if s.pkt.proto == PROTO_TCP {
            reject_packet(ctx, s, reason::BACKEND_GONE, s.ct.service_id);
        } else {
            s.out.drop(reason::BACKEND_GONE, s.ct.service_id);
        }
        return s.out.reason;
    }
    inverse_key(&mut s.other, &s.ct, s.pkt.proto, CT_DIR_REPLY);
    let _ = touch(ptr, s);
    stats::count_packet(s.ct.service_id, s.ct.backend_id, ctx.len());
    dst_nat(&mut s.nat, &s.pkt, &s.ct);
    let _ = apply(ctx, s, reason::CONNTRACK);
    s.out.reason
}

/// Removes a dead flow's entries: forward (in `s.key`), reply, and the SNAT pair. `s.ct` is the forward entry.
#[inline(always)]
fn remove_flow(s: &mut Scratch) {
    let _ = LB_CONNTRACK.remove(&s.key);
    inverse_key(&mut s.other, &s.ct, s.pkt.proto, CT_DIR_REPLY);
    let _ = LB_CONNTRACK.remove(&s.other);
    if s.ct.flags & CT_FLAG_SNAT != 0 {
        let k = &mut s.key;
        k.saddr = s.pkt.saddr;
        k.daddr = s.ct.new_daddr;
        k.sport = s.pkt.sport;
        k.dport = s.ct.new_dport;
        k.dir = CT_DIR_SNAT;
        if let Some(snat) = LB_CONNTRACK.get_ptr(&s.key) {
            // SAFETY: read at once, by value, from a successful lookup.
            let (snat_addr, snat_port) = unsafe { ((*snat).new_saddr, (*snat).new_sport) };
            let o = &mut s.other;
            o.saddr = s.ct.new_daddr;
            o.daddr = snat_addr;
            o.sport = s.ct.new_dport;
            o.dport = snat_port;
            o.dir = CT_DIR_SNAT_REPLY;
            let _ = LB_CONNTRACK.remove(&s.other);
        }
        let _ = LB_CONNTRACK.remove(&s.key);
    }
}

/// Source from the entry, destination as it is.
#[inline(always)]
fn src_nat(nat: &mut Nat, p: &Packet, ct: &CtValue) {
    nat.saddr = ct.new_saddr;
    nat.sport = ct.new_sport;
    nat.daddr = p.daddr;
    nat.dport = p.dport;
}

/// Destination from the entry, source as it is.
#[inline(always)]
fn dst_nat(nat: &mut Nat, p: &Packet, ct: &CtValue) {
    nat.saddr = p.saddr;
    nat.sport = p.sport;
    nat.daddr = ct.new_daddr;
    nat.dport = ct.new_dport;
}

/// Rewrites the packet by `s.nat` and reports it forwarded for `s.ct`'s flow (or dropped when the rewrite failed
/// half way). A first fragment's translation is remembered for the datagram's later fragments.
///
/// Not inlined: inlined into its six callers, the fragment bookkeeping's spills grew `ingress_packet`'s frame and
/// the chain lb_tc_ingress -> ingress_packet -> install -> claim_snat_port passed kernel 6.18's 512 bytes
/// ("combined stack size of 4 calls is 528. Too large").
#[inline(never)]
fn apply(ctx: &TcContext, s: &mut Scratch, why: u32) -> u32 {
    let first_fragment = s.pkt.frag == FRAG_FIRST;
    if first_fragment {
        // Keyed by the addresses as the later fragments will carry them, so before the rewrite changes `s.pkt`.
        frag_key(&mut s.fkey, &s.pkt, s.hook);
    }
    if packet::rewrite(ctx, &mut s.pkt, &s.nat) != 0 {
        s.out.drop(reason::MALFORMED, s.ct.service_id);
        return s.out.reason;
    }
    s.out.set(VERDICT_FORWARD, why, s.ct.service_id, TC_ACT_OK);
    s.out.backend_id = s.ct.backend_id;
    s.out.snat = u32::from(s.ct.flags & CT_FLAG_SNAT != 0);
    if first_fragment {
        let counted = why == reason::NEW_FLOW || why == reason::CONNTRACK;
        let f = &mut s.fval;
        // SAFETY: no argument, no precondition.
        f.created_ns = unsafe { bpf_ktime_get_ns() };
        f.new_saddr = s.nat.saddr;
        f.new_daddr = s.nat.daddr;
        f.service_id = s.ct.service_id;
        f.backend_id = s.ct.backend_id;
        f.flags = (s.ct.flags & CT_FLAG_SNAT) | if counted { FRAG_FLAG_COUNTED } else { 0 };
        f._pad = [0; 7];
        // A full map evicts its oldest entry (LRU); a failure only leaves the later fragments untranslated.
        let _ = LB_FRAGMENTS.insert(&s.fkey, &s.fval, 0);
    }
    s.out.reason
}

/// The `LB_FRAGMENTS` key of the packet as it is now.
#[inline(always)]
fn frag_key(k: &mut FragKey, p: &Packet, hook: u8) {
    k.saddr = p.saddr;
    k.daddr = p.daddr;
    k.id = p.frag_id;
    k.proto = p.proto;
    k.hook = hook;
    k._pad = [0; 2];
}

/// A first fragment that was not translated (not a service's, dropped, rejected) removes any entry of its key: an
/// older datagram's entry would otherwise translate this datagram's later fragments.
#[inline(always)]
fn forget_fragment(s: &mut Scratch) {
    if s.pkt.frag == FRAG_FIRST && s.out.verdict != VERDICT_FORWARD {
        frag_key(&mut s.fkey, &s.pkt, s.hook);
        let _ = LB_FRAGMENTS.remove(&s.fkey);
    }
}

/// A later fragment: translated to the addresses its first fragment got, when that was seen here within
/// `FRAG_LIFETIME_S`; otherwise it passes untouched (ingress counts it as `reason::FRAGMENT`).
#[inline(never)]
fn follow_fragment(ctx: &TcContext, s: &mut Scratch) -> u32 {
    frag_key(&mut s.fkey, &s.pkt, s.hook);
    let unknown = if s.hook == FRAG_HOOK_INGRESS {
        reason::FRAGMENT
    } else {
        reason::NONE
    };
    let Some(ptr) = LB_FRAGMENTS.get_ptr(&s.fkey) else {
        s.out.pass(unknown);
        return s.out.reason;
    };
    // SAFETY: read at once, by value, from a successful lookup (a concurrent LRU reuse yields at worst another
    // datagram's entry, which the key comparison of the next lookup would not find again).
    s.fval = unsafe { ptr.read() };
    // SAFETY: no argument, no precondition.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(s.fval.created_ns) > u64::from(FRAG_LIFETIME_S) * NS_PER_SEC {
        let _ = LB_FRAGMENTS.remove(&s.fkey);
        s.out.pass(unknown);
        return s.out.reason;
    }
    let n = &mut s.nat;
    n.saddr = s.fval.new_saddr;
    n.daddr = s.fval.new_daddr;
    // 0 on both sides: a later fragment has no ports.
    n.sport = s.pkt.sport;
    n.dport = s.pkt.dport;
    let svc_id = s.fval.service_id;
    if packet::rewrite(ctx, &mut s.pkt, &s.nat) != 0 {
        s.out.drop(reason::MALFORMED, svc_id);
        return s.out.reason;
    }
    if s.fval.flags & FRAG_FLAG_COUNTED != 0 {
        stats::count_packet(svc_id, s.fval.backend_id, ctx.len());
    }
    s.out.set(
        VERDICT_FORWARD,
        reason::FRAGMENT_FOLLOWED,
        svc_id,
        TC_ACT_OK,
    );
    s.out.backend_id = s.fval.backend_id;
    s.out.snat = u32::from(s.fval.flags & CT_FLAG_SNAT != 0);
    s.out.reason
}

#[inline(always)]
fn config(cfg: &mut ConfigValue) {
    match LB_CONFIG.get_ptr(0) {
        // SAFETY: an array slot is valid for the program run; read by value.
        Some(p) => *cfg = unsafe { p.read() },
        None => *cfg = ConfigValue::default(),
    }
}

/// Counts and (for `lb-agent trace`) records the outcome; returns the tc verdict.
#[inline(always)]
fn finish(s: &Scratch) -> i32 {
    let out = &s.out;
    if out.reason != reason::NONE {
        stats::count_reason(out.reason);
    }
    if (out.verdict == VERDICT_DROP || out.verdict == VERDICT_REJECT) && out.service_id != 0 {
        stats::count_service_drop(out.service_id);
    }
    if s.cfg.flags & CONFIG_FLAG_TRACE != 0
        && let Some(t) = LB_TRACE.get_ptr_mut(0)
    {
        // SAFETY: the single array slot is valid for the program run; only `lb-agent trace` runs this path.
        unsafe {
            let seq = (*t).seq.wrapping_add(1);
            t.write(TraceValue {
                verdict: out.verdict,
                reason: out.reason,
                service_id: out.service_id,
                backend_id: out.backend_id,
                snat: out.snat,
                seq,
            });
        }
    }
    out.action
}

/// A new flow's service and backend: fills `s.svc`, `s.backend*` and `s.snat` and returns 1, or fills `s.out` with
/// the verdict (not a service, rejected, dropped) and returns 0.
#[inline(never)]
fn choose(ctx: &TcContext, s: &mut Scratch) -> u32 {
    let p = &s.pkt;
    s.svc_key.addr = p.daddr;
    s.svc_key.port = p.dport;
    s.svc_key.proto = p.proto;
    s.svc_key.scope = SCOPE_EXTERNAL;
    let external = read_service(&s.svc_key, &mut s.svc);
    let local_source = LB_LOCAL_NETS
        .get(&aya_ebpf::maps::lpm_trie::Key::new(128, p.saddr))
        .is_some();
    // Rule 9 comes before rule 5's short-circuit: the ranges hold for this node's own pods too.
    if external && s.svc.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        let data = SrcRangeData {
            service_id: s.svc.service_id.to_be_bytes(),
            addr: p.saddr,
        };
        if LB_SRC_RANGES
            .get(&aya_ebpf::maps::lpm_trie::Key::new(32 + 128, data))
            .is_none()
        {
            s.out.drop(reason::SOURCE_RANGE, s.svc.service_id);
            return 0;
        }
    }
    let mut found = external;
    if local_source {
        s.svc_key.scope = SCOPE_INTERNAL;
        // The Internal frontend wins when there is one; otherwise the External one read above stays.
        let mut internal = ServiceValue::default();
        if read_service(&s.svc_key, &mut internal) {
            s.svc = internal;
            found = true;
        }
    }
    if !found {
        unknown_vip(ctx, s);
        return 0;
    }
    // Beside kube-proxy: a mid-stream TCP packet of a flow lb does not track is one netfilter translated before lb
    // started; taking it over would send it to lb's choice of backend, which resets it.
    if s.cfg.flags & CONFIG_FLAG_PASS_UNTRACKED_TCP != 0
        && s.pkt.proto == PROTO_TCP
        && s.pkt.tcp_flags & TCP_SYN == 0
    {
        s.out.pass(reason::UNTRACKED_TCP);
        return 0;
    }
    let svc_id = s.svc.service_id;
    if s.svc.backend_count == 0 {
        if s.svc.flags & SVC_FLAG_DROP_NO_BACKEND != 0 {
            s.out.drop(reason::NO_LOCAL_ENDPOINT, svc_id);
        } else {
            reject_packet(ctx, s, reason::NO_ENDPOINTS, svc_id);
        }
        return 0;
    }
    let Some(backend) = select(&s.svc, &s.pkt) else {
        reject_packet(ctx, s, reason::NO_BACKEND, svc_id);
        return 0;
    };
    let p = &s.pkt;
    if is_v4_mapped(&backend.value.addr) != p.v4 {
        s.out.drop(reason::NO_BACKEND, svc_id);
        return 0;
    }
    // SCTP's CRC32c covers the ports; `packet::rewrite` folds a port change into it, which needs the SCTP
    // packet's length: a first fragment does not tell it (the datagram ends in a later fragment).
    if p.proto == PROTO_SCTP && p.frag != FRAG_NONE && backend.value.port != p.dport {
        s.out.drop(reason::MALFORMED, svc_id);
        return 0;
    }
    // Rule 6: a remote backend reached from outside the node needs the node's address as source so the reply comes
    // back here; so does hairpin (the client is the backend itself), from anywhere: a local pod whose packets cross
    // an attached device (`--devices` naming pod interfaces) would otherwise get a packet from its own address,
    // which its stack drops as a martian (kube-proxy masquerades `-s <endpoint>` in every KUBE-SEP chain for this).
    // Other local clients are routable as they are.
    // Two branches, not one boolean expression: LLVM 22 folded that into a bitwise OR on the LB_LOCAL_NETS lookup's
    // pointer, which kernel 6.18's verifier rejects ("bitwise operator |= on pointer prohibited").
    s.snat = 0;
    #[allow(
        clippy::if_same_then_else,
        reason = "one condition with || gives LLVM the fold the verifier rejects"
    )]
    if backend.value.addr == p.saddr {
        s.snat = 1;
    } else if !local_source && backend.value.flags & BACKEND_FLAG_LOCAL == 0 {
        s.snat = 1;
    }
    s.backend_id = backend.id;
    s.backend = backend.value;
    1
}

/// Writes the new flow's conntrack entries (SNAT pair first, then reply, then forward) and translates the packet.
#[inline(never)]
fn install(ctx: &TcContext, s: &mut Scratch) -> u32 {
    let svc_id = s.svc.service_id;
    s.snat_addr = if s.pkt.v4 {
        s.cfg.snat_v4
    } else {
        s.cfg.snat_v6
    };
    // The reply entry (as the backend sends it to the client): source back to the VIP, destination the client.
    // The SNAT reply entry has the same value.
    ct_entry(&mut s.rev, &s.pkt, s.svc.service_id, s.backend_id, s.snat);
    s.rev.new_saddr = s.pkt.daddr;
    s.rev.new_sport = s.pkt.dport;
    s.rev.new_daddr = s.pkt.saddr;
    s.rev.new_dport = s.pkt.sport;
    if s.snat != 0 {
        let why = install_snat(s);
        if why != reason::NONE {
            s.out.drop(why, svc_id);
            return s.out.reason;
        }
    }
    // The forward entry: the client's packets go to the backend.
    ct_entry(&mut s.ct, &s.pkt, s.svc.service_id, s.backend_id, s.snat);
    s.ct.new_saddr = s.pkt.saddr;
    s.ct.new_sport = s.pkt.sport;
    s.ct.new_daddr = s.backend.addr;
    s.ct.new_dport = s.backend.port;
    inverse_key(&mut s.other, &s.ct, s.pkt.proto, CT_DIR_REPLY);
    set_ct_key(&mut s.key, &s.pkt, CT_DIR_FWD);
    if LB_CONNTRACK.insert(&s.other, &s.rev, 0).is_err()
        || LB_CONNTRACK.insert(&s.key, &s.ct, 0).is_err()
    {
        s.out.drop(reason::CT_FULL, svc_id);
        return s.out.reason;
    }
    stats::count_packet(svc_id, s.backend_id, ctx.len());
    dst_nat(&mut s.nat, &s.pkt, &s.ct);
    let _ = apply(ctx, s, reason::NEW_FLOW);
    s.out.reason
}

/// The fields every entry of a new flow shares (addresses and ports are the caller's).
#[inline(always)]
fn ct_entry(ct: &mut CtValue, p: &Packet, service_id: u32, backend_id: u32, snat: u32) {
    // SAFETY: no argument, no precondition.
    ct.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    ct.backend_id = backend_id;
    ct.service_id = service_id;
    ct.lifetime_s = initial_lifetime(p);
    ct.flags = if snat != 0 { CT_FLAG_SNAT } else { 0 };
    ct._pad = [0; 7];
}

/// The SNAT half of a new flow: claims a port on the node address (writing the SNAT reply entry, `s.rev`) and
/// writes the SNAT entry. Returns the drop reason on failure, `reason::NONE` on success.
#[inline(always)]
fn install_snat(s: &mut Scratch) -> u32 {
    if s.snat_addr == [0; 16] {
        return reason::NO_SNAT;
    }
    let port = claim_snat_port(s);
    if port == 0 {
        return reason::NO_SNAT;
    }
    // The SNAT entry, keyed by the DNATed packet at egress: its source becomes (node address, port).
    let k = &mut s.key;
    k.saddr = s.pkt.saddr;
    k.daddr = s.backend.addr;
    k.sport = s.pkt.sport;
    k.dport = s.backend.port;
    k.proto = s.pkt.proto;
    k.dir = CT_DIR_SNAT;
    k._pad = [0; 2];
    ct_entry(&mut s.ct, &s.pkt, s.svc.service_id, s.backend_id, s.snat);
    s.ct.new_saddr = s.snat_addr;
    s.ct.new_sport = port;
    s.ct.new_daddr = s.backend.addr;
    s.ct.new_dport = s.backend.port;
    if LB_CONNTRACK.insert(&s.key, &s.ct, 0).is_err() {
        return reason::CT_FULL;
    }
    reason::NONE
}

/// Picks the SNAT port: the client's own if free on (node address, backend), else a few hashed ones. The SNAT reply
/// entry (`s.rev`) is inserted here with `BPF_NOEXIST`, which is what claims the port. Ports of the node's own
/// sockets are not checked (as with any SNAT sharing the node address; the agent's connections to backends are
/// rare). Returns the port, or 0 when none was free.
#[inline(never)]
fn claim_snat_port(s: &mut Scratch) -> u16 {
    // Hashed from the packet's own fields: a copy into a key first made LLVM keep all 32 address bytes in registers
    // and spill them (kernel 6.18 limits the whole call chain's stack to 512 bytes).
    let base = flow_hash(&s.pkt);
    let k = &mut s.other;
    k.saddr = s.backend.addr;
    k.daddr = s.snat_addr;
    k.sport = s.backend.port;
    k.proto = s.pkt.proto;
    k.dir = CT_DIR_SNAT_REPLY;
    k._pad = [0; 2];
    let mut i = 0;
    while i < SNAT_TRIES {
        let port = if i == 0 {
            s.pkt.sport
        } else {
            (SNAT_PORT_MIN + base.wrapping_add(i.wrapping_mul(7919)) % SNAT_PORT_RANGE) as u16
        };
        s.other.dport = port;
        if LB_CONNTRACK
            .insert(&s.other, &s.rev, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return port;
        }
        // Taken: by this very client (its other entries expired or were evicted first), reuse it.
        if let Some(existing) = LB_CONNTRACK.get_ptr(&s.other) {
            // SAFETY: read at once, from a successful lookup.
            let same = unsafe {
                (*existing).new_daddr == s.rev.new_daddr && (*existing).new_dport == s.rev.new_dport
            };
            if same {
                let _ = LB_CONNTRACK.insert(&s.other, &s.rev, 0);
                return port;
            }
        }
        i += 1;
    }
    0
}

/// No frontend for (address, port, protocol): a ClusterIP on a port its Service does not define rejects, and an
/// address inside a service CIDR that no Service holds drops (rule 8, in kube-proxy nftables' order: its
/// `cluster-ips-check` chain rejects `@cluster-ips` first, then drops the service CIDRs); anything else is not a
/// service packet.
#[inline(always)]
fn unknown_vip(ctx: &TcContext, s: &mut Scratch) {
    // SAFETY: the value is a byte, read at once.
    let flags = LB_VIPS
        .get_ptr(&s.pkt.daddr)
        .map(|f| unsafe { f.read() })
        .unwrap_or(0);
    if flags & VIP_FLAG_CLUSTER_IP != 0 {
        reject_packet(ctx, s, reason::UNKNOWN_PORT, 0);
    } else if LB_SVC_CIDRS
        .get(&aya_ebpf::maps::lpm_trie::Key::new(128, s.pkt.daddr))
        .is_some()
    {
        s.out.drop(reason::UNALLOCATED_CLUSTER_IP, 0);
    } else {
        s.out.pass(reason::NONE);
    }
}

/// Turns the packet into a RST / ICMP unreachable (`reject`) and records the verdict.
#[inline(always)]
fn reject_packet(ctx: &TcContext, s: &mut Scratch, why: u32, service_id: u32) {
    let action = reject::reject(ctx, &s.pkt, &mut s.rej);
    if action >= 0 {
        s.out.set(VERDICT_REJECT, why, service_id, action);
    } else {
        // The packet may be half rewritten: drop it, and say which reject failed.
        s.out.drop(reason::REJECT_FAILED, service_id);
    }
}

/// Copies the service at `key` into `out`; false when there is none.
#[inline(always)]
fn read_service(key: &ServiceKey, out: &mut ServiceValue) -> bool {
    match LB_SERVICES.get_ptr(key) {
        Some(p) => {
            // SAFETY: the value is copied at once; LB_SERVICES is created with BPF_F_NO_PREALLOC.
            *out = unsafe { p.read() };
            true
        }
        None => false,
    }
}

/// Affinity first (keyed by the client address), then the lookup table with the flow hash (Maglev) or a random
/// number.
#[inline(always)]
fn select(svc: &ServiceValue, flow: &Packet) -> Option<crate::select::Backend> {
    if svc.affinity_timeout == 0 {
        return pick_from_table(svc, table_key(svc, flow));
    }
    let key = AffinityKey {
        netns_cookie: 0,
        client_addr: flow.saddr,
        service_id: svc.service_id,
        _pad: 0,
    };
    // SAFETY: no argument, no precondition.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(svc.affinity_timeout) * NS_PER_SEC;
    let remembered = LB_AFFINITY
        .get_ptr(&key)
        // SAFETY: read at once, by value; see select.rs for what a concurrent LRU eviction can do.
        .map(|p| unsafe { p.read() })
        .filter(|v| now.saturating_sub(v.last_used_ns) < timeout_ns)
        .and_then(|v| lookup_backend(v.backend_id));
    let backend = match remembered {
        Some(b) => b,
        None => pick_from_table(svc, table_key(svc, flow))?,
    };
    let _ = LB_AFFINITY.insert(
        &key,
        AffinityValue {
            backend_id: backend.id,
            _pad: 0,
            last_used_ns: now,
        },
        0,
    );
    Some(backend)
}

#[inline(always)]
fn table_key(svc: &ServiceValue, flow: &Packet) -> u32 {
    if svc.algorithm == ALG_MAGLEV {
        flow_hash(flow)
    } else {
        // SAFETY: no argument, no precondition.
        unsafe { bpf_get_prandom_u32() }
    }
}

/// A hash of the 5-tuple that depends on nothing node-local, so every node with the same table picks the same
/// backend for a flow (ECMP in front of the nodes may move a flow between them).
#[inline(always)]
pub fn flow_hash(k: &Packet) -> u32 {
    // Read in place rather than through `from_be_bytes` of a copied `[u8; 8]`: the copies cost stack in every
    // caller's frame (kernel 6.18 limits the whole call chain to 512 bytes).
    let word = |a: &[u8; 16], i: usize| {
        // SAFETY: `i` is 0 or 8, so the 8 bytes read lie inside the 16-byte array; unaligned read.
        u64::from_be(unsafe { a.as_ptr().add(i).cast::<u64>().read_unaligned() })
    };
    let mut h = FLOW_HASH_SEED;
    h = u64::from(mix64(h ^ word(&k.saddr, 0)));
    h = u64::from(mix64(h ^ word(&k.saddr, 8))) ^ (h << 32);
    h = u64::from(mix64(h ^ word(&k.daddr, 0))) ^ (h << 32);
    h = u64::from(mix64(h ^ word(&k.daddr, 8))) ^ (h << 32);
    let ports = (u64::from(k.sport) << 24) | (u64::from(k.dport) << 8) | u64::from(k.proto);
    mix64(h ^ ports)
}

/// The key of the packet itself, in direction `dir`.
#[inline(always)]
fn set_ct_key(k: &mut CtKey, p: &Packet, dir: u8) {
    k.saddr = p.saddr;
    k.daddr = p.daddr;
    k.sport = p.sport;
    k.dport = p.dport;
    k.proto = p.proto;
    k.dir = dir;
    k._pad = [0; 2];
}

/// The key of the other direction an entry implies: a forward entry's reply (`dir` = `CT_DIR_REPLY`, the packet
/// the backend sends back) or a reply entry's forward key (`dir` = `CT_DIR_FWD`, the client's packet to the VIP).
/// Either way it is the entry's translated tuple, reversed.
#[inline(always)]
fn inverse_key(k: &mut CtKey, v: &CtValue, proto: u8, dir: u8) {
    k.saddr = v.new_daddr;
    k.daddr = v.new_saddr;
    k.sport = v.new_dport;
    k.dport = v.new_sport;
    k.proto = proto;
    k.dir = dir;
    k._pad = [0; 2];
}

/// A live (unexpired) entry: copied into `out`, and a pointer for updates.
#[inline(always)]
fn ct_lookup(key: &CtKey, out: &mut CtValue) -> Option<*mut CtValue> {
    let ptr = LB_CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup and is read at once, by value. An LRU entry can be evicted
    // and reused concurrently; the worst outcome is one foreign entry, which the backend check catches for forward
    // entries.
    *out = unsafe { ptr.read() };
    // SAFETY: no argument, no precondition.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(out.last_seen_ns) > u64::from(out.lifetime_s) * NS_PER_SEC {
        return None;
    }
    Some(ptr)
}

#[inline(always)]
fn initial_lifetime(p: &Packet) -> u32 {
    if p.proto == PROTO_TCP {
        CT_LIFETIME_SYN_S
    } else {
        CT_LIFETIME_OTHER_S
    }
}

/// The key of a SNAT reply entry's pair, the SNAT entry (client -> backend: the client is the entry's rewritten
/// destination, the backend the packet's source), into `s.other`. Not inlined: written out in
/// [`ingress_packet`] it grew that frame past the verifier's combined 512-byte stack limit (kernel 6.18, by the
/// chain through `claim_snat_port`). Returns 0.
#[inline(never)]
fn snat_pair_key(s: &mut Scratch) -> u32 {
    let k = &mut s.other;
    k.saddr = s.ct.new_daddr;
    k.daddr = s.pkt.saddr;
    k.sport = s.ct.new_dport;
    k.dport = s.pkt.sport;
    k.proto = s.pkt.proto;
    k.dir = CT_DIR_SNAT;
    k._pad = [0; 2];
    0
}

/// Refreshes an entry on a hit (`ptr`, copied in `s.ct`), and its TCP life: FIN or RST shorten both directions
/// (the entry and its pair, keyed by `s.other`) to the closing lifetime; the first packet after the SYN (the other
/// direction answered) lengthens them to the established one. Not inlined: one copy instead of five keeps the
/// callers' frames small (`lb_tc_ingress`'s chain through `claim_snat_port` is at the verifier's 512-byte combined
/// stack limit). Returns 0 (a scalar, see the note above the steps).
#[inline(never)]
fn touch(ptr: *mut CtValue, s: &Scratch) -> u32 {
    let (ct, p) = (&s.ct, &s.pkt);
    // SAFETY: no argument, no precondition.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut lifetime = ct.lifetime_s;
    let mut flags = ct.flags;
    if p.proto == PROTO_TCP {
        if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            lifetime = CT_LIFETIME_CLOSING_S;
            flags |= CT_FLAG_CLOSING;
        } else if ct.flags & CT_FLAG_CLOSING == 0 && p.tcp_flags & TCP_SYN == 0 {
            lifetime = CT_LIFETIME_TCP_S;
        }
    }
    let closing = flags & CT_FLAG_CLOSING != 0;
    // Only a change is written, and never one that takes a closing entry back to a longer life: two packets of one
    // flow run on two CPUs at once (a client's ACK and its FIN right after it, say), each with its own copy of the
    // entry, and the later writer would otherwise put back the lifetime the other had just shortened (seen with
    // real traffic: the SNAT entry of a closed flow kept the established 6 hours, and its SNAT port).
    // SAFETY: `ptr` came from a lookup in this run; fields are written in place (a racing eviction can only make
    // the write land in a recycled entry, which its own next lookup re-validates).
    unsafe {
        (*ptr).last_seen_ns = now;
        let reopens = !closing && (*ptr).flags & CT_FLAG_CLOSING != 0;
        if (lifetime != ct.lifetime_s || flags != ct.flags) && !reopens {
            (*ptr).lifetime_s = lifetime;
            (*ptr).flags = flags;
        }
    }
    if lifetime != ct.lifetime_s
        && let Some(o) = LB_CONNTRACK.get_ptr_mut(&s.other)
    {
        // SAFETY: as above.
        unsafe {
            if closing || (*o).flags & CT_FLAG_CLOSING == 0 {
                (*o).lifetime_s = lifetime;
                (*o).flags |= flags & CT_FLAG_CLOSING;
            }
            (*o).last_seen_ns = now;
        }
    }
    0
}
