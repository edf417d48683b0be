//! Helpers for the model's table tests: objects come from inline YAML through the real manifest parser, so a test
//! reads like the manifests an operator would write.

use std::net::IpAddr;

use super::ClusterObjects;
use super::{ModelConfig, NodeContext, Translation, translate};
use crate::source::manifest::parse_manifests;
use crate::state::{Frontend, Protocol, Scope, ServiceEntry};

/// Parses a fixture; a fixture that does not parse cleanly is a broken test.
pub(crate) fn parse(yaml: &str) -> ClusterObjects {
    let (objects, diagnostics) = parse_manifests("test.yaml", yaml);
    assert_eq!(
        diagnostics,
        vec![],
        "fixture does not parse cleanly:\n{yaml}"
    );
    objects
}

pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test address {s:?}: {e}"))
}

/// `worker-1` in `zone-a`, NodePorts on 192.168.0.10 and fd00::10.
pub(crate) fn worker() -> NodeContext {
    NodeContext {
        name: "worker-1".into(),
        addresses: vec![ip("192.168.0.10"), ip("fd00::10")],
        nodeport_addresses: None,
        zone: Some("zone-a".into()),
    }
}

pub(crate) fn translate_yaml(yaml: &str, node: &NodeContext) -> Translation {
    translate(&parse(yaml), node, &ModelConfig::default())
}

pub(crate) fn fe(addr: &str, port: u16, proto: Protocol, scope: Scope) -> Frontend {
    Frontend {
        addr: ip(addr),
        port,
        proto,
        scope,
    }
}

/// The entry of a TCP frontend; panics listing the frontends that do exist.
pub(crate) fn entry<'a>(
    t: &'a Translation,
    addr: &str,
    port: u16,
    scope: Scope,
) -> &'a ServiceEntry {
    entry_proto(t, addr, port, Protocol::Tcp, scope)
}

pub(crate) fn entry_proto<'a>(
    t: &'a Translation,
    addr: &str,
    port: u16,
    proto: Protocol,
    scope: Scope,
) -> &'a ServiceEntry {
    let frontend = fe(addr, port, proto, scope);
    t.state.services.get(&frontend).unwrap_or_else(|| {
        panic!(
            "no frontend {frontend} {scope:?}; have {:?}; diagnostics {:?}",
            frontends(t),
            t.diagnostics
        )
    })
}

/// `addr:port` of each backend, in the entry's order.
pub(crate) fn backends(e: &ServiceEntry) -> Vec<String> {
    e.backends.iter().map(ToString::to_string).collect()
}

/// Every frontend as `addr:port/PROTO Scope Kind`, in state order.
pub(crate) fn frontends(t: &Translation) -> Vec<String> {
    t.state
        .services
        .iter()
        .map(|(f, e)| format!("{f} {:?} {:?}", f.scope, e.kind))
        .collect()
}
