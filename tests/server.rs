//! The native server, driven over HTTP as a client would: every endpoint of the distribution
//! spec, success and failure paths, the command-line switches, a graceful stop and a restart.
//!
//! Each test starts its own `dockside serve` process on 127.0.0.1 with its own data directory.
//! The binary on purpose, not `dockside::testing::TestRegistry`: this is the shipped server's
//! end-to-end suite (its command line, its default `--data` directory on the blocking pool with
//! fsync, signals, restarts); tests/api.rs runs the same endpoints in process on every host.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use common::{Server, client, pseudo_random, sha256_digest, sha512_digest};
use reqwest::{Client, Method, Response, StatusCode};
use serde_json::{Value, json};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
const OCTET: &str = "application/octet-stream";

// ---------------------------------------------------------------------------------------------
// Helpers

/// A response header as a string; panics if it is missing.
fn hdr(resp: &Response, name: &str) -> String {
    opt_hdr(resp, name).unwrap_or_else(|| {
        panic!(
            "{} {}: no {name} header; headers: {:?}",
            resp.status(),
            resp.url(),
            resp.headers()
        )
    })
}

fn opt_hdr(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII header").to_owned())
}

/// Asserts the status (showing the body if it differs) and hands the response back.
async fn expect_status(resp: Response, status: StatusCode) -> Response {
    if resp.status() != status {
        let (got, url) = (resp.status(), resp.url().clone());
        let body = resp.text().await.unwrap_or_default();
        panic!("{url}: expected {status}, got {got}: {body}");
    }
    resp
}

/// Asserts an error response: the status, a JSON body in the spec's envelope
/// (`{"errors":[{"code","message","detail"}]}`), and that `code` is among its codes.
async fn expect_error(resp: Response, status: StatusCode, code: &str) -> Value {
    expect_error_one_of(resp, status, &[code]).await
}

/// Like [`expect_error`], where the spec leaves the choice between a few codes open (any code
/// at all if `codes` is empty).
async fn expect_error_one_of(resp: Response, status: StatusCode, codes: &[&str]) -> Value {
    let (got, url) = (resp.status(), resp.url().clone());
    let content_type = opt_hdr(&resp, "content-type").unwrap_or_default();
    let body = resp.bytes().await.expect("read the error body");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(got, status, "{url}: {text}");
    assert!(
        content_type.starts_with("application/json"),
        "{url}: error Content-Type {content_type:?}: {text}"
    );
    let v: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{url}: error body is not JSON ({e}): {text}"));
    let errors = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("{url}: no errors array: {text}"));
    assert!(!errors.is_empty(), "{url}: empty errors array");
    for e in errors {
        let c = e["code"]
            .as_str()
            .unwrap_or_else(|| panic!("{url}: error without a string code: {text}"));
        assert!(
            !c.is_empty() && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
            "{url}: code {c:?} is not uppercase letters and underscores"
        );
        assert!(
            e.get("message").is_none_or(Value::is_string),
            "{url}: message is not a string: {text}"
        );
    }
    assert!(
        codes.is_empty() || errors.iter().any(|e| codes.iter().any(|c| e["code"] == *c)),
        "{url}: expected error code {}, got {text}",
        codes.join(" or ")
    );
    v
}

/// The target of a `Link: <url>; rel="next"` header, if any.
fn next_link(resp: &Response) -> Option<String> {
    let v = opt_hdr(resp, "link")?;
    assert!(v.contains("rel=\"next\""), "Link without rel=\"next\": {v}");
    let start = v.find('<').expect("Link has <") + 1;
    let end = v.find('>').expect("Link has >");
    Some(v[start..end].to_owned())
}

/// Every value of a possibly repeated, comma-separated header (e.g. `OCI-Tag`).
fn header_list(resp: &Response, name: &str) -> BTreeSet<String> {
    resp.headers()
        .get_all(name)
        .iter()
        .flat_map(|v| {
            v.to_str()
                .expect("ASCII header")
                .split(',')
                .map(|s| s.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// Sends `method path` on a fresh connection (closed after the response) and returns the
/// response's head (status line and headers, lowercased) and every byte after it: to see exactly
/// what a HEAD response carries, which an HTTP client library would not show.
async fn raw_request(s: &Server, method: &str, path: &str) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        s.addr()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut buf))
        .await
        .expect("the server did not close the connection")
        .unwrap();
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head: {buf:?}"))
        + 4;
    (
        String::from_utf8_lossy(&buf[..end]).to_lowercase(),
        buf[end..].to_vec(),
    )
}

/// Asserts, on the wire, that `HEAD path` answers `status`, with `Content-Length: len` if given,
/// and no body.
async fn assert_raw_head(s: &Server, path: &str, status: u16, len: Option<usize>) {
    let (head, rest) = raw_request(s, "HEAD", path).await;
    assert!(
        head.starts_with(&format!("http/1.1 {status} ")),
        "HEAD {path}: expected {status}: {head}"
    );
    if let Some(len) = len {
        assert!(
            head.contains(&format!("\r\ncontent-length: {len}\r\n")),
            "HEAD {path}: no Content-Length: {len} in {head}"
        );
    }
    assert!(
        rest.is_empty(),
        "HEAD {path}: {} bytes of body after the head",
        rest.len()
    );
}

/// `location` plus a query parameter (the location may already carry a query).
fn with_query(location: &str, param: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}{param}")
}

/// Pushes `data` to `repo` in one POST (end-4b); returns its sha256 digest.
async fn post_blob(c: &Client, s: &Server, repo: &str, data: &[u8]) -> String {
    let digest = sha256_digest(data);
    let resp = c
        .post(s.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
        .header("content-type", OCTET)
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    let resp = expect_status(resp, StatusCode::CREATED).await;
    assert!(!hdr(&resp, "location").is_empty());
    digest
}

/// Opens an upload session (end-4a); returns its absolute location.
async fn start_upload(c: &Client, s: &Server, repo: &str) -> String {
    let resp = c
        .post(s.url(&format!("/v2/{repo}/blobs/uploads/")))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    let resp = expect_status(resp, StatusCode::ACCEPTED).await;
    s.resolve(&hdr(&resp, "location"))
}

/// PATCHes one chunk with `Content-Range` (end-5).
async fn patch_chunk(c: &Client, location: &str, start: usize, data: &[u8]) -> Response {
    c.patch(location)
        .header("content-type", OCTET)
        .header(
            "content-range",
            format!("{start}-{}", start + data.len() - 1),
        )
        .body(data.to_vec())
        .send()
        .await
        .unwrap()
}

async fn get_blob(c: &Client, s: &Server, repo: &str, digest: &str) -> Response {
    c.get(s.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .await
        .unwrap()
}

/// Asserts that `repo` serves `data` as blob `digest`.
async fn assert_blob(c: &Client, s: &Server, repo: &str, digest: &str, data: &[u8]) {
    let resp = expect_status(get_blob(c, s, repo, digest).await, StatusCode::OK).await;
    assert_eq!(hdr(&resp, "docker-content-digest"), digest);
    assert_eq!(hdr(&resp, "content-length"), data.len().to_string());
    let body = resp.bytes().await.unwrap();
    assert!(
        body == data,
        "blob {digest} in {repo} differs from what was pushed"
    );
}

/// Asserts that `repo` does not serve blob `digest` (404 `BLOB_UNKNOWN`).
async fn assert_no_blob(c: &Client, s: &Server, repo: &str, digest: &str) {
    let head = c
        .head(s.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND, "HEAD {repo} {digest}");
    expect_error(
        get_blob(c, s, repo, digest).await,
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    )
    .await;
}

fn descriptor(media_type: &str, data: &[u8]) -> Value {
    json!({ "mediaType": media_type, "digest": sha256_digest(data), "size": data.len() })
}

/// An OCI image manifest, pretty-printed (so that storing the exact bytes is visible).
fn image_manifest(config: &[u8], layers: &[&[u8]]) -> Vec<u8> {
    serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": layers.iter().map(|l| descriptor(OCI_LAYER, l)).collect::<Vec<_>>(),
    }))
    .unwrap()
}

async fn put_manifest(
    c: &Client,
    s: &Server,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> Response {
    c.put(s.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header("content-type", media_type)
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

/// A pushed image: its config and layer blobs and its manifest.
struct Image {
    manifest: Vec<u8>,
    digest: String,
}

/// Pushes a small image (a config and one layer, different for each `seed`) to `repo`, tagged
/// `tag`.
async fn push_image(c: &Client, s: &Server, repo: &str, tag: &str, seed: u64) -> Image {
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [] },
        "config": { "Labels": { "seed": seed.to_string() } },
    }))
    .unwrap();
    let layer = pseudo_random(3000 + seed as usize, seed);
    post_blob(c, s, repo, &config).await;
    post_blob(c, s, repo, &layer).await;
    let manifest = image_manifest(&config, &[&layer]);
    let resp = put_manifest(c, s, repo, tag, OCI_MANIFEST, &manifest).await;
    let resp = expect_status(resp, StatusCode::CREATED).await;
    let digest = sha256_digest(&manifest);
    assert_eq!(hdr(&resp, "docker-content-digest"), digest);
    Image { manifest, digest }
}

/// GETs a JSON document (asserting 200); returns the `Link: rel="next"` target, if any, and the
/// document.
async fn get_json(c: &Client, url: &str) -> (Option<String>, Value) {
    let resp = expect_status(c.get(url).send().await.unwrap(), StatusCode::OK).await;
    let link = next_link(&resp);
    let body = resp.bytes().await.unwrap();
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (link, v)
}

/// The path (and query) of a `Location`, absolute or relative: to reuse it on a restarted
/// server, whose port differs.
fn location_path(location: &str) -> String {
    match location.split_once("://") {
        Some((_, rest)) => rest[rest.find('/').unwrap_or(rest.len())..].to_owned(),
        None => location.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Base

#[tokio::test]
async fn base_endpoint_answers_with_the_api_version() {
    let s = Server::start();
    let c = client();
    let resp = expect_status(c.get(s.url("/v2/")).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(
        hdr(&resp, "docker-distribution-api-version"),
        "registry/2.0"
    );

    // Also on errors.
    let resp = c
        .get(s.url("/v2/nothing/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        hdr(&resp, "docker-distribution-api-version"),
        "registry/2.0"
    );
    expect_error(resp, StatusCode::NOT_FOUND, "NAME_UNKNOWN").await;
}

// ---------------------------------------------------------------------------------------------
// Pushing blobs

#[tokio::test]
async fn single_post_pushes_a_blob() {
    let s = Server::start();
    let c = client();
    let data = pseudo_random(100_000, 1);
    let digest = sha256_digest(&data);
    let resp = c
        .post(s.url(&format!("/v2/one/post/blobs/uploads/?digest={digest}")))
        .header("content-type", OCTET)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    let resp = expect_status(resp, StatusCode::CREATED).await;
    let location = s.resolve(&hdr(&resp, "location"));
    // The Location is a pullable blob URL.
    let pulled = expect_status(c.get(&location).send().await.unwrap(), StatusCode::OK).await;
    assert!(pulled.bytes().await.unwrap() == data);
    assert_blob(&c, &s, "one/post", &digest, &data).await;
}

#[tokio::test]
async fn post_then_put_pushes_a_blob() {
    let s = Server::start();
    let c = client();
    let data = pseudo_random(70_000, 2);
    let digest = sha256_digest(&data);
    let location = start_upload(&c, &s, "postput").await;
    assert!(
        location.contains("/v2/postput/blobs/uploads/"),
        "unexpected upload location {location}"
    );
    let resp = c
        .put(with_query(&location, &format!("digest={digest}")))
        .header("content-type", OCTET)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    let resp = expect_status(resp, StatusCode::CREATED).await;
    let blob_location = s.resolve(&hdr(&resp, "location"));
    let pulled = expect_status(c.get(&blob_location).send().await.unwrap(), StatusCode::OK).await;
    assert!(pulled.bytes().await.unwrap() == data);
    assert_blob(&c, &s, "postput", &digest, &data).await;

    // The session is closed.
    expect_error(
        c.get(&location).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn chunked_upload_in_order_and_out_of_order() {
    let s = Server::start();
    let c = client();
    let data = pseudo_random(2500, 3);
    let digest = sha256_digest(&data);
    let first_location = start_upload(&c, &s, "chunked").await;

    let resp = expect_status(
        patch_chunk(&c, &first_location, 0, &data[..1000]).await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(hdr(&resp, "range"), "0-999");
    let location = s.resolve(&hdr(&resp, "location"));

    // A chunk that skips ahead: 416, with where the upload stands.
    let resp = patch_chunk(&c, &location, 1500, &data[1500..2000]).await;
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(hdr(&resp, "range"), "0-999");
    let after_416 = s.resolve(&hdr(&resp, "location"));
    // A chunk that repeats the start: 416 as well.
    let resp = patch_chunk(&c, &after_416, 0, &data[..1000]).await;
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(hdr(&resp, "range"), "0-999");
    assert!(!hdr(&resp, "location").is_empty());

    // The status (end-13) agrees, and points at the session.
    let resp = expect_status(
        c.get(&after_416).send().await.unwrap(),
        StatusCode::NO_CONTENT,
    )
    .await;
    assert_eq!(hdr(&resp, "range"), "0-999");
    let location = s.resolve(&hdr(&resp, "location"));

    let resp = expect_status(
        patch_chunk(&c, &location, 1000, &data[1000..2000]).await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(hdr(&resp, "range"), "0-1999");
    let location = s.resolve(&hdr(&resp, "location"));

    // The last chunk rides on the closing PUT.
    let resp = c
        .put(with_query(&location, &format!("digest={digest}")))
        .header("content-type", OCTET)
        .header("content-range", "2000-2499")
        .body(data[2000..].to_vec())
        .send()
        .await
        .unwrap();
    let resp = expect_status(resp, StatusCode::CREATED).await;
    assert!(!hdr(&resp, "location").is_empty());
    assert_blob(&c, &s, "chunked", &digest, &data).await;

    expect_error(
        c.get(&first_location).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn closing_put_out_of_order_is_416() {
    let s = Server::start();
    let c = client();
    let data = pseudo_random(300, 4);
    let location = start_upload(&c, &s, "closing").await;
    let resp = expect_status(
        patch_chunk(&c, &location, 0, &data[..100]).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let location = s.resolve(&hdr(&resp, "location"));
    let resp = c
        .put(with_query(
            &location,
            &format!("digest={}", sha256_digest(&data)),
        ))
        .header("content-type", OCTET)
        .header("content-range", "200-299")
        .body(data[200..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(hdr(&resp, "range"), "0-99");
    // The session survives and still finishes.
    let resp = c
        .put(with_query(
            &location,
            &format!("digest={}", sha256_digest(&data)),
        ))
        .header("content-type", OCTET)
        .header("content-range", "100-299")
        .body(data[100..].to_vec())
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::CREATED).await;
    assert_blob(&c, &s, "closing", &sha256_digest(&data), &data).await;
}

#[tokio::test]
async fn streamed_patch_without_content_range() {
    let s = Server::start();
    let c = client();
    let data = pseudo_random(6 * 65536 + 17, 5);
    let digest = sha256_digest(&data);
    let half = data.len() / 2;
    let location = start_upload(&c, &s, "streamed").await;

    let mut location = location;
    for (i, part) in [&data[..half], &data[half..]].into_iter().enumerate() {
        // A body of unknown length (chunked transfer encoding), in several pieces.
        let pieces: Vec<Result<Bytes, std::io::Error>> = part
            .chunks(65536)
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect();
        let resp = c
            .patch(&location)
            .header("content-type", OCTET)
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                pieces,
            )))
            .send()
            .await
            .unwrap();
        let resp = expect_status(resp, StatusCode::ACCEPTED).await;
        let end = if i == 0 { half } else { data.len() };
        assert_eq!(hdr(&resp, "range"), format!("0-{}", end - 1));
        location = s.resolve(&hdr(&resp, "location"));
    }
    let status = expect_status(
        c.get(&location).send().await.unwrap(),
        StatusCode::NO_CONTENT,
    )
    .await;
    assert_eq!(hdr(&status, "range"), format!("0-{}", data.len() - 1));

    let resp = c
        .put(with_query(&location, &format!("digest={digest}")))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::CREATED).await;
    assert_blob(&c, &s, "streamed", &digest, &data).await;
}

#[tokio::test]
async fn upload_status_of_a_fresh_session() {
    let s = Server::start();
    let c = client();
    let location = start_upload(&c, &s, "status").await;
    let resp = expect_status(
        c.get(&location).send().await.unwrap(),
        StatusCode::NO_CONTENT,
    )
    .await;
    assert!(!hdr(&resp, "location").is_empty());
    assert!(hdr(&resp, "range").starts_with("0-"));
    let resp = expect_status(
        patch_chunk(&c, &location, 0, b"x").await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(hdr(&resp, "range"), "0-0");
    let resp = expect_status(
        c.get(&location).send().await.unwrap(),
        StatusCode::NO_CONTENT,
    )
    .await;
    assert_eq!(hdr(&resp, "range"), "0-0");
    assert_eq!(
        s.resolve(&hdr(&resp, "location")),
        location,
        "the session keeps its location"
    );
}

#[tokio::test]
async fn cancelled_upload_is_gone() {
    let s = Server::start();
    let c = client();
    let data = pseudo_random(1000, 6);
    let location = start_upload(&c, &s, "cancel").await;
    expect_status(
        patch_chunk(&c, &location, 0, &data[..500]).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let resp = c
        .delete(&location)
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::NO_CONTENT).await;

    expect_error(
        c.get(&location).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
    expect_error(
        patch_chunk(&c, &location, 500, &data[500..]).await,
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
    let resp = c
        .put(with_query(
            &location,
            &format!("digest={}", sha256_digest(&data)),
        ))
        .body(data[500..].to_vec())
        .send()
        .await
        .unwrap();
    expect_error(resp, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    expect_error(
        c.delete(&location).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
    assert_no_blob(&c, &s, "cancel", &sha256_digest(&data)).await;

    // An id that was never handed out.
    expect_error(
        c.get(s.url("/v2/cancel/blobs/uploads/not-an-upload"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn digest_mismatch_is_rejected_and_nothing_is_stored() {
    let s = Server::start();
    let c = client();
    let data = pseudo_random(5000, 7);
    let right = sha256_digest(&data);
    let wrong = sha256_digest(b"something else");

    // Single POST.
    let resp = c
        .post(s.url(&format!("/v2/mismatch/blobs/uploads/?digest={wrong}")))
        .header("content-type", OCTET)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    expect_error(resp, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    assert_no_blob(&c, &s, "mismatch", &wrong).await;
    assert_no_blob(&c, &s, "mismatch", &right).await;

    // POST then PUT.
    let location = start_upload(&c, &s, "mismatch").await;
    let resp = c
        .put(with_query(&location, &format!("digest={wrong}")))
        .header("content-type", OCTET)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    expect_error(resp, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    assert_no_blob(&c, &s, "mismatch", &wrong).await;
    assert_no_blob(&c, &s, "mismatch", &right).await;

    // Chunks, then a closing PUT with the wrong digest.
    let location = start_upload(&c, &s, "mismatch").await;
    let resp = expect_status(
        patch_chunk(&c, &location, 0, &data).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let location = s.resolve(&hdr(&resp, "location"));
    let resp = c
        .put(with_query(&location, &format!("digest={wrong}")))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    expect_error(resp, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    assert_no_blob(&c, &s, "mismatch", &wrong).await;
    assert_no_blob(&c, &s, "mismatch", &right).await;

    // The right digest still works afterwards.
    post_blob(&c, &s, "mismatch", &data).await;
    assert_blob(&c, &s, "mismatch", &right, &data).await;
}

#[tokio::test]
async fn sha512_uploads() {
    let s = Server::start();
    let c = client();
    let data = pseudo_random(40_000, 8);
    let d512 = sha512_digest(&data);

    // Chunked, announced with ?digest-algorithm=sha512 (end-4c).
    let resp = c
        .post(s.url("/v2/sha512/chunked/blobs/uploads/?digest-algorithm=sha512"))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    let resp = expect_status(resp, StatusCode::ACCEPTED).await;
    let location = s.resolve(&hdr(&resp, "location"));
    let resp = expect_status(
        patch_chunk(&c, &location, 0, &data[..25_000]).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let location = s.resolve(&hdr(&resp, "location"));
    let resp = expect_status(
        patch_chunk(&c, &location, 25_000, &data[25_000..]).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let location = s.resolve(&hdr(&resp, "location"));
    let resp = c
        .put(with_query(&location, &format!("digest={d512}")))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    let resp = expect_status(resp, StatusCode::CREATED).await;
    assert!(hdr(&resp, "location").contains(&d512));
    assert_blob(&c, &s, "sha512/chunked", &d512, &data).await;
    // HEAD too.
    let head = expect_status(
        c.head(s.url(&format!("/v2/sha512/chunked/blobs/{d512}")))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(hdr(&head, "docker-content-digest"), d512);

    // Single POST with a sha512 digest.
    let resp = c
        .post(s.url(&format!("/v2/sha512/single/blobs/uploads/?digest={d512}")))
        .header("content-type", OCTET)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::CREATED).await;
    assert_blob(&c, &s, "sha512/single", &d512, &data).await;

    // POST then PUT with a sha512 digest, without announcing the algorithm.
    let location = start_upload(&c, &s, "sha512/postput").await;
    let resp = c
        .put(with_query(&location, &format!("digest={d512}")))
        .header("content-type", OCTET)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::CREATED).await;
    assert_blob(&c, &s, "sha512/postput", &d512, &data).await;

    // A wrong sha512 digest.
    let wrong = sha512_digest(b"not the data");
    let resp = c
        .post(s.url(&format!("/v2/sha512/wrong/blobs/uploads/?digest={wrong}")))
        .header("content-type", OCTET)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    expect_error(resp, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    assert_no_blob(&c, &s, "sha512/wrong", &wrong).await;
}

// ---------------------------------------------------------------------------------------------
// Pulling blobs

#[tokio::test]
async fn blob_head_and_get_headers() {
    let s = Server::start();
    let c = client();
    let data = pseudo_random(12_345, 9);
    let digest = post_blob(&c, &s, "headers", &data).await;

    let head = expect_status(
        c.head(s.url(&format!("/v2/headers/blobs/{digest}")))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(hdr(&head, "content-length"), "12345");
    assert_eq!(hdr(&head, "docker-content-digest"), digest);
    assert_eq!(hdr(&head, "accept-ranges"), "bytes");
    assert_raw_head(
        &s,
        &format!("/v2/headers/blobs/{digest}"),
        200,
        Some(data.len()),
    )
    .await;

    let get = expect_status(get_blob(&c, &s, "headers", &digest).await, StatusCode::OK).await;
    assert_eq!(hdr(&get, "content-length"), "12345");
    assert_eq!(hdr(&get, "docker-content-digest"), digest);
    assert_eq!(hdr(&get, "accept-ranges"), "bytes");
    assert!(get.bytes().await.unwrap() == data);

    // Unknown blobs, and blobs of another repository, are 404.
    let unknown = sha256_digest(b"never pushed");
    let head = c
        .head(s.url(&format!("/v2/headers/blobs/{unknown}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    assert_raw_head(&s, &format!("/v2/headers/blobs/{unknown}"), 404, None).await;
    assert_no_blob(&c, &s, "headers", &unknown).await;
    assert_no_blob(&c, &s, "elsewhere", &digest).await;
}

#[tokio::test]
async fn range_requests() {
    let s = Server::start();
    let c = client();
    let data = pseudo_random(1000, 10);
    let digest = post_blob(&c, &s, "ranges", &data).await;
    let url = s.url(&format!("/v2/ranges/blobs/{digest}"));

    for (range, start, end) in [
        ("bytes=10-19", 10, 19),
        ("bytes=990-", 990, 999),
        ("bytes=-5", 995, 999),
        ("bytes=995-2000", 995, 999),
        ("bytes=0-0", 0, 0),
    ] {
        let resp = c.get(&url).header("range", range).send().await.unwrap();
        let resp = expect_status(resp, StatusCode::PARTIAL_CONTENT).await;
        assert_eq!(
            hdr(&resp, "content-range"),
            format!("bytes {start}-{end}/1000"),
            "{range}"
        );
        assert_eq!(
            hdr(&resp, "content-length"),
            (end - start + 1).to_string(),
            "{range}"
        );
        assert_eq!(hdr(&resp, "docker-content-digest"), digest);
        let body = resp.bytes().await.unwrap();
        assert!(body == data[start..=end], "{range}: wrong bytes");
    }

    for range in ["bytes=1000-", "bytes=5000-6000"] {
        let resp = c.get(&url).header("range", range).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(hdr(&resp, "content-range"), "bytes */1000", "{range}");
    }
}

#[tokio::test]
async fn cross_repository_mount() {
    let s = Server::start();
    let c = client();
    let data = pseudo_random(4000, 11);
    let digest = post_blob(&c, &s, "mount/source", &data).await;
    assert_no_blob(&c, &s, "mount/target", &digest).await;

    // The source has it: 201, and the target now serves it.
    let resp = c
        .post(s.url(&format!(
            "/v2/mount/target/blobs/uploads/?mount={digest}&from=mount/source"
        )))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    let resp = expect_status(resp, StatusCode::CREATED).await;
    assert_eq!(hdr(&resp, "docker-content-digest"), digest);
    let location = s.resolve(&hdr(&resp, "location"));
    let pulled = expect_status(c.get(&location).send().await.unwrap(), StatusCode::OK).await;
    assert!(pulled.bytes().await.unwrap() == data);
    assert_blob(&c, &s, "mount/target", &digest, &data).await;

    // The named source lacks it: 202, an upload session that works.
    let resp = c
        .post(s.url(&format!(
            "/v2/mount/third/blobs/uploads/?mount={digest}&from=mount/empty"
        )))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    let resp = expect_status(resp, StatusCode::ACCEPTED).await;
    let location = s.resolve(&hdr(&resp, "location"));
    assert_no_blob(&c, &s, "mount/third", &digest).await;
    let resp = c
        .put(with_query(&location, &format!("digest={digest}")))
        .header("content-type", OCTET)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::CREATED).await;
    assert_blob(&c, &s, "mount/third", &digest, &data).await;

    // An unknown digest from a repository that exists: 202 as well.
    let unknown = sha256_digest(b"nobody has this");
    let resp = c
        .post(s.url(&format!(
            "/v2/mount/fourth/blobs/uploads/?mount={unknown}&from=mount/source"
        )))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    let resp = expect_status(resp, StatusCode::ACCEPTED).await;
    assert!(!hdr(&resp, "location").is_empty());
    assert_no_blob(&c, &s, "mount/fourth", &unknown).await;
}

// ---------------------------------------------------------------------------------------------
// Manifests

#[tokio::test]
async fn manifest_push_by_tag_then_get_and_head() {
    let s = Server::start();
    let c = client();
    let image = push_image(&c, &s, "app", "v1", 1).await;

    for reference in ["v1", image.digest.as_str()] {
        let url = s.url(&format!("/v2/app/manifests/{reference}"));
        let resp = c
            .get(&url)
            .header("accept", format!("{OCI_MANIFEST}, {OCI_INDEX}"))
            .send()
            .await
            .unwrap();
        let resp = expect_status(resp, StatusCode::OK).await;
        assert_eq!(hdr(&resp, "content-type"), OCI_MANIFEST, "{reference}");
        assert_eq!(hdr(&resp, "docker-content-digest"), image.digest);
        assert_eq!(
            hdr(&resp, "content-length"),
            image.manifest.len().to_string()
        );
        let body = resp.bytes().await.unwrap();
        assert!(
            body == image.manifest,
            "{reference}: the manifest's exact bytes are not returned"
        );

        let head = expect_status(c.head(&url).send().await.unwrap(), StatusCode::OK).await;
        assert_eq!(hdr(&head, "content-type"), OCI_MANIFEST);
        assert_eq!(hdr(&head, "docker-content-digest"), image.digest);
        assert_eq!(
            hdr(&head, "content-length"),
            image.manifest.len().to_string()
        );
        assert_raw_head(
            &s,
            &format!("/v2/app/manifests/{reference}"),
            200,
            Some(image.manifest.len()),
        )
        .await;
    }

    // The Location of the push is a pullable manifest URL.
    let resp = put_manifest(&c, &s, "app", "v1-again", OCI_MANIFEST, &image.manifest).await;
    let resp = expect_status(resp, StatusCode::CREATED).await;
    let location = s.resolve(&hdr(&resp, "location"));
    let pulled = expect_status(c.get(&location).send().await.unwrap(), StatusCode::OK).await;
    assert!(pulled.bytes().await.unwrap() == image.manifest);

    // A Docker manifest keeps its media type.
    let config = br#"{"architecture":"arm64","os":"linux"}"#;
    let layer = pseudo_random(777, 12);
    post_blob(&c, &s, "app", config).await;
    post_blob(&c, &s, "app", &layer).await;
    let docker = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor(DOCKER_CONFIG, config),
        "layers": [descriptor(DOCKER_LAYER, &layer)],
    }))
    .unwrap();
    expect_status(
        put_manifest(&c, &s, "app", "docker", DOCKER_MANIFEST, &docker).await,
        StatusCode::CREATED,
    )
    .await;
    let resp = expect_status(
        c.get(s.url("/v2/app/manifests/docker"))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(hdr(&resp, "content-type"), DOCKER_MANIFEST);
    assert!(resp.bytes().await.unwrap() == docker);

    // An index over both.
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            descriptor(OCI_MANIFEST, &image.manifest),
            descriptor(DOCKER_MANIFEST, &docker),
        ],
    }))
    .unwrap();
    expect_status(
        put_manifest(&c, &s, "app", "multi", OCI_INDEX, &index).await,
        StatusCode::CREATED,
    )
    .await;
    let head = expect_status(
        c.head(s.url("/v2/app/manifests/multi"))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(hdr(&head, "content-type"), OCI_INDEX);
    assert_eq!(hdr(&head, "docker-content-digest"), sha256_digest(&index));
    assert_eq!(hdr(&head, "content-length"), index.len().to_string());

    // Unknown manifests.
    expect_error(
        c.get(s.url("/v2/app/manifests/nope")).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
    let head = c
        .head(s.url("/v2/app/manifests/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    assert_raw_head(&s, "/v2/app/manifests/nope", 404, None).await;
}

#[tokio::test]
async fn manifest_push_by_digest_with_tags() {
    let s = Server::start();
    let c = client();
    let image = push_image(&c, &s, "bydigest", "first", 2).await;

    let resp = c
        .put(s.url(&format!(
            "/v2/bydigest/manifests/{}?tag=1.2.3&tag=1.2&tag=latest",
            image.digest
        )))
        .header("content-type", OCI_MANIFEST)
        .body(image.manifest.clone())
        .send()
        .await
        .unwrap();
    let resp = expect_status(resp, StatusCode::CREATED).await;
    assert_eq!(hdr(&resp, "docker-content-digest"), image.digest);
    assert_eq!(
        header_list(&resp, "oci-tag"),
        ["1.2", "1.2.3", "latest"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    for tag in ["1.2.3", "1.2", "latest", "first"] {
        let resp = expect_status(
            c.get(s.url(&format!("/v2/bydigest/manifests/{tag}")))
                .send()
                .await
                .unwrap(),
            StatusCode::OK,
        )
        .await;
        assert_eq!(hdr(&resp, "docker-content-digest"), image.digest, "{tag}");
        assert!(resp.bytes().await.unwrap() == image.manifest, "{tag}");
    }

    // A digest that is not the body's.
    let wrong = sha256_digest(b"other bytes");
    let resp = put_manifest(&c, &s, "bydigest", &wrong, OCI_MANIFEST, &image.manifest).await;
    expect_error(resp, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    expect_error(
        c.get(s.url(&format!("/v2/bydigest/manifests/{wrong}")))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn tags_list_with_pagination() {
    let s = Server::start();
    let c = client();
    let image = push_image(&c, &s, "tags/repo", "latest", 3).await;
    let tags = ["v1", "v10", "v2", "alpha", "Beta", "0.1"];
    let query: Vec<String> = tags.iter().map(|t| format!("tag={t}")).collect();
    let resp = c
        .put(s.url(&format!(
            "/v2/tags/repo/manifests/{}?{}",
            image.digest,
            query.join("&")
        )))
        .header("content-type", OCI_MANIFEST)
        .body(image.manifest.clone())
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::CREATED).await;

    let mut all: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    all.push("latest".into());
    all.sort(); // ASCIIbetical, like Go's sort.Strings

    let (link, v) = get_json(&c, &s.url("/v2/tags/repo/tags/list")).await;
    assert_eq!(v["name"], "tags/repo");
    let listed: Vec<String> = serde_json::from_value(v["tags"].clone()).unwrap();
    assert_eq!(listed, all);
    assert!(link.is_none(), "the whole list has no Link");

    // Pages of 2, following Link.
    let mut url = s.url("/v2/tags/repo/tags/list?n=2");
    let mut collected = Vec::new();
    let mut pages = 0;
    loop {
        let (link, v) = get_json(&c, &url).await;
        let page: Vec<String> = serde_json::from_value(v["tags"].clone()).unwrap();
        pages += 1;
        assert!(pages <= all.len(), "pagination does not end");
        collected.extend(page.iter().cloned());
        match link {
            Some(next) => {
                assert_eq!(page.len(), 2, "a page with a Link has n entries");
                url = s.resolve(&next);
            }
            None => break,
        }
    }
    assert_eq!(collected, all);
    assert_eq!(pages, all.len().div_ceil(2));

    // last= without following links.
    let (_, v) = get_json(&c, &s.url("/v2/tags/repo/tags/list?n=2&last=alpha")).await;
    assert_eq!(v["tags"], json!(["latest", "v1"]));
    let (_, v) = get_json(&c, &s.url("/v2/tags/repo/tags/list?last=v10")).await;
    assert_eq!(v["tags"], json!(["v2"]));

    // n=0: an empty list and no Link.
    let (link, v) = get_json(&c, &s.url("/v2/tags/repo/tags/list?n=0")).await;
    assert_eq!(v["tags"], json!([]));
    assert!(link.is_none());

    // More than there are: everything, no Link.
    let (link, v) = get_json(&c, &s.url("/v2/tags/repo/tags/list?n=100")).await;
    assert_eq!(v["tags"].as_array().unwrap().len(), all.len());
    assert!(link.is_none());

    expect_error(
        c.get(s.url("/v2/tags/unknown/tags/list"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "NAME_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn catalog_lists_repositories() {
    let s = Server::start();
    let c = client();
    for (i, repo) in ["cat/b", "cat/a", "cat/c/deep"].into_iter().enumerate() {
        push_image(&c, &s, repo, "latest", 10 + i as u64).await;
    }
    let all = vec!["cat/a", "cat/b", "cat/c/deep"];

    let (link, v) = get_json(&c, &s.url("/v2/_catalog")).await;
    assert_eq!(v["repositories"], json!(all));
    assert!(link.is_none());

    let mut url = s.url("/v2/_catalog?n=1");
    let mut collected = Vec::new();
    loop {
        let (link, v) = get_json(&c, &url).await;
        let page: Vec<String> = serde_json::from_value(v["repositories"].clone()).unwrap();
        assert!(collected.len() <= all.len(), "pagination does not end");
        collected.extend(page);
        match link {
            Some(next) => url = s.resolve(&next),
            None => break,
        }
    }
    assert_eq!(collected, all);

    let (_, v) = get_json(&c, &s.url("/v2/_catalog?n=5&last=cat/a")).await;
    assert_eq!(v["repositories"], json!(["cat/b", "cat/c/deep"]));
}

// ---------------------------------------------------------------------------------------------
// Referrers

/// An artifact manifest whose subject is `subject` (a manifest of `subject_size` bytes).
fn artifact_manifest(
    artifact_type: Option<&str>,
    config_type: &str,
    config: &[u8],
    layer: &[u8],
    subject: &str,
    subject_size: usize,
    annotations: Value,
) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(config_type, config),
        "layers": [descriptor("application/vnd.example.data", layer)],
        "subject": { "mediaType": OCI_MANIFEST, "digest": subject, "size": subject_size },
        "annotations": annotations,
    });
    if let Some(t) = artifact_type {
        m["artifactType"] = json!(t);
    }
    serde_json::to_vec(&m).unwrap()
}

#[tokio::test]
async fn referrers_api() {
    let s = Server::start();
    let c = client();
    let repo = "ref/repo";
    let image = push_image(&c, &s, repo, "latest", 20).await;
    let empty = b"{}";
    post_blob(&c, &s, repo, empty).await;
    let sbom_data = br#"{"packages":[]}"#;
    post_blob(&c, &s, repo, sbom_data).await;
    let sig_config = br#"{"signer":"test"}"#;
    post_blob(&c, &s, repo, sig_config).await;
    let sig_data = pseudo_random(64, 21);
    post_blob(&c, &s, repo, &sig_data).await;

    const SBOM: &str = "application/vnd.example.sbom.v1";
    const SIG_CONFIG: &str = "application/vnd.example.signature.config.v1+json";

    // With an artifactType, pushed by digest.
    let sbom = artifact_manifest(
        Some(SBOM),
        OCI_EMPTY,
        empty,
        sbom_data,
        &image.digest,
        image.manifest.len(),
        json!({ "org.example.kind": "sbom" }),
    );
    let sbom_digest = sha256_digest(&sbom);
    let resp = put_manifest(&c, &s, repo, &sbom_digest, OCI_MANIFEST, &sbom).await;
    let resp = expect_status(resp, StatusCode::CREATED).await;
    assert_eq!(hdr(&resp, "oci-subject"), image.digest);

    // Without one (so the config's media type stands in), pushed by tag.
    let sig = artifact_manifest(
        None,
        SIG_CONFIG,
        sig_config,
        &sig_data,
        &image.digest,
        image.manifest.len(),
        json!({ "org.example.kind": "signature" }),
    );
    let sig_digest = sha256_digest(&sig);
    let resp = put_manifest(&c, &s, repo, "signature", OCI_MANIFEST, &sig).await;
    let resp = expect_status(resp, StatusCode::CREATED).await;
    assert_eq!(hdr(&resp, "oci-subject"), image.digest);

    // A subject that does not exist (yet) is accepted.
    let missing = sha256_digest(b"a manifest pushed later");
    let orphan = artifact_manifest(
        Some(SBOM),
        OCI_EMPTY,
        empty,
        sbom_data,
        &missing,
        123,
        json!({}),
    );
    let resp = put_manifest(&c, &s, repo, &sha256_digest(&orphan), OCI_MANIFEST, &orphan).await;
    let resp = expect_status(resp, StatusCode::CREATED).await;
    assert_eq!(hdr(&resp, "oci-subject"), missing);

    let list_url = s.url(&format!("/v2/{repo}/referrers/{}", image.digest));
    let resp = expect_status(c.get(&list_url).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(hdr(&resp, "content-type"), OCI_INDEX);
    assert!(opt_hdr(&resp, "oci-filters-applied").is_none());
    let index: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["mediaType"], OCI_INDEX);
    let mut entries = index["manifests"].as_array().unwrap().clone();
    entries.sort_by_key(|e| e["digest"].as_str().unwrap().to_owned());
    let mut expected = vec![
        json!({
            "mediaType": OCI_MANIFEST, "digest": sbom_digest, "size": sbom.len(),
            "artifactType": SBOM, "annotations": { "org.example.kind": "sbom" },
        }),
        json!({
            "mediaType": OCI_MANIFEST, "digest": sig_digest, "size": sig.len(),
            "artifactType": SIG_CONFIG, "annotations": { "org.example.kind": "signature" },
        }),
    ];
    expected.sort_by_key(|e| e["digest"].as_str().unwrap().to_owned());
    assert_eq!(entries, expected);

    // Filtered.
    let resp = expect_status(
        c.get(format!("{list_url}?artifactType={SBOM}"))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(hdr(&resp, "content-type"), OCI_INDEX);
    assert!(
        header_list(&resp, "oci-filters-applied").contains("artifactType"),
        "OCI-Filters-Applied: {:?}",
        opt_hdr(&resp, "oci-filters-applied")
    );
    let index: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{index}");
    assert_eq!(entries[0]["digest"], sbom_digest);

    let resp = expect_status(
        c.get(format!(
            "{list_url}?artifactType=application/vnd.example.none"
        ))
        .send()
        .await
        .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(header_list(&resp, "oci-filters-applied").contains("artifactType"));
    let index: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(index["manifests"], json!([]));

    // No referrers, or another repository: an empty list, never 404.
    for url in [
        s.url(&format!("/v2/{repo}/referrers/{}", sha256_digest(b"none"))),
        s.url(&format!("/v2/ref/other/referrers/{}", image.digest)),
    ] {
        let resp = expect_status(c.get(&url).send().await.unwrap(), StatusCode::OK).await;
        let index: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(index["manifests"], json!([]), "{url}");
    }
    // The orphan shows under its subject.
    let (_, index) = get_json(&c, &s.url(&format!("/v2/{repo}/referrers/{missing}"))).await;
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);

    // An invalid digest is 400.
    let resp = c
        .get(s.url(&format!("/v2/{repo}/referrers/sha256:nothex")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // Deleting a referrer removes it from the list.
    let resp = c
        .delete(s.url(&format!("/v2/{repo}/manifests/{sbom_digest}")))
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::ACCEPTED).await;
    let (_, index) = get_json(&c, &list_url).await;
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{index}");
    assert_eq!(entries[0]["digest"], sig_digest);
}

// ---------------------------------------------------------------------------------------------
// Deleting

#[tokio::test]
async fn delete_manifest_by_tag_and_by_digest() {
    let s = Server::start();
    let c = client();
    let image = push_image(&c, &s, "del", "one", 30).await;
    for tag in ["two", "three"] {
        expect_status(
            put_manifest(&c, &s, "del", tag, OCI_MANIFEST, &image.manifest).await,
            StatusCode::CREATED,
        )
        .await;
    }
    let other = push_image(&c, &s, "del", "other", 31).await;

    // A tag alone.
    let resp = c
        .delete(s.url("/v2/del/manifests/one"))
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::ACCEPTED).await;
    expect_error(
        c.get(s.url("/v2/del/manifests/one")).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
    expect_status(
        c.get(s.url(&format!("/v2/del/manifests/{}", image.digest)))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    let (_, v) = get_json(&c, &s.url("/v2/del/tags/list")).await;
    assert_eq!(v["tags"], json!(["other", "three", "two"]));

    // The manifest, and with it the tags that point at it.
    let resp = c
        .delete(s.url(&format!("/v2/del/manifests/{}", image.digest)))
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::ACCEPTED).await;
    for reference in [image.digest.as_str(), "two", "three"] {
        let url = s.url(&format!("/v2/del/manifests/{reference}"));
        expect_error(
            c.get(&url).send().await.unwrap(),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        )
        .await;
        let head = c.head(&url).send().await.unwrap();
        assert_eq!(head.status(), StatusCode::NOT_FOUND, "{reference}");
    }
    let (_, v) = get_json(&c, &s.url("/v2/del/tags/list")).await;
    assert_eq!(v["tags"], json!(["other"]));
    // The other manifest is untouched.
    let resp = expect_status(
        c.get(s.url("/v2/del/manifests/other"))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(resp.bytes().await.unwrap() == other.manifest);

    // Deleting again, or in an unknown repository: 404.
    expect_error(
        c.delete(s.url(&format!("/v2/del/manifests/{}", image.digest)))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
    let resp = c
        .delete(s.url(&format!("/v2/nowhere/manifests/{}", image.digest)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = c
        .delete(s.url("/v2/del/manifests/one"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn delete_blob() {
    let s = Server::start();
    let c = client();
    let data = pseudo_random(2048, 40);
    let digest = post_blob(&c, &s, "delblob/a", &data).await;
    // Mounted elsewhere before the delete.
    let resp = c
        .post(s.url(&format!(
            "/v2/delblob/b/blobs/uploads/?mount={digest}&from=delblob/a"
        )))
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::CREATED).await;

    let resp = c
        .delete(s.url(&format!("/v2/delblob/a/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::ACCEPTED).await;
    assert_no_blob(&c, &s, "delblob/a", &digest).await;
    expect_error(
        c.delete(s.url(&format!("/v2/delblob/a/blobs/{digest}")))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    )
    .await;
    // The other repository still has it.
    assert_blob(&c, &s, "delblob/b", &digest, &data).await;
}

// ---------------------------------------------------------------------------------------------
// Errors

#[tokio::test]
async fn error_envelopes() {
    let s = Server::start();
    let c = client();
    let data = pseudo_random(100, 50);
    let digest = post_blob(&c, &s, "errors", &data).await;

    // NAME_INVALID
    for path in [
        "/v2/Upper/tags/list".to_owned(),
        "/v2/a..b/manifests/latest".to_owned(),
        "/v2/bad_/blobs/uploads/".to_owned(),
        format!("/v2/-x/blobs/{digest}"),
    ] {
        let method = if path.ends_with("/uploads/") {
            Method::POST
        } else {
            Method::GET
        };
        let resp = c.request(method, s.url(&path)).send().await.unwrap();
        expect_error(resp, StatusCode::BAD_REQUEST, "NAME_INVALID").await;
    }

    // DIGEST_INVALID: malformed, and unsupported algorithms.
    for bad in [
        "sha256:nothex",
        "sha256:abc",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
    ] {
        expect_error(
            get_blob(&c, &s, "errors", bad).await,
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        )
        .await;
        let resp = c
            .post(s.url(&format!("/v2/errors/blobs/uploads/?digest={bad}")))
            .body(data.clone())
            .send()
            .await
            .unwrap();
        expect_error(resp, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    }
    let resp = c
        .post(s.url("/v2/errors/blobs/uploads/?digest-algorithm=md5"))
        .send()
        .await
        .unwrap();
    expect_error_one_of(
        resp,
        StatusCode::BAD_REQUEST,
        &["DIGEST_INVALID", "UNSUPPORTED"],
    )
    .await;

    // MANIFEST_BLOB_UNKNOWN: a layer that was never pushed.
    let missing = pseudo_random(10, 51);
    let manifest = image_manifest(&data, &[&missing]);
    let resp = put_manifest(&c, &s, "errors", "latest", OCI_MANIFEST, &manifest).await;
    assert!(resp.status().is_client_error(), "{}", resp.status());
    let status = resp.status();
    expect_error(resp, status, "MANIFEST_BLOB_UNKNOWN").await;
    // ... nor a config that was never pushed.
    let manifest = image_manifest(&missing, &[&data]);
    let resp = put_manifest(&c, &s, "errors", "latest", OCI_MANIFEST, &manifest).await;
    let status = resp.status();
    assert!(status.is_client_error(), "{status}");
    expect_error(resp, status, "MANIFEST_BLOB_UNKNOWN").await;
    // ... nor an index entry that was never pushed.
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [descriptor(OCI_MANIFEST, b"{}")],
    }))
    .unwrap();
    let resp = put_manifest(&c, &s, "errors", "index", OCI_INDEX, &index).await;
    let status = resp.status();
    assert!(status.is_client_error(), "{status}");
    expect_error(resp, status, "MANIFEST_BLOB_UNKNOWN").await;
    expect_error(
        c.get(s.url("/v2/errors/manifests/latest"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;

    // MANIFEST_INVALID
    let good = image_manifest(&data, &[&data]);
    let wrong_size = String::from_utf8(good.clone())
        .unwrap()
        .replace("\"size\": 100", "\"size\": 101")
        .into_bytes();
    for (body, content_type) in [
        (b"not json".to_vec(), OCI_MANIFEST),
        (b"[]".to_vec(), OCI_MANIFEST),
        (br#"{"schemaVersion":1}"#.to_vec(), OCI_MANIFEST),
        (
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#
                .to_vec(),
            OCI_MANIFEST,
        ),
        // The Content-Type contradicts the mediaType field.
        (good.clone(), OCI_INDEX),
    ] {
        let resp = put_manifest(&c, &s, "errors", "bad", content_type, &body).await;
        expect_error(resp, StatusCode::BAD_REQUEST, "MANIFEST_INVALID").await;
    }
    // A descriptor whose size is not the blob's.
    let resp = put_manifest(&c, &s, "errors", "bad", OCI_MANIFEST, &wrong_size).await;
    let status = resp.status();
    assert!(status.is_client_error(), "{status}");
    expect_error_one_of(resp, status, &["MANIFEST_INVALID", "MANIFEST_BLOB_UNKNOWN"]).await;
    expect_error(
        c.get(s.url("/v2/errors/manifests/bad"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
    expect_status(
        put_manifest(&c, &s, "errors", "good", OCI_MANIFEST, &good).await,
        StatusCode::CREATED,
    )
    .await;

    // BLOB_UNKNOWN, MANIFEST_UNKNOWN, NAME_UNKNOWN
    assert_no_blob(&c, &s, "errors", &sha256_digest(b"unknown")).await;
    expect_error(
        c.get(s.url("/v2/errors/manifests/unknown-tag"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
    expect_error(
        c.get(s.url("/v2/nosuchrepo/tags/list"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "NAME_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn manifests_over_4_mib_get_413() {
    let s = Server::start();
    let c = client();
    let config = b"{}";
    let layer = pseudo_random(100, 60);
    post_blob(&c, &s, "big", config).await;
    post_blob(&c, &s, "big", &layer).await;

    // A valid manifest padded to exactly `len` bytes with an annotation.
    let padded = |len: usize| -> Vec<u8> {
        let make = |pad: usize| {
            serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, config),
                "layers": [descriptor(OCI_LAYER, &layer)],
                "annotations": { "pad": "x".repeat(pad) },
            }))
            .unwrap()
        };
        let base = make(0).len();
        let m = make(len - base);
        assert_eq!(m.len(), len);
        m
    };
    const LIMIT: usize = 4 * 1024 * 1024;

    // Exactly 4 MiB: accepted (registries should take at least 4 MiB).
    let at_limit = padded(LIMIT);
    let resp = put_manifest(&c, &s, "big", "at-limit", OCI_MANIFEST, &at_limit).await;
    expect_status(resp, StatusCode::CREATED).await;
    let resp = expect_status(
        c.get(s.url("/v2/big/manifests/at-limit"))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(resp.bytes().await.unwrap() == at_limit);

    // One byte more: 413, which the client must receive (not a reset while it still sends the
    // body: RFC 9112 section 9.6). Five attempts, each on a new connection.
    let over = padded(LIMIT + 1);
    for attempt in 1..=5 {
        let resp = c
            .put(s.url("/v2/big/manifests/over"))
            .header("content-type", OCI_MANIFEST)
            .body(over.clone())
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!("attempt {attempt}: no response to a manifest of 4 MiB + 1 byte: {e:?}")
            });
        expect_error_one_of(resp, StatusCode::PAYLOAD_TOO_LARGE, &[]).await;
    }
    expect_error(
        c.get(s.url("/v2/big/manifests/over")).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Command-line switches

#[tokio::test]
async fn no_delete_refuses_deletes_with_405() {
    let s = Server::builder().arg("--no-delete").start();
    let c = client();
    let image = push_image(&c, &s, "keep", "latest", 70).await;
    let blob = pseudo_random(100, 71);
    let blob_digest = post_blob(&c, &s, "keep", &blob).await;

    for path in [
        format!("/v2/keep/manifests/{}", image.digest),
        "/v2/keep/manifests/latest".to_owned(),
        format!("/v2/keep/blobs/{blob_digest}"),
    ] {
        let resp = c.delete(s.url(&path)).send().await.unwrap();
        expect_error(resp, StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED").await;
    }
    // Everything is still there.
    let resp = expect_status(
        c.get(s.url("/v2/keep/manifests/latest"))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(resp.bytes().await.unwrap() == image.manifest);
    assert_blob(&c, &s, "keep", &blob_digest, &blob).await;
}

#[tokio::test]
async fn no_delete_from_the_environment() {
    let s = Server::builder().env("DOCKSIDE_NO_DELETE", "true").start();
    let c = client();
    let image = push_image(&c, &s, "keep", "latest", 72).await;
    let resp = c
        .delete(s.url(&format!("/v2/keep/manifests/{}", image.digest)))
        .send()
        .await
        .unwrap();
    expect_error(resp, StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED").await;
    expect_status(
        c.get(s.url("/v2/keep/manifests/latest"))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
}

#[tokio::test]
async fn no_tag_delete_refuses_tag_deletes_only() {
    let s = Server::builder().arg("--no-tag-delete").start();
    let c = client();
    let image = push_image(&c, &s, "tagkeep", "latest", 73).await;
    let resp = c
        .delete(s.url("/v2/tagkeep/manifests/latest"))
        .send()
        .await
        .unwrap();
    // The spec allows 400 or 405 here.
    let status = resp.status();
    assert!(
        status == StatusCode::BAD_REQUEST || status == StatusCode::METHOD_NOT_ALLOWED,
        "{status}"
    );
    expect_error(resp, status, "UNSUPPORTED").await;
    expect_status(
        c.get(s.url("/v2/tagkeep/manifests/latest"))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    // The manifest itself may still go, and its tag with it.
    let resp = c
        .delete(s.url(&format!("/v2/tagkeep/manifests/{}", image.digest)))
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::ACCEPTED).await;
    expect_error(
        c.get(s.url("/v2/tagkeep/manifests/latest"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn max_chunk_bytes_limits_each_request() {
    let s = Server::builder()
        .args(["--max-chunk-bytes", "1024", "--chunk-min-length", "512"])
        .start();
    let c = client();
    let data = pseudo_random(2548, 80);
    let digest = sha256_digest(&data);

    let resp = c
        .post(s.url("/v2/limited/blobs/uploads/"))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    let resp = expect_status(resp, StatusCode::ACCEPTED).await;
    assert_eq!(hdr(&resp, "oci-chunk-max-length"), "1024");
    assert_eq!(hdr(&resp, "oci-chunk-min-length"), "512");
    let location = s.resolve(&hdr(&resp, "location"));

    // Over the limit, declared: 413, and the upload is unchanged.
    let resp = patch_chunk(&c, &location, 0, &data[..2048]).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let resp = expect_status(
        patch_chunk(&c, &location, 0, &data[..1024]).await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(hdr(&resp, "range"), "0-1023");
    let location = s.resolve(&hdr(&resp, "location"));

    let resp = expect_status(
        c.get(&location).send().await.unwrap(),
        StatusCode::NO_CONTENT,
    )
    .await;
    assert_eq!(hdr(&resp, "range"), "0-1023");

    // Within the limit, it finishes.
    let resp = expect_status(
        patch_chunk(&c, &location, 1024, &data[1024..2048]).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let location = s.resolve(&hdr(&resp, "location"));
    let resp = c
        .put(with_query(&location, &format!("digest={digest}")))
        .header("content-type", OCTET)
        .header("content-range", "2048-2547")
        .body(data[2048..].to_vec())
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::CREATED).await;
    assert_blob(&c, &s, "limited", &digest, &data).await;

    // A single POST over the limit.
    let resp = c
        .post(s.url(&format!(
            "/v2/limited/single/blobs/uploads/?digest={digest}"
        )))
        .header("content-type", OCTET)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_no_blob(&c, &s, "limited/single", &digest).await;
}

/// A body far over `--max-chunk-bytes`: the client must receive the 413 (and the session must
/// survive), not a connection reset while it is still sending.
#[tokio::test]
async fn upload_body_far_over_max_chunk_bytes_receives_413() {
    let s = Server::builder()
        .args(["--max-chunk-bytes", "65536"])
        .start();
    let c = client();
    let data = pseudo_random(8 << 20, 81);
    let location = start_upload(&c, &s, "limited").await;

    // Five attempts, each on a new connection.
    for attempt in 1..=5 {
        let resp = c
            .patch(&location)
            .header("content-type", OCTET)
            .header("content-range", format!("0-{}", data.len() - 1))
            .body(data.clone())
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "attempt {attempt}: no response to a PATCH of 8 MiB over a 64 KiB limit: {e:?}"
                )
            });
        expect_error_one_of(resp, StatusCode::PAYLOAD_TOO_LARGE, &[]).await;
    }

    // Streamed without a length: the server finds out while reading.
    for attempt in 1..=5 {
        let pieces: Vec<Result<Bytes, std::io::Error>> = data[..256 * 1024]
            .chunks(16 * 1024)
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect();
        let resp = c
            .patch(&location)
            .header("content-type", OCTET)
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                pieces,
            )))
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!("attempt {attempt}: no response to a streamed PATCH over the limit: {e:?}")
            });
        expect_error_one_of(resp, StatusCode::PAYLOAD_TOO_LARGE, &[]).await;
    }

    let resp = expect_status(
        c.get(&location).send().await.unwrap(),
        StatusCode::NO_CONTENT,
    )
    .await;
    assert!(hdr(&resp, "range").starts_with("0-"));
}

// ---------------------------------------------------------------------------------------------
// Process lifecycle

#[tokio::test]
async fn sigterm_stops_an_idle_server_cleanly() {
    let mut s = Server::start();
    let c = client();
    expect_status(c.get(s.url("/v2/")).send().await.unwrap(), StatusCode::OK).await;

    // The client keeps its idle keep-alive connection open meanwhile: that must not hold the
    // server up.
    s.terminate();
    let status = s
        .wait_exit(Duration::from_secs(5))
        .expect("dockside still running 5 s after SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
    s.wait_for_log("stopped", Duration::from_secs(1));
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_request_in_flight_finish() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut s = Server::builder().data_dir(data_dir.path()).start();
    let c = client();
    let data = pseudo_random(3 * 65536, 90);
    let location = start_upload(&c, &s, "inflight").await;

    // A PATCH whose body the test releases piece by piece.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    let request = tokio::spawn({
        let c = c.clone();
        let location = location.clone();
        async move {
            c.patch(&location)
                .header("content-type", OCTET)
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await
        }
    });
    tx.send(Bytes::copy_from_slice(&data[..65536]))
        .await
        .unwrap();

    // The server is writing that body once its first bytes are in a temporary file.
    let tmp = s.data_dir().join("tmp");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let receiving = std::fs::read_dir(&tmp)
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false));
        if receiving {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never started writing the PATCH body"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    s.terminate();
    tokio::task::block_in_place(|| s.wait_for_log("stopping", Duration::from_secs(10)));
    // Still running: it waits for the request.
    assert!(s.wait_exit(Duration::ZERO).is_none());

    tx.send(Bytes::copy_from_slice(&data[65536..]))
        .await
        .unwrap();
    drop(tx);
    let resp = request.await.unwrap().expect("the PATCH in flight failed");
    let resp = expect_status(resp, StatusCode::ACCEPTED).await;
    assert_eq!(hdr(&resp, "range"), format!("0-{}", data.len() - 1));
    drop(c);

    let status = tokio::task::block_in_place(|| s.wait_exit(Duration::from_secs(10)))
        .expect("dockside still running after its last request finished");
    assert!(status.success(), "{status}");
    drop(s);

    // Nothing was lost: a new server finishes the upload.
    let s = Server::builder().data_dir(data_dir.path()).start();
    let c = client();
    let location = s.resolve(&location_path(&location));
    let resp = expect_status(
        c.get(&location).send().await.unwrap(),
        StatusCode::NO_CONTENT,
    )
    .await;
    assert_eq!(hdr(&resp, "range"), format!("0-{}", data.len() - 1));
    let location = s.resolve(&hdr(&resp, "location"));
    let digest = sha256_digest(&data);
    let resp = c
        .put(with_query(&location, &format!("digest={digest}")))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::CREATED).await;
    assert_blob(&c, &s, "inflight", &digest, &data).await;
}

#[tokio::test]
async fn restart_keeps_everything() {
    let data_dir = tempfile::tempdir().unwrap();
    let s = Server::builder().data_dir(data_dir.path()).start();
    let c = client();
    let blob = pseudo_random(300_000, 100);
    let blob_digest = post_blob(&c, &s, "persist", &blob).await;
    let image = push_image(&c, &s, "persist", "v1", 101).await;
    // An upload in progress.
    let partial = pseudo_random(5000, 102);
    let location = start_upload(&c, &s, "persist").await;
    let resp = expect_status(
        patch_chunk(&c, &location, 0, &partial[..3000]).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let location = hdr(&resp, "location");
    drop(c);
    let old_port = s.addr().port();
    s.stop();

    let s = Server::builder().data_dir(data_dir.path()).start();
    let c = client();
    println!("restarted: port {old_port} -> {}", s.addr().port());
    assert_blob(&c, &s, "persist", &blob_digest, &blob).await;
    let resp = expect_status(
        c.get(s.url("/v2/persist/manifests/v1"))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(hdr(&resp, "content-type"), OCI_MANIFEST);
    assert_eq!(hdr(&resp, "docker-content-digest"), image.digest);
    assert!(resp.bytes().await.unwrap() == image.manifest);
    let (_, v) = get_json(&c, &s.url("/v2/persist/tags/list")).await;
    assert_eq!(v["tags"], json!(["v1"]));
    let (_, v) = get_json(&c, &s.url("/v2/_catalog")).await;
    assert_eq!(v["repositories"], json!(["persist"]));

    // The upload continues where it stood.
    let location = s.resolve(&location_path(&location));
    let resp = expect_status(
        c.get(&location).send().await.unwrap(),
        StatusCode::NO_CONTENT,
    )
    .await;
    assert_eq!(hdr(&resp, "range"), "0-2999");
    let resp = c
        .put(with_query(
            &location,
            &format!("digest={}", sha256_digest(&partial)),
        ))
        .header("content-type", OCTET)
        .header("content-range", "3000-4999")
        .body(partial[3000..].to_vec())
        .send()
        .await
        .unwrap();
    expect_status(resp, StatusCode::CREATED).await;
    assert_blob(&c, &s, "persist", &sha256_digest(&partial), &partial).await;
}
