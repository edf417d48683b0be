//! ClientIP session affinity (`LB_AFFINITY`).

/// `LB_AFFINITY` key: (Service port, client). The socket LB identifies a client by its network namespace cookie,
/// since at `connect()` time the socket has no source address yet and one pod is one namespace; the tc path uses
/// the client address and leaves the cookie 0.
///
/// The affinity is per Service port (and address family), not per frontend: its ClusterIP, NodePorts, externalIPs
/// and LoadBalancer IPs share one entry per client, as kube-proxy's per-endpoint `recent` lists do
/// (`ServiceValue::affinity_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    /// Client address, network byte order; zero for the socket LB.
    pub client_addr: [u8; 16],
    /// `ServiceValue::affinity_id` of the frontend the client used.
    pub affinity_id: u64,
}

/// `LB_AFFINITY` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last use; the entry is stale once this is older than the service's timeout.
    pub last_used_ns: u64,
    /// `ServiceValue::table_hash` of the frontend that last used the entry. The backend is in that table; through
    /// a frontend with another table (another frontend of the Service port with a narrower set, such as a NodePort
    /// under `externalTrafficPolicy: Local`, or the same one after its backends changed) it is followed only if the
    /// table lists it, as kube-proxy follows a `recent` match only to an endpoint its chain holds.
    pub table_hash: u64,
}
