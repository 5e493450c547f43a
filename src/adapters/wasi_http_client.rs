//! The wasi:http component's outbound HTTP client ([`HttpClient`]): `wasi:http/outgoing-handler`
//! 0.2, driven by the component's executor (`wasi_http::rt`). What the S3 blob store sends its
//! requests through when the component is configured with `DOCKSIDE_BLOBS=s3://...`.
//!
//! A request is handed to the host first, then its body is written within the output stream's
//! write budget, then the response is awaited; the response body streams from the incoming
//! body's input stream. Transport failures (DNS, refused, timed out, cut short) are
//! [`StoreError::unavailable`], which the S3 host retries with backoff (`sleep`, on
//! `wasi:clocks/monotonic-clock`).

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use http_body_util::BodyExt;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, FutureIncomingResponse, Method, OutgoingBody, OutgoingRequest,
    RequestOptions, Scheme,
};

use super::wasi_http::{FORBIDDEN, WasiBody, flush, rt, write_all};
use crate::error::StoreError;
use crate::http_client::{HttpClient, OutBody};

/// How long the host may take to connect, to send the response's first byte (a part copy
/// inside the store can take a while), and between two bytes of a body: the native client's
/// figures.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(120);
const BETWEEN_BYTES_TIMEOUT: Duration = Duration::from_secs(60);

/// The outbound client of the wasi:http component. Holds nothing: every request is its own
/// `outgoing-request` (the host pools connections, or not).
#[derive(Clone, Copy, Default)]
pub(super) struct WasiClient;

impl HttpClient for WasiClient {
    type Body = WasiBody;

    async fn send(
        &self,
        req: http::Request<OutBody>,
    ) -> Result<http::Response<WasiBody>, StoreError> {
        let target = format!("{} {}", req.method(), req.uri().host().unwrap_or("?"));
        let (parts, body) = req.into_parts();
        let outgoing = outgoing_request(&parts)
            .map_err(|e| StoreError::new(format!("{target}: cannot build the request: {e}")))?;
        let out_body = outgoing
            .body()
            .map_err(|()| StoreError::new(format!("{target}: request body already taken")))?;
        let future =
            outgoing_handler::handle(outgoing, Some(options())).map_err(|e| error(&target, e))?;
        // The body goes out once the host holds the request (before that nothing reads it),
        // unless the host answers first: a failed connection, or an error status from a peer
        // that stopped reading. Either way, the answer says what happened.
        let pumped = {
            let mut write = std::pin::pin!(write_body(body, out_body));
            let mut waiting = None;
            std::future::poll_fn(|cx| {
                waiting = None;
                if let Poll::Ready(r) = write.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                let answered = future.subscribe();
                if answered.ready() {
                    // The unfinished body is dropped: the host knows it is incomplete.
                    return Poll::Ready(None);
                }
                waiting = Some(rt::register(answered, cx.waker().clone()));
                Poll::Pending
            })
            .await
        };
        if let Some(Err(BodyError::Source(e))) = pumped {
            // The source failed: the unfinished body (dropped) tells the host so.
            return Err(e);
        }
        let resp = response(&target, &future).await?;
        let status = resp.status();
        let headers = resp.headers().entries();
        let mut builder = http::Response::builder().status(status);
        let mut len = None;
        for (name, value) in &headers {
            if name.eq_ignore_ascii_case("content-length") {
                len = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            }
            builder = builder.header(name.as_str(), value.as_slice());
        }
        // A HEAD answer announces a length it does not send.
        if parts.method == http::Method::HEAD || status == 204 || status == 304 {
            len = Some(0);
        }
        let body = WasiBody::of_response(resp, len)
            .map_err(|e| StoreError::new(format!("{target}: {e}")))?;
        builder
            .body(body)
            .map_err(|e| StoreError::new(format!("{target}: invalid response: {e}")))
    }

    async fn sleep(&self, d: Duration) {
        use wasi::clocks::monotonic_clock::{now, subscribe_instant};
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let deadline = now().saturating_add(nanos);
        // The clock decides, not the pollable: a fresh timer pollable may not report ready on
        // its first `ready()` even past its deadline (wasmtime), and one is made per wait.
        let mut waiting = None;
        std::future::poll_fn(|cx| {
            waiting = None;
            if now() >= deadline {
                Poll::Ready(())
            } else {
                waiting = Some(rt::register(
                    subscribe_instant(deadline),
                    cx.waker().clone(),
                ));
                Poll::Pending
            }
        })
        .await
    }
}

/// The `outgoing-request` for `parts`: method, scheme, authority, path and query, headers.
fn outgoing_request(parts: &http::request::Parts) -> Result<OutgoingRequest, String> {
    let entries: Vec<(String, Vec<u8>)> = parts
        .headers
        .iter()
        .filter(|(n, _)| !FORBIDDEN.contains(&n.as_str()))
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let fields = Fields::from_list(&entries).map_err(|e| format!("headers refused: {e:?}"))?;
    let req = OutgoingRequest::new(fields);
    let method = match parts.method {
        http::Method::GET => Method::Get,
        http::Method::HEAD => Method::Head,
        http::Method::POST => Method::Post,
        http::Method::PUT => Method::Put,
        http::Method::DELETE => Method::Delete,
        http::Method::PATCH => Method::Patch,
        http::Method::OPTIONS => Method::Options,
        http::Method::CONNECT => Method::Connect,
        http::Method::TRACE => Method::Trace,
        ref m => Method::Other(m.as_str().to_owned()),
    };
    let uri = &parts.uri;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::Http,
        Some("https") => Scheme::Https,
        Some(s) => Scheme::Other(s.to_owned()),
        None => return Err(format!("{uri} has no scheme")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{uri} has no authority"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    req.set_method(&method)
        .map_err(|()| format!("method {} refused", parts.method))?;
    req.set_scheme(Some(&scheme))
        .map_err(|()| format!("scheme of {uri} refused"))?;
    req.set_authority(Some(authority.as_str()))
        .map_err(|()| format!("authority {authority} refused"))?;
    req.set_path_with_query(Some(path))
        .map_err(|()| format!("path {path} refused"))?;
    Ok(req)
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

enum BodyError {
    Source(StoreError),
    Stream,
}

/// Streams `body` into the outgoing body and finishes it.
async fn write_body(body: OutBody, out: OutgoingBody) -> Result<(), BodyError> {
    {
        let stream = out.write().map_err(|()| BodyError::Stream)?;
        let mut body = std::pin::pin!(body);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(BodyError::Source)?;
            if let Ok(data) = frame.into_data() {
                write_all(&stream, &data)
                    .await
                    .map_err(|_| BodyError::Stream)?;
            }
        }
        flush(&stream).await.map_err(|_| BodyError::Stream)?;
        // The stream, a child of the body, is dropped before `finish`.
    }
    OutgoingBody::finish(out, None).map_err(|_| BodyError::Stream)
}

/// Waits for the response's headers.
async fn response(
    target: &str,
    future: &FutureIncomingResponse,
) -> Result<wasi::http::types::IncomingResponse, StoreError> {
    loop {
        match future.get() {
            Some(Ok(Ok(resp))) => return Ok(resp),
            Some(Ok(Err(code))) => return Err(error(target, code)),
            Some(Err(())) => {
                return Err(StoreError::new(format!("{target}: response already taken")));
            }
            None => rt::wait(|| future.subscribe()).await,
        }
    }
}

/// A transport error: unavailable when trying again may help (the S3 host then retries).
fn error(target: &str, code: ErrorCode) -> StoreError {
    let msg = format!("{target}: {code:?}");
    match code {
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
