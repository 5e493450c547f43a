//! Pushing blobs: upload sessions (end-4a/b/c, end-5, end-6, end-11, end-13, end-14).
//!
//! An upload session is one key-value record: the digest algorithm, the offset, the running hash
//! state and the list of parts already in the blob store. Each PATCH streams its body into a new
//! part while hashing it, then swaps the record for one with the new offset and state
//! (compare-and-swap, so two racing PATCHes cannot both win). The closing PUT finishes the hash
//! from the saved state, without reading the blob again, and only then assembles the parts
//! into the content-addressed blob. Nothing lives in memory between requests.

use std::pin::Pin;

use http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

use crate::body::{Hashing, ReadError};
use crate::digest::{Algorithm, Digest, Hasher};
use crate::error::{Error, ErrorCode, StoreError};
use crate::host::{BlobStore, KeyValue, WriteError};
use crate::layout;
use crate::names::{RepoName, UploadId};
use crate::registry::{Registry, RegistryResponse, Result, empty_response};
use crate::request::{Query, content_length, header_str};

#[derive(Serialize, Deserialize, Clone)]
struct UploadRecord {
    alg: Algorithm,
    /// Bytes received so far.
    offset: u64,
    /// The running hash over those bytes ([`Hasher::save`]).
    hash: String,
    /// Blob-store paths of the parts, in order.
    parts: Vec<String>,
    /// When the session started (seconds since the Unix epoch), for expiry.
    started: u64,
    /// Set by the closing PUT that won the session; the session is then gone for everyone else.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    closing: bool,
    /// Who opened the session (with access control on): only they may go on with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    /// Whether the session went into the open-session counts (`crate::admission`): its
    /// close or cancel takes it out again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    counted: bool,
}

/// A session read from the store, with the exact bytes it was read as (for compare-and-swap).
struct Session {
    id: UploadId,
    key: String,
    raw: Vec<u8>,
    record: UploadRecord,
}

fn now_secs() -> u64 {
    crate::clock::now_secs()
}

fn nonce() -> Result<String> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| StoreError::new(format!("no randomness: {e}")))?;
    Ok(crate::digest::to_hex(&b))
}

fn upload_unknown() -> Error {
    Error::not_found(
        ErrorCode::BlobUploadUnknown,
        "unknown upload session: it was finished, cancelled, or never started here",
    )
}

fn upload_location(name: &RepoName, id: &UploadId) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

/// The `Range` header of an upload: the inclusive range received. With nothing received it is
/// `0-0`, as distribution answers and clients expect.
fn range_value(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}

/// A parsed `Content-Range` of a chunk: inclusive `start-end`. The spec's form is
/// `^[0-9]+-[0-9]+$`; the HTTP form `bytes start-end/total` is accepted too.
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let v = v
        .strip_prefix("bytes ")
        .or_else(|| v.strip_prefix("bytes="))
        .unwrap_or(v);
    let v = v.split_once('/').map_or(v, |(r, _)| r);
    let (a, b) = v.split_once('-')?;
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (a, b) = (num(a)?, num(b)?);
    (a <= b).then_some((a, b))
}

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    /// The session `id` of `name`, if `sub` opened it. Another caller's session is answered
    /// as unknown (404 `BLOB_UPLOAD_UNKNOWN`), not 403: the id is a capability, and a 403
    /// would confirm to a stranger that it exists.
    async fn load_session(&self, name: &RepoName, id: &str, sub: Option<&str>) -> Result<Session> {
        let id = UploadId::parse(id)?;
        let key = layout::upload(name, &id);
        let raw = self.kv.get(&key).await?.ok_or_else(upload_unknown)?;
        let record: UploadRecord = serde_json::from_slice(&raw)
            .map_err(|e| StoreError::new(format!("corrupt upload record {key}: {e}")))?;
        if record.closing || record.subject.as_deref() != sub {
            return Err(upload_unknown());
        }
        Ok(Session {
            id,
            key,
            raw,
            record,
        })
    }

    fn session_headers(&self, name: &RepoName, s: &Session) -> Vec<(&'static str, String)> {
        vec![
            ("location", upload_location(name, &s.id)),
            ("range", range_value(s.record.offset)),
            ("docker-upload-uuid", s.id.to_string()),
        ]
    }

    /// 416 for a chunk that does not start where the upload stands, with the headers a client
    /// needs to resume (distribution-spec, "Pushing a blob in chunks").
    fn out_of_order(&self, name: &RepoName, s: &Session, msg: String) -> Error {
        let mut e = Error::new(
            ErrorCode::BlobUploadInvalid,
            StatusCode::RANGE_NOT_SATISFIABLE,
            msg,
        );
        for (k, v) in self.session_headers(name, s) {
            e = e.with_header(http::HeaderName::from_static(k), v);
        }
        e
    }

    /// POST /v2/<name>/blobs/uploads/: mount, single-POST monolithic upload, or a new session.
    pub(crate) async fn start_upload<RB>(
        &self,
        name: &RepoName,
        q: &Query,
        h: &HeaderMap,
        body: &mut Pin<Box<RB>>,
        sub: Option<&str>,
    ) -> Result<RegistryResponse<B>>
    where
        RB: http_body::Body,
        RB::Error: std::fmt::Display,
    {
        if let Some(mount) = q.get("mount") {
            let digest = Digest::parse(mount)?;
            // Mount only from a named repository that links the blob: a repository never gains
            // a blob by guessing its digest (distribution-spec, end-11: `from` MAY be optional).
            if let Some(from) = q.get("from") {
                let from = RepoName::parse(from, self.config.max_name_length)?;
                if let Some(size) = self.blob_link(&from, &digest).await? {
                    // Touched before it is linked: see `crate::gc` (a blob being collected
                    // answers 503, to be retried).
                    self.touch_blob(&digest).await?;
                    self.link_blob(name, &digest, size).await?;
                    return Ok(blob_created(name, &digest));
                }
            }
        } else if let Some(d) = q.get("digest") {
            let digest = Digest::parse(d)?;
            return self.monolithic(name, &digest, h, body).await;
        }
        let alg = match q.get("digest-algorithm") {
            Some(a) => Algorithm::parse(a)?,
            None => Algorithm::Sha256,
        };
        let id = UploadId::random()?;
        let started = now_secs();
        let record = UploadRecord {
            alg,
            offset: 0,
            hash: Hasher::new(alg).save(),
            parts: Vec::new(),
            started,
            closing: false,
            subject: sub.map(str::to_owned),
            counted: self.admit_upload(name, started).await?,
        };
        let key = layout::upload(name, &id);
        let raw = serde_json::to_vec(&record).expect("serializes");
        // The index entry first: a session is never unreachable by the purge.
        let written = async {
            self.kv
                .set(
                    &layout::upload_index(record.started, &id),
                    name.as_str().as_bytes(),
                )
                .await?;
            self.kv.set(&key, &raw).await
        };
        if let Err(e) = written.await {
            if record.counted {
                self.release_upload(name, started).await;
            }
            return Err(e.into());
        }
        let s = Session {
            id,
            key,
            raw,
            record,
        };
        let mut headers = self.session_headers(name, &s);
        if let Some(min) = self
            .config
            .chunk_min_length
            .or_else(|| self.blobs.min_chunk_length())
        {
            headers.push(("oci-chunk-min-length", min.to_string()));
        }
        if let Some(max) = self.config.max_chunk_bytes {
            headers.push(("oci-chunk-max-length", max.to_string()));
        }
        Ok(empty_response(StatusCode::ACCEPTED, &headers))
    }

    /// POST ...?digest=: the whole blob in one request (end-4b).
    async fn monolithic<RB>(
        &self,
        name: &RepoName,
        digest: &Digest,
        h: &HeaderMap,
        body: &mut Pin<Box<RB>>,
    ) -> Result<RegistryResponse<B>>
    where
        RB: http_body::Body,
        RB::Error: std::fmt::Display,
    {
        let id = UploadId::random()?;
        let limit = self.chunk_limit(0, h)?;
        let part = layout::upload_part(&id, 0, &nonce()?);
        let mut src = Hashing::new(body, Some(Hasher::new(digest.algorithm())), limit);
        let len = self.write_part(&part, &mut src).await?;
        if let Some(declared) = content_length(h)?
            && declared != len
        {
            self.blobs.delete(&part).await?;
            return Err(size_mismatch(declared, len));
        }
        let computed = src.finish_hash()?.finish();
        let parts = if len == 0 {
            self.blobs.delete(&part).await?;
            Vec::new()
        } else {
            vec![part]
        };
        if &computed != digest {
            for p in &parts {
                self.blobs.delete(p).await?;
            }
            return Err(digest_mismatch(digest, &computed));
        }
        self.commit(name, digest, &parts, len).await?;
        Ok(blob_created(name, digest))
    }

    /// How many bytes one request may bring to an upload now at `offset`, refusing at once a
    /// `Content-Length` that is over.
    fn chunk_limit(&self, offset: u64, h: &HeaderMap) -> Result<u64> {
        let blob_room = self.config.max_blob_bytes.saturating_sub(offset);
        let limit = self
            .config
            .max_chunk_bytes
            .map_or(blob_room, |c| c.min(blob_room));
        if let Some(len) = content_length(h)?
            && len > limit
        {
            return Err(too_large(limit, self.config.max_chunk_bytes));
        }
        Ok(limit)
    }

    /// Streams a request body into the blob store at `part`; returns its length.
    async fn write_part<RB>(&self, part: &str, src: &mut Hashing<&mut Pin<Box<RB>>>) -> Result<u64>
    where
        RB: http_body::Body,
        RB::Error: std::fmt::Display,
    {
        match self.blobs.write(part, src).await {
            Ok(n) => Ok(n),
            Err(WriteError::Store(e)) => Err(e.into()),
            Err(WriteError::Source(ReadError::TooLarge { limit })) => {
                Err(too_large(limit, self.config.max_chunk_bytes))
            }
            Err(WriteError::Source(ReadError::Body(e))) => Err(Error::bad_request(
                ErrorCode::BlobUploadInvalid,
                format!("reading the request body failed: {e}"),
            )),
        }
    }

    /// Appends a request body to the session as a new part; returns the updated record
    /// (not yet saved). `Content-Range`, when sent, must start at the current offset.
    async fn append<RB>(
        &self,
        name: &RepoName,
        s: &Session,
        h: &HeaderMap,
        body: &mut Pin<Box<RB>>,
    ) -> Result<UploadRecord>
    where
        RB: http_body::Body,
        RB::Error: std::fmt::Display,
    {
        let mut record = s.record.clone();
        let declared = content_length(h)?;
        let expected = match header_str(h, header::CONTENT_RANGE) {
            None => None,
            Some(v) => {
                let (start, end) = parse_content_range(v).ok_or_else(|| {
                    Error::bad_request(
                        ErrorCode::BlobUploadInvalid,
                        format!("invalid Content-Range {v:?}: expected <start>-<end>"),
                    )
                })?;
                if start != record.offset {
                    return Err(self.out_of_order(
                        name,
                        s,
                        format!(
                            "chunk starts at {start} but the upload has {} bytes: \
                             chunks must be sent in order",
                            record.offset
                        ),
                    ));
                }
                // `end` may be u64::MAX: `end - start + 1` would wrap to 0 (and accept an empty
                // chunk claiming 2^64 bytes).
                let len = (end - start).checked_add(1).ok_or_else(|| {
                    Error::bad_request(
                        ErrorCode::BlobUploadInvalid,
                        format!("invalid Content-Range {v:?}: the range is too large"),
                    )
                })?;
                if let Some(d) = declared
                    && d != len
                {
                    return Err(size_mismatch(len, d));
                }
                Some(len)
            }
        };
        if declared == Some(0) || (expected.is_none() && body.is_end_stream()) {
            return Ok(record);
        }
        let limit = self.chunk_limit(record.offset, h)?;
        let hasher = Hasher::restore(record.alg, &record.hash)
            .ok_or_else(|| StoreError::new(format!("corrupt hash state in {}", s.key)))?;
        let part = layout::upload_part(&s.id, record.offset, &nonce()?);
        let mut src = Hashing::new(body, Some(hasher), limit);
        let len = self.write_part(&part, &mut src).await?;
        if let Some(want) = expected.or(declared)
            && want != len
        {
            self.blobs.delete(&part).await?;
            return Err(size_mismatch(want, len));
        }
        if len == 0 {
            self.blobs.delete(&part).await?;
            return Ok(record);
        }
        record.offset += len;
        record.hash = src.finish_hash()?.save();
        record.parts.push(part);
        Ok(record)
    }

    /// Saves `record` over the session if nobody changed it meanwhile. On a lost race the new
    /// parts are removed and the client gets 416 with the current state.
    async fn save(&self, name: &RepoName, s: &Session, record: &UploadRecord) -> Result<Vec<u8>> {
        let raw = serde_json::to_vec(record).expect("serializes");
        if self.kv.compare_and_swap(&s.key, Some(&s.raw), &raw).await? {
            return Ok(raw);
        }
        for p in &record.parts[s.record.parts.len()..] {
            self.blobs.delete(p).await?;
        }
        match self
            .load_session(name, s.id.as_str(), s.record.subject.as_deref())
            .await
        {
            Ok(now) => Err(self.out_of_order(
                name,
                &now,
                "the upload changed during this request (a concurrent PATCH?)".into(),
            )),
            Err(e) => Err(e),
        }
    }

    /// PATCH <location>: one chunk, streamed (end-5).
    pub(crate) async fn patch_upload<RB>(
        &self,
        name: &RepoName,
        id: &str,
        h: &HeaderMap,
        body: &mut Pin<Box<RB>>,
        sub: Option<&str>,
    ) -> Result<RegistryResponse<B>>
    where
        RB: http_body::Body,
        RB::Error: std::fmt::Display,
    {
        let s = self.load_session(name, id, sub).await?;
        let record = self.append(name, &s, h, body).await?;
        let raw = self.save(name, &s, &record).await?;
        let s = Session { raw, record, ..s };
        Ok(empty_response(
            StatusCode::ACCEPTED,
            &self.session_headers(name, &s),
        ))
    }

    /// PUT <location>?digest=: closes the session, with an optional last chunk (end-6).
    pub(crate) async fn finish_upload<RB>(
        &self,
        name: &RepoName,
        id: &str,
        q: &Query,
        h: &HeaderMap,
        body: &mut Pin<Box<RB>>,
        sub: Option<&str>,
    ) -> Result<RegistryResponse<B>>
    where
        RB: http_body::Body,
        RB::Error: std::fmt::Display,
    {
        let mut s = self.load_session(name, id, sub).await?;
        let digest = Digest::parse(q.get("digest").ok_or_else(|| {
            Error::bad_request(
                ErrorCode::DigestInvalid,
                "closing an upload needs ?digest=<digest> of the whole blob",
            )
        })?)?;
        // An upload started without ?digest-algorithm= may still close with a sha512 digest: if
        // nothing arrived yet, hash the body with the digest's algorithm from the start.
        if s.record.offset == 0 && s.record.alg != digest.algorithm() {
            s.record.alg = digest.algorithm();
            s.record.hash = Hasher::new(digest.algorithm()).save();
        }
        let record = self.append(name, &s, h, body).await?;
        let computed = if record.alg == digest.algorithm() {
            Hasher::restore(record.alg, &record.hash)
                .ok_or_else(|| StoreError::new(format!("corrupt hash state in {}", s.key)))?
                .finish()
        } else {
            // The chunks were hashed with another algorithm: read them back once.
            self.rehash(&record.parts, digest.algorithm()).await?
        };
        // Claim the session before touching the parts, so that a racing PUT cannot assemble
        // them too: only one compare-and-swap to `closing` succeeds.
        let record = UploadRecord {
            closing: true,
            ..record
        };
        self.save(name, &s, &record).await?;
        if record.counted {
            self.release_upload(name, record.started).await;
        }
        self.kv.delete(&s.key).await?;
        self.kv
            .delete(&layout::upload_index(record.started, &s.id))
            .await?;
        if computed != digest {
            for p in &record.parts {
                self.blobs.delete(p).await?;
            }
            return Err(digest_mismatch(&digest, &computed));
        }
        self.commit(name, &digest, &record.parts, record.offset)
            .await?;
        Ok(blob_created(name, &digest))
    }

    async fn rehash(&self, parts: &[String], alg: Algorithm) -> Result<Digest> {
        let mut h = Hasher::new(alg);
        for p in parts {
            let mut r = self
                .blobs
                .read(p, None)
                .await?
                .ok_or_else(|| StoreError::new(format!("upload part {p} is missing")))?;
            while let Some(frame) = r.frame().await {
                if let Ok(data) = frame?.into_data() {
                    h.update(&data);
                }
            }
        }
        Ok(h.finish())
    }

    /// Makes the verified parts the blob `digest` and links it into `name`.
    async fn commit(
        &self,
        name: &RepoName,
        digest: &Digest,
        parts: &[String],
        size: u64,
    ) -> Result<()> {
        let dest = layout::blob_data(digest);
        // Touched before the store is asked whether it holds the content, so garbage
        // collection cannot delete that content under this commit (`crate::gc`).
        self.touch_blob(digest).await?;
        // An object of another size under that name is not this blob (a write cut short
        // elsewhere, a store gone wrong): it is replaced, not trusted.
        if self.blobs.size(&dest).await? == Some(size) {
            // Content-addressed: the same bytes are already stored.
            for p in parts {
                self.blobs.delete(p).await?;
            }
        } else {
            self.blobs.assemble(parts, &dest).await?;
        }
        self.link_blob(name, digest, size).await
    }

    /// GET <location>: where the upload stands (end-13).
    pub(crate) async fn upload_status(
        &self,
        name: &RepoName,
        id: &str,
        sub: Option<&str>,
    ) -> Result<RegistryResponse<B>> {
        let s = self.load_session(name, id, sub).await?;
        Ok(empty_response(
            StatusCode::NO_CONTENT,
            &self.session_headers(name, &s),
        ))
    }

    /// DELETE <location>: cancels the upload and frees its parts (end-14).
    pub(crate) async fn cancel_upload(
        &self,
        name: &RepoName,
        id: &str,
        sub: Option<&str>,
    ) -> Result<RegistryResponse<B>> {
        let s = self.load_session(name, id, sub).await?;
        if !self
            .drop_session(name, &s.key, &s.id, &s.raw, &s.record)
            .await?
        {
            // A closing PUT (or another cancel) claimed it first: the parts are theirs.
            return Err(upload_unknown());
        }
        Ok(empty_response(StatusCode::NO_CONTENT, &[]))
    }

    /// Removes a session: its record, its parts, its index entry. Like the closing PUT, it
    /// first claims the session (`raw` as loaded → `closing`) with a compare-and-swap, so a
    /// PUT that already claimed it, and may be making the parts a blob, keeps them: deleting
    /// them then would leave a blob whose bytes are gone. False when the claim was lost.
    async fn drop_session(
        &self,
        name: &RepoName,
        key: &str,
        id: &UploadId,
        raw: &[u8],
        record: &UploadRecord,
    ) -> Result<bool> {
        if record.closing {
            return Ok(false);
        }
        let claimed = UploadRecord {
            closing: true,
            ..record.clone()
        };
        let claimed = serde_json::to_vec(&claimed).expect("serializes");
        if !self.kv.compare_and_swap(key, Some(raw), &claimed).await? {
            return Ok(false);
        }
        if record.counted {
            self.release_upload(name, record.started).await;
        }
        self.kv.delete(key).await?;
        for p in &record.parts {
            self.blobs.delete(p).await?;
        }
        self.kv
            .delete(&layout::upload_index(record.started, id))
            .await?;
        Ok(true)
    }

    /// Cancels every upload session started more than `max_age_secs` ago, freeing its parts
    /// (distribution-spec: "the server SHOULD eventually timeout unfinished uploads"). Returns
    /// how many it removed. The native server calls this periodically; other adapters may call
    /// it from a scheduled job.
    pub async fn purge_stale_uploads(
        &self,
        max_age_secs: u64,
    ) -> std::result::Result<usize, StoreError> {
        let cutoff = now_secs().saturating_sub(max_age_secs);
        let prefix = layout::upload_index_prefix();
        let mut removed = 0;
        // One listing of the whole index: a loop of pages would re-read it for each page (a
        // pass over every key on the local-directory host), quadratic in the sessions purged.
        for k in self.kv.list(prefix, None, usize::MAX).await? {
            let Some((started, id)) = k[prefix.len()..].split_once('/') else {
                self.kv.delete(&k).await?;
                continue;
            };
            let (Ok(started), Ok(id)) = (started.parse::<u64>(), UploadId::parse(id)) else {
                self.kv.delete(&k).await?;
                continue;
            };
            if started >= cutoff {
                break; // the index is in start order: the rest is younger
            }
            let name = self
                .kv
                .get(&k)
                .await?
                .and_then(|n| String::from_utf8(n).ok())
                .and_then(|n| RepoName::parse(&n, usize::MAX).ok());
            if let Some(name) = name {
                let key = layout::upload(&name, &id);
                if let Some(raw) = self.kv.get(&key).await?
                    && let Ok(record) = serde_json::from_slice::<UploadRecord>(&raw)
                    && self
                        .drop_session(&name, &key, &id, &raw, &record)
                        .await
                        .map_err(|e| StoreError::new(e.message))?
                {
                    removed += 1;
                }
            }
            self.kv.delete(&k).await?;
        }
        Ok(removed)
    }
}

fn blob_created<R>(name: &RepoName, digest: &Digest) -> http::Response<crate::body::Body<R>> {
    empty_response(
        StatusCode::CREATED,
        &[
            ("location", format!("/v2/{name}/blobs/{digest}")),
            ("docker-content-digest", digest.to_string()),
        ],
    )
}

fn digest_mismatch(expected: &Digest, computed: &Digest) -> Error {
    Error::bad_request(
        ErrorCode::DigestInvalid,
        format!("the uploaded content has digest {computed}, not {expected}; nothing was stored"),
    )
    .with_detail(serde_json::json!({
        "expected": expected.to_string(),
        "computed": computed.to_string(),
    }))
}

fn size_mismatch(declared: u64, actual: u64) -> Error {
    Error::bad_request(
        ErrorCode::SizeInvalid,
        format!("the request declared {declared} bytes but carried {actual}"),
    )
}

fn too_large(limit: u64, chunk_max: Option<u64>) -> Error {
    let why = match chunk_max {
        Some(c) if c == limit => format!(
            "a request may carry at most {c} bytes here: upload in chunks (OCI-Chunk-Max-Length)"
        ),
        _ => format!("the blob would exceed this registry's limit ({limit} more bytes allowed)"),
    };
    Error::new(ErrorCode::SizeInvalid, StatusCode::PAYLOAD_TOO_LARGE, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(parse_content_range("bytes=5-5"), Some((5, 5)));
        assert_eq!(parse_content_range("9-1"), None);
        assert_eq!(parse_content_range("-1"), None);
        assert_eq!(parse_content_range("1-"), None);
        assert_eq!(parse_content_range("a-b"), None);
        assert_eq!(parse_content_range("0-99999999999999999999999"), None);
    }
}
