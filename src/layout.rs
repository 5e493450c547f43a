//! The storage layout: every key-value key and every blob path is built here, and nowhere else.
//!
//! ```text
//! key-value store (one key per fact)
//! ├── catalog/<name>                                          ""   the repository exists
//! ├── upload-index/<started:012>/<uuid>                       "<name>": an upload session, by age
//! │                                                            (so stale ones can be purged)
//! └── repositories/<name>/
//!     ├── _layers/<alg>/<hex>                                 {"size":N}  blob linked into <name>
//!     ├── _manifests/revisions/<alg>/<hex>                    manifest record: a JSON header line
//!     │                                                        {"mediaType","subject"} then the
//!     │                                                        manifest's exact bytes
//!     ├── _manifests/tags/<tag>                               "<alg>:<hex>" of the tagged manifest
//!     ├── _referrers/<alg>/<hex>/<ref-alg>/<ref-hex>          descriptor (JSON) of a manifest in
//!     │                                                        <name> whose subject is <alg>:<hex>
//!     └── _uploads/<uuid>                                     upload session (JSON): algorithm,
//!                                                              offset, running hash state, parts
//!
//! blob store
//! ├── blobs/<alg>/<hex[0..2]>/<hex>                           content, stored once, shared by every
//! │                                                            repository that links it
//! └── uploads/<uuid>/<offset>-<nonce>                         parts of an upload in progress
//!
//! blob store on a key-value store (crate::hosts::kvblobs, for hosts without a blob store)
//! ├── kvblob/obj/<blob path>                                   {"size","chunk","segments":[..]}
//! └── kvblob/chunk/<nonce>/<index:08>                          one chunk of a segment
//! ```
//!
//! Repository names never contain a component starting with `_` (see [`RepoName`]), so
//! `repositories/a/_layers/...` and `repositories/a/b/...` cannot collide; tags, digests and upload
//! ids are validated types too, so no key or path holds `..`, an empty segment or a stray `/`.

use crate::digest::Digest;
use crate::names::{RepoName, Tag, UploadId};

pub fn catalog_prefix() -> &'static str {
    "catalog/"
}

pub fn catalog(name: &RepoName) -> String {
    format!("catalog/{name}")
}

fn repo(name: &RepoName) -> String {
    format!("repositories/{name}")
}

/// The link that lets `name` read the blob `digest`.
pub fn blob_link(name: &RepoName, digest: &Digest) -> String {
    format!(
        "{}/_layers/{}/{}",
        repo(name),
        digest.algorithm().as_str(),
        digest.hex()
    )
}

pub fn manifest(name: &RepoName, digest: &Digest) -> String {
    format!(
        "{}/_manifests/revisions/{}/{}",
        repo(name),
        digest.algorithm().as_str(),
        digest.hex()
    )
}

pub fn tags_prefix(name: &RepoName) -> String {
    format!("{}/_manifests/tags/", repo(name))
}

pub fn tag(name: &RepoName, tag: &Tag) -> String {
    format!("{}{tag}", tags_prefix(name))
}

pub fn referrers_prefix(name: &RepoName, subject: &Digest) -> String {
    format!(
        "{}/_referrers/{}/{}/",
        repo(name),
        subject.algorithm().as_str(),
        subject.hex()
    )
}

pub fn referrer(name: &RepoName, subject: &Digest, referrer: &Digest) -> String {
    format!(
        "{}{}/{}",
        referrers_prefix(name, subject),
        referrer.algorithm().as_str(),
        referrer.hex()
    )
}

pub fn upload_index_prefix() -> &'static str {
    "upload-index/"
}

/// The age index entry of an upload session: keys sort by start time.
pub fn upload_index(started: u64, id: &UploadId) -> String {
    format!("upload-index/{started:012}/{id}")
}

pub fn upload(name: &RepoName, id: &UploadId) -> String {
    format!("{}/_uploads/{id}", repo(name))
}

/// Where a blob's content lives in the blob store.
pub fn blob_data(digest: &Digest) -> String {
    format!(
        "blobs/{}/{}/{}",
        digest.algorithm().as_str(),
        &digest.hex()[..2],
        digest.hex()
    )
}

/// A part of an upload: named by the offset it starts at, plus a nonce so two racing PATCHes
/// never write the same object.
pub fn upload_part(id: &UploadId, offset: u64, nonce: &str) -> String {
    format!("uploads/{id}/{offset:020}-{nonce}")
}

/// The digest behind a `<alg>/<hex>` key suffix (referrer keys), if it is one.
pub fn digest_from_suffix(suffix: &str) -> Option<Digest> {
    let (alg, hex) = suffix.split_once('/')?;
    Digest::parse(&format!("{alg}:{hex}")).ok()
}

/// The record of an object of the key-value blob store.
pub fn kvblob_object(path: &str) -> String {
    format!("kvblob/obj/{path}")
}

/// Chunk `index` of segment `id` of the key-value blob store.
pub fn kvblob_chunk(id: &str, index: u64) -> String {
    format!("kvblob/chunk/{id}/{index:08}")
}
