//! Running the agent the way the DaemonSet of `lb-agent manifests` runs it: with exactly the Linux capabilities its
//! container adds (read from the generator's own DaemonSet object, which deploy/lb-agent.yaml is a rendering of, so
//! a test fails when the two diverge), no privilege escalation, and its own PID namespace (no `hostPID`), so it sees
//! only its own processes in `/proc`.

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::DaemonSet;

/// Capability names by number (linux/capability.h), without the `CAP_` prefix, as Kubernetes spells them.
pub const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The number of a capability named as Kubernetes does (`NET_ADMIN`; `CAP_NET_ADMIN` is accepted too).
pub fn number(name: &str) -> Result<u32> {
    let bare = name.trim().to_ascii_uppercase();
    let bare = bare.strip_prefix("CAP_").unwrap_or(&bare);
    NAMES
        .iter()
        .position(|n| *n == bare)
        .map(|i| i as u32)
        .with_context(|| format!("unknown capability {name:?}"))
}

/// The bit mask of a set of capability names, as in `CapEff` of /proc/<pid>/status.
pub fn mask<S: AsRef<str>>(names: &[S]) -> Result<u64> {
    names
        .iter()
        .try_fold(0u64, |m, n| Ok(m | (1u64 << number(n.as_ref())?)))
}

/// What the agent's container in the generated DaemonSet is granted.
#[derive(Debug, Clone)]
pub struct ContainerSecurity {
    /// `securityContext.capabilities.add`, upper case without `CAP_`.
    pub add: Vec<String>,
    /// `securityContext.capabilities.drop`.
    pub drop: Vec<String>,
    pub privileged: bool,
    pub allow_privilege_escalation: bool,
    pub run_as_user: Option<i64>,
    pub host_pid: bool,
    /// The `hostPath` volumes mounted into the container, as (host path, container path).
    pub host_paths: Vec<(String, String)>,
}

/// The agent's DaemonSet as `lb-agent manifests` generates it by default (the API server address changes nothing
/// here).
pub fn daemonset() -> DaemonSet {
    use lb_agent::install::{ApiServer, Options, objects::Install};
    Install::new(&Options::new(ApiServer::InCluster)).daemon_set
}

/// The `lb-agent` container's security settings in the generated DaemonSet.
pub fn daemonset_security() -> Result<ContainerSecurity> {
    security_of(daemonset())
}

/// The `lb-agent` container's security settings in `ds`.
pub fn security_of(ds: DaemonSet) -> Result<ContainerSecurity> {
    let pod = ds
        .spec
        .template
        .spec
        .context("the DaemonSet has no pod spec")?;
    let container = pod
        .containers
        .iter()
        .find(|c| c.name == "lb-agent")
        .context("the DaemonSet has no lb-agent container")?;
    let sc = container
        .security_context
        .clone()
        .context("the lb-agent container has no securityContext")?;
    let caps = sc.capabilities.clone().unwrap_or_default();
    let upper = |v: Option<Vec<String>>| -> Vec<String> {
        v.unwrap_or_default()
            .into_iter()
            .map(|s| s.to_ascii_uppercase())
            .collect()
    };
    let volumes = pod.volumes.clone().unwrap_or_default();
    let mut host_paths = Vec::new();
    for m in container.volume_mounts.clone().unwrap_or_default() {
        if let Some(hp) = volumes
            .iter()
            .find(|v| v.name == m.name)
            .and_then(|v| v.host_path.as_ref())
        {
            host_paths.push((hp.path.clone(), m.mount_path.clone()));
        }
    }
    Ok(ContainerSecurity {
        add: upper(caps.add),
        drop: upper(caps.drop),
        privileged: sc.privileged.unwrap_or(false),
        allow_privilege_escalation: sc.allow_privilege_escalation.unwrap_or(true),
        run_as_user: sc.run_as_user,
        host_pid: pod.host_pid.unwrap_or(false),
        host_paths,
    })
}

/// The command prefix that runs a program as the DaemonSet's container runs the agent: in a new PID namespace with
/// its own `/proc` (no `hostPID`), as root whose bounding set (so permitted and effective sets after `exec`) is
/// exactly `caps`, with no inheritable capabilities and `no_new_privs` (`allowPrivilegeEscalation: false`).
///
/// `unshare --kill-child` takes the agent down when the prefix's own process is killed, so [`crate::Child`]'s
/// kill-on-drop still works.
pub fn container_prefix<S: AsRef<str>>(caps: &[S]) -> Result<Vec<String>> {
    let mut bounding = String::from("-all");
    for c in caps {
        number(c.as_ref())?;
        bounding.push_str(",+");
        bounding.push_str(c.as_ref().to_ascii_lowercase().trim_start_matches("cap_"));
    }
    Ok([
        "unshare",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--",
        "setpriv",
        "--bounding-set",
        &bounding,
        "--inh-caps",
        "-all",
        "--no-new-privs",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect())
}

/// The capability state of a process, from /proc/<pid>/status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessCaps {
    pub effective: u64,
    pub permitted: u64,
    pub bounding: u64,
    pub no_new_privs: bool,
}

pub fn process_caps(pid: u32) -> Result<ProcessCaps> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<&str> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    let hex = |name: &str| -> Result<u64> {
        let v = field(name)?;
        u64::from_str_radix(v, 16).with_context(|| format!("{name} {v:?}"))
    };
    Ok(ProcessCaps {
        effective: hex("CapEff:")?,
        permitted: hex("CapPrm:")?,
        bounding: hex("CapBnd:")?,
        no_new_privs: field("NoNewPrivs:")? == "1",
    })
}

/// Names of the capabilities in `mask`, for messages.
pub fn names(mask: u64) -> Vec<&'static str> {
    NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1u64 << i) != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// The pid of the first child of `pid` (the agent under [`container_prefix`]'s `unshare --fork`).
pub fn first_child(pid: u32) -> Result<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    match text.split_whitespace().next() {
        Some(c) => c.parse().with_context(|| format!("{path}: {text:?}")),
        None => bail!("process {pid} has no child"),
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn names_and_numbers_agree_with_the_kernel_header() {
        assert_eq!(number("NET_ADMIN").ok(), Some(12));
        assert_eq!(number("cap_sys_admin").ok(), Some(21));
        assert_eq!(number("PERFMON").ok(), Some(38));
        assert_eq!(number("BPF").ok(), Some(39));
        assert!(number("NET_ADMINS").is_err());
        assert_eq!(
            mask(&["BPF", "NET_ADMIN"]).ok(),
            Some((1 << 39) | (1 << 12))
        );
        assert_eq!(names((1 << 21) | (1 << 12)), ["NET_ADMIN", "SYS_ADMIN"]);
    }

    #[test]
    fn prefix_sets_exactly_the_listed_bounding_set() {
        let p = container_prefix(&["NET_ADMIN", "SYS_ADMIN"]).expect("prefix");
        assert!(p.iter().any(|a| a == "-all,+net_admin,+sys_admin"), "{p:?}");
        assert!(container_prefix(&["NOPE"]).is_err());
    }
}
