//! A pull-through mirror: repositories whose names map to an upstream registry are filled from it
//! on demand, then served from the local stores like any other repository.
//!
//! Everything here is core: the adapter supplies only the configuration ([`Mirror::from_toml`])
//! and an outbound client ([`UpstreamClient`], implemented for every [`crate::HttpClient`]).
//! State lives in the key-value store (tokens, tag freshness, fetch leases: see
//! [`crate::layout`]), never in memory, so edge instances that come and go share it.
//!
//! - `config`: upstreams and how local names map to them (prefixes, Docker Hub's `library/`,
//!   containerd's `?ns=`).
//! - `upstream`: requests to an upstream with its Bearer challenge flow, redirects followed.
//! - `fetch`: manifests (by digest forever, by tag with a TTL then a revalidating HEAD) and
//!   blobs (one fetch per digest under a lease, verified before they become visible).
//! - `lists`: tags and referrers lists, the upstream's answer else the cached one.
//! - `stream`: a blob streamed to its first client while it is fetched and stored.

mod config;
mod fetch;
mod lists;
mod stream;
mod upstream;

pub(crate) use config::Target;
pub use config::{Mirror, Upstream};
pub use stream::{EarlyResponse, PipeBody};
pub use upstream::{BoxFuture, UpBody, UpstreamClient};
