//! Verdicts and their reasons (`LB_DROP_STATS`, `LB_TRACE`).

/// Verdicts of the per-packet programs, as `LB_TRACE` records them.
pub const VERDICT_PASS: u32 = 0;
pub const VERDICT_FORWARD: u32 = 1;
pub const VERDICT_DROP: u32 = 2;
pub const VERDICT_REJECT: u32 = 3;

/// Reasons, the index of `LB_DROP_STATS` and `TraceValue.reason`.
pub mod reason {
    /// Not a service packet (or forwarded: no reason needed).
    pub const NONE: u32 = 0;
    /// A new flow picked a backend.
    pub const NEW_FLOW: u32 = 1;
    /// An established flow followed its conntrack entry.
    pub const CONNTRACK: u32 = 2;
    /// A reply was translated back.
    pub const REPLY: u32 = 3;
    /// Rule 8: the service has no endpoints at all.
    pub const NO_ENDPOINTS: u32 = 4;
    /// Rule 5: endpoints exist but none is local under a Local policy.
    pub const NO_LOCAL_ENDPOINT: u32 = 5;
    /// Rule 9: the source is outside `loadBalancerSourceRanges`.
    pub const SOURCE_RANGE: u32 = 6;
    /// Rule 12: the flow's backend was deleted.
    pub const BACKEND_GONE: u32 = 7;
    /// Rule 8: a ClusterIP reached on a port or protocol its Service does not define.
    pub const UNKNOWN_PORT: u32 = 8;
    /// The packet is too short or inconsistent to be handled.
    pub const MALFORMED: u32 = 9;
    /// A later IPv4/IPv6 fragment with no `LB_FRAGMENTS` entry (its first fragment was not seen, came later, or
    /// was not translated): it carries no ports to match, so it passes untouched.
    pub const FRAGMENT: u32 = 10;
    /// A remote backend needs SNAT but no SNAT address of the family is configured, or no SNAT port was free.
    pub const NO_SNAT: u32 = 11;
    /// Conntrack could not be written (map full).
    pub const CT_FULL: u32 = 12;
    /// The lookup table or backend vanished under a concurrent update.
    pub const NO_BACKEND: u32 = 13;
    /// Building the reject reply failed.
    pub const REJECT_FAILED: u32 = 14;
    /// A later fragment translated as its datagram's first fragment was (`LB_FRAGMENTS`).
    pub const FRAGMENT_FOLLOWED: u32 = 15;
    /// Rule 8: the destination is inside a service CIDR but no Service holds it (kube-proxy nftables'
    /// "Drop traffic to unallocated ClusterIPs").
    pub const UNALLOCATED_CLUSTER_IP: u32 = 16;
    /// XDP translated a packet of an established remote-backend flow (client -> backend: DNAT + SNAT) and sent it
    /// out itself (XDP_TX / redirect), without the stack or tc.
    pub const XDP_FORWARD: u32 = 17;
    /// XDP translated a reply of such a flow (backend -> client: both reverse translations) and sent it out.
    pub const XDP_REPLY: u32 = 18;
    /// `CONFIG_FLAG_PASS_UNTRACKED_TCP`: a TCP packet to a frontend that is neither a SYN nor part of a flow lb
    /// tracks passed to the stack, where another proxy's conntrack (kube-proxy's DNAT) translates it.
    pub const UNTRACKED_TCP: u32 = 19;
    /// Number of reasons (size of `LB_DROP_STATS`).
    pub const COUNT: u32 = 20;

    /// The name `lb-agent trace` prints.
    pub const fn name(reason: u32) -> &'static str {
        match reason {
            NEW_FLOW => "new-flow",
            CONNTRACK => "conntrack",
            REPLY => "reply",
            NO_ENDPOINTS => "no-endpoints",
            NO_LOCAL_ENDPOINT => "no-local-endpoint",
            SOURCE_RANGE => "source-range",
            BACKEND_GONE => "backend-gone",
            UNKNOWN_PORT => "unknown-port",
            MALFORMED => "malformed",
            FRAGMENT => "fragment",
            NO_SNAT => "no-snat",
            CT_FULL => "conntrack-full",
            NO_BACKEND => "no-backend",
            REJECT_FAILED => "reject-failed",
            FRAGMENT_FOLLOWED => "fragment-followed",
            UNALLOCATED_CLUSTER_IP => "unallocated-cluster-ip",
            XDP_FORWARD => "xdp-forward",
            XDP_REPLY => "xdp-reply",
            UNTRACKED_TCP => "untracked-tcp",
            _ => "not-a-service",
        }
    }
}

/// `LB_TRACE` value (array of one, written only with `CONFIG_FLAG_TRACE`): the last verdict of the tc programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceValue {
    /// `VERDICT_*`.
    pub verdict: u32,
    /// `reason::*`.
    pub reason: u32,
    pub service_id: u32,
    pub backend_id: u32,
    /// 1 when the source was rewritten (SNAT).
    pub snat: u32,
    /// Incremented on every record, so a reader can tell a fresh record from a stale one.
    pub seq: u32,
}
