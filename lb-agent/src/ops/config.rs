//! The configuration file (`--config`, YAML) and its live reload. A leaf: it works on whatever `clap::Command` it is
//! given (the CLI passes its own) and imports nothing of the crate but its sibling `kube_proxy_config`, which reads
//! a kube-proxy `KubeProxyConfiguration` file into the same settings.
//!
//! **Precedence:** flag > environment variable > config file > built-in default. clap already orders the first two
//! before its defaults, so the file's values are installed as the defaults of the matching arguments before the
//! command line is parsed ([`apply_file_defaults`]); `--help` then shows them as the effective defaults.
//!
//! **Keys** are the long flag names (`algorithm: random`, `maglev-max-size: 65521`, `metrics-addr: ...`); lists
//! are YAML sequences or comma-separated strings. An unknown key is an error naming it, so a typo never goes
//! unnoticed.
//!
//! **Reload:** on a change of the file (and on SIGHUP) it is read again; [`LIVE_SETTINGS`] take effect at once,
//! every other changed key is logged as needing a restart, and a key also given by flag or environment is logged
//! as overridden.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clap::parser::ValueSource;

/// Settings that change without a restart.
pub const LIVE_SETTINGS: &[&str] = &[
    "algorithm",
    "maglev-min-size",
    "maglev-max-size",
    "log-level",
];

/// The file's flag is read before clap parses, so it is matched by hand: `--config <path>`, `--config=<path>`,
/// else `LB_CONFIG`.
pub const CONFIG_FLAG: &str = "config";
pub const CONFIG_ENV: &str = "LB_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "config file {path}: unknown setting {key:?} (settings are the long flag names of `lb-agent run`)"
    )]
    UnknownKey { path: PathBuf, key: String },
}

/// A parsed config file: long flag name → value as it would be typed on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub values: BTreeMap<String, String>,
    /// A kube-proxy `KubeProxyConfiguration` file: its fields that are set and mean nothing to lb (for one warning).
    pub kube_proxy_ignored: Option<Vec<String>>,
}

/// Parses the file's text.
pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
    let err = |message: String| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let doc: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Object(Default::default())
    } else {
        serde_saphyr::from_str(text).map_err(|e| err(e.to_string()))?
    };
    let map = match doc {
        serde_json::Value::Object(m) => m,
        serde_json::Value::Null => Default::default(),
        _ => return Err(err("expected a mapping of setting: value".into())),
    };
    if super::kube_proxy_config::is_kube_proxy_config(&map) {
        let t = super::kube_proxy_config::translate(&map).map_err(err)?;
        return Ok(ConfigFile {
            path: path.to_path_buf(),
            values: t.values,
            kube_proxy_ignored: Some(t.ignored),
        });
    }
    let mut values = BTreeMap::new();
    for (key, value) in map {
        let text = match value {
            serde_json::Value::String(s) => s,
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    serde_json::Value::String(s) => Ok(s.clone()),
                    serde_json::Value::Number(n) => Ok(n.to_string()),
                    other => Err(err(format!(
                        "{key}: list items must be scalars, not {other}"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            // `key:` with nothing: same as absent.
            serde_json::Value::Null => continue,
            serde_json::Value::Object(_) => {
                return Err(err(format!("{key}: expected a value, not a mapping")));
            }
        };
        values.insert(key, text);
    }
    Ok(ConfigFile {
        path: path.to_path_buf(),
        values,
        kube_proxy_ignored: None,
    })
}

pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// The `--config` path from the raw arguments, else from `LB_CONFIG`.
pub fn config_path(args: &[OsString], env: Option<OsString>) -> Option<PathBuf> {
    let flag = format!("--{CONFIG_FLAG}");
    let prefix = format!("--{CONFIG_FLAG}=");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else { continue };
        if s == "--" {
            break;
        }
        if s == flag {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix(&prefix) {
            return Some(PathBuf::from(p));
        }
    }
    env.filter(|e| !e.is_empty()).map(PathBuf::from)
}

/// The arguments of `cmd` (top level) and its `run` subcommand that a file may set, by long name, with their
/// built-in defaults.
fn settable(cmd: &clap::Command) -> BTreeMap<String, (bool, Option<String>)> {
    let mut out = BTreeMap::new();
    let mut add = |c: &clap::Command, in_run: bool| {
        for a in c.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            if matches!(long, "help" | "version" | CONFIG_FLAG) {
                continue;
            }
            let default = a
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect::<Vec<_>>();
            let default = (!default.is_empty()).then(|| default.join(","));
            out.entry(long.to_owned()).or_insert((in_run, default));
        }
    };
    add(cmd, false);
    if let Some(run) = cmd.find_subcommand("run") {
        add(run, true);
    }
    out
}

/// Installs the file's values as the defaults of the matching arguments.
pub fn apply_file_defaults(
    mut cmd: clap::Command,
    file: &ConfigFile,
) -> Result<clap::Command, ConfigError> {
    let settable = settable(&cmd);
    for (key, value) in &file.values {
        let Some((in_run, _)) = settable.get(key) else {
            return Err(ConfigError::UnknownKey {
                path: file.path.clone(),
                key: key.clone(),
            });
        };
        // clap stores defaults as `&'static str` (without its `string` feature); the file is read once per process
        // start, so leaking its few values costs nothing.
        let value: &'static str = Box::leak(value.clone().into_boxed_str());
        let key = key.clone();
        let set = move |c: clap::Command| {
            let id = c
                .get_arguments()
                .find(|a| a.get_long() == Some(key.as_str()))
                .map(|a| a.get_id().clone());
            match id {
                Some(id) => c.mut_arg(id, |a| a.default_value(value)),
                None => c,
            }
        };
        cmd = if *in_run {
            cmd.mut_subcommand("run", set)
        } else {
            set(cmd)
        };
    }
    Ok(cmd)
}

/// What the file reload needs to know about how the agent was started.
#[derive(Clone, Debug, Default)]
pub struct StartupSettings {
    /// Long names given by flag or environment (the file cannot change them).
    pub overridden: BTreeSet<String>,
    /// Built-in default of each settable key, to fall back on when a key is removed from the file.
    pub builtin: BTreeMap<String, Option<String>>,
    /// The file as loaded at start.
    pub file: Option<ConfigFile>,
}

static STARTUP: OnceLock<StartupSettings> = OnceLock::new();

/// Records which settings came from flags or the environment (called once by `cli::main`).
pub fn record_startup(cmd: &clap::Command, matches: &clap::ArgMatches, file: Option<ConfigFile>) {
    let mut overridden = BTreeSet::new();
    let mut note = |c: &clap::Command, m: &clap::ArgMatches| {
        for a in c.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            if matches!(
                m.value_source(a.get_id().as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                overridden.insert(long.to_owned());
            }
        }
    };
    note(cmd, matches);
    if let (Some(run), Some(("run", m))) = (cmd.find_subcommand("run"), matches.subcommand()) {
        note(run, m);
    }
    let builtin = settable(cmd)
        .into_iter()
        .map(|(k, (_, d))| (k, d))
        .collect();
    let _ = STARTUP.set(StartupSettings {
        overridden,
        builtin,
        file,
    });
}

pub fn startup() -> StartupSettings {
    STARTUP.get().cloned().unwrap_or_default()
}

/// One key whose effective value changed in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Applies now: (key, new value).
    Live(String, String),
    /// Needs a restart.
    Restart(String),
    /// A flag or environment variable sets it; the file's value is ignored.
    Overridden(String),
}

/// Compares two versions of the file. A removed key falls back to its built-in default.
pub fn diff(old: &ConfigFile, new: &ConfigFile, startup: &StartupSettings) -> Vec<Change> {
    let keys: BTreeSet<&String> = old.values.keys().chain(new.values.keys()).collect();
    let mut out = Vec::new();
    for key in keys {
        let before = old.values.get(key);
        let after = new.values.get(key);
        if before == after {
            continue;
        }
        if startup.overridden.contains(key.as_str()) {
            out.push(Change::Overridden(key.clone()));
        } else if LIVE_SETTINGS.contains(&key.as_str()) {
            let value = after
                .cloned()
                .or_else(|| startup.builtin.get(key).cloned().flatten())
                .unwrap_or_default();
            out.push(Change::Live(key.clone(), value));
        } else {
            out.push(Change::Restart(key.clone()));
        }
    }
    out
}

/// Applies a new log filter (the `log-level` setting); installed by `cli::init_logging`.
pub type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
static LOG_RELOAD: OnceLock<LogReload> = OnceLock::new();

pub fn set_log_reload(f: LogReload) {
    let _ = LOG_RELOAD.set(f);
}

pub fn reload_log_level(filter: &str) -> Result<(), String> {
    match LOG_RELOAD.get() {
        Some(f) => f(filter),
        None => Err("logging was not initialised with a reloadable filter".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    /// A stand-in for the agent's command line: a global flag and a `run` subcommand with env-backed flags.
    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[arg(
            long,
            global = true,
            default_value = "info",
            env = "LB_TEST_CFG_LOG_LEVEL"
        )]
        log_level: String,
        #[command(subcommand)]
        cmd: Sub,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Sub {
        Run {
            #[arg(long, default_value = "maglev", env = "LB_TEST_CFG_ALGORITHM")]
            algorithm: String,
            #[arg(long, default_value_t = 251, env = "LB_TEST_CFG_MIN")]
            maglev_min_size: u32,
            #[arg(long = "node-address", value_delimiter = ',')]
            node_addresses: Vec<String>,
        },
    }

    fn parse_with(file: &str, argv: &[&str]) -> Result<Cli, String> {
        let file = parse(Path::new("lb.yaml"), file).map_err(|e| e.to_string())?;
        let cmd = apply_file_defaults(Cli::command(), &file).map_err(|e| e.to_string())?;
        let m = cmd.try_get_matches_from(argv).map_err(|e| e.to_string())?;
        Cli::from_arg_matches(&m).map_err(|e| e.to_string())
    }

    fn run_args(c: &Cli) -> (&str, u32, &[String]) {
        match &c.cmd {
            Sub::Run {
                algorithm,
                maglev_min_size,
                node_addresses,
            } => (
                algorithm.as_str(),
                *maglev_min_size,
                node_addresses.as_slice(),
            ),
        }
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let yaml = "algorithm: random\nmaglev-min-size: 509\nlog-level: debug\nnode-address: [10.0.0.1, 10.0.0.2]\n";
        let c = parse_with(yaml, &["lb", "run"]).expect("parse");
        assert_eq!(
            run_args(&c),
            (
                "random",
                509,
                &["10.0.0.1".to_string(), "10.0.0.2".to_string()][..]
            )
        );
        assert_eq!(c.log_level, "debug");

        let c = parse_with(yaml, &["lb", "run", "--algorithm", "maglev"]).expect("parse");
        assert_eq!(run_args(&c).0, "maglev", "flag beats file");

        let c = parse_with("", &["lb", "run"]).expect("parse");
        assert_eq!(run_args(&c).0, "maglev", "built-in default without file");
        assert_eq!(run_args(&c).1, 251);
    }

    #[test]
    fn env_beats_file() {
        // SAFETY: set_var is unsafe in edition 2024 because other threads may read the environment; this variable
        // is read only by this test's parse.
        unsafe { std::env::set_var("LB_TEST_CFG_MIN", "1021") };
        let c = parse_with("maglev-min-size: 509\n", &["lb", "run"]).expect("parse");
        unsafe { std::env::remove_var("LB_TEST_CFG_MIN") };
        assert_eq!(run_args(&c).1, 1021);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = parse_with("algoritm: random\n", &["lb", "run"]).expect_err("typo");
        assert!(e.contains("unknown setting \"algoritm\""), "{e}");
        let e = parse_with("maglev-min-size: lots\n", &["lb", "run"]).expect_err("bad value");
        assert!(e.contains("maglev-min-size"), "{e}");
        assert!(parse(Path::new("x"), "- a\n- b\n").is_err());
        assert!(parse(Path::new("x"), "algorithm: {a: b}\n").is_err());
    }

    #[test]
    fn the_config_path_comes_from_the_flag_or_the_environment() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            config_path(&args(&["lb", "run", "--config", "/a.yaml"]), None),
            Some(PathBuf::from("/a.yaml"))
        );
        assert_eq!(
            config_path(&args(&["lb", "--config=/b.yaml", "run"]), Some("/c".into())),
            Some(PathBuf::from("/b.yaml"))
        );
        assert_eq!(
            config_path(&args(&["lb", "run"]), Some("/c".into())),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(config_path(&args(&["lb", "run"]), None), None);
    }

    #[test]
    fn reload_sorts_changes_into_live_restart_and_overridden() {
        let startup = StartupSettings {
            overridden: ["maglev-max-size".to_string()].into(),
            builtin: [("algorithm".to_string(), Some("maglev".to_string()))].into(),
            file: None,
        };
        let old = parse(
            Path::new("x"),
            "algorithm: random\nmetrics-addr: 127.0.0.1:1\n",
        )
        .expect("old");
        let new = parse(
            Path::new("x"),
            "metrics-addr: 127.0.0.1:2\nmaglev-max-size: 65521\nlog-level: debug\n",
        )
        .expect("new");
        assert_eq!(
            diff(&old, &new, &startup),
            vec![
                Change::Live("algorithm".into(), "maglev".into()),
                Change::Live("log-level".into(), "debug".into()),
                Change::Overridden("maglev-max-size".into()),
                Change::Restart("metrics-addr".into()),
            ]
        );
    }
}
