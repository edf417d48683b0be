//! The two cores of the socket LB, one per direction, as in cilium `bpf/bpf_sock.c`: [`xlate_fwd`]
//! (`__sock4_xlate_fwd`) serves connect and sendmsg, [`xlate_rev`] (`__sock4_xlate_rev`) serves recvmsg and
//! getpeername. Each takes the address family of its hook; both families share one code path because lb stores every
//! address in 16 bytes with IPv4 as `::ffff:a.b.c.d`, which is also how an IPv6 socket spells an IPv4 peer.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    CONFIG_FLAG_LOCALHOST_NODEPORTS, EVENT_DROP, EVENT_REJECT, LOCALHOST_NODEPORT_ADDR,
    NETNS_HAS_V4, NETNS_HAS_V6, PROTO_TCP, PROTO_UDP, SCOPE_INTERNAL, SVC_FLAG_DROP_NO_BACKEND,
    SVC_FLAG_SOURCE_RANGES, ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue, SrcRangeData,
    VIP_FLAG_CLUSTER_IP, is_v4_mapped, reason, v4_mapped,
};

use crate::{
    events,
    maps::{
        LB_CONFIG, LB_NETNS_ADDRS, LB_SERVICES, LB_SOCK_REVNAT, LB_SRC_RANGES, LB_SVC_CIDRS,
        LB_VIPS,
    },
    select::{Backend, select_backend},
    stats,
};

/// Verdict: let the syscall go on (with the address as the program left it).
pub const SYS_PROCEED: i32 = 1;
/// Verdict: fail the syscall, with `-EPERM` unless the program set another error with `bpf_set_retval`.
pub const SYS_REJECT: i32 = 0;

/// `ECONNREFUSED` (asm-generic/errno.h; the same on every architecture lb runs on).
const ECONNREFUSED: i32 = 111;

/// The address family of a hook, which decides the context fields it reads and writes. The kernel only lets `*4`
/// hooks touch `user_ip4` and `*6` hooks `user_ip6`; every caller passes a constant, so after inlining each program
/// contains only its own family's accesses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Why the forward core left the socket untouched instead of translating it.
pub enum Error {
    /// `LB_SOCK_REVNAT` could not be written: translating anyway would show the application the backend's
    /// address on recvmsg/getpeername, which UDP clients (DNS resolvers) reject as a reply from a stranger.
    RevNatUpdate,
}

/// The forward translation for connect4/6 and sendmsg4/6: if the destination is a service VIP, rewrite it to a
/// backend (and remember the VIP for the reverse hooks); if the service has no usable backend, fail the syscall.
/// Returns the verdict; `Err` means nothing was changed, and the caller lets the syscall go on untouched.
#[inline(always)]
pub fn xlate_fwd(ctx: &SockAddrContext, family: Family) -> Result<i32, Error> {
    let Some(proto) = protocol(ctx) else {
        return Ok(SYS_PROCEED);
    };
    let vip = read_addr(ctx, family);
    let mut key = ServiceKey {
        addr: vip,
        port: read_port(ctx),
        proto,
        scope: SCOPE_INTERNAL,
    };
    // Rule 14, `localhost:nodePort`: any 127.0.0.0/8 destination (also as `::ffff:127.x.y.z` on an IPv6 socket,
    // which the kernel sends as IPv4) of a socket in the host's namespace is looked up under the one address the
    // agent gives those frontends. Another namespace's loopback is its own and is never translated.
    if is_v4_mapped(&vip) && vip[12] == 127 {
        if !from_host(ctx) {
            return Ok(SYS_PROCEED);
        }
        key.addr = v4_mapped(LOCALHOST_NODEPORT_ADDR);
    }
    // SAFETY: the value is copied at once; LB_SERVICES is created with BPF_F_NO_PREALLOC, so its memory is not
    // reused before the program run ends.
    let Some(svc) = LB_SERVICES.get_ptr(key).map(|p| unsafe { p.read() }) else {
        return Ok(unknown_vip(ctx, &key));
    };
    // Rule 9 before anything else (before rule 5's short-circuit, before a backend is picked): the ranges hold for
    // this node's pods and processes too. Outside them the syscall fails with `EPERM`, the socket-level form of the
    // per-packet path's drop.
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 && !source_in_ranges(ctx, &svc, &vip) {
        stats::count_reject(svc.service_id);
        stats::count_sock_refusal(reason::SOURCE_RANGE);
        let _ = events::sock_refused(ctx, &key, EVENT_DROP, reason::SOURCE_RANGE, svc.service_id);
        return Ok(SYS_REJECT);
    }
    // recvmsg/getpeername show the application the address it asked for.
    key.addr = vip;
    if svc.backend_count == 0 {
        return Ok(reject(ctx, &key, &svc, no_endpoints_reason(&svc)));
    }
    let Some(backend) = select_backend(ctx, &svc) else {
        return Ok(reject(ctx, &key, &svc, reason::NO_BACKEND));
    };
    // The agent gives a service only backends of its own family; a mismatch is an agent bug, not a reason to write
    // a v6 address into a v4 socket (or send a v6 socket's native-v6 VIP to a mapped v4 address).
    if is_v4_mapped(&vip) != is_v4_mapped(&backend.value.addr) {
        return Ok(reject(ctx, &key, &svc, reason::NO_BACKEND));
    }

    // Every map write before the context is rewritten, so that `Err` really means "untouched".
    if record_revnat(ctx, &key, &svc, &backend)? {
        stats::count_connect(svc.service_id, backend.id);
        let _ = events::sock_new_flow(ctx, &key, svc.service_id, backend.id, &backend.value);
    }
    write_addr(ctx, family, &backend.value.addr);
    write_port(ctx, backend.value.port);
    Ok(SYS_PROCEED)
}

/// Whether the socket's source is inside the service's `loadBalancerSourceRanges`. At `connect()` the kernel has
/// not picked a source address yet, so the source is the address of the socket's network namespace of the VIP's
/// family, as the agent learned it (`LB_NETNS_ADDRS`: a pod's own address, the node's for the host and hostNetwork
/// pods). A namespace the agent has not learned is outside every range: the ranges are a firewall, and failing
/// closed is what a firewall does.
#[inline(always)]
fn source_in_ranges(ctx: &SockAddrContext, svc: &ServiceValue, vip: &[u8; 16]) -> bool {
    // SAFETY: bpf_get_netns_cookie takes the program's own context; allowed for cgroup sock_addr hooks (5.7+).
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied at once; the agent replaces whole values.
    let Some(addrs) = LB_NETNS_ADDRS.get_ptr(cookie).map(|p| unsafe { p.read() }) else {
        return false;
    };
    let (addr, known) = if is_v4_mapped(vip) {
        (addrs.v4, addrs.flags & NETNS_HAS_V4 != 0)
    } else {
        (addrs.v6, addrs.flags & NETNS_HAS_V6 != 0)
    };
    if !known {
        return false;
    }
    let data = SrcRangeData {
        service_id: svc.service_id.to_be_bytes(),
        addr,
    };
    LB_SRC_RANGES
        .get(&aya_ebpf::maps::lpm_trie::Key::new(32 + 128, data))
        .is_some()
}

/// Whether `localhost:nodePort` is on and the socket lives in the host's network namespace (the agent's, which
/// it writes into `LB_CONFIG`).
#[inline(always)]
fn from_host(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = LB_CONFIG.get_ptr(0) else {
        return false;
    };
    // SAFETY: an array slot is valid for the program run; the two fields are read by value.
    let (flags, host) = unsafe { ((*cfg).flags, (*cfg).host_netns_cookie) };
    if flags & CONFIG_FLAG_LOCALHOST_NODEPORTS == 0 || host == 0 {
        return false;
    }
    // SAFETY: bpf_get_netns_cookie takes the program's own context; allowed for cgroup sock_addr hooks (5.7+).
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) == host }
}

/// No frontend for (address, port, protocol), rule 8 at the socket: a ClusterIP on a port or protocol its Service
/// does not define fails with `ECONNREFUSED` (kube-proxy nftables rejects it in `filter-output-post-dnat`), and an
/// address inside a service CIDR that no Service holds fails with the hook's default `EPERM`, the socket-level form
/// of kube-proxy's "Drop traffic to unallocated ClusterIPs": a firewall drop in the output path gives a local UDP
/// sender `EPERM` too, while a TCP connect would only wait out its SYN retransmissions; failing at once tells the
/// client the same thing without the wait (nothing was sent, so nothing else can tell the difference). Anything
/// else is not a service address and proceeds untouched.
#[inline(always)]
fn unknown_vip(ctx: &SockAddrContext, key: &ServiceKey) -> i32 {
    let addr = &key.addr;
    // SAFETY: the value is a byte, read at once.
    let flags = LB_VIPS.get_ptr(addr).map(|f| unsafe { f.read() });
    match flags {
        Some(f) if f & VIP_FLAG_CLUSTER_IP != 0 => {
            stats::count_sock_refusal(reason::UNKNOWN_PORT);
            let _ = events::sock_refused(ctx, key, EVENT_REJECT, reason::UNKNOWN_PORT, 0);
            // SAFETY: no memory argument; allowed in connect4/6 and sendmsg4/6 (see `reject`).
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            SYS_REJECT
        }
        Some(_) => SYS_PROCEED,
        None => {
            if LB_SVC_CIDRS
                .get(&aya_ebpf::maps::lpm_trie::Key::new(128, *addr))
                .is_some()
            {
                stats::count_sock_refusal(reason::UNALLOCATED_CLUSTER_IP);
                let _ =
                    events::sock_refused(ctx, key, EVENT_DROP, reason::UNALLOCATED_CLUSTER_IP, 0);
                SYS_REJECT
            } else {
                SYS_PROCEED
            }
        }
    }
}

/// The reverse translation for recvmsg4/6 and getpeername4/6: if this socket's peer is a backend the forward core
/// chose, show the application the VIP and service port it asked for instead. Never fails (these hooks must not
/// fail the syscall): no entry means the peer was not translated.
#[inline(always)]
pub fn xlate_rev(ctx: &SockAddrContext, family: Family) {
    let key = SockRevNatKey {
        cookie: socket_cookie(ctx),
        addr: read_addr(ctx, family),
        port: read_port(ctx),
        _pad: [0; 6],
    };
    // SAFETY: the pointer comes from a successful lookup and is read at once, by value; see `record_revnat` for what
    // a concurrent LRU eviction can do.
    let Some(rev) = LB_SOCK_REVNAT.get_ptr(key).map(|p| unsafe { p.read() }) else {
        return;
    };
    // An IPv4 hook's peer is IPv4, so its entry's VIP is too; checked all the same rather than write half an address.
    if family == Family::V4 && !is_v4_mapped(&rev.addr) {
        return;
    }
    write_addr(ctx, family, &rev.addr);
    write_port(ctx, rev.port);
}

/// Why a service without backends in this scope refuses: none at all, or none local under a Local policy.
#[inline(always)]
fn no_endpoints_reason(svc: &ServiceValue) -> u32 {
    if svc.flags & SVC_FLAG_DROP_NO_BACKEND != 0 {
        reason::NO_LOCAL_ENDPOINT
    } else {
        reason::NO_ENDPOINTS
    }
}

/// Fails the syscall for a service without a usable backend (docs/semantics.md rule 8): `ECONNREFUSED`, as a TCP RST or
/// an ICMP port unreachable would give, or the hook's default `EPERM` when the service asks for a drop (a socket
/// cannot be "dropped"; `EPERM` is what a firewall drop of a local socket looks like).
#[inline(always)]
fn reject(ctx: &SockAddrContext, key: &ServiceKey, svc: &ServiceValue, why: u32) -> i32 {
    stats::count_reject(svc.service_id);
    stats::count_sock_refusal(why);
    let drop = svc.flags & SVC_FLAG_DROP_NO_BACKEND != 0;
    let kind = if drop { EVENT_DROP } else { EVENT_REJECT };
    let _ = events::sock_refused(ctx, key, kind, why, svc.service_id);
    if !drop {
        // SAFETY: no memory argument. bpf_set_retval is allowed for connect4/6 and sendmsg4/6 (kernel 5.18+,
        // `cgroup_common_func_proto`), and the kernel then returns this error from connect()/sendmsg() for a
        // program that answers SYS_REJECT instead of -EPERM.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    SYS_REJECT
}

/// Remembers, for this socket, that `backend` stands for the VIP in `key`. Returns whether the entry is new (the
/// socket's first translation to this backend), which is what the connect counters count: an unconnected UDP socket
/// runs the forward hook on every datagram, and rewriting an unchanged entry each time would cost a bucket lock.
#[inline(always)]
fn record_revnat(
    ctx: &SockAddrContext,
    key: &ServiceKey,
    svc: &ServiceValue,
    backend: &Backend,
) -> Result<bool, Error> {
    let rev_key = SockRevNatKey {
        cookie: socket_cookie(ctx),
        addr: backend.value.addr,
        port: backend.value.port,
        _pad: [0; 6],
    };
    let rev = SockRevNatValue {
        addr: key.addr,
        port: key.port,
        _pad: [0; 2],
        service_id: svc.service_id,
    };
    // SAFETY: the pointer comes from a successful lookup and is read at once, by value. If LRU eviction hands the
    // slot to another key meanwhile, we may read that key's value and skip the update; our entry is then missing
    // and the next forward translation of this socket writes it again.
    let current = LB_SOCK_REVNAT.get_ptr(rev_key).map(|p| unsafe { p.read() });
    if current == Some(rev) {
        return Ok(false);
    }
    LB_SOCK_REVNAT
        .insert(rev_key, rev, 0)
        .map_err(|_| Error::RevNatUpdate)?;
    Ok(true)
}

/// The socket's cookie: unique per socket for the kernel's lifetime, the same in every hook.
#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: bpf_get_socket_cookie takes the program's own context; allowed for every cgroup sock_addr hook.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

// Context accessors. Each field is read and written with one volatile 4-byte access at a constant offset. Kernel
// 6.18's `sock_addr_is_valid_access` takes only 4-byte stores here (8-byte ones only on an 8-aligned pair of user_ip6
// words) and rejects anything else with "invalid bpf_context access"; volatile keeps LLVM from narrowing the
// user_port store to 2 bytes or merging the user_ip6 words into a misaligned 8-byte store.

/// The socket's protocol as lb's map keys spell it; `None` for anything the socket LB leaves alone.
#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> Option<u8> {
    // SAFETY: ctx.sock_addr is the kernel's context pointer, valid for the program run; `protocol` is readable.
    let proto = unsafe { core::ptr::addr_of!((*ctx.sock_addr).protocol).read_volatile() };
    match proto {
        p if p == u32::from(PROTO_TCP) => Some(PROTO_TCP),
        p if p == u32::from(PROTO_UDP) => Some(PROTO_UDP),
        _ => None,
    }
}

/// The context's address in lb's 16-byte form.
#[inline(always)]
fn read_addr(ctx: &SockAddrContext, family: Family) -> [u8; 16] {
    let sa = ctx.sock_addr;
    match family {
        Family::V4 => {
            // SAFETY: valid context pointer; `user_ip4` is readable in every IPv4 sock_addr hook.
            let ip = unsafe { core::ptr::addr_of!((*sa).user_ip4).read_volatile() };
            // user_ip4 holds the address in network byte order, so its native-endian bytes are the octets.
            v4_mapped(ip.to_ne_bytes())
        }
        Family::V6 => {
            // SAFETY: valid context pointer; `user_ip6` is readable in every IPv6 sock_addr hook.
            let words = unsafe {
                [
                    core::ptr::addr_of!((*sa).user_ip6[0]).read_volatile(),
                    core::ptr::addr_of!((*sa).user_ip6[1]).read_volatile(),
                    core::ptr::addr_of!((*sa).user_ip6[2]).read_volatile(),
                    core::ptr::addr_of!((*sa).user_ip6[3]).read_volatile(),
                ]
            };
            words_to_bytes(words)
        }
    }
}

/// Writes a 16-byte address into the context. For an IPv4 hook the caller has checked that it is v4-mapped; an
/// IPv6 hook takes it as is, so a v4 backend reached from an IPv6 socket is written v4-mapped.
#[inline(always)]
fn write_addr(ctx: &SockAddrContext, family: Family, addr: &[u8; 16]) {
    let sa = ctx.sock_addr;
    match family {
        Family::V4 => {
            let ip = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
            // SAFETY: valid context pointer; `user_ip4` is writable in connect4, sendmsg4, recvmsg4, getpeername4.
            unsafe { core::ptr::addr_of_mut!((*sa).user_ip4).write_volatile(ip) };
        }
        Family::V6 => {
            let words = bytes_to_words(*addr);
            // SAFETY: valid context pointer; `user_ip6` is writable in connect6, sendmsg6, recvmsg6, getpeername6.
            unsafe {
                core::ptr::addr_of_mut!((*sa).user_ip6[0]).write_volatile(words[0]);
                core::ptr::addr_of_mut!((*sa).user_ip6[1]).write_volatile(words[1]);
                core::ptr::addr_of_mut!((*sa).user_ip6[2]).write_volatile(words[2]);
                core::ptr::addr_of_mut!((*sa).user_ip6[3]).write_volatile(words[3]);
            }
        }
    }
}

/// The context's port in host byte order. `user_port` keeps the network-order port in its low 16 bits.
#[inline(always)]
fn read_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: valid context pointer; `user_port` is readable in every sock_addr hook.
    let port = unsafe { core::ptr::addr_of!((*ctx.sock_addr).user_port).read_volatile() };
    u16::from_be(port as u16)
}

/// Writes a host-order port into the context, in network order.
#[inline(always)]
fn write_port(ctx: &SockAddrContext, port: u16) {
    // SAFETY: valid context pointer; `user_port` is writable (4 bytes) wherever the address is.
    unsafe {
        core::ptr::addr_of_mut!((*ctx.sock_addr).user_port).write_volatile(u32::from(port.to_be()))
    };
}

#[inline(always)]
fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, and every bit pattern is a valid value of either type; the bytes keep their memory order,
    // which is network order in both.
    unsafe { core::mem::transmute(words) }
}

#[inline(always)]
fn bytes_to_words(bytes: [u8; 16]) -> [u32; 4] {
    // SAFETY: as in `words_to_bytes`.
    unsafe { core::mem::transmute(bytes) }
}
