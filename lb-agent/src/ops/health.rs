//! `/healthz`, `/readyz` and the per-Service `healthCheckNodePort` servers.
//!
//! - `/healthz` (liveness): 200 unless a sync has been running for longer than [`STUCK_SYNC`], which means the
//!   agent's loop is wedged; kubelet then restarts it (the datapath keeps serving meanwhile, everything is pinned).
//! - `/readyz`: 503 until the first full sync programmed the maps, then 200 (kube-proxy's readiness has the same
//!   meaning: this node's Services are programmed).
//! - One server per `healthCheckNodePort` (LoadBalancer Services with `externalTrafficPolicy: Local`), answering
//!   as kube-proxy's `hcHandler` does (pkg/proxy/healthcheck/service_health.go): 200 with the number of local
//!   ready endpoints, 503 when there are none (or the agent is unhealthy), so the cloud load balancer sends traffic
//!   only to nodes that can serve it locally.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::http::{self, Handler, Response};
use crate::model::ServiceHealth;

/// A sync running this long means the loop is stuck.
pub const STUCK_SYNC: Duration = Duration::from_secs(120);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the run loop tells the health endpoints.
#[derive(Debug, Default)]
pub struct HealthState {
    ready: AtomicBool,
    /// Wall-clock ms when the running sync started; 0 when none runs.
    sync_started_ms: AtomicU64,
    /// Wall-clock ms when the last sync finished.
    last_sync_ms: AtomicU64,
    /// Per-Service health: (namespace, name) -> local endpoint count.
    services: Mutex<BTreeMap<(String, String), usize>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct HealthBody {
    healthy: bool,
    ready: bool,
    /// Unix time of the last finished sync, in milliseconds; 0 before the first.
    last_sync_ms: u64,
    current_time_ms: u64,
}

impl HealthState {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn sync_started(&self) {
        self.sync_started_ms
            .store(now_ms().max(1), Ordering::Relaxed);
    }

    pub fn sync_finished(&self) {
        self.sync_started_ms.store(0, Ordering::Relaxed);
        self.last_sync_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Healthy unless a sync is stuck.
    pub fn is_healthy(&self) -> bool {
        let started = self.sync_started_ms.load(Ordering::Relaxed);
        started == 0 || now_ms().saturating_sub(started) < STUCK_SYNC.as_millis() as u64
    }

    fn body(&self) -> String {
        let body = HealthBody {
            healthy: self.is_healthy(),
            ready: self.is_ready(),
            last_sync_ms: self.last_sync_ms.load(Ordering::Relaxed),
            current_time_ms: now_ms(),
        };
        format!("{}\n", serde_json::to_string(&body).unwrap_or_default())
    }

    /// The `/healthz` and `/readyz` handler.
    pub fn handle(&self, path: &str) -> Response {
        let ok = match path {
            "/healthz" | "/livez" => self.is_healthy(),
            "/readyz" => self.is_ready() && self.is_healthy(),
            _ => return Response::text(404, "not found\n"),
        };
        Response {
            status: if ok { 200 } else { 503 },
            content_type: "application/json",
            headers: vec![("X-Content-Type-Options", "nosniff".into())],
            body: self.body(),
        }
    }

    /// A `healthCheckNodePort` answer for Service `namespace/name`, exactly kube-proxy's fields.
    pub fn service_response(&self, namespace: &str, name: &str) -> Response {
        let count = self
            .services
            .lock()
            .map(|s| {
                s.get(&(namespace.to_owned(), name.to_owned()))
                    .copied()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        let healthy = self.is_healthy();
        let body = serde_json::json!({
            "service": {"namespace": namespace, "name": name},
            "localEndpoints": count,
            "serviceProxyHealthy": healthy,
        });
        Response {
            status: if count > 0 && healthy { 200 } else { 503 },
            content_type: "application/json",
            headers: vec![
                ("X-Content-Type-Options", "nosniff".into()),
                // Lets weighted load balancers spread by local endpoint count (kube-proxy sets it too).
                ("X-Load-Balancing-Endpoint-Weight", count.to_string()),
            ],
            body: format!("{body}\n"),
        }
    }
}

/// The running `healthCheckNodePort` servers, by port.
pub struct ServiceHealthServers {
    state: Arc<HealthState>,
    addresses: Vec<IpAddr>,
    runtime: tokio::runtime::Handle,
    running: BTreeMap<u16, Running>,
}

struct Running {
    /// The Service this server answers for; a port handed to another Service keeps its server and changes this.
    service: Arc<Mutex<(String, String)>>,
    stop: watch::Sender<bool>,
}

impl ServiceHealthServers {
    pub fn new(
        state: Arc<HealthState>,
        addresses: Vec<IpAddr>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            state,
            addresses,
            runtime,
            running: BTreeMap::new(),
        }
    }

    /// kube-proxy's `SyncServices` + `SyncEndpoints`: counts are updated, servers of Services gone (or moved to
    /// another port) are closed, new ones opened. A port that cannot be bound is logged and retried at the next
    /// sync, and the other Services keep their servers.
    pub fn sync(&mut self, health: &[ServiceHealth]) {
        let counts: BTreeMap<(String, String), usize> = health
            .iter()
            .map(|h| ((h.namespace.clone(), h.name.clone()), h.local_endpoints))
            .collect();
        if let Ok(mut s) = self.state.services.lock() {
            *s = counts;
        }
        let wanted: BTreeMap<u16, (String, String)> = health
            .iter()
            .map(|h| {
                (
                    h.health_check_node_port,
                    (h.namespace.clone(), h.name.clone()),
                )
            })
            .collect();
        // A port no Service wants any more is closed. A port that moves from one Service to another keeps its
        // server, which answers for the new Service from now on: closing is asynchronous (the server's task drops
        // its listeners later), so reopening the port within this sync could fail with EADDRINUSE.
        let stale: Vec<u16> = self
            .running
            .keys()
            .filter(|port| !wanted.contains_key(port))
            .copied()
            .collect();
        for port in stale {
            if let Some(r) = self.running.remove(&port) {
                let service = r.service.lock().map(|s| s.clone()).unwrap_or_default();
                tracing::info!(port, service = %format!("{}/{}", service.0, service.1), "closing health check server");
                let _ = r.stop.send(true);
            }
        }
        for (port, service) in wanted {
            if let Some(r) = self.running.get(&port) {
                if let Ok(mut current) = r.service.lock()
                    && *current != service
                {
                    tracing::info!(port, from = %format!("{}/{}", current.0, current.1), to = %format!("{}/{}", service.0, service.1), "health check server handed to another Service");
                    *current = service;
                }
                continue;
            }
            // No addresses: another proxy on this node serves the health check ports (`--coexist-with-kube-proxy`).
            if self.addresses.is_empty() {
                continue;
            }
            let shared = Arc::new(Mutex::new(service.clone()));
            match self.open(port, shared.clone()) {
                Ok(stop) => {
                    tracing::info!(port, service = %format!("{}/{}", service.0, service.1), "health check server listening");
                    self.running.insert(
                        port,
                        Running {
                            service: shared,
                            stop,
                        },
                    );
                }
                Err(e) => tracing::error!(
                    event = "Warning",
                    reason = "FailedToStartServiceHealthcheck",
                    port,
                    service = %format!("{}/{}", service.0, service.1),
                    error = %e,
                    "cannot open the health check port; retrying at the next sync"
                ),
            }
        }
    }

    /// Binds every address first, so a port is either served on all of them or on none.
    fn open(
        &self,
        port: u16,
        service: Arc<Mutex<(String, String)>>,
    ) -> std::io::Result<watch::Sender<bool>> {
        let mut listeners = Vec::new();
        for addr in &self.addresses {
            let std_listener = std::net::TcpListener::bind(SocketAddr::new(*addr, port))?;
            std_listener.set_nonblocking(true)?;
            listeners.push(std_listener);
        }
        let (stop, stop_rx) = watch::channel(false);
        let state = self.state.clone();
        let handler: Handler = Arc::new(move |_path| {
            let (namespace, name) = service.lock().map(|s| s.clone()).unwrap_or_default();
            state.service_response(&namespace, &name)
        });
        for l in listeners {
            let handler = handler.clone();
            let stop_rx = stop_rx.clone();
            let _guard = self.runtime.enter();
            let listener = TcpListener::from_std(l)?;
            self.runtime.spawn(http::serve(listener, handler, stop_rx));
        }
        Ok(stop)
    }

    pub fn ports(&self) -> Vec<u16> {
        self.running.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GET of `/healthz` on 127.0.0.1:`port`: the response, or `None` when nothing answers.
    fn get(port: u16) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    #[test]
    fn a_port_handed_from_one_service_to_another_in_one_sync_answers_for_the_new_one() {
        // The API server releases a health-check nodePort (externalTrafficPolicy Local to Cluster) and may give it to
        // another Service at once; one sync then sees the port leave one Service and join another. Closing the old
        // server is asynchronous (its task drops the listener later), so reopening the port in the same sync used to
        // fail with EADDRINUSE and leave the new Service unserved until some later sync.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let state = Arc::new(HealthState::default());
        let mut servers = ServiceHealthServers::new(
            state,
            vec!["127.0.0.1".parse().expect("address")],
            runtime.handle().clone(),
        );
        let health = |name: &str| ServiceHealth {
            namespace: "ns".into(),
            name: name.into(),
            health_check_node_port: port,
            local_endpoints: 1,
        };
        servers.sync(&[health("first")]);
        let r = get(port).expect("the first Service's health check answers");
        assert!(r.contains("\"name\":\"first\""), "{r}");
        // Keep the runtime's only worker busy across the handover, as a loaded node does: the old server's task
        // cannot run (and close its listener) before the sync is over.
        let (busy_tx, busy_rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let _ = busy_tx.send(());
            std::thread::sleep(Duration::from_millis(300));
        });
        busy_rx.recv().expect("the worker is busy");
        servers.sync(&[health("second")]);
        assert_eq!(servers.ports(), [port]);
        let r = get(port).expect("the port answers after the handover");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("\"name\":\"second\""), "{r}");
    }

    #[test]
    fn readyz_waits_for_the_first_sync() {
        let s = HealthState::default();
        assert_eq!(s.handle("/healthz").status, 200);
        assert_eq!(s.handle("/readyz").status, 503);
        s.sync_started();
        s.sync_finished();
        s.set_ready();
        assert_eq!(s.handle("/readyz").status, 200);
        assert_eq!(s.handle("/nope").status, 404);
    }

    #[test]
    fn a_stuck_sync_is_unhealthy() {
        let s = HealthState::default();
        s.sync_started_ms.store(
            now_ms() - STUCK_SYNC.as_millis() as u64 - 1000,
            Ordering::Relaxed,
        );
        assert_eq!(s.handle("/healthz").status, 503);
    }

    #[test]
    fn service_health_answers_like_kube_proxy() {
        let s = HealthState::default();
        s.services
            .lock()
            .expect("lock")
            .insert(("ns".into(), "web".into()), 2);
        let r = s.service_response("ns", "web");
        assert_eq!(r.status, 200);
        let body: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"service": {"namespace": "ns", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        let r = s.service_response("ns", "other");
        assert_eq!(r.status, 503);
        assert!(r.body.contains("\"localEndpoints\":0"), "{}", r.body);
    }
}
