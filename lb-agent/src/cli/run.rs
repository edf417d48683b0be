//! `lb-agent run`: load and attach the datapath, program it from the manifests, and follow their changes.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::datapath::loader::{self, PinDir};
use crate::datapath::maps::PinnedMaps;
use crate::datapath::pins::Capacities;
use crate::datapath::reconcile::{ReconcileConfig, Reconciler};
use crate::manifest;
use crate::model::{self, ModelConfig};
use crate::state::Algorithm;
use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use super::PinArgs;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Kubernetes YAML to serve (a file, or a directory of *.yaml / *.yml / *.json): Services, EndpointSlices and
    /// Nodes. Re-read whenever it changes.
    #[arg(long, env = "LB_MANIFESTS")]
    manifests: PathBuf,
    /// This node's name: picks its Node object and decides which endpoints are local.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// cgroup v2 directory the socket-LB programs attach to [default: the cgroup v2 root, i.e. the whole node].
    #[arg(long, env = "LB_CGROUP")]
    cgroup: Option<PathBuf>,
    #[command(flatten)]
    pins: PinArgs,
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
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run_async(args))
}

/// Everything one sync needs besides the maps.
struct Syncer {
    manifests: PathBuf,
    node_name: String,
    model: ModelConfig,
    reconciler: Reconciler,
}

impl Syncer {
    /// Reads the manifests and programs the maps. An unreadable source changes nothing: the datapath keeps serving
    /// what it had rather than flushing everything on a transient error.
    fn sync(&mut self, maps: &mut PinnedMaps) -> bool {
        let started = Instant::now();
        let (objects, diagnostics) = match manifest::load_path(&self.manifests) {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the manifests; keeping the datapath as it is");
                return false;
            }
        };
        for d in &diagnostics {
            tracing::warn!(event = "Warning", reason = "InvalidObject", object = %d.object, field = d.field.as_deref().unwrap_or(""), "skipped: {}", d.message);
        }
        let node = model::node_context(&self.node_name, &objects.nodes, &self.model);
        let translation = model::translate(&objects, &node, &self.model);
        for d in &translation.diagnostics {
            tracing::warn!(event = "Warning", reason = "InvalidObject", object = %d.object, field = d.field.as_deref().unwrap_or(""), "skipped: {}", d.message);
        }
        let report = self.reconciler.sync(maps, &translation.state);
        for (frontend, reason) in &report.failed {
            tracing::error!(%frontend, %reason, "frontend not programmed; the others are");
        }
        tracing::info!(
            frontends = translation.state.services.len(),
            written = report.services_written,
            deleted = report.services_deleted,
            tables = report.tables_written,
            backends_added = report.backends_written,
            backends_removed = report.backends_deleted,
            failed = report.failed.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "synced"
        );
        true
    }
}

async fn run_async(args: RunArgs) -> anyhow::Result<()> {
    let node_name = match &args.node_name {
        Some(n) => n.clone(),
        None => hostname().context("no --node-name / NODE_NAME, and the hostname is unreadable")?,
    };
    let fallback_node_addresses = if args.node_addresses.is_empty() {
        host_addresses()
    } else {
        args.node_addresses.clone()
    };
    let object = loader::object_bytes(args.bpf_object.as_deref())?;
    let pins = PinDir::new(&args.pins.bpffs);
    let caps = Capacities {
        services: args.max_services,
        backends: args.max_backends,
        affinity: args.max_affinity,
        sock_revnat: args.max_sock_revnat,
    };
    let mut datapath = loader::load(&object, &pins, &caps)?;
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => loader::cgroup2_root()?,
    };
    loader::attach_sock_programs(&mut datapath.ebpf, &cgroup, &pins)?;
    tracing::info!(cgroup = %cgroup.display(), pins = %pins.dir.display(), "socket load balancing attached");

    let reconciler = Reconciler::restore(
        &datapath.maps,
        ReconcileConfig {
            max_services: args.max_services,
            max_backends: args.max_backends,
            maglev_min_size: args.maglev_min_size,
            maglev_max_size: args.maglev_max_size,
        },
    )?;
    tracing::info!(
        services = reconciler.programmed_services(),
        backends = reconciler.programmed_backends(),
        "adopted the pinned state"
    );
    let mut syncer = Syncer {
        manifests: args.manifests.clone(),
        node_name,
        model: ModelConfig {
            default_algorithm: args.algorithm,
            service_proxy_name: args.service_proxy_name.clone(),
            fallback_node_addresses,
        },
        reconciler,
    };
    let loader::Datapath {
        ebpf: _ebpf,
        mut maps,
        migration,
    } = datapath;
    if syncer.sync(&mut maps) {
        if !migration.moved().is_empty() {
            tracing::info!(maps = ?migration.moved(), "migrated maps refilled; dropping their old pins");
        }
        migration.commit();
    } else {
        migration.revert();
        anyhow::bail!("the first sync failed; old pins restored");
    }
    tracing::info!("initial sync done");

    let (_watcher, mut changes) = crate::source::file::watch(&args.manifests)?;
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    loop {
        tokio::select! {
            Some(()) = changes.recv() => {
                // Writers often touch a file several times in a row; wait for the burst to end (bounded) and sync once.
                debounce(&mut changes, Duration::from_millis(100), Duration::from_secs(1)).await;
                syncer.sync(&mut maps);
            }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: resyncing");
                syncer.sync(&mut maps);
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    // The pinned links and maps stay: the datapath keeps serving while the agent restarts or upgrades.
    tracing::info!("exiting; the datapath stays in place (lb-agent cleanup removes it)");
    Ok(())
}

/// Waits until `quiet` passes with no new event, but never longer than `max` in all.
async fn debounce(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
    quiet: Duration,
    max: Duration,
) {
    let deadline = tokio::time::Instant::now() + max;
    loop {
        let wait = quiet.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(())) if tokio::time::Instant::now() < deadline => continue,
            _ => return,
        }
    }
}

fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading /proc/sys/kernel/hostname")?;
    Ok(name.trim().to_string())
}

/// The host's own unicast addresses (not loopback, not link-local), for NodePorts when no Node object says which.
fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below with freeifaddrs; on error it returns -1 and we return.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr whose family says which struct it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let addr = match family {
            libc::AF_INET => {
                // SAFETY: family AF_INET means the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: family AF_INET6 means the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        let link_local = matches!(addr, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
        if !addr.is_loopback() && !link_local && !out.contains(&addr) {
            out.push(addr);
        }
    }
    // SAFETY: ifap came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}
