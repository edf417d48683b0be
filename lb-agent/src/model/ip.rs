//! Address parsing as kube-proxy does it (`k8s.io/utils/net`), and the IP family split used everywhere in dual-stack.

use std::net::{IpAddr, Ipv4Addr};

/// An IP family. kube-proxy runs one proxier per family; the model does the same work once per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub(crate) fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The EndpointSlice `addressType` holding this family's addresses.
    pub(crate) fn address_type(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// Parses an IP the way kube-proxy's `netutils.ParseIPSloppy` does: IPv4 octets may have leading zeros (read as
/// decimal, as older Go did), and an IPv4-mapped IPv6 address is the IPv4 address (Go's `net.IP` makes no
/// difference, so `netutils.IsIPv6String("::ffff:1.2.3.4")` is false).
pub(crate) fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
}

/// Whether `s` is an IPv4-mapped IPv6 literal (`::ffff:10.0.0.1`). `parse_ip_sloppy` reads it as the IPv4 address,
/// as kube-proxy's parser does, but the API server's endpoint validation refuses it in an `IPv4` slice (it is not an
/// IPv4 address) and in an `IPv6` one (it is not an IPv6 endpoint): such an endpoint comes only from a file or a
/// client that skipped validation, and is no endpoint of either family (docs/semantics.md rule 1).
pub(crate) fn is_ipv4_mapped_literal(s: &str) -> bool {
    s.parse::<std::net::Ipv6Addr>()
        .is_ok_and(|ip| ip.to_ipv4_mapped().is_some())
}

/// Parses a CIDR (`10.0.0.0/8`, `2001:db8::/32`) like `netutils.ParseCIDRSloppy`, after trimming spaces as the API
/// server does for `loadBalancerSourceRanges`.
pub(crate) fn parse_cidr_sloppy(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = s.trim().split_once('/')?;
    let addr = match addr.parse::<IpAddr>() {
        // Keep the family as written: `::ffff:0:0/96` is an IPv6 range.
        Ok(ip) => ip,
        Err(_) => parse_ip_sloppy(addr)?,
    };
    let len: u8 = len.parse().ok()?;
    let max = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    (len <= max).then_some((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sloppy_ip_parsing_matches_kube_proxy() {
        let cases: &[(&str, Option<&str>)] = &[
            ("10.0.0.1", Some("10.0.0.1")),
            ("010.000.000.001", Some("10.0.0.1")),
            ("::ffff:10.0.0.1", Some("10.0.0.1")),
            ("fd00::1", Some("fd00::1")),
            ("10.0.0", None),
            ("10.0.0.256", None),
            ("10.0.0.1.1", None),
            ("None", None),
            ("", None),
        ];
        for (input, want) in cases {
            let want: Option<IpAddr> = want.map(|w| w.parse().expect("test address"));
            assert_eq!(parse_ip_sloppy(input), want, "parse_ip_sloppy({input:?})");
        }
    }

    #[test]
    fn ipv4_mapped_literals_are_recognised() {
        assert!(is_ipv4_mapped_literal("::ffff:10.0.0.1"));
        assert!(is_ipv4_mapped_literal("::FFFF:a00:1"));
        assert!(!is_ipv4_mapped_literal("10.0.0.1"));
        assert!(!is_ipv4_mapped_literal("fd00::1"));
        assert!(
            !is_ipv4_mapped_literal("::10.0.0.1"),
            "IPv4-compatible, not mapped"
        );
    }

    #[test]
    fn cidr_parsing() {
        let v4: IpAddr = "10.0.0.0".parse().expect("test address");
        assert_eq!(parse_cidr_sloppy(" 10.0.0.0/8 "), Some((v4, 8)));
        assert_eq!(parse_cidr_sloppy("10.0.0.0/33"), None);
        assert_eq!(parse_cidr_sloppy("10.0.0.0"), None);
        assert_eq!(
            parse_cidr_sloppy("2001:db8::/32").map(|(ip, _)| Family::of(&ip)),
            Some(Family::V6)
        );
    }
}
