//! The socket LB's reverse translation: per socket in `LB_SOCK_PEER` (socket-local storage), and keyed by (socket,
//! backend) in `LB_SOCK_REVNAT` for the sockets that reach more than one.

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

/// `LB_SOCK_PEER` value (`BPF_MAP_TYPE_SK_STORAGE`: one per socket, created by the socket LB's connect hooks for
/// TCP sockets and freed with the socket): the backend the socket LB chose for this socket and the VIP it stands
/// for. A TCP socket has one peer; one translated again to another backend keeps its first here, sets
/// `SOCK_PEER_MULTI`, and records the others in `LB_SOCK_REVNAT` (where UDP sockets keep theirs: sock_diag reports
/// socket storage for TCP sockets only, and the agent needs to find the UDP sockets to end). Read by the reverse
/// hooks and, through sock_diag, by the agent (which sockets to end when their backend goes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockPeer {
    /// Backend address, network byte order.
    pub backend: [u8; 16],
    /// VIP, network byte order (`::ffff:a.b.c.d` for IPv4).
    pub vip: [u8; 16],
    /// Backend port, host byte order.
    pub backend_port: u16,
    /// Service port, host byte order.
    pub vip_port: u16,
    pub service_id: u32,
    /// `SOCK_PEER_*` bits; 0 in a storage just created.
    pub flags: u32,
    pub _pad: u32,
}

/// `SockPeer::flags`: the fields hold a translation.
pub const SOCK_PEER_SET: u32 = 1;
/// `SockPeer::flags`: the socket also reached other backends, recorded in `LB_SOCK_REVNAT`.
pub const SOCK_PEER_MULTI: u32 = 2;

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
