//! The hosts: implementations of the core's storage interfaces ([`crate::KeyValue`],
//! [`crate::BlobStore`]), one module each. Each is self-contained; `tests/api.rs` runs the whole
//! API suite on every one of them.
//!
//! - [`mem`]: in memory, for tests and embedding.
//! - [`fs`]: a local directory (`std::fs` only, so also `wasi:filesystem`): the native
//!   server's default, and the wasi:http component's storage.
//! - [`indexed`]: listing indexes over a key-value store that can only list every key (Spin).
//! - [`kvblobs`]: a blob store on any key-value store, in chunks (Spin, which has no blob store).
//! - [`s3`]: a blob store on S3-compatible object storage, through the outbound HTTP host
//!   interface ([`crate::http_client`]).
//! - `redis`: a key-value store on Valkey/Redis (native only, feature `redis`).
//! - `r2` and `durable`: blobs in Cloudflare R2 and keys in a Durable Object, for the Worker
//!   (`wasm32-unknown-unknown`, feature `workers`).
//!
//! # From a pair of hosts to a registry
//!
//! A [`crate::Registry`] is one key-value store and one blob store, any pair: the key-value
//! store holds every record, the blob store every blob's bytes. The pairs the adapters run:
//!
//! | keys | blobs | where |
//! | --- | --- | --- |
//! | [`mem::MemoryKv`] | [`mem::MemoryBlobs`] | tests, embedding (`MemoryRegistry::in_memory`) |
//! | [`fs::FsKv`] on `<dir>/kv` | [`fs::FsBlobs`] on `<dir>` | `dockside serve`, wasi:http (`DirRegistry::open_dir`) |
//! | `redis::RedisKv` | [`s3::S3Blobs`] | several `dockside serve` on shared stores (example on `RedisKv`) |
//! | [`indexed::IndexedKv`] over Spin's store | [`kvblobs::KvBlobs`] on the same store | the Spin component |
//!
//! Hosts mix freely; here blobs chunked into the same in-memory key-value store that holds
//! the records, with listing indexes, as the Spin component stores:
//!
//! ```
//! use dockside::hosts::indexed::IndexedKv;
//! use dockside::{Config, KvBlobs, MemoryKv, Registry};
//! use http_body_util::Full;
//!
//! # futures_executor::block_on(async {
//! let kv = IndexedKv(MemoryKv::new());
//! let registry = Registry::new(kv.clone(), KvBlobs::new(kv), Config::default());
//! let digest = "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
//! let push = http::Request::post(format!("/v2/hello/blobs/uploads/?digest={digest}"))
//!     .body(Full::new(&b"hello world"[..]))
//!     .unwrap();
//! assert_eq!(registry.handle(push).await.status(), 201);
//! # });
//! ```
//!
//! Natively, `dockside::adapters::server` serves a registry over HTTP: its `registry` takes
//! the server's hosts (the directory pair, Redis, S3) and runs blocking disk work off the
//! async runtime; `serve_registry` serves it until a future completes (feature `server`):
//!
//! ```no_run
//! use std::sync::Arc;
//! use dockside::adapters::server::{self, Limits, Ops};
//! use dockside::{Config, FsBlobs, FsKv};
//!
//! # #[tokio::main] async fn main() -> std::io::Result<()> {
//! let dir = std::path::Path::new("/var/lib/dockside");
//! let limits = Limits::default();
//! let registry = server::registry(
//!     FsKv::new(dir.join("kv"))?,
//!     FsBlobs::new(dir)?,
//!     Config::default(),
//!     &limits,
//! )?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:5000").await?;
//! server::serve_registry(
//!     listener,
//!     Arc::new(registry),
//!     limits,
//!     Ops::default(),
//!     server::shutdown_signal(),
//! )
//! .await
//! # }
//! ```

#[cfg(all(target_arch = "wasm32", target_os = "unknown", feature = "workers"))]
pub mod durable;
pub mod fs;
mod fs_journal;
mod fs_write;
pub mod indexed;
pub mod kvblobs;
pub mod mem;
#[cfg(all(target_arch = "wasm32", target_os = "unknown", feature = "workers"))]
pub mod r2;
#[cfg(all(feature = "redis", not(target_arch = "wasm32")))]
pub mod redis;
pub mod s3;
