//! The third host interface: an outbound HTTP client, for hosts that are themselves HTTP
//! services (S3-compatible object storage today; upstream registries for a pull-through
//! mirror next).
//!
//! The core still does no I/O: a host built on this interface (such as [`crate::S3Blobs`])
//! prepares `http::Request`s and reads `http::Response`s, and the adapter supplies the client
//! that moves them: hyper over tokio natively, `wasi:http/outgoing-handler` in the wasi:http
//! component, Spin's outbound HTTP in the Spin component. Request and response bodies stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::error::StoreError;

/// Sends requests. Errors (the peer cannot be reached, the connection broke, a timeout) are
/// [`StoreError`]s, [`crate::StoreErrorKind::Unavailable`] when trying again may help; an
/// HTTP error status is a response like any other, for the caller to judge.
pub trait HttpClient {
    /// A response body. Its `size_hint` is exact when the response had a `Content-Length`.
    type Body: http_body::Body<Data = Bytes, Error = StoreError> + Unpin;

    fn send(
        &self,
        req: http::Request<OutBody>,
    ) -> impl Future<Output = Result<http::Response<Self::Body>, StoreError>>;

    /// Waits `d` before a retry. Hosts without a timer may return at once (retries then come
    /// back to back, which is still correct).
    fn sleep(&self, d: Duration) -> impl Future<Output = ()> {
        let _ = d;
        std::future::ready(())
    }
}

/// The body of an outbound request: empty, a buffer, or a stream.
pub struct OutBody(Inner);

/// A streaming request body (`Send`, so the native client can hand it to its connection task).
pub type BoxedStream = Pin<Box<dyn http_body::Body<Data = Bytes, Error = StoreError> + Send>>;

enum Inner {
    Full(Option<Bytes>),
    Stream(BoxedStream),
}

impl OutBody {
    pub fn empty() -> Self {
        OutBody(Inner::Full(None))
    }

    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        OutBody(Inner::Full((!b.is_empty()).then_some(b)))
    }

    pub fn stream(s: BoxedStream) -> Self {
        OutBody(Inner::Stream(s))
    }

    /// The whole body when it is a buffer (a retry sends it again), `None` for a stream.
    pub fn as_bytes(&self) -> Option<Bytes> {
        match &self.0 {
            Inner::Full(b) => Some(b.clone().unwrap_or_default()),
            Inner::Stream(_) => None,
        }
    }
}

impl http_body::Body for OutBody {
    type Data = Bytes;
    type Error = StoreError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StoreError>>> {
        match &mut self.0 {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream(s) => s.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Full(b) => b.is_none(),
            Inner::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Stream(s) => s.size_hint(),
        }
    }
}
