//! A manifest PUT racing the collector's claim on the same manifest record (issue 14). The
//! collector claims an old, untagged manifest by compare-and-swap (record -> `gone`), then
//! deletes its entries and the record; a PUT of the same bytes with a new tag interleaved with
//! that must either keep the manifest (the tag resolves and everything pulls byte for byte) or
//! answer 503 with `Retry-After` and succeed when retried, never leave a tag naming nothing.
//!
//! The interleavings are forced, not hoped for: the memory store sits behind a wrapper that
//! pauses the collector or the PUT at chosen store calls (the store is real; the wrapper only
//! waits), driven in process through `Registry::handle` on one thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use dockside::{Config, GcConfig, KeyValue, MemoryBlobs, MemoryKv, Registry, StoreError};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const REPO: &str = "race/app";

/// A point where a store call waits, once armed, until the test releases it.
#[derive(Default)]
struct Pause {
    armed: AtomicBool,
    reached: AtomicBool,
    released: AtomicBool,
}

impl Pause {
    async fn pass(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.reached.store(true, Ordering::SeqCst);
            until(
                || self.released.load(Ordering::SeqCst),
                "a paused call's release",
            )
            .await;
        }
    }
    fn reached(&self) -> bool {
        self.reached.load(Ordering::SeqCst)
    }
    fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
    }
}

/// Yields (to the other futures of the `join!`) until `cond`, bounded.
async fn until(cond: impl Fn() -> bool, what: &str) {
    for _ in 0..100_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("waited too long for {what}");
}

#[derive(Default)]
struct Points {
    /// The manifest record's key this race is about.
    key: std::sync::Mutex<String>,
    /// Just before the collector's claim compare-and-swap.
    before_claim: Pause,
    /// Just after the collector's claim succeeded.
    after_claim: Pause,
    /// Just after a read of the record (armed while the collector is paused, so: the PUT's).
    after_read: Pause,
}

#[derive(Clone, Default)]
struct Racing {
    kv: MemoryKv,
    p: Arc<Points>,
}

impl Racing {
    fn target(&self, key: &str) -> bool {
        *self.p.key.lock().unwrap() == key
    }
}

/// A claim writes the record with `"gone":true` in its JSON header line.
fn is_claim(new: &[u8]) -> bool {
    let header = new.split(|b| *b == b'\n').next().unwrap_or_default();
    serde_json::from_slice::<Value>(header).is_ok_and(|h| h["gone"] == true)
}

impl KeyValue for Racing {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self.kv.get(key).await;
        if self.target(key) {
            self.p.after_read.pass().await;
        }
        v
    }
    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.kv.set(key, value).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.kv.delete(key).await
    }
    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.kv.list(prefix, after, limit).await
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let claim = self.target(key) && is_claim(new);
        if claim {
            self.p.before_claim.pass().await;
        }
        let ok = self.kv.compare_and_swap(key, expected, new).await?;
        if claim && ok {
            self.p.after_claim.pass().await;
        }
        Ok(ok)
    }
}

fn sha256(data: &[u8]) -> String {
    let h = Sha256::digest(data);
    format!(
        "sha256:{}",
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: Bytes,
}

struct H {
    kv: Racing,
    r: Registry<Racing, MemoryBlobs>,
    manifest: Vec<u8>,
    digest: String,
    blobs: Vec<(String, Vec<u8>)>,
}

impl H {
    /// A registry collecting untagged manifests past an hour's grace, holding one untagged
    /// image whose manifest record is made old (so the collector takes it) while its blobs
    /// stay young (so they survive, and a kept manifest pulls whole).
    async fn new() -> Self {
        let kv = Racing::default();
        let config = Config {
            gc: GcConfig {
                grace_secs: 3600,
                untagged: true,
                ..GcConfig::default()
            },
            ..Config::default()
        };
        let r = Registry::new(kv.clone(), MemoryBlobs::new(), config);
        let mut h = H {
            kv,
            r,
            manifest: Vec::new(),
            digest: String::new(),
            blobs: Vec::new(),
        };
        let mut descs = Vec::new();
        for part in ["config", "layer"] {
            let data = format!("gc race {part}").into_bytes();
            let d = sha256(&data);
            let uri = format!("/v2/{REPO}/blobs/uploads/?digest={d}");
            h.ok(h.send(Method::POST, &uri, &data).await, 201);
            descs.push(
                json!({"mediaType": "application/octet-stream", "digest": d, "size": data.len()}),
            );
            h.blobs.push((d, data));
        }
        h.manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": descs[0], "layers": [descs[1]],
        }))
        .unwrap();
        h.digest = sha256(&h.manifest);
        let uri = format!("/v2/{REPO}/manifests/{}", h.digest);
        h.ok(h.send(Method::PUT, &uri, &h.manifest.clone()).await, 201);

        // Age the record: its header's `at` to the epoch.
        let key = dockside::layout::manifest(
            &dockside::RepoName::parse(REPO, 255).unwrap(),
            &dockside::Digest::parse(&h.digest).unwrap(),
        );
        let raw = h.kv.kv.get(&key).await.unwrap().expect("stored");
        let nl = raw.iter().position(|b| *b == b'\n').unwrap();
        let mut header: Value = serde_json::from_slice(&raw[..nl]).unwrap();
        assert!(header.get("at").is_some(), "record header: {header}");
        header["at"] = json!(0);
        let mut aged = serde_json::to_vec(&header).unwrap();
        aged.extend_from_slice(&raw[nl..]);
        h.kv.kv.set(&key, &aged).await.unwrap();
        *h.kv.p.key.lock().unwrap() = key;
        h
    }

    async fn send(&self, method: Method, uri: &str, body: &[u8]) -> Reply {
        let mut req = Request::builder().method(method.clone()).uri(uri);
        if method == Method::PUT {
            req = req.header("content-type", MANIFEST);
        }
        let resp = self
            .r
            .handle(req.body(Full::new(Bytes::copy_from_slice(body))).unwrap())
            .await;
        Reply {
            status: resp.status().as_u16(),
            retry_after: resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned()),
            body: resp.into_body().collect().await.unwrap().to_bytes(),
        }
    }

    #[track_caller]
    fn ok(&self, r: Reply, want: u16) -> Bytes {
        assert_eq!(r.status, want, "{}", String::from_utf8_lossy(&r.body));
        r.body
    }

    /// The racing push: the same manifest bytes, with a new tag.
    async fn put_tagged(&self) -> Reply {
        let uri = format!("/v2/{REPO}/manifests/fresh");
        self.send(Method::PUT, &uri, &self.manifest).await
    }

    async fn collect(&self) {
        for _ in 0..10_000 {
            let b = self.ok(self.send(Method::POST, "/v2/_dockside/gc", b"").await, 200);
            let p: Value = serde_json::from_slice(&b).unwrap();
            if p["phase"] == "idle" {
                return;
            }
        }
        panic!("the collection never finished");
    }

    /// After the collection: a racing PUT that got 503 is retried, as a client would; then the
    /// tag resolves to the manifest, which pulls byte for byte with its blobs.
    async fn settle(&self, raced: Reply) {
        eprintln!("the racing PUT got {}", raced.status);
        match raced.status {
            201 => {}
            503 => {
                assert!(raced.retry_after.is_some(), "a 503 without Retry-After");
                let e: Value = serde_json::from_slice(&raced.body).expect("an error envelope");
                assert!(e["errors"][0]["code"].is_string(), "{e}");
                self.ok(self.put_tagged().await, 201);
            }
            s => panic!(
                "the racing PUT got {s}: {}",
                String::from_utf8_lossy(&raced.body)
            ),
        }
        let tagged = self
            .send(Method::GET, &format!("/v2/{REPO}/manifests/fresh"), b"")
            .await;
        assert_eq!(
            tagged.status,
            200,
            "the tag the PUT answered for names nothing: {}",
            String::from_utf8_lossy(&tagged.body)
        );
        assert_eq!(&tagged.body[..], &self.manifest[..]);
        let by_digest = self.ok(
            self.send(
                Method::GET,
                &format!("/v2/{REPO}/manifests/{}", self.digest),
                b"",
            )
            .await,
            200,
        );
        assert_eq!(&by_digest[..], &self.manifest[..]);
        for (d, data) in &self.blobs {
            let b = self.ok(
                self.send(Method::GET, &format!("/v2/{REPO}/blobs/{d}"), b"")
                    .await,
                200,
            );
            assert_eq!(&b[..], &data[..]);
        }
        // A second collection keeps it: it is tagged now.
        self.collect().await;
        let again = self.ok(
            self.send(Method::GET, &format!("/v2/{REPO}/manifests/fresh"), b"")
                .await,
            200,
        );
        assert_eq!(&again[..], &self.manifest[..]);
    }
}

/// The PUT comes after the claim: it reads a claimed record (which reads as absent), and
/// before the fix wrote a new record over the claim, which the collector then deleted.
#[tokio::test]
async fn put_after_the_claim_keeps_its_tag_or_is_told_to_retry() {
    let h = H::new().await;
    let p = h.kv.p.clone();
    p.after_claim.armed.store(true, Ordering::SeqCst);
    let ((), raced) = tokio::join!(h.collect(), async {
        until(|| p.after_claim.reached(), "the collector's claim").await;
        let r = h.put_tagged().await;
        p.after_claim.release();
        r
    });
    assert!(p.after_claim.reached(), "the collector never claimed it");
    h.settle(raced).await;
}

/// The PUT reads the record before the claim and writes after it: before the fix its plain
/// `set` landed over the claim, and the collector's final delete took the record.
#[tokio::test]
async fn put_reading_before_the_claim_and_writing_after_it_is_safe() {
    let h = H::new().await;
    let p = h.kv.p.clone();
    p.before_claim.armed.store(true, Ordering::SeqCst);
    let ((), raced, ()) = tokio::join!(
        h.collect(),
        async {
            until(|| p.before_claim.reached(), "the collector's judgement").await;
            // The collector waits at its claim: the next read of the record is the PUT's.
            p.after_read.armed.store(true, Ordering::SeqCst);
            h.put_tagged().await
        },
        async {
            until(|| p.after_read.reached(), "the PUT's read").await;
            p.after_claim.armed.store(true, Ordering::SeqCst);
            p.before_claim.release();
            until(|| p.after_claim.reached(), "the collector's claim").await;
            // Claimed; the PUT writes now, the collector deletes after.
            p.after_read.release();
            // Let the PUT run to its end (or to its next wait) before the collector goes on.
            for _ in 0..1000 {
                tokio::task::yield_now().await;
            }
            p.after_claim.release();
        }
    );
    assert!(p.after_claim.reached(), "the collector never claimed it");
    h.settle(raced).await;
}

/// Two PUTs of the same old manifest, no collector: the one that loses the compare-and-swap
/// reads the record again, finds the winner's fresh, equal record, and goes on to its tag (a
/// lost race to another pusher is no reason for a 503).
#[tokio::test]
async fn a_put_losing_the_record_to_a_concurrent_put_succeeds() {
    let h = H::new().await;
    let p = h.kv.p.clone();
    p.after_read.armed.store(true, Ordering::SeqCst);
    let (first, ()) = tokio::join!(h.put_tagged(), async {
        until(|| p.after_read.reached(), "the first PUT's read").await;
        let uri = format!("/v2/{REPO}/manifests/other");
        h.ok(h.send(Method::PUT, &uri, &h.manifest).await, 201);
        p.after_read.release();
    });
    h.ok(first, 201);
    for tag in ["fresh", "other"] {
        let b = h.ok(
            h.send(Method::GET, &format!("/v2/{REPO}/manifests/{tag}"), b"")
                .await,
            200,
        );
        assert_eq!(&b[..], &h.manifest[..]);
    }
}
