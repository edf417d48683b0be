//! What the agent is told to do: plain values, built from `lb-agent run`'s flags by the CLI (`cli::run`) and
//! knowing nothing of them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::datapath::pins::Capacities;
use crate::datapath::reconcile::ReconcileConfig;
use crate::datapath::tc_attach::TcAttachMode;
use crate::datapath::xdp_attach::XdpModeChoice;
use crate::model::{ModelConfig, NodePortAddresses};
use crate::ops::OpsConfig;
use crate::source::kube::Connection;
use crate::state::Algorithm;

/// Where the objects come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A manifest file or directory, re-read whenever it changes.
    Manifests(PathBuf),
    /// The API server, watched.
    Kube(Connection),
}

/// Everything `lb-agent run` needs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub source: SourceConfig,
    /// This node's name; `None`: the hostname.
    pub node_name: Option<String>,
    /// The cgroup v2 directory the socket-LB programs attach to; `None`: the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    /// The pin directory (on bpffs).
    pub pins: PathBuf,
    pub ops: OpsConfig,
    /// An eBPF object to load instead of the embedded one.
    pub bpf_object: Option<PathBuf>,
    /// Backend selection for Services without the `lb.io/algorithm` annotation.
    pub algorithm: Algorithm,
    /// NodePort addresses when no Node object for this node is known; empty: the host's own addresses.
    pub node_addresses: Vec<IpAddr>,
    /// Service CIDRs when there is no ServiceCIDR object.
    pub service_cidrs: Vec<(IpAddr, u8)>,
    /// kube-proxy's `--nodeport-addresses`.
    pub nodeport_addresses: NodePortAddresses,
    pub localhost_nodeports: bool,
    pub service_proxy_name: Option<String>,
    pub maglev_min_size: u32,
    pub maglev_max_size: u32,
    pub capacities: Capacities,
    /// The per-packet programs' devices; `None`: the interfaces carrying the node addresses. `Some(vec![])`
    /// attaches nothing (`--devices none`).
    pub devices: Option<Vec<String>>,
    pub xdp: bool,
    pub xdp_mode: XdpModeChoice,
    pub conntrack_gc_interval: Duration,
    pub tc_attach: TcAttachMode,
    /// Leave TCP packets that are not SYNs and belong to no flow lb tracks to netfilter, and keep netfilter's
    /// conntrack running for them (`--pass-untracked-tcp`, `--coexist-with-kube-proxy`).
    pub pass_untracked_tcp: bool,
    /// Conntrack lifetimes for `LB_CONFIG` (kube-proxy's `--conntrack-*-timeout*`; 0: the default).
    pub ct_lifetimes: lb_common::CtLifetimes,
}

impl AgentConfig {
    /// The translation's settings. `fallback_node_addresses` stands in for an empty `node_addresses` (the agent
    /// passes the host's addresses; tests pass fixed ones).
    pub fn model_config(&self, fallback_node_addresses: Vec<IpAddr>) -> ModelConfig {
        ModelConfig {
            default_algorithm: self.algorithm,
            service_proxy_name: self.service_proxy_name.clone(),
            fallback_node_addresses,
            fallback_service_cidrs: self.service_cidrs.clone(),
            nodeport_addresses: self.nodeport_addresses.clone(),
            localhost_nodeports: self.localhost_nodeports,
        }
    }

    /// The reconciler's settings.
    pub fn reconcile_config(&self) -> ReconcileConfig {
        ReconcileConfig {
            max_services: self.capacities.services,
            max_backends: self.capacities.backends,
            maglev_min_size: self.maglev_min_size,
            maglev_max_size: self.maglev_max_size,
            ..ReconcileConfig::default()
        }
    }
}
