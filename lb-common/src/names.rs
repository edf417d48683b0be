//! Map and program names as the object defines them and bpftool shows them.

/// Map names as the object defines them and bpftool shows them (kernel map names hold 15 characters).
pub mod map_names {
    pub const SERVICES: &str = "LB_SERVICES";
    pub const BACKENDS: &str = "LB_BACKENDS";
    /// Array of maps with one element: the slot array holding every service's lookup table.
    pub const MAGLEV: &str = "LB_MAGLEV";
    /// The slot array itself (`LB_MAGLEV`'s inner map), created, grown and pinned by the agent, which writes it
    /// through a memory mapping.
    pub const MAGLEV_SLOTS: &str = "LB_MAGLEV_SLOTS";
    pub const AFFINITY: &str = "LB_AFFINITY";
    pub const SOCK_REVNAT: &str = "LB_SOCK_REVNAT";
    pub const SVC_STATS: &str = "LB_SVC_STATS";
    pub const BE_STATS: &str = "LB_BE_STATS";
    pub const CONNTRACK: &str = "LB_CONNTRACK";
    pub const CONFIG: &str = "LB_CONFIG";
    pub const LOCAL_NETS: &str = "LB_LOCAL_NETS";
    pub const SRC_RANGES: &str = "LB_SRC_RANGES";
    pub const VIPS: &str = "LB_VIPS";
    pub const DROP_STATS: &str = "LB_DROP_STATS";
    /// The socket LB's refusals by reason (same indices as `DROP_STATS`).
    pub const SOCK_STATS: &str = "LB_SOCK_STATS";
    pub const TRACE: &str = "LB_TRACE";
    pub const FRAGMENTS: &str = "LB_FRAGMENTS";
    /// The cluster's service CIDRs (ServiceCIDR objects, or `--service-cidrs`); 15 characters at most, as every
    /// kernel map name.
    pub const SVC_CIDRS: &str = "LB_SVC_CIDRS";
    pub const XDP_L2: &str = "LB_XDP_L2";
    /// Each network namespace's own addresses, for the socket LB's source range check.
    pub const NETNS_ADDRS: &str = "LB_NETNS_ADDRS";
    /// `lb-agent monitor`'s ring buffer of datapath events, its gate and rate limit, and the per-CPU token buckets.
    pub const EVENTS: &str = "LB_EVENTS";
    pub const MONITOR: &str = "LB_MONITOR";
    pub const MONITOR_RATE: &str = "LB_MONITOR_RATE";
    /// Kubernetes names of the service ids, for operators; created by the agent, not by the object.
    pub const SVC_NAMES: &str = "LB_SVC_NAMES";
    /// Maps the agent creates and pins itself (no program uses them), so the loader does not know them.
    pub const AGENT_CREATED: [&str; 2] = [SVC_NAMES, MAGLEV_SLOTS];
    /// Every map the agent pins, in the order it creates them.
    pub const ALL: [&str; 22] = [
        SERVICES,
        BACKENDS,
        MAGLEV,
        AFFINITY,
        SOCK_REVNAT,
        SVC_STATS,
        BE_STATS,
        CONNTRACK,
        CONFIG,
        LOCAL_NETS,
        SRC_RANGES,
        VIPS,
        DROP_STATS,
        TRACE,
        FRAGMENTS,
        SVC_CIDRS,
        XDP_L2,
        NETNS_ADDRS,
        SOCK_STATS,
        EVENTS,
        MONITOR,
        MONITOR_RATE,
    ];
}

/// Program names as the object defines them (function names, which aya uses as program names).
pub mod prog_names {
    pub const CONNECT4: &str = "lb_connect4";
    pub const CONNECT6: &str = "lb_connect6";
    pub const SENDMSG4: &str = "lb_sendmsg4";
    pub const SENDMSG6: &str = "lb_sendmsg6";
    pub const RECVMSG4: &str = "lb_recvmsg4";
    pub const RECVMSG6: &str = "lb_recvmsg6";
    pub const GETPEERNAME4: &str = "lb_getpeername4";
    pub const GETPEERNAME6: &str = "lb_getpeername6";
    /// tc programs on the node's external interfaces (ingress: service DNAT and reply reverse-SNAT; egress: reverse
    /// DNAT of replies from local backends).
    pub const TC_INGRESS: &str = "lb_tc_ingress";
    pub const TC_EGRESS: &str = "lb_tc_egress";
    /// The XDP fast path on the same interfaces (`--xdp`): early source-range drops and established remote-backend
    /// flows translated and sent back out without the stack.
    pub const XDP: &str = "lb_xdp";
    pub const SOCK_ALL: [&str; 8] = [
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        RECVMSG4,
        RECVMSG6,
        GETPEERNAME4,
        GETPEERNAME6,
    ];
}
