//! `cargo xtask image --smoke`: the built image's agent, run for real as the DaemonSet runs it, on namespaces made
//! here only (network safety: nothing touches the host's interfaces or its root cgroup):
//!
//! ```text
//!  node namespace (the agent: --network ns:, tc on n0, socket LB on a child cgroup)
//!    n0 10.244.7.1 ── p0 10.244.7.2  pod namespace (lb-probe serve, identity pod-7)
//! ```
//!
//! The container gets `--cap-drop all` plus exactly the capabilities deploy/lb-agent.yaml adds, no-new-privileges,
//! a read-only root, its own PID namespace, and the DaemonSet's mounts (/sys/fs/bpf, the cgroup v2 root at
//! /sys/fs/cgroup, /run/netns). Drop removes the container, the server, the pins, the cgroup and the namespaces.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use super::Podman;
use crate::util::{exec, workspace_root};

const NAME: &str = "lb-image-smoke";
const CLUSTER_IP: &str = "10.96.77.1";
const NODE_ADDR: &str = "10.244.7.1";
const POD_ADDR: &str = "10.244.7.2";
const NODE_PORT: u16 = 30777;

const MANIFEST: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: smoke}
spec:
  type: NodePort
  clusterIP: 10.96.77.1
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30777}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: smoke, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints: [{addresses: [10.244.7.2], conditions: {ready: true}, nodeName: smoke-node}]
"#;

/// Everything the smoke run makes, removed on drop in reverse order of making.
struct Made {
    podman: Vec<String>,
    server: Option<Child>,
    pins: PathBuf,
    cgroup: PathBuf,
    netns: Vec<String>,
    dir: PathBuf,
}

impl Drop for Made {
    fn drop(&mut self) {
        let _ = Command::new(&self.podman[0])
            .args(&self.podman[1..])
            .args(["rm", "-f", "-t", "5", NAME])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        // Unpinning the links detaches them (no process holds them any more); `cleanup` normally did it already.
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = std::fs::remove_dir(&self.cgroup);
        for ns in self.netns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The capabilities the agent's DaemonSet adds (the first `add:` list under `capabilities:` in the rendered
/// deploy/lb-agent.yaml, whose only DaemonSet is the agent's), read without a YAML parser: xtask stays small, and
/// tests/tests/capabilities.rs proves the same list from the generator's k8s-openapi objects.
fn daemonset_capabilities() -> anyhow::Result<Vec<String>> {
    let path = workspace_root().join(super::RENDERED_MANIFESTS);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().skip_while(|l| l.trim() != "capabilities:");
    lines.next();
    let mut lines = lines.skip_while(|l| l.trim() != "add:");
    lines.next();
    let mut caps = Vec::new();
    for l in lines {
        let t = l.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        match t.strip_prefix("- ") {
            Some(cap) => caps.push(cap.trim().to_owned()),
            None => break,
        }
    }
    ensure!(
        !caps.is_empty(),
        "no capabilities.add list in {}",
        path.display()
    );
    Ok(caps)
}

fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 mount")
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    exec(Command::new("ip").args(args))
}

/// Output of a command that must succeed.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(podman: &Podman, tag: &str) -> anyhow::Result<()> {
    let caps = daemonset_capabilities()?;
    eprintln!(
        "smoke: capabilities from {}: {caps:?}",
        super::RENDERED_MANIFESTS
    );
    let root = workspace_root();
    exec(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "-p", "lb-tests", "--bin", "lb-probe"]),
    )?;
    let probe = root.join("target/debug/lb-probe");
    let base: Vec<String> = {
        let c = podman.cmd();
        std::iter::once(c.get_program())
            .chain(c.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    };
    let node = format!("{NAME}-node");
    let pod = format!("{NAME}-pod");
    let mut made = Made {
        podman: base,
        server: None,
        pins: PathBuf::from("/sys/fs/bpf").join(NAME),
        cgroup: cgroup2_root()?.join(NAME),
        netns: Vec::new(),
        dir: std::env::temp_dir().join(NAME),
    };
    for ns in [&node, &pod] {
        ip(&["netns", "add", ns])?;
        made.netns.push(ns.clone());
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    ip(&[
        "-n", &node, "link", "add", "n0", "type", "veth", "peer", "name", "p0", "netns", &pod,
    ])?;
    ip(&[
        "-n",
        &node,
        "addr",
        "add",
        &format!("{NODE_ADDR}/24"),
        "dev",
        "n0",
    ])?;
    ip(&[
        "-n",
        &pod,
        "addr",
        "add",
        &format!("{POD_ADDR}/24"),
        "dev",
        "p0",
    ])?;
    ip(&["-n", &node, "link", "set", "n0", "up"])?;
    ip(&["-n", &pod, "link", "set", "p0", "up"])?;
    ip(&["-n", &pod, "route", "add", "default", "via", NODE_ADDR])?;
    // A node forwards (every Kubernetes node does; lb, like kube-proxy, relies on it for the hairpinned NodePort
    // below). A new namespace inherits the host's IPv4 setting, which on a build machine is usually off: the run
    // passed only where the host happened to forward.
    ip(&[
        "netns",
        "exec",
        &node,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ])?;
    std::fs::create_dir_all(&made.cgroup)
        .with_context(|| format!("creating {}", made.cgroup.display()))?;
    std::fs::create_dir_all(&made.dir)?;
    let manifest = made.dir.join("services.yaml");
    std::fs::write(&manifest, MANIFEST)?;
    made.server = Some(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{pod}"))
            .arg(&probe)
            .args(["serve", "--id", "pod-7", "--tcp-port", "8080"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting lb-probe serve in the pod namespace")?,
    );

    // As the DaemonSet: every capability dropped but its list, no privilege escalation, read-only root, root user.
    let confined = |c: &mut Command| {
        c.args(["--cap-drop", "all"]);
        for cap in &caps {
            c.args(["--cap-add", cap]);
        }
        c.args([
            "--security-opt",
            "no-new-privileges",
            "--read-only",
            "--user",
            "0",
        ])
        .args(["-v", "/sys/fs/bpf:/sys/fs/bpf"]);
    };
    let cgroup_root = cgroup2_root()?;
    let started = Instant::now();
    let mut run = podman.cmd();
    run.args(["run", "-d", "--name", NAME, "--runtime", "runc"]);
    podman.ulimits(&mut run);
    run.arg("--network").arg(format!("ns:/run/netns/{node}"));
    confined(&mut run);
    run.arg("-v")
        .arg(format!("{}:/sys/fs/cgroup:ro", cgroup_root.display()))
        .args(["-v", "/run/netns:/run/netns:ro,rslave"])
        .arg("-v")
        .arg(format!("{}:/etc/lb/services.yaml:ro", manifest.display()))
        .args(["-e", "NODE_NAME=smoke-node", tag, "run"])
        .args(["--manifests", "/etc/lb/services.yaml"])
        .arg("--cgroup")
        .arg(Path::new("/sys/fs/cgroup").join(NAME))
        .arg("--bpffs")
        .arg(&made.pins)
        .args(["--devices", "n0", "--health-addr", "127.0.0.1:10256"]);
    exec(&mut run)?;

    // Ready: /readyz answers 200 once the first sync has programmed the maps.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let code = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{node}"))
            .args([
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:10256/readyz",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if code == "200" {
            break;
        }
        if Instant::now() > deadline {
            let _ = exec(podman.cmd().args(["logs", NAME]));
            bail!("the image's agent did not become ready within 60 s (last /readyz: {code:?})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("smoke: /readyz 200 after {:.1?}", started.elapsed());
    exec(podman.cmd().args(["logs", NAME]))?;

    // Exactly the listed capabilities, and no_new_privs.
    let inspect =
        output(
            podman
                .cmd()
                .args(["inspect", "-f", "{{.State.Pid}} {{.EffectiveCaps}}", NAME]),
        )?;
    let pid = inspect.split_whitespace().next().unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(u64::MAX);
    eprintln!(
        "smoke: the agent (pid {pid}) runs with {}: CapEff {:#x}, NoNewPrivs {}",
        inspect.trim_start_matches(pid).trim(),
        eff,
        field("NoNewPrivs:")
    );
    ensure!(
        eff.count_ones() as usize == caps.len() && field("NoNewPrivs:") == "1",
        "the agent's capabilities are not exactly {caps:?} with no_new_privs"
    );
    // The DaemonSet asks for the runtime's default seccomp profile; podman's default applies here (mode 2: a
    // filter), so the agent is shown to work under such a profile.
    eprintln!("smoke: the agent's seccomp mode: {}", field("Seccomp:"));
    ensure!(
        field("Seccomp:") == "2",
        "the agent runs without a seccomp filter (Seccomp: {}), unlike the DaemonSet's RuntimeDefault",
        field("Seccomp:")
    );
    for cap in &caps {
        ensure!(
            inspect.contains(&format!("CAP_{cap}")),
            "the agent lacks CAP_{cap}: {inspect}"
        );
    }

    // The maps, read by the image's own CLI with the same capabilities.
    let mut services = podman.cmd();
    services.args(["run", "--rm", "--runtime", "runc", "--network", "none"]);
    podman.ulimits(&mut services);
    confined(&mut services);
    services.args([tag, "services", "--bpffs"]).arg(&made.pins);
    let listing = output(&mut services)?;
    eprint!("{listing}");
    ensure!(
        listing.contains(&format!("{CLUSTER_IP}:80"))
            && listing.contains(&format!("{POD_ADDR}:8080")),
        "the maps do not hold {CLUSTER_IP}:80 -> {POD_ADDR}:8080"
    );

    // Traffic: the socket LB (a client in the agent's cgroup, in the node namespace) and tc (the NodePort, from
    // the pod: in on n0, hairpinned back out with SNAT).
    let procs = made.cgroup.join("cgroup.procs");
    let socket_lb = output(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {} && exec nsenter --net=/run/netns/{node} {} tcp --to {CLUSTER_IP}:80 --count 3",
                procs.display(),
                probe.display()
            )),
    )?;
    let node_port = output(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{pod}"))
            .arg(&probe)
            .args([
                "tcp",
                "--to",
                &format!("{NODE_ADDR}:{NODE_PORT}"),
                "--count",
                "3",
            ]),
    )?;
    for (what, out) in [
        ("ClusterIP via the socket LB", &socket_lb),
        ("NodePort via tc", &node_port),
    ] {
        eprint!("smoke: {what}:\n{out}");
        let ok = out
            .lines()
            .filter(|l| l.contains(r#""ok":true"#) && l.contains(r#""backend":"pod-7""#))
            .count();
        ensure!(ok == 3, "{what}: {ok} of 3 connections reached pod-7");
    }

    // Stop the agent (the datapath stays), then remove it with the image's `lb-agent cleanup`.
    exec(podman.cmd().args(["stop", "-t", "5", NAME]))?;
    let mut cleanup = podman.cmd();
    cleanup.args(["run", "--rm", "--runtime", "runc"]);
    podman.ulimits(&mut cleanup);
    cleanup
        .arg("--network")
        .arg(format!("ns:/run/netns/{node}"));
    confined(&mut cleanup);
    cleanup.args([tag, "cleanup", "--bpffs"]).arg(&made.pins);
    exec(&mut cleanup)?;
    ensure!(
        !made.pins.exists(),
        "{} is still there after cleanup",
        made.pins.display()
    );
    eprintln!("smoke: cleanup removed every pin; removing the namespaces, cgroup and container");
    Ok(())
}
