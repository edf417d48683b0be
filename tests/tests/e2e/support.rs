//! What the cases share: where a probe runs (a pod, a node's host network, the outside client), probes with the
//! answers upstream's helpers look at (which backend, which error), and polling for a state the data plane reaches
//! within the proxy's lag (upstream's `KubeProxyLagTimeout`, here far shorter: the agents program in milliseconds).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_tests::cluster::{Cluster, Pod, PodSpec, service};
use lb_tests::{Cmd, ProbeLine};
use serde_json::Value;

/// How long the data plane may take to follow a change (agents program within milliseconds; the rest is a loaded
/// machine's slack).
pub const LAG: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(150);
/// A probe process's own limit.
const RUN: Duration = Duration::from_secs(60);

/// One case's view of the cluster: its namespace, and everything it creates there is removed after it.
pub struct Ctx<'a> {
    pub c: &'a Cluster,
    pub ns: String,
}

/// Where a probe runs.
#[derive(Clone, Debug)]
pub enum From<'a> {
    /// Inside a pod (its namespace and its node's cgroup: the socket LB applies).
    Pod(&'a Pod),
    /// A hostNetwork pod on node `i`: the node's namespace, in the node's cgroup.
    Host(usize),
    /// The client outside the cluster, on node-0's uplink.
    External,
}

/// `tcp` or `udp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

pub fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(
        ip.parse::<IpAddr>()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        port,
    )
}

impl Ctx<'_> {
    pub fn cmd(&self, from: &From<'_>, cmd: Cmd) -> Cmd {
        match from {
            From::Pod(p) => self.c.pod_cmd(p, cmd),
            From::Host(i) => self.c.host_cmd(*i, cmd),
            From::External => self.c.client_cmd(cmd),
        }
    }

    /// `count` probes of `proto` to `to` from `from` (each TCP probe a new connection, each UDP probe a new socket),
    /// with a per-probe timeout; a datagram from source port `sport` when it is not 0.
    pub fn probe(
        &self,
        from: &From<'_>,
        proto: Proto,
        to: SocketAddr,
        count: usize,
        timeout_ms: u64,
    ) -> Result<Vec<ProbeLine>> {
        self.probe_from_port(from, proto, to, count, timeout_ms, 0)
    }

    pub fn probe_from_port(
        &self,
        from: &From<'_>,
        proto: Proto,
        to: SocketAddr,
        count: usize,
        timeout_ms: u64,
        sport: u16,
    ) -> Result<Vec<ProbeLine>> {
        let probe = &self.c.probe;
        let cmd = match proto {
            Proto::Tcp => probe.tcp_cmd(to, count),
            // One datagram per socket, as `nc -u` sends one per run.
            Proto::Udp => probe
                .udp_cmd(to, 1, count, true)
                .args(["--sport", &sport.to_string()]),
        };
        let cmd = self.cmd(from, cmd.args(["--timeout-ms", &timeout_ms.to_string()]));
        cmd.run(RUN)?.probe_lines()
    }

    /// The backends that answered `count` probes, all of which must have been answered.
    pub fn hosts(
        &self,
        from: &From<'_>,
        proto: Proto,
        to: SocketAddr,
        count: usize,
    ) -> Result<BTreeMap<String, usize>> {
        let lines = self.probe(from, proto, to, count, 2000)?;
        let mut out = BTreeMap::new();
        for l in &lines {
            if !l.ok {
                bail!("{proto:?} {to} from {from:?}: a probe failed: {l:?}");
            }
            *out.entry(l.backend.clone().unwrap_or_default())
                .or_insert(0) += 1;
        }
        Ok(out)
    }

    /// Waits until probes of `to` from `from` all succeed and reach exactly the backends `want` (upstream's
    /// `verifyServeHostnameServiceUp` / `CheckServiceReachability`, stricter: nothing else may answer).
    pub fn expect_backends(
        &self,
        from: &From<'_>,
        proto: Proto,
        to: SocketAddr,
        want: &[&str],
    ) -> Result<()> {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let count = (want.len() * 12).max(4);
        let mut seen = BTreeSet::new();
        eventually(
            &format!("{proto:?} {to} from {from:?} reaches {want:?}"),
            LAG,
            || {
                let hosts = self.hosts(from, proto, to, count)?;
                let got: BTreeSet<String> = hosts.keys().cloned().collect();
                if !got.is_subset(&want) {
                    seen = got.clone();
                    bail!("reached {got:?}");
                }
                seen.extend(got);
                if seen != want {
                    bail!("reached only {seen:?} so far");
                }
                Ok(())
            },
        )
    }

    /// Waits until `to` stops answering from `from` (three probes in a row fail), and returns the errors of the
    /// last: `ECONNREFUSED` for a reject, `EPERM` for a socket-level drop, `ETIMEDOUT` for a packet drop.
    pub fn expect_unreachable(
        &self,
        from: &From<'_>,
        proto: Proto,
        to: SocketAddr,
    ) -> Result<Vec<String>> {
        eventually(
            &format!("{proto:?} {to} from {from:?} stops answering"),
            LAG,
            || {
                let lines = self.probe(from, proto, to, 3, 400)?;
                if let Some(l) = lines.iter().find(|l| l.ok) {
                    bail!("still answered by {:?}", l.backend);
                }
                Ok(lines.into_iter().filter_map(|l| l.error).collect())
            },
        )
    }

    /// Waits until `to` refuses from `from` (`ECONNREFUSED`: a TCP RST, an ICMP port unreachable, or the socket
    /// LB's refusal), upstream's "REFUSED".
    pub fn expect_refused(&self, from: &From<'_>, proto: Proto, to: SocketAddr) -> Result<()> {
        eventually(
            &format!("{proto:?} {to} from {from:?} is refused"),
            LAG,
            || {
                let lines = self.probe(from, proto, to, 2, 1000)?;
                if lines
                    .iter()
                    .all(|l| l.error.as_deref() == Some("ECONNREFUSED"))
                {
                    Ok(())
                } else {
                    bail!("got {lines:?}")
                }
            },
        )
    }

    /// Checks that `to` does not answer from `from` now, `times` times in a row (upstream's "connect N times, expect
    /// an error every time").
    pub fn assert_unreachable_now(
        &self,
        from: &From<'_>,
        proto: Proto,
        to: SocketAddr,
        times: usize,
    ) -> Result<()> {
        let lines = self.probe(from, proto, to, times, 400)?;
        if let Some(l) = lines.iter().find(|l| l.ok) {
            bail!(
                "{proto:?} {to} from {from:?} answered ({:?}) where it must not",
                l.backend
            );
        }
        Ok(())
    }

    /// GET `http://<to>/<path>` from `from` with curl: (status, body), or None when nothing answered.
    pub fn http(
        &self,
        from: &From<'_>,
        to: SocketAddr,
        path: &str,
    ) -> Result<Option<(u16, String)>> {
        let url = format!("http://{to}{path}");
        let cmd = Cmd::new("curl")
            .args(["-s", "--max-time", "2", "-w", "\n%{http_code}", &url])
            .label("curl");
        let out = self.cmd(from, cmd).output(RUN)?;
        if !out.status.success() {
            return Ok(None);
        }
        let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", &out.stdout));
        Ok(code.trim().parse().ok().map(|c| (c, body.to_owned())))
    }

    /// Creates pods `<name>-0..n` with label `app=<name>` serving TCP `port` (and UDP `port` too), on the nodes
    /// `nodes` round-robin.
    pub fn pods(&self, name: &str, n: usize, port: u16, nodes: &[usize]) -> Result<Vec<Pod>> {
        (0..n)
            .map(|i| {
                let spec = PodSpec::web(
                    &self.ns,
                    &format!("{name}-{i}"),
                    nodes[i % nodes.len()],
                    name,
                    &[port],
                )
                .with_port("", port, "UDP");
                self.c.create_pod(&spec)
            })
            .collect()
    }

    /// An exec pod on node `node` (upstream's `CreateExecPodOrFail`).
    pub fn exec_pod(&self, name: &str, node: usize) -> Result<Pod> {
        self.c.create_pod(&PodSpec::exec(&self.ns, name, node))
    }

    /// upstream's `StartServeHostnameService`: a Service (port 80 -> 9376, TCP) and `n` pods behind it.
    pub fn serve_hostname(
        &self,
        name: &str,
        n: usize,
        nodes: &[usize],
        customize: impl FnOnce(lb_tests::cluster::ServiceBuilder) -> lb_tests::cluster::ServiceBuilder,
    ) -> Result<(Value, Vec<Pod>)> {
        let svc = customize(service(&self.ns, name, name).port("", 80, 9376, "TCP")).build();
        let svc = self.c.create_service(svc)?;
        let pods = self.pods(name, n, 9376, nodes)?;
        Ok((svc, pods))
    }

    /// Pod names of `pods`, as `expect_backends` wants them.
    pub fn names(pods: &[Pod]) -> Vec<&str> {
        pods.iter().map(|p| p.name.as_str()).collect()
    }

    /// The (address, port) of every endpoint in the Service's slices, ready or not.
    pub fn endpoint_ports(&self, svc: &str) -> BTreeSet<(String, u16)> {
        let mut out = BTreeSet::new();
        for s in self.c.slices(&self.ns, svc) {
            let ports: Vec<u16> = s["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["port"].as_u64())
                .filter_map(|p| u16::try_from(p).ok())
                .collect();
            for e in s["endpoints"].as_array().into_iter().flatten() {
                for a in e["addresses"].as_array().into_iter().flatten() {
                    for p in &ports {
                        out.insert((a.as_str().unwrap_or_default().to_owned(), *p));
                    }
                }
            }
        }
        out
    }

    /// Removes what the case left: its Services (and so their slices), other slices, and its pods.
    pub fn cleanup(&self) {
        use lb_tests::apiserver::Resource;
        for r in [Resource::Services, Resource::EndpointSlices] {
            for o in self.c.api.list(r, Some(&self.ns)) {
                if let Some(name) = o.pointer("/metadata/name").and_then(Value::as_str) {
                    let _ = self.c.api.delete(r, &self.ns, name);
                }
            }
        }
        self.c.delete_namespace_pods(&self.ns);
    }
}

/// Polls `f` until it succeeds, at most `timeout`; the error names `what` and `f`'s last error.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("{what}: not within {timeout:?}"));
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// upstream's `checkAffinity`: whether the last `AffinityConfirmCount` (15) answers from one client all came from
/// one backend (`hold`) or not (`!hold`), retried until it does or the time is up.
pub fn check_affinity(ctx: &Ctx<'_>, from: &From<'_>, to: SocketAddr, hold: bool) -> Result<()> {
    eventually(
        &format!(
            "affinity {} for {to} from {from:?}",
            if hold { "holds" } else { "does not hold" }
        ),
        LAG,
        || {
            let lines = ctx.probe(from, Proto::Tcp, to, 15, 2000)?;
            let hosts: Vec<String> = lines
                .iter()
                .filter(|l| l.ok)
                .filter_map(|l| l.backend.clone())
                .collect();
            if hosts.len() < 15 {
                bail!("only {} of 15 answered: {lines:?}", hosts.len());
            }
            let distinct: BTreeSet<&String> = hosts.iter().collect();
            match (hold, distinct.len()) {
                (true, 1) | (false, 2..) => Ok(()),
                _ => bail!("answers: {hosts:?}"),
            }
        },
    )
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}
