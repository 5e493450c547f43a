//! A blob store on S3-compatible object storage (AWS S3, R2, GCS's S3 API, MinIO, Garage,
//! Ceph), through the outbound HTTP host interface ([`HttpClient`]): requests are presigned
//! with SigV4 by `rusty-s3` (sans-IO, like the core) and sent by whatever client the adapter
//! supplies.
//!
//! - **Writes** stream in constant memory: bytes are buffered up to one part (8 MiB by
//!   default); a body that ends before that is one `PutObject`, a longer one a multipart upload
//!   of such parts, each uploaded while the next is received (two parts held at most),
//!   aborted if the source or the store fails. Either way the object appears
//!   whole or not at all.
//! - **Reads** are one `GetObject`, with `Range` for a byte range, streamed as it arrives.
//! - **Assemble** (an upload's parts into its blob) copies inside the store, without the bytes
//!   passing through dockside: one part is a `CopyObject`; several parts are a multipart
//!   upload whose parts are `UploadPartCopy`s. S3 wants every part but the last to be at least
//!   5 MiB, so parts smaller than that (a client chunking in 1 MiB PATCHes) are read back and
//!   uploaded again, grouped to the part size. The result is always one plain object, which
//!   is what lets a blob GET be redirected to a presigned URL (`--blob-redirect`); a segment
//!   record (as the key-value blob store keeps) would have saved the copy but not that.
//!   Deployments on S3 advertise `OCI-Chunk-Min-Length: 5 MiB` so that clients which honour
//!   it never cause the re-upload.
//! - **Errors**: unreachable, timed out, 5xx and throttled (429, `SlowDown`) are retried with
//!   backoff (every request here is idempotent or carries its whole body), then surface as
//!   [`StoreErrorKind::Unavailable`] (503); anything else (wrong credentials, no such bucket)
//!   as a 500, with the store's error code in the log.

use std::future::Future;
use std::ops::Range;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use crate::body::ReadError;
use crate::error::{StoreError, StoreErrorKind};
use crate::host::{BlobStore, ByteSource, WriteError};
use crate::http_client::{HttpClient, OutBody};

/// Default size of the parts of a multipart upload, and of the buffer a write holds.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
/// S3's smallest part but the last.
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// S3's largest part, and largest `CopyObject`.
const MAX_COPY: u64 = 5 * 1024 * 1024 * 1024;
/// How long a presigned URL for one of our own requests stays valid (clock skew included).
const SIGN_TTL: Duration = Duration::from_secs(300);
/// Attempts of a retryable request, and the pause before the first retry (then 4x each time).
const ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Where and how to reach a bucket.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// `http(s)://host[:port]`: the store's endpoint (for AWS, `https://s3.<region>.amazonaws.com`).
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// The session token of temporary credentials (a role's, as Lambda and ECS hand them out):
    /// every request and presigned URL then carries it as `X-Amz-Security-Token`, signed.
    pub session_token: Option<String>,
    /// Path-style URLs (`endpoint/bucket/key`, what MinIO and Garage expect by default) rather
    /// than virtual-hosted ones (`bucket.endpoint/key`, AWS's default).
    pub path_style: bool,
    /// A prefix for every object key, so that one bucket can hold several registries.
    pub prefix: String,
    pub part_size: usize,
}

impl S3Config {
    /// Parses `s3://<bucket>[/<prefix>]?endpoint=<url>&region=<r>[&style=path|virtual]
    /// [&part_size=<bytes>]`, with the credentials from `get` (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, or `DOCKSIDE_S3_ACCESS_KEY` /
    /// `DOCKSIDE_S3_SECRET_KEY` / `DOCKSIDE_S3_SESSION_TOKEN`, which win; a token is taken
    /// from the same family as the access key). `region` defaults to `us-east-1`, the style
    /// to path-style (self-hosted stores).
    pub fn from_url(url: &str, get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{url:?} is not an s3:// URL"))?;
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(format!("{url:?} names no bucket"));
        }
        let q = crate::request::Query::parse(query);
        for (k, _) in &q.0 {
            if !matches!(k.as_str(), "endpoint" | "region" | "style" | "part_size") {
                return Err(format!(
                    "unknown parameter {k:?} in {url:?} (endpoint, region, style, part_size)"
                ));
            }
        }
        let endpoint = q
            .get("endpoint")
            .map(str::to_owned)
            .or_else(|| get("DOCKSIDE_S3_ENDPOINT"))
            .ok_or_else(|| format!("{url:?} needs ?endpoint=http(s)://host:port"))?;
        let region = q
            .get("region")
            .map(str::to_owned)
            .or_else(|| get("DOCKSIDE_S3_REGION"))
            .unwrap_or_else(|| "us-east-1".to_owned());
        let path_style = match q.get("style") {
            None | Some("path") => true,
            Some("virtual") => false,
            Some(s) => return Err(format!("style must be path or virtual, not {s:?}")),
        };
        let part_size = match q.get("part_size") {
            None => DEFAULT_PART_SIZE,
            Some(s) => s
                .parse::<usize>()
                .ok()
                .filter(|&n| (MIN_PART_SIZE..=MAX_COPY as usize).contains(&n))
                .ok_or_else(|| {
                    format!("part_size must be between {MIN_PART_SIZE} and {MAX_COPY} bytes")
                })?,
        };
        let access_key = get("DOCKSIDE_S3_ACCESS_KEY")
            .or_else(|| get("AWS_ACCESS_KEY_ID"))
            .ok_or("no S3 access key: set DOCKSIDE_S3_ACCESS_KEY or AWS_ACCESS_KEY_ID")?;
        let secret_key = get("DOCKSIDE_S3_SECRET_KEY")
            .or_else(|| get("AWS_SECRET_ACCESS_KEY"))
            .ok_or("no S3 secret key: set DOCKSIDE_S3_SECRET_KEY or AWS_SECRET_ACCESS_KEY")?;
        // A token belongs to the keys it was issued with: the role's AWS_SESSION_TOKEN is not
        // sent with a key of one's own.
        let session_token = match get("DOCKSIDE_S3_ACCESS_KEY") {
            Some(_) => get("DOCKSIDE_S3_SESSION_TOKEN"),
            None => get("AWS_SESSION_TOKEN"),
        }
        .filter(|t| !t.trim().is_empty());
        let prefix = prefix.trim_matches('/');
        Ok(S3Config {
            endpoint,
            bucket: bucket.to_owned(),
            region,
            access_key,
            secret_key,
            session_token,
            path_style,
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            part_size,
        })
    }
}

/// Polls both futures until one is ready: `Ok` with `a`'s output, or `Err` with `b`'s. The
/// other is left as it is, to be polled again.
async fn first_of<A: Future, B: Future>(
    mut a: Pin<&mut A>,
    mut b: Pin<&mut B>,
) -> Result<A::Output, B::Output> {
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = a.as_mut().poll(cx) {
            return Poll::Ready(Ok(r));
        }
        b.as_mut().poll(cx).map(Err)
    })
    .await
}

/// A blob store in one S3 bucket. Cheap to clone when the client is.
///
/// Any [`HttpClient`] carries its requests: natively `adapters::hyper_client::HyperClient`
/// (an example with Redis is on `RedisKv`), in the components the platform's outbound HTTP. The store prepares
/// presigned requests itself, so a presigned GET needs no client at all:
///
/// ```
/// use dockside::{HttpClient, OutBody, S3Blobs, S3Config, StoreError};
/// use std::future::Future;
///
/// /// A client that sends nothing: enough to build the store and presign URLs.
/// struct Offline;
/// impl HttpClient for Offline {
///     // Any body of bytes whose error is a StoreError: this one is never built.
///     type Body = dockside::hosts::mem::MemoryReader;
///     fn send(
///         &self,
///         _req: http::Request<OutBody>,
///     ) -> impl Future<Output = Result<http::Response<Self::Body>, StoreError>> {
///         async { Err(StoreError::new("offline")) }
///     }
/// }
///
/// let config = S3Config::from_url(
///     "s3://registry/prod?endpoint=http://127.0.0.1:3900&region=garage",
///     |name| match name {
///         "AWS_ACCESS_KEY_ID" => Some("GK0123".to_owned()),
///         "AWS_SECRET_ACCESS_KEY" => Some("secret".to_owned()),
///         _ => None,
///     },
/// )
/// .unwrap();
/// let blobs = S3Blobs::new(&config, Offline).unwrap();
/// let url = blobs.presigned_get("blobs/sha256/ab/abcd/data", std::time::Duration::from_secs(60));
/// assert!(url.starts_with("http://127.0.0.1:3900/registry/prod/blobs/sha256/ab/abcd/data?"));
/// assert!(url.contains("X-Amz-Signature="));
/// ```
#[derive(Clone)]
pub struct S3Blobs<C> {
    client: C,
    bucket: Bucket,
    credentials: Credentials,
    prefix: String,
    part_size: usize,
}

impl<C: HttpClient> S3Blobs<C> {
    pub fn new(config: &S3Config, client: C) -> Result<Self, String> {
        let endpoint = config
            .endpoint
            .parse()
            .map_err(|e| format!("invalid S3 endpoint {:?}: {e}", config.endpoint))?;
        let style = if config.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(
            endpoint,
            style,
            config.bucket.clone(),
            config.region.clone(),
        )
        .map_err(|e| format!("invalid S3 bucket {:?}: {e}", config.bucket))?;
        Ok(S3Blobs {
            client,
            bucket,
            credentials: match &config.session_token {
                Some(t) => Credentials::new_with_token(&config.access_key, &config.secret_key, t),
                None => Credentials::new(&config.access_key, &config.secret_key),
            },
            prefix: config.prefix.clone(),
            part_size: config.part_size.max(MIN_PART_SIZE),
        })
    }

    /// Checks that the bucket answers and the credentials are accepted (a `HeadBucket`), so
    /// that a server can refuse to start rather than answer 500s.
    pub async fn check(&self) -> Result<(), StoreError> {
        let url = self
            .bucket
            .head_bucket(Some(&self.credentials))
            .sign(SIGN_TTL);
        let resp = self.send(Method::HEAD, url, &[], OutBody::empty()).await?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            s => {
                // A HEAD answer has no body to name the problem: the status must.
                let hint = match s {
                    StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
                        " (access denied: wrong access key or secret key, or no access to the bucket)"
                    }
                    StatusCode::NOT_FOUND => " (no such bucket)",
                    StatusCode::MOVED_PERMANENTLY | StatusCode::BAD_REQUEST => {
                        " (wrong region or endpoint?)"
                    }
                    _ => "",
                };
                let mut e = self.failure("HeadBucket", s, resp).await;
                e.message = format!("{}{hint}", e.message.trim_end_matches([' ', ':']));
                Err(e)
            }
        }
    }

    fn key(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }

    /// Sends one request, retrying with backoff what may succeed later: transport failures,
    /// 5xx and 429. The request is rebuilt (and re-signed) for each attempt; `body` must be a
    /// buffer to be sent again.
    async fn send(
        &self,
        method: Method,
        url: url::Url,
        headers: &[(&str, String)],
        body: OutBody,
    ) -> Result<http::Response<C::Body>, StoreError> {
        let bytes = body.as_bytes();
        let mut body = Some(body);
        let mut pause = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            // The first attempt sends the body given; retries (of buffers only) a copy.
            let b = match body.take() {
                Some(b) => b,
                None => OutBody::full(bytes.clone().unwrap_or_default()),
            };
            let mut req = http::Request::builder()
                .method(method.clone())
                .uri(url.as_str());
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            // S3 wants a Content-Length on every upload, 0 included (411 otherwise).
            if matches!(method, Method::PUT | Method::POST)
                && let Some(b) = &bytes
            {
                req = req.header(http::header::CONTENT_LENGTH, b.len());
            }
            let req = req
                .body(b)
                .map_err(|e| StoreError::new(format!("cannot build an S3 request: {e}")))?;
            let retryable = bytes.is_some() && attempt < ATTEMPTS;
            match self.client.send(req).await {
                Ok(resp)
                    if retryable
                        && (resp.status().is_server_error()
                            || resp.status() == StatusCode::TOO_MANY_REQUESTS) =>
                {
                    tracing::warn!(status = %resp.status(), %method, attempt, "S3 request failed; retrying");
                }
                Ok(resp) => return Ok(resp),
                Err(e) if retryable && e.kind == StoreErrorKind::Unavailable => {
                    tracing::warn!(error = %e.message, %method, attempt, "S3 unreachable; retrying");
                }
                Err(e) => return Err(e),
            }
            self.client.sleep(pause).await;
            pause *= 4;
            attempt += 1;
        }
    }

    /// The error for an unexpected answer of the store: the status and the store's error code
    /// (from its XML body) for the log; 503 for what is worth retrying later, else 500.
    async fn failure(
        &self,
        op: &str,
        status: StatusCode,
        resp: http::Response<C::Body>,
    ) -> StoreError {
        let text = read_answer(resp.into_body()).await.unwrap_or_default();
        let code = xml_field(&text, "Code").unwrap_or_default();
        let message = xml_field(&text, "Message").unwrap_or_default();
        let msg = format!("S3 {op} answered {status} {code}: {message}");
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            StoreError::unavailable(msg)
        } else {
            StoreError::new(msg)
        }
    }

    async fn put_object(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let url = self
            .bucket
            .put_object(Some(&self.credentials), key)
            .sign(SIGN_TTL);
        let resp = self
            .send(Method::PUT, url, &[], OutBody::full(data))
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            s => Err(self.failure("PutObject", s, resp).await),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let url = self
            .bucket
            .head_object(Some(&self.credentials), key)
            .sign(SIGN_TTL);
        let resp = self.send(Method::HEAD, url, &[], OutBody::empty()).await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => content_length(&resp).map(Some),
            s => Err(self.failure("HeadObject", s, resp).await),
        }
    }

    async fn delete_key(&self, key: &str) -> Result<(), StoreError> {
        let url = self
            .bucket
            .delete_object(Some(&self.credentials), key)
            .sign(SIGN_TTL);
        let resp = self
            .send(Method::DELETE, url, &[], OutBody::empty())
            .await?;
        match resp.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => Err(self.failure("DeleteObject", s, resp).await),
        }
    }

    /// Copies `src` (a whole object of at most 5 GiB) to `dest` inside the store.
    async fn copy_object(&self, src: &str, dest: &str) -> Result<(), StoreError> {
        let source = self.copy_source(src);
        let mut action = self.bucket.put_object(Some(&self.credentials), dest);
        action
            .headers_mut()
            .insert("x-amz-copy-source", source.clone());
        let url = action.sign(SIGN_TTL);
        let resp = self
            .send(
                Method::PUT,
                url,
                &[("x-amz-copy-source", source)],
                OutBody::empty(),
            )
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.failure("CopyObject", status, resp).await);
        }
        answer_result(
            "CopyObject",
            &read_answer(resp.into_body()).await?,
            "CopyObjectResult",
        )
    }

    /// `x-amz-copy-source`: `/<bucket>/<key>`, the key URL-encoded.
    fn copy_source(&self, key: &str) -> String {
        let mut s = format!("/{}/", self.bucket.name());
        for b in key.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
                s.push(b as char);
            } else {
                s.push_str(&format!("%{b:02X}"));
            }
        }
        s
    }

    async fn multipart_start(&self, key: &str) -> Result<String, StoreError> {
        let url = self
            .bucket
            .create_multipart_upload(Some(&self.credentials), key)
            .sign(SIGN_TTL);
        let resp = self
            .send(Method::POST, url, &[], OutBody::full(Bytes::new()))
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.failure("CreateMultipartUpload", status, resp).await);
        }
        let parsed = rusty_s3::actions::CreateMultipartUpload::parse_response(
            &read_answer(resp.into_body()).await?,
        )
        .map_err(|e| StoreError::new(format!("S3 CreateMultipartUpload: bad answer: {e}")))?;
        Ok(parsed.upload_id().to_owned())
    }

    /// [`Self::multipart_part`] owning its arguments, so that it can run while the write goes on.
    async fn owned_part(
        &self,
        key: String,
        upload_id: String,
        number: u16,
        data: Bytes,
    ) -> Result<String, StoreError> {
        self.multipart_part(&key, &upload_id, number, data).await
    }

    async fn multipart_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u16,
        data: Bytes,
    ) -> Result<String, StoreError> {
        let url = self
            .bucket
            .upload_part(Some(&self.credentials), key, number, upload_id)
            .sign(SIGN_TTL);
        let resp = self
            .send(Method::PUT, url, &[], OutBody::full(data))
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.failure("UploadPart", status, resp).await);
        }
        resp.headers()
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| StoreError::new("S3 UploadPart answered without an ETag"))
    }

    /// Copies `range` of the object `src` into part `number` of a multipart upload.
    async fn multipart_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: u16,
        src: &str,
        range: Range<u64>,
    ) -> Result<String, StoreError> {
        let source = self.copy_source(src);
        let source_range = format!("bytes={}-{}", range.start, range.end - 1);
        let mut action = self
            .bucket
            .upload_part(Some(&self.credentials), key, number, upload_id);
        action
            .headers_mut()
            .insert("x-amz-copy-source", source.clone());
        action
            .headers_mut()
            .insert("x-amz-copy-source-range", source_range.clone());
        let url = action.sign(SIGN_TTL);
        let resp = self
            .send(
                Method::PUT,
                url,
                &[
                    ("x-amz-copy-source", source),
                    ("x-amz-copy-source-range", source_range),
                ],
                OutBody::empty(),
            )
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.failure("UploadPartCopy", status, resp).await);
        }
        let text = read_answer(resp.into_body()).await?;
        xml_field(&text, "ETag")
            .map(|e| e.replace("&quot;", "\""))
            .ok_or_else(|| {
                StoreError::unavailable(format!(
                    "S3 UploadPartCopy failed: {}",
                    xml_field(&text, "Code").unwrap_or_else(|| "no ETag".into())
                ))
            })
    }

    async fn multipart_complete(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), StoreError> {
        let action = self.bucket.complete_multipart_upload(
            Some(&self.credentials),
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGN_TTL);
        let body = action.body();
        let resp = self
            .send(Method::POST, url, &[], OutBody::full(body))
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.failure("CompleteMultipartUpload", status, resp).await);
        }
        answer_result(
            "CompleteMultipartUpload",
            &read_answer(resp.into_body()).await?,
            "CompleteMultipartUploadResult",
        )
    }

    /// Best effort: an upload left behind costs storage until the bucket's lifecycle rule for
    /// incomplete multipart uploads removes it, never correctness.
    async fn multipart_abort(&self, key: &str, upload_id: &str) {
        let url = self
            .bucket
            .abort_multipart_upload(Some(&self.credentials), key, upload_id)
            .sign(SIGN_TTL);
        match self.send(Method::DELETE, url, &[], OutBody::empty()).await {
            Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {}
            Ok(r) => tracing::warn!(status = %r.status(), key, "S3 AbortMultipartUpload failed"),
            Err(e) => tracing::warn!(error = %e.message, key, "S3 AbortMultipartUpload failed"),
        }
    }

    /// A presigned GET of the object at `path`, valid for `ttl`: where a blob GET may send the
    /// client instead of streaming the bytes itself.
    pub fn presigned_get(&self, path: &str, ttl: Duration) -> String {
        self.bucket
            .get_object(Some(&self.credentials), &self.key(path))
            .sign(ttl)
            .to_string()
    }

    /// Streams the objects `parts` (in order) into a multipart upload to `key`, copying whole
    /// parts inside the store where S3 allows and re-uploading the rest, grouped to the part
    /// size. Returns the ETags of the upload's parts.
    async fn assemble_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(String, u64)],
    ) -> Result<Vec<String>, StoreError> {
        let mut etags = Vec::new();
        let mut buf = BytesMut::new();
        let next = |etags: &Vec<String>| -> Result<u16, StoreError> {
            u16::try_from(etags.len() + 1)
                .ok()
                .filter(|&n| n <= 10_000)
                .ok_or_else(|| StoreError::new("more than 10 000 parts in one S3 object"))
        };
        for (part, size) in parts {
            // Copied inside the store: only with nothing buffered before it (parts go in
            // order), and only if big enough to be a part of its own. Not a short last part,
            // though S3 allows one: Garage refuses to copy from an object it keeps inline
            // (under 3 KiB), so a short tail is read back and uploaded (under 5 MiB of bytes).
            if buf.is_empty() && *size >= MIN_PART_SIZE as u64 {
                let mut start = 0;
                while start < *size {
                    let end = (start + MAX_COPY).min(*size);
                    let n = next(&etags)?;
                    etags.push(
                        self.multipart_copy(key, upload_id, n, &self.key(part), start..end)
                            .await?,
                    );
                    start = end;
                }
                continue;
            }
            let mut body = self
                .read(part, None)
                .await?
                .ok_or_else(|| StoreError::new(format!("missing upload part {part}")))?;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    buf.extend_from_slice(&data);
                    while buf.len() >= self.part_size {
                        let chunk = buf.split_to(self.part_size).freeze();
                        let n = next(&etags)?;
                        etags.push(self.multipart_part(key, upload_id, n, chunk).await?);
                    }
                }
            }
        }
        if !buf.is_empty() {
            let n = next(&etags)?;
            etags.push(self.multipart_part(key, upload_id, n, buf.freeze()).await?);
        }
        Ok(etags)
    }
}

impl<C: HttpClient> BlobStore for S3Blobs<C> {
    type Reader = S3Reader<C::Body>;

    async fn write<S: ByteSource>(
        &self,
        path: &str,
        src: &mut S,
    ) -> Result<u64, WriteError<S::Error>> {
        let key = self.key(path);
        let mut buf = BytesMut::with_capacity(self.part_size);
        let mut total = 0u64;
        let mut upload_id: Option<String> = None;
        let mut etags: Vec<String> = Vec::new();
        // The part being uploaded while the next one is received: the client's bytes keep
        // coming during each part's round trip to the store (with a distant store, that round
        // trip is most of a part's time). One part in flight and one filling: two parts held.
        // (Boxed, not `dyn`: the future stays `Send` when the client's are.)
        let mut in_flight: Option<Pin<Box<_>>> = None;
        let result: Result<(), WriteError<S::Error>> = async {
            loop {
                let next = {
                    let mut chunk = pin!(src.next_chunk());
                    loop {
                        let Some(part) = in_flight.as_mut() else {
                            break chunk.await;
                        };
                        // Whichever is ready first; an unfinished `next_chunk` is awaited on,
                        // never dropped, so no source has to be cancel-safe.
                        match first_of(Pin::as_mut(part), chunk.as_mut()).await {
                            Ok(etag) => {
                                in_flight = None;
                                etags.push(etag?);
                            }
                            Err(next) => break next,
                        }
                    }
                };
                let end = next.is_none();
                if let Some(data) = next {
                    let data = data.map_err(WriteError::Source)?;
                    total += data.len() as u64;
                    buf.extend_from_slice(&data);
                }
                // A full part goes up now, once the one before it is stored.
                while buf.len() >= self.part_size || (end && upload_id.is_some() && !buf.is_empty())
                {
                    if let Some(part) = in_flight.take() {
                        etags.push(part.await?);
                    }
                    let id = match &upload_id {
                        Some(id) => id.clone(),
                        None => {
                            let id = self.multipart_start(&key).await?;
                            upload_id = Some(id.clone());
                            id
                        }
                    };
                    let take = buf.len().min(self.part_size);
                    let part = buf.split_to(take).freeze();
                    let n = u16::try_from(etags.len() + 1)
                        .ok()
                        .filter(|&n| n <= 10_000)
                        .ok_or_else(|| {
                            StoreError::new("more than 10 000 parts in one S3 object")
                        })?;
                    in_flight = Some(Box::pin(self.owned_part(key.clone(), id, n, part)));
                }
                if end {
                    break;
                }
            }
            if let Some(part) = in_flight.take() {
                etags.push(part.await?);
            }
            match &upload_id {
                None => self.put_object(&key, buf.split().freeze()).await?,
                Some(id) => self.multipart_complete(&key, id, &etags).await?,
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            // A part still in flight was dropped with the error: its request is cancelled.
            if let Some(id) = &upload_id {
                self.multipart_abort(&key, id).await;
            }
            return Err(e);
        }
        Ok(total)
    }

    async fn read(
        &self,
        path: &str,
        range: Option<Range<u64>>,
    ) -> Result<Option<S3Reader<C::Body>>, StoreError> {
        if range.as_ref().is_some_and(|r| r.is_empty()) {
            return Ok(Some(S3Reader {
                body: None,
                remaining: 0,
            }));
        }
        let url = self
            .bucket
            .get_object(Some(&self.credentials), &self.key(path))
            .sign(SIGN_TTL);
        let headers: Vec<(&str, String)> = match &range {
            Some(r) => vec![("range", format!("bytes={}-{}", r.start, r.end - 1))],
            None => Vec::new(),
        };
        let resp = self
            .send(Method::GET, url, &headers, OutBody::empty())
            .await?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let len = content_length(&resp)?;
                if let Some(r) = &range
                    && len != r.end - r.start
                {
                    return Err(StoreError::new(format!(
                        "S3 GetObject answered {len} bytes for a range of {}",
                        r.end - r.start
                    )));
                }
                Ok(Some(S3Reader {
                    body: Some(resp.into_body()),
                    remaining: len,
                }))
            }
            s => Err(self.failure("GetObject", s, resp).await),
        }
    }

    async fn size(&self, path: &str) -> Result<Option<u64>, StoreError> {
        self.head(&self.key(path)).await
    }

    async fn delete(&self, path: &str) -> Result<(), StoreError> {
        self.delete_key(&self.key(path)).await
    }

    async fn assemble(&self, parts: &[String], dest: &str) -> Result<(), StoreError> {
        let dest_key = self.key(dest);
        let mut sized = Vec::with_capacity(parts.len());
        for p in parts {
            let size = self
                .head(&self.key(p))
                .await?
                .ok_or_else(|| StoreError::new(format!("missing upload part {p}")))?;
            sized.push((p.clone(), size));
        }
        match sized.as_slice() {
            [] => self.put_object(&dest_key, Bytes::new()).await?,
            [(p, size)] if *size <= MAX_COPY => self.copy_object(&self.key(p), &dest_key).await?,
            _ => {
                let id = self.multipart_start(&dest_key).await?;
                let done = match self.assemble_multipart(&dest_key, &id, &sized).await {
                    Ok(etags) => self.multipart_complete(&dest_key, &id, &etags).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = done {
                    self.multipart_abort(&dest_key, &id).await;
                    return Err(e);
                }
            }
        }
        for p in parts {
            self.delete_key(&self.key(p)).await?;
        }
        Ok(())
    }

    fn min_chunk_length(&self) -> Option<u64> {
        Some(MIN_PART_SIZE as u64)
    }

    fn redirect_url(&self, path: &str, ttl: Duration) -> Option<String> {
        Some(self.presigned_get(path, ttl))
    }
}

fn content_length<B>(resp: &http::Response<B>) -> Result<u64, StoreError> {
    resp.headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| StoreError::new("S3 answered without a Content-Length"))
}

/// Largest XML answer read from the store.
const MAX_ANSWER: u64 = 64 * 1024;

/// A small answer of the store (its XML), as text.
async fn read_answer<B>(body: B) -> Result<String, StoreError>
where
    B: http_body::Body<Data = Bytes, Error = StoreError> + Unpin,
{
    let raw = crate::body::read_to_vec(body, MAX_ANSWER)
        .await
        .map_err(|e| match e {
            ReadError::TooLarge { .. } => StoreError::new("S3 answer too large"),
            ReadError::Body(e) => StoreError::unavailable(format!("reading an S3 answer: {e}")),
        })?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// `CopyObject` and `CompleteMultipartUpload` can fail after their `200` has been sent: the
/// error is then in the body (S3 API reference, CompleteMultipartUpload: "a 200 OK response
/// can contain valid or invalid XML"). Success is the whole `<result>` element, so an answer
/// cut off or garbled is a failure too, never a blob taken for stored.
fn answer_result(op: &str, answer: &str, result: &str) -> Result<(), StoreError> {
    if answer.contains("<Error>") {
        return Err(StoreError::unavailable(format!(
            "S3 {op} failed: {}",
            xml_field(answer, "Code").unwrap_or_default()
        )));
    }
    if !answer.contains(&format!("</{result}>")) {
        let head: String = answer.chars().take(200).collect();
        return Err(StoreError::new(format!(
            "S3 {op}: bad answer (no {result}): {head:?}"
        )));
    }
    Ok(())
}

/// The text of the first `<name>...</name>` in `xml` (S3's answers are flat enough).
fn xml_field(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(xml[start..end].trim().to_owned())
}

/// A blob (or a range of it) streaming from the store, with its exact length.
pub struct S3Reader<B> {
    body: Option<B>,
    remaining: u64,
}

impl<B> http_body::Body for S3Reader<B>
where
    B: http_body::Body<Data = Bytes, Error = StoreError> + Unpin,
{
    type Data = Bytes;
    type Error = StoreError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StoreError>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    let n = data.len() as u64;
                    if n > self.remaining {
                        self.body = None;
                        return Poll::Ready(Some(Err(StoreError::new(
                            "S3 sent more bytes than its Content-Length",
                        ))));
                    }
                    self.remaining -= n;
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                // Trailers: nothing to pass on.
                Err(_) => Poll::Ready(Some(Ok(Frame::data(Bytes::new())))),
            },
            Poll::Ready(Some(Err(e))) => {
                self.body = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.body = None;
                if self.remaining > 0 {
                    // Cut short: the client must not take a truncated blob for a whole one.
                    Poll::Ready(Some(Err(StoreError::unavailable(format!(
                        "S3 ended the body {} bytes early",
                        self.remaining
                    )))))
                } else {
                    Poll::Ready(None)
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "AWS_ACCESS_KEY_ID" => Some("GK0123".into()),
            "AWS_SECRET_ACCESS_KEY" => Some("secret".into()),
            _ => None,
        }
    }

    #[test]
    fn urls() {
        let c = S3Config::from_url(
            "s3://reg/team/a?endpoint=http://127.0.0.1:3900&region=garage",
            env,
        )
        .unwrap();
        assert_eq!(c.bucket, "reg");
        assert_eq!(c.prefix, "team/a/");
        assert_eq!(c.region, "garage");
        assert!(c.path_style);
        assert_eq!(c.access_key, "GK0123");
        assert_eq!(c.part_size, DEFAULT_PART_SIZE);
        let c = S3Config::from_url(
            "s3://reg?endpoint=https://s3.eu-west-1.amazonaws.com&region=eu-west-1&style=virtual&part_size=16777216",
            env,
        )
        .unwrap();
        assert!(!c.path_style);
        assert_eq!(c.prefix, "");
        assert_eq!(c.part_size, 16 << 20);
        for bad in [
            "http://reg",
            "s3://?endpoint=http://x",
            "s3://reg",
            "s3://reg?endpoint=http://x&style=odd",
            "s3://reg?endpoint=http://x&part_size=1024",
            "s3://reg?endpoint=http://x&bucket=other",
        ] {
            assert!(S3Config::from_url(bad, env).is_err(), "{bad}");
        }
        assert!(S3Config::from_url("s3://reg?endpoint=http://x", |_| None).is_err());
    }

    #[test]
    fn xml() {
        let e = "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>gone</Message></Error>";
        assert_eq!(xml_field(e, "Code").as_deref(), Some("NoSuchBucket"));
        assert_eq!(xml_field(e, "Message").as_deref(), Some("gone"));
        assert_eq!(xml_field(e, "ETag"), None);
    }
}
