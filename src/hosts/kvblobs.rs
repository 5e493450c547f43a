//! A blob store built on any key-value store, for hosts that have no blob store (Spin gives a
//! component a key-value store only).
//!
//! An object is a list of *segments*; a segment is a run of fixed-size chunk values written by
//! one `write`. The object's record is written last, so an object appears whole or not at all,
//! and `assemble` only concatenates segment lists: no byte is copied.
//!
//! Keys (built in [`crate::layout`]):
//! ```text
//! kvblob/obj/<path>                 {"size":N,"chunk":C,"segments":[{"id":"<nonce>","size":n},...]}
//! kvblob/chunk/<nonce>/<index:08>   chunk bytes (C each, the last of a segment shorter)
//! ```
//!
//! Costs: a read of a chunk is one `get`; a 1 GiB blob with 1 MiB chunks is 1024 keys. Chunk
//! values must fit the host's value limit (Spin: 128 MiB; the default chunk is 1 MiB).

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::host::{BlobStore, ByteSource, KeyValue, WriteError};
use crate::layout;

/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK: usize = 1024 * 1024;

/// How many bytes of full chunks a write gathers before it stores them in one batch
/// ([`KeyValue::set_many`]): the memory a write holds, at most this plus one chunk. Under
/// `spin up` on SQLite, 8 MiB batches were no faster than 2 MiB ones and let the host's memory
/// grow by up to 199 MiB over a 1 GiB push (it copies each batch), against about 32 MiB.
pub const BATCH_BYTES: usize = 2 * 1024 * 1024;

#[derive(Serialize, Deserialize, Clone)]
struct Segment {
    id: String,
    size: u64,
}

#[derive(Serialize, Deserialize, Clone)]
struct Object {
    size: u64,
    /// Chunk size the segments were written with.
    chunk: u64,
    segments: Vec<Segment>,
}

/// A [`BlobStore`] over a [`KeyValue`] store, in chunks of `chunk_size` bytes: what the Spin
/// component runs on Spin's key-value store. Here on [`crate::MemoryKv`], with a chunk size
/// small enough to show the chunks:
///
/// ```
/// use dockside::{Config, KeyValue, KvBlobs, MemoryKv, Registry};
/// use http_body_util::Full;
///
/// # futures_executor::block_on(async {
/// let kv = MemoryKv::new();
/// let registry = Registry::new(kv.clone(), KvBlobs::with_chunk_size(kv.clone(), 4), Config::default());
/// let digest = "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
/// let push = http::Request::post(format!("/v2/hello/blobs/uploads/?digest={digest}"))
///     .body(Full::new(&b"hello world"[..]))
///     .unwrap();
/// assert_eq!(registry.handle(push).await.status(), 201);
///
/// // 11 bytes in 4-byte chunks: three chunk values in the key-value store.
/// let chunks = kv.list("kvblob/chunk/", None, 100).await.unwrap();
/// assert_eq!(chunks.len(), 3);
/// # });
/// ```
#[derive(Clone)]
pub struct KvBlobs<K> {
    kv: K,
    chunk_size: usize,
}

impl<K: KeyValue + Clone + 'static> KvBlobs<K> {
    pub fn new(kv: K) -> Self {
        Self::with_chunk_size(kv, DEFAULT_CHUNK)
    }

    pub fn with_chunk_size(kv: K, chunk_size: usize) -> Self {
        assert!(chunk_size > 0, "chunk size must be positive");
        KvBlobs { kv, chunk_size }
    }

    async fn load(&self, path: &str) -> Result<Option<Object>, StoreError> {
        match self.kv.get(&layout::kvblob_object(path)).await? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::new(format!("corrupt blob record {path}: {e}"))),
        }
    }

    async fn delete_segment(&self, seg: &Segment, chunk: u64) -> Result<(), StoreError> {
        for i in 0..seg.size.div_ceil(chunk) {
            self.kv.delete(&layout::kvblob_chunk(&seg.id, i)).await?;
        }
        Ok(())
    }
}

fn nonce() -> Result<String, StoreError> {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).map_err(|e| StoreError::new(format!("no randomness: {e}")))?;
    Ok(crate::digest::to_hex(&b))
}

impl<K: KeyValue + Clone + 'static> BlobStore for KvBlobs<K> {
    type Reader = KvReader<K>;

    async fn write<S: ByteSource>(
        &self,
        path: &str,
        src: &mut S,
    ) -> Result<u64, WriteError<S::Error>> {
        let id = nonce()?;
        let chunk = self.chunk_size;
        let mut buf = BytesMut::with_capacity(chunk);
        // Full chunks wait here until they make a batch of about BATCH_BYTES, written with one
        // `set_many` (on Spin's SQLite store one transaction: one fsync per batch, not per chunk).
        let mut batch: Vec<(String, Bytes)> = Vec::new();
        let mut index = 0u64;
        let mut size = 0u64;
        let result: Result<(), WriteError<S::Error>> = async {
            while let Some(data) = src.next_chunk().await {
                let mut data = data.map_err(WriteError::Source)?;
                size += data.len() as u64;
                while !data.is_empty() {
                    let take = (chunk - buf.len()).min(data.len());
                    buf.extend_from_slice(&data.split_to(take));
                    if buf.len() == chunk {
                        let full = std::mem::replace(&mut buf, BytesMut::with_capacity(chunk));
                        batch.push((layout::kvblob_chunk(&id, index), full.freeze()));
                        index += 1;
                        if batch.len() * chunk >= BATCH_BYTES {
                            self.kv.set_many(std::mem::take(&mut batch)).await?;
                        }
                    }
                }
            }
            if !buf.is_empty() {
                batch.push((layout::kvblob_chunk(&id, index), buf.split().freeze()));
            }
            if !batch.is_empty() {
                self.kv.set_many(batch).await?;
            }
            Ok(())
        }
        .await;
        let seg = Segment { id, size };
        if let Err(e) = result {
            let _ = self.delete_segment(&seg, chunk as u64).await;
            return Err(e);
        }
        let obj = Object {
            size,
            chunk: chunk as u64,
            segments: if size == 0 { Vec::new() } else { vec![seg] },
        };
        let v = serde_json::to_vec(&obj).expect("serializes");
        self.kv.set(&layout::kvblob_object(path), &v).await?;
        Ok(size)
    }

    async fn read(
        &self,
        path: &str,
        range: Option<Range<u64>>,
    ) -> Result<Option<KvReader<K>>, StoreError> {
        let Some(obj) = self.load(path).await? else {
            return Ok(None);
        };
        let range = range.unwrap_or(0..obj.size);
        Ok(Some(KvReader {
            kv: self.kv.clone(),
            obj,
            pos: range.start,
            end: range.end,
            pending: None,
        }))
    }

    async fn size(&self, path: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.load(path).await?.map(|o| o.size))
    }

    async fn delete(&self, path: &str) -> Result<(), StoreError> {
        let Some(obj) = self.load(path).await? else {
            return Ok(());
        };
        // The record first: once it is gone the object is gone, whatever happens to the chunks.
        self.kv.delete(&layout::kvblob_object(path)).await?;
        for seg in &obj.segments {
            self.delete_segment(seg, obj.chunk).await?;
        }
        Ok(())
    }

    async fn assemble(&self, parts: &[String], dest: &str) -> Result<(), StoreError> {
        let mut obj = Object {
            size: 0,
            chunk: self.chunk_size as u64,
            segments: Vec::new(),
        };
        for p in parts {
            let part = self
                .load(p)
                .await?
                .ok_or_else(|| StoreError::new(format!("missing upload part {p}")))?;
            if part.chunk != obj.chunk && !part.segments.is_empty() {
                return Err(StoreError::new(
                    "upload parts written with another chunk size",
                ));
            }
            obj.size += part.size;
            obj.segments.extend(part.segments);
        }
        let v = serde_json::to_vec(&obj).expect("serializes");
        self.kv.set(&layout::kvblob_object(dest), &v).await?;
        // The chunks now belong to `dest`: drop only the parts' records.
        for p in parts {
            self.kv.delete(&layout::kvblob_object(p)).await?;
        }
        Ok(())
    }
}

type ChunkFuture = Pin<Box<dyn Future<Output = Result<Option<Vec<u8>>, StoreError>>>>;

/// Streams a range of a chunked object, one chunk `get` at a time.
pub struct KvReader<K> {
    kv: K,
    obj: Object,
    pos: u64,
    end: u64,
    /// The chunk being fetched, and where in it the range continues.
    pending: Option<(ChunkFuture, usize, usize)>,
}

impl<K> Unpin for KvReader<K> {}

impl<K: KeyValue + Clone + 'static> KvReader<K> {
    /// The chunk holding byte `pos`: its key, and the offsets within it to return.
    fn locate(&self) -> Option<(String, usize, usize)> {
        let mut seg_start = 0;
        for seg in &self.obj.segments {
            if self.pos < seg_start + seg.size {
                let within = self.pos - seg_start;
                let index = within / self.obj.chunk;
                let chunk_start = seg_start + index * self.obj.chunk;
                let from = (self.pos - chunk_start) as usize;
                let chunk_end = (chunk_start + self.obj.chunk).min(seg_start + seg.size);
                let to = (self.end.min(chunk_end) - chunk_start) as usize;
                return Some((layout::kvblob_chunk(&seg.id, index), from, to));
            }
            seg_start += seg.size;
        }
        None
    }
}

impl<K: KeyValue + Clone + 'static> http_body::Body for KvReader<K> {
    type Data = Bytes;
    type Error = StoreError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StoreError>>> {
        if self.pos >= self.end {
            return Poll::Ready(None);
        }
        if self.pending.is_none() {
            let Some((key, from, to)) = self.locate() else {
                return Poll::Ready(Some(Err(StoreError::new("blob shorter than its record"))));
            };
            let kv = self.kv.clone();
            let fut: ChunkFuture = Box::pin(async move { kv.get(&key).await });
            self.pending = Some((fut, from, to));
        }
        let (fut, from, to) = self.pending.as_mut().expect("set above");
        let (from, to) = (*from, *to);
        match fut.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                self.pending = None;
                match r {
                    Err(e) => Poll::Ready(Some(Err(e))),
                    Ok(None) => Poll::Ready(Some(Err(StoreError::new("blob chunk is missing")))),
                    Ok(Some(v)) if v.len() < to => {
                        Poll::Ready(Some(Err(StoreError::new("blob chunk is short"))))
                    }
                    Ok(Some(v)) => {
                        self.pos += (to - from) as u64;
                        let b = Bytes::from(v).slice(from..to);
                        Poll::Ready(Some(Ok(Frame::data(b))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end.saturating_sub(self.pos))
    }
}
