//! Connection rate, latency and throughput to a ClusterIP through lb and through kube-proxy's rules.
//!
//! Topology (all namespaces created here, joined by veth pairs, no route anywhere else):
//!
//! ```text
//!  client ns  10.200.0.2 ── 10.200.0.1  node ns  10.244.0.1 ── 10.244.0.2..11  backend ns
//!  (test cgroup: lb's         (router; kube-proxy's rules          (one server on :8080 TCP+UDP,
//!   socket programs)           load here, in its nat hooks)         ten endpoint addresses)
//! ```
//!
//! The client routes only the service CIDR and the backend subnet to the node. Modes: `lb-socket` (the agent,
//! running in the root namespace with `--devices none`, attaches its socket programs to the client's cgroup: the
//! VIP is replaced at connect(), the node only forwards), `iptables` / `nftables` (the node DNATs in PREROUTING,
//! masquerading off-cluster clients as kube-proxy does), `direct` (the client connects to the backend addresses
//! itself: the limit of this path).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::control::{self, RulesKind};
use super::load::{BulkResult, CrrResult, UdpResult};
use super::workload::{self, Proto, Svc};
use crate::{BpfDir, Cgroup, Child, Cmd, NetNs, Veth, unique_token};

const BACKENDS: usize = 10;
const UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 0, 53);
const UDP_PORT: u16 = 53;

#[derive(Debug, Serialize)]
pub struct CrrRow {
    pub services: usize,
    pub mode: String,
    pub result: Option<CrrResult>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ThroughputRow {
    pub services: usize,
    pub mode: String,
    pub udp: Option<UdpResult>,
    pub tcp: Option<BulkResult>,
    pub error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct TrafficResults {
    pub crr: Vec<CrrRow>,
    pub throughput: Vec<ThroughputRow>,
    pub error: Option<String>,
    /// What loaded kube-proxy's iptables rules for (c) (see `control::traffic_iptables_restore`).
    pub iptables_program: String,
    /// `lb_connect4`'s run time per call (lb-socket, the first service count; `sockcost`).
    pub connect4: Option<super::sockcost::Connect4Cost>,
    pub connect4_error: Option<String>,
}

/// Interleaved rounds of the connect4 cost measurement, and each leg's length.
const CONNECT4_ROUNDS: usize = 10;
const CONNECT4_LEG: Duration = Duration::from_millis(300);

pub struct TrafficConfig {
    pub counts: Vec<usize>,
    pub crr_duration: Duration,
    pub throughput_duration: Duration,
    pub agent_bin: PathBuf,
}

/// The namespaces, links and processes of one traffic run; fields drop in order (processes, links, namespaces).
struct Net {
    children: Vec<Child>,
    veths: Vec<Veth>,
    backend: NetNs,
    node: NetNs,
    client: NetNs,
    cgroup: Cgroup,
}

impl Net {
    fn build(exe: &Path) -> Result<Net> {
        let t = unique_token();
        let cgroup = Cgroup::new(&format!("lbb-{t}"))?;
        let client = NetNs::new(&format!("lbb-{t}-c"))?;
        let node = NetNs::new(&format!("lbb-{t}-n"))?;
        let backend = NetNs::new(&format!("lbb-{t}-b"))?;
        let mut net = Net {
            children: Vec::new(),
            veths: Vec::new(),
            backend,
            node,
            client,
            cgroup,
        };
        let cn = Veth::with_index(
            &net.client,
            &format!("c-{t}"),
            100,
            &net.node,
            &format!("nc-{t}"),
        )?;
        cn.a().add_addr("10.200.0.2/24")?;
        cn.b().add_addr("10.200.0.1/24")?;
        cn.up()?;
        let nb = Veth::with_index(
            &net.node,
            &format!("nb-{t}"),
            101,
            &net.backend,
            &format!("b-{t}"),
        )?;
        nb.a().add_addr("10.244.0.1/24")?;
        for i in 0..BACKENDS {
            nb.b().add_addr(&format!("{}/24", backend_addr(i)))?;
        }
        nb.up()?;
        net.veths.push(cn);
        net.veths.push(nb);
        for net_ in ["10.96.0.0/12", "10.244.0.0/24"] {
            net.client
                .ip(&["route", "add", net_, "via", "10.200.0.1"])?;
        }
        net.backend
            .ip(&["route", "add", "10.200.0.0/24", "via", "10.244.0.1"])?;
        net.node.sysctl("net.ipv4.ip_forward", "1")?;
        net.client
            .sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        net.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        let server = Cmd::new(exe)
            .args(["serve", "--port", &workload::TARGET_PORT.to_string()])
            .args(
                (0..BACKENDS).flat_map(|i| ["--udp-addr".to_owned(), backend_addr(i).to_string()]),
            )
            .netns(&net.backend)
            .label("lb-bench-serve")
            .spawn()?;
        net.children.push(server);
        let last = net.children.len() - 1;
        net.children[last].wait_for_line(Duration::from_secs(10), |l| l.contains("ready"))?;
        Ok(net)
    }

    /// Runs `lb-bench <args>` in the client namespace and cgroup and parses its JSON answer.
    fn client<T: serde::de::DeserializeOwned>(
        &self,
        exe: &Path,
        args: &[String],
        timeout: Duration,
    ) -> Result<T> {
        let out = Cmd::new(exe)
            .args(args)
            .netns(&self.client)
            .cgroup(&self.cgroup)
            .label("lb-bench-client")
            .run(timeout)?;
        serde_json::from_str(out.stdout.trim()).with_context(|| format!("parsing {:?}", out.stdout))
    }
}

fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 2 + i as u8)
}

/// The service set of a run: `n` services at unreachable pod addresses, except the middle one (the measured
/// ClusterIP: average depth in iptables' linear KUBE-SERVICES list), whose endpoints are the ten backend addresses,
/// plus one UDP service on the same backends.
fn service_set(n: usize) -> (Vec<Svc>, SocketAddr) {
    let mut svcs = workload::services(n, BACKENDS, false);
    let mid = n / 2;
    svcs[mid].endpoints = (0..BACKENDS).map(backend_addr).collect();
    let target = SocketAddr::new(IpAddr::V4(svcs[mid].vip), svcs[mid].port);
    svcs.push(Svc {
        name: "udp-0".into(),
        vip: UDP_VIP,
        port: UDP_PORT,
        proto: Proto::Udp,
        node_port: None,
        endpoints: (0..BACKENDS).map(backend_addr).collect(),
    });
    (svcs, target)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    LbSocket,
    LbTc,
    Iptables,
    Nftables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::LbSocket => "lb-socket",
            Mode::LbTc => "lb-tc",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

pub fn run(cfg: &TrafficConfig) -> TrafficResults {
    let mut out = TrafficResults {
        iptables_program: control::traffic_iptables_restore().to_owned(),
        ..TrafficResults::default()
    };
    if let Err(e) = run_inner(cfg, &mut out) {
        out.error = Some(format!("{e:#}"));
    }
    out
}

fn run_inner(cfg: &TrafficConfig, out: &mut TrafficResults) -> Result<()> {
    let exe = std::env::current_exe().context("locating lb-bench")?;
    let net = Net::build(&exe)?;
    let first = cfg.counts.first().copied().unwrap_or(10);
    for &n in &cfg.counts {
        let (svcs, target) = service_set(n);
        for mode in [
            Mode::Direct,
            Mode::LbSocket,
            Mode::LbTc,
            Mode::Iptables,
            Mode::Nftables,
        ] {
            eprintln!("lb-bench: traffic, {} with {n} services", mode.name());
            let with_throughput = n == first;
            let result = with_mode(&net, cfg, mode, &svcs, |pins| {
                if mode == Mode::LbSocket
                    && n == first
                    && let Some(pins) = pins
                {
                    let backend =
                        SocketAddr::new(IpAddr::V4(backend_addr(0)), workload::TARGET_PORT);
                    let cost = super::sockcost::measure(
                        &pins.join("links").join(lb_common::prog_names::CONNECT4),
                        CONNECT4_ROUNDS,
                        |to_vip| {
                            let to = if to_vip { target } else { backend };
                            crr(&net, &exe, &[to], CONNECT4_LEG).map(drop)
                        },
                    );
                    match cost {
                        Ok(c) => out.connect4 = Some(c),
                        Err(e) => out.connect4_error = Some(format!("{e:#}")),
                    }
                }
                let targets: Vec<SocketAddr> = match mode {
                    Mode::Direct => (0..BACKENDS)
                        .map(|i| {
                            SocketAddr::new(IpAddr::V4(backend_addr(i)), workload::TARGET_PORT)
                        })
                        .collect(),
                    _ => vec![target],
                };
                let crr = crr(&net, &exe, &targets, cfg.crr_duration);
                let tput = with_throughput.then(|| {
                    let (udp_to, tcp_to) = match mode {
                        Mode::Direct => (
                            SocketAddr::new(IpAddr::V4(backend_addr(0)), workload::TARGET_PORT),
                            SocketAddr::new(IpAddr::V4(backend_addr(0)), workload::TARGET_PORT),
                        ),
                        _ => (SocketAddr::new(IpAddr::V4(UDP_VIP), UDP_PORT), target),
                    };
                    throughput(&net, &exe, udp_to, tcp_to, cfg.throughput_duration)
                });
                Ok((crr, tput))
            });
            match result {
                Ok((crr, tput)) => {
                    let (result, error) = split(crr);
                    out.crr.push(CrrRow {
                        services: n,
                        mode: mode.name().into(),
                        result,
                        error,
                    });
                    if let Some((udp, tcp)) = tput {
                        let error = match (&udp, &tcp) {
                            (Err(e), _) | (_, Err(e)) => Some(format!("{e:#}")),
                            _ => None,
                        };
                        out.throughput.push(ThroughputRow {
                            services: n,
                            mode: mode.name().into(),
                            udp: udp.ok(),
                            tcp: tcp.ok(),
                            error,
                        });
                    }
                }
                Err(e) => out.crr.push(CrrRow {
                    services: n,
                    mode: mode.name().into(),
                    result: None,
                    error: Some(format!("{e:#}")),
                }),
            }
        }
    }
    Ok(())
}

fn split<T>(r: Result<T>) -> (Option<T>, Option<String>) {
    match r {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    }
}

/// Sets the datapath of `mode` up, runs `f`, and takes it down again (even when `f` fails).
fn with_mode<T>(
    net: &Net,
    cfg: &TrafficConfig,
    mode: Mode,
    svcs: &[Svc],
    f: impl FnOnce(Option<&Path>) -> Result<T>,
) -> Result<T> {
    match mode {
        Mode::Direct => f(None),
        Mode::LbSocket | Mode::LbTc => {
            let token = unique_token();
            let pins = BpfDir::new(&format!("lb-bench-traffic-{token}"))?;
            let dir = std::env::temp_dir().join(format!("lb-bench-traffic-{token}"));
            std::fs::create_dir_all(&dir)?;
            let manifest = dir.join("services.yaml");
            std::fs::write(&manifest, workload::manifest(svcs))?;
            // (a): the agent in the root namespace, socket programs on the client's cgroup, nothing on any interface.
            // (b): the agent inside the node namespace, tc programs on the node's client-facing interface, socket
            // programs on an empty cgroup of their own (socket LB off for the client).
            let empty = Cgroup::new(&format!("lbb-{token}-e"))?;
            let agent = if mode == Mode::LbSocket {
                start_agent(&cfg.agent_bin, &manifest, &net.cgroup, &pins, None)
            } else {
                start_agent(&cfg.agent_bin, &manifest, &empty, &pins, Some(net))
            };
            let r = agent.and_then(|mut a| {
                let r = f(Some(pins.path()));
                let _ = a.terminate(Duration::from_secs(5));
                r
            });
            let _ = std::fs::remove_dir_all(&dir);
            // The pins (and so the links attaching the socket programs to the client cgroup) go with `pins`.
            drop(pins);
            drop(empty);
            r
        }
        Mode::Iptables | Mode::Nftables => {
            let kind = if mode == Mode::Iptables {
                RulesKind::Iptables
            } else {
                RulesKind::Nft
            };
            control::load_rules(&net.node, kind, svcs)?;
            let r = f(None);
            // Conntrack entries left behind are harmless: a SYN on a closed tuple starts a new entry and NAT
            // binding under whatever rules are loaded then.
            control::flush_rules(&net.node, kind)?;
            r
        }
    }
}

/// Starts the agent and waits for its first sync. `node`: run it inside the node namespace with the tc programs on
/// the node's client-facing interface; otherwise in the root namespace with `--devices none`.
fn start_agent(
    bin: &Path,
    manifest: &Path,
    cgroup: &Cgroup,
    pins: &BpfDir,
    node: Option<&Net>,
) -> Result<Child> {
    let devices = match node {
        Some(net) => net.veths[0].b().name().to_owned(),
        // The agent runs in the root namespace: never attach the per-packet programs to the host's interfaces.
        None => "none".to_owned(),
    };
    let mut cmd = Cmd::new(bin)
        .arg("run")
        .arg("--manifests")
        .arg(manifest)
        .args(["--node-name", workload::NODE_NAME])
        .arg("--cgroup")
        .arg(cgroup.path())
        .arg("--bpffs")
        .arg(pins.path())
        .args(["--devices", &devices])
        .args([
            "--health-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--health-check-node-port-addresses", "127.0.0.1"])
        .args(["--max-backends", &control::MAX_BACKENDS.to_string()])
        .env("LB_LOG", "info")
        .label("lb-agent");
    if let Some(net) = node {
        cmd = cmd.netns(&net.node).args(["--node-address", "10.200.0.1"]);
    }
    let mut child = cmd.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !child.stderr().contains("initial sync done") {
        if let Some(status) = child.try_wait()? {
            bail!("lb-agent exited ({status}): {}", child.stderr());
        }
        if Instant::now() > deadline {
            bail!("lb-agent did not program its maps within 600 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

fn crr(net: &Net, exe: &Path, targets: &[SocketAddr], d: Duration) -> Result<CrrResult> {
    let mut args = vec![
        "crr".to_owned(),
        "--duration-ms".into(),
        d.as_millis().to_string(),
    ];
    for t in targets {
        args.push("--to".into());
        args.push(t.to_string());
    }
    let r: CrrResult = net.client(exe, &args, d + Duration::from_secs(60))?;
    if r.connections == 0 {
        bail!(
            "no connection completed: {}",
            r.first_error.as_deref().unwrap_or("?")
        );
    }
    Ok(r)
}

fn throughput(
    net: &Net,
    exe: &Path,
    udp_to: SocketAddr,
    tcp_to: SocketAddr,
    d: Duration,
) -> (Result<UdpResult>, Result<BulkResult>) {
    let ms = d.as_millis().to_string();
    let udp = net.client(
        exe,
        &[
            "udp".into(),
            "--to".into(),
            udp_to.to_string(),
            "--duration-ms".into(),
            ms.clone(),
        ],
        d + Duration::from_secs(60),
    );
    let tcp = net.client(
        exe,
        &[
            "bulk".into(),
            "--to".into(),
            tcp_to.to_string(),
            "--duration-ms".into(),
            ms,
        ],
        d + Duration::from_secs(60),
    );
    (udp, tcp)
}
