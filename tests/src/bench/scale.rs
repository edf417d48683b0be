//! The agent from an empty node to fully programmed at growing cluster sizes: does each Service cost the same at
//! 50k as at 1k, and what does an almost empty cluster cost in memory?

use std::path::Path;

use serde::Serialize;

use super::control::{AgentMemory, agent_memory};
use super::workload;
use crate::{BpfDir, unique_token};

/// Endpoints per Service in every size of the sweep (the control-plane section's shape).
pub const ENDPOINTS: usize = 10;

#[derive(Debug, Serialize)]
pub struct ScaleRow {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Capacity flags the run needed beyond the defaults.
    pub flags: Vec<String>,
    pub agent: Option<AgentMemory>,
    pub error: Option<String>,
}

/// Capacity flags for `n` Services of [`ENDPOINTS`] endpoints: a ClusterIP has two frontends, each endpoint one
/// backend; lb's defaults (services) and the bench's (`control::MAX_BACKENDS`) are kept while they hold.
fn capacity_flags(n: usize) -> Vec<String> {
    let mut flags = Vec::new();
    let frontends = 2 * n as u64;
    if frontends >= u64::from(lb_common::DEFAULT_MAX_SERVICES) {
        flags.extend([
            "--max-services".to_owned(),
            (frontends + frontends / 8).to_string(),
        ]);
    }
    let backends = (n * ENDPOINTS) as u64;
    if backends >= u64::from(super::control::MAX_BACKENDS) {
        flags.extend([
            "--max-backends".to_owned(),
            (backends + backends / 8).to_string(),
        ]);
    }
    flags
}

pub fn run(agent_bin: &Path, sizes: &[usize]) -> Vec<ScaleRow> {
    sizes
        .iter()
        .map(|&n| {
            eprintln!("lb-bench: scale, agent programming {n} x {ENDPOINTS}");
            let yaml = workload::manifest(&workload::services(n, ENDPOINTS, false));
            let flags = capacity_flags(n);
            let result = BpfDir::new(&format!("lb-bench-scale-{}", unique_token()))
                .and_then(|pins| agent_memory(agent_bin, &yaml, &pins, &flags));
            let (agent, error) = match result {
                Ok(a) => (Some(a), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            };
            ScaleRow {
                services: n,
                endpoints_per_service: ENDPOINTS,
                flags,
                agent,
                error,
            }
        })
        .collect()
}
