//! Filling mirrored repositories from their upstream, then serving them through the ordinary
//! read paths (`get_manifest`, `get_blob`), so what a client gets from a mirrored repository is
//! exactly what it gets from any other: same headers, `Range`, access rules.

use http::{HeaderMap, Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::body::{Hashing, ReadError};
use crate::digest::{Digest, Hasher};
use crate::error::{Error, ErrorCode, StoreError};
use crate::host::{BlobStore, KeyValue, WriteError};
use crate::layout;
use crate::manifests::{DOCKER_LIST, DOCKER_MANIFEST, ManifestRef, OCI_INDEX, OCI_MANIFEST};
use crate::mirror::Target;
use crate::mirror::stream::{EarlyResponse, Finish, LeaseKeeper, PipeSender, Tee, pipe};
use crate::mirror::upstream::{self, UpBody, header_of, read_small};
use crate::names::{RepoName, Tag};
use crate::registry::{Registry, RegistryResponse, Result, empty_response};

/// Every manifest type dockside serves, so the upstream answers with what it stores rather
/// than converting (distribution-spec, "Pulling manifests": the client's `Accept`).
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// How often a client waiting for another's fetch of the same blob looks again.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// A mirrored tag: what upstream said it points at, and when.
#[derive(Serialize, Deserialize)]
struct TagRecord {
    digest: String,
    checked: u64,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct Lease {
    owner: String,
    expires: u64,
}

pub(super) fn bad_gateway(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::Unknown, StatusCode::BAD_GATEWAY, msg)
}

fn nonce() -> Result<String> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| StoreError::new(format!("no randomness: {e}")))?;
    Ok(crate::digest::to_hex(&b))
}

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    fn mirror_client(&self) -> &dyn upstream::UpstreamClient {
        &*self
            .config
            .mirror
            .as_ref()
            .expect("only called for mirrored names")
            .client
    }

    pub(super) async fn upstream(
        &self,
        t: &Target<'_>,
        method: Method,
        path: &str,
        accept: Option<&str>,
    ) -> std::result::Result<http::Response<UpBody>, StoreError> {
        let scope = format!("repository:{}:pull", t.remote);
        upstream::send(
            &self.kv,
            self.mirror_client(),
            t.up,
            method,
            path,
            accept,
            &scope,
        )
        .await
    }

    /// `GET`/`HEAD` of a manifest in a mirrored repository.
    pub(crate) async fn mirror_manifest(
        &self,
        t: &Target<'_>,
        reference: &str,
        head: bool,
    ) -> Result<RegistryResponse<B>> {
        let name = &t.local;
        match crate::manifests::parse_reference(reference) {
            // Content-addressed: once here, never asked again.
            Ok(ManifestRef::Digest(d)) => {
                if self.load_manifest(name, &d).await?.is_none() {
                    self.fetch_manifest(t, &d.to_string(), Some(&d), None)
                        .await?;
                }
            }
            Ok(ManifestRef::Tag(tag)) => self.refresh_tag(t, &tag).await?,
            Err(_) => {}
        }
        self.get_manifest(name, reference, head).await
    }

    /// Makes the local tag current: fresh within the TTL, else confirmed by a `HEAD` upstream
    /// (the cached manifest stays when the digest is unchanged or the upstream cannot answer).
    async fn refresh_tag(&self, t: &Target<'_>, tag: &Tag) -> Result<()> {
        let name = &t.local;
        let ttl = self.config.mirror.as_ref().map_or(0, |m| m.tag_ttl_secs);
        let now = crate::auth::now_secs();
        let key = layout::mirror_tag(name, tag);
        let record: Option<TagRecord> = match self.kv.get(&key).await? {
            Some(v) => serde_json::from_slice(&v).ok(),
            None => None,
        };
        let cached = match &record {
            Some(r) => match self.resolve_tag(name, tag).await? {
                Some(d) if d.to_string() == r.digest => {
                    self.load_manifest(name, &d).await?.map(|_| d)
                }
                _ => None,
            },
            None => None,
        };
        if let (Some(r), Some(_)) = (&record, &cached)
            && now < r.checked.saturating_add(ttl)
        {
            return Ok(());
        }
        let path = format!("/v2/{}/manifests/{tag}", t.remote);
        let head = self.upstream(t, Method::HEAD, &path, Some(ACCEPT)).await;
        let upstream_digest = match head {
            Ok(r) if r.status().is_success() => {
                header_of(&r, "docker-content-digest").and_then(|d| Digest::parse(d).ok())
            }
            Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                // Gone upstream: so it goes here (the manifest stays, by digest).
                self.kv.delete(&layout::tag(name, tag)).await?;
                self.kv.delete(&key).await?;
                return Ok(());
            }
            Ok(r) => {
                if cached.is_some() {
                    tracing::warn!(upstream = %t.up.url, status = %r.status(), "tag revalidation failed; serving the cached manifest");
                    return Ok(());
                }
                return Err(upstream_refused(r.status(), &path));
            }
            Err(e) => {
                if cached.is_some() {
                    tracing::warn!(upstream = %t.up.url, error = %e.message, "upstream unreachable; serving the cached manifest");
                    return Ok(());
                }
                return Err(e.into());
            }
        };
        if let (Some(c), Some(u)) = (&cached, &upstream_digest)
            && c == u
        {
            return self.record_tag(name, tag, c, now).await;
        }
        // New, moved, or the HEAD said no digest: fetch it by tag.
        match self
            .fetch_manifest(t, tag.as_str(), upstream_digest.as_ref(), Some(tag))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if cached.is_some() && e.status.is_server_error() => {
                tracing::warn!(upstream = %t.up.url, error = %e.message, "tag fetch failed; serving the cached manifest");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Caches a fetched manifest's record by compare-and-swap, as a push writes it
    /// (`Registry::write_record`): a plain write could land between the collector's claim of
    /// an old record and its delete, and the tag written next would name nothing. A claimed
    /// record answers 503 (retry once the collector is done).
    async fn cache_record(&self, key: &str, digest: &Digest, record: &[u8]) -> Result<()> {
        for _ in 0..crate::gc::TOUCH_ATTEMPTS {
            let raw = self.kv.get(key).await?;
            if let Some(r) = &raw
                && crate::manifests::decode_record(r.clone())?.gone
            {
                return Err(crate::gc::collecting(digest));
            }
            if self
                .kv
                .compare_and_swap(key, raw.as_deref(), record)
                .await?
            {
                return Ok(());
            }
        }
        Err(crate::gc::collecting(digest))
    }

    async fn record_tag(&self, name: &RepoName, tag: &Tag, d: &Digest, now: u64) -> Result<()> {
        let r = TagRecord {
            digest: d.to_string(),
            checked: now,
        };
        self.kv
            .set(
                &layout::mirror_tag(name, tag),
                &serde_json::to_vec(&r).expect("serializes"),
            )
            .await?;
        Ok(())
    }

    /// Fetches manifest `reference` and stores it under its digest (checked against `expect`
    /// when known), and under `tag`. Stored with the upstream's `Content-Type`, byte for byte.
    async fn fetch_manifest(
        &self,
        t: &Target<'_>,
        reference: &str,
        expect: Option<&Digest>,
        tag: Option<&Tag>,
    ) -> Result<()> {
        let name = &t.local;
        let path = format!("/v2/{}/manifests/{reference}", t.remote);
        let resp = self.upstream(t, Method::GET, &path, Some(ACCEPT)).await?;
        if !resp.status().is_success() {
            return Err(upstream_refused(resp.status(), &path));
        }
        let media_type = header_of(&resp, "content-type")
            .map(|c| c.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|c| !c.is_empty());
        let header_digest = header_of(&resp, "docker-content-digest").map(str::to_owned);
        let bytes = read_small(resp.into_body(), self.config.max_manifest_bytes).await?;
        let alg = expect.map_or(crate::digest::Algorithm::Sha256, Digest::algorithm);
        let digest = Digest::of(alg, &bytes);
        if let Some(e) = expect
            && e != &digest
        {
            return Err(bad_gateway(format!(
                "upstream sent a manifest whose digest is {digest}, not {e}; refused"
            )));
        }
        if let Some(h) = header_digest
            && let Ok(h) = Digest::parse(&h)
            && h.algorithm() == alg
            && h != digest
        {
            return Err(bad_gateway(format!(
                "upstream's Docker-Content-Digest {h} does not match its manifest ({digest}); refused"
            )));
        }
        let media_type = match media_type {
            Some(m) => m,
            None => sniff_media_type(&bytes),
        };
        let subject = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["subject"]["digest"].as_str().map(str::to_owned))
            .and_then(|s| Digest::parse(&s).ok());
        let record = crate::manifests::encode_record(
            &media_type,
            subject.as_ref(),
            &bytes,
            crate::auth::now_secs(),
            false,
        );
        self.cache_record(&layout::manifest(name, &digest), &digest, &record)
            .await?;
        // Listed under its subject as a push would list it: what the referrers API answers
        // when the upstream cannot (`mirror::lists`).
        if let Some((subject, d)) =
            crate::manifests::referrer_entry_of(&bytes, &media_type, &digest)
        {
            self.kv
                .set(&layout::referrer(name, &subject, &digest), &d)
                .await?;
        }
        if let Some(tag) = tag {
            self.set_tag(name, tag, &digest).await?;
            self.record_tag(name, tag, &digest, crate::auth::now_secs())
                .await?;
        }
        self.ensure_repository(name).await
    }

    /// `GET`/`HEAD` of a blob in a mirrored repository. A `GET` of a blob not here yet, with
    /// no `Range`, streams to the client while it is fetched when the adapter offers an
    /// [`EarlyResponse`] (`stream`); otherwise the answer comes once the blob is stored.
    pub(crate) async fn mirror_blob(
        &self,
        t: &Target<'_>,
        digest_s: &str,
        headers: &HeaderMap,
        head: bool,
        early: Option<&EarlyResponse>,
    ) -> Result<RegistryResponse<B>> {
        let name = &t.local;
        let Ok(digest) = Digest::parse(digest_s) else {
            return self.get_blob(name, digest_s, headers, head).await;
        };
        if self.blob_link(name, &digest).await?.is_some() {
            return self.get_blob(name, digest_s, headers, head).await;
        }
        // Its `gc/blobs` record, touched before the store is asked for the content and the
        // link written, as a push's commit does (`crate::gc`, the race with a push).
        self.touch_blob(&digest).await?;
        let path = format!("/v2/{}/blobs/{digest}", t.remote);
        let data = layout::blob_data(&digest);
        // Here already (another repository, or a fetch that did not link): only linked once
        // the upstream confirms this repository has it, as a push would need.
        if head || self.blobs.size(&data).await?.is_some() {
            let r = self.upstream(t, Method::HEAD, &path, None).await?;
            if r.status() == StatusCode::NOT_FOUND {
                return self.get_blob(name, digest_s, headers, head).await;
            }
            if !r.status().is_success() {
                return Err(upstream_refused(r.status(), &path));
            }
            if let Some(size) = self.blobs.size(&data).await? {
                self.link_blob(name, &digest, size).await?;
                return self.get_blob(name, digest_s, headers, head).await;
            }
            // HEAD of a blob not here: the upstream's answer, nothing fetched.
            let len = header_of(&r, "content-length").unwrap_or("0").to_owned();
            return Ok(empty_response(
                StatusCode::OK,
                &[
                    ("content-length", len),
                    ("docker-content-digest", digest.to_string()),
                    ("content-type", "application/octet-stream".to_owned()),
                ],
            ));
        }
        // Ranges are served from the cache once the blob is whole (the issue: "Range requests
        // served from the cache once it has the blob").
        let stream = early
            .filter(|_| !headers.contains_key(http::header::RANGE))
            .map(|e| (e, crate::observe::request_id(headers)));
        let (size, finish) = self.fetch_blob_once(t, &digest, &path, stream).await?;
        let linked = self.link_blob(name, &digest, size).await;
        if let Some(f) = finish {
            match linked {
                Ok(()) => f.finish().await,
                Err(e) => f
                    .pipe
                    .abort(format!("linking {digest} failed: {}", e.message)),
            }
            // The client has its answer already; this one is dropped by the adapter.
            return Ok(empty_response(StatusCode::OK, &[]));
        }
        linked?;
        self.get_blob(name, digest_s, headers, head).await
    }

    /// Gets `digest` into the store, fetching it at most once at a time across every instance
    /// sharing the key-value store: the fetcher holds a lease key (compare-and-swap, renewed
    /// while it fetches), the others poll until the blob appears or the lease is released or
    /// expires (then one of them takes over). Returns the blob's size, and, when this fetch
    /// streamed to its client, what is left to send it.
    async fn fetch_blob_once(
        &self,
        t: &Target<'_>,
        digest: &Digest,
        path: &str,
        stream: Option<(&EarlyResponse, String)>,
    ) -> Result<(u64, Option<Finish>)> {
        let lease_secs = self.config.mirror.as_ref().map_or(120, |m| m.lease_secs);
        let key = layout::mirror_lease(digest);
        let data = layout::blob_data(digest);
        let me = nonce()?;
        let mut stream = stream;
        loop {
            if let Some(size) = self.blobs.size(&data).await? {
                return Ok((size, None));
            }
            let now = crate::auth::now_secs();
            let current = self.kv.get(&key).await?;
            let free = match &current {
                None => true,
                Some(v) => serde_json::from_slice::<Lease>(v).map_or(true, |l| l.expires <= now),
            };
            if free {
                let mine = LeaseKeeper::<K>::value(&me, now + lease_secs);
                if self
                    .kv
                    .compare_and_swap(&key, current.as_deref(), &mine)
                    .await?
                {
                    let lease = LeaseKeeper {
                        kv: &self.kv,
                        key: key.clone(),
                        owner: me.clone(),
                        current: mine,
                        lease_secs,
                        renew_at: LeaseKeeper::<K>::renew_after(lease_secs, now),
                        lost: false,
                    };
                    let result = self.fetch_blob(t, digest, path, stream.take(), lease).await;
                    // Released whatever happened: waiters then find the blob, or try themselves.
                    if let Err(e) = self.kv.delete(&key).await {
                        tracing::warn!(error = %e.message, "releasing a mirror lease failed");
                    }
                    return result;
                }
                continue;
            }
            self.mirror_client().sleep_boxed(WAIT_POLL).await;
        }
    }

    /// Streams the blob from upstream into a temporary object while hashing it (and to the
    /// client, when `stream` says so); moves it into place only when the digest matches, so
    /// wrong bytes are never visible, and a streaming client sees its transfer aborted.
    async fn fetch_blob(
        &self,
        t: &Target<'_>,
        digest: &Digest,
        path: &str,
        stream: Option<(&EarlyResponse, String)>,
        lease: LeaseKeeper<'_, K>,
    ) -> Result<(u64, Option<Finish>)> {
        let resp = self.upstream(t, Method::GET, path, None).await?;
        if !resp.status().is_success() {
            if resp.status() == StatusCode::NOT_FOUND {
                return Err(Error::not_found(
                    ErrorCode::BlobUnknown,
                    format!("blob {digest} is not in repository {} upstream", t.remote),
                ));
            }
            return Err(upstream_refused(resp.status(), path));
        }
        let expected: Option<u64> = header_of(&resp, "content-length").and_then(|l| l.parse().ok());
        if expected.is_some_and(|l| l > self.config.max_blob_bytes) {
            return Err(Error::new(
                ErrorCode::SizeInvalid,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("blobs are limited to {} bytes", self.config.max_blob_bytes),
            ));
        }
        // From here the client gets a 200 and the bytes as they come; what goes wrong later
        // aborts its body (the status is gone).
        let pipe = match stream {
            Some((early, request_id)) => {
                let (tx, rx) = pipe(expected);
                let mut b = http::Response::builder()
                    .status(StatusCode::OK)
                    .header("docker-content-digest", digest.to_string())
                    .header("content-type", "application/octet-stream")
                    .header("docker-distribution-api-version", "registry/2.0")
                    .header("etag", format!("\"{digest}\""))
                    .header(crate::observe::REQUEST_ID_HEADER, request_id);
                if let Some(l) = expected {
                    b = b.header("content-length", l);
                }
                // (Already answered, or an unusable header: this fetch just fills the cache.)
                match b.body(rx) {
                    Ok(r) => early.deliver(r).then_some(tx),
                    Err(_) => None,
                }
            }
            None => None,
        };
        let tmp = layout::mirror_fetch(&nonce()?);
        let mut src = Tee {
            src: Hashing::new(
                resp.into_body(),
                Some(Hasher::new(digest.algorithm())),
                self.config.max_blob_bytes,
            ),
            pipe,
            held: None,
            lease,
            timer: self.mirror_client(),
        };
        let written = self.blobs.write(&tmp, &mut src).await;
        let Tee {
            src: mut hashing,
            pipe,
            held,
            ..
        } = src;
        let fail = |e: Error, pipe: Option<PipeSender>| {
            if let Some(p) = pipe {
                p.abort(e.message.clone());
            }
            Err(e)
        };
        let written = match written {
            Ok(n) => n,
            Err(WriteError::Store(e)) => return fail(e.into(), pipe),
            Err(WriteError::Source(ReadError::TooLarge { limit })) => {
                return fail(
                    Error::new(
                        ErrorCode::SizeInvalid,
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("blobs are limited to {limit} bytes"),
                    ),
                    pipe,
                );
            }
            Err(WriteError::Source(ReadError::Body(e))) => {
                return fail(
                    StoreError::unavailable(format!(
                        "upstream {} broke off sending {digest}: {e}",
                        t.up.url
                    ))
                    .into(),
                    pipe,
                );
            }
        };
        let got = match hashing.finish_hash() {
            Ok(h) => h.finish(),
            Err(e) => return fail(e.into(), pipe),
        };
        if &got != digest || expected.is_some_and(|l| l != written) {
            let _ = self.blobs.delete(&tmp).await;
            tracing::error!(upstream = %t.up.url, want = %digest, got = %got, "upstream sent a blob that fails verification; discarded");
            return fail(
                bad_gateway(format!(
                    "upstream sent {written} bytes for {digest} whose digest is {got}; refused"
                )),
                pipe,
            );
        }
        if let Err(e) = self
            .blobs
            .assemble(std::slice::from_ref(&tmp), &layout::blob_data(digest))
            .await
        {
            let _ = self.blobs.delete(&tmp).await;
            return fail(e.into(), pipe);
        }
        Ok((written, pipe.map(|pipe| Finish { pipe, last: held })))
    }
}

/// An upstream's refusal, as the client should see it: 404s stay 404s, authentication
/// failures and the rest are the upstream's problem (502).
pub(super) fn upstream_refused(status: StatusCode, path: &str) -> Error {
    match status {
        StatusCode::NOT_FOUND => Error::not_found(
            ErrorCode::ManifestUnknown,
            format!("upstream has no {path}"),
        ),
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => Error::from(
            StoreError::unavailable(format!("upstream answered {s} to {path}")),
        ),
        s => bad_gateway(format!("upstream answered {s} to {path}")),
    }
}

/// The media type of a manifest served without a `Content-Type`: its `mediaType`, else by
/// shape (image-spec: `manifests` makes an index).
fn sniff_media_type(bytes: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    match v["mediaType"].as_str() {
        Some(m @ (OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_LIST)) => m.to_owned(),
        _ if v.get("manifests").is_some() => OCI_INDEX.to_owned(),
        _ => OCI_MANIFEST.to_owned(),
    }
}
