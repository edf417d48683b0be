//! Start-up: who this node is, loading and attaching the datapath, and adopting what the pinned maps already hold
//! (a restarted agent moves no flow).

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;

use super::config::AgentConfig;
use crate::datapath::loader::{self, Datapath, PinDir};
use crate::datapath::maps::PinnedMaps;
use crate::datapath::reconcile::Reconciler;
use crate::datapath::{tc_attach, xdp_attach};
use crate::ops::status::{DatapathSetup, DeviceSetup};

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

/// Loads the object (maps pinned, old pins migrated) and says how its programs attach; attaches them at once unless
/// maps were migrated, and returns the attachment then, for after the first sync: maps of a new layout start empty,
/// and until they are filled the programs already attached (the previous agent's, reading the previous maps) keep
/// serving, so an upgrade refuses no connection. Also returns what was attached where, for the status (the devices
/// stay empty while the attachment waits).
pub(super) fn load_and_attach(
    object: &[u8],
    config: &AgentConfig,
    pins: &PinDir,
    node_addresses: &[IpAddr],
) -> anyhow::Result<(Datapath, bool, DatapathSetup, Option<Attachment>)> {
    let mut datapath =
        loader::load(object, pins, &config.capacities).map_err(explain_datapath_error)?;
    let cgroup = match &config.cgroup {
        Some(c) => c.clone(),
        None => loader::cgroup2_root()?,
    };
    let devices: Vec<String> = match &config.devices {
        None => tc_attach::devices_with_addresses(node_addresses),
        Some(devices) => devices.clone(),
    };
    let xdp = config.xdp && !devices.is_empty();
    let mut setup = DatapathSetup {
        pins: pins.dir.display().to_string(),
        kernel: crate::host::kernel_release(),
        cgroup: cgroup.display().to_string(),
        devices: Vec::new(),
        features: Vec::new(),
    };
    let attachment = Attachment {
        cgroup,
        devices,
        pins: pins.clone(),
        tc_attach: config.tc_attach,
        xdp,
        xdp_mode: config.xdp_mode,
    };
    if datapath.migration.moved().is_empty() {
        attachment.attach(&mut datapath.ebpf, &mut setup)?;
        return Ok((datapath, xdp, setup, None));
    }
    tracing::info!(maps = ?datapath.migration.moved(), "maps of a new layout: the programs attached now keep serving until they are filled");
    Ok((datapath, xdp, setup, Some(attachment)))
}

/// Where and how the programs attach: the socket programs to the cgroup, tc (and XDP) to the devices.
pub(super) struct Attachment {
    cgroup: PathBuf,
    devices: Vec<String>,
    pins: PinDir,
    tc_attach: tc_attach::TcAttachMode,
    xdp: bool,
    xdp_mode: xdp_attach::XdpModeChoice,
}

impl Attachment {
    /// Attaches every program through pinned links, replacing those of a previous agent; removes a previous
    /// agent's XDP links when XDP is off. Records in `setup` each device's attach modes and the features used.
    pub(super) fn attach(
        &self,
        ebpf: &mut aya::Ebpf,
        setup: &mut DatapathSetup,
    ) -> anyhow::Result<()> {
        let explain = explain_datapath_error;
        loader::attach_sock_programs(ebpf, &self.cgroup, &self.pins).map_err(explain)?;
        tracing::info!(cgroup = %self.cgroup.display(), pins = %self.pins.dir.display(), "socket load balancing attached");
        add_feature(
            setup,
            "cgroup sock_addr hooks (pinned bpf_links)".to_owned(),
        );
        let tc = tc_attach::attach_tc_programs(ebpf, &self.devices, &self.pins, self.tc_attach)
            .map_err(explain)?;
        setup.devices = tc
            .iter()
            .map(|(name, mode)| DeviceSetup {
                name: name.clone(),
                tc: (*mode).to_owned(),
                xdp: None,
            })
            .collect();
        for (_, mode) in &tc {
            add_feature(
                setup,
                match *mode {
                    "tcx" => "tcx links".to_owned(),
                    _ => "clsact qdisc filters (netlink)".to_owned(),
                },
            );
        }
        if self.xdp {
            let modes = xdp_attach::attach_xdp(ebpf, &self.devices, self.xdp_mode, &self.pins)
                .map_err(explain)?;
            for (dev, mode) in modes {
                if let Some(d) = setup.devices.iter_mut().find(|d| d.name == dev) {
                    d.xdp = Some(mode.to_owned());
                }
                add_feature(setup, format!("XDP {mode} mode (bpf_link)"));
            }
        } else {
            let removed = xdp_attach::detach_xdp(&self.pins)?;
            if removed > 0 {
                tracing::info!(
                    links = removed,
                    "XDP fast path off: removed the XDP links of a previous agent"
                );
            }
        }
        Ok(())
    }
}

/// A kernel feature in use, listed once.
fn add_feature(setup: &mut DatapathSetup, feature: String) {
    if !setup.features.contains(&feature) {
        setup.features.push(feature);
    }
}

/// The reconciler, rebuilt from what the pinned maps hold, with the node-wide flags set (and the features they
/// use added to `setup`).
pub(super) fn adopt(
    maps: &PinnedMaps,
    config: &AgentConfig,
    xdp: bool,
    setup: &mut DatapathSetup,
) -> anyhow::Result<Reconciler> {
    let mut reconciler = Reconciler::restore(maps, config.reconcile_config())?;
    reconciler.set_ct_lifetimes(config.ct_lifetimes);
    if config.localhost_nodeports {
        // The socket LB compares each socket's namespace with this one: the agent runs in the host's (hostNetwork).
        match crate::host::netns_cookie() {
            Ok(cookie) => {
                reconciler.set_config_flags(lb_common::CONFIG_FLAG_LOCALHOST_NODEPORTS);
                reconciler.set_host_netns_cookie(cookie);
                add_feature(setup, "SO_NETNS_COOKIE (localhost:nodePort)".to_owned());
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
    if config.pass_untracked_tcp {
        reconciler.set_config_flags(lb_common::CONFIG_FLAG_PASS_UNTRACKED_TCP);
        tracing::info!(
            "TCP packets of flows lb does not track pass to netfilter (kube-proxy's connections keep their backend)"
        );
        match crate::netfilter_keeper::keep() {
            Ok(()) => tracing::info!(
                table = crate::netfilter_keeper::TABLE,
                "keeping netfilter's conntrack and NAT running for kube-proxy's connections"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "cannot keep netfilter's conntrack running: kube-proxy's connections end when its rules are removed, \
                 unless other rules on the node use conntrack"
            ),
        }
    } else {
        match crate::netfilter_keeper::release() {
            Ok(true) => tracing::info!(
                table = crate::netfilter_keeper::TABLE,
                "removed the conntrack keeper table"
            ),
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "cannot check for the conntrack keeper table"),
        }
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
