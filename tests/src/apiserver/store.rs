//! The API server's storage: objects per resource, a global resourceVersion, the event history watches replay, and
//! compaction. Pure data, no I/O; `http.rs` serves it.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The resources the server holds (what lb watches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
    ServiceCidrs,
    /// Not watched by lb; the cluster's controllers (`controllers/`) derive EndpointSlices from them.
    Pods,
}

impl Resource {
    pub const ALL: [Resource; 5] = [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Nodes,
        Resource::ServiceCidrs,
        Resource::Pods,
    ];

    pub fn from_kind(kind: &str) -> Option<Resource> {
        match kind {
            "Service" => Some(Resource::Services),
            "EndpointSlice" => Some(Resource::EndpointSlices),
            "Node" => Some(Resource::Nodes),
            "ServiceCIDR" => Some(Resource::ServiceCidrs),
            "Pod" => Some(Resource::Pods),
            _ => None,
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Nodes => "Node",
            Resource::ServiceCidrs => "ServiceCIDR",
            Resource::Pods => "Pod",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Resource::Services | Resource::Nodes | Resource::Pods => "v1",
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            Resource::ServiceCidrs => "networking.k8s.io/v1",
        }
    }

    /// The URL path segment (`/api/v1/<plural>`).
    pub fn plural(self) -> &'static str {
        match self {
            Resource::Services => "services",
            Resource::EndpointSlices => "endpointslices",
            Resource::Nodes => "nodes",
            Resource::ServiceCidrs => "servicecidrs",
            Resource::Pods => "pods",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Resource::Nodes | Resource::ServiceCidrs)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change in the history.
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    pub resource: Resource,
    pub ty: EventType,
    /// The object before the change (for selector transitions), `None` when added.
    pub old: Option<Value>,
    pub object: Value,
}

impl Event {
    /// The event as a watcher with `selector` sees it, as the real API server's cacher turns selector transitions
    /// into events: an object that starts matching is ADDED, one that stops matching is DELETED.
    pub fn for_watcher(&self, selector: &Selector) -> Option<(EventType, &Value)> {
        let was = self.old.as_ref().is_some_and(|o| selector.matches(o));
        let is = selector.matches(&self.object);
        match self.ty {
            EventType::Deleted => was.then_some((EventType::Deleted, &self.object)),
            _ => match (was, is) {
                (true, true) => Some((EventType::Modified, &self.object)),
                (false, true) => Some((EventType::Added, &self.object)),
                (true, false) => Some((EventType::Deleted, &self.object)),
                (false, false) => None,
            },
        }
    }
}

/// A watch asked for history the server no longer has (`410 Gone`).
#[derive(Debug, PartialEq, Eq)]
pub struct Gone {
    pub requested: u64,
    pub oldest: u64,
}

type Key = (String, String);

#[derive(Debug, Default)]
pub struct Store {
    rv: u64,
    /// Watches from a resourceVersion below this one get `410 Gone`.
    compacted: u64,
    objects: BTreeMap<Resource, BTreeMap<Key, Value>>,
    history: Vec<Event>,
}

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Creates or replaces an object (what `kubectl apply` ends in), stamping resourceVersion, uid and the default
    /// namespace as the API server does.
    pub fn upsert(&mut self, mut object: Value) -> Result<Event, String> {
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .ok_or("object without kind")?;
        let resource =
            Resource::from_kind(kind).ok_or_else(|| format!("unsupported kind {kind}"))?;
        let meta = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or("object without metadata")?;
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .ok_or("object without metadata.name")?
            .to_owned();
        let namespace = if resource.namespaced() {
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_owned();
            meta.insert("namespace".into(), json!(ns));
            ns
        } else {
            String::new()
        };
        self.rv += 1;
        let key = (namespace, name);
        let store = self.objects.entry(resource).or_default();
        let old = store.get(&key).cloned();
        let uid = old
            .as_ref()
            .and_then(|o| o.pointer("/metadata/uid").cloned())
            .unwrap_or_else(|| json!(format!("uid-{}", self.rv)));
        meta.insert("uid".into(), uid);
        meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        // Set on creation and kept across updates, as the API server does; a value given on creation is kept (a
        // test may backdate an object).
        let created = old
            .as_ref()
            .and_then(|o| o.pointer("/metadata/creationTimestamp").cloned())
            .or_else(|| meta.get("creationTimestamp").cloned())
            .unwrap_or_else(|| {
                json!(
                    k8s_openapi::jiff::Timestamp::now()
                        .strftime("%Y-%m-%dT%H:%M:%SZ")
                        .to_string()
                )
            });
        meta.insert("creationTimestamp".into(), created);
        store.insert(key, object.clone());
        let event = Event {
            rv: self.rv,
            resource,
            ty: if old.is_some() {
                EventType::Modified
            } else {
                EventType::Added
            },
            old,
            object,
        };
        self.history.push(event.clone());
        Ok(event)
    }

    /// The stored object, if any (`namespace` is "" for cluster-scoped kinds).
    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&resource)?
            .get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Every stored object of `resource`, in (namespace, name) order.
    pub fn all(&self, resource: Resource) -> impl Iterator<Item = &Value> {
        self.objects
            .get(&resource)
            .into_iter()
            .flat_map(|m| m.values())
    }

    pub fn delete(&mut self, resource: Resource, namespace: &str, name: &str) -> Option<Event> {
        let key = (namespace.to_owned(), name.to_owned());
        let mut object = self.objects.get_mut(&resource)?.remove(&key)?;
        self.rv += 1;
        // The deleted object is sent with the deletion's resourceVersion, as the real server does.
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        }
        let event = Event {
            rv: self.rv,
            resource,
            ty: EventType::Deleted,
            old: Some(object.clone()),
            object,
        };
        self.history.push(event.clone());
        Some(event)
    }

    /// The matching objects and the resourceVersion the list is consistent at.
    pub fn list(
        &self,
        resource: Resource,
        namespace: Option<&str>,
        selector: &Selector,
    ) -> (u64, Vec<Value>) {
        let items = self
            .objects
            .get(&resource)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
            .filter(|(_, o)| selector.matches(o))
            .map(|(_, o)| o.clone())
            .collect();
        (self.rv, items)
    }

    /// The history after `rv` for `resource`, or `Gone` when part of it was compacted away.
    pub fn since(&self, resource: Resource, rv: u64) -> Result<Vec<Event>, Gone> {
        if rv < self.compacted {
            return Err(Gone {
                requested: rv,
                oldest: self.compacted,
            });
        }
        Ok(self
            .history
            .iter()
            .filter(|e| e.resource == resource && e.rv > rv)
            .cloned()
            .collect())
    }

    /// Forgets all history up to now (etcd compaction): a watch from any resourceVersion handed out so far gets
    /// `410 Gone` and the client must relist. The version moves on first, as it always has in a real cluster by
    /// the time history is compacted (it is global: Leases and Events bump it constantly); a relist then gets the
    /// new version, which is watchable.
    pub fn compact(&mut self) {
        self.rv += 1;
        self.compacted = self.rv;
        self.history.clear();
    }
}

/// A label and field selector as kube-rs sends them (`labelSelector=a,b=c,d!=e,!f`,
/// `fieldSelector=metadata.name=x`).
#[derive(Clone, Debug, Default)]
pub struct Selector {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

#[derive(Clone, Debug)]
enum Requirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
}

impl Requirement {
    fn parse(term: &str) -> Result<Requirement, String> {
        let term = term.trim();
        if let Some((k, v)) = term.split_once("!=") {
            return Ok(Requirement::NotEquals(k.trim().into(), v.trim().into()));
        }
        if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            return Ok(Requirement::Equals(k.trim().into(), v.trim().into()));
        }
        if let Some(k) = term.strip_prefix('!') {
            return Ok(Requirement::NotExists(k.trim().into()));
        }
        if term.is_empty() || term.contains(' ') {
            return Err(format!("unsupported selector term {term:?}"));
        }
        Ok(Requirement::Exists(term.into()))
    }

    fn matches(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        match self {
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
            Requirement::Equals(k, v) => get(k).as_deref() == Some(v),
            Requirement::NotEquals(k, v) => get(k).as_deref() != Some(v),
        }
    }
}

impl Selector {
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Selector, String> {
        let terms = |s: Option<&str>| -> Result<Vec<Requirement>, String> {
            s.unwrap_or_default()
                .split(',')
                .filter(|t| !t.trim().is_empty())
                .map(Requirement::parse)
                .collect()
        };
        let fields = terms(fields)?;
        for f in &fields {
            let (Requirement::Equals(k, _) | Requirement::NotEquals(k, _)) = f else {
                return Err(format!("field selectors compare values: {f:?}"));
            };
            if k != "metadata.name" && k != "metadata.namespace" {
                return Err(format!("field label not supported: {k}"));
            }
        }
        Ok(Selector {
            labels: terms(labels)?,
            fields,
        })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let label = |k: &str| {
            object
                .pointer("/metadata/labels")
                .and_then(|l| l.get(k))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let field = |k: &str| {
            let pointer = format!("/{}", k.replace('.', "/"));
            // Cluster-scoped objects have an empty namespace for field selection.
            Some(
                object
                    .pointer(&pointer)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            )
        };
        self.labels.iter().all(|r| r.matches(label)) && self.fields.iter().all(|r| r.matches(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels}})
    }

    #[test]
    fn selectors_match_like_the_api_server() {
        let s = Selector::parse(Some("kubernetes.io/service-name"), None).expect("parse");
        assert!(s.matches(&svc("a", json!({"kubernetes.io/service-name": "web"}))));
        assert!(!s.matches(&svc("a", json!({}))));
        let s = Selector::parse(Some("a=1,b!=2,!c"), Some("metadata.name=x")).expect("parse");
        assert!(s.matches(&svc("x", json!({"a": "1"}))));
        assert!(!s.matches(&svc("y", json!({"a": "1"}))));
        assert!(!s.matches(&svc("x", json!({"a": "1", "c": "z"}))));
        assert!(Selector::parse(None, Some("spec.clusterIP=1")).is_err());
    }

    #[test]
    fn history_replays_after_a_version_and_compaction_makes_it_gone() {
        let mut st = Store::default();
        st.upsert(svc("a", json!({}))).expect("a");
        let rv = st.resource_version();
        st.upsert(svc("b", json!({}))).expect("b");
        st.delete(Resource::Services, "default", "a")
            .expect("delete a");
        let events = st.since(Resource::Services, rv).expect("history");
        let types: Vec<_> = events.iter().map(|e| e.ty).collect();
        assert_eq!(types, [EventType::Added, EventType::Deleted]);
        let before = st.resource_version();
        st.compact();
        assert!(
            st.since(Resource::Services, before).is_err(),
            "history before the compaction is gone"
        );
        assert_eq!(
            st.since(Resource::Services, st.resource_version())
                .map(|e| e.len()),
            Ok(0),
            "a relist's version is watchable"
        );
        let (list_rv, items) = st.list(Resource::Services, None, &Selector::default());
        assert_eq!((list_rv, items.len()), (st.resource_version(), 1));
    }

    #[test]
    fn label_change_out_of_the_selector_is_a_delete_for_the_watcher() {
        let mut st = Store::default();
        let sel = Selector::parse(Some("kubernetes.io/service-name"), None).expect("parse");
        st.upsert(svc("a", json!({"kubernetes.io/service-name": "web"})))
            .expect("add");
        let ev = st.upsert(svc("a", json!({}))).expect("relabel");
        assert_eq!(
            ev.for_watcher(&sel).map(|(t, _)| t),
            Some(EventType::Deleted)
        );
    }
}
