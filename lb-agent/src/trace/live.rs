//! `lb-agent trace` on what the node really runs: the service state of the live pins (frontends, backends, lookup
//! tables, the node's networks, VIPs, source ranges, service CIDRs, the datapath config) copied into the tracer's
//! private load, so the real programs decide on exactly the node's entries while nothing live is touched: no live
//! program runs the crafted packet, no conntrack, affinity, counter or trace record of the node changes.
//!
//! What is not copied is runtime state (conntrack, affinity, socket records, fragments, learned L2 headers,
//! counters): a traced packet is a new flow, as `trace` always answers.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use lb_common::CONFIG_FLAG_TRACE;

use crate::datapath::lut::Layout;
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
    // Each table is a region of the slot array that service entries point at by offset: copied to the same
    // offsets, so the entries are copied verbatim.
    let regions: BTreeMap<u32, u64> = services
        .iter()
        .filter_map(|(_, v)| Some((v.table_offset, Layout::of(v)?.bytes())))
        .collect();
    let end = regions
        .iter()
        .map(|(offset, len)| u64::from(*offset) + len)
        .max()
        .unwrap_or(0);
    if end > to.slot_capacity() {
        to.grow_slots(end, 0)
            .context("sizing the private slot array for the node's tables")?;
    }
    let mut bytes = Vec::with_capacity(regions.len());
    for (offset, len) in &regions {
        bytes.push((
            u64::from(*offset),
            from.read_slots(u64::from(*offset), *len)?,
        ));
    }
    let writes: Vec<(u64, &[u8])> = bytes.iter().map(|(o, b)| (*o, b.as_slice())).collect();
    to.write_slots(&writes)
        .context("copying the node's lookup tables")?;
    copied.tables = regions.len();
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
