//! The kube source's memory of the cluster: one store per watched kind, fed by watcher events, and the pending
//! changes since the last sync. Pure (no I/O, no clock), so the relist and readiness rules are unit-tested here.
//!
//! Shaped after kube-proxy's `pkg/proxy/servicechangetracker.go` and `endpointschangetracker.go`: a change is kept
//! as `{previous, current}` per object, a later change of the same object keeps the first `previous`, and a change
//! that ends where it started (an update undone, a relist that returns what we had) is dropped, so it costs no sync.
//!
//! **Relist (kube-runtime 5):** after a `410 Gone` or a fresh start the watcher sends `Init`, one `InitApply` per
//! listed object, then `InitDone`, and never a `Delete` for objects that vanished meanwhile. The store buffers the
//! `InitApply`s and only at `InitDone` replaces its contents, recording as changes exactly the objects that differ
//! (added, modified, or absent from the new list = deleted). Until then the previous contents stay current, so a
//! sync in the middle of a relist never sees a half-listed (or empty) cluster.
//!
//! **Readiness:** [`Tracker::take`] returns nothing until Services, EndpointSlices and the Node have each completed
//! one list, so the agent writes no map before it knows both the Services and their EndpointSlices (no moment where
//! a Service exists but its backends look empty), and this node's Node object (possibly absent). ServiceCIDRs are
//! not waited for (kube-proxy does not wait for them either): until their first list the snapshot holds none, which
//! only means no address is dropped as unallocated (the safe side), and an API server that does not serve them
//! (older than 1.33 without the gate, or RBAC without `servicecidrs`) must not keep the agent from programming
//! anything. Their completed list is a change like any other and is synced then.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::model::{ClusterObjects, Diagnostic, EndpointSlice, Node, Service, ServiceCIDR};

/// The kinds the source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    ServiceCidr,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::ServiceCidr => "ServiceCIDR",
        })
    }
}

/// An object's identity within its kind: namespace (empty for Nodes) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// An object as the source keeps it: the model's object (shared with the translator, never copied), or why it
/// could not be read (reported on every sync, as a malformed manifest is, and otherwise skipped).
pub type Parsed<T> = Result<Arc<T>, Diagnostic>;

/// One watcher event for one kind, objects already converted: kube-runtime's `watcher::Event` with keys.
#[derive(Clone, Debug)]
pub enum Change<T> {
    Init,
    InitApply(ObjectKey, Parsed<T>),
    InitDone,
    Apply(ObjectKey, Parsed<T>),
    Delete(ObjectKey),
}

/// A typed event for any of the watched kinds.
#[derive(Clone, Debug)]
pub enum Update {
    Service(Change<Service>),
    EndpointSlice(Change<EndpointSlice>),
    Node(Change<Node>),
    ServiceCidr(Change<ServiceCIDR>),
}

/// What a store's event did to its contents, for the caller's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Objects whose content changed (added, modified or deleted). Zero for a no-op.
    pub changed: usize,
    /// True when this event completed a (re)list.
    pub list_done: bool,
    /// Objects the completed relist found gone (no `Delete` event is sent for them).
    pub vanished: usize,
}

/// One kind's objects (kube-runtime's reflector store, but with the relist buffered and diffed).
#[derive(Debug)]
struct Store<T> {
    current: BTreeMap<ObjectKey, Parsed<T>>,
    /// How many of `current` are unreadable: every sync reports them, and without any there is nothing to look for
    /// (a change then costs no visit of every object).
    unreadable: usize,
    /// Objects of a relist in progress (between `Init` and `InitDone`).
    relist: Option<BTreeMap<ObjectKey, Parsed<T>>>,
    /// A list has completed at least once.
    listed: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store {
            current: BTreeMap::new(),
            unreadable: 0,
            relist: None,
            listed: false,
        }
    }
}

/// `{previous, current}` of one object since the last sync; `None` = absent.
#[derive(Clone, Debug, PartialEq)]
struct Pending<T> {
    previous: Option<Parsed<T>>,
    current: Option<Parsed<T>>,
}

impl<T: PartialEq> Store<T> {
    fn apply(
        &mut self,
        change: Change<T>,
        pending: &mut BTreeMap<ObjectKey, Pending<T>>,
    ) -> Applied {
        let mut applied = Applied::default();
        match change {
            Change::Init => {
                // A relist restarts from nothing: objects of an interrupted earlier relist are not trusted.
                self.relist = Some(BTreeMap::new());
            }
            Change::InitApply(key, obj) => {
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key, obj);
            }
            Change::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                // Upserts first, then deletions: the order the objects are recorded in mirrors the order the
                // reconciler writes (it also writes new state before it deletes).
                for (key, obj) in &listed {
                    if self.current.get(key) != Some(obj) {
                        applied.changed += record(
                            pending,
                            key,
                            self.current.get(key).cloned(),
                            Some(obj.clone()),
                        );
                    }
                }
                for (key, old) in &self.current {
                    if !listed.contains_key(key) {
                        applied.vanished += 1;
                        applied.changed += record(pending, key, Some(old.clone()), None);
                    }
                }
                self.unreadable = listed.values().filter(|o| o.is_err()).count();
                self.current = listed;
                self.listed = true;
                applied.list_done = true;
            }
            Change::Apply(key, obj) => {
                let previous = self.current.insert(key.clone(), obj.clone());
                self.unreadable += usize::from(obj.is_err());
                self.unreadable -= usize::from(previous.as_ref().is_some_and(Result::is_err));
                if previous.as_ref() != Some(&obj) {
                    applied.changed += record(pending, &key, previous, Some(obj));
                }
            }
            Change::Delete(key) => {
                if let Some(previous) = self.current.remove(&key) {
                    self.unreadable -= usize::from(previous.is_err());
                    applied.changed += record(pending, &key, Some(previous), None);
                }
            }
        }
        applied
    }

    /// The readable objects in key order, and a diagnostic for each unreadable one.
    fn objects(&self, diagnostics: &mut Vec<Diagnostic>) -> Vec<Arc<T>> {
        let mut out = Vec::with_capacity(self.current.len());
        for obj in self.current.values() {
            match obj {
                Ok(o) => out.push(o.clone()),
                Err(d) => diagnostics.push(d.clone()),
            }
        }
        out
    }

    /// A diagnostic for each unreadable object (no copy of the readable ones).
    fn unreadable(&self, diagnostics: &mut Vec<Diagnostic>) {
        if self.unreadable == 0 {
            return;
        }
        diagnostics.extend(
            self.current
                .values()
                .filter_map(|o| o.as_ref().err().cloned()),
        );
    }
}

/// Merges one object's change into the pending set (kube-proxy's `ServiceChangeTracker.Update`): the first
/// `previous` is kept, and a change back to it is dropped. Returns 1 when the object's content changed.
fn record<T: PartialEq>(
    pending: &mut BTreeMap<ObjectKey, Pending<T>>,
    key: &ObjectKey,
    previous: Option<Parsed<T>>,
    current: Option<Parsed<T>>,
) -> usize {
    if previous == current {
        return 0;
    }
    let entry = pending.entry(key.clone()).or_insert(Pending {
        previous,
        current: None,
    });
    entry.current = current;
    if entry.previous == entry.current {
        pending.remove(key);
    }
    1
}

/// The objects to sync, taken from the tracker.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub contents: Contents,
    /// Every object that currently cannot be read, one diagnostic each (reported at every sync, as a malformed
    /// manifest is).
    pub diagnostics: Vec<Diagnostic>,
    /// The first snapshot: every kind has been listed once and nothing was synced before.
    pub initial: bool,
    /// How many objects changed since the previous snapshot (after dropping no-op changes).
    pub changes: usize,
    /// When the first event of the batch that produced this snapshot arrived (set by the source), so the
    /// network-programming latency includes the batching delay.
    pub first_event: Option<std::time::Instant>,
}

/// What a snapshot carries: everything, or only what changed. Handing out changes keeps a one-object change
/// from costing a copy of the whole cluster.
#[derive(Clone, Debug)]
pub enum Contents {
    /// Every readable object (the first snapshot, and [`Tracker::current`]).
    Full(ClusterObjects),
    /// The objects that changed since the previous snapshot.
    Changes(Delta),
}

/// Objects changed since the previous snapshot: the current version of each, `None` when it is gone or can no
/// longer be read. Nodes and ServiceCIDRs are few and come whole when any of them changed.
#[derive(Clone, Debug, Default)]
pub struct Delta {
    pub services: Vec<(ObjectKey, Option<Arc<Service>>)>,
    pub endpoint_slices: Vec<(ObjectKey, Option<Arc<EndpointSlice>>)>,
    pub nodes: Option<Vec<Arc<Node>>>,
    pub service_cidrs: Option<Vec<Arc<ServiceCIDR>>>,
}

impl Snapshot {
    /// The snapshot's objects, when it carries all of them.
    pub fn full(&self) -> Option<&ClusterObjects> {
        match &self.contents {
            Contents::Full(objects) => Some(objects),
            Contents::Changes(_) => None,
        }
    }
}

/// The three stores and the changes not yet synced.
#[derive(Debug, Default)]
pub struct Tracker {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    service_cidrs: Store<ServiceCIDR>,
    pending_services: BTreeMap<ObjectKey, Pending<Service>>,
    pending_slices: BTreeMap<ObjectKey, Pending<EndpointSlice>>,
    pending_nodes: BTreeMap<ObjectKey, Pending<Node>>,
    pending_service_cidrs: BTreeMap<ObjectKey, Pending<ServiceCIDR>>,
    synced_once: bool,
}

impl Tracker {
    pub fn apply(&mut self, update: Update) -> (Kind, Applied) {
        match update {
            Update::Service(c) => (
                Kind::Service,
                self.services.apply(c, &mut self.pending_services),
            ),
            Update::EndpointSlice(c) => (
                Kind::EndpointSlice,
                self.slices.apply(c, &mut self.pending_slices),
            ),
            Update::Node(c) => (Kind::Node, self.nodes.apply(c, &mut self.pending_nodes)),
            Update::ServiceCidr(c) => (
                Kind::ServiceCidr,
                self.service_cidrs.apply(c, &mut self.pending_service_cidrs),
            ),
        }
    }

    /// Every kind the first sync waits for (all but ServiceCIDR, see the module doc) has completed a list.
    pub fn ready(&self) -> bool {
        self.services.listed && self.slices.listed && self.nodes.listed
    }

    /// Kinds still waiting for their first list, for the log.
    pub fn unlisted(&self) -> Vec<Kind> {
        [
            (Kind::Service, self.services.listed),
            (Kind::EndpointSlice, self.slices.listed),
            (Kind::Node, self.nodes.listed),
        ]
        .into_iter()
        .filter(|(_, listed)| !listed)
        .map(|(k, _)| k)
        .collect()
    }

    /// Services and EndpointSlices changed since the last [`Tracker::take`] (kube-proxy's
    /// `sync_proxy_rules_{service,endpoint}_changes_pending`).
    pub fn pending_counts(&self) -> (usize, usize) {
        (self.pending_services.len(), self.pending_slices.len())
    }

    fn pending(&self) -> usize {
        self.pending_services.len()
            + self.pending_slices.len()
            + self.pending_nodes.len()
            + self.pending_service_cidrs.len()
    }

    /// What to sync, when it is worth a sync: never before [`Tracker::ready`], then everything once for the
    /// initial sync, and afterwards the objects that really changed. Clears the pending changes.
    pub fn take(&mut self) -> Option<Snapshot> {
        if !self.ready() {
            return None;
        }
        let changes = self.pending();
        if self.synced_once && changes == 0 {
            return None;
        }
        let initial = !self.synced_once;
        self.synced_once = true;
        let contents = if initial {
            Contents::Full(self.objects())
        } else {
            let mut diagnostics = Vec::new();
            Contents::Changes(Delta {
                services: latest(std::mem::take(&mut self.pending_services)),
                endpoint_slices: latest(std::mem::take(&mut self.pending_slices)),
                nodes: (!self.pending_nodes.is_empty())
                    .then(|| self.nodes.objects(&mut diagnostics)),
                service_cidrs: (!self.pending_service_cidrs.is_empty())
                    .then(|| self.service_cidrs.objects(&mut diagnostics)),
            })
        };
        // The changes went into `contents` (services and slices were taken there; the initial snapshot has them all).
        self.pending_services.clear();
        self.pending_slices.clear();
        self.pending_nodes.clear();
        self.pending_service_cidrs.clear();
        Some(Snapshot {
            contents,
            diagnostics: self.unreadable(),
            initial,
            changes,
            first_event: None,
        })
    }

    /// The whole current state whatever changed (for a forced resync), `None` before [`Tracker::ready`]. Leaves
    /// the pending changes alone.
    pub fn current(&self) -> Option<Snapshot> {
        if !self.ready() {
            return None;
        }
        Some(Snapshot {
            contents: Contents::Full(self.objects()),
            diagnostics: self.unreadable(),
            initial: false,
            changes: 0,
            first_event: None,
        })
    }

    fn objects(&self) -> ClusterObjects {
        let mut ignored = Vec::new();
        ClusterObjects {
            services: self.services.objects(&mut ignored),
            endpoint_slices: self.slices.objects(&mut ignored),
            nodes: self.nodes.objects(&mut ignored),
            service_cidrs: self.service_cidrs.objects(&mut ignored),
        }
    }

    /// A diagnostic for every object that cannot be read.
    fn unreadable(&self) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        self.services.unreadable(&mut out);
        self.slices.unreadable(&mut out);
        self.nodes.unreadable(&mut out);
        self.service_cidrs.unreadable(&mut out);
        out
    }
}

/// The current version of every pending object (`None`: gone or unreadable).
fn latest<T>(pending: BTreeMap<ObjectKey, Pending<T>>) -> Vec<(ObjectKey, Option<Arc<T>>)> {
    pending
        .into_iter()
        .map(|(key, p)| (key, p.current.and_then(Result::ok)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectMeta;
    use crate::model::objects::{ServiceCIDRSpec, ServiceSpec};

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn svc(name: &str, ip: &str) -> Parsed<Service> {
        Ok(Arc::new(Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    fn slice(name: &str) -> Parsed<EndpointSlice> {
        Ok(Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ..Default::default()
        }))
    }

    /// Feeds a full list of one kind: Init, InitApply..., InitDone.
    fn list<T>(
        t: &mut Tracker,
        wrap: impl Fn(Change<T>) -> Update,
        objs: Vec<(ObjectKey, Parsed<T>)>,
    ) {
        t.apply(wrap(Change::Init));
        for (k, o) in objs {
            t.apply(wrap(Change::InitApply(k, o)));
        }
        t.apply(wrap(Change::InitDone));
    }

    fn ready_tracker() -> Tracker {
        let mut t = Tracker::default();
        list(
            &mut t,
            Update::Service,
            vec![(key("web"), svc("web", "10.96.0.10"))],
        );
        list(
            &mut t,
            Update::EndpointSlice,
            vec![(key("web-1"), slice("web-1"))],
        );
        list(&mut t, Update::Node, vec![]);
        t
    }

    /// The Services the tracker holds after a snapshot.
    fn service_names(t: &Tracker) -> Vec<String> {
        t.current()
            .and_then(|s| s.full().cloned())
            .expect("a full current state")
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap_or_default())
            .collect()
    }

    fn delta(s: &Snapshot) -> &Delta {
        match &s.contents {
            Contents::Changes(d) => d,
            Contents::Full(_) => panic!("a full snapshot where changes were expected"),
        }
    }

    fn full(s: &Snapshot) -> &ClusterObjects {
        s.full().expect("a full snapshot")
    }

    #[test]
    fn nothing_is_taken_until_services_slices_and_node_are_listed() {
        let mut t = Tracker::default();
        list(
            &mut t,
            Update::Service,
            vec![(key("web"), svc("web", "10.96.0.10"))],
        );
        assert!(t.take().is_none(), "services alone must not sync");
        t.apply(Update::EndpointSlice(Change::Init));
        t.apply(Update::EndpointSlice(Change::InitApply(
            key("web-1"),
            slice("web-1"),
        )));
        list(&mut t, Update::Node, vec![]);
        assert!(
            t.take().is_none(),
            "a slice list still in progress must not sync"
        );
        assert_eq!(t.unlisted(), [Kind::EndpointSlice]);
        t.apply(Update::EndpointSlice(Change::InitDone));
        assert!(
            t.current().is_some(),
            "a forced resync may now read the objects"
        );
        let s = t.take().expect("ready");
        assert!(s.initial);
        assert_eq!(full(&s).endpoint_slices.len(), 1);
        assert!(t.take().is_none(), "nothing changed since");
    }

    fn service_cidr(name: &str, cidr: &str) -> (ObjectKey, Parsed<ServiceCIDR>) {
        let obj = ServiceCIDR {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceCIDRSpec {
                cidrs: Some(vec![cidr.into()]),
            }),
        };
        (
            ObjectKey {
                namespace: String::new(),
                name: name.into(),
            },
            Ok(Arc::new(obj)),
        )
    }

    #[test]
    fn service_cidrs_do_not_gate_the_first_sync_and_arrive_as_a_change() {
        // Services, slices and the Node listed, ServiceCIDRs not (an API server without them): the first sync
        // happens, with no CIDR, so nothing is dropped as unallocated.
        let mut t = ready_tracker();
        assert!(t.unlisted().is_empty());
        let first = t.take().expect("ready without ServiceCIDRs");
        assert!(first.initial && full(&first).service_cidrs.is_empty());
        // A half-done ServiceCIDR list changes nothing; its completion is one change.
        t.apply(Update::ServiceCidr(Change::Init));
        let (k, o) = service_cidr("kubernetes", "10.96.0.0/16");
        t.apply(Update::ServiceCidr(Change::InitApply(k, o)));
        assert!(t.take().is_none(), "a ServiceCIDR list in progress");
        t.apply(Update::ServiceCidr(Change::InitDone));
        let s = t.take().expect("the listed ServiceCIDR is a change");
        assert_eq!((s.initial, s.changes), (false, 1));
        assert_eq!(delta(&s).service_cidrs.as_ref().map(Vec::len), Some(1));
        // Deleted: the next snapshot holds none.
        t.apply(Update::ServiceCidr(Change::Delete(ObjectKey {
            namespace: String::new(),
            name: "kubernetes".into(),
        })));
        let s = t.take().expect("deletion");
        assert_eq!(delta(&s).service_cidrs.as_ref().map(Vec::len), Some(0));
    }

    #[test]
    fn initial_snapshot_is_taken_even_for_an_empty_cluster() {
        let mut t = Tracker::default();
        list::<Service>(&mut t, Update::Service, vec![]);
        list::<EndpointSlice>(&mut t, Update::EndpointSlice, vec![]);
        list::<Node>(&mut t, Update::Node, vec![]);
        let s = t.take().expect("an empty cluster is still a known cluster");
        assert!(s.initial && full(&s).services.is_empty());
    }

    #[test]
    fn relist_keeps_the_old_objects_until_init_done_and_then_drops_vanished_ones() {
        let mut t = ready_tracker();
        t.apply(Update::Service(Change::Apply(
            key("old"),
            svc("old", "10.96.0.11"),
        )));
        t.take().expect("old added");

        t.apply(Update::Service(Change::Init));
        t.apply(Update::Service(Change::InitApply(
            key("web"),
            svc("web", "10.96.0.10"),
        )));
        assert!(t.take().is_none(), "mid-relist: nothing changed yet");
        let (_, applied) = t.apply(Update::Service(Change::InitDone));
        assert_eq!(
            applied,
            Applied {
                changed: 1,
                list_done: true,
                vanished: 1
            }
        );
        let s = t.take().expect("the vanished service is a change");
        assert!(!s.initial);
        assert_eq!(s.changes, 1);
        let d = delta(&s);
        assert_eq!(d.services.len(), 1);
        assert_eq!(
            (d.services[0].0.name.as_str(), d.services[0].1.is_none()),
            ("old", true)
        );
        assert_eq!(service_names(&t), ["web"]);
    }

    #[test]
    fn relist_that_returns_the_same_objects_is_no_change() {
        let mut t = ready_tracker();
        t.take().expect("initial");
        list(
            &mut t,
            Update::Service,
            vec![(key("web"), svc("web", "10.96.0.10"))],
        );
        list(
            &mut t,
            Update::EndpointSlice,
            vec![(key("web-1"), slice("web-1"))],
        );
        assert!(
            t.take().is_none(),
            "an identical relist must not cause a sync"
        );
    }

    #[test]
    fn interrupted_relist_is_discarded_by_the_next_init() {
        let mut t = ready_tracker();
        t.take().expect("initial");
        t.apply(Update::Service(Change::Init));
        t.apply(Update::Service(Change::InitApply(
            key("ghost"),
            svc("ghost", "10.96.0.12"),
        )));
        // The list failed part way; kube-runtime starts over with a new Init.
        list(
            &mut t,
            Update::Service,
            vec![(key("web"), svc("web", "10.96.0.10"))],
        );
        assert!(
            t.take().is_none(),
            "the half list's object never became current"
        );
    }

    #[test]
    fn change_undone_before_the_sync_is_dropped_like_kube_proxy_does() {
        let mut t = ready_tracker();
        t.take().expect("initial");
        t.apply(Update::Service(Change::Apply(
            key("web"),
            svc("web", "10.96.0.99"),
        )));
        t.apply(Update::Service(Change::Apply(
            key("web"),
            svc("web", "10.96.0.10"),
        )));
        assert!(t.take().is_none(), "modified and back: no-op");
        t.apply(Update::Service(Change::Apply(
            key("tmp"),
            svc("tmp", "10.96.0.13"),
        )));
        t.apply(Update::Service(Change::Delete(key("tmp"))));
        assert!(t.take().is_none(), "added and deleted: no-op");
        t.apply(Update::Service(Change::Delete(key("web"))));
        let s = t.take().expect("deleted");
        assert_eq!(delta(&s).services.len(), 1);
        assert!(delta(&s).services[0].1.is_none());
        assert!(service_names(&t).is_empty());
    }

    #[test]
    fn unreadable_objects_become_diagnostics_and_the_rest_stay() {
        let mut t = ready_tracker();
        t.apply(Update::Service(Change::Apply(
            key("bad"),
            Err(Diagnostic::new(
                "Service default/bad",
                Some("spec.ports[0].port".into()),
                "invalid type",
            )),
        )));
        let s = t.take().expect("initial");
        assert_eq!(service_names(&t), ["web"]);
        assert_eq!(full(&s).services.len(), 1);
        assert_eq!(s.diagnostics.len(), 1);
        assert_eq!(s.diagnostics[0].object, "Service default/bad");
        // Still unreadable at the next change; fixed, it is no longer reported; broken and deleted, neither.
        t.apply(Update::Service(Change::Apply(
            key("x"),
            svc("x", "10.96.0.9"),
        )));
        assert_eq!(t.take().expect("a change").diagnostics.len(), 1);
        t.apply(Update::Service(Change::Apply(
            key("bad"),
            svc("bad", "10.96.0.8"),
        )));
        assert!(t.take().expect("a change").diagnostics.is_empty());
        let broken = || Err(Diagnostic::new("Service default/x", None, "invalid type"));
        t.apply(Update::Service(Change::Apply(key("x"), broken())));
        assert_eq!(t.take().expect("a change").diagnostics.len(), 1);
        t.apply(Update::Service(Change::Delete(key("x"))));
        assert!(t.take().expect("a change").diagnostics.is_empty());
    }

    #[test]
    fn deleting_an_unknown_object_is_no_change() {
        let mut t = ready_tracker();
        t.take().expect("initial");
        let (_, applied) = t.apply(Update::Service(Change::Delete(key("never-seen"))));
        assert_eq!(applied.changed, 0);
        assert!(t.take().is_none());
    }
}
