//! Storage faults injected under the core, through `Registry::handle` (the HTTP surface without
//! the socket): a wrapper host fails the Nth store call (every N in turn, exhaustively) or a
//! random fraction of them, either before the call reaches the store or after it took effect
//! (the answer lost, as when a connection to storage drops after the write). For each fault, a
//! client scenario (blob pushes, a chunked upload, a manifest by tag, a referrer, pulls,
//! listings, deletes) runs until its first failure, then the faults stop and:
//! - no request panicked, and every failure was a 5xx with the spec's error envelope;
//! - the client replays the scenario from the start and it succeeds, byte for byte;
//! - every blob and manifest the registry serves matches its digest, every listed tag resolves,
//!   and no upload session the client abandoned can be completed into a wrong blob.
//!
//! Hosts: memory, the local directory, and blobs chunked into a key-value store with listing
//! indexes (as on Spin).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use dockside::hosts::indexed::IndexedKv;
use dockside::{
    BlobStore, ByteSource, Config, FsBlobs, FsKv, KeyValue, KvBlobs, MemoryBlobs, MemoryKv,
    Registry, StoreError, WriteError,
};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}

// ---------------------------------------------------------------------------------------------
// The fault plan and the wrapper hosts

/// When the injected fault strikes relative to the store call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum When {
    /// The call fails without reaching the store.
    Before,
    /// The call takes effect, then reports failure.
    After,
}

/// Which calls fail: the `nth` (1-based; 0 = none), or each with probability `per_mille`/1000
/// from a seeded generator.
struct Plan {
    calls: AtomicU64,
    nth: AtomicU64,
    per_mille: AtomicU64,
    rng: AtomicU64,
    when: When,
    injected: AtomicU64,
    off: AtomicBool,
}

impl Plan {
    fn new(when: When) -> Arc<Plan> {
        Arc::new(Plan {
            calls: AtomicU64::new(0),
            nth: AtomicU64::new(0),
            per_mille: AtomicU64::new(0),
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            when,
            injected: AtomicU64::new(0),
            off: AtomicBool::new(false),
        })
    }

    /// Counts a call and says whether it fails.
    fn strikes(&self) -> bool {
        if self.off.load(Ordering::SeqCst) {
            return false;
        }
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let hit = if n == self.nth.load(Ordering::SeqCst) {
            true
        } else {
            let p = self.per_mille.load(Ordering::SeqCst);
            // xorshift64*
            let mut x = self.rng.load(Ordering::SeqCst);
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.rng.store(x, Ordering::SeqCst);
            p > 0 && (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % 1000 < p
        };
        if hit {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        hit
    }

    fn fault() -> StoreError {
        StoreError::new("injected fault".to_owned())
    }

    /// Runs `op` under the plan.
    async fn run<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !self.strikes() {
            return op.await;
        }
        if self.when == When::After {
            let _ = op.await?;
        }
        Err(Plan::fault())
    }
}

#[derive(Clone)]
struct FaultyKv<K> {
    inner: K,
    plan: Arc<Plan>,
}

impl<K: KeyValue> KeyValue for FaultyKv<K> {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.plan.run(self.inner.get(key)).await
    }

    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.plan.run(self.inner.set(key, value)).await
    }

    async fn set_many(&self, entries: Vec<(String, Bytes)>) -> Result<(), StoreError> {
        self.plan.run(self.inner.set_many(entries)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.plan.run(self.inner.delete(key)).await
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.plan.run(self.inner.list(prefix, after, limit)).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        self.plan
            .run(self.inner.compare_and_swap(key, expected, new))
            .await
    }
}

#[derive(Clone)]
struct FaultyBlobs<B> {
    inner: B,
    plan: Arc<Plan>,
}

impl<B: BlobStore> BlobStore for FaultyBlobs<B> {
    type Reader = B::Reader;

    async fn write<S: ByteSource>(
        &self,
        path: &str,
        src: &mut S,
    ) -> Result<u64, WriteError<S::Error>> {
        if !self.plan.strikes() {
            return self.inner.write(path, src).await;
        }
        if self.plan.when == When::After {
            // The object was written, the answer lost.
            self.inner.write(path, src).await?;
        }
        Err(WriteError::Store(Plan::fault()))
    }

    async fn read(
        &self,
        path: &str,
        range: Option<Range<u64>>,
    ) -> Result<Option<Self::Reader>, StoreError> {
        self.plan.run(self.inner.read(path, range)).await
    }

    async fn size(&self, path: &str) -> Result<Option<u64>, StoreError> {
        self.plan.run(self.inner.size(path)).await
    }

    async fn delete(&self, path: &str) -> Result<(), StoreError> {
        self.plan.run(self.inner.delete(path)).await
    }

    async fn assemble(&self, parts: &[String], dest: &str) -> Result<(), StoreError> {
        self.plan.run(self.inner.assemble(parts, dest)).await
    }
}

// ---------------------------------------------------------------------------------------------
// Hosts under test

#[derive(Clone, Copy, Debug)]
enum HostKind {
    Memory,
    Dir,
    KvIndexed,
}

/// The stores of one host; a registry over them (wrapped in the plan) is built per request.
enum Stores {
    Memory(MemoryKv, MemoryBlobs),
    /// The directory, kept until the test ends, and the stores in it.
    Dir(#[allow(dead_code)] tempfile::TempDir, FsKv, FsBlobs),
    KvIndexed(MemoryKv),
}

impl Stores {
    fn new(kind: HostKind) -> Stores {
        match kind {
            HostKind::Memory => Stores::Memory(MemoryKv::new(), MemoryBlobs::new()),
            HostKind::Dir => {
                let d = tempfile::tempdir().unwrap();
                let kv = FsKv::new(d.path().join("kv")).unwrap();
                let blobs = FsBlobs::new(d.path()).unwrap();
                Stores::Dir(d, kv, blobs)
            }
            HostKind::KvIndexed => Stores::KvIndexed(MemoryKv::new()),
        }
    }
}

struct Resp {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

struct H {
    stores: Stores,
    plan: Arc<Plan>,
}

impl H {
    async fn send(&self, method: Method, uri: &str, ctype: Option<&str>, body: Bytes) -> Resp {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(c) = ctype {
            req = req.header("content-type", c);
        }
        let req = req.body(Full::new(body)).unwrap();
        let plan = self.plan.clone();
        let config = Config::default();
        fn fkv<K>(inner: K, plan: &Arc<Plan>) -> FaultyKv<K> {
            FaultyKv {
                inner,
                plan: plan.clone(),
            }
        }
        fn fblobs<B>(inner: B, plan: &Arc<Plan>) -> FaultyBlobs<B> {
            FaultyBlobs {
                inner,
                plan: plan.clone(),
            }
        }
        // One response type whatever the host (the body's reader type differs).
        async fn collect<B>(resp: http::Response<B>) -> Resp
        where
            B: http_body::Body<Data = Bytes>,
        {
            let (parts, body) = resp.into_parts();
            // A body that fails half-way (a read fault after the headers) is a cut connection
            // to the client: recorded here as an empty 599.
            match body.collect().await {
                Ok(b) => Resp {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body: b.to_bytes(),
                },
                Err(_) => Resp {
                    status: 599,
                    headers: parts.headers,
                    body: Bytes::new(),
                },
            }
        }
        match &self.stores {
            Stores::Memory(kv, blobs) => {
                Registry::new(fkv(kv.clone(), &plan), fblobs(blobs.clone(), &plan), config)
                    .handle(req)
                    .await
                    .pipe(collect)
                    .await
            }
            Stores::Dir(_, kv, blobs) => {
                Registry::new(fkv(kv.clone(), &plan), fblobs(blobs.clone(), &plan), config)
                    .handle(req)
                    .await
                    .pipe(collect)
                    .await
            }
            // Faults beneath the listing index and the chunked blobs, as a failing key-value
            // store would cause them.
            Stores::KvIndexed(kv) => {
                Registry::new(
                    IndexedKv(fkv(kv.clone(), &plan)),
                    KvBlobs::with_chunk_size(fkv(kv.clone(), &plan), 1000),
                    config,
                )
                .handle(req)
                .await
                .pipe(collect)
                .await
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client scenario

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What a scenario pushes.
struct Content {
    config: Bytes,
    layer: Bytes,
    manifest: Bytes,
    referrer: Bytes,
}

fn content() -> Content {
    let config = Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
    let layer: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let layer = Bytes::from(layer);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha256(&layer), "size": layer.len()}]
    });
    let manifest = Bytes::from(serde_json::to_vec(&manifest).unwrap());
    let referrer = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/x.test",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(&config), "size": config.len()},
        "layers": [],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": sha256(&manifest), "size": manifest.len()}
    });
    let referrer = Bytes::from(serde_json::to_vec(&referrer).unwrap());
    Content {
        config,
        layer,
        manifest,
        referrer,
    }
}

const REPO: &str = "faults/app";
const MT: &str = "application/vnd.oci.image.manifest.v1+json";

/// A failed step: the request and what it answered.
// Read through `Debug` in panic messages.
#[allow(dead_code)]
#[derive(Debug)]
struct Failed {
    step: &'static str,
    status: u16,
    body: String,
}

/// Checks one answer: the expected status passes; a 5xx must carry the spec's error envelope
/// (a cut body, 599 here, is what a client sees when storage fails mid-stream); anything
/// else is a bug the fault exposed.
fn check(step: &'static str, r: &Resp, want: &[u16]) -> Result<(), Failed> {
    if want.contains(&r.status) {
        return Ok(());
    }
    let failed = Failed {
        step,
        status: r.status,
        body: String::from_utf8_lossy(&r.body).into_owned(),
    };
    if r.status == 599 {
        return Err(failed);
    }
    assert!(
        r.status >= 500,
        "{step}: a store fault turned into {} (not a 5xx): {}",
        r.status,
        failed.body
    );
    let j = r.json();
    let code = j["errors"][0]["code"].as_str();
    assert!(
        code.is_some() && j["errors"][0]["message"].is_string(),
        "{step}: {} without the error envelope: {:?}",
        r.status,
        failed.body
    );
    assert_eq!(
        r.headers.get("content-type").map(|v| v.to_str().unwrap()),
        Some("application/json"),
        "{step}"
    );
    Err(failed)
}

fn location(r: &Resp) -> String {
    r.headers["location"].to_str().unwrap().to_owned()
}

fn with_query(loc: &str, q: &str) -> String {
    if loc.contains('?') {
        format!("{loc}&{q}")
    } else {
        format!("{loc}?{q}")
    }
}

/// The client's scenario, stopping at the first failure. `abandoned` collects upload
/// sessions the client opened and never finished.
async fn scenario(h: &H, c: &Content, abandoned: &mut Vec<String>) -> Result<(), Failed> {
    let cd = sha256(&c.config);
    let ld = sha256(&c.layer);
    let md = sha256(&c.manifest);
    let rd = sha256(&c.referrer);
    // A monolithic blob push.
    let r = h
        .send(
            Method::POST,
            &format!("/v2/{REPO}/blobs/uploads/?digest={cd}"),
            Some("application/octet-stream"),
            c.config.clone(),
        )
        .await;
    check("monolithic push", &r, &[201])?;
    // A chunked upload in three PATCHes and a closing PUT.
    let r = h
        .send(
            Method::POST,
            &format!("/v2/{REPO}/blobs/uploads/"),
            None,
            Bytes::new(),
        )
        .await;
    check("open upload", &r, &[202])?;
    let mut loc = location(&r);
    abandoned.push(loc.clone());
    for piece in c.layer.chunks(2000) {
        let r = h
            .send(
                Method::PATCH,
                &loc,
                Some("application/octet-stream"),
                Bytes::copy_from_slice(piece),
            )
            .await;
        check("PATCH", &r, &[202])?;
        loc = location(&r);
        *abandoned.last_mut().unwrap() = loc.clone();
    }
    let r = h
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={ld}")),
            None,
            Bytes::new(),
        )
        .await;
    check("closing PUT", &r, &[201])?;
    abandoned.pop();
    // The manifest by tag, a referrer to it.
    let r = h
        .send(
            Method::PUT,
            &format!("/v2/{REPO}/manifests/v1"),
            Some(MT),
            c.manifest.clone(),
        )
        .await;
    check("manifest PUT", &r, &[201])?;
    let r = h
        .send(
            Method::PUT,
            &format!("/v2/{REPO}/manifests/{rd}"),
            Some(MT),
            c.referrer.clone(),
        )
        .await;
    check("referrer PUT", &r, &[201])?;
    // Pulls and listings.
    let r = h
        .send(
            Method::GET,
            &format!("/v2/{REPO}/manifests/v1"),
            None,
            Bytes::new(),
        )
        .await;
    check("manifest GET", &r, &[200])?;
    assert_eq!(r.body, c.manifest, "manifest GET answered wrong bytes");
    let r = h
        .send(
            Method::GET,
            &format!("/v2/{REPO}/blobs/{ld}"),
            None,
            Bytes::new(),
        )
        .await;
    check("blob GET", &r, &[200])?;
    assert_eq!(r.body, c.layer, "blob GET answered wrong bytes");
    let r = h
        .send(
            Method::GET,
            &format!("/v2/{REPO}/tags/list"),
            None,
            Bytes::new(),
        )
        .await;
    check("tags list", &r, &[200])?;
    assert_eq!(r.json()["tags"], json!(["v1"]), "tags list");
    let r = h
        .send(
            Method::GET,
            &format!("/v2/{REPO}/referrers/{md}"),
            None,
            Bytes::new(),
        )
        .await;
    check("referrers", &r, &[200])?;
    let refs = r.json()["manifests"].clone();
    assert_eq!(refs.as_array().map(Vec::len), Some(1), "referrers: {refs}");
    assert_eq!(refs[0]["digest"], json!(rd));
    let r = h
        .send(Method::GET, "/v2/_catalog", None, Bytes::new())
        .await;
    check("catalog", &r, &[200])?;
    assert_eq!(r.json()["repositories"], json!([REPO]));
    // A delete, then its answer seen.
    let r = h
        .send(
            Method::DELETE,
            &format!("/v2/{REPO}/manifests/{rd}"),
            None,
            Bytes::new(),
        )
        .await;
    check("referrer DELETE", &r, &[202])?;
    let r = h
        .send(
            Method::GET,
            &format!("/v2/{REPO}/manifests/{rd}"),
            None,
            Bytes::new(),
        )
        .await;
    check("deleted referrer GET", &r, &[404])?;
    Ok(())
}

/// What must hold once the faults have stopped, whatever they did: every digest the registry
/// serves matches its bytes, every listed tag resolves, and sessions the client abandoned
/// cannot be closed into a blob that does not match.
async fn consistent(h: &H, c: &Content, abandoned: &[String]) {
    for (what, data) in [("config", &c.config), ("layer", &c.layer)] {
        let d = sha256(data);
        let r = h
            .send(
                Method::GET,
                &format!("/v2/{REPO}/blobs/{d}"),
                None,
                Bytes::new(),
            )
            .await;
        assert!(
            r.status == 404 || (r.status == 200 && r.body == *data),
            "{what} blob: {} with {} bytes",
            r.status,
            r.body.len()
        );
    }
    for (what, data) in [("manifest", &c.manifest), ("referrer", &c.referrer)] {
        let d = sha256(data);
        let r = h
            .send(
                Method::GET,
                &format!("/v2/{REPO}/manifests/{d}"),
                None,
                Bytes::new(),
            )
            .await;
        assert!(
            r.status == 404 || (r.status == 200 && r.body == *data),
            "{what}: {} {:?}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    let r = h
        .send(
            Method::GET,
            &format!("/v2/{REPO}/tags/list"),
            None,
            Bytes::new(),
        )
        .await;
    assert!(
        r.status == 200 || r.status == 404,
        "tags list: {}",
        r.status
    );
    if r.status == 200 {
        for t in r.json()["tags"].as_array().cloned().unwrap_or_default() {
            let t = t.as_str().unwrap();
            let m = h
                .send(
                    Method::GET,
                    &format!("/v2/{REPO}/manifests/{t}"),
                    None,
                    Bytes::new(),
                )
                .await;
            assert_eq!(m.status, 200, "listed tag {t} does not resolve");
            assert_eq!(sha256(&m.body), sha256(&c.manifest), "tag {t}");
        }
    }
    // An abandoned session closed with the layer's digest must not produce a wrong blob:
    // either the session is refused, the digest mismatches (its bytes are partial), or the
    // bytes it holds are exactly the layer's.
    for loc in abandoned {
        let ld = sha256(&c.layer);
        let r = h
            .send(
                Method::PUT,
                &with_query(loc, &format!("digest={ld}")),
                None,
                Bytes::new(),
            )
            .await;
        assert!(
            [201, 400, 404, 416].contains(&r.status),
            "closing an abandoned session: {} {:?}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        let g = h
            .send(
                Method::GET,
                &format!("/v2/{REPO}/blobs/{ld}"),
                None,
                Bytes::new(),
            )
            .await;
        assert!(
            g.status == 404 || g.body == c.layer,
            "layer after closing a session"
        );
    }
}

/// Every N from 1 to the calls of a clean run fails in turn, with `when`, on `kind`.
async fn sweep(kind: HostKind, when: When) {
    let c = content();
    // A clean run counts the store calls.
    let clean = H {
        stores: Stores::new(kind),
        plan: Plan::new(when),
    };
    scenario(&clean, &c, &mut Vec::new())
        .await
        .expect("the scenario passes without faults");
    let total = clean.plan.calls.load(Ordering::SeqCst);
    assert!(total > 20, "the scenario makes {total} store calls");
    let mut failures = 0;
    for n in 1..=total {
        let h = H {
            stores: Stores::new(kind),
            plan: Plan::new(when),
        };
        h.plan.nth.store(n, Ordering::SeqCst);
        let mut abandoned = Vec::new();
        let first = scenario(&h, &c, &mut abandoned).await;
        assert_eq!(
            h.plan.injected.load(Ordering::SeqCst),
            1,
            "call {n} of {total} was injected once"
        );
        if first.is_err() {
            failures += 1;
        }
        h.plan.off.store(true, Ordering::SeqCst);
        consistent(&h, &c, &abandoned).await;
        // The client retries from the start, and everything works.
        if let Err(f) = scenario(&h, &c, &mut Vec::new()).await {
            panic!(
                "{kind:?}, fault {when:?} call {n} of {total} (first run: {first:?}): the replay \
                 failed: {f:?}"
            );
        }
        consistent(&h, &c, &[]).await;
    }
    eprintln!(
        "{kind:?}, faults {when:?}: {total} store calls, each failed in turn; {failures} runs \
         saw a 5xx, all recovered by a replay"
    );
    assert!(failures > 0, "no injected fault reached the client");
}

/// A random 3% of calls fail, over many scenario runs on one store; then the faults stop.
async fn random_faults(kind: HostKind, when: When, seed: u64) {
    let c = content();
    let h = H {
        stores: Stores::new(kind),
        plan: Plan::new(when),
    };
    h.plan.per_mille.store(30, Ordering::SeqCst);
    h.plan.rng.store(seed | 1, Ordering::SeqCst);
    let mut abandoned = Vec::new();
    let mut ok = 0;
    for _ in 0..60 {
        if scenario(&h, &c, &mut abandoned).await.is_ok() {
            ok += 1;
        }
        // Between runs, the client's state is whatever the faults left.
    }
    assert!(h.plan.injected.load(Ordering::SeqCst) > 10);
    h.plan.off.store(true, Ordering::SeqCst);
    consistent(&h, &c, &abandoned).await;
    scenario(&h, &c, &mut Vec::new())
        .await
        .expect("the scenario passes once the faults stop");
    consistent(&h, &c, &[]).await;
    eprintln!(
        "{kind:?}, random faults {when:?}: {} injected over 60 runs ({ok} clean)",
        h.plan.injected.load(Ordering::SeqCst)
    );
}

macro_rules! on_hosts {
    ($($host:ident: $kind:expr;)*) => {$(
        mod $host {
            use super::*;

            #[tokio::test]
            async fn every_call_fails_before_in_turn() {
                sweep($kind, When::Before).await;
            }

            #[tokio::test]
            async fn every_call_fails_after_in_turn() {
                sweep($kind, When::After).await;
            }

            #[tokio::test]
            async fn random_faults_before() {
                random_faults($kind, When::Before, 7).await;
            }

            #[tokio::test]
            async fn random_faults_after() {
                random_faults($kind, When::After, 11).await;
            }
        }
    )*};
}

on_hosts! {
    memory: HostKind::Memory;
    dir: HostKind::Dir;
    kv_indexed: HostKind::KvIndexed;
}
