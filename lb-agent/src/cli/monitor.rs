//! `lb-agent monitor`: a live stream of the datapath's events (cilium-dbg monitor for lb): new flows with the
//! backend they got, drops and rejects with their reason, from the socket LB, tc and XDP. Reads the pinned ring
//! buffer (`datapath::monitor`), names Services from `LB_SVC_NAMES`, filters, prints one line (or one JSON object)
//! per event.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use lb_common::{
    EVENT_DROP, EVENT_NEW_FLOW, EVENT_REJECT, MonitorEvent, PATH_SOCK, PATH_TC, PATH_XDP,
    ServiceNameValue, addr_from_bytes, reason,
};
use serde::Serialize;

use crate::datapath::display::{proto_name, show_addr};
use crate::datapath::monitor::{Missed, Monitor, Settings};
use crate::datapath::names::service_names;

use super::args::{OutputFormat, PinArgs};

/// How often the ring is drained (the programs submit without waking the reader).
const POLL: Duration = Duration::from_millis(100);
/// How often the lease is renewed and missed events are reported.
const RENEW: Duration = Duration::from_secs(1);

#[derive(clap::Args)]
pub struct MonitorArgs {
    #[command(flatten)]
    pins: PinArgs,
    /// Only events of this Service: `namespace/name` (every port) or `namespace/name:port-name`. Repeatable.
    #[arg(long)]
    service: Vec<String>,
    /// Only these event types: `new-flow`, `drop`, `reject` (comma-separated or repeated). The others are not
    /// even emitted by the kernel, so they do not use up the rate limit.
    #[arg(long = "type", value_delimiter = ',')]
    types: Vec<EventType>,
    /// Only events whose client, destination or backend is this address. Repeatable.
    #[arg(long)]
    address: Vec<IpAddr>,
    /// Events per second per CPU the kernel emits at most (a token bucket); the rest are counted as suppressed.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Events per CPU the kernel may emit at once above the rate (the bucket's depth). Default: the rate.
    #[arg(long)]
    burst: Option<u32>,
    /// Exit after this many events (that pass the filters).
    #[arg(long)]
    count: Option<u64>,
    /// Output format: `table` (one readable line per event) or `json` (one object per line).
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: OutputFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum EventType {
    NewFlow,
    Drop,
    Reject,
}

impl EventType {
    fn kind(self) -> u8 {
        match self {
            EventType::NewFlow => EVENT_NEW_FLOW,
            EventType::Drop => EVENT_DROP,
            EventType::Reject => EVENT_REJECT,
        }
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        EVENT_NEW_FLOW => "new-flow",
        EVENT_DROP => "drop",
        EVENT_REJECT => "reject",
        _ => "unknown",
    }
}

fn path_name(path: u8) -> &'static str {
    match path {
        PATH_SOCK => "socket",
        PATH_TC => "tc",
        PATH_XDP => "xdp",
        _ => "unknown",
    }
}

/// Set by SIGINT / SIGTERM / SIGHUP: stop, and end the lease on the way out.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// One event as `-o json` prints it.
#[derive(Serialize)]
struct EventJson {
    /// Seconds since the Unix epoch when the monitor read it (at most ~100 ms after it happened).
    time: f64,
    #[serde(rename = "type")]
    kind: &'static str,
    path: &'static str,
    reason: &'static str,
    protocol: String,
    /// tc / XDP: the packet's source `ip:port`; socket: the address of the caller's network namespace (no port is
    /// chosen yet), or null when the agent has not learned it.
    client: Option<String>,
    destination: String,
    /// `namespace/name[:port]`, or null (an address no Service holds, a port no Service defines).
    service: Option<String>,
    service_id: u32,
    backend: Option<String>,
    backend_id: u32,
    snat: bool,
    /// tc / XDP: the interface the packet came in on.
    interface: Option<String>,
    /// Socket: the caller's network namespace (`ls -l /proc/<pid>/ns/net` does not show it; `lb-agent status`'s
    /// pod addresses and `ip netns` do, by address).
    netns_cookie: Option<u64>,
}

/// What the socket LB's refusals do to the caller.
fn sock_errno(kind: u8) -> &'static str {
    if kind == EVENT_REJECT {
        "ECONNREFUSED"
    } else {
        "EPERM"
    }
}

/// The Service names, reloaded when an event names an id not seen yet (at most once per second).
struct Names {
    dir: std::path::PathBuf,
    names: HashMap<u32, ServiceNameValue>,
    loaded: Instant,
}

impl Names {
    fn get(&mut self, id: u32) -> Option<String> {
        if id == 0 {
            return None;
        }
        if !self.names.contains_key(&id) && self.loaded.elapsed() >= RENEW {
            self.names = service_names(&self.dir);
            self.loaded = Instant::now();
        }
        self.names.get(&id).map(|n| {
            let end = n.name.iter().position(|&b| b == 0).unwrap_or(n.name.len());
            String::from_utf8_lossy(&n.name[..end]).into_owned()
        })
    }
}

struct Filter {
    services: Vec<String>,
    addresses: Vec<[u8; 16]>,
}

impl Filter {
    fn passes(&self, ev: &MonitorEvent, service: Option<&str>) -> bool {
        let service_ok = self.services.is_empty()
            || service.is_some_and(|s| {
                self.services.iter().any(|want| {
                    s == want
                        || s.strip_prefix(want.as_str())
                            .is_some_and(|rest| rest.starts_with(':'))
                })
            });
        let address_ok = self.addresses.is_empty()
            || self.addresses.iter().any(|a| {
                *a == ev.saddr || *a == ev.daddr || (ev.backend_port != 0 && *a == ev.backend)
            });
        service_ok && address_ok
    }
}

fn ifname(ifindex: u32) -> Option<String> {
    if ifindex == 0 {
        return None;
    }
    let mut buf: [libc::c_char; libc::IF_NAMESIZE] = [0; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes (NUL included) into the buffer we own.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return Some(format!("if{ifindex}"));
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

fn to_json(ev: &MonitorEvent, service: Option<String>, now: f64) -> EventJson {
    let sock = ev.path == PATH_SOCK;
    let client = if ev.saddr == [0; 16] {
        None
    } else if sock {
        Some(addr_from_bytes(ev.saddr).to_string())
    } else {
        Some(show_addr(ev.saddr, ev.sport))
    };
    EventJson {
        time: now,
        kind: kind_name(ev.kind),
        path: path_name(ev.path),
        reason: reason::name(ev.reason),
        protocol: proto_name(ev.proto).to_lowercase(),
        client,
        destination: show_addr(ev.daddr, ev.dport),
        service,
        service_id: ev.service_id,
        backend: (ev.kind == EVENT_NEW_FLOW).then(|| show_addr(ev.backend, ev.backend_port)),
        backend_id: ev.backend_id,
        snat: ev.snat != 0,
        interface: if sock { None } else { ifname(ev.ifindex) },
        netns_cookie: sock.then_some(ev.netns_cookie),
    }
}

/// `HH:MM:SS.mmm` UTC.
fn clock(now: f64) -> String {
    let ms = (now * 1000.0) as u64;
    let (s, ms) = (ms / 1000, ms % 1000);
    format!(
        "{:02}:{:02}:{:02}.{ms:03}",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60
    )
}

/// One readable line: time, type, path, protocol, client -> destination (Service), then what happened.
fn to_line(e: &EventJson) -> String {
    let client = match (&e.client, e.netns_cookie) {
        (Some(c), _) => c.clone(),
        (None, Some(cookie)) => format!("netns:{cookie}"),
        (None, None) => "?".into(),
    };
    let service = e.service.as_deref().unwrap_or("no service");
    let outcome = match (e.kind, &e.backend) {
        ("new-flow", Some(b)) => format!("-> {b}{}", if e.snat { " (SNAT)" } else { "" }),
        (kind, _) if e.path == "socket" => format!(
            "{kind}: {} ({})",
            e.reason,
            sock_errno(if kind == "reject" {
                EVENT_REJECT
            } else {
                EVENT_DROP
            })
        ),
        (kind, _) => format!("{kind}: {}", e.reason),
    };
    let iface = e
        .interface
        .as_deref()
        .map(|i| format!(" on {i}"))
        .unwrap_or_default();
    format!(
        "{} {:<8} {:<6} {:<4} {client} -> {} [{service}] {outcome}{iface}",
        clock(e.time),
        e.kind,
        e.path,
        e.protocol,
        e.destination
    )
}

fn missed_line(json: bool, delta: Missed) -> String {
    if json {
        serde_json::json!({
            "type": "missed",
            "rate_limited": delta.suppressed,
            "ring_full": delta.lost,
        })
        .to_string()
    } else {
        format!(
            "-- missed: {} events over the rate limit (--rate), {} with the ring buffer full",
            delta.suppressed, delta.lost
        )
    }
}

pub fn run(args: &MonitorArgs) -> anyhow::Result<()> {
    let kinds = if args.types.is_empty() {
        [EVENT_NEW_FLOW, EVENT_DROP, EVENT_REJECT]
            .iter()
            .fold(0, |k, t| k | 1 << t)
    } else {
        args.types.iter().fold(0, |k, t| k | 1 << t.kind())
    };
    let settings = Settings {
        rate: args.rate,
        burst: args.burst.unwrap_or(args.rate),
        kinds,
    };
    let filter = Filter {
        services: args.service.clone(),
        addresses: args
            .address
            .iter()
            .map(|a| lb_common::addr_bytes(*a))
            .collect(),
    };
    let json = matches!(args.output, OutputFormat::Json);
    catch_signals();
    let mut monitor = Monitor::start(&args.pins.bpffs, settings).with_context(|| {
        format!(
            "starting the monitor on {} (run it as root on the node, or in the agent's pod)",
            args.pins.bpffs.display()
        )
    })?;
    // On stderr, so that stdout holds only events (`-o json`: one object per line).
    eprintln!(
        "Listening for events of {} (rate limit {}/s per CPU; Ctrl-C to stop)",
        args.pins.bpffs.display(),
        args.rate
    );
    let mut names = Names {
        dir: args.pins.bpffs.clone(),
        names: service_names(&args.pins.bpffs),
        loaded: Instant::now(),
    };
    let mut out = std::io::stdout().lock();
    let mut missed = monitor.missed();
    let mut renewed = Instant::now();
    let mut shown = 0u64;
    while !STOP.load(Ordering::Relaxed) {
        while let Some(ev) = monitor.next_event() {
            let service = names.get(ev.service_id);
            if !filter.passes(&ev, service.as_deref()) {
                continue;
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            let e = to_json(&ev, service, now);
            let line = if json {
                serde_json::to_string(&e)?
            } else {
                to_line(&e)
            };
            // A closed pipe (`| head`, a dropped `kubectl exec`) ends the monitor quietly.
            if writeln!(out, "{line}").is_err() {
                return Ok(());
            }
            shown += 1;
            if args.count.is_some_and(|n| shown >= n) {
                let _ = out.flush();
                return Ok(());
            }
        }
        if out.flush().is_err() {
            return Ok(());
        }
        if renewed.elapsed() >= RENEW {
            monitor.renew()?;
            renewed = Instant::now();
            let now = monitor.missed();
            let delta = Missed {
                suppressed: now.suppressed.wrapping_sub(missed.suppressed),
                lost: now.lost.wrapping_sub(missed.lost),
            };
            missed = now;
            if (delta.suppressed != 0 || delta.lost != 0)
                && writeln!(out, "{}", missed_line(json, delta)).is_err()
            {
                return Ok(());
            }
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> MonitorEvent {
        MonitorEvent {
            saddr: lb_common::v4_mapped([198, 51, 100, 7]),
            daddr: lb_common::v4_mapped([192, 0, 2, 10]),
            backend: lb_common::v4_mapped([10, 244, 2, 2]),
            sport: 40000,
            dport: 30080,
            backend_port: 8080,
            proto: 6,
            kind: EVENT_NEW_FLOW,
            path: PATH_TC,
            snat: 1,
            reason: reason::NEW_FLOW,
            service_id: 3,
            backend_id: 9,
            ..MonitorEvent::default()
        }
    }

    #[test]
    fn a_tc_new_flow_reads_as_client_destination_service_and_backend() {
        let ev = flow();
        let e = to_json(&ev, Some("shop/web:http".into()), 0.0);
        assert_eq!(
            to_line(&e),
            "00:00:00.000 new-flow tc     tcp  198.51.100.7:40000 -> 192.0.2.10:30080 [shop/web:http] -> \
             10.244.2.2:8080 (SNAT)"
        );
        let json = serde_json::to_value(&e).expect("json");
        assert_eq!(json["backend"], "10.244.2.2:8080");
        assert_eq!(json["reason"], "new-flow");
        assert!(json["netns_cookie"].is_null());
    }

    #[test]
    fn a_socket_refusal_names_the_callers_namespace_and_the_errno() {
        let mut ev = flow();
        ev.path = PATH_SOCK;
        ev.kind = EVENT_REJECT;
        ev.reason = reason::NO_ENDPOINTS;
        ev.saddr = [0; 16];
        ev.netns_cookie = 4096;
        let e = to_json(&ev, None, 3661.5);
        assert_eq!(
            to_line(&e),
            "01:01:01.500 reject   socket tcp  netns:4096 -> 192.0.2.10:30080 [no service] reject: no-endpoints \
             (ECONNREFUSED)"
        );
        assert!(e.backend.is_none());
    }

    #[test]
    fn filters_match_a_service_with_or_without_its_port_and_any_address_of_the_event() {
        let ev = flow();
        let by_service = |s: &str| Filter {
            services: vec![s.into()],
            addresses: Vec::new(),
        };
        assert!(by_service("shop/web").passes(&ev, Some("shop/web:http")));
        assert!(by_service("shop/web:http").passes(&ev, Some("shop/web:http")));
        assert!(!by_service("shop/we").passes(&ev, Some("shop/web:http")));
        assert!(!by_service("shop/web").passes(&ev, Some("shop/webshop:http")));
        assert!(!by_service("shop/web").passes(&ev, None));
        let by_addr = |a: [u8; 4]| Filter {
            services: Vec::new(),
            addresses: vec![lb_common::v4_mapped(a)],
        };
        assert!(by_addr([10, 244, 2, 2]).passes(&ev, None));
        assert!(by_addr([198, 51, 100, 7]).passes(&ev, None));
        assert!(!by_addr([10, 244, 2, 3]).passes(&ev, None));
    }
}
