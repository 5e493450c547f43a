//! Garbage collection of what a pull-through mirror stored: a blob fetched from the upstream
//! gets its `gc/blobs` record when it arrives (as a pushed blob does), so the collector finds
//! it once nothing references it, and keeps what a cached image still needs. Real servers on
//! loopback (an upstream `dockside serve`, a mirror `dockside serve --mirror-config`), then
//! `dockside gc` on the mirror's directory; the stores are read back to see the bytes gone.

mod common;

use std::time::Duration;

use common::{Server, client, pseudo_random, sha256_digest};
use dockside::testing::TestRegistry;
use dockside::{BlobStore, FsBlobs, FsKv, KeyValue};
use serde_json::json;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Pushes an image of a config and one layer to `base`; returns the layer's digest and bytes.
async fn seed(http: &reqwest::Client, base: &str, repo: &str, tag: &str, seed: u64) -> String {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
    let layer = pseudo_random(50_000, seed);
    let mut descs = Vec::new();
    for data in [&config, &layer] {
        let d = sha256_digest(data);
        let r = http
            .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        descs.push(
            json!({"mediaType": "application/octet-stream", "digest": d, "size": data.len()}),
        );
    }
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descs[0], "layers": [descs[1]],
    }))
    .unwrap();
    let r = http
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", OCI_MANIFEST)
        .body(m)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    sha256_digest(&layer)
}

/// Runs `dockside gc` on the directory `data` (with `gc_conf`, when given) and returns the
/// counts it printed.
fn dockside_gc(data: &std::path::Path, gc_conf: Option<&std::path::Path>) -> serde_json::Value {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dockside"));
    cmd.arg("gc").arg("--data").arg(data);
    if let Some(c) = gc_conf {
        cmd.arg("--gc-config").arg(c);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(
        out.stdout
            .split(|b| *b == b'\n')
            .rfind(|l| l.starts_with(b"{"))
            .expect("the counts as JSON"),
    )
    .unwrap()
}

fn record_key(digest: &str) -> String {
    format!("gc/blobs/{}", digest.replacen(':', "/", 1))
}

fn blob_path(digest: &str) -> String {
    dockside::layout::blob_data(&dockside::Digest::parse(digest).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn mirrored_blobs_are_recorded_and_collected() {
    let tmp = tempfile::tempdir().unwrap();
    let http = client();
    // The upstream only needs to be a registry at a URL.
    let up = TestRegistry::start();
    let ub = up.url().to_owned();
    let kept = seed(&http, &ub, "library/app", "v1", 1).await;
    let loose = seed(&http, &ub, "library/other", "v1", 2).await;

    let data = tmp.path().join("mirror");
    std::fs::create_dir_all(&data).unwrap();
    let conf = tmp.path().join("mirror.toml");
    std::fs::write(&conf, format!("[[upstream]]\nurl = \"{ub}\"\n")).unwrap();
    let mirror = Server::builder()
        .arg("--mirror-config")
        .arg(&conf)
        .data_dir(&data)
        .start();
    let mb = mirror.base_url();
    // An image through the mirror (its manifest by tag, then its layer), and a layer of
    // another image by digest alone, which no cached manifest references.
    let r = http
        .get(format!("{mb}/v2/library/app/manifests/v1"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (repo, d) in [("library/app", &kept), ("library/other", &loose)] {
        let r = http
            .get(format!("{mb}/v2/{repo}/blobs/{d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(sha256_digest(&r.bytes().await.unwrap()), *d);
    }
    mirror.stop();

    // Both have their record before any collection ran.
    let kv = FsKv::new(data.join("kv")).unwrap();
    let blobs = FsBlobs::new(&data).unwrap();
    for d in [&kept, &loose] {
        assert!(
            kv.get(&record_key(d)).await.unwrap().is_some(),
            "{d}: no record"
        );
        assert!(blobs.size(&blob_path(d)).await.unwrap().is_some());
    }

    // No grace, judged by whole seconds: let the fetches' second pass.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let gc_conf = tmp.path().join("gc.toml");
    std::fs::write(&gc_conf, "grace_secs = 0\n").unwrap();
    let stats = dockside_gc(&data, Some(&gc_conf));
    assert_eq!(stats["blobs"], 1, "{stats}");

    // The loose layer's bytes and record are gone; the cached image's layer stays.
    assert!(blobs.size(&blob_path(&loose)).await.unwrap().is_none());
    assert!(kv.get(&record_key(&loose)).await.unwrap().is_none());
    assert!(blobs.size(&blob_path(&kept)).await.unwrap().is_some());
    // And the mirror, restarted on the same directory, serves it from there.
    let mirror = Server::builder()
        .arg("--mirror-config")
        .arg(&conf)
        .data_dir(&data)
        .start();
    let r = http
        .get(format!("{}/v2/library/app/blobs/{kept}", mirror.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256_digest(&r.bytes().await.unwrap()), kept);
}

/// The keys under `repositories/<repo>/` and `gc/repos/<repo>/_` of the store in `data`.
async fn keys_of(data: &std::path::Path, repo: &str) -> Vec<String> {
    let kv = FsKv::new(data.join("kv")).unwrap();
    let mut keys = kv
        .list(&format!("repositories/{repo}/"), None, usize::MAX)
        .await
        .unwrap();
    keys.extend(
        kv.list(&format!("gc/repos/{repo}/_"), None, usize::MAX)
            .await
            .unwrap(),
    );
    keys
}

/// Pulls `repo:tag` (manifest and layer) through the mirror at `mb`; checks the layer's bytes.
async fn pull(http: &reqwest::Client, mb: &str, repo: &str, tag: &str, layer: &str) {
    let r = http
        .get(format!("{mb}/v2/{repo}/manifests/{tag}"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("{mb}/v2/{repo}/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256_digest(&r.bytes().await.unwrap()), layer);
}

/// Deletes manifest `repo:tag` by digest through the mirror at `mb` (its tag goes; the
/// mirror's record of the tag stays, as any delete leaves it).
async fn delete_by_digest(http: &reqwest::Client, mb: &str, repo: &str, tag: &str) {
    let r = http
        .head(format!("{mb}/v2/{repo}/manifests/{tag}"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let d = r.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    let r = http
        .delete(format!("{mb}/v2/{repo}/manifests/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

fn has_record(keys: &[String], tag: &str) -> bool {
    keys.iter()
        .any(|k| k.ends_with(&format!("/_mirror/tags/{tag}")))
}

/// A mirrored repository that empties leaves nothing behind: its `_mirror/tags` records are
/// cache, not content, so they neither keep it in the catalog nor outlive it. Two tags: `v1`
/// goes by retention (its record with it), `v2` by a delete by digest (its record stays,
/// until the repository empties). Once judged in pages by the admin request (`step_items =
/// 2`, below the repository's keys), once whole by `dockside gc`; each time the next pull
/// through the mirror fetches the image again from the upstream, byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn an_emptied_mirrored_repository_takes_its_mirror_records() {
    let tmp = tempfile::tempdir().unwrap();
    let http = client();
    // The upstream only needs to be a registry at a URL.
    let up = TestRegistry::start();
    let ub = up.url().to_owned();
    let l1 = seed(&http, &ub, "library/app", "v1", 3).await;
    let l2 = seed(&http, &ub, "library/app", "v2", 4).await;

    let data = tmp.path().join("mirror");
    std::fs::create_dir_all(&data).unwrap();
    let conf = tmp.path().join("mirror.toml");
    std::fs::write(
        &conf,
        format!("allow_push = true\n\n[[upstream]]\nurl = \"{ub}\"\n"),
    )
    .unwrap();
    // Retention keeps no tag of library/** but `v2`, however young.
    let gc_conf = tmp.path().join("gc.toml");
    std::fs::write(
        &gc_conf,
        "grace_secs = 0\nstep_items = 2\n\n[[retention]]\nrepositories = \"library/**\"\nkeep_younger_than_secs = 0\nprotect = [\"v2\"]\n",
    )
    .unwrap();

    for paged in [true, false] {
        let mirror = Server::builder()
            .arg("--mirror-config")
            .arg(&conf)
            .arg("--gc-config")
            .arg(&gc_conf)
            .data_dir(&data)
            .start();
        let mb = mirror.base_url();
        pull(&http, &mb, "library/app", "v1", &l1).await;
        pull(&http, &mb, "library/app", "v2", &l2).await;
        delete_by_digest(&http, &mb, "library/app", "v2").await;
        let before = keys_of(&data, "library/app").await;
        assert!(
            has_record(&before, "v1") && has_record(&before, "v2"),
            "{before:?}"
        );

        // No grace, judged by whole seconds: let the pulls' second pass.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        if paged {
            let mut judged_in_pages = false;
            let mut steps = 0;
            let p = loop {
                let r = http
                    .post(format!("{mb}/v2/_dockside/gc"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let p: serde_json::Value = r.json().await.unwrap();
                judged_in_pages |= p["repo"]["name"] == "library/app";
                steps += 1;
                assert!(steps < 1000, "the collection never finished");
                if p["phase"] == "idle" {
                    break p;
                }
            };
            assert!(judged_in_pages, "library/app was not judged in pages: {p}");
            assert_eq!(p["last"]["repositories"], 1, "{p}");
            assert_eq!(p["last"]["tags"], 1, "{p}");
            mirror.stop();
        } else {
            mirror.stop();
            dockside_gc(&data, Some(&gc_conf));
        }
        let left = keys_of(&data, "library/app").await;
        assert!(left.is_empty(), "paged: {paged}, left behind: {left:?}");
        let kv = FsKv::new(data.join("kv")).unwrap();
        assert!(kv.get("catalog/library/app").await.unwrap().is_none());
        let blobs = FsBlobs::new(&data).unwrap();
        for d in [&l1, &l2] {
            assert!(blobs.size(&blob_path(d)).await.unwrap().is_none());
        }

        // Pulled again: fetched afresh from the upstream.
        let mirror = Server::builder()
            .arg("--mirror-config")
            .arg(&conf)
            .data_dir(&data)
            .start();
        let mb = mirror.base_url();
        pull(&http, &mb, "library/app", "v2", &l2).await;
        let cat: serde_json::Value = http
            .get(format!("{mb}/v2/_catalog"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            cat["repositories"],
            serde_json::json!(["library/app"]),
            "{cat}"
        );
        mirror.stop();
    }
}

/// What a mirror keeps only for a while: the upstream's tokens (until they expire) and a
/// fetch's lease (released when the fetch ends; a crashed fetcher leaves it behind). A
/// collection removes the lapsed ones, keeps a live lease, and the mirror goes on: it fetches
/// a new token when it next needs one.
#[tokio::test(flavor = "multi_thread")]
async fn lapsed_tokens_and_leases_are_collected() {
    let tmp = tempfile::tempdir().unwrap();
    let http = client();
    // Seeded open, then restarted on the same data with tokens that live one second.
    let up_dir = tmp.path().join("upstream");
    let up = TestRegistry::builder().dir(&up_dir).start();
    let v1 = seed(&http, up.url(), "public/app", "v1", 5).await;
    let v2 = seed(&http, up.url(), "public/app", "v2", 6).await;
    drop(up);
    let auth = dockside::AuthConfig::from_toml(&format!(
        r#"
[auth]
service = "upstream"
secret = "gc-mirror-test-secret-0123456789abcdef"
token_ttl = 1

[[auth.users]]
name = "puller"
password_hash = "{}"

[[auth.rules]]
repositories = ["public/*"]
users = ["puller"]
actions = ["pull"]
"#,
        bcrypt::hash("puller-pw", 4).unwrap()
    ))
    .unwrap()
    .map(std::sync::Arc::new);
    let up = TestRegistry::builder()
        .dir(&up_dir)
        .config(dockside::Config {
            auth,
            ..Default::default()
        })
        .start();

    let data = tmp.path().join("mirror");
    std::fs::create_dir_all(&data).unwrap();
    let conf = tmp.path().join("mirror.toml");
    std::fs::write(
        &conf,
        format!(
            "[[upstream]]\nurl = \"{}\"\nusername = \"puller\"\npassword = \"puller-pw\"\n",
            up.url()
        ),
    )
    .unwrap();
    let start_mirror = || {
        Server::builder()
            .arg("--mirror-config")
            .arg(&conf)
            .data_dir(&data)
            .start()
    };
    let mirror = start_mirror();
    pull(&http, &mirror.base_url(), "public/app", "v1", &v1).await;
    mirror.stop();
    let tokens_fetched = common::served(&up, "GET", "/token", Some(200));
    assert!(tokens_fetched >= 1, "the mirror used the Bearer flow");

    let kv = FsKv::new(data.join("kv")).unwrap();
    let tokens = kv.list("mirror-tokens/", None, usize::MAX).await.unwrap();
    assert!(!tokens.is_empty(), "the upstream's token is cached");
    // What a fetcher that crashed two minutes ago leaves, and one fetching now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let crashed = format!("mirror-leases/sha256/{}", "a".repeat(64));
    let live = format!("mirror-leases/sha256/{}", "b".repeat(64));
    let lease = |owner: &str, expires: u64| {
        serde_json::to_vec(&json!({"owner": owner, "expires": expires})).unwrap()
    };
    kv.set(&crashed, &lease("crashed", now - 120))
        .await
        .unwrap();
    kv.set(&live, &lease("fetching", now + 600)).await.unwrap();

    // The tokens expire one second after they were issued.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let stats = dockside_gc(&data, None);
    assert_eq!(stats["records"], tokens.len() + 1, "{stats}");
    let kv = FsKv::new(data.join("kv")).unwrap();
    assert_eq!(
        kv.list("mirror-tokens/", None, usize::MAX).await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        kv.list("mirror-leases/", None, usize::MAX).await.unwrap(),
        vec![live]
    );

    // The mirror, restarted, asks the upstream for a new token when it needs one.
    let mirror = start_mirror();
    pull(&http, &mirror.base_url(), "public/app", "v2", &v2).await;
    mirror.stop();
    assert!(common::served(&up, "GET", "/token", Some(200)) > tokens_fetched);
}
