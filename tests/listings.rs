//! Listings on the directory host while other processes change it: two `dockside serve` on ONE
//! data directory, each with its own in-process listing cache (the threshold lowered through
//! `DOCKSIDE_LISTING_CACHE_MIN`, so that a directory of a few tags is cached), must each see
//! the other's tag pushes and deletes at once, however quickly they follow each other (the
//! same mtime tick), including across the journal's rotation and a writer killed mid-record.
//! See "Listings" in docs/DESIGN.md.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use common::{Server, client, sha256_digest};
use serde_json::{Value, json};

const REPO: &str = "lists/app";
/// Directories of at least this many entries are cached by the servers under test.
const CACHE_MIN: usize = 8;

fn start(data: &Path) -> Server {
    Server::builder()
        .data_dir(data)
        .env("DOCKSIDE_LISTING_CACHE_MIN", CACHE_MIN.to_string())
        .start()
}

async fn push_blob(on: &Server, repo: &str, data: &[u8]) -> String {
    let digest = sha256_digest(data);
    let resp = client()
        .post(on.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{resp:?}");
    digest
}

/// A small image in `repo`: its manifest's bytes.
async fn image(on: &Server, repo: &str) -> Vec<u8> {
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = b"a layer";
    let (c, l) = (
        push_blob(on, repo, config).await,
        push_blob(on, repo, layer).await,
    );
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l, "size": layer.len()}],
    }))
    .unwrap()
}

async fn tag(on: &Server, repo: &str, tag: &str, manifest: &[u8]) {
    let resp = client()
        .put(on.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "tag {tag}: {resp:?}");
}

async fn untag(on: &Server, tag: &str) {
    let resp = client()
        .delete(on.url(&format!("/v2/{REPO}/manifests/{tag}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202, "delete {tag}: {resp:?}");
}

/// Tags `manifest` in `REPO` on `on` as `{prefix}000`, `{prefix}001`, ... (`n` tags); their names.
async fn tag_many(on: &Server, prefix: &str, n: usize, manifest: &[u8]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for i in 0..n {
        let t = format!("{prefix}{i:03}");
        tag(on, REPO, &t, manifest).await;
        names.insert(t);
    }
    names
}

/// A set of names as a listing returns them: in order.
fn sorted(names: &BTreeSet<String>) -> Vec<String> {
    names.iter().cloned().collect()
}

/// One page: its names (under `field`) and the next page's path from `Link`, if any.
async fn page(on: &Server, path: &str, field: &str) -> (Vec<String>, Option<String>) {
    let resp = client().get(on.url(path)).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{path}: {resp:?}");
    let link = resp.headers().get("link").map(|l| {
        let l = l.to_str().unwrap();
        l[l.find('<').unwrap() + 1..l.find('>').unwrap()].to_owned()
    });
    let body: Value = resp.json().await.unwrap();
    let names = body[field]
        .as_array()
        .map(|a| a.iter().map(|t| t.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    (names, link)
}

/// The whole tags list through `on`, in one request.
async fn tags(on: &Server) -> Vec<String> {
    page(on, &format!("/v2/{REPO}/tags/list"), "tags").await.0
}

fn tags_dir(data: &Path) -> PathBuf {
    data.join("kv/repositories/lists/app/_manifests/tags")
}

fn journal(dir: &Path) -> PathBuf {
    dir.join(".journal")
}

/// B pushes and deletes tags, A lists right after each change (well within one mtime tick):
/// A's list is the ground truth every time, from a cache (the journal exists).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_tags_list_sees_another_process_changes_at_once() {
    let data = tempfile::tempdir().unwrap();
    let (a, b) = (start(data.path()), start(data.path()));
    let manifest = image(&b, REPO).await;
    let mut truth = tag_many(&b, "t", 2 * CACHE_MIN, &manifest).await;
    assert_eq!(tags(&a).await, sorted(&truth));
    // A cached the directory: it made the journal that B now appends to.
    let dir = tags_dir(data.path());
    assert!(journal(&dir).exists(), "A's listing made no journal");

    for i in 0..20 {
        // Added by B: in A's next list.
        let new = format!("n{i:03}");
        tag(&b, REPO, &new, &manifest).await;
        truth.insert(new.clone());
        assert_eq!(tags(&a).await, sorted(&truth), "after B tagged {new}");
        // Removed by B: gone from A's next list.
        let old = format!("t{:03}", i % (2 * CACHE_MIN));
        untag(&b, &old).await;
        truth.remove(&old);
        assert_eq!(tags(&a).await, sorted(&truth), "after B deleted {old}");
        // Made again at once: back.
        tag(&b, REPO, &old, &manifest).await;
        truth.insert(old.clone());
        assert_eq!(tags(&a).await, sorted(&truth), "after B re-tagged {old}");
        // A's own changes, seen by B (B's cache, made by B's first listing here).
        untag(&a, &new).await;
        truth.remove(&new);
        assert_eq!(tags(&b).await, sorted(&truth), "after A deleted {new}");
    }
    // Paged: a page from the middle after a change.
    tag(&b, REPO, "t005a", &manifest).await;
    let (p, link) = page(&a, &format!("/v2/{REPO}/tags/list?n=2&last=t005"), "tags").await;
    assert_eq!(p, ["t005a", "t006"]);
    assert!(link.is_some());
    a.stop();
    b.stop();
}

/// A walks the tags list by `Link`, 3 at a time, while B adds tags before and after A's
/// cursor between pages: the walk is in order with no repeats, holds every tag that existed
/// throughout, and every tag B added past the cursor before A asked for that page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walk_by_link_follows_tags_added_meanwhile() {
    let data = tempfile::tempdir().unwrap();
    let (a, b) = (start(data.path()), start(data.path()));
    let manifest = image(&b, REPO).await;
    let mut before = BTreeSet::new();
    for i in (0..40).step_by(2) {
        let t = format!("w{i:03}");
        tag(&b, REPO, &t, &manifest).await;
        before.insert(t);
    }
    assert_eq!(tags(&a).await.len(), before.len()); // cached from here on
    let (mut seen, mut added_ahead) = (Vec::<String>::new(), Vec::new());
    let mut next = Some(format!("/v2/{REPO}/tags/list?n=3"));
    let mut k = 0;
    while let Some(path) = next.take() {
        let (names, link) = page(&a, &path, "tags").await;
        seen.extend(names);
        next = link;
        if next.is_some() {
            // One tag just past the cursor (odd numbers fall between the existing ones), one
            // far behind it.
            let last = seen.last().unwrap();
            let n: u32 = last[1..].parse().unwrap();
            let ahead = format!("w{:03}", n + 1);
            tag(&b, REPO, &ahead, &manifest).await;
            added_ahead.push(ahead);
            tag(&b, REPO, &format!("a{k:03}"), &manifest).await;
            k += 1;
        }
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "out of order: {seen:?}"
    );
    for t in before.iter().chain(&added_ahead) {
        assert!(seen.contains(t), "{t} missing from the walk {seen:?}");
    }
    // The tags added behind the cursor are not in the walk, but are in the list now.
    assert!(!seen.iter().any(|t| t.starts_with('a')));
    let mut truth = before.clone();
    truth.extend(added_ahead);
    truth.extend((0..k).map(|k| format!("a{k:03}")));
    assert_eq!(tags(&a).await, truth.into_iter().collect::<Vec<_>>());
    a.stop();
    b.stop();
}

/// The journal's rotation (B's append takes it past 1 MiB and removes it; A reads the
/// directory afresh and starts a new one), a journal removed by hand, and a record torn by a
/// killed writer: A's list stays the ground truth through each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_rotates_and_survives_torn_records() {
    let data = tempfile::tempdir().unwrap();
    let (a, b) = (start(data.path()), start(data.path()));
    let manifest = image(&b, REPO).await;
    let mut truth = tag_many(&b, "r", CACHE_MIN, &manifest).await;
    assert_eq!(tags(&a).await, sorted(&truth));
    let dir = tags_dir(data.path());
    let j = journal(&dir);
    assert!(j.exists());

    // A record torn by a writer killed mid-append (no newline), then B's next record: both
    // the torn piece's neighbours and B's tag are right.
    {
        let mut f = std::fs::OpenOptions::new().append(true).open(&j).unwrap();
        f.write_all(b"\n+r00").unwrap();
    }
    assert_eq!(tags(&a).await, sorted(&truth), "a torn tail is not read");
    tag(&b, REPO, "r100", &manifest).await;
    truth.insert("r100".into());
    assert_eq!(tags(&a).await, sorted(&truth), "after the torn record");

    // Filled to the rotation size with records of entries that do not exist (as a busy
    // directory's history would be)...
    {
        let len = std::fs::metadata(&j).unwrap().len();
        let record = b"\n+gone-long-ago=\n";
        let room = 1024 * 1024 - len as usize;
        let mut fill = record.repeat(room / record.len());
        fill.resize(room, b'\n'); // exactly 1 MiB: B's next record takes it past
        let mut f = std::fs::OpenOptions::new().append(true).open(&j).unwrap();
        f.write_all(&fill).unwrap();
    }
    // ... A catches up by reading the directory afresh (too much to look at one by one) ...
    assert_eq!(tags(&a).await, sorted(&truth));
    // ... and B's next append takes it past the size: B removes it.
    tag(&b, REPO, "r101", &manifest).await;
    truth.insert("r101".into());
    assert!(!j.exists(), "the journal was not rotated");
    assert_eq!(tags(&a).await, sorted(&truth), "after the rotation");
    assert!(j.exists(), "A started a new journal");
    assert!(std::fs::metadata(&j).unwrap().len() < 1024);
    // The new journal is followed.
    untag(&b, "r000").await;
    truth.remove("r000");
    tag(&b, REPO, "r102", &manifest).await;
    truth.insert("r102".into());
    assert_eq!(tags(&a).await, sorted(&truth), "on the new journal");

    // Removed by hand (or lost to a full disk: a writer that cannot append removes it).
    std::fs::remove_file(&j).unwrap();
    untag(&b, "r001").await;
    truth.remove("r001");
    assert_eq!(tags(&a).await, sorted(&truth), "with the journal gone");
    tag(&b, REPO, "r103", &manifest).await;
    truth.insert("r103".into());
    assert_eq!(tags(&a).await, sorted(&truth), "on the journal made again");
    a.stop();
    b.stop();
}

/// A writer killed between its rename and its journal append leaves a change that no record
/// tells of: a cache may miss it, but only until it is read afresh, at most every
/// `MAX_AGE` (60 s; 3 s here through `DOCKSIDE_LISTING_CACHE_MAX_AGE`). Both kinds: a tag that
/// appeared and a tag that went, each without its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_without_its_record_is_seen_within_the_maximum_age() {
    const MAX_AGE_SECS: u64 = 3;
    let data = tempfile::tempdir().unwrap();
    let a = Server::builder()
        .data_dir(data.path())
        .env("DOCKSIDE_LISTING_CACHE_MIN", CACHE_MIN.to_string())
        .env("DOCKSIDE_LISTING_CACHE_MAX_AGE", MAX_AGE_SECS.to_string())
        .start();
    let manifest = image(&a, REPO).await;
    let mut truth = tag_many(&a, "k", CACHE_MIN, &manifest).await;
    let built = std::time::Instant::now();
    assert_eq!(tags(&a).await, sorted(&truth), "cached from here");
    let dir = tags_dir(data.path());
    assert!(journal(&dir).exists(), "the directory is cached");

    // What a killed writer leaves: a tag published by rename, and a tag unlinked, with no
    // record appended for either.
    // (A key's file is its name and `=`: see FsKv.)
    std::fs::copy(dir.join("k000="), dir.join(".tmp-killed")).unwrap();
    std::fs::rename(dir.join(".tmp-killed"), dir.join("k999=")).unwrap();
    std::fs::remove_file(dir.join("k001=")).unwrap();
    let stale = tags(&a).await;
    if built.elapsed() < std::time::Duration::from_secs(MAX_AGE_SECS) {
        // The cache is what makes a page O(page + log n); this is the inexactness it costs.
        assert_eq!(
            stale,
            sorted(&truth),
            "within the age, the cache is trusted"
        );
    }
    truth.insert("k999".into());
    truth.remove("k001");

    tokio::time::sleep(
        std::time::Duration::from_secs(MAX_AGE_SECS) + std::time::Duration::from_millis(300),
    )
    .await;
    assert_eq!(
        tags(&a).await,
        sorted(&truth),
        "read afresh after the maximum age"
    );
    let r = client()
        .get(a.url(&format!("/v2/{REPO}/manifests/k999")))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "the tag the killed writer published is served"
    );
    a.stop();
}

/// A journaled directory emptied by deletes goes, journal and all, as a small one does; a
/// later write makes it again, and another process's cache follows both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_journaled_directory_is_removed() {
    let data = tempfile::tempdir().unwrap();
    let (a, b) = (start(data.path()), start(data.path()));
    let manifest = image(&b, REPO).await;
    let truth = tag_many(&b, "t", 2 * CACHE_MIN, &manifest).await;
    assert_eq!(tags(&a).await, sorted(&truth));
    let dir = tags_dir(data.path());
    assert!(journal(&dir).exists(), "A's listing made no journal");

    for t in &truth {
        untag(&b, t).await;
    }
    assert!(!dir.exists(), "the emptied tags directory stays: {:?}", {
        std::fs::read_dir(&dir)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect::<Vec<_>>())
            .unwrap_or_default()
    });
    assert_eq!(tags(&a).await, Vec::<String>::new());
    tag(&b, REPO, "again", &manifest).await;
    assert_eq!(tags(&a).await, ["again"]);
    a.stop();
    b.stop();
}

async fn catalog(on: &Server) -> Vec<String> {
    page(on, "/v2/_catalog", "repositories").await.0
}

/// The catalog goes through the same listing: repositories B creates (some nested, a
/// subdirectory of the catalog directory) are in A's cached catalog at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_catalog_sees_another_process_repositories() {
    let data = tempfile::tempdir().unwrap();
    let (a, b) = (start(data.path()), start(data.path()));
    let mut truth = BTreeSet::new();
    for i in 0..CACHE_MIN {
        let repo = format!("c{i:02}");
        push_blob(&b, &repo, b"x").await;
        truth.insert(repo);
    }
    assert_eq!(catalog(&a).await, sorted(&truth));
    assert!(journal(&data.path().join("kv/catalog")).exists());
    for repo in ["c03a", "nested/one", "nested/two", "c99"] {
        push_blob(&b, repo, b"x").await;
        truth.insert(repo.to_owned());
        assert_eq!(catalog(&a).await, sorted(&truth), "after B created {repo}");
    }
    let (p, _) = page(&a, "/v2/_catalog?n=2&last=c99", "repositories").await;
    assert_eq!(p, ["nested/one", "nested/two"]);
    a.stop();
    b.stop();
}
