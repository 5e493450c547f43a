//! The S3 blob store on a real S3 server (Garage, started by the test; `.ci/backends` installs
//! it), through `Registry::handle`: the paths the small blobs of `tests/api.rs` never reach
//! (multipart writes, assembling parts by copy inside the store or by re-upload, ranged reads
//! of large objects), presigned redirects, and what a client sees when the store fails.

use bytes::Bytes;
use dockside::adapters::hyper_client::HyperClient;
use dockside::{Config, MemoryKv, Registry, S3Blobs, S3Config};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

mod common;
#[path = "backends/garage.rs"]
mod garage;

use common::{pseudo_random, sha256_digest as sha256};

const MIB: usize = 1024 * 1024;

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct S3 {
    kv: MemoryKv,
    blobs: S3Blobs<HyperClient>,
    s3: S3Config,
    config: Config,
}

impl S3 {
    fn new() -> Self {
        let g = garage::garage();
        let s3 = S3Config::from_url(&g.url(&garage::unique_prefix()), g.env()).unwrap();
        let blobs = S3Blobs::new(&s3, HyperClient::new().unwrap()).unwrap();
        S3 {
            kv: MemoryKv::new(),
            blobs,
            s3,
            config: Config::default(),
        }
    }

    async fn send(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body))).unwrap();
        // A registry per request, as on the edge: the stores hold everything.
        let r = Registry::new(self.kv.clone(), self.blobs.clone(), self.config.clone());
        let resp = r.handle(req).await;
        let (parts, body) = resp.into_parts();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    async fn start(&self, repo: &str) -> String {
        let r = self
            .send(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/"),
                &[],
                vec![],
            )
            .await;
        assert_eq!(r.status, 202);
        r.header("location").unwrap().to_owned()
    }

    /// A chunked upload in chunks of the given sizes, closed by a PUT; returns the digest.
    async fn push_chunked(&self, repo: &str, data: &[u8], sizes: &[usize]) -> String {
        assert_eq!(sizes.iter().sum::<usize>(), data.len());
        let d = sha256(data);
        let mut loc = self.start(repo).await;
        let mut at = 0;
        for &n in sizes {
            let range = format!("{at}-{}", at + n - 1);
            let r = self
                .send(
                    Method::PATCH,
                    &loc,
                    &[("content-range", &range)],
                    data[at..at + n].to_vec(),
                )
                .await;
            assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
            loc = r.header("location").unwrap().to_owned();
            at += n;
        }
        let r = self
            .send(Method::PUT, &format!("{loc}?digest={d}"), &[], vec![])
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        d
    }

    async fn pull(&self, repo: &str, d: &str) -> Bytes {
        let r = self
            .send(Method::GET, &format!("/v2/{repo}/blobs/{d}"), &[], vec![])
            .await;
        assert_eq!(r.status, 200);
        r.body
    }

    /// What is in the bucket under this test's prefix.
    async fn objects(&self) -> Vec<String> {
        garage::list_objects(&self.s3).await
    }
}

/// A 20 MiB blob in one request goes up as a multipart upload of 8 MiB parts; it reads back
/// whole and by ranges (inside one part, across a part boundary, the tail), and no upload
/// object is left behind.
#[tokio::test]
async fn monolithic_push_is_a_multipart_upload() {
    let s = S3::new();
    let data = pseudo_random(20 * MIB + 123, 1);
    let d = sha256(&data);
    let r = s
        .send(
            Method::POST,
            &format!("/v2/big/blobs/uploads/?digest={d}"),
            &[],
            data.clone(),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert!(s.pull("big", &d).await == data);
    for (a, b) in [
        (5, 100),
        (8 * MIB - 10, 8 * MIB + 10),
        (20 * MIB, 20 * MIB + 122),
    ] {
        let r = s
            .send(
                Method::GET,
                &format!("/v2/big/blobs/{d}"),
                &[("range", &format!("bytes={a}-{b}"))],
                vec![],
            )
            .await;
        assert_eq!(r.status, 206);
        assert!(r.body[..] == data[a..=b], "range {a}-{b}");
    }
    let objects = s.objects().await;
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert!(objects[0].starts_with("blobs/sha256/"), "{objects:?}");
}

/// Chunks of at least 5 MiB are assembled by copying inside the store (UploadPartCopy), a
/// single chunk by CopyObject, and chunks under S3's 5 MiB minimum part by re-upload grouped to
/// the part size; mixed sizes too, and copies followed by a tail of one byte (which Garage keeps
/// inline and refuses as a copy source). Every result reads back byte for byte; nothing is left
/// of the upload parts.
#[tokio::test]
async fn chunked_uploads_are_assembled_into_one_object() {
    let s = S3::new();
    let cases: [(&str, Vec<usize>); 6] = [
        ("copies", vec![6 * MIB, 6 * MIB, 6 * MIB, MIB + 7]),
        ("tail", vec![5 * MIB, 5 * MIB, 1]),
        ("single", vec![7 * MIB + 3]),
        ("small", vec![MIB; 12]),
        ("mixed", vec![6 * MIB, MIB, 6 * MIB, MIB, 5 * MIB]),
        ("tiny", vec![10, 20, 30]),
    ];
    let mut digests = Vec::new();
    for (i, (repo, sizes)) in cases.iter().enumerate() {
        let data = pseudo_random(sizes.iter().sum(), 10 + i as u64);
        let d = s.push_chunked(repo, &data, sizes).await;
        assert!(s.pull(repo, &d).await == data, "{repo}");
        digests.push(d);
    }
    let objects = s.objects().await;
    assert_eq!(objects.len(), cases.len(), "{objects:?}");
    assert!(
        objects.iter().all(|o| o.starts_with("blobs/")),
        "{objects:?}"
    );
}

/// Uploads advertise S3's smallest part as `OCI-Chunk-Min-Length` unless configured otherwise,
/// so chunking clients send chunks that close by copies inside the store.
#[tokio::test]
async fn uploads_advertise_the_smallest_s3_part() {
    let mut s = S3::new();
    let r = s
        .send(Method::POST, "/v2/min/blobs/uploads/", &[], vec![])
        .await;
    assert_eq!(r.status, 202);
    assert_eq!(r.header("oci-chunk-min-length"), Some("5242880"));
    s.config.chunk_min_length = Some(1024);
    let r = s
        .send(Method::POST, "/v2/min/blobs/uploads/", &[], vec![])
        .await;
    assert_eq!(r.header("oci-chunk-min-length"), Some("1024"));
}

/// With `blob_redirect`, a blob GET is a 307 to a presigned URL of the store, which gives the
/// bytes (and honours Range) without dockside; HEAD and manifests are answered directly.
#[tokio::test]
async fn blob_gets_redirect_to_presigned_urls() {
    let mut s = S3::new();
    s.config.blob_redirect = Some(std::time::Duration::from_secs(60));
    let data = pseudo_random(3 * MIB, 3);
    let d = s.push_chunked("redir", &data, &[3 * MIB]).await;
    let r = s
        .send(Method::GET, &format!("/v2/redir/blobs/{d}"), &[], vec![])
        .await;
    assert_eq!(r.status, 307);
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    let url = r.header("location").unwrap().to_owned();
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let got = reqwest::get(&url).await.unwrap();
    assert_eq!(got.status(), 200);
    assert!(got.bytes().await.unwrap()[..] == data[..]);
    let got = reqwest::Client::new()
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 206);
    assert!(got.bytes().await.unwrap()[..] == data[10..20]);
    // HEAD is answered here; an unknown blob is still a 404, never a redirect.
    let r = s
        .send(Method::HEAD, &format!("/v2/redir/blobs/{d}"), &[], vec![])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(&*(3 * MIB).to_string()));
    let r = s
        .send(
            Method::GET,
            &format!("/v2/redir/blobs/{}", sha256(b"none")),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status, 404);
}

/// Wrong credentials: the check at start says so, and requests get a 500 in the spec's
/// envelope, never a panic; nothing becomes visible.
#[tokio::test]
async fn wrong_credentials_are_a_clear_error() {
    let g = garage::garage();
    let s3 = S3Config::from_url(&g.url(&garage::unique_prefix()), |k| match k {
        "DOCKSIDE_S3_ACCESS_KEY" => Some(g.access_key.clone()),
        "DOCKSIDE_S3_SECRET_KEY" => Some("0".repeat(64)),
        _ => None,
    })
    .unwrap();
    let blobs = S3Blobs::new(&s3, HyperClient::new().unwrap()).unwrap();
    let err = blobs.check().await.unwrap_err();
    assert!(err.message.contains("403"), "{}", err.message);
    let mut s = S3::new();
    s.blobs = blobs;
    let d = sha256(b"x");
    let r = s
        .send(
            Method::POST,
            &format!("/v2/r/blobs/uploads/?digest={d}"),
            &[],
            b"x".to_vec(),
        )
        .await;
    assert_eq!(r.status, 500);
    assert!(String::from_utf8_lossy(&r.body).contains("\"code\":\"UNKNOWN\""));
    // A bucket that does not exist.
    let s3 = S3Config::from_url(
        &format!("s3://no-such-bucket?endpoint={}&region=garage", g.endpoint),
        g.env(),
    )
    .unwrap();
    let blobs = S3Blobs::new(&s3, HyperClient::new().unwrap()).unwrap();
    assert!(blobs.check().await.is_err());
}

/// Storage that cannot be reached: after its retries, a 503 with `Retry-After` in the spec's
/// envelope, and the upload can go on once the store is back (here: another store).
#[tokio::test]
async fn unreachable_storage_is_a_503() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // closed again: nothing listens there
    let g = garage::garage();
    let s3 = S3Config::from_url(
        &format!("s3://{}?endpoint=http://127.0.0.1:{port}", g.bucket),
        g.env(),
    )
    .unwrap();
    let mut s = S3::new();
    s.blobs = S3Blobs::new(&s3, HyperClient::new().unwrap()).unwrap();
    let d = sha256(b"x");
    let r = s
        .send(
            Method::POST,
            &format!("/v2/r/blobs/uploads/?digest={d}"),
            &[],
            b"x".to_vec(),
        )
        .await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("retry-after").is_some());
    assert!(String::from_utf8_lossy(&r.body).contains("\"errors\""));
    // Nothing was linked: the repository does not know the blob.
    let r = s
        .send(Method::HEAD, &format!("/v2/r/blobs/{d}"), &[], vec![])
        .await;
    assert_eq!(r.status, 404);
}
