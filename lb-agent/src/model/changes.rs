//! What one translation changed per Service, for the agent's change log: a Service added, removed or updated,
//! with the backends and frontends it gained and lost. Computed from the Service's frontends before and after
//! its rebuild, so it says what the datapath will do, not what the objects said (an EndpointSlice update that
//! changes no usable endpoint is no change).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;

use crate::state::{Frontend, ServiceEntry};

/// How a Service's share of the datapath changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Removed,
    Updated,
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChangeKind::Added => "added",
            ChangeKind::Removed => "removed",
            ChangeKind::Updated => "updated",
        })
    }
}

/// One Service's change in one translation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceChange {
    pub namespace: String,
    pub name: String,
    pub kind: ChangeKind,
    /// Endpoints (`ip:targetPort`) some frontend of the Service uses now and none did before, and the reverse.
    pub backends_added: BTreeSet<SocketAddr>,
    pub backends_removed: BTreeSet<SocketAddr>,
    pub frontends_added: BTreeSet<Frontend>,
    pub frontends_removed: BTreeSet<Frontend>,
    /// Backends in use after the change (all frontends together).
    pub backends: usize,
}

fn backends(entries: &BTreeMap<Frontend, ServiceEntry>) -> BTreeSet<SocketAddr> {
    entries
        .values()
        .flat_map(|e| e.backends.iter().map(|b| SocketAddr::new(b.addr, b.port)))
        .collect()
}

/// The change from `old` to `new` frontends of Service `namespace/name` (`None`: it had or has none), or `None`
/// when the datapath entries are the same.
pub fn service_change(
    namespace: &str,
    name: &str,
    old: Option<&BTreeMap<Frontend, ServiceEntry>>,
    new: Option<&BTreeMap<Frontend, ServiceEntry>>,
) -> Option<ServiceChange> {
    let empty = BTreeMap::new();
    let (old_entries, new_entries) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
    if old_entries == new_entries {
        return None;
    }
    let kind = match (old_entries.is_empty(), new_entries.is_empty()) {
        (true, _) => ChangeKind::Added,
        (false, true) => ChangeKind::Removed,
        (false, false) => ChangeKind::Updated,
    };
    let (before, after) = (backends(old_entries), backends(new_entries));
    let keys = |m: &BTreeMap<Frontend, ServiceEntry>| m.keys().copied().collect::<BTreeSet<_>>();
    let (fb, fa) = (keys(old_entries), keys(new_entries));
    Some(ServiceChange {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        kind,
        backends_added: after.difference(&before).copied().collect(),
        backends_removed: before.difference(&after).copied().collect(),
        frontends_added: fa.difference(&fb).copied().collect(),
        frontends_removed: fb.difference(&fa).copied().collect(),
        backends: after.len(),
    })
}

/// A set as `a,b,c` (`-` when empty), for a log field.
pub fn list<T: fmt::Display>(items: &BTreeSet<T>) -> String {
    if items.is_empty() {
        return "-".to_owned();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Algorithm, Backend, Protocol, Scope, ServicePortName, VipKind};

    fn entry(backends: &[&str]) -> ServiceEntry {
        ServiceEntry {
            service: ServicePortName {
                namespace: "ns".into(),
                name: "web".into(),
                port: "http".into(),
            },
            kind: VipKind::ClusterIp,
            algorithm: Algorithm::Maglev,
            affinity_timeout: None,
            backends: backends
                .iter()
                .map(|b| {
                    let a: SocketAddr = b.parse().expect("addr");
                    Backend {
                        addr: a.ip(),
                        port: a.port(),
                        weight: 1,
                        local: false,
                    }
                })
                .collect(),
            drop_if_empty: false,
            source_ranges: Vec::new(),
        }
    }

    fn frontend(scope: Scope) -> Frontend {
        Frontend {
            addr: "10.96.0.10".parse().expect("ip"),
            port: 80,
            proto: Protocol::Tcp,
            scope,
        }
    }

    fn entries(list: &[(Scope, &[&str])]) -> BTreeMap<Frontend, ServiceEntry> {
        list.iter().map(|(s, b)| (frontend(*s), entry(b))).collect()
    }

    #[test]
    fn a_backend_swap_names_both_backends_and_nothing_else() {
        let old = entries(&[
            (Scope::Internal, &["10.0.0.1:8080", "10.0.0.2:8080"]),
            (Scope::External, &["10.0.0.1:8080", "10.0.0.2:8080"]),
        ]);
        let new = entries(&[
            (Scope::Internal, &["10.0.0.1:8080", "10.0.0.3:8080"]),
            (Scope::External, &["10.0.0.1:8080", "10.0.0.3:8080"]),
        ]);
        let c = service_change("ns", "web", Some(&old), Some(&new)).expect("a change");
        assert_eq!(c.kind, ChangeKind::Updated);
        assert_eq!(list(&c.backends_added), "10.0.0.3:8080");
        assert_eq!(list(&c.backends_removed), "10.0.0.2:8080");
        assert_eq!(list(&c.frontends_added), "-");
        assert_eq!(c.backends, 2);
    }

    #[test]
    fn added_removed_and_unchanged_services() {
        let some = entries(&[(Scope::Internal, &["10.0.0.1:8080"])]);
        let added = service_change("ns", "web", None, Some(&some)).expect("added");
        assert_eq!(added.kind, ChangeKind::Added);
        assert_eq!(added.frontends_added.len(), 1);
        let removed = service_change("ns", "web", Some(&some), None).expect("removed");
        assert_eq!(
            (removed.kind, list(&removed.backends_removed)),
            (ChangeKind::Removed, "10.0.0.1:8080".to_owned())
        );
        assert_eq!(service_change("ns", "web", Some(&some), Some(&some)), None);
        assert_eq!(
            service_change("ns", "web", None, Some(&BTreeMap::new())),
            None
        );
        // A change of the entry alone (here: affinity) is an update without backend or frontend lists.
        let mut affinity = some.clone();
        if let Some(e) = affinity.values_mut().next() {
            e.affinity_timeout = Some(10800);
        }
        let c = service_change("ns", "web", Some(&some), Some(&affinity)).expect("updated");
        assert!(
            c.backends_added.is_empty()
                && c.frontends_added.is_empty()
                && c.kind == ChangeKind::Updated
        );
    }
}
