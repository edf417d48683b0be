//! The API server's objects decoded straight into the model's compact types, one object at a time.
//!
//! kube-runtime's watcher decodes a whole list response (and each watch event) into the type it is given. That type
//! here is [`Decoded<T>`]: its decoding never fails for one object, so one malformed object cannot fail a list
//! (which the watcher would then retry forever). Each object's JSON text is taken as it is (a copy of its bytes, no
//! tree), decoded into `T` (every field lb does not read skipped), and only when that fails decoded again the slow
//! way, to name the field that failed (`spec.ports[0].port`) in the object's diagnostic.
//!
//! kube-runtime needs its `Resource` (the API path, and `metadata.resourceVersion` to resume a watch from): the
//! wrapper carries a k8s-openapi `ObjectMeta` with only the name, namespace and resourceVersion, and is dropped as
//! soon as the object is handed to the tracker.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta as WireMeta;
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::super::manifest::{normalize, typed_object};
use crate::model::{Diagnostic, Object};

/// One object as the watcher delivers it: the model's object, or why it could not be read.
#[derive(Clone, Debug)]
pub struct Decoded<T> {
    meta: WireMeta,
    pub object: Result<T, Diagnostic>,
}

impl<T> Decoded<T> {
    /// `namespace` (empty for cluster-scoped objects) and name.
    pub fn key(&self) -> (String, String) {
        (
            self.meta.namespace.clone().unwrap_or_default(),
            self.meta.name.clone().unwrap_or_default(),
        )
    }
}

/// Where a diagnostic says the object came from.
const PLACE: &str = "the API server";

impl<T: Object> Decoded<T> {
    /// Decodes one object's JSON text.
    pub fn from_json(text: &str) -> Self {
        match serde_json::from_str::<T>(text) {
            Ok(mut object) => {
                let m = object.metadata_mut();
                let meta = WireMeta {
                    name: m.name.clone(),
                    namespace: m.namespace.as_deref().map(str::to_owned),
                    resource_version: m.resource_version.take(),
                    ..WireMeta::default()
                };
                normalize(&mut object);
                Decoded {
                    meta,
                    object: Ok(object),
                }
            }
            // Not even JSON: nothing can be named (the watcher never hands such text over: the list or event
            // around it would not parse either).
            Err(_) => match serde_json::from_str::<Value>(text) {
                Ok(value) => Self::from_value(value),
                Err(e) => Decoded {
                    meta: WireMeta::default(),
                    object: Err(Diagnostic::new(
                        format!("{} in {PLACE}", T::KIND),
                        None,
                        format!("unreadable object: {e}"),
                    )),
                },
            },
        }
    }

    /// Decodes one object given as a JSON value (the slow way: the watch event's fields came out of order, or the
    /// fast way failed).
    pub fn from_value(mut value: Value) -> Self {
        #[cfg(test)]
        tests::SLOW_WAY.with(|n| n.set(n.get() + 1));
        let str_at = |value: &Value, field: &str| {
            value
                .get("metadata")
                .and_then(|m| m.get(field))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let meta = WireMeta {
            name: str_at(&value, "name"),
            namespace: str_at(&value, "namespace"),
            resource_version: str_at(&value, "resourceVersion"),
            ..WireMeta::default()
        };
        // List items carry no apiVersion/kind; the diagnostics name the kind anyway.
        if let Some(map) = value.as_object_mut() {
            map.entry("apiVersion")
                .or_insert_with(|| T::API_VERSION.into());
            map.entry("kind").or_insert_with(|| T::KIND.into());
        }
        let object = match T::deserialize(&value) {
            Ok(object) => Ok(object),
            Err(_) => typed_object::<T>(&value, T::KIND, PLACE),
        }
        .map(|mut object| {
            normalize(&mut object);
            object
        });
        Decoded { meta, object }
    }
}

/// serde_json hands a raw value to a visitor as a one-entry map under this key (`serde_json::raw::TOKEN`, private
/// but unchanged since raw values exist). Were it ever to change, every object would take the slow way (a JSON
/// tree first), still decoded right: the unit tests below would say so.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

impl<'de, T: Object> Deserialize<'de> for Decoded<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_newtype_struct(RAW_VALUE_TOKEN, DecodeVisitor(PhantomData))
    }
}

struct DecodeVisitor<T>(PhantomData<T>);

impl<'de, T: Object> Visitor<'de> for DecodeVisitor<T> {
    type Value = Decoded<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} object", T::KIND)
    }

    /// serde_json: the object's text, as a one-entry map under [`RAW_VALUE_TOKEN`]. Any other map is the object
    /// itself (a deserializer that does not know raw values).
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Some(first) = map.next_key::<Cow<'de, str>>()? else {
            return Ok(Decoded::from_value(Value::Object(Default::default())));
        };
        if first == RAW_VALUE_TOKEN {
            let text: Cow<'de, str> = map.next_value()?;
            return Ok(Decoded::from_json(&text));
        }
        let mut object = serde_json::Map::new();
        object.insert(first.into_owned(), map.next_value()?);
        while let Some((k, v)) = map.next_entry::<String, Value>()? {
            object.insert(k, v);
        }
        Ok(Decoded::from_value(Value::Object(object)))
    }

    /// A deserializer that buffered the object (kube-core's watch event when `object` comes before `type`).
    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Ok(Decoded::from_value(value))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Decoded::from_value(Value::Null))
    }
}

impl<T: Object> kube::Resource for Decoded<T> {
    type DynamicType = ();
    type Scope = kube::core::DynamicResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        T::KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        T::API_VERSION
            .rsplit_once('/')
            .map_or("", |(group, _)| group)
            .into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        T::API_VERSION
            .rsplit_once('/')
            .map_or(T::API_VERSION, |(_, version)| version)
            .into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        T::PLURAL.into()
    }

    fn meta(&self) -> &WireMeta {
        &self.meta
    }

    fn meta_mut(&mut self) -> &mut WireMeta {
        &mut self.meta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointSlice, Service};

    /// What kube-client does with a list response: the whole body into one typed list.
    #[derive(serde::Deserialize)]
    struct List<T> {
        items: Vec<T>,
    }

    thread_local! {
        /// Objects decoded the slow way on this thread (the tests run one per thread).
        pub(super) static SLOW_WAY: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    const GOOD: &str = r#"{"metadata": {"name": "web", "namespace": "shop", "resourceVersion": "7",
        "managedFields": [{"manager": "kubectl"}], "labels": {"app": "web", "service.kubernetes.io/headless": ""}},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80, "appProtocol": "http"}],
        "selector": {"app": "web"}}}"#;

    #[test]
    fn one_malformed_object_does_not_fail_the_list() {
        let body = format!(
            r#"{{"items": [{GOOD}, {{"metadata": {{"name": "worse", "namespace": "shop"}},
                "spec": {{"ports": [{{"port": "eighty"}}]}}}}]}}"#
        );
        SLOW_WAY.with(|n| n.set(0));
        let list: List<Decoded<Service>> = serde_json::from_str(&body).expect("the list decodes");
        assert_eq!(list.items.len(), 2);
        assert_eq!(
            SLOW_WAY.with(|n| n.get()),
            1,
            "only the malformed object takes the slow way (a JSON tree first)"
        );
        let good = list.items[0].object.as_ref().expect("the good one");
        assert_eq!(good.metadata.name.as_deref(), Some("web"));
        assert_eq!(
            good.metadata.resource_version, None,
            "kept by the watcher's wrapper only"
        );
        assert_eq!(
            list.items[0].meta.resource_version.as_deref(),
            Some("7"),
            "the watcher resumes from it"
        );
        // Only the labels lb reads are kept.
        let labels: Vec<&str> = good
            .metadata
            .labels
            .iter()
            .flat_map(|l| l.iter().map(|(k, _)| k))
            .collect();
        assert_eq!(labels, ["service.kubernetes.io/headless"]);
        let bad = list.items[1]
            .object
            .as_ref()
            .expect_err("the mistyped port");
        assert_eq!(bad.object, "Service shop/worse in the API server");
        assert_eq!(bad.field.as_deref(), Some("spec.ports[0].port"));
        assert_eq!(list.items[1].key(), ("shop".to_owned(), "worse".to_owned()));
    }

    /// kube-core's watch event is adjacently tagged: with `object` before `type` (as a JSON map sorted by key
    /// writes it), serde buffers the object before decoding it. The result must be the same.
    #[test]
    fn an_object_buffered_by_serde_decodes_the_same() {
        type Event = kube::core::WatchEvent<Decoded<Service>>;
        let in_order: Event =
            serde_json::from_str(&format!(r#"{{"type": "ADDED", "object": {GOOD}}}"#))
                .expect("type first");
        let buffered: Event =
            serde_json::from_str(&format!(r#"{{"object": {GOOD}, "type": "ADDED"}}"#))
                .expect("object first");
        let (kube::core::WatchEvent::Added(a), kube::core::WatchEvent::Added(b)) =
            (in_order, buffered)
        else {
            panic!("two Added events expected");
        };
        assert!(a.object.is_ok(), "{:?}", a.object);
        assert_eq!(a.object, b.object);
        assert_eq!(a.meta, b.meta);
    }

    #[test]
    fn a_mistyped_slice_is_named_with_its_field() {
        let d: Decoded<EndpointSlice> = serde_json::from_str(
            r#"{"metadata": {"name": "junk", "namespace": "default"}, "addressType": "IPv4",
                "endpoints": "not a list"}"#,
        )
        .expect("decodes");
        let e = d.object.expect_err("malformed");
        assert_eq!(e.object, "EndpointSlice default/junk in the API server");
        assert_eq!(e.field.as_deref(), Some("endpoints"));
    }

    #[test]
    fn the_resource_is_the_kinds_api_path() {
        use kube::Resource;
        assert_eq!(
            Decoded::<EndpointSlice>::url_path(&(), None),
            "/apis/discovery.k8s.io/v1/endpointslices"
        );
        assert_eq!(Decoded::<Service>::url_path(&(), None), "/api/v1/services");
        assert_eq!(
            Decoded::<crate::model::ServiceCIDR>::url_path(&(), None),
            "/apis/networking.k8s.io/v1/servicecidrs"
        );
    }
}
