//! The datapath's per-service and per-backend counters (`LB_SVC_STATS`, `LB_BE_STATS`) as tables: metric name, help
//! and the field each reads. The metrics export them and `lb-agent stats` prints them, both from these tables, so a
//! new field in `lb_common::ServiceStats` or `BackendStats` is one line here.

use lb_common::{BackendStats, ServiceStats};

/// A per-service counter: metric name (without `_total`), help, and the field it reads.
pub type ServiceCounter = (&'static str, &'static str, fn(&ServiceStats) -> u64);
/// A per-backend counter.
pub type BackendCounter = (&'static str, &'static str, fn(&BackendStats) -> u64);

/// Every `ServiceStats` field, exported as `<name>_total{namespace,name,port,frontend,protocol,scope,kind}`.
pub const SERVICE_COUNTERS: &[ServiceCounter] = &[
    (
        "lb_service_sock_connects",
        "Connections (connect, or first UDP sendmsg) the socket LB translated to a backend.",
        |s| s.sock_connects,
    ),
    (
        "lb_service_sock_rejects",
        "connect/sendmsg calls the socket LB refused because the service had no backend.",
        |s| s.sock_rejects,
    ),
    (
        "lb_service_packets",
        "Packets the tc/XDP datapath forwarded to a backend.",
        |s| s.packets,
    ),
    (
        "lb_service_bytes",
        "Bytes the tc/XDP datapath forwarded to a backend.",
        |s| s.bytes,
    ),
    (
        "lb_service_drops",
        "Packets the tc/XDP datapath dropped for this service.",
        |s| s.drops,
    ),
];

/// Every `BackendStats` field, exported as `<name>_total{backend,protocol}`.
pub const BACKEND_COUNTERS: &[BackendCounter] = &[
    (
        "lb_backend_sock_connects",
        "Connections the socket LB sent to this backend.",
        |s| s.sock_connects,
    ),
    (
        "lb_backend_packets",
        "Packets the tc/XDP datapath forwarded to this backend.",
        |s| s.packets,
    ),
    (
        "lb_backend_bytes",
        "Bytes the tc/XDP datapath forwarded to this backend.",
        |s| s.bytes,
    ),
];
