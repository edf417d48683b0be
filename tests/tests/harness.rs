//! Self-tests of the harness: the star topology carries traffic, lb-probe reports what it should, processes land in
//! the right namespace and cgroup, and everything is removed again, also when a test panics.
//!
//! All traffic goes from the client namespace to a backend's own address: no VIP and no lb program is involved.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use lb_tests::{Cmd, NetNs, ProbeLine, Topology, probe};

const RUN: Duration = Duration::from_secs(30);
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

fn star_serving(backends: usize) -> Topology {
    let mut topo = Topology::star(backends).expect("build the star topology");
    topo.serve(&probe!(), &[TCP_PORT], &[UDP_PORT])
        .expect("start lb-probe serve in every backend");
    topo
}

fn assert_all_from(
    lines: &[ProbeLine],
    expected_backend: &str,
    expected_addr: SocketAddr,
    addr_of: fn(&ProbeLine) -> Option<&String>,
) {
    assert!(!lines.is_empty(), "no output lines");
    for line in lines {
        assert!(line.ok, "exchange failed: {line:?}");
        assert_eq!(
            line.backend.as_deref(),
            Some(expected_backend),
            "wrong backend: {line:?}"
        );
        assert_eq!(
            addr_of(line).map(String::as_str),
            Some(expected_addr.to_string().as_str()),
            "wrong address: {line:?}"
        );
    }
}

#[test]
fn star_backends_answer_tcp_with_their_identity_over_both_families() {
    if !lb_tests::require_root("star_backends_answer_tcp_with_their_identity_over_both_families") {
        return;
    }
    let topo = star_serving(2);
    let probe = probe!();
    for backend in topo.backends() {
        for to in [backend.addr_v4(TCP_PORT), backend.addr_v6(TCP_PORT)] {
            let out = topo
                .in_client(probe.tcp_cmd(to, 3))
                .run(RUN)
                .expect("run lb-probe tcp");
            let lines = out.probe_lines().expect("parse lb-probe tcp output");
            assert_eq!(lines.len(), 3, "one line per connection: {}", out.stdout);
            assert_all_from(&lines, backend.id(), to, |l| l.peer.as_ref());
            let client_ip = if to.is_ipv4() {
                backend.client_ipv4().to_string()
            } else {
                backend.client_ipv6().to_string()
            };
            for line in &lines {
                let local: SocketAddr = line
                    .local
                    .as_deref()
                    .expect("local address")
                    .parse()
                    .expect("parse local");
                assert_eq!(
                    local.ip().to_string(),
                    client_ip,
                    "client used its address on the backend's link"
                );
            }
        }
    }
}

#[test]
fn star_backends_answer_udp_on_connected_and_unconnected_sockets() {
    if !lb_tests::require_root("star_backends_answer_udp_on_connected_and_unconnected_sockets") {
        return;
    }
    let topo = star_serving(2);
    let probe = probe!();
    for backend in topo.backends() {
        for to in [backend.addr_v4(UDP_PORT), backend.addr_v6(UDP_PORT)] {
            for connected in [false, true] {
                let out = topo
                    .in_client(probe.udp_cmd(to, 2, 3, connected))
                    .run(RUN)
                    .expect("run lb-probe udp");
                let lines = out.probe_lines().expect("parse lb-probe udp output");
                assert_eq!(lines.len(), 6, "one line per datagram: {}", out.stdout);
                assert_all_from(&lines, backend.id(), to, |l| l.from.as_ref());
                let sockets: BTreeSet<_> = lines.iter().map(|l| l.socket).collect();
                assert_eq!(sockets.len(), 3, "three sockets: {}", out.stdout);
                let locals: BTreeSet<_> = lines.iter().map(|l| l.local.clone()).collect();
                assert_eq!(
                    locals.len(),
                    3,
                    "each socket has its own port: {}",
                    out.stdout
                );
            }
        }
    }
}

#[test]
fn closed_ports_are_reported_as_econnrefused() {
    if !lb_tests::require_root("closed_ports_are_reported_as_econnrefused") {
        return;
    }
    let topo = star_serving(1);
    let probe = probe!();
    let backend = topo.backend(0);

    let out = topo
        .in_client(probe.tcp_cmd(backend.addr_v4(9), 2))
        .run(RUN)
        .expect("run lb-probe tcp");
    let lines = out.probe_lines().expect("parse lb-probe tcp output");
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    for line in &lines {
        assert!(!line.ok, "{line:?}");
        assert_eq!(line.error.as_deref(), Some("ECONNREFUSED"), "{line:?}");
        assert_eq!(line.errno, Some(libc::ECONNREFUSED), "{line:?}");
        assert_eq!(line.stage.as_deref(), Some("connect"), "{line:?}");
    }

    // A connected UDP socket learns of the ICMP port unreachable; the error must be a line, not a crash.
    let out = topo
        .in_client(probe.udp_cmd(backend.addr_v6(9), 1, 1, true))
        .run(RUN)
        .expect("run lb-probe udp");
    let lines = out.probe_lines().expect("parse lb-probe udp output");
    assert_eq!(lines.len(), 1, "{}", out.stdout);
    assert_eq!(
        lines[0].error.as_deref(),
        Some("ECONNREFUSED"),
        "{:?}",
        lines[0]
    );
    assert_eq!(lines[0].stage.as_deref(), Some("recv"), "{:?}", lines[0]);

    // Unconnected sockets get no ICMP errors: the datagram times out.
    let out = topo
        .in_client(probe.udp_cmd(backend.addr_v4(9), 1, 1, false))
        .run(RUN)
        .expect("run lb-probe udp");
    let lines = out.probe_lines().expect("parse lb-probe udp output");
    assert_eq!(
        lines[0].error.as_deref(),
        Some("ETIMEDOUT"),
        "{:?}",
        lines[0]
    );
}

#[test]
fn hundreds_of_sequential_connections_are_fast() {
    if !lb_tests::require_root("hundreds_of_sequential_connections_are_fast") {
        return;
    }
    let topo = star_serving(1);
    let to = topo.backend(0).addr_v4(TCP_PORT);
    let started = Instant::now();
    let out = topo
        .in_client(probe!().tcp_cmd(to, 500))
        .run(RUN)
        .expect("run lb-probe tcp");
    let elapsed = started.elapsed();
    let lines = out.probe_lines().expect("parse lb-probe tcp output");
    assert_eq!(lines.len(), 500);
    assert!(
        lines
            .iter()
            .all(|l| l.ok && l.backend.as_deref() == Some("backend-0")),
        "{}",
        out.stdout
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "500 connections took {elapsed:?}"
    );
}

#[test]
fn http_get_gets_an_http_response_with_the_identity() {
    if !lb_tests::require_root("http_get_gets_an_http_response_with_the_identity") {
        return;
    }
    let topo = star_serving(1);
    let ip = topo.backend(0).ipv4();
    // bash's /dev/tcp stands in for an HTTP client: curl is not installed on bare machines.
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/{TCP_PORT} && printf 'GET / HTTP/1.1\\r\\nHost: x\\r\\nAccept: */*\\r\\n\\r\\n' >&3 && cat <&3"
    );
    let out = topo
        .in_client(Cmd::new("bash").args(["-c", &script]))
        .run(RUN)
        .expect("run the HTTP request");
    assert!(
        out.stdout.starts_with("HTTP/1.0 200 OK\r\n"),
        "{:?}",
        out.stdout
    );
    assert!(
        out.stdout.contains("Connection: close\r\n"),
        "{:?}",
        out.stdout
    );
    assert!(
        out.stdout.ends_with("\r\n\r\nbackend-0\n"),
        "{:?}",
        out.stdout
    );
}

#[test]
fn client_processes_run_in_the_client_namespace_and_cgroup_and_see_bpffs() {
    if !lb_tests::require_root(
        "client_processes_run_in_the_client_namespace_and_cgroup_and_see_bpffs",
    ) {
        return;
    }
    let topo = Topology::star(1).expect("build the star topology");
    let cgroup_name = topo
        .cgroup()
        .path()
        .file_name()
        .expect("cgroup dir name")
        .to_string_lossy()
        .into_owned();
    let pin_dir = topo.bpf_dir().path().display().to_string();
    let script = format!("cat /proc/self/cgroup; stat -L -c %i /proc/self/ns/net; ls -d {pin_dir}");
    let out = topo
        .in_client(Cmd::new("sh").args(["-c", &script]))
        .run(RUN)
        .expect("run sh in the client");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines.contains(&format!("0::/{cgroup_name}").as_str()),
        "not in the cgroup: {}",
        out.stdout
    );
    let netns_inode = std::fs::metadata(topo.client().path())
        .expect("stat the client netns")
        .ino();
    assert!(
        lines.contains(&netns_inode.to_string().as_str()),
        "not in the client netns: {}",
        out.stdout
    );
    assert!(
        lines.contains(&pin_dir.as_str()),
        "bpffs not visible inside: {}",
        out.stdout
    );

    // Backend processes are in their own namespace and not in the client cgroup.
    let out = topo
        .in_backend(0, Cmd::new("cat").arg("/proc/self/cgroup"))
        .run(RUN)
        .expect("run cat in a backend");
    assert!(
        !out.stdout.contains(&cgroup_name),
        "backend process in the client cgroup: {}",
        out.stdout
    );
}

#[test]
fn udp_sticky_keeps_its_sockets_across_rounds() {
    if !lb_tests::require_root("udp_sticky_keeps_its_sockets_across_rounds") {
        return;
    }
    let mut topo = star_serving(1);
    let to = topo.backend(0).addr_v4(UDP_PORT);
    let pause = std::env::temp_dir().join(format!("lb-tests-pause-{}", topo.token()));
    let cmd = topo.in_client(probe!().udp_sticky_cmd(to, 4, 3, &pause));
    let sticky = topo.spawn(cmd).expect("start lb-probe udp-sticky");
    for round in 1..=3 {
        sticky
            .wait_for_line(RUN, |l| {
                serde_json::from_str::<ProbeLine>(l)
                    .is_ok_and(|p| p.is_round_done() && p.round == Some(round))
            })
            .expect("round done");
        if round < 3 {
            std::fs::write(&pause, b"").expect("create the pause file");
        }
    }
    let status = sticky
        .wait_timeout(RUN)
        .expect("wait for udp-sticky")
        .expect("udp-sticky exits after the last round");
    assert!(status.success(), "udp-sticky failed: {}", sticky.stderr());
    assert!(!pause.exists(), "udp-sticky deletes the pause file");

    let results: Vec<ProbeLine> = sticky
        .probe_lines()
        .expect("parse udp-sticky output")
        .into_iter()
        .filter(|l| l.event.is_none())
        .collect();
    assert_eq!(results.len(), 12, "4 sockets x 3 rounds");
    assert!(
        results
            .iter()
            .all(|l| l.ok && l.backend.as_deref() == Some("backend-0")),
        "{results:?}"
    );
    for socket in 0..4 {
        let locals: BTreeSet<_> = results
            .iter()
            .filter(|l| l.socket == Some(socket))
            .map(|l| l.local.clone())
            .collect();
        assert_eq!(
            locals.len(),
            1,
            "socket {socket} kept its address across rounds: {locals:?}"
        );
    }
}

#[test]
fn guards_clean_up_when_the_test_panics() {
    if !lb_tests::require_root("guards_clean_up_when_the_test_panics") {
        return;
    }
    let mut made: Option<(Vec<String>, PathBuf, PathBuf, u32)> = None;
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut topo = Topology::star(2).expect("build the star topology");
        topo.serve(&probe!(), &[TCP_PORT], &[])
            .expect("start servers");
        let client = topo.in_client(Cmd::new("sleep").arg("600"));
        let pid = topo.spawn(client).expect("start a client process").pid();
        made = Some((
            topo.netns_names(),
            topo.cgroup().path().to_owned(),
            topo.bpf_dir().path().to_owned(),
            pid,
        ));
        panic!("deliberate panic inside the topology's scope");
    }));
    assert!(result.is_err(), "the closure panics");
    let (names, cgroup, pins, pid) = made.expect("the topology was built before the panic");
    for name in &names {
        assert!(!NetNs::exists(name), "network namespace {name} left behind");
    }
    assert!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
    assert!(
        !pins.exists(),
        "pin directory {} left behind",
        pins.display()
    );
    assert!(
        !PathBuf::from(format!("/proc/{pid}")).exists(),
        "client process {pid} left running"
    );
}

#[test]
fn cgroup_drop_kills_processes_the_harness_did_not_start_and_removes_child_cgroups() {
    if !lb_tests::require_root(
        "cgroup_drop_kills_processes_the_harness_did_not_start_and_removes_child_cgroups",
    ) {
        return;
    }
    let cgroup = lb_tests::Cgroup::new(&format!("lbt-{}", lb_tests::unique_token()))
        .expect("create a cgroup");
    let path = cgroup.path().to_owned();
    // The shell backgrounds a sleep and exits: the sleep is an orphan no Child guard knows of.
    Cmd::new("sh")
        .args(["-c", "sleep 600 & exit 0"])
        .cgroup(&cgroup)
        .run(RUN)
        .expect("run sh in the cgroup");
    let pids = cgroup.pids().expect("read cgroup.procs");
    assert_eq!(
        pids.len(),
        1,
        "the orphaned sleep is in the cgroup: {pids:?}"
    );
    // And one more orphan in a child cgroup, made behind the guard's back.
    let inner = path.join("inner");
    std::fs::create_dir(&inner).expect("create a child cgroup");
    // The shell moves itself first, so the sleep it forks starts inside.
    let script = format!(
        "echo $$ > {}/cgroup.procs && {{ sleep 600 & }} ; exit 0",
        inner.display()
    );
    Cmd::new("sh")
        .args(["-c", &script])
        .run(RUN)
        .expect("start a process in the child cgroup");
    let inner_procs = std::fs::read_to_string(inner.join("cgroup.procs")).expect("read procs");
    assert_eq!(
        inner_procs.lines().count(),
        1,
        "one orphan in the child cgroup: {inner_procs}"
    );

    drop(cgroup);
    assert!(!path.exists(), "cgroup {} left behind", path.display());
    let inner_pids: Vec<u32> = inner_procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for pid in pids.iter().chain(&inner_pids) {
        assert!(
            !PathBuf::from(format!("/proc/{pid}/cmdline")).exists() || is_zombie(*pid),
            "process {pid} survived"
        );
    }
}

/// An exited process whose parent has not reaped it yet still has a /proc entry.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[test]
fn veth_ends_report_their_index_and_mac_and_sysctls_apply_inside_the_namespace() {
    if !lb_tests::require_root(
        "veth_ends_report_their_index_and_mac_and_sysctls_apply_inside_the_namespace",
    ) {
        return;
    }
    let topo = Topology::star(2).expect("build the star topology");
    let veth = topo.backend(1).veth();
    assert_eq!(
        veth.a().ifindex().expect("client end ifindex"),
        101,
        "star picks 100 + i"
    );
    let mac = veth.b().mac().expect("backend end MAC");
    assert_eq!(mac.split(':').count(), 6, "a MAC address: {mac}");

    // A new namespace may start from the host's value (net.core.devconf_inherit_init_net), and a host with
    // podman or Kubernetes forwards: set both ends explicitly.
    topo.backend(0)
        .ns()
        .sysctl("net.ipv4.ip_forward", "0")
        .expect("set a sysctl in the backend");
    topo.client()
        .sysctl("net.ipv4.ip_forward", "1")
        .expect("set a sysctl in the client");
    let read = |ns: &NetNs| {
        Cmd::new("cat")
            .arg("/proc/sys/net/ipv4/ip_forward")
            .netns(ns)
            .run(RUN)
            .expect("read ip_forward")
            .stdout
    };
    assert_eq!(read(topo.client()).trim(), "1", "set in the client");
    assert_eq!(
        read(topo.backend(0).ns()).trim(),
        "0",
        "backends keep their own"
    );
}
