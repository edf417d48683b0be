//! The cluster source: kube-rs watchers on Services, EndpointSlices, this node's Node object and the ServiceCIDRs,
//! feeding the same pure translation as the file source (`model::translate` on a
//! [`ClusterObjects`](crate::model::ClusterObjects) snapshot) and, through the run loop, the same `Reconciler`.
//!
//! Objects are decoded straight into the model's compact types, one by one ([`decode`]), so one malformed object
//! becomes a diagnostic naming it and its field instead of failing the whole list (a typed list would fail to
//! deserialize as a unit and the watcher would retry it forever), and nothing of an object lb does not read is kept.
//!
//! **Resilience:** kube-runtime's watcher resumes a dropped watch from the last resourceVersion it saw, and after
//! `410 Gone` relists (`Init`, `InitApply`..., `InitDone`). The [`tracker`] buffers a relist and diffs it against
//! what it had at `InitDone`, so a relist never flushes anything: unchanged objects cost nothing and vanished ones
//! are deleted like any other change. Nothing is handed out before Services, EndpointSlices and the Node have each
//! been listed once.
//!
//! **Failures** (an unreachable or refusing API server, a broken watch) are retried per watch with client-go's
//! reflector backoff (0.8 s doubling to 30 s, [`watch_health::Backoff`]), each logged with the server's URL, the
//! resource and the whole error chain; repeats of the same error are quiet between doublings. How each watch is
//! doing ([`WatchHealth`]) feeds `lb-agent status` and the metrics, and every request the client makes is counted
//! under client-go's metric names ([`api_metrics`]).
//!
//! **Batching:** a change that arrives after a quiet spell (nothing handed out for [`MAX_BATCH`]) is handed out at
//! once, with whatever else is already queued, so a lone endpoint change costs no waiting. Changes that follow
//! closely (a rollout touches many slices) are applied together: the source waits for [`QUIET`] without events,
//! but never longer than [`MAX_BATCH`]. This is kube-proxy's `BoundedFrequencyRunner` shape: run at once when the
//! last run is long enough ago, otherwise coalesce.

pub mod api_metrics;
pub mod decode;
pub mod tracker;
pub mod watch_health;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::model::{ClusterObjects, Diagnostic, EndpointSlice, Node, Object, Service, ServiceCIDR};
use api_metrics::{ApiMetrics, ApiMetricsLayer};
use decode::Decoded;
use tracker::{Change, ObjectKey, Parsed, Update};
pub use tracker::{Contents, Delta, Kind, Snapshot, Tracker};
use watch_health::{Backoff, Report, WatchHealth, error_chain};

/// How long the source waits without new events before handing out a batch.
pub const QUIET: Duration = Duration::from_millis(30);
/// The longest a batch may be held back while events keep coming.
pub const MAX_BATCH: Duration = Duration::from_millis(200);

/// The label every EndpointSlice managed for a Service carries; kube-proxy watches only slices that have it
/// (`labelSelector=kubernetes.io/service-name`, see `pkg/proxy/config`'s informer factory).
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Where the API server and credentials come from.
#[derive(Clone, Debug)]
pub enum Connection {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`/`_PORT` and the mounted token), as kube-proxy in a
    /// DaemonSet.
    InCluster,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster configuration: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("creating the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("listing {kind}s: {source}")]
    List {
        kind: Kind,
        #[source]
        source: kube::Error,
    },
}

/// Builds a client for `connection`. Makes no request: an unreachable API server shows up as watcher retries.
pub async fn client(connection: &Connection) -> Result<kube::Client, KubeError> {
    Ok(connect(connection, None).await?.client)
}

/// A client and the URL of the server it talks to (for every log line about that server).
#[derive(Clone)]
pub struct ApiClient {
    pub client: kube::Client,
    pub server: String,
}

/// Builds a client for `connection`, its requests counted in `metrics` when given. Makes no request.
pub async fn connect(
    connection: &Connection,
    metrics: Option<Arc<ApiMetrics>>,
) -> Result<ApiClient, KubeError> {
    let config = match connection {
        Connection::Kubeconfig(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        Connection::InCluster => kube::Config::incluster().map_err(KubeError::InCluster)?,
    };
    let server = config.cluster_url.to_string();
    let host = api_metrics::host_label(&config.cluster_url);
    let builder = kube::client::ClientBuilder::try_from(config).map_err(KubeError::Client)?;
    let client = match metrics {
        Some(m) => builder.with_layer(&ApiMetricsLayer::new(m, &host)).build(),
        None => builder.build(),
    };
    Ok(ApiClient { client, server })
}

/// The running watchers and the tracker they feed.
pub struct KubeSource {
    events: mpsc::UnboundedReceiver<Update>,
    tracker: Tracker,
    tasks: Vec<JoinHandle<()>>,
    /// When the last snapshot was handed out.
    last_handed_out: Option<tokio::time::Instant>,
    health: Arc<WatchHealth>,
    /// The batch being gathered, kept here rather than in `next`'s locals: the run loop polls `next` in a
    /// `select!`, and a timer or signal firing mid-batch drops the future. The changes it applied are in the
    /// tracker; with the batch remembered, the next call finishes it instead of waiting for a new event.
    batch: Option<Batch>,
}

/// A batch of changes in progress: when its first event arrived, and when it is handed out at the latest.
#[derive(Clone, Copy, Debug)]
struct Batch {
    first_event: std::time::Instant,
    deadline: tokio::time::Instant,
}

impl KubeSource {
    /// Starts the four watchers on the current tokio runtime.
    pub fn start(api: ApiClient, node_name: &str) -> KubeSource {
        let health = Arc::new(WatchHealth::new(api.server.clone()));
        let client = api.client;
        let (tx, events) = mpsc::unbounded_channel();
        let services = watcher::Config::default();
        let slices = watcher::Config::default().labels(SERVICE_NAME_LABEL);
        // Only this node's Node object: its addresses and zone are all the model reads (kube-proxy's
        // `NodeManager` watches the same single object with a `metadata.name` field selector).
        let node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
        let tasks = vec![
            tokio::spawn(watch::<Service>(
                client.clone(),
                services,
                Kind::Service,
                tx.clone(),
                Update::Service,
                health.clone(),
            )),
            tokio::spawn(watch::<EndpointSlice>(
                client.clone(),
                slices,
                Kind::EndpointSlice,
                tx.clone(),
                Update::EndpointSlice,
                health.clone(),
            )),
            tokio::spawn(watch::<Node>(
                client.clone(),
                node,
                Kind::Node,
                tx.clone(),
                Update::Node,
                health.clone(),
            )),
            // Not part of the initial-sync gate (see `tracker`): a cluster that does not serve ServiceCIDRs only
            // logs this watcher's retries.
            tokio::spawn(watch::<ServiceCIDR>(
                client,
                watcher::Config::default(),
                Kind::ServiceCidr,
                tx,
                Update::ServiceCidr,
                health.clone(),
            )),
        ];
        KubeSource::from_events(events, tasks, health)
    }

    /// The source over any stream of updates (the watchers' channel, or a test's).
    fn from_events(
        events: mpsc::UnboundedReceiver<Update>,
        tasks: Vec<JoinHandle<()>>,
        health: Arc<WatchHealth>,
    ) -> Self {
        KubeSource {
            events,
            tracker: Tracker::default(),
            tasks,
            last_handed_out: None,
            health,
            batch: None,
        }
    }

    /// How the watches are doing (shared with the ops thread).
    pub fn health(&self) -> Arc<WatchHealth> {
        self.health.clone()
    }

    /// Waits for the next snapshot worth syncing: the first once every kind has been listed ([`Snapshot::initial`];
    /// the run loop logs "initial sync done" after programming it), then one per batch of events that changed
    /// something. `None` when every watcher has stopped (they do not, short of a panic).
    ///
    /// Cancel-safe: every await is a channel receive (which loses nothing when dropped), an event is applied as soon
    /// as it is received, and the batch's timing lives in `self`, so a call dropped mid-batch is resumed by the next.
    pub async fn next(&mut self) -> Option<Snapshot> {
        loop {
            let batch = match self.batch {
                Some(batch) => batch,
                None => {
                    let first = self.events.recv().await?;
                    let first_event = std::time::Instant::now();
                    self.apply(first);
                    // Everything already queued belongs to this batch whatever happens next.
                    while let Ok(update) = self.events.try_recv() {
                        self.apply(update);
                    }
                    let idle = self
                        .last_handed_out
                        .is_none_or(|at| at.elapsed() >= MAX_BATCH);
                    // Idle: no waiting at all (the deadline has passed already).
                    let wait = if idle { Duration::ZERO } else { MAX_BATCH };
                    let batch = Batch {
                        first_event,
                        deadline: tokio::time::Instant::now() + wait,
                    };
                    self.batch = Some(batch);
                    batch
                }
            };
            loop {
                let now = tokio::time::Instant::now();
                if now >= batch.deadline {
                    break;
                }
                let quiet = QUIET.min(batch.deadline - now);
                match tokio::time::timeout(quiet, self.events.recv()).await {
                    Ok(Some(update)) => self.apply(update),
                    Ok(None) => return None,
                    Err(_quiet) => break,
                }
            }
            self.batch = None;
            let taken = self.tracker.take();
            let (services, slices) = self.tracker.pending_counts();
            self.health.set_pending(services, slices);
            if let Some(mut snapshot) = taken {
                snapshot.first_event = Some(batch.first_event);
                self.last_handed_out = Some(tokio::time::Instant::now());
                return Some(snapshot);
            }
        }
    }

    /// Everything known now, for a resync outside the event flow (SIGHUP, a config reload); `None` before the
    /// initial lists.
    pub fn current(&self) -> Option<Snapshot> {
        self.tracker.current()
    }

    fn apply(&mut self, update: Update) {
        let was_ready = self.tracker.ready();
        let (kind, applied) = self.tracker.apply(update);
        let (services, slices) = self.tracker.pending_counts();
        self.health.set_pending(services, slices);
        if applied.list_done {
            tracing::info!(%kind, changed = applied.changed, vanished = applied.vanished, "listed");
            if !was_ready && !self.tracker.ready() {
                tracing::info!(waiting_for = ?self.tracker.unlisted(), "not programming anything before every kind is listed");
            }
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Runs one watcher forever, decoding its objects and sending them on. Failures are logged (with the server's
/// URL) and retried with [`Backoff`]; a `410 Gone` makes the watcher relist at once, by itself.
async fn watch<T: Object>(
    client: kube::Client,
    config: watcher::Config,
    kind: Kind,
    tx: mpsc::UnboundedSender<Update>,
    wrap: fn(Change<T>) -> Update,
    health: Arc<WatchHealth>,
) {
    let api: Api<Decoded<T>> = Api::all(client);
    health.register(kind);
    // No `default_backoff()`: it is reset by the `Init` event kube-runtime sends before every list attempt, so it
    // never grows (see `watch_health`).
    let mut stream = watcher::watcher(api, config).boxed();
    let mut backoff = Backoff::new(kind as u64 + std::process::id() as u64);
    while let Some(event) = stream.next().await {
        let change = match event {
            // Sent before every list attempt, failed or not: not progress.
            Ok(watcher::Event::Init) => Change::Init,
            Ok(event) => {
                let list_done = matches!(event, watcher::Event::InitDone);
                let failures = health.progress(kind, list_done);
                if failures > 0 {
                    backoff.reset();
                    tracing::info!(server = %health.server(), resource = %kind, failures, "watch works again");
                }
                match event {
                    watcher::Event::InitApply(obj) => {
                        let (key, parsed) = split(obj);
                        Change::InitApply(key, parsed)
                    }
                    watcher::Event::Apply(obj) => {
                        let (key, parsed) = split(obj);
                        Change::Apply(key, parsed)
                    }
                    watcher::Event::Delete(obj) => Change::Delete(split(obj).0),
                    watcher::Event::InitDone => Change::InitDone,
                    watcher::Event::Init => Change::Init,
                }
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                tracing::info!(server = %health.server(), resource = %kind, message = %status.message, "watch expired (410 Gone); relisting, the datapath stays as it is");
                continue;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                let error = error_chain(&e);
                let (attempt, report) = health.failed(kind, &error, delay);
                let retry_in = format!("{:.1}s", delay.as_secs_f64());
                match report {
                    Report::Warn => {
                        tracing::warn!(server = %health.server(), resource = %kind, attempt, %retry_in, %error, "cannot watch the API server; retrying with backoff, the datapath stays as it is")
                    }
                    Report::Quiet => {
                        tracing::debug!(server = %health.server(), resource = %kind, attempt, %retry_in, %error, "cannot watch the API server; retrying with backoff")
                    }
                }
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        if tx.send(wrap(change)).is_err() {
            return;
        }
    }
}

/// A decoded object's key and content, as the tracker keeps them.
fn split<T>(decoded: Decoded<T>) -> (ObjectKey, Parsed<T>) {
    let (namespace, name) = decoded.key();
    (ObjectKey { namespace, name }, decoded.object.map(Arc::new))
}

/// Lists every kind the agent watches once, with the same selectors and the same per-object conversion, for
/// one-shot commands (`lb-agent explain`): the objects, and a diagnostic for each unreadable one. ServiceCIDRs
/// that cannot be listed (an API server older than 1.33, or RBAC without them) are a diagnostic, as they do not
/// hold the agent back either (see `tracker`).
pub async fn list_once(
    client: &kube::Client,
    node_name: &str,
) -> Result<(ClusterObjects, Vec<Diagnostic>), KubeError> {
    let mut diagnostics = Vec::new();
    let slices = watcher::Config::default().labels(SERVICE_NAME_LABEL);
    let node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let services = list_kind::<Service>(client, &watcher::Config::default(), Kind::Service).await?;
    let endpoint_slices = list_kind::<EndpointSlice>(client, &slices, Kind::EndpointSlice).await?;
    let nodes = list_kind::<Node>(client, &node, Kind::Node).await?;
    let service_cidrs = match list_kind::<ServiceCIDR>(
        client,
        &watcher::Config::default(),
        Kind::ServiceCidr,
    )
    .await
    {
        Ok(list) => list,
        Err(e) => {
            diagnostics.push(Diagnostic::new(
                "ServiceCIDRs",
                None,
                format!("{e}; unallocated ClusterIPs are not considered"),
            ));
            Vec::new()
        }
    };
    let objects = ClusterObjects {
        services: keep_all(services, &mut diagnostics),
        endpoint_slices: keep_all(endpoint_slices, &mut diagnostics),
        nodes: keep_all(nodes, &mut diagnostics),
        service_cidrs: keep_all(service_cidrs, &mut diagnostics),
    };
    Ok((objects, diagnostics))
}

/// The readable objects; a diagnostic for each other one.
fn keep_all<T>(parsed: Vec<Parsed<T>>, diagnostics: &mut Vec<Diagnostic>) -> Vec<Arc<T>> {
    let mut out = Vec::with_capacity(parsed.len());
    for p in parsed {
        match p {
            Ok(obj) => out.push(obj),
            Err(d) => diagnostics.push(d),
        }
    }
    out
}

/// One list request of kind `T` with the watcher's selectors, each object decoded on its own.
async fn list_kind<T: Object>(
    client: &kube::Client,
    config: &watcher::Config,
    kind: Kind,
) -> Result<Vec<Parsed<T>>, KubeError> {
    let api: Api<Decoded<T>> = Api::all(client.clone());
    let mut params = kube::api::ListParams::default();
    if let Some(labels) = &config.label_selector {
        params = params.labels(labels);
    }
    if let Some(fields) = &config.field_selector {
        params = params.fields(fields);
    }
    let list = api
        .list(&params)
        .await
        .map_err(|source| KubeError::List { kind, source })?;
    Ok(list.items.into_iter().map(|obj| split(obj).1).collect())
}

/// Reads `KUBERNETES_SERVICE_HOST` the way kube-rs's in-cluster config does: set and non-empty means "inside a pod".
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty())
}

/// A human-readable name of the connection, for the log.
pub fn describe(connection: &Connection) -> String {
    match connection {
        Connection::Kubeconfig(p) => format!("kubeconfig {}", p.display()),
        Connection::InCluster => "in-cluster service account".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectMeta;

    fn slice(name: &str) -> (ObjectKey, Parsed<EndpointSlice>) {
        let key = ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        };
        let obj = EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ..Default::default()
        };
        (key, Ok(Arc::new(obj)))
    }

    fn send_list(tx: &mpsc::UnboundedSender<Update>) {
        for update in [
            Update::Service(Change::Init),
            Update::Service(Change::InitDone),
            Update::Node(Change::Init),
            Update::Node(Change::InitDone),
            Update::EndpointSlice(Change::Init),
            Update::EndpointSlice(Change::InitDone),
        ] {
            tx.send(update).expect("send");
        }
    }

    #[tokio::test]
    async fn a_burst_of_events_is_one_snapshot_and_nothing_comes_before_the_lists() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut source =
            KubeSource::from_events(rx, Vec::new(), Arc::new(WatchHealth::new("test")));
        tx.send(Update::Service(Change::Init)).expect("send");
        tx.send(Update::Service(Change::InitDone)).expect("send");
        let early = tokio::time::timeout(Duration::from_millis(300), source.next()).await;
        assert!(early.is_err(), "a snapshot before every kind was listed");

        send_list(&tx);
        let initial = source.next().await.expect("initial snapshot");
        assert!(initial.initial);

        for i in 0..50 {
            let (key, obj) = slice(&format!("s{i}"));
            tx.send(Update::EndpointSlice(Change::Apply(key, obj)))
                .expect("send");
        }
        let burst = source.next().await.expect("burst snapshot");
        assert_eq!(
            (
                burst.changes,
                match &burst.contents {
                    Contents::Changes(d) => d.endpoint_slices.len(),
                    Contents::Full(_) => 0,
                }
            ),
            (50, 50)
        );
        let quiet = tokio::time::timeout(Duration::from_millis(300), source.next()).await;
        assert!(quiet.is_err(), "the burst was handed out once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_change_after_a_quiet_spell_goes_out_at_once_and_a_close_follower_is_batched() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut source =
            KubeSource::from_events(rx, Vec::new(), Arc::new(WatchHealth::new("test")));
        send_list(&tx);
        source.next().await.expect("initial snapshot");
        tokio::time::advance(MAX_BATCH).await;

        let (key, obj) = slice("lone");
        tx.send(Update::EndpointSlice(Change::Apply(key, obj)))
            .expect("send");
        let started = tokio::time::Instant::now();
        let lone = source.next().await.expect("the lone change");
        assert_eq!(lone.changes, 1);
        assert_eq!(started.elapsed(), Duration::ZERO, "a lone change waited");

        // Right after a sync: the next change waits for a quiet spell, so a burst coalesces.
        let (key, obj) = slice("follower");
        tx.send(Update::EndpointSlice(Change::Apply(key, obj)))
            .expect("send");
        let started = tokio::time::Instant::now();
        let follower = source.next().await.expect("the follower");
        assert_eq!(follower.changes, 1);
        assert_eq!(started.elapsed(), QUIET);
    }

    /// The run loop polls `next` in a `select!` next to the conntrack GC timer, signals and the config watch: any of
    /// them firing while a batch waits for its quiet spell drops the future. What it had applied must still come
    /// out, without waiting for another event (which may not come for minutes: a Service switched from
    /// `externalTrafficPolicy: Local` to `Cluster` kept its health check server answering until then).
    #[tokio::test(start_paused = true)]
    async fn a_batch_interrupted_by_another_select_branch_is_handed_out_by_the_next_call() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut source =
            KubeSource::from_events(rx, Vec::new(), Arc::new(WatchHealth::new("test")));
        send_list(&tx);
        source.next().await.expect("initial snapshot");
        // Right after a hand-out, so the change waits for a quiet spell.
        let (key, obj) = slice("changed");
        tx.send(Update::EndpointSlice(Change::Apply(key, obj)))
            .expect("send");
        let interrupted = tokio::time::timeout(QUIET / 2, source.next()).await;
        assert!(interrupted.is_err(), "the batch did not wait");
        // No further event: the next call must still hand the change out, within one batch window.
        let resumed = tokio::time::timeout(MAX_BATCH, source.next())
            .await
            .expect("the change applied before the interruption was not handed out")
            .expect("a snapshot");
        assert_eq!(resumed.changes, 1);
        assert!(resumed.first_event.is_some());
    }
}
