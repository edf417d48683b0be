//! `lb-agent maglev <frontend | service id>`: one service's lookup table as the datapath holds it.

use anyhow::bail;

use crate::datapath::listings;
use crate::datapath::names::service_names;

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
    let names = service_names(&args.pins.bpffs);
    let views = found
        .iter()
        .map(|(k, v)| listings::table(&maps, &names, k, v))
        .collect::<Result<Vec<_>, _>>()?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&views)?),
        OutputFormat::Table => print!("{}", listings::render_tables(&views)),
    }
    Ok(())
}
