//! The storage layout: every key-value key and every blob path is built here, and nowhere else.
//!
//! ```text
//! key-value store (one key per fact)
//! ├── catalog/<name>                                          ""   the repository exists
//! ├── upload-index/<started:012>/<uuid>                       "<name>": an upload session, by age
//! │                                                            (so stale ones can be purged)
//! ├── upload-counts/_total                                    open upload sessions, all
//! │                                                            repositories: {"spans":[[start,
//! │                                                            count],..],"id"} (crate::admission)
//! ├── upload-counts/<name>                                    the same, of one repository
//! ├── login-failures/user/<sha256(user)>                      failed logins of a user name in the
//! │                                                            current window: {"start","count",
//! │                                                            "id"} (crate::throttle)
//! ├── login-failures/address/<address>                        ... from one client address (an IPv6
//! │                                                            address by its /64)
//! ├── login-failures/user-address/<address|unknown>/<sha256(user)>
//! │                                                            ... of a user name from one address
//! ├── gc/state                                                 garbage collection: {"generation",
//! │                                                            "phase","cursor","stats",..}
//! ├── gc/blobs/<alg>/<hex>                                     {"at","deleting"}: a stored blob,
//! │                                                            when last written or linked
//! ├── gc/repos/<name>/_live/<alg>/<hex>                         generation: the collector found
//! │                                                            manifest live (a repository too
//! │                                                            large for one step, judged in pages)
//! ├── gc/repos/<name>/_want/<alg>/<hex>                         generation: a kept manifest of
//! │                                                            <name> references blob <alg>:<hex>
//! ├── gc/repos/<name>/_dropped/<alg>/<hex>                      generation: retention removed a
//! │                                                            tag of manifest <alg>:<hex>
//! └── repositories/<name>/
//!     ├── _layers/<alg>/<hex>                                 {"size":N}  blob linked into <name>
//!     ├── _manifests/revisions/<alg>/<hex>                    manifest record: a JSON header line
//!     │                                                        {"mediaType","subject"} then the
//!     │                                                        manifest's exact bytes
//!     ├── _manifests/tags/<tag>                               "<alg>:<hex>" of the tagged manifest
//!     ├── _tagged/<alg>/<hex>/<tag>                           ""  tag <tag> was set to <alg>:<hex>
//!     │                                                        (written before the tag; may be
//!     │                                                        stale: the tag is checked)
//!     ├── _tagged-complete                                    ""  every tag has its _tagged entry
//!     │                                                        (so a delete by digest lists
//!     │                                                        them, not every tag)
//!     ├── _referrers/<alg>/<hex>/<ref-alg>/<ref-hex>          descriptor (JSON) of a manifest in
//!     │                                                        <name> whose subject is <alg>:<hex>
//!     ├── _uploads/<uuid>                                     upload session (JSON): algorithm,
//!     │                                                        offset, running hash state, parts
//!     └── _mirror/tags/<tag>                                  a mirrored tag: {"digest","checked"}
//!                                                              (when upstream last confirmed it)
//!
//! pull-through mirror (crate::mirror)
//! ├── mirror-tokens/<sha256(upstream url, user, scope)>       upstream Bearer token {"token","expires"}
//! └── mirror-leases/<alg>/<hex>                               who fetches a blob from upstream now:
//!                                                              {"owner","expires"}
//!   (lapsed tokens, leases and upload counts: removed by the collector, crate::gc::records)
//!
//! blob store
//! ├── blobs/<alg>/<hex[0..2]>/<hex>                           content, stored once, shared by every
//! │                                                            repository that links it
//! ├── uploads/<uuid>/<offset>-<nonce>                         parts of an upload in progress
//! └── uploads/mirror-<nonce>/blob                             a blob arriving from an upstream,
//!                                                              moved to blobs/ once verified
//!
//! listing indexes (crate::hosts::indexed, for key-value stores that cannot list by prefix)
//! ├── listing-index/<listing prefix>                          sorted JSON array of the keys below
//! │                                                            <listing prefix> (suffixes): tags,
//! │                                                            catalog, referrers of a subject
//! └── listing-indexed                                         "1": every index has been built
//!
//! never written, only read by the readiness probe (`/ready`) to see that each store answers
//! ├── probe/ready                                             a key (absent)
//! └── probe/ready                                             a blob path (absent)
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

/// The key `/ready` reads to see that the key-value store answers; never written.
pub fn probe_key() -> &'static str {
    "probe/ready"
}

/// The blob `/ready` asks the size of to see that the blob store answers; never written.
pub fn probe_blob() -> &'static str {
    "probe/ready"
}

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

/// The tags set to manifest `digest` (a reverse index, so deleting a manifest finds its tags
/// without reading every tag of the repository).
pub fn tagged_prefix(name: &RepoName, digest: &Digest) -> String {
    format!(
        "{}/_tagged/{}/{}/",
        repo(name),
        digest.algorithm().as_str(),
        digest.hex()
    )
}

pub fn tagged(name: &RepoName, digest: &Digest, tag: &Tag) -> String {
    format!("{}{tag}", tagged_prefix(name, digest))
}

/// Present once every tag of `name` has its `_tagged` entry.
pub fn tagged_complete(name: &RepoName) -> String {
    format!("{}/_tagged-complete", repo(name))
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

/// The count of open upload sessions in every repository. Repository names have no component
/// starting with `_`, so no repository's count is this key.
pub fn upload_count_total() -> &'static str {
    "upload-counts/_total"
}

/// The count of open upload sessions of repository `name`.
pub fn upload_count(name: &RepoName) -> String {
    format!("upload-counts/{name}")
}

/// Every upload-count record lives under this prefix (for the collector).
pub fn upload_counts_prefix() -> &'static str {
    "upload-counts/"
}

/// Every record of the failed-login throttle lives under this prefix (for the purge).
pub fn login_failures_prefix() -> &'static str {
    "login-failures/"
}

/// Failed logins of one user name (`user_hash`: the hex SHA-256 of the name, so that any name
/// makes a short, safe key segment).
pub fn login_failures_user(user_hash: &str) -> String {
    format!("login-failures/user/{user_hash}")
}

/// Failed logins from one client address (as [`crate::throttle`] writes it: an IP address, an
/// IPv6 one reduced to its /64).
pub fn login_failures_address(address: &str) -> String {
    format!("login-failures/address/{address}")
}

/// Failed logins of one user name from one client address, or from unknown addresses.
pub fn login_failures_user_address(address: Option<&str>, user_hash: &str) -> String {
    format!(
        "login-failures/user-address/{}/{user_hash}",
        address.unwrap_or("unknown")
    )
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

/// Garbage collection's state: phase, cursor, generation, counts (`crate::gc`).
pub fn gc_state() -> &'static str {
    "gc/state"
}

pub fn gc_blobs_prefix() -> &'static str {
    "gc/blobs/"
}

/// Garbage collection's record of a stored blob: when it was last written or linked, and
/// whether the collector has claimed it. Every blob the store holds has one.
pub fn gc_blob(digest: &Digest) -> String {
    format!("gc/blobs/{}/{}", digest.algorithm().as_str(), digest.hex())
}

pub fn manifests_prefix(name: &RepoName) -> String {
    format!("{}/_manifests/revisions/", repo(name))
}

pub fn layers_prefix(name: &RepoName) -> String {
    format!("{}/_layers/", repo(name))
}

pub fn uploads_prefix(name: &RepoName) -> String {
    format!("{}/_uploads/", repo(name))
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

/// The listing a key belongs to, for hosts that keep listing indexes: the prefix the core lists
/// it under (a repository's tags, the catalog, the referrers of one subject), or `None` for
/// keys that are never listed by prefix (records, links, upload sessions; the upload index is
/// left to the host's own listing).
pub fn listing_of(key: &str) -> Option<&str> {
    if key.starts_with("catalog/") {
        return Some("catalog/");
    }
    let rest = key.strip_prefix("repositories/")?;
    // Repository names have no component starting with `_`, so the first `/_` ends the name.
    let at = rest.find("/_")?;
    let after = &rest[at + 1..];
    let len = "repositories/".len() + at + 1;
    if let Some(tag) = after.strip_prefix("_manifests/tags/") {
        return (!tag.is_empty() && !tag.contains('/'))
            .then(|| &key[..len + "_manifests/tags/".len()]);
    }
    if let Some(r) = after.strip_prefix("_tagged/") {
        // <alg>/<hex>/<tag>: the listing is of one manifest's tags.
        let mut parts = r.splitn(3, '/');
        let (alg, hex, tag) = (parts.next()?, parts.next()?, parts.next()?);
        return (!tag.is_empty() && !tag.contains('/'))
            .then(|| &key[..len + "_tagged/".len() + alg.len() + hex.len() + 2]);
    }
    if let Some(r) = after.strip_prefix("_referrers/") {
        // <alg>/<hex>/<ref-alg>/<ref-hex>: the listing is of one subject.
        let mut parts = r.splitn(3, '/');
        let (alg, hex, rest) = (parts.next()?, parts.next()?, parts.next()?);
        return (!rest.is_empty())
            .then(|| &key[..len + "_referrers/".len() + alg.len() + hex.len() + 2]);
    }
    None
}

/// Set once every listing index of the store has been built (see `hosts::indexed`).
pub fn listing_index_marker() -> &'static str {
    "listing-indexed"
}

/// The key holding the listing index of `prefix` (see [`listing_of`]).
pub fn listing_index(prefix: &str) -> String {
    format!("listing-index/{prefix}")
}

/// The collector's marks for a repository judged in pages (`crate::gc`): `_live`, `_want`,
/// `_dropped` below it. `_`: no repository name has a component starting with it.
pub fn gc_repo_prefix(name: &RepoName) -> String {
    format!("gc/repos/{name}/_")
}

fn gc_repo_mark(name: &RepoName, kind: &str, digest: &Digest) -> String {
    format!(
        "{}{kind}/{}/{}",
        gc_repo_prefix(name),
        digest.algorithm().as_str(),
        digest.hex()
    )
}

/// The run that found manifest `digest` of `name` live.
pub fn gc_live(name: &RepoName, digest: &Digest) -> String {
    gc_repo_mark(name, "live", digest)
}

/// The run in which a kept manifest of `name` referenced blob `digest`.
pub fn gc_want(name: &RepoName, digest: &Digest) -> String {
    gc_repo_mark(name, "want", digest)
}

/// The run whose retention removed a tag of manifest `digest` of `name`.
pub fn gc_dropped(name: &RepoName, digest: &Digest) -> String {
    gc_repo_mark(name, "dropped", digest)
}

pub fn gc_dropped_prefix(name: &RepoName) -> String {
    format!("{}dropped/", gc_repo_prefix(name))
}

/// The mirror's per-repository records (`_mirror/tags/...`): cache, not content.
pub fn mirror_prefix(name: &RepoName) -> String {
    format!("{}/_mirror/", repo(name))
}

/// When the mirror last confirmed upstream what tag `tag` of `name` points at.
pub fn mirror_tag(name: &RepoName, tag: &Tag) -> String {
    format!("{}/_mirror/tags/{tag}", repo(name))
}

/// An upstream token for `scope`, per upstream URL and user (hashed: URLs hold `/` and `:`).
pub fn mirror_token(upstream_url: &str, user: &str, scope: &str) -> String {
    let d = Digest::of(
        crate::digest::Algorithm::Sha256,
        format!("{upstream_url}\n{user}\n{scope}").as_bytes(),
    );
    format!("{}{}", mirror_tokens_prefix(), d.hex())
}

/// Every cached upstream token lives under this prefix (for the collector).
pub fn mirror_tokens_prefix() -> &'static str {
    "mirror-tokens/"
}

/// The lease of whoever fetches blob `digest` from an upstream.
pub fn mirror_lease(digest: &Digest) -> String {
    format!(
        "{}{}/{}",
        mirror_leases_prefix(),
        digest.algorithm().as_str(),
        digest.hex()
    )
}

/// Every mirror lease lives under this prefix (for the collector).
pub fn mirror_leases_prefix() -> &'static str {
    "mirror-leases/"
}

/// Where a blob fetched from an upstream is written before its digest is checked.
pub fn mirror_fetch(nonce: &str) -> String {
    format!("uploads/mirror-{nonce}/blob")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings() {
        let name = RepoName::parse("team/app", 255).unwrap();
        let tag = Tag::parse("v1").unwrap();
        let d = Digest::of(crate::digest::Algorithm::Sha256, b"s");
        let r = Digest::of(crate::digest::Algorithm::Sha256, b"r");
        assert_eq!(listing_of(&catalog(&name)), Some(catalog_prefix()));
        assert_eq!(
            listing_of(&self::tag(&name, &tag)),
            Some(tags_prefix(&name).as_str())
        );
        assert_eq!(
            listing_of(&tagged(&name, &d, &tag)),
            Some(tagged_prefix(&name, &d).as_str())
        );
        assert_eq!(
            listing_of(&referrer(&name, &d, &r)),
            Some(referrers_prefix(&name, &d).as_str())
        );
        for unlisted in [
            manifest(&name, &d),
            blob_link(&name, &d),
            tagged_complete(&name),
            upload_index(
                5,
                &UploadId::parse("01234567-89ab-cdef-0123-456789abcdef").unwrap(),
            ),
            "kvblob/chunk/x/00000000".to_owned(),
            upload_count(&name),
            upload_count_total().to_owned(),
            login_failures_user("ab"),
            login_failures_address("2001:db8::"),
            login_failures_user_address(None, "ab"),
        ] {
            assert_eq!(listing_of(&unlisted), None, "{unlisted}");
        }
    }
}
