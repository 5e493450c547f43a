//! The native adapter: a hyper/tokio server around [`Registry::handle`], HTTP/1.1, or with TLS
//! ([`Tls`]) HTTP/2 or HTTP/1.1 as ALPN decides; Prometheus metrics ([`Metrics`]) on a listener
//! of their own ([`serve_metrics`]); one access-log line per request, as text or structured
//! fields, with the request id the core returns in `X-Request-Id`.
//!
//! Its stores are chosen at start ([`ServerKv`]: a directory or Valkey/Redis; [`ServerBlobs`]: a
//! directory or an S3 bucket), behind enums so that [`ServedRegistry`] is one concrete type.
//! With both remote, instances share everything and any number may serve one registry.
//!
//! It only translates: hyper's request goes to the core as it is (its body streams), the
//! core's response comes back as it is. It adds what a process needs: a listener, one log line
//! per request, a clean stop on SIGINT/SIGTERM, and limits that keep hostile or broken clients
//! from holding the server:
//!
//! - a header timeout (a request's headers must arrive within it; it also closes idle
//!   keep-alive connections), and a body idle timeout (the longest wait for the next bytes of a
//!   request body);
//! - a bound on open connections: past it, the server stops accepting until one closes; a TLS
//!   handshake must finish within its own timeout, and an HTTP/2 connection with no request in
//!   flight for the header timeout is closed;
//! - nothing waits on the network while holding a thread: requests run as tasks on the runtime,
//!   only the directory host's blocking calls go to the blocking pool ([`Pooled`]), and password
//!   checks to a few threads of their own ([`PasswordCheckers`], bounded, with a bounded queue);
//! - a refused request is answered at once: what is left of its body is read (bounded in bytes
//!   and by the body timeout) in the background, while the answer goes out, so clients that send
//!   their whole body before reading see the answer; a client waiting for `100 Continue` is
//!   answered without it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument;

use bytes::{Buf, Bytes};

use crate::adapters::hyper_client::{HyperClient, ResponseBody};
use crate::adapters::metrics::{ByteCounter, InFlight, Metrics};
use crate::adapters::pooled::Pooled;
pub use crate::adapters::tls::Tls;
use crate::auth::{Busy, PasswordCheck, PasswordChecks};
use crate::body::Body;
use crate::error::StoreError;
use crate::host::{BlobStore, ByteSource, KeyValue, WriteError};
use crate::hosts::fs::FileReader;
use crate::hosts::s3::S3Reader;
use crate::observe::{self, Outcome, RouteClass};
use crate::{Config, FsBlobs, FsKv, RedisKv, Registry, S3Blobs};

/// How long a stop waits for requests in flight before giving up on them. Whatever they were
/// writing stays a temporary file, never a blob, and is swept at the next start.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The registry the native server runs, on whichever stores it was given: one concrete type
/// whatever they are (the directory host's blocking calls always on the pool).
pub type ServedRegistry = Registry<ServerKv, ServerBlobs>;

/// The server's key-value store: a directory (on the blocking pool) or Valkey/Redis, shared by
/// every instance pointed at it.
#[derive(Clone)]
pub enum ServerKv {
    Dir(Pooled<FsKv>),
    Redis(RedisKv),
}

/// The server's blob store: a directory (on the blocking pool) or an S3 bucket, shared by every
/// instance pointed at it.
#[derive(Clone)]
pub enum ServerBlobs {
    Dir(Pooled<FsBlobs>),
    /// Boxed: the bucket's settings and credentials are large beside a directory path.
    S3(Box<S3Blobs<HyperClient>>),
}

impl From<FsKv> for ServerKv {
    fn from(kv: FsKv) -> Self {
        ServerKv::Dir(Pooled(kv))
    }
}

impl From<RedisKv> for ServerKv {
    fn from(kv: RedisKv) -> Self {
        ServerKv::Redis(kv)
    }
}

impl From<FsBlobs> for ServerBlobs {
    fn from(blobs: FsBlobs) -> Self {
        ServerBlobs::Dir(Pooled(blobs))
    }
}

impl From<S3Blobs<HyperClient>> for ServerBlobs {
    fn from(blobs: S3Blobs<HyperClient>) -> Self {
        ServerBlobs::S3(Box::new(blobs))
    }
}

impl KeyValue for ServerKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            ServerKv::Dir(kv) => kv.get(key).await,
            ServerKv::Redis(kv) => kv.get(key).await,
        }
    }

    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        match self {
            ServerKv::Dir(kv) => kv.set(key, value).await,
            ServerKv::Redis(kv) => kv.set(key, value).await,
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            ServerKv::Dir(kv) => kv.delete(key).await,
            ServerKv::Redis(kv) => kv.delete(key).await,
        }
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        match self {
            ServerKv::Dir(kv) => kv.list(prefix, after, limit).await,
            ServerKv::Redis(kv) => kv.list(prefix, after, limit).await,
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        match self {
            ServerKv::Dir(kv) => kv.compare_and_swap(key, expected, new).await,
            ServerKv::Redis(kv) => kv.compare_and_swap(key, expected, new).await,
        }
    }
}

/// A blob streaming from either blob store.
pub enum ServerReader {
    Dir(FileReader),
    S3(S3Reader<ResponseBody>),
}

impl http_body::Body for ServerReader {
    type Data = Bytes;
    type Error = StoreError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StoreError>>> {
        match self.get_mut() {
            ServerReader::Dir(r) => Pin::new(r).poll_frame(cx),
            ServerReader::S3(r) => Pin::new(r).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ServerReader::Dir(r) => r.is_end_stream(),
            ServerReader::S3(r) => r.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ServerReader::Dir(r) => r.size_hint(),
            ServerReader::S3(r) => r.size_hint(),
        }
    }
}

impl BlobStore for ServerBlobs {
    type Reader = ServerReader;

    async fn write<S: ByteSource>(
        &self,
        path: &str,
        src: &mut S,
    ) -> Result<u64, WriteError<S::Error>> {
        match self {
            ServerBlobs::Dir(b) => b.write(path, src).await,
            ServerBlobs::S3(b) => b.write(path, src).await,
        }
    }

    async fn read(
        &self,
        path: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Option<ServerReader>, StoreError> {
        Ok(match self {
            ServerBlobs::Dir(b) => b.read(path, range).await?.map(ServerReader::Dir),
            ServerBlobs::S3(b) => b.read(path, range).await?.map(ServerReader::S3),
        })
    }

    async fn size(&self, path: &str) -> Result<Option<u64>, StoreError> {
        match self {
            ServerBlobs::Dir(b) => b.size(path).await,
            ServerBlobs::S3(b) => b.size(path).await,
        }
    }

    async fn delete(&self, path: &str) -> Result<(), StoreError> {
        match self {
            ServerBlobs::Dir(b) => b.delete(path).await,
            ServerBlobs::S3(b) => b.delete(path).await,
        }
    }

    async fn assemble(&self, parts: &[String], dest: &str) -> Result<(), StoreError> {
        match self {
            ServerBlobs::Dir(b) => b.assemble(parts, dest).await,
            ServerBlobs::S3(b) => b.assemble(parts, dest).await,
        }
    }

    fn redirect_url(&self, path: &str, ttl: Duration) -> Option<String> {
        match self {
            ServerBlobs::Dir(b) => b.redirect_url(path, ttl),
            ServerBlobs::S3(b) => b.redirect_url(path, ttl),
        }
    }

    fn min_chunk_length(&self) -> Option<u64> {
        match self {
            ServerBlobs::Dir(b) => b.min_chunk_length(),
            ServerBlobs::S3(b) => b.min_chunk_length(),
        }
    }
}

/// The server's limits (`dockside serve --help` describes each).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest wait for a request's headers, from the first byte the server waits for (so it
    /// also bounds how long a keep-alive connection may sit idle); `None`: unbounded.
    pub header_timeout: Option<Duration>,
    /// Longest wait for the next bytes of a request body; `None`: unbounded.
    pub body_timeout: Option<Duration>,
    /// Most connections open at once; past it, the server stops accepting until one closes.
    pub max_connections: usize,
    /// Most password checks (Basic credentials) running at once.
    pub max_password_checks: usize,
    /// Most bytes of a refused request's body read after answering it.
    pub drain_limit: u64,
    /// Longest a TLS handshake may take, from the accept (a client that connects and never
    /// handshakes would otherwise hold a connection slot); `None`: unbounded.
    pub tls_handshake_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Some(Duration::from_secs(30)),
            body_timeout: Some(Duration::from_secs(60)),
            max_connections: 1024,
            max_password_checks: default_password_checks(),
            drain_limit: 64 * 1024 * 1024,
            tls_handshake_timeout: Some(Duration::from_secs(10)),
        }
    }
}

/// One password check per core, at most 4: each argon2id check holds 19 MiB while it runs.
pub fn default_password_checks() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4))
}

/// Password checks that may wait, per checking thread; past that, 429.
const QUEUED_PER_CHECK: usize = 16;

/// Runs password checks on a few threads of their own, one check per thread at a time, with up
/// to `QUEUED_PER_CHECK` (16) per thread waiting (the requests wait as tasks, holding no thread);
/// beyond that, a check is refused at once ([`Busy`]: 429 with `Retry-After`). This bounds the
/// CPU and memory password hashing can take whoever sends Basic credentials: an argon2id check
/// allocates 19 MiB, and glibc's malloc keeps freed memory in the arena of the thread that used
/// it, so checks spread over many threads (tokio's blocking pool grows to 512) would keep up to
/// 19 MiB per thread ever used; on `threads` threads of their own, at most that many.
#[derive(Debug)]
pub struct PasswordCheckers {
    jobs: std::sync::mpsc::SyncSender<Job>,
}

type Job = (PasswordCheck, tokio::sync::oneshot::Sender<bool>);

impl PasswordCheckers {
    /// Starts `threads` checking threads (at least one); they end when this is dropped.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(threads * QUEUED_PER_CHECK);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("password-check-{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((check, reply)) = job else {
                            return; // the sender is gone
                        };
                        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check))
                            .unwrap_or(false);
                        let _ = reply.send(ok); // the request may be gone: no matter
                    }
                })?;
        }
        Ok(PasswordCheckers { jobs: tx })
    }
}

impl PasswordChecks for PasswordCheckers {
    fn run(
        &self,
        check: PasswordCheck,
    ) -> Pin<Box<dyn Future<Output = Result<bool, Busy>> + Send>> {
        const BUSY: Busy = Busy {
            retry_after_secs: 1,
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        match self.jobs.try_send((check, reply)) {
            Ok(()) => Box::pin(async move { answer.await.map_err(|_| BUSY) }),
            Err(_) => Box::pin(std::future::ready(Err(BUSY))),
        }
    }
}

/// The registry to serve: on `kv` and `blobs` (a directory host is wrapped so that its blocking
/// calls run on the pool), password checks bounded by `limits`, and refused bodies drained here
/// rather than by the core (after answering, not before).
pub fn registry(
    kv: impl Into<ServerKv>,
    blobs: impl Into<ServerBlobs>,
    config: Config,
    limits: &Limits,
) -> std::io::Result<ServedRegistry> {
    let checks = PasswordCheckers::new(limits.max_password_checks)?;
    Ok(Registry::new(
        kv.into(),
        blobs.into(),
        Config {
            drain_limit: 0,
            password_checks: Some(Arc::new(checks)),
            ..config
        },
    ))
}

/// What the server adds around the registry besides its limits: TLS, metrics, the log format.
/// The default: plain HTTP/1.1, no metrics, text logs.
#[derive(Clone, Default)]
pub struct Ops {
    /// Serve HTTPS with this certificate (HTTP/2 or HTTP/1.1 by ALPN).
    pub tls: Option<Arc<Tls>>,
    /// Count requests, bytes, failures (served by [`serve_metrics`]).
    pub metrics: Option<Arc<Metrics>>,
    /// The access log as structured fields (for a JSON subscriber) rather than one text line.
    pub json_log: bool,
    /// Every answered request is also appended here (`TestRegistry::requests`), so tests can
    /// see what arrived without reading a log.
    #[cfg(feature = "testing")]
    pub record: Option<Arc<std::sync::Mutex<Vec<crate::testing::ServedRequest>>>>,
}

/// Serves a local-directory registry on `listener` until `shutdown` completes (the same as
/// [`serve_registry`], under its older name).
pub async fn serve_dir(
    listener: TcpListener,
    registry: Arc<ServedRegistry>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_registry(listener, registry, limits, Ops::default(), shutdown).await
}

/// Serves `registry` (whatever its stores) on `listener` until `shutdown` completes.
pub async fn serve_registry(
    listener: TcpListener,
    registry: Arc<ServedRegistry>,
    limits: Limits,
    ops: Ops,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve(
        listener,
        move |req: hyper::Request<RequestBody>| {
            let registry = registry.clone();
            async move { registry.handle(req).await }
        },
        limits,
        ops,
        shutdown,
    )
    .await
}

/// Serves `handler` (a registry's `handle`, for any concrete stores) on `listener` until
/// `shutdown` completes, then stops accepting, lets requests in flight finish (up to
/// [`SHUTDOWN_GRACE`]) and returns. Each request runs as its own task, to its end even if the
/// client goes away (its body then fails), so no store operation is cut halfway. With TLS,
/// the handshake runs in the connection's task (holding its slot, within the handshake
/// timeout), and ALPN picks HTTP/2 or HTTP/1.1.
pub async fn serve<F, Fut, R>(
    listener: TcpListener,
    handler: F,
    limits: Limits,
    ops: Ops,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    F: Fn(hyper::Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<Body<R>>> + Send + 'static,
    R: http_body::Body<Data = Bytes, Error = StoreError> + Unpin + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2.timer(TokioTimer::new());
    if let Some(t) = limits.header_timeout {
        // hyper's HTTP/2 has no header timeout: a peer that stops answering pings is closed,
        // and an idle one after the same time
        // (`Activity::idle_for`).
        http2.keep_alive_interval(t).keep_alive_timeout(t);
    }
    let max_connections = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max_connections));
    // HTTP/2 connections are not watched by `graceful` (their idle timeout needs the
    // connection itself): they stop on this signal, and the stop waits for every slot back.
    let (stopping, stop_signal) = tokio::sync::watch::channel(false);
    let mut last_full_warning: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if last_full_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(
                        "{} connections open: not accepting more until one closes",
                        limits.max_connections
                    );
                    last_full_warning = Some(Instant::now());
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait, don't spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let service = service(
            handler.clone(),
            limits.clone(),
            ops.clone(),
            peer,
            activity.clone(),
        );
        let mut stop_signal = stop_signal.clone();
        let idle_timeout = limits.header_timeout;
        let watcher = graceful.watcher();
        let (http1, http2) = (http1.clone(), http2.clone());
        let (tls, metrics) = (ops.tls.clone(), ops.metrics.clone());
        let handshake_timeout = limits.tls_handshake_timeout;
        tokio::spawn(async move {
            let _open = metrics.as_ref().map(|m| m.connection_opened());
            let ended = match tls {
                None => {
                    watcher
                        .watch(http1.serve_connection(TokioIo::new(stream), service))
                        .await
                }
                Some(tls) => {
                    let accept = tls.acceptor().accept(stream);
                    let handshake = match handshake_timeout {
                        None => accept.await,
                        Some(t) => tokio::time::timeout(t, accept).await.unwrap_or_else(|_| {
                            Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("no TLS handshake within {} s", t.as_secs_f64()),
                            ))
                        }),
                    };
                    let stream = match handshake {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            if let Some(m) = &metrics {
                                m.tls_handshake_failed();
                            }
                            drop(slot);
                            return;
                        }
                    };
                    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                        drop(watcher);
                        let conn = http2.serve_connection(TokioIo::new(stream), service);
                        tokio::pin!(conn);
                        let mut closing = false;
                        loop {
                            tokio::select! {
                                ended = conn.as_mut() => break ended,
                                () = activity.idle_for(idle_timeout), if !closing => {
                                    // Like HTTP/1.1's keep-alive limit: GOAWAY, then close.
                                    conn.as_mut().graceful_shutdown();
                                    closing = true;
                                }
                                _ = stop_signal.wait_for(|s| *s), if !closing => {
                                    conn.as_mut().graceful_shutdown();
                                    closing = true;
                                }
                            }
                        }
                    } else {
                        watcher
                            .watch(http1.serve_connection(TokioIo::new(stream), service))
                            .await
                    }
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!("stopping: waiting for requests in flight");
    let _ = stopping.send(true);
    let all_closed = async {
        graceful.shutdown().await;
        let _ = slots.acquire_many(max_connections as u32).await;
    };
    tokio::select! {
        () = all_closed => tracing::info!("stopped"),
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("stopped with requests still in flight");
        }
    }
    Ok(())
}

/// Requests in flight on one connection, so that an HTTP/2 connection with none for the header
/// timeout can be closed (HTTP/1.1 has hyper's header timeout for that).
#[derive(Default)]
pub struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    changed: tokio::sync::Notify,
}

impl Activity {
    fn start(self: &Arc<Self>) -> Pending {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify_waiters();
        Pending(self.clone())
    }

    /// Resolves once no request has been in flight for `timeout` (never without one).
    async fn idle_for(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else {
            return std::future::pending().await;
        };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the count is read, so no change between the two is missed.
            changed.as_mut().enable();
            if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                tokio::select! {
                    () = tokio::time::sleep(timeout) => return,
                    () = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

/// One request in flight on a connection, until its response body is sent or dropped.
pub struct Pending(Arc<Activity>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// The response body as it goes out: counts its bytes, and keeps the request counted in
/// flight until it is sent (or dropped).
pub struct Outgoing<B> {
    inner: B,
    counter: ByteCounter,
    _in_flight: Option<InFlight>,
    _pending: Pending,
}

impl<B> http_body::Body for Outgoing<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &frame
            && let Some(d) = f.data_ref()
        {
            this.counter.add(d.len());
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The per-connection service: a request id (the client's, when sane, else a fresh one, put on
/// the request so the core echoes it), the request as a task in a span carrying that id, then
/// the access log line and the metrics.
#[allow(clippy::type_complexity)]
fn service<F, Fut, R>(
    handler: F,
    limits: Limits,
    ops: Ops,
    peer: SocketAddr,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = hyper::Response<Outgoing<Body<R>>>,
    Error = Infallible,
    Future = impl Future<Output = Result<hyper::Response<Outgoing<Body<R>>>, Infallible>>
             + Send
             + 'static,
> + Clone
+ Send
+ 'static
where
    F: Fn(hyper::Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<Body<R>>> + Send + 'static,
    R: http_body::Body<Data = Bytes, Error = StoreError> + Unpin + Send + 'static,
{
    service_fn(move |req: hyper::Request<Incoming>| {
        let start = Instant::now();
        let class = RouteClass::of(req.method(), req.uri().path());
        let metrics = ops.metrics.clone();
        let in_flight = metrics.as_ref().map(|m| m.start(class));
        let pending = activity.start();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        #[cfg(feature = "testing")]
        let path_and_query = req.uri().path_and_query().map(|p| p.to_string());
        let (mut parts, body) = req.into_parts();
        let id = observe::request_id(&parts.headers);
        if let Ok(v) = http::HeaderValue::from_str(&id) {
            parts.headers.insert(observe::REQUEST_ID_HEADER, v);
        }
        // The core counts failed logins per client address.
        parts.extensions.insert(crate::ClientAddr(peer.ip()));
        let mut body = RequestBody::new(body, &parts.headers, &limits);
        body.counter = ByteCounter::new(metrics.as_ref().map(|m| m.bytes_in(class)));
        // A mirrored blob is answered while the task still fetches it (`EarlyResponse`).
        let (early_tx, mut early_rx) = tokio::sync::oneshot::channel();
        parts
            .extensions
            .insert(crate::mirror::EarlyResponse::new(move |r| {
                let _ = early_tx.send(r);
            }));
        let req = hyper::Request::from_parts(parts, body);
        let span = tracing::info_span!("request", id = %id);
        let mut task = tokio::spawn(handler(req).instrument(span));
        let json_log = ops.json_log;
        #[cfg(feature = "testing")]
        let record = ops.record.clone();
        async move {
            let joined = tokio::select! {
                biased;
                Ok(early) = &mut early_rx => Ok(early.map(Body::pipe)),
                r = &mut task => r,
            };
            let resp = joined.unwrap_or_else(|e| {
                tracing::error!(request_id = %id, "request handler failed: {e}");
                let mut resp = hyper::Response::new(Body::full(
                    r#"{"errors":[{"code":"UNKNOWN","message":"internal error"}]}"#,
                ));
                *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                if let Ok(v) = http::HeaderValue::from_str(&id) {
                    resp.headers_mut().insert(observe::REQUEST_ID_HEADER, v);
                }
                resp
            });
            let secs = start.elapsed().as_secs_f64();
            let outcome = resp
                .extensions()
                .get::<Outcome>()
                .copied()
                .unwrap_or(Outcome {
                    class,
                    store_error: false,
                    auth_failure: None,
                });
            if let Some(m) = &metrics {
                m.answered(outcome, resp.status().as_u16(), secs);
            }
            log_request(json_log, peer, &method, &path, &resp, &id, outcome, secs);
            // Before the response leaves: a client that has its answer finds it recorded.
            #[cfg(feature = "testing")]
            if let Some(record) = &record {
                record.lock().unwrap_or_else(|p| p.into_inner()).push(
                    crate::testing::ServedRequest {
                        method,
                        path: path_and_query.unwrap_or(path),
                        status: resp.status(),
                    },
                );
            }
            let counter = ByteCounter::new(metrics.as_ref().map(|m| m.bytes_out(outcome.class)));
            Ok::<_, Infallible>(resp.map(|inner| Outgoing {
                inner,
                counter,
                _in_flight: in_flight,
                _pending: pending,
            }))
        }
    })
}

/// Serves `/metrics` (Prometheus' text format) on `listener`, HTTP/1.1, no TLS: a listener
/// meant for the monitoring network only (`--metrics-listen`). Anything else is 404.
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>, limits: Limits) {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    // Scrapers are few: a small bound keeps a flood on this port from taking file descriptors.
    let slots = Arc::new(Semaphore::new(64));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let service = service_fn(move |req: hyper::Request<Incoming>| {
            let metrics = metrics.clone();
            async move {
                let mut resp = if req.uri().path() == "/metrics"
                    && matches!(*req.method(), http::Method::GET | http::Method::HEAD)
                {
                    let mut r = hyper::Response::new(http_body_util::Full::new(Bytes::from(
                        metrics.render(),
                    )));
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                } else {
                    let mut r = hyper::Response::new(http_body_util::Full::new(Bytes::from(
                        "only /metrics here\n",
                    )));
                    *r.status_mut() = http::StatusCode::NOT_FOUND;
                    r
                };
                resp.headers_mut().insert(
                    http::header::CACHE_CONTROL,
                    http::HeaderValue::from_static("no-store"),
                );
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = http1.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
}

/// Why a request body failed.
#[derive(Debug)]
pub enum BodyError {
    /// The connection failed or the client went away.
    Read(hyper::Error),
    /// No bytes came for the body timeout.
    Idle(Duration),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Read(e) => write!(f, "{e}"),
            BodyError::Idle(t) => write!(f, "no data for {} s", t.as_secs_f64()),
        }
    }
}

impl std::error::Error for BodyError {}

/// A request body as the core sees it: hyper's, failing once no bytes came for the body
/// timeout. Dropped unfinished (a refused request), it finishes reading itself in the
/// background, up to the drain limit, so the answer goes out at once and clients still sending
/// read it rather than a reset; unless the client holds its body back for `100 Continue` and
/// nothing read it, in which case hyper answers without `100 Continue` and closes.
pub struct RequestBody {
    inner: Option<Incoming>,
    idle: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
    timed_out: bool,
    polled: bool,
    expects_continue: bool,
    drain_limit: u64,
    /// Counts the bytes read (metrics), including what is drained after a refusal.
    counter: ByteCounter,
}

impl RequestBody {
    fn new(inner: Incoming, headers: &http::HeaderMap, limits: &Limits) -> Self {
        let expects_continue = headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        RequestBody {
            inner: Some(inner),
            idle: limits.body_timeout,
            timer: None,
            waiting: false,
            timed_out: false,
            polled: false,
            expects_continue,
            drain_limit: limits.drain_limit,
            counter: ByteCounter::default(),
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        this.polled = true;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if this.timed_out {
            return Poll::Ready(Some(Err(BodyError::Idle(this.idle.unwrap_or_default()))));
        }
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                if let Some(Ok(f)) = &frame
                    && let Some(d) = f.data_ref()
                {
                    this.counter.add(d.len());
                }
                Poll::Ready(frame.map(|f| f.map_err(BodyError::Read)))
            }
            Poll::Pending => {
                let Some(idle) = this.idle else {
                    return Poll::Pending;
                };
                let deadline = tokio::time::Instant::now() + idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.waiting {
                    timer.as_mut().reset(deadline);
                    this.waiting = true;
                }
                if timer.as_mut().poll(cx).is_ready() {
                    this.timed_out = true;
                    return Poll::Ready(Some(Err(BodyError::Idle(idle))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        let limit = self.drain_limit;
        if inner.is_end_stream()
            || self.timed_out
            || limit == 0
            || (self.expects_continue && !self.polled)
            || inner.size_hint().lower() > limit
        {
            return; // hyper closes the connection after the answer if the body is unfinished
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut rest = RequestBody {
            inner: Some(inner),
            idle: self.idle,
            timer: None,
            waiting: false,
            timed_out: false,
            polled: true,
            expects_continue: false,
            drain_limit: 0,
            counter: self.counter.clone(),
        };
        rt.spawn(async move {
            let mut seen = 0u64;
            while seen <= limit {
                match rest.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(d) = frame.data_ref() {
                            seen += d.remaining() as u64;
                        }
                    }
                    _ => return,
                }
            }
        });
    }
}

/// One access-log line: peer, method, path, status, response length, time to the headers,
/// request id; with `json`, the same (and the route class, failures) as structured fields.
#[allow(clippy::too_many_arguments)]
fn log_request<T>(
    json: bool,
    peer: SocketAddr,
    method: &http::Method,
    path: &str,
    resp: &hyper::Response<T>,
    id: &str,
    outcome: Outcome,
    secs: f64,
) {
    let len = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok());
    let ms = (secs * 10_000.0).round() / 10.0;
    if json {
        tracing::info!(
            target: "dockside::access",
            request_id = id,
            peer = %peer,
            method = %method,
            path,
            status = resp.status().as_u16(),
            class = outcome.class.as_str(),
            bytes_out = len.and_then(|v| v.parse::<u64>().ok()),
            ms,
            store_error = outcome.store_error,
            auth_failure = outcome.auth_failure.map(|f| f.as_str()),
            "request"
        );
    } else {
        tracing::info!(
            target: "dockside::access",
            "{peer} {method} {path} {} {} {ms:.1}ms {id}",
            resp.status().as_u16(),
            len.unwrap_or("-"),
        );
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
