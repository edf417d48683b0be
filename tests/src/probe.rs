//! The `lb-probe` traffic tool, seen from the tests: command builders and its JSON line format.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use serde::Deserialize;

use crate::{Child, Cmd};

/// The `lb-probe` binary. Build it with [`crate::probe!`] in an integration test of this package, or with the path
/// of the binary.
#[derive(Debug, Clone)]
pub struct Probe {
    path: PathBuf,
}

impl Probe {
    pub fn new(path: impl Into<PathBuf>) -> Probe {
        Probe { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `lb-probe` with no arguments yet.
    pub fn cmd(&self) -> Cmd {
        Cmd::new(&self.path)
    }

    /// `lb-probe serve --id <id> --tcp-port P... --udp-port P...` (dual-stack on `::`).
    pub fn serve_cmd(&self, id: &str, tcp_ports: &[u16], udp_ports: &[u16]) -> Cmd {
        let mut cmd = self
            .cmd()
            .label(&format!("serve-{id}"))
            .args(["serve", "--id", id]);
        for port in tcp_ports {
            cmd = cmd.arg("--tcp-port").arg(port.to_string());
        }
        for port in udp_ports {
            cmd = cmd.arg("--udp-port").arg(port.to_string());
        }
        cmd
    }

    /// `lb-probe tcp --to <to> --count <count>`; add `--hold-ms X` with [`Cmd::args`].
    pub fn tcp_cmd(&self, to: SocketAddr, count: usize) -> Cmd {
        self.cmd().label("probe-tcp").args([
            "tcp",
            "--to",
            &to.to_string(),
            "--count",
            &count.to_string(),
        ])
    }

    /// `lb-probe udp --to <to> --count <count> --sockets <sockets> [--connected]`.
    pub fn udp_cmd(&self, to: SocketAddr, count: usize, sockets: usize, connected: bool) -> Cmd {
        let cmd = self.cmd().label("probe-udp").args([
            "udp",
            "--to",
            &to.to_string(),
            "--count",
            &count.to_string(),
            "--sockets",
            &sockets.to_string(),
        ]);
        if connected {
            cmd.arg("--connected")
        } else {
            cmd
        }
    }

    /// `lb-probe udp-sticky --to <to> --sockets S --rounds R --pause-file <path>`. Spawn it, wait for the
    /// `round-done` line of a round (see [`ProbeLine::is_round_done`]), change the backends, then create the pause
    /// file to start the next round.
    pub fn udp_sticky_cmd(
        &self,
        to: SocketAddr,
        sockets: usize,
        rounds: usize,
        pause_file: &Path,
    ) -> Cmd {
        self.cmd()
            .label("probe-udp-sticky")
            .args([
                "udp-sticky",
                "--to",
                &to.to_string(),
                "--sockets",
                &sockets.to_string(),
                "--rounds",
                &rounds.to_string(),
            ])
            .arg("--pause-file")
            .arg(pause_file)
    }

    /// `lb-probe sctp-serve --id <id> --port <port>`: raw-socket SCTP, answers INITs with an INIT-ACK.
    pub fn sctp_serve_cmd(&self, id: &str, port: u16) -> Cmd {
        self.cmd().label(&format!("sctp-serve-{id}")).args([
            "sctp-serve",
            "--id",
            id,
            "--port",
            &port.to_string(),
        ])
    }

    /// `lb-probe sctp --to <to> --count <count> --sport <sport>`.
    pub fn sctp_cmd(&self, to: SocketAddr, count: usize, sport: u16) -> Cmd {
        self.cmd().label("probe-sctp").args([
            "sctp",
            "--to",
            &to.to_string(),
            "--count",
            &count.to_string(),
            "--sport",
            &sport.to_string(),
        ])
    }

    /// Waits until a `serve` child has bound all its ports (its `{"event":"ready"}` line).
    pub fn wait_ready(child: &mut Child, timeout: Duration) -> Result<()> {
        child.wait_for_line(timeout, |l| {
            serde_json::from_str::<ProbeLine>(l).is_ok_and(|p| p.event.as_deref() == Some("ready"))
        })?;
        Ok(())
    }
}

/// One JSON line of lb-probe output. Every field is optional so that one type reads every subcommand's lines;
/// see the binary's documentation for which appear where.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ProbeLine {
    /// Whether the exchange got an answer (absent on event lines).
    pub ok: bool,
    /// `ready`, `listening`, `tcp`, `udp` (serve) or `round-done` (udp-sticky); absent on result lines.
    pub event: Option<String>,
    /// Index of the connection or datagram, from 0.
    pub i: Option<usize>,
    /// Index of the UDP socket, from 0.
    pub socket: Option<usize>,
    /// udp-sticky round, from 1.
    pub round: Option<usize>,
    /// The identity the backend answered with.
    pub backend: Option<String>,
    /// TCP: getpeername() of the connected socket (serve: the client's address).
    pub peer: Option<String>,
    /// UDP: the reply's source address (recvfrom), or getpeername() for a connected socket.
    pub from: Option<String>,
    /// getsockname() of the probe's socket.
    pub local: Option<String>,
    /// `ECONNREFUSED`, `ETIMEDOUT`, ... on failure.
    pub error: Option<String>,
    pub errno: Option<i32>,
    /// `socket`, `connect`, `send` or `recv`: where a failure happened.
    pub stage: Option<String>,
    /// serve: the port of a `listening` or per-exchange event; sctp: the reply's destination port.
    pub port: Option<u16>,
    /// udp --size: the echoed bytes (on a line with ok true, they came back intact); serve: the bytes to echo.
    pub len: Option<usize>,
    /// serve: `tcp` or `udp` on a `listening` event.
    pub proto: Option<String>,
}

impl ProbeLine {
    pub fn is_round_done(&self) -> bool {
        self.event.as_deref() == Some("round-done")
    }
}
