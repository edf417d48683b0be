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
