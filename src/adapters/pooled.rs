//! The directory host with its blocking calls on tokio's blocking pool (native server only).
//!
//! [`FsKv`] and [`FsBlobs`] use `std::fs` (so the same code serves `wasi:filesystem`): their
//! futures complete at once, having blocked their thread on disk I/O (writes, fsyncs, renames).
//! [`Pooled`] wraps one, as `object_store`'s wrappers wrap a store, and runs each blocking call on
//! the blocking pool, so the runtime's few workers never wait on the disk. Unlike running a
//! whole request on the pool, a request waiting for its client holds no thread: a blob write
//! collects the body on the runtime and hands it to the pool a batch at a time, and the write
//! itself (file, fsync, rename) is the directory host's own code.
//!
//! Small reads stay on the runtime, as they always did: opening a blob or reading a record is a
//! few page-cache reads, cheaper than a hop to the pool (manifest and blob `GET`s take tens of
//! microseconds end to end), and a blob's bytes stream from its [`FileReader`].

use std::collections::VecDeque;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::error::StoreError;
use crate::host::{BlobStore, ByteSource, KeyValue, WriteError};
use crate::hosts::fs::{FileReader, FsBlobs, FsKv};

/// How much of a request body is collected on the runtime before the pool writes it: one hop
/// to the pool per batch (a few microseconds) instead of one per network read.
const BATCH: usize = 256 * 1024;

/// A synchronous host whose blocking calls run on tokio's blocking pool. Implemented for the
/// directory host's two stores (the wrapper must move a host's write in progress between
/// threads, which it can only name for a concrete host).
#[derive(Clone)]
pub struct Pooled<H>(pub H);

/// Runs `f` on the blocking pool.
async fn on_pool<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::new(format!("a storage task failed: {e}")))
}

/// The output of a synchronous host's future, which is ready at its first poll.
fn now<T>(f: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    match std::pin::pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(StoreError::new(
            "a synchronous store call did not complete at once",
        )),
    }
}

impl KeyValue for Pooled<FsKv> {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        now(self.0.get(key))
    }

    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let (kv, key, value) = (self.0.clone(), key.to_owned(), value.to_vec());
        on_pool(move || now(kv.set(&key, &value))).await?
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let (kv, key) = (self.0.clone(), key.to_owned());
        on_pool(move || now(kv.delete(&key))).await?
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        // A listing walks directories: no bound on how long that takes.
        let (kv, prefix, after) = (self.0.clone(), prefix.to_owned(), after.map(str::to_owned));
        on_pool(move || now(kv.list(&prefix, after.as_deref(), limit))).await?
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let (kv, key) = (self.0.clone(), key.to_owned());
        let (expected, new) = (expected.map(<[u8]>::to_vec), new.to_vec());
        on_pool(move || now(kv.compare_and_swap(&key, expected.as_deref(), &new))).await?
    }
}

impl BlobStore for Pooled<FsBlobs> {
    type Reader = FileReader;

    /// The directory host's write runs on the pool, fed batches that were collected here, on
    /// the runtime: between batches (while the client is slow, or stalled until the server's
    /// body timeout) it is a parked future, holding no thread.
    async fn write<S: ByteSource>(
        &self,
        path: &str,
        src: &mut S,
    ) -> Result<u64, WriteError<S::Error>> {
        let feed = Arc::new(Mutex::new(Feed::default()));
        let mut source = FeedSource(feed.clone());
        let (blobs, path) = (self.0.clone(), path.to_owned());
        type Writer = Pin<Box<dyn Future<Output = Result<u64, WriteError<SourceFailed>>> + Send>>;
        let mut writer: Writer = Box::pin(async move { blobs.write(&path, &mut source).await });
        let mut failure = None;
        loop {
            let mut batch = Vec::new();
            let mut size = 0;
            let mut end = false;
            while size < BATCH {
                match src.next_chunk().await {
                    Some(Ok(chunk)) => {
                        size += chunk.len();
                        batch.push(chunk);
                    }
                    Some(Err(e)) => {
                        failure = Some(e);
                        end = true;
                        break;
                    }
                    None => {
                        end = true;
                        break;
                    }
                }
            }
            {
                let mut f = feed.lock().unwrap_or_else(|p| p.into_inner());
                f.chunks.extend(batch);
                if end {
                    f.end = Some(failure.is_none());
                }
            }
            // The write consumes the batch and then waits for the next one (or finishes). Any
            // waker will do: this loop, not a wake-up, decides when it is polled again.
            let (back, poll) = on_pool(move || {
                let poll = writer
                    .as_mut()
                    .poll(&mut Context::from_waker(Waker::noop()));
                (writer, poll)
            })
            .await?;
            writer = back;
            match poll {
                Poll::Ready(Ok(len)) => return Ok(len),
                Poll::Ready(Err(WriteError::Store(e))) => return Err(WriteError::Store(e)),
                Poll::Ready(Err(WriteError::Source(SourceFailed))) => {
                    return Err(match failure.take() {
                        Some(e) => WriteError::Source(e),
                        None => StoreError::new("the write saw a source failure").into(),
                    });
                }
                Poll::Pending if end => {
                    return Err(
                        StoreError::new("the blob write waited on more than its body").into(),
                    );
                }
                Poll::Pending => {}
            }
        }
    }

    async fn read(
        &self,
        path: &str,
        range: Option<Range<u64>>,
    ) -> Result<Option<FileReader>, StoreError> {
        now(self.0.read(path, range))
    }

    async fn size(&self, path: &str) -> Result<Option<u64>, StoreError> {
        now(self.0.size(path))
    }

    async fn delete(&self, path: &str) -> Result<(), StoreError> {
        let (blobs, path) = (self.0.clone(), path.to_owned());
        on_pool(move || now(blobs.delete(&path))).await?
    }

    async fn assemble(&self, parts: &[String], dest: &str) -> Result<(), StoreError> {
        let (blobs, parts, dest) = (self.0.clone(), parts.to_vec(), dest.to_owned());
        on_pool(move || now(blobs.assemble(&parts, &dest))).await?
    }
}

/// Batches handed from the runtime to a write on the pool.
#[derive(Default)]
struct Feed {
    chunks: VecDeque<Bytes>,
    /// Set once the body ended: `true` whole, `false` failed.
    end: Option<bool>,
}

/// The body failed (the reason stays with the caller).
struct SourceFailed;

/// What the directory host's write reads from: the batches fed so far. Pending when it has used
/// them all, until the next batch.
struct FeedSource(Arc<Mutex<Feed>>);

impl ByteSource for FeedSource {
    type Error = SourceFailed;

    fn next_chunk(&mut self) -> impl Future<Output = Option<Result<Bytes, SourceFailed>>> {
        std::future::poll_fn(|_| {
            let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
            match (f.chunks.pop_front(), f.end) {
                (Some(chunk), _) => Poll::Ready(Some(Ok(chunk))),
                (None, None) => Poll::Pending,
                (None, Some(true)) => Poll::Ready(None),
                (None, Some(false)) => Poll::Ready(Some(Err(SourceFailed))),
            }
        })
    }
}
