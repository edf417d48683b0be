//! `lb-agent manifests`: everything a cluster needs to run lb, as k8s-openapi objects rendered to YAML (the
//! `cilium install` / `linkerd install` pattern: the binary that runs on the nodes also writes its own deployment,
//! so the two never disagree). deploy/ holds renderings that a test regenerates and compares.
//!
//! The objects, and why each setting is what it is, are in [`objects`]; where the agent finds the API server in
//! [`api_server`]. Pure: options in, objects out; the CLI resolves `--api-server auto` before calling in.

pub mod api_server;
pub mod objects;

use std::collections::BTreeMap;

pub use api_server::ApiServer;

/// The image `cargo xtask image` builds by default, and what the manifests name unless `--image` says otherwise.
pub const DEFAULT_IMAGE: &str = concat!("localhost/lb-agent:", env!("CARGO_PKG_VERSION"));
/// The node label that moves a node through the migration: `canary` (lb beside kube-proxy), `lb` (lb alone). The
/// kube-proxy DaemonSet is kept off `lb` nodes by a node affinity (docs/install.md).
pub const PROXY_LABEL: &str = "lb.io/proxy";
/// kube-proxy's namespace: the one where `system-node-critical` is always admitted.
pub const DEFAULT_NAMESPACE: &str = "kube-system";

/// What `lb-agent manifests` is asked for.
#[derive(Clone, Debug)]
pub struct Options {
    pub image: String,
    pub namespace: String,
    pub api_server: ApiServer,
    /// Extra `nodeSelector` entries for every DaemonSet (beside `kubernetes.io/os: linux`).
    pub node_selector: BTreeMap<String, String>,
    /// Serve `/metrics` on every address of the node (default: 127.0.0.1 only, as kube-proxy's 10249) and mark the
    /// pods for Prometheus' pod discovery.
    pub metrics: bool,
    /// Also a headless Service and a prometheus-operator `ServiceMonitor` (implies `metrics`).
    pub service_monitor: bool,
    /// The node-by-node migration from kube-proxy: two DaemonSets chosen by the node label [`PROXY_LABEL`], the
    /// canary beside kube-proxy (`canary`) and lb alone (`lb`).
    pub coexist_with_kube_proxy: bool,
    /// The canary's health port (kube-proxy holds 10256).
    pub canary_health_port: u16,
}

impl Options {
    pub fn new(api_server: ApiServer) -> Options {
        Options {
            image: DEFAULT_IMAGE.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            api_server,
            node_selector: BTreeMap::new(),
            metrics: false,
            service_monitor: false,
            coexist_with_kube_proxy: false,
            canary_health_port: objects::CANARY_HEALTH_PORT,
        }
    }
}

/// What `lb-agent manifests --uninstall` is asked for.
#[derive(Clone, Debug)]
pub struct UninstallOptions {
    pub image: String,
    pub namespace: String,
    pub node_selector: BTreeMap<String, String>,
    /// The cleanup waits, per node, until kube-proxy answers on its health port, so no node is ever left without a
    /// proxy; off only for clusters moving to a proxy that does not answer there.
    pub wait_for_kube_proxy: bool,
}

/// One YAML document: a comment saying what it is for, and the object.
#[derive(Clone, Debug)]
pub struct Document {
    pub comment: String,
    pub object: serde_json::Value,
}

/// Renders documents as one multi-document YAML stream, `header` (comment lines) first.
pub fn to_yaml(
    header: &str,
    documents: &[Document],
) -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::new();
    for line in header.lines() {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    for doc in documents {
        out.push_str("---\n");
        for line in doc.comment.lines() {
            out.push_str("# ");
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&serde_saphyr::to_string(&doc.object)?);
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

/// Parses `key=value` (a `--node-selector` entry).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not key=value"))?;
    let valid = |t: &str, max: usize| {
        t.len() <= max
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    };
    if k.is_empty() || !valid(k, 316) || !valid(v, 63) || v.contains('/') {
        return Err(format!("{s:?} is not a valid label selector entry"));
    }
    Ok((k.to_owned(), v.to_owned()))
}
