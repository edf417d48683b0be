//! Where Kubernetes objects come from. Today: manifest files (`file`); the kube-rs watcher plugs in beside it and
//! feeds the same model.

pub mod file;
