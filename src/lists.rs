//! Content discovery: the tags list (end-8a/b), the catalog, and the referrers list
//! (end-12a/b). All three are prefix scans of the key-value store, paginated with `n`/`last`
//! and an RFC 8288 `Link` header.

use http::StatusCode;
use serde_json::Value;

use crate::body::Body;
use crate::digest::Digest;
use crate::error::{Error, ErrorCode};
use crate::host::{BlobStore, KeyValue};
use crate::layout;
use crate::manifests::OCI_INDEX;
use crate::names::{RepoName, Tag};
use crate::registry::{Registry, RegistryResponse, Result, json_response};
use crate::request::{Query, query_escape};

/// One page of a prefix scan: the entries (key suffixes) and whether more follow.
struct Page {
    entries: Vec<String>,
    more: bool,
}

/// A JSON page of the tags list or the catalog, with an RFC 8288 `Link` to the next page when
/// more remain (never when `n` is 0: distribution-spec, "Listing Tags").
fn paged<R>(body: &Value, page: &Page, n: Option<usize>, path: &str) -> http::Response<Body<R>> {
    let mut resp = json_response(StatusCode::OK, serde_json::to_vec(body).expect("json"));
    if page.more && n != Some(0) {
        let link = format!(
            "<{path}?n={}&last={}>; rel=\"next\"",
            page.entries.len(),
            query_escape(page.entries.last().map_or("", String::as_str))
        );
        resp.headers_mut()
            .insert("link", link.parse().expect("valid header"));
    }
    resp
}

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    /// Lists keys under `prefix` after `last` (a suffix), up to `n`, or every one when `n` is
    /// absent. One listing of the store per request, never a loop of internal pages: a host
    /// whose listing costs a pass over the directory (the local-directory host) or the whole
    /// store (Spin) would pay that pass again for every internal page.
    async fn scan(&self, prefix: &str, last: Option<&str>, n: Option<usize>) -> Result<Page> {
        let after = last.map(|l| format!("{prefix}{l}"));
        // One more than asked tells whether another page follows.
        let limit = n.map_or(usize::MAX, |n| n.saturating_add(1));
        let mut keys = self.kv.list(prefix, after.as_deref(), limit).await?;
        let more = n.is_some_and(|n| keys.len() > n);
        keys.truncate(n.unwrap_or(usize::MAX));
        let entries = keys
            .into_iter()
            .map(|k| k[prefix.len()..].to_owned())
            .collect();
        Ok(Page { entries, more })
    }

    /// The `n` query parameter, capped at the page size (a capped page carries a `Link`).
    fn page_n(&self, q: &Query) -> Result<Option<usize>> {
        match q.get("n") {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse::<usize>()
                .map(|n| Some(n.min(self.config.page_size)))
                .map_err(|_| {
                    Error::bad_request(
                        ErrorCode::Unsupported,
                        format!("n must be a non-negative integer, not {v:?}"),
                    )
                }),
        }
    }

    pub(crate) async fn tags_list(
        &self,
        name: &RepoName,
        q: &Query,
    ) -> Result<RegistryResponse<B>> {
        if !self.repository_exists(name).await? {
            return Err(Error::not_found(
                ErrorCode::NameUnknown,
                format!("repository {name} is not known to this registry"),
            ));
        }
        let n = self.page_n(q)?;
        let last = q.get("last").map(Tag::parse).transpose()?;
        let page = self
            .scan(
                &layout::tags_prefix(name),
                last.as_ref().map(Tag::as_str),
                n,
            )
            .await?;
        let body = serde_json::json!({ "name": name.as_str(), "tags": page.entries });
        Ok(paged(&body, &page, n, &format!("/v2/{name}/tags/list")))
    }

    pub(crate) async fn catalog(&self, q: &Query) -> Result<RegistryResponse<B>> {
        let n = self.page_n(q)?;
        let last = q
            .get("last")
            .map(|l| RepoName::parse(l, self.config.max_name_length))
            .transpose()?;
        let page = self
            .scan(
                layout::catalog_prefix(),
                last.as_ref().map(RepoName::as_str),
                n,
            )
            .await?;
        let body = serde_json::json!({ "repositories": page.entries });
        Ok(paged(&body, &page, n, "/v2/_catalog"))
    }

    /// GET /v2/<name>/referrers/<digest>: an image index of the manifests whose `subject` is
    /// `<digest>`. Never 404 (distribution-spec, "Listing Referrers"): an unknown subject or
    /// repository has an empty list.
    pub(crate) async fn referrers(
        &self,
        name: &RepoName,
        subject: &str,
        q: &Query,
    ) -> Result<RegistryResponse<B>> {
        let subject = Digest::parse(subject)?;
        let filter = q.get("artifactType").filter(|s| !s.is_empty());
        let last = q
            .get("last")
            .map(|l| Digest::parse(l).map(|d| format!("{}/{}", d.algorithm().as_str(), d.hex())))
            .transpose()?;
        let prefix = layout::referrers_prefix(name, &subject);
        let page = self
            .scan(&prefix, last.as_deref(), Some(self.config.page_size))
            .await?;
        let mut manifests = Vec::with_capacity(page.entries.len());
        for entry in &page.entries {
            let Some(raw) = self.kv.get(&format!("{prefix}{entry}")).await? else {
                continue; // deleted meanwhile
            };
            let d: Value = serde_json::from_slice(&raw).map_err(|e| {
                crate::error::StoreError::new(format!("corrupt referrer record: {e}"))
            })?;
            if filter.is_none_or(|f| d.get("artifactType").and_then(Value::as_str) == Some(f)) {
                manifests.push(d);
            }
        }
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        let mut resp = json_response(StatusCode::OK, serde_json::to_vec(&body).expect("json"));
        let h = resp.headers_mut();
        h.insert("content-type", OCI_INDEX.parse().expect("valid header"));
        if filter.is_some() {
            h.insert(
                "oci-filters-applied",
                "artifactType".parse().expect("valid"),
            );
        }
        if page.more
            && let Some(last) = page
                .entries
                .last()
                .and_then(|e| layout::digest_from_suffix(e))
        {
            let mut link = format!(
                "</v2/{name}/referrers/{subject}?last={}",
                query_escape(&last.to_string())
            );
            if let Some(f) = filter {
                link.push_str(&format!("&artifactType={}", query_escape(f)));
            }
            link.push_str(">; rel=\"next\"");
            h.insert("link", link.parse().expect("valid header"));
        }
        Ok(resp)
    }
}
