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
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The memory store, counting `get`s (and compare-and-swaps), and every call; and failing
/// every call once `fail_after` (when not 0) calls more have been made, as a collector
/// killed at that point would stop.
#[derive(Clone, Default)]
struct Counting {
    kv: MemoryKv,
    gets: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    fail_after: Arc<AtomicUsize>,
}

impl Counting {
    fn call(&self) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let left = self.fail_after.load(Ordering::Relaxed);
        if left == 1 {
            return Err(StoreError::new("injected: the collector stops here"));
        }
        if left > 1 {
            self.fail_after.store(left - 1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn gets(&self) -> usize {
        self.gets.load(Ordering::Relaxed)
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }
}

impl KeyValue for Counting {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.call()?;
        self.kv.get(key).await
    }
    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.call()?;
        self.kv.set(key, value).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.call()?;
        self.kv.delete(key).await
    }
    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.call()?;
        self.kv.list(prefix, after, limit).await
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.call()?;
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
        Self::with(GcConfig {
            grace_secs: 0,
            ..GcConfig::default()
        })
    }

    fn with(gc: GcConfig) -> Self {
        let kv = Counting::default();
        let blobs = MemoryBlobs::new();
        let config = Config {
            gc,
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

    /// GETs `uri` (200) and checks that its body has digest `d`: a pull, byte for byte.
    async fn pull(&self, uri: &str, d: &str) -> Bytes {
        let b = H::ok(self.send(Method::GET, uri, None, b"").await, 200);
        assert_eq!(sha256(&b), d, "{uri}");
        b
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
    h.pull("/v2/big/repo/manifests/moved", &images[1]).await;
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
            h.pull(&format!("/v2/{repo}/manifests/{d}"), d).await;
            h.pull(&format!("/v2/{repo}/blobs/{config}"), &config).await;
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
    h.pull("/v2/keep/me/manifests/v1", &d).await;
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

/// One repository of 150 images, far more than one step's budget (`step_items = 40`), under
/// retention `keep_newest = 10` with `keep-*` protected: the admin request, repeated until
/// the run is done, judges it in pages (its state names the repository in progress) and no
/// request makes more than a constant times `step_items` store calls, whatever the
/// repository's size. The 10 newest tags and the protected one stay and pull byte for byte;
/// the other tags answer 404 and their images' blobs are gone from the store, but for two
/// images a protected index reaches.
#[tokio::test]
async fn a_large_repository_is_judged_in_bounded_steps() {
    const BUDGET: usize = 40;
    let h = H::with(
        GcConfig::from_toml(&format!(
            "grace_secs = 0\nstep_items = {BUDGET}\n\n[[retention]]\nrepositories = \"huge/**\"\nkeep_newest = 10\nprotect = [\"keep-*\"]\n"
        ))
        .unwrap(),
    );
    // A small repository beside it, judged whole within a step.
    let small = h.push("aside", 0, &["v1".into()]).await;
    let mut old = Vec::new();
    for i in 0..140 {
        let tag = if i == 3 {
            "keep-me".to_owned()
        } else {
            format!("old-{i:03}")
        };
        old.push((tag.clone(), h.push("huge/repo", i, &[tag]).await));
    }
    // A protected index over two old images: their own tags go, but they stay, reached
    // through it (marked in a later step than the one that saw the index's tag, maybe).
    let mut children = Vec::new();
    for i in [5, 6] {
        let b = H::ok(
            h.send(
                Method::GET,
                &format!("/v2/huge/repo/manifests/{}", old[i].1),
                None,
                b"",
            )
            .await,
            200,
        );
        children.push(json!({"mediaType": MANIFEST, "digest": old[i].1, "size": b.len()}));
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": INDEX, "manifests": children,
    }))
    .unwrap();
    H::ok(
        h.send(
            Method::PUT,
            "/v2/huge/repo/manifests/keep-index",
            Some(INDEX),
            &index,
        )
        .await,
        201,
    );
    old.push(("keep-index".into(), sha256(&index)));
    // Retention ranks by push time, in whole seconds: the new ones come a second later.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let mut new = Vec::new();
    for i in 140..150 {
        let tag = format!("new-{i}");
        new.push((tag.clone(), h.push("huge/repo", i, &[tag]).await));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    let mut steps = 0;
    let mut paged = false;
    let mut worst = 0;
    let mut worst_repositories = 0;
    let p = loop {
        let before = h.kv.calls();
        let b = H::ok(
            h.send(Method::POST, "/v2/_dockside/gc", None, b"").await,
            200,
        );
        let calls = h.kv.calls() - before;
        worst = worst.max(calls);
        let p: Value = serde_json::from_slice(&b).unwrap();
        if p["phase"] == "repositories" {
            worst_repositories = worst_repositories.max(calls);
        }
        if p["repo"]["name"] == "huge/repo" {
            paged = true;
        }
        steps += 1;
        assert!(steps < 10_000, "the collection never finished");
        if p["phase"] == "idle" {
            break p;
        }
    };
    assert!(paged, "the large repository was never judged in pages");
    // Bounded by the budget (plus one item's work and the request's own reads), not by the
    // repository: judged whole, one step would read its 150 tags, 150 manifests and 300 links.
    // (A blob record judged costs up to three calls: read, claim, delete.)
    assert!(
        worst_repositories <= 2 * BUDGET,
        "a repository step made {worst_repositories} store calls (budget {BUDGET})"
    );
    assert!(
        worst <= 4 * BUDGET,
        "a step made {worst} store calls (budget {BUDGET})"
    );
    assert!(steps > 10, "{steps} steps for about 2 000 store calls");
    assert_eq!(p["last"]["tags"], 139, "{p}");
    assert_eq!(p["last"]["manifests"], 137, "{p}");
    assert_eq!(p["last"]["blobs"], 2 * 137, "{p}");

    let mut tags = h.tags("huge/repo").await;
    tags.sort();
    let mut want: Vec<String> = new.iter().map(|(t, _)| t.clone()).collect();
    want.push("keep-me".into());
    want.push("keep-index".into());
    want.sort();
    assert_eq!(tags, want);
    let b = H::ok(
        h.send(Method::GET, "/v2/huge/repo/manifests/keep-index", None, b"")
            .await,
        200,
    );
    assert_eq!(b, index);
    let reached = [5, 6].map(|i| (format!("old-{i:03}"), old[i].1.clone()));
    let survivors = new
        .iter()
        .chain(old.iter().filter(|(t, _)| t == "keep-me"))
        .chain(reached.iter());
    for (_, d) in survivors {
        // By digest: the reached images' tags are gone.
        let b = h.pull(&format!("/v2/huge/repo/manifests/{d}"), d).await;
        let m: Value = serde_json::from_slice(&b).unwrap();
        for desc in [&m["config"], &m["layers"][0]] {
            let digest = desc["digest"].as_str().unwrap();
            h.pull(&format!("/v2/huge/repo/blobs/{digest}"), digest)
                .await;
        }
    }
    for (i, (tag, d)) in old.iter().enumerate() {
        if tag.starts_with("keep-") {
            continue;
        }
        let reached = i == 5 || i == 6;
        H::ok(
            h.send(
                Method::GET,
                &format!("/v2/huge/repo/manifests/{tag}"),
                None,
                b"",
            )
            .await,
            404,
        );
        H::ok(
            h.send(
                Method::GET,
                &format!("/v2/huge/repo/manifests/{d}"),
                None,
                b"",
            )
            .await,
            if reached { 200 } else { 404 },
        );
        let config = sha256(format!("huge/repo image {i} config").as_bytes());
        assert_eq!(h.stored(&config).await, reached, "{tag}'s config");
    }
    h.pull(&format!("/v2/aside/manifests/{small}"), &small)
        .await;
    // The collector's marks for the paged repository went with what they marked.
    let marks = h.kv.kv.list("gc/repos/", None, usize::MAX).await.unwrap();
    assert!(!marks.is_empty());
    for k in marks {
        let (kind, d) = k["gc/repos/huge/repo/_".len()..].split_once('/').unwrap();
        let d = d.replacen('/', ":", 1);
        let alive = if kind == "want" {
            h.stored(&d).await
        } else {
            h.send(
                Method::GET,
                &format!("/v2/huge/repo/manifests/{d}"),
                None,
                b"",
            )
            .await
            .0 == 200
        };
        assert!(alive, "{k} outlived what it marks");
    }
}

/// A repository judged in pages by steps that stop at random points (the store fails every
/// call from a random one on, as a killed instance would stop; the step answers 500 and saves
/// no state), each followed by a whole step: the run still finishes, and after one more run
/// (which finishes what the stopped steps claimed) the registry is what an uninterrupted run
/// leaves: the 5 newest tags and their images pull byte for byte, the others answer 404 and
/// their blobs are gone. Judged in pages (`step_items = 20`), and whole within a step
/// (`step_items = 1000`, the stops spread over the same first calls).
#[tokio::test]
async fn a_large_repository_survives_steps_stopped_anywhere() {
    stopped_anywhere(20).await;
}

#[tokio::test]
async fn a_whole_repository_survives_steps_stopped_anywhere() {
    stopped_anywhere(1000).await;
}

async fn stopped_anywhere(budget: usize) {
    let h = H::with(
        GcConfig::from_toml(&format!(
            "grace_secs = 0\nstep_items = {budget}\n\n[[retention]]\nrepositories = \"big/**\"\nkeep_newest = 5\n"
        ))
        .unwrap(),
    );
    let mut old = Vec::new();
    for i in 0..60 {
        let tag = format!("old-{i:03}");
        old.push((tag.clone(), h.push("big/one", i, &[tag]).await));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let mut new = Vec::new();
    for i in 60..65 {
        let tag = format!("new-{i}");
        new.push((tag.clone(), h.push("big/one", i, &[tag]).await));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    // Stops within a step's calls: a paged step makes about 2 x budget, a whole one about
    // 700 here (so several stopped steps in a row, each redoing the repository).
    let (range, faulty) = if budget < 100 {
        (3 * budget, 1)
    } else {
        (700, 8)
    };
    let mut seed: u64 = 14;
    let (mut stopped, mut steps) = (0, 0);
    loop {
        for _ in 0..faulty {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            h.kv.fail_after
                .store(2 + (seed >> 33) as usize % range, Ordering::Relaxed);
            let (status, _) = h.send(Method::POST, "/v2/_dockside/gc", None, b"").await;
            let left = h.kv.fail_after.swap(0, Ordering::Relaxed);
            let failed = status == 500;
            assert!(status == 200 || (failed && left == 1), "{status}");
            stopped += usize::from(failed);
        }
        let b = H::ok(
            h.send(Method::POST, "/v2/_dockside/gc", None, b"").await,
            200,
        );
        let p: Value = serde_json::from_slice(&b).unwrap();
        steps += 1;
        assert!(steps < 5_000, "the collection never finished");
        if p["phase"] == "idle" {
            break;
        }
    }
    assert!(stopped >= 3, "only {stopped} steps were stopped");
    h.collect().await;

    let mut tags = h.tags("big/one").await;
    tags.sort();
    let want: Vec<String> = new.iter().map(|(t, _)| t.clone()).collect();
    assert_eq!(tags, want);
    for (i, (tag, d)) in old.iter().chain(new.iter()).enumerate() {
        let kept = i >= 60;
        let (status, b) = h
            .send(
                Method::GET,
                &format!("/v2/big/one/manifests/{d}"),
                None,
                b"",
            )
            .await;
        assert_eq!(status, if kept { 200 } else { 404 }, "{tag}");
        let config = sha256(format!("big/one image {i} config").as_bytes());
        let layer = sha256(format!("big/one image {i} layer").as_bytes());
        for blob in [&config, &layer] {
            assert_eq!(h.stored(blob).await, kept, "{tag}: {blob}");
        }
        if kept {
            assert_eq!(sha256(&b), *d);
            for blob in [&config, &layer] {
                h.pull(&format!("/v2/big/one/blobs/{blob}"), blob).await;
            }
        }
    }
}
