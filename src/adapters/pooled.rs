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
use tokio::sync::Notify;

use crate::error::StoreError;
use crate::host::{BlobStore, ByteSource, KeyValue, WriteError};
use crate::hosts::fs::{FileReader, FsBlobs, FsKv};

/// How far reading a request body may run ahead of writing it (bytes held in memory).
const AHEAD: usize = 1024 * 1024;

/// A directory-host write in progress, moved to the pool and back.
type Writer = Pin<Box<dyn Future<Output = Result<u64, WriteError<SourceFailed>>> + Send>>;

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

    /// The directory host's write runs on the pool, fed what arrives here, on the runtime:
    /// reading the body and writing it overlap, and while the client is slow or stalled (until
    /// the server's body timeout) the write is a parked future holding no thread. Each trip to
    /// the pool writes everything that arrived since the last one.
    async fn write<S: ByteSource>(
        &self,
        path: &str,
        src: &mut S,
    ) -> Result<u64, WriteError<S::Error>> {
        let feed = Arc::new(Mutex::new(Feed::default()));
        let lock = || feed.lock().unwrap_or_else(|p| p.into_inner());
        // `arrived`: the feed has bytes or its end; `room`: the feed has room for more.
        let (arrived, room) = (Notify::new(), Notify::new());
        let mut failure = None;
        let result = {
            let read = async {
                loop {
                    loop {
                        let full = lock().bytes >= AHEAD;
                        if !full {
                            break;
                        }
                        room.notified().await;
                    }
                    let next = src.next_chunk().await;
                    let ended = {
                        let mut f = lock();
                        match next {
                            Some(Ok(chunk)) => {
                                f.bytes += chunk.len();
                                f.chunks.push_back(chunk);
                            }
                            Some(Err(e)) => {
                                failure = Some(e);
                                f.end = Some(false);
                            }
                            None => f.end = Some(true),
                        }
                        f.end.is_some()
                    };
                    arrived.notify_one();
                    if ended {
                        return;
                    }
                }
            };
            let write = async {
                let mut source = FeedSource(feed.clone());
                let (blobs, path) = (self.0.clone(), path.to_owned());
                let mut writer: Writer =
                    Box::pin(async move { blobs.write(&path, &mut source).await });
                loop {
                    loop {
                        let ready = {
                            let f = lock();
                            !f.chunks.is_empty() || f.end.is_some()
                        };
                        if ready {
                            break;
                        }
                        arrived.notified().await;
                    }
                    let ended = lock().end.is_some();
                    // The write takes what the feed holds, then waits for more (or finishes).
                    // Any waker will do: this loop, not a wake-up, polls it again.
                    let (back, poll) = on_pool(move || {
                        let poll = writer
                            .as_mut()
                            .poll(&mut Context::from_waker(Waker::noop()));
                        (writer, poll)
                    })
                    .await
                    .map_err(WriteError::Store)?;
                    writer = back;
                    room.notify_one();
                    match poll {
                        Poll::Ready(r) => return r,
                        Poll::Pending if ended => {
                            return Err(StoreError::new(
                                "the blob write waited on more than its body",
                            )
                            .into());
                        }
                        Poll::Pending => {}
                    }
                }
            };
            tokio::pin!(read, write);
            tokio::select! {
                r = &mut write => r,
                () = &mut read => write.await,
            }
        };
        result.map_err(|e| match e {
            WriteError::Store(e) => WriteError::Store(e),
            WriteError::Source(SourceFailed) => match failure.take() {
                Some(e) => WriteError::Source(e),
                None => StoreError::new("the write saw a body failure").into(),
            },
        })
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
    /// The length of `chunks`.
    bytes: usize,
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
                (Some(chunk), _) => {
                    f.bytes -= chunk.len();
                    Poll::Ready(Some(Ok(chunk)))
                }
                (None, None) => Poll::Pending,
                (None, Some(true)) => Poll::Ready(None),
                (None, Some(false)) => Poll::Ready(Some(Err(SourceFailed))),
            }
        })
    }
}
