//! Prometheus metrics of the native server (`prometheus-client`), served in the text format on
//! a listener of their own (`--metrics-listen`), never on the registry's port: a registry
//! exposed to the internet does not publish its traffic by accident.
//!
//! The core says what each request was ([`RouteClass`] from the path when it starts, the
//! [`Outcome`] extension on its response); this module only counts.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::observe::{Outcome, RouteClass};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    class: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 65 s, ×4 per bucket: a manifest GET to a multi-GB upload.
    Histogram::new(exponential_buckets(0.001, 4.0, 9))
}

/// Every metric of the server.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<ClassLabels, Histogram, fn() -> Histogram>,
    bytes_in: Family<ClassLabels, Counter>,
    bytes_out: Family<ClassLabels, Counter>,
    in_flight: Family<ClassLabels, Gauge>,
    uploads: Gauge,
    store_errors: Family<ClassLabels, Counter>,
    auth_failures: Family<ReasonLabels, Counter>,
    connections: Gauge,
    tls_failures: Counter,
    tls_reloads: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dockside");
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            in_flight: Family::default(),
            uploads: Gauge::default(),
            store_errors: Family::default(),
            auth_failures: Family::default(),
            connections: Gauge::default(),
            tls_failures: Counter::default(),
            tls_reloads: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "Requests answered, by route class and status",
            m.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's arrival to its response headers, by route class",
            m.duration.clone(),
        );
        registry.register(
            "http_request_body_bytes",
            "Request body bytes received, by route class",
            m.bytes_in.clone(),
        );
        registry.register(
            "http_response_body_bytes",
            "Response body bytes sent, by route class",
            m.bytes_out.clone(),
        );
        registry.register(
            "http_requests_in_flight",
            "Requests being handled, by route class",
            m.in_flight.clone(),
        );
        registry.register(
            "uploads_in_progress",
            "Upload requests (POST, PATCH, PUT of blobs/uploads) being handled",
            m.uploads.clone(),
        );
        registry.register(
            "store_errors",
            "Requests answered with a storage failure (500, 503 or 507), by route class",
            m.store_errors.clone(),
        );
        registry.register(
            "auth_failures",
            "Refused authentications: bad_credentials (401 to a request with credentials, or \
             from /token), denied (403)",
            m.auth_failures.clone(),
        );
        registry.register(
            "connections_open",
            "Client connections open",
            m.connections.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            m.tls_failures.clone(),
        );
        registry.register(
            "tls_certificate_reloads",
            "Certificates loaded again after their files changed or on SIGHUP",
            m.tls_reloads.clone(),
        );
        // Every class present from the start, so rates work from the first scrape.
        for class in RouteClass::ALL {
            let l = ClassLabels {
                class: class.as_str(),
            };
            let _ = m.in_flight.get_or_create(&l);
            let _ = m.bytes_in.get_or_create(&l);
            let _ = m.bytes_out.get_or_create(&l);
        }
        Metrics { registry, ..m }
    }

    /// The exposition, in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// A request of `class` starts: counted in flight until the returned guard drops.
    pub fn start(self: &Arc<Self>, class: RouteClass) -> InFlight {
        self.in_flight
            .get_or_create(&ClassLabels {
                class: class.as_str(),
            })
            .inc();
        if class == RouteClass::BlobUpload {
            self.uploads.inc();
        }
        InFlight {
            metrics: self.clone(),
            class,
        }
    }

    /// The counter of request body bytes for `class`.
    pub fn bytes_in(&self, class: RouteClass) -> Counter {
        self.bytes_in
            .get_or_create(&ClassLabels {
                class: class.as_str(),
            })
            .clone()
    }

    /// The counter of response body bytes for `class`.
    pub fn bytes_out(&self, class: RouteClass) -> Counter {
        self.bytes_out
            .get_or_create(&ClassLabels {
                class: class.as_str(),
            })
            .clone()
    }

    /// A response went out: its status, time to headers, and what the core said of it.
    pub fn answered(&self, outcome: Outcome, status: u16, secs: f64) {
        let class = outcome.class.as_str();
        self.requests
            .get_or_create(&RequestLabels { class, status })
            .inc();
        self.duration
            .get_or_create(&ClassLabels { class })
            .observe(secs);
        if outcome.store_error {
            self.store_errors
                .get_or_create(&ClassLabels { class })
                .inc();
        }
        if let Some(f) = outcome.auth_failure {
            self.auth_failures
                .get_or_create(&ReasonLabels { reason: f.as_str() })
                .inc();
        }
    }

    pub fn connection_opened(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.inc();
        ConnectionGuard(self.clone())
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_failures.inc();
    }

    pub fn tls_reloaded(&self) {
        self.tls_reloads.inc();
    }
}

/// Counts a request in flight while it lives.
pub struct InFlight {
    metrics: Arc<Metrics>,
    class: RouteClass,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics
            .in_flight
            .get_or_create(&ClassLabels {
                class: self.class.as_str(),
            })
            .dec();
        if self.class == RouteClass::BlobUpload {
            self.metrics.uploads.dec();
        }
    }
}

/// Counts an open connection while it lives.
pub struct ConnectionGuard(Arc<Metrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}

/// Adds to a counter, or to nothing (metrics off). Cheap to clone into a body.
#[derive(Clone, Default)]
pub struct ByteCounter(Option<Counter>);

impl ByteCounter {
    pub fn new(c: Option<Counter>) -> Self {
        ByteCounter(c)
    }

    pub fn add(&self, n: usize) {
        if let Some(c) = &self.0 {
            c.inc_by(n as u64);
        }
    }
}
