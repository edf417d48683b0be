//! What several subcommands share: the pin directory flag, the output formats, opening the pinned maps, and the
//! `--service-cidrs` parser (`run` and `explain`).

use std::net::IpAddr;
use std::path::PathBuf;

use crate::datapath::maps::PinnedMaps;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// The pin directory flag every subcommand shares.
#[derive(Clone, Debug, clap::Args)]
pub struct PinArgs {
    /// Directory (on bpffs) where lb pins its maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/lb", env = "LB_BPFFS")]
    pub bpffs: PathBuf,
}

/// Opens the pinned maps for a read-only subcommand, saying where it looked when that fails.
pub fn open_maps(pins: &PinArgs) -> anyhow::Result<PinnedMaps> {
    PinnedMaps::open(&pins.bpffs).map_err(|e| {
        anyhow::anyhow!(
            "{e}: is the agent's pin directory {} (see --bpffs)?",
            pins.bpffs.display()
        )
    })
}

/// Parses one `--service-cidrs` value.
pub fn parse_cidr_arg(s: &str) -> Result<(IpAddr, u8), String> {
    crate::model::parse_service_cidr(s)
        .ok_or_else(|| format!("{s:?} is not a CIDR (e.g. 10.96.0.0/12)"))
}
