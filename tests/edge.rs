//! The wasi:http component under a real runtime: `wasmtime serve`, which starts a fresh
//! instance for every request, so a push that works here keeps no state in memory.
//!
//! Needs the built component and the wasmtime CLI: `.ci/edge` builds and installs both and runs
//! `cargo test --features edge --test edge` with `DOCKSIDE_WASI_COMPONENT` and
//! `DOCKSIDE_WASMTIME` set. Without them the test fails and says so; it never skips.
#![cfg(feature = "edge")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::scenarios::{self, AUTH_SECRET, auth_toml};
use common::{pseudo_random, sha256_digest as sha256};

struct Wasmtime {
    child: Child,
    addr: String,
    _data: tempfile::TempDir,
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
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("http://").nth(1) {
                let _ = tx.send(rest.trim_end_matches('/').to_owned());
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
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn push_and_pull_through_the_wasi_component() {
    let w = serve();
    scenarios::push_and_pull(&w.addr).await;
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
