//! A blob store on Cloudflare R2, through the Worker's bucket binding (workers-rs
//! [`worker::Bucket`]); built only for the Worker (`wasm32-unknown-unknown`, feature `workers`).
//!
//! - Writes stream in bounded memory: a blob of at most one part ([`PART_BYTES`]) is one `put`;
//!   a longer one, or one of unknown length, becomes a multipart upload of equal parts (R2
//!   requires every part but the last to have the same size), completed only once the source
//!   has ended, so the object appears whole or not at all; on failure the upload is aborted.
//! - Reads stream the object's body, or a byte range of it (R2's ranged `get`).
//! - `assemble` copies: the bucket binding has no server-side copy (no `UploadPartCopy`), so
//!   the parts of a chunked upload are read back and streamed into a new object. The chunks a
//!   client sends are capped by the plan's request body limit, so a Worker never holds more
//!   than one part of them.

use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use http_body::{Frame, SizeHint};
use worker::{Bucket, ByteStream, Data, UploadedPart};

use crate::error::StoreError;
use crate::host::{BlobStore, ByteSource, WriteError};

/// The size of every part of a multipart upload but the last (R2: at least 5 MiB, all equal),
/// and the most a write buffers. 10 MiB keeps a Worker (128 MB of memory) far from its limit.
pub const PART_BYTES: usize = 10 * 1024 * 1024;

fn r2_error(what: &str, path: &str, e: worker::Error) -> StoreError {
    StoreError::unavailable(format!("R2 {what} {path}: {e}"))
}

/// A [`BlobStore`] in one R2 bucket, objects under `prefix`.
#[derive(Clone)]
pub struct R2Blobs {
    bucket: Bucket,
    prefix: String,
}

impl R2Blobs {
    /// Objects go to `bucket` under `prefix` (empty, or ending in `/`).
    pub fn new(bucket: Bucket, prefix: impl Into<String>) -> Self {
        R2Blobs {
            bucket,
            prefix: prefix.into(),
        }
    }

    fn key(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }

    /// Streams `src` into a multipart upload of equal parts; `buf` holds what was read already.
    async fn write_multipart<S: ByteSource>(
        &self,
        key: &str,
        mut buf: Vec<u8>,
        src: &mut S,
    ) -> Result<u64, WriteError<S::Error>> {
        let upload = self
            .bucket
            .create_multipart_upload(key)
            .execute()
            .await
            .map_err(|e| r2_error("create multipart upload", key, e))?;
        let mut parts: Vec<UploadedPart> = Vec::new();
        let mut total = 0u64;
        let result: Result<(), WriteError<S::Error>> = async {
            loop {
                while buf.len() >= PART_BYTES {
                    let rest = buf.split_off(PART_BYTES);
                    let part = std::mem::replace(&mut buf, rest);
                    total += part.len() as u64;
                    parts.push(upload_part(&upload, key, parts.len(), part).await?);
                }
                match src.next_chunk().await {
                    None => break,
                    Some(Err(e)) => return Err(WriteError::Source(e)),
                    Some(Ok(b)) => buf.extend_from_slice(&b),
                }
            }
            if !buf.is_empty() {
                total += buf.len() as u64;
                let last = std::mem::take(&mut buf);
                parts.push(upload_part(&upload, key, parts.len(), last).await?);
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                upload
                    .complete(parts)
                    .await
                    .map_err(|e| r2_error("complete multipart upload", key, e))?;
                Ok(total)
            }
            Err(e) => {
                // Nothing is left behind: the parts go with the aborted upload.
                let _ = upload.abort().await;
                Err(e)
            }
        }
    }
}

async fn upload_part(
    upload: &worker::MultipartUpload,
    key: &str,
    done: usize,
    bytes: Vec<u8>,
) -> Result<UploadedPart, StoreError> {
    let n = u16::try_from(done + 1)
        .ok()
        .filter(|&n| n <= 10_000)
        .ok_or_else(|| StoreError::new("more than 10 000 parts in one R2 object"))?;
    upload
        .upload_part(n, Data::Bytes(bytes))
        .await
        .map_err(|e| r2_error("upload part", key, e))
}

/// An R2 object's body (or a range of it) as an `http_body::Body`, its length exact.
pub struct R2Reader {
    stream: Option<ByteStream>,
    remaining: u64,
}

impl http_body::Body for R2Reader {
    type Data = Bytes;
    type Error = StoreError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StoreError>>> {
        let Some(stream) = self.stream.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(stream).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.stream = None;
                if self.remaining > 0 {
                    return Poll::Ready(Some(Err(StoreError::unavailable(format!(
                        "R2 object body ended {} bytes short",
                        self.remaining
                    )))));
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(chunk))) => {
                self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
            }
            Poll::Ready(Some(Err(e))) => {
                self.stream = None;
                Poll::Ready(Some(Err(StoreError::unavailable(format!(
                    "R2 object body: {e}"
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// The parts of a chunked upload, read back one after the other: the source `assemble`
/// streams into the new object.
struct Concat<'a> {
    store: &'a R2Blobs,
    parts: std::slice::Iter<'a, String>,
    current: Option<R2Reader>,
}

impl ByteSource for Concat<'_> {
    type Error = StoreError;

    async fn next_chunk(&mut self) -> Option<Result<Bytes, StoreError>> {
        use http_body_util::BodyExt;
        loop {
            if let Some(reader) = self.current.as_mut() {
                match reader.frame().await {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => return Some(Ok(data)),
                        Err(_) => continue,
                    },
                    Some(Err(e)) => return Some(Err(e)),
                    None => self.current = None,
                }
            }
            let part = self.parts.next()?;
            match self.store.read(part, None).await {
                Ok(Some(reader)) => self.current = Some(reader),
                Ok(None) => {
                    return Some(Err(StoreError::new(format!("missing upload part {part}"))));
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl BlobStore for R2Blobs {
    type Reader = R2Reader;

    async fn write<S: ByteSource>(
        &self,
        path: &str,
        src: &mut S,
    ) -> Result<u64, WriteError<S::Error>> {
        let key = self.key(path);
        let mut buf = Vec::new();
        while buf.len() < PART_BYTES {
            match src.next_chunk().await {
                None => {
                    // Short enough for one request: one put, atomic in itself.
                    let len = buf.len() as u64;
                    self.bucket
                        .put(&key, Data::Bytes(buf))
                        .execute()
                        .await
                        .map_err(|e| r2_error("put", &key, e))?;
                    return Ok(len);
                }
                Some(Err(e)) => return Err(WriteError::Source(e)),
                Some(Ok(b)) => buf.extend_from_slice(&b),
            }
        }
        self.write_multipart(&key, buf, src).await
    }

    async fn read(
        &self,
        path: &str,
        range: Option<Range<u64>>,
    ) -> Result<Option<R2Reader>, StoreError> {
        let key = self.key(path);
        let mut get = self.bucket.get(&key);
        if let Some(r) = &range {
            get = get.range(worker::Range::OffsetWithLength {
                offset: r.start,
                length: r.end - r.start,
            });
        }
        let Some(object) = get.execute().await.map_err(|e| r2_error("get", &key, e))? else {
            return Ok(None);
        };
        let remaining = match &range {
            Some(r) => r.end - r.start,
            None => object.size(),
        };
        if remaining == 0 {
            return Ok(Some(R2Reader {
                stream: None,
                remaining: 0,
            }));
        }
        let body = object
            .body()
            .ok_or_else(|| StoreError::new(format!("R2 get {key}: no body")))?;
        let stream = body.stream().map_err(|e| r2_error("get", &key, e))?;
        Ok(Some(R2Reader {
            stream: Some(stream),
            remaining,
        }))
    }

    async fn size(&self, path: &str) -> Result<Option<u64>, StoreError> {
        let key = self.key(path);
        let head = self
            .bucket
            .head(&key)
            .await
            .map_err(|e| r2_error("head", &key, e))?;
        Ok(head.map(|o| o.size()))
    }

    async fn delete(&self, path: &str) -> Result<(), StoreError> {
        let key = self.key(path);
        self.bucket
            .delete(&key)
            .await
            .map_err(|e| r2_error("delete", &key, e))
    }

    async fn assemble(&self, parts: &[String], dest: &str) -> Result<(), StoreError> {
        let mut src = Concat {
            store: self,
            parts: parts.iter(),
            current: None,
        };
        self.write(dest, &mut src).await.map_err(|e| match e {
            WriteError::Source(e) | WriteError::Store(e) => e,
        })?;
        for p in parts {
            self.delete(p).await?;
        }
        Ok(())
    }
}
