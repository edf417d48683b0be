//! A minimal HTTP/1.1 responder for the agent's operational endpoints (`/healthz`, `/readyz`, `/metrics`, the
//! `healthCheckNodePort` servers, and `lb-agent status` on a Unix socket). They answer small GETs from kubelet probes, Prometheus and cloud load balancer
//! health checkers; one request per connection (`Connection: close`) is all those clients need, so a hand-written
//! responder on tokio keeps a full HTTP stack (and its compile time) out of the agent.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

/// A response: status, content type, body and extra headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: body.into(),
        }
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            400 => "Bad Request",
            503 => "Service Unavailable",
            _ => "",
        }
    }

    fn encode(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason(),
            self.content_type,
            self.body.len()
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        if !head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

/// Answers a request path (query string removed).
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// Largest request head read; probes and scrapers send a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;
/// A client that does not finish its request in this time is dropped, so stuck connections cannot pile up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `listener` until `stop` turns true (or its sender is dropped).
pub async fn serve(listener: TcpListener, handler: Handler, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, handler)).await;
                    });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
    }
}

/// Serves `listener` (a Unix socket) until `stop` turns true, to root and to the process's own user only: the
/// socket may be abstract, which file permissions cannot guard.
pub async fn serve_unix(listener: UnixListener, handler: Handler, mut stop: watch::Receiver<bool>) {
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let allowed = stream.peer_cred().is_ok_and(|c| c.uid() == 0 || c.uid() == own);
                    let handler: Handler = if allowed {
                        handler.clone()
                    } else {
                        Arc::new(|_| Response::text(403, "root only\n"))
                    };
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, handler)).await;
                    });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
    }
}

async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    handler: Handler,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HEAD {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let (response, head_only) = route(&head, &handler);
    stream.write_all(&response.encode(head_only)).await?;
    stream.shutdown().await
}

/// Parses the request line and calls the handler: GET and HEAD only.
fn route(head: &str, handler: &Handler) -> (Response, bool) {
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return (Response::text(400, "bad request\n"), false);
    };
    let path = target.split('?').next().unwrap_or_default();
    match method {
        "GET" => (handler(path), false),
        "HEAD" => (handler(path), true),
        _ => (Response::text(405, "only GET and HEAD\n"), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_get_and_head_and_refuses_the_rest() {
        let handler: Handler = Arc::new(|path| Response::text(200, path.to_owned()));
        let (r, head) = route("GET /healthz?verbose HTTP/1.1\r\nHost: x\r\n\r\n", &handler);
        assert_eq!((r.status, r.body.as_str(), head), (200, "/healthz", false));
        let (r, head) = route("HEAD /metrics HTTP/1.1\r\n\r\n", &handler);
        assert_eq!((r.status, head), (200, true));
        assert_eq!(route("POST / HTTP/1.1\r\n\r\n", &handler).0.status, 405);
        assert_eq!(route("\r\n", &handler).0.status, 400);
    }

    #[test]
    fn encodes_headers_and_length() {
        let mut r = Response::text(503, "no\n");
        r.headers.push(("X-Test", "1".into()));
        let s = String::from_utf8(r.encode(false)).expect("utf-8");
        assert!(s.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{s}");
        assert!(
            s.contains("Content-Length: 3\r\n") && s.contains("X-Test: 1\r\n"),
            "{s}"
        );
        assert!(s.ends_with("\r\n\r\nno\n"), "{s}");
        assert!(
            String::from_utf8(r.encode(true))
                .expect("utf-8")
                .ends_with("\r\n\r\n")
        );
    }
}
