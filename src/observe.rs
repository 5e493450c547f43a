//! What the core tells adapters about each request, so that they can count and log it without
//! knowing the routes: the request's [`RouteClass`], and an [`Outcome`] put on every response
//! as an extension (store failure, authentication failure). Also the request id every
//! response carries in `X-Request-Id`, and the one-line JSON access record the components
//! write to stderr where nothing scrapes metrics.
//!
//! No exporter and no runtime here: the native adapter turns these into Prometheus metrics,
//! the components into log lines.

use http::{HeaderMap, Method};

/// The response header carrying the request id (and the request header honoured when sane).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest request id accepted from a client; longer ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// What kind of request this is, for metrics: few enough values to be a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteClass {
    /// `GET /v2/`: the API version check (and where clients learn about authentication).
    Base,
    BlobGet,
    BlobDelete,
    /// Everything under `/blobs/uploads/`: start, PATCH, status, close, cancel.
    BlobUpload,
    ManifestGet,
    ManifestPut,
    ManifestDelete,
    Tags,
    Catalog,
    Referrers,
    Token,
    /// `/live`, `/ready`, `/healthz`.
    Probe,
    /// Anything else (unknown paths, `/metrics` when an adapter serves it itself).
    Other,
}

impl RouteClass {
    /// Every class, for adapters that want all label values present from the start.
    pub const ALL: [RouteClass; 13] = [
        RouteClass::Base,
        RouteClass::BlobGet,
        RouteClass::BlobDelete,
        RouteClass::BlobUpload,
        RouteClass::ManifestGet,
        RouteClass::ManifestPut,
        RouteClass::ManifestDelete,
        RouteClass::Tags,
        RouteClass::Catalog,
        RouteClass::Referrers,
        RouteClass::Token,
        RouteClass::Probe,
        RouteClass::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteClass::Base => "base",
            RouteClass::BlobGet => "blob_get",
            RouteClass::BlobDelete => "blob_delete",
            RouteClass::BlobUpload => "blob_upload",
            RouteClass::ManifestGet => "manifest_get",
            RouteClass::ManifestPut => "manifest_put",
            RouteClass::ManifestDelete => "manifest_delete",
            RouteClass::Tags => "tags",
            RouteClass::Catalog => "catalog",
            RouteClass::Referrers => "referrers",
            RouteClass::Token => "token",
            RouteClass::Probe => "probe",
            RouteClass::Other => "other",
        }
    }

    /// The class of a request as the router reads its path (from the end, since names contain
    /// `/`), without validating the name or digest: a request refused for a bad name still
    /// counts under the route it aimed at. `/token` is `Token` whether or not access control
    /// is on. Cheap, so adapters may call it when a request starts (in-flight gauges).
    pub fn of(method: &Method, path: &str) -> RouteClass {
        match path {
            "/token" => return RouteClass::Token,
            "/live" | "/ready" | "/healthz" => return RouteClass::Probe,
            "/v2" | "/v2/" => return RouteClass::Base,
            "/v2/_catalog" => return RouteClass::Catalog,
            _ => {}
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return RouteClass::Other;
        };
        let segs: Vec<&str> = rest.split('/').collect();
        let n = segs.len();
        let last = |i: usize| segs[n - i];
        if (n >= 4 && last(3) == "blobs" && last(2) == "uploads")
            || (n >= 3 && last(2) == "blobs" && last(1) == "uploads")
        {
            return RouteClass::BlobUpload;
        }
        if n < 3 {
            return RouteClass::Other;
        }
        match (last(2), last(1)) {
            ("tags", "list") => RouteClass::Tags,
            ("referrers", _) => RouteClass::Referrers,
            ("manifests", _) => match *method {
                Method::PUT => RouteClass::ManifestPut,
                Method::DELETE => RouteClass::ManifestDelete,
                _ => RouteClass::ManifestGet,
            },
            ("blobs", _) => match *method {
                Method::DELETE => RouteClass::BlobDelete,
                _ => RouteClass::BlobGet,
            },
            _ => RouteClass::Other,
        }
    }
}

/// Why authentication or authorization refused a request, when it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// 401 to a request that carried credentials (a wrong password, a bad or expired token):
    /// what password guessing looks like. A 401 challenge to an anonymous request is not one.
    BadCredentials,
    /// 403: valid credentials without the access asked for.
    Denied,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::BadCredentials => "bad_credentials",
            AuthFailure::Denied => "denied",
        }
    }
}

/// What happened to a request, as a response extension set by [`crate::Registry::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub class: RouteClass,
    /// The answer is a storage failure (500, 503 or 507 from a store). Failures while a body
    /// streams, after the status went out, are not seen here.
    pub store_error: bool,
    pub auth_failure: Option<AuthFailure>,
}

/// The request id to use: the client's `X-Request-Id` when it is sane (1 to
/// [`MAX_REQUEST_ID_LEN`] printable ASCII characters without spaces, quotes or backslashes, so
/// it cannot break a log line), else a fresh random one (16 hex digits).
pub fn request_id(headers: &HeaderMap) -> String {
    if let Some(v) = headers.get(REQUEST_ID_HEADER)
        && is_sane_request_id(v.as_bytes())
        && let Ok(s) = std::str::from_utf8(v.as_bytes())
    {
        return s.to_owned();
    }
    new_request_id()
}

fn is_sane_request_id(v: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&v.len())
        && v.iter()
            .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// 64 random bits in hex. Should randomness fail (it does not on any supported host), the
/// time in milliseconds still tells most requests apart.
pub fn new_request_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        b = crate::clock::now_millis().to_be_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One access record, for adapters that log a JSON line per request (the components: their
/// stderr is the only place metrics can go). The same counters as the native server's
/// `/metrics`: class, status, latency, bytes in and out, store and auth failures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub class: &'static str,
    pub status: u16,
    /// Milliseconds to the response headers.
    pub ms: f64,
    /// The request's `Content-Length`, when it sent one.
    pub bytes_in: Option<u64>,
    /// The response's `Content-Length`, when it has one.
    pub bytes_out: Option<u64>,
    pub store_error: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_failure: Option<&'static str>,
}

impl<'a> AccessRecord<'a> {
    /// The record of `resp`, an answer of [`crate::Registry::handle`] to a request with
    /// `method`, `path` and `req_headers`, `ms` after it arrived.
    pub fn of<B>(
        method: &'a Method,
        path: &'a str,
        req_headers: &HeaderMap,
        resp: &'a http::Response<B>,
        ms: f64,
    ) -> Self {
        let outcome = resp.extensions().get::<Outcome>().copied();
        let len = |h: &HeaderMap| {
            h.get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        };
        AccessRecord {
            request_id: resp
                .headers()
                .get(REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            method: method.as_str(),
            path,
            class: outcome
                .map_or(RouteClass::of(method, path), |o| o.class)
                .as_str(),
            status: resp.status().as_u16(),
            ms: (ms * 10.0).round() / 10.0,
            bytes_in: len(req_headers),
            bytes_out: len(resp.headers()),
            store_error: outcome.is_some_and(|o| o.store_error),
            auth_failure: outcome
                .and_then(|o| o.auth_failure)
                .map(AuthFailure::as_str),
        }
    }

    /// The record as one line of JSON (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let c = |m: Method, p: &str| RouteClass::of(&m, p);
        assert_eq!(c(Method::GET, "/v2/"), RouteClass::Base);
        assert_eq!(
            c(Method::GET, "/v2/a/b/blobs/sha256:00"),
            RouteClass::BlobGet
        );
        assert_eq!(c(Method::HEAD, "/v2/a/blobs/x"), RouteClass::BlobGet);
        assert_eq!(c(Method::DELETE, "/v2/a/blobs/x"), RouteClass::BlobDelete);
        assert_eq!(
            c(Method::POST, "/v2/a/blobs/uploads/"),
            RouteClass::BlobUpload
        );
        assert_eq!(
            c(Method::POST, "/v2/a/blobs/uploads"),
            RouteClass::BlobUpload
        );
        assert_eq!(
            c(Method::PATCH, "/v2/a/b/blobs/uploads/u"),
            RouteClass::BlobUpload
        );
        assert_eq!(c(Method::PUT, "/v2/a/manifests/t"), RouteClass::ManifestPut);
        assert_eq!(c(Method::GET, "/v2/a/manifests/t"), RouteClass::ManifestGet);
        assert_eq!(
            c(Method::DELETE, "/v2/a/manifests/t"),
            RouteClass::ManifestDelete
        );
        assert_eq!(c(Method::GET, "/v2/a/tags/list"), RouteClass::Tags);
        assert_eq!(
            c(Method::GET, "/v2/a/referrers/sha256:0"),
            RouteClass::Referrers
        );
        assert_eq!(c(Method::GET, "/v2/_catalog"), RouteClass::Catalog);
        assert_eq!(c(Method::GET, "/token"), RouteClass::Token);
        assert_eq!(c(Method::GET, "/ready"), RouteClass::Probe);
        assert_eq!(c(Method::GET, "/metrics"), RouteClass::Other);
        assert_eq!(c(Method::GET, "/v2/a"), RouteClass::Other);
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        let fresh = request_id(&h);
        assert_eq!(fresh.len(), 16);
        assert_ne!(fresh, request_id(&h));
        h.insert(REQUEST_ID_HEADER, "abc-123".parse().unwrap());
        assert_eq!(request_id(&h), "abc-123");
        for bad in ["has space", "quote\"", &"x".repeat(129)] {
            h.insert(REQUEST_ID_HEADER, bad.parse().unwrap());
            assert_ne!(request_id(&h), bad);
        }
    }
}
