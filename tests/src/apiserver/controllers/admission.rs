//! What kube-apiserver does to a Service on create and update before storing it (`pkg/registry/core/service`):
//! defaulting, dropping fields the new type no longer uses (`dropTypeDependentFields`), ClusterIP and NodePort
//! allocation (`ipallocator`, `portallocator`, including the health-check nodePort), and the validation errors the
//! e2e tests match on ("provided port is already allocated", "... not in the valid range").
//!
//! Allocation never hands out an address or port again within one server's life unless asked for explicitly, like
//! the real allocators' random picks make a reuse unlikely; what is in use is read from the stored Services, so a
//! deleted Service's ClusterIP and ports are free at once (the real server's repair loop takes a while).

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ClientIPConfig, Service, ServicePort, SessionAffinityConfig};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::super::store::{Resource, Store};
use super::{Cidr, ClusterConfig};

const DEFAULT_AFFINITY_TIMEOUT: i32 = 10800;
const MAX_AFFINITY_TIMEOUT: i32 = 86400;

/// The allocators' memory: what was handed out, so that nothing is handed out twice.
#[derive(Debug, Default)]
pub struct Allocations {
    issued_ips: BTreeSet<IpAddr>,
    next_ip: [u128; 2],
    next_port: u16,
}

/// Admits a Service being created (`old` None) or updated: the object to store, or the API server's error message.
pub fn admit_service(
    cfg: &ClusterConfig,
    alloc: &mut Allocations,
    store: &Store,
    old: Option<&Service>,
    mut svc: Service,
) -> Result<Service, String> {
    let key = (
        svc.metadata.namespace.clone().unwrap_or_default(),
        svc.metadata.name.clone().unwrap_or_default(),
    );
    if let Some(old) = old {
        drop_type_dependent_fields(old, &mut svc);
    }
    default_service(&mut svc)?;
    validate(&svc)?;
    let in_use = InUse::collect(store, &key);
    allocate_cluster_ips(cfg, alloc, &in_use, old, &mut svc)?;
    allocate_node_ports(cfg, alloc, &in_use, &mut svc)?;
    Ok(svc)
}

fn spec_type(svc: &Service) -> &str {
    svc.spec
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("ClusterIP")
}

fn needs_node_ports(svc: &Service) -> bool {
    match spec_type(svc) {
        "NodePort" => true,
        "LoadBalancer" => svc
            .spec
            .as_ref()
            .and_then(|s| s.allocate_load_balancer_node_ports)
            .unwrap_or(true),
        _ => false,
    }
}

fn needs_health_check(svc: &Service) -> bool {
    spec_type(svc) == "LoadBalancer"
        && svc
            .spec
            .as_ref()
            .and_then(|s| s.external_traffic_policy.as_deref())
            == Some("Local")
}

/// `dropTypeDependentFields`: an update that changes the type without touching the fields the new type cannot have
/// gets them cleared, as `kubectl edit` users expect (ClusterIP to ExternalName clears the ClusterIP, NodePort to
/// ClusterIP releases the nodePorts, Local to Cluster releases the health-check nodePort).
fn drop_type_dependent_fields(old: &Service, svc: &mut Service) {
    let (Some(old_spec), Some(spec)) = (old.spec.as_ref(), svc.spec.as_mut()) else {
        return;
    };
    let new_type = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
    if new_type == "ExternalName"
        && spec.cluster_ip == old_spec.cluster_ip
        && spec.cluster_ip.as_deref() != Some("None")
    {
        spec.cluster_ip = None;
        spec.cluster_ips = None;
        spec.ip_families = None;
        spec.ip_family_policy = None;
    }
    let old_ports: Vec<(i32, Option<i32>)> = old_spec
        .ports
        .iter()
        .flatten()
        .map(|p| (p.port, p.node_port))
        .collect();
    let keeps_node_ports = new_type == "NodePort"
        || (new_type == "LoadBalancer" && spec.allocate_load_balancer_node_ports != Some(false));
    if !keeps_node_ports {
        for p in spec.ports.iter_mut().flatten() {
            let unchanged = old_ports
                .iter()
                .any(|(port, np)| *port == p.port && *np == p.node_port);
            if unchanged || new_type != "LoadBalancer" {
                p.node_port = None;
            }
        }
    }
    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    if (new_type != "LoadBalancer" || !local)
        && spec.health_check_node_port == old_spec.health_check_node_port
    {
        spec.health_check_node_port = None;
    }
    if new_type != "LoadBalancer" {
        spec.allocate_load_balancer_node_ports = None;
        spec.load_balancer_class = None;
    }
    if !matches!(new_type.as_str(), "NodePort" | "LoadBalancer")
        && spec.external_ips.as_ref().is_none_or(|e| e.is_empty())
    {
        spec.external_traffic_policy = None;
    }
}

/// The API server's defaults (`SetDefaults_Service` and the registry's own).
fn default_service(svc: &mut Service) -> Result<(), String> {
    let spec = svc.spec.get_or_insert_with(Default::default);
    let ty = spec.type_.get_or_insert_with(|| "ClusterIP".into()).clone();
    if ty == "ExternalName" {
        if spec.external_name.as_deref().is_none_or(str::is_empty) {
            return Err("spec.externalName: Required value".into());
        }
        return Ok(());
    }
    spec.session_affinity.get_or_insert_with(|| "None".into());
    if spec.session_affinity.as_deref() == Some("ClientIP") {
        let cfg = spec
            .session_affinity_config
            .get_or_insert_with(SessionAffinityConfig::default);
        let ip = cfg.client_ip.get_or_insert_with(ClientIPConfig::default);
        ip.timeout_seconds.get_or_insert(DEFAULT_AFFINITY_TIMEOUT);
    } else {
        spec.session_affinity_config = None;
    }
    spec.internal_traffic_policy
        .get_or_insert_with(|| "Cluster".into());
    let externally_reachable = matches!(ty.as_str(), "NodePort" | "LoadBalancer")
        || spec.external_ips.as_ref().is_some_and(|e| !e.is_empty());
    if externally_reachable {
        spec.external_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
    }
    if ty == "LoadBalancer" {
        spec.allocate_load_balancer_node_ports.get_or_insert(true);
    }
    for p in spec.ports.iter_mut().flatten() {
        p.protocol.get_or_insert_with(|| "TCP".into());
        p.target_port.get_or_insert(IntOrString::Int(p.port));
    }
    Ok(())
}

/// The field errors the tests rely on; anything else a real server would refuse is the test's business.
fn validate(svc: &Service) -> Result<(), String> {
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(());
    };
    let ty = spec_type(svc);
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ty != "ExternalName" && ports.is_empty() && spec.cluster_ip.as_deref() != Some("None") {
        return Err("spec.ports: Required value".into());
    }
    let mut seen = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        if !(1..=65535).contains(&p.port) {
            return Err(format!(
                "spec.ports[{i}].port: Invalid value: {}: must be between 1 and 65535, inclusive",
                p.port
            ));
        }
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if !seen.insert((p.port, proto.to_owned())) {
            return Err(format!(
                "spec.ports[{i}]: Duplicate value: {{port: {}, protocol: {proto}}}",
                p.port
            ));
        }
        let name = p.name.clone().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            return Err(format!("spec.ports[{i}].name: Required value"));
        }
        if !names.insert(name.clone()) {
            return Err(format!("spec.ports[{i}].name: Duplicate value: \"{name}\""));
        }
        if p.node_port.is_some_and(|n| n != 0) && !matches!(ty, "NodePort" | "LoadBalancer") {
            return Err(format!(
                "spec.ports[{i}].nodePort: Forbidden: may not be used when `type` is '{ty}'"
            ));
        }
    }
    if spec.external_traffic_policy.as_deref() == Some("Local")
        && !matches!(ty, "NodePort" | "LoadBalancer")
        && spec.external_ips.as_ref().is_none_or(|e| e.is_empty())
    {
        return Err(
            "spec.externalTrafficPolicy: Invalid value: \"Local\": may only be set for externally-accessible services"
                .into(),
        );
    }
    if let Some(t) = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        && !(1..=MAX_AFFINITY_TIMEOUT).contains(&t)
    {
        return Err(format!(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds: Invalid value: {t}: must be greater than 0 and less than {MAX_AFFINITY_TIMEOUT}"
        ));
    }
    Ok(())
}

/// Addresses and ports held by the other stored Services.
struct InUse {
    ips: BTreeSet<IpAddr>,
    ports: BTreeSet<i32>,
}

impl InUse {
    fn collect(store: &Store, this: &(String, String)) -> InUse {
        let mut ips = BTreeSet::new();
        let mut ports = BTreeSet::new();
        for v in store.all(Resource::Services) {
            let Ok(svc) = serde_json::from_value::<Service>(v.clone()) else {
                continue;
            };
            let key = (
                svc.metadata.namespace.clone().unwrap_or_default(),
                svc.metadata.name.clone().unwrap_or_default(),
            );
            if &key == this {
                continue;
            }
            let Some(spec) = svc.spec else { continue };
            for ip in spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
            {
                if let Ok(ip) = ip.parse() {
                    ips.insert(ip);
                }
            }
            for p in spec.ports.iter().flatten() {
                if let Some(np) = p.node_port.filter(|n| *n != 0) {
                    ports.insert(np);
                }
            }
            if let Some(hc) = spec.health_check_node_port.filter(|n| *n != 0) {
                ports.insert(hc);
            }
        }
        InUse { ips, ports }
    }
}

fn family_name(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn allocate_cluster_ips(
    cfg: &ClusterConfig,
    alloc: &mut Allocations,
    in_use: &InUse,
    old: Option<&Service>,
    svc: &mut Service,
) -> Result<(), String> {
    if spec_type(svc) == "ExternalName" {
        return Ok(());
    }
    let spec = svc.spec.get_or_insert_with(Default::default);
    if spec.cluster_ip.as_deref() == Some("None") {
        spec.cluster_ips = Some(vec!["None".into()]);
        spec.ip_families.get_or_insert_with(|| vec!["IPv4".into()]);
        spec.ip_family_policy
            .get_or_insert_with(|| "SingleStack".into());
        return Ok(());
    }
    // Requested addresses: clusterIPs, else clusterIP; an update keeps what the Service had.
    let mut requested: Vec<IpAddr> = Vec::new();
    let given = spec
        .cluster_ips
        .clone()
        .filter(|v| !v.is_empty())
        .or_else(|| {
            spec.cluster_ip
                .clone()
                .filter(|s| !s.is_empty())
                .map(|s| vec![s])
        });
    for s in given.iter().flatten() {
        requested.push(s.parse().map_err(|_| {
            format!("spec.clusterIPs: Invalid value: \"{s}\": must be a valid IP address")
        })?);
    }
    let old_ips: Vec<IpAddr> = old
        .and_then(|o| o.spec.as_ref())
        .and_then(|s| s.cluster_ips.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let policy = spec
        .ip_family_policy
        .get_or_insert_with(|| "SingleStack".into())
        .clone();
    let mut families: Vec<String> = spec.ip_families.clone().unwrap_or_default();
    for ip in &requested {
        if !families.iter().any(|f| f == family_name(ip)) {
            families.push(family_name(ip).into());
        }
    }
    if families.is_empty() {
        families.push("IPv4".into());
    }
    if policy != "SingleStack" {
        for f in ["IPv4", "IPv6"] {
            if !families.iter().any(|x| x == f) && cfg.has_family(f) {
                families.push(f.into());
            }
        }
    } else {
        families.truncate(1);
    }
    let mut ips = Vec::new();
    for family in &families {
        let cidr = cfg
            .service_cidrs
            .iter()
            .find(|c| family_name(&c.addr) == family)
            .ok_or_else(|| {
                format!(
                    "spec.ipFamilies: Invalid value: \"{family}\": not configured on this cluster"
                )
            })?;
        let ip = match requested.iter().find(|ip| family_name(ip) == family) {
            Some(ip) => {
                if !cidr.contains(*ip) {
                    return Err(format!(
                        "spec.clusterIPs: Invalid value: \"{ip}\": failed to allocate IP {ip}: provided IP is not in the valid range. The range of valid IPs is {cidr}"
                    ));
                }
                if in_use.ips.contains(ip) {
                    return Err(format!(
                        "spec.clusterIPs: Invalid value: \"{ip}\": failed to allocate IP {ip}: provided IP is already allocated"
                    ));
                }
                *ip
            }
            None => match old_ips.iter().find(|ip| family_name(ip) == family) {
                Some(ip) => *ip,
                None => alloc.next_cluster_ip(cidr, in_use)?,
            },
        };
        alloc.issued_ips.insert(ip);
        ips.push(ip);
    }
    spec.ip_families = Some(families);
    spec.cluster_ip = ips.first().map(ToString::to_string);
    spec.cluster_ips = Some(ips.iter().map(ToString::to_string).collect());
    Ok(())
}

impl Allocations {
    fn next_cluster_ip(&mut self, cidr: &Cidr, in_use: &InUse) -> Result<IpAddr, String> {
        let slot = usize::from(!cidr.addr.is_ipv4());
        let size = cidr.size();
        // Start above the first few addresses (the API server's own `kubernetes` Service, DNS).
        let start = self.next_ip[slot].max(10);
        for offset in start..size.saturating_sub(1) {
            let ip = cidr.nth(offset);
            if !in_use.ips.contains(&ip) && !self.issued_ips.contains(&ip) {
                self.next_ip[slot] = offset + 1;
                return Ok(ip);
            }
        }
        Err(format!(
            "failed to allocate a serviceIP: range is full ({cidr})"
        ))
    }

    fn next_node_port(
        &mut self,
        cfg: &ClusterConfig,
        taken: &BTreeSet<i32>,
    ) -> Result<i32, String> {
        let (lo, hi) = (*cfg.node_port_range.start(), *cfg.node_port_range.end());
        let span = u32::from(hi - lo) + 1;
        // Start a little above the bottom, where tests asking for a port by number tend to look.
        let start = if self.next_port < lo {
            lo + 100
        } else {
            self.next_port
        };
        for i in 0..span {
            let p = lo + ((u32::from(start - lo) + i) % span) as u16;
            if !taken.contains(&i32::from(p)) {
                self.next_port = if p == hi { lo } else { p + 1 };
                return Ok(i32::from(p));
            }
        }
        Err("failed to allocate a nodePort: range is full".into())
    }
}

fn allocate_node_ports(
    cfg: &ClusterConfig,
    alloc: &mut Allocations,
    in_use: &InUse,
    svc: &mut Service,
) -> Result<(), String> {
    let node_ports = needs_node_ports(svc);
    let health = needs_health_check(svc);
    let spec = svc.spec.get_or_insert_with(Default::default);
    let mut taken = in_use.ports.clone();
    let range = &cfg.node_port_range;
    let check = |field: &str, p: i32, taken: &BTreeSet<i32>| -> Result<(), String> {
        if !(i32::from(*range.start())..=i32::from(*range.end())).contains(&p) {
            return Err(format!(
                "{field}: Invalid value: {p}: provided port is not in the valid range. The range of valid ports is {}-{}",
                range.start(),
                range.end()
            ));
        }
        if taken.contains(&p) {
            return Err(format!(
                "{field}: Invalid value: {p}: provided port is already allocated"
            ));
        }
        Ok(())
    };
    let ports: &mut Vec<ServicePort> = spec.ports.get_or_insert_with(Vec::new);
    // Requested ports first, so that an allocation never takes one a later port asks for.
    let mut by_port_number: Vec<(i32, i32)> = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        if let Some(np) = p.node_port.filter(|n| *n != 0) {
            if !node_ports {
                continue;
            }
            // One service port number on TCP and UDP may share its nodePort (`initNodePorts`).
            if !by_port_number
                .iter()
                .any(|(port, n)| *port == p.port && *n == np)
            {
                check(&format!("spec.ports[{i}].nodePort"), np, &taken)?;
            }
            taken.insert(np);
            by_port_number.push((p.port, np));
        }
    }
    for p in ports.iter_mut() {
        if !node_ports {
            p.node_port = None;
            continue;
        }
        if p.node_port.is_none_or(|n| n == 0) {
            let np = match by_port_number.iter().find(|(port, _)| *port == p.port) {
                Some((_, np)) => *np,
                None => {
                    let np = alloc.next_node_port(cfg, &taken)?;
                    taken.insert(np);
                    by_port_number.push((p.port, np));
                    np
                }
            };
            p.node_port = Some(np);
        }
    }
    if health {
        match spec.health_check_node_port.filter(|n| *n != 0) {
            Some(hc) => check("spec.healthCheckNodePort", hc, &taken)?,
            None => spec.health_check_node_port = Some(alloc.next_node_port(cfg, &taken)?),
        }
    } else {
        spec.health_check_node_port = None;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cfg() -> ClusterConfig {
        ClusterConfig::default()
    }

    fn svc(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "ns"}, "spec": spec}))
        .expect("service")
    }

    fn store_with(svcs: &[Service]) -> Store {
        let mut st = Store::default();
        for s in svcs {
            st.upsert(serde_json::to_value(s).expect("json"))
                .expect("upsert");
        }
        st
    }

    #[test]
    fn a_node_port_service_gets_defaults_an_ip_and_one_node_port_per_port_number() {
        let mut alloc = Allocations::default();
        let s = svc(json!({"type": "NodePort", "ports": [
            {"name": "tcp", "port": 80, "protocol": "TCP"}, {"name": "udp", "port": 80, "protocol": "UDP"}]}));
        let s = admit_service(&cfg(), &mut alloc, &Store::default(), None, s).expect("admitted");
        let spec = s.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
        let nps: Vec<_> = spec
            .ports
            .expect("ports")
            .iter()
            .map(|p| p.node_port)
            .collect();
        assert_eq!(
            nps[0], nps[1],
            "TCP and UDP of one port number share the nodePort"
        );
        assert!(nps[0].is_some_and(|n| (30000..=32767).contains(&n)));
    }

    #[test]
    fn node_port_collisions_and_out_of_range_ports_are_refused() {
        let mut alloc = Allocations::default();
        let a = admit_service(
            &cfg(),
            &mut alloc,
            &Store::default(),
            None,
            svc(json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30500}]})),
        )
        .expect("first");
        let st = store_with(&[a]);
        let mut b = svc(json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30500}]}));
        b.metadata.name = Some("other".into());
        let err = admit_service(&cfg(), &mut alloc, &st, None, b).expect_err("collision");
        assert!(
            err.contains("30500") && err.contains("port is already allocated"),
            "{err}"
        );
        let mut c = svc(json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 1234}]}));
        c.metadata.name = Some("third".into());
        let err = admit_service(&cfg(), &mut alloc, &st, None, c).expect_err("range");
        assert!(
            err.contains("1234") && err.contains("port is not in the valid range"),
            "{err}"
        );
    }

    #[test]
    fn type_changes_drop_what_the_new_type_cannot_have() {
        let mut alloc = Allocations::default();
        let st = Store::default();
        let np = admit_service(
            &cfg(),
            &mut alloc,
            &st,
            None,
            svc(json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 80}]})),
        )
        .expect("lb");
        assert!(
            np.spec
                .as_ref()
                .and_then(|s| s.health_check_node_port)
                .is_some()
        );
        let mut cluster = np.clone();
        if let Some(s) = cluster.spec.as_mut() {
            s.external_traffic_policy = Some("Cluster".into());
        }
        let cluster = admit_service(&cfg(), &mut alloc, &st, Some(&np), cluster).expect("etp");
        assert_eq!(
            cluster.spec.as_ref().and_then(|s| s.health_check_node_port),
            None
        );
        let mut cip = cluster.clone();
        if let Some(s) = cip.spec.as_mut() {
            s.type_ = Some("ClusterIP".into());
        }
        let cip = admit_service(&cfg(), &mut alloc, &st, Some(&cluster), cip).expect("clusterip");
        let spec = cip.spec.as_ref().expect("spec");
        assert!(spec.ports.iter().flatten().all(|p| p.node_port.is_none()));
        assert_eq!(spec.external_traffic_policy, None);
        let mut en = cip.clone();
        if let Some(s) = en.spec.as_mut() {
            s.type_ = Some("ExternalName".into());
            s.external_name = Some("example.com".into());
        }
        let en = admit_service(&cfg(), &mut alloc, &st, Some(&cip), en).expect("externalname");
        assert_eq!(en.spec.as_ref().and_then(|s| s.cluster_ip.clone()), None);
    }
}
