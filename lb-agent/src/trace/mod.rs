//! `lb-agent trace`'s core, also used by the BPF_PROG_TEST_RUN fixture tests: load the real object privately (maps
//! pinned in a temporary directory under /sys/fs/bpf, removed on drop; no program attached anywhere), fill the maps
//! with the agent's own model and reconciler, run `lb_tc_ingress` on crafted packets with BPF_PROG_TEST_RUN, and
//! read the verdict the program recorded in `LB_TRACE`. Nothing here re-implements the datapath in userspace.
//!
//! The maps are filled from objects (manifests, or the API server listed once) by the agent's model and
//! reconciler, or copied from the node's live pins (`live`): what the node really runs, with nothing live touched.

pub mod live;
pub mod packet;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use lb_common::{
    CONFIG_FLAG_TRACE, LOCAL_NET_NODE, LOCAL_NET_POD, VERDICT_DROP, VERDICT_FORWARD,
    VERDICT_REJECT, addr_from_bytes, prog_names, reason,
};
use serde::Serialize;

use crate::datapath::loader::{self, Datapath, PinDir};
use crate::datapath::maps::{Maps, MapsRead};
use crate::datapath::names::{kind_name, kind_number};
use crate::datapath::packet_maps::{NodeEntry, lpm_prefix};
use crate::datapath::pins::Capacities;
use crate::datapath::reconcile::{ReconcileConfig, Reconciler, service_key};
use crate::model::{self, ModelConfig};
use crate::source::manifest;
use crate::state::Protocol;

/// Which kind of source a traced packet has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Outside the node (the default).
    Outside,
    /// A pod on this node (its address is added to the local networks if the Node's podCIDRs do not hold it).
    Pod,
    /// The node itself.
    Node,
}

/// `lb-agent trace`'s JSON answer (docs/operations.md and docs/observability.md).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TraceResult {
    /// `forward`, `drop`, `reject` or `pass`.
    pub verdict: &'static str,
    /// The chosen backend as `ip:port`.
    pub backend: Option<String>,
    pub snat: bool,
    pub reason: &'static str,
    /// With a sweep: every backend reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backends: Option<Vec<String>>,
    /// With `--xdp`: the program that decided, `xdp` (it dropped the packet) or `tc` (XDP passed it on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<&'static str>,
    /// The Service port the packet matched, `namespace/name:port` (`:port` is the port's name; a Service's only,
    /// unnamed port has none), when it matched one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// That frontend's kind: `ClusterIP`, `NodePort`, `LoadBalancer` or `ExternalIP`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// One BPF_PROG_TEST_RUN: the recorded verdict and what the program returned and left in the packet.
#[derive(Clone, Debug)]
pub struct Run {
    pub result: TraceResult,
    /// The tc return code (`TC_ACT_*`, -1 = unspecified/next).
    pub retval: i32,
    /// The packet after the program.
    pub output: Vec<u8>,
}

/// `enum xdp_action` of the kernel's uapi (`linux/bpf.h`), which aya does not re-export.
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// The privately loaded datapath.
pub struct Tracer {
    datapath: Datapath,
    pin_dir: PathBuf,
    xdp_first: bool,
    /// Service id -> (`namespace/name:port`, kind), to name what a packet matched.
    names: HashMap<u32, (String, String)>,
}

impl Tracer {
    /// Loads the object with its maps pinned under a fresh private directory and programs them from `manifests`
    /// as the agent would on node `node_name`.
    pub fn load(object: &[u8], manifests: &Path, node_name: &str) -> anyhow::Result<Self> {
        let (objects, _diagnostics) = manifest::load_path(manifests)
            .with_context(|| format!("reading {}", manifests.display()))?;
        Self::load_objects(object, &objects, node_name)
    }

    pub fn load_objects(
        object: &[u8],
        objects: &crate::model::ClusterObjects,
        node_name: &str,
    ) -> anyhow::Result<Self> {
        Self::load_objects_with(object, objects, node_name, &ModelConfig::default())
    }

    /// As [`Tracer::load_objects`], with the agent's settings that change the translation (the `--service-cidrs`
    /// and `--node-address` fallbacks, `--localhost-nodeports`, ...).
    pub fn load_objects_with(
        object: &[u8],
        objects: &crate::model::ClusterObjects,
        node_name: &str,
        cfg: &ModelConfig,
    ) -> anyhow::Result<Self> {
        let mut tracer = Self::load_empty(object)?;
        let node = model::node_context(node_name, &objects.nodes, cfg);
        let translation = model::translate(objects, &node, cfg);
        let mut reconciler =
            Reconciler::restore(&tracer.datapath.maps, ReconcileConfig::default())?;
        reconciler.set_config_flags(CONFIG_FLAG_TRACE);
        let report = reconciler.sync(&mut tracer.datapath.maps, &translation.state);
        if let Some((frontend, why)) = report.failed.first() {
            anyhow::bail!("programming {frontend} failed: {why}");
        }
        for (frontend, entry) in &translation.state.services {
            if let Some(id) = reconciler.service_id(&service_key(frontend)) {
                let kind = kind_name(kind_number(entry.kind)).to_owned();
                tracer.names.insert(id, (entry.service.to_string(), kind));
            }
        }
        Ok(tracer)
    }

    /// Loads the object privately and copies the service state of the node's pins in `live` (see [`live`]).
    pub fn from_pins(object: &[u8], live: &Path) -> anyhow::Result<(Self, live::Copied)> {
        let mut tracer = Self::load_empty(object)?;
        let copied = live::copy_service_state(live, &mut tracer.datapath.maps)?;
        tracer.names = live::live_names(live);
        Ok((tracer, copied))
    }

    /// The object loaded with its maps pinned under a fresh private directory, nothing programmed.
    fn load_empty(object: &[u8]) -> anyhow::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lb-trace-{}-{n}", std::process::id()));
        let pins = PinDir::new(&pin_dir);
        let caps = Capacities {
            // Small maps: a trace programs one manifest set.
            conntrack: 65536,
            ..Capacities::default()
        };
        // The loader pins maps as it goes: a failed load leaves some, which no `Tracer` exists yet to remove.
        let datapath = match loader::load(object, &pins, &caps) {
            Ok(datapath) => datapath,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&pin_dir);
                return Err(e);
            }
        };
        let mut tracer = Tracer {
            datapath,
            pin_dir,
            xdp_first: false,
            names: HashMap::new(),
        };
        crate::datapath::tc_attach::load_tc_programs(&mut tracer.datapath.ebpf)?;
        Ok(tracer)
    }

    /// Marks `addr` as a local source of the given kind (for `--from-pod` / `--from-node`).
    pub fn add_local_source(&mut self, addr: IpAddr, source: Source) -> anyhow::Result<()> {
        let kind = match source {
            Source::Outside => return Ok(()),
            Source::Pod => LOCAL_NET_POD,
            Source::Node => LOCAL_NET_NODE,
        };
        let (prefix, addr) = lpm_prefix(addr, 128);
        self.datapath
            .maps
            .put_node_entry(&NodeEntry::LocalNet { prefix, addr, kind })?;
        Ok(())
    }

    /// Runs `lb_tc_ingress` on `frame`.
    pub fn run_frame(&mut self, frame: &[u8]) -> anyhow::Result<Run> {
        self.run_program(prog_names::TC_INGRESS, frame)
    }

    /// Runs `lb_tc_egress` on `frame` (a packet leaving through the external interface: the SNAT of a forwarded
    /// flow, or a backend's reply getting the VIP back), for the fixture tests; `lb-agent trace` runs ingress only.
    pub fn run_egress_frame(&mut self, frame: &[u8]) -> anyhow::Result<Run> {
        self.run_program(prog_names::TC_EGRESS, frame)
    }

    fn run_program(&mut self, name: &str, frame: &[u8]) -> anyhow::Result<Run> {
        let before = self.datapath.maps.packet.trace_record()?.seq;
        let prog: &mut SchedClassifier = self
            .datapath
            .ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing"))?
            .try_into()?;
        // Room for growth: a reject turns a packet into an ICMP error up to 96 bytes longer.
        let mut out = vec![0u8; frame.len() + 256];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN on {name}"))?;
        out.truncate(res.data_size_out as usize);
        let rec = self.datapath.maps.packet.trace_record()?;
        let fresh = rec.seq != before;
        let backends = self.datapath.maps.backends()?;
        let backend = (fresh && rec.verdict == VERDICT_FORWARD)
            .then(|| backends.iter().find(|(id, _)| *id == rec.backend_id))
            .flatten()
            .map(|(_, b)| show(addr_from_bytes(b.addr), b.port));
        let (verdict, why) = if !fresh {
            ("pass", reason::NONE)
        } else {
            let v = match rec.verdict {
                VERDICT_FORWARD => "forward",
                VERDICT_DROP => "drop",
                VERDICT_REJECT => "reject",
                _ => "pass",
            };
            (v, rec.reason)
        };
        let matched = (fresh && rec.service_id != 0)
            .then(|| self.names.get(&rec.service_id))
            .flatten();
        Ok(Run {
            result: TraceResult {
                verdict,
                backend,
                snat: fresh && rec.verdict == VERDICT_FORWARD && rec.snat != 0,
                reason: reason::name(why),
                backends: None,
                stage: None,
                service: matched.map(|(name, _)| name.clone()),
                kind: matched.map(|(_, kind)| kind.clone()),
            },
            retval: res.return_value as i32,
            output: out,
        })
    }

    /// Traces one new flow (a TCP SYN, a UDP datagram, an SCTP packet); through `lb_xdp` first when
    /// [`Tracer::set_xdp_first`] asked for it.
    pub fn trace(
        &mut self,
        proto: Protocol,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> anyhow::Result<Run> {
        let frame = packet::build(proto, src, dst, packet::TCP_SYN, b"lb-trace");
        if !self.xdp_first {
            return self.run_frame(&frame);
        }
        let (action, output) = self.run_xdp_frame(&frame)?;
        match action {
            XDP_PASS => {
                let mut run = self.run_frame(&frame)?;
                run.result.stage = Some("tc");
                Ok(run)
            }
            // lb_xdp drops only for rule 9 (sources outside `loadBalancerSourceRanges`); a new flow is never
            // sent by XDP itself (its first packets teach XDP the L2 headers through tc), so any other action
            // is a bug worth showing as such.
            XDP_DROP => Ok(Run {
                result: TraceResult {
                    verdict: "drop",
                    backend: None,
                    snat: false,
                    reason: reason::name(reason::SOURCE_RANGE),
                    backends: None,
                    stage: Some("xdp"),
                    service: None,
                    kind: None,
                },
                retval: action as i32,
                output,
            }),
            other => {
                anyhow::bail!("lb_xdp returned XDP action {other} for a new flow's first packet")
            }
        }
    }

    /// Runs every traced packet through `lb_xdp` before `lb_tc_ingress`, as a node running `lb-agent run --xdp`
    /// does (`lb-agent trace --xdp`).
    pub fn set_xdp_first(&mut self, on: bool) {
        self.xdp_first = on;
    }

    /// `--sweep N`: the same flow from N source ports (from `src`'s port on); the set of backends reached.
    pub fn sweep(
        &mut self,
        proto: Protocol,
        src: SocketAddr,
        dst: SocketAddr,
        n: u16,
    ) -> anyhow::Result<Vec<String>> {
        let mut set = BTreeSet::new();
        for i in 0..n {
            let s = SocketAddr::new(src.ip(), src.port().wrapping_add(i).max(1));
            if let Some(b) = self.trace(proto, s, dst)?.result.backend {
                set.insert(b);
            }
        }
        Ok(set.into_iter().collect())
    }

    /// Sets `CONFIG_FLAG_XDP` next to the trace flag, as `lb-agent run --xdp` does: tc egress then records the L2
    /// headers `lb_xdp` sends with.
    pub fn enable_xdp_learning(&mut self) -> anyhow::Result<()> {
        let mut config = self.datapath.maps.packet.config()?;
        config.flags |= lb_common::CONFIG_FLAG_XDP;
        self.datapath.maps.packet.put_config(&config)?;
        Ok(())
    }

    /// Runs `lb_xdp` (loaded on first use) on `frame`: the XDP action and the frame after the program.
    pub fn run_xdp_frame(&mut self, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let name = prog_names::XDP;
        let prog: &mut aya::programs::Xdp = self
            .datapath
            .ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing"))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()
                .with_context(|| format!("loading {name} (verifier)"))?;
        }
        let mut out = vec![0u8; frame.len() + 256];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN on {name}"))?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    /// The maps, for fixtures that inspect conntrack or counters.
    pub fn maps(&mut self) -> &mut crate::datapath::maps::PinnedMaps {
        &mut self.datapath.maps
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.pin_dir) {
            tracing::warn!(dir = %self.pin_dir.display(), error = %e, "could not remove the trace pin directory");
        }
    }
}

fn show(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}
