//! An in-process Kubernetes API server for the tests: the only stand-in they use. It speaks the real list/watch
//! protocol over HTTP on 127.0.0.1 (an ephemeral port), so the agent under test drives it through kube-rs exactly as
//! it would drive a cluster: lists with a resourceVersion, watches resumed from one, bookmarks, label and field
//! selectors, `410 Gone` for compacted history, and server-side disconnects. Objects are k8s-openapi types
//! serialized to JSON, or raw JSON for the malformed ones a real server would have refused.
//!
//! It runs on its own tokio runtime (one worker thread), so the synchronous tests call it directly; dropping it stops
//! the runtime, which closes the listener and every open watch.
//!
//! Network safety: it listens on 127.0.0.1 only.

mod http;
pub mod store;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, watch};

pub use store::Resource;
use store::{Event, Store};

/// One request the server answered, for assertions ("did the agent relist?").
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub resource: Resource,
    pub watch: bool,
    pub query: String,
}

/// State shared by the handle and the connection tasks.
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// Every change, to the open watches (which filter by resource and selector).
    events: broadcast::Sender<Arc<Event>>,
    /// Bumped to end every open watch (a server-side disconnect).
    disconnect: watch::Sender<u64>,
    /// Resources whose list requests wait (a slow list).
    held: watch::Sender<BTreeSet<Resource>>,
    requests: Mutex<Vec<RequestRecord>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panicking test thread cannot leave the store half-updated (each change is one insert), so a poisoned
        // lock is still usable.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, resource: Resource, watch: bool, query: &str) {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(RequestRecord {
                resource,
                watch,
                query: query.to_owned(),
            });
    }
}

pub struct ApiServer {
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
    // Dropped last: stops the listener and every connection task.
    runtime: Option<tokio::runtime::Runtime>,
}

impl ApiServer {
    /// Starts serving on 127.0.0.1 on a free port.
    pub fn start() -> Result<ApiServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("lb-test-apiserver")
            .enable_all()
            .build()
            .context("starting the API server's runtime")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .context("binding 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            events: broadcast::channel(4096).0,
            disconnect: watch::channel(0).0,
            held: watch::channel(BTreeSet::new()).0,
            requests: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = accept_shared.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req| http::handle(shared.clone(), req));
                    // Errors here are the client going away mid-stream, which watch clients do all the time.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(ApiServer {
            shared,
            addr,
            runtime: Some(runtime),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server (plain http, no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\n",
            url = self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Creates or updates an object (a k8s-openapi value, serialized with its apiVersion and kind).
    pub fn apply<T: Serialize>(&self, object: &T) -> Result<()> {
        self.apply_value(serde_json::to_value(object)?)
    }

    /// Creates or updates an object given as JSON, malformed ones included.
    pub fn apply_value(&self, object: Value) -> Result<()> {
        let mut store = self.shared.lock();
        let event = store.upsert(object).map_err(anyhow::Error::msg)?;
        // Sent under the lock, so a watch being set up either sees it in the history or live, never both.
        let _ = self.shared.events.send(Arc::new(event));
        Ok(())
    }

    /// Deletes an object; `namespace` is ignored for Nodes.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> Result<()> {
        let ns = if resource.namespaced() { namespace } else { "" };
        let mut store = self.shared.lock();
        let Some(event) = store.delete(resource, ns, name) else {
            bail!("{} {namespace}/{name} does not exist", resource.kind());
        };
        let _ = self.shared.events.send(Arc::new(event));
        Ok(())
    }

    /// Ends every open watch, as an API server restart or a load balancer timeout does. Clients resume from the
    /// last resourceVersion they saw (no relist).
    pub fn disconnect_watches(&self) {
        self.shared.disconnect.send_modify(|g| *g += 1);
    }

    /// Compacts all history and ends every open watch: each client's resumed watch gets `410 Gone` and it has to
    /// relist.
    pub fn expire_watches(&self) {
        self.shared.lock().compact();
        self.disconnect_watches();
    }

    /// Makes list requests for `resource` wait until [`ApiServer::release_lists`].
    pub fn hold_lists(&self, resource: Resource) {
        self.shared.held.send_modify(|h| {
            h.insert(resource);
        });
    }

    pub fn release_lists(&self, resource: Resource) {
        self.shared.held.send_modify(|h| {
            h.remove(&resource);
        });
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many list (`watch = false`) or watch requests `resource` has had.
    pub fn count(&self, resource: Resource, watch: bool) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.resource == resource && r.watch == watch)
            .count()
    }

    /// Waits until `resource` has had at least `n` requests of the kind.
    pub fn wait_for_requests(
        &self,
        resource: Resource,
        watch: bool,
        n: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.count(resource, watch) < n {
            if Instant::now() >= deadline {
                bail!(
                    "{resource:?}: fewer than {n} {} requests within {timeout:?}; seen: {:?}",
                    if watch { "watch" } else { "list" },
                    self.requests()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}
