//! `LB_SVC_NAMES`: service id → the Kubernetes service port behind it (`namespace/name:port`) and the VIP kind.
//!
//! The datapath maps only know addresses and ids; operators think in Services. This small map, written after every
//! sync and pinned next to the others, lets `lb-agent services`/`stats` and the metrics name each service even when
//! no agent runs. No program reads it, so the agent creates it itself (aya's standalone maps) instead of adding it
//! to the eBPF object; `lb-agent cleanup` removes it with the rest (`map_names::AGENT_CREATED`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use aya::maps::{HashMap, MapData, MapError};
use lb_common::{ServiceNameValue, map_names};

use super::map_error::MapsError;
use crate::state::{DesiredState, Frontend, VipKind};

/// Where the names are kept: the pinned map, or memory in tests.
pub trait NameStore {
    fn names(&self) -> Result<Vec<(u32, ServiceNameValue)>, MapsError>;
    fn put_name(&mut self, service_id: u32, value: &ServiceNameValue) -> Result<(), MapsError>;
    fn delete_name(&mut self, service_id: u32) -> Result<(), MapsError>;
}

fn op(op: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op {
        map: map_names::SVC_NAMES,
        op,
        source,
    }
}

/// The pinned `LB_SVC_NAMES` map.
pub struct PinnedNames {
    map: HashMap<MapData, u32, ServiceNameValue>,
}

impl PinnedNames {
    /// Opens the pinned map (CLI); fails when the agent never created it.
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        Ok(Self::open_with_capacity(dir)?.0)
    }

    fn open_with_capacity(dir: &Path) -> Result<(Self, u32), MapsError> {
        let path = dir.join(map_names::SVC_NAMES);
        let data = MapData::from_pin(&path).map_err(|source| MapsError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let layout = |source| MapsError::Layout {
            map: map_names::SVC_NAMES,
            source,
        };
        let capacity = data.info().map_err(layout)?.max_entries();
        let map = HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(layout)?;
        Ok((Self { map }, capacity))
    }

    /// Opens the pinned map, or creates and pins it. A pin of another layout or capacity (an older build, a new
    /// `--max-services`) is replaced: the agent rewrites every name at its first sync.
    pub fn open_or_create(dir: &Path, max_entries: u32) -> Result<Self, MapsError> {
        let path = dir.join(map_names::SVC_NAMES);
        match Self::open_with_capacity(dir) {
            Ok((names, capacity)) if capacity == max_entries => return Ok(names),
            Ok(_) | Err(MapsError::Layout { .. }) => {
                tracing::info!(path = %path.display(), "replacing the names map (layout or capacity changed)");
                let _ = std::fs::remove_file(&path);
            }
            Err(_) => {}
        }
        let map = HashMap::<MapData, u32, ServiceNameValue>::create(max_entries, 0)
            .map_err(op("create"))?;
        map.pin(&path).map_err(|error| MapsError::Op {
            map: map_names::SVC_NAMES,
            op: "pin",
            source: MapError::PinError {
                name: Some(map_names::SVC_NAMES.to_owned()),
                error,
            },
        })?;
        Self::open(dir)
    }
}

impl NameStore for PinnedNames {
    fn names(&self) -> Result<Vec<(u32, ServiceNameValue)>, MapsError> {
        self.map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op("iterate"))
    }

    fn put_name(&mut self, service_id: u32, value: &ServiceNameValue) -> Result<(), MapsError> {
        self.map.insert(service_id, value, 0).map_err(op("update"))
    }

    fn delete_name(&mut self, service_id: u32) -> Result<(), MapsError> {
        match self.map.remove(&service_id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(op("delete")(e)),
        }
    }
}

/// Service names by id, from `LB_SVC_NAMES` pinned in `dir`; empty when the map does not exist (an agent that
/// predates it).
pub fn service_names(dir: &Path) -> std::collections::HashMap<u32, ServiceNameValue> {
    PinnedNames::open(dir)
        .and_then(|n| n.names())
        .map(|v| v.into_iter().collect())
        .unwrap_or_default()
}

/// In-memory names for tests (test builds only, as `maps::FakeMaps`).
#[cfg(any(test, feature = "test-support"))]
#[derive(Debug, Default)]
pub struct FakeNames {
    pub names: BTreeMap<u32, ServiceNameValue>,
    pub writes: usize,
}

#[cfg(any(test, feature = "test-support"))]
impl NameStore for FakeNames {
    fn names(&self) -> Result<Vec<(u32, ServiceNameValue)>, MapsError> {
        Ok(self.names.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_name(&mut self, service_id: u32, value: &ServiceNameValue) -> Result<(), MapsError> {
        self.writes += 1;
        self.names.insert(service_id, *value);
        Ok(())
    }
    fn delete_name(&mut self, service_id: u32) -> Result<(), MapsError> {
        self.writes += 1;
        self.names.remove(&service_id);
        Ok(())
    }
}

pub fn kind_number(kind: VipKind) -> u8 {
    match kind {
        VipKind::ClusterIp => lb_common::VIP_KIND_CLUSTER_IP,
        VipKind::ExternalIp => lb_common::VIP_KIND_EXTERNAL_IP,
        VipKind::LoadBalancer => lb_common::VIP_KIND_LOAD_BALANCER,
        VipKind::NodePort => lb_common::VIP_KIND_NODE_PORT,
    }
}

pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        lb_common::VIP_KIND_CLUSTER_IP => "ClusterIP",
        lb_common::VIP_KIND_EXTERNAL_IP => "ExternalIP",
        lb_common::VIP_KIND_LOAD_BALANCER => "LoadBalancer",
        lb_common::VIP_KIND_NODE_PORT => "NodePort",
        _ => "unknown",
    }
}

/// Keeps `LB_SVC_NAMES` equal to the programmed services' names, writing only differences (like the reconciler).
#[derive(Debug)]
pub struct NameWriter {
    written: BTreeMap<u32, ServiceNameValue>,
    /// The id each named frontend was written under.
    by_frontend: BTreeMap<Frontend, u32>,
    /// Desired frontends that had no service id (not programmed) when last visited: visited again at every sync,
    /// since a retry by the reconciler may have programmed them.
    unnamed: BTreeSet<Frontend>,
    /// The next sync must visit every frontend: nothing synced yet, or a write failed part way.
    needs_full: bool,
}

impl Default for NameWriter {
    fn default() -> Self {
        NameWriter {
            written: BTreeMap::new(),
            by_frontend: BTreeMap::new(),
            unnamed: BTreeSet::new(),
            needs_full: true,
        }
    }
}

impl NameWriter {
    /// Adopts what the map holds, so a restarted agent rewrites nothing that is right.
    pub fn restore(store: &impl NameStore) -> Result<Self, MapsError> {
        Ok(Self {
            written: store.names()?.into_iter().collect(),
            ..Self::default()
        })
    }

    /// Writes the name of every programmed frontend of `desired` (`id_of` gives its service id, `None` when it
    /// could not be programmed) and deletes the names of ids no longer in use. Returns how many entries changed.
    pub fn sync(
        &mut self,
        store: &mut impl NameStore,
        desired: &DesiredState,
        id_of: impl Fn(&Frontend) -> Option<u32>,
    ) -> Result<usize, MapsError> {
        self.needs_full = true;
        let mut want = BTreeMap::new();
        self.by_frontend.clear();
        self.unnamed.clear();
        for (frontend, entry) in &desired.services {
            match id_of(frontend) {
                Some(id) => {
                    want.insert(
                        id,
                        ServiceNameValue::new(&entry.service.to_string(), kind_number(entry.kind)),
                    );
                    self.by_frontend.insert(*frontend, id);
                }
                None => {
                    self.unnamed.insert(*frontend);
                }
            }
        }
        let mut changed = 0;
        for (id, value) in &want {
            if self.written.get(id) != Some(value) {
                store.put_name(*id, value)?;
                self.written.insert(*id, *value);
                changed += 1;
            }
        }
        let gone: Vec<u32> = self
            .written
            .keys()
            .filter(|id| !want.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            store.delete_name(id)?;
            self.written.remove(&id);
            changed += 1;
        }
        self.needs_full = false;
        Ok(changed)
    }

    /// As [`NameWriter::sync`], visiting only `changed` frontends (those whose desired entry changed since the
    /// previous sync) and those that had no id last time; the same result when `desired` differs from the previous
    /// sync's only there. Falls back to a full sync when the last one did not complete.
    pub fn sync_changed(
        &mut self,
        store: &mut impl NameStore,
        desired: &DesiredState,
        changed: &BTreeSet<Frontend>,
        id_of: impl Fn(&Frontend) -> Option<u32>,
    ) -> Result<usize, MapsError> {
        if self.needs_full {
            return self.sync(store, desired, id_of);
        }
        self.needs_full = true;
        let visit: BTreeSet<Frontend> = changed.union(&self.unnamed).copied().collect();
        // Ids can move from a deleted frontend to a new one within one sync: collect both sides before writing.
        let mut released = BTreeSet::new();
        let mut want = BTreeMap::new();
        for frontend in &visit {
            if let Some(old) = self.by_frontend.remove(frontend) {
                released.insert(old);
            }
            self.unnamed.remove(frontend);
            let Some(entry) = desired.services.get(frontend) else {
                continue;
            };
            match id_of(frontend) {
                Some(id) => {
                    want.insert(
                        id,
                        ServiceNameValue::new(&entry.service.to_string(), kind_number(entry.kind)),
                    );
                    self.by_frontend.insert(*frontend, id);
                }
                None => {
                    self.unnamed.insert(*frontend);
                }
            }
        }
        let mut count = 0;
        for (id, value) in &want {
            if self.written.get(id) != Some(value) {
                store.put_name(*id, value)?;
                self.written.insert(*id, *value);
                count += 1;
            }
        }
        for id in released {
            if !want.contains_key(&id) && self.written.contains_key(&id) {
                store.delete_name(id)?;
                self.written.remove(&id);
                count += 1;
            }
        }
        self.needs_full = false;
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Algorithm, Protocol, Scope, ServiceEntry, ServicePortName};

    fn state(names: &[(&str, &str)]) -> DesiredState {
        let mut s = DesiredState::default();
        for (ip, name) in names {
            s.services.insert(
                Frontend {
                    addr: ip.parse().expect("ip"),
                    port: 80,
                    proto: Protocol::Tcp,
                    scope: Scope::Internal,
                },
                ServiceEntry {
                    service: ServicePortName {
                        namespace: "ns".into(),
                        name: (*name).into(),
                        port: "http".into(),
                    },
                    kind: VipKind::ClusterIp,
                    algorithm: Algorithm::Maglev,
                    affinity_timeout: None,
                    backends: vec![],
                    drop_if_empty: false,
                    source_ranges: vec![],
                },
            );
        }
        s
    }

    fn id_by_last_octet(f: &Frontend) -> Option<u32> {
        match f.addr {
            std::net::IpAddr::V4(a) => Some(u32::from(a.octets()[3])),
            std::net::IpAddr::V6(_) => None,
        }
    }

    #[test]
    fn names_follow_the_programmed_services_and_unchanged_ones_cost_nothing() {
        let mut store = FakeNames::default();
        let mut w = NameWriter::restore(&store).expect("restore");
        let s = state(&[("10.96.0.1", "web"), ("10.96.0.2", "db")]);
        assert_eq!(w.sync(&mut store, &s, id_by_last_octet).expect("sync"), 2);
        assert_eq!(store.names[&1].name(), "ns/web:http");
        assert_eq!(store.names[&2].kind, lb_common::VIP_KIND_CLUSTER_IP);

        let mut restarted = NameWriter::restore(&store).expect("restore");
        assert_eq!(
            restarted
                .sync(&mut store, &s, id_by_last_octet)
                .expect("sync"),
            0
        );

        let s = state(&[("10.96.0.2", "db")]);
        assert_eq!(
            restarted
                .sync(&mut store, &s, id_by_last_octet)
                .expect("sync"),
            1
        );
        assert_eq!(store.names.keys().copied().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn frontends_that_failed_to_program_get_no_name() {
        let mut store = FakeNames::default();
        let mut w = NameWriter::default();
        let s = state(&[("10.96.0.1", "web")]);
        assert_eq!(w.sync(&mut store, &s, |_| None).expect("sync"), 0);
        assert!(store.names.is_empty());
    }

    #[test]
    fn visiting_only_changed_frontends_writes_what_a_full_sync_writes() {
        // Random names, ids handed out and freed as the reconciler does (the smallest free id first, so ids move
        // between frontends), and frontends that fail to program now and then.
        let mut seed: u64 = 0x6e61_6d65;
        let mut rng = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let names = ["web", "db", "api", "dns"];
        let mut full_store = FakeNames::default();
        let mut delta_store = FakeNames::default();
        let mut full = NameWriter::default();
        let mut delta = NameWriter::default();
        let mut ids: BTreeMap<Frontend, u32> = BTreeMap::new();
        let mut desired = DesiredState::default();
        for step in 0..2000 {
            let previous = desired.clone();
            for _ in 0..1 + rng(3) {
                let ip = format!("10.96.0.{}", rng(12));
                let s = state(&[(ip.as_str(), names[rng(4) as usize])]);
                let (f, e) = s.services.into_iter().next().expect("one");
                if rng(3) == 0 {
                    desired.services.remove(&f);
                } else {
                    desired.services.insert(f, e);
                }
            }
            // Programming: a removed frontend's id is freed; unprogrammed frontends get the smallest free id,
            // unless they fail this time.
            ids.retain(|f, _| desired.services.contains_key(f));
            for f in desired.services.keys() {
                if !ids.contains_key(f) && rng(5) != 0 {
                    let used: BTreeSet<u32> = ids.values().copied().collect();
                    let id = (1..).find(|i| !used.contains(i)).expect("an id");
                    ids.insert(*f, id);
                }
            }
            let changed: BTreeSet<Frontend> = desired
                .services
                .keys()
                .chain(previous.services.keys())
                .filter(|f| desired.services.get(f) != previous.services.get(f))
                .copied()
                .collect();
            full.sync(&mut full_store, &desired, |f| ids.get(f).copied())
                .expect("sync");
            delta
                .sync_changed(&mut delta_store, &desired, &changed, |f| {
                    ids.get(f).copied()
                })
                .expect("sync");
            assert_eq!(delta_store.names, full_store.names, "step {step}");
        }
        assert!(
            delta_store.writes < full_store.writes * 2,
            "sanity: both wrote"
        );
    }
}
