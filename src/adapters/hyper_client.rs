//! The native outbound HTTP client: hyper over tokio, pooled keep-alive connections, http and
//! https (rustls, the system's root certificates). What the S3 blob store sends its requests
//! through in `dockside serve`.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::StoreError;
use crate::http_client::{HttpClient, OutBody};

/// How long a request may wait for the response's headers (a part copy inside the store can
/// take a while), and for a connection.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a response body may go without a byte.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A pooled hyper client. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct HyperClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, OutBody>,
}

impl HyperClient {
    pub fn new() -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("cannot load the system's root certificates: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(HyperClient { client })
    }
}

impl HttpClient for HyperClient {
    type Body = ResponseBody;

    async fn send(
        &self,
        req: http::Request<OutBody>,
    ) -> Result<http::Response<ResponseBody>, StoreError> {
        let target = format!("{} {}", req.method(), req.uri().host().unwrap_or("?"));
        match tokio::time::timeout(RESPONSE_TIMEOUT, self.client.request(req)).await {
            Err(_) => Err(StoreError::unavailable(format!(
                "{target}: no answer within {RESPONSE_TIMEOUT:?}"
            ))),
            Ok(Err(e)) => Err(StoreError::unavailable(format!("{target}: {e}"))),
            Ok(Ok(resp)) => Ok(resp.map(|b| ResponseBody {
                inner: b,
                idle: None,
            })),
        }
    }

    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await
    }
}

/// A response body; a transport failure, or a body that stalls, is a store error.
pub struct ResponseBody {
    inner: hyper::body::Incoming,
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = StoreError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StoreError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                self.idle = None;
                Poll::Ready(r.map(|f| f.map_err(|e| StoreError::unavailable(e.to_string()))))
            }
            Poll::Pending => {
                let idle = self
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(BODY_IDLE_TIMEOUT)));
                match idle.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(StoreError::unavailable(format!(
                        "the store sent nothing for {BODY_IDLE_TIMEOUT:?}"
                    ))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The mirror's upstream client (`crate::mirror`): hyper's futures are `Send`.
impl crate::mirror::UpstreamClient for HyperClient {
    fn send_boxed(
        &self,
        req: http::Request<OutBody>,
    ) -> crate::mirror::BoxFuture<'_, Result<http::Response<crate::mirror::UpBody>, StoreError>>
    {
        Box::pin(async move {
            let r = self.send(req).await?;
            Ok(r.map(|b| Box::pin(b) as crate::mirror::UpBody))
        })
    }

    fn sleep_boxed(&self, d: Duration) -> crate::mirror::BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(d))
    }
}
