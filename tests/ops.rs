//! Running dockside in production (issue 12), through the HTTP surface of a real `dockside
//! serve`: TLS with a test CA made here (push and pull with reqwest and the oci-client crate,
//! HTTP/2 by ALPN, the certificate reloaded on change and on SIGHUP, a bad pair refused at
//! start, the handshake timeout), the probes, Prometheus metrics on their own listener, and
//! JSON logs with request ids.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::tls::TestCa;
use common::{Server, client, pseudo_random, sha256_digest};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use reqwest::{StatusCode, Version};
use serde_json::Value;

/// A server on HTTPS with a certificate from `ca`, files in `dir`, and `args`.
fn tls_server(ca: &TestCa, dir: &std::path::Path, args: &[&str]) -> Server {
    let (cert, key) = ca.issue_into(dir);
    // The binary: --tls-cert/--tls-key, reloads on change and SIGHUP.
    Server::builder()
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .args(args.iter().copied())
        .start()
}

/// Pushes a blob in three requests (POST, PATCH, closing PUT) and a manifest naming it, then
/// reads both back; returns the manifest's digest.
async fn push_and_pull(c: &reqwest::Client, base: &str, repo: &str, seed: u64) -> String {
    let layer = pseudo_random(3 * 1024 * 1024 + 17, seed);
    let digest = sha256_digest(&layer);
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let loc = if loc.starts_with('/') {
        format!("{base}{loc}")
    } else {
        loc
    };
    let r = c
        .patch(&loc)
        .header("content-type", "application/octet-stream")
        .body(layer.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let loc = if loc.starts_with('/') {
        format!("{base}{loc}")
    } else {
        loc
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{loc}{sep}digest={digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{:?}", r.text().await);
    let config = b"{}".to_vec();
    let config_digest = sha256_digest(&config);
    let r = c
        .post(format!(
            "{base}/v2/{repo}/blobs/uploads/?digest={config_digest}"
        ))
        .body(config.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest, "size": layer.len()}],
    }))
    .unwrap();
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = c
        .get(format!("{base}/v2/{repo}/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), manifest);
    let r = c
        .get(format!("{base}/v2/{repo}/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), layer);
    sha256_digest(&manifest)
}

#[tokio::test]
async fn push_and_pull_over_tls_with_reqwest_and_oci_client() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("dockside test CA");
    let s = tls_server(&ca, dir.path(), &[]);
    assert!(s.base_url().starts_with("https://"));

    // reqwest, HTTP/1.1 only, then HTTP/2 as ALPN offers it.
    let h1 = ca.client(true);
    let r = h1.get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), Version::HTTP_11);
    push_and_pull(&h1, &s.base_url(), "tls/h1", 1).await;

    // A client that does not trust the CA is refused by its own TLS check, before any request.
    let untrusting = TestCa::new("another CA").client(false);
    assert!(untrusting.get(s.url("/v2/")).send().await.is_err());

    // Plain HTTP on the TLS port gets no registry answer.
    let plain = client()
        .get(format!("http://{}/v2/", s.addr()))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != StatusCode::OK);

    // oci-client over HTTPS, trusting the test CA.
    let oci = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Https,
        extra_root_certificates: vec![oci_client::client::Certificate {
            encoding: oci_client::client::CertificateEncoding::Pem,
            data: ca.pem().as_bytes().to_vec(),
        }],
        ..Default::default()
    });
    let reference: oci_client::Reference = format!("{}/tls/oci:v1", s.addr()).parse().unwrap();
    let layer = ImageLayer::oci_v1(pseudo_random(5 * 1024 * 1024 + 3, 7), None);
    let config = Config::oci_v1(br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), None);
    oci.push(
        &reference,
        std::slice::from_ref(&layer),
        config,
        &RegistryAuth::Anonymous,
        None,
    )
    .await
    .expect("oci-client pushes over TLS");
    let image = oci
        .pull(
            &reference,
            &RegistryAuth::Anonymous,
            vec![oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE],
        )
        .await
        .expect("oci-client pulls over TLS");
    assert_eq!(image.layers.len(), 1);
    assert_eq!(image.layers[0].data, layer.data);
}

#[tokio::test]
async fn http2_is_negotiated_by_alpn_and_carries_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("dockside test CA");
    let s = tls_server(&ca, dir.path(), &[]);
    let h2 = ca.client(false);
    let r = h2.get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), Version::HTTP_2, "ALPN must pick HTTP/2");
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    push_and_pull(&h2, &s.base_url(), "tls/h2", 2).await;
    // Errors keep the spec's envelope over HTTP/2 too.
    let r = h2
        .get(s.url("/v2/tls/h2/manifests/absent"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn idle_http2_connections_close_after_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("dockside test CA");
    let s = tls_server(
        &ca,
        dir.path(),
        &["--header-timeout", "1", "--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = metrics_url(&s);
    let open = || async {
        let m = client()
            .get(&metrics)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        sample(&m, "dockside_connections_open")
    };
    let h2 = ca.client(false);
    let r = h2.get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.version(), Version::HTTP_2);
    assert_eq!(open().await, 1.0, "the client keeps its connection");
    // A request that takes longer than the timeout is not cut: its connection is busy.
    let upload = h2
        .post(s.url("/v2/idle/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = s.resolve(upload.headers()["location"].to_str().unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let patch = tokio::spawn({
        let h2 = h2.clone();
        async move {
            h2.patch(&loc)
                .body(reqwest::Body::wrap_stream(tokio_stream(rx)))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    for _ in 0..4 {
        tx.send(Ok(vec![7u8; 1000])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(tx);
    assert_eq!(patch.await.unwrap(), StatusCode::ACCEPTED);
    // Then idle: the server closes it (GOAWAY) within about the timeout, while the client
    // still holds it in its pool.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open().await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the idle HTTP/2 connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The client opens a new one.
    let r = h2.get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

// Multi-threaded: the client's connection task must keep running (to answer the GOAWAY's
// ping) while this thread waits for the process.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_promptly_with_http2_connections_open() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("dockside test CA");
    let s = tls_server(&ca, dir.path(), &[]);
    let h2 = ca.client(false);
    let r = h2.get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.version(), Version::HTTP_2);
    // The client keeps its connection open; SIGTERM closes it (GOAWAY) and the process exits
    // within the harness's stop timeout, not after the 30 s grace.
    let started = Instant::now();
    s.stop();
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(h2);
}

/// The issuer of the certificate a fresh connection sees, as told by which CA a client must
/// trust to connect: `Some(true)` with `ca`'s client, `Some(false)` refused.
async fn trusted_by(ca: &TestCa, url: &str) -> bool {
    ca.client(false).get(url).send().await.is_ok()
}

#[tokio::test]
async fn certificate_is_reloaded_when_its_files_change_and_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestCa::new("first CA");
    let s = tls_server(&first, dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let url = s.url("/v2/");
    assert!(trusted_by(&first, &url).await);

    // A connection kept open across the reload keeps working (it holds the old certificate).
    let kept = first.client(false);
    assert_eq!(kept.get(&url).send().await.unwrap().status(), 200);

    // New files from another CA: within a few checks, new connections see the new pair.
    let second = TestCa::new("second CA");
    second.issue_into(dir.path());
    let deadline = Instant::now() + Duration::from_secs(15);
    while !trusted_by(&second, &url).await {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served within 15 s; log:\n{}",
            s.log_lines().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !trusted_by(&first, &url).await,
        "the old certificate is gone"
    );
    s.wait_for_log("loaded the certificate", Duration::from_secs(1));
    assert_eq!(kept.get(&url).send().await.unwrap().status(), 200);
    let m = client()
        .get(metrics_url(&s))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        sample(&m, "dockside_tls_certificate_reloads_total"),
        1.0,
        "{m}"
    );

    // A broken pair (a key that is not the certificate's) is refused; the current one stays.
    let (_, other_key) = TestCa::new("third CA").issue();
    std::fs::write(dir.path().join("server.key"), other_key).unwrap();
    s.wait_for_log("keeping the certificate in use", Duration::from_secs(15));
    assert!(trusted_by(&second, &url).await);

    // SIGHUP loads the files whether or not they changed: put a good pair back by hand with
    // the old modification times, then signal.
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    let third = TestCa::new("fourth CA");
    let before = std::fs::metadata(&cert).unwrap().modified().unwrap();
    let (c, k) = third.issue();
    std::fs::write(&cert, c).unwrap();
    std::fs::write(&key, k).unwrap();
    for p in [&cert, &key] {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(before)
            .unwrap();
    }
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !trusted_by(&third, &url).await {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `dockside serve` with `args`: its exit status and stderr, or a panic if it keeps running.
fn start_fails(args: &[&std::ffi::OsStr]) -> (std::process::ExitStatus, String) {
    let data = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dockside"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .args(args)
        .env_remove("DOCKSIDE_TLS_CERT")
        .env_remove("DOCKSIDE_TLS_KEY")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("dockside serve {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_missing_unreadable_or_mismatched_pair_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("dockside test CA");
    let (cert, key) = ca.issue_into(dir.path());
    let (_, other_key) = ca.issue();
    let other = dir.path().join("other.key");
    std::fs::write(&other, other_key).unwrap();
    let missing = dir.path().join("missing.crt");
    let garbage = dir.path().join("garbage.crt");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let cases: [(&std::path::Path, &std::path::Path, &str); 4] = [
        (&cert, &other, "is not the key of the certificate"),
        (&missing, &key, "cannot read the TLS certificate"),
        (&garbage, &key, "holds no PEM certificate"),
        (&cert, &cert, "cannot read the TLS key"),
    ];
    for (c, k, says) in cases {
        let (status, err) = start_fails(&[
            "--tls-cert".as_ref(),
            c.as_os_str(),
            "--tls-key".as_ref(),
            k.as_os_str(),
        ]);
        assert!(!status.success(), "{c:?} {k:?}: {status}");
        assert!(
            err.contains(says),
            "{c:?} {k:?}: expected {says:?} in:\n{err}"
        );
        assert!(!err.contains("listening on"), "{err}");
    }
    // One without the other is a usage error.
    let (status, err) = start_fails(&["--tls-cert".as_ref(), cert.as_os_str()]);
    assert!(!status.success());
    assert!(err.contains("--tls-key"), "{err}");
}

#[tokio::test]
async fn a_client_that_never_handshakes_loses_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("dockside test CA");
    let s = tls_server(
        &ca,
        dir.path(),
        &[
            "--max-connections",
            "1",
            "--tls-handshake-timeout",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    // The only slot: a TCP connection that never sends a ClientHello.
    let mut idle = TcpStream::connect(s.addr()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let r = ca.client(false).get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "the slot was free at once ({waited:?}): the idle connection did not hold it"
    );
    assert!(waited < Duration::from_secs(8), "waited {waited:?}");
    // The server closed the idle connection.
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(idle.read(&mut buf), Ok(0) | Err(_)));
    let m = client()
        .get(metrics_url(&s))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        sample(&m, "dockside_tls_handshake_failures_total"),
        1.0,
        "{m}"
    );
    // At most the keep-alive connection of the client that got through; the idle one is gone.
    assert!(sample(&m, "dockside_connections_open") <= 1.0, "{m}");
}

#[tokio::test]
async fn probes_answer_without_credentials_and_ready_fails_with_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dockside.toml");
    std::fs::write(&config, common::scenarios::auth_toml()).unwrap();
    // The binary: --config, and its --data directory taken away under it.
    let s = Server::builder()
        .arg("--config")
        .arg(&config)
        .env(
            "DOCKSIDE_AUTH_SECRET",
            "a-secret-of-at-least-32-bytes-for-tests",
        )
        .start();
    let c = client();
    // Access control is on: /v2/ wants credentials, the probes do not.
    assert_eq!(
        c.get(s.url("/v2/")).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    for path in ["/live", "/ready", "/healthz"] {
        let r = c.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(r.headers()["content-type"], "application/json");
        assert!(r.headers().get("www-authenticate").is_none());
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], "ok", "{path}: {v}");
        let r = c.head(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "HEAD {path}");
        let r = c.post(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "POST {path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "UNSUPPORTED");
    }
    // The key-value directory becomes unusable (a file where the directory was): /ready and
    // /healthz fail with 503 and name the store, /live still answers.
    let kv = s.data_dir().join("kv");
    std::fs::rename(&kv, s.data_dir().join("kv.away")).unwrap();
    std::fs::write(&kv, "not a directory").unwrap();
    for path in ["/ready", "/healthz"] {
        let r = c.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v,
            serde_json::json!({"status": "unavailable", "kv": "unavailable", "blobs": "ok"})
        );
    }
    assert_eq!(
        c.get(s.url("/live")).send().await.unwrap().status(),
        StatusCode::OK
    );
    std::fs::remove_file(&kv).unwrap();
    std::fs::rename(s.data_dir().join("kv.away"), &kv).unwrap();
    assert_eq!(
        c.get(s.url("/ready")).send().await.unwrap().status(),
        StatusCode::OK
    );
}

/// The value of the sample `name{labels}` in a Prometheus text exposition (0 if absent).
fn sample(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn metrics_url(s: &Server) -> String {
    let line = s.wait_for_log("metrics on http://", Duration::from_secs(5));
    let addr = line.split("metrics on http://").nth(1).unwrap();
    let addr = addr.split(['/', ' ', '"']).next().unwrap();
    format!("http://{addr}/metrics")
}

#[tokio::test]
async fn metrics_count_a_push_and_a_pull() {
    // The binary: --metrics-listen, found in its log.
    let s = Server::builder()
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start();
    let c = client();
    let metrics = metrics_url(&s);
    let before = c.get(&metrics).send().await.unwrap().text().await.unwrap();
    assert!(
        before.contains("# TYPE dockside_uploads_in_progress gauge"),
        "{before}"
    );
    assert_eq!(sample(&before, "dockside_uploads_in_progress"), 0.0);

    push_and_pull(&c, &s.base_url(), "metered", 3).await;
    let r = c
        .get(s.url("/v2/metered/blobs/sha256:0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    let after = c.get(&metrics).send().await.unwrap();
    assert_eq!(after.status(), StatusCode::OK);
    assert!(
        after.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let m = after.text().await.unwrap();
    let n = |k: &str| sample(&m, k);
    // POST + PATCH + PUT for the layer, a single POST for the config.
    assert_eq!(
        n(r#"dockside_http_requests_total{class="blob_upload",status="202"}"#),
        2.0
    );
    assert_eq!(
        n(r#"dockside_http_requests_total{class="blob_upload",status="201"}"#),
        2.0
    );
    assert_eq!(
        n(r#"dockside_http_requests_total{class="manifest_put",status="201"}"#),
        1.0
    );
    assert_eq!(
        n(r#"dockside_http_requests_total{class="manifest_get",status="200"}"#),
        1.0
    );
    assert_eq!(
        n(r#"dockside_http_requests_total{class="blob_get",status="200"}"#),
        1.0
    );
    assert_eq!(
        n(r#"dockside_http_requests_total{class="blob_get",status="400"}"#),
        1.0
    );
    assert_eq!(
        n(r#"dockside_http_request_duration_seconds_count{class="blob_upload"}"#),
        4.0
    );
    let layer = (3 * 1024 * 1024 + 17) as f64;
    assert!(n(r#"dockside_http_request_body_bytes_total{class="blob_upload"}"#) >= layer + 2.0);
    assert!(n(r#"dockside_http_response_body_bytes_total{class="blob_get"}"#) >= layer);
    assert_eq!(n("dockside_uploads_in_progress"), 0.0);
    assert_eq!(
        n("dockside_auth_failures_total{reason=\"bad_credentials\"}"),
        0.0
    );

    // The registry's own port does not serve metrics.
    let r = c.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Store failures: the key-value directory made unusable.
    let kv = s.data_dir().join("kv");
    std::fs::rename(&kv, s.data_dir().join("kv.away")).unwrap();
    std::fs::write(&kv, "not a directory").unwrap();
    let r = c
        .get(s.url("/v2/metered/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let m = c.get(&metrics).send().await.unwrap().text().await.unwrap();
    assert_eq!(
        sample(&m, r#"dockside_store_errors_total{class="manifest_get"}"#),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn metrics_count_auth_failures() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dockside.toml");
    std::fs::write(&config, common::scenarios::auth_toml()).unwrap();
    // The binary: --config and --metrics-listen.
    let s = Server::builder()
        .arg("--config")
        .arg(&config)
        .env(
            "DOCKSIDE_AUTH_SECRET",
            "a-secret-of-at-least-32-bytes-for-tests",
        )
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start();
    let c = client();
    let metrics = metrics_url(&s);
    // An anonymous challenge is not a failure; a wrong password is.
    let r = c.get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for _ in 0..3 {
        let r = c
            .get(s.url("/v2/"))
            .basic_auth("alice", Some("wrong"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let r = c
        .get(s.url("/token?service=edge"))
        .basic_auth("nobody", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let m = c.get(&metrics).send().await.unwrap().text().await.unwrap();
    assert_eq!(
        sample(
            &m,
            r#"dockside_auth_failures_total{reason="bad_credentials"}"#
        ),
        4.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"dockside_http_requests_total{class="base",status="401"}"#
        ),
        4.0
    );
    assert_eq!(
        sample(
            &m,
            r#"dockside_http_requests_total{class="token",status="401"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn an_upload_in_progress_is_a_gauge() {
    // The binary: --metrics-listen.
    let s = Server::builder()
        .args(["--metrics-listen", "127.0.0.1:0"])
        .start();
    let c = client();
    let metrics = metrics_url(&s);
    let r = c
        .post(s.url("/v2/slow/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = s.resolve(r.headers()["location"].to_str().unwrap());
    // A PATCH whose body trickles: while it streams, one upload is in progress.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(tokio_stream(rx));
    let patch = tokio::spawn({
        let c = c.clone();
        async move { c.patch(&loc).body(body).send().await.unwrap().status() }
    });
    tx.send(Ok(vec![1u8; 1024])).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = c.get(&metrics).send().await.unwrap().text().await.unwrap();
        if sample(&m, "dockside_uploads_in_progress") == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no upload in progress:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(tx);
    assert_eq!(patch.await.unwrap(), StatusCode::ACCEPTED);
    let m = c.get(&metrics).send().await.unwrap().text().await.unwrap();
    assert_eq!(sample(&m, "dockside_uploads_in_progress"), 0.0);
}

/// A stream of what arrives on `rx`, for a request body sent bit by bit.
fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn json_logs_carry_the_request_id_of_the_response_header() {
    // The binary: its access log, as a log, with --log-format json.
    let s = Server::builder().args(["--log-format", "json"]).start();
    let c = client();
    // A sane id from the client is kept.
    let r = c
        .get(s.url("/v2/"))
        .header("x-request-id", "trace-42.abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-42.abc");
    // Insane ones (too long, spaces) are replaced by a fresh id.
    let long = "x".repeat(200);
    for bad in [long.as_str(), "two words"] {
        let r = c
            .get(s.url("/v2/nothing/manifests/x"))
            .header("x-request-id", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let id = r.headers()["x-request-id"].to_str().unwrap();
        assert_ne!(id, bad);
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }
    // Without one, each response gets its own.
    let a = c.get(s.url("/live")).send().await.unwrap();
    let b = c.get(s.url("/live")).send().await.unwrap();
    assert_ne!(a.headers()["x-request-id"], b.headers()["x-request-id"]);
    let b_id = b.headers()["x-request-id"].to_str().unwrap().to_owned();

    let line = s.wait_for_log(&b_id, Duration::from_secs(5));
    let v: Value = serde_json::from_str(&line).expect("a JSON access line");
    assert_eq!(v["request_id"], b_id.as_str());
    assert_eq!(v["target"], "dockside::access");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/live");
    assert_eq!(v["status"], 200);
    assert_eq!(v["class"], "probe");
    assert!(v["ms"].is_number());
    assert_eq!(v["bytes_out"], 15, "{line}"); // {"status":"ok"}
    let kept = s.wait_for_log("trace-42.abc", Duration::from_secs(5));
    let v: Value = serde_json::from_str(&kept).unwrap();
    assert_eq!(v["class"], "base");
    // Events logged while a request runs carry its id: a failing readiness probe's warning.
    let kv = s.data_dir().join("kv");
    std::fs::rename(&kv, s.data_dir().join("kv.away")).unwrap();
    std::fs::write(&kv, "not a directory").unwrap();
    let r = c
        .get(s.url("/ready"))
        .header("x-request-id", "ready-9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let warning = s.wait_for_log("readiness probe", Duration::from_secs(5));
    let v: Value = serde_json::from_str(&warning).unwrap();
    assert_eq!(v["level"], "WARN");
    assert_eq!(v["span"]["id"], "ready-9", "{warning}");
    // Every line on stderr is one JSON object, the start-up events too.
    for l in s.log_lines() {
        let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
    }
}

#[tokio::test]
async fn text_logs_stay_one_line_per_request_with_the_id_last() {
    // The binary: its access log, as a log.
    let s = Server::start();
    let r = client()
        .get(s.url("/v2/"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let line = s.wait_for_log("GET /v2/ 200", Duration::from_secs(5));
    assert!(line.ends_with(" abc-123"), "{line}");
    assert!(serde_json::from_str::<Value>(&line).is_err());
}
