//! `lb-demo` (run by `cargo xtask demo`): a real topology on this host — three HTTP/UDP backends and a client in
//! network namespaces, the client inside a cgroup v2 with lb's socket programs attached — served by the real agent
//! from `examples/demo.yaml`. It shows the spread of 300 HTTP requests to the ClusterIP, what the maps hold, and
//! Maglev keeping flows in place when a backend is removed by editing the manifest. Everything is torn down at the
//! end, also on failure. No packet leaves the namespaces the demo creates.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use lb_agent::datapath::maps::{MapsRead, PinnedMaps};
use lb_tests::agent::backends_of;
use lb_tests::{Agent, Cmd, Probe, ProbeLine, Topology};

#[derive(Parser)]
#[command(about = "lb's demo on a namespace topology (run through `cargo xtask demo`)")]
struct Args {
    /// The lb-agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// The lb-probe binary (echo servers and clients).
    #[arg(long)]
    probe: PathBuf,
    /// The demo manifest (examples/demo.yaml).
    #[arg(long)]
    manifest: PathBuf,
    /// Requests to send in the distribution step.
    #[arg(long, default_value_t = 300)]
    requests: usize,
}

const VIP_HTTP: &str = "10.96.0.10:80";
const VIP_UDP: &str = "10.96.0.10:53";
const REMOVED: &str = "10.244.3.2";

fn main() -> Result<()> {
    let args = Args::parse();
    if !lb_tests::require_root("lb-demo") {
        bail!("the demo needs root");
    }
    let probe = Probe::new(&args.probe);
    let manifest = std::fs::read_to_string(&args.manifest)
        .with_context(|| format!("reading {}", args.manifest.display()))?;

    step(
        "Building the topology: client namespace (in a cgroup) + 3 backend namespaces, veth pairs only",
    );
    let mut topo = Topology::star(3)?;
    topo.serve(&probe, &[8080], &[5353])?;
    for b in topo.backends() {
        println!("  {:<10} {:<12} netns {}", b.id(), b.ipv4(), b.ns().name());
    }
    println!(
        "  client     netns {}  cgroup {}",
        topo.client().name(),
        topo.cgroup().path().display()
    );

    step("Starting lb-agent on the manifest");
    let agent = Agent::start(&args.agent, &topo, &manifest)?;
    agent.wait_for_maps(Duration::from_secs(20), |l| {
        backends_of(l, VIP_HTTP, "TCP", "internal").is_some_and(|b| b.len() == 3)
    })?;
    println!(
        "  lb-agent pid {} pins {}",
        agent.pid().unwrap_or(0),
        topo.bpf_dir().path().display()
    );

    step(&format!(
        "Sending {} HTTP requests from the client to http://{VIP_HTTP}/",
        args.requests
    ));
    let lines = client(
        &topo,
        &probe,
        &[
            "tcp",
            "--http",
            "--to",
            VIP_HTTP,
            "--count",
            &args.requests.to_string(),
        ],
    )?;
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for l in &lines {
        let backend = l
            .backend
            .clone()
            .with_context(|| format!("a request failed: {l:?}"))?;
        *per_backend.entry(backend).or_default() += 1;
    }
    for (backend, n) in &per_backend {
        println!("  {backend:<10} {n:>4}  {}", "#".repeat(n / 4));
    }
    let peer = lines
        .first()
        .and_then(|l| l.peer.clone())
        .unwrap_or_default();
    println!("  the client's getpeername() says {peer}: the application only ever sees the VIP");

    step("lb-agent services (read from the pinned maps)");
    let out = Cmd::new(&args.agent)
        .args(["services", "--bpffs"])
        .arg(topo.bpf_dir().path())
        .run(Duration::from_secs(10))?;
    print!("{}", out.stdout);

    step(
        "Maglev: 60 UDP flows (one socket each), then backend-2 (10.244.3.2) removed from the manifest",
    );
    let table_before = udp_table(&topo)?;
    let pause = std::env::temp_dir().join(format!("lb-demo-pause-{}", topo.token()));
    let sticky = probe.udp_sticky_cmd(VIP_UDP.parse::<SocketAddr>()?, 60, 2, &pause);
    let flows = topo.spawn(topo.in_client(sticky))?;
    wait_rounds(flows, 1)?;
    agent.write_manifest(&without_backend(&manifest, REMOVED))?;
    agent.wait_for_maps(Duration::from_secs(20), |l| {
        backends_of(l, VIP_UDP, "UDP", "internal").is_some_and(|b| b.len() == 2)
    })?;
    println!("  manifest edited; the agent reprogrammed the maps without a restart");
    std::fs::write(&pause, b"")?;
    wait_rounds(flows, 2)?;
    let lines = flows.probe_lines()?;
    let round = |r: usize| -> BTreeMap<usize, String> {
        lines
            .iter()
            .filter(|l| l.round == Some(r) && !l.is_round_done())
            .filter_map(|l| Some((l.socket?, l.backend.clone()?)))
            .collect()
    };
    let (before, after) = (round(1), round(2));
    let (mut stayed, mut survivors, mut moved_from_removed) = (0, 0, 0);
    for (socket, b) in &before {
        let a = after.get(socket).map(String::as_str).unwrap_or("?");
        if b == "backend-2" {
            moved_from_removed += usize::from(a != "backend-2");
        } else {
            survivors += 1;
            stayed += usize::from(a == b);
        }
    }
    println!("  flows on surviving backends that kept their backend: {stayed} of {survivors}");
    println!("  flows of the removed backend moved to the others:    {moved_from_removed}");
    let table_after = udp_table(&topo)?;
    if let (Some(b), Some(a)) = (table_before, table_after) {
        let same = b.iter().zip(&a).filter(|(x, y)| x == y).count();
        println!(
            "  Maglev table ({} slots): {} slots unchanged, {} moved (the removed backend owned ~1/3)",
            a.len(),
            same,
            a.len() - same
        );
    }

    step("Tearing down");
    let (pins, cgroup, namespaces) = (
        topo.bpf_dir().path().to_path_buf(),
        topo.cgroup().path().to_path_buf(),
        topo.netns_names(),
    );
    drop(agent);
    drop(topo);
    let left: Vec<String> = namespaces
        .into_iter()
        .filter(|n| lb_tests::NetNs::exists(n))
        .collect();
    if pins.exists() || cgroup.exists() || !left.is_empty() {
        bail!(
            "teardown left something behind: pins {pins:?}, cgroup {cgroup:?}, namespaces {left:?}"
        );
    }
    println!("  namespaces, cgroup, program links and pins removed");
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn client(topo: &Topology, probe: &Probe, args: &[&str]) -> Result<Vec<ProbeLine>> {
    topo.in_client(probe.cmd().args(args))
        .run(Duration::from_secs(60))?
        .probe_lines()
}

fn wait_rounds(child: &mut lb_tests::Child, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child
        .probe_lines()?
        .iter()
        .filter(|l| l.is_round_done())
        .count()
        < n
    {
        if Instant::now() > deadline {
            bail!("UDP flows did not finish round {n}: {}", child.stderr());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The lookup table of the UDP ClusterIP (internal scope), by backend address, to compare before and after.
fn udp_table(topo: &Topology) -> Result<Option<Vec<String>>> {
    let maps = PinnedMaps::open(topo.bpf_dir().path())?;
    let backends: BTreeMap<u32, String> = maps
        .backends()?
        .into_iter()
        .map(|(id, b)| (id, b.ip().to_string()))
        .collect();
    let key = lb_common::ServiceKey::new(
        "10.96.0.10".parse()?,
        53,
        lb_common::PROTO_UDP,
        lb_common::SCOPE_INTERNAL,
    );
    let Some((_, svc)) = maps.services()?.into_iter().find(|(k, _)| *k == key) else {
        return Ok(None);
    };
    Ok(maps.table(&svc)?.map(|t| {
        t.into_iter()
            .map(|id| backends.get(&id).cloned().unwrap_or_default())
            .collect()
    }))
}

/// The manifest without the endpoint at `addr` (the demo's "scale down" edit).
fn without_backend(manifest: &str, addr: &str) -> String {
    let mut out = Vec::new();
    let mut skip = 0;
    for line in manifest.lines() {
        if skip > 0 {
            skip -= 1;
            continue;
        }
        if line.trim_start().starts_with("- addresses:") && line.contains(addr) {
            // An endpoint entry is three lines: addresses, conditions, nodeName.
            skip = 2;
            continue;
        }
        out.push(line);
    }
    format!("{}\n", out.join("\n"))
}
