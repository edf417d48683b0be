//! The cluster's service CIDRs (docs/semantics.md rule 8's last clause: an address inside a service CIDR that no Service
//! holds drops).
//!
//! kube-proxy (nftables mode, `pkg/proxy/config`'s `ServiceCIDRConfig` and the proxier's `OnServiceCIDRsChanged`)
//! takes the union of `spec.cidrs` over every `networking.k8s.io/v1` ServiceCIDR object, including ones being
//! deleted (a ServiceCIDR with a finalizer still has ClusterIPs allocated from it), and its `cluster-ips-check`
//! chain first rejects `@cluster-ips` (a ClusterIP on an undefined port) and then drops the service CIDRs, for new
//! connections in the forward and output paths. lb does the same in tc ingress and in the socket LB. Two
//! differences, both on the side of doing rule 8 where kube-proxy would not: kube-proxy only watches ServiceCIDRs
//! when the `MultiCIDRServiceAllocator` gate is on (GA and on by default since 1.33) and its iptables and IPVS modes
//! never drop; lb also takes `--service-cidrs` when the API (or the manifests) hold no ServiceCIDR at all, the way
//! a cluster without the API still has a `--service-cluster-ip-range`.

use std::net::IpAddr;
use std::sync::Arc;

use super::objects::{Diagnostic, ServiceCIDR, object_label};

use super::ModelConfig;
use super::ip::parse_cidr_sloppy;

/// The service CIDRs, sorted and without duplicates, each with its host part cleared: every readable CIDR of
/// every ServiceCIDR object, else `cfg.fallback_service_cidrs`. An unreadable CIDR is a diagnostic and is skipped
/// (the API server validates them, so this only happens with hand-written manifests).
pub(crate) fn service_cidrs(
    objects: &[Arc<ServiceCIDR>],
    cfg: &ModelConfig,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<(IpAddr, u8)> {
    let mut out = Vec::new();
    for obj in objects {
        let cidrs = obj
            .spec
            .as_ref()
            .and_then(|s| s.cidrs.as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (i, cidr) in cidrs.iter().enumerate() {
            match parse_cidr_sloppy(cidr) {
                Some(net) => out.push(network(net)),
                None => diagnostics.push(Diagnostic::new(
                    object_label("ServiceCIDR", None, obj.metadata.name.as_deref()),
                    Some(format!("spec.cidrs[{i}]")),
                    format!("{cidr:?} is not a CIDR; skipped"),
                )),
            }
        }
    }
    if objects.is_empty() {
        out.extend(cfg.fallback_service_cidrs.iter().map(|&n| network(n)));
    }
    out.sort();
    out.dedup();
    out
}

/// Parses one `--service-cidrs` value (`10.96.0.0/12`), as kube-proxy parses CIDRs.
pub fn parse_service_cidr(s: &str) -> Option<(IpAddr, u8)> {
    parse_cidr_sloppy(s).map(network)
}

/// Clears the host bits, so `10.96.0.1/12` and `10.96.0.0/12` are one CIDR.
fn network((addr, len): (IpAddr, u8)) -> (IpAddr, u8) {
    let addr = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    };
    (addr, len)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    fn cidrs(list: &[(&str, u8)]) -> Vec<(IpAddr, u8)> {
        list.iter().map(|&(a, l)| (ip(a), l)).collect()
    }

    #[test]
    fn service_cidrs_are_the_union_of_every_object_else_the_fallback() {
        let cfg = ModelConfig {
            fallback_service_cidrs: cidrs(&[("10.0.0.0", 16)]),
            ..ModelConfig::default()
        };
        // (manifests, expected CIDRs, expected diagnostics)
        type Case<'a> = (&'a str, &'a [(&'a str, u8)], usize);
        let cases: &[Case] = &[
            // No ServiceCIDR object: the fallback.
            ("", &[("10.0.0.0", 16)], 0),
            // Dual-stack default object plus a second range; duplicates and host bits collapse.
            (
                "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [10.96.0.0/12, 'fd00:10:96::/112']}\n---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: extra}\nspec: {cidrs: [10.200.0.1/24, 10.96.0.0/12]}\n",
                &[("10.96.0.0", 12), ("10.200.0.0", 24), ("fd00:10:96::", 112)],
                0,
            ),
            // An object whose only CIDR is unreadable still counts as "the API has ServiceCIDRs": no fallback.
            (
                "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: bad}\nspec: {cidrs: [not-a-cidr]}\n",
                &[],
                1,
            ),
        ];
        for (yaml, want, want_diags) in cases {
            let objects = parse(yaml);
            let mut diags = Vec::new();
            let got = service_cidrs(&objects.service_cidrs, &cfg, &mut diags);
            assert_eq!(got, cidrs(want), "{yaml}");
            assert_eq!(diags.len(), *want_diags, "{yaml}: {diags:?}");
        }
    }

    #[test]
    fn translation_carries_the_service_cidrs_into_the_desired_state() {
        let objects = parse(
            "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [10.96.0.0/16]}\n",
        );
        let t = super::super::translate(
            &objects,
            &super::super::NodeContext::default(),
            &ModelConfig::default(),
        );
        assert_eq!(t.state.service_cidrs, cidrs(&[("10.96.0.0", 16)]));
        assert!(t.diagnostics.is_empty(), "{:?}", t.diagnostics);
    }

    #[test]
    fn flag_values_parse_like_kube_proxy_cidrs() {
        assert_eq!(
            parse_service_cidr("10.96.0.10/12"),
            Some((ip("10.96.0.0"), 12))
        );
        assert_eq!(parse_service_cidr("fd00::/0"), Some((ip("::"), 0)));
        assert_eq!(parse_service_cidr("10.96.0.0"), None);
    }
}
