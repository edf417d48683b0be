use crate::datapath::loader::{PinDir, cleanup};

use super::args::PinArgs;

#[derive(clap::Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pins: PinArgs,
}

pub fn run(args: &CleanupArgs) -> anyhow::Result<()> {
    let removed = cleanup(&PinDir::new(&args.pins.bpffs))?;
    for filter in crate::datapath::tc_attach::detach_clsact_filters() {
        tracing::info!(filter = %filter, "removed the clsact filter");
    }
    for path in &removed {
        tracing::info!(path = %path.display(), "removed");
    }
    tracing::info!(
        count = removed.len(),
        "cleanup done: lb's programs are detached and its maps released"
    );
    Ok(())
}
