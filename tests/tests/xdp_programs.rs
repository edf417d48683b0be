//! The XDP fast path (`lb_xdp`) through BPF_PROG_TEST_RUN, next to the tc programs it sits in front of, on the
//! real object loaded privately by `lb-agent trace`'s core (`Tracer`: the agent's model and reconciler fill the
//! maps). A flow is established through the tc programs exactly as on a node (ingress DNAT, egress SNAT, the
//! reply's reverse translations), which also teaches `LB_XDP_L2` its headers; then XDP must translate the flow's
//! next packets as tc would, or pass what it cannot handle. No interface is touched.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use lb_agent::datapath::maps::{Maps, MapsRead};
use lb_agent::state::Protocol;
use lb_agent::trace::packet::{self, Parsed, TCP_ACK, TCP_SYN};
use lb_agent::trace::{Run, Tracer};
use lb_common::reason;
use lb_tests::require_root;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TCP_FIN: u8 = 0x01;

const NODE_V4: &str = "192.0.2.10";
const NODE_V6: &str = "2001:db8::10";
const CLIENT_V4: &str = "192.0.2.77";
const CLIENT_V6: &str = "2001:db8:ff::9";
const BACKEND_V4: &str = "10.244.2.5";
const BACKEND_V6: &str = "fd00:244:2::5";
/// The Ethernet header tc egress "sees" (the neighbour subsystem's work on a real node), which XDP must reuse.
const LEARNED_DST: [u8; 6] = [0x0a, 0xbb, 0xcc, 0xdd, 0xee, 0x01];
const LEARNED_SRC: [u8; 6] = [0x0a, 0xbb, 0xcc, 0xdd, 0xee, 0x02];

/// Node A; `remote` / `remote6` (NodePort, Cluster policy, one backend on node B: DNAT + SNAT); `lb`
/// (LoadBalancer with `loadBalancerSourceRanges` 192.0.2.0/24, a local backend).
const MANIFEST: &str = r#"apiVersion: v1
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
metadata: {name: remote, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}
    - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: remote-1
  namespace: t
  labels: {kubernetes.io/service-name: remote}
addressType: IPv4
ports:
  - {name: http, protocol: TCP, port: 8080}
  - {name: dns, protocol: UDP, port: 5353}
endpoints:
  - {addresses: [10.244.2.5], conditions: {ready: true}, nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: remote6, namespace: t}
spec:
  type: NodePort
  clusterIP: "fd00:96::10"
  ipFamilies: [IPv6]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30090}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: remote6-1
  namespace: t
  labels: {kubernetes.io/service-name: remote6}
addressType: IPv6
ports:
  - {name: http, protocol: TCP, port: 8080}
endpoints:
  - {addresses: ["fd00:244:2::5"], conditions: {ready: true}, nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: t}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  loadBalancerSourceRanges: [192.0.2.0/24]
  ports:
    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30100}
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
"#;

struct ManifestFile(PathBuf);

impl ManifestFile {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "lb-xdp-programs-{}-{}.yaml",
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

fn tracer() -> (Tracer, ManifestFile) {
    let manifest = ManifestFile::new();
    let object = lb_agent::datapath::loader::object_bytes(None)
        .expect("the eBPF object (run `cargo xtask build-ebpf --release` before the tests)");
    let mut tracer =
        Tracer::load(&object, &manifest.0, "node-a").expect("loading and programming the datapath");
    tracer
        .enable_xdp_learning()
        .expect("setting CONFIG_FLAG_XDP");
    (tracer, manifest)
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("fixture address"), port)
}

fn parsed(frame: &[u8]) -> Parsed {
    packet::parse(frame).unwrap_or_else(|| panic!("unparsable output frame {frame:02x?}"))
}

fn forwarded(run: &Run, what: &str) -> Parsed {
    assert_eq!(
        run.result.verdict, "forward",
        "{what}: tc did not forward: {:?}",
        run.result
    );
    parsed(&run.output)
}

/// The IPv4 TTL or IPv6 hop limit of a frame.
fn ttl(frame: &[u8]) -> u8 {
    if u16::from_be_bytes([frame[12], frame[13]]) == 0x0800 {
        frame[14 + 8]
    } else {
        frame[14 + 7]
    }
}

/// An established SNATed flow, built through the tc programs as a node sees it: the client's SYN (ingress DNAT,
/// egress SNAT), the backend's reply (ingress reverse SNAT, egress reverse DNAT) and the client's ACK, each
/// leaving through egress with the learned Ethernet header. Returns the client's packet after tc (what the
/// backend receives) and the backend's reply after tc (what the client receives).
struct Flow {
    proto: Protocol,
    client: SocketAddr,
    vip: SocketAddr,
    /// The node address and port the flow is SNATed to, and the backend.
    snat: SocketAddr,
    backend: SocketAddr,
}

fn leave(tracer: &mut Tracer, frame: &[u8], what: &str) -> Parsed {
    let mut frame = frame.to_vec();
    frame[0..6].copy_from_slice(&LEARNED_DST);
    frame[6..12].copy_from_slice(&LEARNED_SRC);
    let run = tracer.run_egress_frame(&frame).expect("tc egress");
    forwarded(&run, what)
}

fn establish(tracer: &mut Tracer, proto: Protocol, client: SocketAddr, vip: SocketAddr) -> Flow {
    let first_flags = if proto == Protocol::Tcp { TCP_SYN } else { 0 };
    let run = tracer
        .run_frame(&packet::build(proto, client, vip, first_flags, b"hello"))
        .expect("tc ingress");
    let dnat = forwarded(&run, "first packet");
    assert!(
        run.result.snat,
        "a remote backend is SNATed: {:?}",
        run.result
    );
    let out = leave(tracer, &run.output, "first packet at egress");
    let (snat, backend) = (out.src, out.dst);
    assert_eq!(dnat.dst, backend);
    // The backend answers (ACK: not a SYN, so the entries reach the established lifetime).
    let reply_flags = if proto == Protocol::Tcp { TCP_ACK } else { 0 };
    let run = tracer
        .run_frame(&packet::build(proto, backend, snat, reply_flags, b"world"))
        .expect("tc ingress (reply)");
    forwarded(&run, "reply");
    let back = leave(tracer, &run.output, "reply at egress");
    assert_eq!(
        (back.src, back.dst),
        (vip, client),
        "tc's reply translation"
    );
    // The client's ACK: the forward entries reach the established lifetime too.
    let run = tracer
        .run_frame(&packet::build(proto, client, vip, reply_flags, b"ack"))
        .expect("tc ingress (ack)");
    leave(tracer, &run.output, "ack at egress");
    Flow {
        proto,
        client,
        vip,
        snat,
        backend,
    }
}

/// XDP on an established flow: both directions translated exactly as tc would, TTL down by one, learned MACs,
/// valid checksums, sent with XDP_TX (the learned interface is the test runner's, which is also the ingress one).
fn check_fast_path(tracer: &mut Tracer, flow: &Flow) {
    let payload = vec![0x5au8; 700];
    let flags = if flow.proto == Protocol::Tcp {
        TCP_ACK
    } else {
        0
    };
    let before = tracer.maps().packet.reason_counts().expect("counters");
    let input = packet::build(flow.proto, flow.client, flow.vip, flags, &payload);
    let (action, out) = tracer.run_xdp_frame(&input).expect("lb_xdp");
    assert_eq!(
        action, XDP_TX,
        "{:?}: forward packet not sent by XDP",
        flow.proto
    );
    let p = parsed(&out);
    assert!(p.checksums_ok, "forward checksums after XDP: {out:02x?}");
    assert_eq!(
        (p.src, p.dst),
        (flow.snat, flow.backend),
        "XDP forward rewrite"
    );
    assert_eq!(ttl(&out), ttl(&input) - 1);
    assert_eq!(&out[0..6], &LEARNED_DST);
    assert_eq!(&out[6..12], &LEARNED_SRC);
    assert_eq!(out.len(), input.len());
    // Same addresses and ports as tc would have produced for the same packet.
    let run = tracer.run_frame(&input).expect("tc ingress");
    let tc = leave(tracer, &run.output, "same packet through tc");
    assert_eq!((tc.src, tc.dst), (p.src, p.dst), "XDP and tc agree");

    let input = packet::build(flow.proto, flow.backend, flow.snat, flags, &payload);
    let (action, out) = tracer.run_xdp_frame(&input).expect("lb_xdp");
    assert_eq!(action, XDP_TX, "{:?}: reply not sent by XDP", flow.proto);
    let p = parsed(&out);
    assert!(p.checksums_ok, "reply checksums after XDP: {out:02x?}");
    assert_eq!((p.src, p.dst), (flow.vip, flow.client), "XDP reply rewrite");
    assert_eq!(ttl(&out), ttl(&input) - 1);

    let after = tracer.maps().packet.reason_counts().expect("counters");
    for why in [reason::XDP_FORWARD, reason::XDP_REPLY] {
        assert!(
            after[why as usize] > before[why as usize],
            "{} did not count",
            reason::name(why)
        );
    }
}

#[test]
fn xdp_translates_established_remote_flows_as_tc_does() {
    if !require_root("xdp_translates_established_remote_flows_as_tc_does") {
        return;
    }
    let (mut tracer, _m) = tracer();
    for (proto, client, vip) in [
        (Protocol::Tcp, sa(CLIENT_V4, 40001), sa(NODE_V4, 30080)),
        (Protocol::Udp, sa(CLIENT_V4, 40002), sa(NODE_V4, 30053)),
        (Protocol::Tcp, sa(CLIENT_V6, 40003), sa(NODE_V6, 30090)),
    ] {
        let flow = establish(&mut tracer, proto, client, vip);
        let backend = if client.is_ipv4() {
            BACKEND_V4
        } else {
            BACKEND_V6
        };
        assert_eq!(
            flow.backend.ip(),
            backend.parse::<IpAddr>().expect("address")
        );
        check_fast_path(&mut tracer, &flow);
    }
}

#[test]
fn xdp_passes_new_flows_closing_flows_and_unknown_packets_to_tc() {
    if !require_root("xdp_passes_new_flows_closing_flows_and_unknown_packets_to_tc") {
        return;
    }
    let (mut tracer, _m) = tracer();
    let vip = sa(NODE_V4, 30080);
    // A new flow: tc's.
    let syn = packet::build(Protocol::Tcp, sa(CLIENT_V4, 41000), vip, TCP_SYN, b"");
    assert_eq!(
        tracer.run_xdp_frame(&syn).expect("lb_xdp").0,
        XDP_PASS,
        "SYN"
    );
    // Not a service.
    let other = packet::build(
        Protocol::Tcp,
        sa(CLIENT_V4, 41001),
        sa("192.0.2.99", 22),
        TCP_ACK,
        b"x",
    );
    let (action, out) = tracer.run_xdp_frame(&other).expect("lb_xdp");
    assert_eq!(
        (action, out),
        (XDP_PASS, other),
        "a non-service packet passes untouched"
    );
    // FIN of an established flow: tc owns lifetimes.
    let flow = establish(&mut tracer, Protocol::Tcp, sa(CLIENT_V4, 41002), vip);
    let fin = packet::build(Protocol::Tcp, flow.client, flow.vip, TCP_ACK | TCP_FIN, b"");
    assert_eq!(
        tracer.run_xdp_frame(&fin).expect("lb_xdp").0,
        XDP_PASS,
        "FIN"
    );
}

#[test]
fn xdp_passes_a_flow_whose_backend_was_deleted_to_tc() {
    if !require_root("xdp_passes_a_flow_whose_backend_was_deleted_to_tc") {
        return;
    }
    // Rule 12 is tc's to enforce (it ends the flow): XDP must not forward a flow whose backend is gone, even after
    // its entry recorded the backend as checked (the liveness check then goes by the epoch the agent bumps).
    let (mut tracer, _m) = tracer();
    let flow = establish(
        &mut tracer,
        Protocol::Tcp,
        sa(CLIENT_V4, 42000),
        sa(NODE_V4, 30080),
    );
    check_fast_path(&mut tracer, &flow);
    let id = tracer
        .maps()
        .backends()
        .expect("reading LB_BACKENDS")
        .into_iter()
        .find(|(_, v)| {
            v.port == flow.backend.port() && v.addr == lb_common::addr_bytes(flow.backend.ip())
        })
        .map(|(id, _)| id)
        .expect("the flow's backend id");
    tracer
        .maps()
        .delete_backend(id)
        .expect("deleting the backend");
    let ack = packet::build(Protocol::Tcp, flow.client, flow.vip, TCP_ACK, b"more");
    assert_eq!(
        tracer.run_xdp_frame(&ack).expect("lb_xdp").0,
        XDP_PASS,
        "a flow whose backend was deleted goes to tc"
    );
}

#[test]
fn xdp_never_forwards_malformed_or_truncated_packets() {
    if !require_root("xdp_never_forwards_malformed_or_truncated_packets") {
        return;
    }
    let (mut tracer, _m) = tracer();
    let flow = establish(
        &mut tracer,
        Protocol::Tcp,
        sa(CLIENT_V4, 42000),
        sa(NODE_V4, 30080),
    );
    let flow6 = establish(
        &mut tracer,
        Protocol::Tcp,
        sa(CLIENT_V6, 42001),
        sa(NODE_V6, 30090),
    );
    for f in [&flow, &flow6] {
        let good = packet::build(f.proto, f.client, f.vip, TCP_ACK, b"payload!");
        assert_eq!(tracer.run_xdp_frame(&good).expect("lb_xdp").0, XDP_TX);
        // Every truncation of a packet XDP would forward whole.
        for len in 0..good.len() {
            let (action, _) = tracer
                .run_xdp_frame(&good[..len])
                .unwrap_or((XDP_PASS, vec![]));
            assert!(
                action == XDP_PASS || action == XDP_DROP,
                "a frame cut to {len} bytes got action {action}"
            );
        }
        // Headers that lie: IPv4 options or a bad version, IPv6 extension header.
        let mut bad = good.clone();
        bad[14] = if f.client.is_ipv4() { 0x46 } else { 0x50 };
        assert_eq!(tracer.run_xdp_frame(&bad).expect("lb_xdp").0, XDP_PASS);
        let mut frag = good.clone();
        if f.client.is_ipv4() {
            frag[14 + 6] = 0x20; // MF
        } else {
            frag[14 + 6] = 44; // a Fragment header as next header
        }
        assert_eq!(tracer.run_xdp_frame(&frag).expect("lb_xdp").0, XDP_PASS);
    }
    // Noise.
    let mut seed = 0x1234_5678u32;
    for len in [14usize, 34, 54, 60, 64, 128] {
        let frame: Vec<u8> = (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (seed >> 16) as u8
            })
            .collect();
        let (action, _) = tracer.run_xdp_frame(&frame).unwrap_or((XDP_PASS, vec![]));
        assert!(
            action == XDP_PASS || action == XDP_DROP,
            "noise got {action}"
        );
    }
}

#[test]
fn xdp_drops_sources_outside_load_balancer_source_ranges() {
    if !require_root("xdp_drops_sources_outside_load_balancer_source_ranges") {
        return;
    }
    let (mut tracer, _m) = tracer();
    let lb = sa("203.0.113.100", 80);
    let before = tracer.maps().packet.reason_counts().expect("counters");
    let outside = packet::build(Protocol::Tcp, sa("198.18.0.5", 43000), lb, TCP_SYN, b"");
    assert_eq!(
        tracer.run_xdp_frame(&outside).expect("lb_xdp").0,
        XDP_DROP,
        "a source outside the ranges drops in XDP"
    );
    let inside = packet::build(Protocol::Tcp, sa(CLIENT_V4, 43001), lb, TCP_SYN, b"");
    assert_eq!(
        tracer.run_xdp_frame(&inside).expect("lb_xdp").0,
        XDP_PASS,
        "an allowed source goes on to tc"
    );
    let after = tracer.maps().packet.reason_counts().expect("counters");
    let i = reason::SOURCE_RANGE as usize;
    assert_eq!(after[i], before[i] + 1, "one source-range drop counted");
    // The service's drop counter too (the External frontend of the LoadBalancer IP).
    let maps = tracer.maps();
    let services = maps.services().expect("services");
    let (_, svc) = services
        .iter()
        .find(|(k, _)| {
            k.ip() == "203.0.113.100".parse::<IpAddr>().expect("address")
                && k.port == 80
                && k.scope == lb_common::SCOPE_EXTERNAL
        })
        .expect("the LoadBalancer frontend");
    let stats = maps.service_stats(svc.service_id).expect("service stats");
    assert_eq!(stats.drops, 1, "the LoadBalancer's drop counter");
}

/// The benchmark's XDP rows measure what they say: `lb_xdp` returns XDP_TX on the established remote-backend flow
/// (the bench checks it before timing and between chunks, and fails the row otherwise) and XDP_PASS on new flows.
/// Only that the rows were produced is asserted; their numbers belong to `cargo xtask bench`.
#[test]
fn bench_xdp_rows_run_on_a_translated_established_flow() {
    if !require_root("bench_xdp_rows_run_on_a_translated_established_flow") {
        return;
    }
    let results = lb_tests::bench::packet::run(&[10], 2500);
    assert!(results.error.is_none(), "{:?}", results.error);
    let row = &results.rows[0];
    assert!(row.error.is_none(), "{:?}", row.error);
    let est = row.xdp_established_ns.expect("the XDP established row");
    let new = row.xdp_new_flow_ns.expect("the XDP new-flow row");
    assert_eq!((est.n, new.n), (2500, 2500), "every run timed");
    eprintln!(
        "p50 ns: tc established {:?}, xdp new flow {}, xdp established {}",
        row.established_ns.map(|s| s.p50),
        new.p50,
        est.p50
    );
}

/// `lb-agent trace --xdp` runs the crafted packet through `lb_xdp` before `lb_tc_ingress`, as a node running with
/// `--xdp` would: a source outside `loadBalancerSourceRanges` is dropped by XDP (`"stage": "xdp"`), an allowed one
/// is passed on and forwarded by tc (`"stage": "tc"`). The real CLI, the real programs.
#[test]
fn trace_with_xdp_shows_which_program_decided() {
    if !require_root("trace_with_xdp_shows_which_program_decided") {
        return;
    }
    let manifest = ManifestFile::new();
    let trace = |src: &str, xdp: bool| -> serde_json::Value {
        let mut cmd = lb_tests::Cmd::new(lb_tests::agent_bin!())
            .arg("trace")
            .arg("--manifests")
            .arg(&manifest.0)
            .args(["--node-name", "node-a"]);
        if xdp {
            cmd = cmd.arg("--xdp");
        }
        let out = cmd
            .args(["tcp", src, "203.0.113.100:80"])
            .label("lb-agent-trace")
            .run(std::time::Duration::from_secs(60))
            .expect("lb-agent trace");
        serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("trace JSON {:?}: {e}", out.stdout))
    };
    let outside = trace("198.18.0.5:43000", true);
    assert_eq!(outside["verdict"], "drop", "{outside}");
    assert_eq!(outside["reason"], "source-range", "{outside}");
    assert_eq!(outside["stage"], "xdp", "{outside}");
    let inside = trace(&format!("{CLIENT_V4}:43001"), true);
    assert_eq!(inside["verdict"], "forward", "{inside}");
    assert_eq!(inside["backend"], "10.244.1.20:8080", "{inside}");
    assert_eq!(inside["stage"], "tc", "{inside}");
    // Without --xdp tc drops the same packet itself, and no stage is named.
    let tc_only = trace("198.18.0.5:43000", false);
    assert_eq!(tc_only["verdict"], "drop", "{tc_only}");
    assert_eq!(tc_only["reason"], "source-range", "{tc_only}");
    assert!(tc_only.get("stage").is_none(), "{tc_only}");
}
