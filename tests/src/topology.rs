//! Ready-made test networks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{BpfDir, Cgroup, Child, Cmd, NetNs, Probe, Veth, unique_token};

/// How long a `serve` child may take to bind its ports.
const SERVE_READY: Duration = Duration::from_secs(10);

/// One backend of a [`Topology::star`]: its namespace and the veth pair joining it to the client.
///
/// Backend `i` (from 0) has 10.244.{i+1}.2/24 and fd00:244:{i+1}::2/64; the client's end of its veth has .1 and ::1
/// of the same subnets. (The IPv6 group is the same digits as the IPv4 octet, so `fd00:244:10::2` for i = 9.)
#[derive(Debug)]
pub struct Backend {
    // Declared before `ns`: fields drop in order, and the pair is deleted while its namespace still exists.
    veth: Veth,
    ns: NetNs,
    index: usize,
    id: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    client_ipv4: Ipv4Addr,
    client_ipv6: Ipv6Addr,
}

impl Backend {
    pub fn index(&self) -> usize {
        self.index
    }

    /// The identity [`Topology::serve`] gives its server: `backend-<index>`.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The pair: `a()` is the client's end (in the client namespace), `b()` the backend's.
    pub fn veth(&self) -> &Veth {
        &self.veth
    }

    /// The backend's interface name (in its namespace).
    pub fn ifname(&self) -> &str {
        self.veth.b().name()
    }

    /// The client's interface towards this backend (in the client namespace).
    pub fn client_ifname(&self) -> &str {
        self.veth.a().name()
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// The client's address on this backend's link.
    pub fn client_ipv4(&self) -> Ipv4Addr {
        self.client_ipv4
    }

    /// The client's address on this backend's link.
    pub fn client_ipv6(&self) -> Ipv6Addr {
        self.client_ipv6
    }

    pub fn addr_v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ipv4), port)
    }

    pub fn addr_v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ipv6), port)
    }
}

/// A client namespace joined to N backend namespaces, each by its own veth pair, plus a cgroup for the client's
/// processes and a bpffs pin directory. There is no route anywhere else: the root namespace is not connected.
///
/// Drop removes, in order: the processes it started ([`Topology::spawn`], [`Topology::serve`]), the veth pairs and
/// backend namespaces, the client namespace, the cgroup (killing anything left in it), the pin directory.
#[derive(Debug)]
pub struct Topology {
    // Field order is drop order; see the type's documentation.
    children: Vec<Child>,
    backends: Vec<Backend>,
    client: NetNs,
    cgroup: Cgroup,
    bpf: BpfDir,
    token: String,
}

impl Topology {
    /// Builds the star with `backends` backends (1 to 254).
    pub fn star(backends: usize) -> Result<Topology> {
        if !(1..=254).contains(&backends) {
            bail!("a star has 1 to 254 backends, not {backends}");
        }
        let token = unique_token();
        // Guards are built one by one, so that a failure part way drops (and removes) what was already made.
        let bpf = BpfDir::new(&format!("lbt-{token}"))?;
        let cgroup = Cgroup::new(&format!("lbt-{token}"))?;
        let client = NetNs::new(&format!("lbt-{token}-client"))?;
        let mut topo = Topology {
            children: Vec::new(),
            backends: Vec::new(),
            client,
            cgroup,
            bpf,
            token,
        };
        for index in 0..backends {
            let backend = topo
                .add_backend(index)
                .with_context(|| format!("cannot build backend {index}"))?;
            topo.backends.push(backend);
        }
        Ok(topo)
    }

    fn add_backend(&self, index: usize) -> Result<Backend> {
        let subnet = index + 1;
        let token = &self.token;
        let ns = NetNs::new(&format!("lbt-{token}-b{index}"))?;
        // The client's ends get indexes 100, 101, ...: distinct from the backend end's (2, as the first interface of
        // a fresh namespace), which keeps IPv6 from waiting for a delayed carrier event (see Veth::with_index).
        let client_index = 100 + u32::try_from(index)?;
        let veth = Veth::with_index(
            &self.client,
            &format!("c{index}-{token}"),
            client_index,
            &ns,
            &format!("b{index}-{token}"),
        )?;
        let (client_v4, client_v6) = (
            format!("10.244.{subnet}.1"),
            format!("fd00:244:{subnet}::1"),
        );
        let (backend_v4, backend_v6) = (
            format!("10.244.{subnet}.2"),
            format!("fd00:244:{subnet}::2"),
        );
        veth.a().add_addr(&format!("{client_v4}/24"))?;
        veth.a().add_addr(&format!("{client_v6}/64"))?;
        veth.b().add_addr(&format!("{backend_v4}/24"))?;
        veth.b().add_addr(&format!("{backend_v6}/64"))?;
        veth.up()?;
        Ok(Backend {
            veth,
            ns,
            index,
            id: format!("backend-{index}"),
            ipv4: backend_v4.parse()?,
            ipv6: backend_v6.parse()?,
            client_ipv4: client_v4.parse()?,
            client_ipv6: client_v6.parse()?,
        })
    }

    /// The per-topology token its names are made from.
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn client(&self) -> &NetNs {
        &self.client
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Backend `index`. Panics if out of range, like slice indexing.
    pub fn backend(&self, index: usize) -> &Backend {
        &self.backends[index]
    }

    /// The cgroup client processes run in ([`Topology::in_client`]): attach cgroup programs here.
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The pin directory, /sys/fs/bpf/lbt-<token>.
    pub fn bpf_dir(&self) -> &BpfDir {
        &self.bpf
    }

    /// The names of all its network namespaces, client first.
    pub fn netns_names(&self) -> Vec<String> {
        std::iter::once(self.client.name().to_owned())
            .chain(self.backends.iter().map(|b| b.ns.name().to_owned()))
            .collect()
    }

    /// `cmd` to run in the client namespace and the topology's cgroup.
    pub fn in_client(&self, cmd: Cmd) -> Cmd {
        cmd.netns(&self.client).cgroup(&self.cgroup)
    }

    /// `cmd` to run in backend `index`'s namespace (outside the cgroup, so client-side programs leave it alone).
    pub fn in_backend(&self, index: usize, cmd: Cmd) -> Cmd {
        cmd.netns(&self.backends[index].ns)
    }

    /// Starts `cmd` and keeps it until the topology drops (before the namespaces go).
    pub fn spawn(&mut self, cmd: Cmd) -> Result<&mut Child> {
        let child = cmd.spawn()?;
        self.children.push(child);
        let last = self.children.len() - 1;
        Ok(&mut self.children[last])
    }

    /// Starts `lb-probe serve` in every backend, answering as [`Backend::id`] on these ports, and waits until all
    /// have bound them.
    pub fn serve(&mut self, probe: &Probe, tcp_ports: &[u16], udp_ports: &[u16]) -> Result<()> {
        let first = self.children.len();
        for index in 0..self.backends.len() {
            let cmd = self.in_backend(
                index,
                probe.serve_cmd(&self.backends[index].id, tcp_ports, udp_ports),
            );
            self.spawn(cmd)?;
        }
        for child in &mut self.children[first..] {
            Probe::wait_ready(child, SERVE_READY)?;
        }
        Ok(())
    }

    /// The processes started with [`Topology::spawn`] and [`Topology::serve`], in start order.
    pub fn children(&mut self) -> &mut [Child] {
        &mut self.children
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Explicit although field order already does it: processes must be gone before their namespaces, or a
        // namespace outlives its name while something still runs in it.
        self.children.clear();
    }
}

/// Two nodes and an outside client, for the per-packet datapath (tc programs on node A's external interfaces):
///
/// ```text
///  client ── uplink ── node A ── link ── node B ── pod-b (10.244.2.2, fd00:244:2::2)
///  192.0.2.1           192.0.2.10        198.51.100.2
///  2001:db8:1::1       2001:db8:1::10    2001:db8:2::2
///                      198.51.100.1
///                      2001:db8:2::1
///                        │
///                      pod-a (10.244.1.2, fd00:244:1::2)
/// ```
///
/// Node A and B forward (sysctls set inside their namespaces only). The client reaches node A's address on its
/// link, and [`node_pair::EXTERNAL_NET`] (where tests put externalIPs and LoadBalancer IPs) through node A, as an
/// upstream router would send it; nothing else. The pods route everything through their node; node B routes the
/// client's network through node A, so SNATed replies (to 192.0.2.10) come back to A. Nothing is connected to the
/// root namespace.
///
/// Drop removes, in order: the processes ([`NodePair::spawn`]), the veth pairs, the namespaces, the cgroup, the pin
/// directory.
#[derive(Debug)]
pub struct NodePair {
    // Field order is drop order; see the type's documentation.
    children: Vec<Child>,
    links: Vec<Veth>,
    pub client: NetNs,
    pub node_a: NetNs,
    pub node_b: NetNs,
    pub pod_a: NetNs,
    pub pod_b: NetNs,
    cgroup: Cgroup,
    bpf: BpfDir,
    token: String,
}

/// Addresses of a [`NodePair`].
pub mod node_pair {
    pub const CLIENT_V4: &str = "192.0.2.1";
    pub const CLIENT_V6: &str = "2001:db8:1::1";
    /// Node A's uplink address: its InternalIP, where NodePorts listen, and its SNAT address.
    pub const NODE_A_V4: &str = "192.0.2.10";
    pub const NODE_A_V6: &str = "2001:db8:1::10";
    pub const POD_A_V4: &str = "10.244.1.2";
    pub const POD_A_V6: &str = "fd00:244:1::2";
    pub const POD_B_V4: &str = "10.244.2.2";
    pub const POD_B_V6: &str = "fd00:244:2::2";
    /// Routed from the client to node A: externalIPs and LoadBalancer IPs of the tests (TEST-NET-3).
    pub const EXTERNAL_NET: &str = "203.0.113.0/24";
}

impl NodePair {
    pub fn new() -> Result<NodePair> {
        let token = unique_token();
        let bpf = BpfDir::new(&format!("lbn-{token}"))?;
        let cgroup = Cgroup::new(&format!("lbn-{token}"))?;
        let ns = |role: &str| NetNs::new(&format!("lbn-{token}-{role}"));
        let (client, node_a, node_b, pod_a, pod_b) =
            (ns("client")?, ns("a")?, ns("b")?, ns("pa")?, ns("pb")?);
        let mut pair = NodePair {
            children: Vec::new(),
            links: Vec::new(),
            client,
            node_a,
            node_b,
            pod_a,
            pod_b,
            cgroup,
            bpf,
            token,
        };
        pair.wire().context("wiring the node pair")?;
        Ok(pair)
    }

    /// One veth pair with addresses on both ends, `{a_name}-{token}` in `a_ns` (interface index `a_index`, see
    /// [`Veth::with_index`]) and `{b_name}-{token}` in `b_ns`; pushed onto `links` before it is configured, so a
    /// failure part way still deletes it.
    fn link(
        &self,
        links: &mut Vec<Veth>,
        ends: (&NetNs, &str, u32, &NetNs, &str),
        addrs: ([&str; 2], [&str; 2]),
    ) -> Result<()> {
        let (a_ns, a_name, a_index, b_ns, b_name) = ends;
        let t = &self.token;
        links.push(Veth::with_index(
            a_ns,
            &format!("{a_name}-{t}"),
            a_index,
            b_ns,
            &format!("{b_name}-{t}"),
        )?);
        let veth = links.last().context("just pushed")?;
        for a in addrs.0 {
            veth.a().add_addr(a)?;
        }
        for b in addrs.1 {
            veth.b().add_addr(b)?;
        }
        veth.up()
    }

    fn wire(&mut self) -> Result<()> {
        let mut links = Vec::new();
        let result = self.wire_into(&mut links);
        self.links = links;
        result
    }

    fn wire_into(&self, links: &mut Vec<Veth>) -> Result<()> {
        let (client, node_a, node_b) = (&self.client, &self.node_a, &self.node_b);
        let (pod_a, pod_b) = (&self.pod_a, &self.pod_b);
        self.link(
            links,
            (client, "cl", 100, node_a, "up"),
            (
                ["192.0.2.1/24", "2001:db8:1::1/64"],
                ["192.0.2.10/24", "2001:db8:1::10/64"],
            ),
        )?;
        self.link(
            links,
            (node_a, "ab", 101, node_b, "ba"),
            (
                ["198.51.100.1/24", "2001:db8:2::1/64"],
                ["198.51.100.2/24", "2001:db8:2::2/64"],
            ),
        )?;
        self.link(
            links,
            (node_a, "ap", 102, pod_a, "pa"),
            (
                ["10.244.1.1/24", "fd00:244:1::1/64"],
                ["10.244.1.2/24", "fd00:244:1::2/64"],
            ),
        )?;
        self.link(
            links,
            (node_b, "bp", 103, pod_b, "pb"),
            (
                ["10.244.2.1/24", "fd00:244:2::1/64"],
                ["10.244.2.2/24", "fd00:244:2::2/64"],
            ),
        )?;
        for node in [node_a, node_b] {
            node.sysctl("net.ipv4.ip_forward", "1")?;
            node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        client.ip(&[
            "route",
            "add",
            node_pair::EXTERNAL_NET,
            "via",
            node_pair::NODE_A_V4,
        ])?;
        pod_a.ip(&["route", "add", "default", "via", "10.244.1.1"])?;
        pod_a.ip(&["-6", "route", "add", "default", "via", "fd00:244:1::1"])?;
        pod_b.ip(&["route", "add", "default", "via", "10.244.2.1"])?;
        pod_b.ip(&["-6", "route", "add", "default", "via", "fd00:244:2::1"])?;
        node_a.ip(&["route", "add", "10.244.2.0/24", "via", "198.51.100.2"])?;
        node_a.ip(&[
            "-6",
            "route",
            "add",
            "fd00:244:2::/64",
            "via",
            "2001:db8:2::2",
        ])?;
        node_b.ip(&["route", "add", "192.0.2.0/24", "via", "198.51.100.1"])?;
        node_b.ip(&[
            "-6",
            "route",
            "add",
            "2001:db8:1::/64",
            "via",
            "2001:db8:2::1",
        ])?;
        Ok(())
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Node A's external interfaces: the uplink to the client and the link to node B.
    pub fn node_a_devices(&self) -> Vec<String> {
        vec![format!("up-{}", self.token), format!("ab-{}", self.token)]
    }

    /// A cgroup for the agent's socket programs (nothing runs in it).
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    pub fn bpf_dir(&self) -> &BpfDir {
        &self.bpf
    }

    /// Starts `cmd` and keeps it until the pair drops (before the namespaces go).
    pub fn spawn(&mut self, cmd: Cmd) -> Result<&mut Child> {
        let child = cmd.spawn()?;
        self.children.push(child);
        let last = self.children.len() - 1;
        Ok(&mut self.children[last])
    }

    /// Starts an `lb-probe serve` command (already placed in its namespace with [`Cmd::netns`]) and waits until it
    /// has bound its ports; returns its index for [`NodePair::child`].
    pub fn serve(&mut self, serve_cmd: Cmd) -> Result<usize> {
        let child = self.spawn(serve_cmd)?;
        Probe::wait_ready(child, SERVE_READY)?;
        Ok(self.children.len() - 1)
    }

    /// A process started with [`NodePair::spawn`] or [`NodePair::serve`].
    pub fn child(&mut self, index: usize) -> &mut Child {
        &mut self.children[index]
    }

    /// The process with this pid, if this pair started it.
    pub fn child_by_pid(&mut self, pid: u32) -> Option<&mut Child> {
        self.children.iter_mut().find(|c| c.pid() == pid)
    }
}

impl Drop for NodePair {
    fn drop(&mut self) {
        self.children.clear();
    }
}
