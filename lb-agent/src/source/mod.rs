//! Where Kubernetes objects come from: manifest files (`file`, the standalone default) or the API server
//! (`kube`, kube-rs watchers). Both feed the same pure model and the same reconciler.

pub mod file;
pub mod kube;
