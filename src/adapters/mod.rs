//! The adapters: each turns one platform's requests into [`crate::Registry::handle`] calls and
//! wires up that platform's stores. They translate and nothing more; everything else is core.
//!
//! - `server`: the native tokio/hyper server (feature `server`), with `pooled`, the directory
//!   host with its blocking calls on tokio's blocking pool, and `hyper_client`, its outbound
//!   HTTP client (for S3), `tls` (certificates, reloaded) and `metrics` (Prometheus).
//! - `remote`: opening Valkey/Redis and S3 from their URLs, for the server and `lambda`.
//! - `lambda`: the AWS Lambda function (feature `lambda`, `lambda_http`), on S3 and Redis.
//! - `spin`: the Spin component (feature `spin`, `wasm32-wasip2`), with `spin_http_client`, its
//!   outbound HTTP client on spin-sdk's `http::send` (for S3).
//! - `wasi_http`: the `wasi:http/proxy` component for `wasmtime serve` (feature `wasi-http`),
//!   with `wasi_http_client`, its outbound HTTP client on `wasi:http/outgoing-handler` (for S3).
//! - `component_log`: both components' `tracing` events as JSON lines on stderr.
//! - `workers`: the Cloudflare Worker (feature `workers`, `wasm32-unknown-unknown`), on R2 and a
//!   Durable Object.

#[cfg(all(feature = "server", not(target_arch = "wasm32")))]
pub mod hyper_client;
#[cfg(all(feature = "lambda", not(target_arch = "wasm32")))]
pub mod lambda;
#[cfg(all(feature = "server", not(target_arch = "wasm32")))]
pub mod metrics;
#[cfg(all(feature = "server", not(target_arch = "wasm32")))]
pub mod pooled;
#[cfg(all(feature = "server", not(target_arch = "wasm32")))]
pub mod remote;
#[cfg(all(feature = "server", not(target_arch = "wasm32")))]
pub mod server;
#[cfg(all(feature = "server", not(target_arch = "wasm32")))]
pub mod tls;

#[cfg(all(feature = "spin", feature = "wasi-http"))]
compile_error!("build one component at a time: feature `spin` or feature `wasi-http`");
#[cfg(all(target_arch = "wasm32", any(feature = "spin", feature = "wasi-http")))]
mod component_log;
#[cfg(all(target_arch = "wasm32", feature = "spin"))]
mod spin;
#[cfg(all(target_arch = "wasm32", feature = "spin"))]
mod spin_http_client;
#[cfg(all(target_arch = "wasm32", feature = "wasi-http"))]
mod wasi_http;
#[cfg(all(target_arch = "wasm32", feature = "wasi-http"))]
mod wasi_http_client;
#[cfg(all(target_arch = "wasm32", target_os = "unknown", feature = "workers"))]
mod workers;
