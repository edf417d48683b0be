//! What every kind shares: object metadata with only the labels and annotations lb reads, and interned names.
//!
//! A Kubernetes object's metadata is mostly what lb never reads (`managedFields`, `ownerReferences`, most labels and
//! annotations); those are skipped while decoding, without allocating. The labels and annotations lb does read are
//! listed here, in [`KEPT_LABELS`] and [`KEPT_ANNOTATIONS`]: a key that is not listed is checked (its value must be a
//! string, as the API requires) and dropped.

use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};

/// `discovery.LabelServiceName`: the Service an EndpointSlice belongs to.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services for another proxy carry this label (kube-proxy's `apis.LabelServiceProxyName`).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// kube-proxy's informers exclude objects with this label (`v1.IsHeadlessService`).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// A Node's zone, for topology hints.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
/// Per-Service backend selection (docs/semantics.md rule 11).
pub const ANNOTATION_ALGORITHM: &str = "lb.io/algorithm";
/// The time of the change behind an EndpointSlice update, stamped by the EndpointSlice controller (RFC 3339;
/// kube-proxy's network programming latency starts there).
pub const ANNOTATION_LAST_CHANGE_TRIGGER_TIME: &str =
    "endpoints.kubernetes.io/last-change-trigger-time";

/// The labels lb reads, of any kind; every other label is dropped while decoding.
pub const KEPT_LABELS: &[&str] = &[
    LABEL_SERVICE_NAME,
    LABEL_SERVICE_PROXY_NAME,
    LABEL_HEADLESS,
    LABEL_TOPOLOGY_ZONE,
];
/// The annotations lb reads, of any kind; every other annotation is dropped while decoding.
pub const KEPT_ANNOTATIONS: &[&str] = &[ANNOTATION_ALGORITHM, ANNOTATION_LAST_CHANGE_TRIGGER_TIME];

/// A name many objects repeat (a namespace, a node, a zone), stored once: every copy shares one allocation.
///
/// Interned through a process-wide set that forgets names nobody holds any more, so a cluster's churn of
/// namespaces and nodes does not accumulate.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Name(Arc<str>);

impl Name {
    pub fn new(s: &str) -> Name {
        intern(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        intern(s)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Name, D::Error> {
        struct NameVisitor;
        impl Visitor<'_> for NameVisitor {
            type Value = Name;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Name, E> {
                Ok(intern(v))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

/// The interned names, and the size after the last sweep of unused ones.
struct Interner {
    names: HashSet<Arc<str>>,
    swept_at: usize,
}

static INTERNER: Mutex<Option<Interner>> = Mutex::new(None);

fn intern(s: &str) -> Name {
    // A poisoned lock only means another thread panicked mid-insert; the set is still a valid set.
    let mut guard = INTERNER.lock().unwrap_or_else(|e| e.into_inner());
    let interner = guard.get_or_insert_with(|| Interner {
        names: HashSet::new(),
        swept_at: 0,
    });
    if let Some(name) = interner.names.get(s) {
        return Name(name.clone());
    }
    // Forget the names only the set still holds once it has doubled since the last sweep: amortised O(1) per
    // insertion, and the set stays within twice the names in use.
    if interner.names.len() >= 2 * interner.swept_at + 64 {
        interner.names.retain(|n| Arc::strong_count(n) > 1);
        interner.swept_at = interner.names.len();
    }
    let name: Arc<str> = Arc::from(s);
    interner.names.insert(name.clone());
    Name(name)
}

/// The labels or annotations lb reads (the keys of `K`), in the order they came. A handful at most, so a list
/// searched in order: a map would allocate a node of several hundred bytes for each object.
#[derive(Clone, PartialEq, Eq)]
pub struct KeptMap<K> {
    entries: Vec<(&'static str, String)>,
    keys: std::marker::PhantomData<K>,
}

/// Which keys a [`KeptMap`] keeps.
pub trait KeySet {
    const KEYS: &'static [&'static str];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabelKeys;
impl KeySet for LabelKeys {
    const KEYS: &'static [&'static str] = KEPT_LABELS;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnnotationKeys;
impl KeySet for AnnotationKeys {
    const KEYS: &'static [&'static str] = KEPT_ANNOTATIONS;
}

pub type Labels = KeptMap<LabelKeys>;
pub type Annotations = KeptMap<AnnotationKeys>;

impl<K> Default for KeptMap<K> {
    fn default() -> Self {
        KeptMap {
            entries: Vec::new(),
            keys: std::marker::PhantomData,
        }
    }
}

impl<K: KeySet> KeptMap<K> {
    /// The value of `key`, when it is one lb keeps and the object has it.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.entries.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` when it is one lb keeps (tests and tools building objects by hand); other keys are dropped, as
    /// decoding drops them.
    pub fn insert(&mut self, key: &str, value: impl Into<String>) {
        let Some(&kept) = K::KEYS.iter().find(|k| **k == key) else {
            return;
        };
        let value = value.into();
        match self.entries.iter_mut().find(|(k, _)| *k == kept) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((kept, value)),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.entries.iter().map(|(k, v)| (*k, v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<K> fmt::Debug for KeptMap<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.entries.iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

impl<'de, K: KeySet> Deserialize<'de> for KeptMap<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<K>(std::marker::PhantomData<K>);
        impl<'de, K: KeySet> Visitor<'de> for MapVisitor<K> {
            type Value = KeptMap<K>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = KeptMap::<K>::default();
                while let Some(key) = map.next_key_seed(KeptKey(K::KEYS))? {
                    match key {
                        Some(key) => {
                            let value: String = map.next_value()?;
                            out.entries.retain(|(k, _)| *k != key);
                            out.entries.push((key, value));
                        }
                        None => {
                            map.next_value::<CheckedStr>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        deserializer.deserialize_map(MapVisitor(std::marker::PhantomData))
    }
}

/// A map key: `Some` of the kept key it equals, `None` for any other (read without allocating).
struct KeptKey(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeptKey {
    type Value = Option<&'static str>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        struct KeyVisitor(&'static [&'static str]);
        impl Visitor<'_> for KeyVisitor {
            type Value = Option<&'static str>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(self.0.iter().find(|k| **k == v).copied())
            }
        }
        deserializer.deserialize_str(KeyVisitor(self.0))
    }
}

/// A string value read and dropped: the type is checked (a label's value must be a string) without a copy.
struct CheckedStr;

impl<'de> Deserialize<'de> for CheckedStr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl Visitor<'_> for StrVisitor {
            type Value = CheckedStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<CheckedStr, E> {
                Ok(CheckedStr)
            }
        }
        deserializer.deserialize_str(StrVisitor)
    }
}

/// `metadata`, reduced to what lb reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: Option<String>,
    pub namespace: Option<Name>,
    /// The conflict rule between two Services claiming one VIP: the older keeps it.
    pub creation_timestamp: Option<Time>,
    pub labels: Option<Labels>,
    pub annotations: Option<Annotations>,
    /// Read for the watcher (it resumes from the last version it saw) and taken out by the source: two versions
    /// of an object that differ only here are the same to lb.
    pub resource_version: Option<String>,
}

impl ObjectMeta {
    /// The namespace as written, `None` when absent or empty.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref().filter(|n| !n.is_empty())
    }

    /// The name as written, `None` when absent or empty.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref().filter(|n| !n.is_empty())
    }
}
