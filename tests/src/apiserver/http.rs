//! The list/watch protocol over HTTP/1.1, as kube-rs's watcher speaks it:
//! - `GET /api/v1/services?labelSelector=..&fieldSelector=..&limit=500&resourceVersion=0`: a `ServiceList` whose
//!   `metadata.resourceVersion` is the version the list is consistent at (items without apiVersion/kind, as the
//!   real server sends them);
//! - `GET ...?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=290`: a chunked stream of
//!   newline-delimited `{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": ...}` events after N; a
//!   compacted N gets one `ERROR` event carrying a `Status` with code 410 (HTTP 200, like the real server).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::Shared;
use super::store::{Event, Resource, Selector};

pub type Body = BoxBody<Bytes, Infallible>;

/// How often a watch that asked for bookmarks gets one (the real server sends them about once a minute; tests want
/// the path exercised within their run).
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = parse_query(req.uri().query().unwrap_or_default());
    let param = |k: &str| {
        query
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let Some((resource, namespace)) = route(&path) else {
        return Ok(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route for {path}"),
        ));
    };
    let selector = match Selector::parse(param("labelSelector"), param("fieldSelector")) {
        Ok(s) => s,
        Err(e) => return Ok(status(StatusCode::BAD_REQUEST, "BadRequest", &e)),
    };
    let watch = matches!(param("watch"), Some("true" | "1"));
    shared.record(resource, watch, req.uri().query().unwrap_or_default());
    if watch {
        let rv = param("resourceVersion").unwrap_or_default().to_owned();
        let bookmarks = param("allowWatchBookmarks") == Some("true");
        let timeout = param("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(Duration::from_secs(1800), Duration::from_secs);
        Ok(watch_response(
            shared, resource, namespace, selector, &rv, bookmarks, timeout,
        ))
    } else {
        // A held resource answers its lists only when released: how a test delays one kind's initial list.
        let mut held = shared.held.subscribe();
        let _ = held.wait_for(|h| !h.contains(&resource)).await;
        let (rv, items) = shared
            .lock()
            .list(resource, namespace.as_deref(), &selector);
        let items: Vec<Value> = items
            .into_iter()
            .map(|mut o| {
                if let Some(m) = o.as_object_mut() {
                    m.remove("apiVersion");
                    m.remove("kind");
                }
                o
            })
            .collect();
        let body = json!({
            "apiVersion": resource.api_version(),
            "kind": format!("{}List", resource.kind()),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        });
        Ok(json_response(StatusCode::OK, &body))
    }
}

/// `/api/v1/services`, `/api/v1/namespaces/<ns>/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
/// `/apis/networking.k8s.io/v1/servicecidrs`, ...
fn route(path: &str) -> Option<(Resource, Option<String>)> {
    let (api_version, rest) = [
        ("v1", "/api/v1/"),
        ("discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1/"),
        ("networking.k8s.io/v1", "/apis/networking.k8s.io/v1/"),
    ]
    .into_iter()
    .find_map(|(v, prefix)| Some((v, path.strip_prefix(prefix)?)))?;
    let (namespace, plural) = match rest.strip_prefix("namespaces/") {
        Some(r) => {
            let (ns, plural) = r.split_once('/')?;
            (Some(ns.to_owned()), plural)
        }
        None => (None, rest),
    };
    let resource = Resource::ALL
        .into_iter()
        .find(|r| r.plural() == plural && r.api_version() == api_version)?;
    if namespace.is_some() && !resource.namespaced() {
        return None;
    }
    Some((resource, namespace))
}

fn watch_response(
    shared: Arc<Shared>,
    resource: Resource,
    namespace: Option<String>,
    selector: Selector,
    rv: &str,
    bookmarks: bool,
    timeout: Duration,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    // Subscribing and reading the history under one lock: no event falls between the two.
    let (backlog, mut live, mut disconnect, start_rv) = {
        let store = shared.lock();
        let live = shared.events.subscribe();
        let disconnect = shared.disconnect.subscribe();
        let start = match rv.parse::<u64>() {
            // "" or "0": start from the current state, sending it as ADDED (the "any" semantic).
            Ok(0) | Err(_) => {
                let (now, items) = store.list(resource, namespace.as_deref(), &selector);
                Ok((
                    items
                        .into_iter()
                        .map(|o| line("ADDED", &o))
                        .collect::<Vec<_>>(),
                    now,
                ))
            }
            Ok(n) => store.since(resource, n).map(|events| {
                let lines = events
                    .iter()
                    .filter(|e| in_namespace(e, namespace.as_deref()))
                    .filter_map(|e| e.for_watcher(&selector))
                    .map(|(ty, o)| line(ty.as_str(), o))
                    .collect();
                (lines, store.resource_version())
            }),
        };
        (start, live, disconnect, store.resource_version())
    };
    tokio::spawn(async move {
        let (lines, mut last_rv) = match backlog {
            Ok(b) => b,
            Err(gone) => {
                // The real server answers a watch from a compacted version with HTTP 200 and one ERROR event.
                let status = json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {} ({})", gone.requested, gone.oldest),
                    "reason": "Expired", "code": 410,
                });
                let _ = tx.send(line("ERROR", &status)).await;
                return;
            }
        };
        for l in lines {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        last_rv = last_rv.max(start_rv);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(BOOKMARK_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                // A disconnect wins over events queued after it: a closed stream delivers nothing more, so a test
                // that changes objects after `disconnect_watches` knows the client learns of them only by
                // resuming (or relisting).
                biased;
                _ = disconnect.changed() => return,
                ev = live.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= last_rv || ev.resource != resource || !in_namespace(&ev, namespace.as_deref()) {
                            continue;
                        }
                        last_rv = ev.rv;
                        if let Some((ty, o)) = ev.for_watcher(&selector)
                            && tx.send(line(ty.as_str(), o)).await.is_err()
                        {
                            return;
                        }
                    }
                    // Fell behind or the server is stopping: end the stream; the client resumes or relists.
                    Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let bookmark = json!({
                        "kind": resource.kind(), "apiVersion": resource.api_version(),
                        "metadata": {"resourceVersion": last_rv.to_string()},
                    });
                    if tx.send(line("BOOKMARK", &bookmark)).await.is_err() {
                        return;
                    }
                }
                _ = &mut deadline => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn in_namespace(ev: &Event, namespace: Option<&str>) -> bool {
    namespace.is_none_or(|ns| {
        ev.object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            == Some(ns)
    })
}

fn line(ty: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": ty, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

/// `a=1&b=x%2Fy` to pairs, percent-decoded (`+` is a space in query strings).
fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_queries_parse_as_kube_rs_sends_them() {
        assert_eq!(route("/api/v1/services"), Some((Resource::Services, None)));
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/ns1/endpointslices"),
            Some((Resource::EndpointSlices, Some("ns1".into())))
        );
        assert_eq!(route("/api/v1/endpointslices"), None);
        assert_eq!(
            route("/apis/networking.k8s.io/v1/servicecidrs"),
            Some((Resource::ServiceCidrs, None))
        );
        assert_eq!(
            route("/apis/networking.k8s.io/v1/namespaces/x/servicecidrs"),
            None
        );
        assert_eq!(route("/api/v1/namespaces/x/nodes"), None);
        let q = parse_query(
            "&watch=true&labelSelector=kubernetes.io%2Fservice-name&fieldSelector=metadata.name%3Dn1",
        );
        assert_eq!(
            q,
            [
                ("watch".into(), "true".into()),
                ("labelSelector".into(), "kubernetes.io/service-name".into()),
                ("fieldSelector".into(), "metadata.name=n1".into()),
            ]
        );
    }
}
