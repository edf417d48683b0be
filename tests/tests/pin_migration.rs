//! Upgrading from the previous map layout: `LB_SERVICES` with 20-byte values and `LB_MAGLEV` as a hash of maps
//! (one inner array `[len, slot...]` per service id). The pins of that layout are built here byte for byte as the
//! previous agent left them, from the state a current agent programmed; a restarted agent must migrate them through
//! `pins`: every frontend keeps its service id, every table its slots (so no flow moves), the old pins go once the
//! new maps are filled, and the programs attach only then. Also the layout before ClientIP affinity became one per
//! Service port (`LB_SERVICES` values of 32 bytes, `LB_AFFINITY` values of 16).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use lb_agent::datapath::maps::{MapsRead, PinnedMaps};
use lb_common::{ServiceKey, map_names};
use lb_tests::{Agent, Topology, agent_bin, probe, require_root};

const VIP: &str = "10.96.0.10";

fn manifest(backends: usize) -> String {
    manifest_with(backends, "")
}

/// The manifest with `spec` lines added to the Service (two-space indented).
fn manifest_with(backends: usize, spec: &str) -> String {
    let mut endpoints = String::new();
    for i in 0..backends {
        endpoints.push_str(&format!(
            "  - addresses: [10.244.{}.2]\n    conditions: {{ready: true}}\n    nodeName: test-node\n",
            i + 1
        ));
    }
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {VIP}
{spec}  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints:
{endpoints}"#
    )
}

// bpf(2) as the previous agent's maps need it (aya creates neither a hash of maps nor maps of foreign layouts).

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const MAP_TYPE_HASH: u32 = 1;
const MAP_TYPE_ARRAY: u32 = 2;
const MAP_TYPE_LRU_HASH: u32 = 9;
const MAP_TYPE_HASH_OF_MAPS: u32 = 13;
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_F_INNER_MAP: u32 = 1 << 12;

#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct PinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, its size is passed, and every
    // pointer in it points at memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn create(
    map_type: u32,
    key: u32,
    value: u32,
    max: u32,
    flags: u32,
    inner: Option<&OwnedFd>,
) -> OwnedFd {
    let mut attr = CreateAttr {
        map_type,
        key_size: key,
        value_size: value,
        max_entries: max,
        map_flags: flags,
        inner_map_fd: inner.map_or(0, |f| f.as_raw_fd() as u32),
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr).expect("BPF_MAP_CREATE");
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn update(map: &OwnedFd, key: &[u8], value: &[u8]) {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        ..ElemAttr::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).expect("BPF_MAP_UPDATE_ELEM");
}

fn pin(map: &OwnedFd, path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut attr = PinAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: map.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).expect("BPF_OBJ_PIN");
}

fn key_bytes(k: &ServiceKey) -> Vec<u8> {
    let mut b = k.addr.to_vec();
    b.extend_from_slice(&k.port.to_ne_bytes());
    b.extend_from_slice(&[k.proto, k.scope]);
    b
}

#[test]
fn the_previous_layout_is_migrated_keeping_ids_and_tables() {
    if !require_root("the_previous_layout_is_migrated_keeping_ids_and_tables") {
        return;
    }
    let probe = probe!();
    let mut topo = Topology::star(3).expect("topology");
    topo.serve(&probe, &[8080], &[]).expect("backend servers");
    let mut agent = Agent::start(&agent_bin!(), &topo, &manifest(3)).expect("agent");
    let dir = agent.pins().to_path_buf();

    // What the current agent programmed: entries, and each entry's table as backend ids slot by slot.
    let (entries, tables) = {
        let maps = PinnedMaps::open(&dir).expect("pinned maps");
        let entries = maps.services().expect("services");
        let tables: BTreeMap<ServiceKey, Vec<u32>> = entries
            .iter()
            .filter_map(|(k, v)| Some((*k, maps.table(v).expect("read")?)))
            .collect();
        (entries, tables)
    };
    assert!(!tables.is_empty(), "the service has tables");
    agent.kill();

    // The same state in the previous layout, under other service ids (1000 + id) so that keeping them shows.
    for name in [
        map_names::SERVICES,
        map_names::MAGLEV,
        map_names::MAGLEV_SLOTS,
    ] {
        std::fs::remove_file(dir.join(name)).expect("removing a current-layout pin");
    }
    let services = create(MAP_TYPE_HASH, 20, 20, 65536, BPF_F_NO_PREALLOC, None);
    let template = create(MAP_TYPE_ARRAY, 4, 4, 1, BPF_F_INNER_MAP, None);
    let maglev = create(
        MAP_TYPE_HASH_OF_MAPS,
        4,
        4,
        65536,
        BPF_F_NO_PREALLOC,
        Some(&template),
    );
    let mut old_ids = BTreeMap::new();
    for (key, v) in &entries {
        let id = 1000 + v.service_id;
        old_ids.insert(*key, id);
        // { service_id, backend_count, affinity_timeout, algorithm, flags, pad[2], table_hash }
        let mut value = Vec::with_capacity(20);
        value.extend_from_slice(&id.to_ne_bytes());
        value.extend_from_slice(&v.backend_count.to_ne_bytes());
        value.extend_from_slice(&v.affinity_timeout.to_ne_bytes());
        value.extend_from_slice(&[v.algorithm, v.flags, 0, 0]);
        value.extend_from_slice(&(v.table_hash as u32).to_ne_bytes());
        update(&services, &key_bytes(key), &value);
        if let Some(slots) = tables.get(key) {
            let inner = create(
                MAP_TYPE_ARRAY,
                4,
                4,
                slots.len() as u32 + 1,
                BPF_F_INNER_MAP,
                None,
            );
            update(
                &inner,
                &0u32.to_ne_bytes(),
                &(slots.len() as u32).to_ne_bytes(),
            );
            for (i, s) in slots.iter().enumerate() {
                update(&inner, &(i as u32 + 1).to_ne_bytes(), &s.to_ne_bytes());
            }
            update(
                &maglev,
                &id.to_ne_bytes(),
                &(inner.as_raw_fd() as u32).to_ne_bytes(),
            );
        }
    }
    pin(&services, &dir.join(map_names::SERVICES));
    pin(&maglev, &dir.join(map_names::MAGLEV));
    drop((services, maglev, template));

    agent.restart().expect("the upgraded agent starts");
    let log = agent.log();
    assert!(log.contains("maps of a new layout"), "{log}");
    assert!(log.contains("migrated maps refilled"), "{log}");
    let pending: Vec<_> = std::fs::read_dir(&dir)
        .expect("pin dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(":pending"))
        .collect();
    assert!(pending.is_empty(), "old pins left: {pending:?}");

    let maps = PinnedMaps::open(&dir).expect("pinned maps");
    let migrated = maps.services().expect("services");
    assert_eq!(migrated.len(), entries.len());
    for (key, v) in &migrated {
        assert_eq!(Some(&v.service_id), old_ids.get(key), "{key:?} kept its id");
        assert_eq!(
            maps.table(v).expect("read").as_ref(),
            tables.get(key),
            "{key:?}: every slot names the backend it named before"
        );
    }
    assert!(
        log.contains("written=2"),
        "the entries were written once, into the new maps:\n{log}"
    );

    // The programs attached after the fill serve the ClusterIP.
    let vip = SocketAddr::new(VIP.parse().expect("vip"), 80);
    let lines = topo
        .in_client(probe.tcp_cmd(vip, 20))
        .run(Duration::from_secs(60))
        .expect("client run")
        .probe_lines()
        .expect("client output");
    assert_eq!(lines.len(), 20, "{lines:?}");
    assert!(
        lines.iter().all(|l| l.ok),
        "every connection answered: {lines:?}"
    );
}

/// The layout of per-frontend affinity: `LB_SERVICES` values without the affinity id (32 bytes), `LB_AFFINITY`
/// values without the table hash (16 bytes), keyed by service id. A restarted agent migrates both: the frontends
/// keep their ids, the new entries carry the Service port's affinity id, the old affinity entries (keyed by what is
/// now no affinity id) are dropped with their map, and ClientIP affinity works on the new one.
#[test]
fn the_per_frontend_affinity_layout_is_migrated() {
    if !require_root("the_per_frontend_affinity_layout_is_migrated") {
        return;
    }
    let probe = probe!();
    let mut topo = Topology::star(3).expect("topology");
    topo.serve(&probe, &[8080], &[]).expect("backend servers");
    let spec = "  sessionAffinity: ClientIP\n";
    let mut agent = Agent::start(&agent_bin!(), &topo, &manifest_with(3, spec)).expect("agent");
    let dir = agent.pins().to_path_buf();
    let entries = PinnedMaps::open(&dir)
        .expect("pinned maps")
        .services()
        .expect("services");
    assert!(
        entries.iter().all(|(_, v)| v.affinity_id != 0),
        "{entries:?}"
    );
    agent.kill();

    for name in [map_names::SERVICES, map_names::AFFINITY] {
        std::fs::remove_file(dir.join(name)).expect("removing a current-layout pin");
    }
    let services = create(MAP_TYPE_HASH, 20, 32, 65536, BPF_F_NO_PREALLOC, None);
    let mut old_ids = BTreeMap::new();
    for (key, v) in &entries {
        let id = 1000 + v.service_id;
        old_ids.insert(*key, id);
        // { service_id, backend_count, affinity_timeout, algorithm, flags, slot_width, pad, table_offset,
        //   table_size, table_hash }: today's value without its last field.
        let mut value = Vec::with_capacity(32);
        value.extend_from_slice(&id.to_ne_bytes());
        value.extend_from_slice(&v.backend_count.to_ne_bytes());
        value.extend_from_slice(&v.affinity_timeout.to_ne_bytes());
        value.extend_from_slice(&[v.algorithm, v.flags, v.slot_width, 0]);
        value.extend_from_slice(&v.table_offset.to_ne_bytes());
        value.extend_from_slice(&v.table_size.to_ne_bytes());
        value.extend_from_slice(&v.table_hash.to_ne_bytes());
        update(&services, &key_bytes(key), &value);
    }
    // { netns cookie, client address, service id, pad } -> { backend id, pad, last use }
    let affinity = create(MAP_TYPE_LRU_HASH, 32, 16, 65536, 0, None);
    let mut key = vec![0u8; 32];
    key[24..28].copy_from_slice(&1001u32.to_ne_bytes());
    update(&affinity, &key, &[1u8; 16]);
    pin(&services, &dir.join(map_names::SERVICES));
    pin(&affinity, &dir.join(map_names::AFFINITY));
    drop((services, affinity));

    agent.restart().expect("the upgraded agent starts");
    let log = agent.log();
    assert!(log.contains("maps of a new layout"), "{log}");
    let maps = PinnedMaps::open(&dir).expect("pinned maps");
    let migrated = maps.services().expect("services");
    assert_eq!(migrated.len(), entries.len());
    for (key, v) in &migrated {
        assert_eq!(Some(&v.service_id), old_ids.get(key), "{key:?} kept its id");
        let before = entries.iter().find(|(k, _)| k == key).expect("entry").1;
        assert_eq!(
            v.affinity_id, before.affinity_id,
            "{key:?}: the Service port's id"
        );
        assert_eq!(v.table_hash, before.table_hash, "{key:?}: the same table");
    }
    let info = aya::maps::MapInfo::from_pin(dir.join(map_names::AFFINITY)).expect("affinity pin");
    assert_eq!(
        info.value_size(),
        size_of::<lb_common::AffinityValue>() as u32
    );
    assert_eq!(
        maps.affinity_entries().expect("affinity").len(),
        0,
        "the old entries went with their map"
    );

    // ClientIP affinity on the new map: 20 connections from the client, one backend.
    let vip = SocketAddr::new(VIP.parse().expect("vip"), 80);
    let lines = topo
        .in_client(probe.tcp_cmd(vip, 20))
        .run(Duration::from_secs(60))
        .expect("client run")
        .probe_lines()
        .expect("client output");
    assert!(
        lines.len() == 20 && lines.iter().all(|l| l.ok),
        "every connection answered: {lines:?}"
    );
    let backends: std::collections::BTreeSet<_> = lines.iter().map(|l| l.backend.clone()).collect();
    assert_eq!(backends.len(), 1, "affinity holds: {lines:?}");
    assert_eq!(maps.affinity_entries().expect("affinity").len(), 1);
}

/// The conntrack layout before the shared key directions, jiffies stamps and per-CPU LRU lists: an LRU hash with one
/// common list, the SNAT pair under its own directions (2, 3) and `bpf_ktime_get_ns()` stamps. A restarted agent
/// must move the pin aside (its flags differ), carry every entry into the new map in the new form (so established
/// flows keep their backend and SNAT port), and drop the old pin.
#[test]
fn the_previous_conntrack_is_carried_into_per_cpu_lru_lists() {
    use lb_common::{
        BPF_F_NO_COMMON_LRU, CT_DIR_FWD, CT_DIR_REPLY, CT_DIR_SNAT, CT_DIR_SNAT_REPLY,
        CT_FLAG_SNAT, CT_FLAG_SNAT_PAIR, CT_LIFETIME_TCP_S, CtKey, CtValue,
    };
    if !require_root("the_previous_conntrack_is_carried_into_per_cpu_lru_lists") {
        return;
    }
    let topo = Topology::star(1).expect("topology");
    let mut agent = Agent::start(&agent_bin!(), &topo, &manifest(1)).expect("agent");
    let dir = agent.pins().to_path_buf();
    let (service_id, max) = {
        let maps = PinnedMaps::open(&dir).expect("pinned maps");
        let entries = maps.services().expect("services");
        let info = aya::maps::MapInfo::from_pin(dir.join(map_names::CONNTRACK)).expect("info");
        assert_eq!(
            info.map_flags() & BPF_F_NO_COMMON_LRU,
            BPF_F_NO_COMMON_LRU,
            "this build's conntrack has per-CPU lists"
        );
        (entries[0].1.service_id, info.max_entries())
    };
    agent.kill();
    std::fs::remove_file(dir.join(map_names::CONNTRACK)).expect("removing the conntrack pin");
    let old = create(
        MAP_TYPE_LRU_HASH,
        size_of::<CtKey>() as u32,
        size_of::<CtValue>() as u32,
        max,
        0,
        None,
    );
    let mono_ns = lb_agent::datapath::packet_maps::monotonic_ns();
    let key = |saddr: [u8; 4], daddr: [u8; 4], sport, dport, dir| {
        let mut k = CtKey {
            saddr: [0; 16],
            daddr: [0; 16],
            sport,
            dport,
            proto: 6,
            dir,
            _pad: [0; 2],
        };
        k.saddr[10..12].copy_from_slice(&[0xff, 0xff]);
        k.saddr[12..].copy_from_slice(&saddr);
        k.daddr[10..12].copy_from_slice(&[0xff, 0xff]);
        k.daddr[12..].copy_from_slice(&daddr);
        k
    };
    let value = CtValue {
        last_seen_jiffies: mono_ns,
        service_id,
        backend_id: 1,
        lifetime_s: CT_LIFETIME_TCP_S,
        flags: CT_FLAG_SNAT,
        ..CtValue::default()
    };
    let legacy = [
        key([203, 0, 113, 9], [10, 0, 0, 1], 40000, 30080, CT_DIR_FWD),
        key([10, 244, 1, 2], [203, 0, 113, 9], 8080, 40000, CT_DIR_REPLY),
        key([203, 0, 113, 9], [10, 244, 1, 2], 40000, 8080, CT_DIR_SNAT),
        key(
            [10, 244, 1, 2],
            [10, 0, 0, 1],
            8080,
            40000,
            CT_DIR_SNAT_REPLY,
        ),
    ];
    let bytes = |p: *const u8, n: usize| {
        // SAFETY: `p` points at a live plain-data value of `n` bytes.
        unsafe { std::slice::from_raw_parts(p, n) }.to_vec()
    };
    for k in &legacy {
        update(
            &old,
            &bytes((k as *const CtKey).cast(), size_of::<CtKey>()),
            &bytes((&value as *const CtValue).cast(), size_of::<CtValue>()),
        );
    }
    pin(&old, &dir.join(map_names::CONNTRACK));
    drop(old);

    agent.restart().expect("the upgraded agent starts");
    let log = agent.log();
    assert!(log.contains("maps of a new layout"), "{log}");
    assert!(
        log.contains("carried=4"),
        "every entry was carried over:\n{log}"
    );
    let info = aya::maps::MapInfo::from_pin(dir.join(map_names::CONNTRACK)).expect("info");
    assert_eq!(info.map_flags() & BPF_F_NO_COMMON_LRU, BPF_F_NO_COMMON_LRU);
    assert!(
        !dir.join(format!("{}:pending", map_names::CONNTRACK))
            .exists(),
        "the old pin went"
    );
    let data = aya::maps::MapData::from_pin(dir.join(map_names::CONNTRACK)).expect("pin");
    let map: aya::maps::HashMap<_, CtKey, CtValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("layout");
    let now = lb_agent::datapath::clock::jiffies_now(lb_agent::datapath::clock::kernel_hz());
    let got: Vec<(CtKey, CtValue)> = map.iter().map(|e| e.expect("entry")).collect();
    assert_eq!(got.len(), 4, "{got:?}");
    // (source port, destination's last byte) -> (direction, flags): the SNAT pair moved to the shared directions,
    // told apart by `CT_FLAG_SNAT_PAIR`.
    let want = [
        ((40000, 1), CT_DIR_FWD, CT_FLAG_SNAT),
        ((8080, 9), CT_DIR_REPLY, CT_FLAG_SNAT),
        ((40000, 2), CT_DIR_REPLY, CT_FLAG_SNAT | CT_FLAG_SNAT_PAIR),
        ((8080, 1), CT_DIR_FWD, CT_FLAG_SNAT | CT_FLAG_SNAT_PAIR),
    ];
    for ((sport, last), dir, flags) in want {
        let (k, v) = got
            .iter()
            .find(|(k, _)| k.sport == sport && k.daddr[15] == last)
            .unwrap_or_else(|| panic!("no entry from port {sport} to .{last}: {got:?}"));
        assert_eq!((k.dir, v.flags), (dir, flags), "{k:?}");
        assert!(
            v.last_seen_jiffies <= now + 1,
            "{k:?}: stamp {} is jiffies now (now {now})",
            v.last_seen_jiffies
        );
    }
}

/// The layout before the backend epoch: `LB_CONFIG` values of 64 bytes. A restarted agent must move that pin aside,
/// write the node's configuration into the new map (with a backend epoch, so established flows are checked once
/// more), drop the old pin, and keep `LB_CONNTRACK` (its layout did not change): established tc flows survive.
#[test]
fn the_previous_config_layout_is_migrated_keeping_conntrack() {
    use lb_common::ConfigValue;
    if !require_root("the_previous_config_layout_is_migrated_keeping_conntrack") {
        return;
    }
    let topo = Topology::star(1).expect("topology");
    let mut agent = Agent::start(&agent_bin!(), &topo, &manifest(1)).expect("agent");
    let dir = agent.pins().to_path_buf();
    let conntrack_id = || {
        aya::maps::MapInfo::from_pin(dir.join(map_names::CONNTRACK))
            .expect("conntrack info")
            .id()
    };
    let before = conntrack_id();
    agent.kill();
    std::fs::remove_file(dir.join(map_names::CONFIG)).expect("removing the config pin");
    let old = create(MAP_TYPE_ARRAY, 4, 64, 1, 0, None);
    // The previous value: SNAT addresses (none), flags (none), hz 250, no host namespace cookie, default
    // conntrack lifetimes.
    let mut value = vec![0u8; 64];
    value[36..40].copy_from_slice(&250u32.to_ne_bytes());
    update(&old, &0u32.to_ne_bytes(), &value);
    pin(&old, &dir.join(map_names::CONFIG));
    drop(old);

    agent.restart().expect("the upgraded agent starts");
    let log = agent.log();
    assert!(log.contains("maps of a new layout"), "{log}");
    let info = aya::maps::MapInfo::from_pin(dir.join(map_names::CONFIG)).expect("config info");
    assert_eq!(info.value_size(), size_of::<ConfigValue>() as u32);
    assert!(
        !dir.join(format!("{}:pending", map_names::CONFIG)).exists(),
        "the old pin went"
    );
    let config = PinnedMaps::open(&dir)
        .expect("pinned maps")
        .config()
        .expect("LB_CONFIG");
    assert!(config.hz != 0, "the configuration was written: {config:?}");
    assert_ne!(config.backend_epoch, 0, "{config:?}");
    assert_eq!(
        conntrack_id(),
        before,
        "LB_CONNTRACK is kept as it was (established flows)"
    );
}
