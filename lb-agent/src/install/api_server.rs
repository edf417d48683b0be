//! Where the agent finds the API server. It cannot use the `kubernetes` Service: that ClusterIP works only once a
//! proxy on the node programs it, and on a node without kube-proxy that proxy is lb itself (after a reboot its
//! pins are gone). So the address is written into the DaemonSet (`KUBERNETES_SERVICE_HOST` / `_PORT`, which
//! client-go and kube-rs read in a pod), as Cilium's `k8sServiceHost` does.
//!
//! `--api-server auto` reads it when the manifests are generated, from what the cluster already uses to solve the
//! same bootstrap, in this order:
//! 1. ConfigMap `kube-system/kube-proxy`, key `kubeconfig.conf` (kubeadm): the address kube-proxy on every node
//!    reaches the API server with today, so lb reaches it the same way.
//! 2. ConfigMap `kube-public/cluster-info`, key `kubeconfig` (kubeadm's bootstrap ConfigMap): the address nodes
//!    joined the cluster with.
//!
//! The generated YAML names the one it used. Neither present (managed clusters without kubeadm): an error asking for
//! `--api-server HOST:PORT`.

use std::fmt;

/// What the DaemonSet is told about the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiServer {
    /// Leave `KUBERNETES_SERVICE_HOST` as the kubelet sets it (the `kubernetes` Service): only for clusters where
    /// something other than lb serves that ClusterIP on every node, for good.
    InCluster,
    /// A fixed address; `source` says where it came from (for the YAML's comment).
    Address {
        host: String,
        port: u16,
        source: String,
    },
}

impl ApiServer {
    /// `HOST:PORT`, `[V6]:PORT`, or an `https://` URL as kubeconfigs write it (port 443 when it has none).
    pub fn parse_address(s: &str, source: &str) -> Result<ApiServer, String> {
        let rest = s.trim();
        let rest = rest.strip_prefix("https://").unwrap_or(rest);
        if rest.starts_with("http://") {
            return Err(format!("{s:?}: the API server is reached over https"));
        }
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(format!("{s:?}: junk after the address")),
            };
            (host.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => {
                    return Err(format!("{s:?}: write an IPv6 address as [addr]:port"));
                }
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (authority.to_owned(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{s:?}: {p:?} is not a port"))?,
            None => 443,
        };
        Ok(ApiServer::Address {
            host,
            port,
            source: source.to_owned(),
        })
    }
}

impl fmt::Display for ApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiServer::InCluster => f.write_str("the `kubernetes` Service (in-cluster)"),
            ApiServer::Address { host, port, source } if host.contains(':') => {
                write!(f, "[{host}]:{port} ({source})")
            }
            ApiServer::Address { host, port, source } => write!(f, "{host}:{port} ({source})"),
        }
    }
}

/// The `server:` of a kubeconfig's first cluster (kubeadm's ConfigMaps hold exactly one).
pub fn kubeconfig_server(kubeconfig: &str) -> Option<String> {
    let v: serde_json::Value = serde_saphyr::from_str(kubeconfig).ok()?;
    v["clusters"]
        .as_array()?
        .iter()
        .find_map(|c| c["cluster"]["server"].as_str().map(str::to_owned))
}

/// The places `auto` looks, in order: (namespace, ConfigMap, key, what it is).
pub const AUTO_SOURCES: [(&str, &str, &str, &str); 2] = [
    (
        "kube-system",
        "kube-proxy",
        "kubeconfig.conf",
        "the address kube-proxy uses",
    ),
    (
        "kube-public",
        "cluster-info",
        "kubeconfig",
        "the address nodes joined with",
    ),
];

/// Picks the address from the ConfigMaps' data as fetched (`None`: absent). Pure, so the order and the parsing are
/// unit-tested; [`discover`] fetches.
pub fn from_config_maps(
    fetched: &[Option<std::collections::BTreeMap<String, String>>],
) -> Result<ApiServer, String> {
    let mut tried = Vec::new();
    for ((ns, name, key, what), data) in AUTO_SOURCES.iter().zip(fetched) {
        let place = format!("ConfigMap {ns}/{name} ({key})");
        let Some(data) = data else {
            tried.push(format!("{place}: not found"));
            continue;
        };
        let Some(text) = data.get(*key) else {
            tried.push(format!("{place}: no such key"));
            continue;
        };
        match kubeconfig_server(text) {
            Some(server) => {
                return ApiServer::parse_address(&server, &format!("from {place}: {what}"));
            }
            None => tried.push(format!("{place}: no cluster server in it")),
        }
    }
    Err(format!(
        "cannot find the API server's address ({}); give --api-server HOST:PORT, the address your nodes reach \
         the API server at (kube-proxy's --master or kubeconfig server)",
        tried.join("; ")
    ))
}

/// `--api-server auto`: reads the ConfigMaps of [`AUTO_SOURCES`] with `client`.
pub async fn discover(client: kube::Client) -> Result<ApiServer, String> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let mut fetched = Vec::new();
    for (ns, name, _, _) in AUTO_SOURCES {
        let api: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), ns);
        let cm = api
            .get_opt(name)
            .await
            .map_err(|e| format!("reading ConfigMap {ns}/{name}: {e}"))?;
        fetched.push(cm.map(|cm| cm.data.unwrap_or_default()));
    }
    from_config_maps(&fetched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const KUBEADM_KUBE_PROXY: &str = "apiVersion: v1
kind: Config
clusters:
- cluster:
    certificate-authority: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
    server: https://192.168.10.5:6443
  name: default
contexts:
- context: {cluster: default, namespace: default, user: default}
  name: default
current-context: default
users:
- name: default
  user: {tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token}
";

    fn addr(host: &str, port: u16) -> (String, u16) {
        (host.to_owned(), port)
    }

    fn host_port(a: &ApiServer) -> (String, u16) {
        match a {
            ApiServer::Address { host, port, .. } => (host.clone(), *port),
            ApiServer::InCluster => panic!("expected an address, got {a}"),
        }
    }

    #[test]
    fn addresses_parse_as_kubeconfigs_and_operators_write_them() {
        let p = |s| host_port(&ApiServer::parse_address(s, "test").expect(s));
        assert_eq!(p("192.168.10.5:6443"), addr("192.168.10.5", 6443));
        assert_eq!(p("https://192.168.10.5:6443"), addr("192.168.10.5", 6443));
        assert_eq!(
            p("https://api.example.internal"),
            addr("api.example.internal", 443)
        );
        assert_eq!(
            p("https://api.example.internal:8443/prefix/"),
            addr("api.example.internal", 8443)
        );
        assert_eq!(p("[2001:db8::5]:6443"), addr("2001:db8::5", 6443));
        assert_eq!(p("https://[2001:db8::5]"), addr("2001:db8::5", 443));
        for bad in [
            "",
            ":6443",
            "2001:db8::5",
            "host:0",
            "host:port",
            "http://host:80",
            "[::1",
        ] {
            assert!(
                ApiServer::parse_address(bad, "test").is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn auto_prefers_kube_proxys_kubeconfig_then_cluster_info() {
        let kp = BTreeMap::from([("kubeconfig.conf".to_owned(), KUBEADM_KUBE_PROXY.to_owned())]);
        let ci = BTreeMap::from([(
            "kubeconfig".to_owned(),
            KUBEADM_KUBE_PROXY.replace("192.168.10.5:6443", "lb.example.internal:443"),
        )]);
        let both = from_config_maps(&[Some(kp), Some(ci.clone())]).expect("found");
        assert_eq!(host_port(&both), addr("192.168.10.5", 6443));
        assert!(
            both.to_string().contains("kube-system/kube-proxy"),
            "{both}"
        );
        let only_ci = from_config_maps(&[None, Some(ci)]).expect("found");
        assert_eq!(host_port(&only_ci), addr("lb.example.internal", 443));
        assert!(
            only_ci.to_string().contains("kube-public/cluster-info"),
            "{only_ci}"
        );
        // A kube-proxy ConfigMap without the kubeconfig key (a managed cluster's) falls through too.
        let odd = BTreeMap::from([("config.conf".to_owned(), "mode: iptables".to_owned())]);
        let err = from_config_maps(&[Some(odd), None]).expect_err("nothing usable");
        assert!(
            err.contains("no such key")
                && err.contains("not found")
                && err.contains("--api-server"),
            "{err}"
        );
    }
}
