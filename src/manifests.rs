//! Manifests: push with validation, pull, delete (end-3, end-7a/b, end-9), and the referrer
//! records a manifest with a `subject` leaves behind.

use std::pin::Pin;

use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::blobs::deletion_disabled;
use crate::body::{ReadError, read_to_vec};
use crate::digest::{Algorithm, Digest};
use crate::error::{Error, ErrorCode, StoreError};
use crate::host::{BlobStore, KeyValue};
use crate::layout;
use crate::names::{RepoName, Tag};
use crate::registry::{Registry, RegistryResponse, Result, bytes_response, empty_response};
use crate::request::{Query, content_length, header_str};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Most tags one `PUT ...?tag=` may set (the spec asks for at least 10).
const MAX_TAGS_PER_PUT: usize = 100;

/// The header line of a stored manifest record; the manifest's exact bytes follow it.
#[derive(Serialize, Deserialize)]
struct RecordHeader {
    #[serde(rename = "mediaType")]
    media_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    /// When it was last pushed or referenced by a push (seconds since the epoch): garbage
    /// collection spares records younger than its grace period (`crate::gc`). 0 if unknown.
    #[serde(default, skip_serializing_if = "is_zero")]
    at: u64,
    /// Claimed by garbage collection, about to be deleted: reads treat it as absent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    gone: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A manifest as read from the store.
pub(crate) struct StoredManifest {
    pub media_type: String,
    pub subject: Option<Digest>,
    pub bytes: Bytes,
    pub at: u64,
    pub gone: bool,
}

pub(crate) fn encode_record(
    media_type: &str,
    subject: Option<&Digest>,
    bytes: &[u8],
    at: u64,
    gone: bool,
) -> Vec<u8> {
    let header = RecordHeader {
        media_type: media_type.to_owned(),
        subject: subject.map(Digest::to_string),
        at,
        gone,
    };
    let mut v = serde_json::to_vec(&header).expect("serializes");
    v.push(b'\n');
    v.extend_from_slice(bytes);
    v
}

pub(crate) fn decode_record(raw: Vec<u8>) -> std::result::Result<StoredManifest, StoreError> {
    let raw = Bytes::from(raw);
    let nl = raw
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| StoreError::new("corrupt manifest record"))?;
    let header: RecordHeader = serde_json::from_slice(&raw[..nl])
        .map_err(|e| StoreError::new(format!("corrupt manifest record: {e}")))?;
    Ok(StoredManifest {
        media_type: header.media_type,
        subject: header
            .subject
            .as_deref()
            .and_then(|s| Digest::parse(s).ok()),
        bytes: raw.slice(nl + 1..),
        at: header.at,
        gone: header.gone,
    })
}

/// What a stored manifest references: `(digest, is_manifest)` of each blob and child manifest
/// (the subject is not one: a referrer does not keep its subject alive). Empty if the stored
/// bytes no longer validate (they did when pushed).
pub(crate) fn references_of(m: &StoredManifest) -> Vec<(Digest, bool)> {
    validate(&m.bytes, &m.media_type)
        .map(|p| {
            p.references
                .into_iter()
                .map(|r| match r {
                    Reference::Blob { digest, .. } => (digest, false),
                    Reference::Manifest { digest, .. } => (digest, true),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The referrers-list descriptor of a manifest with a `subject`: the subject, and the
/// descriptor as stored under it (distribution-spec, "Listing Referrers").
fn referrer_entry(parsed: &Parsed, bytes: &[u8], digest: &Digest) -> Option<(Digest, Vec<u8>)> {
    let subject = parsed.subject.clone()?;
    let mut d = serde_json::json!({
        "mediaType": parsed.media_type,
        "digest": digest.to_string(),
        "size": bytes.len(),
    });
    if let Some(at) = &parsed.artifact_type {
        d["artifactType"] = Value::String(at.clone());
    }
    if let Some(a) = &parsed.annotations {
        d["annotations"] = Value::Object(a.clone());
    }
    Some((subject, serde_json::to_vec(&d).expect("serializes")))
}

/// [`referrer_entry`] of stored bytes (a mirrored manifest); `None` when it has no subject or
/// does not validate.
pub(crate) fn referrer_entry_of(
    bytes: &[u8],
    media_type: &str,
    digest: &Digest,
) -> Option<(Digest, Vec<u8>)> {
    referrer_entry(&validate(bytes, media_type).ok()?, bytes, digest)
}

/// What a manifest references, as found by [`validate`].
enum Reference {
    Blob { digest: Digest, size: u64 },
    Manifest { digest: Digest, size: u64 },
}

/// The facts of a valid manifest that the registry acts on.
struct Parsed {
    media_type: String,
    subject: Option<Digest>,
    /// The descriptor's `artifactType` in the referrers list (distribution-spec, "Listing
    /// Referrers"): the manifest's own, else an image manifest's config media type.
    artifact_type: Option<String>,
    annotations: Option<Map<String, Value>>,
    references: Vec<Reference>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::bad_request(ErrorCode::ManifestInvalid, msg)
}

/// A descriptor (image-spec `descriptor.md`): `mediaType`, `digest` and `size` are required.
fn descriptor(v: &Value, at: &str) -> Result<(String, Digest, u64)> {
    let o = v
        .as_object()
        .ok_or_else(|| invalid(format!("{at}: a descriptor must be an object")))?;
    let media_type = o
        .get("mediaType")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{at}.mediaType: required string")))?;
    let digest = o
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{at}.digest: required string")))?;
    let digest =
        Digest::parse(digest).map_err(|e| invalid(format!("{at}.digest: {}", e.message)))?;
    let size = o
        .get("size")
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid(format!("{at}.size: required non-negative integer")))?;
    Ok((media_type.to_owned(), digest, size))
}

/// Checks a manifest's shape and says what it references. `content_type` is the request's
/// `Content-Type` without parameters (empty if none was sent).
fn validate(bytes: &[u8], content_type: &str) -> Result<Parsed> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| invalid(format!("the manifest is not valid JSON: {e}")))?;
    let o = v
        .as_object()
        .ok_or_else(|| invalid("the manifest must be a JSON object"))?;
    if o.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return Err(invalid("schemaVersion must be 2"));
    }
    let field = match o.get("mediaType") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(invalid("mediaType must be a string")),
    };
    // The spec: a client MUST set Content-Type to the manifest's mediaType when it has one.
    let media_type = match (field, content_type) {
        (Some(f), ct) if !ct.is_empty() && ct != f => {
            return Err(invalid(format!(
                "Content-Type {ct:?} does not match the manifest's mediaType {f:?}"
            )));
        }
        (Some(f), _) => f.to_owned(),
        (None, ct) if !ct.is_empty() => ct.to_owned(),
        (None, _) if o.contains_key("manifests") => OCI_INDEX.to_owned(),
        (None, _) => OCI_MANIFEST.to_owned(),
    };
    let is_index = match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        OCI_INDEX | DOCKER_LIST => true,
        other => {
            return Err(invalid(format!(
                "unsupported manifest type {other:?}: dockside accepts {OCI_MANIFEST}, \
                 {OCI_INDEX}, {DOCKER_MANIFEST} and {DOCKER_LIST}"
            )));
        }
    };
    if field.is_none() && media_type.starts_with("application/vnd.docker.") {
        return Err(invalid("Docker manifests must carry a mediaType field"));
    }
    let oci = media_type.starts_with("application/vnd.oci.");
    let artifact_type = match o.get("artifactType") {
        None => None,
        Some(Value::String(s)) if oci => Some(s.clone()),
        Some(_) => return Err(invalid("artifactType must be a string, on OCI manifests")),
    };
    let subject = match o.get("subject") {
        Some(s) if oci => Some(descriptor(s, "subject")?.1),
        _ => None,
    };
    let annotations = match o.get("annotations") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => return Err(invalid("annotations must be an object")),
    };
    // One document, one kind (the CVE-2021-41190 class): a document with both an index's
    // `manifests` and a manifest's `config`/`layers` could be read as either by different
    // clients, so it is refused, as distribution and containerd do.
    let has = |k: &str| o.contains_key(k);
    if is_index && (has("config") || has("layers")) {
        return Err(invalid(
            "an index must not carry config or layers (ambiguous manifest/index document)",
        ));
    }
    if !is_index && has("manifests") {
        return Err(invalid(
            "an image manifest must not carry manifests (ambiguous manifest/index document)",
        ));
    }
    let mut references = Vec::new();
    let mut config_type = None;
    if is_index {
        let list = o
            .get("manifests")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("manifests: required array"))?;
        for (i, m) in list.iter().enumerate() {
            let (_, digest, size) = descriptor(m, &format!("manifests[{i}]"))?;
            references.push(Reference::Manifest { digest, size });
        }
    } else {
        let config = o.get("config").ok_or_else(|| invalid("config: required"))?;
        let (ct, digest, size) = descriptor(config, "config")?;
        config_type = Some(ct);
        references.push(Reference::Blob { digest, size });
        let layers = o
            .get("layers")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("layers: required array"))?;
        for (i, l) in layers.iter().enumerate() {
            let (_, digest, size) = descriptor(l, &format!("layers[{i}]"))?;
            // Foreign layers (with `urls`) are fetched from elsewhere, not pushed here.
            let foreign = l
                .get("urls")
                .and_then(Value::as_array)
                .is_some_and(|u| !u.is_empty());
            if !foreign {
                references.push(Reference::Blob { digest, size });
            }
        }
    }
    Ok(Parsed {
        artifact_type: artifact_type.or(config_type),
        media_type,
        subject,
        annotations,
        references,
    })
}

pub(crate) enum ManifestRef {
    Tag(Tag),
    Digest(Digest),
}

pub(crate) fn parse_reference(s: &str) -> Result<ManifestRef> {
    if s.contains(':') {
        Ok(ManifestRef::Digest(Digest::parse(s)?))
    } else {
        Ok(ManifestRef::Tag(Tag::parse(s)?))
    }
}

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    /// Writes a pushed manifest's record unless an equal, fresh one is stored.
    ///
    /// By compare-and-swap from the value read, not a plain `set`: the collector claims an old
    /// record by compare-and-swap (to `gone`) and deletes it after, so either this write lands
    /// first (the claim fails: the manifest stays) or this push sees the claim and answers 503
    /// to retry. A plain `set` could land over a claim, or over a claimed record read as
    /// absent, and be deleted under the tags this push writes next (docs/DESIGN.md, "Garbage
    /// collection"). Retags of a fresh record write nothing, as before.
    async fn write_record(
        &self,
        name: &RepoName,
        digest: &Digest,
        parsed: &Parsed,
        bytes: &[u8],
    ) -> Result<()> {
        let key = layout::manifest(name, digest);
        for _ in 0..crate::gc::TOUCH_ATTEMPTS {
            let raw = self.kv.get(&key).await?;
            let existing = raw.clone().map(decode_record).transpose()?;
            if let Some(e) = &existing {
                // Waiting for the collector instead would wait on a run that may have
                // stopped (a crash) until its next run: the client's retry is bounded.
                if e.gone {
                    return Err(crate::gc::collecting(digest));
                }
                // A digest keeps the media type it was first pushed with: a later PUT of the
                // same bytes under another Content-Type must not change how it is served.
                if e.media_type != parsed.media_type {
                    return Err(invalid(format!(
                        "{digest} is already stored as {}, not {}",
                        e.media_type, parsed.media_type
                    )));
                }
            }
            // Tagging a stored manifest again (CI retags, a re-push) writes nothing but the
            // tag: the same bytes make the same record, and each write costs the directory
            // host an fsync. Unless the record's time is old enough that garbage collection
            // could take it soon: then the write is the push's touch (`crate::gc`).
            let now = crate::auth::now_secs();
            if existing.is_some_and(|e| {
                e.bytes == bytes && crate::gc::fresh(e.at, now, self.config.gc.grace_secs)
            }) {
                return Ok(());
            }
            let record = encode_record(
                &parsed.media_type,
                parsed.subject.as_ref(),
                bytes,
                now,
                false,
            );
            // Lost to another writer: a concurrent push of the same bytes (read again: fresh,
            // done), a touch, or the collector's claim (read again: 503).
            if self
                .kv
                .compare_and_swap(&key, raw.as_deref(), &record)
                .await?
            {
                return Ok(());
            }
        }
        Err(crate::gc::collecting(digest))
    }

    pub(crate) async fn load_manifest(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>> {
        match self.kv.get(&layout::manifest(name, digest)).await? {
            None => Ok(None),
            Some(raw) => Ok(Some(decode_record(raw)?).filter(|m| !m.gone)),
        }
    }

    pub(crate) async fn resolve_tag(&self, name: &RepoName, tag: &Tag) -> Result<Option<Digest>> {
        let Some(v) = self.kv.get(&layout::tag(name, tag)).await? else {
            return Ok(None);
        };
        let s = String::from_utf8(v).map_err(|_| StoreError::new("corrupt tag"))?;
        Ok(Some(
            Digest::parse(&s).map_err(|_| StoreError::new("corrupt tag"))?,
        ))
    }

    /// 404: `NAME_UNKNOWN` if the repository does not exist, else `MANIFEST_UNKNOWN`.
    async fn manifest_unknown(&self, name: &RepoName, reference: &str) -> Error {
        match self.repository_exists(name).await {
            Ok(false) => Error::not_found(
                ErrorCode::NameUnknown,
                format!("repository {name} is not known to this registry"),
            ),
            _ => Error::not_found(
                ErrorCode::ManifestUnknown,
                format!("manifest {reference} is not in repository {name}"),
            ),
        }
    }

    pub(crate) async fn get_manifest(
        &self,
        name: &RepoName,
        reference: &str,
        head: bool,
    ) -> Result<RegistryResponse<B>> {
        // A reference that is neither a valid tag nor a valid digest names no manifest: 404
        // MANIFEST_UNKNOWN, as the spec's conformance suite expects of GET and HEAD (a PUT
        // with an invalid tag is still a 400 TAG_INVALID).
        let digest = match parse_reference(reference) {
            Ok(ManifestRef::Digest(d)) => Some(d),
            Ok(ManifestRef::Tag(t)) => self.resolve_tag(name, &t).await?,
            Err(_) => None,
        };
        let found = match &digest {
            Some(d) => self.load_manifest(name, d).await?.map(|m| (d, m)),
            None => None,
        };
        let Some((digest, m)) = found else {
            return Err(self.manifest_unknown(name, reference).await);
        };
        let mut resp = bytes_response(StatusCode::OK, &m.media_type, m.bytes, head);
        let h = resp.headers_mut();
        let d = digest.to_string();
        h.insert("etag", format!("\"{d}\"").parse().expect("valid header"));
        h.insert("docker-content-digest", d.parse().expect("valid header"));
        Ok(resp)
    }

    pub(crate) async fn put_manifest<RB>(
        &self,
        name: &RepoName,
        reference: &str,
        q: &Query,
        h: &HeaderMap,
        body: &mut Pin<Box<RB>>,
    ) -> Result<RegistryResponse<B>>
    where
        RB: http_body::Body,
        RB::Error: std::fmt::Display,
    {
        let reference = parse_reference(reference)?;
        let extra_tags = q.all("tag").map(Tag::parse).collect::<Result<Vec<_>>>()?;
        if extra_tags.len() > MAX_TAGS_PER_PUT {
            return Err(Error::new(
                ErrorCode::Unsupported,
                StatusCode::URI_TOO_LONG,
                format!("at most {MAX_TAGS_PER_PUT} tags per request"),
            ));
        }
        let max = self.config.max_manifest_bytes;
        let too_large = || {
            Error::new(
                ErrorCode::SizeInvalid,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("manifests are limited to {max} bytes"),
            )
        };
        if content_length(h)?.is_some_and(|l| l > max) {
            return Err(too_large());
        }
        let bytes = read_to_vec(body, max).await.map_err(|e| match e {
            ReadError::TooLarge { .. } => too_large(),
            ReadError::Body(e) => invalid(format!("reading the manifest failed: {e}")),
        })?;
        let content_type = header_str(h, header::CONTENT_TYPE)
            .map(|ct| ct.split(';').next().unwrap_or("").trim())
            .unwrap_or("");
        let parsed = validate(&bytes, content_type)?;

        // The digest is always of the exact bytes received.
        let digest = match &reference {
            ManifestRef::Digest(d) => {
                let computed = Digest::of(d.algorithm(), &bytes);
                if &computed != d {
                    return Err(Error::bad_request(
                        ErrorCode::DigestInvalid,
                        format!("the manifest's digest is {computed}, not {d}"),
                    ));
                }
                computed
            }
            ManifestRef::Tag(_) => Digest::of(Algorithm::Sha256, &bytes),
        };

        for r in &parsed.references {
            let (digest, size, found) = match r {
                // Touched, not just read: garbage collection spares what a push just referenced
                // (`crate::gc`, the race with a push).
                Reference::Blob { digest, size } => {
                    (digest, *size, self.touch_link(name, digest).await?)
                }
                Reference::Manifest { digest, size } => {
                    (digest, *size, self.touch_manifest(name, digest).await?)
                }
            };
            match found {
                None => {
                    return Err(Error::bad_request(
                        ErrorCode::ManifestBlobUnknown,
                        format!(
                            "the manifest references {digest}, which is not in repository {name}"
                        ),
                    )
                    .with_detail(serde_json::json!({ "digest": digest.to_string() })));
                }
                Some(actual) if actual != size => {
                    return Err(invalid(format!(
                        "the descriptor of {digest} says {size} bytes, but it has {actual}"
                    )));
                }
                Some(_) => {}
            }
        }

        self.write_record(name, &digest, &parsed, &bytes).await?;
        if let Some((subject, d)) = referrer_entry(&parsed, &bytes, &digest) {
            self.kv
                .set(&layout::referrer(name, &subject, &digest), &d)
                .await?;
        }
        let digest_s = digest.to_string();
        let path_tag = match &reference {
            ManifestRef::Tag(t) => Some(t),
            ManifestRef::Digest(_) => None,
        };
        // Tags are written even when they already name this manifest: on a host with listing
        // indexes (`IndexedKv`) the write is what puts a tag left unlisted by a failed earlier
        // attempt into its listing (tests/faults.rs replays after every fault).
        for t in path_tag.into_iter().chain(&extra_tags) {
            self.set_tag(name, t, &digest).await?;
        }
        // Likewise the catalog entry, written and not only ensured: a repository whose first
        // push failed between its catalog write and the index update is listed again by the
        // next manifest push.
        self.kv.set(&layout::catalog(name), b"").await?;

        let mut headers = vec![
            ("location", format!("/v2/{name}/manifests/{digest}")),
            ("docker-content-digest", digest_s),
        ];
        if let Some(s) = &parsed.subject {
            headers.push(("oci-subject", s.to_string()));
        }
        for t in &extra_tags {
            headers.push(("oci-tag", t.to_string()));
        }
        Ok(empty_response(StatusCode::CREATED, &headers))
    }

    pub(crate) async fn delete_manifest(
        &self,
        name: &RepoName,
        reference: &str,
    ) -> Result<RegistryResponse<B>> {
        let reference = parse_reference(reference)?;
        if !self.config.delete_enabled {
            return Err(deletion_disabled());
        }
        match reference {
            ManifestRef::Tag(t) => {
                if !self.config.tag_delete_enabled {
                    return Err(Error::bad_request(
                        ErrorCode::Unsupported,
                        "deleting tags is disabled on this registry; delete the manifest by digest",
                    ));
                }
                if self.resolve_tag(name, &t).await?.is_none() {
                    return Err(self.manifest_unknown(name, t.as_str()).await);
                }
                self.kv.delete(&layout::tag(name, &t)).await?;
            }
            ManifestRef::Digest(d) => {
                let Some(m) = self.load_manifest(name, &d).await? else {
                    return Err(self.manifest_unknown(name, &d.to_string()).await);
                };
                // The tags that point at it go too (distribution-spec, "Deleting Manifests").
                // Tags first and the record last, so an interrupted delete can be retried.
                self.untag_manifest(name, &d).await?;
                if let Some(subject) = &m.subject {
                    self.kv.delete(&layout::referrer(name, subject, &d)).await?;
                }
                self.kv.delete(&layout::manifest(name, &d)).await?;
            }
        }
        Ok(empty_response(StatusCode::ACCEPTED, &[]))
    }
}

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    /// Sets tag `t` of `name` to `digest`: its reverse entry (`_tagged`) first, so a tag never
    /// points at a manifest without one. Every tag write goes through here. A retag to the
    /// manifest the tag already names (CI) costs a read, not a second write (an fsync on the
    /// directory host): that tag's entry was written, completely, before the tag was.
    pub(crate) async fn set_tag(
        &self,
        name: &RepoName,
        t: &Tag,
        digest: &Digest,
    ) -> std::result::Result<(), StoreError> {
        let key = layout::tag(name, t);
        let value = digest.to_string();
        if self.kv.get(&key).await?.as_deref() != Some(value.as_bytes()) {
            self.kv.set(&layout::tagged(name, digest, t), b"").await?;
        }
        self.kv.set(&key, value.as_bytes()).await
    }

    /// Deletes the tags of `name` that point at `digest`, and the manifest's reverse entries:
    /// a listing of its own entries (each checked against the tag, since a tag that moved on
    /// leaves its old entry behind), so a delete costs the manifest's tags, not the
    /// repository's. A repository whose tags predate the entries is read whole once, its
    /// missing entries written, and then marked complete.
    pub(crate) async fn untag_manifest(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> std::result::Result<(), StoreError> {
        let want = digest.to_string();
        if self.kv.get(&layout::tagged_complete(name)).await?.is_none() {
            let prefix = layout::tags_prefix(name);
            // One listing of every tag: a loop of pages would re-read the tags directory
            // (the local-directory host) for each page.
            for k in self.kv.list(&prefix, None, usize::MAX).await? {
                let Some(v) = self.kv.get(&k).await? else {
                    continue;
                };
                if v == want.as_bytes() {
                    self.kv.delete(&k).await?;
                    continue;
                }
                let (Ok(t), Some(d)) = (
                    Tag::parse(&k[prefix.len()..]),
                    std::str::from_utf8(&v)
                        .ok()
                        .and_then(|s| Digest::parse(s).ok()),
                ) else {
                    continue;
                };
                let entry = layout::tagged(name, &d, &t);
                if self.kv.get(&entry).await?.is_none() {
                    self.kv.set(&entry, b"").await?;
                }
            }
            self.kv.set(&layout::tagged_complete(name), b"").await?;
        } else {
            let tagged = layout::tagged_prefix(name, digest);
            for e in self.kv.list(&tagged, None, usize::MAX).await? {
                let k = layout::tags_prefix(name) + &e[tagged.len()..];
                if self.kv.get(&k).await?.as_deref() == Some(want.as_bytes()) {
                    self.kv.delete(&k).await?;
                }
            }
        }
        self.forget_tagged(name, digest).await
    }

    /// Deletes the reverse entries of manifest `digest` (once its tags are gone).
    pub(crate) async fn forget_tagged(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> std::result::Result<(), StoreError> {
        let tagged = layout::tagged_prefix(name, digest);
        for e in self.kv.list(&tagged, None, usize::MAX).await? {
            self.kv.delete(&e).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn validation() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"a","digest":"{D}","size":0}},"layers":[]}}"#
        );
        assert!(validate(m.as_bytes(), OCI_MANIFEST).is_ok());
        assert!(validate(m.as_bytes(), "").is_ok());
        assert!(validate(m.as_bytes(), OCI_INDEX).is_err());
        for bad in [
            "",
            "[]",
            "{",
            r#"{"schemaVersion":1}"#,
            r#"{"schemaVersion":2,"mediaType":"x/y","layers":[]}"#,
            r#"{"schemaVersion":2,"config":{},"layers":[]}"#,
            r#"{"schemaVersion":2,"manifests":[{"mediaType":"a","digest":"sha256:00","size":1}]}"#,
            r#"{"schemaVersion":2,"manifests":[{"mediaType":"a","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":-1}]}"#,
        ] {
            assert!(validate(bad.as_bytes(), "").is_err(), "{bad}");
        }
    }
}
