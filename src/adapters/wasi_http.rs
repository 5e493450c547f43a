//! The `wasi:http/proxy` component (WASI 0.2, the `wasi` crate): runs under
//! `wasmtime serve -Scli --dir HOST::/data --addr 127.0.0.1:PORT dockside.wasm`, storing through
//! `wasi:filesystem` in the preopened directory with the same local-directory hosts as the
//! native server.
//!
//! It only translates: the incoming request becomes an `http::Request` whose body streams from
//! the wasi input stream; the core's response streams out within the output stream's write
//! budget. The handler is synchronous, so a small executor (`rt`) drives the core's future,
//! blocking on `wasi:io/poll` when it waits for the network.
//!
//! Settings come from the environment (`wasmtime serve --env NAME=VALUE`): `DOCKSIDE_DATA`
//! (default `/data`), the `DOCKSIDE_*` limits of [`Config::from_settings`], and access control:
//! `DOCKSIDE_AUTH_CONFIG` (the TOML itself) or `DOCKSIDE_AUTH_CONFIG_FILE` (a file in a
//! preopened directory), `DOCKSIDE_AUTH_SECRET` and the other `DOCKSIDE_AUTH_*` overrides. A
//! broken access configuration answers every request with 500 rather than serve unprotected.
//! The failed-login limits (`DOCKSIDE_LOGIN_*`, `DOCKSIDE_TRUST_FORWARDED_FOR`) and the upload
//! limits (`DOCKSIDE_MAX_UPLOADS`, `DOCKSIDE_MAX_UPLOADS_PER_REPOSITORY`,
//! `DOCKSIDE_UPLOAD_EXPIRY_SECS`) are read the same way. wasi:http tells a component nothing
//! of the client's address, so failed logins are counted per user name, unless a proxy in
//! front sets `X-Forwarded-For` and `DOCKSIDE_TRUST_FORWARDED_FOR` says to believe it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, IncomingResponse, Method, OutgoingBody,
    OutgoingResponse, ResponseOutparam,
};
use wasi::io::streams::{InputStream, OutputStream, StreamError};

use super::wasi_http_client::WasiClient;
use crate::error::StoreError;
use crate::mirror::{EarlyResponse, PipeBody};
use crate::observe::AccessRecord;
use crate::{Config, DirRegistry, FsKv, Registry, S3Blobs, S3Config};

struct Component;

wasi::http::proxy::export!(Component);

impl wasi::exports::http::incoming_handler::Guest for Component {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        super::component_log::install();
        let start = std::time::Instant::now();
        let store = match open() {
            Ok(r) => r,
            Err(msg) => {
                eprintln!("dockside: {msg}");
                return respond_plain(out, 500, &msg);
            }
        };
        let req = match to_http(request) {
            Ok(r) => r,
            Err(msg) => return respond_plain(out, 400, &msg),
        };
        let (method, path, headers) = (
            req.method().clone(),
            req.uri().path().to_owned(),
            req.headers().clone(),
        );
        // The access record (route class, status, latency, bytes, failures): one JSON line on
        // stderr per request, the component's metrics.
        let ms = || start.elapsed().as_secs_f64() * 1000.0;
        let seen = Seen {
            method: &method,
            path: &path,
            headers: &headers,
            ms: &ms,
        };
        rt::block_on(async move {
            match store {
                Store::Dir(registry) => respond(&registry, req, out, seen).await,
                Store::S3(registry) => respond(&registry, req, out, seen).await,
            }
        });
    }
}

/// What the access record needs of the request.
struct Seen<'a> {
    method: &'a http::Method,
    path: &'a str,
    headers: &'a http::HeaderMap,
    ms: &'a dyn Fn() -> f64,
}

impl Seen<'_> {
    fn log<B>(&self, resp: &http::Response<B>) {
        let record = AccessRecord::of(self.method, self.path, self.headers, resp, (self.ms)());
        eprintln!("{}", record.to_json());
    }
}

/// Answers `req`. A mirrored blob fetched for this request streams out while it is fetched:
/// the core hands an early response over (`mirror::EarlyResponse`), which is sent at once
/// while the request's future, still running, feeds its body; both are polled until done.
async fn respond<K, B>(
    registry: &Registry<K, B>,
    mut req: http::Request<WasiBody>,
    out: ResponseOutparam,
    seen: Seen<'_>,
) where
    K: crate::KeyValue,
    B: crate::BlobStore,
{
    type Slot = Arc<Mutex<Option<http::Response<PipeBody>>>>;
    let slot: Slot = Arc::default();
    let put = slot.clone();
    req.extensions_mut().insert(EarlyResponse::new(move |r| {
        *put.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
    }));
    let take = || slot.lock().unwrap_or_else(PoisonError::into_inner).take();
    let mut handling = std::pin::pin!(registry.handle(req));
    enum First<R> {
        Done(R),
        Early(http::Response<PipeBody>, bool),
    }
    let first = std::future::poll_fn(|cx| {
        let done = handling.as_mut().poll(cx);
        if let Some(early) = take() {
            return Poll::Ready(First::Early(early, done.is_ready()));
        }
        done.map(First::Done)
    })
    .await;
    let (early, mut handled) = match first {
        First::Done(resp) => {
            seen.log(&resp);
            return send(resp, out).await;
        }
        First::Early(early, handled) => (early, handled),
    };
    seen.log(&early);
    let mut sending = std::pin::pin!(send(early, out));
    let mut sent = false;
    std::future::poll_fn(|cx| {
        if !handled && handling.as_mut().poll(cx).is_ready() {
            handled = true;
        }
        if !sent && sending.as_mut().poll(cx).is_ready() {
            sent = true;
        }
        if handled && sent {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// Where blobs go: the preopened directory, or an S3 bucket (`DOCKSIDE_BLOBS`). Keys are
/// always in the directory.
enum Store {
    Dir(DirRegistry),
    S3(Registry<FsKv, S3Blobs<WasiClient>>),
}

fn open() -> Result<Store, String> {
    // DOCKSIDE_AUTH_CONFIG_FILE: the access configuration from a file in a preopened directory.
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let auth_file = match (
        env("DOCKSIDE_AUTH_CONFIG"),
        env("DOCKSIDE_AUTH_CONFIG_FILE"),
    ) {
        (None, Some(path)) => Some(
            std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read DOCKSIDE_AUTH_CONFIG_FILE {path}: {e}"))?,
        ),
        _ => None,
    };
    let config = Config::from_settings(|k| match (k, &auth_file) {
        ("DOCKSIDE_AUTH_CONFIG", Some(text)) => Some(text.clone()),
        _ => env(k),
    })?;
    // A pull-through mirror (README, "Mirror"): the TOML of --mirror-config, its upstream
    // requests through wasi:http/outgoing-handler.
    let mut config = config;
    if let Some(text) = env("DOCKSIDE_MIRROR_CONFIG") {
        let m = crate::mirror::Mirror::from_toml(&text, std::sync::Arc::new(WasiClient))
            .map_err(|e| format!("DOCKSIDE_MIRROR_CONFIG: {e}"))?;
        // `Config` holds an `Arc` (shared across threads natively); wasm has one thread.
        #[allow(clippy::arc_with_non_send_sync)]
        let m = std::sync::Arc::new(m);
        config.mirror = Some(m);
    }
    let data = std::env::var("DOCKSIDE_DATA").unwrap_or_else(|_| "/data".to_owned());
    let unusable = |e: std::io::Error| {
        format!(
            "cannot use data directory {data}: {e} (preopen it: wasmtime serve --dir HOST::{data})"
        )
    };
    match env("DOCKSIDE_BLOBS") {
        None => DirRegistry::open_dir(&data, config)
            .map(Store::Dir)
            .map_err(unusable),
        Some(url) => {
            let s3 = S3Config::from_url(&url, env).map_err(|e| format!("DOCKSIDE_BLOBS: {e}"))?;
            let blobs =
                S3Blobs::new(&s3, WasiClient).map_err(|e| format!("DOCKSIDE_BLOBS: {e}"))?;
            let kv = FsKv::new(std::path::Path::new(&data).join("kv")).map_err(unusable)?;
            Ok(Store::S3(Registry::new(kv, blobs, config)))
        }
    }
}

/// A response built here, for failures before the core runs (its error envelope is not
/// available without a registry).
fn respond_plain(out: ResponseOutparam, status: u16, msg: &str) {
    let body = crate::Error::unknown_json(msg);
    let headers = Fields::from_list(&[("content-type".to_owned(), b"application/json".to_vec())])
        .unwrap_or_else(|_| Fields::new());
    let resp = OutgoingResponse::new(headers);
    let _ = resp.set_status_code(status);
    let Ok(body_out) = resp.body() else { return };
    ResponseOutparam::set(out, Ok(resp));
    if let Ok(stream) = body_out.write() {
        for chunk in body.chunks(4096) {
            if stream.blocking_write_and_flush(chunk).is_err() {
                break;
            }
        }
    }
    let _ = OutgoingBody::finish(body_out, None);
}

fn to_http(req: IncomingRequest) -> Result<http::Request<WasiBody>, String> {
    let method = match req.method() {
        Method::Get => http::Method::GET,
        Method::Head => http::Method::HEAD,
        Method::Post => http::Method::POST,
        Method::Put => http::Method::PUT,
        Method::Delete => http::Method::DELETE,
        Method::Patch => http::Method::PATCH,
        Method::Options => http::Method::OPTIONS,
        Method::Connect => http::Method::CONNECT,
        Method::Trace => http::Method::TRACE,
        Method::Other(m) => http::Method::from_bytes(m.as_bytes()).map_err(|e| e.to_string())?,
    };
    // The core routes on the path and query only.
    let uri = req.path_with_query().unwrap_or_else(|| "/".to_owned());
    let mut builder = http::Request::builder().method(method).uri(uri);
    let mut has_host = false;
    for (name, value) in req.headers().entries() {
        has_host |= name.eq_ignore_ascii_case("host");
        builder = builder.header(name, value);
    }
    // The token realm is derived from the host when not configured.
    if !has_host && let Some(authority) = req.authority() {
        builder = builder.header(http::header::HOST, authority);
    }
    let body = req.consume().map_err(|()| "request body already taken")?;
    let stream = body
        .stream()
        .map_err(|()| "request body stream already taken")?;
    builder
        .body(WasiBody {
            waiting: None,
            stream: Some(stream),
            body: Some(body),
            response: None,
            remaining: None,
        })
        .map_err(|e| e.to_string())
}

/// An incoming body (of a request to the component, or of a response to one of its own
/// requests) as an `http_body::Body`. The stream is a child of the body resource, which may be
/// a child of a response: they are dropped in that order (the fields' order).
pub(super) struct WasiBody {
    /// The pollable this body waits on, a child of `stream`: declared first, so dropped first.
    waiting: Option<rt::Registration>,
    stream: Option<InputStream>,
    body: Option<IncomingBody>,
    response: Option<IncomingResponse>,
    /// Bytes still to come, when the sender announced a length: an exact `size_hint`.
    remaining: Option<u64>,
}

impl WasiBody {
    /// The body of `resp`, its length from `Content-Length` when present.
    pub(super) fn of_response(resp: IncomingResponse, len: Option<u64>) -> Result<Self, String> {
        let body = resp.consume().map_err(|()| "response body already taken")?;
        let stream = body
            .stream()
            .map_err(|()| "response body stream already taken")?;
        Ok(WasiBody {
            waiting: None,
            stream: Some(stream),
            body: Some(body),
            response: Some(resp),
            remaining: len,
        })
    }

    fn end(&mut self) {
        self.waiting = None;
        self.stream = None;
        if let Some(b) = self.body.take() {
            drop(IncomingBody::finish(b));
        }
        self.response = None;
    }
}

/// Bytes asked of the input stream per read.
const READ_SIZE: u64 = 256 * 1024;

impl http_body::Body for WasiBody {
    type Data = Bytes;
    type Error = StoreError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StoreError>>> {
        self.waiting = None;
        let Some(stream) = self.stream.as_ref() else {
            return Poll::Ready(None);
        };
        match stream.read(READ_SIZE) {
            Ok(chunk) if chunk.is_empty() => {
                let reg = rt::register(stream.subscribe(), cx.waker().clone());
                self.waiting = Some(reg);
                Poll::Pending
            }
            Ok(chunk) => {
                if let Some(r) = self.remaining.as_mut() {
                    *r = r.saturating_sub(chunk.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
            }
            Err(StreamError::Closed) => {
                self.end();
                Poll::Ready(None)
            }
            Err(StreamError::LastOperationFailed(e)) => {
                let msg = match wasi::http::types::http_error_code(&e) {
                    Some(code) => format!("{code:?}"),
                    None => e.to_debug_string(),
                };
                self.stream = None;
                self.body = None;
                self.response = None;
                // The connection broke mid-body: trying again may help.
                Poll::Ready(Some(Err(StoreError::unavailable(format!(
                    "body cut short: {msg}"
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.stream, self.remaining) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), Some(n)) => SizeHint::with_exact(n),
            (Some(_), None) => SizeHint::default(),
        }
    }
}

/// Headers a wasi:http host refuses in a response (they are the host's business).
pub(super) const FORBIDDEN: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
    "http2-settings",
];

async fn send<B>(resp: http::Response<B>, out: ResponseOutparam)
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let (parts, body) = resp.into_parts();
    let entries: Vec<(String, Vec<u8>)> = parts
        .headers
        .iter()
        .filter(|(n, _)| !FORBIDDEN.contains(&n.as_str()))
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let fields = Fields::from_list(&entries).unwrap_or_else(|_| Fields::new());
    let wresp = OutgoingResponse::new(fields);
    let _ = wresp.set_status_code(parts.status.as_u16());
    let Ok(wbody) = wresp.body() else { return };
    ResponseOutparam::set(out, Ok(wresp));
    let complete = {
        let Ok(stream) = wbody.write() else { return };
        let mut body = std::pin::pin!(body);
        let mut ok = true;
        while !body.is_end_stream() {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && write_all(&stream, &data).await.is_err()
                    {
                        ok = false; // the client went away
                        break;
                    }
                }
                Some(Err(e)) => {
                    eprintln!("dockside: response body failed: {e}");
                    ok = false;
                    break;
                }
            }
        }
        ok && flush(&stream).await.is_ok()
        // The stream, a child of the body, is dropped here, before `finish`.
    };
    if complete {
        // A HEAD answer announces a Content-Length it does not send: the host reports a size
        // mismatch, after the headers went out as they should. Nothing to do about it.
        let _ = OutgoingBody::finish(wbody, None);
    }
    // Otherwise `wbody` is dropped unfinished, which tells the host the body is incomplete.
}

/// Writes `data` within the stream's write budget, waiting when it is spent.
pub(super) async fn write_all(stream: &OutputStream, mut data: &[u8]) -> Result<(), StreamError> {
    while !data.is_empty() {
        let budget = stream.check_write()?;
        if budget == 0 {
            rt::wait(|| stream.subscribe()).await;
            continue;
        }
        let n = (budget as usize).min(data.len());
        stream.write(&data[..n])?;
        data = &data[n..];
    }
    Ok(())
}

pub(super) async fn flush(stream: &OutputStream) -> Result<(), StreamError> {
    stream.flush()?;
    rt::wait(|| stream.subscribe()).await;
    stream.check_write().map(|_| ())
}

/// A minimal single-threaded executor over `wasi:io/poll`: futures waiting on the host register
/// a pollable and their waker; `block_on` sleeps in `poll` until one is ready.
///
/// A registration lives as long as the future that made it waits on it: it is a
/// [`Registration`], dropped when that future is polled again, finishes or is dropped. A
/// pollable is a child of its stream, and the host traps when a stream is dropped before its
/// children ("resource has children"); with two futures polled in turn (an S3 part uploading
/// while the request body is read), a pollable left in the list by one poll would outlive the
/// stream the next poll finishes with.
pub(super) mod rt {
    use std::cell::{Cell, RefCell};
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use wasi::io::poll::Pollable;

    thread_local! {
        static PENDING: RefCell<Vec<(u64, Pollable, Waker)>> = const { RefCell::new(Vec::new()) };
        static NEXT_ID: Cell<u64> = const { Cell::new(0) };
    }

    /// A pollable waited on; dropping it takes it out of the executor's list (and drops it).
    pub struct Registration(u64);

    impl Drop for Registration {
        fn drop(&mut self) {
            let removed = PENDING.with(|v| {
                let mut v = v.borrow_mut();
                v.iter()
                    .position(|(id, _, _)| *id == self.0)
                    .map(|i| v.swap_remove(i))
            });
            // Dropped outside the borrow: a pollable's drop is a host call, nothing re-enters.
            drop(removed);
        }
    }

    /// Called by a future about to return `Pending` until `p` is ready; it keeps the
    /// registration while it waits.
    #[must_use = "the registration ends when dropped"]
    pub fn register(p: Pollable, w: Waker) -> Registration {
        let id = NEXT_ID.with(|n| {
            let id = n.get();
            n.set(id + 1);
            id
        });
        PENDING.with(|v| v.borrow_mut().push((id, p, w)));
        Registration(id)
    }

    /// Completes once a pollable made by `subscribe` is ready.
    pub async fn wait(subscribe: impl Fn() -> Pollable) {
        let mut waiting: Option<Registration> = None;
        std::future::poll_fn(|cx| {
            waiting = None;
            let p = subscribe();
            if p.ready() {
                Poll::Ready(())
            } else {
                waiting = Some(register(p, cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }

    pub fn block_on<F: Future>(fut: F) -> F::Output {
        let mut fut = pin!(fut);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
            let pending = PENDING.with(|v| std::mem::take(&mut *v.borrow_mut()));
            if pending.is_empty() {
                // Pending without a pollable: something was woken synchronously. Poll again.
                continue;
            }
            let refs: Vec<&Pollable> = pending.iter().map(|(_, p, _)| p).collect();
            for i in wasi::io::poll::poll(&refs) {
                pending[i as usize].2.wake_by_ref();
            }
        }
    }
}
