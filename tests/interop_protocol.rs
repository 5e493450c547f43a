//! The protocol suite: the four workflows of the OCI distribution spec (pull, push, content
//! discovery, content management), request by request, for sha256 and sha512, checking status
//! codes, headers and error codes as `shared/reference/distribution-spec-*.md` words them.
//!
//! It runs against any registry: by default a native `dockside serve` started per test, or the
//! registry at `DOCKSIDE_INTEROP_REGISTRY` (e.g. `http://127.0.0.1:5000`) when that is set. Every
//! test works in repositories of its own (`DOCKSIDE_INTEROP_NAMESPACE`, default `protocol`,
//! then a unique name). Against dockside, what the spec leaves optional (single-POST uploads,
//! deletes, the error body's format) is held to what dockside documents; against another
//! registry the suite accepts every answer the spec allows and says so on stderr.
//! `DOCKSIDE_INTEROP_STRICT=1` says the registry at `DOCKSIDE_INTEROP_REGISTRY` is a dockside
//! with default settings (a component under `wasmtime serve` or `spin up`): held to the same.
//!
//! Only with `--features interop`; see docs/INTEROP.md.
#![cfg(feature = "interop")]

mod interop;

use std::time::Duration;

use interop::image::{OCI_CONFIG, OCI_EMPTY, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, Rng};
use interop::{Registry, hex, unique};
use reqwest::{Method, Response};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256, Sha512};

const OCTET: &str = "application/octet-stream";
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

// ---------------------------------------------------------------------------------------------
// The target registry and small helpers

#[derive(Clone, Copy, Debug, PartialEq)]
enum Alg {
    Sha256,
    Sha512,
}

impl Alg {
    fn digest(self, data: &[u8]) -> String {
        match self {
            Alg::Sha256 => format!("sha256:{}", hex(&Sha256::digest(data))),
            Alg::Sha512 => format!("sha512:{}", hex(&Sha512::digest(data))),
        }
    }

    /// The query that opens an upload session for this algorithm (end-4a / end-4c).
    fn upload_query(self) -> &'static str {
        match self {
            Alg::Sha256 => "",
            Alg::Sha512 => "?digest-algorithm=sha512",
        }
    }
}

struct Suite {
    client: reqwest::Client,
    base: String,
    /// True against dockside: optional behaviour is held to what dockside documents.
    strict: bool,
    ns: String,
    rng: std::sync::Mutex<Rng>,
    _server: Option<Registry>,
}

impl Suite {
    fn new(test: &str) -> Suite {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("an HTTP client");
        let ns_root =
            std::env::var("DOCKSIDE_INTEROP_NAMESPACE").unwrap_or_else(|_| "protocol".into());
        let ns = format!("{ns_root}/{}", unique(&test.replace('_', "-")));
        match std::env::var("DOCKSIDE_INTEROP_REGISTRY") {
            Ok(url) if !url.is_empty() => {
                // DOCKSIDE_INTEROP_STRICT=1: the registry there is dockside (on another adapter:
                // wasmtime serve, spin up) with default settings, held to what dockside
                // documents.
                let strict = std::env::var("DOCKSIDE_INTEROP_STRICT").is_ok_and(|v| v == "1");
                if strict {
                    eprintln!(
                        "protocol suite against {url}, a dockside: held to its documentation"
                    );
                } else {
                    eprintln!(
                        "protocol suite against {url} (not dockside: optional behaviour is not required)"
                    );
                }
                Suite {
                    client,
                    base: url.trim_end_matches('/').to_owned(),
                    strict,
                    ns,
                    rng: std::sync::Mutex::new(Rng::from_entropy()),
                    _server: None,
                }
            }
            _ => {
                let server = Registry::start();
                Suite {
                    client,
                    base: server.base_url(),
                    strict: true,
                    ns,
                    rng: std::sync::Mutex::new(Rng::from_entropy()),
                    _server: Some(server),
                }
            }
        }
    }

    fn repo(&self, name: &str) -> String {
        format!("{}/{name}", self.ns)
    }

    /// An absolute URL: `path` (starting with `/`) on the registry, or a `Location` value,
    /// which may be absolute or relative.
    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }

    fn bytes(&self, len: usize) -> Vec<u8> {
        self.rng.lock().expect("rng").bytes(len)
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Response {
        let url = self.url(path);
        let mut req = self
            .client
            .request(Method::from_bytes(method.as_bytes()).expect("method"), &url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
    }

    /// Like `send`, but a transport error is returned instead of failing the test.
    async fn try_send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Response, String> {
        let url = self.url(path);
        let mut req = self
            .client
            .request(Method::from_bytes(method.as_bytes()).expect("method"), &url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(body).send().await.map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(inner) = src {
                msg.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            msg
        })
    }

    async fn get(&self, path: &str) -> Response {
        self.send("GET", path, &[("accept", ACCEPT)], Vec::new())
            .await
    }

    async fn head(&self, path: &str) -> Response {
        self.send("HEAD", path, &[("accept", ACCEPT)], Vec::new())
            .await
    }

    /// Opens an upload session (POST, end-4a/4c); returns the Location to use.
    async fn open_upload(&self, repo: &str, alg: Alg) -> String {
        let r = self
            .send(
                "POST",
                &format!("/v2/{repo}/blobs/uploads/{}", alg.upload_query()),
                &[("content-length", "0")],
                Vec::new(),
            )
            .await;
        let r = expect_status(r, 202, "POST an upload session").await;
        let loc = hdr(&r, "location");
        assert!(!loc.is_empty(), "an empty Location");
        loc
    }

    /// Pushes a blob with POST then PUT (end-4a, end-6).
    async fn push_blob(&self, repo: &str, alg: Alg, data: &[u8]) -> String {
        let digest = alg.digest(data);
        let loc = self.open_upload(repo, alg).await;
        let len = data.len().to_string();
        let r = self
            .send(
                "PUT",
                &with_query(&loc, &format!("digest={digest}")),
                &[("content-type", OCTET), ("content-length", &len)],
                data.to_vec(),
            )
            .await;
        let r = expect_status(r, 201, "PUT a whole blob").await;
        assert!(!hdr(&r, "location").is_empty());
        digest
    }

    /// Pushes a manifest under `reference`; returns the response (already checked for 201).
    async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Response {
        let r = self
            .send(
                "PUT",
                &format!("/v2/{repo}/manifests/{reference}"),
                &[("content-type", media_type)],
                body.to_vec(),
            )
            .await;
        let r = expect_status(r, 201, "PUT a manifest").await;
        assert!(!hdr(&r, "location").is_empty(), "PUT manifest: Location");
        r
    }

    /// A small image in `repo` (config and two layers with `alg` digests); returns the
    /// manifest bytes. Not tagged: the caller pushes the manifest.
    async fn image(&self, repo: &str, alg: Alg) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
        let mut blobs = Vec::new();
        for n in [4096, 70_000] {
            let data = self.bytes(n);
            let d = self.push_blob(repo, alg, &data).await;
            blobs.push((d, data));
        }
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "config": {}
        }))
        .expect("JSON");
        let cd = self.push_blob(repo, alg, &config).await;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": config.len()},
            "layers": blobs.iter().map(|(d, b)| json!({"mediaType": OCI_LAYER_GZIP, "digest": d, "size": b.len()})).collect::<Vec<_>>(),
        });
        blobs.push((cd, config));
        (serde_json::to_vec(&manifest).expect("JSON"), blobs)
    }

    fn note(&self, what: &str) {
        eprintln!("note ({}): {what}", self.base);
    }
}

/// `url` with `query` appended (`?` or `&`).
fn with_query(url: &str, query: &str) -> String {
    if url.contains('?') {
        format!("{url}&{query}")
    } else {
        format!("{url}?{query}")
    }
}

fn hdr(r: &Response, name: &str) -> String {
    opt_hdr(r, name).unwrap_or_else(|| {
        panic!(
            "{} {}: no {name} header in {:?}",
            r.status(),
            r.url(),
            r.headers()
        )
    })
}

fn opt_hdr(r: &Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().expect("an ASCII header").to_owned())
}

async fn expect_status(r: Response, status: u16, what: &str) -> Response {
    if r.status().as_u16() != status {
        let (got, url) = (r.status(), r.url().clone());
        let body = r.text().await.unwrap_or_default();
        panic!("{what}: {url}: expected {status}, got {got}: {body}");
    }
    r
}

/// Checks an error response: one of `statuses`, and when the body is JSON (always, against
/// dockside) the spec's envelope with a code among `codes` (any code when `codes` is empty).
async fn expect_error(s: &Suite, r: Response, statuses: &[u16], codes: &[&str], what: &str) {
    let (status, url) = (r.status().as_u16(), r.url().clone());
    let ct = opt_hdr(&r, "content-type").unwrap_or_default();
    let body = r.bytes().await.expect("the error body");
    let text = String::from_utf8_lossy(&body);
    assert!(
        statuses.contains(&status),
        "{what}: {url}: expected {statuses:?}, got {status}: {text}"
    );
    if body.is_empty() && !s.strict {
        return;
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) if !s.strict => {
            s.note(&format!("{what}: a non-JSON error body ({e}), allowed"));
            return;
        }
        Err(e) => panic!("{what}: {url}: error body is not JSON ({e}): {text}"),
    };
    if s.strict {
        assert!(
            ct.starts_with("application/json"),
            "{what}: Content-Type {ct:?}"
        );
    }
    let errors = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: {url}: no errors array: {text}"));
    assert!(!errors.is_empty(), "{what}: an empty errors array");
    let mut seen = Vec::new();
    for e in errors {
        let c = e["code"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: an error without a string code: {text}"));
        assert!(
            !c.is_empty() && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
            "{what}: code {c:?} is not uppercase letters and underscores"
        );
        if let Some(m) = e.get("message") {
            assert!(m.is_string(), "{what}: message must be a string: {text}");
        }
        seen.push(c.to_owned());
    }
    assert!(
        codes.is_empty() || seen.iter().any(|c| codes.contains(&c.as_str())),
        "{what}: {url}: codes {seen:?}, expected one of {codes:?}"
    );
}

/// The `<url>` of a `Link: <url>; rel="next"` header.
fn next_link(r: &Response) -> Option<String> {
    let v = opt_hdr(r, "link")?;
    assert!(v.contains("rel=\"next\""), "Link without rel=\"next\": {v}");
    let start = v.find('<')? + 1;
    let end = v[start..].find('>')? + start;
    Some(v[start..end].to_owned())
}

// ---------------------------------------------------------------------------------------------
// end-1

#[tokio::test]
async fn determining_support() {
    let s = Suite::new("support");
    let r = expect_status(s.get("/v2/").await, 200, "GET /v2/").await;
    if s.strict {
        assert_eq!(
            opt_hdr(&r, "docker-distribution-api-version").as_deref(),
            Some("registry/2.0")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Pull

async fn pull(alg: Alg) {
    let s = Suite::new(&format!("pull-{alg:?}").to_lowercase());
    let repo = s.repo("image");
    let (manifest, blobs) = s.image(&repo, alg).await;
    let md = alg.digest(&manifest);
    s.push_manifest(&repo, "latest", OCI_MANIFEST, &manifest)
        .await;
    s.push_manifest(&repo, &md, OCI_MANIFEST, &manifest).await;

    // Pulling manifests: by tag and by digest, 200, the exact bytes, the pushed Content-Type,
    // Docker-Content-Digest (MUST in the newer text) matching the body.
    for reference in ["latest", md.as_str()] {
        let r = s.get(&format!("/v2/{repo}/manifests/{reference}")).await;
        let r = expect_status(r, 200, "GET manifest").await;
        assert_eq!(hdr(&r, "content-type"), OCI_MANIFEST);
        let dcd = hdr(&r, "docker-content-digest");
        let body = r.bytes().await.expect("body");
        assert_eq!(body.as_ref(), manifest.as_slice(), "the manifest as pushed");
        let dcd_alg = if dcd.starts_with("sha512:") {
            Alg::Sha512
        } else {
            Alg::Sha256
        };
        assert_eq!(
            dcd,
            dcd_alg.digest(&body),
            "Docker-Content-Digest matches the body"
        );
        if reference == md {
            assert_eq!(dcd, md, "by digest: Docker-Content-Digest is that digest");
        }
    }

    // Checking if content exists: HEAD, 200, Content-Length, Docker-Content-Digest, no body.
    let r = expect_status(
        s.head(&format!("/v2/{repo}/manifests/{md}")).await,
        200,
        "HEAD manifest",
    )
    .await;
    assert_eq!(hdr(&r, "content-length"), manifest.len().to_string());
    assert_eq!(hdr(&r, "docker-content-digest"), md);
    assert!(
        r.bytes().await.expect("body").is_empty(),
        "HEAD has no body"
    );
    for (d, data) in &blobs {
        let r = expect_status(
            s.head(&format!("/v2/{repo}/blobs/{d}")).await,
            200,
            "HEAD blob",
        )
        .await;
        assert_eq!(hdr(&r, "content-length"), data.len().to_string());
        assert_eq!(&hdr(&r, "docker-content-digest"), d);
    }

    // Pulling blobs: 200, the bytes, Docker-Content-Digest matching them.
    for (d, data) in &blobs {
        let r = expect_status(
            s.get(&format!("/v2/{repo}/blobs/{d}")).await,
            200,
            "GET blob",
        )
        .await;
        assert_eq!(&hdr(&r, "docker-content-digest"), d);
        let body = r.bytes().await.expect("body");
        assert!(body.as_ref() == data.as_slice(), "blob {d} as pushed");
    }

    // Range (SHOULD, RFC 9110): a single range is 206 with Content-Range; past the end 416.
    let (d, data) = &blobs[1];
    let r = s
        .send(
            "GET",
            &format!("/v2/{repo}/blobs/{d}"),
            &[("range", "bytes=100-1099")],
            Vec::new(),
        )
        .await;
    if r.status().as_u16() == 206 || s.strict {
        let r = expect_status(r, 206, "GET blob with Range").await;
        assert_eq!(
            hdr(&r, "content-range"),
            format!("bytes 100-1099/{}", data.len())
        );
        let body = r.bytes().await.expect("body");
        assert!(body.as_ref() == &data[100..1100]);
        let r = s
            .send(
                "GET",
                &format!("/v2/{repo}/blobs/{d}"),
                &[("range", "bytes=900000-")],
                Vec::new(),
            )
            .await;
        assert_eq!(r.status().as_u16(), 416, "an unsatisfiable range");
        let r = s
            .send(
                "GET",
                &format!("/v2/{repo}/blobs/{d}"),
                &[("range", "bytes=-10")],
                Vec::new(),
            )
            .await;
        let r = expect_status(r, 206, "a suffix range").await;
        assert!(r.bytes().await.expect("body").as_ref() == &data[data.len() - 10..]);
    } else {
        s.note("Range is not supported (SHOULD)");
    }

    // Not found: 404, with MANIFEST_UNKNOWN / BLOB_UNKNOWN / NAME_UNKNOWN when JSON.
    let missing = alg.digest(b"no such content");
    let r = s.get(&format!("/v2/{repo}/manifests/{missing}")).await;
    expect_error(
        &s,
        r,
        &[404],
        &["MANIFEST_UNKNOWN"],
        "a missing manifest by digest",
    )
    .await;
    let r = s.get(&format!("/v2/{repo}/manifests/no-such-tag")).await;
    expect_error(&s, r, &[404], &["MANIFEST_UNKNOWN"], "a missing tag").await;
    let r = s.head(&format!("/v2/{repo}/manifests/no-such-tag")).await;
    assert_eq!(r.status().as_u16(), 404, "HEAD a missing tag");
    // A reference that is neither a tag nor a digest names nothing: 404, as the spec's
    // conformance suite has it (`.INVALID_MANIFEST_NAME`), not a 400.
    let r = s
        .get(&format!("/v2/{repo}/manifests/.INVALID_MANIFEST_NAME"))
        .await;
    expect_error(
        &s,
        r,
        &[404],
        &["MANIFEST_UNKNOWN"],
        "a reference that is neither a tag nor a digest",
    )
    .await;
    let r = s
        .head(&format!("/v2/{repo}/manifests/.INVALID_MANIFEST_NAME"))
        .await;
    assert_eq!(
        r.status().as_u16(),
        404,
        "HEAD a reference that is neither a tag nor a digest"
    );
    let r = s.get(&format!("/v2/{repo}/blobs/{missing}")).await;
    expect_error(&s, r, &[404], &["BLOB_UNKNOWN"], "a missing blob").await;
    let r = s.head(&format!("/v2/{repo}/blobs/{missing}")).await;
    assert_eq!(r.status().as_u16(), 404, "HEAD a missing blob");
    let r = s
        .get(&format!("/v2/{}/manifests/latest", s.repo("never-pushed")))
        .await;
    expect_error(
        &s,
        r,
        &[404],
        &["NAME_UNKNOWN", "MANIFEST_UNKNOWN"],
        "a missing repository",
    )
    .await;
    // A blob of another repository is not readable here.
    let other = s.repo("other");
    let r = s.get(&format!("/v2/{other}/blobs/{d}")).await;
    expect_error(
        &s,
        r,
        &[404],
        &["BLOB_UNKNOWN", "NAME_UNKNOWN"],
        "a blob of another repository",
    )
    .await;
    // A reference that is neither a tag nor a digest.
    let r = s.get(&format!("/v2/{repo}/manifests/-not-a-tag")).await;
    expect_error(&s, r, &[400, 404], &[], "an invalid reference").await;
}

#[tokio::test]
async fn pull_sha256() {
    pull(Alg::Sha256).await;
}

#[tokio::test]
async fn pull_sha512() {
    pull(Alg::Sha512).await;
}

// ---------------------------------------------------------------------------------------------
// Push: blobs

async fn push_monolithic(alg: Alg) {
    let s = Suite::new(&format!("mono-{alg:?}").to_lowercase());
    let repo = s.repo("blobs");

    // POST then PUT.
    let data = s.bytes(100_000);
    let digest = alg.digest(&data);
    let loc = s.open_upload(&repo, alg).await;
    let r = s
        .send(
            "PUT",
            &with_query(&loc, &format!("digest={digest}")),
            &[
                ("content-type", OCTET),
                ("content-length", &data.len().to_string()),
            ],
            data.clone(),
        )
        .await;
    let r = expect_status(r, 201, "POST then PUT").await;
    let blob_loc = hdr(&r, "location");
    if let Some(d) = opt_hdr(&r, "docker-content-digest") {
        assert_eq!(d, digest);
    }
    // <blob-location> is a pullable blob URL.
    let r = expect_status(s.get(&blob_loc).await, 200, "GET the blob Location").await;
    assert!(r.bytes().await.expect("body").as_ref() == data.as_slice());

    // Single POST (MAY): 201 with Location, or 202 and the client goes on with a PUT.
    let data = s.bytes(12_345);
    let digest = alg.digest(&data);
    let r = s
        .send(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
            &[
                ("content-type", OCTET),
                ("content-length", &data.len().to_string()),
            ],
            data.clone(),
        )
        .await;
    match r.status().as_u16() {
        201 => {
            let l = hdr(&r, "location");
            let g = expect_status(s.get(&l).await, 200, "GET the single-POST blob").await;
            assert!(g.bytes().await.expect("body").as_ref() == data.as_slice());
        }
        202 if !s.strict => {
            s.note("single POST uploads are not supported (MAY): 202");
            let loc = hdr(&r, "location");
            let r = s
                .send(
                    "PUT",
                    &with_query(&loc, &format!("digest={digest}")),
                    &[("content-type", OCTET)],
                    data.clone(),
                )
                .await;
            expect_status(r, 201, "PUT after a 202 single POST").await;
        }
        other => panic!(
            "single POST: {other}: {}",
            r.text().await.unwrap_or_default()
        ),
    }

    // An empty blob.
    let empty_digest = s.push_blob(&repo, alg, b"").await;
    let r = expect_status(
        s.head(&format!("/v2/{repo}/blobs/{empty_digest}")).await,
        200,
        "HEAD the empty blob",
    )
    .await;
    assert_eq!(hdr(&r, "content-length"), "0");

    // A digest that does not match the content: 400 DIGEST_INVALID, and no blob.
    let loc = s.open_upload(&repo, alg).await;
    let wrong = alg.digest(b"something else");
    let r = s
        .send(
            "PUT",
            &with_query(&loc, &format!("digest={wrong}")),
            &[("content-type", OCTET)],
            s.bytes(500),
        )
        .await;
    expect_error(
        &s,
        r,
        &[400],
        &["DIGEST_INVALID"],
        "PUT with a wrong digest",
    )
    .await;
    assert_eq!(
        s.head(&format!("/v2/{repo}/blobs/{wrong}"))
            .await
            .status()
            .as_u16(),
        404
    );

    // A malformed or unsupported digest (SHOULD be 400, per the newer text).
    for bad in [
        "sha256:xyz",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "nocolon",
    ] {
        let loc = s.open_upload(&repo, alg).await;
        let r = s
            .send(
                "PUT",
                &with_query(&loc, &format!("digest={bad}")),
                &[("content-type", OCTET)],
                b"abc".to_vec(),
            )
            .await;
        expect_error(
            &s,
            r,
            &[400],
            &["DIGEST_INVALID", "UNSUPPORTED"],
            "PUT with a malformed digest",
        )
        .await;
    }
    let r = s
        .send(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/?digest=sha256:xyz"),
            &[("content-type", OCTET)],
            b"abc".to_vec(),
        )
        .await;
    expect_error(
        &s,
        r,
        &[400],
        &["DIGEST_INVALID", "UNSUPPORTED"],
        "single POST with a malformed digest",
    )
    .await;

    // An invalid repository name.
    let r = s
        .send("POST", "/v2/Upper/Case/blobs/uploads/", &[], Vec::new())
        .await;
    expect_error(
        &s,
        r,
        &[400, 404],
        &["NAME_INVALID", "NAME_UNKNOWN"],
        "an invalid name",
    )
    .await;
}

#[tokio::test]
async fn push_monolithic_sha256() {
    push_monolithic(Alg::Sha256).await;
}

#[tokio::test]
async fn push_monolithic_sha512() {
    push_monolithic(Alg::Sha512).await;
}

async fn push_chunked(alg: Alg) {
    let s = Suite::new(&format!("chunked-{alg:?}").to_lowercase());
    let repo = s.repo("chunks");

    let r = s
        .send(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/{}", alg.upload_query()),
            &[("content-length", "0")],
            Vec::new(),
        )
        .await;
    let r = expect_status(r, 202, "POST (chunked)").await;
    let mut loc = hdr(&r, "location");
    let min: usize =
        opt_hdr(&r, "oci-chunk-min-length").map_or(0, |v| v.parse().expect("a number"));
    let max: usize =
        opt_hdr(&r, "oci-chunk-max-length").map_or(usize::MAX, |v| v.parse().expect("a number"));
    let chunk = 100_000usize.max(min).min(max);
    // Three chunks and a last byte, whatever chunk size the registry asks for (S3-backed ones
    // advertise a 5 MiB minimum): 300 001 bytes at the default.
    let data = s.bytes(3 * chunk + 1);
    let digest = alg.digest(&data);
    if s.strict {
        // Before any chunk, GET reports an empty upload: Range 0-0 is what registries send
        // (there is no byte yet); dockside documents 204 with the Range received so far.
        let g = expect_status(s.get(&loc).await, 204, "GET a fresh upload").await;
        assert!(opt_hdr(&g, "location").is_some());
    }

    // Chunks in order: each 202 with Location and Range 0-<end>.
    let mut offset = 0usize;
    let mut n = 0;
    while data.len() - offset > chunk {
        let end = offset + chunk - 1;
        let range = format!("{offset}-{end}");
        let r = s
            .send(
                "PATCH",
                &loc,
                &[
                    ("content-type", OCTET),
                    ("content-range", &range),
                    ("content-length", &chunk.to_string()),
                ],
                data[offset..=end].to_vec(),
            )
            .await;
        let r = expect_status(r, 202, "PATCH a chunk").await;
        assert_eq!(hdr(&r, "range"), format!("0-{end}"), "Range after a chunk");
        loc = hdr(&r, "location");
        offset = end + 1;
        n += 1;

        // GET the status: 204, Location, Range.
        let g = expect_status(s.get(&loc).await, 204, "GET upload status").await;
        assert_eq!(hdr(&g, "range"), format!("0-{end}"));
        loc = hdr(&g, "location");
    }
    assert!(n >= 2, "at least two chunks before the last");

    // A chunk out of order: 416 (and the upload is unchanged).
    let bad = format!("{}-{}", offset + 10, offset + 19);
    let r = s
        .send(
            "PATCH",
            &loc,
            &[
                ("content-type", OCTET),
                ("content-range", &bad),
                ("content-length", "10"),
            ],
            vec![0; 10],
        )
        .await;
    assert_eq!(r.status().as_u16(), 416, "a chunk out of order");
    let g = expect_status(s.get(&loc).await, 204, "GET upload status after a 416").await;
    assert_eq!(hdr(&g, "range"), format!("0-{}", offset - 1));
    loc = hdr(&g, "location");
    // A chunk that overlaps what was received: 416 too. (Small: large bodies answered early
    // are `early_error_responses_reach_the_client`'s matter.)
    let r = s
        .send(
            "PATCH",
            &loc,
            &[
                ("content-type", OCTET),
                ("content-range", "0-15"),
                ("content-length", "16"),
            ],
            data[..16].to_vec(),
        )
        .await;
    assert_eq!(r.status().as_u16(), 416, "a chunk that starts at 0 again");

    // The last chunk in the closing PUT, with the digest of the whole blob.
    let last = format!("{offset}-{}", data.len() - 1);
    let rest = data[offset..].to_vec();
    let r = s
        .send(
            "PUT",
            &with_query(&loc, &format!("digest={digest}")),
            &[
                ("content-type", OCTET),
                ("content-range", &last),
                ("content-length", &rest.len().to_string()),
            ],
            rest,
        )
        .await;
    let r = expect_status(r, 201, "closing PUT with the last chunk").await;
    let blob_loc = hdr(&r, "location");
    let g = expect_status(s.get(&blob_loc).await, 200, "GET the chunked blob").await;
    assert_eq!(hdr(&g, "docker-content-digest"), digest);
    assert!(
        g.bytes().await.expect("body").as_ref() == data.as_slice(),
        "the chunked blob as sent"
    );
    // The session is gone.
    let r = s.get(&loc).await;
    expect_error(
        &s,
        r,
        &[404],
        &["BLOB_UPLOAD_UNKNOWN"],
        "GET a closed upload",
    )
    .await;

    // Every chunk by PATCH, then an empty closing PUT.
    let data2 = s.bytes(150_000);
    let digest2 = alg.digest(&data2);
    let mut loc = s.open_upload(&repo, alg).await;
    for (i, part) in data2.chunks(chunk.min(75_000).max(min)).enumerate() {
        let start = i * chunk.min(75_000).max(min);
        let range = format!("{start}-{}", start + part.len() - 1);
        let r = s
            .send(
                "PATCH",
                &loc,
                &[
                    ("content-type", OCTET),
                    ("content-range", &range),
                    ("content-length", &part.len().to_string()),
                ],
                part.to_vec(),
            )
            .await;
        loc = hdr(&expect_status(r, 202, "PATCH").await, "location");
    }
    let r = s
        .send(
            "PUT",
            &with_query(&loc, &format!("digest={digest2}")),
            &[("content-length", "0")],
            Vec::new(),
        )
        .await;
    expect_status(r, 201, "empty closing PUT").await;
    let g = expect_status(
        s.get(&format!("/v2/{repo}/blobs/{digest2}")).await,
        200,
        "GET",
    )
    .await;
    assert!(g.bytes().await.expect("body").as_ref() == data2.as_slice());

    // A streamed PATCH without Content-Range (what docker and containerd send).
    let data3 = s.bytes(80_000);
    let digest3 = alg.digest(&data3);
    let loc = s.open_upload(&repo, alg).await;
    let r = s
        .send("PATCH", &loc, &[("content-type", OCTET)], data3.clone())
        .await;
    if r.status().as_u16() == 202 || s.strict {
        let r = expect_status(r, 202, "a streamed PATCH").await;
        assert_eq!(hdr(&r, "range"), format!("0-{}", data3.len() - 1));
        let loc = hdr(&r, "location");
        let r = s
            .send(
                "PUT",
                &with_query(&loc, &format!("digest={digest3}")),
                &[],
                Vec::new(),
            )
            .await;
        expect_status(r, 201, "closing PUT after a streamed PATCH").await;
    } else {
        s.note("a PATCH without Content-Range was refused");
    }

    // Cancelling an upload (end-14): 204, then the session is unknown.
    let loc = s.open_upload(&repo, alg).await;
    let r = s
        .send(
            "PATCH",
            &loc,
            &[
                ("content-type", OCTET),
                ("content-range", "0-99"),
                ("content-length", "100"),
            ],
            vec![7; 100],
        )
        .await;
    let loc = hdr(
        &expect_status(r, 202, "PATCH before cancelling").await,
        "location",
    );
    let r = s
        .send("DELETE", &loc, &[("content-length", "0")], Vec::new())
        .await;
    expect_status(r, 204, "DELETE an upload").await;
    let r = s.get(&loc).await;
    expect_error(
        &s,
        r,
        &[404],
        &["BLOB_UPLOAD_UNKNOWN"],
        "GET a cancelled upload",
    )
    .await;
    let r = s
        .send(
            "PATCH",
            &loc,
            &[
                ("content-type", OCTET),
                ("content-range", "100-109"),
                ("content-length", "10"),
            ],
            vec![0; 10],
        )
        .await;
    expect_error(
        &s,
        r,
        &[404],
        &["BLOB_UPLOAD_UNKNOWN"],
        "PATCH a cancelled upload",
    )
    .await;

    // An upload id that never existed.
    let r = s
        .send(
            "PATCH",
            &format!("/v2/{repo}/blobs/uploads/00000000-0000-4000-8000-000000000000"),
            &[("content-type", OCTET)],
            vec![1; 10],
        )
        .await;
    expect_error(
        &s,
        r,
        &[404],
        &["BLOB_UPLOAD_UNKNOWN"],
        "PATCH an unknown upload",
    )
    .await;
    let r = s
        .get(&format!(
            "/v2/{repo}/blobs/uploads/00000000-0000-4000-8000-000000000000"
        ))
        .await;
    expect_error(
        &s,
        r,
        &[404],
        &["BLOB_UPLOAD_UNKNOWN"],
        "GET an unknown upload",
    )
    .await;

    // The closing PUT with a wrong digest: 400 DIGEST_INVALID.
    let loc = s.open_upload(&repo, alg).await;
    let r = s
        .send(
            "PATCH",
            &loc,
            &[
                ("content-type", OCTET),
                ("content-range", "0-99"),
                ("content-length", "100"),
            ],
            vec![9; 100],
        )
        .await;
    let loc = hdr(&expect_status(r, 202, "PATCH").await, "location");
    let wrong = alg.digest(b"not these bytes");
    let r = s
        .send(
            "PUT",
            &with_query(&loc, &format!("digest={wrong}")),
            &[],
            Vec::new(),
        )
        .await;
    expect_error(
        &s,
        r,
        &[400],
        &["DIGEST_INVALID"],
        "closing PUT with a wrong digest",
    )
    .await;
}

#[tokio::test]
async fn push_chunked_sha256() {
    push_chunked(Alg::Sha256).await;
}

#[tokio::test]
async fn push_chunked_sha512() {
    push_chunked(Alg::Sha512).await;
}

async fn push_mount(alg: Alg) {
    let s = Suite::new(&format!("mount-{alg:?}").to_lowercase());
    let (from, to, third) = (s.repo("from"), s.repo("to"), s.repo("third"));
    let data = s.bytes(20_000);
    let digest = s.push_blob(&from, alg, &data).await;

    // Mount from a repository that has it: 201, Location, the blob readable in the new one.
    let r = s
        .send(
            "POST",
            &format!("/v2/{to}/blobs/uploads/?mount={digest}&from={from}"),
            &[("content-length", "0")],
            Vec::new(),
        )
        .await;
    let r = expect_status(r, 201, "mount").await;
    let l = hdr(&r, "location");
    if let Some(d) = opt_hdr(&r, "docker-content-digest") {
        assert_eq!(d, digest);
    }
    let g = expect_status(s.get(&l).await, 200, "GET the mounted blob's Location").await;
    assert!(g.bytes().await.expect("body").as_ref() == data.as_slice());
    expect_status(
        s.head(&format!("/v2/{to}/blobs/{digest}")).await,
        200,
        "HEAD the mounted blob",
    )
    .await;

    // Mount from a repository that lacks it: 202 and a new upload session (SHOULD).
    let missing = alg.digest(b"not in any repository");
    let r = s
        .send(
            "POST",
            &format!("/v2/{third}/blobs/uploads/?mount={missing}&from={from}"),
            &[("content-length", "0")],
            Vec::new(),
        )
        .await;
    let r = expect_status(r, 202, "mount of a blob the source lacks").await;
    let loc = hdr(&r, "location");
    let body = b"now uploaded".to_vec();
    let d = alg.digest(&body);
    let r = s
        .send(
            "PUT",
            &with_query(&loc, &format!("digest={d}")),
            &[("content-type", OCTET)],
            body,
        )
        .await;
    expect_status(r, 201, "PUT into the session a failed mount opened").await;

    // Mount of a blob that exists, from a repository that does not link it.
    let r = s
        .send(
            "POST",
            &format!(
                "/v2/{third}/blobs/uploads/?mount={digest}&from={}",
                s.repo("nothing-here")
            ),
            &[("content-length", "0")],
            Vec::new(),
        )
        .await;
    if s.strict {
        expect_status(r, 202, "mount from a repository without the blob").await;
        assert_eq!(
            s.head(&format!("/v2/{third}/blobs/{digest}"))
                .await
                .status()
                .as_u16(),
            404
        );
    } else {
        assert!(
            matches!(r.status().as_u16(), 201 | 202),
            "mount: {}",
            r.status()
        );
    }
}

#[tokio::test]
async fn push_mount_sha256() {
    push_mount(Alg::Sha256).await;
}

#[tokio::test]
async fn push_mount_sha512() {
    push_mount(Alg::Sha512).await;
}

// ---------------------------------------------------------------------------------------------
// Push: manifests

async fn push_manifests(alg: Alg) {
    let s = Suite::new(&format!("manifests-{alg:?}").to_lowercase());
    let repo = s.repo("app");
    let (manifest, blobs) = s.image(&repo, alg).await;
    let md = alg.digest(&manifest);

    // By digest: Docker-Content-Digest MUST equal the client's digest.
    let r = s.push_manifest(&repo, &md, OCI_MANIFEST, &manifest).await;
    assert_eq!(hdr(&r, "docker-content-digest"), md);
    let l = hdr(&r, "location");
    let g = expect_status(s.get(&l).await, 200, "GET the manifest Location").await;
    assert!(g.bytes().await.expect("body").as_ref() == manifest.as_slice());

    // By tag.
    let r = s.push_manifest(&repo, "v1", OCI_MANIFEST, &manifest).await;
    if let Some(d) = opt_hdr(&r, "docker-content-digest") {
        let a = if d.starts_with("sha512:") {
            Alg::Sha512
        } else {
            Alg::Sha256
        };
        assert_eq!(d, a.digest(&manifest));
    }
    // Overwriting a tag moves it.
    let (m2, _) = s.image(&repo, alg).await;
    s.push_manifest(&repo, "v1", OCI_MANIFEST, &m2).await;
    let g = expect_status(
        s.get(&format!("/v2/{repo}/manifests/v1")).await,
        200,
        "GET v1",
    )
    .await;
    assert!(
        g.bytes().await.expect("body").as_ref() == m2.as_slice(),
        "the tag moved"
    );
    // The first manifest is still there by digest.
    expect_status(
        s.head(&format!("/v2/{repo}/manifests/{md}")).await,
        200,
        "HEAD by digest",
    )
    .await;

    // Parameters on Content-Type are ignored by the registry (SHOULD).
    let (m3, _) = s.image(&repo, alg).await;
    let r = s
        .send(
            "PUT",
            &format!("/v2/{repo}/manifests/with-params"),
            &[(
                "content-type",
                "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
            )],
            m3.clone(),
        )
        .await;
    if r.status().as_u16() == 201 || s.strict {
        expect_status(r, 201, "Content-Type with parameters").await;
    }

    // Several tags at once (end-7b, MAY): one OCI-Tag per accepted tag.
    let r = s
        .send(
            "PUT",
            &format!("/v2/{repo}/manifests/{md}?tag=t1&tag=t2&tag=t3"),
            &[("content-type", OCI_MANIFEST)],
            manifest.clone(),
        )
        .await;
    let r = expect_status(r, 201, "PUT by digest with ?tag=").await;
    let accepted: Vec<String> = r
        .headers()
        .get_all("oci-tag")
        .iter()
        .flat_map(|v| {
            v.to_str()
                .expect("ASCII")
                .split(',')
                .map(|t| t.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|t| !t.is_empty())
        .collect();
    if accepted.is_empty() && !s.strict {
        s.note("?tag= on a manifest PUT is not supported (MAY)");
    } else {
        assert_eq!(accepted, ["t1", "t2", "t3"], "OCI-Tag");
        for t in ["t1", "t2", "t3"] {
            let r = expect_status(
                s.head(&format!("/v2/{repo}/manifests/{t}")).await,
                200,
                "HEAD a ?tag= tag",
            )
            .await;
            assert_eq!(hdr(&r, "docker-content-digest"), md);
        }
    }

    // An index over the image.
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": md, "size": manifest.len(),
                       "platform": {"os": "linux", "architecture": "amd64"}}],
    }))
    .expect("JSON");
    let r = s.push_manifest(&repo, "index", OCI_INDEX, &index).await;
    let _ = r;
    let g = expect_status(
        s.get(&format!("/v2/{repo}/manifests/index")).await,
        200,
        "GET the index",
    )
    .await;
    assert_eq!(hdr(&g, "content-type"), OCI_INDEX);

    // A manifest naming a blob the registry does not have: MAY be refused, then with
    // MANIFEST_BLOB_UNKNOWN.
    let ghost = alg.digest(b"ghost layer");
    let bad = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": blobs[2].0, "size": blobs[2].1.len()},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": ghost, "size": 11}],
    }))
    .expect("JSON");
    let r = s
        .send(
            "PUT",
            &format!("/v2/{repo}/manifests/ghost"),
            &[("content-type", OCI_MANIFEST)],
            bad,
        )
        .await;
    if r.status().as_u16() == 201 {
        assert!(!s.strict, "dockside refuses manifests with unknown blobs");
        s.note("a manifest with an unknown layer was accepted (MAY refuse)");
    } else {
        expect_error(
            &s,
            r,
            &[400, 404],
            &["MANIFEST_BLOB_UNKNOWN"],
            "a manifest with an unknown layer",
        )
        .await;
    }

    // An invalid manifest: MANIFEST_INVALID.
    let r = s
        .send(
            "PUT",
            &format!("/v2/{repo}/manifests/broken"),
            &[("content-type", OCI_MANIFEST)],
            b"{not json".to_vec(),
        )
        .await;
    expect_error(
        &s,
        r,
        &[400],
        &["MANIFEST_INVALID"],
        "a manifest that is not JSON",
    )
    .await;
    // A body whose digest is not the one in the URL.
    let other_digest = alg.digest(b"another manifest");
    let r = s
        .send(
            "PUT",
            &format!("/v2/{repo}/manifests/{other_digest}"),
            &[("content-type", OCI_MANIFEST)],
            manifest.clone(),
        )
        .await;
    expect_error(
        &s,
        r,
        &[400],
        &["DIGEST_INVALID", "MANIFEST_INVALID"],
        "a manifest PUT by a digest that does not match",
    )
    .await;
    // An invalid tag.
    let r = s
        .send(
            "PUT",
            &format!("/v2/{repo}/manifests/.bad-tag"),
            &[("content-type", OCI_MANIFEST)],
            manifest.clone(),
        )
        .await;
    expect_error(
        &s,
        r,
        &[400, 404],
        &["MANIFEST_INVALID", "TAG_INVALID", "NAME_INVALID"],
        "an invalid tag",
    )
    .await;

    // Tags: at most 128 characters of [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}.
    let longest = format!("_{}", "x".repeat(127));
    s.push_manifest(&repo, &longest, OCI_MANIFEST, &manifest)
        .await;
    expect_status(
        s.head(&format!("/v2/{repo}/manifests/{longest}")).await,
        200,
        "a 128-character tag",
    )
    .await;
    let too_long = "y".repeat(129);
    let r = s
        .send(
            "PUT",
            &format!("/v2/{repo}/manifests/{too_long}"),
            &[("content-type", OCI_MANIFEST)],
            manifest.clone(),
        )
        .await;
    // TAG_INVALID is a legacy Docker code the spec says clients may meet.
    expect_error(
        &s,
        r,
        &[400, 404],
        &["MANIFEST_INVALID", "TAG_INVALID", "NAME_INVALID"],
        "a 129-character tag",
    )
    .await;
    // A digest whose encoded part is not lowercase hex.
    let upper = format!(
        "{}:{}",
        if alg == Alg::Sha256 {
            "sha256"
        } else {
            "sha512"
        },
        md.split_once(':').expect("alg:hex").1.to_uppercase()
    );
    let r = s.get(&format!("/v2/{repo}/manifests/{upper}")).await;
    expect_error(
        &s,
        r,
        &[400, 404],
        &["DIGEST_INVALID", "MANIFEST_UNKNOWN", "MANIFEST_INVALID"],
        "an upper-case digest",
    )
    .await;

    // Registries SHOULD accept manifests of at least 4 megabytes.
    let big = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": blobs[2].0, "size": blobs[2].1.len()},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": blobs[0].0, "size": blobs[0].1.len()}],
        "annotations": {"org.example.padding": "x".repeat(3_999_000)},
    }))
    .expect("JSON");
    assert!(big.len() < 4_000_000);
    let r = s
        .send(
            "PUT",
            &format!("/v2/{repo}/manifests/big"),
            &[("content-type", OCI_MANIFEST)],
            big.clone(),
        )
        .await;
    if r.status().as_u16() == 201 || s.strict {
        expect_status(r, 201, "a manifest of almost 4 MB").await;
        let g = expect_status(
            s.get(&format!("/v2/{repo}/manifests/big")).await,
            200,
            "GET big",
        )
        .await;
        assert_eq!(g.bytes().await.expect("body").len(), big.len());
    } else {
        s.note(&format!(
            "a {} byte manifest was refused: {}",
            big.len(),
            r.status()
        ));
    }
    // Over the limit: 413, in `early_error_responses_reach_the_client`.
}

#[tokio::test]
async fn push_manifests_sha256() {
    push_manifests(Alg::Sha256).await;
}

#[tokio::test]
async fn push_manifests_sha512() {
    push_manifests(Alg::Sha512).await;
}

// ---------------------------------------------------------------------------------------------
// Content discovery: tags

#[tokio::test]
async fn discovery_tags() {
    let s = Suite::new("tags");
    let repo = s.repo("tagged");
    let (manifest, _) = s.image(&repo, Alg::Sha256).await;
    // Pushed in an order that is not the sorted one.
    let tags = ["v2", "latest", "a", "B", "v10", "v1", "1.0", "_x", "z-9"];
    for t in tags {
        s.push_manifest(&repo, t, OCI_MANIFEST, &manifest).await;
    }
    let list = |v: &Value| -> Vec<String> {
        v["tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| t.as_str().expect("a string").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };

    let r = expect_status(
        s.get(&format!("/v2/{repo}/tags/list")).await,
        200,
        "tags/list",
    )
    .await;
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["name"], repo.as_str());
    let all = list(&v);
    assert_eq!(all.len(), tags.len());
    // Lexical (case-insensitive) or "ASCIIbetical" order.
    let mut ascii = all.clone();
    ascii.sort();
    let mut lexical = all.clone();
    lexical.sort_by_key(|t| t.to_lowercase());
    assert!(
        all == ascii || all == lexical,
        "tags are not sorted: {all:?}"
    );

    // n: exactly n, or fewer with a Link; n=0: empty and no Link.
    let r = expect_status(
        s.get(&format!("/v2/{repo}/tags/list?n=3")).await,
        200,
        "n=3",
    )
    .await;
    let link = next_link(&r);
    let page: Value = r.json().await.expect("JSON");
    let first = list(&page);
    assert!(
        first.len() == 3 || (first.len() < 3 && link.is_some()),
        "n=3 gave {first:?}"
    );
    assert_eq!(first, all[..first.len()]);
    // Following Link (preferred) or last= until the end gives the whole list.
    let mut seen = first.clone();
    let mut next = link;
    let mut guard = 0;
    while seen.len() < all.len() {
        guard += 1;
        assert!(guard < 20, "pagination does not end: {seen:?}");
        let path = next.clone().unwrap_or_else(|| {
            format!(
                "/v2/{repo}/tags/list?n=3&last={}",
                seen.last().expect("a tag")
            )
        });
        let r = expect_status(s.get(&path).await, 200, "the next page").await;
        next = next_link(&r);
        let page: Value = r.json().await.expect("JSON");
        let more = list(&page);
        assert!(!more.is_empty(), "an empty page before the end");
        seen.extend(more);
    }
    assert_eq!(seen, all, "the pages together");
    if s.strict {
        // The last page has no Link.
        let r = s.get(&format!("/v2/{repo}/tags/list?n=100")).await;
        assert!(opt_hdr(&r, "link").is_none());
    }

    let r = expect_status(
        s.get(&format!("/v2/{repo}/tags/list?n=0")).await,
        200,
        "n=0",
    )
    .await;
    assert!(
        opt_hdr(&r, "link").is_none(),
        "n=0 MUST NOT include a Link header"
    );
    let v: Value = r.json().await.expect("JSON");
    assert!(list(&v).is_empty(), "n=0 MUST return an empty list");

    // last= alone: everything after it.
    let r = expect_status(
        s.get(&format!("/v2/{repo}/tags/list?last={}", all[4]))
            .await,
        200,
        "last=",
    )
    .await;
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(list(&v), all[5..]);
    let r = expect_status(
        s.get(&format!("/v2/{repo}/tags/list?n=2&last={}", all[1]))
            .await,
        200,
        "n=2&last=",
    )
    .await;
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(list(&v), all[2..4]);

    // A repository that does not exist: 404 NAME_UNKNOWN.
    let r = s.get(&format!("/v2/{}/tags/list", s.repo("nothing"))).await;
    expect_error(
        &s,
        r,
        &[404],
        &["NAME_UNKNOWN"],
        "tags of a missing repository",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Content discovery: referrers

async fn discovery_referrers(alg: Alg) {
    let s = Suite::new(&format!("referrers-{alg:?}").to_lowercase());
    let repo = s.repo("subject");
    let (manifest, _) = s.image(&repo, alg).await;
    let md = alg.digest(&manifest);
    s.push_manifest(&repo, "v1", OCI_MANIFEST, &manifest).await;
    s.push_manifest(&repo, &md, OCI_MANIFEST, &manifest).await;
    let subject = json!({"mediaType": OCI_MANIFEST, "digest": md, "size": manifest.len()});

    // Blobs for the referrers: the empty config and a small layer.
    s.push_blob(&repo, alg, b"{}").await;
    let empty_d = alg.digest(b"{}");
    let layer = b"{\"sbom\":true}".to_vec();
    let layer_d = s.push_blob(&repo, alg, &layer).await;

    // 1. With artifactType and annotations.
    let sbom = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom.v1",
        "config": {"mediaType": OCI_EMPTY, "digest": empty_d, "size": 2},
        "layers": [{"mediaType": "application/vnd.example.sbom.layer", "digest": layer_d, "size": layer.len()}],
        "subject": subject,
        "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z", "org.example.sbom.format": "json"},
    }))
    .expect("JSON");
    let sbom_d = alg.digest(&sbom);
    let r = s.push_manifest(&repo, &sbom_d, OCI_MANIFEST, &sbom).await;
    assert_eq!(
        opt_hdr(&r, "oci-subject").as_deref(),
        Some(md.as_str()),
        "OCI-Subject MUST be sent by a registry with the referrers API"
    );

    // 2. Without artifactType: the config media type stands in.
    let sig_cfg = b"{\"sig\":1}".to_vec();
    let sig_cfg_d = s.push_blob(&repo, alg, &sig_cfg).await;
    let sig = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.signature.config.v1+json", "digest": sig_cfg_d, "size": sig_cfg.len()},
        "layers": [{"mediaType": "application/vnd.example.sig", "digest": layer_d, "size": layer.len()}],
        "subject": subject,
        "annotations": {"org.example.signature.fingerprint": "abcd"},
    }))
    .expect("JSON");
    // Pushed by tag: the registry picks the digest (its canonical algorithm, which need not be
    // `alg`) and says which in Docker-Content-Digest; the referrers list uses that one.
    let r = s
        .push_manifest(&repo, "signature", OCI_MANIFEST, &sig)
        .await;
    assert_eq!(opt_hdr(&r, "oci-subject").as_deref(), Some(md.as_str()));
    let sig_d = hdr(&r, "docker-content-digest");
    let sig_alg = if sig_d.starts_with("sha512:") {
        Alg::Sha512
    } else {
        Alg::Sha256
    };
    assert_eq!(sig_d, sig_alg.digest(&sig));

    // 3. An index with a subject and no artifactType: artifactType omitted.
    let idx = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sbom_d, "size": sbom.len()}],
        "subject": subject,
        "annotations": {"org.example.kind": "index"},
    }))
    .expect("JSON");
    let idx_d = alg.digest(&idx);
    let r = s.push_manifest(&repo, &idx_d, OCI_INDEX, &idx).await;
    assert_eq!(opt_hdr(&r, "oci-subject").as_deref(), Some(md.as_str()));

    // 4. A referrer whose subject is not (yet) in the repository: MUST be accepted.
    let absent = alg.digest(b"a manifest pushed later");
    let early = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.early",
        "config": {"mediaType": OCI_EMPTY, "digest": empty_d, "size": 2},
        "layers": [{"mediaType": "application/vnd.example.sbom.layer", "digest": layer_d, "size": layer.len()}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": absent, "size": 123},
    }))
    .expect("JSON");
    let early_d = alg.digest(&early);
    s.push_manifest(&repo, &early_d, OCI_MANIFEST, &early).await;

    // The list.
    let r = expect_status(
        s.get(&format!("/v2/{repo}/referrers/{md}")).await,
        200,
        "referrers",
    )
    .await;
    assert_eq!(hdr(&r, "content-type"), OCI_INDEX);
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["mediaType"], OCI_INDEX);
    let list = v["manifests"].as_array().expect("manifests").clone();
    let find = |d: &str| -> Value {
        list.iter()
            .find(|e| e["digest"] == d)
            .cloned()
            .unwrap_or_else(|| panic!("{d} not in the referrers list {v}"))
    };
    assert_eq!(list.len(), 3, "{v}");
    let e = find(&sbom_d);
    assert_eq!(e["mediaType"], OCI_MANIFEST);
    assert_eq!(e["size"], sbom.len());
    assert_eq!(e["artifactType"], "application/vnd.example.sbom.v1");
    assert_eq!(e["annotations"]["org.example.sbom.format"], "json");
    let e = find(&sig_d);
    assert_eq!(
        e["artifactType"],
        "application/vnd.example.signature.config.v1+json"
    );
    assert_eq!(
        e["annotations"]["org.example.signature.fingerprint"],
        "abcd"
    );
    let e = find(&idx_d);
    assert_eq!(e["mediaType"], OCI_INDEX);
    assert!(
        e.get("artifactType").is_none(),
        "an index without artifactType: omitted: {e}"
    );
    assert_eq!(e["annotations"]["org.example.kind"], "index");

    // Filtering on artifactType (SHOULD): OCI-Filters-Applied when applied.
    let r = expect_status(
        s.get(&format!(
            "/v2/{repo}/referrers/{md}?artifactType=application/vnd.example.sbom.v1"
        ))
        .await,
        200,
        "filtered referrers",
    )
    .await;
    let applied = opt_hdr(&r, "oci-filters-applied");
    let v: Value = r.json().await.expect("JSON");
    let n = v["manifests"].as_array().expect("manifests").len();
    match applied.as_deref() {
        Some("artifactType") => {
            assert_eq!(n, 1, "{v}");
            assert_eq!(v["manifests"][0]["digest"], sbom_d.as_str());
        }
        None if !s.strict => {
            s.note("artifactType filtering is not applied (SHOULD)");
            assert_eq!(n, 3);
        }
        other => panic!("OCI-Filters-Applied {other:?}"),
    }

    // The referrer pushed before its subject is listed under the subject's digest.
    let r = expect_status(
        s.get(&format!("/v2/{repo}/referrers/{absent}")).await,
        200,
        "referrers of an absent subject",
    )
    .await;
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["manifests"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["manifests"][0]["digest"], early_d.as_str());

    // No referrers: 200 and an empty list, never 404.
    let none = alg.digest(b"nothing refers to this");
    let r = expect_status(
        s.get(&format!("/v2/{repo}/referrers/{none}")).await,
        200,
        "no referrers",
    )
    .await;
    assert_eq!(hdr(&r, "content-type"), OCI_INDEX);
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["manifests"], json!([]));

    // An invalid digest: 400.
    let r = s.get(&format!("/v2/{repo}/referrers/sha256:not-hex")).await;
    expect_error(&s, r, &[400], &[], "referrers of an invalid digest").await;

    // Deleting a referrer takes it out of the list.
    let r = s
        .send(
            "DELETE",
            &format!("/v2/{repo}/manifests/{sig_d}"),
            &[],
            Vec::new(),
        )
        .await;
    if r.status().as_u16() == 202 || s.strict {
        expect_status(r, 202, "DELETE a referrer").await;
        let r = expect_status(
            s.get(&format!("/v2/{repo}/referrers/{md}")).await,
            200,
            "referrers",
        )
        .await;
        let v: Value = r.json().await.expect("JSON");
        let left: Vec<&str> = v["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .filter_map(|e| e["digest"].as_str())
            .collect();
        assert_eq!(left.len(), 2, "{v}");
        assert!(!left.contains(&sig_d.as_str()));
    }
}

#[tokio::test]
async fn discovery_referrers_sha256() {
    discovery_referrers(Alg::Sha256).await;
}

#[tokio::test]
async fn discovery_referrers_sha512() {
    discovery_referrers(Alg::Sha512).await;
}

// ---------------------------------------------------------------------------------------------
// Content management

async fn management(alg: Alg) {
    let s = Suite::new(&format!("management-{alg:?}").to_lowercase());
    let repo = s.repo("managed");
    let (manifest, blobs) = s.image(&repo, alg).await;
    let md = alg.digest(&manifest);
    s.push_manifest(&repo, &md, OCI_MANIFEST, &manifest).await;
    // The tags point at `md` itself: pushed by tag, a registry files the manifest under its
    // canonical digest (sha256), which for sha512 would be another digest than `md`; so they
    // are set with `?tag=` on the PUT by digest (end-7b), or by tag where that is the same.
    if alg == Alg::Sha256 || !s.strict {
        s.push_manifest(&repo, "keep", OCI_MANIFEST, &manifest)
            .await;
        s.push_manifest(&repo, "drop", OCI_MANIFEST, &manifest)
            .await;
    } else {
        let r = s
            .push_manifest(
                &repo,
                &format!("{md}?tag=keep&tag=drop"),
                OCI_MANIFEST,
                &manifest,
            )
            .await;
        assert!(r.headers().get_all("oci-tag").iter().count() > 0, "OCI-Tag");
    }
    for t in ["keep", "drop"] {
        let r = expect_status(
            s.head(&format!("/v2/{repo}/manifests/{t}")).await,
            200,
            "HEAD a tag",
        )
        .await;
        if s.strict {
            assert_eq!(
                hdr(&r, "docker-content-digest"),
                md,
                "the tag {t} points at {md}"
            );
        }
    }

    // Deleting a tag: 202; the tag is gone, the manifest and other tags stay.
    let r = s
        .send(
            "DELETE",
            &format!("/v2/{repo}/manifests/drop"),
            &[],
            Vec::new(),
        )
        .await;
    match r.status().as_u16() {
        202 => {
            let r = s.get(&format!("/v2/{repo}/manifests/drop")).await;
            expect_error(&s, r, &[404], &["MANIFEST_UNKNOWN"], "GET a deleted tag").await;
            expect_status(
                s.get(&format!("/v2/{repo}/manifests/keep")).await,
                200,
                "the other tag",
            )
            .await;
            expect_status(
                s.get(&format!("/v2/{repo}/manifests/{md}")).await,
                200,
                "the manifest",
            )
            .await;
        }
        400 | 405 if !s.strict => s.note("tag deletion is disabled (400/405 allowed)"),
        other => panic!(
            "DELETE a tag: {other}: {}",
            r.text().await.unwrap_or_default()
        ),
    }

    // Deleting a manifest: 202; it and every tag on it are gone.
    let r = s
        .send(
            "DELETE",
            &format!("/v2/{repo}/manifests/{md}"),
            &[],
            Vec::new(),
        )
        .await;
    match r.status().as_u16() {
        202 => {
            let r = s.get(&format!("/v2/{repo}/manifests/{md}")).await;
            expect_error(
                &s,
                r,
                &[404],
                &["MANIFEST_UNKNOWN"],
                "GET a deleted manifest",
            )
            .await;
            let r = s.get(&format!("/v2/{repo}/manifests/keep")).await;
            expect_error(
                &s,
                r,
                &[404],
                &["MANIFEST_UNKNOWN"],
                "GET a tag of a deleted manifest",
            )
            .await;
            // Deleting it again: 404.
            let r = s
                .send(
                    "DELETE",
                    &format!("/v2/{repo}/manifests/{md}"),
                    &[],
                    Vec::new(),
                )
                .await;
            expect_error(
                &s,
                r,
                &[404],
                &["MANIFEST_UNKNOWN"],
                "DELETE a deleted manifest",
            )
            .await;
        }
        400 | 405 if !s.strict => s.note("manifest deletion is disabled (400/405 allowed)"),
        other => panic!(
            "DELETE a manifest: {other}: {}",
            r.text().await.unwrap_or_default()
        ),
    }

    // Deleting a blob: 202; then 404; deleting it again 404 BLOB_UNKNOWN.
    let (d, _) = &blobs[0];
    let r = s
        .send("DELETE", &format!("/v2/{repo}/blobs/{d}"), &[], Vec::new())
        .await;
    match r.status().as_u16() {
        202 => {
            let r = s.get(&format!("/v2/{repo}/blobs/{d}")).await;
            expect_error(&s, r, &[404], &["BLOB_UNKNOWN"], "GET a deleted blob").await;
            let r = s
                .send("DELETE", &format!("/v2/{repo}/blobs/{d}"), &[], Vec::new())
                .await;
            expect_error(&s, r, &[404], &["BLOB_UNKNOWN"], "DELETE a deleted blob").await;
            // The other blobs stay.
            expect_status(
                s.head(&format!("/v2/{repo}/blobs/{}", blobs[1].0)).await,
                200,
                "another blob",
            )
            .await;
        }
        400 | 405 if !s.strict => s.note("blob deletion is disabled (400/405 allowed)"),
        other => panic!(
            "DELETE a blob: {other}: {}",
            r.text().await.unwrap_or_default()
        ),
    }

    // In a repository that does not exist: 404.
    let nothing = s.repo("never");
    let r = s
        .send(
            "DELETE",
            &format!("/v2/{nothing}/manifests/{md}"),
            &[],
            Vec::new(),
        )
        .await;
    expect_error(
        &s,
        r,
        &[404],
        &["NAME_UNKNOWN", "MANIFEST_UNKNOWN"],
        "DELETE in a missing repository",
    )
    .await;
    let r = s
        .send(
            "DELETE",
            &format!("/v2/{nothing}/blobs/{d}"),
            &[],
            Vec::new(),
        )
        .await;
    expect_error(
        &s,
        r,
        &[404],
        &["NAME_UNKNOWN", "BLOB_UNKNOWN"],
        "DELETE a blob in a missing repository",
    )
    .await;
    // A tag that does not exist.
    let r = s
        .send(
            "DELETE",
            &format!("/v2/{repo}/manifests/no-such-tag"),
            &[],
            Vec::new(),
        )
        .await;
    expect_error(&s, r, &[404], &["MANIFEST_UNKNOWN"], "DELETE a missing tag").await;
}

#[tokio::test]
async fn management_sha256() {
    management(Alg::Sha256).await;
}

#[tokio::test]
async fn management_sha512() {
    management(Alg::Sha512).await;
}

/// Deletion switched off (dockside only: `--no-delete`, `--no-tag-delete`): 405 / 400 with
/// UNSUPPORTED, as the spec allows.
#[tokio::test]
async fn management_disabled() {
    if std::env::var("DOCKSIDE_INTEROP_REGISTRY").is_ok_and(|u| !u.is_empty()) {
        eprintln!("management_disabled: dockside only, skipped for an external registry");
        return;
    }
    for (flag, tag_status, manifest_status) in [
        ("--no-delete", 405u16, 405u16),
        ("--no-tag-delete", 400, 202),
    ] {
        let server = Registry::start_with(&[flag]);
        let mut s = Suite::new("disabled");
        s.base = server.base_url();
        let repo = s.repo("app");
        let (manifest, blobs) = s.image(&repo, Alg::Sha256).await;
        let md = Alg::Sha256.digest(&manifest);
        s.push_manifest(&repo, "v1", OCI_MANIFEST, &manifest).await;
        let r = s
            .send(
                "DELETE",
                &format!("/v2/{repo}/manifests/v1"),
                &[],
                Vec::new(),
            )
            .await;
        expect_error(&s, r, &[tag_status], &["UNSUPPORTED"], flag).await;
        let r = s
            .send(
                "DELETE",
                &format!("/v2/{repo}/manifests/{md}"),
                &[],
                Vec::new(),
            )
            .await;
        if manifest_status == 202 {
            expect_status(r, 202, flag).await;
        } else {
            expect_error(&s, r, &[manifest_status], &["UNSUPPORTED"], flag).await;
            let r = s
                .send(
                    "DELETE",
                    &format!("/v2/{repo}/blobs/{}", blobs[0].0),
                    &[],
                    Vec::new(),
                )
                .await;
            expect_error(&s, r, &[405], &["UNSUPPORTED"], flag).await;
        }
        drop(server);
    }
}

// ---------------------------------------------------------------------------------------------
// The catalog (not in the spec; the Docker registry API extension dockside implements)

#[tokio::test]
async fn catalog_pagination() {
    let s = Suite::new("catalog");
    let repos: Vec<String> = ["c", "a", "e", "b", "d"]
        .iter()
        .map(|r| s.repo(r))
        .collect();
    for r in &repos {
        s.push_blob(r, Alg::Sha256, b"catalog entry").await;
    }
    let probe = s.get("/v2/_catalog?n=2").await;
    if probe.status().as_u16() != 200 && !s.strict {
        s.note(&format!("no catalog: {}", probe.status()));
        return;
    }
    let mut page = expect_status(probe, 200, "GET /v2/_catalog?n=2").await;
    let mut seen: Vec<String> = Vec::new();
    loop {
        let link = next_link(&page);
        let v: Value = page.json().await.expect("JSON");
        let names: Vec<String> = v["repositories"]
            .as_array()
            .expect("repositories")
            .iter()
            .map(|r| r.as_str().expect("a string").to_owned())
            .collect();
        assert!(names.len() <= 2, "n=2 gave {names:?}");
        seen.extend(names);
        match link {
            Some(l) => page = expect_status(s.get(&l).await, 200, "the next catalog page").await,
            None => break,
        }
        assert!(seen.len() < 10_000, "the catalog does not end");
    }
    let mine: Vec<String> = seen
        .iter()
        .filter(|r| r.starts_with(&s.ns))
        .cloned()
        .collect();
    let mut want = repos.clone();
    want.sort();
    assert_eq!(mine, want, "my repositories, sorted, each once");
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "the catalog is sorted");
}

// ---------------------------------------------------------------------------------------------
// Early error responses

/// An error answered before the request body is read (a manifest over the size limit: 413; a
/// chunk out of order: 416) must still reach the client. RFC 9112, section 9.6: a server that
/// closes a connection with unread request data in flight risks a TCP reset that destroys the
/// response before the client reads it, so it SHOULD close in stages (stop writing, keep
/// reading for a while). A client sending a large body without `Expect: 100-continue` (as
/// reqwest, Go's net/http and Python's requests do) then sees a connection error instead of
/// the 413 or 416. Repeated, because it is a race.
#[tokio::test]
async fn early_error_responses_reach_the_client() {
    let s = Suite::new("early-errors");
    let repo = s.repo("app");
    let mut failures = Vec::new();
    let tries = 20;
    if s.strict {
        // dockside's default --max-manifest-bytes is 4 MiB.
        let huge = vec![b' '; 4 * 1024 * 1024 + 1];
        for i in 0..tries {
            match s
                .try_send(
                    "PUT",
                    &format!("/v2/{repo}/manifests/huge"),
                    &[("content-type", OCI_MANIFEST)],
                    huge.clone(),
                )
                .await
            {
                Ok(r) if r.status().as_u16() == 413 => {}
                Ok(r) => failures.push(format!("manifest over the limit, try {i}: {}", r.status())),
                Err(e) => failures.push(format!(
                    "manifest over the limit, try {i}: no response: {e}"
                )),
            }
        }
    }
    let chunk = s.bytes(8_000_000);
    let range = format!("10-{}", chunk.len() + 9);
    for i in 0..tries {
        let loc = s.open_upload(&repo, Alg::Sha256).await;
        match s
            .try_send(
                "PATCH",
                &loc,
                &[("content-type", OCTET), ("content-range", &range)],
                chunk.clone(),
            )
            .await
        {
            Ok(r) if r.status().as_u16() == 416 => {}
            Ok(r) => failures.push(format!("8 MB chunk out of order, try {i}: {}", r.status())),
            Err(e) => failures.push(format!(
                "8 MB chunk out of order, try {i}: no response: {e}"
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of the early error responses did not reach the client:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
