//! The pull-through mirror (`--mirror-config`, src/mirror) against real upstreams on loopback:
//! a test registry (`dockside::testing`), with token authentication or without, seeded over
//! HTTP with multi-platform images. Everything goes through the HTTP surface; upstream requests
//! are counted from those the upstream served. The mirror is `dockside serve --mirror-config`,
//! the binary (its flag, and its data directory across restarts, are under test).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Server, client, pseudo_random, sha256_digest};
use dockside::testing::TestRegistry;
use reqwest::StatusCode;
use serde_json::json;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const ACCEPT: &str =
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";

/// Upstream access control: `alice` pulls `team/**`, anyone pulls `public/*`, `admin` does
/// everything (seeding). No realm: dockside derives it from the request (`/token`).
fn upstream_auth() -> String {
    let h = |p: &str| bcrypt::hash(p, 4).unwrap();
    format!(
        r#"
[auth]
service = "upstream"
secret = "mirror-test-secret-mirror-test-secret-0123"

[[auth.users]]
name = "alice"
password_hash = "{}"

[[auth.users]]
name = "admin"
password_hash = "{}"

[[auth.rules]]
repositories = ["team/**"]
users = ["alice"]
actions = ["pull"]

[[auth.rules]]
repositories = ["public/*"]
users = ["anonymous"]
actions = ["pull"]

[[auth.rules]]
repositories = ["**"]
users = ["admin"]
actions = ["*"]
"#,
        h("alice-pw"),
        h("admin-pw")
    )
}

fn start_upstream(auth: bool) -> TestRegistry {
    let mut b = TestRegistry::builder().temp_dir();
    if auth {
        let auth = dockside::AuthConfig::from_toml(&upstream_auth())
            .unwrap()
            .map(std::sync::Arc::new);
        b = b.config(dockside::Config {
            auth,
            ..Default::default()
        });
    }
    b.start()
}

fn start_mirror(config: &str, dir: &Path, data: Option<&Path>) -> Server {
    let f = dir.join(format!("mirror-{}.toml", sha256_digest(config.as_bytes())));
    std::fs::write(&f, config).unwrap();
    // The binary: its --mirror-config and its data directory are under test.
    let mut b = Server::builder().arg("--mirror-config").arg(f);
    if let Some(d) = data {
        b = b.data_dir(d);
    }
    b.start()
}

struct Seeder {
    http: reqwest::Client,
    base: String,
    auth: Option<(&'static str, &'static str)>,
}

impl Seeder {
    fn req(&self, m: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let r = self.http.request(m, url);
        match self.auth {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    async fn blob(&self, repo: &str, data: Vec<u8>) -> String {
        let d = sha256_digest(&data);
        let r = self
            .req(
                reqwest::Method::POST,
                format!("{}/v2/{repo}/blobs/uploads/?digest={d}", self.base),
            )
            .header("content-type", "application/octet-stream")
            .body(data)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        d
    }

    async fn manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> String {
        let r = self
            .req(
                reqwest::Method::PUT,
                format!("{}/v2/{repo}/manifests/{reference}", self.base),
            )
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap()
        );
        sha256_digest(body)
    }

    /// A two-platform image (index → two manifests → config and one layer each) at
    /// `repo:tag`; returns the index's bytes and every blob.
    async fn image(&self, repo: &str, tag: &str, seed: u64) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut blobs = Vec::new();
        let mut manifests = Vec::new();
        for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
            let config =
                format!(r#"{{"architecture":"{arch}","os":"linux","seed":{seed}}}"#).into_bytes();
            let layer = pseudo_random(300_000 + i * 1000, seed * 10 + i as u64);
            let cd = self.blob(repo, config.clone()).await;
            let ld = self.blob(repo, layer.clone()).await;
            let m = serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": layer.len()}],
            }))
            .unwrap();
            let md = self
                .manifest(repo, &sha256_digest(&m), OCI_MANIFEST, &m)
                .await;
            manifests.push(
                json!({"mediaType": OCI_MANIFEST, "digest": md, "size": m.len(),
                "platform": {"architecture": arch, "os": "linux"}}),
            );
            blobs.push(config);
            blobs.push(layer);
        }
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests,
        }))
        .unwrap();
        self.manifest(repo, tag, OCI_INDEX, &index).await;
        (index, blobs)
    }
}

/// GETs `path` on `base`; status, content type, digest header, body.
async fn get(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String, String, Vec<u8>) {
    let mut r = http.get(format!("{base}{path}")).header("accept", ACCEPT);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    let s = r.status();
    let h = |n: &str| {
        r.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (ct, d) = (h("content-type"), h("docker-content-digest"));
    (s, ct, d, r.bytes().await.unwrap().to_vec())
}

/// Pulls the whole image `repo:tag` through the mirror and checks it byte for byte against
/// the upstream (same bytes, Content-Type and digest for every manifest).
async fn pull_and_compare(
    http: &reqwest::Client,
    mirror: &str,
    up: &str,
    repo: &str,
    up_repo: &str,
    tag: &str,
    up_auth: (&str, &str),
) {
    let up_get = |path: String| {
        let http = http.clone();
        let up = up.to_owned();
        let (u, p) = (up_auth.0.to_owned(), up_auth.1.to_owned());
        async move {
            let r = http
                .get(format!("{up}{path}"))
                .header("accept", ACCEPT)
                .basic_auth(u, Some(p))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "upstream {path}");
            let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
            (ct, r.bytes().await.unwrap().to_vec())
        }
    };
    let (s, ct, d, index) = get(http, mirror, &format!("/v2/{repo}/manifests/{tag}"), &[]).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&index));
    let (uct, uindex) = up_get(format!("/v2/{up_repo}/manifests/{tag}")).await;
    assert_eq!((ct.as_str(), &index), (uct.as_str(), &uindex));
    assert_eq!(d, sha256_digest(&index));
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    for m in index["manifests"].as_array().unwrap() {
        let md = m["digest"].as_str().unwrap();
        let (s, ct, d, mb) = get(http, mirror, &format!("/v2/{repo}/manifests/{md}"), &[]).await;
        assert_eq!(s, StatusCode::OK);
        let (uct, umb) = up_get(format!("/v2/{up_repo}/manifests/{md}")).await;
        assert_eq!((ct, &mb, d.as_str()), (uct, &umb, md));
        let mv: serde_json::Value = serde_json::from_slice(&mb).unwrap();
        let mut descs = vec![mv["config"].clone()];
        descs.extend(mv["layers"].as_array().unwrap().iter().cloned());
        for desc in descs {
            let bd = desc["digest"].as_str().unwrap();
            let (s, _, d, b) = get(http, mirror, &format!("/v2/{repo}/blobs/{bd}"), &[]).await;
            assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
            assert_eq!(d, bd);
            assert_eq!(sha256_digest(&b), bd);
            let (_, ub) = up_get(format!("/v2/{up_repo}/blobs/{bd}")).await;
            assert_eq!(b, ub);
        }
    }
}

fn error_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "not the JSON error envelope ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn token_upstream_pull_through_cache_offline_and_push_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let http = client();
    let up = start_upstream(true);
    let seeder = Seeder {
        http: http.clone(),
        base: up.url().to_owned(),
        auth: Some(("admin", "admin-pw")),
    };
    let (_, blobs) = seeder.image("team/app", "v1", 1).await;
    seeder.image("public/base", "3.20", 2).await;
    let extra = seeder.blob("team/app", pseudo_random(1000, 99)).await;

    // `hub/` maps to the upstream with alice's credentials; `library = true` makes `hub/base`
    // the upstream's `library/base` (not seeded: a clean 404).
    let config = format!(
        r#"
tag_ttl_secs = 1
[[upstream]]
url = "{}"
prefix = "hub/"
library = true
username = "alice"
password = "alice-pw"

[[upstream]]
url = "{}"
prefix = "anon/"
"#,
        up.url(),
        up.url()
    );
    let mirror_data = tempfile::tempdir().unwrap();
    let mirror = start_mirror(&config, tmp.path(), Some(mirror_data.path()));
    let mb = mirror.base_url();

    // With credentials (the Bearer flow with Basic to the token service), and anonymously.
    pull_and_compare(
        &http,
        &mb,
        up.url(),
        "hub/team/app",
        "team/app",
        "v1",
        ("admin", "admin-pw"),
    )
    .await;
    pull_and_compare(
        &http,
        &mb,
        up.url(),
        "anon/public/base",
        "public/base",
        "3.20",
        ("admin", "admin-pw"),
    )
    .await;
    // Anonymous tokens do not open team/: the upstream's refusal, as an error envelope.
    let (s, _, _, body) = get(&http, &mb, "/v2/anon/team/app/manifests/v1", &[]).await;
    assert_eq!(
        s,
        StatusCode::BAD_GATEWAY,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(error_code(&body), "UNKNOWN");
    let (s, _, _, body) = get(&http, &mb, "/v2/anon/public/nothing/manifests/latest", &[]).await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let code = error_code(&body);
    assert!(
        ["NAME_UNKNOWN", "MANIFEST_UNKNOWN"].contains(&code.as_str()),
        "{code}"
    );

    // Range from the cache.
    let b0 = sha256_digest(&blobs[1]);
    let (s, _, _, part) = get(
        &http,
        &mb,
        &format!("/v2/hub/team/app/blobs/{b0}"),
        &[("range", "bytes=10-19")],
    )
    .await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part, blobs[1][10..20]);

    // Pushes to a mirrored name: 405 UNSUPPORTED.
    let r = http
        .post(format!("{mb}/v2/hub/team/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(&r.bytes().await.unwrap()), "UNSUPPORTED");
    let r = http
        .put(format!("{mb}/v2/hub/team/app/manifests/v2"))
        .header("content-type", OCI_INDEX)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    // Names outside every prefix are an ordinary registry.
    let local = Seeder {
        http: http.clone(),
        base: mb.clone(),
        auth: None,
    };
    local.blob("mine/app", b"local".to_vec()).await;

    // Tokens live in the key-value store, not in memory: a restarted mirror on the same data
    // asks the token service nothing for a scope it has a token for.
    let tokens_before = common::served(&up, "GET", "/token", None);
    assert!(tokens_before >= 1, "the Bearer flow was used");
    assert!(
        std::fs::read_dir(mirror_data.path().join("kv/mirror-tokens"))
            .unwrap()
            .count()
            >= 2,
        "tokens are stored"
    );
    drop(mirror);
    let mirror = start_mirror(&config, tmp.path(), Some(mirror_data.path()));
    let mb = mirror.base_url();
    let (s, _, _, b) = get(&http, &mb, &format!("/v2/hub/team/app/blobs/{extra}"), &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(sha256_digest(&b), extra);
    assert_eq!(
        common::served(&up, "GET", "/token", None),
        tokens_before,
        "the stored token was reused"
    );

    // Upstream gone: cached pulls work (the tag past its TTL: the failed HEAD keeps the cached
    // manifest), uncached ones fail with 503 and the error envelope.
    drop(up);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (s, _, _, _) = get(&http, &mb, "/v2/hub/team/app/manifests/v1", &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _, b) = get(&http, &mb, &format!("/v2/hub/team/app/blobs/{b0}"), &[]).await;
    assert_eq!((s, b), (StatusCode::OK, blobs[1].clone()));
    let missing = sha256_digest(b"never fetched");
    let (s, _, _, body) = get(
        &http,
        &mb,
        &format!("/v2/hub/team/app/blobs/{missing}"),
        &[],
    )
    .await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(error_code(&body), "UNKNOWN");
    let (s, _, _, _) = get(&http, &mb, "/v2/hub/team/other/manifests/v1", &[]).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread")]
async fn tag_moved_upstream_is_seen_after_the_ttl() {
    let tmp = tempfile::tempdir().unwrap();
    let http = client();
    let up = start_upstream(false);
    let seeder = Seeder {
        http: http.clone(),
        base: up.url().to_owned(),
        auth: None,
    };
    let (first, _) = seeder.image("library/alpine", "latest", 1).await;
    // Every name, and `hub/<name>` with Docker Hub's rule (`hub/alpine` is `library/alpine`).
    let config = format!(
        "tag_ttl_secs = 3\n[[upstream]]\nurl = \"{0}\"\n\n\
         [[upstream]]\nurl = \"{0}\"\nprefix = \"hub/\"\nlibrary = true\n",
        up.url()
    );
    let mirror = start_mirror(&config, tmp.path(), None);
    let mb = mirror.base_url();
    let (s, _, d1, b) = get(&http, &mb, "/v2/library/alpine/manifests/latest", &[]).await;
    assert_eq!((s, &b), (StatusCode::OK, &first));
    let started = std::time::Instant::now();
    let (second, _) = seeder.image("library/alpine", "latest", 2).await;
    assert_ne!(first, second);
    // Within the TTL: the cached one, without asking upstream.
    let heads = common::served(&up, "HEAD", "/v2/library/alpine/manifests/latest", None);
    let (_, _, d, _) = get(&http, &mb, "/v2/library/alpine/manifests/latest", &[]).await;
    if started.elapsed() < Duration::from_secs(3) {
        assert_eq!(d, d1);
        assert_eq!(
            common::served(&up, "HEAD", "/v2/library/alpine/manifests/latest", None),
            heads
        );
    }
    tokio::time::sleep(Duration::from_millis(3200).saturating_sub(started.elapsed())).await;
    let (s, _, d2, b) = get(&http, &mb, "/v2/library/alpine/manifests/latest", &[]).await;
    assert_eq!((s, &b), (StatusCode::OK, &second));
    assert_eq!(d2, sha256_digest(&second));
    assert!(common::served(&up, "HEAD", "/v2/library/alpine/manifests/latest", None) > heads);
    let (s, _, d4, _) = get(&http, &mb, "/v2/hub/alpine/manifests/latest", &[]).await;
    assert_eq!((s, d4), (StatusCode::OK, d2.clone()));
    // containerd's form: the upstream's own name and ?ns=<its host>.
    let ns = up.addr().to_string();
    let (s, _, d3, _) = get(
        &http,
        &mb,
        &format!("/v2/library/alpine/manifests/latest?ns={ns}"),
        &[],
    )
    .await;
    assert_eq!((s, d3), (StatusCode::OK, d2));
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_upstream_blob_is_refused_and_never_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let http = client();
    let up = start_upstream(false);
    let seeder = Seeder {
        http: http.clone(),
        base: up.url().to_owned(),
        auth: None,
    };
    let data = pseudo_random(2 * 1024 * 1024 + 7, 5);
    let d = seeder.blob("library/bad", data.clone()).await;
    let hex = d.trim_start_matches("sha256:");
    // Same length, one byte changed, in the upstream's own store.
    let path = up
        .data_dir()
        .unwrap()
        .join(format!("blobs/sha256/{}/{hex}", &hex[..2]));
    let mut bad = std::fs::read(&path).unwrap();
    bad[1_000_000] ^= 0xff;
    std::fs::write(&path, &bad).unwrap();

    let config = format!("[[upstream]]\nurl = \"{}\"\n", up.url());
    let mirror = start_mirror(&config, tmp.path(), None);
    let mb = mirror.base_url();
    // With a `Range`, a cold blob is fetched whole before the answer (as on adapters that
    // offer no early response): the verification failure is a 502. Without one the native
    // server streams, and the transfer aborts instead (tests/mirror_stream.rs).
    for _ in 0..2 {
        let (s, _, _, body) = get(
            &http,
            &mb,
            &format!("/v2/library/bad/blobs/{d}"),
            &[("range", "bytes=0-")],
        )
        .await;
        assert_eq!(
            s,
            StatusCode::BAD_GATEWAY,
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(error_code(&body), "UNKNOWN");
    }
    let stored = mirror
        .data_dir()
        .join(format!("blobs/sha256/{}/{hex}", &hex[..2]));
    assert!(
        !stored.exists(),
        "a blob failing verification never reaches the store"
    );
    // Repaired upstream: fetched, verified, served.
    std::fs::write(&path, &data).unwrap();
    let (s, _, _, b) = get(&http, &mb, &format!("/v2/library/bad/blobs/{d}"), &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert!(b == data);
    assert!(stored.exists());
}

/// Ten clients ask for one uncached layer at once; the upstream serves it once. Size:
/// `DOCKSIDE_MIRROR_TEST_MIB` (default 512, the issue's figure).
#[tokio::test(flavor = "multi_thread")]
async fn ten_concurrent_pulls_of_one_large_layer_fetch_it_once() {
    let mib: usize = std::env::var("DOCKSIDE_MIRROR_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let tmp = tempfile::tempdir().unwrap();
    let http = client();
    let up = start_upstream(false);
    let seeder = Seeder {
        http: http.clone(),
        base: up.url().to_owned(),
        auth: None,
    };
    let data = pseudo_random(mib * 1024 * 1024, 7);
    let d = seeder.blob("library/big", data).await;
    let config = format!("[[upstream]]\nurl = \"{}\"\n", up.url());
    let mirror = start_mirror(&config, tmp.path(), None);
    let mb = mirror.base_url();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (http, url, want) = (
            http.clone(),
            format!("{mb}/v2/library/big/blobs/{d}"),
            d.clone(),
        );
        tasks.push(tokio::spawn(async move {
            use sha2::Digest as _;
            let mut r = http.get(url).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let mut h = sha2::Sha256::new();
            let mut n = 0usize;
            while let Some(c) = r.chunk().await.unwrap() {
                n += c.len();
                h.update(&c);
            }
            assert_eq!(common::sha256_finish(h), want);
            n
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), mib * 1024 * 1024);
    }
    assert_eq!(
        common::served(&up, "GET", &format!("/v2/library/big/blobs/{d}"), Some(200)),
        1,
        "one upstream fetch for ten clients"
    );
}

/// GETs `url` (with Basic credentials if given): status, headers, body.
async fn list_get(
    http: &reqwest::Client,
    url: &str,
    auth: Option<(&str, &str)>,
) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    let mut r = http.get(url);
    if let Some((u, p)) = auth {
        r = r.basic_auth(u, Some(p));
    }
    let r = r.send().await.unwrap();
    let (s, h) = (r.status(), r.headers().clone());
    (s, h, r.bytes().await.unwrap().to_vec())
}

fn header(h: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| v.to_str().unwrap().to_owned())
}

fn tags_of(body: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    serde_json::from_value(v["tags"].clone()).unwrap()
}

fn referrer_digests(body: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_owned())
        .collect()
}

/// The tags list and the referrers list of a mirrored repository are the upstream's (what was
/// added there after the mirror cached the repository shows at once), paginated under the
/// mirror's names; with the upstream gone, the cached lists answer.
#[tokio::test(flavor = "multi_thread")]
async fn tags_and_referrers_come_from_the_upstream_then_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let http = client();
    let up = start_upstream(true);
    let ub = up.url().to_owned();
    let admin = Some(("admin", "admin-pw"));
    let seeder = Seeder {
        http: http.clone(),
        base: ub.clone(),
        auth: admin,
    };
    let (index, _) = seeder.image("team/app", "v1", 3).await;
    let subject = sha256_digest(&index);
    let config = format!(
        "tag_ttl_secs = 1\n[[upstream]]\nurl = \"{ub}\"\nprefix = \"hub/\"\n\
         username = \"alice\"\npassword = \"alice-pw\"\n"
    );
    let mirror = start_mirror(&config, tmp.path(), None);
    let mb = mirror.base_url();
    let (s, _, _, _) = get(&http, &mb, "/v2/hub/team/app/manifests/v1", &[]).await;
    assert_eq!(s, StatusCode::OK);

    // Added upstream after the subject was cached: a signature and two tags.
    let empty = seeder.blob("team/app", b"{}".to_vec()).await;
    let empty_desc =
        json!({"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2});
    let sig = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sig",
        "config": empty_desc,
        "layers": [empty_desc],
        "subject": {"mediaType": OCI_INDEX, "digest": subject, "size": index.len()},
    }))
    .unwrap();
    let sig_d = seeder
        .manifest("team/app", &sha256_digest(&sig), OCI_MANIFEST, &sig)
        .await;
    for tag in ["v2", "v3"] {
        seeder.manifest("team/app", tag, OCI_INDEX, &index).await;
    }

    // Referrers: the upstream's body and Content-Type, its filtering said.
    let rpath = format!("/team/app/referrers/{subject}");
    let (s, h, body) = list_get(&http, &format!("{mb}/v2/hub{rpath}"), None).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (us, uh, ubody) = list_get(&http, &format!("{ub}/v2{rpath}"), admin).await;
    assert_eq!(us, StatusCode::OK);
    assert_eq!(body, ubody);
    assert_eq!(header(&h, "content-type"), header(&uh, "content-type"));
    assert_eq!(header(&h, "content-type").as_deref(), Some(OCI_INDEX));
    assert_eq!(referrer_digests(&body), vec![sig_d.clone()]);
    for (artifact, want) in [
        ("application/vnd.example.sig", vec![sig_d.clone()]),
        ("application/vnd.example.other", vec![]),
    ] {
        let (s, h, body) = list_get(
            &http,
            &format!("{mb}/v2/hub{rpath}?artifactType={artifact}"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            header(&h, "oci-filters-applied").as_deref(),
            Some("artifactType")
        );
        assert_eq!(referrer_digests(&body), want);
    }
    // Pulled through, the signature is cached with its subject (the offline list below).
    let (s, _, _, b) = get(
        &http,
        &mb,
        &format!("/v2/hub/team/app/manifests/{sig_d}"),
        &[],
    )
    .await;
    assert_eq!((s, b), (StatusCode::OK, sig.clone()));

    // Tags: the upstream's list, whole and by pages, the Link under the mirror's name.
    let (s, _, body) = list_get(&http, &format!("{mb}/v2/hub/team/app/tags/list"), None).await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, ubody) = list_get(&http, &format!("{ub}/v2/team/app/tags/list"), admin).await;
    // The upstream's list, under the name asked here (end-8a: the repository's `name`).
    let (ours, theirs): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&body).unwrap(),
        serde_json::from_slice(&ubody).unwrap(),
    );
    assert_eq!(ours["tags"], theirs["tags"]);
    assert_eq!(ours["name"], "hub/team/app");
    assert_eq!(theirs["name"], "team/app");
    assert_eq!(tags_of(&body), ["v1", "v2", "v3"]);
    let (s, h, body) = list_get(&http, &format!("{mb}/v2/hub/team/app/tags/list?n=2"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(tags_of(&body), ["v1", "v2"]);
    let link = header(&h, "link").expect("a Link to the next page");
    assert_eq!(
        link,
        "</v2/hub/team/app/tags/list?n=2&last=v2>; rel=\"next\""
    );
    let next = &link[1..link.find('>').unwrap()];
    let (s, h, body) = list_get(&http, &format!("{mb}{next}"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(tags_of(&body), ["v3"]);
    assert_eq!(header(&h, "link"), None);
    // containerd's form: the upstream's name and ?ns=, kept in the Link.
    let ns = up.addr().to_string();
    let (s, h, body) = list_get(
        &http,
        &format!("{mb}/v2/team/app/tags/list?n=1&last=v1&ns={ns}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(tags_of(&body), ["v2"]);
    let link = header(&h, "link").unwrap();
    assert!(
        link.starts_with("</v2/team/app/tags/list?n=1&last=v2&ns=127.0.0.1"),
        "{link}"
    );
    let next = &link[1..link.find('>').unwrap()];
    let (s, _, body) = list_get(&http, &format!("{mb}{next}"), None).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(tags_of(&body), ["v3"]);

    // Refusals, in the error envelope: bad input here, an unknown repository upstream.
    let (s, _, body) = list_get(&http, &format!("{mb}/v2/hub/team/app/tags/list?n=x"), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "UNSUPPORTED");
    let (s, _, body) = list_get(&http, &format!("{mb}/v2/hub/team/none/tags/list"), None).await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(error_code(&body), "NAME_UNKNOWN");
    let tag_lists = common::served(&up, "GET", "/v2/team/app/tags/list", None);
    assert!(
        tag_lists >= 3,
        "tags lists were asked upstream: {tag_lists}"
    );

    // Upstream gone: what was pulled through answers (v1 only: v2 and v3 were only listed).
    drop(up);
    let (s, _, body) = list_get(&http, &format!("{mb}/v2/hub/team/app/tags/list"), None).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(tags_of(&body), ["v1"]);
    let (s, h, body) = list_get(&http, &format!("{mb}/v2/hub{rpath}"), None).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&h, "content-type").as_deref(), Some(OCI_INDEX));
    assert_eq!(referrer_digests(&body), vec![sig_d]);
    // Nothing cached for that repository: 503, not an empty list.
    let (s, _, body) = list_get(&http, &format!("{mb}/v2/hub/team/other/tags/list"), None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(&body), "UNKNOWN");
}

/// More referrers than the upstream's page (1000): the mirror passes the upstream's pages on,
/// its `Link` rewritten to the mirror's name, and following it gets the rest.
#[tokio::test(flavor = "multi_thread")]
async fn referrers_pages_follow_the_upstream_through_the_mirror() {
    let tmp = tempfile::tempdir().unwrap();
    let http = client();
    let up = start_upstream(false);
    let ub = up.url().to_owned();
    let seeder = std::sync::Arc::new(Seeder {
        http: http.clone(),
        base: ub.clone(),
        auth: None,
    });
    let repo = "library/signed";
    let empty = seeder.blob(repo, b"{}".to_vec()).await;
    let empty_desc =
        json!({"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2});
    let subject = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": empty_desc, "layers": [empty_desc],
    }))
    .unwrap();
    let subject_d = seeder.manifest(repo, "v1", OCI_MANIFEST, &subject).await;
    const COUNT: usize = 1001;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (seeder, empty_desc, subject_d) =
            (seeder.clone(), empty_desc.clone(), subject_d.clone());
        let size = subject.len();
        tasks.spawn(async move {
            for i in (worker..COUNT).step_by(8) {
                let m = serde_json::to_vec(&json!({
                    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "artifactType": "application/vnd.example.sbom",
                    "config": empty_desc, "layers": [empty_desc],
                    "subject": {"mediaType": OCI_MANIFEST, "digest": subject_d, "size": size},
                    "annotations": {"n": i.to_string()},
                }))
                .unwrap();
                seeder
                    .manifest(repo, &sha256_digest(&m), OCI_MANIFEST, &m)
                    .await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let config = format!("[[upstream]]\nurl = \"{ub}\"\nprefix = \"hub/\"\nlibrary = true\n");
    let mirror = start_mirror(&config, tmp.path(), None);
    let mb = mirror.base_url();

    let mut url = format!("{mb}/v2/hub/signed/referrers/{subject_d}");
    let mut up_url = format!("{ub}/v2/{repo}/referrers/{subject_d}");
    let mut seen = std::collections::HashSet::new();
    let mut pages = 0;
    loop {
        let (s, h, body) = list_get(&http, &url, None).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let (_, uh, ubody) = list_get(&http, &up_url, None).await;
        assert!(body == ubody, "page {pages}: the upstream's bytes");
        seen.extend(referrer_digests(&body));
        pages += 1;
        let (Some(link), Some(up_link)) = (header(&h, "link"), header(&uh, "link")) else {
            assert_eq!(header(&h, "link"), header(&uh, "link"), "both end together");
            break;
        };
        let next = &link[1..link.find('>').unwrap()];
        let up_next = &up_link[1..up_link.find('>').unwrap()];
        assert_eq!(
            next,
            up_next.replacen("/v2/library/signed/", "/v2/hub/signed/", 1),
            "the upstream's Link under the mirror's name"
        );
        url = format!("{mb}{next}");
        up_url = format!("{ub}{up_next}");
        assert!(pages < 5, "pagination ends");
    }
    assert!(pages >= 2, "the upstream paginates past 1000");
    assert_eq!(seen.len(), COUNT);
}
