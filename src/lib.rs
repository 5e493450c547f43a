//! # dockside
//!
//! An OCI Distribution registry (distribution-spec v1.1.1 and the newer text on main) as a
//! sans-IO core: [`Registry::handle`] maps an [`http::Request`] to an [`http::Response`] whose
//! body streams, against host interfaces: a [`KeyValue`] store and a [`BlobStore`] (and an
//! [`HttpClient`] for stores that are HTTP services, such as [`S3Blobs`]). The core
//! owns no I/O, no clock-driven tasks and no runtime: the adapter that calls it owns the sockets
//! (the native server in this crate, a Spin or `wasi:http` component elsewhere), and the hosts
//! own storage. Nothing is kept in memory between requests.
//!
//! An in-memory registry, one request:
//!
//! ```
//! use dockside::{Config, MemoryBlobs, MemoryKv, Registry};
//! use http_body_util::{BodyExt, Full};
//!
//! # futures_executor::block_on(async {
//! let registry = Registry::new(MemoryKv::new(), MemoryBlobs::new(), Config::default());
//!
//! // Push a blob in one request, then read it back.
//! let digest = "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
//! let push = http::Request::post(format!("/v2/hello/blobs/uploads/?digest={digest}"))
//!     .body(Full::new(&b"hello world"[..]))
//!     .unwrap();
//! assert_eq!(registry.handle(push).await.status(), 201);
//!
//! let pull = http::Request::get(format!("/v2/hello/blobs/{digest}"))
//!     .body(Full::new(&b""[..]))
//!     .unwrap();
//! let resp = registry.handle(pull).await;
//! assert_eq!(resp.status(), 200);
//! let body = resp.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(&body[..], b"hello world");
//! # });
//! ```
//!
//! The layout of everything stored is drawn in [`layout`]; `docs/ARCHITECTURE.md` in the
//! repository shows the layers.

pub mod adapters;
mod admission;
pub mod auth;
mod behind;
mod blobs;
mod body;
pub mod clock;
mod counters;
mod digest;
mod error;
pub mod gc;
pub mod host;
pub mod hosts;
pub mod http_client;
pub mod layout;
mod lists;
mod manifests;
pub mod mirror;
mod names;
pub mod observe;
mod registry;
mod request;
#[cfg(feature = "testing")]
pub mod testing;
pub mod throttle;
mod uploads;

pub use auth::AuthConfig;
pub use body::Body;
pub use digest::{Algorithm, Digest};
pub use error::{Error, ErrorCode, StoreError, StoreErrorKind};
pub use gc::{GcConfig, GcProgress, GcReport, GcStats, RetentionRule};
pub use host::{BlobStore, ByteSource, KeyValue, WriteError};
pub use hosts::fs::{FsBlobs, FsKv};
pub use hosts::kvblobs::KvBlobs;
pub use hosts::mem::{MemoryBlobs, MemoryKv};
#[cfg(all(feature = "redis", not(target_arch = "wasm32")))]
pub use hosts::redis::RedisKv;
pub use hosts::s3::{S3Blobs, S3Config};
pub use http_client::{HttpClient, OutBody};
pub use names::{RepoName, Tag};
pub use registry::{Config, Registry, RegistryResponse};
pub use throttle::{ClientAddr, LoginLimits};

/// A registry over in-memory stores, for tests and embedding.
pub type MemoryRegistry = Registry<MemoryKv, MemoryBlobs>;

impl MemoryRegistry {
    /// An empty in-memory registry with the default configuration.
    ///
    /// ```
    /// # futures_executor::block_on(async {
    /// let registry = dockside::MemoryRegistry::in_memory();
    /// let req = http::Request::get("/v2/").body(http_body_util::Empty::<bytes::Bytes>::new());
    /// assert_eq!(registry.handle(req.unwrap()).await.status(), 200);
    /// # });
    /// ```
    pub fn in_memory() -> Self {
        Registry::new(MemoryKv::new(), MemoryBlobs::new(), Config::default())
    }
}

/// A registry over a local directory: the native server's storage.
pub type DirRegistry = Registry<FsKv, FsBlobs>;

impl DirRegistry {
    /// A registry storing under `dir` (created if missing): `dir/kv` for the key-value store,
    /// the rest for blobs (the layout of `dockside serve --data <dir>`), fsync on. What an
    /// earlier registry or server stored there is served again:
    ///
    /// ```
    /// use dockside::{Config, DirRegistry};
    /// use http_body_util::Full;
    ///
    /// # futures_executor::block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let digest = "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
    /// let first = DirRegistry::open_dir(dir.path(), Config::default()).unwrap();
    /// let push = http::Request::post(format!("/v2/hello/blobs/uploads/?digest={digest}"))
    ///     .body(Full::new(&b"hello world"[..]))
    ///     .unwrap();
    /// assert_eq!(first.handle(push).await.status(), 201);
    /// drop(first);
    ///
    /// let again = DirRegistry::open_dir(dir.path(), Config::default()).unwrap();
    /// let head = http::Request::head(format!("/v2/hello/blobs/{digest}"))
    ///     .body(Full::new(&b""[..]))
    ///     .unwrap();
    /// assert_eq!(again.handle(head).await.status(), 200);
    /// # });
    /// ```
    pub fn open_dir(dir: impl AsRef<std::path::Path>, config: Config) -> std::io::Result<Self> {
        let dir = dir.as_ref();
        Ok(Registry::new(
            FsKv::new(dir.join("kv"))?,
            FsBlobs::new(dir)?,
            config,
        ))
    }
}
