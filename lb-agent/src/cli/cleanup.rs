use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::datapath::loader::{PinDir, cleanup};

use super::PinArgs;

#[derive(clap::Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pins: PinArgs,
    /// First wait until kube-proxy answers `/healthz` with 200 at this address (its default healthz address;
    /// the flag alone means 127.0.0.1:10256), so the node is never left without a Service proxy. An answer from lb
    /// itself does not count: delete lb's DaemonSet first.
    #[arg(long, num_args = 0..=1, default_missing_value = "127.0.0.1:10256")]
    wait_for_kube_proxy: Option<SocketAddr>,
}

pub fn run(args: &CleanupArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.wait_for_kube_proxy {
        wait_for_kube_proxy(addr);
    }
    let removed = cleanup(&PinDir::new(&args.pins.bpffs))?;
    for filter in crate::datapath::tc_attach::detach_clsact_filters() {
        tracing::info!(filter = %filter, "removed the clsact filter");
    }
    match crate::netfilter_keeper::release() {
        Ok(true) => tracing::info!(
            table = crate::netfilter_keeper::TABLE,
            "removed the conntrack keeper table"
        ),
        Ok(false) => {}
        Err(e) => tracing::debug!(error = %e, "cannot check for the conntrack keeper table"),
    }
    for path in &removed {
        tracing::info!(path = %path.display(), "removed");
    }
    tracing::info!(
        count = removed.len(),
        "cleanup done: lb's programs are detached and its maps released"
    );
    Ok(())
}

/// Polls until [`kube_proxy_answers`]; logs what it sees every 10 s.
fn wait_for_kube_proxy(addr: SocketAddr) {
    let started = Instant::now();
    let mut last_log: Option<Instant> = None;
    loop {
        let seen = kube_proxy_answers(addr);
        if seen.is_ok() {
            tracing::info!(%addr, waited_s = started.elapsed().as_secs(), "kube-proxy is serving this node");
            return;
        }
        if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            last_log = Some(Instant::now());
            tracing::info!(%addr, seen = %seen.err().unwrap_or_default(), "waiting for kube-proxy before removing lb from this node");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Whether `GET /healthz` at `addr` is kube-proxy's healthy answer: status 200 and its JSON (`lastUpdated`,
/// `currentTime`), which lb's own health server does not write.
pub fn kube_proxy_answers(addr: SocketAddr) -> Result<(), String> {
    let response = http_get(addr, "/healthz").map_err(|e| format!("no answer ({e})"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answered {status:?}"));
    }
    let json: serde_json::Value = serde_json::from_str(body.trim())
        .map_err(|_| format!("not kube-proxy's answer: {body:?}"))?;
    if json.get("lastUpdated").is_none() || json.get("currentTime").is_none() {
        return Err(format!(
            "not kube-proxy's answer (lb's own?): {}",
            body.trim()
        ));
    }
    Ok(())
}

/// One HTTP/1.0 GET (the server closes the connection after its answer), bounded to 2 s.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    stream.take(64 * 1024).read_to_string(&mut out)?;
    Ok(out)
}
