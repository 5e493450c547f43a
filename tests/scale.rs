//! Several `dockside serve` processes on shared stores: blobs in one Garage bucket, keys in one
//! Valkey/Redis (each test under prefixes of its own), driven through the HTTP surface only.
//! Also the start-up checks of the stores, and `--blob-redirect`. Feature `backends`:
//! `.ci/backends` installs the engines.

mod common;
#[path = "backends/garage.rs"]
mod garage;
#[path = "common/redis_server.rs"]
mod redis_server;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Server, client, pseudo_random, sha256_digest};
use dockside::KeyValue;
use http::StatusCode;

const MIB: usize = 1024 * 1024;

/// Where the instances of one test keep their stores.
struct Shared {
    s3_url: String,
    s3_config: dockside::S3Config,
    redis_url: String,
    redis_prefix: String,
}

impl Shared {
    fn new() -> Shared {
        let g = garage::garage();
        let s3_url = g.url(&garage::unique_prefix());
        let s3_config = dockside::S3Config::from_url(&s3_url, g.env()).expect("S3 URL");
        Shared {
            s3_url,
            s3_config,
            redis_url: redis_server::RedisServer::shared().url.clone(),
            redis_prefix: redis_server::fresh_prefix(),
        }
    }

    /// A `dockside serve` on these stores (and a data directory of its own, unused).
    fn start(&self, extra: &[&str]) -> Server {
        let g = garage::garage();
        // The binary: several processes on one store, --kv/--blobs, killed and restarted.
        Server::builder()
            .args(["--kv", &self.redis_url, "--kv-prefix", &self.redis_prefix])
            .args(["--blobs", &self.s3_url])
            .args(extra.iter().copied())
            .env("DOCKSIDE_S3_ACCESS_KEY", &g.access_key)
            .env("DOCKSIDE_S3_SECRET_KEY", &g.secret_key)
            .start()
    }

    /// Every object this test's instances left in the bucket.
    async fn objects(&self) -> Vec<String> {
        garage::list_objects(&self.s3_config).await
    }
}

/// `location` (as a server answered it, absolute or not) on the instance `on`.
fn at(on: &Server, location: &str) -> String {
    let path = match location.find("://") {
        Some(i) => {
            let rest = &location[i + 3..];
            &rest[rest.find('/').unwrap_or(rest.len())..]
        }
        None => location,
    };
    on.url(path)
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {resp:?}"))
        .to_str()
        .unwrap()
        .to_owned()
}

/// POST: starts an upload session on `on`; its Location.
async fn start_upload(on: &Server, name: &str) -> String {
    let resp = client()
        .post(on.url(&format!("/v2/{name}/blobs/uploads/")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "{resp:?}");
    assert_eq!(
        header(&resp, "oci-chunk-min-length"),
        (5 * MIB).to_string(),
        "S3 blobs advertise S3's smallest part"
    );
    header(&resp, "location")
}

/// PATCH one chunk at `offset` through `on`; the new Location.
async fn patch(on: &Server, location: &str, offset: usize, chunk: &[u8]) -> String {
    let resp = client()
        .patch(at(on, location))
        .header("content-type", "application/octet-stream")
        .header(
            "content-range",
            format!("{offset}-{}", offset + chunk.len() - 1),
        )
        .body(chunk.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "{resp:?}");
    assert_eq!(
        header(&resp, "range"),
        format!("0-{}", offset + chunk.len() - 1)
    );
    header(&resp, "location")
}

/// The closing PUT through `on`, with `last` as its body.
async fn close(on: &Server, location: &str, digest: &str, last: &[u8]) -> reqwest::Response {
    let url = at(on, location);
    let sep = if url.contains('?') { '&' } else { '?' };
    client()
        .put(format!("{url}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(last.to_vec())
        .send()
        .await
        .unwrap()
}

/// A whole blob in one POST + PUT through `on`.
async fn push_blob(on: &Server, name: &str, data: &[u8]) -> reqwest::Response {
    let location = start_upload(on, name).await;
    close(on, &location, &sha256_digest(data), data).await
}

/// GET the blob through `on` and checks its bytes against its digest.
async fn pull_blob(on: &Server, name: &str, digest: &str) -> Bytes {
    let resp = client()
        .get(on.url(&format!("/v2/{name}/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{resp:?}");
    let body = resp.bytes().await.unwrap();
    assert_eq!(
        sha256_digest(&body),
        digest,
        "the bytes of {digest} pulled back"
    );
    body
}

/// The blob objects of the bucket for `digest`.
fn blob_objects<'a>(objects: &'a [String], digest: &str) -> Vec<&'a String> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    objects.iter().filter(|o| o.ends_with(hex)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_registry() {
    let shared = Shared::new();
    let servers = [shared.start(&[]), shared.start(&[]), shared.start(&[])];
    let [a, b, c] = &servers;
    let log = a.wait_for_log("listening on", Duration::from_secs(1));
    assert!(
        log.contains("keys in redis://") && log.contains("blobs in s3://"),
        "the start line names the stores: {log}"
    );
    assert!(
        !log.contains(&garage::garage().secret_key),
        "no secret in the log"
    );
    let name = "scale/chunked";

    // A chunked upload whose PATCHes alternate between two instances, closed on a third.
    let layer = pseudo_random(17 * MIB + 12345, 1);
    let digest = sha256_digest(&layer);
    let chunks = [
        &layer[..5 * MIB],
        &layer[5 * MIB..11 * MIB],
        &layer[11 * MIB..16 * MIB],
    ];
    let mut location = start_upload(a, name).await;
    let mut offset = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        let on = if i % 2 == 0 { a } else { b };
        location = patch(on, &location, offset, chunk).await;
        offset += chunk.len();
    }
    let resp = close(c, &location, &digest, &layer[offset..]).await;
    assert_eq!(resp.status(), StatusCode::CREATED, "{resp:?}");
    assert_eq!(header(&resp, "docker-content-digest"), digest);
    for on in &servers {
        assert_eq!(pull_blob(on, name, &digest).await.len(), layer.len());
    }

    // The same blob pushed through all three at once: all succeed, one blob.
    let same = pseudo_random(6 * MIB + 7, 2);
    let same_digest = sha256_digest(&same);
    let (ra, rb, rc) = tokio::join!(
        push_blob(a, "scale/same", &same),
        push_blob(b, "scale/same", &same),
        push_blob(c, "scale/same", &same),
    );
    for r in [ra, rb, rc] {
        assert_eq!(r.status(), StatusCode::CREATED, "{r:?}");
        assert_eq!(header(&r, "docker-content-digest"), same_digest);
    }
    for on in &servers {
        pull_blob(on, "scale/same", &same_digest).await;
    }
    let objects = shared.objects().await;
    assert_eq!(
        blob_objects(&objects, &same_digest).len(),
        1,
        "one object for the blob pushed three times: {objects:#?}"
    );

    // A manifest pushed through one instance, pulled through another.
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let config_digest = sha256_digest(config);
    let r = push_blob(a, name, config).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{r:?}");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest,
            "size": layer.len(),
        }],
    }))
    .unwrap();
    let manifest_digest = sha256_digest(&manifest);
    let r = client()
        .put(a.url(&format!("/v2/{name}/manifests/v1")))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{r:?}");
    let r = client()
        .get(b.url(&format!("/v2/{name}/manifests/v1")))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{r:?}");
    assert_eq!(header(&r, "docker-content-digest"), manifest_digest);
    assert_eq!(r.bytes().await.unwrap(), manifest);
    let tags: serde_json::Value = client()
        .get(c.url(&format!("/v2/{name}/tags/list")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));

    // One instance killed in the middle of an upload (two PATCHes done, a third arriving); the
    // upload finished through the others.
    let [a, b, c] = servers;
    let mut a = a;
    let big = pseudo_random(16 * MIB + 999, 3);
    let big_digest = sha256_digest(&big);
    let mut location = start_upload(&a, "scale/killed").await;
    location = patch(&a, &location, 0, &big[..5 * MIB]).await;
    location = patch(&b, &location, 5 * MIB, &big[5 * MIB..10 * MIB]).await;
    // A third PATCH to `a` that is half sent when `a` dies.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|item| (item, rx))
    }));
    let in_flight = tokio::spawn(
        client()
            .patch(at(&a, &location))
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{}-{}", 10 * MIB, 15 * MIB - 1))
            .body(body)
            .send(),
    );
    tx.send(Ok(Bytes::copy_from_slice(&big[10 * MIB..12 * MIB])))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = a.kill();
    assert!(!status.success(), "killed: {status}");
    let failed = in_flight.await.unwrap();
    assert!(
        failed.is_err() || !failed.as_ref().unwrap().status().is_success(),
        "the PATCH cut by the kill cannot have succeeded: {failed:?}"
    );
    drop(tx);
    // Where the upload stands, asked of another instance: the two PATCHes acknowledged.
    let r = client().get(at(&c, &location)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT, "{r:?}");
    assert_eq!(header(&r, "range"), format!("0-{}", 10 * MIB - 1));
    let location = header(&r, "location");
    let location = patch(&c, &location, 10 * MIB, &big[10 * MIB..15 * MIB]).await;
    let r = close(&b, &location, &big_digest, &big[15 * MIB..]).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{r:?}");
    for on in [&b, &c] {
        pull_blob(on, "scale/killed", &big_digest).await;
        pull_blob(on, name, &digest).await;
        pull_blob(on, "scale/same", &same_digest).await;
        pull_blob(on, name, &config_digest).await;
    }

    // Nothing lost, nothing left over: every blob one object, no upload part behind.
    let objects = shared.objects().await;
    for d in [&digest, &same_digest, &config_digest, &big_digest] {
        assert_eq!(blob_objects(&objects, d).len(), 1, "{d}: {objects:#?}");
    }
    let parts: Vec<_> = objects
        .iter()
        .filter(|o| o.starts_with("uploads/"))
        .collect();
    assert!(parts.is_empty(), "upload parts left behind: {parts:#?}");
    b.stop();
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirect_sends_clients_to_the_bucket() {
    let shared = Shared::new();
    let g = garage::garage();
    // Keys in the instance's own directory here: S3 blobs with the default key-value store.
    // The binary: --blob-redirect.
    let server = Server::builder()
        .args(["--blobs", &shared.s3_url, "--blob-redirect", "60"])
        .env("DOCKSIDE_S3_ACCESS_KEY", &g.access_key)
        .env("DOCKSIDE_S3_SECRET_KEY", &g.secret_key)
        .start();
    let name = "scale/redirect";
    let blob = pseudo_random(3 * MIB + 5, 4);
    let digest = sha256_digest(&blob);
    let r = push_blob(&server, name, &blob).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{r:?}");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": digest,
            "size": blob.len(),
        },
        "layers": [],
    }))
    .unwrap();
    let r = client()
        .put(server.url(&format!("/v2/{name}/manifests/latest")))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{r:?}");

    let no_redirects = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let blob_url = server.url(&format!("/v2/{name}/blobs/{digest}"));
    let r = no_redirects.get(&blob_url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT, "{r:?}");
    assert_eq!(header(&r, "docker-content-digest"), digest);
    let location = header(&r, "location");
    assert!(
        location.starts_with(&g.endpoint) && location.contains("X-Amz-Signature="),
        "a presigned URL of the store: {location}"
    );
    // The URL itself gives the exact bytes, without dockside.
    let direct = no_redirects.get(&location).send().await.unwrap();
    assert_eq!(direct.status(), StatusCode::OK, "{direct:?}");
    assert_eq!(direct.bytes().await.unwrap(), blob);
    // A client that follows redirects gets them from dockside's URL.
    let followed = client().get(&blob_url).send().await.unwrap();
    assert_eq!(followed.status(), StatusCode::OK, "{followed:?}");
    assert_eq!(followed.bytes().await.unwrap(), blob);

    // HEAD and manifests are answered directly.
    let r = no_redirects.head(&blob_url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{r:?}");
    assert_eq!(header(&r, "content-length"), blob.len().to_string());
    let r = no_redirects
        .get(server.url(&format!("/v2/{name}/manifests/latest")))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{r:?}");
    assert_eq!(r.bytes().await.unwrap(), manifest);
    server.stop();
}

/// Runs `dockside serve` on stores that cannot be used: it must exit non-zero, soon, saying
/// why. Returns its stderr and how long it took.
fn refused(args: &[&str], env: &[(&str, &str)]) -> (String, Duration) {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dockside"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("DOCKSIDE_") || k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn dockside");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("dockside {args:?} still running after 15 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        !status.success(),
        "dockside {args:?} must fail: {status}\n{stderr}"
    );
    assert!(
        !stderr.contains("listening on"),
        "dockside {args:?} must not listen:\n{stderr}"
    );
    assert!(
        took < Duration::from_secs(10),
        "dockside {args:?} took {took:?}"
    );
    eprintln!(
        "{args:?}: {status} in {took:?}: {}",
        stderr.lines().last().unwrap_or_default()
    );
    (stderr, took)
}

#[test]
fn unusable_stores_stop_the_start() {
    let g = garage::garage();
    let url = g.url(&garage::unique_prefix());

    // Wrong credentials.
    let (stderr, _) = refused(
        &["--blobs", &url],
        &[
            ("DOCKSIDE_S3_ACCESS_KEY", &g.access_key),
            ("DOCKSIDE_S3_SECRET_KEY", "0123456789abcdef0123456789abcdef"),
        ],
    );
    assert!(
        stderr.contains("HeadBucket") && stderr.contains("access denied"),
        "wrong S3 credentials:\n{stderr}"
    );
    assert!(
        !stderr.contains("0123456789abcdef0123456789abcdef"),
        "the secret is never printed:\n{stderr}"
    );

    // No such bucket.
    let missing = format!(
        "s3://no-such-bucket-{}?endpoint={}&region={}",
        garage::unique_prefix(),
        g.endpoint,
        g.region
    );
    let (stderr, _) = refused(
        &["--blobs", &missing],
        &[
            ("DOCKSIDE_S3_ACCESS_KEY", &g.access_key),
            ("DOCKSIDE_S3_SECRET_KEY", &g.secret_key),
        ],
    );
    assert!(
        stderr.contains("no-such-bucket") && stderr.contains("no such bucket"),
        "a missing bucket:\n{stderr}"
    );

    // A Redis URL where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (stderr, _) = refused(&["--kv", &format!("redis://127.0.0.1:{port}/")], &[]);
    assert!(
        stderr.contains("cannot reach Redis") && stderr.contains(&port.to_string()),
        "an unreachable Redis:\n{stderr}"
    );

    // An S3 endpoint where nothing listens (tried a few times, with backoff).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (stderr, _) = refused(
        &[
            "--blobs",
            &format!("s3://b?endpoint=http://127.0.0.1:{port}"),
        ],
        &[
            ("DOCKSIDE_S3_ACCESS_KEY", &g.access_key),
            ("DOCKSIDE_S3_SECRET_KEY", &g.secret_key),
        ],
    );
    assert!(
        stderr.contains("cannot reach it") && stderr.contains(&format!("127.0.0.1:{port}")),
        "an unreachable S3 endpoint:\n{stderr}"
    );

    // A store of the wrong kind.
    let (stderr, _) = refused(&["--kv", &url], &[]);
    assert!(stderr.contains("directory or a redis:// URL"), "{stderr}");

    // --blob-redirect without S3.
    let (stderr, _) = refused(&["--blob-redirect", "60"], &[]);
    assert!(
        stderr.contains("--blob-redirect needs an S3 blob store"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_uploads_are_purged_on_shared_stores() {
    let shared = Shared::new();
    let server = shared.start(&["--upload-expiry-secs", "1"]);
    let name = "scale/stale";
    let location = start_upload(&server, name).await;
    let location = patch(&server, &location, 0, &pseudo_random(5 * MIB, 5)).await;
    let parts = |objects: &[String]| objects.iter().any(|o| o.starts_with("uploads/"));
    assert!(parts(&shared.objects().await), "the PATCH left a part");
    // Purged within a few seconds: the session is gone, and its part from the bucket.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = client().get(at(&server, &location)).send().await.unwrap();
        if r.status() == StatusCode::NOT_FOUND && !parts(&shared.objects().await) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stale upload was not purged: {r:?} {:#?}",
            shared.objects().await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    server.wait_for_log("cancelled 1 upload sessions", Duration::from_secs(1));
    // And the session's counts (the repository's, the registry's), empty now, go with it.
    let kv = dockside::RedisKv::connect(&shared.redis_url, &shared.redis_prefix)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counts = kv.list("upload-counts/", None, usize::MAX).await.unwrap();
        if counts.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "counts left: {counts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.wait_for_log("removed 2 lapsed records", Duration::from_secs(1));
    server.stop();
}

/// `/ready` reads each shared store: 200 while Redis and the bucket answer, 503 naming the
/// key-value store once its Redis is gone (and `/live` still 200: the process is fine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_the_shared_stores() {
    let g = garage::garage();
    let redis = redis_server::RedisServer::start();
    // The binary: its start-up check and /ready on --kv/--blobs.
    let s = Server::builder()
        .args([
            "--kv",
            &redis.url,
            "--kv-prefix",
            &redis_server::fresh_prefix(),
        ])
        .args(["--blobs", &g.url(&garage::unique_prefix())])
        .env("DOCKSIDE_S3_ACCESS_KEY", &g.access_key)
        .env("DOCKSIDE_S3_SECRET_KEY", &g.secret_key)
        .start();
    let c = client();
    let r = c.get(s.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v,
        serde_json::json!({"status": "ok", "kv": "ok", "blobs": "ok"})
    );
    drop(redis);
    let started = std::time::Instant::now();
    let r = c.get(s.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v,
        serde_json::json!({"status": "unavailable", "kv": "unavailable", "blobs": "ok"})
    );
    eprintln!("/ready answered 503 after {:?}", started.elapsed());
    assert_eq!(
        c.get(s.url("/live")).send().await.unwrap().status(),
        StatusCode::OK
    );
}
