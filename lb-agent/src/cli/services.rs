use crate::datapath::names::service_names;
use crate::datapath::{inspect, maps::PinnedMaps};
use anyhow::Context;

use super::args::{OutputFormat, PinArgs};

#[derive(clap::Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    pins: PinArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: OutputFormat,
}

pub fn run(args: &ServicesArgs) -> anyhow::Result<()> {
    let maps = PinnedMaps::open(&args.pins.bpffs).with_context(|| {
        format!(
            "is the agent's pin directory {} (see --bpffs)?",
            args.pins.bpffs.display()
        )
    })?;
    let list = inspect::with_names(inspect::services(&maps)?, &service_names(&args.pins.bpffs));
    match args.output {
        OutputFormat::Table => print!("{}", inspect::render_services(&list)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&list)?),
    }
    Ok(())
}
