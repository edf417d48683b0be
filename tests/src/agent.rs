//! The real agent under test: `lb-agent run` on a manifest file or against the in-process API server
//! (`--kubeconfig`), attached to a topology's cgroup and pinning into its bpffs directory, observed through the same
//! map readers the CLI uses.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_agent::datapath::inspect::{self, ServiceListing};
use lb_agent::datapath::maps::PinnedMaps;

use crate::apiserver::ApiServer;
use crate::process::{Child, Cmd};
use crate::topology::Topology;

/// The agent binary built from this tree (see `src/bin/lb-agent-under-test.rs`).
#[macro_export]
macro_rules! agent_bin {
    () => {
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_lb-agent-under-test"))
    };
}

/// A running agent plus its manifest file. Dropped before the topology (declare it after), so the process is
/// gone before the pins and cgroup are removed.
pub struct Agent {
    child: Option<Child>,
    bin: PathBuf,
    dir: PathBuf,
    manifest: PathBuf,
    /// Set in kubeconfig mode: the agent watches the API server this file names instead of the manifest.
    kubeconfig: Option<PathBuf>,
    pins: PathBuf,
    cgroup: PathBuf,
    node_name: String,
    /// Appended to `lb-agent run`'s arguments (see [`Agent::start_with_args`]).
    extra_args: Vec<String>,
    /// The network namespace the agent runs in (see [`Agent::start_in_netns`]); `None`: the test's own.
    netns: Option<PathBuf>,
}

impl Agent {
    /// Writes `manifest` and starts `lb-agent run` on it for node `test-node`.
    pub fn start(bin: &Path, topo: &Topology, manifest: &str) -> Result<Agent> {
        let dir = std::env::temp_dir().join(format!("lb-tests-agent-{}", topo.token()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut agent = Agent {
            child: None,
            bin: bin.to_path_buf(),
            manifest: dir.join("services.yaml"),
            kubeconfig: None,
            dir,
            pins: topo.bpf_dir().path().to_path_buf(),
            cgroup: topo.cgroup().path().to_path_buf(),
            node_name: "test-node".into(),
            extra_args: Vec::new(),
            netns: None,
        };
        agent.write_manifest(manifest)?;
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts `lb-agent run --kubeconfig` against `server` for node `test-node` and waits for its initial sync.
    pub fn start_kube(bin: &Path, topo: &Topology, server: &ApiServer) -> Result<Agent> {
        let mut agent = Agent::launch_kube(bin, topo, server)?;
        agent.wait_for_log("initial sync done", Duration::from_secs(30))?;
        Ok(agent)
    }

    /// [`Agent::start_kube`] without waiting for the initial sync, for tests of what happens before it.
    pub fn launch_kube(bin: &Path, topo: &Topology, server: &ApiServer) -> Result<Agent> {
        let dir = std::env::temp_dir().join(format!("lb-tests-agent-{}", topo.token()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let kubeconfig = dir.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        let mut agent = Agent {
            child: None,
            bin: bin.to_path_buf(),
            manifest: dir.join("services.yaml"),
            kubeconfig: Some(kubeconfig),
            dir,
            pins: topo.bpf_dir().path().to_path_buf(),
            cgroup: topo.cgroup().path().to_path_buf(),
            node_name: "test-node".into(),
            extra_args: Vec::new(),
            netns: None,
        };
        agent.launch()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        self.launch()?;
        self.wait_for_log("initial sync done", Duration::from_secs(30))
    }

    fn launch(&mut self) -> Result<()> {
        let source = match &self.kubeconfig {
            Some(k) => Cmd::new(&self.bin).arg("run").arg("--kubeconfig").arg(k),
            None => Cmd::new(&self.bin)
                .arg("run")
                .arg("--manifests")
                .arg(&self.manifest),
        };
        let child = source
            .args(["--node-name", &self.node_name])
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--bpffs")
            .arg(&self.pins)
            // The agent runs in the root namespace here: never attach the per-packet programs to the host's
            // interfaces (the `--devices` default); the per-packet tests run their agent inside a node namespace.
            .args(["--devices", "none"])
            // Agents of tests running side by side must not compete for kube-proxy's well-known ports: the OS
            // picks free ones (logged, see `health_addr`), and healthCheckNodePorts stay on loopback.
            .args(["--health-addr", "127.0.0.1:0"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--health-check-node-port-addresses", "127.0.0.1"])
            .args(&self.extra_args)
            .netns_path(self.netns.as_deref())
            .env("LB_LOG", "info")
            .label("lb-agent")
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Like [`Agent::start`], with more `lb-agent run` arguments (say `--config <file>`).
    pub fn start_with_args(
        bin: &Path,
        topo: &Topology,
        manifest: &str,
        extra_args: &[&str],
    ) -> Result<Agent> {
        Agent::start_file(bin, topo, manifest, extra_args, None)
    }

    /// Like [`Agent::start_with_args`], with the agent inside `ns`: that namespace is then "the host" for
    /// whatever the agent takes from its own namespace (`localhost:nodePort` serves only it).
    pub fn start_in_netns(
        bin: &Path,
        topo: &Topology,
        manifest: &str,
        extra_args: &[&str],
        ns: &crate::netns::NetNs,
    ) -> Result<Agent> {
        Agent::start_file(bin, topo, manifest, extra_args, Some(ns.path()))
    }

    fn start_file(
        bin: &Path,
        topo: &Topology,
        manifest: &str,
        extra_args: &[&str],
        netns: Option<PathBuf>,
    ) -> Result<Agent> {
        let dir = std::env::temp_dir().join(format!("lb-tests-agent-{}", topo.token()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut agent = Agent {
            child: None,
            bin: bin.to_path_buf(),
            manifest: dir.join("services.yaml"),
            kubeconfig: None,
            dir,
            pins: topo.bpf_dir().path().to_path_buf(),
            cgroup: topo.cgroup().path().to_path_buf(),
            node_name: "test-node".into(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            netns,
        };
        agent.write_manifest(manifest)?;
        agent.spawn()?;
        Ok(agent)
    }

    /// The directory the agent keeps its manifest (and anything a test puts next to it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pin directory (`--bpffs`).
    pub fn pins(&self) -> &Path {
        &self.pins
    }

    /// Where the `/healthz` server listens (from the agent's log line, since tests bind port 0).
    pub fn health_addr(&self) -> Result<std::net::SocketAddr> {
        self.listening_addr("health server listening")
    }

    /// Where `/metrics` listens.
    pub fn metrics_addr(&self) -> Result<std::net::SocketAddr> {
        self.listening_addr("metrics server listening")
    }

    fn listening_addr(&self, message: &str) -> Result<std::net::SocketAddr> {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains(message))
            .with_context(|| format!("no {message:?} line in the agent log:\n{log}"))?;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .with_context(|| format!("no addr= in {line:?}"))?;
        addr.parse()
            .with_context(|| format!("bad address {addr:?} in {line:?}"))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::pid)
    }

    /// Replaces the manifest the way editors and config-map updates do: a new file renamed over the old one.
    pub fn write_manifest(&self, yaml: &str) -> Result<()> {
        let tmp = self.dir.join(".services.yaml.tmp");
        std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.manifest)
            .with_context(|| format!("renaming over {}", self.manifest.display()))
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        self.child.as_ref().map(Child::stderr).unwrap_or_default()
    }

    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().context("agent not running")?;
            let exited = child.try_wait()?;
            if child.stderr().contains(needle) {
                return Ok(());
            }
            if let Some(status) = exited {
                bail!(
                    "lb-agent exited ({status}) before logging {needle:?}:\n{}",
                    child.stderr()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "lb-agent did not log {needle:?} within {timeout:?}:\n{}",
                    child.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9`: the process dies without any chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// Starts a new agent process on the same source, pins and cgroup.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// What the maps hold now, as `lb-agent services` reads it.
    pub fn services(&self) -> Result<Vec<ServiceListing>> {
        let maps = PinnedMaps::open(&self.pins)?;
        Ok(inspect::services(&maps)?)
    }

    /// Polls the maps until `pred` holds.
    pub fn wait_for_maps(
        &self,
        timeout: Duration,
        pred: impl Fn(&[ServiceListing]) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let list = self.services()?;
            if pred(&list) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "maps did not reach the expected state within {timeout:?}; they hold:\n{}\nagent log:\n{}",
                    inspect::render_services(&list),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- lb-agent log ---\n{}", self.log());
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The backends (as `ip:port`) a listing holds for `frontend` (e.g. `10.96.0.10:80`) in `scope`.
pub fn backends_of(
    list: &[ServiceListing],
    frontend: &str,
    protocol: &str,
    scope: &str,
) -> Option<Vec<String>> {
    list.iter()
        .find(|s| s.frontend == frontend && s.protocol == protocol && s.scope == scope)
        .map(|s| s.backends.iter().map(|b| b.address.clone()).collect())
}
