//! `cargo xtask e2e`: Kubernetes' own e2e Service tests (`test/e2e/network/*.go`), ported as cases that assert what
//! upstream asserts, run against a simulated cluster ([`lb_tests::cluster`]): three nodes in three zones, one real
//! `lb-agent` per node, pods behind bridges, one API server with its controllers.
//!
//! One cluster serves every case, as an upstream e2e run shares one cluster; each case works in its own namespace
//! and removes what it made. One line per case: the verdict, its time, its name and the upstream tests it covers;
//! then the count. Exit status 1 on any failure (CI fails).
//!
//! A custom harness (`harness = false`): `cargo test -p lb-tests --test e2e -- [FILTER...] [--list]` runs the cases
//! whose name contains a filter; libtest's own flags (as `cargo test --workspace -- ...` passes them) are ignored.

mod conntrack;
mod endpointslice;
mod loadbalancer;
mod localhost;
mod services;
mod support;
mod topology;

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;
use std::time::Instant;

use lb_tests::cluster::Cluster;
use lb_tests::{agent_bin, probe, require_root};

use support::Ctx;

/// One ported case.
pub struct Case {
    /// `<upstream file>/<what>`, the name filters match.
    pub name: &'static str,
    /// The upstream tests it covers (their `It` descriptions, `[sig-network] <Describe>` prefixed), or for a case of
    /// lb's own (a defect the cluster exposed), what it checks, prefixed `lb:`.
    pub covers: &'static [&'static str],
    pub run: fn(&Ctx<'_>) -> anyhow::Result<()>,
}

fn all_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    cases.extend(services::cases());
    cases.extend(endpointslice::cases());
    cases.extend(conntrack::cases());
    cases.extend(loadbalancer::cases());
    cases.extend(topology::cases());
    cases.extend(localhost::cases());
    cases
}

/// Positional arguments are name filters; flags (libtest's, with their values) are ignored, but `--list`.
fn parse_args() -> (Vec<String>, bool) {
    let mut filters = Vec::new();
    let mut list = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--list" => list = true,
            "--test-threads" | "--skip" | "--format" | "--color" | "-Z" | "--logfile"
            | "--report-time" => {
                let _ = args.next();
            }
            s if s.starts_with('-') => {}
            s => filters.push(s.to_owned()),
        }
    }
    (filters, list)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    let (filters, list) = parse_args();
    let cases: Vec<Case> = all_cases()
        .into_iter()
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.name.contains(f.as_str())))
        .collect();
    if list {
        for c in &cases {
            say(&format!("{}: {}", c.name, c.covers.join(" | ")));
        }
        return ExitCode::SUCCESS;
    }
    if cases.is_empty() {
        say("e2e: no case matches the filters");
        return ExitCode::SUCCESS;
    }
    if !require_root("e2e") {
        return ExitCode::SUCCESS;
    }
    let start = Instant::now();
    let cluster = match Cluster::up(&agent_bin!(), probe!(), 3) {
        Ok(c) => c,
        Err(e) => {
            say(&format!("e2e: the cluster did not come up: {e:#}"));
            return ExitCode::FAILURE;
        }
    };
    say(&format!(
        "e2e: cluster of {} nodes up in {:.1}s (agents synced); {} cases",
        cluster.nodes.len(),
        start.elapsed().as_secs_f64(),
        cases.len()
    ));
    let mut failed = Vec::new();
    let mut covered = 0;
    for case in &cases {
        let ctx = Ctx {
            c: &cluster,
            ns: format!("e2e-{}", case.name.replace('/', "-")),
        };
        let t = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| (case.run)(&ctx)));
        ctx.cleanup();
        let secs = t.elapsed().as_secs_f64();
        let verdict = match &result {
            Ok(Ok(())) => "ok  ",
            _ => "FAIL",
        };
        covered += case
            .covers
            .iter()
            .filter(|c| c.starts_with("[sig-network]"))
            .count();
        say(&format!(
            "{verdict} {secs:5.1}s {:<34} {}",
            case.name,
            case.covers.join(" | ")
        ));
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(panic) => Some(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into()),
            ),
        };
        if let Some(e) = error {
            say(&format!("     {}", e.replace('\n', "\n     ")));
            for (i, node) in cluster.nodes.iter().enumerate() {
                let log = cluster.agent_log(i);
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                say(&format!(
                    "     --- {} agent log (last lines) ---",
                    node.name
                ));
                for l in tail.iter().rev() {
                    say(&format!("     {l}"));
                }
            }
            failed.push(case.name);
        }
    }
    let alive = cluster.agents_alive();
    drop(cluster);
    say(&format!(
        "e2e: {} cases ({covered} upstream tests), {} passed, {} failed, in {:.1}s",
        cases.len(),
        cases.len() - failed.len(),
        failed.len(),
        start.elapsed().as_secs_f64()
    ));
    if let Err(e) = alive {
        say(&format!("e2e: {e:#}"));
        return ExitCode::FAILURE;
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        say(&format!("e2e: failed: {}", failed.join(", ")));
        ExitCode::FAILURE
    }
}
