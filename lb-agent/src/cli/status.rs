//! `lb-agent status`: one place that says what this node runs and what is wrong (`cilium-dbg status` is the
//! model). Two halves: what the running agent says about itself (`ops::status`, over its status socket: source and
//! watches, last sync, attach modes, versions, its problems), and what the pins hold, read here (links and their
//! cgroup and devices, map fill, what is programmed). Without an agent the second half still answers, and the
//! first says why it is missing.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::datapath::attachments::{self, Attachments};
use crate::datapath::map_fill::{MapFill, map_fill};
use crate::datapath::maps::{MapsRead, PinnedMaps};
use crate::datapath::names::service_names;
use crate::ops::metrics::BuildInfo;
use crate::ops::status::{AgentReport, STATUS_PATH, now_ms, socket_name};

use super::args::{OutputFormat, PinArgs};

/// A map this full is a problem (LRU maps evict live flows and sockets, the others refuse new entries).
const FULL: f64 = 0.9;

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pins: PinArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: OutputFormat,
}

/// What the pins hold.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PinsView {
    pub dir: String,
    pub links: Attachments,
    pub maps: Vec<MapFill>,
    /// Entries of `LB_SERVICES` (frontends x scopes) and `LB_BACKENDS`, and named service ids.
    pub frontends: usize,
    pub backends: usize,
    pub named_services: usize,
}

/// `lb-agent status -o json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// The running agent's report; `None` when none answered.
    pub agent: Option<AgentReport>,
    /// Why there is no report.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub agent_unreachable: Option<String>,
    pub pins: PinsView,
    /// This CLI's build (the running agent's is in `agent.build`).
    pub cli: BuildInfo,
    pub kernel: String,
    /// Everything that needs a human: the agent's own and what the pins show.
    pub problems: Vec<String>,
}

pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let status = collect(&args.pins.bpffs);
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        OutputFormat::Table => print!("{}", render(&status)),
    }
    Ok(())
}

/// Asks the agent pinning into `pins` for its report (blocking, a few seconds at most).
pub fn ask_agent(pins: &Path) -> Result<AgentReport, String> {
    use std::os::linux::net::SocketAddrExt;
    let name = socket_name(pins);
    let no_agent = |e: std::io::Error| {
        format!(
            "no agent answers on @{name} ({e}): nothing running on these pins in this network namespace, so the \
             datapath serves what the pins hold and follows no change"
        )
    };
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(no_agent)?;
    let mut stream = std::os::unix::net::UnixStream::connect_addr(&addr).map_err(no_agent)?;
    let io = |e: std::io::Error| format!("asking the agent on @{name}: {e}");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    write!(
        stream,
        "GET {STATUS_PATH} HTTP/1.1\r\nHost: lb-agent\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).map_err(io)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!(
            "the agent on @{name} answered {status}: {}",
            body.trim()
        ));
    }
    serde_json::from_str(body).map_err(|e| format!("the agent's answer is not a status ({e})"))
}

fn pins_view(dir: &Path) -> PinsView {
    let mut view = PinsView {
        dir: dir.display().to_string(),
        links: attachments::read(dir),
        maps: map_fill(dir),
        ..PinsView::default()
    };
    if let Ok(maps) = PinnedMaps::open(dir) {
        view.frontends = maps.services().map_or(0, |s| s.len());
        view.backends = maps.backends().map_or(0, |b| b.len());
    }
    view.named_services = service_names(dir).len();
    view
}

/// The agent's report and the pins, and every problem either shows.
pub fn collect(dir: &Path) -> Status {
    let (agent, agent_unreachable) = match ask_agent(dir) {
        Ok(r) => (Some(r), None),
        Err(e) => (None, Some(e)),
    };
    let pins = pins_view(dir);
    let mut problems = agent
        .as_ref()
        .map(|a| a.problems.clone())
        .unwrap_or_default();
    problems.extend(pin_problems(
        agent.as_ref(),
        agent_unreachable.as_deref(),
        &pins,
    ));
    Status {
        agent,
        agent_unreachable,
        pins,
        cli: crate::ops::build_info(),
        kernel: crate::host::kernel_release(),
        problems,
    }
}

/// What the pins show that needs a human.
fn pin_problems(
    agent: Option<&AgentReport>,
    unreachable: Option<&str>,
    pins: &PinsView,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(why) = unreachable {
        out.push(why.to_owned());
    }
    let sock = prog_count(&pins.links);
    if sock == 0 {
        out.push(format!(
            "no socket-LB link is pinned under {}/links: pods' and the node's own connections to Services are not \
             load balanced here",
            pins.dir
        ));
    } else if sock < lb_common::prog_names::SOCK_ALL.len() {
        out.push(format!(
            "only {sock} of the {} socket-LB links are pinned: some socket calls are not translated",
            lb_common::prog_names::SOCK_ALL.len()
        ));
    }
    for l in pins.links.tc.iter().chain(&pins.links.xdp) {
        if l.ifindex == 0 {
            out.push(format!(
                "the {} link on {} is defunct: the device is gone",
                l.kind, l.device
            ));
        }
    }
    for (name, error) in &pins.links.unreadable {
        out.push(format!("pinned link {name} cannot be read: {error}"));
    }
    for m in &pins.maps {
        if m.ratio() >= FULL {
            out.push(format!(
                "{} is {:.0}% full ({} of {}): raise its --max-* capacity",
                m.map,
                100.0 * m.ratio(),
                m.entries,
                m.capacity
            ));
        }
    }
    if let Some(agent) = agent {
        for d in &agent.datapath.devices {
            let pinned = pins.links.tc.iter().any(|l| l.device == d.name);
            if d.tc == "tcx" && !pinned {
                out.push(format!(
                    "the agent attached tcx links to {} but none is pinned: the programs go when the agent does",
                    d.name
                ));
            }
            if let Some(mode) = &d.xdp
                && !pins
                    .links
                    .xdp
                    .iter()
                    .any(|l| l.device == d.name && &l.kind == mode)
            {
                out.push(format!(
                    "the agent attached XDP ({mode}) to {} but no such link is pinned",
                    d.name
                ));
            }
        }
    }
    out
}

fn prog_count(links: &Attachments) -> usize {
    links.sock.len()
}

fn ago(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".to_owned();
    }
    let s = now_ms().saturating_sub(unix_ms) / 1000;
    match s {
        0..120 => format!("{s}s ago"),
        120..7200 => format!("{}m{}s ago", s / 60, s % 60),
        _ => format!("{}h{}m ago", s / 3600, (s % 3600) / 60),
    }
}

fn render(s: &Status) -> String {
    let mut o = String::new();
    let row = |o: &mut String, k: &str, v: String| {
        let _ = writeln!(o, "{:<18}{v}", format!("{k}:"));
    };
    match &s.agent {
        Some(a) => {
            let state = match (a.ready, a.healthy) {
                (true, true) => "ready",
                (false, true) => "NOT READY",
                (_, false) => "STUCK",
            };
            row(
                &mut o,
                "Agent",
                format!(
                    "running, pid {}, started {}, {state}, node {}",
                    a.pid,
                    ago(a.started_unix_ms),
                    a.node
                ),
            );
            row(
                &mut o,
                "Version",
                format!(
                    "{} (commit {}, eBPF object {})",
                    a.build.version, a.build.commit, a.build.ebpf_object
                ),
            );
            row(
                &mut o,
                "Kernel",
                format!(
                    "{}; using {}",
                    a.datapath.kernel,
                    a.datapath.features.join(", ")
                ),
            );
            row(
                &mut o,
                "Source",
                format!("{} {}", a.source.kind, a.source.location),
            );
            if let Some(api) = &a.source.api {
                for w in &api.watches {
                    let state = if w.failures_in_a_row > 0 {
                        format!(
                            "FAILING, {} attempts, next in {:.1}s: {}",
                            w.failures_in_a_row,
                            w.retry_in_ms as f64 / 1000.0,
                            w.last_error.as_deref().unwrap_or("")
                        )
                    } else if w.listed {
                        format!("listed, last event {}", ago(w.last_event_unix_ms))
                    } else {
                        "not listed yet".to_owned()
                    };
                    let _ = writeln!(o, "  {:<16}{state}", w.resource);
                }
                let _ = writeln!(
                    o,
                    "  {:<16}{} Services, {} EndpointSlices",
                    "pending", api.pending_services, api.pending_endpoint_slices
                );
            }
            let y = &a.sync;
            if y.syncs == 0 {
                row(&mut o, "Last sync", "none yet".to_owned());
            } else {
                row(
                    &mut o,
                    "Last sync",
                    format!(
                        "{}, {:.1} ms, {} ({} frontends changed); last complete {}; {} syncs",
                        ago(y.last_unix_ms),
                        y.last_duration_ms,
                        if y.last_full { "full" } else { "partial" },
                        y.last_changed_frontends,
                        ago(y.last_ok_unix_ms),
                        y.syncs
                    ),
                );
            }
            row(
                &mut o,
                "Programmed",
                format!(
                    "{} Services, {} frontends, {} backends; {} frontends not programmed, {} objects skipped",
                    y.services, y.frontends, y.backends, y.frontends_failed, y.skipped_objects
                ),
            );
            row(&mut o, "Socket LB", format!("cgroup {}", a.datapath.cgroup));
            let devices = if a.datapath.devices.is_empty() {
                "none".to_owned()
            } else {
                a.datapath
                    .devices
                    .iter()
                    .map(|d| {
                        format!(
                            "{} (tc {}, XDP {})",
                            d.name,
                            d.tc,
                            d.xdp.as_deref().unwrap_or("off")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            row(&mut o, "Devices", devices);
            row(&mut o, "Service metrics", a.service_metrics.clone());
        }
        None => {
            row(&mut o, "Agent", "NOT RUNNING (see problems)".to_owned());
            row(
                &mut o,
                "Version",
                format!("this CLI: {} (commit {})", s.cli.version, s.cli.commit),
            );
            row(&mut o, "Kernel", s.kernel.clone());
        }
    }
    let p = &s.pins;
    let cgroups: Vec<String> = {
        let mut c: Vec<String> = p
            .links
            .sock
            .iter()
            .map(|l| {
                l.cgroup
                    .clone()
                    .unwrap_or_else(|| format!("cgroup id {}", l.cgroup_id))
            })
            .collect();
        c.sort();
        c.dedup();
        c
    };
    row(
        &mut o,
        "Pinned links",
        format!(
            "{} socket-LB ({}), tc {}, XDP {}",
            p.links.sock.len(),
            if cgroups.is_empty() {
                "none".to_owned()
            } else {
                cgroups.join(", ")
            },
            list_links(&p.links.tc),
            list_links(&p.links.xdp)
        ),
    );
    row(
        &mut o,
        "Pinned maps",
        format!(
            "{} in {}: {} frontends, {} backends, {} named service ids",
            p.maps.len(),
            p.dir,
            p.frontends,
            p.backends,
            p.named_services
        ),
    );
    for m in &p.maps {
        let _ = writeln!(
            o,
            "  {:<16}{:>9} / {:<9} {:>5.1}%",
            m.map,
            m.entries,
            m.capacity,
            100.0 * m.ratio()
        );
    }
    if s.problems.is_empty() {
        row(&mut o, "Problems", "none".to_owned());
    } else {
        row(&mut o, "Problems", format!("{}", s.problems.len()));
        for problem in &s.problems {
            let _ = writeln!(o, "  - {problem}");
        }
    }
    o
}

fn list_links(links: &[attachments::DeviceLink]) -> String {
    if links.is_empty() {
        return "none".to_owned();
    }
    links
        .iter()
        .map(|l| {
            if l.ifindex == 0 {
                format!("{} {} (defunct)", l.device, l.kind)
            } else {
                format!("{} {}", l.device, l.kind)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::attachments::{DeviceLink, SockLink};

    #[test]
    fn the_pins_problems_name_what_is_missing_full_or_gone() {
        let mut pins = PinsView {
            dir: "/sys/fs/bpf/lb".into(),
            ..PinsView::default()
        };
        pins.maps.push(MapFill {
            map: "LB_CONNTRACK".into(),
            entries: 250_000,
            capacity: 262_144,
        });
        pins.links.tc.push(DeviceLink {
            device: "eth1".into(),
            kind: "ingress".into(),
            ifindex: 0,
        });
        let p = pin_problems(None, Some("no agent answers"), &pins);
        assert_eq!(p[0], "no agent answers");
        assert!(
            p.iter().any(|l| l.starts_with("no socket-LB link")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.contains("ingress link on eth1 is defunct")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|l| l.starts_with("LB_CONNTRACK is 95% full")),
            "{p:?}"
        );
        pins.maps.clear();
        pins.links.tc.clear();
        pins.links.sock = lb_common::prog_names::SOCK_ALL
            .iter()
            .map(|p| SockLink {
                program: (*p).into(),
                cgroup_id: 1,
                cgroup: Some("/sys/fs/cgroup".into()),
            })
            .collect();
        assert_eq!(pin_problems(None, None, &pins), Vec::<String>::new());
    }
}
