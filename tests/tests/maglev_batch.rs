//! `LB_MAGLEV` written in batches (`Maps::put_tables` / `delete_tables` on the real kernel): every table lands
//! whole, deletes tolerate absent ids, and a reconciler sync of many services stays correct. Times are printed for
//! comparison, never asserted (an RCU grace period depends on the machine's load).
//!
//! Nothing is attached: the object is loaded into a private pin directory only.

use std::time::Instant;

use lb_agent::datapath::loader::{self, PinDir};
use lb_agent::datapath::maps::{Maps, MapsRead};
use lb_agent::datapath::pins::Capacities;
use lb_agent::datapath::reconcile::{ReconcileConfig, Reconciler};
use lb_agent::model::{self, ModelConfig};
use lb_agent::source::manifest;
use lb_tests::bench::workload;
use lb_tests::{BpfDir, require_root, unique_token};

fn load(tag: &str) -> (loader::Datapath, BpfDir) {
    let dir = BpfDir::new(&format!("lb-test-{tag}-{}", unique_token())).expect("pin directory");
    let object = loader::object_bytes(None)
        .expect("the eBPF object (run `cargo xtask build-ebpf --release` before the tests)");
    let caps = Capacities {
        backends: lb_tests::bench::control::MAX_BACKENDS,
        ..Capacities::default()
    };
    let dp = loader::load(&object, &PinDir::new(dir.path()), &caps).expect("loading the object");
    (dp, dir)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[test]
fn tables_are_installed_and_deleted_in_batches() {
    if !require_root("tables_are_installed_and_deleted_in_batches") {
        return;
    }
    let (mut dp, _dir) = load("batch");
    let maps = &mut dp.maps;
    // More than one chunk of `put_tables` (1024 tables per batch).
    let n = 1100u32;
    let tables: Vec<(u32, Vec<u32>)> = (1..=n)
        .map(|id| (id, (0..(id % 7 + 1)).map(|s| id * 10 + s).collect()))
        .collect();
    let t = Instant::now();
    let failed = maps.put_tables(&tables);
    let batch_put = ms(t);
    assert!(failed.is_empty(), "{failed:?}");
    for (id, slots) in &tables {
        assert_eq!(maps.table(*id).expect("read").as_ref(), Some(slots));
    }
    // Replacing existing tables is the same batch.
    let replaced: Vec<(u32, Vec<u32>)> = tables.iter().map(|(id, _)| (*id, vec![*id])).collect();
    assert!(maps.put_tables(&replaced).is_empty());
    assert_eq!(maps.table(7).expect("read"), Some(vec![7]));

    // Absent ids (never written) are deleted already.
    let ids: Vec<u32> = (1..=n).chain([5000, 5001]).collect();
    let t = Instant::now();
    let failed = maps.delete_tables(&ids);
    let batch_delete = ms(t);
    assert!(failed.is_empty(), "{failed:?}");
    for id in 1..=n {
        assert_eq!(maps.table(id).expect("read"), None, "table {id} deleted");
    }

    // Tables at the largest default size, filled by one batch each: every slot lands, in order.
    let big: Vec<(u32, Vec<u32>)> = (1..=4u32)
        .map(|id| {
            (
                id,
                (0..16381u32)
                    .map(|s| s.wrapping_mul(2_654_435_761) ^ id)
                    .collect(),
            )
        })
        .collect();
    let t = Instant::now();
    let failed = maps.put_tables(&big);
    let big_put = ms(t) / big.len() as f64;
    assert!(failed.is_empty(), "{failed:?}");
    for (id, slots) in &big {
        assert_eq!(
            maps.table(*id).expect("read").as_ref(),
            Some(slots),
            "table {id}"
        );
    }
    maps.put_table(9, &big[0].1).expect("put_table");
    assert_eq!(maps.table(9).expect("read").as_ref(), Some(&big[0].1));
    assert!(maps.delete_tables(&[1, 2, 3, 4, 9]).is_empty());

    let k = 10u32;
    let t = Instant::now();
    for id in 1..=k {
        maps.put_table(id, &[id]).expect("put_table");
    }
    let single = ms(t) / f64::from(k);
    eprintln!(
        "LB_MAGLEV: {n} tables by put_tables (batches of 1024) {batch_put:.1} ms, {n} deleted in one batch \
         {batch_delete:.1} ms; \
         one table at a time {single:.1} ms each; a 16381-slot table {big_put:.1} ms each"
    );
}

#[test]
fn reconciler_programs_many_services_with_one_batch() {
    if !require_root("reconciler_programs_many_services_with_one_batch") {
        return;
    }
    let (mut dp, _dir) = load("rec");
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
    assert_eq!(report.tables_written, desired.services.len());
    for key in desired
        .services
        .keys()
        .map(lb_agent::datapath::reconcile::service_key)
    {
        let id = r.service_id(&key).expect("programmed");
        assert!(dp.maps.table(id).expect("read").is_some(), "table of {id}");
    }

    // One endpoint change (two tables: the ClusterIP's two frontends).
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
    assert_eq!((report.tables_written, report.backends_deleted), (2, 1));

    // A restarted reconciler adopts everything and writes nothing.
    let mut adopted = Reconciler::restore(&dp.maps, rcfg).expect("restore");
    let report = adopted.sync(&mut dp.maps, &changed);
    assert!(!report.changed(), "{report:?}");

    // Every service gone: entries, then all tables in one batched delete.
    let t = Instant::now();
    let report = adopted.sync(&mut dp.maps, &Default::default());
    let delete_all = ms(t);
    assert_eq!(report.services_deleted, changed.services.len());
    assert!(dp.maps.services().expect("services").is_empty());
    eprintln!(
        "reconciler, {} frontends x 10 endpoints: first sync {first:.0} ms, one endpoint change {change:.1} ms, \
         delete all {delete_all:.0} ms",
        desired.services.len()
    );
}
