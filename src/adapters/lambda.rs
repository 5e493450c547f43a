//! The AWS Lambda adapter (feature `lambda`, binary `dockside-lambda`): `lambda_http`'s request
//! goes to [`crate::Registry::handle`], the core's response comes back, on the stores every
//! instance shares (a function keeps nothing between invocations): keys in Valkey/Redis
//! (ElastiCache, a hosted Valkey), blobs in an S3 bucket, both opened by
//! [`crate::adapters::remote`] as `dockside serve` opens them.
//!
//! Lambda caps what one invocation carries, so this adapter only picks settings that keep the
//! core inside those caps (README, "AWS Lambda"):
//!
//! - requests: about 6 MB of event, in which a binary body travels base64-encoded (4/3 larger).
//!   `OCI-Chunk-Max-Length` defaults to [`MAX_CHUNK_BYTES`] (4 MiB), so clients chunk their
//!   pushes below it (the core answers 413 to a larger chunk), and `OCI-Chunk-Min-Length` to the
//!   same (S3's 5 MiB part would exceed it; smaller parts are regrouped by the S3 host).
//! - responses, [`ResponseMode::Stream`] (function URL with `InvokeMode: RESPONSE_STREAM`): the
//!   core's body streams as it comes from S3, up to the streamed cap (20 MB); blob answers of
//!   at least [`STREAM_REDIRECT_MIN_BYTES`] (16 MiB) are 307 redirects to presigned S3 URLs.
//! - responses, [`ResponseMode::Buffered`] (API Gateway, or a function URL in `BUFFERED` mode):
//!   the answer is collected and returned whole (6 MB, base64 again), so blob answers of at
//!   least [`BUFFERED_REDIRECT_MIN_BYTES`] (4 MiB) are redirected.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use lambda_http::request::RequestContext;
use lambda_http::{RequestExt, service_fn};

use crate::adapters::remote;
use crate::adapters::server::{ServedRegistry, ServerBlobs, ServerKv};
use crate::error::{Error, ErrorCode};
use crate::observe::AccessRecord;
use crate::{ClientAddr, Config, Registry};

/// Default `OCI-Chunk-Max-Length`: 4 MiB, 5.6 MB once base64-encoded in the event, under
/// Lambda's 6 MB (6,291,456 bytes) invocation payload with room for the headers.
pub const MAX_CHUNK_BYTES: u64 = 4 * 1024 * 1024;
/// Streamed responses: blob answers this long or longer are redirected (the streamed cap is
/// 20 MB; a margin for the platform's own framing).
pub const STREAM_REDIRECT_MIN_BYTES: u64 = 16 * 1024 * 1024;
/// Buffered responses: blob answers this long or longer are redirected (6 MB of response
/// payload, in which binary bodies travel base64-encoded: 4.5 MB of bytes).
pub const BUFFERED_REDIRECT_MIN_BYTES: u64 = 4 * 1024 * 1024;
/// How long a presigned redirect stays valid unless `DOCKSIDE_BLOB_REDIRECT` says otherwise.
pub const DEFAULT_REDIRECT_SECS: u64 = 300;

/// Runtime loops in a row that may fail without serving an invocation before the function
/// gives up (each after a 50 ms pause).
pub const MAX_IDLE_RESTARTS: u32 = 5;

/// How the function's answers leave it (`DOCKSIDE_LAMBDA_RESPONSE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseMode {
    /// `stream` (the default): Lambda response streaming, for a function URL whose invoke mode
    /// is `RESPONSE_STREAM`.
    Stream,
    /// `buffered`: the whole answer in one payload, for API Gateway or a `BUFFERED` function
    /// URL.
    Buffered,
}

/// What the function runs with, read from its environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: ResponseMode,
    /// `DOCKSIDE_KV`: `redis://...` (or `rediss://`, `unix://`).
    pub kv: String,
    /// `DOCKSIDE_KV_PREFIX`.
    pub kv_prefix: String,
    /// `DOCKSIDE_BLOBS`: `s3://BUCKET[/PREFIX]?endpoint=...`.
    pub blobs: String,
    pub config: Config,
}

impl Settings {
    /// The settings from `DOCKSIDE_*` variables looked up with `get`: the same names and
    /// meanings as `dockside serve`'s (`Config::from_settings`), `DOCKSIDE_KV`, `DOCKSIDE_KV_PREFIX`
    /// and `DOCKSIDE_BLOBS` (required: a function has no disk that outlives it), plus
    /// `DOCKSIDE_LAMBDA_RESPONSE` (`stream` or `buffered`). Defaults keep requests and responses
    /// within Lambda's caps (module documentation); set values are taken as they are.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Settings, String> {
        let set = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let mode = match set("DOCKSIDE_LAMBDA_RESPONSE").as_deref().map(str::trim) {
            None | Some("stream") => ResponseMode::Stream,
            Some("buffered") => ResponseMode::Buffered,
            Some(other) => {
                return Err(format!(
                    "DOCKSIDE_LAMBDA_RESPONSE must be `stream` or `buffered`, not {other:?}"
                ));
            }
        };
        let kv = set("DOCKSIDE_KV").ok_or(
            "DOCKSIDE_KV is not set: a Lambda function keeps its keys in Valkey/Redis \
             (redis://HOST:PORT)",
        )?;
        if !remote::is_redis_url(&kv) {
            return Err(format!(
                "DOCKSIDE_KV {:?}: the Lambda function's key-value store is a redis:// URL",
                crate::hosts::redis::redact(&kv)
            ));
        }
        let blobs = set("DOCKSIDE_BLOBS").ok_or(
            "DOCKSIDE_BLOBS is not set: a Lambda function keeps its blobs in S3 \
             (s3://BUCKET?endpoint=...)",
        )?;
        if !blobs.starts_with("s3://") {
            return Err(format!(
                "DOCKSIDE_BLOBS {blobs:?}: the Lambda function's blob store is an s3:// URL"
            ));
        }
        let mut config = Config::from_settings(&get)?;
        let max_chunk = *config.max_chunk_bytes.get_or_insert(MAX_CHUNK_BYTES);
        config.chunk_min_length.get_or_insert(max_chunk);
        if set("DOCKSIDE_BLOB_REDIRECT").is_none() {
            config.blob_redirect = Some(Duration::from_secs(DEFAULT_REDIRECT_SECS));
        }
        if set("DOCKSIDE_BLOB_REDIRECT_MIN_BYTES").is_none() {
            config.blob_redirect_min_bytes = match mode {
                ResponseMode::Stream => STREAM_REDIRECT_MIN_BYTES,
                ResponseMode::Buffered => BUFFERED_REDIRECT_MIN_BYTES,
            };
        }
        // The request body is in the event already: nothing is left to drain.
        config.drain_limit = 0;
        Ok(Settings {
            mode,
            kv,
            kv_prefix: set("DOCKSIDE_KV_PREFIX")
                .unwrap_or_else(|| crate::hosts::redis::DEFAULT_PREFIX.to_owned()),
            blobs,
            config,
        })
    }

    /// Opens and checks both stores (once per instance, at its cold start).
    pub async fn open(self) -> Result<ServedRegistry, String> {
        let kv = remote::open_redis(&self.kv, &self.kv_prefix).await?;
        let blobs = remote::open_s3(&self.blobs, |k| std::env::var(k).ok()).await?;
        Ok(Registry::new(
            ServerKv::from(kv),
            ServerBlobs::from(blobs),
            self.config,
        ))
    }
}

/// Serves invocations, streamed or buffered as `mode` says. The runtime's loop ends at its
/// first failure to talk to the Runtime API (a pooled connection the API closed, seen under
/// `cargo lambda watch` after streamed answers): it is started again on the same stores rather
/// than ending the instance, which would cost a cold start; after [`MAX_IDLE_RESTARTS`] loops in
/// a row that failed before serving anything (no Runtime API at all), the function ends with
/// the error.
pub async fn run(registry: ServedRegistry, mode: ResponseMode) -> Result<(), lambda_http::Error> {
    let registry = Arc::new(registry);
    let served = Arc::new(AtomicU64::new(0));
    let mut idle_failures = 0;
    loop {
        let before = served.load(Ordering::Relaxed);
        let registry = registry.clone();
        let count = served.clone();
        // A panic inside lambda_runtime's loop (1.5.0 panics when a `/next` answer lacks its
        // request-id header: `cargo lambda watch` answers a `/next` that waited past its
        // `--timeout` with a bare 408) ends this loop, not the function: it is caught here and
        // the loop started again below. (It needs `panic = "unwind"`: see Cargo.toml.)
        let mut looping = std::pin::pin!(async move {
            match mode {
                ResponseMode::Stream => {
                    lambda_http::run_with_streaming_response(service_fn(move |req| {
                        let registry = registry.clone();
                        count.fetch_add(1, Ordering::Relaxed);
                        async move {
                            let access = Access::of(&req);
                            let resp = registry.handle(to_core(req)).await;
                            access.log(&resp);
                            Ok::<_, lambda_http::Error>(resp)
                        }
                    }))
                    .await
                }
                ResponseMode::Buffered => {
                    lambda_http::run(service_fn(move |req| {
                        let registry = registry.clone();
                        count.fetch_add(1, Ordering::Relaxed);
                        async move {
                            let access = Access::of(&req);
                            let resp = buffered(registry.handle(to_core(req)).await).await;
                            access.log(&resp);
                            Ok::<_, lambda_http::Error>(resp)
                        }
                    }))
                    .await
                }
            }
        });
        let ended = std::future::poll_fn(|cx| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| looping.as_mut().poll(cx)))
                .unwrap_or_else(|_| {
                    std::task::Poll::Ready(Err("the Runtime API loop panicked".into()))
                })
        })
        .await;
        match ended {
            Ok(()) => return Ok(()),
            Err(e) => {
                idle_failures = match served.load(Ordering::Relaxed) == before {
                    true => idle_failures + 1,
                    false => 1,
                };
                if idle_failures > MAX_IDLE_RESTARTS {
                    return Err(e);
                }
                tracing::warn!("the Runtime API loop failed ({e}); starting it again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What the access record needs of a request, taken before the core consumes it.
struct Access {
    start: std::time::Instant,
    method: http::Method,
    path: String,
    headers: http::HeaderMap,
}

impl Access {
    fn of(req: &lambda_http::Request) -> Access {
        Access {
            start: std::time::Instant::now(),
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            headers: req.headers().clone(),
        }
    }

    /// One JSON line on stderr per invocation (route class, status, latency, bytes, failures),
    /// as the components write theirs: CloudWatch keeps stderr, and it is the function's
    /// metrics. Buffered answers are timed once collected.
    fn log<B>(&self, resp: &http::Response<B>) {
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        eprintln!(
            "{}",
            AccessRecord::of(&self.method, &self.path, &self.headers, resp, ms).to_json()
        );
    }
}

/// The event's request as the core takes it: it is an `http::Request` already, its body in
/// memory; the client's address, from the event's context, goes where the core looks for it
/// (failed-login limits).
fn to_core(mut req: lambda_http::Request) -> lambda_http::Request {
    let source_ip = match req.request_context_ref() {
        Some(RequestContext::ApiGatewayV2(c)) => c.http.source_ip.clone(),
        Some(RequestContext::ApiGatewayV1(c)) => c.identity.source_ip.clone(),
        _ => None,
    };
    if let Some(ip) = source_ip.and_then(|ip| ip.parse().ok()) {
        req.extensions_mut().insert(ClientAddr(ip));
    }
    req
}

/// A whole answer for a buffered invocation. A blob that fails halfway cannot be answered with
/// its headers any more: it becomes a 503 with the spec's envelope (the client retries).
async fn buffered<B>(resp: http::Response<B>) -> http::Response<lambda_http::Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let (parts, body) = resp.into_parts();
    match body.collect().await {
        Ok(bytes) => {
            let bytes = bytes.to_bytes();
            let body = if bytes.is_empty() {
                lambda_http::Body::Empty
            } else {
                lambda_http::Body::Binary(bytes.to_vec())
            };
            http::Response::from_parts(parts, body)
        }
        Err(e) => {
            tracing::error!("reading the answer to buffer it: {e}");
            let err = Error::new(
                ErrorCode::Unknown,
                StatusCode::SERVICE_UNAVAILABLE,
                "the store failed while the answer was read; try again",
            );
            let mut resp = http::Response::new(lambda_http::Body::Binary(err.to_json()));
            *resp.status_mut() = err.status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
    }
}
