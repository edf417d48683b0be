//! ClientIP affinity per Service port: the id all frontends of one Service port share in `LB_AFFINITY`, and which
//! entries a sync invalidates.
//!
//! kube-proxy keeps one `recent` list per endpoint chain of a Service port (`-m recent --name <endpoint chain>`
//! in pkg/proxy/iptables/proxier.go; the nftables proxier's per-endpoint affinity sets), and every chain of that
//! Service port (ClusterIP, NodePorts, externalIPs, LoadBalancer IPs) checks the lists of the endpoints it may send
//! to. lb keys the entry by an id of the Service port (`ServiceValue::affinity_id`); the datapath follows an entry
//! only to a backend the frontend's own table lists (lb-ebpf `select::with_affinity`).

use std::net::IpAddr;

use crate::state::{Frontend, ServiceEntry};

use super::super::maps::StaleAffinity;
use super::ledger::Ledger;

/// The affinity id of a frontend: 0 without affinity, else a stable 64-bit hash of its Service port, protocol and
/// address family (one proxier per family in kube-proxy; a pod reaching both ClusterIPs of a dual-stack Service
/// holds one affinity per family). Stable across agent restarts and builds, since it lives in the pinned maps.
pub(super) fn affinity_id(frontend: &Frontend, entry: &ServiceEntry) -> u64 {
    if entry.affinity_timeout.is_none() {
        return 0;
    }
    let s = &entry.service;
    let family = match frontend.addr {
        IpAddr::V4(_) => 4u8,
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => 4,
        IpAddr::V6(_) => 6,
    };
    let mut h = Fnv::default();
    // NUL never occurs in a Kubernetes name, so the fields cannot run into one another.
    for part in [&s.namespace, &s.name, &s.port] {
        h.write(part.as_bytes());
        h.write(&[0]);
    }
    h.write(&[frontend.proto.number(), family]);
    h.finish().max(1)
}

/// Records what a frontend of affinity id `id` stopped offering: `left` are backends it no longer sends to (after
/// the ledger was updated). Entries of backends no other frontend of the Service port still lists go, and every
/// entry of the id once no frontend uses it, so that a backend id or Service port that comes back inherits nothing.
pub(super) fn left(ledger: &Ledger, stale: &mut StaleAffinity, id: u64, left: &[u32]) {
    if id == 0 {
        return;
    }
    if !ledger.affinity_in_use(id) {
        stale.ids.insert(id);
        return;
    }
    stale.pairs.extend(
        left.iter()
            .filter(|b| !ledger.affinity_holds(id, **b))
            .map(|b| (id, *b)),
    );
}

/// FNV-1a, 64-bit, with murmur3's finaliser: stable, and plenty to tell Service ports apart.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}
