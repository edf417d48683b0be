//! `lb-agent run`: load and attach the datapath, program it from the manifests or the API server, and follow their
//! changes. Both sources end in the same `Syncer::apply` (pure translation, then the reconciler): one path to the maps.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::datapath::loader::{self, PinDir};
use crate::datapath::maps::PinnedMaps;
use crate::datapath::pins::Capacities;
use crate::datapath::reconcile::{ReconcileConfig, Reconciler};
use crate::datapath::tc_attach::TcAttachMode;
use crate::manifest;
use crate::model::{self, ModelConfig};
use crate::state::Algorithm;
use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use super::PinArgs;

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
    ops: crate::ops::OpsArgs,
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
        value_parser = parse_cidr_arg
    )]
    pub(crate) service_cidrs: Vec<(IpAddr, u8)>,
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
    xdp_mode: crate::datapath::xdp_attach::XdpModeChoice,
    /// Seconds between conntrack garbage collections (expired entries, entries of deleted services).
    #[arg(long, default_value_t = 30)]
    conntrack_gc_interval: u64,
    /// How the per-packet programs attach to `--devices`: `auto` (tcx links, the clsact qdisc only where tcx is
    /// unavailable), `tcx` (fail rather than fall back), or `clsact` (netlink filters on the clsact qdisc even where
    /// tcx works: for hosts whose tooling expects them, and to exercise the fallback).
    #[arg(long, env = "LB_TC_ATTACH", value_enum, default_value_t = TcAttachMode::Auto)]
    tc_attach: TcAttachMode,
}

/// Parses one `--service-cidrs` value.
pub(crate) fn parse_cidr_arg(s: &str) -> Result<(IpAddr, u8), String> {
    model::parse_service_cidr(s).ok_or_else(|| format!("{s:?} is not a CIDR (e.g. 10.96.0.0/12)"))
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run_async(args))
}

/// Where the objects come from, chosen by flags.
enum SourceChoice {
    Manifests(PathBuf),
    Kube(crate::source::kube::Connection),
}

impl SourceChoice {
    /// `--manifests` or `--kubeconfig` as given; with neither, the in-cluster config inside a pod (as kube-proxy
    /// defaults to it), else an error: the standalone agent needs to be told what to serve.
    fn from_args(args: &RunArgs) -> anyhow::Result<Self> {
        use crate::source::kube::{self, Connection};
        match (&args.manifests, &args.kubeconfig) {
            (Some(m), None) => Ok(SourceChoice::Manifests(m.clone())),
            (None, Some(k)) => Ok(SourceChoice::Kube(Connection::Kubeconfig(k.clone()))),
            (Some(_), Some(_)) => {
                anyhow::bail!("give either --manifests or --kubeconfig, not both")
            }
            (None, None) if kube::in_cluster() => Ok(SourceChoice::Kube(Connection::InCluster)),
            (None, None) => anyhow::bail!(
                "nothing to serve: give --manifests <file|dir> or --kubeconfig <file> (inside a pod the service account is used)"
            ),
        }
    }
}

/// Everything one sync needs besides the maps.
struct Syncer {
    node_name: String,
    model: ModelConfig,
    /// The translation kept across syncs: a change costs the work of the Services it touches.
    translator: model::Translator,
    reconciler: Reconciler,
    /// Health, metrics, names map, config reload.
    ops: crate::ops::Ops,
    /// The socket LB's view of each namespace's address, for source ranges (`None`: the map could not be opened,
    /// logged; the socket LB then refuses connections to LoadBalancer IPs with ranges).
    netns: Option<crate::datapath::netns_addrs::NetnsAddrsWriter>,
    /// This namespace's cookie (the host's entry in `netns`).
    host_cookie: Option<u64>,
    /// Some Internal frontend has source ranges (as of the last sync): `netns` must be kept up to date.
    netns_needed: bool,
}

impl Syncer {
    /// Reads the manifests and programs the maps (`full`: every frontend, not only those that changed). An
    /// unreadable source changes nothing: the datapath keeps serving what it had rather than flushing everything
    /// on a transient error.
    fn sync(&mut self, maps: &mut PinnedMaps, manifests: &std::path::Path, full: bool) -> bool {
        let started = Instant::now();
        let (objects, diagnostics) = match manifest::load_path(manifests) {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the manifests; keeping the datapath as it is");
                return false;
            }
        };
        self.translator.replace_all(objects);
        self.program(maps, &diagnostics, started, full);
        true
    }

    /// Programs what a kube source snapshot says: everything, or only what changed.
    fn apply_snapshot(
        &mut self,
        maps: &mut PinnedMaps,
        snapshot: crate::source::kube::Snapshot,
        full: bool,
    ) {
        use crate::source::kube::Contents;
        let started = Instant::now();
        match snapshot.contents {
            Contents::Full(objects) => self.translator.replace_all(objects),
            Contents::Changes(delta) => {
                for (key, svc) in delta.services {
                    let key = (key.namespace, key.name);
                    match svc {
                        Some(svc) => self.translator.upsert_service(key, svc),
                        None => self.translator.remove_service(&key),
                    }
                }
                for (key, slice) in delta.endpoint_slices {
                    let key = (key.namespace, key.name);
                    match slice {
                        Some(slice) => self.translator.upsert_slice(key, slice),
                        None => self.translator.remove_slice(&key),
                    }
                }
                if let Some(nodes) = delta.nodes {
                    self.translator.set_nodes(&nodes);
                }
                if let Some(cidrs) = delta.service_cidrs {
                    self.translator.set_service_cidrs(&cidrs);
                }
            }
        }
        self.program(maps, &snapshot.diagnostics, started, full);
    }

    /// Re-reads the config file and applies its live settings; true when the maps need a resync.
    fn reload_config(&mut self) -> bool {
        let live = self.ops.reload_config();
        crate::ops::apply_live(&live, &mut self.model, &mut self.reconciler)
    }

    /// Watches the config file, if any (a receiver that never fires otherwise).
    #[allow(clippy::type_complexity)]
    fn config_watch(
        &self,
    ) -> anyhow::Result<(
        Option<notify::RecommendedWatcher>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    )> {
        match self.ops.config_path() {
            // The whole directory: a ConfigMap update swaps a `..data` symlink and never touches the file's own
            // name. A reload that finds nothing changed does nothing.
            Some(path) => {
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                let (w, rx) = crate::source::file::watch(&dir)?;
                Ok((Some(w), rx))
            }
            None => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                // Kept alive so recv() pends forever instead of returning None.
                std::mem::forget(tx);
                Ok((None, rx))
            }
        }
    }

    /// Translates what changed in the translator's inputs and programs the maps: the one path from any source to
    /// the datapath. Only the frontends whose entries changed are visited, unless `full` (a resync asked for by
    /// the operator or a config reload) revisits everything.
    fn program(
        &mut self,
        maps: &mut PinnedMaps,
        diagnostics: &[manifest::Diagnostic],
        started: Instant,
        full: bool,
    ) {
        self.ops.sync_started();
        for d in diagnostics {
            tracing::warn!(event = "Warning", reason = "InvalidObject", object = %d.object, field = d.field.as_deref().unwrap_or(""), "skipped: {}", d.message);
        }
        let node = model::node_context(&self.node_name, self.translator.nodes(), &self.model);
        self.translator.set_config(&self.model);
        self.translator.set_node(&node);
        let changed = self.translator.translate();
        let translation = self.translator.translation();
        for d in &translation.diagnostics {
            tracing::warn!(event = "Warning", reason = "InvalidObject", object = %d.object, field = d.field.as_deref().unwrap_or(""), "skipped: {}", d.message);
        }
        let report = if full {
            self.reconciler.sync(maps, &translation.state)
        } else {
            self.reconciler
                .sync_changed(maps, &translation.state, &changed)
        };
        self.ops.sync_finished(
            translation,
            (!full).then_some(&changed),
            &report,
            &self.reconciler,
            started,
        );
        self.ops.note_source_diagnostics(diagnostics);
        for (frontend, reason) in &report.failed {
            tracing::error!(%frontend, %reason, "frontend not programmed; the others are");
        }
        self.netns_needed =
            translation.state.services.iter().any(|(f, e)| {
                f.scope == crate::state::Scope::Internal && !e.source_ranges.is_empty()
            });
        let node_addresses = node.addresses.clone();
        self.refresh_netns(Some(&node_addresses));
        let translation = self.translator.translation();
        tracing::info!(
            frontends = translation.state.services.len(),
            changed = changed.len(),
            written = report.services_written,
            deleted = report.services_deleted,
            tables = report.tables_written,
            backends_added = report.backends_written,
            backends_removed = report.backends_deleted,
            failed = report.failed.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "synced"
        );
        end_stale_sockets(maps, &report, &translation.state);
    }

    /// Brings `LB_NETNS_ADDRS` up to date while some LoadBalancer IP with source ranges is served to this node's
    /// pods (the socket LB reads it for those only): after every sync, and on a timer for pods started since.
    fn refresh_netns(&mut self, node_addresses: Option<&[std::net::IpAddr]>) {
        let Some(netns) = self.netns.as_mut() else {
            return;
        };
        if let (Some(cookie), Some(addresses)) = (self.host_cookie, node_addresses) {
            netns.set_host(cookie, addresses);
        }
        if !self.netns_needed {
            return;
        }
        let r = netns.refresh();
        if r != Default::default() {
            tracing::debug!(
                learned = r.learned,
                written = r.written,
                deleted = r.deleted,
                "namespace addresses refreshed"
            );
        }
    }
}

/// Ends the sockets the socket LB connected to backends that just departed (connected UDP always; TCP when the
/// backend is deleted rather than terminating), so their applications reconnect instead of talking into the void.
fn end_stale_sockets(
    maps: &PinnedMaps,
    report: &crate::datapath::reconcile::SyncReport,
    desired: &crate::state::DesiredState,
) {
    use crate::datapath::sock_destroy;
    let targets = sock_destroy::targets(&report.departed, &desired.endpoint_addresses);
    if targets.is_empty() {
        return;
    }
    let revnat = match maps.sock_revnat_entries() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read socket records; stale sockets stay open");
            return;
        }
    };
    let cookies = sock_destroy::cookies(&revnat, &targets);
    if cookies.is_empty() {
        return;
    }
    let result = sock_destroy::destroy(&cookies);
    let mut denied: std::collections::BTreeMap<&str, (usize, String)> = Default::default();
    for e in &result.errors {
        match e.missing_capability() {
            Some(cap) => {
                let entry = denied.entry(cap).or_insert((0, e.to_string()));
                entry.0 += 1;
            }
            // Processes and namespaces come and go while they are searched.
            None => {
                tracing::debug!(error = %e, "a namespace could not be searched for stale sockets")
            }
        }
    }
    // The deployment left out a capability: say which (once per sync, not per namespace), since those sockets
    // stay stale until it is granted.
    for (cap, (namespaces, example)) in denied {
        tracing::warn!(
            capability = cap,
            namespaces,
            error = %example,
            "cannot end stale sockets: the agent lacks {cap} (see deploy/README.md)"
        );
    }
    tracing::info!(
        backends = targets.len(),
        candidates = cookies.len(),
        destroyed = result.destroyed,
        namespaces = result.namespaces,
        "ended sockets connected to departed backends"
    );
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

async fn run_async(args: RunArgs) -> anyhow::Result<()> {
    let node_name = match &args.node_name {
        Some(n) => n.clone(),
        None => hostname().context("no --node-name / NODE_NAME, and the hostname is unreadable")?,
    };
    let fallback_node_addresses = if args.node_addresses.is_empty() {
        crate::host::unicast_addresses()
    } else {
        args.node_addresses.clone()
    };
    let source = SourceChoice::from_args(&args)?;
    // The watchers start before the datapath loads, so the lists are under way meanwhile; a bad kubeconfig fails
    // here, before anything is attached.
    let mut kube_source = match &source {
        SourceChoice::Kube(connection) => {
            let client = crate::source::kube::client(connection).await?;
            tracing::info!(source = %crate::source::kube::describe(connection), node = %node_name, "watching the API server");
            Some(crate::source::kube::KubeSource::start(client, &node_name))
        }
        SourceChoice::Manifests(_) => None,
    };
    let object = loader::object_bytes(args.bpf_object.as_deref())?;
    let pins = PinDir::new(&args.pins.bpffs);
    // Before loading, so /healthz answers (and /readyz says "not yet") while the datapath loads.
    let ops = crate::ops::Ops::start(&args.ops, &pins.dir, args.max_services)?;
    let caps = Capacities {
        services: args.max_services,
        backends: args.max_backends,
        affinity: args.max_affinity,
        sock_revnat: args.max_sock_revnat,
        conntrack: args.max_conntrack,
        fragments: args.max_fragments,
    };
    let explain = explain_datapath_error;
    let mut datapath = loader::load(&object, &pins, &caps).map_err(explain)?;
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => loader::cgroup2_root()?,
    };
    loader::attach_sock_programs(&mut datapath.ebpf, &cgroup, &pins).map_err(explain)?;
    tracing::info!(cgroup = %cgroup.display(), pins = %pins.dir.display(), "socket load balancing attached");
    let devices: Vec<String> = if args.devices.is_empty() {
        crate::datapath::tc_attach::devices_with_addresses(&fallback_node_addresses)
    } else {
        args.devices
            .iter()
            .filter(|d| *d != "none")
            .cloned()
            .collect()
    };
    crate::datapath::tc_attach::attach_tc_programs(
        &mut datapath.ebpf,
        &devices,
        &pins,
        args.tc_attach,
    )
    .map_err(explain)?;
    let xdp = args.xdp && !devices.is_empty();
    if xdp {
        crate::datapath::xdp_attach::attach_xdp(&mut datapath.ebpf, &devices, args.xdp_mode, &pins)
            .map_err(explain)?;
    } else {
        let removed = crate::datapath::xdp_attach::detach_xdp(&pins)?;
        if removed > 0 {
            tracing::info!(
                links = removed,
                "XDP fast path off: removed the XDP links of a previous agent"
            );
        }
    }

    let mut reconciler = Reconciler::restore(
        &datapath.maps,
        ReconcileConfig {
            max_services: args.max_services,
            max_backends: args.max_backends,
            maglev_min_size: args.maglev_min_size,
            maglev_max_size: args.maglev_max_size,
        },
    )?;
    if args.localhost_nodeports {
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
    let model = ModelConfig {
        default_algorithm: args.algorithm,
        service_proxy_name: args.service_proxy_name.clone(),
        fallback_node_addresses,
        fallback_service_cidrs: args.service_cidrs.clone(),
        localhost_nodeports: args.localhost_nodeports,
    };
    let netns = match crate::datapath::netns_addrs::NetnsAddrsWriter::open(&pins.dir, &cgroup) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the namespace address map: pods' connections to LoadBalancer IPs with loadBalancerSourceRanges are refused");
            None
        }
    };
    let mut syncer = Syncer {
        translator: model::Translator::new(
            model.clone(),
            model::node_context(&node_name, &[], &model),
        ),
        node_name,
        model,
        reconciler,
        ops,
        netns,
        host_cookie: crate::host::netns_cookie().ok(),
        netns_needed: false,
    };
    let (_config_watcher, mut config_changes) = syncer.config_watch()?;
    let loader::Datapath {
        ebpf: _ebpf,
        mut maps,
        migration,
    } = datapath;
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    // The file source syncs once before the loop (a first sync that cannot read the manifests restores the old
    // pins); the kube source's first sync is its first snapshot, in the loop, once every kind has been listed.
    let mut migration = Some(migration);
    let (_file_watcher, mut changes, _no_file_changes) = match &source {
        SourceChoice::Manifests(path) => {
            let synced = syncer.sync(&mut maps, path, true);
            finish_migration(&mut migration, synced)?;
            tracing::info!("initial sync done");
            syncer.ops.set_ready();
            let (watcher, rx) = crate::source::file::watch(path)?;
            (Some(watcher), rx, None)
        }
        SourceChoice::Kube(_) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (None, rx, Some(tx))
        }
    };
    let mut gc = tokio::time::interval(Duration::from_secs(args.conntrack_gc_interval.max(1)));
    // Pods started since the last sync get their namespace's address learned within this.
    let mut netns_tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = netns_tick.tick() => syncer.refresh_netns(None),
            _ = gc.tick() => {
                let live = syncer.reconciler.service_ids();
                let now = crate::datapath::packet_maps::monotonic_ns();
                match maps.packet.conntrack_gc(&live, now) {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(removed = n, "conntrack garbage collected"),
                    Err(e) => tracing::warn!(error = %e, "conntrack garbage collection failed"),
                }
            }
            snapshot = next_snapshot(kube_source.as_mut()) => {
                let Some(snapshot) = snapshot else {
                    anyhow::bail!("the Kubernetes watchers stopped");
                };
                syncer.ops.change_seen_at(snapshot.first_event.unwrap_or_else(Instant::now));
                let initial = snapshot.initial;
                syncer.apply_snapshot(&mut maps, snapshot, false);
                finish_migration(&mut migration, true)?;
                if initial {
                    // The readiness moment: every kind listed and programmed once (tests wait for this line).
                    tracing::info!("initial sync done");
                    syncer.ops.set_ready();
                }
            }
            Some(()) = changes.recv() => {
                syncer.ops.change_seen();
                // Writers often touch a file several times in a row; wait for the burst to end (bounded) and sync once.
                debounce(&mut changes, Duration::from_millis(100), Duration::from_secs(1)).await;
                if let SourceChoice::Manifests(path) = &source {
                    syncer.sync(&mut maps, path, false);
                }
            }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the config file and resyncing");
                syncer.reload_config();
                resync(&mut syncer, &mut maps, &source, kube_source.as_ref());
            }
            Some(()) = config_changes.recv() => {
                debounce(&mut config_changes, Duration::from_millis(100), Duration::from_secs(1)).await;
                if syncer.reload_config() {
                    resync(&mut syncer, &mut maps, &source, kube_source.as_ref());
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    // The pinned links and maps stay: the datapath keeps serving while the agent restarts or upgrades.
    tracing::info!("exiting; the datapath stays in place (lb-agent cleanup removes it)");
    Ok(())
}

/// The kube source's next snapshot; never resolves for the file source.
async fn next_snapshot(
    kube: Option<&mut crate::source::kube::KubeSource>,
) -> Option<crate::source::kube::Snapshot> {
    match kube {
        Some(kube) => kube.next().await,
        None => std::future::pending().await,
    }
}

/// Programs the maps from the source's current objects: the manifests re-read, or the kube source's memory (nothing
/// before its initial lists: no write may come before both Services and EndpointSlices are known).
fn resync(
    syncer: &mut Syncer,
    maps: &mut PinnedMaps,
    source: &SourceChoice,
    kube: Option<&crate::source::kube::KubeSource>,
) {
    match (source, kube) {
        (SourceChoice::Manifests(path), _) => {
            syncer.sync(maps, path, true);
        }
        (SourceChoice::Kube(_), Some(kube)) => {
            if let Some(snapshot) = kube.current() {
                syncer.apply_snapshot(maps, snapshot, true);
            }
        }
        (SourceChoice::Kube(_), None) => {}
    }
}

/// After the first sync: drops the old pins of migrated maps, or puts them back when that sync could not run.
fn finish_migration(
    migration: &mut Option<crate::datapath::pins::Migration>,
    synced: bool,
) -> anyhow::Result<()> {
    let Some(migration) = migration.take() else {
        return Ok(());
    };
    if synced {
        if !migration.moved().is_empty() {
            tracing::info!(maps = ?migration.moved(), "migrated maps refilled; dropping their old pins");
        }
        migration.commit();
        Ok(())
    } else {
        migration.revert();
        anyhow::bail!("the first sync failed; old pins restored")
    }
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
