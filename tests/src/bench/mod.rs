//! `lb-bench`: lb side by side with kube-proxy's iptables and nftables datapaths (`cargo xtask bench`). Every
//! number is measured in the same run on the same machine; a benchmark that cannot run records why and prints no
//! number. Network safety as in the rest of this package: traffic and rules only inside namespaces made here.

pub mod api_update;
pub mod control;
pub mod kubeproxy;
pub mod load;
pub mod maglev;
pub mod memory;
pub mod monitor_cost;
pub mod packet;
pub mod report;
pub mod scale;
pub mod sockcost;
pub mod stats;
pub mod traffic;
pub mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

/// What one run measures, by size.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub quick: bool,
    pub maglev_repeats: usize,
    pub control_services: usize,
    pub control_changes: usize,
    /// Services per run of the scale sweep (the agent from empty to programmed, memory).
    pub scale_counts: Vec<usize>,
    pub iptables_changes: usize,
    /// `iptables-restore` with the nf_tables backend runs at no more services than this (see [`Plan::new`]).
    pub iptables_nft_max_services: usize,
    pub traffic_counts: Vec<usize>,
    pub crr_seconds: f64,
    pub throughput_seconds: f64,
    pub packet_counts: Vec<usize>,
    pub packet_runs: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                maglev_repeats: 3,
                // 1k, not 10k: the kube-proxy rule loads at 10k alone take minutes (nft -f ~140 s, see the
                // full plan), which would break the 5-minute budget.
                control_services: 1000,
                control_changes: 100,
                scale_counts: vec![10, 1000],
                iptables_changes: 3,
                iptables_nft_max_services: 1000,
                traffic_counts: vec![10, 1000],
                crr_seconds: 2.0,
                throughput_seconds: 2.0,
                packet_counts: vec![10, 1000],
                packet_runs: 100_000,
            }
        } else {
            Plan {
                quick,
                maglev_repeats: 10,
                control_services: 10_000,
                control_changes: 1000,
                // 50k: issue-sized clusters must run, with a cost per Service flat from 1k up.
                scale_counts: vec![10, 1000, 10_000, 50_000],
                // Each full iptables-restore is a change here; at 10k services one takes ~10 s (legacy).
                iptables_changes: 3,
                // iptables-restore's nf_tables backend grows much faster than linearly with the rule set: on the
                // busy 2-core development machine 1000 services loaded in 5-10 s and 2000 in 50 s (a reload 63 s),
                // so 10k would take far beyond this run's 30 minutes (and the 600 s load timeout). The legacy
                // backend and nft load 10k (~10 s and ~140 s there).
                iptables_nft_max_services: 1000,
                traffic_counts: vec![10, 1000, 10_000],
                crr_seconds: 10.0,
                throughput_seconds: 5.0,
                // 100k: 200k Maglev tables (at the smallest size, 251) took 21 s to program on the busy
                // development machine once inner tables were filled by one batch each; 1e6 runs per cell ~5 s.
                packet_counts: vec![10, 1000, 10_000, 100_000],
                packet_runs: 1_000_000,
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
    /// 1-minute load average when the run started (other work on the machine skews every number).
    pub load_at_start: String,
    pub iptables: String,
    pub nft: String,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub command: String,
    pub started_utc: String,
    pub seconds: f64,
    pub machine: Machine,
    pub plan: Plan,
    pub maglev: Option<Vec<maglev::MaglevRow>>,
    pub maglev_error: Option<String>,
    pub control: Option<control::ControlResults>,
    pub scale: Option<Vec<scale::ScaleRow>>,
    pub traffic: Option<traffic::TrafficResults>,
    pub packet: Option<packet::PacketResults>,
    /// Wall-clock time of each part that ran, in run order (what a full run's budget is planned from).
    pub part_seconds: Vec<(String, f64)>,
}

pub struct RunOptions {
    pub quick: bool,
    pub agent: PathBuf,
    pub out: PathBuf,
    pub command: String,
    /// Only these parts (maglev, control, traffic, packet); all when empty.
    pub only: Vec<String>,
    /// Overrides of the plan's sizes, for targeted runs (the report says what was run).
    pub control_services: Option<usize>,
    pub scale_counts: Vec<usize>,
    pub packet_counts: Vec<usize>,
    pub packet_runs: Option<usize>,
    /// Compare these eBPF objects on the per-packet rows instead (interleaved rounds, `packet::compare`).
    pub packet_objects: Vec<PathBuf>,
    pub packet_rounds: usize,
    pub traffic_counts: Vec<usize>,
    pub crr_seconds: Option<f64>,
}

pub fn run(opts: &RunOptions) -> Result<()> {
    let started = Instant::now();
    let mut plan = Plan::new(opts.quick);
    if let Some(n) = opts.control_services {
        plan.control_services = n;
    }
    if !opts.scale_counts.is_empty() {
        plan.scale_counts = opts.scale_counts.clone();
    }
    if !opts.packet_counts.is_empty() {
        plan.packet_counts = opts.packet_counts.clone();
    }
    if let Some(n) = opts.packet_runs {
        plan.packet_runs = n;
    }
    if !opts.traffic_counts.is_empty() {
        plan.traffic_counts = opts.traffic_counts.clone();
    }
    if let Some(s) = opts.crr_seconds {
        plan.crr_seconds = s;
    }
    let want = |part: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == part);
    let mut results = Results {
        command: opts.command.clone(),
        started_utc: crate::run_cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .unwrap_or_default()
            .trim()
            .to_owned(),
        seconds: 0.0,
        machine: machine(),
        plan: plan.clone(),
        maglev: None,
        maglev_error: None,
        control: None,
        scale: None,
        traffic: None,
        packet: None,
        part_seconds: Vec::new(),
    };
    let mut part = Instant::now();
    let mut lap = |results: &mut Results, name: &str| {
        results
            .part_seconds
            .push((name.to_owned(), part.elapsed().as_secs_f64()));
        eprintln!(
            "lb-bench: {name} took {:.0} s",
            part.elapsed().as_secs_f64()
        );
        part = Instant::now();
    };
    if want("maglev") {
        eprintln!("lb-bench: maglev");
        match maglev::run(plan.maglev_repeats) {
            Ok(rows) => results.maglev = Some(rows),
            Err(e) => results.maglev_error = Some(format!("{e:#}")),
        }
        lap(&mut results, "maglev");
    }
    if want("control") {
        results.control = Some(control::run(
            &opts.agent,
            plan.control_services,
            10,
            plan.control_changes,
            plan.iptables_changes,
            plan.iptables_nft_max_services,
        ));
        lap(&mut results, "control");
    }
    if want("scale") {
        results.scale = Some(scale::run(&opts.agent, &plan.scale_counts));
        lap(&mut results, "scale");
    }
    if !opts.packet_objects.is_empty() {
        let n = plan.packet_counts.first().copied().unwrap_or(10);
        let rounds = packet::compare(
            &opts.packet_objects,
            n,
            plan.packet_runs,
            opts.packet_rounds.max(1),
        )?;
        let path = opts.out.join("bench/results/packet-compare.json");
        std::fs::create_dir_all(opts.out.join("bench/results"))?;
        std::fs::write(&path, serde_json::to_string_pretty(&rounds)?)?;
        eprintln!("lb-bench: comparison written to {}", path.display());
        return Ok(());
    }
    if want("packet") {
        results.packet = Some(packet::run(&plan.packet_counts, plan.packet_runs));
        lap(&mut results, "packet");
    }
    if want("traffic") {
        results.traffic = Some(traffic::run(&traffic::TrafficConfig {
            counts: plan.traffic_counts.clone(),
            crr_duration: Duration::from_secs_f64(plan.crr_seconds),
            throughput_duration: Duration::from_secs_f64(plan.throughput_seconds),
            agent_bin: opts.agent.clone(),
        }));
        lap(&mut results, "traffic");
    }
    results.seconds = started.elapsed().as_secs_f64();
    let dir = opts.out.join("bench/results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = results.started_utc.replace(':', "");
    let kind = if opts.quick { "quick" } else { "full" };
    let json = serde_json::to_string_pretty(&results)?;
    let json_name = format!("{stamp}-{kind}.json");
    std::fs::write(dir.join(&json_name), &json).context("writing the JSON results")?;
    std::fs::write(dir.join(format!("latest-{kind}.json")), &json)?;
    report::write(&results, &opts.out, &format!("bench/results/{json_name}"))?;
    eprintln!(
        "lb-bench: done in {:.0} s; BENCHMARKS.md and bench/results/{json_name} written",
        results.seconds
    );
    Ok(())
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0.0);
    Machine {
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel: crate::run_cmd("uname", &["-r"])
            .unwrap_or_default()
            .trim()
            .to_owned(),
        memory_gib: mem_kib / 1024.0 / 1024.0,
        load_at_start: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        iptables: crate::run_cmd("iptables-restore", &["-V"])
            .unwrap_or_default()
            .trim()
            .to_owned(),
        nft: crate::run_cmd("nft", &["-v"])
            .unwrap_or_default()
            .trim()
            .to_owned(),
    }
}
