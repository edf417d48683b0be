//! The slot array behind `LB_MAGLEV` on the real kernel: tables written through the agent's memory mappings read
//! back whole, the array grows without losing a table, a restarted agent adopts it from its pin (finishing an
//! interrupted growth), and the reconciler stores identical tables once. Times are printed for comparison, never
//! asserted.
//!
//! Nothing is attached: the object is loaded into a private pin directory only.

use std::time::Instant;

use lb_agent::datapath::loader::{self, PinDir};
use lb_agent::datapath::lut::Encoded;
use lb_agent::datapath::maps::{Maps, MapsRead};
use lb_agent::datapath::pins::Capacities;
use lb_agent::datapath::reconcile::{ReconcileConfig, Reconciler, service_key};
use lb_agent::model::{self, ModelConfig};
use lb_agent::source::manifest;
use lb_common::{LUT_BLOCK_BYTES, map_names};
use lb_tests::bench::workload;
use lb_tests::{BpfDir, require_root, unique_token};

fn load_into(dir: &BpfDir) -> loader::Datapath {
    let object = loader::object_bytes(None)
        .expect("the eBPF object (run `cargo xtask build-ebpf --release` before the tests)");
    let caps = Capacities {
        backends: lb_tests::bench::control::MAX_BACKENDS,
        ..Capacities::default()
    };
    loader::load(&object, &PinDir::new(dir.path()), &caps).expect("loading the object")
}

fn pin_dir(tag: &str) -> BpfDir {
    BpfDir::new(&format!("lb-test-{tag}-{}", unique_token())).expect("pin directory")
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[test]
fn the_slot_array_grows_keeps_its_tables_and_is_adopted_from_its_pin() {
    if !require_root("the_slot_array_grows_keeps_its_tables_and_is_adopted_from_its_pin") {
        return;
    }
    let dir = pin_dir("slots");
    let mut dp = load_into(&dir);
    let maps = &mut dp.maps;
    assert_eq!(maps.slot_capacity(), 0, "no array before the first table");
    let t = Instant::now();
    let capacity = maps.grow_slots(100_000, 0).expect("create");
    let create = ms(t);
    assert!(
        capacity >= 100_000 && capacity.is_multiple_of(4096),
        "{capacity}"
    );
    assert_eq!(
        maps.fences_completed(),
        maps.fences_started(),
        "the growth was a fence"
    );

    // Tables of every width at scattered offsets, written in one call.
    let tables: Vec<(u64, Encoded)> = [1u32, 10, 300, 70_000]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let ids: Vec<u32> = (0..n).map(|b| 1 + b * 7 + i as u32).collect();
            let size = if n > 1000 { 32749 } else { 2039 };
            let slots: Vec<u32> = (0..size).map(|s| (s * 31 + 7) % n).collect();
            (
                i as u64 * 9 * u64::from(LUT_BLOCK_BYTES) * 7,
                Encoded::maglev(&ids, &slots),
            )
        })
        .collect();
    // The 70000-backend table is a plain one (u32 slots) at the end; place it after the others.
    let mut at = 0;
    let placed: Vec<(u64, &Encoded)> = tables
        .iter()
        .map(|(_, e)| {
            let o = at;
            at += e.layout.region_len();
            (o, e)
        })
        .collect();
    assert!(
        at > capacity,
        "the big table needs a growth: {at} > {capacity}"
    );
    let t = Instant::now();
    let grown = maps.grow_slots(at, 0).expect("grow");
    let grow = ms(t);
    let writes: Vec<(u64, &[u8])> = placed
        .iter()
        .map(|(o, e)| (*o, e.bytes.as_slice()))
        .collect();
    let t = Instant::now();
    maps.write_slots(&writes).expect("write");
    let write = ms(t);
    let read_back = |maps: &dyn Maps| {
        for (o, e) in &placed {
            let bytes = maps.read_slots(*o, e.layout.region_len()).expect("read");
            assert_eq!(&bytes, &e.bytes, "table at {o}");
        }
    };
    read_back(maps);
    // Growing again keeps every byte below `keep`.
    let t = Instant::now();
    maps.grow_slots(grown * 2, at).expect("grow again");
    let regrow = ms(t);
    read_back(maps);

    // A restarted agent adopts the array from its pin.
    drop(dp);
    let mut dp = load_into(&dir);
    assert_eq!(dp.maps.slot_capacity(), grown * 2 / 4096 * 4096);
    read_back(&dp.maps);

    // Killed after installing a grown array, before renaming its pin: the next start finishes the step.
    let pin = dir.path().join(map_names::MAGLEV_SLOTS);
    let next = dir.path().join(format!("{}:next", map_names::MAGLEV_SLOTS));
    let before = dp.maps.slot_capacity();
    dp.maps.grow_slots(before + 4096, at).expect("grow");
    std::fs::rename(&pin, &next).expect("simulating the interrupted rename");
    drop(dp);
    let dp = load_into(&dir);
    assert_eq!(dp.maps.slot_capacity(), before + 4096);
    assert!(pin.exists() && !next.exists());
    read_back(&dp.maps);

    // An `LB_MAGLEV` replaced by a fresh one (its pin gone): the pinned array is installed into it again.
    drop(dp);
    std::fs::remove_file(dir.path().join(map_names::MAGLEV)).expect("removing the LB_MAGLEV pin");
    let dp = load_into(&dir);
    assert_eq!(dp.maps.slot_capacity(), before + 4096);
    read_back(&dp.maps);
    eprintln!(
        "slot array: created {create:.1} ms, grown to {} KiB {grow:.1} ms, {} tables ({} KiB) written {write:.2} ms, \
         doubled with a copy {regrow:.1} ms",
        grown >> 10,
        placed.len(),
        at >> 10
    );
}

#[test]
fn reconciler_programs_many_services_sharing_tables() {
    if !require_root("reconciler_programs_many_services_sharing_tables") {
        return;
    }
    let dir = pin_dir("rec");
    let mut dp = load_into(&dir);
    let n = 300;
    let mut objects = {
        let (objects, diags) = manifest::parse_manifests(
            "test",
            &workload::manifest(&workload::services(n, 10, false)),
        );
        assert!(diags.is_empty(), "{diags:?}");
        objects
    };
    let cfg = ModelConfig::default();
    let node = model::node_context(workload::NODE_NAME, &objects.nodes, &cfg);
    let rcfg = ReconcileConfig {
        max_backends: lb_tests::bench::control::MAX_BACKENDS,
        ..ReconcileConfig::default()
    };
    let mut r = Reconciler::restore(&dp.maps, rcfg.clone()).expect("restore");
    let desired = model::translate(&objects, &node, &cfg).state;
    let t = Instant::now();
    let report = r.sync(&mut dp.maps, &desired);
    let first = ms(t);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    // Each ClusterIP's External and Internal frontends (both policies Cluster) share one table.
    assert_eq!(report.tables_written, n);
    assert_eq!(desired.services.len(), 2 * n);
    for (frontend, entry) in &desired.services {
        let value = dp
            .maps
            .service(&service_key(frontend))
            .expect("lookup")
            .expect("programmed");
        let table = dp.maps.table(&value).expect("read").expect("a table");
        let backends = dp.maps.backends().expect("backends");
        let addrs: std::collections::BTreeSet<_> = table
            .iter()
            .map(|id| {
                backends
                    .iter()
                    .find(|(b, _)| b == id)
                    .map(|(_, v)| v.ip())
                    .expect("every slot names a backend")
            })
            .collect();
        let wanted: std::collections::BTreeSet<_> = entry.backends.iter().map(|b| b.addr).collect();
        assert_eq!(
            addrs, wanted,
            "{frontend}: its own backends, each in some slot"
        );
    }

    // One endpoint change: one new table for both frontends.
    let slice = std::sync::Arc::make_mut(&mut objects.endpoint_slices[n / 2]);
    let ep = slice
        .endpoints
        .as_mut()
        .and_then(|e| e.first_mut())
        .expect("an endpoint");
    ep.addresses = vec!["10.64.0.1".into()];
    let changed = model::translate(&objects, &node, &cfg).state;
    let t = Instant::now();
    let report = r.sync(&mut dp.maps, &changed);
    let change = ms(t);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!((report.tables_written, report.backends_deleted), (1, 1));

    // A restarted agent adopts everything and writes nothing.
    drop(r);
    drop(dp);
    let mut dp = load_into(&dir);
    let mut adopted = Reconciler::restore(&dp.maps, rcfg).expect("restore");
    let t = Instant::now();
    let report = adopted.sync(&mut dp.maps, &changed);
    let adopt = ms(t);
    assert!(!report.changed(), "{report:?}");
    assert!(!adopted.needs_full_sync());

    // Every service gone: entries, then backends; tables need no syscall.
    let t = Instant::now();
    let report = adopted.sync(&mut dp.maps, &Default::default());
    let delete_all = ms(t);
    assert_eq!(report.services_deleted, changed.services.len());
    assert!(dp.maps.services().expect("services").is_empty());
    eprintln!(
        "reconciler: {n} services x 10 ({} frontends, {n} tables) first sync {first:.0} ms, one endpoint change \
         {change:.2} ms, adoption after a restart {adopt:.0} ms, all deleted {delete_all:.0} ms",
        2 * n
    );
}
