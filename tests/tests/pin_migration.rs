//! Upgrading from the previous map layout: `LB_SERVICES` with 20-byte values and `LB_MAGLEV` as a hash of maps
//! (one inner array `[len, slot...]` per service id). The pins of that layout are built here byte for byte as the
//! previous agent left them, from the state a current agent programmed; a restarted agent must migrate them through
//! `pins`: every frontend keeps its service id, every table its slots (so no flow moves), the old pins go once the
//! new maps are filled, and the programs attach only then.

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
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]
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
