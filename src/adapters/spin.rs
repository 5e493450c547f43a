//! The Spin component (spin-sdk 6.0, Spin 4.x): `spin build && spin up` with the `spin.toml`
//! at the repository root.
//!
//! It only translates. Spin's request is already an `http::Request` whose body streams, and
//! the core's response streams back as it is. Keys are in Spin's key-value store. Blobs are
//! chunked into the same store ([`KvBlobs`]) unless the Spin variable `blobs` names an S3
//! bucket: then they are objects there ([`S3Blobs`]), sent through Spin's outbound HTTP
//! ([`SpinClient`]). Upload records are compare-and-swapped through `wasi:keyvalue/atomics`
//! (see [`SpinKv`]), so PATCHes racing on one session on different instances cannot both win.
//!
//! Spin may run a fresh instance per request or serve several requests at once from one
//! instance: nothing here is kept between requests, and there are no globals.
//!
//! Settings are Spin variables (declared in `spin.toml`): `auth_config` (the access
//! configuration, a TOML document with an `[auth]` table), `auth_secret` (the token signing
//! secret, a Spin secret), `auth_realm`, `auth_service`, `auth_issuer`, `auth_token_ttl`, the
//! limits `max_manifest_bytes`, `max_blob_bytes`, `max_chunk_bytes`, `chunk_min_length`,
//! `no_delete`, `no_tag_delete`, `blob_redirect`, the failed-login limits `login_window_secs`,
//! `login_failures_per_user_address`, `login_failures_per_user`, `login_failures_per_address`,
//! `trust_forwarded_for`, and the upload limits `max_uploads`, `max_uploads_per_repository`,
//! `upload_expiry_secs`: each is the `DOCKSIDE_*` setting of the same name, lower-cased without
//! the prefix. Empty means unset. S3 blobs: `blobs` (`s3://bucket[/prefix]?region=..`, as
//! `--blobs`), `s3_endpoint` (also what `spin.toml`'s `allowed_outbound_hosts` lets the
//! component reach), `s3_access_key`, `s3_secret_key`.
//!
//! The client address (for the failed-login counts) is the last `spin-client-addr` header: the
//! Spin runtime adds it to every request it hands over, after any a client sent.

use std::cell::OnceCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use http_body_util::Either;
use spin_sdk::experimental::wasi::keyvalue::{atomics, batch, store as wasi_kv};
use spin_sdk::http::{IntoResponse, Request};
use spin_sdk::key_value::Store;

use super::spin_http_client::SpinClient;
use crate::error::StoreError;
use crate::host::{BlobStore, KeyValue, page_of};
use crate::hosts::indexed::IndexedKv;
use crate::hosts::kvblobs::KvReader;
use crate::mirror::{EarlyResponse, PipeBody};
use crate::observe::AccessRecord;
use crate::{Body, Config, KvBlobs, Registry, S3Blobs, S3Config};

type S3Reader = <S3Blobs<SpinClient> as BlobStore>::Reader;
/// The core's response over either blob store.
type CoreResponse = http::Response<Either<Body<KvReader<SpinKv>>, Body<S3Reader>>>;
/// What the component answers: the core's response, or a mirrored blob streaming while the
/// request's future still fetches it ([`Driven`]).
type Response = http::Response<Either<Either<Body<KvReader<SpinKv>>, Body<S3Reader>>, Driven>>;

#[spin_sdk::http_service]
async fn handle(req: Request) -> impl IntoResponse {
    super::component_log::install();
    let start = std::time::Instant::now();
    let (method, path, headers) = (
        req.method().clone(),
        req.uri().path().to_owned(),
        req.headers().clone(),
    );
    let resp: Response = respond(req).await;
    // The access record (route class, status, latency, bytes, failures): one JSON line on
    // stderr per request, the component's metrics.
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "{}",
        AccessRecord::of(&method, &path, &headers, &resp, ms).to_json()
    );
    resp
}

async fn respond(mut req: Request) -> Response {
    // Spin's own header: the peer of the connection (`ip:port`). Spin 4.0.2 appends it after
    // any the client sent (tests/spin.rs sends one), so the last one is Spin's.
    if let Some(addr) = req
        .headers()
        .get_all("spin-client-addr")
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(crate::throttle::parse_addr)
    {
        req.extensions_mut().insert(crate::ClientAddr(addr));
    }
    let store = match Store::open_default().await {
        Ok(s) => SpinKv {
            store: Rc::new(s),
            bucket: Rc::default(),
        },
        Err(e) => {
            // The registry's error envelope needs a registry; answer in the same shape.
            return plain_error(format!(
                "cannot open the key-value store \"default\": {e:?}"
            ));
        }
    };
    let config = match config().await {
        Ok(c) => c,
        Err(msg) => return plain_error(format!("invalid configuration: {msg}")),
    };
    let blobs = match s3_blobs().await {
        Ok(b) => b,
        Err(msg) => return plain_error(format!("invalid configuration: {msg}")),
    };
    if config.blob_redirect.is_some() && blobs.is_none() {
        return plain_error(
            "invalid configuration: blob_redirect needs S3 blobs (the Spin variable blobs): \
             the key-value store cannot make presigned URLs"
                .to_owned(),
        );
    }
    // Keys through listing indexes (Spin lists every key of the store, chunks included).
    let keys = IndexedKv(store.clone());
    // A cold mirrored blob streams while it is fetched: the core hands an early response over
    // (`mirror::EarlyResponse`), and its body keeps polling the request's future, which feeds it.
    let slot: Arc<Mutex<Option<http::Response<PipeBody>>>> = Arc::default();
    let put = slot.clone();
    req.extensions_mut().insert(EarlyResponse::new(move |r| {
        *put.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
    }));
    let mut handling: Pin<Box<dyn Future<Output = CoreResponse>>> = match blobs {
        Some(s3) => Box::pin(async move {
            Registry::new(keys, s3, config)
                .handle(req)
                .await
                .map(Either::Right)
        }),
        None => {
            let chunk = match chunk_bytes().await {
                Ok(c) => c,
                Err(msg) => return plain_error(format!("invalid configuration: {msg}")),
            };
            // Chunks straight into the store, never listed.
            Box::pin(async move {
                Registry::new(keys, KvBlobs::with_chunk_size(store, chunk), config)
                    .handle(req)
                    .await
                    .map(Either::Left)
            })
        }
    };
    let take = || slot.lock().unwrap_or_else(PoisonError::into_inner).take();
    let first = std::future::poll_fn(|cx| {
        let done = handling.as_mut().poll(cx);
        if let Some(early) = take() {
            return Poll::Ready(Err((early, done.is_ready())));
        }
        done.map(Ok)
    })
    .await;
    match first {
        Ok(resp) => resp.map(Either::Left),
        Err((early, done)) => early.map(|pipe| {
            Either::Right(Driven {
                pipe,
                driver: (!done).then_some(handling),
            })
        }),
    }
}

/// A mirrored blob's early body, which polls the request's future (feeding it) whenever it is
/// polled: once the handler has returned, Spin keeps running only what the response body
/// polls. Dropped (the client went away), the fetch is abandoned and its lease expires.
struct Driven {
    pipe: PipeBody,
    driver: Option<Pin<Box<dyn Future<Output = CoreResponse>>>>,
}

impl http_body::Body for Driven {
    type Data = bytes::Bytes;
    type Error = StoreError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, StoreError>>> {
        let this = self.get_mut();
        if let Some(d) = &mut this.driver
            && d.as_mut().poll(cx).is_ready()
        {
            this.driver = None;
        }
        Pin::new(&mut this.pipe).poll_frame(cx)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.pipe.size_hint()
    }
}

/// What `spin.toml` gives `s3_endpoint` when it is not set: Spin refuses an empty entry in
/// `allowed_outbound_hosts`, so the default is a host that can never resolve (RFC 2606's
/// `.invalid`), read here as unset.
const S3_ENDPOINT_UNSET: &str = "https://unset.invalid";

/// The S3 blob store when the Spin variable `blobs` names a bucket (`s3://...`, as `dockside
/// serve --blobs`), else `None`: blobs then go into the key-value store. The endpoint is the
/// URL's `endpoint=`, else the variable `s3_endpoint` (which `spin.toml` also allows as an
/// outbound host); credentials are `s3_access_key` and `s3_secret_key`.
async fn s3_blobs() -> Result<Option<S3Blobs<SpinClient>>, String> {
    let Some(url) = variable("blobs").await? else {
        return Ok(None);
    };
    let endpoint = variable("s3_endpoint")
        .await?
        .filter(|e| e.trim_end_matches('/') != S3_ENDPOINT_UNSET);
    let access_key = variable("s3_access_key").await?;
    let secret_key = variable("s3_secret_key").await?;
    let get = |k: &str| match k {
        "DOCKSIDE_S3_ENDPOINT" => endpoint.clone(),
        "DOCKSIDE_S3_ACCESS_KEY" => access_key.clone(),
        "DOCKSIDE_S3_SECRET_KEY" => secret_key.clone(),
        _ => None,
    };
    let s3 = S3Config::from_url(url.trim(), get).map_err(|e| {
        format!(
            "Spin variable blobs: {e} (the endpoint may also come from s3_endpoint, the keys \
             from s3_access_key and s3_secret_key)"
        )
    })?;
    S3Blobs::new(&s3, SpinClient)
        .map(Some)
        .map_err(|e| format!("Spin variable blobs: {e}"))
}

/// A Spin variable, `None` when empty or not declared.
async fn variable(name: &str) -> Result<Option<String>, String> {
    match spin_sdk::variables::get(name).await {
        Ok(v) if !v.trim().is_empty() => Ok(Some(v)),
        Ok(_) | Err(spin_sdk::variables::Error::Undefined(_)) => Ok(None),
        Err(e) => Err(format!("Spin variable {name}: {e:?}")),
    }
}

/// The Spin variables read, by the `DOCKSIDE_*` setting each stands for.
const VARIABLES: &[(&str, &str)] = &[
    ("DOCKSIDE_AUTH_CONFIG", "auth_config"),
    ("DOCKSIDE_AUTH_SECRET", "auth_secret"),
    ("DOCKSIDE_AUTH_REALM", "auth_realm"),
    ("DOCKSIDE_AUTH_SERVICE", "auth_service"),
    ("DOCKSIDE_AUTH_ISSUER", "auth_issuer"),
    ("DOCKSIDE_AUTH_TOKEN_TTL", "auth_token_ttl"),
    ("DOCKSIDE_MAX_MANIFEST_BYTES", "max_manifest_bytes"),
    ("DOCKSIDE_MAX_BLOB_BYTES", "max_blob_bytes"),
    ("DOCKSIDE_MAX_CHUNK_BYTES", "max_chunk_bytes"),
    ("DOCKSIDE_CHUNK_MIN_LENGTH", "chunk_min_length"),
    ("DOCKSIDE_NO_DELETE", "no_delete"),
    ("DOCKSIDE_NO_TAG_DELETE", "no_tag_delete"),
    ("DOCKSIDE_LOGIN_WINDOW_SECS", "login_window_secs"),
    (
        "DOCKSIDE_LOGIN_FAILURES_PER_USER_ADDRESS",
        "login_failures_per_user_address",
    ),
    (
        "DOCKSIDE_LOGIN_FAILURES_PER_USER",
        "login_failures_per_user",
    ),
    (
        "DOCKSIDE_LOGIN_FAILURES_PER_ADDRESS",
        "login_failures_per_address",
    ),
    ("DOCKSIDE_TRUST_FORWARDED_FOR", "trust_forwarded_for"),
    ("DOCKSIDE_MAX_UPLOADS", "max_uploads"),
    (
        "DOCKSIDE_MAX_UPLOADS_PER_REPOSITORY",
        "max_uploads_per_repository",
    ),
    ("DOCKSIDE_UPLOAD_EXPIRY_SECS", "upload_expiry_secs"),
    ("DOCKSIDE_BLOB_REDIRECT", "blob_redirect"),
    ("DOCKSIDE_GC_CONFIG", "gc_config"),
];

/// The configuration from Spin variables. A variable the manifest does not declare is unset.
async fn config() -> Result<Config, String> {
    let mut values = Vec::new();
    for (setting, name) in VARIABLES {
        if let Some(v) = variable(name).await? {
            values.push((*setting, v));
        }
    }
    let mut config =
        Config::from_settings(|k| values.iter().find(|(s, _)| *s == k).map(|(_, v)| v.clone()))?;
    // A pull-through mirror (README, "Mirror"): its upstreams must also be allowed outbound
    // hosts, which `spin.toml` takes from the variable `mirror_upstream`.
    if let Some(text) = variable("mirror_config").await? {
        let client = std::sync::Arc::new(SpinClient);
        let m = crate::mirror::Mirror::from_toml(&text, client)
            .map_err(|e| format!("Spin variable mirror_config: {e}"))?;
        // `Config` holds an `Arc` (shared across threads natively); wasm has one thread.
        #[allow(clippy::arc_with_non_send_sync)]
        let m = std::sync::Arc::new(m);
        config.mirror = Some(m);
    }
    Ok(config)
}

/// The largest chunk value: local Spin caps a key-value value at 128 MiB, and the component
/// holds one chunk in memory while it streams.
const MAX_CHUNK_BYTES: usize = 64 * 1024 * 1024;

/// The size of the key-value values blobs are chunked into: the Spin variable `chunk_bytes`
/// (default 1 MiB, at most [`MAX_CHUNK_BYTES`]). Larger chunks mean fewer key-value writes per
/// blob (on Spin's SQLite store, one transaction and its fsyncs per chunk); Fermyon Cloud
/// accepts values of 1 MB only, so leave it unset there. Blobs keep the chunk size they were
/// written with, so it may change between runs (not during an upload).
async fn chunk_bytes() -> Result<usize, String> {
    match spin_sdk::variables::get("chunk_bytes").await {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<usize>() {
            Ok(n) if (1024..=MAX_CHUNK_BYTES).contains(&n) => Ok(n),
            _ => Err(format!(
                "Spin variable chunk_bytes: {v:?} is not a byte count from 1024 to {MAX_CHUNK_BYTES}"
            )),
        },
        Ok(_) | Err(spin_sdk::variables::Error::Undefined(_)) => {
            Ok(crate::hosts::kvblobs::DEFAULT_CHUNK)
        }
        Err(e) => Err(format!("Spin variable chunk_bytes: {e:?}")),
    }
}

/// An error answered before the core runs, in the registry's error envelope.
fn plain_error(message: String) -> Response {
    http::Response::builder()
        .status(500)
        .header("content-type", "application/json")
        .body(Either::Left(Either::Left(Body::full(
            crate::Error::unknown_json(message),
        ))))
        .expect("a valid response")
}

/// Spin's key-value store as the core's [`KeyValue`]. Cloning shares the store.
///
/// Reads, writes and listings go through `spin:key-value`; compare-and-swap through
/// `wasi:keyvalue/atomics` (draft 2024-10-17), which Spin 4 implements on every key-value
/// backend it ships (SQLite: a conditional `UPDATE`; Redis: `WATCH` + `MULTI`/`EXEC`). Both
/// interfaces open the same store, `default`; the `wasi:keyvalue` bucket is opened only when a
/// compare-and-swap needs it (upload PATCHes and PUTs).
#[derive(Clone)]
struct SpinKv {
    store: Rc<Store>,
    bucket: Rc<OnceCell<wasi_kv::Bucket>>,
}

fn store_error(e: spin_sdk::key_value::Error) -> StoreError {
    StoreError::new(format!("spin key-value: {e:?}"))
}

fn wasi_kv_error(e: wasi_kv::Error) -> StoreError {
    StoreError::new(format!("wasi:keyvalue: {e:?}"))
}

impl SpinKv {
    fn bucket(&self) -> Result<&wasi_kv::Bucket, StoreError> {
        if let Some(b) = self.bucket.get() {
            return Ok(b);
        }
        let b = wasi_kv::open("default").map_err(wasi_kv_error)?;
        Ok(self.bucket.get_or_init(|| b))
    }
}

impl KeyValue for SpinKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get(key).await.map_err(store_error)
    }

    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.store.set(key, value).await.map_err(store_error)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.store.delete(key).await.map_err(store_error)
    }

    /// One `wasi:keyvalue/batch` `set-many`: Spin's SQLite store runs it as one transaction
    /// (one commit and its fsyncs for a batch of chunks instead of one per chunk), Redis as one
    /// round of commands.
    async fn set_many(&self, entries: Vec<(String, bytes::Bytes)>) -> Result<(), StoreError> {
        // A chunk's `Bytes` is its only handle here, so `Vec::from` takes the buffer over
        // without copying it.
        let entries: Vec<(String, Vec<u8>)> = entries
            .into_iter()
            .map(|(k, v)| (k, Vec::from(v)))
            .collect();
        batch::set_many(self.bucket()?, &entries).map_err(wasi_kv_error)
    }

    /// Spin lists every key of the store, with no prefix filter and no order: each listing
    /// that has no index reads all keys, chunk keys included. Through `wasi:keyvalue`'s
    /// `list-keys`, which Spin answers with one collected list: `spin:key-value`'s streaming
    /// `get-keys` holds the SQLite connection's lock on a blocking thread until the component
    /// has read every key, so another request of the same instance waiting for that lock stalls
    /// them both for good (seen under `spin up` on SQLite with concurrent layer uploads).
    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut matching = Vec::new();
        let mut cursor = None;
        loop {
            let page = self
                .bucket()?
                .list_keys(cursor.as_deref())
                .map_err(wasi_kv_error)?;
            matching.extend(page.keys.into_iter().filter(|k| k.starts_with(prefix)));
            match page.cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        Ok(page_of(matching, prefix, after, limit))
    }

    /// Atomic through `wasi:keyvalue/atomics`: the swap happens only if the key still holds
    /// what `current` read (Spin's SQLite store compares the value itself; Redis watches the
    /// key). A swap that lost the race is `false`, never an error.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let cas = atomics::Cas::new(self.bucket()?, key).map_err(wasi_kv_error)?;
        if cas.current().map_err(wasi_kv_error)?.as_deref() != expected {
            return Ok(false);
        }
        match atomics::swap(cas, new) {
            Ok(()) => Ok(true),
            // Spin 4.0.2's Redis store reports every swap as failed, the ones that happened
            // too: after `EXEC` it sends `UNWATCH <key>`, which Redis refuses (UNWATCH takes no
            // argument), and turns that error into `cas-failed`. A swap that really lost left
            // the key to the winner's value (on Redis the aborted `EXEC` wrote nothing; on
            // SQLite the conditional `UPDATE` changed no row). So the key holding exactly
            // `new` means this swap happened: the core's records differ at every transition
            // (fresh part nonces, a growing offset), so no other writer sets the same bytes.
            // What this cannot see is another writer that read `new` and swapped it again
            // before this read: it would have to load the session, store its chunk and
            // compare-and-swap within this one round trip.
            Err(atomics::CasError::CasFailed(_)) => {
                Ok(self.store.get(key).await.map_err(store_error)?.as_deref() == Some(new))
            }
            Err(atomics::CasError::StoreError(e)) => Err(wasi_kv_error(e)),
        }
    }
}
