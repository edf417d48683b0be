//! `lb-agent conntrack`: the per-packet datapath's connection tracking entries (`LB_CONNTRACK`), with filters.

use std::fmt::Write as _;
use std::net::IpAddr;

use anyhow::Context;
use aya::maps::{HashMap, Map, MapData};
use lb_common::{CtKey, CtRole, CtValue, addr_from_bytes, map_names};
use serde::Serialize;

use crate::datapath::clock;
use crate::datapath::display::proto_name;

use super::args::{OutputFormat, PinArgs};

#[derive(clap::Args)]
pub struct ConntrackArgs {
    #[command(flatten)]
    pins: PinArgs,
    /// Only entries with this address as source, destination or rewritten address.
    #[arg(long)]
    addr: Option<IpAddr>,
    /// Only entries with this port on either side (original or rewritten).
    #[arg(long)]
    port: Option<u16>,
    /// Only this protocol: tcp, udp or sctp.
    #[arg(long)]
    proto: Option<String>,
    /// Only entries of this service id.
    #[arg(long)]
    service_id: Option<u32>,
    /// Only entries pinned to this backend id.
    #[arg(long)]
    backend_id: Option<u32>,
    /// Output format.
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: OutputFormat,
}

#[derive(Debug, Serialize)]
pub struct CtRow {
    pub direction: &'static str,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    pub new_source: String,
    pub new_destination: String,
    pub service_id: u32,
    pub backend_id: u32,
    pub flags: Vec<&'static str>,
    /// Seconds since the last packet (the programs stamp jiffies; see `datapath::clock`).
    pub idle_seconds: f64,
    pub lifetime_seconds: u32,
}

fn sock(addr: [u8; 16], port: u16) -> String {
    match addr_from_bytes(addr) {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn direction(k: &CtKey, v: &CtValue) -> &'static str {
    match lb_common::ct_role(k, v) {
        CtRole::Forward => "forward",
        CtRole::Reply => "reply",
        CtRole::Snat => "snat",
        CtRole::SnatReply => "snat-reply",
    }
}

impl ConntrackArgs {
    fn keep(&self, k: &CtKey, v: &CtValue) -> bool {
        let addrs = [k.saddr, k.daddr, v.new_saddr, v.new_daddr];
        let ports = [k.sport, k.dport, v.new_sport, v.new_dport];
        self.addr.is_none_or(|a| {
            addrs
                .iter()
                .any(|b| addr_from_bytes(*b) == a.to_canonical())
        }) && self.port.is_none_or(|p| ports.contains(&p))
            && self
                .proto
                .as_deref()
                .is_none_or(|p| proto_name(k.proto).eq_ignore_ascii_case(p))
            && self.service_id.is_none_or(|id| v.service_id == id)
            && self.backend_id.is_none_or(|id| v.backend_id == id)
    }
}

pub fn run(args: &ConntrackArgs) -> anyhow::Result<()> {
    let path = args.pins.bpffs.join(map_names::CONNTRACK);
    if !path.exists() {
        anyhow::bail!(
            "{} does not exist: the per-packet datapath (and its conntrack) is not loaded by this agent, or the agent \
             never ran with this --bpffs",
            path.display()
        );
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map: HashMap<MapData, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(data))
        .with_context(|| format!("{} has an unexpected layout", path.display()))?;
    let hz = clock::kernel_hz();
    let now = clock::jiffies_now(hz);
    let mut rows = Vec::new();
    for entry in map.iter() {
        let (k, v) = entry.context("reading the conntrack map")?;
        if !args.keep(&k, &v) {
            continue;
        }
        let mut flags = Vec::new();
        if v.flags & lb_common::CT_FLAG_SNAT != 0 {
            flags.push("snat");
        }
        if v.flags & lb_common::CT_FLAG_ESTABLISHED != 0 {
            flags.push("established");
        }
        if v.flags & lb_common::CT_FLAG_CLOSING != 0 {
            flags.push("closing");
        }
        if v.flags & lb_common::CT_FLAG_FIN != 0 {
            flags.push("fin");
        }
        rows.push(CtRow {
            direction: direction(&k, &v),
            protocol: proto_name(k.proto),
            source: sock(k.saddr, k.sport),
            destination: sock(k.daddr, k.dport),
            new_source: sock(v.new_saddr, v.new_sport),
            new_destination: sock(v.new_daddr, v.new_dport),
            service_id: v.service_id,
            backend_id: v.backend_id,
            flags,
            idle_seconds: now.saturating_sub(v.last_seen_jiffies) as f64 / f64::from(hz),
            lifetime_seconds: v.lifetime_s,
        });
    }
    rows.sort_by(|a, b| {
        (&a.source, &a.destination, a.direction).cmp(&(&b.source, &b.destination, b.direction))
    });
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        OutputFormat::Table => print!("{}", render(&rows)),
    }
    Ok(())
}

fn render(rows: &[CtRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<10} {:<5} {:<45} {:<45} {:<45} {:<45} {:>5} {:>5} {:>9} FLAGS",
        "DIR",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "NEW SOURCE",
        "NEW DESTINATION",
        "SVC",
        "BE",
        "IDLE"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<10} {:<5} {:<45} {:<45} {:<45} {:<45} {:>5} {:>5} {:>8.1}s {}",
            r.direction,
            r.protocol,
            r.source,
            r.destination,
            r.new_source,
            r.new_destination,
            r.service_id,
            r.backend_id,
            r.idle_seconds,
            r.flags.join(",")
        );
    }
    let _ = writeln!(s, "{} entries", rows.len());
    s
}
