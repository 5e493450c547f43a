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

// ---------------------------------------------------------------------------------------------
// Storage that misbehaves. Garage answers correctly, so these run against a tiny fake S3 of the
// test's own: objects in memory, signatures not checked, one request per connection, and one
// fault at a time. Each test asserts a clear error in the spec's envelope, and that nothing
// became visible: the registry does not know the blob afterwards.

mod fake {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    #[derive(Clone, Copy, PartialEq, Debug)]
    pub enum Fault {
        None,
        /// CreateMultipartUpload answers 200 with a body that is not XML.
        CreateNotXml,
        /// CompleteMultipartUpload answers 200 with XML cut off in the middle.
        CompleteTruncated,
        /// CompleteMultipartUpload answers 200, then an `<Error>` (as S3 may).
        CompleteError,
        /// HeadObject answers 200 without a Content-Length.
        HeadNoLength,
        /// GetObject announces the object's length and sends half of it.
        GetShort,
        /// Uploads (PutObject, UploadPart) read half the body, then the connection closes.
        CloseMidUpload,
    }

    #[derive(Default)]
    pub struct State {
        pub objects: HashMap<String, Vec<u8>>,
        uploads: HashMap<String, BTreeMap<u32, Vec<u8>>>,
        next_id: u64,
        /// `METHOD path?query` of every request, in order.
        pub requests: Vec<String>,
    }

    pub struct FakeS3 {
        pub endpoint: String,
        pub state: Arc<Mutex<State>>,
        fault: Arc<Mutex<Fault>>,
    }

    impl FakeS3 {
        pub async fn start(fault: Fault) -> FakeS3 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = format!("http://{}", listener.local_addr().unwrap());
            let state = Arc::new(Mutex::new(State::default()));
            let fault = Arc::new(Mutex::new(fault));
            let (s, f) = (state.clone(), fault.clone());
            tokio::spawn(async move {
                while let Ok((conn, _)) = listener.accept().await {
                    let (s, f) = (s.clone(), f.clone());
                    tokio::spawn(async move {
                        let _ = serve(conn, s, f).await;
                    });
                }
            });
            FakeS3 {
                endpoint,
                state,
                fault,
            }
        }

        /// Whether a request `METHOD path?query` containing every one of `needles` came in:
        /// so a test knows its fault was met, not some earlier failure.
        pub fn saw(&self, method: &str, needles: &[&str]) -> bool {
            self.state.lock().unwrap().requests.iter().any(|r| {
                r.starts_with(&format!("{method} ")) && needles.iter().all(|n| r.contains(n))
            })
        }

        pub fn set_fault(&self, f: Fault) {
            *self.fault.lock().unwrap() = f;
        }

        /// Keys of the stored objects under `blobs/` (complete blobs), sorted.
        pub fn blobs(&self) -> Vec<String> {
            let mut v: Vec<String> = self
                .state
                .lock()
                .unwrap()
                .objects
                .keys()
                .filter(|k| k.contains("/blobs/"))
                .cloned()
                .collect();
            v.sort();
            v
        }
    }

    fn answer(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
        let mut v = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
            body.len()
        )
        .into_bytes();
        v.extend_from_slice(body);
        v
    }

    async fn serve(
        mut conn: TcpStream,
        state: Arc<Mutex<State>>,
        fault: Arc<Mutex<Fault>>,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let head_end = loop {
            let mut b = [0u8; 4096];
            let n = conn.read(&mut b).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&b[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.lines();
        let mut first = lines.next().unwrap_or_default().split(' ');
        let method = first.next().unwrap_or_default().to_owned();
        let target = first.next().unwrap_or_default().to_owned();
        let mut len = 0usize;
        let mut copy_source = None;
        let mut range = None;
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    "x-amz-copy-source" => copy_source = Some(v.trim().to_owned()),
                    "range" | "x-amz-copy-source-range" => range = Some(v.trim().to_owned()),
                    _ => {}
                }
            }
        }
        let fault = *fault.lock().unwrap();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let path = path.to_owned();
        let q: HashMap<&str, &str> = query
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .collect();
        state
            .lock()
            .unwrap()
            .requests
            .push(format!("{method} {path}?{query}"));
        let is_upload = method == "PUT" && copy_source.is_none();
        if fault == Fault::CloseMidUpload && is_upload {
            // Storage gone mid-push: half the body is read, then the connection drops.
            let mut seen = buf.len() - head_end;
            while seen < len / 2 {
                let mut b = [0u8; 65536];
                let n = conn.read(&mut b).await?;
                if n == 0 {
                    break;
                }
                seen += n;
            }
            return Ok(());
        }
        let mut body = buf[head_end..].to_vec();
        while body.len() < len {
            let mut b = vec![0u8; 65536];
            let n = conn.read(&mut b).await?;
            if n == 0 {
                return Ok(());
            }
            body.extend_from_slice(&b[..n]);
        }
        let resp = {
            let mut st = state.lock().unwrap();
            let etag = |d: &[u8]| format!("ETag: \"{:x}\"\r\n", d.len());
            match (
                method.as_str(),
                q.get("uploadId"),
                q.contains_key("uploads"),
            ) {
                ("POST", None, true) => {
                    if fault == Fault::CreateNotXml {
                        answer("200 OK", "", b"this is not XML at all")
                    } else {
                        st.next_id += 1;
                        let id = format!("u{}", st.next_id);
                        st.uploads.insert(id.clone(), BTreeMap::new());
                        answer(
                            "200 OK",
                            "",
                            format!(
                                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                                 <InitiateMultipartUploadResult \
                                 xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                                 <Bucket>fake</Bucket>\
                                 <Key>k</Key><UploadId>{id}</UploadId>\
                                 </InitiateMultipartUploadResult>"
                            )
                            .as_bytes(),
                        )
                    }
                }
                ("PUT", Some(id), _) => {
                    let n: u32 = q
                        .get("partNumber")
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    let data = match &copy_source {
                        Some(src) => {
                            let obj = st.objects.get(src.as_str()).cloned().unwrap_or_default();
                            match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                                Some(r) => {
                                    let (a, b) = r.split_once('-').unwrap();
                                    let (a, b): (usize, usize) =
                                        (a.parse().unwrap(), b.parse().unwrap());
                                    obj[a..=b].to_vec()
                                }
                                None => obj,
                            }
                        }
                        None => body,
                    };
                    let e = etag(&data);
                    match st.uploads.get_mut(*id) {
                        Some(u) => {
                            u.insert(n, data);
                            if copy_source.is_some() {
                                answer(
                                    "200 OK",
                                    "",
                                    b"<CopyPartResult><ETag>\"c\"</ETag></CopyPartResult>",
                                )
                            } else {
                                answer("200 OK", &e, b"")
                            }
                        }
                        None => answer(
                            "404 Not Found",
                            "",
                            b"<Error><Code>NoSuchUpload</Code></Error>",
                        ),
                    }
                }
                ("POST", Some(id), _) => match fault {
                    Fault::CompleteTruncated => answer(
                        "200 OK",
                        "",
                        b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                          <CompleteMultipartUploadResult><Location>http://fake/k",
                    ),
                    Fault::CompleteError => answer(
                        "200 OK",
                        "",
                        b"\n\n<Error><Code>InternalError</Code><Message>boom</Message></Error>",
                    ),
                    _ => match st.uploads.remove(*id) {
                        Some(parts) => {
                            let data: Vec<u8> = parts.into_values().flatten().collect();
                            st.objects.insert(path.clone(), data);
                            answer(
                                "200 OK",
                                "",
                                b"<CompleteMultipartUploadResult><ETag>\"m\"</ETag>\
                                  </CompleteMultipartUploadResult>",
                            )
                        }
                        None => answer(
                            "404 Not Found",
                            "",
                            b"<Error><Code>NoSuchUpload</Code></Error>",
                        ),
                    },
                },
                ("DELETE", Some(id), _) => {
                    st.uploads.remove(*id);
                    answer("204 No Content", "", b"")
                }
                ("PUT", None, _) => {
                    let data = match &copy_source {
                        Some(src) => st.objects.get(src.as_str()).cloned(),
                        None => Some(body),
                    };
                    match data {
                        Some(d) => {
                            let e = etag(&d);
                            st.objects.insert(path.clone(), d);
                            if copy_source.is_some() {
                                answer(
                                    "200 OK",
                                    "",
                                    b"<CopyObjectResult><ETag>\"c\"</ETag></CopyObjectResult>",
                                )
                            } else {
                                answer("200 OK", &e, b"")
                            }
                        }
                        None => answer(
                            "404 Not Found",
                            "",
                            b"<Error><Code>NoSuchKey</Code></Error>",
                        ),
                    }
                }
                ("HEAD", _, _) => match st.objects.get(&path) {
                    Some(_) if fault == Fault::HeadNoLength => {
                        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec()
                    }
                    Some(d) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        d.len()
                    )
                    .into_bytes(),
                    None => b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n".to_vec(),
                },
                ("GET", _, _) => match st.objects.get(&path) {
                    Some(d) if fault == Fault::GetShort => {
                        let mut v = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            d.len()
                        )
                        .into_bytes();
                        v.extend_from_slice(&d[..d.len() / 2]);
                        v
                    }
                    Some(d) => answer("200 OK", "", d),
                    None => answer(
                        "404 Not Found",
                        "",
                        b"<Error><Code>NoSuchKey</Code></Error>",
                    ),
                },
                ("DELETE", None, _) => {
                    st.objects.remove(&path);
                    answer("204 No Content", "", b"")
                }
                _ => answer(
                    "400 Bad Request",
                    "",
                    b"<Error><Code>NotImplemented</Code></Error>",
                ),
            }
        };
        conn.write_all(&resp).await?;
        conn.shutdown().await
    }
}

use fake::{FakeS3, Fault};

impl S3 {
    /// A registry whose blobs live in `fake`.
    fn on_fake(fake: &FakeS3) -> S3 {
        // The store's errors are in the log only: shown when a test fails.
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let s3 = S3Config::from_url(
            &format!("s3://fake/p/?endpoint={}&region=x", fake.endpoint),
            |k| match k {
                "DOCKSIDE_S3_ACCESS_KEY" => Some("GKfake".into()),
                "DOCKSIDE_S3_SECRET_KEY" => Some("fake".into()),
                _ => None,
            },
        )
        .unwrap();
        S3 {
            kv: MemoryKv::new(),
            blobs: S3Blobs::new(&s3, HyperClient::new().unwrap()).unwrap(),
            s3,
            config: Config::default(),
        }
    }

    /// A monolithic push (POST with the digest and the body); returns the answer.
    async fn push_monolithic(&self, repo: &str, data: &[u8]) -> Resp {
        self.send(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?digest={}", sha256(data)),
            &[],
            data.to_vec(),
        )
        .await
    }

    /// Asserts `r` is a storage failure in the spec's envelope, and that `repo` does not know
    /// the blob `d` afterwards.
    async fn assert_failed_invisible(&self, what: &str, r: &Resp, repo: &str, d: &str) {
        let body = String::from_utf8_lossy(&r.body);
        assert!(r.status.is_server_error(), "{what}: {} {body}", r.status);
        let v: serde_json::Value =
            serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
        assert!(v["errors"][0]["code"].is_string(), "{what}: {body}");
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(r.header("retry-after").is_some(), "{what}");
        }
        let h = self
            .send(Method::HEAD, &format!("/v2/{repo}/blobs/{d}"), &[], vec![])
            .await;
        assert_eq!(h.status, 404, "{what}: the blob became visible");
    }
}

/// CreateMultipartUpload answering 200 with no XML: a 500, no blob.
#[tokio::test]
async fn garbage_create_multipart_answer_is_a_500() {
    let fake = FakeS3::start(Fault::CreateNotXml).await;
    let s = S3::on_fake(&fake);
    let data = pseudo_random(8 * MIB + 1, 20);
    let r = s.push_monolithic("g", &data).await;
    assert_eq!(r.status, 500);
    s.assert_failed_invisible("CreateMultipartUpload", &r, "g", &sha256(&data))
        .await;
    assert!(fake.saw("POST", &["uploads="]));
    assert!(!fake.saw("PUT", &["partNumber="]), "a part went up");
    assert!(fake.blobs().is_empty(), "{:?}", fake.blobs());
}

/// CompleteMultipartUpload answering 200 and then XML cut off, or an `<Error>` (S3 may fail
/// after its 200): a 5xx, no blob. Both where a monolithic push writes its body, and where the
/// closing PUT of a chunked upload assembles the blob itself (there, a cut-off answer taken
/// for a success would link a blob the store does not have).
#[tokio::test]
async fn garbage_complete_multipart_answers_are_5xx() {
    for fault in [Fault::CompleteTruncated, Fault::CompleteError] {
        let fake = FakeS3::start(fault).await;
        let s = S3::on_fake(&fake);
        let data = pseudo_random(8 * MIB + 1, 21);
        let r = s.push_monolithic("g", &data).await;
        s.assert_failed_invisible(&format!("{fault:?}"), &r, "g", &sha256(&data))
            .await;
        assert!(fake.saw("POST", &["uploadId="]), "{fault:?}: no completion");
        assert!(fake.blobs().is_empty(), "{fault:?}: {:?}", fake.blobs());

        // Two small chunks: each is one PutObject; the closing PUT makes the blob with a
        // multipart upload, whose completion is the fault.
        let data = pseudo_random(3000, 26);
        let d = sha256(&data);
        let mut loc = s.start("c").await;
        for (a, b) in [(0, 1000), (1000, 3000)] {
            let r = s
                .send(
                    Method::PATCH,
                    &loc,
                    &[("content-range", &format!("{a}-{}", b - 1))],
                    data[a..b].to_vec(),
                )
                .await;
            assert_eq!(r.status, 202);
            loc = r.header("location").unwrap().to_owned();
        }
        let r = s
            .send(Method::PUT, &format!("{loc}?digest={d}"), &[], vec![])
            .await;
        s.assert_failed_invisible(&format!("{fault:?}, chunked"), &r, "c", &d)
            .await;
    }
}

/// HeadObject answering 200 without a Content-Length (the closing PUT asks whether the blob is
/// already stored): a 500, no blob.
#[tokio::test]
async fn head_without_content_length_is_a_500() {
    let fake = FakeS3::start(Fault::HeadNoLength).await;
    let s = S3::on_fake(&fake);
    let data = pseudo_random(1000, 22);
    // A blob already in the store, as another repository's push would have left it.
    let d = sha256(&data);
    let hex = d.strip_prefix("sha256:").unwrap();
    fake.state.lock().unwrap().objects.insert(
        format!("/fake/p/blobs/sha256/{}/{hex}", &hex[..2]),
        data.clone(),
    );
    let r = s.push_monolithic("g", &data).await;
    assert_eq!(r.status, 500);
    s.assert_failed_invisible("HeadObject", &r, "g", &d).await;
    assert!(fake.saw("HEAD", &[&format!("/blobs/sha256/{}/{hex}", &hex[..2])]));
}

/// GetObject sending less than its Content-Length: when the closing PUT reads small chunks
/// back to assemble them, a 503 and no blob; when a client pulls, the body ends in an error,
/// never as a short blob that looks whole.
#[tokio::test]
async fn short_store_bodies_are_errors() {
    let fake = FakeS3::start(Fault::None).await;
    let s = S3::on_fake(&fake);
    let data = pseudo_random(3000, 23);
    let d = sha256(&data);
    let mut loc = s.start("g").await;
    for (a, b) in [(0, 1000), (1000, 3000)] {
        let r = s
            .send(
                Method::PATCH,
                &loc,
                &[("content-range", &format!("{a}-{}", b - 1))],
                data[a..b].to_vec(),
            )
            .await;
        assert_eq!(r.status, 202);
        loc = r.header("location").unwrap().to_owned();
    }
    fake.set_fault(Fault::GetShort);
    let r = s
        .send(Method::PUT, &format!("{loc}?digest={d}"), &[], vec![])
        .await;
    s.assert_failed_invisible("short read-back", &r, "g", &d)
        .await;
    assert!(
        fake.saw("GET", &["/fake/p/uploads/"]),
        "no part was read back"
    );
    assert!(fake.blobs().is_empty(), "{:?}", fake.blobs());

    // A blob pushed while the store behaves, pulled while it does not.
    fake.set_fault(Fault::None);
    let d = s.push_chunked("h", &data, &[3000]).await;
    fake.set_fault(Fault::GetShort);
    let req = Request::get(format!("/v2/h/blobs/{d}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = Registry::new(s.kv.clone(), s.blobs.clone(), s.config.clone())
        .handle(req)
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], "3000");
    let got = resp.into_body().collect().await;
    assert!(got.is_err(), "a short body was passed on as the whole blob");
}

/// Storage that drops the connection in the middle of every upload (stopped mid-push): after
/// the retries, a 503 with `Retry-After`, no blob, and the multipart upload aborted.
#[tokio::test]
async fn storage_gone_mid_push_is_a_503() {
    let fake = FakeS3::start(Fault::CloseMidUpload).await;
    let s = S3::on_fake(&fake);
    for size in [1000, 8 * MIB + 1] {
        let data = pseudo_random(size, 24);
        let r = s.push_monolithic("g", &data).await;
        assert_eq!(
            r.status,
            503,
            "{size} bytes: {}",
            String::from_utf8_lossy(&r.body)
        );
        s.assert_failed_invisible("closed mid-push", &r, "g", &sha256(&data))
            .await;
    }
    assert!(fake.blobs().is_empty(), "{:?}", fake.blobs());
    let st = fake.state.lock().unwrap();
    assert!(
        st.requests
            .iter()
            .any(|r| r.starts_with("DELETE ") && r.contains("uploadId=")),
        "the multipart upload was not aborted: {:?}",
        st.requests
    );
}

/// An object of the wrong size already under a blob's name (a store gone wrong) is not taken
/// for the blob: the push stores the real bytes over it.
#[tokio::test]
async fn a_wrong_object_under_the_blob_name_is_replaced() {
    let fake = FakeS3::start(Fault::None).await;
    let s = S3::on_fake(&fake);
    let data = pseudo_random(1000, 25);
    let d = sha256(&data);
    let hex = d.strip_prefix("sha256:").unwrap();
    let key = format!("/fake/p/blobs/sha256/{}/{hex}", &hex[..2]);
    fake.state
        .lock()
        .unwrap()
        .objects
        .insert(key.clone(), b"garbage".to_vec());
    let r = s.push_monolithic("g", &data).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert!(s.pull("g", &d).await == data);
    assert!(fake.state.lock().unwrap().objects[&key] == data);
}
