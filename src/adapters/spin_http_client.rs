//! The Spin component's outbound HTTP client ([`HttpClient`]): spin-sdk 6's `http::send`, that is
//! `wasi:http/client` of WASI 0.3 (rc-2026-03-15), which Spin 4 gives every component. What the S3
//! blob store sends its requests through when the Spin variable `blobs` names a bucket.
//!
//! Not `wasi_http_client.rs`: that one drives `wasi:http/outgoing-handler` 0.2 with the wasi:http
//! component's own blocking executor over `wasi:io/poll`, while the Spin component is a WASIp3
//! component whose futures run on spin-sdk's (wit-bindgen's) executor; mixing the two would
//! block it. What they share is the contract: transport failures are
//! [`StoreError::unavailable`] (retried by the S3 host with backoff), bodies stream, a response
//! body's `size_hint` is exact when it has a `Content-Length`.
//!
//! Spin sends only to hosts the manifest's `allowed_outbound_hosts` allows (in `spin.toml`,
//! the Spin variables `s3_endpoint`, `mirror_upstream`, `mirror_auth_host`,
//! `mirror_redirect_host`). A request to any other host fails with
//! `HttpRequestDenied`; that is a configuration error, printed to the component's stderr (Spin's
//! log) with what to set, and answered as a storage error (500).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use spin_sdk::wasip3::http::types::{ErrorCode, RequestOptions};
use spin_sdk::wasip3::http_compat::{IncomingResponseBody, RequestOptionsExtension};

use crate::error::StoreError;
use crate::http_client::{HttpClient, OutBody};

/// How long the host may take to connect, to send the response's first byte (a part copy
/// inside the store can take a while), and between two bytes of a body: the figures of the
/// native and wasi:http clients.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(120);
const BETWEEN_BYTES_TIMEOUT: Duration = Duration::from_secs(60);

/// The outbound client of the Spin component. Holds nothing: Spin pools connections.
#[derive(Clone, Copy, Default)]
pub(super) struct SpinClient;

impl HttpClient for SpinClient {
    type Body = SpinBody;

    async fn send(
        &self,
        mut req: http::Request<OutBody>,
    ) -> Result<http::Response<SpinBody>, StoreError> {
        let target = format!(
            "{} {}",
            req.method(),
            req.uri().authority().map_or("?", |a| a.as_str())
        );
        let no_body = req.method() == http::Method::HEAD;
        req.extensions_mut()
            .insert(RequestOptionsExtension(options()));
        // spin-sdk writes the body from a task of its own while the answer is awaited.
        let resp = spin_sdk::http::send(req)
            .await
            .map_err(|code| error(&target, code))?;
        let status = resp.status();
        let mut len = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        // A HEAD answer announces a length it does not send.
        if no_body || status == 204 || status == 304 {
            len = Some(0);
        }
        Ok(resp.map(|inner| SpinBody {
            inner,
            remaining: len,
            done: false,
        }))
    }

    async fn sleep(&self, d: Duration) {
        spin_sdk::time::sleep(d).await
    }
}

fn options() -> RequestOptions {
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let o = RequestOptions::new();
    // A host that does not support a timeout refuses it; its own defaults then apply.
    let _ = o.set_connect_timeout(Some(nanos(CONNECT_TIMEOUT)));
    let _ = o.set_first_byte_timeout(Some(nanos(FIRST_BYTE_TIMEOUT)));
    let _ = o.set_between_bytes_timeout(Some(nanos(BETWEEN_BYTES_TIMEOUT)));
    o
}

/// A transport error: unavailable when trying again may help (the S3 host then retries).
fn error(target: &str, code: ErrorCode) -> StoreError {
    let msg = format!("{target}: {code:?}");
    match code {
        ErrorCode::HttpRequestDenied => {
            // Only the operator can fix this, and the client only sees "internal storage
            // error": say it where the operator looks.
            eprintln!(
                "dockside: Spin refused {target}: the host is not in allowed_outbound_hosts. \
                 Set the Spin variable that names it: s3_endpoint (the endpoint of the blobs \
                 URL), mirror_upstream (a mirror's upstream), mirror_auth_host (its token \
                 realm, when on another host) or mirror_redirect_host (where it redirects blob \
                 downloads)."
            );
            StoreError::new(format!("{msg} (not allowed by allowed_outbound_hosts)"))
        }
        ErrorCode::DnsTimeout
        | ErrorCode::DnsError(_)
        | ErrorCode::DestinationNotFound
        | ErrorCode::DestinationUnavailable
        | ErrorCode::DestinationIpUnroutable
        | ErrorCode::ConnectionRefused
        | ErrorCode::ConnectionTerminated
        | ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::ConnectionWriteTimeout
        | ErrorCode::ConnectionLimitReached
        | ErrorCode::HttpResponseIncomplete
        | ErrorCode::HttpResponseTimeout
        // What wasmtime's outgoing handler (Spin's too) reports for any hyper client error
        // it has no closer code for, e.g. a pooled keep-alive connection the server closed
        // as the request went out: seen in CI as a DELETE to Garage failing once. Worth a retry.
        | ErrorCode::HttpProtocolError => StoreError::unavailable(msg),
        _ => StoreError::new(msg),
    }
}

/// A response body from Spin, its errors as [`StoreError`]s and its `size_hint` exact when the
/// answer had a `Content-Length` (spin-sdk's own gives only an upper bound).
pub(super) struct SpinBody {
    inner: IncomingResponseBody,
    /// Bytes still to come, when the store announced a length.
    remaining: Option<u64>,
    done: bool,
}

impl http_body::Body for SpinBody {
    type Data = Bytes;
    type Error = StoreError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StoreError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(r)) = (frame.data_ref(), self.remaining.as_mut()) {
                    *r = r.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(code))) => {
                self.done = true;
                // The connection broke mid-body: trying again may help.
                Poll::Ready(Some(Err(StoreError::unavailable(format!(
                    "body cut short: {code:?}"
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.remaining == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match (self.done, self.remaining) {
            (true, _) => SizeHint::with_exact(0),
            (false, Some(n)) => SizeHint::with_exact(n),
            (false, None) => SizeHint::default(),
        }
    }
}
