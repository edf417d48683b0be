//! The service tables: frontends (`LB_SERVICES`), backends (`LB_BACKENDS`), their counters and names.

use crate::addr::{addr_bytes, addr_from_bytes};

/// `LB_SERVICES` key: one virtual service, a (VIP, port, protocol) as seen from one scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// VIP, network byte order (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// Service port, host byte order.
    pub port: u16,
    /// `PROTO_TCP`, `PROTO_UDP` or `PROTO_SCTP`.
    pub proto: u8,
    /// `SCOPE_EXTERNAL` or `SCOPE_INTERNAL`.
    pub scope: u8,
}

impl ServiceKey {
    pub const fn new(addr: core::net::IpAddr, port: u16, proto: u8, scope: u8) -> Self {
        Self {
            addr: addr_bytes(addr),
            port,
            proto,
            scope,
        }
    }

    pub fn ip(&self) -> core::net::IpAddr {
        addr_from_bytes(self.addr)
    }
}

/// `LB_SERVICES` value.
///
/// The service's lookup table is a region of the flat slot array (`LB_MAGLEV`'s one inner array, see
/// [`SlotBlock`]) at `table_offset`: `table_size` slots of `slot_width` bytes each. With `LUT_WIDTH_U8` or
/// `LUT_WIDTH_U16` the region starts with the table's `backend_count` backend ids (`u32`, little-endian) and each
/// slot holds an index into that list; with `LUT_WIDTH_U32` each slot holds a backend id itself (random selection's
/// plain backend list, and Maglev tables of more than 65536 backends). Slot `key % table_size` is the pick.
///
/// The agent writes a new table into a free region and only then switches this entry to it with one update, so a
/// reader sees the old table or the new one, whole; a region is reused only after an RCU grace period, so a reader
/// that read the old offset never finds another table there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Agent-allocated id: index into `LB_SVC_STATS`, key of `LB_SVC_NAMES` and `LB_SRC_RANGES`. Stable across
    /// agent restarts (restored from this map).
    pub service_id: u32,
    /// Number of distinct backends; 0 means reject (or drop, with `SVC_FLAG_DROP_NO_BACKEND`). The length of the
    /// table's backend id list with `LUT_WIDTH_U8` / `LUT_WIDTH_U16`.
    pub backend_count: u32,
    /// ClientIP session affinity timeout in seconds; 0 = no affinity.
    pub affinity_timeout: u32,
    /// `ALG_MAGLEV` or `ALG_RANDOM`.
    pub algorithm: u8,
    /// `SVC_FLAG_*` bits.
    pub flags: u8,
    /// `LUT_WIDTH_*`: bytes per slot; 0 when the service has no table.
    pub slot_width: u8,
    pub _pad: u8,
    /// Byte offset of the table's region in the slot array (a multiple of `LUT_BLOCK_BYTES`).
    pub table_offset: u32,
    /// Slots in the table (the Maglev table size M, or the backend count for random selection); 0 = no table.
    pub table_size: u32,
    /// Agent bookkeeping, ignored by the datapath: a hash of the table's region, so a restarted agent knows whether
    /// the table already holds what it would write without reading it back, and which entries share one table.
    pub table_hash: u64,
}

/// One element of the flat slot array (the inner array of `LB_MAGLEV`): 16 little-endian `u32` words, 64 bytes.
/// Tables are regions of whole blocks; byte `b` of the array is byte `b % 64` of block `b / 64`. Array elements are
/// rounded up to 8 bytes by the kernel, so a block of 64 wastes nothing where a `u32` element would waste half.
pub type SlotBlock = [u32; LUT_BLOCK_WORDS];

/// `u32` words per [`SlotBlock`].
pub const LUT_BLOCK_WORDS: usize = 16;
/// Bytes per [`SlotBlock`]; regions start and end on block boundaries.
pub const LUT_BLOCK_BYTES: u32 = (LUT_BLOCK_WORDS * 4) as u32;

/// `ServiceValue::slot_width`: one byte per slot, an index into the table's backend list (at most 256 backends).
pub const LUT_WIDTH_U8: u8 = 1;
/// Two bytes per slot, an index into the table's backend list (at most 65536 backends).
pub const LUT_WIDTH_U16: u8 = 2;
/// Four bytes per slot, a backend id.
pub const LUT_WIDTH_U32: u8 = 4;

/// `LB_BACKENDS` value (key: backend id, `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BackendValue {
    /// Endpoint address, network byte order (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// Target port, host byte order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_FLAG_*` bits (`BACKEND_FLAG_LOCAL`: the endpoint is on this node).
    pub flags: u8,
}

impl BackendValue {
    pub const fn new(addr: core::net::IpAddr, port: u16, proto: u8) -> Self {
        Self {
            addr: addr_bytes(addr),
            port,
            proto,
            flags: 0,
        }
    }

    pub fn ip(&self) -> core::net::IpAddr {
        addr_from_bytes(self.addr)
    }
}

/// `LB_SVC_STATS` value (per-CPU array indexed by service id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    /// Connections (TCP `connect`, UDP `connect`/first `sendmsg`) the socket LB translated.
    pub sock_connects: u64,
    /// `connect`/`sendmsg` calls rejected because the service had no backend.
    pub sock_rejects: u64,
    /// Packets and bytes the tc/XDP datapath forwarded (filled by the per-packet programs).
    pub packets: u64,
    pub bytes: u64,
    /// Packets dropped (no usable backend under a Local policy, source range, ...).
    pub drops: u64,
}

/// `LB_BE_STATS` value (per-CPU array indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    pub sock_connects: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// Room for `namespace/name:port` (63 + 1 + 63 + 1 + 15 bytes, Kubernetes' own limits) and a NUL.
pub const SERVICE_NAME_LEN: usize = 144;

/// `ServiceNameValue::kind`: which kind of VIP the frontend is.
pub const VIP_KIND_CLUSTER_IP: u8 = 0;
pub const VIP_KIND_EXTERNAL_IP: u8 = 1;
pub const VIP_KIND_LOAD_BALANCER: u8 = 2;
pub const VIP_KIND_NODE_PORT: u8 = 3;

/// `LB_SVC_NAMES` value (hash, key: service id `u32`): the Kubernetes service port behind a service id, so the CLI
/// and the metrics can name services without the agent. Written by the agent after every sync (deleted with the
/// service); no program reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceNameValue {
    /// `namespace/name:port` (`:port` only for a named port), UTF-8, NUL-padded.
    pub name: [u8; SERVICE_NAME_LEN],
    /// `VIP_KIND_*`.
    pub kind: u8,
    pub _pad: [u8; 7],
}

impl ServiceNameValue {
    /// Stores `name`, cut at a character boundary if it is longer than the field (a valid Kubernetes name never is).
    pub fn new(name: &str, kind: u8) -> Self {
        let mut end = name.len().min(SERVICE_NAME_LEN - 1);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; SERVICE_NAME_LEN];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        Self {
            name: bytes,
            kind,
            _pad: [0; 7],
        }
    }

    /// The stored name; empty if the bytes are not UTF-8.
    pub fn name(&self) -> &str {
        let len = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(SERVICE_NAME_LEN);
        core::str::from_utf8(&self.name[..len]).unwrap_or("")
    }
}
