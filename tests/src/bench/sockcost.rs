//! What the socket LB's `connect()` hook costs per call, with real sockets: cgroup sock_addr programs cannot be run
//! through BPF_PROG_TEST_RUN, so the kernel's own accounting (`bpf_prog_info.run_time_ns / run_cnt`, kept only
//! while run-time statistics are enabled) is read around real connections from the client's cgroup.
//!
//! Two legs, interleaved in rounds (the order alternating) so that drift on a noisy machine falls on both: TCP
//! connections to the measured ClusterIP (a service hit: backend choice and the socket's reverse-NAT record) and
//! to a backend address directly (no service: the hook's lookups miss and it returns). Statistics are enabled with
//! `BPF_ENABLE_STATS`, whose file descriptor is held for these rounds only: the kernel turns them off when it is
//! closed, even if the bench dies, so the 60-80 ns they add to every program run never leaks into other timings.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::stats::{Summary, summarize};

#[derive(Debug, Serialize)]
pub struct Connect4Cost {
    pub rounds: usize,
    /// Connections per leg and round (as many as the leg's time allowed; the mean over rounds).
    pub connects_per_leg: f64,
    /// ns per `lb_connect4` run, one value per round: to a ClusterIP.
    pub vip_ns: Summary,
    /// To a non-service address (a backend directly).
    pub plain_ns: Summary,
    /// Per-round ratio vip / plain.
    pub ratio: Summary,
}

/// Runs `rounds` interleaved rounds; `connect(to_vip)` makes one leg's connections from the client's cgroup.
/// `link_pin`: the agent's pinned link of `lb_connect4`, which names the program measured.
pub fn measure(
    link_pin: &Path,
    rounds: usize,
    mut connect: impl FnMut(bool) -> Result<()>,
) -> Result<Connect4Cost> {
    let prog_id = lb_agent::datapath::attachments::link_prog_id(link_pin)
        .with_context(|| format!("reading the link {}", link_pin.display()))?;
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling run-time statistics (BPF_ENABLE_STATS)")?;
    let mut vip = Vec::new();
    let mut plain = Vec::new();
    let mut ratio = Vec::new();
    let mut connects = 0u64;
    for round in 0..rounds {
        let mut leg = |to_vip: bool| -> Result<(f64, u64)> {
            let (t0, n0) = prog_stats(prog_id)?;
            connect(to_vip)?;
            let (t1, n1) = prog_stats(prog_id)?;
            let n = n1.saturating_sub(n0);
            if n == 0 {
                bail!("lb_connect4 did not run (is the client in the agent's cgroup?)");
            }
            Ok((t1.saturating_sub(t0) as f64 / n as f64, n))
        };
        let (v, p, n) = if round % 2 == 0 {
            let (v, nv) = leg(true)?;
            let (p, np) = leg(false)?;
            (v, p, nv + np)
        } else {
            let (p, np) = leg(false)?;
            let (v, nv) = leg(true)?;
            (v, p, nv + np)
        };
        connects += n;
        vip.push(v);
        plain.push(p);
        ratio.push(v / p);
    }
    drop(stats);
    Ok(Connect4Cost {
        rounds,
        connects_per_leg: connects as f64 / (2 * rounds.max(1)) as f64,
        vip_ns: summarize(&mut vip),
        plain_ns: summarize(&mut plain),
        ratio: summarize(&mut ratio),
    })
}

/// The run time (ns) and run count of program `id`.
fn prog_stats(id: u32) -> Result<(u64, u64)> {
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded programs")?;
        if info.id() == id {
            return Ok((info.run_time().as_nanos() as u64, info.run_count()));
        }
    }
    bail!("program {id} is gone")
}
