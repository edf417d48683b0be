//! The API client's request metrics under client-go's names and labels, so dashboards built for kube-proxy (the
//! kubernetes-mixin "Kube API Request Rate" and request latency panels) read lb's as they read kube-proxy's:
//!
//! - `rest_client_requests_total{code, host, method}`: every request, by HTTP status code (`<error>` when no
//!   response came back: refused, reset, timed out), as client-go's `requestResult`;
//! - `rest_client_request_duration_seconds{verb, host}`: from the request to its response headers (a watch counts
//!   until its stream opens, as in client-go), with client-go's buckets.
//!
//! A tower layer around kube-rs's HTTP stack measures every request the client makes (lists, watches, and
//! anything a one-shot command asks), so nothing in the watchers has to remember to count.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// client-go's `rest_client_request_duration_seconds` buckets (k8s.io/client-go/tools/metrics, component-base).
const DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub code: String,
    pub host: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    pub verb: String,
    pub host: String,
}

type HistogramFamily = Family<VerbLabels, Histogram, fn() -> Histogram>;

/// The request counters, shared between the client's layer (writer) and the metrics registry (reader).
#[derive(Clone, Debug)]
pub struct ApiMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: HistogramFamily,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
        }
    }
}

impl ApiMetrics {
    /// Records one finished request: its method, and its status code or `None` when it failed without one.
    pub fn record(&self, host: &str, method: &str, status: Option<u16>, seconds: f64) {
        let code = status.map_or_else(|| "<error>".to_owned(), |s| s.to_string());
        self.requests
            .get_or_create(&RequestLabels {
                code,
                host: host.to_owned(),
                method: method.to_owned(),
            })
            .inc();
        self.duration
            .get_or_create(&VerbLabels {
                verb: method.to_owned(),
                host: host.to_owned(),
            })
            .observe(seconds);
    }
}

/// The tower layer kube-rs's `ClientBuilder::with_layer` takes.
#[derive(Clone, Debug)]
pub struct ApiMetricsLayer {
    metrics: Arc<ApiMetrics>,
    /// `host:port` of the API server, client-go's `host` label.
    host: Arc<str>,
}

impl ApiMetricsLayer {
    pub fn new(metrics: Arc<ApiMetrics>, host: &str) -> Self {
        ApiMetricsLayer {
            metrics,
            host: host.into(),
        }
    }
}

impl<S> tower_layer::Layer<S> for ApiMetricsLayer {
    type Service = Measured<S>;

    fn layer(&self, inner: S) -> Measured<S> {
        Measured {
            inner,
            metrics: self.metrics.clone(),
            host: self.host.clone(),
        }
    }
}

/// The client's HTTP service with every request measured.
#[derive(Clone, Debug)]
pub struct Measured<S> {
    inner: S,
    metrics: Arc<ApiMetrics>,
    host: Arc<str>,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Measured<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.method().as_str().to_owned();
        let started = Instant::now();
        let response = self.inner.call(request);
        let metrics = self.metrics.clone();
        let host = self.host.clone();
        Box::pin(async move {
            let result = response.await;
            let status = result.as_ref().ok().map(|r| r.status().as_u16());
            metrics.record(&host, &method, status, started.elapsed().as_secs_f64());
            result
        })
    }
}

/// client-go's `host` label: the server URL's `host:port` (the scheme's default port when it names none).
pub fn host_label(url: &http::Uri) -> String {
    let host = url.host().unwrap_or_default();
    let default_port = if url.scheme_str() == Some("http") {
        80
    } else {
        443
    };
    let port = url.port_u16().unwrap_or(default_port);
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_service::Service as _;

    /// A service answering every request with `status` (or failing when `None`).
    #[derive(Clone)]
    struct Answer(Option<u16>);

    impl tower_service::Service<http::Request<()>> for Answer {
        type Response = http::Response<()>;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<http::Response<()>, std::io::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            std::future::ready(match self.0 {
                Some(s) => Ok(http::Response::builder()
                    .status(s)
                    .body(())
                    .expect("response")),
                None => Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            })
        }
    }

    #[tokio::test]
    async fn every_request_is_counted_by_code_and_timed_by_verb() {
        let metrics = Arc::new(ApiMetrics::default());
        let layer = ApiMetricsLayer::new(metrics.clone(), "10.96.0.1:443");
        for answer in [Some(200), Some(200), Some(410), None] {
            let mut svc = tower_layer::Layer::layer(&layer, Answer(answer));
            let request = http::Request::get("/api/v1/services")
                .body(())
                .expect("req");
            let _ = svc.call(request).await;
        }
        let count = |code: &str| {
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    code: code.into(),
                    host: "10.96.0.1:443".into(),
                    method: "GET".into(),
                })
                .get()
        };
        assert_eq!((count("200"), count("410"), count("<error>")), (2, 1, 1));
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register(
            "rest_client_request_duration_seconds",
            "",
            metrics.duration.clone(),
        );
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(
                r#"rest_client_request_duration_seconds_count{verb="GET",host="10.96.0.1:443"} 4"#
            ),
            "{text}"
        );
    }

    #[test]
    fn the_host_label_is_host_and_port() {
        let uri = |s: &str| s.parse::<http::Uri>().expect("uri");
        assert_eq!(host_label(&uri("https://10.96.0.1")), "10.96.0.1:443");
        assert_eq!(host_label(&uri("http://127.0.0.1:6443/")), "127.0.0.1:6443");
        assert_eq!(host_label(&uri("https://[fd00::1]:6443")), "[fd00::1]:6443");
    }
}
