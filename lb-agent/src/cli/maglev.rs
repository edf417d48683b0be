//! `lb-agent maglev <frontend | service id>`: one service's lookup table as the datapath holds it.

use std::fmt::Write as _;

use anyhow::bail;

use crate::datapath::listings::{self, TableView};

use super::args::{OutputFormat, PinArgs, open_maps};

#[derive(clap::Args)]
pub struct MaglevArgs {
    /// A service id (as `lb-agent services` shows it) or a frontend `ip:port` (`[ip6]:port`), optionally `/TCP` or
    /// `/UDP`; a frontend shows its table in each scope.
    service: String,
    #[command(flatten)]
    pins: PinArgs,
    /// Output format; JSON includes every slot.
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: OutputFormat,
}

pub fn run(args: &MaglevArgs) -> anyhow::Result<()> {
    let maps = open_maps(&args.pins)?;
    let found = listings::find_services(&maps, &args.service)?;
    if found.is_empty() {
        bail!(
            "no programmed service matches {:?} (see `lb-agent services`)",
            args.service
        );
    }
    let names = crate::datapath::names::service_names(&args.pins.bpffs);
    let views = found
        .iter()
        .map(|(k, v)| listings::table(&maps, &names, k, v))
        .collect::<Result<Vec<_>, _>>()?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&views)?),
        OutputFormat::Table => print!("{}", render(&views)),
    }
    Ok(())
}

pub fn render(views: &[TableView]) -> String {
    let mut s = String::new();
    for v in views {
        let _ = writeln!(
            s,
            "service {} {} {}/{} ({}){}",
            v.service_id,
            v.frontend,
            v.protocol,
            v.scope,
            v.algorithm,
            if v.service.is_empty() {
                String::new()
            } else {
                format!("  {}", v.service)
            }
        );
        if v.size == 0 {
            let _ = writeln!(s, "  no table: the service has no backend\n");
            continue;
        }
        let per = v.size as f64 / v.backends.len().max(1) as f64;
        let _ = writeln!(
            s,
            "  table size {}  backends {}  ideal slots per backend {per:.1}",
            v.size,
            v.backends.len()
        );
        let _ = writeln!(
            s,
            "  {:<8} {:<45} {:>7} {:>8}",
            "BACKEND", "ADDRESS", "SLOTS", "SHARE"
        );
        for b in &v.backends {
            let _ = writeln!(
                s,
                "  {:<8} {:<45} {:>7} {:>7.2}%",
                b.backend_id, b.address, b.slots, b.share_percent
            );
        }
        s.push('\n');
    }
    s
}
