//! `lb-agent explain <namespace>/<service>`: for each VIP and traffic class of a Service, which endpoints are
//! eligible and why the others are not (the model's own categorisation), next to what the pinned maps hold, with
//! every difference flagged. Reads the objects from manifests for now.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::datapath::inspect::show_addr;
use crate::datapath::maps::{Maps, PinnedMaps};
use crate::datapath::reconcile::service_key;
use crate::manifest;
use crate::model::{self, Eligibility, ModelConfig, ServiceExplanation};
use crate::state::Algorithm;

use super::{OutputFormat, PinArgs};

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// The Service, as `namespace/name` (or `name` in `default`).
    service: String,
    /// Kubernetes YAML holding the Service, its EndpointSlices and (optionally) the Node (a file or directory).
    #[arg(long, env = "LB_MANIFESTS")]
    manifests: PathBuf,
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
    #[serde(flatten)]
    explanation: ServiceExplanation,
    /// `None` with `--no-maps` or when the maps cannot be read (then `maps_error` says why).
    maps: Option<Vec<Programmed>>,
    maps_error: Option<String>,
}

pub fn run(args: &ExplainArgs) -> anyhow::Result<()> {
    let (namespace, name) = match args.service.split_once('/') {
        Some((ns, n)) => (ns.to_owned(), n.to_owned()),
        None => (manifest::DEFAULT_NAMESPACE.to_owned(), args.service.clone()),
    };
    let (objects, _diagnostics) = manifest::load_path(&args.manifests)
        .with_context(|| format!("reading {}", args.manifests.display()))?;
    let cfg = ModelConfig {
        default_algorithm: args.algorithm,
        service_proxy_name: args.service_proxy_name.clone(),
        fallback_node_addresses: args.node_addresses.clone(),
        fallback_service_cidrs: Vec::new(),
    };
    let node = model::node_context(&args.node_name, &objects.nodes, &cfg);
    let Some(explanation) = model::explain(&objects, &node, &cfg, &namespace, &name) else {
        bail!(
            "no Service {namespace}/{name} in {}",
            args.manifests.display()
        );
    };
    let (maps, maps_error) = if args.no_maps {
        (None, None)
    } else {
        match PinnedMaps::open(&args.pins.bpffs) {
            Ok(m) => (Some(compare(&explanation, &m)?), None),
            Err(e) => (
                None,
                Some(format!(
                    "{e} (is the agent's pin directory {}?)",
                    args.pins.bpffs.display()
                )),
            ),
        }
    };
    let out = Output {
        explanation,
        maps,
        maps_error,
    };
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&out)?),
        OutputFormat::Table => print!("{}", render(&out)),
    }
    Ok(())
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
                maps.table(value.service_id)?
                    .unwrap_or_default()
                    .into_iter()
                    .collect()
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
    for n in &e.notes {
        let _ = writeln!(s, "  note: {n}");
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
