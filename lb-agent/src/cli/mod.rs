//! The command line: `run` turns its flags into the agent's configuration (`crate::agent` is the daemon), the other
//! subcommands read the pinned maps or the objects. Each parses its flags and calls into the library; nothing here
//! is datapath logic. Subcommands share only `args`; this file only dispatches to them.

pub mod args;
pub mod backends;
pub mod cleanup;
pub mod completions;
pub mod conntrack;
pub mod explain;
pub mod maglev;
pub mod manifests;
pub mod monitor;
pub mod run;
pub mod services;
pub mod stats;
pub mod status;
pub mod trace;

use clap::{Parser, Subcommand};

use args::LogFormat;

/// kube-rs's HTTP stack logs every failed request at ERROR as "failed with error client error (Connect)", without
/// the server or the request: one line per retry, which buried the agent's own warnings (that name the server, the
/// resource and the cause, and are rate-limited). Off unless the filter names `kube_client` itself.
fn quiet_kube_client(level: &str) -> String {
    if level.contains("kube_client") {
        level.to_owned()
    } else {
        format!("{level},kube_client::client::builder=off")
    }
}

pub fn init_logging(format: LogFormat, level: &str) {
    let level = &quiet_kube_client(level);
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|e| {
        eprintln!("lb-agent: bad --log-level {level:?} ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    // Colours only on a terminal: journald, kubectl logs and files should get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // The filter is reloadable so a config file change of `log-level` applies without a restart.
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder;
            let handle = builder.reload_handle();
            crate::ops::config::set_log_reload(Box::new(move |level: &str| {
                let filter = tracing_subscriber::EnvFilter::try_new(quiet_kube_client(level))
                    .map_err(|e| e.to_string())?;
                handle.reload(filter).map_err(|e| e.to_string())
            }));
            builder.init()
        }};
    }
    match format {
        LogFormat::Text => install!(builder.with_filter_reloading()),
        LogFormat::Json => install!(builder.json().with_filter_reloading()),
    }
}

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version = crate::build_info::VERSION,
    long_version = crate::build_info::LONG_VERSION,
    about = "lb: an eBPF service load balancer for Kubernetes (kube-proxy replacement)"
)]
struct Cli {
    /// Log format: `text` or `json`.
    #[arg(long, global = true, default_value = "text", env = "LB_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter: a level (`error`, `warn`, `info`, `debug`, `trace`) or tracing directives
    /// (`info,lb_agent::datapath=debug`). Changes live when set in the config file.
    #[arg(long, global = true, default_value = "info", env = "LB_LOG")]
    log_level: String,
    /// YAML config file of `lb-agent run` settings, keyed by long flag name (`algorithm: random`), or kube-proxy's
    /// `KubeProxyConfiguration` (v1alpha1; the fields lb does not apply are named in a warning). Precedence:
    /// flag > environment > file > default. Reloaded on change and on SIGHUP: algorithm, maglev-min-size,
    /// maglev-max-size and log-level apply at once, other changes are logged as needing a restart.
    #[arg(long, global = true, env = "LB_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load the datapath, program it from the manifests, and keep it in sync.
    Run(Box<run::RunArgs>),
    /// List the programmed services and their backends, read from the pinned maps.
    Services(services::ServicesArgs),
    /// Remove every program link and map lb pinned (like kube-proxy --cleanup).
    Cleanup(cleanup::CleanupArgs),
    /// Where would this packet go? Runs the real tc program on a crafted packet (BPF_PROG_TEST_RUN) in a private
    /// load holding the node's live service state (or what manifests or the API server say), and prints the
    /// verdict, the Service port it matched and the backend as JSON.
    Trace(Box<trace::TraceArgs>),
    /// List the programmed backends, the services using each, and their counters.
    Backends(backends::BackendsArgs),
    /// Show one service's lookup table: size, slots per backend, share.
    Maglev(maglev::MaglevArgs),
    /// List connection-tracking entries of the per-packet datapath.
    Conntrack(conntrack::ConntrackArgs),
    /// Per-service datapath counters, by Kubernetes name.
    Stats(stats::StatsArgs),
    /// Why each endpoint of a Service is or is not used, per VIP and traffic class, next to what the maps hold.
    Explain(explain::ExplainArgs),
    /// What this node runs and what is wrong: the agent (source, watches, last sync, attach modes, versions) and
    /// the pins (links, map fill), with or without a running agent.
    Status(status::StatusArgs),
    /// A live stream of datapath events: new flows (client, Service, backend; socket LB, tc or XDP), drops and
    /// rejects with their reason. Filter by Service, type and address; rate limited in the kernel; `-o json`.
    Monitor(monitor::MonitorArgs),
    /// Print the YAML that installs lb on a cluster (or, with --uninstall, removes it from every node).
    Manifests(Box<manifests::ManifestsArgs>),
    /// Print a shell completion script: bash, zsh or fish.
    Completions(completions::CompletionsArgs),
}

/// The `lb-agent` command line, as a function so test binaries can embed exactly this agent.
pub fn main() -> std::process::ExitCode {
    let cli = match parse_with_config() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("lb-agent: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    init_logging(cli.log_format, &cli.log_level);
    let result = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Services(args) => services::run(&args),
        Command::Cleanup(args) => cleanup::run(&args),
        Command::Trace(args) => trace::run(&args),
        Command::Backends(args) => backends::run(&args),
        Command::Maglev(args) => maglev::run(&args),
        Command::Conntrack(args) => conntrack::run(&args),
        Command::Stats(args) => stats::run(&args),
        Command::Explain(args) => explain::run(&args),
        Command::Status(args) => status::run(&args),
        Command::Monitor(args) => monitor::run(&args),
        Command::Manifests(args) => manifests::run(&args),
        Command::Completions(args) => completions::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The whole command line definition (for checking config files against it).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command()
}

/// Checks a config file against the agent's real command line: every key is a flag and every value parses.
pub fn check_config_file(file: &crate::ops::config::ConfigFile) -> Result<(), String> {
    let cmd =
        crate::ops::config::apply_file_defaults(command(), file).map_err(|e| e.to_string())?;
    cmd.try_get_matches_from(["lb-agent", "run", "--manifests", "/dev/null"])
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The agent's configuration exactly as `lb-agent run <args>` builds it, with `file`'s settings as defaults (as
/// `--config` gives them): for tests that drive the agent's parts without starting it. clap's errors come back
/// as errors here instead of exiting.
pub fn run_config(
    args: &[&str],
    file: Option<&crate::ops::config::ConfigFile>,
) -> anyhow::Result<crate::agent::AgentConfig> {
    use clap::FromArgMatches;
    let mut cmd = command();
    if let Some(file) = file {
        cmd = crate::ops::config::apply_file_defaults(cmd, file)?;
    }
    let argv = ["lb-agent", "run"].into_iter().chain(args.iter().copied());
    let matches = cmd.try_get_matches_from(argv)?;
    match Cli::from_arg_matches(&matches)?.command {
        Command::Run(args) => run::agent_config(*args),
        _ => anyhow::bail!("not `lb-agent run`"),
    }
}

/// Parses the command line with the config file's values as defaults (flag > env > file > default; see
/// `ops::config`). clap's own errors (and `--help`) exit here, as `Cli::parse` would.
fn parse_with_config() -> anyhow::Result<Cli> {
    use clap::{CommandFactory, FromArgMatches};
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let path =
        crate::ops::config::config_path(&argv, std::env::var_os(crate::ops::config::CONFIG_ENV));
    let file = path.map(|p| crate::ops::config::load(&p)).transpose()?;
    let mut cmd = Cli::command();
    if let Some(file) = &file {
        cmd = crate::ops::config::apply_file_defaults(cmd, file)?;
    }
    let matches = cmd.clone().get_matches_from(argv);
    crate::ops::config::record_startup(&cmd, &matches, file);
    match Cli::from_arg_matches(&matches) {
        Ok(cli) => Ok(cli),
        Err(e) => e.exit(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::ops::config::{apply_file_defaults, parse};

    #[test]
    fn xdp_settings_are_config_file_keys_of_the_real_command() {
        use crate::datapath::xdp_attach::XdpModeChoice;
        let run = |yaml: &str| {
            let file = parse(Path::new("lb.yaml"), yaml).expect("parse");
            check_config_file(&file).expect("known keys");
            apply_file_defaults(command(), &file)
                .expect("defaults")
                .try_get_matches_from(["lb-agent", "run", "--manifests", "/dev/null"])
                .expect("matches")
        };
        let m = run("xdp: true\nxdp-mode: generic\n");
        let r = m.subcommand_matches("run").expect("run");
        assert!(r.get_flag("xdp"));
        assert_eq!(
            r.get_one::<XdpModeChoice>("xdp_mode"),
            Some(&XdpModeChoice::Generic)
        );
        let m = run("");
        let r = m.subcommand_matches("run").expect("run");
        assert!(!r.get_flag("xdp"), "off by default");
        assert_eq!(
            r.get_one::<XdpModeChoice>("xdp_mode"),
            Some(&XdpModeChoice::Auto)
        );
    }
}
