//! Every endpoint through `Registry::handle`, success and failure paths, on every host (memory,
//! local directory, blobs chunked into a key-value store, the same with listing indexes, and,
//! with feature `backends`, keys in Valkey/Redis and blobs in S3, servers started for the test
//! process). The harness builds a new `Registry` for every request over the same
//! stores, so every test here also proves that no state survives in the registry value.

use bytes::Bytes;
use dockside::hosts::indexed::IndexedKv;
use dockside::{
    BlobStore, Config, DirRegistry, FsBlobs, FsKv, KeyValue, KvBlobs, MemoryBlobs, MemoryKv,
    Registry, StoreError,
};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256, Sha512};

#[cfg(feature = "backends")]
#[path = "common/redis_server.rs"]
mod redis_server;

enum Stores {
    Memory(MemoryKv, MemoryBlobs),
    Dir(tempfile::TempDir),
    /// Blobs chunked into a key-value store (as on Spin), with tiny chunks so that blobs span
    /// many chunks and uploads many segments.
    KvOnly(MemoryKv),
    /// The same with listing indexes over the keys (as the Spin component runs).
    KvIndexed(MemoryKv),
    /// Blobs in a real S3 server (Garage) under a prefix of their own.
    #[cfg(feature = "backends")]
    S3(
        MemoryKv,
        Box<dockside::S3Blobs<HyperClient>>,
        Box<dockside::S3Config>,
    ),
    /// Keys in Redis (a namespace of its own on the shared test server), blobs in memory.
    #[cfg(feature = "backends")]
    Redis(dockside::RedisKv, MemoryBlobs),
}

#[cfg(feature = "backends")]
#[path = "backends/garage.rs"]
mod garage;
#[cfg(feature = "backends")]
use dockside::adapters::hyper_client::HyperClient;

/// Chunk size of the `KvOnly` host.
const KV_CHUNK: usize = 1000;

struct H {
    stores: Stores,
    config: Config,
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The spec's error code of an error response (checking the envelope's shape).
    fn code(&self) -> String {
        let j = self.json();
        let errors = j["errors"].as_array().expect("an errors array");
        assert_eq!(errors.len(), 1, "{j}");
        assert!(errors[0]["message"].is_string(), "{j}");
        errors[0]["code"].as_str().expect("a code").to_owned()
    }

    #[track_caller]
    fn expect(&self, status: u16) -> &Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        self
    }

    #[track_caller]
    fn expect_error(&self, status: u16, code: &str) {
        self.expect(status);
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert_eq!(self.code(), code);
    }
}

impl H {
    fn memory() -> Self {
        Self::memory_with(Config::default())
    }

    fn memory_with(config: Config) -> Self {
        H {
            stores: Stores::Memory(MemoryKv::new(), MemoryBlobs::new()),
            config,
        }
    }

    fn dir() -> Self {
        H {
            stores: Stores::Dir(tempfile::tempdir().unwrap()),
            config: Config::default(),
        }
    }

    fn kv_only() -> Self {
        H {
            stores: Stores::KvOnly(MemoryKv::new()),
            config: Config::default(),
        }
    }

    fn kv_indexed() -> Self {
        H {
            stores: Stores::KvIndexed(MemoryKv::new()),
            config: Config::default(),
        }
    }

    /// Blobs in Garage (one per test process), under a prefix of this test's own.
    #[cfg(feature = "backends")]
    fn s3() -> Self {
        let g = garage::garage();
        let config = dockside::S3Config::from_url(&g.url(&garage::unique_prefix()), g.env())
            .expect("S3 URL");
        let blobs = dockside::S3Blobs::new(&config, HyperClient::new().unwrap()).unwrap();
        H {
            stores: Stores::S3(MemoryKv::new(), Box::new(blobs), Box::new(config)),
            config: Config::default(),
        }
    }

    /// A fresh namespace on the test process's Redis server. Must run on a tokio runtime, which
    /// carries the store's commands from then on.
    #[cfg(feature = "backends")]
    async fn redis() -> Self {
        let server = redis_server::RedisServer::shared();
        let kv = dockside::RedisKv::connect(&server.url, &redis_server::fresh_prefix())
            .await
            .unwrap();
        H {
            stores: Stores::Redis(kv, MemoryBlobs::new()),
            config: Config::default(),
        }
    }

    /// One request, on a registry value built for this request alone.
    async fn send(&self, method: Method, uri: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
        match &self.stores {
            Stores::Memory(kv, blobs) => {
                let r = Registry::new(kv.clone(), blobs.clone(), self.config.clone());
                collect(r.handle(req).await).await
            }
            Stores::Dir(dir) => {
                let r = DirRegistry::open_dir(dir.path(), self.config.clone()).unwrap();
                collect(r.handle(req).await).await
            }
            Stores::KvOnly(kv) => {
                let blobs = KvBlobs::with_chunk_size(kv.clone(), KV_CHUNK);
                let r = Registry::new(kv.clone(), blobs, self.config.clone());
                collect(r.handle(req).await).await
            }
            Stores::KvIndexed(kv) => {
                let blobs = KvBlobs::with_chunk_size(kv.clone(), KV_CHUNK);
                let r = Registry::new(IndexedKv(kv.clone()), blobs, self.config.clone());
                collect(r.handle(req).await).await
            }
            #[cfg(feature = "backends")]
            Stores::S3(kv, blobs, _) => {
                let r = Registry::new(kv.clone(), (**blobs).clone(), self.config.clone());
                collect(r.handle(req).await).await
            }
            #[cfg(feature = "backends")]
            Stores::Redis(kv, blobs) => {
                let r = Registry::new(kv.clone(), blobs.clone(), self.config.clone());
                collect(r.handle(req).await).await
            }
        }
    }

    async fn get(&self, uri: &str) -> Resp {
        self.send(Method::GET, uri, &[], b"").await
    }

    async fn head(&self, uri: &str) -> Resp {
        self.send(Method::HEAD, uri, &[], b"").await
    }

    async fn delete(&self, uri: &str) -> Resp {
        self.send(Method::DELETE, uri, &[], b"").await
    }

    async fn post(&self, uri: &str, body: &[u8]) -> Resp {
        self.send(Method::POST, uri, &[], body).await
    }

    /// Pushes a blob in one POST and checks the answer.
    async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let d = sha256(data);
        self.post(&format!("/v2/{repo}/blobs/uploads/?digest={d}"), data)
            .await
            .expect(201);
        d
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Resp {
        self.send(
            Method::PUT,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("content-type", media_type)],
            body,
        )
        .await
    }

    /// Starts an upload session and returns its location.
    async fn start(&self, repo: &str, query: &str) -> String {
        let r = self
            .post(&format!("/v2/{repo}/blobs/uploads/{query}"), b"")
            .await;
        r.expect(202);
        assert_eq!(r.header("range"), Some("0-0"));
        assert!(r.header("docker-upload-uuid").is_some());
        r.header("location").unwrap().to_owned()
    }

    /// The blob store's paths (to check that nothing was left behind).
    async fn blob_paths(&self) -> Vec<String> {
        match &self.stores {
            Stores::Memory(_, b) => b.paths(),
            #[cfg(feature = "backends")]
            Stores::Redis(_, b) => b.paths(),
            Stores::Dir(d) => {
                let mut out = Vec::new();
                // blobs/<alg>/<xx>/<hex>, uploads/<uuid>/<part>
                walk(&d.path().join("blobs"), "blobs", 3, &mut out);
                walk(&d.path().join("uploads"), "uploads", 2, &mut out);
                out.sort();
                out
            }
            Stores::KvOnly(kv) | Stores::KvIndexed(kv) => kv
                .keys()
                .into_iter()
                .filter_map(|k| k.strip_prefix("kvblob/obj/").map(str::to_owned))
                .collect(),
            #[cfg(feature = "backends")]
            Stores::S3(_, _, config) => garage::list_objects(config).await,
        }
    }

    /// Chunk values in the key-value store (the `KvOnly` host), to check none are leaked.
    fn chunk_count(&self) -> usize {
        match &self.stores {
            Stores::KvOnly(kv) | Stores::KvIndexed(kv) => kv
                .keys()
                .iter()
                .filter(|k| k.starts_with("kvblob/chunk/"))
                .count(),
            _ => 0,
        }
    }
}

/// The objects under `dir`, `depth` levels down (a segmented object is a directory of
/// segments: it counts as one object).
fn walk(dir: &std::path::Path, base: &str, depth: usize, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd {
        let e = e.unwrap();
        let name = format!("{base}/{}", e.file_name().to_str().unwrap());
        if depth > 1 && e.file_type().unwrap().is_dir() {
            walk(&e.path(), &name, depth - 1, out);
        } else {
            out.push(name);
        }
    }
}

async fn collect<B>(resp: http::Response<B>) -> Resp
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    assert_eq!(
        parts
            .headers
            .get("docker-distribution-api-version")
            .unwrap(),
        "registry/2.0"
    );
    if let Some(len) = parts.headers.get("content-length") {
        let len: usize = len.to_str().unwrap().parse().unwrap();
        assert!(
            body.is_empty() || body.len() == len,
            "Content-Length {len} for {} bytes",
            body.len()
        );
    }
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn sha512(data: &[u8]) -> String {
    format!("sha512:{}", hex(&Sha512::digest(data)))
}

/// Deterministic test bytes.
fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

fn descriptor(media_type: &str, data: &[u8]) -> Value {
    json!({ "mediaType": media_type, "digest": sha256(data), "size": data.len() })
}

/// Pushes a config and two layers and returns an image manifest (as bytes) that uses them.
async fn image(h: &H, repo: &str, seed: u8) -> Vec<u8> {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
    let l1 = bytes(1000, seed);
    let l2 = bytes(3000, seed.wrapping_add(1));
    for b in [&config, &l1, &l2] {
        h.push_blob(repo, b).await;
    }
    serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [
            descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &l1),
            descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &l2),
        ],
    }))
    .unwrap()
}

macro_rules! on_every_host {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[cfg(feature = "backends")]
            #[tokio::test]
            async fn s3() {
                super::$name(super::H::s3()).await
            }
            #[tokio::test]
            async fn memory() {
                super::$name(super::H::memory()).await
            }
            #[tokio::test]
            async fn dir() {
                super::$name(super::H::dir()).await
            }
            #[tokio::test]
            async fn kv_only() {
                super::$name(super::H::kv_only()).await
            }
            #[tokio::test]
            async fn kv_indexed() {
                super::$name(super::H::kv_indexed()).await
            }
            #[cfg(feature = "backends")]
            #[tokio::test]
            async fn redis() {
                super::$name(super::H::redis().await).await
            }
        }
    )*};
}

on_every_host!(
    base_and_routing,
    monolithic_push_and_pull,
    post_then_put,
    chunked_upload,
    streamed_patch,
    digest_mismatch_stores_nothing,
    sha512_uploads,
    upload_sessions,
    mount_and_repository_scoping,
    manifests_push_and_pull,
    manifest_validation,
    index_and_docker_types,
    tags_list,
    catalog,
    referrers,
    deletes,
    upload_admission,
);

async fn base_and_routing(h: H) {
    let r = h.get("/v2/").await;
    r.expect(200);
    assert_eq!(r.json(), json!({}));
    h.get("/v2").await.expect(200);
    h.head("/v2/").await.expect(200);
    h.post("/v2/", b"").await.expect_error(405, "UNSUPPORTED");
    h.get("/v3/").await.expect_error(404, "UNSUPPORTED");
    h.get("/v2/a/unknown/thing")
        .await
        .expect_error(404, "UNSUPPORTED");
    h.send(Method::PATCH, "/v2/a/manifests/latest", &[], b"")
        .await
        .expect_error(405, "UNSUPPORTED");
    for bad in [
        "/v2/UPPER/tags/list",
        "/v2/a//b/tags/list",
        "/v2/_x/tags/list",
        "/v2/a/../b/tags/list",
    ] {
        h.get(bad).await.expect_error(400, "NAME_INVALID");
    }
    let long = format!("/v2/{}/tags/list", "a".repeat(256));
    h.get(&long).await.expect_error(400, "NAME_INVALID");
    // The longest name there is: 255 characters, in components of at most 200.
    let longest = format!("{}/{}", "a".repeat(200), "b".repeat(54));
    h.push_blob(&longest, b"x").await;
    h.get(&format!("/v2/{longest}/tags/list")).await.expect(200);
    h.get(&format!("/v2/{}/tags/list", "c".repeat(201)))
        .await
        .expect_error(400, "NAME_INVALID");
    // A HEAD error carries the status but no body.
    let r = h.head("/v2/a/manifests/nope").await;
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
}

async fn monolithic_push_and_pull(h: H) {
    let data = bytes(200_000, 7);
    let d = h.push_blob("lib/app", &data).await;

    let r = h.get(&format!("/v2/lib/app/blobs/{d}")).await;
    r.expect(200);
    assert_eq!(r.body, data);
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    assert_eq!(r.header("content-length"), Some("200000"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));

    let r = h.head(&format!("/v2/lib/app/blobs/{d}")).await;
    r.expect(200);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), Some("200000"));
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));

    // Ranges: first bytes, a middle slice, a suffix; beyond the end is 416.
    for (range, from, to) in [
        ("bytes=0-9", 0, 10),
        ("bytes=1000-99999", 1000, 100_000),
        ("bytes=-5", 199_995, 200_000),
        ("bytes=199990-", 199_990, 200_000),
    ] {
        let r = h
            .send(
                Method::GET,
                &format!("/v2/lib/app/blobs/{d}"),
                &[("range", range)],
                b"",
            )
            .await;
        r.expect(206);
        assert_eq!(r.body, &data[from..to], "{range}");
        assert_eq!(
            r.header("content-range").unwrap(),
            format!("bytes {from}-{}/200000", to - 1)
        );
        assert_eq!(r.header("content-length").unwrap(), (to - from).to_string());
    }
    let r = h
        .send(
            Method::GET,
            &format!("/v2/lib/app/blobs/{d}"),
            &[("range", "bytes=200000-")],
            b"",
        )
        .await;
    r.expect_error(416, "SIZE_INVALID");
    assert_eq!(r.header("content-range"), Some("bytes */200000"));
    // A range we do not serve (several ranges) is ignored: the whole blob.
    let r = h
        .send(
            Method::GET,
            &format!("/v2/lib/app/blobs/{d}"),
            &[("range", "bytes=0-1,5-6")],
            b"",
        )
        .await;
    r.expect(200);
    assert_eq!(r.body.len(), 200_000);

    let unknown = sha256(b"not pushed");
    h.get(&format!("/v2/lib/app/blobs/{unknown}"))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    h.head(&format!("/v2/lib/app/blobs/{unknown}"))
        .await
        .expect(404);
    for bad in [
        "sha256:abc",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "nodigest",
        "sha256:..%2F..%2Fetc",
    ] {
        h.get(&format!("/v2/lib/app/blobs/{bad}"))
            .await
            .expect_error(400, "DIGEST_INVALID");
    }
    // A percent-encoded colon is still the digest.
    h.get(&format!("/v2/lib/app/blobs/{}", d.replace(':', "%3A")))
        .await
        .expect(200);

    // The empty blob.
    let empty = h.push_blob("lib/app", b"").await;
    let r = h.get(&format!("/v2/lib/app/blobs/{empty}")).await;
    r.expect(200);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), Some("0"));

    // Content-Length that disagrees with the body.
    let r = h
        .send(
            Method::POST,
            &format!("/v2/lib/app/blobs/uploads/?digest={}", sha256(b"abc")),
            &[("content-length", "5")],
            b"abc",
        )
        .await;
    r.expect_error(400, "SIZE_INVALID");
}

async fn post_then_put(h: H) {
    let data = bytes(5000, 1);
    let d = sha256(&data);
    let loc = h.start("r", "").await;
    assert!(loc.starts_with("/v2/r/blobs/uploads/"));
    let r = h
        .send(
            Method::PUT,
            &format!("{loc}?digest={d}"),
            &[("content-type", "application/octet-stream")],
            &data,
        )
        .await;
    r.expect(201);
    assert_eq!(r.header("location").unwrap(), format!("/v2/r/blobs/{d}"));
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    assert_eq!(h.get(&format!("/v2/r/blobs/{d}")).await.body, data);
    // The session is closed.
    h.get(&loc).await.expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    // No digest on the closing PUT.
    let loc = h.start("r", "").await;
    h.send(Method::PUT, &loc, &[], &data)
        .await
        .expect_error(400, "DIGEST_INVALID");
    h.send(
        Method::PUT,
        &format!("{loc}?digest=sha256:1234"),
        &[],
        &data,
    )
    .await
    .expect_error(400, "DIGEST_INVALID");
}

async fn chunked_upload(h: H) {
    let data = bytes(30_000, 3);
    let d = sha256(&data);
    let loc = h.start("chunky", "").await;

    let r = h
        .send(
            Method::PATCH,
            &loc,
            &[("content-range", "0-9999"), ("content-length", "10000")],
            &data[..10_000],
        )
        .await;
    r.expect(202);
    assert_eq!(r.header("range"), Some("0-9999"));
    let loc2 = r.header("location").unwrap().to_owned();

    // Out of order: a gap, and a repeat of the first chunk.
    for range in ["10001-19999", "0-9999"] {
        let r = h
            .send(
                Method::PATCH,
                &loc2,
                &[("content-range", range)],
                &data[..9999],
            )
            .await;
        r.expect_error(416, "BLOB_UPLOAD_INVALID");
        assert_eq!(r.header("range"), Some("0-9999"));
        assert_eq!(r.header("location"), Some(loc2.as_str()));
    }
    // A Content-Range ending at u64::MAX: its length does not fit (it used to wrap to 0 and be
    // accepted as an empty chunk; a debug build panicked).
    for range in ["10000-18446744073709551615", "0-18446744073709551615"] {
        let r = h
            .send(
                Method::PATCH,
                &loc2,
                &[("content-range", range), ("content-length", "0")],
                b"",
            )
            .await;
        assert!(r.status == 400 || r.status == 416, "{range}: {}", r.status);
        assert_eq!(h.get(&loc2).await.header("range"), Some("0-9999"));
    }
    // A Content-Range that disagrees with Content-Length.
    h.send(
        Method::PATCH,
        &loc2,
        &[("content-range", "10000-10009"), ("content-length", "5")],
        b"12345",
    )
    .await
    .expect_error(400, "SIZE_INVALID");
    // A Content-Range that disagrees with the body.
    h.send(
        Method::PATCH,
        &loc2,
        &[("content-range", "10000-10009")],
        b"12345",
    )
    .await
    .expect_error(400, "SIZE_INVALID");
    h.send(
        Method::PATCH,
        &loc2,
        &[("content-range", "garbage")],
        b"12345",
    )
    .await
    .expect_error(400, "BLOB_UPLOAD_INVALID");

    // Status.
    let r = h.get(&loc2).await;
    r.expect(204);
    assert_eq!(r.header("range"), Some("0-9999"));
    assert_eq!(r.header("location"), Some(loc2.as_str()));

    let r = h
        .send(
            Method::PATCH,
            &loc2,
            &[("content-range", "10000-19999")],
            &data[10_000..20_000],
        )
        .await;
    r.expect(202);
    assert_eq!(r.header("range"), Some("0-19999"));

    // The last chunk rides on the closing PUT, with its range.
    let r = h
        .send(
            Method::PUT,
            &format!("{loc2}?digest={d}"),
            &[("content-range", "20000-29999")],
            &data[20_000..],
        )
        .await;
    r.expect(201);
    assert_eq!(h.get(&format!("/v2/chunky/blobs/{d}")).await.body, data);
    // Ranges across the chunk boundaries (segments of a stitched blob on the directory host).
    for (from, to) in [(9990, 10010), (5000, 25000), (19_999, 20_000), (0, 30_000)] {
        let range = format!("bytes={from}-{}", to - 1);
        let r = h
            .send(
                Method::GET,
                &format!("/v2/chunky/blobs/{d}"),
                &[("range", &range)],
                b"",
            )
            .await;
        r.expect(206);
        assert_eq!(r.body, &data[from..to], "{range}");
    }
    // Every part was consumed: only the blob itself remains.
    assert_eq!(h.blob_paths().await.len(), 1, "{:?}", h.blob_paths().await);
    if matches!(h.stores, Stores::KvOnly(_)) {
        assert_eq!(h.chunk_count(), 30_000 / KV_CHUNK);
    }
}

async fn streamed_patch(h: H) {
    let data = bytes(70_000, 9);
    let d = sha256(&data);
    let loc = h.start("s", "").await;
    // Streamed PATCHes carry no Content-Range; each appends.
    let r = h.send(Method::PATCH, &loc, &[], &data[..50_000]).await;
    r.expect(202);
    assert_eq!(r.header("range"), Some("0-49999"));
    let r = h.send(Method::PATCH, &loc, &[], &data[50_000..]).await;
    assert_eq!(r.header("range"), Some("0-69999"));
    // An empty PATCH changes nothing.
    let r = h
        .send(Method::PATCH, &loc, &[("content-length", "0")], b"")
        .await;
    assert_eq!(r.header("range"), Some("0-69999"));
    h.send(
        Method::PUT,
        &format!("{loc}?digest={d}"),
        &[("content-length", "0")],
        b"",
    )
    .await
    .expect(201);
    assert_eq!(h.get(&format!("/v2/s/blobs/{d}")).await.body, data);
}

async fn digest_mismatch_stores_nothing(h: H) {
    let data = bytes(4000, 2);
    let wrong = sha256(b"something else");
    // Single POST.
    let r = h
        .post(&format!("/v2/m/blobs/uploads/?digest={wrong}"), &data)
        .await;
    r.expect_error(400, "DIGEST_INVALID");
    assert_eq!(r.json()["errors"][0]["detail"]["computed"], sha256(&data));
    // Chunked, then a closing PUT with the wrong digest.
    let loc = h.start("m", "").await;
    h.send(Method::PATCH, &loc, &[], &data).await.expect(202);
    h.send(Method::PUT, &format!("{loc}?digest={wrong}"), &[], b"")
        .await
        .expect_error(400, "DIGEST_INVALID");
    // Nothing is pullable, nothing is left in the blob store, the session is gone.
    h.get(&format!("/v2/m/blobs/{wrong}"))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    h.get(&format!("/v2/m/blobs/{}", sha256(&data)))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    assert!(
        h.blob_paths().await.is_empty(),
        "{:?}",
        h.blob_paths().await
    );
    assert_eq!(h.chunk_count(), 0);
    h.get(&loc).await.expect_error(404, "BLOB_UPLOAD_UNKNOWN");
}

async fn sha512_uploads(h: H) {
    let data = bytes(9000, 5);
    let d = sha512(&data);
    // Declared up front, chunked.
    let loc = h.start("x", "?digest-algorithm=sha512").await;
    h.send(
        Method::PATCH,
        &loc,
        &[("content-range", "0-3999")],
        &data[..4000],
    )
    .await
    .expect(202);
    h.send(
        Method::PUT,
        &format!("{loc}?digest={d}"),
        &[],
        &data[4000..],
    )
    .await
    .expect(201);
    let r = h.get(&format!("/v2/x/blobs/{d}")).await;
    r.expect(200);
    assert_eq!(r.body, data);
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));

    // Single POST.
    let data2 = bytes(100, 6);
    let d2 = sha512(&data2);
    h.post(&format!("/v2/x/blobs/uploads/?digest={d2}"), &data2)
        .await
        .expect(201);
    assert_eq!(h.get(&format!("/v2/x/blobs/{d2}")).await.body, data2);

    // Not declared, all data on the PUT.
    let data3 = bytes(300, 8);
    let d3 = sha512(&data3);
    let loc = h.start("x", "").await;
    h.send(Method::PUT, &format!("{loc}?digest={d3}"), &[], &data3)
        .await
        .expect(201);
    assert_eq!(h.get(&format!("/v2/x/blobs/{d3}")).await.body, data3);

    // Not declared, chunks already hashed as sha256: still verified, by reading the parts back.
    let data4 = bytes(5000, 11);
    let d4 = sha512(&data4);
    let loc = h.start("x", "").await;
    h.send(Method::PATCH, &loc, &[], &data4[..2000])
        .await
        .expect(202);
    h.send(
        Method::PUT,
        &format!("{loc}?digest={d4}"),
        &[],
        &data4[2000..],
    )
    .await
    .expect(201);
    assert_eq!(h.get(&format!("/v2/x/blobs/{d4}")).await.body, data4);

    h.post("/v2/x/blobs/uploads/?digest-algorithm=md5", b"")
        .await
        .expect_error(400, "DIGEST_INVALID");
}

async fn upload_sessions(h: H) {
    let loc = h.start("u", "").await;
    h.send(Method::PATCH, &loc, &[], b"partial")
        .await
        .expect(202);
    // Another repository cannot see (or finish) this session.
    let other = loc.replace("/v2/u/", "/v2/v/");
    h.get(&other).await.expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    h.send(Method::PATCH, &other, &[], b"x")
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    h.send(
        Method::PUT,
        &format!("{other}?digest={}", sha256(b"partialx")),
        &[],
        b"x",
    )
    .await
    .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    // Ids that are not ours.
    for bad in [
        "nope",
        "..%2F..%2Fx",
        "00000000-0000-4000-8000-000000000000",
    ] {
        h.get(&format!("/v2/u/blobs/uploads/{bad}"))
            .await
            .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    }
    // Cancel frees the parts.
    h.delete(&loc).await.expect(204);
    h.get(&loc).await.expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    h.delete(&loc)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    assert!(
        h.blob_paths().await.is_empty(),
        "{:?}",
        h.blob_paths().await
    );
}

async fn mount_and_repository_scoping(h: H) {
    let data = bytes(1234, 4);
    let d = h.push_blob("src", &data).await;
    // The content exists, but "dst" has no link: it cannot read it.
    h.get(&format!("/v2/dst/blobs/{d}"))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    // Mount from a repository that lacks it: an ordinary session.
    let r = h
        .post(
            &format!("/v2/dst/blobs/uploads/?mount={d}&from=elsewhere"),
            b"",
        )
        .await;
    r.expect(202);
    assert!(
        r.header("location")
            .unwrap()
            .starts_with("/v2/dst/blobs/uploads/")
    );
    // Without from: no guessing by digest.
    h.post(&format!("/v2/dst/blobs/uploads/?mount={d}"), b"")
        .await
        .expect(202);
    h.get(&format!("/v2/dst/blobs/{d}")).await.expect(404);
    // From the repository that has it.
    let r = h
        .post(&format!("/v2/dst/blobs/uploads/?mount={d}&from=src"), b"")
        .await;
    r.expect(201);
    assert_eq!(r.header("location").unwrap(), format!("/v2/dst/blobs/{d}"));
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    assert_eq!(h.get(&format!("/v2/dst/blobs/{d}")).await.body, data);
    h.post("/v2/dst/blobs/uploads/?mount=sha256:zz&from=src", b"")
        .await
        .expect_error(400, "DIGEST_INVALID");
    h.post(&format!("/v2/dst/blobs/uploads/?mount={d}&from=BAD"), b"")
        .await
        .expect_error(400, "NAME_INVALID");
    // The content is stored once.
    assert_eq!(h.blob_paths().await.len(), 1);
}

async fn manifests_push_and_pull(h: H) {
    let m = image(&h, "app", 1).await;
    let d = sha256(&m);
    let r = h.put_manifest("app", "v1", OCI_MANIFEST, &m).await;
    r.expect(201);
    assert_eq!(
        r.header("location").unwrap(),
        format!("/v2/app/manifests/{d}")
    );
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    assert!(r.header("oci-subject").is_none());

    for reference in ["v1", d.as_str()] {
        let r = h.get(&format!("/v2/app/manifests/{reference}")).await;
        r.expect(200);
        assert_eq!(r.body, m, "exact bytes");
        assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
        let r = h.head(&format!("/v2/app/manifests/{reference}")).await;
        r.expect(200);
        assert!(r.body.is_empty());
        assert_eq!(r.header("content-length").unwrap(), m.len().to_string());
        assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    }
    // Content-Type parameters are ignored.
    let m2 = image(&h, "app", 2).await;
    h.put_manifest("app", "v2", &format!("{OCI_MANIFEST}; charset=utf-8"), &m2)
        .await
        .expect(201);

    // By digest, with tags (end-7b).
    let m3 = image(&h, "app", 3).await;
    let d3 = sha256(&m3);
    let r = h
        .put_manifest("app", &format!("{d3}?tag=a&tag=b&tag=c"), OCI_MANIFEST, &m3)
        .await;
    r.expect(201);
    let tags: Vec<&str> = r
        .headers
        .get_all("oci-tag")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(tags, ["a", "b", "c"]);
    for t in ["a", "b", "c"] {
        assert_eq!(h.get(&format!("/v2/app/manifests/{t}")).await.body, m3);
    }
    // By digest with the wrong digest.
    h.put_manifest("app", &sha256(b"other"), OCI_MANIFEST, &m3)
        .await
        .expect_error(400, "DIGEST_INVALID");
    h.put_manifest("app", "v1?tag=-bad", OCI_MANIFEST, &m3)
        .await
        .expect_error(400, "TAG_INVALID");
    // A tag moves.
    h.put_manifest("app", "v1", OCI_MANIFEST, &m3)
        .await
        .expect(201);
    assert_eq!(h.get("/v2/app/manifests/v1").await.body, m3);
    // The older manifest is still there by digest.
    assert_eq!(h.get(&format!("/v2/app/manifests/{d}")).await.body, m);

    // Unknown.
    h.get("/v2/app/manifests/nope")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    h.get(&format!("/v2/app/manifests/{}", sha256(b"x")))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    h.get("/v2/never/pushed/manifests/latest")
        .await
        .expect_error(404, "NAME_UNKNOWN");
    // Neither a valid tag nor a valid digest: no such manifest (404, as the spec's conformance
    // suite asks of GET and HEAD), but still a client error when pushed to.
    for bad in ["-bad", ".INVALID_MANIFEST_NAME", "sha256:abc", "a:b"] {
        h.get(&format!("/v2/app/manifests/{bad}"))
            .await
            .expect_error(404, "MANIFEST_UNKNOWN");
        h.head(&format!("/v2/app/manifests/{bad}"))
            .await
            .expect(404);
    }
    h.get("/v2/never/pushed/manifests/.INVALID_MANIFEST_NAME")
        .await
        .expect_error(404, "NAME_UNKNOWN");
    h.put_manifest("app", ".INVALID_MANIFEST_NAME", OCI_MANIFEST, &m3)
        .await
        .expect_error(400, "TAG_INVALID");
    h.put_manifest("app", "sha256:abc", OCI_MANIFEST, &m3)
        .await
        .expect_error(400, "DIGEST_INVALID");
}

async fn manifest_validation(h: H) {
    let m = image(&h, "val", 1).await;
    let v: Value = serde_json::from_slice(&m).unwrap();
    let put = |body: Vec<u8>, ct: &'static str| {
        let h = &h;
        async move { h.put_manifest("val", "t", ct, &body).await }
    };
    put(b"{not json".to_vec(), OCI_MANIFEST)
        .await
        .expect_error(400, "MANIFEST_INVALID");
    put(b"[]".to_vec(), OCI_MANIFEST)
        .await
        .expect_error(400, "MANIFEST_INVALID");
    let mut bad = v.clone();
    bad["schemaVersion"] = json!(1);
    put(serde_json::to_vec(&bad).unwrap(), OCI_MANIFEST)
        .await
        .expect_error(400, "MANIFEST_INVALID");
    // Content-Type disagrees with mediaType.
    put(m.clone(), OCI_INDEX)
        .await
        .expect_error(400, "MANIFEST_INVALID");
    // Unsupported types (schema 1).
    let mut s1 = v.clone();
    s1["mediaType"] = json!("application/vnd.docker.distribution.manifest.v1+prettyjws");
    put(
        serde_json::to_vec(&s1).unwrap(),
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    )
    .await
    .expect_error(400, "MANIFEST_INVALID");
    // A layer that was never pushed.
    let mut missing = v.clone();
    let ghost = bytes(10, 99);
    missing["layers"][1] = descriptor("application/vnd.oci.image.layer.v1.tar", &ghost);
    let r = put(serde_json::to_vec(&missing).unwrap(), OCI_MANIFEST).await;
    r.expect_error(400, "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(r.json()["errors"][0]["detail"]["digest"], sha256(&ghost));
    // A blob pushed to another repository only.
    h.push_blob("other", &ghost).await;
    put(serde_json::to_vec(&missing).unwrap(), OCI_MANIFEST)
        .await
        .expect_error(400, "MANIFEST_BLOB_UNKNOWN");
    // A descriptor whose size lies.
    let mut lying = v.clone();
    lying["layers"][0]["size"] = json!(1);
    put(serde_json::to_vec(&lying).unwrap(), OCI_MANIFEST)
        .await
        .expect_error(400, "MANIFEST_INVALID");
    // A foreign layer (with urls) need not be here.
    let mut foreign = v.clone();
    foreign["layers"][1] = json!({
        "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "digest": sha256(&ghost), "size": 10, "urls": ["https://example.com/layer"],
    });
    put(serde_json::to_vec(&foreign).unwrap(), OCI_MANIFEST)
        .await
        .expect(201);
    // Too large: 413.
    let mut big = v.clone();
    big["annotations"] = json!({ "pad": "x".repeat(4 * 1024 * 1024) });
    put(serde_json::to_vec(&big).unwrap(), OCI_MANIFEST)
        .await
        .expect_error(413, "SIZE_INVALID");
    // A subject that does not exist is fine, and answered with OCI-Subject.
    let mut with_subject = v.clone();
    let subject = sha256(b"not here");
    with_subject["subject"] = json!({ "mediaType": OCI_MANIFEST, "digest": subject, "size": 8 });
    let r = put(serde_json::to_vec(&with_subject).unwrap(), OCI_MANIFEST).await;
    r.expect(201);
    assert_eq!(r.header("oci-subject"), Some(subject.as_str()));
    // Both an index's `manifests` and a manifest's `config`/`layers` (CVE-2021-41190): refused
    // whatever type it is pushed as, so one digest can never be served as two types.
    let mut both = v.clone();
    both.as_object_mut().unwrap().remove("mediaType");
    both["manifests"] = json!([]);
    let both = serde_json::to_vec(&both).unwrap();
    put(both.clone(), OCI_MANIFEST)
        .await
        .expect_error(400, "MANIFEST_INVALID");
    h.put_manifest("val", &sha256(&both), OCI_INDEX, &both)
        .await
        .expect_error(400, "MANIFEST_INVALID");
    put(both.clone(), "")
        .await
        .expect_error(400, "MANIFEST_INVALID");
    h.get(&format!("/v2/val/manifests/{}", sha256(&both)))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    // No Content-Type: the mediaType field decides.
    put(m.clone(), "").await.expect(201);
    // Nothing invalid was stored under "t" in between: it is the last valid push.
    assert_eq!(h.get("/v2/val/manifests/t").await.body, m);
}

async fn index_and_docker_types(h: H) {
    let a = image(&h, "multi", 1).await;
    let b = image(&h, "multi", 2).await;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            { "mediaType": OCI_MANIFEST, "digest": sha256(&a), "size": a.len(), "platform": {"architecture": "amd64", "os": "linux"} },
            { "mediaType": OCI_MANIFEST, "digest": sha256(&b), "size": b.len(), "platform": {"architecture": "arm64", "os": "linux"} },
        ],
    }))
    .unwrap();
    // Children first: an index referencing unknown manifests is refused.
    h.put_manifest("multi", "latest", OCI_INDEX, &index)
        .await
        .expect_error(400, "MANIFEST_BLOB_UNKNOWN");
    h.put_manifest("multi", &sha256(&a), OCI_MANIFEST, &a)
        .await
        .expect(201);
    h.put_manifest("multi", &sha256(&b), OCI_MANIFEST, &b)
        .await
        .expect(201);
    h.put_manifest("multi", "latest", OCI_INDEX, &index)
        .await
        .expect(201);
    let r = h.get("/v2/multi/manifests/latest").await;
    assert_eq!(r.header("content-type"), Some(OCI_INDEX));
    assert_eq!(r.body, index);

    // Docker schema 2 and manifest lists.
    let config = b"{\"os\":\"linux\"}".to_vec();
    let layer = bytes(500, 42);
    h.push_blob("dock", &config).await;
    h.push_blob("dock", &layer).await;
    let dm = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor("application/vnd.docker.container.image.v1+json", &config),
        "layers": [descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", &layer)],
    }))
    .unwrap();
    h.put_manifest("dock", "one", DOCKER_MANIFEST, &dm)
        .await
        .expect(201);
    let list = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST,
        "manifests": [{ "mediaType": DOCKER_MANIFEST, "digest": sha256(&dm), "size": dm.len(), "platform": {"architecture": "amd64", "os": "linux"} }],
    }))
    .unwrap();
    h.put_manifest("dock", "list", DOCKER_LIST, &list)
        .await
        .expect(201);
    let r = h.get("/v2/dock/manifests/list").await;
    assert_eq!(r.header("content-type"), Some(DOCKER_LIST));
    assert_eq!(r.body, list);
    assert_eq!(
        h.get("/v2/dock/manifests/one").await.header("content-type"),
        Some(DOCKER_MANIFEST)
    );
    // A Docker manifest without its mediaType field is refused.
    let mut v: Value = serde_json::from_slice(&dm).unwrap();
    v.as_object_mut().unwrap().remove("mediaType");
    h.put_manifest(
        "dock",
        "two",
        DOCKER_MANIFEST,
        &serde_json::to_vec(&v).unwrap(),
    )
    .await
    .expect_error(400, "MANIFEST_INVALID");
}

async fn tags_list(h: H) {
    h.get("/v2/t/tags/list")
        .await
        .expect_error(404, "NAME_UNKNOWN");
    let m = image(&h, "t", 1).await;
    // The repository exists (it has blobs) but no tags yet.
    let r = h.get("/v2/t/tags/list").await;
    r.expect(200);
    assert_eq!(r.json(), json!({ "name": "t", "tags": [] }));
    let names = ["v2", "latest", "B", "a", "v10", "_x", "v1"];
    for t in names {
        h.put_manifest("t", t, OCI_MANIFEST, &m).await.expect(201);
    }
    let mut sorted: Vec<&str> = names.to_vec();
    sorted.sort();
    let r = h.get("/v2/t/tags/list").await;
    assert_eq!(r.json()["tags"], json!(sorted));
    assert!(r.header("link").is_none());
    // Pages of 3, following the Link header.
    let mut seen = Vec::new();
    let mut next = Some("/v2/t/tags/list?n=3".to_owned());
    while let Some(url) = next.take() {
        let r = h.get(&url).await;
        r.expect(200);
        let page: Vec<String> = serde_json::from_value(r.json()["tags"].clone()).unwrap();
        assert!(page.len() <= 3);
        seen.extend(page);
        if let Some(link) = r.header("link") {
            assert!(link.ends_with(">; rel=\"next\""), "{link}");
            next = Some(link[1..link.find('>').unwrap()].to_owned());
        }
    }
    assert_eq!(seen, sorted);
    // last without n; n=0.
    let r = h.get("/v2/t/tags/list?last=latest").await;
    assert_eq!(r.json()["tags"], json!(["v1", "v10", "v2"]));
    let r = h.get("/v2/t/tags/list?n=0").await;
    assert_eq!(r.json()["tags"], json!([]));
    assert!(r.header("link").is_none());
    // Exactly n left: no Link.
    let r = h.get("/v2/t/tags/list?n=3&last=latest").await;
    assert_eq!(r.json()["tags"], json!(["v1", "v10", "v2"]));
    assert!(r.header("link").is_none());
    h.get("/v2/t/tags/list?n=abc")
        .await
        .expect_error(400, "UNSUPPORTED");
    h.get("/v2/t/tags/list?last=..")
        .await
        .expect_error(400, "TAG_INVALID");
    // Another repository's tags stay apart, even one whose name extends this one.
    let m2 = image(&h, "t/sub", 2).await;
    h.put_manifest("t/sub", "only-here", OCI_MANIFEST, &m2)
        .await
        .expect(201);
    assert_eq!(h.get("/v2/t/tags/list").await.json()["tags"], json!(sorted));
    assert_eq!(
        h.get("/v2/t/sub/tags/list").await.json()["tags"],
        json!(["only-here"])
    );
}

async fn catalog(h: H) {
    let r = h.get("/v2/_catalog").await;
    r.expect(200);
    assert_eq!(r.json(), json!({ "repositories": [] }));
    let repos = ["b", "a/x", "a", "c/d/e", "a-b"];
    for repo in repos {
        h.push_blob(repo, b"hello").await;
    }
    let mut sorted = repos.to_vec();
    sorted.sort();
    assert_eq!(
        h.get("/v2/_catalog").await.json()["repositories"],
        json!(sorted)
    );
    let r = h.get("/v2/_catalog?n=2").await;
    assert_eq!(r.json()["repositories"], json!(sorted[..2]));
    let link = r.header("link").unwrap();
    let next = &link[1..link.find('>').unwrap()];
    let r = h.get(next).await;
    assert_eq!(r.json()["repositories"], json!(sorted[2..4]));
    h.post("/v2/_catalog", b"")
        .await
        .expect_error(405, "UNSUPPORTED");
}

async fn referrers(h: H) {
    let img = image(&h, "ref", 1).await;
    let subject = sha256(&img);
    // Referrers of a subject nobody pushed: an empty index, never 404.
    let r = h.get(&format!("/v2/ref/referrers/{subject}")).await;
    r.expect(200);
    assert_eq!(r.header("content-type"), Some(OCI_INDEX));
    assert_eq!(
        r.json(),
        json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [] })
    );
    h.get(&format!("/v2/nothing/here/referrers/{subject}"))
        .await
        .expect(200);
    h.get("/v2/ref/referrers/sha256:nope")
        .await
        .expect_error(400, "DIGEST_INVALID");

    let empty_config = b"{}".to_vec();
    h.push_blob("ref", &empty_config).await;
    let sig_layer = b"signature".to_vec();
    h.push_blob("ref", &sig_layer).await;
    let subject_desc = json!({ "mediaType": OCI_MANIFEST, "digest": subject, "size": img.len() });
    // An artifact with artifactType, pushed before its subject.
    let sig = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.signature",
        "config": descriptor("application/vnd.oci.empty.v1+json", &empty_config),
        "layers": [descriptor("application/octet-stream", &sig_layer)],
        "subject": subject_desc,
        "annotations": { "org.example.key": "value" },
    }))
    .unwrap();
    let r = h
        .put_manifest("ref", &sha256(&sig), OCI_MANIFEST, &sig)
        .await;
    r.expect(201);
    assert_eq!(r.header("oci-subject"), Some(subject.as_str()));
    h.put_manifest("ref", "v1", OCI_MANIFEST, &img)
        .await
        .expect(201);
    // An image manifest without artifactType: its config media type stands in.
    let sbom = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.example.sbom.config", &empty_config),
        "layers": [],
        "subject": subject_desc,
    }))
    .unwrap();
    h.put_manifest("ref", &sha256(&sbom), OCI_MANIFEST, &sbom)
        .await
        .expect(201);
    // An index without artifactType: none in its descriptor.
    let idx = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [], "subject": subject_desc,
    }))
    .unwrap();
    h.put_manifest("ref", &sha256(&idx), OCI_INDEX, &idx)
        .await
        .expect(201);

    let r = h.get(&format!("/v2/ref/referrers/{subject}")).await;
    r.expect(200);
    assert!(r.header("oci-filters-applied").is_none());
    let list = r.json()["manifests"].as_array().unwrap().clone();
    assert_eq!(list.len(), 3);
    let find = |d: &str| {
        list.iter()
            .find(|m| m["digest"] == d)
            .unwrap_or_else(|| panic!("{d} missing"))
            .clone()
    };
    assert_eq!(
        find(&sha256(&sig)),
        json!({
            "mediaType": OCI_MANIFEST, "digest": sha256(&sig), "size": sig.len(),
            "artifactType": "application/vnd.example.signature",
            "annotations": { "org.example.key": "value" },
        })
    );
    assert_eq!(
        find(&sha256(&sbom))["artifactType"],
        "application/vnd.example.sbom.config"
    );
    let i = find(&sha256(&idx));
    assert_eq!(i["mediaType"], OCI_INDEX);
    assert!(i.get("artifactType").is_none());

    // Filtered.
    let r = h
        .get(&format!(
            "/v2/ref/referrers/{subject}?artifactType=application/vnd.example.signature"
        ))
        .await;
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    let list = r.json()["manifests"].as_array().unwrap().clone();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["digest"], sha256(&sig));
    // Another repository does not see them.
    assert_eq!(
        h.get(&format!("/v2/other/referrers/{subject}"))
            .await
            .json()["manifests"],
        json!([])
    );

    // Deleting a referrer takes it off the list.
    h.delete(&format!("/v2/ref/manifests/{}", sha256(&sig)))
        .await
        .expect(202);
    let r = h.get(&format!("/v2/ref/referrers/{subject}")).await;
    assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 2);
}

async fn deletes(h: H) {
    let m = image(&h, "del", 1).await;
    let d = sha256(&m);
    h.put_manifest(
        "del",
        &format!("{d}?tag=one&tag=two&tag=keep-other"),
        OCI_MANIFEST,
        &m,
    )
    .await
    .expect(201);
    let m2 = image(&h, "del", 2).await;
    h.put_manifest("del", "other", OCI_MANIFEST, &m2)
        .await
        .expect(201);

    // A tag alone.
    h.delete("/v2/del/manifests/one").await.expect(202);
    h.get("/v2/del/manifests/one")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    h.get(&format!("/v2/del/manifests/{d}")).await.expect(200);
    h.delete("/v2/del/manifests/one")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    // The manifest: its remaining tags go with it, other tags stay.
    h.delete(&format!("/v2/del/manifests/{d}"))
        .await
        .expect(202);
    h.get(&format!("/v2/del/manifests/{d}"))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    h.get("/v2/del/manifests/two")
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    assert_eq!(
        h.get("/v2/del/tags/list").await.json()["tags"],
        json!(["other"])
    );
    h.delete(&format!("/v2/del/manifests/{d}"))
        .await
        .expect_error(404, "MANIFEST_UNKNOWN");
    h.delete("/v2/nope/manifests/latest")
        .await
        .expect_error(404, "NAME_UNKNOWN");

    // A blob: unlinked from this repository only.
    let data = b"shared".to_vec();
    let bd = h.push_blob("del", &data).await;
    h.push_blob("keep", &data).await;
    h.delete(&format!("/v2/del/blobs/{bd}")).await.expect(202);
    h.get(&format!("/v2/del/blobs/{bd}"))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    h.delete(&format!("/v2/del/blobs/{bd}"))
        .await
        .expect_error(404, "BLOB_UNKNOWN");
    assert_eq!(h.get(&format!("/v2/keep/blobs/{bd}")).await.body, data);
    h.delete("/v2/del/blobs/sha256:1")
        .await
        .expect_error(400, "DIGEST_INVALID");
}

#[tokio::test]
async fn deletion_can_be_disabled() {
    let h = H::memory_with(Config {
        delete_enabled: false,
        ..Config::default()
    });
    let m = image(&h, "ro", 1).await;
    h.put_manifest("ro", "v1", OCI_MANIFEST, &m)
        .await
        .expect(201);
    h.delete("/v2/ro/manifests/v1")
        .await
        .expect_error(405, "UNSUPPORTED");
    h.delete(&format!("/v2/ro/manifests/{}", sha256(&m)))
        .await
        .expect_error(405, "UNSUPPORTED");
    let cfg: Value = serde_json::from_slice(&m).unwrap();
    let layer = cfg["layers"][0]["digest"].as_str().unwrap();
    h.delete(&format!("/v2/ro/blobs/{layer}"))
        .await
        .expect_error(405, "UNSUPPORTED");
    h.get("/v2/ro/manifests/v1").await.expect(200);

    let h = H::memory_with(Config {
        tag_delete_enabled: false,
        ..Config::default()
    });
    let m = image(&h, "ro", 1).await;
    h.put_manifest("ro", "v1", OCI_MANIFEST, &m)
        .await
        .expect(201);
    h.delete("/v2/ro/manifests/v1")
        .await
        .expect_error(400, "UNSUPPORTED");
    h.delete(&format!("/v2/ro/manifests/{}", sha256(&m)))
        .await
        .expect(202);
}

#[tokio::test]
async fn chunk_limits_are_advertised_and_enforced() {
    let h = H::memory_with(Config {
        max_chunk_bytes: Some(1000),
        chunk_min_length: Some(500),
        max_blob_bytes: 2500,
        ..Config::default()
    });
    let r = h.post("/v2/lim/blobs/uploads/", b"").await;
    r.expect(202);
    assert_eq!(r.header("oci-chunk-min-length"), Some("500"));
    assert_eq!(r.header("oci-chunk-max-length"), Some("1000"));
    let loc = r.header("location").unwrap().to_owned();
    // Declared too large: refused before reading. Streamed too large: refused while reading.
    h.send(
        Method::PATCH,
        &loc,
        &[("content-length", "1001")],
        &[0; 1001],
    )
    .await
    .expect_error(413, "SIZE_INVALID");
    h.send(Method::PATCH, &loc, &[], &[0; 1001])
        .await
        .expect_error(413, "SIZE_INVALID");
    // Nothing was appended by the refused requests.
    assert_eq!(h.get(&loc).await.header("range"), Some("0-0"));
    let data = bytes(2600, 1);
    for (i, chunk) in data.chunks(1000).enumerate().take(2) {
        let r = h.send(Method::PATCH, &loc, &[], chunk).await;
        r.expect(202);
        assert_eq!(
            r.header("range").unwrap(),
            format!("0-{}", (i + 1) * 1000 - 1)
        );
    }
    // The blob limit: 2500 bytes in all.
    h.send(
        Method::PUT,
        &format!("{loc}?digest={}", sha256(&data)),
        &[],
        &data[2000..],
    )
    .await
    .expect_error(413, "SIZE_INVALID");
    let d = sha256(&data[..2500]);
    h.send(
        Method::PUT,
        &format!("{loc}?digest={d}"),
        &[],
        &data[2000..2500],
    )
    .await
    .expect(201);
    h.post(
        &format!("/v2/lim/blobs/uploads/?digest={}", sha256(&data[..1001])),
        &data[..1001],
    )
    .await
    .expect_error(413, "SIZE_INVALID");
}

/// Abandoned upload sessions are purged with their parts once old enough; young ones stay.
#[tokio::test]
async fn stale_uploads_are_purged() {
    let kv = MemoryKv::new();
    let blobs = MemoryBlobs::new();
    let registry = Registry::new(kv.clone(), blobs.clone(), Config::default());
    let h = H {
        stores: Stores::Memory(kv, blobs.clone()),
        config: Config::default(),
    };
    let old = h.start("p", "").await;
    h.send(Method::PATCH, &old, &[], b"abandoned")
        .await
        .expect(202);
    assert_eq!(blobs.paths().len(), 1);
    // Nothing is older than an hour.
    assert_eq!(registry.purge_stale_uploads(3600).await.unwrap(), 0);
    h.get(&old).await.expect(204);
    // Start times are in seconds: let this one age past a zero-second limit.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let young = h.start("p", "").await;
    let n = registry.purge_stale_uploads(0).await.unwrap();
    assert_eq!(n, 1);
    h.get(&old).await.expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    assert!(blobs.paths().is_empty(), "{:?}", blobs.paths());
    h.get(&young).await.expect(204);
    // A finished upload leaves nothing for the purge.
    let d = sha256(b"done");
    h.send(Method::PUT, &format!("{young}?digest={d}"), &[], b"done")
        .await
        .expect(201);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(registry.purge_stale_uploads(0).await.unwrap(), 0);
    assert_eq!(h.get(&format!("/v2/p/blobs/{d}")).await.body, &b"done"[..]);
}

/// The issue's explicit statelessness test: a chunked push and a pull where every request is
/// handled by a `Registry` built for it alone, over shared stores, and the stores hold every
/// fact (the registry value is dropped after each request).
#[tokio::test]
async fn registry_dropped_between_every_request() {
    let kv = MemoryKv::new();
    let blobs = MemoryBlobs::new();
    let fresh = || Registry::new(kv.clone(), blobs.clone(), Config::default());
    async fn send(
        r: Registry<MemoryKv, MemoryBlobs>,
        m: Method,
        uri: &str,
        hdr: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Resp {
        let mut req = Request::builder().method(m).uri(uri);
        for (k, v) in hdr {
            req = req.header(*k, *v);
        }
        collect(
            r.handle(req.body(Full::new(Bytes::from(body))).unwrap())
                .await,
        )
        .await
    }
    let data = bytes(100_000, 77);
    let d = sha256(&data);
    let r = send(fresh(), Method::POST, "/v2/s/blobs/uploads/", &[], vec![]).await;
    let mut loc = r.header("location").unwrap().to_owned();
    for (i, chunk) in data.chunks(30_000).enumerate() {
        let start = i * 30_000;
        let range = format!("{start}-{}", start + chunk.len() - 1);
        let r = send(
            fresh(),
            Method::PATCH,
            &loc,
            &[("content-range", &range)],
            chunk.to_vec(),
        )
        .await;
        r.expect(202);
        loc = r.header("location").unwrap().to_owned();
        // The session's progress is in the key-value store, hash state included.
        let record = kv
            .keys()
            .into_iter()
            .find(|k| k.contains("/_uploads/"))
            .unwrap();
        assert!(record.ends_with(loc.rsplit('/').next().unwrap()));
    }
    send(
        fresh(),
        Method::PUT,
        &format!("{loc}?digest={d}"),
        &[],
        vec![],
    )
    .await
    .expect(201);
    let r = send(
        fresh(),
        Method::GET,
        &format!("/v2/s/blobs/{d}"),
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.body, data);
    assert!(
        kv.keys().iter().all(|k| !k.contains("/_uploads/")),
        "the session is gone"
    );
}

/// A cancel racing the closing PUT of the same session: whichever wins, a blob that was
/// answered 201 reads back whole. (On the chunked key-value host a cancel that loaded the
/// session before the PUT claimed it used to delete the parts' chunks after the PUT had made
/// them the blob's, leaving a blob record whose chunks were gone.)
async fn cancel_racing_close(h: H, rounds: u32) {
    let mut created = 0;
    let mut cancelled = 0;
    for round in 0..rounds {
        let data = bytes(3 * KV_CHUNK + 17, round as u8);
        let d = sha256(&data);
        let repo = format!("race{round}");
        let mut loc = h.start(&repo, "").await;
        for (i, chunk) in data.chunks(KV_CHUNK + 5).enumerate() {
            let start = i * (KV_CHUNK + 5);
            let range = format!("{start}-{}", start + chunk.len() - 1);
            let r = h
                .send(Method::PATCH, &loc, &[("content-range", &range)], chunk)
                .await;
            r.expect(202);
            loc = r.header("location").unwrap().to_owned();
        }
        // Two threads, each its own executor: the requests really run at once (a chunked
        // key-value reader is not Send, so not tokio::spawn).
        let put_uri = format!("{loc}?digest={d}");
        let (put, del) = std::thread::scope(|sc| {
            let put =
                sc.spawn(|| futures_executor::block_on(h.send(Method::PUT, &put_uri, &[], b"")));
            let del = sc.spawn(|| futures_executor::block_on(h.delete(&loc)));
            (put.join().unwrap(), del.join().unwrap())
        });
        assert!(put.status == 201 || put.status == 404, "PUT {}", put.status);
        assert!(
            del.status == 204 || del.status == 404,
            "DELETE {}",
            del.status
        );
        if put.status == 201 {
            created += 1;
            let r = h.get(&format!("/v2/{repo}/blobs/{d}")).await;
            r.expect(200);
            assert!(
                r.body == data,
                "round {round}: the blob does not read back whole"
            );
        } else {
            cancelled += 1;
            assert_eq!(del.status, 204, "round {round}: neither PUT nor DELETE won");
            h.get(&format!("/v2/{repo}/blobs/{d}"))
                .await
                .expect_error(404, "BLOB_UNKNOWN");
        }
    }
    println!("created {created}, cancelled {cancelled}");
}

mod cancel_racing_close {
    #[test]
    fn memory() {
        futures_executor::block_on(super::cancel_racing_close(super::H::memory(), 150))
    }
    // Fewer rounds: every request fsyncs. Each request opens its own directory registry, as
    // separate processes or wasm instances would: the key lock file serializes them.
    #[test]
    fn dir() {
        futures_executor::block_on(super::cancel_racing_close(super::H::dir(), 50))
    }
    #[test]
    fn kv_only() {
        futures_executor::block_on(super::cancel_racing_close(super::H::kv_only(), 150))
    }
    // The store's commands run on this runtime; the requests themselves on the plain threads
    // of the test, as for the other hosts.
    #[cfg(feature = "backends")]
    #[test]
    fn redis() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let h = rt.block_on(super::H::redis());
        futures_executor::block_on(super::cancel_racing_close(h, 150))
    }
}

/// A listing asked of the store: prefix, cursor, limit, and how many keys came back.
type Listing = (String, Option<String>, usize, usize);

/// A key-value store that records every listing asked of it.
#[derive(Clone)]
struct Counted<K> {
    inner: K,
    lists: std::sync::Arc<std::sync::Mutex<Vec<Listing>>>,
}

impl<K> Counted<K> {
    fn new(inner: K) -> Self {
        Counted {
            inner,
            lists: Default::default(),
        }
    }

    /// The listings recorded since the last call.
    fn take(&self) -> Vec<Listing> {
        std::mem::take(&mut *self.lists.lock().unwrap())
    }
}

impl<K: KeyValue> KeyValue for Counted<K> {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }

    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.set(key, value).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let keys = self.inner.list(prefix, after, limit).await?;
        self.lists.lock().unwrap().push((
            prefix.to_owned(),
            after.map(str::to_owned),
            limit,
            keys.len(),
        ));
        Ok(keys)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        self.inner.compare_and_swap(key, expected, new).await
    }
}

async fn call<K: KeyValue, B: BlobStore>(r: &Registry<K, B>, m: Method, uri: &str) -> Resp {
    let req = Request::builder()
        .method(m)
        .uri(uri)
        .body(Full::new(Bytes::new()))
        .unwrap();
    collect(r.handle(req).await).await
}

/// 20 000 tags: the whole list is one listing of the store; walking it in pages through the
/// `Link` header costs one listing per page (of the page plus one), in order, without
/// duplicates; deleting a manifest by digest lists the tags once.
async fn long_tags_list<K: KeyValue + Clone, B: BlobStore>(kv: K, blobs: B) {
    const N: usize = 20_000;
    let kv = Counted::new(kv);
    let r = Registry::new(kv.clone(), blobs, Config::default());
    // A real manifest, for the delete at the end.
    let target = {
        let config = br#"{"architecture":"amd64","os":"linux"}"#;
        let d = sha256(config);
        let req = Request::post(format!("/v2/big/blobs/uploads/?digest={d}"))
            .body(Full::new(Bytes::from_static(config)))
            .unwrap();
        collect(r.handle(req).await).await.expect(201);
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [],
        }))
        .unwrap();
        let req = Request::put("/v2/big/manifests/seed")
            .header("content-type", OCI_MANIFEST)
            .body(Full::new(Bytes::from(m.clone())))
            .unwrap();
        collect(r.handle(req).await).await.expect(201);
        sha256(&m)
    };
    // Tags written straight into the store (20 000 manifest PUTs would take minutes): even
    // ones point at the manifest, odd ones elsewhere.
    let other = sha256(b"other");
    let mut names: Vec<String> = (0..N)
        .map(|i| format!("t{:05}-{}", i * 7 % N, i % 3))
        .collect();
    for (i, t) in names.iter().enumerate() {
        let to = if i % 2 == 0 { &target } else { &other };
        kv.inner
            .set(
                &format!("repositories/big/_manifests/tags/{t}"),
                to.as_bytes(),
            )
            .await
            .unwrap();
    }
    names.push("seed".to_owned());
    names.sort();
    kv.take();

    // The whole list: one listing.
    let resp = call(&r, Method::GET, "/v2/big/tags/list").await;
    resp.expect(200);
    assert!(resp.header("link").is_none());
    assert_eq!(resp.json()["tags"], json!(names));
    let lists = kv.take();
    assert_eq!(lists.len(), 1, "{:?}", &lists[..lists.len().min(3)]);

    // Pages of 1000 (and n above the page size is capped at it, with a Link).
    let mut seen: Vec<String> = Vec::new();
    let mut pages = 0;
    let mut next = Some("/v2/big/tags/list?n=5000".to_owned());
    while let Some(uri) = next.take() {
        let resp = call(&r, Method::GET, &uri).await;
        resp.expect(200);
        let page: Vec<String> = serde_json::from_value(resp.json()["tags"].clone()).unwrap();
        assert!(page.len() <= 1000);
        let lists = kv.take();
        assert_eq!(lists.len(), 1, "one listing per page");
        let (prefix, after, limit, got) = &lists[0];
        assert_eq!(*limit, 1001);
        assert!(*got <= 1001);
        assert_eq!(
            after.as_deref(),
            seen.last().map(|l| format!("{prefix}{l}")).as_deref()
        );
        seen.extend(page);
        pages += 1;
        if let Some(link) = resp.header("link") {
            next = Some(link[1..link.find('>').unwrap()].to_owned());
        }
    }
    assert_eq!(pages, names.len().div_ceil(1000));
    assert_eq!(seen, names, "every tag once, in order");

    // Delete by digest: its tags go, with one listing of the tags (these tags predate the
    // reverse entries, so they are read once) and one of the manifest's own reverse entries.
    call(&r, Method::DELETE, &format!("/v2/big/manifests/{target}"))
        .await
        .expect(202);
    let lists = kv.take();
    assert_eq!(lists.len(), 2, "{lists:?}");
    assert_eq!(lists[0].0, "repositories/big/_manifests/tags/", "{lists:?}");
    assert!(
        lists[1].0.starts_with("repositories/big/_tagged/"),
        "{lists:?}"
    );
    let resp = call(&r, Method::GET, "/v2/big/tags/list").await;
    let left: Vec<String> = serde_json::from_value(resp.json()["tags"].clone()).unwrap();
    assert_eq!(left.len(), N / 2);
    for t in &left {
        assert_eq!(
            kv.inner
                .get(&format!("repositories/big/_manifests/tags/{t}"))
                .await
                .unwrap()
                .unwrap(),
            other.as_bytes()
        );
    }
}

#[tokio::test]
async fn long_tags_list_dir() {
    let dir = tempfile::tempdir().unwrap();
    let kv = FsKv::new(dir.path().join("kv")).unwrap().fsync(false);
    let blobs = FsBlobs::new(dir.path()).unwrap().fsync(false);
    long_tags_list(kv, blobs).await;
}

#[tokio::test]
async fn long_tags_list_memory() {
    long_tags_list(MemoryKv::new(), MemoryBlobs::new()).await;
}

/// Walking a long tags list page by page on the directory host reads the tags directory once,
/// not once per page: pages after the first come from its listing cache (the directory is
/// unchanged), at the cost of a binary search and the page.
#[tokio::test]
async fn tags_pages_read_the_directory_once() {
    const N: usize = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let kv = FsKv::new(dir.path().join("kv")).unwrap().fsync(false);
    let r = Registry::new(
        kv.clone(),
        FsBlobs::new(dir.path()).unwrap(),
        Config::default(),
    );
    kv.set("catalog/many", b"").await.unwrap();
    let mut names: Vec<String> = (0..N).map(|i| format!("v{}", i * 13 % N)).collect();
    for t in &names {
        kv.set(
            &format!("repositories/many/_manifests/tags/{t}"),
            b"sha256:00",
        )
        .await
        .unwrap();
    }
    names.sort();
    // No wait: the listing cache follows the directory's change journal, so a directory just
    // written is cached by its first read (`hosts/fs_journal.rs`).
    let before = kv.entries_read();
    let mut seen: Vec<String> = Vec::new();
    let mut pages = 0;
    let mut next = Some("/v2/many/tags/list?n=100".to_owned());
    while let Some(uri) = next.take() {
        let resp = call(&r, Method::GET, &uri).await;
        resp.expect(200);
        let page: Vec<String> = serde_json::from_value(resp.json()["tags"].clone()).unwrap();
        seen.extend(page);
        pages += 1;
        if let Some(link) = resp.header("link") {
            next = Some(link[1..link.find('>').unwrap()].to_owned());
        }
    }
    assert_eq!(pages, N / 100);
    assert_eq!(seen, names);
    // One read of the directory in all (a read per page would be 200 times that).
    assert_eq!(kv.entries_read() - before, N as u64);
}

/// The directories under `dir` that hold nothing.
fn empty_dirs(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut any = false;
    for e in rd {
        let e = e.unwrap();
        any = true;
        if e.file_type().unwrap().is_dir() {
            empty_dirs(&e.path(), out);
        }
    }
    if !any {
        out.push(dir.to_owned());
    }
}

/// Upload sessions cancelled, finished or purged, tags and manifests deleted: the directory
/// host leaves no empty directory behind in its key-value store (`upload-index/<second>/`
/// used to pile up, one per second in which an upload started).
#[tokio::test]
async fn deletes_leave_no_empty_directories() {
    let h = H::dir();
    let Stores::Dir(dir) = &h.stores else {
        unreachable!()
    };
    let kv_root = dir.path().join("kv");
    // Cancelled.
    let cancelled = h.start("e", "").await;
    h.send(Method::PATCH, &cancelled, &[], b"some")
        .await
        .expect(202);
    h.delete(&cancelled).await.expect(204);
    // Finished.
    let done = h.start("e", "").await;
    let d = sha256(b"done");
    h.send(Method::PUT, &format!("{done}?digest={d}"), &[], b"done")
        .await
        .expect(201);
    // Abandoned, then purged: in two different seconds.
    let abandoned = h.start("e", "").await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let abandoned2 = h.start("f/g", "").await;
    h.send(Method::PATCH, &abandoned2, &[], b"more")
        .await
        .expect(202);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let registry = DirRegistry::open_dir(dir.path(), Config::default()).unwrap();
    assert_eq!(registry.purge_stale_uploads(0).await.unwrap(), 2);
    h.get(&abandoned)
        .await
        .expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    // A manifest with tags, deleted by digest; a referrer deleted with its manifest.
    let m = image(&h, "e", 3).await;
    let md = sha256(&m);
    h.put_manifest("e", &format!("{md}?tag=a&tag=b"), OCI_MANIFEST, &m)
        .await
        .expect(201);
    h.delete(&format!("/v2/e/manifests/{md}")).await.expect(202);

    let index = kv_root.join("upload-index");
    let mut empty = Vec::new();
    empty_dirs(&kv_root, &mut empty);
    empty.retain(|p| p != &kv_root);
    assert!(empty.is_empty(), "empty directories left: {empty:?}");
    assert!(
        std::fs::read_dir(&index).map_or(true, |mut rd| rd.next().is_none()),
        "upload-index/ still holds entries"
    );
    // The store still works where directories were removed.
    let again = h.start("e", "").await;
    h.get(&again).await.expect(204);
    h.put_manifest("e", "c", OCI_MANIFEST, &m).await.expect(201);
    assert_eq!(h.get("/v2/e/tags/list").await.json()["tags"], json!(["c"]));
}

/// The purge lists the upload index once, however many sessions it removes (it used to list
/// a page of 1000 at a time, each a pass over the whole index on the directory host).
#[tokio::test]
async fn purge_lists_the_index_once() {
    const N: usize = 2500;
    let kv = Counted::new(MemoryKv::new());
    // More sessions than the default caps allow.
    let config = Config {
        max_uploads: 0,
        max_uploads_per_repository: 0,
        ..Config::default()
    };
    let r = Registry::new(kv.clone(), MemoryBlobs::new(), config);
    for _ in 0..N {
        call(&r, Method::POST, "/v2/p/blobs/uploads/")
            .await
            .expect(202);
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    kv.take();
    assert_eq!(r.purge_stale_uploads(0).await.unwrap(), N);
    assert_eq!(kv.take().len(), 1);
    assert!(kv.inner.keys().iter().all(|k| !k.contains("upload")));
}

/// A key-value store that lists as Spin's does: every key of the store, then filtered. It
/// counts the keys its listings read.
#[derive(Clone)]
struct ListsEverything(MemoryKv, std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl KeyValue for ListsEverything {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key).await
    }
    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.0.set(key, value).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.0.delete(key).await
    }
    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let all = self.0.keys();
        self.1
            .fetch_add(all.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(dockside::host::page_of(all, prefix, after, limit))
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        self.0.compare_and_swap(key, expected, new).await
    }
}

/// On a store that can only list every key (Spin), a tags page, the catalog and a referrers
/// list read the listing's index and nothing else, however many chunk keys the store holds;
/// without indexes each read all 10 000 of them. Data written before the indexes existed is
/// still listed, and indexed from the first write on.
#[tokio::test]
async fn indexed_listings_do_not_read_the_whole_store() {
    use std::sync::atomic::Ordering::Relaxed;
    let kv = MemoryKv::new();
    for i in 0..10_000 {
        kv.set(&format!("kvblob/chunk/c{}/{i:08}", i / 100), b"chunk")
            .await
            .unwrap();
    }
    let read = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let store = ListsEverything(kv.clone(), read.clone());
    let send = |indexed: bool, m: Method, uri: String, body: Vec<u8>| {
        let store = store.clone();
        async move {
            let req = Request::builder()
                .method(m)
                .uri(uri)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let blobs = KvBlobs::with_chunk_size(store.0.clone(), KV_CHUNK);
            if indexed {
                let r = Registry::new(IndexedKv(store), blobs, Config::default());
                collect(r.handle(req).await).await
            } else {
                let r = Registry::new(store, blobs, Config::default());
                collect(r.handle(req).await).await
            }
        }
    };
    // Written without indexes (as before them): two tags.
    let config = b"{}".to_vec();
    let d = sha256(&config);
    send(
        false,
        Method::POST,
        format!("/v2/app/blobs/uploads/?digest={d}"),
        config.clone(),
    )
    .await
    .expect(201);
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [],
    }))
    .unwrap();
    for t in ["a", "b"] {
        send(
            false,
            Method::PUT,
            format!("/v2/app/manifests/{t}"),
            m.clone(),
        )
        .await
        .expect(201);
    }
    read.store(0, Relaxed);
    let r = send(false, Method::GET, "/v2/app/tags/list".into(), vec![]).await;
    assert_eq!(r.json()["tags"], json!(["a", "b"]));
    assert!(read.load(Relaxed) > 10_000, "{}", read.load(Relaxed));
    // Without an index yet, the indexed store lists through the store.
    let r = send(true, Method::GET, "/v2/app/tags/list".into(), vec![]).await;
    assert_eq!(r.json()["tags"], json!(["a", "b"]));
    // The first indexed write builds the index from what is there.
    send(true, Method::PUT, "/v2/app/manifests/c".into(), m.clone())
        .await
        .expect(201);
    read.store(0, Relaxed);
    let r = send(true, Method::GET, "/v2/app/tags/list".into(), vec![]).await;
    assert_eq!(r.json()["tags"], json!(["a", "b", "c"]));
    let r = send(
        true,
        Method::GET,
        "/v2/app/tags/list?n=1&last=a".into(),
        vec![],
    )
    .await;
    assert_eq!(r.json()["tags"], json!(["b"]));
    assert!(r.header("link").is_some());
    // Deletes leave the index.
    send(true, Method::DELETE, "/v2/app/manifests/b".into(), vec![])
        .await
        .expect(202);
    let r = send(true, Method::GET, "/v2/app/tags/list".into(), vec![]).await;
    assert_eq!(r.json()["tags"], json!(["a", "c"]));
    let r = send(true, Method::GET, "/v2/_catalog".into(), vec![]).await;
    assert_eq!(r.json()["repositories"], json!(["app"]));
    let r = send(
        true,
        Method::GET,
        format!("/v2/app/referrers/{}", sha256(&m)),
        vec![],
    )
    .await;
    r.expect(200);
    assert_eq!(read.load(Relaxed), 0, "a listing read the whole store");
}

/// Caps on open upload sessions (in total and per repository): a POST beyond one gets 429
/// `TOOMANYREQUESTS` with `Retry-After`; closing and cancelling free slots; single-POST
/// uploads and mounts open no session and are never refused.
async fn upload_admission(mut h: H) {
    h.config.max_uploads = 3;
    h.config.max_uploads_per_repository = 2;
    let refused = |r: Resp| {
        r.expect_error(429, "TOOMANYREQUESTS");
        let wait: u64 = r
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!(wait >= 1);
    };
    let a1 = h.start("a", "").await;
    let _a2 = h.start("a", "").await;
    refused(h.post("/v2/a/blobs/uploads/", b"").await);
    let b1 = h.start("b", "").await;
    refused(h.post("/v2/c/blobs/uploads/", b"").await);
    // A refused POST changed nothing: the open sessions go on.
    h.send(Method::PATCH, &a1, &[], b"part").await.expect(202);
    // Whole blobs in one POST, and mounts, open no session.
    let d = h.push_blob("c", b"whole").await;
    h.post(&format!("/v2/a/blobs/uploads/?mount={d}&from=c"), b"")
        .await
        .expect(201);
    // A cancel frees a slot in its repository and in the total.
    h.delete(&a1).await.expect(204);
    let c1 = h.start("c", "").await;
    refused(h.post("/v2/a/blobs/uploads/", b"").await);
    // So does a closing PUT, and a failed one (the session is gone either way).
    let d = sha256(b"b1");
    h.send(Method::PUT, &format!("{b1}?digest={d}"), &[], b"b1")
        .await
        .expect(201);
    let a3 = h.start("a", "").await;
    refused(h.post("/v2/a/blobs/uploads/", b"").await);
    let wrong = sha256(b"other");
    h.send(Method::PUT, &format!("{c1}?digest={wrong}"), &[], b"c1")
        .await
        .expect_error(400, "DIGEST_INVALID");
    refused(h.post("/v2/a/blobs/uploads/", b"").await);
    h.start("d", "").await;
    // Nothing is left counted once every session is gone.
    for loc in [_a2, a3] {
        h.delete(&loc).await.expect(204);
    }
    h.start("a", "").await;
    h.start("a", "").await;
}

/// `n` copies of one request, each on a thread of its own with its own executor, so that they
/// really run at once (as in `cancel_racing_close`).
fn race(h: &H, n: usize, method: Method, uri: &str) -> Vec<Resp> {
    std::thread::scope(|sc| {
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let m = method.clone();
                sc.spawn(move || futures_executor::block_on(h.send(m, uri, &[], b"")))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

/// Racing POSTs never open more sessions than the cap (the counts are compare-and-swapped),
/// and racing cancels free exactly the slots they held.
async fn upload_admission_races(mut h: H) {
    h.config.max_uploads = 0;
    h.config.max_uploads_per_repository = 5;
    let answers = race(&h, 16, Method::POST, "/v2/race/blobs/uploads/");
    let opened: Vec<String> = answers
        .iter()
        .filter(|r| r.status == StatusCode::ACCEPTED)
        .map(|r| r.header("location").unwrap().to_owned())
        .collect();
    let statuses: Vec<_> = answers.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(opened.len(), 5, "statuses: {statuses:?}");
    for r in answers.iter().filter(|r| r.status != StatusCode::ACCEPTED) {
        r.expect_error(429, "TOOMANYREQUESTS");
    }
    let h = &h;
    std::thread::scope(|sc| {
        for l in opened.iter().take(3) {
            sc.spawn(move || {
                futures_executor::block_on(h.delete(l)).expect(204);
            });
        }
    });
    let answers = race(h, 8, Method::POST, "/v2/race/blobs/uploads/");
    let n = answers
        .iter()
        .filter(|r| r.status == StatusCode::ACCEPTED)
        .count();
    assert_eq!(n, 3);
}

mod upload_admission_races {
    #[test]
    fn memory() {
        futures_executor::block_on(super::upload_admission_races(super::H::memory()))
    }
    // Each request opens its own directory registry, as separate processes would: the key
    // lock files serialize the compare-and-swaps.
    #[test]
    fn dir() {
        futures_executor::block_on(super::upload_admission_races(super::H::dir()))
    }
    #[test]
    fn kv_indexed() {
        futures_executor::block_on(super::upload_admission_races(super::H::kv_indexed()))
    }
    #[cfg(feature = "backends")]
    #[test]
    fn redis() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let h = rt.block_on(super::H::redis());
        futures_executor::block_on(super::upload_admission_races(h))
    }
}

/// Sessions abandoned where no purge runs (the edge components) stop counting once older
/// than the upload expiry, and so does a count whose session was never written (a crash
/// between the two steps): the counts lapse by themselves.
#[tokio::test]
async fn abandoned_uploads_stop_counting() {
    let kv = MemoryKv::new();
    let mut h = H::memory();
    h.stores = Stores::Memory(kv.clone(), MemoryBlobs::new());
    h.config.max_uploads_per_repository = 1;
    h.config.upload_expiry_secs = 2;
    let started = std::time::Instant::now();
    let loc = h.start("p", "").await;
    h.post("/v2/p/blobs/uploads/", b"")
        .await
        .expect_error(429, "TOOMANYREQUESTS");
    // The session vanishes without a close (as after a crash): its count stays, for now.
    let key = kv
        .keys()
        .into_iter()
        .find(|k| k.starts_with("repositories/p/_uploads/"))
        .unwrap();
    kv.delete(&key).await.unwrap();
    h.get(&loc).await.expect_error(404, "BLOB_UPLOAD_UNKNOWN");
    h.post("/v2/p/blobs/uploads/", b"")
        .await
        .expect_error(429, "TOOMANYREQUESTS");
    // Expiry 2 s, counted in spans of 1 s: gone within 4 s, with no purge.
    loop {
        let r = h.post("/v2/p/blobs/uploads/", b"").await;
        if r.status == StatusCode::ACCEPTED {
            break;
        }
        r.expect_error(429, "TOOMANYREQUESTS");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "the count never lapsed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
}

/// The purge of stale sessions frees their slots.
#[tokio::test]
async fn purged_uploads_free_their_slots() {
    let kv = MemoryKv::new();
    let blobs = MemoryBlobs::new();
    let config = Config {
        max_uploads_per_repository: 1,
        ..Config::default()
    };
    let registry = Registry::new(kv.clone(), blobs.clone(), config.clone());
    let h = H {
        stores: Stores::Memory(kv, blobs),
        config,
    };
    h.start("p", "").await;
    h.post("/v2/p/blobs/uploads/", b"")
        .await
        .expect_error(429, "TOOMANYREQUESTS");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(registry.purge_stale_uploads(0).await.unwrap(), 1);
    h.start("p", "").await;
}
