//! An in-process Kubernetes API server for the tests: the only stand-in they use. It speaks the real list/watch
//! protocol over HTTP on 127.0.0.1 (an ephemeral port), so the agent under test drives it through kube-rs exactly as
//! it would drive a cluster: lists with a resourceVersion, watches resumed from one, bookmarks, label and field
//! selectors, `410 Gone` for compacted history, and server-side disconnects. Objects are k8s-openapi types
//! serialized to JSON, or raw JSON for the malformed ones a real server would have refused.
//!
//! It runs on its own tokio runtime (one worker thread), so the synchronous tests call it directly; dropping it stops
//! the runtime, which closes the listener and every open watch.
//!
//! [`ApiServer::start_cluster`] adds what kube-apiserver and kube-controller-manager do to the objects
//! (`controllers/`): Service defaulting and ClusterIP/NodePort allocation on [`ApiServer::create`] and
//! [`ApiServer::update`], EndpointSlices following Pods, and a cloud load balancer controller. [`ApiServer::listen_in`]
//! opens a further listener on the loopback of a network namespace, for agents running inside one (each node of a
//! simulated cluster reaches "its" API server on its own 127.0.0.1, as through a node-local proxy).
//!
//! Network safety: it listens on loopback addresses only.

pub mod controllers;
mod http;
pub mod store;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, watch};

pub use controllers::cloud::LbChange;
pub use controllers::{Cidr, ClusterConfig};
use controllers::{Controllers, Trigger, Write};
pub use store::Resource;
use store::{Event, Store};

/// Called with every load balancer address the cloud controller takes into use or releases.
pub type LbHook = Box<dyn Fn(&LbChange) + Send + Sync>;

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
    /// Set by [`ApiServer::start_cluster`]; always locked after `store`.
    controllers: Mutex<Option<Controllers>>,
    lb_hook: Mutex<Option<LbHook>>,
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
        Self::start_with(None)
    }

    /// [`ApiServer::start`] with the cluster's controllers (see the module documentation).
    pub fn start_cluster(config: ClusterConfig) -> Result<ApiServer> {
        Self::start_with(Some(Controllers::new(config)))
    }

    fn start_with(controllers: Option<Controllers>) -> Result<ApiServer> {
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
            controllers: Mutex::new(controllers),
            lb_hook: Mutex::new(None),
        });
        runtime.spawn(accept(listener, shared.clone()));
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
        write_kubeconfig(&self.url(), path)
    }

    /// Opens one more listener, on 127.0.0.1 of the network namespace at `netns` (a `/run/netns/<name>` path, its
    /// loopback up), serving the same objects; returns its address (for [`write_kubeconfig`]). The socket is made by a
    /// thread that enters the namespace and exits: a socket stays in the namespace it was created in.
    pub fn listen_in(&self, netns: &Path) -> Result<SocketAddr> {
        let path = netns.to_path_buf();
        let std_listener = std::thread::spawn(move || -> Result<std::net::TcpListener> {
            let ns = std::fs::File::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: setns on a valid namespace fd; it changes only this short-lived thread's namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("entering {}", path.display()));
            }
            let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the listener thread panicked"))??;
        let addr = std_listener.local_addr()?;
        let runtime = self.runtime.as_ref().context("the server is stopping")?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        runtime.spawn(accept(listener, self.shared.clone()));
        Ok(addr)
    }

    /// Creates or updates an object (a k8s-openapi value, serialized with its apiVersion and kind).
    pub fn apply<T: Serialize>(&self, object: &T) -> Result<()> {
        self.apply_value(serde_json::to_value(object)?)
    }

    /// Creates or replaces an object given as JSON, malformed ones included: no admission (what a file or an
    /// operator's direct write would hold), but the controllers follow it.
    pub fn apply_value(&self, object: Value) -> Result<()> {
        self.write(|store, _| {
            let event = store.upsert(object)?;
            Ok(vec![event])
        })
        .map(|_| ())
    }

    /// Creates an object as `kubectl create` does: refused if it exists, and (with controllers) admitted first. Returns
    /// the stored object, with what the server filled in.
    pub fn create(&self, object: Value) -> Result<Value> {
        let (resource, ns, name) = identity(&object)?;
        self.write(|store, ctl| {
            if store.get(resource, &ns, &name).is_some() {
                return Err(format!(
                    "AlreadyExists: {} \"{name}\" already exists",
                    resource.kind()
                ));
            }
            let object = match ctl {
                Some(c) => c.admit(store, None, object)?,
                None => object,
            };
            Ok(vec![store.upsert(object)?])
        })?;
        self.get(resource, &ns, &name)
            .context("the created object is gone")
    }

    /// Changes a stored object with `change` and stores it as an update (admitted, with controllers): a read, a
    /// modification, a write, as `kubectl edit` or a client's `Update` does.
    pub fn update(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> Result<Value> {
        let ns = if resource.namespaced() { namespace } else { "" };
        self.write(|store, ctl| {
            let old = store
                .get(resource, ns, name)
                .cloned()
                .ok_or_else(|| format!("NotFound: {} \"{name}\" not found", resource.kind()))?;
            let mut new = old.clone();
            change(&mut new);
            let new = match ctl {
                Some(c) => c.admit(store, Some(&old), new)?,
                None => new,
            };
            Ok(vec![store.upsert(new)?])
        })?;
        self.get(resource, ns, name)
            .context("the updated object is gone")
    }

    /// The stored object, as a GET returns it.
    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let ns = if resource.namespaced() { namespace } else { "" };
        self.shared.lock().get(resource, ns, name).cloned()
    }

    /// Every stored object of `resource` in `namespace` (every namespace with `None`).
    pub fn list(&self, resource: Resource, namespace: Option<&str>) -> Vec<Value> {
        self.shared
            .lock()
            .list(resource, namespace, &store::Selector::default())
            .1
    }

    /// Deletes an object; `namespace` is ignored for Nodes.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> Result<()> {
        let ns = if resource.namespaced() { namespace } else { "" };
        self.write(|store, _| {
            store
                .delete(resource, ns, name)
                .map(|e| vec![e])
                .ok_or_else(|| format!("{} {namespace}/{name} does not exist", resource.kind()))
        })
        .map(|_| ())
    }

    /// Runs `hook` for every load balancer address the cloud controller takes or releases (after the write that
    /// caused it, outside the store's lock).
    pub fn on_load_balancer(&self, hook: LbHook) {
        *self
            .shared
            .lb_hook
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// One write and what the controllers do after it, under the store's lock; every event is sent under the lock,
    /// so a watch being set up either sees it in the history or live, never both.
    fn write(
        &self,
        op: impl FnOnce(&mut Store, Option<&mut Controllers>) -> Result<Vec<Event>, String>,
    ) -> Result<()> {
        let changes = {
            let mut store = self.shared.lock();
            let mut ctl = self
                .shared
                .controllers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let events = op(&mut store, ctl.as_mut()).map_err(anyhow::Error::msg)?;
            let mut changes = Vec::new();
            for event in events {
                if let Some(c) = ctl.as_mut() {
                    if event.resource == Resource::Services && event.ty == store::EventType::Deleted
                    {
                        changes.extend(c.released(&event.object));
                    }
                    let now = (event.ty != store::EventType::Deleted).then_some(&event.object);
                    if let Some(trigger) = Trigger::of(event.resource, event.old.as_ref(), now) {
                        let _ = self.shared.events.send(Arc::new(event));
                        changes.extend(follow(&self.shared, &mut store, c, &trigger));
                        continue;
                    }
                }
                let _ = self.shared.events.send(Arc::new(event));
            }
            changes
        };
        if !changes.is_empty() {
            let hook = self
                .shared
                .lb_hook
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(h) = hook.as_ref() {
                for c in &changes {
                    h(c);
                }
            }
        }
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

/// Writes a kubeconfig for the server at `url` (plain http, no credentials).
pub fn write_kubeconfig(url: &str, path: &Path) -> Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\n"
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Serves connections from `listener` until the runtime stops (the task is dropped with it, so it never returns).
async fn accept(listener: tokio::net::TcpListener, shared: Arc<Shared>) -> ! {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| http::handle(shared.clone(), req));
            // Errors here are the client going away mid-stream, which watch clients do all the time.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// (resource, namespace, name) of an object about to be written (namespace defaulted as the store does).
fn identity(object: &Value) -> Result<(Resource, String, String)> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .context("object without kind")?;
    let resource = Resource::from_kind(kind).with_context(|| format!("unsupported kind {kind}"))?;
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .context("object without metadata.name")?
        .to_owned();
    let ns = if resource.namespaced() {
        object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned()
    } else {
        String::new()
    };
    Ok((resource, ns, name))
}

/// Applies the controllers' writes after a change and sends their events; returns the load balancer changes.
fn follow(
    shared: &Shared,
    store: &mut Store,
    ctl: &mut Controllers,
    trigger: &Trigger,
) -> Vec<LbChange> {
    let (writes, changes) = ctl.reconcile(store, trigger);
    for w in writes {
        let event = match w {
            Write::Upsert(v) => store.upsert(v).ok(),
            Write::Delete(r, ns, name) => store.delete(r, &ns, &name),
        };
        if let Some(e) = event {
            let _ = shared.events.send(Arc::new(e));
        }
    }
    changes
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}
