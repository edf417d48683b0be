//! No packet ever sees a half-written table or a table of another Service, while tables are replaced, freed and
//! their regions reused as fast as the reconciler can: one thread churns the backends of many Services (each drawn
//! from an address pool of its own, so the table sizes and the regions they take keep changing), another runs
//! `lb_tc_ingress` on new flows to those Services with BPF_PROG_TEST_RUN at the same time and checks that every
//! packet is forwarded to a backend of its own Service.
//!
//! A region an entry stopped pointing at is reused only after an RCU grace period (`rcu_fence`): writing a new
//! table into it earlier would let a packet that read the old entry pick from another Service's table, which the
//! prober would catch as a backend outside its Service's pool.
//!
//! Nothing is attached: the object is loaded into a private pin directory only.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb_agent::datapath::loader::{self, PinDir};
use lb_agent::datapath::pins::Capacities;
use lb_agent::datapath::reconcile::{ReconcileConfig, Reconciler, service_key};
use lb_agent::state::{
    Algorithm, Backend, DesiredState, Frontend, Protocol, Scope, ServiceEntry, ServicePortName,
    VipKind,
};
use lb_agent::trace::packet;
use lb_common::prog_names;
use lb_tests::{BpfDir, require_root, unique_token};

const SERVICES: u8 = 40;
const POOL: u8 = 20;
const CHANGES: usize = 3000;

fn vip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 7, i + 1)
}

/// Service `i`'s endpoints come from 10.100.i.0/24 only.
fn pool_addr(i: u8, j: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, i, j + 1)
}

fn entry(i: u8, members: &[u8]) -> ServiceEntry {
    ServiceEntry {
        service: ServicePortName {
            namespace: "churn".into(),
            name: format!("svc-{i}"),
            port: String::new(),
        },
        kind: VipKind::ClusterIp,
        algorithm: Algorithm::Maglev,
        affinity_timeout: None,
        backends: members
            .iter()
            .map(|&j| Backend {
                addr: IpAddr::V4(pool_addr(i, j)),
                port: 8080,
                weight: 1,
                local: true,
            })
            .collect(),
        drop_if_empty: false,
        source_ranges: vec![],
    }
}

fn frontends(i: u8) -> [Frontend; 2] {
    let f = |scope| Frontend {
        addr: IpAddr::V4(vip(i)),
        port: 80,
        proto: Protocol::Tcp,
        scope,
    };
    [f(Scope::External), f(Scope::Internal)]
}

/// BPF_PROG_TEST_RUN on a program fd (aya's `test_run` needs the `Ebpf`, which stays with the churning thread).
fn test_run(prog: &OwnedFd, frame: &[u8], out: &mut [u8]) -> io::Result<usize> {
    #[repr(C)]
    #[derive(Default)]
    struct TestRunAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
    }
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        ..TestRunAttr::default()
    };
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    // SAFETY: a `#[repr(C)]` prefix of `union bpf_attr` for BPF_PROG_TEST_RUN; `frame` and `out` outlive the call
    // and `data_size_out` bounds what the kernel writes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr as *mut libc::c_void,
            size_of::<TestRunAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr.data_size_out as usize)
}

#[test]
fn no_packet_sees_a_half_written_table_or_another_services_table() {
    if !require_root("no_packet_sees_a_half_written_table_or_another_services_table") {
        return;
    }
    let dir = BpfDir::new(&format!("lb-test-churn-{}", unique_token())).expect("pin directory");
    let object = loader::object_bytes(None)
        .expect("the eBPF object (run `cargo xtask build-ebpf --release` before the tests)");
    let caps = Capacities {
        conntrack: 65536,
        ..Capacities::default()
    };
    let mut dp = loader::load(&object, &PinDir::new(dir.path()), &caps).expect("loading");
    lb_agent::datapath::tc_attach::load_tc_programs(&mut dp.ebpf).expect("loading tc");
    let prog: OwnedFd = {
        let p: &aya::programs::SchedClassifier = dp
            .ebpf
            .program(prog_names::TC_INGRESS)
            .expect("lb_tc_ingress")
            .try_into()
            .expect("a classifier");
        p.fd()
            .expect("loaded")
            .as_fd()
            .try_clone_to_owned()
            .expect("dup")
    };

    let mut seed: u64 = 0x5eed_1234_abcd_9876;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut desired = DesiredState::default();
    for i in 0..SERVICES {
        for f in frontends(i) {
            desired.services.insert(f, entry(i, &[0, 1, 2]));
        }
    }
    let mut r = Reconciler::restore(&dp.maps, ReconcileConfig::default()).expect("restore");
    let report = r.sync(&mut dp.maps, &desired);
    assert!(report.failed.is_empty(), "{:?}", report.failed);

    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut rng: u64 = 0x0dd_ba11;
            let mut probes = 0u64;
            let mut violations: Vec<String> = Vec::new();
            let mut out = vec![0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let i = ((rng >> 33) % u64::from(SERVICES)) as u8;
                // A new flow every time: another source address and port.
                let n = probes as u32;
                let src = SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(
                        u32::from(Ipv4Addr::new(203, 0, 0, 0)) + (n >> 14),
                    )),
                    1024 + (n & 0x3fff) as u16,
                );
                let frame = packet::build(
                    Protocol::Tcp,
                    src,
                    SocketAddr::new(IpAddr::V4(vip(i)), 80),
                    packet::TCP_SYN,
                    b"churn",
                );
                let len = test_run(&prog, &frame, &mut out).expect("BPF_PROG_TEST_RUN");
                probes += 1;
                // Ethernet, then IPv4: the destination after DNAT.
                let dst = (len >= 34).then(|| Ipv4Addr::new(out[30], out[31], out[32], out[33]));
                let ok = dst.is_some_and(|d| {
                    let o = d.octets();
                    o[0] == 10 && o[1] == 100 && o[2] == i && o[3] >= 1 && o[3] <= POOL
                });
                if !ok && violations.len() < 10 {
                    violations.push(format!(
                        "probe {probes} to service {i} ({}): left with destination {dst:?}, not a backend of its Service",
                        vip(i)
                    ));
                }
            }
            (probes, violations)
        })
    };

    // Churn: each change gives one Service a new random subset of its pool (1..=POOL backends, so its table size
    // moves between 509 and 2039 slots and its region changes size), and syncs just that Service.
    let started = Instant::now();
    let mut offsets_of: BTreeMap<u32, BTreeSet<u8>> = BTreeMap::new();
    let mut changes = 0;
    let mut written = 0;
    while changes < CHANGES {
        let i = next(u64::from(SERVICES)) as u8;
        let n = 1 + next(u64::from(POOL)) as u8;
        let mut members: Vec<u8> = (0..POOL).collect();
        for k in 0..POOL as usize {
            let j = k + next((POOL as usize - k) as u64) as usize;
            members.swap(k, j);
        }
        members.truncate(n as usize);
        members.sort_unstable();
        let mut changed = BTreeSet::new();
        for f in frontends(i) {
            desired.services.insert(f, entry(i, &members));
            changed.insert(f);
        }
        let report = r.sync_changed(&mut dp.maps, &desired, &changed);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        written += report.tables_written;
        let key = service_key(&frontends(i)[0]);
        let value = dp.maps.service(&key).expect("lookup").expect("programmed");
        offsets_of.entry(value.table_offset).or_default().insert(i);
        changes += 1;
    }
    let churn_ms = started.elapsed().as_secs_f64() * 1e3;
    // Let the prober see the last tables too.
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let (probes, violations) = prober.join().expect("prober");
    let reused = offsets_of.values().filter(|s| s.len() > 1).count();
    eprintln!(
        "churn: {changes} changes ({written} tables written) in {churn_ms:.0} ms, {probes} packets checked, {} \
         regions held tables of more than one Service over time",
        reused
    );
    assert!(violations.is_empty(), "{violations:#?}");
    // The test is worth something only if packets ran during the churn and regions were reused across Services.
    assert!(probes > 2000, "only {probes} packets checked");
    assert!(
        reused > 10,
        "only {reused} regions were reused by another Service"
    );
}
