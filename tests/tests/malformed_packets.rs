//! Strict parsing in every per-packet program, through BPF_PROG_TEST_RUN on the real object (`lb-agent trace`'s
//! core, maps filled by the agent's model and reconciler; nothing attached): a packet whose lengths do not add up
//! is passed untouched by `lb_tc_ingress`, `lb_tc_egress` and `lb_xdp`, never forwarded, never SNATed, never sent
//! back out, and creates no conntrack state. Every truncation of a valid packet is tried, and each length field
//! lied about in both directions. Rejects take their lengths from the IP header, never the frame, and are never
//! sent to a source that cannot take them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use lb_agent::state::Protocol;
use lb_agent::trace::packet::{self, TCP_ACK, TCP_RST, TCP_SYN};
use lb_agent::trace::{Run, Tracer};
use lb_tests::require_root;

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const NODE_V4: &str = "192.0.2.10";
const NODE_V6: &str = "2001:db8::10";
const CLIENT_V4: &str = "203.0.113.9";
const CLIENT_V6: &str = "2001:db8:ff::9";

/// Node A; `remote` / `remote6`: NodePorts whose one endpoint is on node B (DNAT at ingress, SNAT at egress, and
/// the XDP fast path); `sctp`: a NodePort with a changed target port; `empty` / `empty6`: no endpoints (rejects).
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
    - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30091}
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
  - {name: dns, protocol: UDP, port: 5353}
endpoints:
  - {addresses: ["fd00:244:2::5"], conditions: {ready: true}, nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: sctp, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  ports:
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
  - {name: moved, protocol: SCTP, port: 7000}
endpoints:
  - {addresses: [10.244.1.30], conditions: {ready: true}, nodeName: node-a}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.13
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
"#;

/// A temporary manifest file, removed on drop.
struct ManifestFile(PathBuf);

impl ManifestFile {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "lb-malformed-{}-{}.yaml",
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

fn conntrack_entries(tracer: &mut Tracer) -> usize {
    tracer.maps().packet.conntrack.iter().count()
}

/// Recomputes an IPv4 frame's header checksum (options included) after an edit, so that only the edited length
/// is wrong.
fn fix_ipv4_csum(frame: &mut [u8]) {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = (usize::from(frame[14] & 0xf) * 4).clamp(20, frame.len() - 14);
    frame[24] = 0;
    frame[25] = 0;
    let c = packet::fold(packet::sum(&frame[14..14 + ihl], 0));
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

fn set_u16(frame: &mut [u8], off: usize, v: u16) {
    frame[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

fn get_u16(frame: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([frame[off], frame[off + 1]])
}

/// Every way `frame`'s length fields can lie (the issue's list, both directions), each with a description. The
/// frame is a valid Ethernet + IPv4 (no options) / IPv6 (no extension headers) + TCP/UDP/SCTP packet.
fn mutations(frame: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mut m = |what: &'static str, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut f = frame.to_vec();
        edit(&mut f);
        fix_ipv4_csum(&mut f);
        out.push((what, f));
    };
    let v4 = frame[12..14] == [0x08, 0x00];
    let (l4, proto) = if v4 { (34, frame[23]) } else { (54, frame[20]) };
    let l4_len = frame.len() - l4;
    if v4 {
        let total = get_u16(frame, 16);
        m("IPv4 total length one byte past the frame", &|f| {
            set_u16(f, 16, total + 1)
        });
        m("IPv4 total length far past the frame", &|f| {
            set_u16(f, 16, 0xffff)
        });
        m("IPv4 total length shorter than its header", &|f| {
            set_u16(f, 16, 19)
        });
        m("IPv4 total length 0", &|f| set_u16(f, 16, 0));
        m("IPv4 total length cutting into the L4 header", &|f| {
            set_u16(f, 16, 20 + 4)
        });
        m("IPv4 header length 16 bytes (IHL 4)", &|f| f[14] = 0x44);
        m("IPv4 header length 0", &|f| f[14] = 0x40);
        m("IPv4 header length past the total length (IHL 15)", &|f| {
            f[14] = 0x4f
        });
    } else {
        let payload = get_u16(frame, 18);
        m("IPv6 payload length 0", &|f| set_u16(f, 18, 0));
        m("IPv6 payload length one byte past the frame", &|f| {
            set_u16(f, 18, payload + 1)
        });
        m("IPv6 payload length far past the frame", &|f| {
            set_u16(f, 18, 0xffff)
        });
        m("IPv6 payload length cutting into the L4 header", &|f| {
            set_u16(f, 18, 4)
        });
    }
    match proto {
        6 => {
            m("TCP data offset 4 (16 bytes)", &|f| {
                f[l4 + 12] = (f[l4 + 12] & 0x0f) | 0x40
            });
            m("TCP data offset 0", &|f| f[l4 + 12] &= 0x0f);
            m("TCP data offset past the segment", &|f| {
                let words = (l4_len / 4 + 1).min(15) as u8;
                f[l4 + 12] = (f[l4 + 12] & 0x0f) | (words << 4)
            });
        }
        17 => {
            m("UDP length 7", &|f| set_u16(f, l4 + 4, 7));
            m("UDP length 0", &|f| set_u16(f, l4 + 4, 0));
            m("UDP length one byte past the datagram", &|f| {
                set_u16(f, l4 + 4, l4_len as u16 + 1)
            });
            m("UDP length far past the datagram", &|f| {
                set_u16(f, l4 + 4, 0xffff)
            });
        }
        _ => {}
    }
    out
}

/// Every truncation of `frame` a tc program can be given, and every mutation, each with a description.
/// BPF_PROG_TEST_RUN refuses (EINVAL) a tc frame that does not hold the Ethernet header and the fixed IP header its
/// ethertype names (kernel 6.18), so truncations start there.
fn broken(frame: &[u8]) -> Vec<(String, Vec<u8>)> {
    let l3_end = if frame[12..14] == [0x08, 0x00] {
        34
    } else {
        54
    };
    let mut out: Vec<(String, Vec<u8>)> = (l3_end..frame.len())
        .map(|len| {
            (
                format!("cut to {len} of {} bytes", frame.len()),
                frame[..len].to_vec(),
            )
        })
        .collect();
    out.extend(
        mutations(frame)
            .into_iter()
            .map(|(what, f)| (what.to_owned(), f)),
    );
    out
}

/// The first packets of new flows to each kind of frontend (TCP SYN and UDP over IPv4 and IPv6, SCTP), with a
/// payload so that truncations can cut into it.
fn new_flows(port_base: u16) -> Vec<Vec<u8>> {
    vec![
        packet::build(
            Protocol::Tcp,
            sa(CLIENT_V4, port_base),
            sa(NODE_V4, 30080),
            TCP_SYN,
            b"payload!",
        ),
        packet::build(
            Protocol::Udp,
            sa(CLIENT_V4, port_base + 1),
            sa(NODE_V4, 30053),
            0,
            b"payload!",
        ),
        packet::build(
            Protocol::Tcp,
            sa(CLIENT_V6, port_base + 2),
            sa(NODE_V6, 30090),
            TCP_SYN,
            b"payload!",
        ),
        packet::build(
            Protocol::Udp,
            sa(CLIENT_V6, port_base + 3),
            sa(NODE_V6, 30091),
            0,
            b"payload!",
        ),
        packet::build(
            Protocol::Sctp,
            sa(CLIENT_V4, port_base + 4),
            sa(NODE_V4, 30778),
            0,
            b"payload!",
        ),
    ]
}

fn assert_untouched(run: &Run, input: &[u8], what: &str) {
    assert_eq!(
        (run.result.verdict, run.retval),
        ("pass", TC_ACT_UNSPEC),
        "{what}: {:?}",
        run.result
    );
    assert_eq!(run.output, input, "{what}: a passed packet is untouched");
}

#[test]
fn ingress_never_forwards_or_tracks_broken_packets() {
    if !require_root("ingress_never_forwards_or_tracks_broken_packets") {
        return;
    }
    let (mut tracer, _m) = tracer();
    for frame in new_flows(40000) {
        let before = conntrack_entries(&mut tracer);
        for (what, f) in broken(&frame) {
            let run = tracer
                .run_frame(&f)
                .unwrap_or_else(|e| panic!("{what}: BPF_PROG_TEST_RUN: {e:#}"));
            assert_untouched(&run, &f, &format!("new flow, {what}"));
        }
        assert_eq!(
            conntrack_entries(&mut tracer),
            before,
            "a broken packet created conntrack state"
        );
        // The packet itself is fine.
        let run = tracer.run_frame(&frame).expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            run.result.verdict, "forward",
            "the valid packet: {:?}",
            run.result
        );
    }
    // Established flows: their broken packets pass untouched too, and leave the entries as they were.
    for (client, vip) in [
        (sa(CLIENT_V4, 40100), sa(NODE_V4, 30080)),
        (sa(CLIENT_V6, 40101), sa(NODE_V6, 30090)),
    ] {
        let syn = packet::build(Protocol::Tcp, client, vip, TCP_SYN, b"");
        assert_eq!(
            tracer.run_frame(&syn).expect("SYN").result.verdict,
            "forward"
        );
        let ack = packet::build(Protocol::Tcp, client, vip, TCP_ACK, b"established payload");
        let entries = conntrack_entries(&mut tracer);
        for (what, f) in broken(&ack) {
            let run = tracer
                .run_frame(&f)
                .unwrap_or_else(|e| panic!("{what}: BPF_PROG_TEST_RUN: {e:#}"));
            assert_untouched(&run, &f, &format!("established flow, {what}"));
        }
        assert_eq!(conntrack_entries(&mut tracer), entries);
        let run = tracer.run_frame(&ack).expect("ACK");
        assert_eq!(
            (run.result.verdict, run.result.reason),
            ("forward", "conntrack"),
            "the valid segment: {:?}",
            run.result
        );
    }
}

#[test]
fn egress_never_snats_broken_packets() {
    if !require_root("egress_never_snats_broken_packets") {
        return;
    }
    let (mut tracer, _m) = tracer();
    for (proto, client, vip) in [
        (Protocol::Tcp, sa(CLIENT_V4, 41000), sa(NODE_V4, 30080)),
        (Protocol::Udp, sa(CLIENT_V4, 41001), sa(NODE_V4, 30053)),
        (Protocol::Tcp, sa(CLIENT_V6, 41002), sa(NODE_V6, 30090)),
        (Protocol::Udp, sa(CLIENT_V6, 41003), sa(NODE_V6, 30091)),
    ] {
        let flags = if proto == Protocol::Tcp { TCP_SYN } else { 0 };
        let first = packet::build(proto, client, vip, flags, b"payload!");
        let run = tracer.run_frame(&first).expect("ingress");
        assert!(
            run.result.snat,
            "a remote backend is SNATed: {:?}",
            run.result
        );
        // What leaves towards the backend: DNATed, not yet SNATed.
        let dnat = run.output.clone();
        let entries = conntrack_entries(&mut tracer);
        for (what, f) in broken(&dnat) {
            let run = tracer
                .run_egress_frame(&f)
                .unwrap_or_else(|e| panic!("{what}: BPF_PROG_TEST_RUN: {e:#}"));
            assert_untouched(&run, &f, &format!("egress, {proto:?}, {what}"));
        }
        assert_eq!(conntrack_entries(&mut tracer), entries);
        let run = tracer.run_egress_frame(&dnat).expect("egress");
        assert_eq!(
            run.result.verdict, "forward",
            "the valid packet is SNATed: {:?}",
            run.result
        );
    }
}

#[test]
fn xdp_never_sends_broken_packets_of_established_flows() {
    if !require_root("xdp_never_sends_broken_packets_of_established_flows") {
        return;
    }
    let (mut tracer, _m) = tracer();
    for (proto, client, vip) in [
        (Protocol::Tcp, sa(CLIENT_V4, 42000), sa(NODE_V4, 30080)),
        (Protocol::Udp, sa(CLIENT_V4, 42001), sa(NODE_V4, 30053)),
        (Protocol::Tcp, sa(CLIENT_V6, 42002), sa(NODE_V6, 30090)),
        (Protocol::Udp, sa(CLIENT_V6, 42003), sa(NODE_V6, 30091)),
    ] {
        establish(&mut tracer, proto, client, vip);
        let flags = if proto == Protocol::Tcp { TCP_ACK } else { 0 };
        let good = packet::build(proto, client, vip, flags, b"established payload");
        assert_eq!(
            tracer.run_xdp_frame(&good).expect("lb_xdp").0,
            XDP_TX,
            "{proto:?} {client}: the valid packet takes the fast path"
        );
        let mut cases = broken(&good);
        cases.extend((0..34).map(|len| (format!("cut to {len} bytes"), good[..len].to_vec())));
        for (what, f) in cases {
            let Ok((action, out)) = tracer.run_xdp_frame(&f) else {
                // The test runner refuses frames too short for it; nothing ran.
                continue;
            };
            assert_eq!(
                action, XDP_PASS,
                "{proto:?} {client}, {what}: action {action}"
            );
            assert_eq!(
                out, f,
                "{proto:?} {client}, {what}: a passed frame is untouched"
            );
        }
    }
}

/// Establishes a flow through the tc programs as a node sees it (client's first packet, the backend's answer, the
/// client's next packet, each leaving through egress), so that XDP has entries and a learned L2 header.
fn establish(tracer: &mut Tracer, proto: Protocol, client: SocketAddr, vip: SocketAddr) {
    let (first, next) = if proto == Protocol::Tcp {
        (TCP_SYN, TCP_ACK)
    } else {
        (0, 0)
    };
    let run = tracer
        .run_frame(&packet::build(proto, client, vip, first, b"hello"))
        .expect("ingress");
    let out = tracer.run_egress_frame(&run.output).expect("egress");
    assert_eq!(out.result.verdict, "forward", "{:?}", out.result);
    let leg = packet::parse(&out.output).expect("SNATed frame");
    let reply = packet::build(proto, leg.dst, leg.src, next, b"world");
    let run = tracer.run_frame(&reply).expect("ingress (reply)");
    tracer
        .run_egress_frame(&run.output)
        .expect("egress (reply)");
    let run = tracer
        .run_frame(&packet::build(proto, client, vip, next, b"ack"))
        .expect("ingress (ack)");
    tracer.run_egress_frame(&run.output).expect("egress (ack)");
}

/// The RST's acknowledgment number, from a reject's output frame.
fn rst_ack(out: &[u8]) -> u32 {
    let l4 = if out[12..14] == [0x08, 0x00] { 34 } else { 54 };
    u32::from_be_bytes(out[l4 + 8..l4 + 12].try_into().expect("4 bytes"))
}

#[test]
fn rejects_take_lengths_from_the_ip_header() {
    if !require_root("rejects_take_lengths_from_the_ip_header") {
        return;
    }
    let (mut tracer, _m) = tracer();
    for (client, vip) in [
        (sa(CLIENT_V4, 43000), sa(NODE_V4, 30083)),
        (sa(CLIENT_V6, 43001), sa(NODE_V6, 30085)),
    ] {
        // A bare SYN, padded by Ethernet to its 60-byte minimum (and more): the RST acknowledges seq + 1.
        let mut padded = packet::build(Protocol::Tcp, client, vip, TCP_SYN, b"");
        padded.resize(padded.len().max(60) + 4, 0);
        let run = tracer.run_frame(&padded).expect("padded SYN");
        assert_eq!(
            (run.result.verdict, run.retval),
            ("reject", TC_ACT_REDIRECT),
            "{:?}",
            run.result
        );
        assert_eq!(
            rst_ack(&run.output),
            1001,
            "{client}: RST for a padded bare SYN"
        );
        let p = packet::parse(&run.output).expect("RST");
        assert!(p.checksums_ok, "{client}: RST checksums");
        // A SYN with data: seq + 1 + its length.
        let data = packet::build(Protocol::Tcp, client, vip, TCP_SYN, b"12345678");
        let run = tracer.run_frame(&data).expect("SYN with data");
        assert_eq!(
            rst_ack(&run.output),
            1009,
            "{client}: RST for a SYN with 8 bytes"
        );
    }
}

#[test]
fn padded_packets_are_forwarded_whole() {
    if !require_root("padded_packets_are_forwarded_whole") {
        return;
    }
    let (mut tracer, _m) = tracer();
    for frame in new_flows(44000) {
        let mut padded = frame.clone();
        padded.resize(frame.len() + 16, 0);
        let run = tracer.run_frame(&padded).expect("padded packet");
        assert_eq!(
            run.result.verdict, "forward",
            "Ethernet padding is not an error: {:?}",
            run.result
        );
        let p = packet::parse(&run.output).expect("forwarded frame");
        assert!(p.checksums_ok, "checksums of a padded packet after DNAT");
    }
}

#[test]
fn never_answers_a_rst_nor_an_unanswerable_source() {
    if !require_root("never_answers_a_rst_nor_an_unanswerable_source") {
        return;
    }
    let (mut tracer, _m) = tracer();
    // RFC 9293 3.10.7.1: a RST is never answered with a RST.
    for (client, vip) in [
        (sa(CLIENT_V4, 45000), sa(NODE_V4, 30083)),
        (sa(CLIENT_V6, 45001), sa(NODE_V6, 30085)),
    ] {
        let rst = packet::build(Protocol::Tcp, client, vip, TCP_RST | TCP_ACK, b"");
        let run = tracer.run_frame(&rst).expect("RST");
        assert_eq!(
            (run.result.verdict, run.result.reason, run.retval),
            ("drop", "no-endpoints", TC_ACT_SHOT),
            "{client}: {:?}",
            run.result
        );
    }
    // Sources an answer cannot go to: dropped, for the reject's own reason.
    let v4 = [
        "0.0.0.0",
        "0.1.2.3",
        "127.0.0.1",
        "224.0.0.1",
        "239.1.2.3",
        "255.255.255.255",
    ];
    let v6 = ["::", "::1", "ff02::1", "ff05::2", "::ffff:198.51.100.1"];
    for (src, tcp, udp) in v4
        .iter()
        .map(|a| (*a, sa(NODE_V4, 30083), sa(NODE_V4, 30084)))
        .chain(
            v6.iter()
                .map(|a| (*a, sa(NODE_V6, 30085), sa(NODE_V6, 30086))),
        )
    {
        for (proto, dst) in [(Protocol::Tcp, tcp), (Protocol::Udp, udp)] {
            let flags = if proto == Protocol::Tcp { TCP_SYN } else { 0 };
            let frame = packet::build(proto, sa(src, 46000), dst, flags, b"x");
            let run = tracer.run_frame(&frame).expect("BPF_PROG_TEST_RUN");
            assert_eq!(
                (run.result.verdict, run.result.reason, run.retval),
                ("drop", "no-endpoints", TC_ACT_SHOT),
                "{proto:?} from {src}: {:?}",
                run.result
            );
        }
    }
    // A unicast source still gets its answer.
    let frame = packet::build(
        Protocol::Udp,
        sa(CLIENT_V4, 46001),
        sa(NODE_V4, 30084),
        0,
        b"x",
    );
    let run = tracer.run_frame(&frame).expect("UDP");
    assert_eq!(run.result.verdict, "reject", "{:?}", run.result);
}
