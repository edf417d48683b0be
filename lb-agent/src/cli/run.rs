//! `lb-agent run`: its flags, turned into the agent's configuration; the daemon itself is `crate::agent`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::agent::{AgentConfig, SourceConfig};
use crate::datapath::pins::Capacities;
use crate::datapath::tc_attach::TcAttachMode;
use crate::datapath::xdp_attach::XdpModeChoice;
use crate::ops::OpsConfig;
use crate::source::kube::{self, Connection};
use crate::state::Algorithm;

use super::args::PinArgs;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Kubernetes YAML to serve (a file, or a directory of *.yaml / *.yml / *.json): Services, EndpointSlices and
    /// Nodes. Re-read whenever it changes. The default source outside a cluster.
    #[arg(long, env = "LB_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Watch the API server named by this kubeconfig (its current context) instead of manifest files. Inside a pod
    /// (`KUBERNETES_SERVICE_HOST` set) the service account is used when neither this nor --manifests is given.
    #[arg(long, env = "LB_KUBECONFIG", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// This node's name: picks its Node object and decides which endpoints are local.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// cgroup v2 directory the socket-LB programs attach to [default: the cgroup v2 root, i.e. the whole node].
    #[arg(long, env = "LB_CGROUP")]
    cgroup: Option<PathBuf>,
    #[command(flatten)]
    pins: PinArgs,
    #[command(flatten)]
    ops: OpsArgs,
    /// eBPF object to load instead of the one embedded at build time.
    #[arg(long, env = "LB_BPF_OBJECT")]
    bpf_object: Option<PathBuf>,
    /// Backend selection for Services without the `lb.io/algorithm` annotation.
    #[arg(long, default_value = "maglev", env = "LB_ALGORITHM")]
    algorithm: Algorithm,
    /// NodePort addresses when no Node object for this node is given (repeatable) [default: the host's own
    /// addresses].
    #[arg(
        long = "node-address",
        env = "LB_NODE_ADDRESSES",
        value_delimiter = ','
    )]
    node_addresses: Vec<IpAddr>,
    /// Service CIDRs (the cluster's `--service-cluster-ip-range`, comma-separated or repeated) to use when the API
    /// server or the manifests hold no `networking.k8s.io/v1` ServiceCIDR object. An address inside one that no
    /// Service holds (say, a deleted Service's ClusterIP) is dropped: from the wire at tc ingress, and at the
    /// socket by failing `connect()`/`sendmsg()` with EPERM. Empty (the default) and no ServiceCIDR objects: no such
    /// drop.
    #[arg(
        long = "service-cidrs",
        env = "LB_SERVICE_CIDRS",
        value_delimiter = ',',
        value_parser = super::args::parse_cidr_arg
    )]
    service_cidrs: Vec<(IpAddr, u8)>,
    /// Serve `localhost:nodePort` (IPv4 `127.0.0.0/8`, as kube-proxy's iptables mode does with
    /// `--iptables-localhost-nodeports`, whose default this follows) to processes in the agent's own network
    /// namespace, i.e. the host's with `hostNetwork`. Never for IPv6, never for pods (a pod's 127.0.0.1 is its
    /// own loopback). `false` behaves like kube-proxy's nftables mode. Needs a restart.
    #[arg(long, env = "LB_LOCALHOST_NODEPORTS", default_value_t = true, action = clap::ArgAction::Set)]
    localhost_nodeports: bool,
    /// Only proxy Services labelled `service.kubernetes.io/service-proxy-name=<this>` (kube-proxy's flag).
    #[arg(long, env = "LB_SERVICE_PROXY_NAME")]
    service_proxy_name: Option<String>,
    /// Smallest Maglev table (a prime from the built-in list); tables hold at least 100 slots per backend.
    #[arg(long, default_value_t = 251)]
    maglev_min_size: u32,
    /// Largest Maglev table.
    #[arg(long, default_value_t = 16381)]
    maglev_max_size: u32,
    /// Capacity of the services map (frontends x scopes) and of the per-service tables.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Capacity of the backends map.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Capacity of the session-affinity map (LRU).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_AFFINITY)]
    max_affinity: u32,
    /// Capacity of the socket reverse-translation map (LRU; one entry per load-balanced socket).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_SOCK_REVNAT)]
    max_sock_revnat: u32,
    /// Capacity of the tc datapath's conntrack map (LRU; two entries per flow, four with SNAT).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_CONNTRACK)]
    max_conntrack: u32,
    /// Capacity of the tc datapath's fragment map (LRU; one entry per fragmented datagram in flight whose first
    /// fragment was translated, kept for its later fragments).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_FRAGMENTS)]
    max_fragments: u32,
    /// External interfaces for the per-packet programs (NodePort, LoadBalancer, externalIPs, ClusterIP from the
    /// wire) [default: the interfaces carrying the node addresses (--node-address, else the host's)]. `none`
    /// attaches nothing.
    #[arg(long, env = "LB_DEVICES", value_delimiter = ',')]
    devices: Vec<String>,
    /// Attach the XDP fast path (`lb_xdp`) to the same devices: loadBalancerSourceRanges drops before the stack,
    /// and established NodePort/LoadBalancer/externalIP flows to remote backends (DNAT + SNAT) translated and sent
    /// back out by XDP; everything else, and every new flow's first packets, still goes through tc. Needs a restart.
    #[arg(long, env = "LB_XDP")]
    xdp: bool,
    /// XDP attach mode: auto (native where the driver supports it, else generic; the log says which per device),
    /// native (driver mode or fail), generic (SKB mode).
    #[arg(long, value_enum, default_value = "auto", env = "LB_XDP_MODE")]
    xdp_mode: XdpModeChoice,
    /// Seconds between conntrack garbage collections (expired entries, entries of deleted services).
    #[arg(long, default_value_t = 30)]
    conntrack_gc_interval: u64,
    /// How the per-packet programs attach to `--devices`: `auto` (tcx links, the clsact qdisc only where tcx is
    /// unavailable), `tcx` (fail rather than fall back), or `clsact` (netlink filters on the clsact qdisc even where
    /// tcx works: for hosts whose tooling expects them, and to exercise the fallback).
    #[arg(long, env = "LB_TC_ATTACH", value_enum, default_value_t = TcAttachMode::Auto)]
    tc_attach: TcAttachMode,
    /// kube-proxy also runs on this node (a canary during the migration, or on the way back): leave the
    /// `healthCheckNodePort`s to it (both cannot listen there), and `--pass-untracked-tcp`. Give `--health-addr`
    /// another port than kube-proxy's 10256. Needs a restart.
    #[arg(long, env = "LB_COEXIST_WITH_KUBE_PROXY")]
    coexist_with_kube_proxy: bool,
    /// At tc ingress, leave a TCP packet to a Service alone when it is not a SYN and lb tracks no flow for it: it
    /// belongs to a connection netfilter translated (kube-proxy, before lb ran on this node), which lb would
    /// otherwise send to its own choice of backend and so reset. Only lb's own flows and new connections are
    /// balanced. UDP cannot be told apart: a datagram of such a flow is balanced by lb like a new one. Needs a
    /// restart.
    #[arg(long, env = "LB_PASS_UNTRACKED_TCP")]
    pass_untracked_tcp: bool,
}

/// `lb-agent run`'s operational flags.
#[derive(clap::Args, Debug, Clone)]
pub struct OpsArgs {
    /// Address of `/healthz` (liveness) and `/readyz` (ready after the first full sync). kube-proxy's healthz port
    /// is 10256; lb uses the same so that probes and firewall rules written for kube-proxy keep working. Port 0
    /// picks a free port (logged).
    #[arg(long, default_value = "127.0.0.1:10256", env = "LB_HEALTH_ADDR")]
    pub health_addr: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint (port 0: a free port, logged).
    #[arg(long, default_value = "127.0.0.1:9402", env = "LB_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Addresses the `healthCheckNodePort` servers listen on (comma-separated). The cloud load balancer probes
    /// them on the node's IP, so the default is every address.
    #[arg(
        long,
        default_value = "0.0.0.0",
        env = "LB_HEALTH_CHECK_NODE_PORT_ADDRESSES",
        value_delimiter = ','
    )]
    pub health_check_node_port_addresses: Vec<IpAddr>,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    crate::agent::run(agent_config(args)?)
}

/// The agent's configuration from the flags. Where the objects come from: `--manifests` or `--kubeconfig` as
/// given; with neither, the in-cluster config inside a pod (as kube-proxy defaults to it), else an error: the
/// standalone agent needs to be told what to serve.
pub(super) fn agent_config(args: RunArgs) -> anyhow::Result<AgentConfig> {
    let source = match (args.manifests, args.kubeconfig) {
        (Some(m), None) => SourceConfig::Manifests(m),
        (None, Some(k)) => SourceConfig::Kube(Connection::Kubeconfig(k)),
        (Some(_), Some(_)) => {
            anyhow::bail!("give either --manifests or --kubeconfig, not both")
        }
        (None, None) if kube::in_cluster() => SourceConfig::Kube(Connection::InCluster),
        (None, None) => anyhow::bail!(
            "nothing to serve: give --manifests <file|dir> or --kubeconfig <file> (inside a pod the service account is used)"
        ),
    };
    // No devices given: the interfaces carrying the node addresses; `none` given: none at all.
    let devices = (!args.devices.is_empty()).then(|| {
        args.devices
            .into_iter()
            .filter(|d| d != "none")
            .collect::<Vec<_>>()
    });
    Ok(AgentConfig {
        source,
        node_name: args.node_name,
        cgroup: args.cgroup,
        pins: args.pins.bpffs,
        ops: OpsConfig {
            health_addr: args.ops.health_addr,
            metrics_addr: args.ops.metrics_addr,
            // Beside kube-proxy, it serves the healthCheckNodePorts (and would make every bind fail).
            health_check_node_port_addresses: if args.coexist_with_kube_proxy {
                Vec::new()
            } else {
                args.ops.health_check_node_port_addresses
            },
        },
        bpf_object: args.bpf_object,
        algorithm: args.algorithm,
        node_addresses: args.node_addresses,
        service_cidrs: args.service_cidrs,
        localhost_nodeports: args.localhost_nodeports,
        service_proxy_name: args.service_proxy_name,
        maglev_min_size: args.maglev_min_size,
        maglev_max_size: args.maglev_max_size,
        capacities: Capacities {
            services: args.max_services,
            backends: args.max_backends,
            affinity: args.max_affinity,
            sock_revnat: args.max_sock_revnat,
            conntrack: args.max_conntrack,
            fragments: args.max_fragments,
        },
        devices,
        xdp: args.xdp,
        xdp_mode: args.xdp_mode,
        conntrack_gc_interval: Duration::from_secs(args.conntrack_gc_interval),
        tc_attach: args.tc_attach,
        pass_untracked_tcp: args.pass_untracked_tcp || args.coexist_with_kube_proxy,
    })
}
