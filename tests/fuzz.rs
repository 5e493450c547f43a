//! Randomized requests against `Registry::handle`: malformed paths, digests, headers, ranges and
//! manifests (random bytes and structural mutations of valid ones). Whatever arrives, the
//! answer is never a 5xx and never a panic, and every error carries the spec's envelope.
//!
//! Deterministic (a fixed-seed generator), so a failure reproduces; `DOCKSIDE_FUZZ_ITERS` runs
//! longer locally.

use bytes::Bytes;
use dockside::{Config, MemoryBlobs, MemoryKv, Registry};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

const CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
    "TAG_INVALID",
];

/// Replaces a random value somewhere in `v` with a random JSON value of another kind.
fn mutate(rng: &mut Rng, v: &mut Value) {
    let replacement = match rng.below(8) {
        0 => Value::Null,
        1 => json!(-1),
        2 => json!("sha256:zz"),
        3 => json!([]),
        4 => json!({}),
        5 => json!(u64::MAX),
        6 => json!(sha256(b"ghost")),
        _ => json!("x".repeat(rng.below(300))),
    };
    match v {
        Value::Object(m) if !m.is_empty() && rng.below(3) > 0 => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = rng.pick(&keys).clone();
            if rng.below(5) == 0 {
                m.remove(&k);
            } else {
                mutate(rng, m.get_mut(&k).unwrap());
            }
        }
        Value::Array(a) if !a.is_empty() && rng.below(3) > 0 => {
            let i = rng.below(a.len());
            mutate(rng, &mut a[i]);
        }
        _ => *v = replacement,
    }
}

#[tokio::test]
async fn random_requests_never_fail_the_server() {
    let iters: usize = std::env::var("DOCKSIDE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let kv = MemoryKv::new();
    let blobs = MemoryBlobs::new();
    let config = Config {
        max_manifest_bytes: 64 * 1024,
        max_chunk_bytes: Some(4096),
        ..Config::default()
    };
    let registry = Registry::new(kv, blobs, config);

    // Some real content, so that requests reach deep paths too.
    let layer = b"layer bytes".to_vec();
    let config_blob = b"{}".to_vec();
    for b in [&layer, &config_blob] {
        let req = Request::post(format!("/v2/repo/blobs/uploads/?digest={}", sha256(b)))
            .body(Full::new(Bytes::from(b.clone())))
            .unwrap();
        assert_eq!(registry.handle(req).await.status(), 201);
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config_blob), "size": config_blob.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(&layer), "size": layer.len()}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(b"s"), "size": 1},
        "annotations": {"a": "b"},
    });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(b"m"), "size": 1}],
    });

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut uploads: Vec<String> = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut codes = std::collections::BTreeSet::<String>::new();
    let names = [
        "repo", "repo", "repo", "repo", "a/b", "UPPER", "a//b", "..", "_x", "a-", "%2e%2e",
        "x%2Fy", "é", "",
    ];
    let digests = [
        sha256(&layer),
        sha256(b"nothing"),
        "latest".to_owned(),
        "v1".to_owned(),
        "sha256:abc".to_owned(),
        "sha512:00".to_owned(),
        "md5:d41d8cd98f00b204e9800998ecf8427e".to_owned(),
        "sha256%3A00".to_owned(),
        "latest".to_owned(),
        "-bad".to_owned(),
        "a".repeat(200),
        "sha256:".to_owned() + &"A".repeat(64),
    ];
    for i in 0..iters {
        let name = *rng.pick(&names);
        let d = rng.pick(&digests).clone();
        use Method as M;
        let (mut path, fitting): (String, &[Method]) = match rng.below(12) {
            0 => (
                format!("/v2/{name}/blobs/{d}"),
                &[M::GET, M::HEAD, M::DELETE],
            ),
            1 | 8 => (
                format!("/v2/{name}/manifests/{d}"),
                &[M::GET, M::HEAD, M::PUT, M::DELETE],
            ),
            2 => (format!("/v2/{name}/blobs/uploads/"), &[M::POST]),
            3 | 9 | 10 if !uploads.is_empty() => (
                rng.pick(&uploads).clone(),
                &[M::GET, M::PATCH, M::PATCH, M::PUT, M::DELETE],
            ),
            3 => (format!("/v2/{name}/blobs/uploads/{d}"), &[M::PATCH]),
            4 => (format!("/v2/{name}/tags/list"), &[M::GET]),
            5 => (format!("/v2/{name}/referrers/{d}"), &[M::GET]),
            6 => ("/v2/_catalog".to_owned(), &[M::GET]),
            7 => (
                format!(
                    "/v2/{}",
                    String::from_utf8_lossy(&rng.bytes(20)).replace(['?', '#', ' '], "")
                ),
                &[M::GET],
            ),
            _ => ("/v2/".to_owned(), &[M::GET]),
        };
        let method = if rng.below(4) == 0 {
            rng.pick(&[
                M::GET,
                M::HEAD,
                M::PUT,
                M::POST,
                M::PATCH,
                M::DELETE,
                M::OPTIONS,
            ])
            .clone()
        } else {
            rng.pick(fitting).clone()
        };
        let query = match rng.below(10) {
            0 => format!("?digest={d}"),
            1 => format!("?mount={d}&from={name}"),
            2 => "?digest-algorithm=sha512".to_owned(),
            3 => format!(
                "?n={}&last={d}",
                rng.pick(&[
                    "0",
                    "1",
                    "-1",
                    "x",
                    "99999999999999999999",
                    "18446744073709551615",
                ])
            ),
            4 => format!("?tag={d}&tag=ok"),
            5 => "?artifactType=a%2Fb".to_owned(),
            _ => String::new(),
        };
        path.push_str(&query);
        let Ok(uri) = path.parse::<http::Uri>() else {
            continue;
        };
        let body: Vec<u8> = match rng.below(5) {
            0 => rng.bytes(8192),
            1 => {
                let mut m = if rng.below(2) == 0 {
                    manifest.clone()
                } else {
                    index.clone()
                };
                for _ in 0..1 + rng.below(3) {
                    mutate(&mut rng, &mut m);
                }
                serde_json::to_vec(&m).unwrap()
            }
            2 => serde_json::to_vec(&manifest).unwrap(),
            _ => Vec::new(),
        };
        let mut req = Request::builder().method(method.clone()).uri(uri);
        if rng.below(3) == 0 {
            let v = rng
                .pick(&[
                    "0-0",
                    "5-1",
                    "0-10",
                    "bytes=0-",
                    "garbage",
                    "1-99999999999999999999",
                    "0-3",
                    // u64::MAX: `end - start + 1` must not wrap.
                    "0-18446744073709551615",
                    "18446744073709551615-18446744073709551615",
                    "bytes 0-18446744073709551615/*",
                ])
                .to_string();
            req = req.header("content-range", v);
        }
        if rng.below(3) == 0 {
            let v = rng
                .pick(&[
                    "bytes=0-0",
                    "bytes=-1",
                    "bytes=9-",
                    "bytes=1-0",
                    "bytes=0-1,2-3",
                    "x",
                    "bytes=18446744073709551615-",
                    "bytes=-18446744073709551615",
                    "bytes=0-18446744073709551615",
                ])
                .to_string();
            req = req.header("range", v);
        }
        if rng.below(3) == 0 {
            let v = rng
                .pick(&[
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                    "text/plain",
                    "",
                ])
                .to_string();
            req = req.header("content-type", v);
        }
        if rng.below(4) == 0 {
            let v = rng
                .pick(&[
                    "0",
                    "1",
                    "abc",
                    "99999999999999999999",
                    "18446744073709551615",
                ])
                .to_string();
            req = req.header("content-length", v);
        }
        let req = req.body(Full::new(Bytes::from(body))).unwrap();
        let resp = registry.handle(req).await;
        let status = resp.status();
        if let Some(loc) = resp.headers().get("location").and_then(|l| l.to_str().ok())
            && loc.contains("/uploads/")
        {
            uploads.push(loc.to_owned());
        }
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        *statuses.entry(status.as_u16()).or_default() += 1;
        assert!(
            !status.is_server_error(),
            "iteration {i}: {method} {path} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        if status.is_client_error() && method != Method::HEAD {
            let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
                panic!("iteration {i}: {method} {path}: error body not JSON: {e}")
            });
            let code = v["errors"][0]["code"].as_str().unwrap_or_default();
            assert!(
                CODES.contains(&code),
                "iteration {i}: {method} {path}: code {code:?}"
            );
            codes.insert(code.to_owned());
        }
    }
    println!("statuses: {statuses:?}\ncodes: {codes:?}");
    // The generator reaches past validation: successes and a spread of errors.
    for s in [200, 201, 202, 204, 400, 404, 405, 413, 416] {
        assert!(statuses.contains_key(&s), "no {s} in {statuses:?}");
    }
    assert!(codes.len() >= 10, "{codes:?}");
}
