//! ClientIP session affinity (`LB_AFFINITY`).

/// `LB_AFFINITY` key: (service, client). The socket LB identifies a client by its network namespace cookie, since
/// at `connect()` time the socket has no source address yet and one pod is one namespace; the tc path uses the
/// client address and leaves the cookie 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    /// Client address, network byte order; zero for the socket LB.
    pub client_addr: [u8; 16],
    pub service_id: u32,
    pub _pad: u32,
}

/// `LB_AFFINITY` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last use; the entry is stale once this is older than the service's timeout.
    pub last_used_ns: u64,
}
