//! The mirror streams a blob to its first client while it is fetched (src/mirror/stream.rs):
//! a real upstream (the test registry of `dockside::testing`) behind a TCP gate that forwards
//! only a byte budget of what the upstream sends, so a test can hold the upstream part-way and
//! look at what the client already has. Upstream fetches are counted from the requests the
//! upstream served. The mirror itself is `dockside serve --mirror-config`, the binary: its
//! data directory on disk is what the tests look at.

mod common;
#[path = "common/gate.rs"]
mod gate;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Server, client, pseudo_random, sha256_digest};
use dockside::testing::TestRegistry;
use gate::gate;
use reqwest::StatusCode;
use sha2::Digest as _;

const MIB: usize = 1024 * 1024;

fn start_mirror(upstream_url: &str, extra: &str, dir: &Path) -> Server {
    let f = dir.join("mirror.toml");
    std::fs::write(
        &f,
        format!("{extra}\n[[upstream]]\nurl = \"{upstream_url}\"\n"),
    )
    .unwrap();
    // The binary: its --mirror-config and the data directory it fills are under test.
    Server::builder().arg("--mirror-config").arg(f).start()
}

async fn seed(http: &reqwest::Client, up: &TestRegistry, repo: &str, data: Vec<u8>) -> String {
    let d = sha256_digest(&data);
    let r = http
        .post(format!("{}/v2/{repo}/blobs/uploads/?digest={d}", up.url()))
        .header("content-type", "application/octet-stream")
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    d
}

fn upstream_gets(up: &TestRegistry, repo: &str, d: &str) -> usize {
    let path = format!("/v2/{repo}/blobs/{d}");
    up.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == path && r.status == 200)
        .count()
}

fn stored(mirror: &Server, d: &str) -> bool {
    let hex = d.trim_start_matches("sha256:");
    mirror
        .data_dir()
        .join(format!("blobs/sha256/{}/{hex}", &hex[..2]))
        .exists()
}

/// Reads `r` until at least `n` bytes arrived (or the body ends), into `h`; the count.
async fn read_at_least(r: &mut reqwest::Response, n: usize, h: &mut sha2::Sha256) -> usize {
    let mut got = 0;
    while got < n {
        let c = tokio::time::timeout(Duration::from_secs(60), r.chunk())
            .await
            .expect("bytes within 60 s")
            .unwrap();
        let Some(c) = c else { break };
        got += c.len();
        h.update(&c);
    }
    got
}

/// The first client of a cold blob gets bytes while the upstream has sent only part of it:
/// the upstream is held at 16 MiB of 256 (`DOCKSIDE_MIRROR_STREAM_TEST_MIB`), the client must
/// have 4 MiB by then. Then the whole blob, byte for byte, stored, served again without the
/// upstream.
#[tokio::test(flavor = "multi_thread")]
async fn cold_blob_streams_to_the_client_before_the_upstream_has_sent_it() {
    let mib: usize = std::env::var("DOCKSIDE_MIRROR_STREAM_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let tmp = tempfile::tempdir().unwrap();
    let http = client();
    let up = TestRegistry::start();
    let data = pseudo_random(mib * MIB, 21);
    let d = seed(&http, &up, "library/big", data.clone()).await;
    let budget = 16 * MIB as u64;
    let (gate_url, gate) = gate(up.addr(), budget).await;
    let mirror = start_mirror(&gate_url, "", tmp.path());
    let url = mirror.url(&format!("/v2/library/big/blobs/{d}"));

    let start = Instant::now();
    let mut r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.content_length(), Some((mib * MIB) as u64));
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    let mut h = sha2::Sha256::new();
    let first = read_at_least(&mut r, 1, &mut h).await;
    let ttfb = start.elapsed();
    let mut got = first + read_at_least(&mut r, 4 * MIB - first.min(4 * MIB), &mut h).await;
    let sent = gate.sent();
    assert!(
        got >= 4 * MIB && sent <= budget && sent < (mib * MIB) as u64,
        "the client has {got} bytes while the upstream sent {sent} of {}",
        mib * MIB
    );
    assert!(!stored(&mirror, &d), "not visible before it is whole");
    gate.open();
    got += read_at_least(&mut r, usize::MAX, &mut h).await;
    let total = start.elapsed();
    eprintln!(
        "{mib} MiB cold through the mirror: first byte after {ttfb:?} (upstream held at \
         {} MiB), whole after {total:?}",
        budget / MIB as u64
    );
    assert_eq!(got, mib * MIB);
    assert_eq!(common::sha256_finish(h), d);
    assert!(stored(&mirror, &d), "stored once the client has it all");
    assert_eq!(upstream_gets(&up, "library/big", &d), 1);

    // From the cache now, the upstream gone.
    drop(up);
    let again = http.get(&url).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert!(again.bytes().await.unwrap() == data);
}

/// A corrupted upstream blob: the client that streams it sees its transfer fail (never a
/// clean end with wrong bytes), and nothing is stored; repaired upstream, it is served whole.
#[tokio::test(flavor = "multi_thread")]
async fn corrupted_upstream_blob_aborts_the_streaming_client_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let http = client();
    let up = TestRegistry::builder().temp_dir().start();
    let len = 24 * MIB + 5;
    let data = pseudo_random(len, 22);
    let d = seed(&http, &up, "library/bad", data.clone()).await;
    let hex = d.trim_start_matches("sha256:");
    let path = up
        .data_dir()
        .unwrap()
        .join(format!("blobs/sha256/{}/{hex}", &hex[..2]));
    let mut bad = std::fs::read(&path).unwrap();
    bad[len - 100] ^= 0xff; // in the very last chunk: everything before it is good
    std::fs::write(&path, &bad).unwrap();
    let mirror = start_mirror(up.url(), "", tmp.path());
    let url = mirror.url(&format!("/v2/library/bad/blobs/{d}"));
    // Twice a 200 (streaming: the status is sent first) whose body fails before the last
    // chunk, never a clean end with wrong bytes.
    common::assert_streamed_transfer_fails(&http, &url, len).await;
    assert!(
        !stored(&mirror, &d),
        "a blob failing verification is never stored"
    );
    // Nothing left behind in the temporary area either.
    let uploads = mirror.data_dir().join("uploads");
    let left: Vec<_> = walk(&uploads)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("mirror-") && p.is_file())
        .collect();
    assert!(left.is_empty(), "left over: {left:?}");
    std::fs::write(&path, &data).unwrap();
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap() == data);
    assert!(stored(&mirror, &d));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

/// The first client goes away mid-way: the fetch is abandoned and its lease released, so the
/// next client fetches again (it does not wait for a lease nobody renews) and gets it whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_goes_away_abandons_the_fetch() {
    let tmp = tempfile::tempdir().unwrap();
    let http = client();
    let up = TestRegistry::start();
    let data = pseudo_random(48 * MIB, 23);
    let d = seed(&http, &up, "library/left", data.clone()).await;
    let (gate_url, gate) = gate(up.addr(), 8 * MIB as u64).await;
    // A long lease: only its release lets the second client in quickly.
    let mirror = start_mirror(&gate_url, "lease_secs = 600", tmp.path());
    let url = mirror.url(&format!("/v2/library/left/blobs/{d}"));
    let mut r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut h = sha2::Sha256::new();
    assert!(read_at_least(&mut r, MIB, &mut h).await >= MIB);
    drop(r);
    gate.open();
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(60), async {
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.bytes().await.unwrap()
    })
    .await
    .expect("the second client is not held by the abandoned fetch's lease");
    assert!(r == data);
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(stored(&mirror, &d));
}

/// A fetch longer than `lease_secs` renews its lease: a second client arriving meanwhile waits
/// for it instead of fetching again (with the lease expired, it would take over and fetch).
#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_longer_than_its_lease_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let http = client();
    let up = TestRegistry::start();
    let data = pseudo_random(32 * MIB, 24);
    let d = seed(&http, &up, "library/slow", data.clone()).await;
    let (gate_url, gate) = gate(up.addr(), 4 * MIB as u64).await;
    let mirror = start_mirror(&gate_url, "lease_secs = 2", tmp.path());
    let url = mirror.url(&format!("/v2/library/slow/blobs/{d}"));
    let mut first = http.get(&url).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let mut h = sha2::Sha256::new();
    let mut got = read_at_least(&mut first, MIB, &mut h).await;
    let second = {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move { http.get(&url).send().await.unwrap().bytes().await.unwrap() })
    };
    // Three and a half lease terms with the upstream stalled.
    tokio::time::sleep(Duration::from_millis(7_000)).await;
    gate.open();
    got += read_at_least(&mut first, usize::MAX, &mut h).await;
    assert_eq!(got, data.len());
    assert_eq!(common::sha256_finish(h), d);
    assert!(second.await.unwrap() == data);
    assert_eq!(
        upstream_gets(&up, "library/slow", &d),
        1,
        "one upstream fetch: the lease was renewed while it ran"
    );
}
