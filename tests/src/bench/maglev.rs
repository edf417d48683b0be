//! Maglev, pure: table build time, imbalance and disruption at the paper's table size and at the sizes lb uses.

use std::time::Instant;

use anyhow::Result;
use lb_agent::maglev::{self, MaglevBackend};
use serde::Serialize;

use super::stats::{Summary, summarize};

#[derive(Debug, Serialize)]
pub struct MaglevRow {
    pub backends: usize,
    pub table_size: u32,
    /// Where the size comes from: `paper` (M = 65521, the largest prime lb lists, next to the paper's 65537) or
    /// `lb` (`maglev::stable_table_size` with the agent's default bounds 251..16381).
    pub size_from: &'static str,
    pub build_ms: Summary,
    /// Most slots any backend owns / mean slots per backend.
    pub imbalance: f64,
    /// Fraction of slots that changed owner when one backend left.
    pub disruption: f64,
    /// 1/N: the slots of the leaving backend alone.
    pub ideal_disruption: f64,
}

fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "10.{}.{}.{}:8080",
                128 + i / 65536,
                (i / 256) % 256,
                i % 256
            )
        })
        .collect()
}

pub fn run(repeats: usize) -> Result<Vec<MaglevRow>> {
    let mut rows = Vec::new();
    for n in [10usize, 100, 1000] {
        let lb_size = maglev::stable_table_size(n, 251, 16381);
        for (m, from) in [(65521, "paper"), (lb_size, "lb")] {
            rows.push(row(n, m, from, repeats)?);
        }
    }
    Ok(rows)
}

fn row(n: usize, m: u32, size_from: &'static str, repeats: usize) -> Result<MaglevRow> {
    let keys = keys(n);
    let backends: Vec<MaglevBackend<'_>> = keys
        .iter()
        .map(|k| MaglevBackend {
            key: k.as_bytes(),
            weight: 1,
        })
        .collect();
    let mut times = Vec::with_capacity(repeats);
    let mut table = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        table = maglev::build_table(&backends, m)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut counts = vec![0usize; n];
    for &owner in &table {
        counts[owner as usize] += 1;
    }
    let mean = m as f64 / n as f64;
    let imbalance = counts.iter().copied().max().unwrap_or(0) as f64 / mean;
    // Remove the middle backend; compare owners by key, since indexes shift.
    let gone = n / 2;
    let rest: Vec<MaglevBackend<'_>> = backends
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != gone)
        .map(|(_, b)| *b)
        .collect();
    let after = maglev::build_table(&rest, m)?;
    let moved = table
        .iter()
        .zip(&after)
        .filter(|(a, b)| backends[**a as usize].key != rest[**b as usize].key)
        .count();
    Ok(MaglevRow {
        backends: n,
        table_size: m,
        size_from,
        build_ms: summarize(&mut times),
        imbalance,
        disruption: moved as f64 / f64::from(m),
        ideal_disruption: 1.0 / n as f64,
    })
}
