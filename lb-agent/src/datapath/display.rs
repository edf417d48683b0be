//! How the read-only views, the CLI and the metrics show map keys and values: addresses, protocol numbers, scopes.

use lb_common::addr_from_bytes;

use crate::state::{Protocol, Scope};

/// `ip:port`, with the IPv6 address in brackets: `[fd00::1]:80`.
pub fn show_addr(bytes: [u8; 16], port: u16) -> String {
    match addr_from_bytes(bytes) {
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

pub fn proto_name(proto: u8) -> String {
    Protocol::from_number(proto).map_or_else(|| proto.to_string(), |p| p.to_string())
}

pub fn scope_name(scope: u8) -> String {
    match Scope::from_number(scope) {
        Some(Scope::Internal) => "internal".into(),
        Some(Scope::External) => "external".into(),
        None => scope.to_string(),
    }
}
