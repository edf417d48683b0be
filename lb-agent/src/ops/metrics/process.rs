//! The process metrics every Prometheus client exports (`process_*`, as client_golang's process collector names
//! them: the kube-proxy dashboard's memory and CPU panels read them), from `/proc/self`, and the number of async
//! tasks under Go's `go_goroutines`.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Reads `/proc/self` at every scrape; `runtimes` are the tokio runtimes whose tasks count as "goroutines".
#[derive(Debug)]
pub struct ProcessCollector {
    pub runtimes: Vec<tokio::runtime::Handle>,
}

/// What `/proc/self/stat` and friends say.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub threads: u64,
}

/// Parses `/proc/<pid>/stat` (fields after the parenthesised command name, which may hold spaces), with the
/// clock tick, page size and boot time (`btime` of `/proc/stat`) to convert its units.
pub fn parse_stat(stat: &str, ticks: f64, page: u64, boot_time: u64) -> Option<ProcessSample> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is f[n - 3].
    let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(ProcessSample {
        cpu_seconds: (num(14)? + num(15)?) as f64 / ticks,
        threads: num(20)?,
        start_time_seconds: boot_time as f64 + num(22)? as f64 / ticks,
        virtual_bytes: num(23)?,
        resident_bytes: num(24)? * page,
        ..ProcessSample::default()
    })
}

fn boot_time() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// This process, now; `None` when `/proc` cannot be read.
pub fn sample() -> Option<ProcessSample> {
    // SAFETY: sysconf only reads configuration values.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let mut s = parse_stat(&stat, ticks.max(1) as f64, page.max(1) as u64, boot_time())?;
    s.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        s.max_fds = limit.rlim_cur;
    }
    Some(s)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let tasks: usize = self
            .runtimes
            .iter()
            .map(|h| h.metrics().num_alive_tasks())
            .sum();
        ConstGauge::new(tasks as i64).encode(encoder.encode_descriptor(
            "go_goroutines",
            "lb is not written in Go: the number of async tasks alive in the agent (its nearest equivalent of \
             goroutines), exported under Go's name so that dashboards made for kube-proxy show it.",
            None,
            MetricType::Gauge,
        )?)?;
        let Some(s) = sample() else {
            return Ok(());
        };
        ConstCounter::new(s.cpu_seconds).encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            MetricType::Counter,
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                s.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                s.virtual_bytes as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                s.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                s.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                s.max_fds as f64,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                s.threads as f64,
            ),
        ] {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_command_with_spaces() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime
        // cstime priority nice num_threads itrealvalue starttime vsize rss ...
        let stat = "42 (lb agent) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 300 18446744073709551615";
        let s = parse_stat(stat, 100.0, 4096, 1_700_000_000).expect("parsed");
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_time_seconds, 1_700_000_010.0);
        assert_eq!(s.virtual_bytes, 123_456_789);
        assert_eq!(s.resident_bytes, 300 * 4096);
    }

    #[test]
    fn this_process_reads() {
        let s = sample().expect("/proc/self");
        assert!(
            s.resident_bytes > 0 && s.open_fds > 0 && s.max_fds >= s.open_fds,
            "{s:?}"
        );
        assert!(s.start_time_seconds > 1_000_000_000.0, "{s:?}");
    }
}
