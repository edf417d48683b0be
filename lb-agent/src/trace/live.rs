//! `lb-agent trace` on what the node really runs: the service state of the live pins (frontends, backends, lookup
//! tables, the node's networks, VIPs, source ranges, service CIDRs, the datapath config) copied into the tracer's
//! private load, so the real programs decide on exactly the node's entries while nothing live is touched: no live
//! program runs the crafted packet, no conntrack, affinity, counter or trace record of the node changes.
//!
//! What is not copied is runtime state (conntrack, affinity, socket records, fragments, learned L2 headers,
//! counters): a traced packet is a new flow, as `trace` always answers.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use lb_common::CONFIG_FLAG_TRACE;

use crate::datapath::maps::{Maps, MapsRead, PinnedMaps};
use crate::datapath::names::{kind_name, service_names};

/// What was copied, for the caller's message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub frontends: usize,
    pub backends: usize,
    pub tables: usize,
    pub node_entries: usize,
}

/// Copies the live pins' service state into `to` (a private load), in the reconciler's order (backends, tables,
/// entries), with the trace flag added to the copied config.
pub fn copy_service_state(live: &Path, to: &mut PinnedMaps) -> anyhow::Result<Copied> {
    let from = PinnedMaps::open(live).with_context(|| {
        format!(
            "opening the node's pinned maps in {} (is the agent's --bpffs elsewhere? or trace from objects with \
             --manifests / --kubeconfig)",
            live.display()
        )
    })?;
    let mut copied = Copied::default();
    for (id, backend) in from.backends()? {
        to.put_backend(id, &backend)?;
        copied.backends += 1;
    }
    let services = from.services()?;
    let mut tables = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (_, value) in &services {
        if value.backend_count > 0
            && seen.insert(value.service_id)
            && let Some(slots) = from.table(value.service_id)?
        {
            tables.push((value.service_id, slots));
        }
    }
    if let Some((id, e)) = to.put_tables(&tables).into_iter().next() {
        return Err(e).with_context(|| format!("copying the lookup table of service id {id}"));
    }
    copied.tables = tables.len();
    for (key, value) in &services {
        to.put_service(key, value)?;
        copied.frontends += 1;
    }
    for entry in from.node_entries()? {
        to.put_node_entry(&entry)?;
        copied.node_entries += 1;
    }
    let mut config = from.config()?;
    config.flags |= CONFIG_FLAG_TRACE;
    to.put_config(&config)?;
    Ok(copied)
}

/// The live names map as the trace names a service: `namespace/name:port` and its kind, by service id.
pub fn live_names(live: &Path) -> HashMap<u32, (String, String)> {
    service_names(live)
        .into_iter()
        .map(|(id, n)| (id, (n.name().to_owned(), kind_name(n.kind).to_owned())))
        .collect()
}
