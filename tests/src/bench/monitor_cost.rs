//! What `lb-agent monitor` costs the per-packet datapath: `lb_tc_ingress` on an established flow and on new flows
//! (SYNs) with the monitor's gate on (a real `datapath::monitor::Monitor` holding the lease, every event kind
//! wanted, a rate limit high enough that every new flow is emitted, the ring drained as the monitor does) and off,
//! interleaved in rounds so that machine noise spreads over both. The established flow must not move (its path
//! reads no gate); a new flow pays for its event.

use std::path::Path;

use anyhow::{Result, bail};
use aya::programs::SchedClassifier;
use lb_agent::datapath::monitor::{Monitor, Settings};
use lb_common::{EVENT_DROP, EVENT_NEW_FLOW, EVENT_REJECT};
use serde::Serialize;

use super::packet::{established_frame, per_run_raw, syn};
use super::stats::{Summary, summarize};

/// Rounds of (off, on) or (on, off), alternating which goes first.
const ROUNDS: usize = 10;
/// SYNs between two drains of the ring (256 KiB holds ~2000 events).
const DRAIN_EVERY: usize = 1000;
/// New flows of this comparison start past the per-packet rows' own flows.
const FLOW_BASE: usize = 5_000_000;

#[derive(Debug, Serialize)]
pub struct MonitorCost {
    pub services: usize,
    pub rounds: usize,
    /// Runs per cell, over all rounds.
    pub runs: usize,
    pub established_off_ns: Summary,
    pub established_on_ns: Summary,
    /// (min, max) over the rounds of each round's p50: the spread.
    pub established_off_round_p50: (f64, f64),
    pub established_on_round_p50: (f64, f64),
    pub syn_off_ns: Summary,
    pub syn_on_ns: Summary,
    pub syn_off_round_p50: (f64, f64),
    pub syn_on_round_p50: (f64, f64),
    /// Events the monitor read during the SYN-on cells (one per new flow expected) and during the established-on
    /// cells (none expected).
    pub syn_events: u64,
    pub established_events: u64,
}

fn p50(v: &mut [f64]) -> f64 {
    summarize(v).p50
}

fn spread(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

fn drain(m: &mut Monitor) -> u64 {
    let mut n = 0;
    while m.next_event().is_some() {
        n += 1;
    }
    n
}

/// Measures on `prog` (tc ingress of a private load pinned at `pins`, with the per-packet rows' services and
/// established flow in place), `runs` runs per cell in total.
pub fn measure(
    prog: &mut SchedClassifier,
    pins: &Path,
    services: usize,
    runs: usize,
) -> Result<MonitorCost> {
    let chunk = (runs / ROUNDS).max(DRAIN_EVERY);
    let settings = Settings {
        rate: 10_000_000,
        burst: 10_000_000,
        kinds: 1 << EVENT_NEW_FLOW | 1 << EVENT_DROP | 1 << EVENT_REJECT,
    };
    let ack = established_frame();
    let (mut est_off, mut est_on, mut syn_off, mut syn_on) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut est_off_r, mut est_on_r, mut syn_off_r, mut syn_on_r) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut syn_events, mut established_events) = (0u64, 0u64);
    let mut next_flow = FLOW_BASE;
    for round in 0..ROUNDS {
        for on in [round % 2 == 0, round % 2 != 0] {
            let mut monitor = if on {
                Some(Monitor::start(pins, settings)?)
            } else {
                None
            };
            let mut est = per_run_raw(prog, chunk, |_| ack.clone())?;
            let mut syns = Vec::with_capacity(chunk);
            for _ in 0..chunk / DRAIN_EVERY {
                let base = next_flow;
                syns.extend(per_run_raw(prog, DRAIN_EVERY, |i| syn(base + i))?);
                next_flow += DRAIN_EVERY;
                if let Some(m) = monitor.as_mut() {
                    syn_events += drain(m);
                }
            }
            if let Some(m) = monitor.as_mut() {
                m.renew()?;
            }
            let (est_all, est_rounds, syn_all, syn_rounds) = if on {
                (&mut est_on, &mut est_on_r, &mut syn_on, &mut syn_on_r)
            } else {
                (&mut est_off, &mut est_off_r, &mut syn_off, &mut syn_off_r)
            };
            est_rounds.push(p50(&mut est));
            syn_rounds.push(p50(&mut syns));
            est_all.extend(est);
            syn_all.extend(syns);
            drop(monitor);
        }
        // The established cells ran before the SYNs in each half: count what the established flow emitted with
        // the gate on by running it once more alone.
        let mut m = Monitor::start(pins, settings)?;
        per_run_raw(prog, DRAIN_EVERY, |_| ack.clone())?;
        established_events += drain(&mut m);
    }
    let syn_runs = syn_on.len() as u64;
    if syn_events * 10 < syn_runs * 9 {
        bail!(
            "the monitor read {syn_events} events for {syn_runs} new flows: the gate or the rate limit did not let them \
             through, so the 'on' cells did not measure emission"
        );
    }
    Ok(MonitorCost {
        services,
        rounds: ROUNDS,
        runs: est_on.len(),
        established_off_round_p50: spread(&est_off_r),
        established_on_round_p50: spread(&est_on_r),
        syn_off_round_p50: spread(&syn_off_r),
        syn_on_round_p50: spread(&syn_on_r),
        established_off_ns: summarize(&mut est_off),
        established_on_ns: summarize(&mut est_on),
        syn_off_ns: summarize(&mut syn_off),
        syn_on_ns: summarize(&mut syn_on),
        syn_events,
        established_events,
    })
}
