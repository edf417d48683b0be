//! Per-packet cost of `lb_tc_ingress` and `lb_xdp` through BPF_PROG_TEST_RUN, next to `lb_noop` (an empty
//! classifier, the floor), with 10 to 100k services of 10 backends programmed by the real model and reconciler into a privately
//! loaded object (nothing attached anywhere).
//!
//! Why one run per syscall: BPF_PROG_TEST_RUN with `repeat` runs the program again on the same skb, which the
//! first run has already DNATed, so the later runs would measure a packet to a backend address (no service, no
//! conntrack entry), not the packet asked for. Each packet is therefore run with `repeat = 1` (the kernel times
//! that one run), over many fresh copies: distinct source ports for new flows, the same established flow for the
//! conntrack hit. The floor is measured both ways (`repeat = 1` per syscall, like lb's rows, and one syscall with
//! `repeat = 1e6`).
//!
//! XDP rows: a new flow (a SYN, which `lb_xdp` passes to tc: the cost it adds in front of tc) and a packet of an
//! established flow to a remote backend (a NodePort with its endpoints on another node, DNAT + SNAT), which XDP
//! translates and returns as `XDP_TX`. That flow is established through the tc programs first, as on a node
//! (ingress, egress with `CONFIG_FLAG_XDP` so tc learns the L2 header, the reply, the client's ACK); the header is
//! learned again between chunks of runs, since XDP uses it for 10 s only.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use lb_agent::datapath::loader::{self, PinDir};
use lb_agent::datapath::pins::Capacities;
use lb_agent::datapath::reconcile::{ReconcileConfig, Reconciler};
use lb_agent::model::{self, ModelConfig};
use lb_agent::state::Protocol;
use lb_agent::trace::packet;
use lb_common::prog_names;
use serde::Serialize;

use super::monitor_cost::{self, MonitorCost};
use super::stats::{Summary, summarize};
use super::workload;
use crate::{BpfDir, unique_token};

/// The do-nothing classifier in lb-ebpf (see its doc comment).
const NOOP: &str = "lb_noop";
const NODE_PORT: u16 = 30080;

#[derive(Debug, Default, Serialize)]
pub struct PacketResults {
    /// Per-syscall runs behind each median.
    pub runs: usize,
    pub floor_ns: Option<Summary>,
    /// The floor as one syscall with repeat = 1e6 (the kernel's average).
    pub floor_repeat_ns: Option<f64>,
    pub rows: Vec<PacketRow>,
    /// `lb-agent monitor`'s cost, at the first service count (`monitor_cost`).
    pub monitor: Option<MonitorCost>,
    pub monitor_error: Option<String>,
    /// Why nothing (or not everything) could run.
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct PacketRow {
    pub services: usize,
    /// The reconciler's first sync of the N services into the private maps (what the row's setup costs).
    pub program_ms: Option<f64>,
    pub syn_ns: Option<Summary>,
    pub established_ns: Option<Summary>,
    /// `lb_xdp` on a new flow's SYN (passed on to tc: XDP's cost in front of it).
    pub xdp_new_flow_ns: Option<Summary>,
    /// `lb_xdp` on an established remote-backend flow (translated, XDP_TX).
    pub xdp_established_ns: Option<Summary>,
    /// Instructions the verifier processed per program (`verified_insns`; 1M is the limit), in program order:
    /// lb_tc_ingress, lb_tc_egress, lb_xdp. A regression here is a review point.
    pub verified_insns: Vec<(String, u32)>,
    pub error: Option<String>,
}

/// One round of one object in an interleaved comparison ([`compare`]).
#[derive(Debug, Serialize)]
pub struct VariantRound {
    pub object: String,
    pub round: usize,
    pub floor_ns: Option<Summary>,
    pub row: PacketRow,
}

pub fn run(counts: &[usize], runs: usize) -> PacketResults {
    let mut out = PacketResults {
        runs,
        ..PacketResults::default()
    };
    if let Err(e) = run_inner(counts, runs, &mut out) {
        out.error = Some(format!("{e:#}"));
    }
    out
}

fn run_inner(counts: &[usize], runs: usize, out: &mut PacketResults) -> Result<()> {
    let object = loader::object_bytes(None)?;
    for &n in counts {
        eprintln!("lb-bench: per-packet at {n} services");
        let row = match one_count(&object, n, runs, out, true) {
            Ok(row) => row,
            Err(e) => PacketRow {
                services: n,
                program_ms: None,
                syn_ns: None,
                established_ns: None,
                xdp_new_flow_ns: None,
                xdp_established_ns: None,
                verified_insns: Vec::new(),
                error: Some(format!("{e:#}")),
            },
        };
        let failed = row.error.clone();
        out.rows.push(row);
        // A program that does not load at one size does not load at the next either.
        if let Some(e) = failed
            && (e.contains("verifier") || e.contains("loading"))
        {
            out.error = Some(e);
            break;
        }
    }
    Ok(())
}

/// One service count's rows; with `monitor`, also `lb-agent monitor`'s cost the first time (`out.monitor`).
fn one_count(
    object: &[u8],
    n: usize,
    runs: usize,
    out: &mut PacketResults,
    monitor: bool,
) -> Result<PacketRow> {
    let dir = BpfDir::new(&format!("lb-bench-pkt-{}", unique_token()))?;
    let caps = Capacities {
        services: (2 * n as u32 + 1024)
            .next_power_of_two()
            .max(lb_common::DEFAULT_MAX_SERVICES),
        backends: (n as u32 * 10 + 1024)
            .next_power_of_two()
            .max(lb_common::DEFAULT_MAX_BACKENDS),
        conntrack: (runs as u32 * 4).clamp(65536, 4 << 20),
        ..Capacities::default()
    };
    let mut dp = loader::load(object, &PinDir::new(dir.path()), &caps)
        .context("loading lb's object privately")?;
    // The floor first: it loads whatever state lb's own programs are in.
    if out.floor_ns.is_none() {
        let prog: &mut SchedClassifier = dp
            .ebpf
            .program_mut(NOOP)
            .with_context(|| {
                format!("{NOOP} missing from the object (rebuild with cargo xtask build-ebpf)")
            })?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading {NOOP} (verifier)"))?;
        let frame = syn(0);
        out.floor_ns = Some(per_run(prog, runs, |_| frame.clone())?);
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                repeat: 1_000_000,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN on lb_noop")?;
        out.floor_repeat_ns = Some(r.duration.as_secs_f64() * 1e9);
    }
    lb_agent::datapath::tc_attach::load_tc_programs(&mut dp.ebpf)?;

    let mut svcs = workload::services(n, 10, false);
    // One NodePort among ClusterIPs: the lookup is one hash probe whatever the other entries are, and distinct
    // NodePorts run out at 2768.
    svcs[n / 2].node_port = Some(NODE_PORT);
    let text = format!("{}{XDP_SERVICE}", workload::manifest(&svcs));
    let (objects, diags) = lb_agent::source::manifest::parse_manifests("bench", &text);
    if !diags.is_empty() {
        anyhow::bail!("manifest diagnostics: {:?}", &diags[..diags.len().min(3)]);
    }
    let cfg = ModelConfig::default();
    let node = model::node_context(workload::NODE_NAME, &objects.nodes, &cfg);
    let translation = model::translate(&objects, &node, &cfg);
    let mut reconciler = Reconciler::restore(
        &dp.maps,
        ReconcileConfig {
            max_services: caps.services,
            max_backends: caps.backends,
            // The smallest tables: 100k services x 2 frontends at the default size would take 1.6 GB, and a
            // table lookup is one array index whatever its size.
            maglev_max_size: 251,
            ..ReconcileConfig::default()
        },
    )?;
    let t = std::time::Instant::now();
    let report = reconciler.sync(&mut dp.maps, &translation.state);
    let program_ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "lb-bench: per-packet, {n} services programmed in {:.1} s",
        program_ms / 1e3
    );
    if let Some((f, why)) = report.failed.first() {
        anyhow::bail!(
            "{} frontends not programmed, first {f}: {why}",
            report.failed.len()
        );
    }
    let prog: &mut SchedClassifier = dp
        .ebpf
        .program_mut(prog_names::TC_INGRESS)
        .context("lb_tc_ingress missing")?
        .try_into()?;
    // Only a packet the program really forwards is worth timing: check the SYN comes out DNATed to a backend.
    let mut probe = vec![0u8; 512];
    let first = syn(usize::MAX / 2);
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(&first),
            data_out: Some(&mut probe),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN on lb_tc_ingress")?;
    // Ethernet (14) + the IPv4 destination at offset 16.
    let dst = probe.get(30..34).map(|b| [b[0], b[1], b[2], b[3]]);
    if dst.is_none_or(|d| d[0] != 10 || d[1] < 128) {
        anyhow::bail!(
            "lb_tc_ingress did not DNAT the NodePort SYN to a backend (return {}, destination {:?}); not timed",
            res.return_value as i32,
            dst
        );
    }
    let syn_ns = per_run(prog, runs, syn)?;
    // The established flow: its SYN once (creates the conntrack entry), then its ACKs.
    let ack = established_frame();
    per_run(prog, 1, |_| syn(0))?;
    let established_ns = per_run(prog, runs, |_| ack.clone())?;
    if monitor && out.monitor.is_none() && out.monitor_error.is_none() {
        eprintln!("lb-bench: per-packet with lb-agent monitor on and off, at {n} services");
        match monitor_cost::measure(prog, dir.path(), n, runs) {
            Ok(cost) => out.monitor = Some(cost),
            Err(e) => out.monitor_error = Some(format!("{e:#}")),
        }
    }
    let (xdp_new_flow_ns, xdp_established_ns) = xdp_rows(&mut dp, runs)?;
    let mut verified_insns = Vec::new();
    for name in [
        prog_names::TC_INGRESS,
        prog_names::TC_EGRESS,
        prog_names::XDP,
    ] {
        let count = dp
            .ebpf
            .program(name)
            .and_then(|p| p.info().ok())
            .and_then(|i| i.verified_instruction_count());
        if let Some(c) = count {
            verified_insns.push((name.to_owned(), c));
        }
    }
    Ok(PacketRow {
        services: n,
        program_ms: Some(program_ms),
        syn_ns: Some(syn_ns),
        established_ns: Some(established_ns),
        xdp_new_flow_ns: Some(xdp_new_flow_ns),
        xdp_established_ns: Some(xdp_established_ns),
        verified_insns,
        error: None,
    })
}

/// Compares eBPF objects (say, before and after a datapath change) on the per-packet rows at `n` services:
/// `rounds` rounds, each running every object's cells (floor included) once with `runs` runs, objects in turn, so
/// that machine noise (other builds, frequency changes) spreads over all of them. Prints each cell's median over
/// the rounds with the spread (min-max of the round values) and returns every round.
pub fn compare(
    objects: &[std::path::PathBuf],
    n: usize,
    runs: usize,
    rounds: usize,
) -> Result<Vec<VariantRound>> {
    let bytes: Vec<Vec<u8>> = objects
        .iter()
        .map(|p| loader::object_bytes(Some(p)))
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    for round in 0..rounds {
        for (path, object) in objects.iter().zip(&bytes) {
            eprintln!("lb-bench: compare round {round}, {}", path.display());
            let mut res = PacketResults::default();
            let row = one_count(object, n, runs, &mut res, false)?;
            out.push(VariantRound {
                object: path.display().to_string(),
                round,
                floor_ns: res.floor_ns,
                row,
            });
        }
    }
    print_comparison(objects, &out);
    Ok(out)
}

fn print_comparison(objects: &[std::path::PathBuf], rounds: &[VariantRound]) {
    type Cell = fn(&VariantRound) -> Option<Summary>;
    let cells: [(&str, Cell); 5] = [
        ("floor (lb_noop)", |r| r.floor_ns),
        ("tc ingress SYN", |r| r.row.syn_ns),
        ("tc ingress established", |r| r.row.established_ns),
        ("lb_xdp new flow", |r| r.row.xdp_new_flow_ns),
        ("lb_xdp established", |r| r.row.xdp_established_ns),
    ];
    let median = |mut v: Vec<f64>| -> (f64, f64, f64) {
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    println!("| cell | object | p50 ns (min-max over rounds) | p99 ns (min-max) |");
    println!("|---|---|---|---|");
    for (name, cell) in cells {
        for o in objects {
            let o = o.display().to_string();
            let mine: Vec<Summary> = rounds
                .iter()
                .filter(|r| r.object == o)
                .filter_map(cell)
                .collect();
            let (p50, p50_lo, p50_hi) = median(mine.iter().map(|s| s.p50).collect());
            let (p99, p99_lo, p99_hi) = median(mine.iter().map(|s| s.p99).collect());
            println!(
                "| {name} | {o} | {p50:.0} ({p50_lo:.0}-{p50_hi:.0}) | {p99:.0} ({p99_lo:.0}-{p99_hi:.0}) |"
            );
        }
    }
    for o in objects {
        let o = o.display().to_string();
        if let Some(r) = rounds.iter().find(|r| r.object == o) {
            println!("verified instructions, {o}: {:?}", r.row.verified_insns);
        }
    }
}

/// The XDP rows' Service: a NodePort whose 10 endpoints are on another node (DNAT + SNAT, Cluster policy).
const XDP_NODE_PORT: u16 = 30081;
const XDP_SERVICE: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: xdp-remote, namespace: bench}\n\
spec: {type: NodePort, clusterIP: 10.96.255.250, ports: [{name: p, protocol: TCP, port: 80, targetPort: 8080, \
nodePort: 30081}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: xdp-remote-x, \
namespace: bench, labels: {kubernetes.io/service-name: xdp-remote}}\naddressType: IPv4\nports: [{name: p, protocol: \
TCP, port: 8080}]\nendpoints: [{addresses: [10.250.0.1], conditions: {ready: true}, nodeName: bench-remote}, \
{addresses: [10.250.0.2], conditions: {ready: true}, nodeName: bench-remote}]\n";
const XDP_TX: u32 = 3;
const XDP_PASS: u32 = 2;
/// Runs between two re-learnings of the L2 header (well inside its 10 s).
const XDP_CHUNK: usize = 2000;

/// Runs `name` (a tc program) once on `frame`; its output frame.
fn tc_once(dp: &mut loader::Datapath, name: &str, frame: &[u8]) -> Result<Vec<u8>> {
    let prog: &mut SchedClassifier = dp
        .ebpf
        .program_mut(name)
        .with_context(|| format!("{name} missing"))?
        .try_into()?;
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN on {name}"))?;
    out.truncate(r.data_size_out as usize);
    Ok(out)
}

/// The client's packet through tc ingress and egress (what leaves towards the backend).
fn through_tc(dp: &mut loader::Datapath, frame: &[u8]) -> Result<packet::Parsed> {
    let inner = tc_once(dp, prog_names::TC_INGRESS, frame)?;
    let out = tc_once(dp, prog_names::TC_EGRESS, &inner)?;
    packet::parse(&out).context("tc's output frame does not parse")
}

fn xdp_rows(dp: &mut loader::Datapath, runs: usize) -> Result<(Summary, Summary)> {
    let mut config = dp.maps.packet.config()?;
    config.flags |= lb_common::CONFIG_FLAG_XDP;
    dp.maps.packet.put_config(&config)?;
    let client = SocketAddr::new(IpAddr::from([198, 51, 100, 250]), 40000);
    let vip = SocketAddr::new(IpAddr::V4(workload::NODE_IP), XDP_NODE_PORT);
    let first = through_tc(
        dp,
        &packet::build(Protocol::Tcp, client, vip, packet::TCP_SYN, b""),
    )?;
    if first.src.ip() != IpAddr::V4(workload::NODE_IP) {
        anyhow::bail!("the XDP rows' flow was not SNATed by tc ({first:?}); not timed");
    }
    let (snat, backend) = (first.src, first.dst);
    through_tc(
        dp,
        &packet::build(Protocol::Tcp, backend, snat, packet::TCP_ACK, b""),
    )?;
    let ack = packet::build(Protocol::Tcp, client, vip, packet::TCP_ACK, b"");
    through_tc(dp, &ack)?;
    let prog: &mut Xdp = dp
        .ebpf
        .program_mut(prog_names::XDP)
        .context("lb_xdp missing")?
        .try_into()?;
    prog.load().context("loading lb_xdp (verifier)")?;
    let check = |prog: &mut Xdp, frame: &[u8], want: u32, what: &str| -> Result<()> {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN on lb_xdp")?;
        if r.return_value != want {
            anyhow::bail!(
                "lb_xdp returned {} on {what}, not {want}; not timed",
                r.return_value
            );
        }
        Ok(())
    };
    check(prog, &syn(0), XDP_PASS, "a new flow's SYN")?;
    let new_flow = per_run(prog, runs, syn)?;
    let mut ns = Vec::with_capacity(runs);
    let mut done = 0;
    while done < runs {
        let n = XDP_CHUNK.min(runs - done);
        // Learned again (tc egress rewrites an entry older than 1 s), so every run below finds a fresh header.
        through_tc(dp, &ack)?;
        let prog: &mut Xdp = dp
            .ebpf
            .program_mut(prog_names::XDP)
            .context("lb_xdp missing")?
            .try_into()?;
        check(prog, &ack, XDP_TX, "the established flow")?;
        ns.extend(per_run_raw(prog, n, |_| ack.clone())?);
        done += n;
    }
    Ok((new_flow, summarize(&mut ns)))
}

/// Flow `i`: distinct up to 60000 x 200 flows (source port, then source address).
fn frame(i: usize, flags: u8) -> Vec<u8> {
    let src = SocketAddr::new(
        IpAddr::from([198, 51, 100, 7 + (i / 60000 % 200) as u8]),
        1024 + (i % 60000) as u16,
    );
    let dst = SocketAddr::new(IpAddr::V4(workload::NODE_IP), NODE_PORT);
    packet::build(Protocol::Tcp, src, dst, flags, b"")
}

pub(super) fn syn(i: usize) -> Vec<u8> {
    frame(i, packet::TCP_SYN)
}

/// A packet of the established flow the rows time (flow 0, after its SYN).
pub(super) fn established_frame() -> Vec<u8> {
    frame(0, packet::TCP_ACK)
}

/// Runs `prog` once per syscall on `runs` frames, each a fresh copy; the kernel's time of each run, in ns.
fn per_run<
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
>(
    prog: &mut P,
    runs: usize,
    frame: impl Fn(usize) -> Vec<u8>,
) -> Result<Summary> {
    let mut ns = per_run_raw(prog, runs, frame)?;
    Ok(summarize(&mut ns))
}

pub(super) fn per_run_raw<
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
>(
    prog: &mut P,
    runs: usize,
    frame: impl Fn(usize) -> Vec<u8>,
) -> Result<Vec<f64>> {
    let mut ns = Vec::with_capacity(runs);
    let mut out = vec![0u8; 512];
    for i in 0..runs {
        let f = frame(i);
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&f),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        ns.push(r.duration.as_secs_f64() * 1e9);
    }
    Ok(ns)
}
