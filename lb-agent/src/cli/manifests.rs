//! `lb-agent manifests`: prints the YAML that installs (or, with `--uninstall`, removes) lb on a cluster. The
//! objects are built in `crate::install`; this turns flags into its options and resolves `--api-server auto`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;

use crate::install::{self, ApiServer};

#[derive(clap::Args, Debug, Clone)]
pub struct ManifestsArgs {
    /// The agent's image.
    #[arg(long, default_value = install::DEFAULT_IMAGE)]
    image: String,
    /// Namespace of the agent (kube-proxy's by default: `system-node-critical` is always admitted there). Another
    /// namespace gets a Namespace object labelled for the privileged Pod Security level and a ResourceQuota
    /// admitting node-critical pods.
    #[arg(long, default_value = install::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Where the agents reach the API server: `auto` (read now, with your kubeconfig, from ConfigMap
    /// kube-system/kube-proxy, else kube-public/cluster-info: the address kube-proxy or kubeadm's node join
    /// uses), `HOST:PORT`, or `in-cluster` (the `kubernetes` Service: only where something other than lb serves
    /// that ClusterIP on every node for good, since after a reboot a node without kube-proxy has no one to).
    #[arg(long, default_value = "auto")]
    api_server: String,
    /// The kubeconfig `--api-server auto` reads the cluster with [default: $KUBECONFIG, ~/.kube/config, or the
    /// in-cluster service account].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Only on nodes with this label (`key=value`, repeatable; beside `kubernetes.io/os=linux`).
    #[arg(long = "node-selector", value_parser = install::parse_label)]
    node_selector: Vec<(String, String)>,
    /// Serve `/metrics` on the node's addresses (default: 127.0.0.1 only, as kube-proxy does) and annotate the pods
    /// for Prometheus' pod discovery.
    #[arg(long)]
    metrics: bool,
    /// `--metrics`, plus a headless Service and a prometheus-operator ServiceMonitor.
    #[arg(long = "servicemonitor")]
    service_monitor: bool,
    /// The node-by-node migration from kube-proxy (docs/install.md): two DaemonSets chosen by the node label
    /// `lb.io/proxy`: `canary` runs lb beside kube-proxy (health on --canary-health-port, kube-proxy's connections
    /// left to it, new ones through lb), `lb` runs lb alone once kube-proxy is kept off the node.
    #[arg(long)]
    coexist_with_kube_proxy: bool,
    /// With --coexist-with-kube-proxy: the canary's health port (kube-proxy holds 10256).
    #[arg(long, default_value_t = install::objects::CANARY_HEALTH_PORT, requires = "coexist_with_kube_proxy")]
    canary_health_port: u16,
    /// Print the cleanup instead: a DaemonSet whose pods run `lb-agent cleanup` on every node (after kube-proxy
    /// answers there), then stay Running to show it is done. Apply it after deleting the agent's DaemonSet.
    #[arg(long)]
    uninstall: bool,
    /// With `--uninstall`: clean every node at once, without waiting for kube-proxy (moving to a proxy that does
    /// not answer on 127.0.0.1:10256; each node is without a proxy from then until that one runs).
    #[arg(long, requires = "uninstall")]
    no_wait_for_kube_proxy: bool,
}

pub fn run(args: &ManifestsArgs) -> anyhow::Result<()> {
    let api_server = if args.uninstall {
        ApiServer::InCluster
    } else {
        resolve_api_server(args)?
    };
    if api_server == ApiServer::InCluster && !args.uninstall {
        eprintln!(
            "lb-agent manifests: the agents will reach the API server through the `kubernetes` Service; a node \
             without kube-proxy cannot do that after a reboot (give --api-server auto or HOST:PORT)"
        );
    }
    print!("{}", render(args, api_server)?);
    Ok(())
}

/// `auto` read from the cluster; the other forms parsed.
fn resolve_api_server(args: &ManifestsArgs) -> anyhow::Result<ApiServer> {
    match args.api_server.as_str() {
        "in-cluster" => Ok(ApiServer::InCluster),
        "auto" => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(async {
                let config = match &args.kubeconfig {
                    Some(path) => {
                        let kc = kube::config::Kubeconfig::read_from(path)
                            .with_context(|| format!("reading {}", path.display()))?;
                        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
                    }
                    None => kube::Config::infer().await.context(
                        "--api-server auto reads the cluster: no kubeconfig found (give --kubeconfig, or \
                         --api-server HOST:PORT)",
                    )?,
                };
                let client = kube::Client::try_from(config)?;
                install::api_server::discover(client)
                    .await
                    .map_err(anyhow::Error::msg)
            })
        }
        other => {
            ApiServer::parse_address(other, "given with --api-server").map_err(anyhow::Error::msg)
        }
    }
}

/// The YAML for `args`, with `api_server` already resolved.
pub fn render(args: &ManifestsArgs, api_server: ApiServer) -> anyhow::Result<String> {
    let node_selector: BTreeMap<String, String> = args.node_selector.iter().cloned().collect();
    let (documents, what) = if args.uninstall {
        let opts = install::UninstallOptions {
            image: args.image.clone(),
            namespace: args.namespace.clone(),
            node_selector,
            wait_for_kube_proxy: !args.no_wait_for_kube_proxy,
        };
        (
            install::objects::uninstall_documents(&opts),
            "removes lb from every node",
        )
    } else {
        let opts = install::Options {
            image: args.image.clone(),
            namespace: args.namespace.clone(),
            api_server,
            node_selector,
            metrics: args.metrics,
            service_monitor: args.service_monitor,
            coexist_with_kube_proxy: args.coexist_with_kube_proxy,
            canary_health_port: args.canary_health_port,
        };
        (
            install::objects::Install::new(&opts).documents(),
            "installs lb, the eBPF Service load balancer (kube-proxy replacement)",
        )
    };
    let header = format!(
        "This file {what}.\nRendered by: {}\nApply with kubectl apply -f; the order that keeps every node served is \
         in lb's docs/install.md.",
        command_line(args)
    );
    install::to_yaml(&header, &documents).context("rendering YAML")
}

/// The command line that renders the same YAML (defaults left out), for the header.
fn command_line(args: &ManifestsArgs) -> String {
    let mut s = String::from("lb-agent manifests");
    if args.image != install::DEFAULT_IMAGE {
        s.push_str(&format!(" --image {}", args.image));
    }
    if args.namespace != install::DEFAULT_NAMESPACE {
        s.push_str(&format!(" --namespace {}", args.namespace));
    }
    if !args.uninstall {
        s.push_str(&format!(" --api-server {}", args.api_server));
    }
    for (k, v) in &args.node_selector {
        s.push_str(&format!(" --node-selector {k}={v}"));
    }
    if args.coexist_with_kube_proxy {
        s.push_str(" --coexist-with-kube-proxy");
        if args.canary_health_port != install::objects::CANARY_HEALTH_PORT {
            s.push_str(&format!(
                " --canary-health-port {}",
                args.canary_health_port
            ));
        }
    }
    for (on, flag) in [
        (args.metrics, " --metrics"),
        (args.service_monitor, " --servicemonitor"),
        (args.uninstall, " --uninstall"),
        (args.no_wait_for_kube_proxy, " --no-wait-for-kube-proxy"),
    ] {
        if on {
            s.push_str(flag);
        }
    }
    s
}

/// Renders from a command line (the words after `lb-agent manifests`), for tests and deploy/'s renderings.
/// `--api-server auto` is refused: it needs a cluster.
pub fn render_command_line(words: &[&str]) -> anyhow::Result<String> {
    use clap::Parser;
    #[derive(clap::Parser)]
    #[command(name = "lb-agent manifests")]
    struct Standalone {
        #[command(flatten)]
        args: ManifestsArgs,
    }
    let parsed =
        Standalone::try_parse_from(std::iter::once("manifests").chain(words.iter().copied()))?;
    if parsed.args.api_server == "auto" && !parsed.args.uninstall {
        anyhow::bail!("--api-server auto needs a cluster; give an address");
    }
    let api = if parsed.args.uninstall {
        ApiServer::InCluster
    } else {
        resolve_api_server(&parsed.args)?
    };
    render(&parsed.args, api)
}
