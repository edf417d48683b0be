//! The translation kept across syncs, so one changed object costs the work of its Service, not of the cluster.
//!
//! kube-proxy gets the same effect from its change trackers (`ServiceChangeTracker`, `EndpointsChangeTracker`):
//! only the Services with pending changes are rebuilt, and the nftables proxier rewrites only their chains. Here
//! every Service's share of the desired state (its frontends, diagnostics and health check) is kept as a [`Part`],
//! rebuilt only when the Service, one of its EndpointSlices, the node or the configuration changed. Frontends two
//! Services claim go to the older one ([`Claimant`]: `creationTimestamp`, then namespace/name; docs/semantics.md rule 1),
//! as in a full translation, so the result never depends on the order changes arrived in: after any sequence of changes the [`Translation`] equals what
//! [`translate`](super::translate) computes from the same objects (a property test checks this). The set of
//! frontends whose entry changed is handed to the reconciler, which then visits only those.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::changes::{ServiceChange, service_change};
use super::endpoint_slices::{SliceIndex, index_slice, listed_addresses};
use super::objects::{
    ClusterObjects, DEFAULT_NAMESPACE, Diagnostic, EndpointSlice, Node, Service, ServiceCIDR,
    object_label,
};
use super::{ModelConfig, NodeContext, ServiceHealth, Translation};
use super::{frontends, health, node, service_cidrs, service_ports};
use crate::state::{Frontend, ServiceEntry, ServicePortName};

/// A namespaced object's identity: (namespace, name).
pub type ObjectRef = (String, String);

/// One Service's share of the desired state.
#[derive(Debug, Default)]
struct Part {
    /// Its frontends, conflicts between its own ports already resolved.
    entries: BTreeMap<Frontend, ServiceEntry>,
    diagnostics: Vec<Diagnostic>,
    health: Option<ServiceHealth>,
}

/// A Service claiming a frontend, ordered as the rule for two claims on one VIP, port and protocol wants it: the
/// older Service keeps it (`creationTimestamp`), then namespace/name decides. A Service without a
/// `creationTimestamp` (a manifest file that does not say) counts as the newest: a Service of unknown age never
/// takes a frontend from one whose age is known.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claimant {
    age_unknown: bool,
    created: Option<k8s_openapi::jiff::Timestamp>,
    key: ObjectRef,
}

impl Claimant {
    fn of(svc: &Service, key: &ObjectRef) -> Claimant {
        let created = svc.metadata.creation_timestamp.as_ref().map(|t| t.0);
        Claimant {
            age_unknown: created.is_none(),
            created,
            key: key.clone(),
        }
    }
}

/// One EndpointSlice as last seen, with what it contributed.
#[derive(Debug)]
struct SliceRecord {
    /// The object, shared with the source that keeps it: a repeat is told from a real change by comparing it.
    object: Arc<EndpointSlice>,
    /// The Service it is indexed under; `None` when it is unusable.
    service: Option<String>,
    diagnostics: Vec<Diagnostic>,
    /// Every address it lists (for `DesiredState::endpoint_addresses`).
    addresses: Vec<IpAddr>,
}

/// The incremental translation: feed it object changes, then [`Translator::translate`].
#[derive(Debug)]
pub struct Translator {
    cfg: ModelConfig,
    node: NodeContext,
    /// Shared with the source that keeps them (the kube source's tracker): one copy of each object in the agent.
    services: BTreeMap<ObjectRef, Arc<Service>>,
    slices: BTreeMap<ObjectRef, SliceRecord>,
    index: SliceIndex,
    nodes: Vec<Arc<Node>>,
    service_cidr_objects: Vec<Arc<ServiceCIDR>>,
    parts: BTreeMap<ObjectRef, Part>,
    /// Every Service claiming a frontend, oldest first: the first one serves it.
    claims: BTreeMap<Frontend, Vec<Claimant>>,
    /// Frontends claimed by more than one Service (each loser is a diagnostic).
    contested: BTreeSet<Frontend>,
    /// Services whose part has diagnostics or a health check, and slices with diagnostics: what a translation
    /// collects at the end, without visiting every Service and slice.
    noted_parts: BTreeSet<ObjectRef>,
    noted_slices: BTreeSet<ObjectRef>,
    /// How many slices list each address.
    address_refs: BTreeMap<IpAddr, usize>,
    /// How many frontends of the desired state each Service (namespace, name) has: the Services served, counted
    /// as they change instead of by a visit of every frontend.
    served: BTreeMap<ObjectRef, usize>,
    /// Diagnostics about the input as a whole (duplicates, nameless objects) from [`Translator::replace_all`].
    input_diagnostics: Vec<Diagnostic>,
    cidr_diagnostics: Vec<Diagnostic>,
    out: Translation,
    dirty: BTreeSet<ObjectRef>,
    all_dirty: bool,
    node_dirty: bool,
    cidrs_dirty: bool,
    changed: BTreeSet<Frontend>,
    /// Per Service, what the last translation changed (for the change log).
    service_changes: Vec<ServiceChange>,
    /// Object changes taken in since the start (kube-proxy's `sync_proxy_rules_*_changes_total`).
    counts: ChangeCounts,
}

/// Adds `by` (+1 or -1) to the frontends counted for `service`'s Service, forgetting it at zero.
fn count_served(served: &mut BTreeMap<ObjectRef, usize>, service: &ServicePortName, by: isize) {
    let key = (service.namespace.clone(), service.name.clone());
    let n = served.entry(key).or_insert(0);
    *n = n.saturating_add_signed(by);
    if *n == 0 {
        served.remove(&(service.namespace.clone(), service.name.clone()));
    }
}

/// Object changes a translator has taken in: adds, updates and deletes that differ from what it had.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeCounts {
    pub services: u64,
    pub endpoint_slices: u64,
}

impl Translator {
    pub fn new(cfg: ModelConfig, node: NodeContext) -> Self {
        Translator {
            index: SliceIndex::new(&node.name),
            cfg,
            node,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            nodes: Vec::new(),
            service_cidr_objects: Vec::new(),
            parts: BTreeMap::new(),
            claims: BTreeMap::new(),
            contested: BTreeSet::new(),
            noted_parts: BTreeSet::new(),
            noted_slices: BTreeSet::new(),
            address_refs: BTreeMap::new(),
            served: BTreeMap::new(),
            input_diagnostics: Vec::new(),
            cidr_diagnostics: Vec::new(),
            out: Translation::default(),
            dirty: BTreeSet::new(),
            all_dirty: true,
            node_dirty: true,
            cidrs_dirty: true,
            changed: BTreeSet::new(),
            service_changes: Vec::new(),
            counts: ChangeCounts::default(),
        }
    }

    /// What the last [`Translator::translate`] changed, per Service whose datapath entries changed.
    pub fn service_changes(&self) -> &[ServiceChange] {
        &self.service_changes
    }

    /// Object changes taken in so far.
    pub fn change_counts(&self) -> ChangeCounts {
        self.counts
    }

    /// The translation as of the last [`Translator::translate`].
    pub fn translation(&self) -> &Translation {
        &self.out
    }

    /// How many Services have a frontend in the desired state.
    pub fn services_served(&self) -> usize {
        self.served.len()
    }

    pub fn into_translation(self) -> Translation {
        self.out
    }

    /// New settings: every Service is rebuilt at the next translation (only if they differ).
    pub fn set_config(&mut self, cfg: &ModelConfig) {
        if *cfg != self.cfg {
            self.cfg = cfg.clone();
            self.all_dirty = true;
            self.cidrs_dirty = true;
        }
    }

    /// This node's name, addresses and zone: every Service is rebuilt when they differ (locality, NodePort
    /// addresses and topology all depend on them).
    pub fn set_node(&mut self, node: &NodeContext) {
        if *node != self.node {
            self.node = node.clone();
            self.index.set_node_name(&node.name);
            self.all_dirty = true;
            self.node_dirty = true;
        }
    }

    /// The Node objects last given (this node's, for the caller's [`node_context`](super::node_context)).
    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }

    pub fn set_nodes(&mut self, nodes: &[Arc<Node>]) {
        if nodes != self.nodes.as_slice() {
            self.nodes = nodes.to_vec();
            self.node_dirty = true;
        }
    }

    pub fn set_service_cidrs(&mut self, cidrs: &[Arc<ServiceCIDR>]) {
        if cidrs != self.service_cidr_objects.as_slice() {
            self.service_cidr_objects = cidrs.to_vec();
            self.cidrs_dirty = true;
        }
    }

    pub fn upsert_service(&mut self, key: ObjectRef, svc: impl Into<Arc<Service>>) {
        let svc = svc.into();
        if self.services.get(&key) != Some(&svc) {
            self.services.insert(key.clone(), svc);
            self.dirty.insert(key);
            self.counts.services += 1;
        }
    }

    pub fn remove_service(&mut self, key: &ObjectRef) {
        if self.services.remove(key).is_some() {
            self.dirty.insert(key.clone());
            self.counts.services += 1;
        }
    }

    pub fn upsert_slice(&mut self, key: ObjectRef, slice: impl Into<Arc<EndpointSlice>>) {
        let slice = slice.into();
        if self.slices.get(&key).is_some_and(|r| r.object == slice) {
            return;
        }
        let existed = self.slices.contains_key(&key);
        self.remove_slice(&key);
        // An update counts once, not as the remove and add it is made of.
        if existed {
            self.counts.endpoint_slices -= 1;
        }
        self.counts.endpoint_slices += 1;
        let mut diagnostics = Vec::new();
        let indexed = index_slice(&slice, &key.0, &key.1, &mut diagnostics);
        let service = indexed.as_ref().map(|i| i.service().to_owned());
        if let Some(indexed) = indexed {
            self.dirty
                .insert((key.0.clone(), indexed.service().to_owned()));
            self.index.insert(&key.0, &key.1, indexed);
        }
        let addresses = listed_addresses(&slice);
        for &a in &addresses {
            let n = self.address_refs.entry(a).or_insert(0);
            *n += 1;
            if *n == 1 {
                self.out.state.endpoint_addresses.insert(a);
            }
        }
        if !diagnostics.is_empty() {
            self.noted_slices.insert(key.clone());
        }
        self.slices.insert(
            key,
            SliceRecord {
                object: slice,
                service,
                diagnostics,
                addresses,
            },
        );
    }

    pub fn remove_slice(&mut self, key: &ObjectRef) {
        let Some(record) = self.slices.remove(key) else {
            return;
        };
        self.counts.endpoint_slices += 1;
        self.noted_slices.remove(key);
        if let Some(service) = record.service {
            self.index.remove(&key.0, &key.1, &service);
            self.dirty.insert((key.0.clone(), service));
        }
        for a in record.addresses {
            if let Some(n) = self.address_refs.get_mut(&a) {
                *n -= 1;
                if *n == 0 {
                    self.address_refs.remove(&a);
                    self.out.state.endpoint_addresses.remove(&a);
                }
            }
        }
    }

    /// Makes the inputs equal `objects` (a whole snapshot, e.g. re-read manifests): only what differs from the
    /// previous inputs is marked for rebuilding. A Service or slice given twice is taken from its last definition,
    /// as `kubectl apply` of the files in order would leave it. Takes the objects by value: at 10k Services a copy
    /// would be tens of megabytes.
    pub fn replace_all(&mut self, objects: ClusterObjects) {
        let mut diagnostics = Vec::new();

        let mut services: BTreeMap<ObjectRef, Arc<Service>> = BTreeMap::new();
        for svc in objects.services {
            let namespace = namespace_of(svc.metadata.namespace.as_deref());
            let name = svc.metadata.name.clone().unwrap_or_default();
            if name.is_empty() {
                // The validation reports it; there is nothing to key it by.
                let skipped = service_ports::service_info(&svc, &self.cfg, &mut diagnostics);
                debug_assert!(skipped.is_none(), "an unnamed Service passed validation");
                continue;
            }
            if services
                .insert((namespace.clone(), name.clone()), svc)
                .is_some()
            {
                diagnostics.push(Diagnostic::new(
                    object_label("Service", Some(&namespace), Some(&name)),
                    None,
                    "defined more than once; the last definition is used",
                ));
            }
        }
        let gone: Vec<ObjectRef> = self
            .services
            .keys()
            .filter(|k| !services.contains_key(*k))
            .cloned()
            .collect();
        for key in &gone {
            self.remove_service(key);
        }
        for (key, svc) in services {
            self.upsert_service(key, svc);
        }

        let mut slices: BTreeMap<ObjectRef, Arc<EndpointSlice>> = BTreeMap::new();
        for slice in objects.endpoint_slices {
            let namespace = namespace_of(slice.metadata.namespace.as_deref());
            let Some(name) = slice.metadata.name.clone().filter(|n| !n.is_empty()) else {
                diagnostics.push(Diagnostic::new(
                    object_label("EndpointSlice", Some(&namespace), None),
                    Some("metadata.name".to_owned()),
                    "an EndpointSlice needs a name; skipped",
                ));
                continue;
            };
            if slices
                .insert((namespace.clone(), name.clone()), slice)
                .is_some()
            {
                diagnostics.push(Diagnostic::new(
                    object_label("EndpointSlice", Some(&namespace), Some(&name)),
                    None,
                    "defined more than once; the last definition is used",
                ));
            }
        }
        let gone: Vec<ObjectRef> = self
            .slices
            .keys()
            .filter(|k| !slices.contains_key(*k))
            .cloned()
            .collect();
        for key in &gone {
            self.remove_slice(key);
        }
        for (key, slice) in slices {
            self.upsert_slice(key, slice);
        }

        self.set_nodes(&objects.nodes);
        self.set_service_cidrs(&objects.service_cidrs);
        self.input_diagnostics = diagnostics;
    }

    /// Rebuilds what changed since the last call and returns the frontends whose entry was added, changed or
    /// removed (the reconciler's work list). The result is then in [`Translator::translation`].
    pub fn translate(&mut self) -> BTreeSet<Frontend> {
        let dirty: Vec<ObjectRef> = if self.all_dirty {
            self.dirty.clear();
            self.services
                .keys()
                .chain(self.parts.keys())
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            std::mem::take(&mut self.dirty).into_iter().collect()
        };
        let mut touched: BTreeSet<Frontend> = BTreeSet::new();
        self.service_changes.clear();
        for key in dirty {
            self.noted_parts.remove(&key);
            let old = self.parts.remove(&key);
            if let Some(old) = &old {
                for f in old.entries.keys() {
                    self.unclaim(f, &key);
                    touched.insert(*f);
                }
            }
            let new = self.services.get(&key).map(|svc| {
                (
                    build_part(svc, &self.cfg, &self.index, &self.node),
                    Claimant::of(svc, &key),
                )
            });
            self.service_changes.extend(service_change(
                &key.0,
                &key.1,
                old.as_ref().map(|p| &p.entries),
                new.as_ref().map(|(p, _)| &p.entries),
            ));
            if let Some((part, claimant)) = new {
                for f in part.entries.keys() {
                    self.claim(f, &claimant);
                    touched.insert(*f);
                }
                if !part.diagnostics.is_empty() || part.health.is_some() {
                    self.noted_parts.insert(key.clone());
                }
                self.parts.insert(key, part);
            }
        }
        for f in touched {
            let want = self
                .claims
                .get(&f)
                .and_then(|c| c.first())
                .and_then(|c| self.parts.get(&c.key))
                .and_then(|p| p.entries.get(&f));
            let have = self.out.state.services.get(&f);
            match (want, have) {
                (Some(w), Some(h)) if w == h => {}
                (None, None) => {}
                (Some(w), _) => {
                    let w = w.clone();
                    count_served(&mut self.served, &w.service, 1);
                    if let Some(old) = self.out.state.services.insert(f, w) {
                        count_served(&mut self.served, &old.service, -1);
                    }
                    self.changed.insert(f);
                }
                (None, Some(_)) => {
                    if let Some(old) = self.out.state.services.remove(&f) {
                        count_served(&mut self.served, &old.service, -1);
                    }
                    self.changed.insert(f);
                }
            }
        }
        if self.node_dirty {
            self.out.state.node = node::node_nets(&self.nodes, &self.node);
        }
        if self.cidrs_dirty {
            let mut diagnostics = Vec::new();
            self.out.state.service_cidrs = service_cidrs::service_cidrs(
                &self.service_cidr_objects,
                &self.cfg,
                &mut diagnostics,
            );
            self.cidr_diagnostics = diagnostics;
        }
        self.out.health = self
            .noted_parts
            .iter()
            .filter_map(|k| self.parts.get(k))
            .filter_map(|p| p.health.clone())
            .collect();
        self.out.diagnostics = self.diagnostics();
        self.all_dirty = false;
        self.node_dirty = false;
        self.cidrs_dirty = false;
        std::mem::take(&mut self.changed)
    }

    fn claim(&mut self, f: &Frontend, claimant: &Claimant) {
        let claimants = self.claims.entry(*f).or_default();
        if let Err(at) = claimants.binary_search(claimant) {
            claimants.insert(at, claimant.clone());
        }
        if claimants.len() > 1 {
            self.contested.insert(*f);
        }
    }

    fn unclaim(&mut self, f: &Frontend, key: &ObjectRef) {
        let Some(claimants) = self.claims.get_mut(f) else {
            return;
        };
        // By key: the claim was made with the Service's age as it was then.
        claimants.retain(|c| &c.key != key);
        if claimants.len() < 2 {
            self.contested.remove(f);
        }
        if claimants.is_empty() {
            self.claims.remove(f);
        }
    }

    /// Every current diagnostic: the input's, each slice's, each Service's, the service CIDRs', and one per
    /// frontend a later Service could not have.
    fn diagnostics(&self) -> Vec<Diagnostic> {
        // Only the noted slices and Services have any: a change costs the diagnostics there are, not a visit of
        // every slice and Service (the same order, both sets being sorted by the same keys).
        let mut out = self.input_diagnostics.clone();
        out.extend(
            self.noted_slices
                .iter()
                .filter_map(|k| self.slices.get(k))
                .flat_map(|r| r.diagnostics.iter().cloned()),
        );
        out.extend(
            self.noted_parts
                .iter()
                .filter_map(|k| self.parts.get(k))
                .flat_map(|p| p.diagnostics.iter().cloned()),
        );
        out.extend(self.cidr_diagnostics.iter().cloned());
        for f in &self.contested {
            let Some(claimants) = self.claims.get(f) else {
                continue;
            };
            let entry_of = |c: &Claimant| self.parts.get(&c.key).and_then(|p| p.entries.get(f));
            let Some(winner) = claimants.first().and_then(entry_of) else {
                continue;
            };
            for loser in &claimants[1..] {
                let Some(lost) = entry_of(loser) else {
                    continue;
                };
                out.push(Diagnostic::new(
                    object_label("Service", Some(&loser.key.0), Some(&loser.key.1)),
                    None,
                    format!(
                        "{f} ({:?}) is already served for {}; not added for {}",
                        f.scope, winner.service, lost.service
                    ),
                ));
            }
        }
        out
    }
}

fn namespace_of(namespace: Option<&str>) -> String {
    namespace
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_owned()
}

/// One Service's frontends, diagnostics and health check, from the current slices.
fn build_part(svc: &Service, cfg: &ModelConfig, slices: &SliceIndex, node: &NodeContext) -> Part {
    let mut diagnostics = Vec::new();
    let Some(info) = service_ports::service_info(svc, cfg, &mut diagnostics) else {
        return Part {
            diagnostics,
            ..Part::default()
        };
    };
    let mut builder = frontends::StateBuilder::default();
    builder.localhost_nodeports = cfg.localhost_nodeports;
    builder.add_service(&info, slices, node);
    let health = health::service_health(svc, &info, slices);
    let (state, conflicts) = builder.finish();
    diagnostics.extend(conflicts);
    Part {
        entries: state.services,
        diagnostics,
        health,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{ip, parse, worker};
    use super::super::translate;
    use super::*;

    /// xorshift64: deterministic, so a failing step reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn coin(&mut self) -> bool {
            self.below(2) == 0
        }
    }

    const NAMESPACES: [&str; 2] = ["ns0", "ns1"];
    const SERVICES: u64 = 5;
    const SLICES: u64 = 8;

    /// A random Service `ns/sI`: few ClusterIPs and externalIPs, so Services conflict over frontends; every type
    /// and policy; now and then an invalid port, so diagnostics come and go.
    fn random_service(rng: &mut Rng, ns: &str, i: u64) -> String {
        let cluster_ip = format!("10.96.0.{}", 1 + rng.below(3));
        let mut ports = vec!["{name: http, port: 80, targetPort: 8080}".to_owned()];
        if rng.coin() {
            ports.push("{name: dns, port: 53, protocol: UDP, targetPort: 5353}".to_owned());
        }
        if rng.below(10) == 0 {
            ports.push("{name: bad, port: 0}".to_owned());
        }
        let kind = rng.below(3);
        if kind > 0 {
            for (n, p) in ports.iter_mut().enumerate() {
                p.insert_str(
                    p.len() - 1,
                    &format!(", nodePort: {}", 30000 + i * 10 + n as u64),
                );
            }
        }
        let mut spec = format!("clusterIP: {cluster_ip}, ports: [{}]", ports.join(", "));
        spec += match kind {
            0 => ", type: ClusterIP",
            1 => ", type: NodePort",
            _ => ", type: LoadBalancer",
        };
        if kind == 2 {
            spec += &format!(", healthCheckNodePort: {}", 32000 + i);
        }
        if kind > 0 && rng.coin() {
            spec += ", externalTrafficPolicy: Local";
        }
        if rng.coin() {
            spec += ", internalTrafficPolicy: Local";
        }
        if rng.below(3) == 0 {
            spec += ", externalIPs: [203.0.113.5]";
        }
        let status = if kind == 2 && rng.coin() {
            "\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.7}]}}"
        } else {
            ""
        };
        // Ages decide conflicts: some Services are as old as others, some have no age at all.
        let created = match rng.below(3) {
            0 => String::new(),
            d => format!(", creationTimestamp: \"2025-01-0{d}T00:00:00Z\""),
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: {ns}{created}}}\nspec: {{{spec}}}{status}\n"
        )
    }

    /// A random EndpointSlice `ns/eI` of a random Service (or of none), with endpoints on this node and others,
    /// in every condition, with zone hints now and then.
    fn random_slice(rng: &mut Rng, ns: &str, i: u64) -> String {
        let labels = if rng.below(8) == 0 {
            String::new()
        } else {
            format!(
                ", labels: {{kubernetes.io/service-name: s{}}}",
                rng.below(SERVICES)
            )
        };
        let mut endpoints = Vec::new();
        for _ in 0..rng.below(4) {
            let hints = if rng.below(4) == 0 {
                format!(
                    ", hints: {{forZones: [{{name: zone-{}}}]}}",
                    ["a", "b"][rng.below(2) as usize]
                )
            } else {
                String::new()
            };
            endpoints.push(format!(
                "{{addresses: [10.1.0.{}], nodeName: worker-{}, zone: zone-a, conditions: {{ready: {}, serving: {}, terminating: {}}}{hints}}}",
                rng.below(6),
                1 + rng.below(2),
                rng.coin(),
                rng.coin(),
                rng.coin()
            ));
        }
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: e{i}, namespace: {ns}{labels}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        )
    }

    /// The translation as it was written before the [`Translator`]: one pass over every object with one
    /// `StateBuilder`, kept here as an independent reference for the conflict and ordering rules.
    fn one_pass(objects: &ClusterObjects, node: &NodeContext, cfg: &ModelConfig) -> Translation {
        let mut diagnostics = Vec::new();
        let slices = SliceIndex::build(&objects.endpoint_slices, &node.name, &mut diagnostics);
        let mut by_key = BTreeMap::new();
        for svc in &objects.services {
            let namespace = namespace_of(svc.metadata.namespace.as_deref());
            let name = svc.metadata.name.clone().unwrap_or_default();
            by_key.insert((namespace, name), svc);
        }
        // The first to claim a frontend keeps it: the oldest first, as the conflict rule says.
        let services: BTreeMap<Claimant, &Service> = by_key
            .into_iter()
            .map(|(key, svc)| (Claimant::of(svc, &key), &**svc))
            .collect();
        let mut state = frontends::StateBuilder::default();
        state.localhost_nodeports = cfg.localhost_nodeports;
        let mut health = Vec::new();
        for svc in services.values() {
            if let Some(info) = service_ports::service_info(svc, cfg, &mut diagnostics) {
                state.add_service(&info, &slices, node);
                health.extend(health::service_health(svc, &info, &slices));
            }
        }
        // Health checks are listed by Service, whatever order the Services were added in.
        health.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let (mut state, conflicts) = state.finish();
        state.node = node::node_nets(&objects.nodes, node);
        state.endpoint_addresses = objects
            .endpoint_slices
            .iter()
            .flat_map(|s| listed_addresses(s))
            .collect();
        state.service_cidrs =
            service_cidrs::service_cidrs(&objects.service_cidrs, cfg, &mut diagnostics);
        diagnostics.extend(conflicts);
        Translation {
            state,
            diagnostics,
            health,
        }
    }

    fn sorted(d: Vec<Diagnostic>) -> Vec<(String, Option<String>, String)> {
        let mut v: Vec<_> = d
            .into_iter()
            .map(|d| (d.object, d.field, d.message))
            .collect();
        v.sort();
        v
    }

    /// Frontends whose entries differ between two states.
    fn differing(a: &Translation, b: &Translation) -> BTreeSet<Frontend> {
        a.state
            .services
            .keys()
            .chain(b.state.services.keys())
            .filter(|f| a.state.services.get(f) != b.state.services.get(f))
            .copied()
            .collect()
    }

    #[test]
    fn incremental_translation_equals_a_full_one_after_every_change() {
        let mut rng = Rng(0x005e_ed1b_2026);
        let mut services: BTreeMap<ObjectRef, String> = BTreeMap::new();
        let mut slices: BTreeMap<ObjectRef, String> = BTreeMap::new();
        let other_node = NodeContext {
            name: "worker-2".into(),
            addresses: vec![ip("192.168.0.11")],
            nodeport_addresses: None,
            zone: Some("zone-b".into()),
        };
        let mut node = worker();
        let mut cfg = ModelConfig::default();
        let mut translator = Translator::new(cfg.clone(), node.clone());
        translator.translate();
        let mut previous = translator.translation().clone();
        let mut changes_seen = 0;
        for step in 0..1500 {
            let ns = NAMESPACES[rng.below(2) as usize];
            match rng.below(20) {
                0..=6 => {
                    let i = rng.below(SERVICES);
                    let yaml = random_service(&mut rng, ns, i);
                    let svc = parse(&yaml).services.remove(0);
                    translator.upsert_service((ns.into(), format!("s{i}")), svc);
                    services.insert((ns.into(), format!("s{i}")), yaml);
                }
                7..=8 => {
                    let key = (ns.to_owned(), format!("s{}", rng.below(SERVICES)));
                    translator.remove_service(&key);
                    services.remove(&key);
                }
                9..=15 => {
                    let i = rng.below(SLICES);
                    let yaml = random_slice(&mut rng, ns, i);
                    let slice = parse(&yaml).endpoint_slices.remove(0);
                    translator.upsert_slice((ns.into(), format!("e{i}")), slice);
                    slices.insert((ns.into(), format!("e{i}")), yaml);
                }
                16..=17 => {
                    let key = (ns.to_owned(), format!("e{}", rng.below(SLICES)));
                    translator.remove_slice(&key);
                    slices.remove(&key);
                }
                18 => {
                    node = if node == worker() {
                        other_node.clone()
                    } else {
                        worker()
                    };
                    translator.set_node(&node);
                }
                _ => {
                    cfg.localhost_nodeports = !cfg.localhost_nodeports;
                    translator.set_config(&cfg);
                }
            }
            // Several changes between translations now and then, as a batch of events gives.
            if rng.below(3) == 0 {
                continue;
            }
            let changed = translator.translate();
            let yaml: Vec<&str> = services
                .values()
                .chain(slices.values())
                .map(String::as_str)
                .collect();
            let objects = parse(&yaml.join("---\n"));
            let full = translate(&objects, &node, &cfg);
            let reference = one_pass(&objects, &node, &cfg);
            assert_eq!(full.state, reference.state, "step {step}");
            assert_eq!(full.health, reference.health, "step {step}");
            assert_eq!(
                sorted(full.diagnostics.clone()),
                sorted(reference.diagnostics),
                "step {step}"
            );
            let incremental = translator.translation();
            assert_eq!(incremental.state, full.state, "step {step}");
            assert_eq!(incremental.health, full.health, "step {step}");
            assert_eq!(
                sorted(incremental.diagnostics.clone()),
                sorted(full.diagnostics.clone()),
                "step {step}"
            );
            assert_eq!(changed, differing(&previous, &full), "step {step}");
            let served: BTreeSet<(&String, &String)> = full
                .state
                .services
                .values()
                .map(|e| (&e.service.namespace, &e.service.name))
                .collect();
            assert_eq!(translator.services_served(), served.len(), "step {step}");
            changes_seen += changed.len();
            previous = full;
        }
        // The generator must exercise something: frontends, conflicts, health checks and diagnostics.
        assert!(changes_seen > 500, "only {changes_seen} frontend changes");
    }

    #[test]
    fn conflicting_frontend_moves_to_the_next_service_when_its_owner_leaves() {
        let a = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {clusterIP: 10.96.0.1, externalIPs: [203.0.113.5], ports: [{port: 80}]}\n";
        let b = "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: ns}\nspec: {clusterIP: 10.96.0.2, externalIPs: [203.0.113.5], ports: [{port: 80}]}\n";
        let mut t = Translator::new(ModelConfig::default(), worker());
        for yaml in [a, b] {
            let svc = parse(yaml).services.remove(0);
            let name = svc.metadata.name.clone().unwrap_or_default();
            t.upsert_service(("ns".into(), name), svc);
        }
        t.translate();
        let external = |t: &Translator| {
            t.translation()
                .state
                .services
                .iter()
                .find(|(f, _)| {
                    f.addr == ip("203.0.113.5") && f.scope == crate::state::Scope::External
                })
                .map(|(_, e)| e.service.name.clone())
        };
        assert_eq!(external(&t), Some("a".into()));
        assert_eq!(
            t.translation().diagnostics.len(),
            2,
            "{:?}",
            t.translation().diagnostics
        );

        t.remove_service(&("ns".into(), "a".into()));
        let changed = t.translate();
        assert_eq!(external(&t), Some("b".into()));
        assert!(changed.iter().any(|f| f.addr == ip("203.0.113.5")));
        assert!(
            t.translation().diagnostics.is_empty(),
            "{:?}",
            t.translation().diagnostics
        );
    }

    #[test]
    fn the_older_service_keeps_a_contested_frontend_whatever_the_order_changes_arrive_in() {
        let svc = |name: &str, created: &str| {
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns, creationTimestamp: \"{created}\"}}\nspec: {{clusterIP: 10.96.0.{}, externalIPs: [203.0.113.5], ports: [{{port: 80}}]}}\n",
                if name == "a" { 1 } else { 2 }
            );
            parse(&yaml).services.remove(0)
        };
        let owner = |t: &Translator| {
            t.translation()
                .state
                .services
                .iter()
                .find(|(f, _)| f.addr == ip("203.0.113.5"))
                .map(|(_, e)| e.service.name.clone())
        };
        let mut t = Translator::new(ModelConfig::default(), worker());
        // The newer one first: it serves until the older one arrives.
        t.upsert_service(("ns".into(), "a".into()), svc("a", "2025-06-01T00:00:00Z"));
        t.translate();
        assert_eq!(owner(&t), Some("a".into()));
        t.upsert_service(("ns".into(), "z".into()), svc("z", "2025-01-01T00:00:00Z"));
        let changed = t.translate();
        assert_eq!(owner(&t), Some("z".into()));
        assert!(changed.iter().any(|f| f.addr == ip("203.0.113.5")));
        let objects: Vec<&str> = t
            .translation()
            .diagnostics
            .iter()
            .map(|d| d.object.as_str())
            .collect();
        assert_eq!(objects, ["Service ns/a", "Service ns/a"]);
        // Recreated (a new creationTimestamp), the older one yields.
        t.upsert_service(("ns".into(), "z".into()), svc("z", "2025-09-01T00:00:00Z"));
        t.translate();
        assert_eq!(owner(&t), Some("a".into()));
    }

    #[test]
    fn an_unchanged_object_changes_nothing() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        let objects = parse(yaml);
        let mut t = Translator::new(ModelConfig::default(), worker());
        t.replace_all(objects.clone());
        assert_eq!(t.translate().len(), 2, "one ClusterIP port, two scopes");
        t.replace_all(objects.clone());
        assert!(t.translate().is_empty());
        t.upsert_service(("ns".into(), "a".into()), objects.services[0].clone());
        assert!(t.translate().is_empty());
    }
}
