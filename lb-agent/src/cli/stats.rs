//! `lb-agent stats`: every service's datapath counters by Kubernetes name, and the per-packet datapath's
//! packet counts by reason.

use std::fmt::Write as _;

use serde::Serialize;

use crate::datapath::counters::SERVICE_COUNTERS;
use crate::datapath::listings::{self, StatsRow};
use crate::datapath::map_fill::{MapFill, map_fill};
use crate::datapath::names::service_names;

use super::args::{OutputFormat, PinArgs, open_maps};

#[derive(clap::Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pins: PinArgs,
    /// Only services whose name (`namespace/name:port`) contains this.
    #[arg(long)]
    service: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: OutputFormat,
}

#[derive(Serialize)]
struct Stats {
    services: Vec<StatsRow>,
    /// Packets of the per-packet datapath by reason (`LB_DROP_STATS`); empty when this build has no such map.
    packets_by_reason: Vec<(&'static str, u64)>,
    /// `connect()` / `sendmsg()` calls the socket LB refused, by reason (`LB_SOCK_STATS`).
    socket_refusals_by_reason: Vec<(&'static str, u64)>,
    maps: Vec<MapFill>,
}

pub fn run(args: &StatsArgs) -> anyhow::Result<()> {
    let maps = open_maps(&args.pins)?;
    let mut services = listings::stats(&maps, &service_names(&args.pins.bpffs))?;
    if let Some(filter) = &args.service {
        services.retain(|s| s.service.contains(filter.as_str()));
    }
    let stats = Stats {
        services,
        packets_by_reason: listings::packets_by_reason(&args.pins.bpffs),
        socket_refusals_by_reason: listings::sock_refusals_by_reason(&args.pins.bpffs),
        maps: map_fill(&args.pins.bpffs),
    };
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&stats)?),
        OutputFormat::Table => print!("{}", render(&stats)),
    }
    Ok(())
}

fn render(stats: &Stats) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "{:<5} {:<40} {:<40} {:<9}",
        "ID", "SERVICE", "FRONTEND", "SCOPE"
    );
    for (name, _, _) in SERVICE_COUNTERS {
        let short = name.trim_start_matches("lb_service_").to_ascii_uppercase();
        let _ = write!(s, " {short:>12}");
    }
    s.push('\n');
    for row in &stats.services {
        let name = if row.service.is_empty() {
            "-"
        } else {
            row.service.as_str()
        };
        let _ = write!(
            s,
            "{:<5} {:<40} {:<40} {:<9}",
            row.service_id,
            name,
            format!("{}/{}", row.frontend, row.protocol),
            row.scope
        );
        for (metric, _, _) in SERVICE_COUNTERS {
            let _ = write!(s, " {:>12}", row.counters.get(metric).copied().unwrap_or(0));
        }
        s.push('\n');
    }
    if !stats.packets_by_reason.is_empty() {
        let _ = writeln!(s, "\nPACKETS BY REASON (tc/XDP datapath)");
        for (reason, n) in &stats.packets_by_reason {
            let _ = writeln!(s, "  {reason:<20} {n:>12}");
        }
    }
    if !stats.socket_refusals_by_reason.is_empty() {
        let _ = writeln!(s, "\nSOCKET LB REFUSALS BY REASON (connect/sendmsg failed)");
        for (reason, n) in &stats.socket_refusals_by_reason {
            let _ = writeln!(s, "  {reason:<22} {n:>12}");
        }
    }
    let _ = writeln!(
        s,
        "\n{:<16} {:>10} {:>10} {:>6}",
        "MAP", "ENTRIES", "CAPACITY", "FILL"
    );
    for m in &stats.maps {
        let fill = 100.0 * m.ratio();
        let _ = writeln!(
            s,
            "{:<16} {:>10} {:>10} {:>5.1}%",
            m.map, m.entries, m.capacity, fill
        );
    }
    s
}
