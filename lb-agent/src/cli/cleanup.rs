use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::datapath::loader::{PinDir, cleanup};

use super::args::PinArgs;

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
    // One write: `write!` on a bare stream is several, and a server that answers after the first and closes would
    // fail the rest with EPIPE.
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    stream.take(64 * 1024).read_to_string(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves `response` to one connection on 127.0.0.1 and returns the address.
    fn one_answer(response: String) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                // Reads the whole request head before answering, as an HTTP server does.
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(response.as_bytes());
            }
        });
        addr
    }

    fn http(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn only_kube_proxys_healthy_answer_counts() {
        // kube-proxy's /healthz (pkg/proxy/healthcheck): 200 with lastUpdated and currentTime.
        let kube_proxy = r#"{"lastUpdated": "2026-12-07 18:00:00.1 +0000 UTC m=+1.0","currentTime": "2026-12-07 18:00:01.2 +0000 UTC m=+2.0", "nodeEligible": true}"#;
        assert_eq!(
            kube_proxy_answers(one_answer(http("200 OK", kube_proxy))),
            Ok(())
        );
        let unhealthy = kube_proxy_answers(one_answer(http("503 Service Unavailable", kube_proxy)));
        assert!(unhealthy.is_err(), "{unhealthy:?}");
        // lb's own health server on the same port must not pass for kube-proxy.
        let state = crate::ops::health::HealthState::default();
        state.set_ready();
        let lb = state.handle("/healthz");
        assert_eq!(lb.status, 200);
        let lb_answer = kube_proxy_answers(one_answer(http("200 OK", &lb.body)));
        assert!(
            lb_answer
                .as_ref()
                .is_err_and(|e| e.contains("not kube-proxy's answer")),
            "{lb_answer:?}"
        );
        // Nothing listening.
        let closed = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        assert!(kube_proxy_answers(closed).is_err());
    }
}
