//! Start-up: who this node is, loading and attaching the datapath, and adopting what the pinned maps already hold
//! (a restarted agent moves no flow).

use std::net::IpAddr;

use anyhow::Context;

use super::config::AgentConfig;
use crate::datapath::loader::{self, Datapath, PinDir};
use crate::datapath::maps::PinnedMaps;
use crate::datapath::reconcile::Reconciler;
use crate::datapath::{tc_attach, xdp_attach};

/// The node name: as configured, else the hostname.
pub(super) fn node_name(config: &AgentConfig) -> anyhow::Result<String> {
    match &config.node_name {
        Some(n) => Ok(n.clone()),
        None => hostname().context("no --node-name / NODE_NAME, and the hostname is unreadable"),
    }
}

/// NodePort addresses to use until a Node object says otherwise: as configured, else the host's own.
pub(super) fn fallback_node_addresses(config: &AgentConfig) -> Vec<IpAddr> {
    if config.node_addresses.is_empty() {
        crate::host::unicast_addresses()
    } else {
        config.node_addresses.clone()
    }
}

fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading /proc/sys/kernel/hostname")?;
    Ok(name.trim().to_string())
}

/// Loads the object (maps pinned, old pins migrated) and attaches its programs: socket LB to the cgroup, tc to the
/// devices, XDP when asked (else removes a previous agent's XDP links). Returns the datapath and whether XDP is on.
pub(super) fn load_and_attach(
    object: &[u8],
    config: &AgentConfig,
    pins: &PinDir,
    node_addresses: &[IpAddr],
) -> anyhow::Result<(Datapath, bool)> {
    let explain = explain_datapath_error;
    let mut datapath = loader::load(object, pins, &config.capacities).map_err(explain)?;
    let cgroup = match &config.cgroup {
        Some(c) => c.clone(),
        None => loader::cgroup2_root()?,
    };
    loader::attach_sock_programs(&mut datapath.ebpf, &cgroup, pins).map_err(explain)?;
    tracing::info!(cgroup = %cgroup.display(), pins = %pins.dir.display(), "socket load balancing attached");
    let devices: Vec<String> = match &config.devices {
        None => tc_attach::devices_with_addresses(node_addresses),
        Some(devices) => devices.clone(),
    };
    tc_attach::attach_tc_programs(&mut datapath.ebpf, &devices, pins, config.tc_attach)
        .map_err(explain)?;
    let xdp = config.xdp && !devices.is_empty();
    if xdp {
        xdp_attach::attach_xdp(&mut datapath.ebpf, &devices, config.xdp_mode, pins)
            .map_err(explain)?;
    } else {
        let removed = xdp_attach::detach_xdp(pins)?;
        if removed > 0 {
            tracing::info!(
                links = removed,
                "XDP fast path off: removed the XDP links of a previous agent"
            );
        }
    }
    Ok((datapath, xdp))
}

/// The reconciler, rebuilt from what the pinned maps hold, with the node-wide flags set.
pub(super) fn adopt(
    maps: &PinnedMaps,
    config: &AgentConfig,
    xdp: bool,
) -> anyhow::Result<Reconciler> {
    let mut reconciler = Reconciler::restore(maps, config.reconcile_config())?;
    if config.localhost_nodeports {
        // The socket LB compares each socket's namespace with this one: the agent runs in the host's (hostNetwork).
        match crate::host::netns_cookie() {
            Ok(cookie) => {
                reconciler.set_config_flags(lb_common::CONFIG_FLAG_LOCALHOST_NODEPORTS);
                reconciler.set_host_netns_cookie(cookie);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+): localhost:nodePort is not served")
            }
        }
    }
    if xdp {
        // tc egress then records the L2 headers the XDP fast path sends with.
        reconciler.set_config_flags(lb_common::CONFIG_FLAG_XDP);
    }
    tracing::info!(
        services = reconciler.programmed_services(),
        backends = reconciler.programmed_backends(),
        "adopted the pinned state"
    );
    Ok(reconciler)
}

/// Adds to a failed datapath step which capabilities the process lacks, if any: the kernel only says EPERM or
/// EACCES (or a verifier rejection that reads like a bug in the program).
fn explain_datapath_error(e: anyhow::Error) -> anyhow::Error {
    let missing = crate::host::effective_capabilities()
        .map(crate::host::missing_datapath_capabilities)
        .unwrap_or_default();
    if missing.is_empty() {
        return e;
    }
    e.context(format!(
        "the agent lacks {}: it needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN) to load its \
         programs (deploy/README.md)",
        missing.join(", ")
    ))
}
