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
