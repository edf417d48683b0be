//! A new flow's service and backend (cilium `bpf/lib/lb.h`: lookup_service -> select_backend -> lookup_backend):
//! the frontend by scope (Internal for this node's own pods and addresses, External otherwise), rule 9's source
//! ranges, rules 5 and 8 (drop or reject), then affinity and the lookup table.

#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values are passed to the map helpers as references into the scratch map value; by value, \
              Rust would copy them onto the stack first, which is what the scratch map exists to avoid"
)]

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use lb_common::{
    ALG_MAGLEV, AffinityKey, AffinityValue, BACKEND_FLAG_LOCAL, CONFIG_FLAG_PASS_UNTRACKED_TCP,
    PROTO_SCTP, PROTO_TCP, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_DROP_NO_BACKEND,
    SVC_FLAG_SOURCE_RANGES, ServiceKey, ServiceValue, SrcRangeData, VIP_FLAG_CLUSTER_IP,
    is_v4_mapped, reason,
};

use super::verdict::reject_packet;
use crate::ct::NS_PER_SEC;
use crate::maps::{LB_AFFINITY, LB_LOCAL_NETS, LB_SERVICES, LB_SRC_RANGES, LB_SVC_CIDRS, LB_VIPS};
use crate::packet::{FRAG_NONE, Packet, TCP_SYN};
use crate::scratch::TcScratch;
use crate::select::{lookup_backend, mix64, pick_from_table};

/// Fixed seed of the flow hash: every node must map a flow to the same slot (ECMP across nodes).
const FLOW_HASH_SEED: u64 = 0x6c62_5f66_6c6f_7731;

/// A new flow's service and backend: fills `s.svc`, `s.backend*` and `s.snat` and returns 1, or fills `s.out` with
/// the verdict (not a service, rejected, dropped) and returns 0.
#[inline(never)]
pub(super) fn choose(ctx: &TcContext, s: &mut TcScratch) -> u32 {
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
    if is_v4_mapped(&backend.value.addr) != p.is_v4() {
        s.out.drop(reason::NO_BACKEND, svc_id);
        return 0;
    }
    // SCTP's CRC32c covers the ports; `rewrite::rewrite` folds a port change into it, which needs the SCTP
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

/// No frontend for (address, port, protocol): a ClusterIP on a port its Service does not define rejects, and an
/// address inside a service CIDR that no Service holds drops (rule 8, in kube-proxy nftables' order: its
/// `cluster-ips-check` chain rejects `@cluster-ips` first, then drops the service CIDRs); anything else is not a
/// service packet.
#[inline(always)]
fn unknown_vip(ctx: &TcContext, s: &mut TcScratch) {
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
pub(super) fn flow_hash(k: &Packet) -> u32 {
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
