//! `lb-agent backends`: every programmed backend, the services whose tables use it, and its counters.

use std::fmt::Write as _;

use crate::datapath::listings::{self, BackendRow};
use crate::datapath::maps::PinnedMaps;

use super::args::{OutputFormat, PinArgs, open_maps};

#[derive(clap::Args)]
pub struct BackendsArgs {
    #[command(flatten)]
    pins: PinArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: OutputFormat,
}

pub fn run(args: &BackendsArgs) -> anyhow::Result<()> {
    let maps: PinnedMaps = open_maps(&args.pins)?;
    let rows = listings::backends(&maps)?;
    let names = crate::datapath::names::service_names(&args.pins.bpffs);
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        OutputFormat::Table => print!("{}", render(&rows, &names)),
    }
    Ok(())
}

fn render(
    rows: &[BackendRow],
    names: &std::collections::HashMap<u32, lb_common::ServiceNameValue>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<6} {:<45} {:<5} {:>9} {:>10} {:>12}  SERVICES (id name)",
        "ID", "BACKEND", "PROTO", "CONNS", "PACKETS", "BYTES"
    );
    for b in rows {
        let services = if b.services.is_empty() {
            "-".to_owned()
        } else {
            b.services
                .iter()
                .map(|id| match names.get(id) {
                    Some(n) => format!("{id} {}", n.name()),
                    None => id.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "{:<6} {:<45} {:<5} {:>9} {:>10} {:>12}  {}",
            b.id, b.address, b.protocol, b.connections, b.packets, b.bytes, services
        );
    }
    s
}
