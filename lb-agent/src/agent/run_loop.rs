//! The daemon's life: start (watchers, ops servers, datapath, adoption), the first sync, then one loop over the
//! source's changes, config reloads, signals and the conntrack garbage collector until SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use super::config::{AgentConfig, SourceConfig};
use super::startup;
use super::syncer::{Names, Syncer};
use crate::datapath::clock;
use crate::datapath::loader::{self, PinDir};
use crate::datapath::maps::PinnedMaps;
use crate::datapath::pins::Migration;
use crate::model;
use crate::ops::status::{AgentReport, DatapathSetup, SourceReport};
use crate::ops::{Ops, OpsInputs};
use crate::source::kube::api_metrics::ApiMetrics;
use crate::source::kube::{KubeSource, Snapshot};

pub(super) async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let agent_started = SystemTime::now();
    let node_name = startup::node_name(&config)?;
    let fallback_node_addresses = startup::fallback_node_addresses(&config);
    // The watchers start before the datapath loads, so the lists are under way meanwhile; a bad kubeconfig fails
    // here, before anything is attached.
    let api = Arc::new(ApiMetrics::default());
    let (mut kube_source, source) = match &config.source {
        SourceConfig::Kube(connection) => {
            let client = crate::source::kube::connect(connection, Some(api.clone())).await?;
            let via = crate::source::kube::describe(connection);
            tracing::info!(server = %client.server, source = %via, node = %node_name, "watching the API server");
            let location = format!("{} ({via})", client.server);
            (
                Some(KubeSource::start(client, &node_name)),
                SourceReport {
                    kind: "kubernetes".into(),
                    location,
                    api: None,
                },
            )
        }
        SourceConfig::Manifests(path) => (
            None,
            SourceReport {
                kind: "manifests".into(),
                location: path.display().to_string(),
                api: None,
            },
        ),
    };
    let object = loader::object_bytes(config.bpf_object.as_deref())?;
    let pins = PinDir::new(&config.pins);
    // Before loading, so /healthz answers (and /readyz says "not yet") while the datapath loads.
    let ops = Ops::start(
        &config.ops,
        &pins.dir,
        OpsInputs {
            api,
            watches: kube_source.as_ref().map(KubeSource::health),
            report: AgentReport {
                build: crate::ops::build_info(),
                pid: std::process::id(),
                started_unix_ms: crate::ops::status::now_ms(),
                node: node_name.clone(),
                service_metrics: config.ops.service_metrics.to_string(),
                source,
                ..AgentReport::default()
            },
        },
    )?;
    let (datapath, xdp, mut setup, mut pending_attach) =
        startup::load_and_attach(&object, &config, &pins, &fallback_node_addresses)?;
    let reconciler = startup::adopt(&datapath.maps, &config, xdp, &mut setup)?;
    ops.set_datapath(setup.clone());
    let model = config.model_config(fallback_node_addresses);
    let mut syncer = Syncer {
        translator: model::Translator::new(
            model.clone(),
            model::node_context(&node_name, &[], &model),
        ),
        node_name,
        model,
        reconciler,
        names: Names::new(&pins.dir, config.capacities.services),
        ops,
        netns: open_netns_addrs(&pins.dir, config.cgroup.as_deref()),
        host_cookie: crate::host::netns_cookie().ok(),
        netns_needed: false,
        agent_started,
        synced_once: false,
    };
    let (_config_watcher, mut config_changes) = config_watch(syncer.ops.config_path())?;
    let loader::Datapath {
        mut ebpf,
        mut maps,
        migration,
    } = datapath;
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    // The file source syncs once before the loop (a first sync that cannot read the manifests restores the old
    // pins); the kube source's first sync is its first snapshot, in the loop, once every kind has been listed.
    let mut migration = Some(migration);
    let (_file_watcher, mut changes, _no_file_changes) = match &config.source {
        SourceConfig::Manifests(path) => {
            let synced = syncer.sync(&mut maps, path, true);
            finish_migration(
                &mut migration,
                synced,
                &mut pending_attach,
                &mut ebpf,
                &mut setup,
                &syncer.ops,
                &mut maps,
            )?;
            release_free_heap();
            tracing::info!("initial sync done");
            syncer.ops.set_ready();
            let (watcher, rx) = crate::source::file::watch(path)?;
            (Some(watcher), rx, None)
        }
        SourceConfig::Kube(_) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (None, rx, Some(tx))
        }
    };
    let mut gc = tokio::time::interval(config.conntrack_gc_interval.max(Duration::from_secs(1)));
    // Pods started since the last sync get their namespace's address learned within this (source ranges).
    let mut netns_tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = netns_tick.tick() => syncer.refresh_netns(None),
            _ = gc.tick() => {
                let live = syncer.reconciler.service_ids();
                let hz = clock::kernel_hz();
                match maps.packet.conntrack_gc(&live, clock::jiffies_now(hz), hz) {
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
                finish_migration(&mut migration, true, &mut pending_attach, &mut ebpf, &mut setup, &syncer.ops, &mut maps)?;
                if initial {
                    release_free_heap();
                    // The readiness moment: every kind listed and programmed once (tests wait for this line).
                    tracing::info!("initial sync done");
                    syncer.ops.set_ready();
                }
            }
            Some(()) = changes.recv() => {
                syncer.ops.change_seen();
                // Writers often touch a file several times in a row; wait for the burst to end (bounded) and sync once.
                debounce(&mut changes, Duration::from_millis(100), Duration::from_secs(1)).await;
                if let SourceConfig::Manifests(path) = &config.source {
                    syncer.sync(&mut maps, path, false);
                }
            }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the config file and resyncing");
                syncer.reload_config();
                resync(&mut syncer, &mut maps, &config.source, kube_source.as_ref());
            }
            Some(()) = config_changes.recv() => {
                debounce(&mut config_changes, Duration::from_millis(100), Duration::from_secs(1)).await;
                if syncer.reload_config() {
                    resync(&mut syncer, &mut maps, &config.source, kube_source.as_ref());
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

/// The namespace address map's writer (socket-level source ranges), or `None`, logged, when the map cannot be opened.
fn open_netns_addrs(
    pins: &Path,
    cgroup: Option<&Path>,
) -> Option<crate::datapath::netns_addrs::NetnsAddrsWriter> {
    let cgroup = match cgroup {
        Some(c) => c.to_path_buf(),
        None => match loader::cgroup2_root() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "no cgroup v2 root: pods' namespace addresses are not learned");
                return None;
            }
        },
    };
    match crate::datapath::netns_addrs::NetnsAddrsWriter::open(pins, &cgroup) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the namespace address map: pods' connections to LoadBalancer IPs with loadBalancerSourceRanges are refused");
            None
        }
    }
}

/// The events that say the config file may have changed: its whole directory watched, or a receiver that never
/// fires when there is no file.
fn config_watch(
    path: Option<PathBuf>,
) -> anyhow::Result<(
    Option<notify::RecommendedWatcher>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
)> {
    match path {
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
            #[expect(
                clippy::mem_forget,
                reason = "a sender that never sends, so recv() pends forever"
            )]
            std::mem::forget(tx);
            Ok((None, rx))
        }
    }
}

/// The kube source's next snapshot; never resolves for the file source.
async fn next_snapshot(kube: Option<&mut KubeSource>) -> Option<Snapshot> {
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
    source: &SourceConfig,
    kube: Option<&KubeSource>,
) {
    match (source, kube) {
        (SourceConfig::Manifests(path), _) => {
            syncer.sync(maps, path, true);
        }
        (SourceConfig::Kube(_), Some(kube)) => {
            if let Some(snapshot) = kube.current() {
                syncer.apply_snapshot(maps, snapshot, true);
            }
        }
        (SourceConfig::Kube(_), None) => {}
    }
}

/// After the first sync: attaches the programs if that waited for migrated maps to be filled (and tells the status
/// where), and drops the old pins of migrated maps; or puts them back when that sync could not run.
fn finish_migration(
    migration: &mut Option<Migration>,
    synced: bool,
    pending_attach: &mut Option<startup::Attachment>,
    ebpf: &mut aya::Ebpf,
    setup: &mut DatapathSetup,
    ops: &Ops,
    maps: &mut PinnedMaps,
) -> anyhow::Result<()> {
    let Some(migration) = migration.take() else {
        return Ok(());
    };
    if synced {
        // Conntrack entries are carried over at the last moment before the new programs take over, so that only
        // flows the old programs open in between start over.
        if migration.moved().contains(&lb_common::map_names::CONNTRACK) {
            let now = clock::jiffies_now(clock::kernel_hz());
            let entries = crate::datapath::pins::migrated_conntrack(migration.dir(), now);
            let carried = maps.packet.carry_conntrack(&entries);
            tracing::info!(
                carried,
                of = entries.len(),
                "conntrack entries carried into the migrated map"
            );
        }
        if let Some(attachment) = pending_attach.take() {
            attachment.attach(ebpf, setup)?;
            ops.set_datapath(setup.clone());
        }
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

/// Hands the heap the first sync freed back to the kernel. The first sync is the agent's one large transient
/// allocation (every object parsed, every table planned at once: 150+ MiB at 10k Services); glibc keeps what was
/// freed inside its heap, so without this the agent's RSS would stay at its peak for its whole life.
fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
