//! The socket LB's reverse translation (`LB_SOCK_REVNAT`).

/// `LB_SOCK_REVNAT` key: (socket cookie, backend address, backend port): what `recvmsg` and `getpeername` see
/// after the socket LB translated a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    pub cookie: u64,
    /// Backend address, network byte order.
    pub addr: [u8; 16],
    /// Backend port, host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// `LB_SOCK_REVNAT` value: the VIP the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRevNatValue {
    /// VIP, network byte order.
    pub addr: [u8; 16],
    /// Service port, host byte order.
    pub port: u16,
    pub _pad: [u8; 2],
    pub service_id: u32,
}

/// `LB_NETNS_ADDRS` value (key: network namespace cookie, `u64`): the namespace's own addresses, which a socket
/// created there will send from. The socket LB has no source address at `connect()` time (the kernel picks it after
/// the hook), so it reads it here to check `loadBalancerSourceRanges` (rule 9, which holds for this node's pods and
/// processes too). Written by the agent, which learns each namespace of its cgroup's processes (and those pinned
/// under `/run/netns`); a namespace it has not learned yet is outside every range.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NetnsAddrs {
    /// The namespace's IPv4 address, IPv4-mapped, network byte order (valid with `NETNS_HAS_V4`).
    pub v4: [u8; 16],
    /// Its IPv6 address, network byte order (valid with `NETNS_HAS_V6`).
    pub v6: [u8; 16],
    /// `NETNS_HAS_*` bits.
    pub flags: u8,
    pub _pad: [u8; 7],
}

/// `NetnsAddrs::flags`: `v4` holds the namespace's IPv4 address.
pub const NETNS_HAS_V4: u8 = 1;
/// `NetnsAddrs::flags`: `v6` holds the namespace's IPv6 address.
pub const NETNS_HAS_V6: u8 = 2;
