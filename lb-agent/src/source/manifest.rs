//! Kubernetes manifests (YAML or JSON text) to typed cluster objects.
//!
//! This is the file-based source of the model's inputs: `lb-agent` pointed at a manifest file or directory instead of
//! an API server. Parsing is forgiving in the way an operator needs: one malformed document becomes a
//! [`Diagnostic`] naming the document (and the object, when its kind and name can still be read) and every other
//! document still loads. Each document is read first into a generic [`serde_json::Value`] so the kind, namespace and
//! name are known before the typed conversion, whose errors are then reported with the field path that failed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::tracked::from_value_tracked;
use crate::model::{
    ClusterObjects, DEFAULT_NAMESPACE, Diagnostic, EndpointSlice, Name, Node, Object, Service,
    ServiceCIDR, object_label,
};

/// Errors that stop [`load_path`] as a whole. Problems inside a document are [`Diagnostic`]s instead.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Parses manifest text: YAML documents separated by `---` lines, `kind: List` (or `ServiceList`, ...) with `items`,
/// or JSON when `source_name` ends in `.json`. `source_name` only labels diagnostics.
pub fn parse_manifests(source_name: &str, text: &str) -> (ClusterObjects, Vec<Diagnostic>) {
    let mut out = Collector::default();
    if source_name.ends_with(".json") {
        parse_json_stream(source_name, text, &mut out);
    } else {
        for doc in split_documents(text) {
            let place = format!("document {} of {source_name}", doc.index);
            match parse_yaml_document(&doc) {
                Ok(Some(value)) => out.add_value(value, &place),
                Ok(None) => {}
                Err(message) => out.diagnostics.push(Diagnostic::new(place, None, message)),
            }
        }
    }
    (out.objects, out.diagnostics)
}

/// Loads one manifest file, or every `*.yaml`, `*.yml` and `*.json` file directly inside a directory, in file-name
/// order (so a numbered prefix orders them, as with `kubectl apply -f dir/`).
pub fn load_path(path: &Path) -> Result<(ClusterObjects, Vec<Diagnostic>), ManifestError> {
    let io_err = |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    let files = if meta.is_dir() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(io_err)? {
            let entry_path = entry.map_err(io_err)?.path();
            let is_manifest = entry_path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
            if is_manifest && entry_path.is_file() {
                files.push(entry_path);
            }
        }
        files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        files
    } else {
        vec![path.to_path_buf()]
    };

    let mut objects = ClusterObjects::default();
    let mut diagnostics = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).map_err(|source| ManifestError::Io {
            path: file.clone(),
            source,
        })?;
        let name = file.display().to_string();
        // A file caught half-written (or simply not text) is a problem in that file, not a reason to stop.
        let Ok(text) = String::from_utf8(bytes) else {
            diagnostics.push(Diagnostic::new(name, None, "not UTF-8 text; file skipped"));
            continue;
        };
        let (file_objects, file_diagnostics) = parse_manifests(&name, &text);
        objects.extend(file_objects);
        diagnostics.extend(file_diagnostics);
    }
    Ok((objects, diagnostics))
}

/// One YAML document of a stream and where it starts.
struct Document<'a> {
    /// 1-based position among the stream's documents, as a reader counts them.
    index: usize,
    /// 1-based line of the document's first line in the whole text.
    first_line: usize,
    text: &'a str,
}

/// Splits a YAML stream at `---` lines, the way kubectl's YAML reader does (a line starting with `---` followed by
/// nothing, a space or a comment). Each piece keeps its own `---` line, so it is a valid single-document stream
/// even when content follows the marker (`--- {a: 1}`). Pieces without content are dropped here, but they still
/// count in `index` after the first real one, so "document 3" is the third piece a reader sees.
fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut starts = vec![(0usize, 1usize)];
    let mut offset = 0;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        if offset > 0 && is_document_marker(line) {
            starts.push((offset, line_no + 1));
        }
        offset += line.len();
    }
    let mut docs = Vec::new();
    let mut index = 0;
    for (i, &(start, first_line)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(text.len(), |&(next, _)| next);
        let piece = &text[start..end];
        let empty = is_empty_document(piece);
        // A stream that opens with `---` has nothing before it: that is not a document anyone counts.
        if i == 0 && empty {
            continue;
        }
        index += 1;
        if !empty {
            docs.push(Document {
                index,
                first_line,
                text: piece,
            });
        }
    }
    docs
}

fn is_document_marker(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
}

/// True when a piece holds no YAML content: only blank lines, comments, directives and document markers.
fn is_empty_document(piece: &str) -> bool {
    piece.lines().all(|line| {
        let content = match line.strip_prefix("---") {
            Some(rest) if is_document_marker(line) => rest.trim(),
            _ => line.trim(),
        };
        content.is_empty()
            || content.starts_with('#')
            || content.starts_with('%')
            || content == "..."
    })
}

/// Reads one YAML document into a generic value; `Ok(None)` for a document that is only `null`.
fn parse_yaml_document(doc: &Document<'_>) -> Result<Option<Value>, String> {
    let options = serde_saphyr::options! { with_snippet: false };
    match serde_saphyr::from_str_with_options::<Value>(doc.text, options) {
        Ok(Value::Null) => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(err) => {
            // The parser counts lines from the document's start; report them as lines of the whole file.
            let render = serde_saphyr::render_options! {
                snippets: serde_saphyr::SnippetMode::Off,
                line_offset: doc.first_line.saturating_sub(1) as u64,
            };
            Err(format!("invalid YAML: {}", err.render_with_options(render)))
        }
    }
}

/// JSON files hold one object (often a `List`) or several concatenated ones.
fn parse_json_stream(source_name: &str, text: &str, out: &mut Collector) {
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let mut index = 0;
    loop {
        index += 1;
        let place = format!("document {index} of {source_name}");
        match stream.next() {
            None => break,
            Some(Ok(Value::Null)) => {}
            Some(Ok(value)) => out.add_value(value, &place),
            Some(Err(err)) => {
                // After a syntax error the stream cannot find the next value's start: the rest is lost.
                out.diagnostics
                    .push(Diagnostic::new(place, None, format!("invalid JSON: {err}")));
                break;
            }
        }
    }
}

#[derive(Default)]
struct Collector {
    objects: ClusterObjects,
    diagnostics: Vec<Diagnostic>,
}

impl Collector {
    /// Sorts one generic object into the typed lists. `place` says where it came from, for diagnostics.
    fn add_value(&mut self, value: Value, place: &str) {
        let Value::Object(map) = &value else {
            self.diagnostics.push(Diagnostic::new(
                place,
                None,
                "not a Kubernetes object (expected a mapping)",
            ));
            return;
        };
        let kind = map
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let api_version = map
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if kind.is_empty() || api_version.is_empty() {
            let missing = if kind.is_empty() {
                "kind"
            } else {
                "apiVersion"
            };
            self.diagnostics.push(Diagnostic::new(
                place,
                Some(missing.to_owned()),
                format!("not a Kubernetes object: no {missing}"),
            ));
            return;
        }
        if kind.ends_with("List") && map.contains_key("items") {
            self.add_list(&value, &kind, &api_version, place);
            return;
        }
        match (api_version.as_str(), kind.as_str()) {
            (Service::API_VERSION, Service::KIND) => {
                if let Some(svc) = self.object::<Service>(&value, place) {
                    self.objects.services.push(svc);
                }
            }
            (EndpointSlice::API_VERSION, EndpointSlice::KIND) => {
                if let Some(slice) = self.object::<EndpointSlice>(&value, place) {
                    self.objects.endpoint_slices.push(slice);
                }
            }
            (Node::API_VERSION, Node::KIND) => {
                if let Some(node) = self.object::<Node>(&value, place) {
                    self.objects.nodes.push(node);
                }
            }
            (ServiceCIDR::API_VERSION, ServiceCIDR::KIND) => {
                if let Some(cidr) = self.object::<ServiceCIDR>(&value, place) {
                    self.objects.service_cidrs.push(cidr);
                }
            }
            _ => {
                tracing::debug!(%api_version, %kind, %place, "ignoring an object of a kind lb does not read")
            }
        }
    }

    /// `kind: List` (what `kubectl get -o yaml` prints) and typed lists such as `ServiceList`, whose items may omit
    /// their own apiVersion and kind.
    fn add_list(&mut self, list: &Value, kind: &str, api_version: &str, place: &str) {
        let Some(items) = list.get("items").and_then(Value::as_array) else {
            self.diagnostics.push(Diagnostic::new(
                place,
                Some("items".to_owned()),
                "expected a list of objects",
            ));
            return;
        };
        let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
        for (i, item) in items.iter().enumerate() {
            let mut item = item.clone();
            if let (Some(item_kind), Value::Object(map)) = (item_kind, &mut item) {
                map.entry("kind")
                    .or_insert_with(|| Value::String(item_kind.to_owned()));
                map.entry("apiVersion")
                    .or_insert_with(|| Value::String(api_version.to_owned()));
            }
            self.add_value(item, &format!("items[{i}] of {place}"));
        }
    }

    /// One object of a kind lb reads, as the model reads it, or `None` with a diagnostic.
    fn object<T: Object>(&mut self, value: &Value, place: &str) -> Option<Arc<T>> {
        let mut obj = self.convert::<T>(value, T::KIND, place)?;
        normalize(&mut obj);
        Some(Arc::new(obj))
    }

    /// Converts a generic object to its typed form, or records why not (with the failing field's path).
    fn convert<T: DeserializeOwned>(
        &mut self,
        value: &Value,
        kind: &str,
        place: &str,
    ) -> Option<T> {
        // The plain conversion first; only a failure pays for the one that tracks where it is.
        if let Ok(obj) = T::deserialize(value) {
            return Some(obj);
        }
        match from_value_tracked::<T>(value) {
            Ok(obj) => Some(obj),
            Err((field, message)) => {
                let metadata = value.get("metadata");
                let name = metadata.and_then(|m| m.get("name")).and_then(Value::as_str);
                let namespace = metadata
                    .and_then(|m| m.get("namespace"))
                    .and_then(Value::as_str);
                let namespace = match kind {
                    "Node" | "ServiceCIDR" => None,
                    _ => Some(namespace.unwrap_or(DEFAULT_NAMESPACE)),
                };
                let object = format!("{} in {place}", object_label(kind, namespace, name));
                self.diagnostics
                    .push(Diagnostic::new(object, field, message));
                None
            }
        }
    }
}

/// Converts one generic object received from elsewhere (the kube-rs source reads the API server's objects as
/// `DynamicObject`s, so one malformed object cannot fail a whole list) to its typed form, with the same
/// diagnostics as a manifest: `place` says where it came from.
pub fn typed_object<T: DeserializeOwned>(
    value: &Value,
    kind: &str,
    place: &str,
) -> Result<T, Diagnostic> {
    let mut collector = Collector::default();
    match collector.convert::<T>(value, kind, place) {
        Some(obj) => Ok(obj),
        None => Err(collector
            .diagnostics
            .pop()
            .unwrap_or_else(|| Diagnostic::new(place, None, "unreadable object"))),
    }
}

/// What every source does to an object before the model sees it: a namespaced object written without a namespace
/// is in `default` (as `kubectl apply` puts it), and the resourceVersion (the watcher's business) is dropped, so
/// two versions of an object that differ only there compare equal.
pub(crate) fn normalize<T: Object>(obj: &mut T) {
    obj.shrink_to_fit();
    let meta = obj.metadata_mut();
    meta.resource_version = None;
    if T::NAMESPACED && meta.namespace().is_none() {
        meta.namespace = Some(Name::new(DEFAULT_NAMESPACE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(objects: &ClusterObjects) -> Vec<String> {
        let mut out = Vec::new();
        for s in &objects.services {
            out.push(format!(
                "Service {}",
                s.metadata.name.clone().unwrap_or_default()
            ));
        }
        for s in &objects.endpoint_slices {
            out.push(format!(
                "EndpointSlice {}",
                s.metadata.name.clone().unwrap_or_default()
            ));
        }
        for n in &objects.nodes {
            out.push(format!(
                "Node {}",
                n.metadata.name.clone().unwrap_or_default()
            ));
        }
        out
    }

    const SERVICE_A: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";

    #[test]
    fn documents_split_and_empty_ones_ignored() {
        let text = format!(
            "# leading comment\n---\n{SERVICE_A}---\n\n# only a comment\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n---\n"
        );
        let (objects, diags) = parse_manifests("demo.yaml", &text);
        assert_eq!(diags, vec![]);
        assert_eq!(names(&objects), vec!["Service a", "Node n1"]);
    }

    #[test]
    fn namespace_defaults_to_default() {
        let (objects, diags) = parse_manifests("demo.yaml", SERVICE_A);
        assert_eq!(diags, vec![]);
        assert_eq!(
            objects.services[0].metadata.namespace.as_deref(),
            Some("default")
        );
    }

    #[test]
    fn list_kind_is_parsed() {
        let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: a, namespace: ns}
  spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: a-1, namespace: ns, labels: {kubernetes.io/service-name: a}}
  addressType: IPv4
  endpoints: [{addresses: [10.0.0.1]}]
---
apiVersion: v1
kind: NodeList
items:
- metadata: {name: n1}
";
        let (objects, diags) = parse_manifests("list.yaml", text);
        assert_eq!(diags, vec![]);
        assert_eq!(
            names(&objects),
            vec!["Service a", "EndpointSlice a-1", "Node n1"]
        );
    }

    #[test]
    fn unknown_kind_ignored() {
        let text = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\nspec: {{replicas: 3}}\n---\n\
             apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {{name: old}}\n---\n{SERVICE_A}"
        );
        let (objects, diags) = parse_manifests("mixed.yaml", &text);
        assert_eq!(diags, vec![]);
        assert_eq!(names(&objects), vec!["Service a"]);
    }

    #[test]
    fn bad_yaml_document_reported_others_load() {
        let text = format!(
            "{SERVICE_A}---\nkind: Service\nmetadata: {{name: [unclosed\n---\napiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\n"
        );
        let (objects, diags) = parse_manifests("demo.yaml", &text);
        assert_eq!(names(&objects), vec!["Service a", "Node n1"]);
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].object, "document 2 of demo.yaml");
        assert_eq!(diags[0].field, None);
        assert!(
            diags[0].message.starts_with("invalid YAML"),
            "{}",
            diags[0].message
        );
        // The document starts on line 5 of the file; the error is reported in file lines, not document lines.
        assert!(
            diags[0].message.contains("line 7") || diags[0].message.contains("line 8"),
            "{}",
            diags[0].message
        );
    }

    #[test]
    fn wrong_field_type_names_object_and_field() {
        let text = format!(
            "{SERVICE_A}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
             spec:\n  clusterIP: 10.96.0.2\n  ports:\n  - port: 80\n  - port: http\n"
        );
        let (objects, diags) = parse_manifests("demo.yaml", &text);
        assert_eq!(names(&objects), vec!["Service a"]);
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(
            diags[0].object,
            "Service shop/web in document 2 of demo.yaml"
        );
        assert_eq!(diags[0].field.as_deref(), Some("spec.ports[1].port"));
        assert!(
            diags[0].message.contains("invalid type"),
            "{}",
            diags[0].message
        );
    }

    #[test]
    fn missing_required_field_named() {
        // k8s-openapi defaults absent required fields (the model then rejects, say, port 0), so use a plain struct
        // to check that a missing field is named with its full path.
        #[derive(Debug, serde::Deserialize)]
        #[expect(dead_code, reason = "only deserialized: the test is about the error")]
        struct Port {
            port: i32,
        }
        #[derive(Debug, serde::Deserialize)]
        #[expect(dead_code, reason = "only deserialized: the test is about the error")]
        struct Spec {
            ports: Vec<Port>,
        }
        let value = serde_json::json!({"ports": [{"port": 1}, {"name": "x"}]});
        let (field, message) = from_value_tracked::<Spec>(&value).expect_err("port is missing");
        assert_eq!(field.as_deref(), Some("ports[1].port"));
        assert_eq!(message, "missing field `port`");
    }

    #[test]
    fn absent_required_k8s_field_is_left_to_the_model() {
        // k8s-openapi reads an absent `port` as 0; the model's validation reports it (spec.ports[0].port).
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - name: http\n";
        let (objects, diags) = parse_manifests("demo.yaml", text);
        assert_eq!(diags, vec![]);
        let ports = objects.services[0]
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .map(|p| p[0].port);
        assert_eq!(ports, Some(0));
    }

    #[test]
    fn label_keys_with_dots_are_quoted_in_paths() {
        let text = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n  labels:\n    topology.kubernetes.io/zone: [a]\n";
        let (_, diags) = parse_manifests("n.yaml", text);
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].object, "Node n1 in document 1 of n.yaml");
        assert_eq!(
            diags[0].field.as_deref(),
            Some("metadata.labels[\"topology.kubernetes.io/zone\"]")
        );
    }

    #[test]
    fn object_without_kind_is_a_diagnostic() {
        let (objects, diags) = parse_manifests("x.yaml", "metadata: {name: a}\n---\n- 1\n- 2\n");
        assert_eq!(names(&objects), Vec::<String>::new());
        let objects: Vec<&str> = diags.iter().map(|d| d.object.as_str()).collect();
        assert_eq!(
            objects,
            vec!["document 1 of x.yaml", "document 2 of x.yaml"]
        );
    }

    #[test]
    fn json_stream_is_parsed() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"clusterIP":"10.96.0.1","ports":[{"port":80}]}}]}
            {"apiVersion":"v1","kind":"Node","metadata":{"name":"n1"}}"#;
        let (objects, diags) = parse_manifests("x.json", text);
        assert_eq!(diags, vec![]);
        assert_eq!(names(&objects), vec!["Service a", "Node n1"]);
    }

    #[test]
    fn load_path_reads_directory_in_name_order() {
        let dir = std::env::temp_dir().join(format!("lb-manifest-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let write =
            |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("write manifest");
        write(
            "20-node.yml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n",
        );
        write("10-svc.yaml", SERVICE_A);
        write(
            "notes.txt",
            "apiVersion: v1\nkind: Node\nmetadata: {name: ignored}\n",
        );
        write("30-bad.json", "{\"apiVersion\": ");
        let (objects, diags) = load_path(&dir).expect("load dir");
        std::fs::remove_dir_all(&dir).expect("remove temp dir");
        assert_eq!(names(&objects), vec!["Service a", "Node n1"]);
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert!(
            diags[0].object.ends_with("30-bad.json"),
            "{}",
            diags[0].object
        );
    }

    #[test]
    fn load_path_missing_file_is_an_error() {
        let err = load_path(Path::new("/nonexistent/lb/manifest.yaml"));
        assert!(matches!(err, Err(ManifestError::Io { .. })), "{err:?}");
    }
}
