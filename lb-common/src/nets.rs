//! The address sets the datapath matches by prefix: local networks, source ranges, ClusterIPs, service CIDRs.

/// `LB_LOCAL_NETS` (LPM trie, key data: a 16-byte address; the prefix length counts its bits, 96 + n for an IPv4
/// /n) value kinds: a pod CIDR of this node, or one of its own addresses.
pub const LOCAL_NET_POD: u8 = 1;
pub const LOCAL_NET_NODE: u8 = 2;

/// `LB_SRC_RANGES` key data (LPM trie): (service id, source prefix). The prefix length = 32 (the id, matched whole)
/// + the address bits (96 + n for IPv4 /n). Value: `u8` 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SrcRangeData {
    /// Service id, big-endian bytes, so the trie matches it as the leading 32 bits.
    pub service_id: [u8; 4],
    pub addr: [u8; 16],
}

/// `LB_VIPS` value flag: the address is a ClusterIP (rule 8: an undefined port or protocol on it rejects).
pub const VIP_FLAG_CLUSTER_IP: u8 = 1;

/// `LB_SVC_CIDRS` (LPM trie, key data: a 16-byte address, prefix length as in `LB_LOCAL_NETS`) value: the prefix
/// is a service CIDR. An address inside one that is no ClusterIP (`LB_VIPS`) is unallocated (rule 8: drop).
pub const SVC_CIDR: u8 = 1;
