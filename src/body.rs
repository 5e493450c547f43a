//! Bodies: the response body type the core returns, and the adapter that turns a request body
//! into a hashed, size-bounded [`ByteSource`] for the blob store.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

use crate::behind::{Behind, Sink};
use crate::digest::Hasher;
use crate::error::StoreError;
use crate::host::ByteSource;

/// The body of every response of the core: empty, a buffer, or a blob streaming from the blob
/// store (`R` is the store's reader). Implements [`http_body::Body`], so hyper and the wasm
/// adapters send it as it is.
pub struct Body<R> {
    kind: Kind<R>,
}

enum Kind<R> {
    Empty,
    Full(Option<Bytes>),
    Stream(R),
    /// A mirrored blob streaming while it is fetched (`crate::mirror::EarlyResponse`).
    Pipe(crate::mirror::PipeBody),
}

impl<R> Body<R> {
    pub fn empty() -> Self {
        Body { kind: Kind::Empty }
    }

    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        if b.is_empty() {
            return Body::empty();
        }
        Body {
            kind: Kind::Full(Some(b)),
        }
    }

    pub fn stream(r: R) -> Self {
        Body {
            kind: Kind::Stream(r),
        }
    }

    /// The body of an early response (`crate::mirror::EarlyResponse`).
    pub fn pipe(p: crate::mirror::PipeBody) -> Self {
        Body {
            kind: Kind::Pipe(p),
        }
    }
}

impl<R> http_body::Body for Body<R>
where
    R: http_body::Body<Data = Bytes, Error = StoreError> + Unpin,
{
    type Data = Bytes;
    type Error = StoreError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StoreError>>> {
        match &mut self.get_mut().kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(r) => Pin::new(r).poll_frame(cx),
            Kind::Pipe(p) => Pin::new(p).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Stream(r) => r.is_end_stream(),
            Kind::Pipe(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(r) => r.size_hint(),
            Kind::Pipe(p) => http_body::Body::size_hint(p),
        }
    }
}

/// Why reading a request body stopped.
#[derive(Debug)]
pub enum ReadError {
    /// The body failed (the client went away, or the connection broke).
    Body(String),
    /// More than the allowed number of bytes arrived.
    TooLarge { limit: u64 },
}

/// A request body as a [`ByteSource`]: every byte that passes goes through `hasher` (when there
/// is one) and is counted, and the stream fails once it exceeds `limit`. Past 4 MiB the hashing
/// runs on a thread of its own ([`crate::behind`]), overlapping with receiving: SHA-256 was half
/// of a large push's time on the receiving thread.
pub struct Hashing<B> {
    body: B,
    hasher: Option<Behind<Hasher>>,
    pub count: u64,
    limit: u64,
}

impl Sink for Hasher {
    fn write(&mut self, chunk: &Bytes) -> std::io::Result<()> {
        self.update(chunk);
        Ok(())
    }
}

impl<B> Hashing<B> {
    pub fn new(body: B, hasher: Option<Hasher>, limit: u64) -> Self {
        Hashing {
            body,
            hasher: hasher.map(|h| Behind::new("dockside-hash", h)),
            count: 0,
            limit,
        }
    }

    /// The hash of every byte that passed, once its thread (if any) has caught up.
    pub fn finish_hash(&mut self) -> Result<Hasher, StoreError> {
        self.hasher
            .take()
            .ok_or_else(|| StoreError::new("the body was read without a hash"))?
            .finish()
            .map_err(|e| StoreError::new(format!("hashing the body: {e}")))
    }
}

impl<B> ByteSource for Hashing<B>
where
    B: http_body::Body + Unpin,
    B::Error: std::fmt::Display,
{
    type Error = ReadError;

    async fn next_chunk(&mut self) -> Option<Result<Bytes, ReadError>> {
        loop {
            let frame = match self.body.frame().await? {
                Ok(f) => f,
                Err(e) => return Some(Err(ReadError::Body(e.to_string()))),
            };
            let Ok(mut data) = frame.into_data() else {
                continue; // trailers carry nothing we store
            };
            let bytes = data.copy_to_bytes(data.remaining());
            if bytes.is_empty() {
                continue;
            }
            self.count += bytes.len() as u64;
            if self.count > self.limit {
                return Some(Err(ReadError::TooLarge { limit: self.limit }));
            }
            if let Some(h) = &mut self.hasher
                && let Err(e) = h.push(bytes.clone())
            {
                return Some(Err(ReadError::Body(format!("hashing the body: {e}"))));
            }
            return Some(Ok(bytes));
        }
    }
}

/// Reads a whole (small) body into memory, failing past `limit` bytes.
pub async fn read_to_vec<B>(body: B, limit: u64) -> Result<Vec<u8>, ReadError>
where
    B: http_body::Body + Unpin,
    B::Error: std::fmt::Display,
{
    let mut src = Hashing::new(body, None, limit);
    let mut out = Vec::new();
    while let Some(chunk) = src.next_chunk().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}
