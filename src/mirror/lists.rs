//! The tags list and the referrers list of a mirrored repository: the upstream's answer when it
//! gives one (its body and `Content-Type` as sent, `OCI-Filters-Applied` kept, its `Link` to
//! the next page rewritten to this registry's path), else the cached answer, the ordinary
//! listing of what was pulled through (tags and referrers recorded as they were fetched).
//!
//! Nothing is stored per listing: every request asks the upstream, so a tag or referrer added
//! there is listed at once. The cache answers only when the upstream is unreachable, 5xx or
//! 429, and only for a repository something was pulled from; an upstream 404 is a 404 here.

use http::{Method, StatusCode, header};

use crate::digest::Digest;
use crate::error::{Error, ErrorCode};
use crate::host::{BlobStore, KeyValue};
use crate::mirror::Target;
use crate::mirror::fetch::{bad_gateway, upstream_refused};
use crate::mirror::upstream::{header_of, read_small};
use crate::names::{RepoName, Tag};
use crate::registry::{Registry, RegistryResponse, Result, bytes_response};
use crate::request::{Query, query_escape};

/// The upstream's answer to a listing, or why the cache answers instead.
enum Listing<R> {
    Answer(R),
    Unavailable(Error),
}

/// `path?k=v&...` with the values escaped.
fn with_query(path: String, params: &[(&str, &str)]) -> String {
    let q: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", query_escape(v)))
        .collect();
    if q.is_empty() {
        path
    } else {
        format!("{path}?{}", q.join("&"))
    }
}

/// The upstream's `Link: <url>; rel="next"` (RFC 8288) pointing here instead: the path's
/// `from` prefix (the upstream's name) becomes `to` (the name the client asked for), the
/// origin of an absolute URL is dropped, and containerd's `ns` is kept. `None` for a link
/// elsewhere, which a client of this registry could not follow.
fn rewrite_link(link: &str, from: &str, to: &str, ns: Option<&str>) -> Option<String> {
    let start = link.find('<')?;
    let end = start + link[start..].find('>')?;
    let url = &link[start + 1..end];
    let local = match url.find("://") {
        Some(i) => &url[i + 3 + url[i + 3..].find('/')?..],
        None => url,
    };
    let rest = local.strip_prefix(from)?;
    let mut target = format!("{to}{rest}");
    if let Some(ns) = ns {
        target.push(if target.contains('?') { '&' } else { '?' });
        target.push_str(&format!("ns={}", query_escape(ns)));
    }
    Some(format!("{}<{target}>{}", &link[..start], &link[end + 1..]))
}

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    /// `GET /v2/<name>/tags/list` of a mirrored repository (end-8a/b). `asked` is the name in
    /// the request (with `?ns=`, the upstream's own; `t.local` is where it is cached).
    pub(crate) async fn mirror_tags_list(
        &self,
        t: &Target<'_>,
        asked: &RepoName,
        q: &Query,
    ) -> Result<RegistryResponse<B>> {
        // Bad input is refused here, not passed on to the upstream.
        let n = q.get("n").filter(|n| !n.is_empty());
        if let Some(v) = n
            && v.parse::<usize>().is_err()
        {
            return Err(Error::bad_request(
                ErrorCode::Unsupported,
                format!("n must be a non-negative integer, not {v:?}"),
            ));
        }
        let last = q.get("last").map(Tag::parse).transpose()?;
        let mut params = Vec::new();
        if let Some(n) = n {
            params.push(("n", n));
        }
        if let Some(l) = &last {
            params.push(("last", l.as_str()));
        }
        let from = format!("/v2/{}/tags/list", t.remote);
        let to = format!("/v2/{asked}/tags/list");
        let path = with_query(from.clone(), &params);
        match self
            .upstream_listing(t, &path, &from, &to, q, Some(asked))
            .await?
        {
            Listing::Answer(r) => Ok(r),
            Listing::Unavailable(e) => {
                if !self.repository_exists(&t.local).await? {
                    return Err(e);
                }
                tracing::warn!(upstream = %t.up.url, error = %e.message, "tags list from the cache");
                let cached = self.tags_list(&t.local, q).await?;
                Ok(relink(
                    cached,
                    &format!("/v2/{}/tags/list", t.local),
                    &to,
                    q,
                ))
            }
        }
    }

    /// `GET /v2/<name>/referrers/<digest>` of a mirrored repository (end-12a/b).
    pub(crate) async fn mirror_referrers(
        &self,
        t: &Target<'_>,
        asked: &RepoName,
        subject: &str,
        q: &Query,
    ) -> Result<RegistryResponse<B>> {
        let subject = Digest::parse(subject)?;
        let last = q.get("last").map(Digest::parse).transpose()?;
        let last = last.map(|d| d.to_string());
        let mut params = Vec::new();
        if let Some(a) = q.get("artifactType").filter(|a| !a.is_empty()) {
            params.push(("artifactType", a));
        }
        if let Some(l) = &last {
            params.push(("last", l.as_str()));
        }
        let from = format!("/v2/{}/referrers/{subject}", t.remote);
        let to = format!("/v2/{asked}/referrers/{subject}");
        let path = with_query(from.clone(), &params);
        match self.upstream_listing(t, &path, &from, &to, q, None).await? {
            Listing::Answer(r) => Ok(r),
            Listing::Unavailable(e) => {
                if !self.repository_exists(&t.local).await? {
                    return Err(e);
                }
                tracing::warn!(upstream = %t.up.url, error = %e.message, "referrers from the cache");
                let cached = self.referrers(&t.local, &subject.to_string(), q).await?;
                let ours = format!("/v2/{}/referrers/{subject}", t.local);
                Ok(relink(cached, &ours, &to, q))
            }
        }
    }

    /// Asks the upstream for `path`; its answer passed on, or why it cannot be. With `name`
    /// (a tags list), the body's `name` becomes the repository's name here, as the spec has
    /// a tags list name the repository asked for (end-8a), not the upstream's.
    async fn upstream_listing(
        &self,
        t: &Target<'_>,
        path: &str,
        from: &str,
        to: &str,
        q: &Query,
        name: Option<&RepoName>,
    ) -> Result<Listing<RegistryResponse<B>>> {
        let resp = match self.upstream(t, Method::GET, path, None).await {
            Ok(r) => r,
            Err(e) => return Ok(Listing::Unavailable(e.into())),
        };
        let status = resp.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Ok(Listing::Unavailable(upstream_refused(status, path)));
        }
        if status == StatusCode::NOT_FOUND {
            // A referrers 404 means the upstream has no referrers API: the client then falls
            // back to the referrers tag schema, which this mirror serves like any tag.
            return Err(Error::not_found(
                ErrorCode::NameUnknown,
                format!("upstream {} has no {path}", t.up.url),
            ));
        }
        if !status.is_success() {
            return Err(upstream_refused(status, path));
        }
        let content_type = header_of(&resp, "content-type")
            .unwrap_or("application/json")
            .to_owned();
        let filters = header_of(&resp, "oci-filters-applied").map(str::to_owned);
        let link = header_of(&resp, "link").map(str::to_owned);
        let body = match read_small(resp.into_body(), self.config.max_manifest_bytes).await {
            Ok(b) => b,
            Err(e) => return Ok(Listing::Unavailable(e.into())),
        };
        let body = match name {
            None => body,
            Some(name) => match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(serde_json::Value::Object(mut list)) => {
                    list.insert("name".into(), name.as_str().into());
                    serde_json::to_vec(&list).expect("serializes").into()
                }
                _ => {
                    return Ok(Listing::Unavailable(bad_gateway(format!(
                        "upstream {} answered {path} with a body that is not a tags list",
                        t.up.url
                    ))));
                }
            },
        };
        let mut r = bytes_response(status, &content_type, body, false);
        let h = r.headers_mut();
        if let Some(f) = filters.and_then(|f| f.parse().ok()) {
            h.insert("oci-filters-applied", f);
        }
        if let Some(l) = link {
            match rewrite_link(&l, from, to, q.get("ns")).and_then(|l| l.parse().ok()) {
                Some(l) => {
                    h.insert(header::LINK, l);
                }
                None => {
                    tracing::warn!(upstream = %t.up.url, link = %l, "upstream Link not under {from}; dropped")
                }
            }
        }
        Ok(Listing::Answer(r))
    }
}

/// A cached listing's `Link` under the name the client asked for (they differ with `ns`).
fn relink<T>(mut r: http::Response<T>, ours: &str, to: &str, q: &Query) -> http::Response<T> {
    let h = r.headers_mut();
    if let Some(l) = h.get(header::LINK).and_then(|l| l.to_str().ok()) {
        match rewrite_link(l, ours, to, q.get("ns")).and_then(|l| l.parse().ok()) {
            Some(l) => {
                h.insert(header::LINK, l);
            }
            None => {
                h.remove(header::LINK);
            }
        }
    }
    r
}
