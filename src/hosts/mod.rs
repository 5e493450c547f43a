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

#[cfg(all(target_arch = "wasm32", target_os = "unknown", feature = "workers"))]
pub mod durable;
pub mod fs;
mod fs_journal;
pub mod indexed;
pub mod kvblobs;
pub mod mem;
#[cfg(all(target_arch = "wasm32", target_os = "unknown", feature = "workers"))]
pub mod r2;
#[cfg(all(feature = "redis", not(target_arch = "wasm32")))]
pub mod redis;
pub mod s3;
