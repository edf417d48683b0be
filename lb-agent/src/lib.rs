//! lb's node agent as a library: the Kubernetes-to-datapath model, Maglev, the reconciler and map access. The
//! binary (`main.rs`) is a thin CLI over it; the integration tests use it directly.

pub mod build_info;
pub mod cli;
pub mod datapath;
pub mod host;
pub mod install;
pub mod maglev;
pub mod manifest;
pub mod model;
pub mod netfilter_keeper;
pub mod ops;
pub mod source;
pub mod state;
pub mod trace;
