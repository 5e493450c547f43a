//! The wasi:http component under a real runtime: `wasmtime serve`, which starts a fresh
//! instance for every request, so a push that works here keeps no state in memory.
//!
//! Needs the built component and the wasmtime CLI: `.ci/edge` builds and installs both and runs
//! `cargo test --features edge --test edge` with `DOCKSIDE_WASI_COMPONENT` and
//! `DOCKSIDE_WASMTIME` set. Without them the test fails and says so; it never skips. The S3
//! tests also need Garage (`DOCKSIDE_GARAGE`, installed by `.ci/garage`).
#![cfg(feature = "edge")]

mod common;
#[path = "common/gate.rs"]
mod gate;
// Garage, for the component's S3 blob store (installed by .ci/garage, which .ci/edge sources).
#[path = "backends/garage.rs"]
mod garage;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::scenarios::{self, AUTH_SECRET, auth_toml};
use common::{pseudo_random, sha256_digest as sha256};

struct Wasmtime {
    child: Child,
    addr: String,
    _data: tempfile::TempDir,
    /// Lines of wasmtime's stderr (the component's included), as read so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Wasmtime {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run .ci/edge, which builds the component and installs wasmtime")
    })
}

/// Starts `wasmtime serve` on a free loopback port with a fresh data directory.
fn serve() -> Wasmtime {
    serve_with(&[], |_| {})
}

/// [`serve`] with `--env NAME=VALUE` settings, after `prepare` has filled the data directory.
fn serve_with(env: &[(&str, String)], prepare: impl FnOnce(&std::path::Path)) -> Wasmtime {
    let wasmtime = required_env("DOCKSIDE_WASMTIME");
    let component = required_env("DOCKSIDE_WASI_COMPONENT");
    let data = tempfile::tempdir().unwrap();
    prepare(data.path());
    let mut cmd = Command::new(&wasmtime);
    cmd.args(["serve", "-Scli", "--addr", "127.0.0.1:0", "--dir"])
        .arg(format!("{}::/data", data.path().display()));
    for (k, v) in env {
        cmd.arg("--env").arg(format!("{k}={v}"));
    }
    let mut child = cmd
        .arg(&component)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {wasmtime}: {e}"));
    // wasmtime prints "Serving HTTP on http://127.0.0.1:PORT/" once it listens.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("http://").nth(1) {
                let _ = tx.send(rest.trim_end_matches('/').to_owned());
            }
            let mut l = lines.lock().unwrap_or_else(|p| p.into_inner());
            if l.len() < 10_000 {
                l.push(line);
            }
        }
    });
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || for _ in BufReader::new(stdout).lines() {});
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("wasmtime serve did not start listening within 60 s");
    Wasmtime {
        child,
        addr,
        _data: data,
        log,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn push_and_pull_through_the_wasi_component() {
    let w = serve();
    scenarios::push_and_pull(&w.addr).await;
}

/// The probes are the core's, so the component answers them; each request leaves one JSON
/// access line on stderr with the id of its `X-Request-Id` header.
#[tokio::test(flavor = "multi_thread")]
async fn probes_and_access_lines_in_the_wasi_component() {
    let w = serve();
    let http = common::client();
    for path in ["/live", "/ready", "/healthz"] {
        let r = http
            .get(format!("http://{}{path}", w.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["status"], "ok", "{path}");
    }
    let r = http
        .get(format!("http://{}/v2/edge/manifests/absent", w.addr))
        .header("x-request-id", "edge-probe-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-request-id"], "edge-probe-1");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        let found = w
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("edge-probe-1"))
            .cloned();
        if let Some(l) = found {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "no access line");
        std::thread::sleep(Duration::from_millis(50));
    };
    // wasmtime may prefix the component's output; the record is the JSON object in the line.
    let json = &line[line.find('{').unwrap()..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["class"], "manifest_get");
    assert_eq!(v["status"], 404);
    assert_eq!(v["method"], "GET");
    assert_eq!(v["store_error"], false);
}

// ---------------------------------------------------------------------------------------------
// Access control, enforced by the component (the scenario in tests/common/scenarios.rs)

#[tokio::test(flavor = "multi_thread")]
async fn access_control_in_the_wasi_component() {
    let w = serve_with(
        &[
            ("DOCKSIDE_AUTH_CONFIG", auth_toml()),
            ("DOCKSIDE_AUTH_SECRET", AUTH_SECRET.to_owned()),
        ],
        |_| {},
    );
    scenarios::access_control(&w.addr).await;
    let http = common::client();
    drop(w);

    // The configuration from a file in the preopened directory; without a secret the
    // component refuses to serve (500) rather than run open.
    let w = serve_with(
        &[("DOCKSIDE_AUTH_CONFIG_FILE", "/data/auth.toml".to_owned())],
        |dir| std::fs::write(dir.join("auth.toml"), auth_toml()).unwrap(),
    );
    let r = http
        .get(format!("http://{}/v2/public/app/tags/list", w.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let body = r.text().await.unwrap();
    assert!(body.contains("no token secret"), "{body}");
}

/// Limits reach the component through `--env` (`Config::from_settings`): the chunk bounds are
/// advertised, an oversized PATCH is refused with 413 and stores nothing, and a malformed
/// setting is reported rather than ignored.
#[tokio::test(flavor = "multi_thread")]
async fn limits_from_the_environment() {
    let w = serve_with(
        &[
            ("DOCKSIDE_MAX_CHUNK_BYTES", "1000".to_owned()),
            ("DOCKSIDE_CHUNK_MIN_LENGTH", "500".to_owned()),
            ("DOCKSIDE_NO_DELETE", "true".to_owned()),
        ],
        |_| {},
    );
    let base = format!("http://{}", w.addr);
    let http = common::client();
    let r = http
        .post(format!("{base}/v2/lim/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["oci-chunk-max-length"], "1000");
    assert_eq!(r.headers()["oci-chunk-min-length"], "500");
    let loc = format!("{base}{}", r.headers()["location"].to_str().unwrap());
    let r = http.patch(&loc).body(vec![7u8; 2000]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "SIZE_INVALID");
    let r = http.get(&loc).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["range"],
        "0-0",
        "the refused PATCH stored nothing"
    );
    let r = http.delete(&loc).send().await.unwrap();
    assert_eq!(
        r.status(),
        204,
        "cancelling an upload is not a delete of content"
    );
    let r = http
        .delete(format!("{base}/v2/lim/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405, "DOCKSIDE_NO_DELETE=true");

    let bad = serve_with(&[("DOCKSIDE_MAX_CHUNK_BYTES", "lots".to_owned())], |_| {});
    let r = http
        .get(format!("http://{}/v2/", bad.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let text = r.text().await.unwrap();
    assert!(text.contains("DOCKSIDE_MAX_CHUNK_BYTES"), "{text}");
}

/// 16 clients PATCH the same first chunk of one upload session at once, 20 rounds, under
/// `wasmtime serve` (a fresh instance per request, the directory host over wasi:filesystem):
/// exactly one wins each round (the others get 416 with the session's state), so no accepted
/// chunk is silently dropped, and the session then closes into a blob that matches its digest.
#[tokio::test(flavor = "multi_thread")]
async fn racing_patches_on_one_session_have_one_winner() {
    let wt = serve();
    let base = format!("http://{}", wt.addr);
    let http = reqwest::Client::new();
    for round in 0..20u64 {
        let r = http
            .post(format!("{base}/v2/race/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let loc = r.headers()["location"].to_str().unwrap().to_owned();
        let loc = if loc.starts_with('/') {
            format!("{base}{loc}")
        } else {
            loc
        };
        let chunk = pseudo_random(64 * 1024, round);
        let range = format!("0-{}", chunk.len() - 1);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (http, loc, chunk, range) =
                    (http.clone(), loc.clone(), chunk.clone(), range.clone());
                tokio::spawn(async move {
                    let r = http
                        .patch(&loc)
                        .header("content-range", range)
                        .header("content-type", "application/octet-stream")
                        .body(chunk)
                        .send()
                        .await
                        .unwrap();
                    let status = r.status().as_u16();
                    let loc = r
                        .headers()
                        .get("location")
                        .map(|l| l.to_str().unwrap().to_owned());
                    (status, loc)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            let (status, l) = t.await.unwrap();
            match status {
                202 => winners.push(l.unwrap()),
                416 => {}
                s => panic!("round {round}: a racing PATCH answered {s}"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: {} PATCHes won",
            winners.len()
        );
        let next = &winners[0];
        let next = if next.starts_with('/') {
            format!("{base}{next}")
        } else {
            next.clone()
        };
        let sep = if next.contains('?') { '&' } else { '?' };
        let r = http
            .put(format!("{next}{sep}digest={}", sha256(&chunk)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "round {round}");
        let got = http
            .get(format!("{base}/v2/race/blobs/{}", sha256(&chunk)))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(got == chunk, "round {round}: the blob does not match");
    }
}

// ---------------------------------------------------------------------------------------------
// Blobs in S3 (`DOCKSIDE_BLOBS=s3://...`), sent through wasi:http/outgoing-handler to Garage;
// keys stay in the preopened directory.

const MIB: usize = 1024 * 1024;

/// `wasmtime serve` with its blobs in a fresh prefix of Garage's bucket, plus `extra` settings;
/// also the S3 configuration, to look into the bucket.
fn serve_s3(extra: &[(&str, String)]) -> (Wasmtime, dockside::S3Config) {
    let g = garage::garage();
    let url = g.url(&garage::unique_prefix());
    let s3 = dockside::S3Config::from_url(&url, g.env()).unwrap();
    let mut env = vec![
        ("DOCKSIDE_BLOBS", url),
        ("DOCKSIDE_S3_ACCESS_KEY", g.access_key.clone()),
        ("DOCKSIDE_S3_SECRET_KEY", g.secret_key.clone()),
    ];
    env.extend(extra.iter().cloned());
    (serve_with(&env, |_| {}), s3)
}

/// Pushes `data` in one POST; returns its digest.
async fn push_monolithic(http: &reqwest::Client, base: &str, repo: &str, data: &[u8]) -> String {
    let d = sha256(data);
    let r = http
        .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 201, "{}", r.text().await.unwrap());
    d
}

fn absolute(base: &str, loc: &str) -> String {
    if loc.starts_with('/') {
        format!("{base}{loc}")
    } else {
        loc.to_owned()
    }
}

/// Pushes `data` in PATCHes of `chunk` bytes (each a request to a fresh instance); returns its
/// digest.
async fn push_chunked(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    data: &[u8],
    chunk: usize,
) -> String {
    let d = sha256(data);
    let r = http
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let mut loc = absolute(base, r.headers()["location"].to_str().unwrap());
    for (i, part) in data.chunks(chunk).enumerate() {
        let at = i * chunk;
        let r = http
            .patch(&loc)
            .header("content-range", format!("{at}-{}", at + part.len() - 1))
            .header("content-type", "application/octet-stream")
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let next = r.headers().get("location").cloned();
        assert_eq!(status, 202, "chunk {i}: {}", r.text().await.unwrap());
        loc = absolute(base, next.unwrap().to_str().unwrap());
    }
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = http
        .put(format!("{loc}{sep}digest={d}"))
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 201, "{}", r.text().await.unwrap());
    d
}

/// A 20 MiB blob in one POST (a multipart upload of 8 MiB parts) and an 20 MiB one in 6 MiB
/// PATCHes (parts assembled by copy inside the store), both pulled back whole and by ranges
/// across part boundaries; a manifest over them pushed and pulled; only blobs left in the
/// bucket.
#[tokio::test(flavor = "multi_thread")]
async fn blobs_in_s3_through_outgoing_http() {
    let (w, s3) = serve_s3(&[]);
    let base = format!("http://{}", w.addr);
    let http = common::client();

    let big = pseudo_random(20 * MIB, 41);
    let t = std::time::Instant::now();
    let d_big = push_monolithic(&http, &base, "s3/app", &big).await;
    eprintln!("20 MiB in one POST: {:?}", t.elapsed());
    let chunked = pseudo_random(20 * MIB, 42);
    let t = std::time::Instant::now();
    let d_chunked = push_chunked(&http, &base, "s3/app", &chunked, 6 * MIB).await;
    eprintln!("20 MiB in 6 MiB PATCHes: {:?}", t.elapsed());

    for (d, data) in [(&d_big, &big), (&d_chunked, &chunked)] {
        let t = std::time::Instant::now();
        let r = http
            .get(format!("{base}/v2/s3/app/blobs/{d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-length"], &data.len().to_string());
        assert_eq!(r.headers()["docker-content-digest"], d.as_str());
        let got = r.bytes().await.unwrap();
        eprintln!("20 MiB GET: {:?}", t.elapsed());
        assert!(got[..] == data[..], "{d} does not come back byte for byte");
        // A range across the first part boundary (8 MiB) and one at the very end.
        for (from, to) in [
            (8 * MIB - 100, 8 * MIB + 99),
            (data.len() - 10, data.len() - 1),
        ] {
            let r = http
                .get(format!("{base}/v2/s3/app/blobs/{d}"))
                .header("range", format!("bytes={from}-{to}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 206);
            assert_eq!(
                r.headers()["content-range"],
                &format!("bytes {from}-{to}/{}", data.len())
            );
            assert!(r.bytes().await.unwrap()[..] == data[from..=to]);
        }
        let r = http
            .head(format!("{base}/v2/s3/app/blobs/{d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-length"], &data.len().to_string());
    }

    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let d_config = push_monolithic(&http, &base, "s3/app", config).await;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": d_config, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d_big, "size": big.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d_chunked, "size": chunked.len()},
        ],
    })
    .to_string();
    let r = http
        .put(format!("{base}/v2/s3/app/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 201, "{}", r.text().await.unwrap());
    let r = http
        .get(format!("{base}/v2/s3/app/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-content-digest"],
        sha256(manifest.as_bytes()).as_str()
    );
    assert_eq!(r.text().await.unwrap(), manifest);

    // Blobs only: no upload part, no half-done multipart object left behind.
    let objects = garage::list_objects(&s3).await;
    assert_eq!(objects.len(), 3, "{objects:?}");
    assert!(
        objects.iter().all(|o| o.starts_with("blobs/")),
        "{objects:?}"
    );
}

/// `DOCKSIDE_BLOB_REDIRECT`: a blob GET answers 307 to a presigned URL of the bucket, which
/// gives the bytes without the component.
#[tokio::test(flavor = "multi_thread")]
async fn s3_blob_gets_redirect_from_the_component() {
    let (w, _s3) = serve_s3(&[("DOCKSIDE_BLOB_REDIRECT", "60".to_owned())]);
    let base = format!("http://{}", w.addr);
    let http = common::client();
    let data = pseudo_random(3 * MIB, 43);
    let d = push_monolithic(&http, &base, "s3/redir", &data).await;
    let no_follow = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_follow
        .get(format!("{base}/v2/s3/redir/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 307);
    let url = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let got = no_follow.get(&url).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert!(got.bytes().await.unwrap()[..] == data[..]);
}

/// A bad `DOCKSIDE_BLOBS` answers 500 naming the setting; storage that cannot be reached is a
/// 503 with `Retry-After` after the S3 host's retries, which back off (100 + 400 + 1600 ms on
/// the component's monotonic clock).
#[tokio::test(flavor = "multi_thread")]
async fn s3_misconfigured_or_unreachable() {
    let http = common::client();
    let bad = serve_with(&[("DOCKSIDE_BLOBS", "s3://bucket".to_owned())], |_| {});
    let r = http
        .get(format!("http://{}/v2/", bad.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let text = r.text().await.unwrap();
    assert!(text.contains("DOCKSIDE_BLOBS"), "{text}");
    drop(bad);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // closed again: nothing listens there
    let g = garage::garage();
    let w = serve_with(
        &[
            (
                "DOCKSIDE_BLOBS",
                format!("s3://{}?endpoint=http://127.0.0.1:{port}", g.bucket),
            ),
            ("DOCKSIDE_S3_ACCESS_KEY", g.access_key.clone()),
            ("DOCKSIDE_S3_SECRET_KEY", g.secret_key.clone()),
        ],
        |_| {},
    );
    let base = format!("http://{}", w.addr);
    let t = std::time::Instant::now();
    let r = http
        .post(format!(
            "{base}/v2/r/blobs/uploads/?digest={}",
            sha256(b"x")
        ))
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    let elapsed = t.elapsed();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    assert!(
        elapsed >= Duration::from_millis(2100),
        "the retries did not back off: {elapsed:?}"
    );
    // Each retry and the failure are in wasmtime's stderr, as the core's `tracing` events in
    // JSON: the operator's only view of why a request failed.
    let events: Vec<serde_json::Value> = w
        .log
        .lock()
        .unwrap()
        .iter()
        // wasmtime may prefix the component's output; the event is the JSON object in the line.
        .filter_map(|l| serde_json::from_str(&l[l.find('{')?..]).ok())
        .collect();
    let retries = events
        .iter()
        .filter(|v| v["message"] == "S3 unreachable; retrying")
        .count();
    assert!(retries >= 3, "retries not logged: {events:?}");
    assert!(
        events
            .iter()
            .any(|v| v["message"] == "storage failure" && v["level"] == "ERROR"),
        "the failure is not logged: {events:?}"
    );
}

/// Brute-force protection and admission limits in the wasi:http component, where every
/// request is a fresh instance (the counts live in the preopened directory's key-value store):
/// settings from `--env`; wasi:http gives no client address, so failed logins are counted per
/// user name (another user is unaffected), or per `X-Forwarded-For` address when trusted; the
/// upload cap holds across instances and a cancel frees a slot.
#[tokio::test(flavor = "multi_thread")]
async fn login_throttle_and_upload_caps() {
    let w = serve_with(
        &[
            ("DOCKSIDE_AUTH_CONFIG", auth_toml()),
            ("DOCKSIDE_AUTH_SECRET", AUTH_SECRET.to_owned()),
            ("DOCKSIDE_LOGIN_FAILURES_PER_USER_ADDRESS", "3".to_owned()),
            ("DOCKSIDE_MAX_UPLOADS_PER_REPOSITORY", "1".to_owned()),
        ],
        |_| {},
    );
    let http = common::client();
    let v2 = format!("http://{}/v2/", w.addr);
    for i in 0..3 {
        let r = http
            .get(&v2)
            .basic_auth("alice", Some(format!("guess-{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = http
        .get(&v2)
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS", "{body}");
    // Forwarded addresses are not believed unless configured.
    let r = http
        .get(&v2)
        .basic_auth("alice", Some("alice-pw"))
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let mallory = |r: reqwest::RequestBuilder| r.basic_auth("mallory", Some("mallory-pw"));
    let r = mallory(http.get(&v2)).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let uploads = format!("http://{}/v2/team/app/blobs/uploads/", w.addr);
    let r = mallory(http.post(&uploads)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = absolute(
        &format!("http://{}", w.addr),
        r.headers()["location"].to_str().unwrap(),
    );
    let r = mallory(http.post(&uploads)).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS", "{body}");
    let r = mallory(http.delete(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = mallory(http.post(&uploads)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    drop(w);

    let w = serve_with(
        &[
            ("DOCKSIDE_AUTH_CONFIG", auth_toml()),
            ("DOCKSIDE_AUTH_SECRET", AUTH_SECRET.to_owned()),
            ("DOCKSIDE_LOGIN_FAILURES_PER_USER_ADDRESS", "2".to_owned()),
            ("DOCKSIDE_TRUST_FORWARDED_FOR", "true".to_owned()),
        ],
        |_| {},
    );
    let v2 = format!("http://{}/v2/", w.addr);
    let login = |from: &'static str, pw: &'static str| {
        http.get(&v2)
            .basic_auth("alice", Some(pw))
            .header("x-forwarded-for", from)
            .send()
    };
    for _ in 0..2 {
        assert_eq!(login("203.0.113.1", "nope").await.unwrap().status(), 401);
    }
    assert_eq!(
        login("203.0.113.1", "alice-pw").await.unwrap().status(),
        429
    );
    assert_eq!(
        login("203.0.113.2", "alice-pw").await.unwrap().status(),
        200
    );
}

/// The pull-through mirror in the wasi:http component (`DOCKSIDE_MIRROR_CONFIG`), its upstream
/// a native test registry with token auth reached through wasi:http/outgoing-handler. Every
/// request is a fresh instance: the token and the one-fetch lease live in the key-value store.
#[tokio::test(flavor = "multi_thread")]
async fn mirror_through_the_wasi_component() {
    let up = common::upstream_with_scenario_auth(None);
    let http = common::client();
    let base = up.url().to_owned();
    let layer = pseudo_random(4 * 1024 * 1024 + 1, 77);
    let ld = sha256(&layer);
    let r = http
        .post(format!("{base}/v2/team/app/blobs/uploads/?digest={ld}"))
        .basic_auth("alice", Some("alice-pw"))
        .body(layer.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let config = format!(
        "[[upstream]]\nurl = \"{base}\"\nprefix = \"up/\"\nusername = \"alice\"\npassword = \"alice-pw\"\n"
    );
    let w = serve_with(&[("DOCKSIDE_MIRROR_CONFIG", config)], |_| {});
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (http, url) = (
            http.clone(),
            format!("http://{}/v2/up/team/app/blobs/{ld}", w.addr),
        );
        tasks.push(tokio::spawn(async move {
            let r = http.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            sha256(&r.bytes().await.unwrap())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), ld);
    }
    let blob = format!("/v2/team/app/blobs/{ld}");
    assert_eq!(common::served(&up, "GET", &blob, Some(200)), 1);
    assert_eq!(common::served(&up, "GET", "/token", Some(200)), 1);
    let r = http
        .get(format!("http://{}/v2/up/team/app/blobs/{ld}", w.addr))
        .header("range", "bytes=0-3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), layer[..4]);
    drop(up);
    let r = http
        .get(format!("http://{}/v2/up/team/app/blobs/{ld}", w.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let missing = sha256(b"not cached");
    let r = http
        .get(format!("http://{}/v2/up/team/app/blobs/{missing}", w.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

/// A cold blob streams through the wasi:http component while it is fetched (the component
/// sends the core's early response while the request's future still runs): the upstream, a
/// native test registry behind a gate, is held at 4 MiB of 32 while the client must already
/// have 1 MiB; then the whole blob, byte for byte, fetched once.
#[tokio::test(flavor = "multi_thread")]
async fn mirror_streams_a_cold_blob_through_the_wasi_component() {
    use sha2::Digest as _;
    // In a directory: the corrupted-blob check below edits its store.
    let up = dockside::testing::TestRegistry::builder()
        .temp_dir()
        .start();
    let http = common::client();
    let len = 32 * 1024 * 1024;
    let data = pseudo_random(len, 78);
    let d = sha256(&data);
    let r = http
        .post(format!(
            "{}/v2/library/big/blobs/uploads/?digest={d}",
            up.url()
        ))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let budget = 4 * 1024 * 1024;
    let (gate_url, gate) = gate::gate(up.addr(), budget).await;
    let config = format!("[[upstream]]\nurl = \"{gate_url}\"\n");
    let w = serve_with(&[("DOCKSIDE_MIRROR_CONFIG", config)], |_| {});
    let url = format!("http://{}/v2/library/big/blobs/{d}", w.addr);
    let mut r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut h = sha2::Sha256::new();
    let mut got = 0;
    while got < 1024 * 1024 {
        let c = tokio::time::timeout(Duration::from_secs(60), r.chunk())
            .await
            .expect("bytes while the upstream is held")
            .unwrap()
            .expect("not the end yet");
        got += c.len();
        h.update(&c);
    }
    let sent = gate.sent();
    assert!(
        sent <= budget && sent < len as u64,
        "the client has {got} bytes while the upstream sent {sent} of {len}"
    );
    gate.open();
    while let Some(c) = r.chunk().await.unwrap() {
        got += c.len();
        h.update(&c);
    }
    assert_eq!(got, len);
    assert_eq!(common::sha256_finish(h), d);
    let again = http.get(&url).send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert!(again.bytes().await.unwrap() == data);
    let blob = format!("/v2/library/big/blobs/{d}");
    assert_eq!(common::served(&up, "GET", &blob, Some(200)), 1);

    // A corrupted blob: the streaming client's transfer fails, and it is never cached.
    let (bad, bad_len) = common::seed_corrupted(&http, &up, "library/bad").await;
    let url = format!("http://{}/v2/library/bad/blobs/{bad}", w.addr);
    common::assert_streamed_transfer_fails(&http, &url, bad_len).await;
}
