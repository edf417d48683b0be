//! `lb-agent trace`: where would this packet go? Runs the real tc ingress program (with `--xdp`, the XDP program
//! before it) on a crafted packet in a private load of the object (see `crate::trace`) and prints the verdict, the
//! Service port it matched and the backend as JSON. The private maps hold what the node really runs (copied from
//! its pins, the default), or what the objects say (`--manifests`, or listed once from the API server with
//! `--kubeconfig` / `--in-cluster`); nothing live is touched.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;

use crate::model::{ModelConfig, NodePortAddresses};
use crate::source::kube::{self, Connection};
use crate::source::manifest;
use crate::state::Protocol;
use crate::trace::{Source, Tracer};

use super::args::PinArgs;

#[derive(clap::Args, Debug)]
pub struct TraceArgs {
    /// Program the private maps from this Kubernetes YAML (a file or a directory) instead of the node's pins.
    #[arg(long, conflicts_with_all = ["kubeconfig", "in_cluster"])]
    manifests: Option<PathBuf>,
    /// Program them from the objects listed once from the API server this kubeconfig names (its current context),
    /// with the agent's own selectors.
    #[arg(long, env = "LB_KUBECONFIG", conflicts_with = "in_cluster")]
    kubeconfig: Option<PathBuf>,
    /// Program them from the objects listed with the pod's service account (inside the agent's pod).
    #[arg(long)]
    in_cluster: bool,
    /// Where the node's pins are (the default source: what the agent programmed, copied).
    #[command(flatten)]
    pins: PinArgs,
    /// With objects: the node whose view to trace (local endpoints, NodePort addresses) [default: NODE_NAME, else
    /// the hostname].
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// With objects: as `lb-agent run --service-cidrs`, used when the objects hold no ServiceCIDR (so an address in
    /// them that no Service holds drops, as on the node).
    #[arg(
        long = "service-cidrs",
        env = "LB_SERVICE_CIDRS",
        value_delimiter = ',',
        value_parser = super::args::parse_cidr_arg
    )]
    service_cidrs: Vec<(IpAddr, u8)>,
    /// With objects: NodePort addresses when they hold no Node object for this node.
    #[arg(long = "node-address", value_delimiter = ',')]
    node_addresses: Vec<IpAddr>,
    /// With objects: as `lb-agent run --nodeport-addresses` (CIDRs or `primary`), so that a NodePort on an address
    /// the node does not serve it on is traced as the node treats it.
    #[arg(
        long = "nodeport-addresses",
        env = "LB_NODEPORT_ADDRESSES",
        value_delimiter = ','
    )]
    nodeport_addresses: Vec<String>,
    /// Also send the flow from N consecutive source ports and list every backend reached.
    #[arg(long)]
    sweep: Option<u16>,
    /// The source is a pod on this node.
    #[arg(long, conflicts_with = "from_node")]
    from_pod: bool,
    /// The source is the node itself.
    #[arg(long)]
    from_node: bool,
    /// Run the packet through the XDP program first, as on a node running `lb-agent run --xdp`: a source outside
    /// `loadBalancerSourceRanges` then drops there (`"stage": "xdp"`); anything XDP passes goes on to tc
    /// (`"stage": "tc"`).
    #[arg(long)]
    xdp: bool,
    /// eBPF object to load instead of the one embedded at build time.
    #[arg(long, env = "LB_BPF_OBJECT")]
    bpf_object: Option<PathBuf>,
    /// `tcp`, `udp` or `sctp`.
    proto: String,
    /// Source `ip:port` (`[v6]:port` for IPv6).
    src: SocketAddr,
    /// Destination `ip:port`.
    dst: SocketAddr,
}

fn node_name(args: &TraceArgs) -> anyhow::Result<String> {
    match &args.node_name {
        Some(n) => Ok(n.clone()),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .context("no --node-name / NODE_NAME, and the hostname is unreadable"),
    }
}

/// The private load, filled from the chosen source; and that source, for the output.
fn tracer(args: &TraceArgs, object: &[u8]) -> anyhow::Result<(Tracer, String)> {
    let nodeport_addresses =
        NodePortAddresses::parse(&args.nodeport_addresses).map_err(anyhow::Error::msg)?;
    let cfg = || ModelConfig {
        fallback_service_cidrs: args.service_cidrs.clone(),
        fallback_node_addresses: args.node_addresses.clone(),
        localhost_nodeports: nodeport_addresses.allows_ipv4_loopback(),
        nodeport_addresses: nodeport_addresses.clone(),
        ..ModelConfig::default()
    };
    let connection = match (&args.manifests, &args.kubeconfig, args.in_cluster) {
        (Some(path), _, _) => {
            let (objects, _) =
                manifest::load_path(path).with_context(|| format!("reading {}", path.display()))?;
            let t = Tracer::load_objects_with(object, &objects, &node_name(args)?, &cfg())?;
            return Ok((t, format!("manifests {}", path.display())));
        }
        (None, Some(k), _) => Connection::Kubeconfig(k.clone()),
        (None, None, true) => Connection::InCluster,
        (None, None, false) => {
            let (t, copied) = Tracer::from_pins(object, &args.pins.bpffs)?;
            return Ok((
                t,
                format!(
                    "the node's pins {} ({} frontends, {} backends)",
                    args.pins.bpffs.display(),
                    copied.frontends,
                    copied.backends
                ),
            ));
        }
    };
    let node = node_name(args)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let (client, (objects, _)) = rt.block_on(async {
        let client = kube::connect(&connection, None).await?;
        let listed = kube::list_once(&client.client, &node).await?;
        Ok::<_, kube::KubeError>((client, listed))
    })?;
    let t = Tracer::load_objects_with(object, &objects, &node, &cfg())?;
    Ok((t, format!("the API server {}", client.server)))
}

pub fn run(args: &TraceArgs) -> anyhow::Result<()> {
    let proto = Protocol::from_k8s(Some(&args.proto.to_uppercase()))
        .with_context(|| format!("unknown protocol {:?} (tcp, udp or sctp)", args.proto))?;
    if args.src.is_ipv4() != args.dst.is_ipv4() {
        anyhow::bail!("source and destination must be of one family");
    }
    let object = crate::datapath::loader::object_bytes(args.bpf_object.as_deref())?;
    let (mut tracer, source_label) = tracer(args, &object)?;
    let source = if args.from_pod {
        Source::Pod
    } else if args.from_node {
        Source::Node
    } else {
        Source::Outside
    };
    tracer.add_local_source(args.src.ip(), source)?;
    tracer.set_xdp_first(args.xdp);
    let mut result = tracer.trace(proto, args.src, args.dst)?.result;
    if let Some(n) = args.sweep {
        let next = SocketAddr::new(args.src.ip(), args.src.port().wrapping_add(1));
        let mut all = tracer.sweep(proto, next, args.dst, n)?;
        if let Some(b) = &result.backend
            && !all.contains(b)
        {
            all.push(b.clone());
            all.sort();
        }
        result.backends = Some(all);
    }
    let mut out = serde_json::to_value(&result)?;
    if let Some(map) = out.as_object_mut() {
        map.insert("source".into(), source_label.into());
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
