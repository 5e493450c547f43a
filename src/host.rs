//! The storage host interfaces: everything the core needs from the place it runs (the third,
//! an outbound HTTP client, is in [`crate::http_client`]).
//!
//! The core never does I/O itself: it calls these traits, and an adapter supplies
//! implementations (memory, a local directory, Spin's key-value store, ...). Methods are async
//! because some hosts are (Spin's key-value store); hosts that are not simply return ready
//! futures. No `Send` bound is written here: on wasm there are no threads, and natively the
//! futures of a concrete host are `Send` when its types are.

use std::future::Future;
use std::ops::Range;

use bytes::Bytes;

use crate::error::StoreError;

/// A key-value store. Keys are `/`-separated strings built by [`crate::layout`]; values are
/// small (records, links, manifests of at most a few MiB).
///
/// What every host provides, shown on [`crate::MemoryKv`]:
///
/// ```
/// use dockside::{KeyValue, MemoryKv};
///
/// # futures_executor::block_on(async {
/// let kv = MemoryKv::new();
/// kv.set("repo/a/tag/v1", b"sha256:...").await.unwrap();
/// kv.set("repo/a/tag/v2", b"sha256:...").await.unwrap();
/// kv.set("repo/b/tag/v1", b"sha256:...").await.unwrap();
/// assert_eq!(kv.get("repo/a/tag/v1").await.unwrap().as_deref(), Some(&b"sha256:..."[..]));
///
/// // Ordered listings by prefix, one page at a time: the cursor is the last key seen.
/// let page = kv.list("repo/a/", None, 1).await.unwrap();
/// assert_eq!(page, ["repo/a/tag/v1"]);
/// let next = kv.list("repo/a/", Some(&page[0]), 10).await.unwrap();
/// assert_eq!(next, ["repo/a/tag/v2"]);
///
/// // Compare-and-swap: the second writer that expected the old value loses.
/// assert!(kv.compare_and_swap("lock", None, b"mine").await.unwrap());
/// assert!(!kv.compare_and_swap("lock", None, b"theirs").await.unwrap());
/// assert!(kv.compare_and_swap("lock", Some(b"mine"), b"released").await.unwrap());
///
/// kv.delete("repo/a/tag/v1").await.unwrap();
/// assert_eq!(kv.get("repo/a/tag/v1").await.unwrap(), None);
/// # });
/// ```
pub trait KeyValue {
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>>;

    fn set(&self, key: &str, value: &[u8]) -> impl Future<Output = Result<(), StoreError>>;

    /// Sets every key to its value. Hosts with a batch write override this (Spin's SQLite store
    /// writes a batch in one transaction, so one fsync instead of one per value); the default
    /// sets them one by one. Not atomic: after an error some may be set.
    /// Takes the entries by value, so a host that needs owned bytes moves them, not copies.
    fn set_many(
        &self,
        entries: Vec<(String, Bytes)>,
    ) -> impl Future<Output = Result<(), StoreError>> {
        async move {
            for (k, v) in &entries {
                self.set(k, v).await?;
            }
            Ok(())
        }
    }

    /// Deletes `key`. Deleting an absent key is not an error.
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StoreError>>;

    /// Up to `limit` keys that start with `prefix`, in ascending byte order, strictly after
    /// `after` when it is given (a cursor: the last key of the previous page).
    fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>>;

    /// Sets `key` to `new` only if its current value is `expected` (`None`: absent), and says
    /// whether it did. Hosts with an atomic compare-and-swap override this; the default reads
    /// then writes, which is only as safe as the host's consistency allows.
    fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> impl Future<Output = Result<bool, StoreError>> {
        async move {
            let current = self.get(key).await?;
            if current.as_deref() != expected {
                return Ok(false);
            }
            self.set(key, new).await?;
            Ok(true)
        }
    }
}

/// A source of bytes handed to [`BlobStore::write`]: the core wraps a request body in one that
/// hashes and counts what passes through.
pub trait ByteSource {
    /// Why the source stopped early (the client went away, a size limit was crossed...).
    type Error;

    /// The next chunk, `None` at the end.
    fn next_chunk(&mut self) -> impl Future<Output = Option<Result<Bytes, Self::Error>>>;
}

/// Why a [`BlobStore::write`] failed: the source, or the store.
#[derive(Debug)]
pub enum WriteError<E> {
    Source(E),
    Store(StoreError),
}

impl<E> From<StoreError> for WriteError<E> {
    fn from(e: StoreError) -> Self {
        WriteError::Store(e)
    }
}

/// A blob store: whole objects by path, written once, read as streams or ranges.
///
/// Writing from any [`ByteSource`], then reading a range back, on [`crate::MemoryBlobs`]:
///
/// ```
/// use bytes::Bytes;
/// use dockside::{BlobStore, ByteSource, MemoryBlobs};
/// use http_body_util::BodyExt;
///
/// /// The chunks of a vector, one at a time (the core hands the store a hashing request body).
/// struct Chunks(std::vec::IntoIter<Bytes>);
///
/// impl ByteSource for Chunks {
///     type Error = std::convert::Infallible;
///     async fn next_chunk(&mut self) -> Option<Result<Bytes, Self::Error>> {
///         self.0.next().map(Ok)
///     }
/// }
///
/// # futures_executor::block_on(async {
/// let blobs = MemoryBlobs::new();
/// let mut src = Chunks(vec![Bytes::from("hello "), Bytes::from("world")].into_iter());
/// assert_eq!(blobs.write("objects/greeting", &mut src).await.unwrap(), 11);
/// assert_eq!(blobs.size("objects/greeting").await.unwrap(), Some(11));
///
/// let reader = blobs.read("objects/greeting", Some(6..11)).await.unwrap().unwrap();
/// let bytes = reader.collect().await.unwrap().to_bytes();
/// assert_eq!(&bytes[..], b"world");
///
/// blobs.delete("objects/greeting").await.unwrap();
/// assert!(blobs.read("objects/greeting", None).await.unwrap().is_none());
/// # });
/// ```
pub trait BlobStore {
    /// A streaming reader over a blob or a range of it. Its `size_hint` is exact.
    type Reader: http_body::Body<Data = Bytes, Error = StoreError> + Unpin;

    /// Streams `src` into a new object at `path` and returns its length. The object appears
    /// whole or not at all: if the source or the store fails, nothing is left at `path`.
    fn write<S: ByteSource>(
        &self,
        path: &str,
        src: &mut S,
    ) -> impl Future<Output = Result<u64, WriteError<S::Error>>>;

    /// Opens the object at `path`, or the byte range `range` of it (which the caller has
    /// checked lies within the object). `None` if there is no such object.
    fn read(
        &self,
        path: &str,
        range: Option<Range<u64>>,
    ) -> impl Future<Output = Result<Option<Self::Reader>, StoreError>>;

    /// The object's length, or `None` if there is no such object.
    fn size(&self, path: &str) -> impl Future<Output = Result<Option<u64>, StoreError>>;

    /// Deletes the object. Deleting an absent object is not an error.
    fn delete(&self, path: &str) -> impl Future<Output = Result<(), StoreError>>;

    /// Makes `dest` the concatenation of `parts`, in order, and removes the parts; with no
    /// parts, `dest` is empty. Like `write`, `dest` appears whole or not at all. Hosts do this
    /// without copying where they can (a rename of a single part, a list of chunks).
    fn assemble(
        &self,
        parts: &[String],
        dest: &str,
    ) -> impl Future<Output = Result<(), StoreError>>;

    /// The smallest chunk this store wants from chunked uploads, advertised as
    /// `OCI-Chunk-Min-Length` when the configuration sets none (S3: its 5 MiB minimum part, so
    /// uploads close by copies inside the store). `None` by default.
    fn min_chunk_length(&self) -> Option<u64> {
        None
    }

    /// A URL from which a client may fetch the object at `path` itself for `ttl` (a presigned
    /// URL of object storage), or `None` when the store cannot make one (the default).
    fn redirect_url(&self, path: &str, ttl: std::time::Duration) -> Option<String> {
        let _ = (path, ttl);
        None
    }
}

/// One page of a key listing, for hosts that can only enumerate keys (Spin's key-value store
/// lists every key, unfiltered and unordered): the keys with `prefix`, sorted, strictly after
/// `after`, at most `limit`. Costs a pass over every key given; only the page is sorted.
pub fn page_of(
    keys: impl IntoIterator<Item = String>,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> Vec<String> {
    let mut page: Vec<String> = keys
        .into_iter()
        .filter(|k| k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a))
        .collect();
    if limit < page.len() {
        // The `limit` smallest first (linear), then drop the rest unsorted.
        page.select_nth_unstable(limit);
        page.truncate(limit);
    }
    page.sort_unstable();
    page
}

#[cfg(test)]
mod tests {
    use super::page_of;

    #[test]
    fn pages() {
        let keys = ["b/2", "a/1", "b/1", "b/3", "c", "b"].map(String::from);
        assert_eq!(page_of(keys.clone(), "b/", None, 10), ["b/1", "b/2", "b/3"]);
        assert_eq!(page_of(keys.clone(), "b/", Some("b/1"), 1), ["b/2"]);
        assert_eq!(
            page_of(keys.clone(), "b/", Some("b/3"), 10),
            Vec::<String>::new()
        );
        assert_eq!(page_of(keys, "", Some("b/3"), 10), ["c"]);
    }
}
