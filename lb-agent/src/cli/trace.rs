//! `lb-agent trace`: where would this packet go? Runs the real tc ingress program (with `--xdp`, the XDP program
//! before it) on a crafted packet (see
//! `crate::trace`) and prints the verdict as JSON.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use crate::state::Protocol;
use crate::trace::{Source, Tracer};

#[derive(clap::Args, Debug)]
pub struct TraceArgs {
    /// Kubernetes YAML (a file or a directory) to program the private maps from.
    #[arg(long)]
    manifests: PathBuf,
    /// The node whose view to trace (local endpoints, NodePort addresses).
    #[arg(long)]
    node_name: String,
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

pub fn run(args: &TraceArgs) -> anyhow::Result<()> {
    let proto = Protocol::from_k8s(Some(&args.proto.to_uppercase()))
        .with_context(|| format!("unknown protocol {:?} (tcp, udp or sctp)", args.proto))?;
    if args.src.is_ipv4() != args.dst.is_ipv4() {
        anyhow::bail!("source and destination must be of one family");
    }
    let object = crate::datapath::loader::object_bytes(args.bpf_object.as_deref())?;
    let mut tracer = Tracer::load(&object, &args.manifests, &args.node_name)?;
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
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
