//! The native adapter: a hyper/tokio HTTP/1.1 server around [`Registry::handle`].
//!
//! It only translates: hyper's request goes to the core as it is (its body streams), the
//! core's response comes back as it is. It adds what a process needs: a listener, one log line
//! per request, and a clean stop on SIGINT/SIGTERM.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use bytes::Bytes;

use crate::DirRegistry;
use crate::body::Body;
use crate::error::StoreError;

/// How long a stop waits for requests in flight before giving up on them. Whatever they were
/// writing stays a temporary file, never a blob, and is swept at the next start.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves a local-directory registry on `listener` until `shutdown` completes.
pub async fn serve_dir(
    listener: TcpListener,
    registry: Arc<DirRegistry>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve(
        listener,
        move |req: hyper::Request<Incoming>| {
            let registry = registry.clone();
            async move {
                if !blocks(&req) {
                    return registry.handle(req).await;
                }
                // The directory host does blocking std::fs I/O (writes, fsyncs) and Basic auth
                // hashes a password (tens to hundreds of ms): run such requests on the blocking
                // pool, so they never stall the runtime's workers and the requests they serve.
                // The body keeps streaming: hyper's connection task feeds it from its own thread.
                let rt = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || rt.block_on(registry.handle(req)))
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!("request handler failed: {e}");
                        let mut resp = hyper::Response::new(Body::full(
                            r#"{"errors":[{"code":"UNKNOWN","message":"internal error"}]}"#,
                        ));
                        *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                        resp
                    })
            }
        },
        shutdown,
    )
    .await
}

/// Whether a request may block its thread for long: uploads and manifest pushes (they write and
/// fsync), deletes, and anything with Basic credentials (password hashing). Reads of manifests,
/// tags and blob metadata stay on the runtime: they are a few small page-cache reads.
fn blocks<B>(req: &hyper::Request<B>) -> bool {
    use http::Method;
    matches!(
        *req.method(),
        Method::PUT | Method::POST | Method::PATCH | Method::DELETE
    ) || req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.len() > 6 && v[..6].eq_ignore_ascii_case("basic "))
}

/// Serves `handler` (a registry's `handle`, for any concrete stores) on `listener` until
/// `shutdown` completes, then stops accepting, lets requests in flight finish (up to
/// [`SHUTDOWN_GRACE`]) and returns.
pub async fn serve<F, Fut, R>(
    listener: TcpListener,
    handler: F,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    F: Fn(hyper::Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = hyper::Response<Body<R>>> + Send + 'static,
    R: http_body::Body<Data = Bytes, Error = StoreError> + Unpin + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
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
                let handler = handler.clone();
                let service = service_fn(move |req: hyper::Request<Incoming>| {
                    let start = Instant::now();
                    let method = req.method().clone();
                    let path = req.uri().path().to_owned();
                    let fut = handler(req);
                    async move {
                        let resp = fut.await;
                        log_request(peer, &method, &path, &resp, start);
                        Ok::<_, Infallible>(resp)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("stopping: waiting for requests in flight");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("stopped"),
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("stopped with requests still in flight");
        }
    }
    Ok(())
}

/// One access-log line: peer, method, path, status, response length, time to the headers.
fn log_request<T>(
    peer: SocketAddr,
    method: &http::Method,
    path: &str,
    resp: &hyper::Response<T>,
    start: Instant,
) {
    let len = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info!(
        target: "dockside::access",
        "{peer} {method} {path} {} {len} {:.1}ms",
        resp.status().as_u16(),
        start.elapsed().as_secs_f64() * 1000.0
    );
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
