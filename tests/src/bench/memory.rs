//! `lb-bench memory`: the real agent's memory and time to programmed for several agent binaries side by side (a
//! change and its baseline), interleaved run by run so that the machine's noise falls on all of them alike.
//!
//! Each sample starts one agent on a fresh pin directory and an empty test cgroup, from the manifest file or from
//! the in-process API server holding the same objects, waits for "initial sync done", and reads `/proc/<pid>/status`
//! (VmHWM: peak RSS; VmRSS: RSS then) and the agent's own "synced" log line (the first sync's time, and its
//! translation and map-writing parts when the agent logs them).

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::control::{RemoveDir, peak_and_current_rss_kib, start_agent};
use super::stats::{Summary, summarize};
use super::workload;
use crate::{BpfDir, Cgroup, unique_token};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Source {
    /// `--manifests`: a YAML file with every object.
    Manifest,
    /// `--kubeconfig`: the in-process API server (list and watch through kube-rs).
    Kube,
}

pub struct Options {
    /// (label, binary) of each agent compared.
    pub agents: Vec<(String, PathBuf)>,
    pub services: Vec<usize>,
    pub endpoints: usize,
    pub runs: usize,
    pub sources: Vec<Source>,
}

#[derive(Debug, Serialize)]
pub struct Sample {
    pub agent: String,
    pub source: Source,
    pub services: usize,
    pub run: usize,
    pub vm_hwm_kib: u64,
    pub vm_rss_kib: u64,
    pub start_to_programmed_ms: f64,
    /// From the agent's first "synced" line.
    pub first_sync_ms: Option<f64>,
    pub translate_ms: Option<f64>,
    pub write_ms: Option<f64>,
}

/// Runs every (size, source, agent) cell `runs` times, the agents' order rotated each run; prints each sample as
/// it comes (stderr) and a summary table (stdout). Returns the samples.
pub fn run(opts: &Options) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for &n in &opts.services {
        let svcs = workload::services(n, opts.endpoints, false);
        for &source in &opts.sources {
            let input = Input::new(source, &svcs)?;
            for run in 0..opts.runs {
                for k in 0..opts.agents.len() {
                    let (label, bin) = &opts.agents[(k + run) % opts.agents.len()];
                    let s = measure(label, bin, &input, n, run)
                        .with_context(|| format!("{label}, {n} Services, {source:?}, run {run}"))?;
                    eprintln!(
                        "lb-bench memory: {label:>10} {source:?} {n:>6} Services run {run}: peak {:.1} MiB, \
                         then {:.1} MiB, programmed in {:.0} ms (first sync {:?} ms, translate {:?} ms, \
                         write {:?} ms)",
                        mib(s.vm_hwm_kib),
                        mib(s.vm_rss_kib),
                        s.start_to_programmed_ms,
                        s.first_sync_ms,
                        s.translate_ms,
                        s.write_ms
                    );
                    samples.push(s);
                }
            }
        }
    }
    print_summary(opts, &samples);
    Ok(samples)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// What the agent reads: a manifest file, or an API server holding the objects (shared by every run of a size).
enum Input {
    Manifest {
        _dir: RemoveDir,
        path: PathBuf,
    },
    Kube {
        _dir: RemoveDir,
        _api: crate::ApiServer,
        kubeconfig: PathBuf,
    },
}

impl Input {
    fn new(source: Source, svcs: &[workload::Svc]) -> Result<Input> {
        let dir = std::env::temp_dir().join(format!("lb-bench-mem-{}", unique_token()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let cleanup = RemoveDir(dir.clone());
        Ok(match source {
            Source::Manifest => {
                let path = dir.join("services.yaml");
                std::fs::write(&path, workload::manifest(svcs)).context("writing the manifest")?;
                Input::Manifest {
                    _dir: cleanup,
                    path,
                }
            }
            Source::Kube => {
                let objects = workload::api_objects(svcs);
                let api = crate::ApiServer::start()?;
                api.apply_value(objects.node)?;
                for o in objects.services.into_iter().chain(objects.slices) {
                    api.apply_value(o)?;
                }
                let kubeconfig = dir.join("kubeconfig");
                api.write_kubeconfig(&kubeconfig)?;
                Input::Kube {
                    _dir: cleanup,
                    _api: api,
                    kubeconfig,
                }
            }
        })
    }

    fn source(&self) -> Source {
        match self {
            Input::Manifest { .. } => Source::Manifest,
            Input::Kube { .. } => Source::Kube,
        }
    }

    fn args(&self) -> [&OsStr; 2] {
        match self {
            Input::Manifest { path, .. } => [OsStr::new("--manifests"), path.as_os_str()],
            Input::Kube { kubeconfig, .. } => [OsStr::new("--kubeconfig"), kubeconfig.as_os_str()],
        }
    }
}

fn measure(
    label: &str,
    bin: &std::path::Path,
    input: &Input,
    n: usize,
    run: usize,
) -> Result<Sample> {
    let token = unique_token();
    let pins = BpfDir::new(&format!("lb-bench-mem-{token}"))?;
    let cgroup = Cgroup::new(&format!("lb-bench-mem-{token}"))?;
    let started = Instant::now();
    let mut child = start_agent(bin, &input.args(), pins.path(), &cgroup)?;
    let start_to_programmed_ms = started.elapsed().as_secs_f64() * 1e3;
    let pid = child.pid();
    let (vm_hwm_kib, vm_rss_kib) = peak_and_current_rss_kib(pid)?;
    let stderr = child.stderr();
    let synced = stderr.lines().find(|l| l.contains("synced"));
    let logged = |key: &str| -> Option<f64> {
        synced?
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))?
            .parse()
            .ok()
    };
    let sample = Sample {
        agent: label.to_owned(),
        source: input.source(),
        services: n,
        run,
        vm_hwm_kib,
        vm_rss_kib,
        start_to_programmed_ms,
        first_sync_ms: logged("elapsed_ms="),
        translate_ms: logged("translate_ms="),
        write_ms: logged("write_ms="),
    };
    child.terminate(Duration::from_secs(5))?;
    drop(child);
    Ok(sample)
}

fn print_summary(opts: &Options, samples: &[Sample]) {
    println!(
        "| agent | source | Services | runs | peak RSS MiB p50 (min-max) | RSS after sync MiB p50 (min-max) | \
         start -> programmed ms p50 (min-max) | first sync ms p50 | of which translate ms p50 | write ms p50 |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &opts.services {
        for &source in &opts.sources {
            for (label, _) in &opts.agents {
                let cell: Vec<&Sample> = samples
                    .iter()
                    .filter(|s| s.services == n && s.source == source && &s.agent == label)
                    .collect();
                let summary = |f: &dyn Fn(&Sample) -> Option<f64>| -> Summary {
                    let mut v: Vec<f64> = cell.iter().filter_map(|s| f(s)).collect();
                    summarize(&mut v)
                };
                let spread = |s: Summary| format!("{:.1} ({:.1}-{:.1})", s.p50, s.min, s.max);
                let p50 = |s: Summary| {
                    if s.n == 0 {
                        "-".to_owned()
                    } else {
                        format!("{:.0}", s.p50)
                    }
                };
                println!(
                    "| {label} | {source:?} | {n} | {} | {} | {} | {} | {} | {} | {} |",
                    cell.len(),
                    spread(summary(&|s| Some(mib(s.vm_hwm_kib)))),
                    spread(summary(&|s| Some(mib(s.vm_rss_kib)))),
                    spread(summary(&|s| Some(s.start_to_programmed_ms))),
                    p50(summary(&|s| s.first_sync_ms)),
                    p50(summary(&|s| s.translate_ms)),
                    p50(summary(&|s| s.write_ms)),
                );
            }
        }
    }
}
