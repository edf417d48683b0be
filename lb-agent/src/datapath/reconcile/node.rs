//! The per-packet datapath's node-level entries: `LB_CONFIG` (SNAT addresses, flags), `LB_LOCAL_NETS` (this node's
//! addresses and pod CIDRs), `LB_SVC_CIDRS`, `LB_VIPS` (ClusterIPs) and `LB_SRC_RANGES` (source ranges by service
//! id). Small maps, compared entry by entry with what the reconciler last wrote.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use lb_common::{
    ConfigValue, CtLifetimes, LOCAL_NET_NODE, LOCAL_NET_POD, VIP_FLAG_CLUSTER_IP, addr_bytes,
};

use super::super::maps::Maps;
use super::super::packet_maps::{NodeEntry, lpm_prefix};
use super::keys::{addrs_of, desired_entry_of_key, protocols, scopes, service_key};
use super::ledger::Ledger;
use super::retry::Retry;
use crate::state::{DesiredState, Frontend, Protocol, Scope, ServiceEntry, VipKind};

/// The per-service node entries a sync of changed frontends looks at (besides the few node-wide ones, which every
/// sync recomputes): the VIP entries of these addresses, the source-range entries of these service ids.
#[derive(Default)]
pub(super) struct NodeScope {
    pub(super) vips: BTreeSet<[u8; 16]>,
    pub(super) service_ids: BTreeSet<u32>,
}

/// What the node-level maps hold, as last written.
pub(super) struct NodeState {
    /// What `LB_LOCAL_NETS`, `LB_SRC_RANGES`, `LB_VIPS` and `LB_SVC_CIDRS` hold.
    entries: BTreeSet<NodeEntry>,
    /// What `LB_CONFIG` holds; `config_flags` are or-ed into it (`lb-agent trace` sets `CONFIG_FLAG_TRACE`).
    config: ConfigValue,
    config_flags: u32,
    host_netns_cookie: u64,
    ct_lifetimes: CtLifetimes,
}

impl NodeState {
    /// Adopts what the maps hold. The maps are small and rewritten whole when they differ; unreadable means
    /// "unknown", so the first sync writes everything.
    pub(super) fn restore(maps: &impl Maps) -> Self {
        Self {
            entries: maps
                .node_entries()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            config: maps.config().unwrap_or_default(),
            config_flags: 0,
            host_netns_cookie: 0,
            ct_lifetimes: CtLifetimes::default(),
        }
    }

    pub(super) fn add_config_flags(&mut self, flags: u32) {
        self.config_flags |= flags;
    }

    pub(super) fn set_host_netns_cookie(&mut self, cookie: u64) {
        self.host_netns_cookie = cookie;
    }

    pub(super) fn set_ct_lifetimes(&mut self, lifetimes: CtLifetimes) {
        self.ct_lifetimes = lifetimes;
    }

    /// Programs the node-level maps: SNAT addresses, this node's networks, the service CIDRs, the ClusterIP set and
    /// the source ranges of programmed services. Adds come before deletes, so a changed entry is never missing. A
    /// new service's ranges are written after its entry: for that instant its LoadBalancer IP drops everything, the
    /// safe side of rule 9.
    ///
    /// With a `scope` only the node-wide entries and the per-service entries of its addresses and service ids are
    /// compared (the rest are unchanged, see `Reconciler::run`); in the order the full comparison uses.
    pub(super) fn sync(
        &mut self,
        maps: &mut impl Maps,
        desired: &DesiredState,
        ledger: &Ledger,
        scope: Option<&NodeScope>,
        failed: &mut Retry,
    ) {
        let node = &desired.node;
        let config = ConfigValue {
            snat_v4: node.snat_address(true).map(addr_bytes).unwrap_or([0; 16]),
            snat_v6: node.snat_address(false).map(addr_bytes).unwrap_or([0; 16]),
            flags: self.config_flags,
            hz: crate::datapath::clock::kernel_hz(),
            host_netns_cookie: self.host_netns_cookie,
            ct_lifetimes: self.ct_lifetimes,
        };
        if config != self.config {
            match maps.put_config(&config) {
                Ok(()) => self.config = config,
                Err(e) => tracing::warn!(error = %e, "could not write the datapath configuration"),
            }
        }
        let mut want = BTreeSet::new();
        for &a in &node.addresses {
            let (prefix, addr) = lpm_prefix(a, 128);
            want.insert(NodeEntry::LocalNet {
                prefix,
                addr,
                kind: LOCAL_NET_NODE,
            });
        }
        for &(net, len) in &node.pod_cidrs {
            let (prefix, addr) = lpm_prefix(net, len);
            want.insert(NodeEntry::LocalNet {
                prefix,
                addr,
                kind: LOCAL_NET_POD,
            });
        }
        for &(net, len) in &desired.service_cidrs {
            let (prefix, addr) = lpm_prefix(net, len);
            want.insert(NodeEntry::ServiceCidr { prefix, addr });
        }
        let (added, stale): (Vec<NodeEntry>, Vec<NodeEntry>) = match scope {
            None => {
                for (frontend, entry) in &desired.services {
                    if entry.kind == VipKind::ClusterIp {
                        want.insert(NodeEntry::Vip {
                            addr: addr_bytes(frontend.addr),
                            flags: VIP_FLAG_CLUSTER_IP,
                        });
                    }
                    if entry.source_ranges.is_empty() {
                        continue;
                    }
                    let Some(id) = ledger.service_id(&service_key(frontend)) else {
                        continue;
                    };
                    insert_src_ranges(&mut want, id, entry);
                }
                (
                    want.difference(&self.entries).copied().collect(),
                    self.entries.difference(&want).copied().collect(),
                )
            }
            Some(scope) => {
                let mut have: BTreeSet<NodeEntry> = BTreeSet::new();
                have.extend(self.entries.range(local_nets()).copied());
                have.extend(self.entries.range(service_cidrs()).copied());
                for &addr in &scope.vips {
                    if vip_wanted(desired, addr) {
                        want.insert(NodeEntry::Vip {
                            addr,
                            flags: VIP_FLAG_CLUSTER_IP,
                        });
                    }
                    have.extend(self.entries.range(vips_of(addr)).copied());
                }
                for &id in &scope.service_ids {
                    // The frontend programmed under this id, if it is still desired.
                    if let Some(entry) = ledger
                        .key_of(id)
                        .and_then(|key| desired_entry_of_key(desired, key))
                    {
                        insert_src_ranges(&mut want, id, entry);
                    }
                    have.extend(self.entries.range(src_ranges_of(id)).copied());
                }
                (
                    want.difference(&have).copied().collect(),
                    have.difference(&want).copied().collect(),
                )
            }
        };
        for e in &added {
            match maps.put_node_entry(e) {
                Ok(()) => {
                    self.entries.insert(*e);
                }
                Err(err) => {
                    failed.node_entry_failed(e);
                    tracing::warn!(entry = ?e, error = %err, "could not write a node entry")
                }
            }
        }
        for e in stale {
            // A changed value under the same key was just written: deleting the old one would delete the new.
            let rewritten = want.range(same_slot(&e)).any(|w| w.same_key(&e));
            if rewritten || maps.delete_node_entry(&e).is_ok() {
                self.entries.remove(&e);
            } else {
                failed.node_entry_failed(&e);
            }
        }
    }
}

#[cfg(test)]
impl NodeState {
    pub(super) fn snapshot(&self) -> String {
        format!("{:?}", (&self.entries, self.config))
    }
}

/// Whether some desired ClusterIP frontend has this address: `desired.services` is ordered by frontend, whose
/// first field is the address, so its frontends are one range.
fn vip_wanted(desired: &DesiredState, bytes: [u8; 16]) -> bool {
    let min_proto = protocols().into_iter().min().unwrap_or(Protocol::Tcp);
    let min_scope = scopes().into_iter().min().unwrap_or(Scope::External);
    addrs_of(bytes).any(|addr| {
        let first = Frontend {
            addr,
            port: 0,
            proto: min_proto,
            scope: min_scope,
        };
        desired
            .services
            .range(first..)
            .take_while(|(f, _)| f.addr == addr)
            .any(|(_, e)| e.kind == VipKind::ClusterIp)
    })
}

fn insert_src_ranges(want: &mut BTreeSet<NodeEntry>, service_id: u32, entry: &ServiceEntry) {
    for &(net, len) in &entry.source_ranges {
        let (prefix, addr) = lpm_prefix(net, len);
        want.insert(NodeEntry::SrcRange {
            service_id,
            prefix,
            addr,
        });
    }
}

// Ranges of `NodeEntry` (ordered by variant, then by its fields in declaration order).

fn local_nets() -> RangeInclusive<NodeEntry> {
    NodeEntry::LocalNet {
        prefix: 0,
        addr: [0; 16],
        kind: 0,
    }..=NodeEntry::LocalNet {
        prefix: u32::MAX,
        addr: [u8::MAX; 16],
        kind: u8::MAX,
    }
}

fn service_cidrs() -> RangeInclusive<NodeEntry> {
    NodeEntry::ServiceCidr {
        prefix: 0,
        addr: [0; 16],
    }..=NodeEntry::ServiceCidr {
        prefix: u32::MAX,
        addr: [u8::MAX; 16],
    }
}

fn vips_of(addr: [u8; 16]) -> RangeInclusive<NodeEntry> {
    NodeEntry::Vip { addr, flags: 0 }..=NodeEntry::Vip {
        addr,
        flags: u8::MAX,
    }
}

fn src_ranges_of(service_id: u32) -> RangeInclusive<NodeEntry> {
    NodeEntry::SrcRange {
        service_id,
        prefix: 0,
        addr: [0; 16],
    }..=NodeEntry::SrcRange {
        service_id,
        prefix: u32::MAX,
        addr: [u8::MAX; 16],
    }
}

/// The entries that are one map slot with `e` ([`NodeEntry::same_key`]).
fn same_slot(e: &NodeEntry) -> RangeInclusive<NodeEntry> {
    match *e {
        NodeEntry::LocalNet { prefix, addr, .. } => {
            NodeEntry::LocalNet {
                prefix,
                addr,
                kind: 0,
            }..=NodeEntry::LocalNet {
                prefix,
                addr,
                kind: u8::MAX,
            }
        }
        NodeEntry::Vip { addr, .. } => vips_of(addr),
        other => other..=other,
    }
}
