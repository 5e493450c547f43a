//! Large pushes with fsync on (the server's default), past the size at which the core hashes
//! and the directory host writes a blob on threads of their own, handing it to the device as it
//! arrives (`src/behind.rs`, `hosts/fs_write.rs`): the blob reads back byte for byte, its digest
//! is checked, and nothing is left in the temporary directory. Also: tagging a stored manifest again, which writes only the tag.

mod common;

use common::{client, pseudo_random, sha256_digest};
use dockside::testing::TestRegistry;

/// `url` + `path`, or `location` if it is already absolute.
fn at(s: &TestRegistry, location: &str) -> String {
    if location.starts_with("http://") {
        location.to_owned()
    } else {
        format!("{}{location}", s.url())
    }
}

/// In a temporary directory, fsync on (the directory host's default, as `dockside serve`).
fn start() -> TestRegistry {
    TestRegistry::builder().temp_dir().start()
}

/// Far past the threads' start (4 MiB) and many writeback steps (4 MiB).
const SIZE: usize = 80 << 20;

async fn pushed_and_pulled(s: &TestRegistry, repo: &str, data: &[u8], chunk: Option<usize>) {
    let c = client();
    let digest = sha256_digest(data);
    let r = c
        .post(at(s, &format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let mut loc = at(s, r.headers()["location"].to_str().unwrap());
    let mut off = 0;
    if let Some(chunk) = chunk {
        while off < data.len() {
            let end = (off + chunk).min(data.len());
            let r = c
                .patch(&loc)
                .header("content-range", format!("{off}-{}", end - 1))
                .header("content-type", "application/octet-stream")
                .body(data[off..end].to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202, "PATCH {off}-{end}");
            loc = at(s, r.headers()["location"].to_str().unwrap());
            off = end;
        }
    }
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{loc}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(data[off..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "closing PUT: {}", r.text().await.unwrap());
    let r = c
        .get(at(s, &format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = r.bytes().await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the pulled blob differs from the pushed one");
}

/// The temporary directory holds nothing once the pushes are done.
fn no_temporary_files(s: &TestRegistry) {
    let left: Vec<_> = std::fs::read_dir(s.data_dir().unwrap().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left in tmp/: {left:?}");
}

#[tokio::test]
async fn large_monolithic_push_with_fsync_reads_back() {
    let s = start();
    pushed_and_pulled(&s, "big/mono", &pseudo_random(SIZE, 1), None).await;
    no_temporary_files(&s);
}

#[tokio::test]
async fn large_chunked_push_with_fsync_reads_back() {
    let s = start();
    // 48 MiB PATCHes: each part is flushed early, then synced at its end.
    pushed_and_pulled(&s, "big/chunked", &pseudo_random(SIZE, 2), Some(48 << 20)).await;
    no_temporary_files(&s);
}

/// A digest mismatch found after the blob was written behind and handed to the device: 400, and
/// what was written is gone.
#[tokio::test]
async fn large_push_with_a_wrong_digest_leaves_nothing() {
    let s = start();
    let c = client();
    let data = pseudo_random(SIZE, 3);
    let wrong = sha256_digest(b"something else");
    let r = c
        .post(at(
            &s,
            &format!("/v2/big/bad/blobs/uploads/?digest={wrong}"),
        ))
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "DIGEST_INVALID");
    let r = c
        .head(at(&s, &format!("/v2/big/bad/blobs/{wrong}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    no_temporary_files(&s);
    let uploads = s.data_dir().unwrap().join("uploads");
    let left = std::fs::read_dir(&uploads).map_or(0, |d| d.count());
    assert_eq!(left, 0, "parts left in {}", uploads.display());
}

/// Tagging a stored manifest again (and again with the same tag) answers 201 and serves it.
#[tokio::test]
async fn retagging_a_stored_manifest() {
    let s = start();
    let c = client();
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let cd = sha256_digest(config);
    let r = c
        .post(at(&s, &format!("/v2/re/tag/blobs/uploads/?digest={cd}")))
        .body(config.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [],
    }))
    .unwrap();
    let md = sha256_digest(&manifest);
    for tag in ["a", "b", "a", "b"] {
        let r = c
            .put(at(&s, &format!("/v2/re/tag/manifests/{tag}")))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "PUT {tag}");
        assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    }
    for tag in ["a", "b"] {
        let r = c
            .get(at(&s, &format!("/v2/re/tag/manifests/{tag}")))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), manifest);
    }
    let r = c.get(at(&s, "/v2/re/tag/tags/list")).send().await.unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
}
