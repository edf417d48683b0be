//! Where Kubernetes objects come from: manifest files (`manifest` parses them, `file` watches them; the standalone
//! default) or the API server (`kube`, kube-rs watchers). Both produce the model's [`ClusterObjects`] and feed the
//! same pure model and the same reconciler.
//!
//! [`ClusterObjects`]: crate::model::ClusterObjects

pub mod file;
pub mod kube;
pub mod manifest;
mod tracked;
