//! `lb-bench api-update`: the control-plane section's "one EndpointSlice update through the API server" cell for
//! several agent binaries, interleaved run by run, with where the time goes (the API server's write, the source's
//! batching, the agent's sync) from the agents' own "synced" lines.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::control::{KubeLatency, kube_latency};
use super::stats::{Summary, summarize};
use super::workload;

pub struct Options {
    /// (label, binary) of each agent compared.
    pub agents: Vec<(String, PathBuf)>,
    pub services: usize,
    pub endpoints: usize,
    /// Updates per run.
    pub changes: usize,
    pub runs: usize,
}

/// Runs every agent `runs` times, the order rotated each run; prints each run (stderr) and, per agent, the
/// median over runs of each run's p50 and p99 with their range (stdout).
pub fn run(opts: &Options) -> Result<()> {
    let svcs = workload::services(opts.services, opts.endpoints, false);
    let mut results: Vec<(String, KubeLatency)> = Vec::new();
    for run in 0..opts.runs {
        for k in 0..opts.agents.len() {
            let (label, bin) = &opts.agents[(k + run) % opts.agents.len()];
            let r = kube_latency(bin, &svcs, opts.changes)
                .with_context(|| format!("{label}, run {run}"))?;
            let parts = r.parts.as_ref();
            eprintln!(
                "lb-bench api-update: {label:>10} run {run}: change p50/p99 {:.2}/{:.2} ms (max {:.2}); apply {:?}, \
                 queued {:?}, sync {:?}, translate {:?}, write {:?} ms p50/p99; {} syncs; programmed in {:.0} ms",
                r.change_ms.p50,
                r.change_ms.p99,
                r.change_ms.max,
                parts.map(|p| pair(p.apply_ms)),
                parts.map(|p| pair(p.queued_ms)),
                parts.map(|p| pair(p.sync_ms)),
                parts.map(|p| pair(p.translate_ms)),
                parts.map(|p| pair(p.write_ms)),
                parts.map_or(0, |p| p.syncs),
                r.start_to_programmed_ms,
            );
            results.push((label.clone(), r));
        }
    }
    println!(
        "| agent | runs | change p50 ms (min-max) | change p99 ms (min-max) | sync p99 ms | queued p99 ms | apply p99 ms \
         | start -> programmed ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (label, _) in &opts.agents {
        let cell: Vec<&KubeLatency> = results
            .iter()
            .filter(|(l, _)| l == label)
            .map(|(_, r)| r)
            .collect();
        let over = |f: &dyn Fn(&KubeLatency) -> f64| -> String {
            let s = summarize(&mut cell.iter().map(|r| f(r)).collect::<Vec<_>>());
            format!("{:.2} ({:.2}-{:.2})", s.p50, s.min, s.max)
        };
        let part = |f: &dyn Fn(&super::control::KubeLatencyParts) -> f64| -> String {
            over(&|r| r.parts.as_ref().map_or(f64::NAN, f))
        };
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} |",
            cell.len(),
            over(&|r| r.change_ms.p50),
            over(&|r| r.change_ms.p99),
            part(&|p| p.sync_ms.p99),
            part(&|p| p.queued_ms.p99),
            part(&|p| p.apply_ms.p99),
            over(&|r| r.start_to_programmed_ms),
        );
    }
    Ok(())
}

fn pair(s: Summary) -> (f64, f64) {
    (
        (s.p50 * 100.0).round() / 100.0,
        (s.p99 * 100.0).round() / 100.0,
    )
}
