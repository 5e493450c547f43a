//! Pulling, checking and deleting blobs (end-2, end-10).

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use serde::{Deserialize, Serialize};

use crate::body::Body;
use crate::digest::Digest;
use crate::error::{Error, ErrorCode};
use crate::host::{BlobStore, KeyValue};
use crate::layout;
use crate::names::RepoName;
use crate::registry::{Registry, RegistryResponse, Result, empty_response};
use crate::request::header_str;

/// The value of a blob link: what a repository knows of a blob it may read.
#[derive(Serialize, Deserialize)]
pub(crate) struct BlobLink {
    pub size: u64,
    /// When it was last linked or referenced by a manifest push (seconds since the epoch; 0:
    /// before garbage collection existed). Garbage collection spares younger links.
    #[serde(default)]
    pub at: u64,
    /// Claimed by garbage collection, about to be deleted: reads treat it as absent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gone: bool,
}

impl BlobLink {
    pub(crate) fn decode(v: &[u8]) -> std::result::Result<Self, crate::error::StoreError> {
        serde_json::from_slice(v)
            .map_err(|e| crate::error::StoreError::new(format!("corrupt blob link: {e}")))
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializes")
    }
}

fn blob_unknown(digest: &Digest) -> Error {
    Error::not_found(
        ErrorCode::BlobUnknown,
        format!("blob {digest} is not in this repository"),
    )
    .with_detail(serde_json::json!({ "digest": digest.to_string() }))
}

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    /// The blob's size if `name` links it (a repository reads only the blobs linked into it).
    pub(crate) async fn blob_link(&self, name: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        let Some(v) = self.kv.get(&layout::blob_link(name, digest)).await? else {
            return Ok(None);
        };
        let link = BlobLink::decode(&v)?;
        Ok((!link.gone).then_some(link.size))
    }

    pub(crate) async fn link_blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<()> {
        let v = BlobLink {
            size,
            at: crate::auth::now_secs(),
            gone: false,
        }
        .encode();
        self.kv.set(&layout::blob_link(name, digest), &v).await?;
        self.ensure_repository(name).await
    }

    pub(crate) async fn get_blob(
        &self,
        name: &RepoName,
        digest: &str,
        headers: &HeaderMap,
        head: bool,
    ) -> Result<RegistryResponse<B>> {
        let digest = Digest::parse(digest)?;
        let size = self
            .blob_link(name, &digest)
            .await?
            .ok_or_else(|| blob_unknown(&digest))?;
        let range = if head {
            None
        } else {
            match header_str(headers, header::RANGE).map(|r| parse_range(r, size)) {
                None | Some(RangeRequest::Ignore) => None,
                Some(RangeRequest::Unsatisfiable) => {
                    return Err(Error::new(
                        ErrorCode::SizeInvalid,
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        format!("range not satisfiable for a blob of {size} bytes"),
                    )
                    .with_header(header::CONTENT_RANGE, format!("bytes */{size}")));
                }
                Some(RangeRequest::Range(start, end)) => Some(start..end + 1),
            }
        };
        let digest_s = digest.to_string();
        // Off to the store: the client fetches the bytes (and its Range) from a presigned URL
        // (answers shorter than `blob_redirect_min_bytes` are served: they fit the platform).
        let answer_len = range.as_ref().map_or(size, |r| r.end - r.start);
        if !head
            && let Some(ttl) = self.config.blob_redirect
            && answer_len >= self.config.blob_redirect_min_bytes
            && let Some(url) = self.blobs.redirect_url(&layout::blob_data(&digest), ttl)
        {
            return Ok(empty_response(
                StatusCode::TEMPORARY_REDIRECT,
                &[("location", url), ("docker-content-digest", digest_s)],
            ));
        }
        let mut headers = vec![
            ("docker-content-digest", digest_s.clone()),
            ("accept-ranges", "bytes".to_owned()),
            ("etag", format!("\"{digest_s}\"")),
            ("content-type", "application/octet-stream".to_owned()),
        ];
        let (status, len) = match &range {
            Some(r) => {
                headers.push((
                    "content-range",
                    format!("bytes {}-{}/{size}", r.start, r.end - 1),
                ));
                (StatusCode::PARTIAL_CONTENT, r.end - r.start)
            }
            None => (StatusCode::OK, size),
        };
        let mut resp: Response<Body<B::Reader>> = empty_response(status, &headers);
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        if head {
            return Ok(resp);
        }
        let reader = self
            .blobs
            .read(&layout::blob_data(&digest), range)
            .await?
            .ok_or_else(|| blob_unknown(&digest))?;
        *resp.body_mut() = Body::stream(reader);
        Ok(resp)
    }

    pub(crate) async fn delete_blob(
        &self,
        name: &RepoName,
        digest: &str,
    ) -> Result<RegistryResponse<B>> {
        let digest = Digest::parse(digest)?;
        if !self.config.delete_enabled {
            return Err(deletion_disabled());
        }
        if self.blob_link(name, &digest).await?.is_none() {
            return Err(blob_unknown(&digest));
        }
        // Only the link goes: the content may be linked by other repositories. Reclaiming
        // unlinked content is garbage collection's job.
        self.kv.delete(&layout::blob_link(name, &digest)).await?;
        Ok(empty_response(StatusCode::ACCEPTED, &[]))
    }
}

pub(crate) fn deletion_disabled() -> Error {
    Error::new(
        ErrorCode::Unsupported,
        StatusCode::METHOD_NOT_ALLOWED,
        "deletion is disabled on this registry",
    )
}

#[derive(Debug, PartialEq)]
enum RangeRequest {
    /// Serve the whole blob: no usable single range (RFC 9110 §14.2: a server MAY ignore Range).
    Ignore,
    Unsatisfiable,
    /// Inclusive bounds.
    Range(u64, u64),
}

/// Parses a single `bytes=` range against a blob of `size` bytes (RFC 9110 §14.1.2).
fn parse_range(value: &str, size: u64) -> RangeRequest {
    let Some(spec) = value.strip_prefix("bytes=") else {
        return RangeRequest::Ignore;
    };
    if spec.contains(',') {
        return RangeRequest::Ignore; // multipart ranges are not served
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Ignore;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.is_empty(), num(a), num(b)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Range(size.saturating_sub(n), size - 1)
            }
        }
        (false, Some(start), end) if b.is_empty() || end.is_some() => {
            let end = end.unwrap_or(u64::MAX);
            if end < start {
                RangeRequest::Ignore
            } else if start >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Range(start, end.min(size - 1))
            }
        }
        _ => RangeRequest::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::RangeRequest::*;
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-0", 10), Range(0, 0));
        assert_eq!(parse_range("bytes=2-", 10), Range(2, 9));
        assert_eq!(parse_range("bytes=2-100", 10), Range(2, 9));
        assert_eq!(parse_range("bytes=-3", 10), Range(7, 9));
        assert_eq!(parse_range("bytes=-30", 10), Range(0, 9));
        assert_eq!(parse_range("bytes=10-", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-2", 10), Ignore);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), Ignore);
        assert_eq!(parse_range("items=0-1", 10), Ignore);
        assert_eq!(parse_range("bytes=x-1", 10), Ignore);
        assert_eq!(parse_range("bytes=0-99999999999999999999999", 10), Ignore);
    }
}
