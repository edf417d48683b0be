//! `lb-agent backends`: every programmed backend, the services whose tables use it, and its counters.

use crate::datapath::listings;
use crate::datapath::maps::PinnedMaps;
use crate::datapath::names::service_names;

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
    let names = service_names(&args.pins.bpffs);
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        OutputFormat::Table => print!("{}", listings::render_backends(&rows, &names)),
    }
    Ok(())
}
