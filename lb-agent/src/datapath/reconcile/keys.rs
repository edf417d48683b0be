//! Frontends and the `LB_SERVICES` keys they are programmed under. A key holds an address in lb's 16-byte form, in
//! which an IPv4 address and its IPv4-mapped IPv6 spelling are one: these helpers go from keys back to frontends.

use std::net::{IpAddr, Ipv6Addr};

use lb_common::ServiceKey;

use crate::state::{DesiredState, Frontend, Protocol, Scope, ServiceEntry};

pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey::new(f.addr, f.port, f.proto.number(), f.scope.number())
}

/// The other spelling of a frontend's address in lb's 16-byte form (IPv4 and IPv4-mapped IPv6), if any.
pub(super) fn alias(f: &Frontend) -> Option<Frontend> {
    let addr = match f.addr {
        IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
        IpAddr::V6(a) => IpAddr::V4(a.to_ipv4_mapped()?),
    };
    Some(Frontend { addr, ..*f })
}

/// The addresses whose 16-byte form is `bytes`: the IPv6 one, and the IPv4 one when it is IPv4-mapped.
pub(super) fn addrs_of(bytes: [u8; 16]) -> impl Iterator<Item = IpAddr> {
    let v6 = Ipv6Addr::from(bytes);
    [Some(IpAddr::V6(v6)), v6.to_ipv4_mapped().map(IpAddr::V4)]
        .into_iter()
        .flatten()
}

/// Every protocol: the match makes a new variant a compile error here rather than a frontend the lookups below
/// cannot find.
pub(super) fn protocols() -> [Protocol; 3] {
    let all = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
    for p in all {
        match p {
            Protocol::Tcp | Protocol::Udp | Protocol::Sctp => {}
        }
    }
    all
}

/// Every scope (see [`protocols`]).
pub(super) fn scopes() -> [Scope; 2] {
    let all = [Scope::External, Scope::Internal];
    for s in all {
        match s {
            Scope::External | Scope::Internal => {}
        }
    }
    all
}

/// The desired entry of the frontend with this key, if one is desired.
pub(super) fn desired_entry_of_key<'a>(
    desired: &'a DesiredState,
    key: &ServiceKey,
) -> Option<&'a ServiceEntry> {
    let proto = protocols().into_iter().find(|p| p.number() == key.proto)?;
    let scope = scopes().into_iter().find(|s| s.number() == key.scope)?;
    addrs_of(key.addr).find_map(|addr| {
        desired.services.get(&Frontend {
            addr,
            port: key.port,
            proto,
            scope,
        })
    })
}
