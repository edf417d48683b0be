//! The tc ingress program through BPF_PROG_TEST_RUN, as data (katran `KatranBaseTestFixtures.h`): each fixture is
//! {description, packet, expected verdict, backend, SNAT, reason}, run against the real object loaded privately by
//! `lb-agent trace`'s core with maps filled by the agent's own model and reconciler. No interface is touched and no
//! packet leaves the kernel's test runner.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use lb_agent::datapath::maps::{Maps, MapsRead};
use lb_agent::state::Protocol;
use lb_agent::trace::packet::{self, Parsed, TCP_ACK, TCP_RST, TCP_SYN};
use lb_agent::trace::{Run, Source, Tracer};
use lb_common::{addr_from_bytes, reason};
use lb_tests::require_root;

/// tc verdicts as the program returns them.
const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const NODE: &str = "node-a";
const NODE_V4: &str = "192.0.2.10";
const NODE_V6: &str = "2001:db8::10";
const CLIENT_V4: &str = "203.0.113.9";
const CLIENT_V6: &str = "2001:db8:ff::9";

/// Node A (InternalIP v4 and v6, pod CIDR 10.244.1.0/24) and its Services:
/// - `web` (NodePort, Cluster policy, externalIP): one backend on node A, two on node B;
/// - `local-yes` / `local-no` (NodePort, `externalTrafficPolicy: Local`) with and without an endpoint on node A;
/// - `empty` (NodePort, no endpoints: rule 8 rejects);
/// - `lb` (LoadBalancer with `loadBalancerSourceRanges`);
/// - `web6` (IPv6 NodePort, one local and one remote backend);
/// - `sctp` (NodePort and externalIP; one port kept by the target port, one changed).
const MANIFEST: &str = r#"apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec:
  cidrs: [10.96.0.0/16, "fd00:96::/112"]
---
apiVersion: v1
kind: Node
metadata:
  name: node-a
spec:
  podCIDRs: [10.244.1.0/24, "fd00:244:1::/64"]
status:
  addresses:
    - {type: InternalIP, address: 192.0.2.10}
    - {type: InternalIP, address: "2001:db8::10"}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalIPs: [198.51.100.7]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}
    - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: t
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
  - {name: http, protocol: TCP, port: 8080}
  - {name: dns, protocol: UDP, port: 5353}
endpoints:
  - {addresses: [10.244.1.5], conditions: {ready: true}, nodeName: node-a}
  - {addresses: [10.244.2.5], conditions: {ready: true}, nodeName: node-b}
  - {addresses: [10.244.2.6], conditions: {ready: true}, nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: local-yes, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  externalTrafficPolicy: Local
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30081}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-yes-1
  namespace: t
  labels: {kubernetes.io/service-name: local-yes}
addressType: IPv4
ports:
  - {name: http, protocol: TCP, port: 8080}
endpoints:
  - {addresses: [10.244.1.7], conditions: {ready: true}, nodeName: node-a}
  - {addresses: [10.244.2.7], conditions: {ready: true}, nodeName: node-b}
  - {addresses: [10.244.2.8], conditions: {ready: true}, nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: local-no, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.12
  externalTrafficPolicy: Local
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30082}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-no-1
  namespace: t
  labels: {kubernetes.io/service-name: local-no}
addressType: IPv4
ports:
  - {name: http, protocol: TCP, port: 8080}
endpoints:
  - {addresses: [10.244.2.9], conditions: {ready: true}, nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.13
  ipFamilies: [IPv4]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30083}
    - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30084}
---
apiVersion: v1
kind: Service
metadata: {name: empty6, namespace: t}
spec:
  type: NodePort
  clusterIP: "fd00:96::13"
  ipFamilies: [IPv6]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30085}
    - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30086}
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: t}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.14
  loadBalancerSourceRanges: [198.18.0.0/16]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30087}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.100}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb-1
  namespace: t
  labels: {kubernetes.io/service-name: lb}
addressType: IPv4
ports:
  - {name: http, protocol: TCP, port: 8080}
endpoints:
  - {addresses: [10.244.1.20], conditions: {ready: true}, nodeName: node-a}
---
apiVersion: v1
kind: Service
metadata: {name: web6, namespace: t}
spec:
  type: NodePort
  clusterIP: "fd00:96::10"
  ipFamilies: [IPv6]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30090}
    - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30091}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web6-1
  namespace: t
  labels: {kubernetes.io/service-name: web6}
addressType: IPv6
ports:
  - {name: http, protocol: TCP, port: 8080}
  - {name: dns, protocol: UDP, port: 5353}
endpoints:
  - {addresses: ["fd00:244:1::5"], conditions: {ready: true}, nodeName: node-a}
  - {addresses: ["fd00:244:2::5"], conditions: {ready: true}, nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: sctp, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  externalIPs: [198.51.100.8]
  ports:
    - {name: same, protocol: SCTP, port: 7777, targetPort: 7777, nodePort: 30777}
    - {name: moved, protocol: SCTP, port: 7778, targetPort: 7000, nodePort: 30778}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: sctp-1
  namespace: t
  labels: {kubernetes.io/service-name: sctp}
addressType: IPv4
ports:
  - {name: same, protocol: SCTP, port: 7777}
  - {name: moved, protocol: SCTP, port: 7000}
endpoints:
  - {addresses: [10.244.1.30], conditions: {ready: true}, nodeName: node-a}
"#;

const WEB_BACKENDS: [&str; 3] = ["10.244.1.5", "10.244.2.5", "10.244.2.6"];
const WEB6_BACKENDS: [&str; 2] = ["fd00:244:1::5", "fd00:244:2::5"];

/// A temporary manifest file, removed on drop.
struct ManifestFile(PathBuf);

impl ManifestFile {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "lb-tc-programs-{}-{}.yaml",
            std::process::id(),
            lb_tests::unique_token()
        ));
        std::fs::write(&path, MANIFEST).expect("writing the fixture manifest");
        Self(path)
    }
}

impl Drop for ManifestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The real object (embedded by lb-agent's build), loaded privately and programmed from [`MANIFEST`] for node A.
fn tracer() -> (Tracer, ManifestFile) {
    let manifest = ManifestFile::new();
    let object = lb_agent::datapath::loader::object_bytes(None)
        .expect("the eBPF object (run `cargo xtask build-ebpf --release` before the tests)");
    let tracer =
        Tracer::load(&object, &manifest.0, NODE).expect("loading and programming the datapath");
    (tracer, manifest)
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("fixture address"), port)
}

/// What a fixture expects.
#[derive(Debug)]
enum Expect {
    /// Forwarded (tc OK) to one of `backends` on `port`, SNAT exactly when the backend is not on node A (every
    /// fixture's client is outside, rule 6); the output packet carries the client as source, the backend as
    /// destination and valid checksums.
    Forward {
        backends: &'static [&'static str],
        port: u16,
    },
    /// Dropped (tc SHOT) for `reason`.
    Drop(&'static str),
    /// Rejected (redirected back out) for `reason`: a valid RST or ICMP/ICMPv6 port unreachable to the client.
    Reject(&'static str),
    /// Passed untouched (tc UNSPEC) with `reason` ("not-a-service", "fragment", "malformed").
    Pass(&'static str),
}

struct Fixture {
    description: &'static str,
    proto: Protocol,
    src: SocketAddr,
    dst: SocketAddr,
    /// The frame; `None` = a well-formed first packet (TCP SYN, UDP datagram) of `src` -> `dst`.
    frame: Option<Vec<u8>>,
    expect: Expect,
}

fn fixture(
    description: &'static str,
    proto: Protocol,
    src: SocketAddr,
    dst: SocketAddr,
    expect: Expect,
) -> Fixture {
    Fixture {
        description,
        proto,
        src,
        dst,
        frame: None,
        expect,
    }
}

fn syn(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    packet::build(Protocol::Tcp, src, dst, TCP_SYN, b"")
}

fn udp(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    packet::build(Protocol::Udp, src, dst, 0, b"lb-test")
}

/// Recomputes an IPv4 frame's header checksum after an edit.
fn fix_ipv4_csum(frame: &mut [u8]) {
    frame[24] = 0;
    frame[25] = 0;
    let c = packet::fold(packet::sum(&frame[14..34], 0));
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Inserts an IPv6 extension header (8 bytes, `kind` = 0 hop-by-hop or 44 fragment) after the fixed header.
fn with_ipv6_ext(mut frame: Vec<u8>, kind: u8, fragment_offset: u16) -> Vec<u8> {
    let upper = frame[20];
    let ext: [u8; 8] = if kind == 44 {
        let off = (fragment_offset << 3).to_be_bytes();
        [upper, 0, off[0], off[1] | 1, 0, 0, 0, 7]
    } else {
        // Next header, length 0 (8 bytes), PadN option covering the other 4 bytes.
        [upper, 0, 1, 4, 0, 0, 0, 0]
    };
    frame[20] = kind;
    let plen = u16::from_be_bytes([frame[18], frame[19]]) + 8;
    frame[18..20].copy_from_slice(&plen.to_be_bytes());
    frame.splice(54..54, ext);
    frame
}

/// The fixture table: every verdict and reason of the ingress program.
fn fixtures() -> Vec<Fixture> {
    let client = |port| sa(CLIENT_V4, port);
    let client6 = |port| sa(CLIENT_V6, port);
    let node = |port| sa(NODE_V4, port);
    let node6 = |port| sa(NODE_V6, port);
    let fwd = |backends: &'static [&'static str], port| Expect::Forward { backends, port };
    let mut v = vec![
        fixture(
            "local policy with a local endpoint: always the local one, client address kept",
            Protocol::Tcp,
            client(40001),
            node(30081),
            fwd(&["10.244.1.7"], 8080),
        ),
        fixture(
            "local policy without a local endpoint drops",
            Protocol::Tcp,
            client(40002),
            node(30082),
            Expect::Drop("no-local-endpoint"),
        ),
        fixture(
            "no endpoints, TCP: RST",
            Protocol::Tcp,
            client(40003),
            node(30083),
            Expect::Reject("no-endpoints"),
        ),
        fixture(
            "no endpoints, UDP: ICMP port unreachable",
            Protocol::Udp,
            client(40004),
            node(30084),
            Expect::Reject("no-endpoints"),
        ),
        fixture(
            "no endpoints, TCP over IPv6: RST",
            Protocol::Tcp,
            client6(40005),
            node6(30085),
            Expect::Reject("no-endpoints"),
        ),
        fixture(
            "no endpoints, UDP over IPv6: ICMPv6 port unreachable",
            Protocol::Udp,
            client6(40006),
            node6(30086),
            Expect::Reject("no-endpoints"),
        ),
        fixture(
            "ClusterIP on a port its Service does not define rejects",
            Protocol::Tcp,
            client(40007),
            sa("10.96.0.10", 81),
            Expect::Reject("unknown-port"),
        ),
        fixture(
            "address in a service CIDR that no Service holds drops (unallocated ClusterIP)",
            Protocol::Tcp,
            client(40020),
            sa("10.96.0.99", 80),
            Expect::Drop("unallocated-cluster-ip"),
        ),
        fixture(
            "unallocated ClusterIP, UDP: dropped, not rejected",
            Protocol::Udp,
            client(40021),
            sa("10.96.0.99", 53),
            Expect::Drop("unallocated-cluster-ip"),
        ),
        fixture(
            "unallocated ClusterIP over IPv6 drops",
            Protocol::Tcp,
            client6(40022),
            sa("fd00:96::99", 80),
            Expect::Drop("unallocated-cluster-ip"),
        ),
        fixture(
            "an address outside every service CIDR is not a service packet",
            Protocol::Tcp,
            client(40023),
            sa("10.97.0.99", 80),
            Expect::Pass("not-a-service"),
        ),
        fixture(
            "LoadBalancer IP from inside loadBalancerSourceRanges forwards",
            Protocol::Tcp,
            sa("198.18.3.4", 40008),
            sa("203.0.113.100", 80),
            fwd(&["10.244.1.20"], 8080),
        ),
        fixture(
            "LoadBalancer IP from outside loadBalancerSourceRanges drops",
            Protocol::Tcp,
            client(40009),
            sa("203.0.113.100", 80),
            Expect::Drop("source-range"),
        ),
        fixture(
            "NodePort of the LoadBalancer Service ignores the source ranges",
            Protocol::Tcp,
            client(40010),
            node(30087),
            fwd(&["10.244.1.20"], 8080),
        ),
        fixture(
            "not a service port on the node address passes",
            Protocol::Tcp,
            client(40011),
            node(22),
            Expect::Pass("not-a-service"),
        ),
        fixture(
            "an address that is no VIP passes",
            Protocol::Udp,
            client(40012),
            sa("192.0.2.99", 53),
            Expect::Pass("not-a-service"),
        ),
    ];
    // NodePort, externalIP, ClusterIP reached from the wire.
    for (i, dst) in [node(30080), sa("198.51.100.7", 80), sa("10.96.0.10", 80)]
        .into_iter()
        .enumerate()
    {
        v.push(fixture(
            "TCP to a Cluster-policy VIP forwards to one of its backends",
            Protocol::Tcp,
            client(40100 + i as u16),
            dst,
            fwd(&WEB_BACKENDS, 8080),
        ));
    }
    v.push(fixture(
        "UDP NodePort forwards to one of its backends",
        Protocol::Udp,
        client(40200),
        node(30053),
        fwd(&WEB_BACKENDS, 5353),
    ));
    v.push(fixture(
        "TCP IPv6 NodePort forwards",
        Protocol::Tcp,
        client6(40300),
        node6(30090),
        fwd(&WEB6_BACKENDS, 8080),
    ));
    v.push(fixture(
        "UDP IPv6 NodePort forwards",
        Protocol::Udp,
        client6(40301),
        node6(30091),
        fwd(&WEB6_BACKENDS, 5353),
    ));
    v.push(fixture(
        "SCTP is DNATed by address when the port stays (its CRC32c stays valid)",
        Protocol::Sctp,
        client(40310),
        sa("198.51.100.8", 7777),
        fwd(&["10.244.1.30"], 7777),
    ));
    v.push(fixture(
        "SCTP to a target port that differs forwards with its CRC32c updated",
        Protocol::Sctp,
        client(40311),
        sa("198.51.100.8", 7778),
        fwd(&["10.244.1.30"], 7000),
    ));
    v.push(fixture(
        "SCTP NodePort forwards with the port changed and its CRC32c updated",
        Protocol::Sctp,
        client(40312),
        node(30778),
        fwd(&["10.244.1.30"], 7000),
    ));
    // Crafted frames.
    let mut ext = fixture(
        "IPv6 with a hop-by-hop extension header forwards (the header is skipped)",
        Protocol::Tcp,
        client6(40400),
        node6(30090),
        fwd(&WEB6_BACKENDS, 8080),
    );
    ext.frame = Some(with_ipv6_ext(syn(client6(40400), node6(30090)), 0, 0));
    v.push(ext);
    let mut frag6 = fixture(
        "an IPv6 later fragment whose first fragment was not seen passes untouched",
        Protocol::Udp,
        client6(40401),
        node6(30091),
        Expect::Pass("fragment"),
    );
    frag6.frame = Some(with_ipv6_ext(udp(client6(40401), node6(30091)), 44, 100));
    v.push(frag6);
    let mut first6 = fixture(
        "an IPv6 first fragment is handled by its ports",
        Protocol::Udp,
        client6(40402),
        node6(30091),
        fwd(&WEB6_BACKENDS, 5353),
    );
    first6.frame = Some(with_ipv6_ext(udp(client6(40402), node6(30091)), 44, 0));
    v.push(first6);
    let mut frag4 = fixture(
        "an IPv4 later fragment whose first fragment was not seen passes untouched",
        Protocol::Udp,
        client(40403),
        node(30053),
        Expect::Pass("fragment"),
    );
    let mut f = udp(client(40403), node(30053));
    f[20..22].copy_from_slice(&0x0010u16.to_be_bytes());
    fix_ipv4_csum(&mut f);
    frag4.frame = Some(f);
    v.push(frag4);
    let mut first4 = fixture(
        "an IPv4 first fragment (MF, offset 0) is handled by its ports",
        Protocol::Udp,
        client(40404),
        node(30053),
        fwd(&WEB_BACKENDS, 5353),
    );
    let mut f = udp(client(40404), node(30053));
    f[20..22].copy_from_slice(&0x2000u16.to_be_bytes());
    fix_ipv4_csum(&mut f);
    first4.frame = Some(f);
    v.push(first4);
    for (i, cut) in [14 + 20 + 2, 14 + 20 + 10].into_iter().enumerate() {
        let mut t = fixture(
            "a truncated TCP SYN to a NodePort is never forwarded",
            Protocol::Tcp,
            client(40500 + i as u16),
            node(30080),
            Expect::Pass("malformed"),
        );
        let mut f = syn(client(40500 + i as u16), node(30080));
        f.truncate(cut);
        t.frame = Some(f);
        v.push(t);
    }
    let mut t = fixture(
        "a truncated UDP datagram (no full header) to a NodePort is never forwarded",
        Protocol::Udp,
        client(40510),
        node(30053),
        Expect::Pass("malformed"),
    );
    let mut f = udp(client(40510), node(30053));
    f.truncate(14 + 20 + 5);
    t.frame = Some(f);
    v.push(t);
    let mut t = fixture(
        "an IPv4 header length below 20 bytes is malformed",
        Protocol::Tcp,
        client(40511),
        node(30080),
        Expect::Pass("malformed"),
    );
    let mut f = syn(client(40511), node(30080));
    f[14] = 0x44;
    t.frame = Some(f);
    v.push(t);
    let mut t = fixture(
        "a version field that does not match the ethertype is malformed",
        Protocol::Tcp,
        client(40512),
        node(30080),
        Expect::Pass("malformed"),
    );
    let mut f = syn(client(40512), node(30080));
    f[14] = 0x65;
    t.frame = Some(f);
    v.push(t);
    let mut t = fixture(
        "a non-IP frame (ARP) passes",
        Protocol::Tcp,
        client(40513),
        node(30080),
        Expect::Pass("not-a-service"),
    );
    let mut f = syn(client(40513), node(30080));
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    t.frame = Some(f);
    v.push(t);
    v
}

/// Checks one run against its fixture; returns the parsed output of a forward.
fn check(fx: &Fixture, run: &Run) -> Option<Parsed> {
    let d = fx.description;
    let r = &run.result;
    match &fx.expect {
        Expect::Forward { backends, port } => {
            assert_eq!(r.verdict, "forward", "{d}: {r:?}");
            assert_eq!(run.retval, TC_ACT_OK, "{d}: tc verdict");
            let backend = r
                .backend
                .as_deref()
                .unwrap_or_else(|| panic!("{d}: no backend in {r:?}"));
            let b: SocketAddr = backend.parse().expect("backend ip:port");
            let local = b.ip().to_string().starts_with("10.244.1.")
                || b.ip().to_string().starts_with("fd00:244:1::");
            assert_eq!(
                r.snat, !local,
                "{d}: SNAT exactly for a remote backend: {r:?}"
            );
            assert!(
                backends.contains(&b.ip().to_string().as_str()) && b.port() == *port,
                "{d}: backend {b} not among {backends:?} port {port}"
            );
            let out = strip_ipv6_ext(&run.output);
            let p = packet::parse(&out).unwrap_or_else(|| panic!("{d}: output is no IP packet"));
            assert_eq!(p.dst, b, "{d}: destination rewritten to the backend");
            assert_eq!(
                p.src, fx.src,
                "{d}: source untouched at ingress (SNAT happens at egress)"
            );
            assert!(
                p.checksums_ok,
                "{d}: checksums of the forwarded packet (recomputed here) are wrong"
            );
            Some(p)
        }
        Expect::Drop(reason) => {
            assert_eq!((r.verdict, r.reason), ("drop", *reason), "{d}: {r:?}");
            assert_eq!(run.retval, TC_ACT_SHOT, "{d}: tc verdict");
            None
        }
        Expect::Pass(reason) => {
            assert_eq!((r.verdict, r.reason), ("pass", *reason), "{d}: {r:?}");
            assert_eq!(run.retval, TC_ACT_UNSPEC, "{d}: tc verdict");
            let input = fx.frame.clone().unwrap_or_else(|| first_packet(fx));
            assert_eq!(run.output, input, "{d}: a passed packet is untouched");
            None
        }
        Expect::Reject(reason) => {
            assert_eq!((r.verdict, r.reason), ("reject", *reason), "{d}: {r:?}");
            assert_eq!(
                run.retval, TC_ACT_REDIRECT,
                "{d}: sent back out of its interface"
            );
            let p = packet::parse(&run.output)
                .unwrap_or_else(|| panic!("{d}: reject output is no IP packet"));
            assert!(
                p.checksums_ok,
                "{d}: checksums of the reject answer are wrong: {p:?}"
            );
            assert_eq!(
                p.dst.ip(),
                fx.src.ip(),
                "{d}: the answer goes to the client"
            );
            assert_eq!(
                p.src.ip(),
                fx.dst.ip(),
                "{d}: the answer comes from the VIP"
            );
            // The MACs are swapped: the answer goes back to the sender.
            let input = first_packet(fx);
            assert_eq!(run.output[0..6], input[6..12], "{d}: destination MAC");
            assert_eq!(run.output[6..12], input[0..6], "{d}: source MAC");
            match (fx.proto, fx.src.is_ipv4()) {
                (Protocol::Tcp, _) => {
                    assert_eq!(p.proto, 6, "{d}");
                    assert_eq!(
                        (p.src.port(), p.dst.port()),
                        (fx.dst.port(), fx.src.port()),
                        "{d}"
                    );
                    // A SYN has no ACK: the RST acknowledges it (RFC 9293 3.10.7.1).
                    assert_eq!(p.flags, u16::from(TCP_RST | TCP_ACK), "{d}: RST|ACK");
                    let l4 = if fx.src.is_ipv4() { 34 } else { 54 };
                    let ack = u32::from_be_bytes(
                        run.output[l4 + 8..l4 + 12].try_into().expect("4 bytes"),
                    );
                    assert_eq!(ack, 1001, "{d}: acknowledges the SYN (seq 1000 + 1)");
                }
                (_, true) => assert_eq!(
                    (p.proto, p.flags),
                    (1, 0x0303),
                    "{d}: ICMP port unreachable"
                ),
                (_, false) => assert_eq!(
                    (p.proto, p.flags),
                    (58, 0x0104),
                    "{d}: ICMPv6 port unreachable"
                ),
            }
            None
        }
    }
}

fn first_packet(fx: &Fixture) -> Vec<u8> {
    match fx.proto {
        Protocol::Tcp => syn(fx.src, fx.dst),
        Protocol::Udp => udp(fx.src, fx.dst),
        Protocol::Sctp => packet::build(Protocol::Sctp, fx.src, fx.dst, 0, b"lb-test!"),
    }
}

/// An IPv6 frame with one 8-byte extension header after the fixed header, as the parser in `trace::packet` (no
/// extension headers) reads it: the header removed and the next-header field restored.
fn strip_ipv6_ext(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    if f.len() > 62 && f[12..14] == [0x86, 0xdd] && (f[20] == 0 || f[20] == 44) {
        f[20] = f[54];
        let plen = u16::from_be_bytes([f[18], f[19]]) - 8;
        f[18..20].copy_from_slice(&plen.to_be_bytes());
        f.drain(54..62);
    }
    f
}

#[test]
fn tc_ingress_fixtures() {
    if !require_root("tc_ingress_fixtures") {
        return;
    }
    let (mut tracer, _manifest) = tracer();
    let mut failures = Vec::new();
    for fx in fixtures() {
        let frame = fx.frame.clone().unwrap_or_else(|| first_packet(&fx));
        let run = tracer
            .run_frame(&frame)
            .unwrap_or_else(|e| panic!("{}: BPF_PROG_TEST_RUN: {e:#}", fx.description));
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&fx, &run)))
        {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| format!("{}: failed", fx.description));
            failures.push(msg);
        }
    }
    // The per-reason counters saw what the fixtures sent (per CPU, summed).
    let counts = tracer
        .maps()
        .packet
        .reason_counts()
        .expect("reading LB_DROP_STATS");
    for (why, at_least) in [
        (reason::NEW_FLOW, 8),
        (reason::NO_ENDPOINTS, 4),
        (reason::NO_LOCAL_ENDPOINT, 1),
        (reason::SOURCE_RANGE, 1),
        (reason::UNKNOWN_PORT, 1),
        (reason::UNALLOCATED_CLUSTER_IP, 3),
        (reason::FRAGMENT, 2),
        (reason::MALFORMED, 4),
    ] {
        assert!(
            counts[why as usize] >= at_least,
            "LB_DROP_STATS[{}] = {}, expected at least {at_least}",
            reason::name(why),
            counts[why as usize]
        );
    }
    assert!(
        failures.is_empty(),
        "{} fixtures failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn cluster_policy_snats_remote_backends_only() {
    if !require_root("cluster_policy_snats_remote_backends_only") {
        return;
    }
    let (mut tracer, _manifest) = tracer();
    let mut seen = BTreeSet::new();
    for port in 41000..41064 {
        let src = sa(CLIENT_V4, port);
        let run = tracer
            .trace(Protocol::Tcp, src, sa(NODE_V4, 30080))
            .expect("trace");
        let r = &run.result;
        assert_eq!(r.verdict, "forward", "{r:?}");
        let backend: SocketAddr = r
            .backend
            .as_deref()
            .expect("backend")
            .parse()
            .expect("ip:port");
        let local = backend.ip().to_string() == WEB_BACKENDS[0];
        assert_eq!(
            r.snat, !local,
            "SNAT exactly for the remote backends (rule 6): {r:?}"
        );
        seen.insert((backend, r.snat));
        let p = packet::parse(&run.output).expect("forwarded frame");
        assert!(p.checksums_ok, "checksums after DNAT");
    }
    assert!(
        seen.iter().any(|(_, snat)| *snat),
        "64 flows never reached a remote backend: {seen:?}"
    );
    assert!(
        seen.iter().any(|(_, snat)| !*snat),
        "64 flows never reached the local backend: {seen:?}"
    );

    // The same for IPv6, with the node's IPv6 address as the SNAT address.
    let mut seen6 = BTreeSet::new();
    for port in 41000..41032 {
        let run = tracer
            .trace(Protocol::Udp, sa(CLIENT_V6, port), sa(NODE_V6, 30091))
            .expect("trace");
        let r = &run.result;
        assert_eq!(r.verdict, "forward", "{r:?}");
        let backend: SocketAddr = r
            .backend
            .as_deref()
            .expect("backend")
            .parse()
            .expect("ip:port");
        assert_eq!(
            r.snat,
            backend.ip().to_string() != WEB6_BACKENDS[0],
            "{r:?}"
        );
        seen6.insert(r.snat);
    }
    assert_eq!(
        seen6.len(),
        2,
        "IPv6 flows reached only local or only remote backends"
    );
}

#[test]
fn established_flow_follows_conntrack() {
    if !require_root("established_flow_follows_conntrack") {
        return;
    }
    let (mut tracer, _manifest) = tracer();
    let (src, dst) = (sa(CLIENT_V4, 42000), sa(NODE_V4, 30080));
    let first = tracer.trace(Protocol::Tcp, src, dst).expect("trace");
    assert_eq!(first.result.reason, "new-flow", "{:?}", first.result);
    let ack = packet::build(Protocol::Tcp, src, dst, TCP_ACK, b"payload");
    let next = tracer.run_frame(&ack).expect("trace");
    assert_eq!(
        (next.result.verdict, next.result.reason),
        ("forward", "conntrack"),
        "{:?}",
        next.result
    );
    assert_eq!(
        next.result.backend, first.result.backend,
        "the flow keeps its backend"
    );
    let p = packet::parse(&next.output).expect("forwarded frame");
    assert!(
        p.checksums_ok,
        "checksums of a conntrack-translated segment with payload"
    );
}

#[test]
fn sweep_spreads_and_is_deterministic_across_loads() {
    if !require_root("sweep_spreads_and_is_deterministic_across_loads") {
        return;
    }
    let per_port = |tracer: &mut Tracer| -> Vec<Option<String>> {
        (43000..43128)
            .map(|port| {
                tracer
                    .trace(Protocol::Tcp, sa(CLIENT_V4, port), sa(NODE_V4, 30080))
                    .expect("trace")
                    .result
                    .backend
            })
            .collect()
    };
    let (mut a, _ma) = tracer();
    let first = per_port(&mut a);
    drop(a);
    let (mut b, _mb) = tracer();
    let second = per_port(&mut b);
    assert_eq!(
        first, second,
        "the same 5-tuple picks the same backend on a second, separate load"
    );
    let reached: BTreeSet<_> = first.iter().flatten().cloned().collect();
    assert_eq!(
        reached.len(),
        WEB_BACKENDS.len(),
        "128 flows reach every backend: {reached:?}"
    );
    let swept = b
        .sweep(Protocol::Udp, sa(CLIENT_V4, 44000), sa(NODE_V4, 30053), 64)
        .expect("sweep");
    assert_eq!(
        swept.len(),
        WEB_BACKENDS.len(),
        "sweep over 64 ports: {swept:?}"
    );
}

#[test]
fn from_node_source_uses_internal_frontends() {
    if !require_root("from_node_source_uses_internal_frontends") {
        return;
    }
    // Rule 5: a Local Service's NodePort reached from the node itself goes to all endpoints, even with no local
    // one, and a local source is never SNATed.
    let (mut tracer, _manifest) = tracer();
    let src = sa(NODE_V4, 45000);
    tracer
        .add_local_source(src.ip(), Source::Node)
        .expect("marking the node address local");
    let run = tracer
        .trace(Protocol::Tcp, src, sa(NODE_V4, 30082))
        .expect("trace");
    assert_eq!(run.result.verdict, "forward", "{:?}", run.result);
    assert_eq!(run.result.backend.as_deref(), Some("10.244.2.9:8080"));
    assert!(!run.result.snat, "a local source is not SNATed");
}

#[test]
fn deleted_backend_ends_its_flows() {
    if !require_root("deleted_backend_ends_its_flows") {
        return;
    }
    // Rule 12: an established flow whose backend is gone is ended (TCP: RST back to the client), not moved.
    let (mut tracer, _manifest) = tracer();
    let (src, dst) = (sa(CLIENT_V4, 46000), sa(NODE_V4, 30081));
    let (usrc, udst) = (sa(CLIENT_V4, 46001), sa(NODE_V4, 30053));
    let first = tracer.trace(Protocol::Tcp, src, dst).expect("trace");
    assert_eq!(
        first.result.backend.as_deref(),
        Some("10.244.1.7:8080"),
        "{:?}",
        first.result
    );
    let udp_first = tracer.trace(Protocol::Udp, usrc, udst).expect("trace");
    let udp_backend: SocketAddr = udp_first
        .result
        .backend
        .as_deref()
        .expect("backend")
        .parse()
        .expect("ip:port");
    // One more packet of each flow before the deletion: the forward entry then records its backend as checked
    // (`CtValue::backend_epoch`), so the deletion below is seen only through the epoch the agent bumps with it.
    let ack = packet::build(Protocol::Tcp, src, dst, TCP_ACK, b"hi");
    let datagram = packet::build(Protocol::Udp, usrc, udst, 0, b"hi");
    for (frame, what) in [(&ack, "TCP"), (&datagram, "UDP")] {
        let run = tracer.run_frame(frame).expect("trace");
        assert_eq!(
            (run.result.verdict, run.result.reason),
            ("forward", "conntrack"),
            "{what}: before the deletion: {:?}",
            run.result
        );
    }
    let epoch = tracer.maps().config().expect("LB_CONFIG").backend_epoch;
    assert_ne!(
        epoch, 0,
        "the agent's maps start with a known backend epoch"
    );
    let id_of = |tracer: &mut Tracer, b: SocketAddr| {
        tracer
            .maps()
            .backends()
            .expect("reading LB_BACKENDS")
            .into_iter()
            .find(|(_, v)| addr_from_bytes(v.addr) == b.ip() && v.port == b.port())
            .map(|(id, _)| id)
            .unwrap_or_else(|| panic!("no backend id for {b}"))
    };
    for b in [sa("10.244.1.7", 8080), udp_backend] {
        let id = id_of(&mut tracer, b);
        tracer
            .maps()
            .delete_backend(id)
            .expect("deleting the backend");
    }
    assert_eq!(
        tracer.maps().config().expect("LB_CONFIG").backend_epoch,
        epoch.wrapping_add(2),
        "each delete bumps the backend epoch"
    );

    let ack = packet::build(Protocol::Tcp, src, dst, TCP_ACK, b"more");
    let run = tracer.run_frame(&ack).expect("trace");
    assert_eq!(
        (run.result.verdict, run.result.reason),
        ("reject", "backend-gone"),
        "{:?}",
        run.result
    );
    assert_eq!(run.retval, TC_ACT_REDIRECT);
    let p = packet::parse(&run.output).expect("RST frame");
    assert!(p.checksums_ok, "RST checksums: {p:?}");
    assert_eq!(
        (p.src, p.dst),
        (dst, src),
        "the RST comes from the NodePort to the client"
    );
    // An ACK segment gets a bare RST with its acknowledgment number as sequence number (RFC 9293 3.10.7.1).
    assert_eq!(p.flags, u16::from(TCP_RST), "bare RST: {p:?}");
    let flows = tracer.maps().packet.flows().expect("reading conntrack");
    assert!(
        !flows
            .iter()
            .any(|(k, _)| k.sport == src.port() && k.proto == 6),
        "the dead flow's conntrack entries are removed: {flows:?}"
    );

    let dgram = udp(usrc, udst);
    let run = tracer.run_frame(&dgram).expect("trace");
    assert_eq!(
        (run.result.verdict, run.result.reason),
        ("drop", "backend-gone"),
        "UDP to a deleted backend: {:?}",
        run.result
    );
    assert_eq!(run.retval, TC_ACT_SHOT);
}

/// Splits a frame built by `packet::build` (no IPv4 options, no IPv6 extension headers) into the two fragments of
/// one datagram with identification `id`: the first carries the first `first_len` bytes of the L4 part (a multiple
/// of 8, the L4 header included), the second the rest at offset `first_len`.
fn fragment(frame: &[u8], id: u32, first_len: usize) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(first_len % 8, 0, "fragment data is a multiple of 8 bytes");
    let eth = &frame[..14];
    let v4 = frame[12..14] == [0x08, 0x00];
    let l3_len = if v4 { 20 } else { 40 };
    let (head, l4) = frame[14..].split_at(l3_len);
    let piece = |data: &[u8], offset: usize, more: bool| -> Vec<u8> {
        let mut f = eth.to_vec();
        let mut ip = head.to_vec();
        if v4 {
            ip[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&(id as u16).to_be_bytes());
            let frag = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            ip[6..8].copy_from_slice(&frag.to_be_bytes());
            ip[10..12].fill(0);
            let c = packet::fold(packet::sum(&ip, 0));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        } else {
            let upper = ip[6];
            ip[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
            ip[6] = 44;
            f.extend_from_slice(&ip);
            let off = ((offset / 8) as u16) << 3 | u16::from(more);
            f.extend_from_slice(&[upper, 0]);
            f.extend_from_slice(&off.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        f.extend_from_slice(data);
        f
    };
    (
        piece(&l4[..first_len], 0, true),
        piece(&l4[first_len..], first_len, false),
    )
}

/// The unfragmented frame two translated fragments (as [`fragment`] built them) reassemble to: the first
/// fragment's headers with the whole L4 part, so `packet::parse` can verify the datagram's L4 checksum.
fn reassemble(first: &[u8], later: &[u8]) -> Vec<u8> {
    let v4 = first[12..14] == [0x08, 0x00];
    let data = if v4 { 34 } else { 62 };
    let l4: Vec<u8> = first[data..]
        .iter()
        .chain(&later[data..])
        .copied()
        .collect();
    let mut f = first[..14].to_vec();
    if v4 {
        let mut ip = first[14..34].to_vec();
        ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip[6..8].fill(0);
        ip[10..12].fill(0);
        let c = packet::fold(packet::sum(&ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
    } else {
        let mut ip = first[14..54].to_vec();
        ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        ip[6] = first[54];
        f.extend_from_slice(&ip);
    }
    f.extend_from_slice(&l4);
    f
}

/// The (source, destination) addresses of a frame's IP header.
fn ip_addrs(frame: &[u8]) -> (IpAddr, IpAddr) {
    if frame[12..14] == [0x08, 0x00] {
        let a = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&frame[o..o + 4]).expect("4 bytes"));
        (a(26), a(30))
    } else {
        let a = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&frame[o..o + 16]).expect("16 bytes"));
        (a(22), a(38))
    }
}

#[test]
fn later_fragments_follow_their_first_fragment() {
    if !require_root("later_fragments_follow_their_first_fragment") {
        return;
    }
    let (mut tracer, _manifest) = tracer();
    let payload: Vec<u8> = (0u8..48).collect();
    for (src, dst, port, backends) in [
        (
            sa(CLIENT_V4, 47000),
            sa(NODE_V4, 30053),
            5353,
            &WEB_BACKENDS[..],
        ),
        (
            sa(CLIENT_V6, 47001),
            sa(NODE_V6, 30091),
            5353,
            &WEB6_BACKENDS[..],
        ),
    ] {
        let d = format!("UDP {src} -> {dst} in two fragments");
        let whole = packet::build(Protocol::Udp, src, dst, 0, &payload);
        // 8 bytes of UDP header and 16 of payload in the first fragment, 32 bytes of payload in the second.
        let (first, later) = fragment(&whole, 0x1234_5678, 24);

        let run1 = tracer.run_frame(&first).expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            (run1.result.verdict, run1.result.reason),
            ("forward", "new-flow"),
            "{d}: first fragment: {:?}",
            run1.result
        );
        let backend: SocketAddr = run1
            .result
            .backend
            .as_deref()
            .expect("backend")
            .parse()
            .expect("ip:port");
        assert!(
            backends.contains(&backend.ip().to_string().as_str()) && backend.port() == port,
            "{d}: backend {backend}"
        );

        let run2 = tracer.run_frame(&later).expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            (run2.result.verdict, run2.result.reason),
            ("forward", "fragment-followed"),
            "{d}: later fragment: {:?}",
            run2.result
        );
        assert_eq!(run2.retval, TC_ACT_OK, "{d}: tc verdict");
        assert_eq!(
            (&run2.result.backend, run2.result.snat),
            (&run1.result.backend, run1.result.snat),
            "{d}: the later fragment is the first one's flow"
        );
        assert_eq!(
            ip_addrs(&run2.output),
            ip_addrs(&run1.output),
            "{d}: both fragments carry the same translated addresses"
        );
        assert_eq!(
            ip_addrs(&run2.output),
            (src.ip(), backend.ip()),
            "{d}: DNAT to the backend, source kept at ingress"
        );
        if src.is_ipv4() {
            assert_eq!(
                packet::fold(packet::sum(&run2.output[14..34], 0)),
                0,
                "{d}: the later fragment's IPv4 header checksum"
            );
        }
        assert_eq!(
            run2.output[run2.output.len() - 32..],
            payload[16..],
            "{d}: the later fragment's data is untouched"
        );
        let p = packet::parse(&reassemble(&run1.output, &run2.output))
            .unwrap_or_else(|| panic!("{d}: reassembled datagram is no IP packet"));
        assert_eq!((p.src, p.dst), (src, backend), "{d}: reassembled datagram");
        assert!(
            p.checksums_ok,
            "{d}: the reassembled datagram's UDP checksum (updated in the first fragment only) is wrong"
        );

        // A later fragment of a datagram whose first fragment never came passes untouched.
        let (_, unknown) = fragment(&whole, 0x0bad, 24);
        let run3 = tracer.run_frame(&unknown).expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            (run3.result.verdict, run3.result.reason),
            ("pass", "fragment"),
            "{d}: unknown later fragment: {:?}",
            run3.result
        );
        assert_eq!(run3.retval, TC_ACT_UNSPEC, "{d}: tc verdict");
        assert_eq!(
            run3.output, unknown,
            "{d}: an unknown later fragment is untouched"
        );

        // A first fragment that is not translated (no service on its port) removes its key's entry: the same
        // identification between the same addresses must not pick up the earlier datagram's translation.
        let other = packet::build(
            Protocol::Udp,
            SocketAddr::new(src.ip(), 47100),
            SocketAddr::new(dst.ip(), 22),
            0,
            &payload,
        );
        let (first_other, later_other) = fragment(&other, 0x1234_5678, 24);
        let run4 = tracer.run_frame(&first_other).expect("BPF_PROG_TEST_RUN");
        assert_eq!(run4.result.verdict, "pass", "{d}: {:?}", run4.result);
        let run5 = tracer.run_frame(&later_other).expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            (run5.result.verdict, run5.result.reason),
            ("pass", "fragment"),
            "{d}: a reused identification after an untranslated first fragment: {:?}",
            run5.result
        );
        assert_eq!(run5.output, later_other, "{d}: passed untouched");
    }
    let counts = tracer
        .maps()
        .packet
        .reason_counts()
        .expect("reading LB_DROP_STATS");
    assert_eq!(
        counts[reason::FRAGMENT_FOLLOWED as usize],
        2,
        "LB_DROP_STATS counts the translated later fragments"
    );
}

#[test]
fn sctp_port_rewrite_updates_crc32c_both_ways() {
    if !require_root("sctp_port_rewrite_updates_crc32c_both_ways") {
        return;
    }
    // The `sctp` Service's `moved` port: NodePort 30778 -> 10.244.1.30:7000 on node A (no SNAT), so the reply
    // leaves through egress with the NodePort given back as its source.
    let (mut tracer, _manifest) = tracer();
    let (node_port, backend) = (sa(NODE_V4, 30778), sa("10.244.1.30", 7000));
    // Payload sizes from one chunk header to a full 1500-byte MTU (20 + 12 + 1468) and a jumbo
    // frame as large as BPF_PROG_TEST_RUN takes (a page with its skb overhead).
    for (i, len) in [4usize, 100, 1000, 1468, 3400].into_iter().enumerate() {
        let client = sa(CLIENT_V4, 48000 + i as u16);
        let d = format!("SCTP {client} -> {node_port} with {len} bytes of chunks");
        let payload: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
        let frame = packet::build(Protocol::Sctp, client, node_port, 0, &payload);
        let run = tracer.run_frame(&frame).expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            (run.result.verdict, run.result.reason),
            ("forward", "new-flow"),
            "{d}: {:?}",
            run.result
        );
        let p = packet::parse(&run.output).unwrap_or_else(|| panic!("{d}: no IP packet"));
        assert_eq!((p.src, p.dst), (client, backend), "{d}: DNAT with the port");
        assert!(
            p.checksums_ok,
            "{d}: CRC32c after the port rewrite (recomputed here)"
        );
        assert_eq!(
            run.output[run.output.len() - len..],
            payload[..],
            "{d}: chunks untouched"
        );
        // The flow's next packet takes the conntrack path (a different caller of the same rewrite).
        let run = tracer.run_frame(&frame).expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            (run.result.verdict, run.result.reason),
            ("forward", "conntrack"),
            "{d}: second packet: {:?}",
            run.result
        );
        let p = packet::parse(&run.output).unwrap_or_else(|| panic!("{d}: no IP packet"));
        assert_eq!((p.src, p.dst), (client, backend), "{d}: established DNAT");
        assert!(
            p.checksums_ok,
            "{d}: CRC32c of an established flow's packet"
        );

        // The backend's reply, as it leaves node A towards the client: source back to the NodePort.
        let reply = packet::build(Protocol::Sctp, backend, client, 0, &payload);
        let run = tracer.run_egress_frame(&reply).expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            (run.result.verdict, run.result.reason),
            ("forward", "reply"),
            "{d}: reply at egress: {:?}",
            run.result
        );
        let p = packet::parse(&run.output).unwrap_or_else(|| panic!("{d}: reply: no IP packet"));
        assert_eq!(
            (p.src, p.dst),
            (node_port, client),
            "{d}: reverse DNAT of the reply"
        );
        assert!(
            p.checksums_ok,
            "{d}: the reply's CRC32c after the port rewrite"
        );
    }

    // A packet that arrives with a wrong CRC32c still has a wrong one after the rewrite: the update is incremental,
    // so corruption is never turned into a valid packet.
    let client = sa(CLIENT_V4, 48100);
    let mut frame = packet::build(Protocol::Sctp, client, node_port, 0, b"corrupt!");
    let crc_at = 14 + 20 + 8;
    frame[crc_at] ^= 0x5a;
    let run = tracer.run_frame(&frame).expect("BPF_PROG_TEST_RUN");
    assert_eq!(run.result.verdict, "forward", "{:?}", run.result);
    let p = packet::parse(&run.output).expect("IP packet");
    assert_eq!(p.dst, backend, "DNAT with the port");
    assert!(!p.checksums_ok, "a corrupted SCTP packet must stay invalid");
    let mut fixed = run.output;
    fixed[crc_at] ^= 0x5a;
    assert!(
        packet::parse(&fixed).expect("IP packet").checksums_ok,
        "the rewrite changed the CRC32c by exactly the port change"
    );
}
