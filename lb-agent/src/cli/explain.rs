//! `lb-agent explain <namespace>/<service>`: for each VIP and traffic class of a Service, which endpoints are
//! eligible and why the others are not (the model's own categorisation), next to what the pinned maps hold, with
//! every difference flagged. Reads the objects from manifests (`--manifests`) or lists them once from the API server
//! (`--kubeconfig`, or the service account inside a pod), with the same selectors and conversion as `lb-agent run`'s
//! watchers; no watch.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::datapath::display::show_addr;
use crate::datapath::maps::{MapsRead, PinnedMaps};
use crate::datapath::reconcile::service_key;
use crate::model::DEFAULT_NAMESPACE;
use crate::model::{self, Eligibility, ModelConfig, ServiceExplanation};
use crate::source::manifest;
use crate::state::Algorithm;

use super::args::{OutputFormat, PinArgs};

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// The Service, as `namespace/name` (or `name` in `default`).
    service: String,
    /// Kubernetes YAML holding the Service, its EndpointSlices and (optionally) the Node and ServiceCIDRs (a file
    /// or directory).
    #[arg(long, env = "LB_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// List the objects once from the API server this kubeconfig names (its current context) instead of reading
    /// manifests. Inside a pod (`KUBERNETES_SERVICE_HOST` set) the service account is used when neither this nor
    /// --manifests is given, as `lb-agent run` does.
    #[arg(long, env = "LB_KUBECONFIG", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// The node to explain for (decides which endpoints are local, and the zone).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// NodePort addresses when the manifests hold no Node object for this node.
    #[arg(long = "node-address", value_delimiter = ',')]
    node_addresses: Vec<IpAddr>,
    /// As `lb-agent run --algorithm`.
    #[arg(long, default_value = "maglev", env = "LB_ALGORITHM")]
    algorithm: Algorithm,
    /// As `lb-agent run --service-proxy-name`.
    #[arg(long, env = "LB_SERVICE_PROXY_NAME")]
    service_proxy_name: Option<String>,
    /// As `lb-agent run --service-cidrs`: used when the source holds no ServiceCIDR object.
    #[arg(
        long = "service-cidrs",
        env = "LB_SERVICE_CIDRS",
        value_delimiter = ',',
        value_parser = super::args::parse_cidr_arg
    )]
    service_cidrs: Vec<(IpAddr, u8)>,
    /// As `lb-agent run --nodeport-addresses` (CIDRs matched against --node-address).
    #[arg(
        long = "nodeport-addresses",
        env = "LB_NODEPORT_ADDRESSES",
        value_delimiter = ','
    )]
    nodeport_addresses: Vec<String>,
    /// As `lb-agent run --localhost-nodeports`.
    #[arg(long, env = "LB_LOCALHOST_NODEPORTS", default_value_t = true, action = clap::ArgAction::Set)]
    localhost_nodeports: bool,
    /// Do not compare with the pinned maps.
    #[arg(long)]
    no_maps: bool,
    #[command(flatten)]
    pins: PinArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: OutputFormat,
}

/// What the maps hold for one frontend, and whether it matches.
#[derive(Debug, Serialize)]
pub struct Programmed {
    pub frontend: String,
    pub scope: String,
    /// `None`: no entry in `LB_SERVICES`.
    pub service_id: Option<u32>,
    pub backends: Vec<String>,
    pub when_empty: Option<&'static str>,
    /// Empty when the maps agree with the model.
    pub differences: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Output {
    /// Where the objects came from: a manifest path, or the API server.
    source: String,
    #[serde(flatten)]
    explanation: ServiceExplanation,
    /// The service CIDRs the model uses (`addr/len`; rule 8's unallocated-ClusterIP drop), and what `LB_SVC_CIDRS`
    /// holds (`None` without the maps).
    service_cidrs: Vec<String>,
    service_cidrs_in_maps: Option<Vec<String>>,
    /// Objects that could not be read (skipped), as the agent would log them.
    diagnostics: Vec<String>,
    /// `None` with `--no-maps` or when the maps cannot be read (then `maps_error` says why).
    maps: Option<Vec<Programmed>>,
    maps_error: Option<String>,
}

pub fn run(args: &ExplainArgs) -> anyhow::Result<()> {
    let (namespace, name) = match args.service.split_once('/') {
        Some((ns, n)) => (ns.to_owned(), n.to_owned()),
        None => (DEFAULT_NAMESPACE.to_owned(), args.service.clone()),
    };
    let (source, objects, diagnostics) = load_objects(args)?;
    let nodeport_addresses =
        model::NodePortAddresses::parse(&args.nodeport_addresses).map_err(anyhow::Error::msg)?;
    let cfg = ModelConfig {
        default_algorithm: args.algorithm,
        service_proxy_name: args.service_proxy_name.clone(),
        fallback_node_addresses: args.node_addresses.clone(),
        fallback_service_cidrs: args.service_cidrs.clone(),
        localhost_nodeports: args.localhost_nodeports && nodeport_addresses.allows_ipv4_loopback(),
        nodeport_addresses,
    };
    let node = model::node_context(&args.node_name, &objects.nodes, &cfg);
    let Some(explanation) = model::explain(&objects, &node, &cfg, &namespace, &name) else {
        bail!("no Service {namespace}/{name} in {source}");
    };
    let service_cidrs: Vec<String> = model::translate(&objects, &node, &cfg)
        .state
        .service_cidrs
        .iter()
        .map(|(a, l)| format!("{a}/{l}"))
        .collect();
    let (maps, service_cidrs_in_maps, maps_error) = if args.no_maps {
        (None, None, None)
    } else {
        match PinnedMaps::open(&args.pins.bpffs) {
            Ok(m) => (
                Some(compare(&explanation, &m)?),
                Some(cidrs_in_maps(&m)?),
                None,
            ),
            Err(e) => (
                None,
                None,
                Some(format!(
                    "{e} (is the agent's pin directory {}?)",
                    args.pins.bpffs.display()
                )),
            ),
        }
    };
    let out = Output {
        source,
        explanation,
        service_cidrs,
        service_cidrs_in_maps,
        diagnostics: diagnostics.iter().map(ToString::to_string).collect(),
        maps,
        maps_error,
    };
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&out)?),
        OutputFormat::Table => print!("{}", render(&out)),
    }
    Ok(())
}

/// The objects from the manifests or, listed once, from the API server; with a name for the source.
fn load_objects(
    args: &ExplainArgs,
) -> anyhow::Result<(
    String,
    crate::model::ClusterObjects,
    Vec<crate::model::Diagnostic>,
)> {
    use crate::source::kube::{self, Connection};
    let connection = match (&args.manifests, &args.kubeconfig) {
        (Some(path), None) => {
            let (objects, diagnostics) =
                manifest::load_path(path).with_context(|| format!("reading {}", path.display()))?;
            return Ok((path.display().to_string(), objects, diagnostics));
        }
        (None, Some(k)) => Connection::Kubeconfig(k.clone()),
        (Some(_), Some(_)) => bail!("give either --manifests or --kubeconfig, not both"),
        (None, None) if kube::in_cluster() => Connection::InCluster,
        (None, None) => bail!(
            "nothing to explain from: give --manifests <file|dir> or --kubeconfig <file> (inside a pod the service account is used)"
        ),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let (objects, diagnostics) = rt.block_on(async {
        let client = kube::client(&connection).await?;
        kube::list_once(&client, &args.node_name).await
    })?;
    Ok((
        format!("the API server ({})", kube::describe(&connection)),
        objects,
        diagnostics,
    ))
}

/// What `LB_SVC_CIDRS` holds, as sorted `addr/len`.
fn cidrs_in_maps(maps: &PinnedMaps) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in maps.node_entries()? {
        if let crate::datapath::packet_maps::NodeEntry::ServiceCidr { prefix, addr } = entry {
            let ip = lb_common::addr_from_bytes(addr);
            let len = if ip.is_ipv4() {
                prefix.saturating_sub(96)
            } else {
                prefix
            };
            out.push(format!("{ip}/{len}"));
        }
    }
    out.sort();
    Ok(out)
}

/// Compares every frontend of the explanation with the maps.
pub fn compare(e: &ServiceExplanation, maps: &PinnedMaps) -> anyhow::Result<Vec<Programmed>> {
    let services = maps.services()?;
    let backends: std::collections::HashMap<u32, lb_common::BackendValue> =
        maps.backends()?.into_iter().collect();
    let mut out = Vec::new();
    for port in &e.ports {
        for f in &port.frontends {
            let key = service_key(&f.frontend);
            let scope = format!("{:?}", f.frontend.scope).to_ascii_lowercase();
            let Some((_, value)) = services.iter().find(|(k, _)| *k == key) else {
                out.push(Programmed {
                    frontend: f.frontend.to_string(),
                    scope,
                    service_id: None,
                    backends: Vec::new(),
                    when_empty: None,
                    differences: vec!["not programmed: no entry in LB_SERVICES".into()],
                });
                continue;
            };
            let ids: BTreeSet<u32> = if value.backend_count > 0 {
                maps.table(value)?.unwrap_or_default().into_iter().collect()
            } else {
                BTreeSet::new()
            };
            let held: BTreeSet<String> = ids
                .iter()
                .map(|id| {
                    backends
                        .get(id)
                        .map(|b| show_addr(b.addr, b.port))
                        .unwrap_or_else(|| format!("<missing backend {id}>"))
                })
                .collect();
            let want: BTreeSet<String> = f.backends.iter().cloned().collect();
            let mut differences = Vec::new();
            for missing in want.difference(&held) {
                differences.push(format!("model uses {missing}, the maps do not"));
            }
            for extra in held.difference(&want) {
                differences.push(format!("the maps hold {extra}, the model does not use it"));
            }
            let when_empty = if value.flags & lb_common::SVC_FLAG_DROP_NO_BACKEND != 0 {
                "drop"
            } else {
                "reject"
            };
            if want.is_empty() && held.is_empty() && when_empty != f.when_empty {
                differences.push(format!(
                    "without backends the model would {}, the maps {when_empty}",
                    f.when_empty
                ));
            }
            out.push(Programmed {
                frontend: f.frontend.to_string(),
                scope,
                service_id: Some(value.service_id),
                backends: held.into_iter().collect(),
                when_empty: Some(when_empty),
                differences,
            });
        }
    }
    Ok(out)
}

fn eligibility(e: Eligibility) -> &'static str {
    match e {
        Eligibility::Ready => "used: ready",
        Eligibility::TerminatingFallback => "used: serving while terminating (no ready endpoint)",
        Eligibility::Terminating => "not used: terminating (ready endpoints exist)",
        Eligibility::NotReady => "not used: not ready",
        Eligibility::OtherNode => "not used: on another node (Local policy)",
        Eligibility::OtherZone => "not used: hinted for another zone (topology)",
        Eligibility::OtherNodeHint => "not used: hinted for another node (topology)",
    }
}

fn render(out: &Output) -> String {
    let e = &out.explanation;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Service {} on node {}{}",
        e.service,
        if e.node.is_empty() { "-" } else { &e.node },
        e.zone
            .as_deref()
            .map(|z| format!(" (zone {z})"))
            .unwrap_or_default()
    );
    let _ = writeln!(s, "  source: {}", out.source);
    for n in &e.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    for d in &out.diagnostics {
        let _ = writeln!(s, "  skipped: {d}");
    }
    let cidrs = if out.service_cidrs.is_empty() {
        "none (no address is dropped as unallocated)".to_owned()
    } else {
        out.service_cidrs.join(", ")
    };
    let _ = writeln!(s, "  service CIDRs: {cidrs}");
    if let Some(held) = &out.service_cidrs_in_maps
        && *held != out.service_cidrs
    {
        let _ = writeln!(s, "    MISMATCH: the maps hold [{}]", held.join(", "));
    }
    for p in &e.ports {
        let _ = writeln!(
            s,
            "\nport {} {} {}  internalTrafficPolicy={} externalTrafficPolicy={}",
            if p.port.is_empty() {
                "(unnamed)"
            } else {
                &p.port
            },
            p.protocol,
            p.family,
            p.internal_traffic_policy,
            p.external_traffic_policy
        );
        for (class, set) in [("cluster", &p.cluster), ("local", &p.local)] {
            let Some(set) = set else { continue };
            let _ = writeln!(s, "  {class} endpoints:");
            if set.is_empty() {
                let _ = writeln!(s, "    (none)");
            }
            for ep in set {
                let _ = writeln!(
                    s,
                    "    {:<45} {:<6} {}",
                    ep.backend,
                    if ep.local { "local" } else { "remote" },
                    eligibility(ep.eligibility)
                );
            }
        }
        let _ = writeln!(s, "  frontends:");
        for f in &p.frontends {
            let scope = format!("{:?}", f.frontend.scope).to_ascii_lowercase();
            let backends = if f.backends.is_empty() {
                format!("none ({})", f.when_empty)
            } else {
                f.backends.join(", ")
            };
            let _ = writeln!(
                s,
                "    {:<45} {:<8} {:<12} {:<7} -> {}",
                f.frontend.to_string(),
                scope,
                format!("{:?}", f.kind),
                f.traffic_class,
                backends
            );
            if let Some(maps) = &out.maps
                && let Some(m) = maps
                    .iter()
                    .find(|m| m.frontend == f.frontend.to_string() && m.scope == scope)
            {
                if m.differences.is_empty() {
                    let _ = writeln!(
                        s,
                        "      maps: service {} agrees",
                        m.service_id.unwrap_or(0)
                    );
                }
                for d in &m.differences {
                    let _ = writeln!(s, "      MISMATCH: {d}");
                }
            }
        }
    }
    if let Some(err) = &out.maps_error {
        let _ = writeln!(s, "\nmaps not compared: {err}");
    }
    s
}
