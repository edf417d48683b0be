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

/// Parses a conntrack timeout as kube-proxy's flags take it, a Go duration (`24h0m0s`, `1h`, `90s`, `1.5h`), into
/// whole seconds; `0` keeps lb's default (kube-proxy's `0` leaves netfilter's value alone, which is what lb's
/// defaults are). lb's conntrack counts seconds, so a fraction of a second is refused rather than rounded.
pub fn parse_timeout_secs(s: &str) -> Result<u32, String> {
    let bad = |why: &str| {
        format!("{s:?} is not a timeout ({why}; e.g. 24h0m0s, 1h, 90s, or 0 for the default)")
    };
    let text = s.trim();
    if text == "0" {
        return Ok(0);
    }
    let mut nanos: u128 = 0;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad("empty"));
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| bad("a number without a unit"))?;
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad(&format!("unknown unit {unit:?}"))),
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(bad("a unit without a number"));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad("not a number"))?
        };
        let mut part = whole.checked_mul(scale).ok_or_else(|| bad("too long"))?;
        let mut place = scale;
        for d in frac.chars() {
            let d = d.to_digit(10).ok_or_else(|| bad("not a number"))?;
            place /= 10;
            part += u128::from(d) * place;
        }
        nanos = nanos.checked_add(part).ok_or_else(|| bad("too long"))?;
        rest = next;
    }
    if !nanos.is_multiple_of(1_000_000_000) {
        return Err(bad("lb's conntrack counts whole seconds"));
    }
    u32::try_from(nanos / 1_000_000_000).map_err(|_| bad("longer than 136 years"))
}

#[cfg(test)]
mod tests {
    use super::parse_timeout_secs;

    #[test]
    fn timeouts_parse_as_go_durations_in_whole_seconds() {
        for (text, secs) in [
            ("0", 0),
            ("0s", 0),
            ("24h0m0s", 86400),
            ("1h", 3600),
            ("90s", 90),
            ("1.5h", 5400),
            ("1m30s", 90),
            ("1500ms", 0),
        ] {
            match (parse_timeout_secs(text), secs) {
                (Ok(got), want) if text != "1500ms" => assert_eq!(got, want, "{text}"),
                (Err(e), _) if text == "1500ms" => assert!(e.contains("whole seconds"), "{e}"),
                (got, _) => panic!("{text}: {got:?}"),
            }
        }
        for bad in ["", "90", "1d", "h", "-1s", "1h 30m"] {
            assert!(parse_timeout_secs(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
