//! Blobs stream through the server in constant memory: a 2 GiB blob, generated on the fly and
//! never held in memory by the test either, is pushed to the real server (once as one PUT, once
//! as 64 MiB PATCHes) and pulled back, while the server's peak resident set size (`VmHWM`) stays
//! within 16 MiB of what it was after startup and a small warm-up.
//!
//! Run with `--nocapture` to see the figures. The server binary is the one cargo built for the
//! tests (a debug build unless tests run in release), so hashing 2 GiB there takes a while.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Server, pseudo_random, sha256_digest, sha256_finish};
use futures_util::{Stream, StreamExt};
use reqwest::StatusCode;
use sha2::{Digest as _, Sha256};

const BLOB_SIZE: u64 = 2 << 30;
/// The generator's unit, and the largest buffer the test holds.
const PIECE: usize = 1 << 20;
const PIECES: u64 = BLOB_SIZE / PIECE as u64;
const PATCH_SIZE: u64 = 64 << 20;
/// How much the server's peak RSS may grow while a 2 GiB blob passes through it.
const MAX_GROWTH_KIB: u64 = 16 * 1024;

/// A 2 GiB blob made 1 MiB piece at a time. Piece `i` is a fixed pseudo-random 1 MiB pad rotated
/// by a pseudo-random offset, with `i` stamped over its first 8 bytes: the pieces all differ,
/// swapping two changes the digest, and making one costs a copy.
#[derive(Clone)]
struct Blob {
    seed: u64,
    pad: Bytes,
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Blob {
    fn new(seed: u64) -> Self {
        Blob {
            seed,
            pad: Bytes::from(pseudo_random(PIECE, seed)),
        }
    }

    fn piece(&self, i: u64) -> Bytes {
        let off =
            (splitmix64(self.seed ^ i.wrapping_mul(0x2545_F491_4F6C_DD1D)) % PIECE as u64) as usize;
        let mut v = Vec::with_capacity(PIECE);
        v.extend_from_slice(&self.pad[off..]);
        v.extend_from_slice(&self.pad[..off]);
        v[..8].copy_from_slice(&i.to_le_bytes());
        Bytes::from(v)
    }

    /// Pieces `first..first + count` as a request body, made as the body is sent (and hashed
    /// into `hasher` on the way, if given).
    fn stream(
        &self,
        first: u64,
        count: u64,
        hasher: Option<Arc<Mutex<Sha256>>>,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let blob = self.clone();
        futures_util::stream::iter(first..first + count).map(move |i| {
            let piece = blob.piece(i);
            if let Some(h) = &hasher {
                h.lock().unwrap().update(&piece);
            }
            Ok(piece)
        })
    }

    /// The sha256 digest of the whole blob, computed by generating it once.
    fn digest(&self) -> String {
        let mut h = Sha256::new();
        for i in 0..PIECES {
            h.update(self.piece(i));
        }
        sha256_finish(h)
    }
}

/// Checks a pulled byte stream against the blob, piece by piece, whatever its framing.
struct Verifier {
    blob: Blob,
    next: u64,
    expected: Bytes,
    pos: usize,
    total: u64,
}

impl Verifier {
    fn new(blob: &Blob) -> Self {
        Verifier {
            blob: blob.clone(),
            next: 0,
            expected: Bytes::new(),
            pos: 0,
            total: 0,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.pos == self.expected.len() {
                assert!(
                    self.next < PIECES,
                    "the pulled blob is longer than {BLOB_SIZE} bytes"
                );
                self.expected = self.blob.piece(self.next);
                self.next += 1;
                self.pos = 0;
            }
            let n = data.len().min(self.expected.len() - self.pos);
            assert!(
                data[..n] == self.expected[self.pos..self.pos + n],
                "the pulled blob differs from the pushed one within bytes {}..{}",
                self.total,
                self.total + n as u64
            );
            self.pos += n;
            self.total += n as u64;
            data = &data[n..];
        }
    }

    fn finish(self) {
        assert_eq!(self.total, BLOB_SIZE, "the pulled blob is short");
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// An HTTP client whose requests may take long (2 GiB through a debug build), but not forever.
fn slow_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(1800))
        .build()
        .unwrap()
}

/// Starts a server and warms it up with a few tiny requests (the code paths of the big ones);
/// returns it with its peak RSS afterwards.
async fn warm_server(c: &reqwest::Client, repo: &str) -> (Server, u64) {
    // The binary: the server's own process's RSS is measured, apart from the test's.
    let s = Server::start();
    let resp = c.get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let tiny = pseudo_random(1024, 7);
    let digest = sha256_digest(&tiny);
    let resp = c
        .post(s.url(&format!("/v2/{repo}/warmup/blobs/uploads/?digest={digest}")))
        .body(tiny.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = c
        .get(s.url(&format!("/v2/{repo}/warmup/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.bytes().await.unwrap() == tiny);
    let baseline = s.peak_rss_kib();
    println!(
        "[{repo}] after startup and warm-up: peak RSS {:.1} MiB (current {:.1} MiB)",
        mib(baseline),
        mib(s.rss_kib())
    );
    (s, baseline)
}

/// Asserts that the server's peak RSS grew less than [`MAX_GROWTH_KIB`] since `baseline`.
fn check_peak(s: &Server, repo: &str, stage: &str, baseline: u64) {
    let peak = s.peak_rss_kib();
    let growth = peak.saturating_sub(baseline);
    println!(
        "[{repo}] after {stage}: peak RSS {:.1} MiB (current {:.1} MiB), growth {:.1} MiB",
        mib(peak),
        mib(s.rss_kib()),
        mib(growth)
    );
    assert!(
        growth < MAX_GROWTH_KIB,
        "[{repo}] the server's peak RSS grew by {:.1} MiB during the {stage} of a 2 GiB blob \
         (limit {:.0} MiB): it does not stream",
        mib(growth),
        mib(MAX_GROWTH_KIB)
    );
}

/// Pulls the blob back as a stream, checks every byte and the headers, and checks the peak.
async fn pull_and_check(
    c: &reqwest::Client,
    s: &Server,
    repo: &str,
    blob: &Blob,
    digest: &str,
    baseline: u64,
) {
    let started = Instant::now();
    let resp = c
        .get(s.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["docker-content-digest"].to_str().unwrap(),
        digest
    );
    assert_eq!(
        resp.headers()["content-length"].to_str().unwrap(),
        BLOB_SIZE.to_string()
    );
    let mut verifier = Verifier::new(blob);
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        verifier.feed(&chunk.expect("read the pulled blob"));
    }
    verifier.finish();
    println!(
        "[{repo}] pulled and verified 2 GiB in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    check_peak(s, repo, "pull", baseline);
}

#[tokio::test]
async fn two_gib_monolithic_put_streams() {
    let repo = "memory/monolithic";
    let blob = Blob::new(1);
    let started = Instant::now();
    let digest = blob.digest();
    println!(
        "[{repo}] digest {digest}, computed in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let c = slow_client();
    let (s, baseline) = warm_server(&c, repo).await;

    // POST, then one PUT with the whole blob.
    let started = Instant::now();
    let resp = c
        .post(s.url(&format!("/v2/{repo}/blobs/uploads/")))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = s.resolve(resp.headers()["location"].to_str().unwrap());
    let sep = if location.contains('?') { '&' } else { '?' };
    let resp = c
        .put(format!("{location}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .header("content-length", BLOB_SIZE.to_string())
        .body(reqwest::Body::wrap_stream(blob.stream(0, PIECES, None)))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    println!(
        "[{repo}] pushed 2 GiB in one PUT in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    check_peak(&s, repo, "push", baseline);

    pull_and_check(&c, &s, repo, &blob, &digest, baseline).await;
}

#[tokio::test]
async fn two_gib_in_64_mib_patches_streams() {
    let repo = "memory/chunked";
    let blob = Blob::new(2);
    let c = slow_client();
    let (s, baseline) = warm_server(&c, repo).await;

    let started = Instant::now();
    let resp = c
        .post(s.url(&format!("/v2/{repo}/blobs/uploads/")))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let mut location = s.resolve(resp.headers()["location"].to_str().unwrap());

    // The digest is computed as the pieces go out.
    let hasher = Arc::new(Mutex::new(Sha256::new()));
    let per_patch = PATCH_SIZE / PIECE as u64;
    for k in 0..BLOB_SIZE / PATCH_SIZE {
        let (start, end) = (k * PATCH_SIZE, (k + 1) * PATCH_SIZE - 1);
        let resp = c
            .patch(&location)
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{start}-{end}"))
            .header("content-length", PATCH_SIZE.to_string())
            .body(reqwest::Body::wrap_stream(blob.stream(
                k * per_patch,
                per_patch,
                Some(hasher.clone()),
            )))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "PATCH {start}-{end}: {}",
            resp.text().await.unwrap_or_default()
        );
        assert_eq!(
            resp.headers()["range"].to_str().unwrap(),
            format!("0-{end}")
        );
        location = s.resolve(resp.headers()["location"].to_str().unwrap());
    }
    let digest = sha256_finish(
        Arc::try_unwrap(hasher)
            .expect("the request bodies are gone")
            .into_inner()
            .unwrap(),
    );
    let sep = if location.contains('?') { '&' } else { '?' };
    let resp = c
        .put(format!("{location}{sep}digest={digest}"))
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    println!(
        "[{repo}] pushed 2 GiB in {} PATCHes of 64 MiB in {:.1} s; digest {digest}",
        BLOB_SIZE / PATCH_SIZE,
        started.elapsed().as_secs_f64()
    );
    check_peak(&s, repo, "push", baseline);

    pull_and_check(&c, &s, repo, &blob, &digest, baseline).await;
}
