//! In-memory hosts, for tests and for embedding dockside in another program's tests.
//!
//! Both are cheap to clone: clones share the same data, so a test can build a new
//! [`crate::Registry`] per request over the same stores.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::error::StoreError;
use crate::host::{BlobStore, ByteSource, KeyValue, WriteError};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a map half-updated (every update is a single
    // insert or remove), so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A key-value store in a `BTreeMap`, with a real compare-and-swap. Clones share the map, so a
/// registry and a test can look at the same store. Its operations are shown on [`KeyValue`];
/// here a test looks at what a registry wrote through a clone:
///
/// ```
/// use dockside::{Config, MemoryBlobs, MemoryKv, Registry};
/// use http_body_util::Full;
///
/// # futures_executor::block_on(async {
/// let kv = MemoryKv::new();
/// let registry = Registry::new(kv.clone(), MemoryBlobs::new(), Config::default());
/// let digest = "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
/// let push = http::Request::post(format!("/v2/hello/blobs/uploads/?digest={digest}"))
///     .body(Full::new(&b"hello world"[..]))
///     .unwrap();
/// assert_eq!(registry.handle(push).await.status(), 201);
/// // The repository now links the blob (keys are drawn in `dockside::layout`).
/// let link = format!("repositories/hello/_layers/{}", digest.replace(':', "/"));
/// assert!(kv.keys().contains(&link), "{:?}", kv.keys());
/// # });
/// ```
#[derive(Clone, Default)]
pub struct MemoryKv {
    map: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl MemoryKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys stored (for tests).
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All keys, in order (for tests that inspect the layout).
    pub fn keys(&self) -> Vec<String> {
        lock(&self.map).keys().cloned().collect()
    }
}

impl KeyValue for MemoryKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(lock(&self.map).get(key).cloned())
    }

    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        lock(&self.map).insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        lock(&self.map).remove(key);
        Ok(())
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let map = lock(&self.map);
        let start = match after {
            Some(a) if a >= prefix => std::ops::Bound::Excluded(a.to_owned()),
            _ => std::ops::Bound::Included(prefix.to_owned()),
        };
        Ok(map
            .range((start, std::ops::Bound::Unbounded))
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let mut map = lock(&self.map);
        if map.get(key).map(Vec::as_slice) != expected {
            return Ok(false);
        }
        map.insert(key.to_owned(), new.to_vec());
        Ok(true)
    }
}

/// A blob store in memory. Objects are kept as the chunks they arrived in, so writing never
/// copies them into one big buffer. Clones share the objects. Its use is shown on
/// [`BlobStore`]; a whole registry on it in the [crate documentation](crate). A clone shows
/// where a pushed blob went:
///
/// ```
/// use dockside::{Config, MemoryBlobs, MemoryKv, Registry};
/// use http_body_util::Full;
///
/// # futures_executor::block_on(async {
/// let blobs = MemoryBlobs::new();
/// let registry = Registry::new(MemoryKv::new(), blobs.clone(), Config::default());
/// let hex = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
/// let push = http::Request::post(format!("/v2/hello/blobs/uploads/?digest=sha256:{hex}"))
///     .body(Full::new(&b"hello world"[..]))
///     .unwrap();
/// assert_eq!(registry.handle(push).await.status(), 201);
/// assert_eq!(blobs.paths(), [format!("blobs/sha256/{}/{hex}", &hex[..2])]);
/// # });
/// ```
#[derive(Clone, Default)]
pub struct MemoryBlobs {
    map: Arc<Mutex<HashMap<String, Arc<Vec<Bytes>>>>>,
}

impl MemoryBlobs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Paths of all objects, sorted (for tests).
    pub fn paths(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.map).keys().cloned().collect();
        v.sort();
        v
    }
}

impl BlobStore for MemoryBlobs {
    type Reader = MemoryReader;

    async fn write<S: ByteSource>(
        &self,
        path: &str,
        src: &mut S,
    ) -> Result<u64, WriteError<S::Error>> {
        let mut chunks = Vec::new();
        let mut len = 0u64;
        while let Some(chunk) = src.next_chunk().await {
            let chunk = chunk.map_err(WriteError::Source)?;
            len += chunk.len() as u64;
            chunks.push(chunk);
        }
        lock(&self.map).insert(path.to_owned(), Arc::new(chunks));
        Ok(len)
    }

    async fn read(
        &self,
        path: &str,
        range: Option<Range<u64>>,
    ) -> Result<Option<MemoryReader>, StoreError> {
        let Some(chunks) = lock(&self.map).get(path).cloned() else {
            return Ok(None);
        };
        let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        let range = range.unwrap_or(0..total);
        Ok(Some(MemoryReader {
            chunks,
            index: 0,
            pos: 0,
            range,
        }))
    }

    async fn size(&self, path: &str) -> Result<Option<u64>, StoreError> {
        Ok(lock(&self.map)
            .get(path)
            .map(|c| c.iter().map(|c| c.len() as u64).sum()))
    }

    async fn delete(&self, path: &str) -> Result<(), StoreError> {
        lock(&self.map).remove(path);
        Ok(())
    }

    async fn assemble(&self, parts: &[String], dest: &str) -> Result<(), StoreError> {
        let mut map = lock(&self.map);
        let mut chunks = Vec::new();
        for p in parts {
            let c = map
                .get(p)
                .ok_or_else(|| StoreError::new(format!("missing upload part {p}")))?;
            chunks.extend(c.iter().cloned());
        }
        for p in parts {
            map.remove(p);
        }
        map.insert(dest.to_owned(), Arc::new(chunks));
        Ok(())
    }
}

/// Streams a byte range of an in-memory object, chunk by chunk, without copying.
pub struct MemoryReader {
    chunks: Arc<Vec<Bytes>>,
    index: usize,
    /// Offset of `chunks[index]` within the object.
    pos: u64,
    range: Range<u64>,
}

impl http_body::Body for MemoryReader {
    type Data = Bytes;
    type Error = StoreError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StoreError>>> {
        while self.index < self.chunks.len() && self.range.start < self.range.end {
            let chunk = self.chunks[self.index].clone();
            let (start, end) = (self.pos, self.pos + chunk.len() as u64);
            self.index += 1;
            self.pos = end;
            if end <= self.range.start {
                continue;
            }
            let from = (self.range.start - start) as usize;
            let to = (self.range.end.min(end) - start) as usize;
            self.range.start = start + to as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk.slice(from..to)))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.range.start >= self.range.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.range.end.saturating_sub(self.range.start))
    }
}
