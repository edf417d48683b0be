//! Control plane: lb's model and reconciler programming real pinned maps (object loaded privately, nothing
//! attached), the real agent's memory, and kube-proxy's rule loads for the same services.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_agent::datapath::maps::PinnedMaps;
use lb_agent::datapath::reconcile::{ReconcileConfig, Reconciler};
use lb_agent::model::{self, ModelConfig};
use lb_agent::source::manifest;
use serde::{Deserialize, Serialize};

use super::kubeproxy;
use super::stats::{Summary, summarize};
use super::workload::{self, Svc};
use crate::{BpfDir, Cgroup, Cmd, NetNs, unique_token};

/// Capacities for 10k x 10: 100k distinct endpoints do not fit the default backends map (65536).
pub const MAX_BACKENDS: u32 = 131_072;

#[derive(Debug, Default, Serialize)]
pub struct ControlResults {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub lb: Option<LbControl>,
    pub lb_error: Option<String>,
    pub agent: Option<AgentMemory>,
    pub agent_error: Option<String>,
    /// The real agent watching an API server: one EndpointSlice update to its service entry switched.
    #[serde(default)]
    pub kube: Option<KubeLatency>,
    #[serde(default)]
    pub kube_error: Option<String>,
    pub kube_proxy: Vec<RuleLoad>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KubeLatency {
    /// Agent start to "initial sync done" against the API server (list, translate, program).
    pub start_to_programmed_ms: f64,
    /// One EndpointSlice updated through the API server → the service entry in the pinned maps switched.
    pub change_ms: Summary,
    pub changes: usize,
    /// Where the time goes, from the agent's "synced" lines of those changes: the API server's write (the bench's
    /// apply call), the agent's wait from the batch's first event to its sync, and the sync itself.
    #[serde(default)]
    pub parts: Option<KubeLatencyParts>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct KubeLatencyParts {
    /// The bench's apply call to the in-process API server (store, fan out to watchers).
    pub apply_ms: Summary,
    /// The source's batch: first event received → sync started.
    pub queued_ms: Summary,
    /// The whole sync (translation, maps, names, ops), as the agent logs it.
    pub sync_ms: Summary,
    pub translate_ms: Summary,
    pub write_ms: Summary,
    /// Syncs the changes took (fewer than the changes when some were batched together).
    pub syncs: usize,
}

#[derive(Debug, Serialize)]
pub struct LbControl {
    /// YAML -> objects (the file source's parse).
    pub parse_ms: f64,
    /// Objects -> desired state (the model).
    pub translate_ms: f64,
    /// A restarted reconciler adopting the programmed maps (restore + first sync, which should write nothing).
    pub adopt_ms: f64,
    pub adopt_writes: usize,
    pub frontends: usize,
    pub backends: usize,
    /// One endpoint replaced in one EndpointSlice, then translate + sync (what the agent does per change).
    pub change_ms: Summary,
    /// The reconciler's part of it.
    pub change_sync_ms: Summary,
    pub changes: usize,
}

#[derive(Debug, Serialize)]
pub struct AgentMemory {
    /// `lb-agent run` started -> its "initial sync done" log line (load, attach to an empty test cgroup, parse,
    /// translate, write every map).
    pub start_to_programmed_ms: f64,
    /// The first sync alone (parse, translate, write), as the agent logs it.
    pub first_sync_ms: Option<f64>,
    pub vm_hwm_kib: u64,
    pub vm_rss_kib: u64,
    /// memlock of the maps the agent holds file descriptors of (outer maps), from /proc/<pid>/fdinfo.
    pub map_memlock_bytes: u64,
    pub maps_counted: usize,
    /// memlock of the per-service Maglev tables (inner maps of LB_MAGLEV, held by the outer map, not by an fd).
    pub inner_table_memlock_bytes: Option<u64>,
    pub inner_tables: usize,
    pub inner_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RuleLoad {
    /// `iptables-restore (nf_tables)`, `iptables-legacy-restore`, `nft -f`.
    pub tool: String,
    /// Services in the rule set (fewer than the section's for a tool capped by the plan).
    pub services: usize,
    pub rules_bytes: usize,
    /// Empty namespace -> the whole rule set loaded.
    pub initial_ms: Option<f64>,
    /// One endpoint change applied as kube-proxy would (full restore / partial nft transaction).
    pub change_ms: Option<Summary>,
    pub error: Option<String>,
}

pub fn run(
    agent_bin: &Path,
    n: usize,
    e: usize,
    changes: usize,
    iptables_changes: usize,
    iptables_nft_max_services: usize,
) -> ControlResults {
    let svcs = workload::services(n, e, false);
    let yaml = workload::manifest(&svcs);
    let mut out = ControlResults {
        services: n,
        endpoints_per_service: e,
        ..ControlResults::default()
    };
    // The agent programs the maps once (start to programmed, memory); the reconciler then adopts its pins as a
    // restarted agent would and takes the endpoint changes. Programming 10k services costs minutes on kernels that
    // wait for an RCU grace period per map-in-map update, so it is done once, not twice.
    let pins = match BpfDir::new(&format!("lb-bench-agent-{}", unique_token())) {
        Ok(p) => p,
        Err(err) => {
            out.agent_error = Some(format!("{err:#}"));
            return out;
        }
    };
    eprintln!("lb-bench: control plane, agent programming {n} x {e}");
    match agent_memory(agent_bin, &yaml, &pins, &[]) {
        Ok(r) => out.agent = Some(r),
        Err(err) => out.agent_error = Some(format!("{err:#}")),
    }
    if out.agent.is_some() {
        eprintln!("lb-bench: control plane, {changes} endpoint changes through the reconciler");
        match lb_control(&yaml, changes, pins.path()) {
            Ok(r) => out.lb = Some(r),
            Err(err) => out.lb_error = Some(format!("{err:#}")),
        }
    } else {
        out.lb_error = Some("not run: the agent did not program the maps".into());
    }
    drop(pins);
    let kube_changes = changes.min(50);
    eprintln!(
        "lb-bench: control plane, the agent on an API server: {kube_changes} EndpointSlice updates"
    );
    match kube_latency(agent_bin, &svcs, kube_changes) {
        Ok(r) => out.kube = Some(r),
        Err(err) => out.kube_error = Some(format!("{err:#}")),
    }
    eprintln!("lb-bench: control plane, kube-proxy rule loads at {n} x {e}");
    out.kube_proxy = kube_proxy_loads(
        &svcs,
        iptables_changes,
        changes.min(100),
        iptables_nft_max_services,
    );
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Replaces endpoint `k % E` of service `k % N` with a fresh address (10.64.0.0/10 holds none of the originals).
fn changed_address(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be_bytes([10, 64, 0, 0]) + k as u32 + 1)
}

fn lb_control(yaml: &str, changes: usize, pins: &Path) -> Result<LbControl> {
    let t = Instant::now();
    let (mut objects, diags) = manifest::parse_manifests("bench", yaml);
    let parse_ms = ms(t.elapsed());
    if !diags.is_empty() {
        bail!(
            "the generated manifest has diagnostics: {:?}",
            &diags[..diags.len().min(3)]
        );
    }
    let cfg = ModelConfig::default();
    let t = Instant::now();
    let node = model::node_context(workload::NODE_NAME, &objects.nodes, &cfg);
    // The agent's own path: a Translator fed the whole set once, then one changed slice at a time.
    let mut translator = model::Translator::new(cfg, node);
    translator.replace_all(objects.clone());
    translator.translate();
    let translate_ms = ms(t.elapsed());

    let mut maps = PinnedMaps::open(pins).context("opening the agent's pinned maps")?;
    let rcfg = ReconcileConfig {
        max_backends: MAX_BACKENDS,
        ..ReconcileConfig::default()
    };
    let t = Instant::now();
    let mut reconciler = Reconciler::restore(&maps, rcfg)?;
    let report = reconciler.sync(&mut maps, &translator.translation().state);
    let adopt_ms = ms(t.elapsed());
    if let Some((f, why)) = report.failed.first() {
        bail!("{} frontends failed, first {f}: {why}", report.failed.len());
    }
    let adopt_writes = report.services_written + report.tables_written + report.backends_written;

    let mut change = Vec::with_capacity(changes);
    let mut change_sync = Vec::with_capacity(changes);
    let slices = objects.endpoint_slices.len();
    for k in 0..changes {
        let slice = std::sync::Arc::make_mut(&mut objects.endpoint_slices[k * 7919 % slices]);
        let eps = slice.endpoints.get_or_insert_with(Vec::new);
        let j = k % eps.len().max(1);
        let ep = eps.get_mut(j).context("a slice without endpoints")?;
        ep.addresses = vec![changed_address(k).to_string()];
        let key = (
            slice.metadata.namespace().unwrap_or_default().to_owned(),
            slice.metadata.name.clone().unwrap_or_default(),
        );
        // What the kube source hands the run loop: the one changed object, copied out of its store.
        let changed_slice = slice.clone();
        let t = Instant::now();
        translator.upsert_slice(key, changed_slice);
        let changed = translator.translate();
        if changed.is_empty() {
            bail!("endpoint change {k} changed no frontend");
        }
        let t_sync = Instant::now();
        let report = reconciler.sync_changed(&mut maps, &translator.translation().state, &changed);
        change_sync.push(ms(t_sync.elapsed()));
        change.push(ms(t.elapsed()));
        if !report.failed.is_empty() || report.tables_written == 0 {
            bail!("endpoint change {k} was not programmed: {report:?}");
        }
    }
    Ok(LbControl {
        parse_ms,
        translate_ms,
        adopt_ms,
        adopt_writes,
        frontends: translator.translation().state.services.len(),
        backends: reconciler.programmed_backends(),
        change_ms: summarize(&mut change),
        change_sync_ms: summarize(&mut change_sync),
        changes,
    })
}

/// Runs the real agent on the manifest (`--devices none`: nothing attached to any interface; socket programs on
/// an empty test cgroup) and reads its peak RSS and the memory of its maps once it has programmed everything.
pub(super) fn agent_memory(
    agent_bin: &Path,
    yaml: &str,
    pins: &BpfDir,
    extra_args: &[String],
) -> Result<AgentMemory> {
    let token = unique_token();
    let dir = std::env::temp_dir().join(format!("lb-bench-{token}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = RemoveDir(dir.clone());
    let manifest = dir.join("services.yaml");
    std::fs::write(&manifest, yaml).context("writing the manifest")?;
    let cgroup = Cgroup::new(&format!("lb-bench-{token}"))?;
    let started = Instant::now();
    let mut source = vec![OsStr::new("--manifests"), manifest.as_os_str()];
    source.extend(extra_args.iter().map(OsStr::new));
    let mut child = start_agent(agent_bin, &source, pins.path(), &cgroup)?;
    let start_to_programmed_ms = ms(started.elapsed());
    let pid = child.pid();
    let (vm_hwm_kib, vm_rss_kib) = peak_and_current_rss_kib(pid)?;
    let (fd_maps, map_memlock_bytes, maps_counted) = fd_map_memlock(pid)?;
    let (inner, inner_tables, inner_error) =
        match inner_table_memlock(&pins.join("LB_MAGLEV"), &fd_maps) {
            Ok((bytes, n)) => (Some(bytes), n, None),
            Err(e) => (None, 0, Some(format!("{e:#}"))),
        };
    // The agent's own measure of its first sync (read manifests, translate, write the maps), from its log.
    let first_sync_ms = child
        .stderr()
        .lines()
        .find(|l| l.contains("synced"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("elapsed_ms="))
        })
        .and_then(|v| v.parse().ok());
    // SIGTERM: the agent exits and leaves its pins, which the reconciler adopts next.
    child.terminate(Duration::from_secs(5))?;
    drop(child);
    Ok(AgentMemory {
        start_to_programmed_ms,
        first_sync_ms,
        vm_hwm_kib,
        vm_rss_kib,
        map_memlock_bytes,
        maps_counted,
        inner_table_memlock_bytes: inner,
        inner_tables,
        inner_error,
    })
}

/// Runs the real agent against the in-process API server holding the same objects, then updates one
/// EndpointSlice at a time through the API and measures until the changed service's entry in the pinned
/// `LB_SERVICES` has switched (its table fingerprint changes with its backends): watch delivery, batching,
/// translation and the reconciler's writes, everything a user waits for. Changes are spaced beyond the source's
/// batching window, as lone changes are.
pub(super) fn kube_latency(agent_bin: &Path, svcs: &[Svc], changes: usize) -> Result<KubeLatency> {
    use lb_agent::datapath::reconcile::service_key;
    use lb_agent::state::{Frontend, Protocol, Scope};

    let mut objects = workload::api_objects(svcs);
    let api = crate::ApiServer::start()?;
    api.apply_value(objects.node.clone())?;
    for svc in &objects.services {
        api.apply_value(svc.clone())?;
    }
    for slice in &objects.slices {
        api.apply_value(slice.clone())?;
    }
    let token = unique_token();
    let dir = std::env::temp_dir().join(format!("lb-bench-kube-{token}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = RemoveDir(dir.clone());
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let pins = BpfDir::new(&format!("lb-bench-kube-{token}"))?;
    let cgroup = Cgroup::new(&format!("lb-bench-kube-{token}"))?;
    let started = Instant::now();
    let source = [OsStr::new("--kubeconfig"), kubeconfig.as_os_str()];
    let mut child = start_agent(agent_bin, &source, pins.path(), &cgroup)?;
    let start_to_programmed_ms = ms(started.elapsed());
    let maps = PinnedMaps::open(pins.path()).context("opening the agent's pinned maps")?;

    let mut change = Vec::with_capacity(changes);
    let mut apply = Vec::with_capacity(changes);
    for k in 0..changes {
        let i = k * 7919 % objects.slices.len();
        let svc = &svcs[i];
        let key = service_key(&Frontend {
            addr: svc.vip.into(),
            port: svc.port,
            proto: match svc.proto {
                workload::Proto::Tcp => Protocol::Tcp,
                workload::Proto::Udp => Protocol::Udp,
            },
            scope: Scope::Internal,
        });
        let before = maps
            .service(&key)?
            .context("the changed service is not programmed")?;
        let slice = &mut objects.slices[i];
        let eps = slice["endpoints"]
            .as_array_mut()
            .context("a slice without endpoints")?;
        let j = k % eps.len().max(1);
        eps.get_mut(j).context("a slice without endpoints")?["addresses"] =
            serde_json::json!([changed_address(k).to_string()]);
        // Beyond the source's batching window: this is a lone change.
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        api.apply_value(slice.clone())?;
        apply.push(ms(t.elapsed()));
        let give_up = t + Duration::from_secs(10);
        loop {
            if maps.service(&key)? != Some(before) {
                break;
            }
            if Instant::now() > give_up {
                bail!(
                    "EndpointSlice update {k} was not programmed within 10 s: {}",
                    tail(&child.stderr())
                );
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        change.push(ms(t.elapsed()));
    }
    // Give the last sync time to log its line.
    std::thread::sleep(Duration::from_millis(200));
    let parts = latency_parts(&child.stderr(), &mut apply);
    child.terminate(Duration::from_secs(5))?;
    drop(child);
    // The agent left its pins; remove what it attached and pinned.
    let _ = Cmd::new(agent_bin)
        .arg("cleanup")
        .arg("--bpffs")
        .arg(pins.path())
        .output(Duration::from_secs(30));
    Ok(KubeLatency {
        start_to_programmed_ms,
        change_ms: summarize(&mut change),
        changes,
        parts: Some(parts),
    })
}

/// The agent's "synced" lines after its first (the changes'), summarised field by field.
fn latency_parts(stderr: &str, apply: &mut [f64]) -> KubeLatencyParts {
    let synced: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(" synced") || l.ends_with("synced"))
        .skip(1)
        .collect();
    let field = |key: &str| -> Vec<f64> {
        synced
            .iter()
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))?
                    .parse()
                    .ok()
            })
            .collect()
    };
    KubeLatencyParts {
        apply_ms: summarize(apply),
        queued_ms: summarize(&mut field("queued_ms=")),
        sync_ms: summarize(&mut field("elapsed_ms=")),
        translate_ms: summarize(&mut field("translate_ms=")),
        write_ms: summarize(&mut field("write_ms=")),
        syncs: synced.len(),
    }
}

/// Starts the real agent on `source` (`--manifests <file>` or `--kubeconfig <file>`) in the root namespace with
/// nothing attached to any interface (`--devices none`; socket programs on the empty test cgroup) and waits for its
/// "initial sync done" line.
pub(super) fn start_agent(
    agent_bin: &Path,
    source: &[&OsStr],
    pins: &Path,
    cgroup: &Cgroup,
) -> Result<crate::Child> {
    // The bench's own backend capacity unless the caller sized it.
    let backends = MAX_BACKENDS.to_string();
    let default_backends = [OsStr::new("--max-backends"), OsStr::new(&backends)];
    let sized = source.iter().any(|a| *a == "--max-backends");
    let mut child = Cmd::new(agent_bin)
        .arg("run")
        .args(source)
        .args(if sized {
            &[][..]
        } else {
            &default_backends[..]
        })
        .args(["--node-name", workload::NODE_NAME])
        .arg("--cgroup")
        .arg(cgroup.path())
        .arg("--bpffs")
        .arg(pins)
        // Root namespace: never attach the per-packet programs to the host's interfaces.
        .args(["--devices", "none"])
        .args([
            "--health-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--health-check-node-port-addresses", "127.0.0.1"])
        .env("LB_LOG", "info")
        .label("lb-agent")
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !child.stderr().contains("initial sync done") {
        if let Some(status) = child.try_wait()? {
            bail!("lb-agent exited ({status}): {}", tail(&child.stderr()));
        }
        if Instant::now() > deadline {
            bail!(
                "lb-agent did not finish its first sync in 600 s: {}",
                tail(&child.stderr())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

pub(super) struct RemoveDir(pub(super) std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tail(s: &str) -> &str {
    let start = s.len().saturating_sub(2000);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    &s[start..]
}

/// A process's peak and current resident set (`VmHWM`, `VmRSS`), in KiB; 0 for a field the kernel did not print.
pub(super) fn peak_and_current_rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("reading the agent's status")?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmHWM:"), field("VmRSS:")))
}

/// Sums `memlock` over the distinct BPF maps a process holds fds of; also returns their ids.
fn fd_map_memlock(pid: u32) -> Result<(BTreeSet<u64>, u64, usize)> {
    let mut seen = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).context("reading fdinfo")? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (get("map_id:"), get("memlock:")) {
            seen.insert(id, memlock);
        }
    }
    Ok((
        seen.keys().copied().collect(),
        seen.values().sum(),
        seen.len(),
    ))
}

/// The Maglev tables: the inner map ids LB_MAGLEV holds (bpftool dumps them as values), each one's memlock from
/// `bpftool map show`, leaving out the maps in `counted` (the agent may hold an fd of the slot array too).
fn inner_table_memlock(pin: &Path, counted: &BTreeSet<u64>) -> Result<(u64, usize)> {
    let dump = crate::run_cmd(
        "bpftool",
        &["-j", "map", "dump", "pinned", &pin.to_string_lossy()],
    )?;
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(&dump).context("parsing bpftool's dump")?;
    let ids: BTreeSet<u64> = entries
        .iter()
        .filter_map(|e| {
            let v = e.get("inner_map_id").or_else(|| e.get("value"))?;
            v.as_u64().or_else(|| v.as_array().and_then(|a| le_u32(a)))
        })
        .filter(|id| !counted.contains(id))
        .collect();
    if ids.is_empty() {
        return Ok((0, 0));
    }
    let show = crate::run_cmd("bpftool", &["-j", "map", "show"])?;
    let maps: Vec<serde_json::Value> =
        serde_json::from_str(&show).context("parsing bpftool's map list")?;
    let mut total = 0;
    let mut found = 0;
    for m in &maps {
        if let (Some(id), Some(bytes)) = (
            m.get("id").and_then(|v| v.as_u64()),
            m.get("bytes_memlock").and_then(|v| v.as_u64()),
        ) && ids.contains(&id)
        {
            total += bytes;
            found += 1;
        }
    }
    if found == 0 && !ids.is_empty() {
        bail!("bpftool listed none of the {} inner maps", ids.len());
    }
    Ok((total, found))
}

/// bpftool without BTF prints a value as byte strings ("0x12").
fn le_u32(bytes: &[serde_json::Value]) -> Option<u64> {
    let mut v = 0u64;
    for (i, b) in bytes.iter().take(4).enumerate() {
        let b = u64::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok()?;
        v |= b << (8 * i);
    }
    Some(v)
}

/// The same services as kube-proxy's rule sets, loaded into a fresh network namespace per tool.
fn kube_proxy_loads(
    svcs: &[Svc],
    iptables_changes: usize,
    nft_changes: usize,
    iptables_nft_max_services: usize,
) -> Vec<RuleLoad> {
    let mut out = Vec::new();
    let variant = crate::run_cmd("iptables-restore", &["-V"]).unwrap_or_default();
    let nf_tables = variant.contains("nf_tables");
    let default_name = format!(
        "iptables-restore ({})",
        if nf_tables { "nf_tables" } else { "legacy" }
    );
    // See `Plan::iptables_nft_max_services`: the nf_tables backend runs on the first services only.
    let default_svcs = if nf_tables {
        &svcs[..svcs.len().min(iptables_nft_max_services)]
    } else {
        svcs
    };
    for (tool, program, svcs) in [
        (default_name, "iptables-restore", default_svcs),
        (
            "iptables-legacy-restore".to_owned(),
            "iptables-legacy-restore",
            svcs,
        ),
    ] {
        if program != "iptables-restore" && which(program).is_none() {
            continue;
        }
        out.push(iptables_load(svcs, &tool, program, iptables_changes));
    }
    out.push(nft_load(svcs, nft_changes));
    out
}

pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.exists())
}

const LOAD_TIMEOUT: Duration = Duration::from_secs(600);

fn iptables_load(svcs: &[Svc], tool: &str, program: &str, changes: usize) -> RuleLoad {
    let rules = kubeproxy::iptables_restore(svcs, &[]);
    let mut r = RuleLoad {
        tool: tool.to_owned(),
        services: svcs.len(),
        rules_bytes: rules.len(),
        initial_ms: None,
        change_ms: None,
        error: None,
    };
    let result = (|| -> Result<()> {
        let ns = NetNs::new(&format!("lbb-{}-ipt", unique_token()))?;
        kubeproxy::timed_load(
            ns.name(),
            program,
            &["--noflush"],
            &kubeproxy::iptables_base(),
            LOAD_TIMEOUT,
        )?;
        r.initial_ms = Some(ms(kubeproxy::timed_load(
            ns.name(),
            program,
            &["--noflush"],
            &rules,
            LOAD_TIMEOUT,
        )?));
        let mut times = Vec::new();
        let mut current = svcs.to_vec();
        for k in 0..changes {
            let i = k * 7919 % current.len();
            let before = current[i].clone();
            let j = k % before.endpoints.len().max(1);
            current[i].endpoints[j] = changed_address(k);
            let deleted = kubeproxy::removed_sep_chains(&before, &current[i]);
            let full = kubeproxy::iptables_restore(&current, &deleted);
            times.push(ms(kubeproxy::timed_load(
                ns.name(),
                program,
                &["--noflush"],
                &full,
                LOAD_TIMEOUT,
            )?));
        }
        r.change_ms = Some(summarize(&mut times));
        Ok(())
    })();
    if let Err(e) = result {
        r.error = Some(format!("{e:#}"));
    }
    r
}

fn nft_load(svcs: &[Svc], changes: usize) -> RuleLoad {
    let rules = kubeproxy::nft_ruleset(svcs);
    let mut r = RuleLoad {
        tool: "nft -f".to_owned(),
        services: svcs.len(),
        rules_bytes: rules.len(),
        initial_ms: None,
        change_ms: None,
        error: None,
    };
    let result = (|| -> Result<()> {
        let ns = NetNs::new(&format!("lbb-{}-nft", unique_token()))?;
        r.initial_ms = Some(ms(kubeproxy::timed_load(
            ns.name(),
            "nft",
            &["-f", "-"],
            &rules,
            LOAD_TIMEOUT,
        )?));
        let mut times = Vec::new();
        let mut current = svcs.to_vec();
        for k in 0..changes {
            let i = k * 7919 % current.len();
            let before = current[i].clone();
            let j = k % before.endpoints.len().max(1);
            current[i].endpoints[j] = changed_address(k);
            let tx = kubeproxy::nft_endpoint_change(&before, &current[i]);
            times.push(ms(kubeproxy::timed_load(
                ns.name(),
                "nft",
                &["-f", "-"],
                &tx,
                LOAD_TIMEOUT,
            )?));
        }
        r.change_ms = Some(summarize(&mut times));
        Ok(())
    })();
    if let Err(e) = result {
        r.error = Some(format!("{e:#}"));
    }
    r
}

/// The iptables-restore the traffic benchmark loads kube-proxy's iptables rules with: the legacy (x_tables) one
/// when the machine has it, because the nf_tables backend cannot load 10k services in the run's budget (see
/// `Plan::iptables_nft_max_services`). The rules, and the linear walk of `KUBE-SERVICES` per new connection, are
/// the same with either backend.
pub fn traffic_iptables_restore() -> &'static str {
    if which("iptables-legacy-restore").is_some() {
        "iptables-legacy-restore"
    } else {
        "iptables-restore"
    }
}

/// Loads a rule set into `ns` (used by the traffic benchmark to put kube-proxy's rules on the path).
pub fn load_rules(ns: &NetNs, kind: RulesKind, svcs: &[Svc]) -> Result<Duration> {
    match kind {
        RulesKind::Iptables => {
            let program = traffic_iptables_restore();
            kubeproxy::timed_load(
                ns.name(),
                program,
                &["--noflush"],
                &kubeproxy::iptables_base(),
                LOAD_TIMEOUT,
            )?;
            kubeproxy::timed_load(
                ns.name(),
                program,
                &["--noflush"],
                &kubeproxy::iptables_restore(svcs, &[]),
                LOAD_TIMEOUT,
            )
        }
        RulesKind::Nft => kubeproxy::timed_load(
            ns.name(),
            "nft",
            &["-f", "-"],
            &kubeproxy::nft_ruleset(svcs),
            LOAD_TIMEOUT,
        ),
    }
}

/// Removes everything [`load_rules`] loaded.
pub fn flush_rules(ns: &NetNs, kind: RulesKind) -> Result<()> {
    let (program, input) = match kind {
        // Default policies, empty chains: what a fresh namespace has.
        RulesKind::Iptables => (
            traffic_iptables_restore(),
            "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n",
        ),
        RulesKind::Nft => ("nft", "flush ruleset\n"),
    };
    let args: &[&str] = if kind == RulesKind::Nft {
        &["-f", "-"]
    } else {
        &[]
    };
    kubeproxy::timed_load(ns.name(), program, args, input, LOAD_TIMEOUT)?;
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RulesKind {
    Iptables,
    Nft,
}
