//! Garbage collection and deletes at scale: what they cost in key-value reads, counted on the
//! memory store behind a counting wrapper (the store is real; the wrapper only counts), driven
//! through the HTTP surface. The costs asserted are the shapes issue 14 needs: a delete by
//! digest reads the deleted manifest's tags, not every tag of its repository, and the blob
//! phase reads each blob record once, not once per repository. Plus the two migrations:
//! tags written before the reverse entries existed, and a run begun by a version without marks.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use dockside::{Config, GcConfig, KeyValue, MemoryBlobs, MemoryKv, Registry, StoreError};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The memory store, counting `get`s.
#[derive(Clone, Default)]
struct Counting {
    kv: MemoryKv,
    gets: Arc<AtomicUsize>,
}

impl Counting {
    fn gets(&self) -> usize {
        self.gets.load(Ordering::Relaxed)
    }
}

impl KeyValue for Counting {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.kv.get(key).await
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
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.kv.compare_and_swap(key, expected, new).await
    }
}

struct H {
    kv: Counting,
    blobs: MemoryBlobs,
    r: Registry<Counting, MemoryBlobs>,
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

impl H {
    fn new() -> Self {
        let kv = Counting::default();
        let blobs = MemoryBlobs::new();
        let config = Config {
            gc: GcConfig {
                grace_secs: 0,
                ..GcConfig::default()
            },
            ..Config::default()
        };
        let r = Registry::new(kv.clone(), blobs.clone(), config);
        H { kv, blobs, r }
    }

    async fn send(&self, method: Method, uri: &str, ct: Option<&str>, body: &[u8]) -> (u16, Bytes) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let resp = self
            .r
            .handle(req.body(Full::new(Bytes::copy_from_slice(body))).unwrap())
            .await;
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    #[track_caller]
    fn ok(r: (u16, Bytes), want: u16) -> Bytes {
        assert_eq!(r.0, want, "{}", String::from_utf8_lossy(&r.1));
        r.1
    }

    /// Pushes image `i` (a config and one layer, both its own) into `repo` under `tags`.
    async fn push(&self, repo: &str, i: usize, tags: &[String]) -> String {
        let mut descs = Vec::new();
        for part in ["config", "layer"] {
            let data = format!("{repo} image {i} {part}").into_bytes();
            let d = sha256(&data);
            let uri = format!("/v2/{repo}/blobs/uploads/?digest={d}");
            Self::ok(self.send(Method::POST, &uri, None, &data).await, 201);
            descs.push(
                json!({"mediaType": "application/octet-stream", "digest": d, "size": data.len()}),
            );
        }
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": descs[0], "layers": [descs[1]],
        }))
        .unwrap();
        let d = sha256(&m);
        let q: Vec<String> = tags.iter().map(|t| format!("tag={t}")).collect();
        let uri = format!("/v2/{repo}/manifests/{d}?{}", q.join("&"));
        Self::ok(self.send(Method::PUT, &uri, Some(MANIFEST), &m).await, 201);
        d
    }

    async fn tags(&self, repo: &str) -> Vec<String> {
        let b = Self::ok(
            self.send(Method::GET, &format!("/v2/{repo}/tags/list"), None, b"")
                .await,
            200,
        );
        let v: Value = serde_json::from_slice(&b).unwrap();
        v["tags"]
            .as_array()
            .map(|a| a.iter().map(|t| t.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    }

    async fn collect(&self) -> Value {
        for _ in 0..100_000 {
            let b = Self::ok(
                self.send(Method::POST, "/v2/_dockside/gc", None, b"").await,
                200,
            );
            let p: Value = serde_json::from_slice(&b).unwrap();
            if p["phase"] == "idle" {
                return p;
            }
        }
        panic!("the collection never finished");
    }

    async fn stored(&self, digest: &str) -> bool {
        use dockside::BlobStore;
        let path = dockside::layout::blob_data(&dockside::Digest::parse(digest).unwrap());
        self.blobs.size(&path).await.unwrap().is_some()
    }
}

/// 100 images with 20 tags each in one repository (2 000 tags): after the first delete (which
/// reads every tag once, for repositories whose tags predate the reverse entries), each delete
/// by digest reads about its own 20 tags, where reading every tag would be 2 000 reads. A tag
/// moved to another image stays with it; the deleted images' tags leave the listing.
#[tokio::test]
async fn delete_by_digest_reads_its_own_tags() {
    let h = H::new();
    let mut images = Vec::new();
    for i in 0..100 {
        let tags: Vec<String> = (0..20).map(|k| format!("t{i}-{k}")).collect();
        images.push(h.push("big/repo", i, &tags).await);
    }
    // `moved` first names image 0, then image 1.
    h.push("big/repo", 0, &["moved".into()]).await;
    h.push("big/repo", 1, &["moved".into()]).await;
    assert_eq!(h.tags("big/repo").await.len(), 2001);

    let mut costs = Vec::new();
    for d in images.iter().step_by(2) {
        let before = h.kv.gets();
        H::ok(
            h.send(
                Method::DELETE,
                &format!("/v2/big/repo/manifests/{d}"),
                None,
                b"",
            )
            .await,
            202,
        );
        costs.push(h.kv.gets() - before);
    }
    // The first delete may read every tag (the migration); none after it comes near that.
    let worst = *costs[1..].iter().max().unwrap();
    assert!(
        worst < 100,
        "a delete by digest read {worst} keys: {costs:?}"
    );

    let tags = h.tags("big/repo").await;
    assert_eq!(tags.len(), 1001, "50 images x 20 tags, and `moved`");
    assert!(tags.iter().all(|t| t == "moved" || t.starts_with('t')));
    for i in 0..100 {
        let kept = tags.contains(&format!("t{i}-7"));
        assert_eq!(kept, i % 2 == 1, "image {i}'s tags");
    }
    // `moved` names image 1, which stays: deleting image 0 (its old target) left it alone.
    let b = H::ok(
        h.send(Method::GET, "/v2/big/repo/manifests/moved", None, b"")
            .await,
        200,
    );
    assert_eq!(sha256(&b), images[1]);
    // And it goes with image 1.
    H::ok(
        h.send(
            Method::DELETE,
            &format!("/v2/big/repo/manifests/{}", images[1]),
            None,
            b"",
        )
        .await,
        202,
    );
    assert!(!h.tags("big/repo").await.contains(&"moved".to_owned()));
    H::ok(
        h.send(Method::GET, "/v2/big/repo/manifests/moved", None, b"")
            .await,
        404,
    );
}

/// Tags written by a version without reverse entries (keys set directly, as that version
/// stored them): a delete by digest still removes every tag of the manifest.
#[tokio::test]
async fn delete_by_digest_finds_tags_older_than_the_index() {
    let h = H::new();
    let a = h.push("old/repo", 0, &["a".into()]).await;
    let b = h.push("old/repo", 1, &["b".into()]).await;
    // Tags as the older version wrote them: the tag key only.
    for (t, d) in [("a2", &a), ("a3", &a), ("b2", &b)] {
        h.kv.kv
            .set(
                &format!("repositories/old/repo/_manifests/tags/{t}"),
                d.as_bytes(),
            )
            .await
            .unwrap();
    }
    H::ok(
        h.send(
            Method::DELETE,
            &format!("/v2/old/repo/manifests/{a}"),
            None,
            b"",
        )
        .await,
        202,
    );
    assert_eq!(h.tags("old/repo").await, ["b", "b2"]);
    // The scan wrote b2's entry: deleting b (now through the entries) takes b2 too.
    H::ok(
        h.send(
            Method::DELETE,
            &format!("/v2/old/repo/manifests/{b}"),
            None,
            b"",
        )
        .await,
        202,
    );
    assert!(h.tags("old/repo").await.is_empty());
}

/// The blob phase reads each blob record once, however many repositories the catalog holds:
/// with 60 repositories of one image each, a whole collection reads a small multiple of the
/// keys stored (one `get` per repository per blob would be 60 x 120 = 7 200 for that phase
/// alone). The deleted half's blobs go; every survivor pulls.
#[tokio::test]
async fn blob_phase_reads_each_record_once() {
    let h = H::new();
    let mut images = Vec::new();
    for i in 0..60 {
        let repo = format!("many/r{i}");
        let d = h.push(&repo, i, &[format!("v{i}")]).await;
        images.push((repo, d));
    }
    for (repo, d) in images.iter().step_by(2) {
        H::ok(
            h.send(
                Method::DELETE,
                &format!("/v2/{repo}/manifests/{d}"),
                None,
                b"",
            )
            .await,
            202,
        );
    }
    let keys = h.kv.kv.list("", None, usize::MAX).await.unwrap().len();
    let before = h.kv.gets();
    let p = h.collect().await;
    let reads = h.kv.gets() - before;
    assert_eq!(p["last"]["blobs"], 60, "{p}");
    assert!(
        reads < 6 * keys,
        "a collection over {keys} keys read {reads} of them"
    );
    for (i, (repo, d)) in images.iter().enumerate() {
        let config = sha256(format!("{repo} image {i} config").as_bytes());
        assert_eq!(h.stored(&config).await, i % 2 == 1, "{repo}'s config");
        if i % 2 == 1 {
            let b = H::ok(
                h.send(Method::GET, &format!("/v2/{repo}/manifests/{d}"), None, b"")
                    .await,
                200,
            );
            assert_eq!(sha256(&b), *d);
            let b = H::ok(
                h.send(
                    Method::GET,
                    &format!("/v2/{repo}/blobs/{config}"),
                    None,
                    b"",
                )
                .await,
                200,
            );
            assert_eq!(sha256(&b), config);
        }
    }
}

/// A run left mid-way by a version whose blob phase asked every repository (its state has no
/// `marks`): resuming it in the blob phase would find no marks and take linked blobs, so it
/// is started again instead, and every image survives.
#[tokio::test]
async fn a_run_without_marks_is_restarted() {
    let h = H::new();
    let d = h.push("keep/me", 0, &["v1".into()]).await;
    let state = json!({"generation": 7, "phase": "blobs", "cursor": null, "started": 1});
    h.kv.kv
        .set("gc/state", &serde_json::to_vec(&state).unwrap())
        .await
        .unwrap();
    let p = h.collect().await;
    assert_eq!(p["generation"], 8, "{p}");
    assert_eq!(p["last"]["blobs"], 0, "{p}");
    let b = H::ok(
        h.send(Method::GET, "/v2/keep/me/manifests/v1", None, b"")
            .await,
        200,
    );
    assert_eq!(sha256(&b), d);
    let config = sha256(b"keep/me image 0 config");
    assert!(h.stored(&config).await);
    let b = H::ok(
        h.send(
            Method::GET,
            &format!("/v2/keep/me/blobs/{config}"),
            None,
            b"",
        )
        .await,
        200,
    );
    assert_eq!(b.len(), "keep/me image 0 config".len());
}
