//! What went wrong in one sync, for the next one to retry whatever it is told.

use std::collections::BTreeSet;

use lb_common::ServiceKey;

use super::super::packet_maps::NodeEntry;
use crate::state::Frontend;

/// The failures of one sync. A sync of changed frontends visits these as well as the changed ones, so after any
/// sync nothing else can differ from the desired state.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Retry {
    /// Frontends whose plan, table or entry write failed.
    pub(super) frontends: BTreeSet<Frontend>,
    /// Programmed keys gone from the desired state whose entry delete failed.
    pub(super) stale: BTreeSet<ServiceKey>,
    /// Unused backends whose delete failed.
    pub(super) backends: BTreeSet<u32>,
    /// Addresses whose `LB_VIPS` entry could not be written or deleted.
    pub(super) vips: BTreeSet<[u8; 16]>,
    /// Service ids whose `LB_SRC_RANGES` entries could not be written or deleted.
    pub(super) src_range_ids: BTreeSet<u32>,
}

impl Retry {
    pub(super) fn node_entry_failed(&mut self, e: &NodeEntry) {
        match e {
            NodeEntry::Vip { addr, .. } => {
                self.vips.insert(*addr);
            }
            NodeEntry::SrcRange { service_id, .. } => {
                self.src_range_ids.insert(*service_id);
            }
            // Every sync looks at all of these.
            NodeEntry::LocalNet { .. } | NodeEntry::ServiceCidr { .. } => {}
        }
    }
}
