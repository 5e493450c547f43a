//! The native server on a filesystem that fills up: its data directory is a 32 MiB tmpfs
//! mounted in a private mount namespace (`unshare --user --map-root-user --mount`, so neither
//! root nor a mount outside the test is needed, and the mount vanishes with the server). The
//! test reaches that filesystem through `/proc/<pid>/root`, fills it with a file of its own,
//! and checks, through HTTP, that pushes fail with 507 in the spec's envelope, leave no partial
//! blob visible and no file behind, that pulls keep working, and that the same pushes succeed
//! once space is freed. Also: an unwritable data directory at start is a clear error and a
//! non-zero exit.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Server, client, pseudo_random, sha256_digest};
use serde_json::Value;

const MIB: usize = 1024 * 1024;

/// `unshare` mounting a tmpfs of `size` (with `opts`) on the data directory, then exec'ing the
/// server.
fn tmpfs_wrapper(data: &Path, opts: &str) -> Vec<String> {
    vec![
        "unshare".into(),
        "--user".into(),
        "--map-root-user".into(),
        "--mount".into(),
        "sh".into(),
        "-c".into(),
        format!("mount -t tmpfs -o {opts} tmpfs \"$0\" && exec \"$@\""),
        data.display().to_string(),
    ]
}

/// The server's data directory as the server sees it (inside its mount namespace).
fn inside(server: &Server) -> PathBuf {
    PathBuf::from(format!("/proc/{}/root", server.pid())).join(
        server
            .data_dir()
            .strip_prefix("/")
            .expect("an absolute data directory"),
    )
}

/// Every file under `dir`, relative to it, sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The files under `dir` that hold data (blobs, uploads, temporaries): not the key-value
/// records (`kv/`), whose upload sessions legitimately stay, nor the test's `filler`.
fn data_files(dir: &Path) -> Vec<String> {
    files(dir)
        .into_iter()
        .filter(|f| f != "filler" && !f.starts_with("kv/"))
        .collect()
}

/// Grows `filler` until the filesystem refuses (ENOSPC), then gives back `leave` bytes.
fn fill(filler: &Path, leave: u64) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(filler)
        .unwrap();
    let block = vec![0x5a; 64 * 1024];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", filler.display()),
        }
    }
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(leave)).unwrap();
}

/// Checks a 507 answer with the spec's error envelope.
async fn expect_full(r: reqwest::Response, what: &str) {
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = r.text().await.unwrap();
    assert_eq!(status, 507, "{what}: {body}");
    assert_eq!(ctype.as_deref(), Some("application/json"), "{what}");
    let j: Value = serde_json::from_str(&body).expect("a JSON error body");
    assert!(j["errors"][0]["code"].is_string(), "{what}: {body}");
    assert!(
        j["errors"][0]["message"].as_str().unwrap().contains("full"),
        "{what}: {body}"
    );
}

/// A blob pushed in one POST with its digest (`repo` under the server's `full/`).
async fn push_blob(
    http: &reqwest::Client,
    s: &Server,
    repo: &str,
    body: Vec<u8>,
) -> reqwest::Response {
    let digest = sha256_digest(&body);
    http.post(s.url(&format!("/v2/full/{repo}/blobs/uploads/?digest={digest}")))
        .body(body)
        .send()
        .await
        .unwrap()
}

/// After a failed push of `digest`: no partial blob is visible, and the data directory holds
/// exactly the files it held `before`.
async fn assert_nothing_left(
    http: &reqwest::Client,
    s: &Server,
    repo: &str,
    digest: &str,
    root: &Path,
    before: &[String],
) {
    let r = http
        .head(s.url(&format!("/v2/full/{repo}/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "no partial blob is visible");
    assert_eq!(
        data_files(root),
        before,
        "files left behind by the failed push"
    );
}

async fn push_manifest(http: &reqwest::Client, s: &Server, tag: &str, body: &str) -> u16 {
    http.put(s.url(&format!("/v2/full/app/manifests/{tag}")))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_full_disk_fails_pushes_cleanly_and_keeps_serving_pulls() {
    let data = tempfile::tempdir().unwrap();
    // The binary: run through unshare with its --data on a small tmpfs.
    let s = Server::builder()
        .data_dir(data.path())
        .wrapper(tmpfs_wrapper(data.path(), "size=32m"))
        .start();
    let http = client();
    let root = inside(&s);

    // An image that is there before the disk fills.
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = pseudo_random(MIB, 1);
    let (cd, ld) = (sha256_digest(&config), sha256_digest(&layer));
    for b in [&config, &layer] {
        assert_eq!(push_blob(&http, &s, "app", b.clone()).await.status(), 201);
    }
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    assert_eq!(push_manifest(&http, &s, "v1", &manifest).await, 201);
    let before = data_files(&root);

    // 4 MiB left: a 16 MiB layer does not fit, in one POST or in a chunked upload.
    let filler = root.join("filler");
    fill(&filler, 4 * MIB as u64);
    let big = pseudo_random(16 * MIB, 2);
    let bd = sha256_digest(&big);
    let r = push_blob(&http, &s, "app", big.clone()).await;
    expect_full(r, "a monolithic push into a full disk").await;
    let r = http
        .post(s.url("/v2/full/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "an upload session still opens");
    let loc = s.resolve(r.headers()["location"].to_str().unwrap());
    let r = http
        .patch(&loc)
        .header("content-type", "application/octet-stream")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    expect_full(r, "a PATCH into a full disk").await;
    // Nothing left behind but the session's record (the session stays open, at offset 0).
    assert_nothing_left(&http, &s, "app", &bd, &root, &before).await;
    let r = http.get(&loc).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["range"],
        "0-0",
        "the failed PATCH stored nothing"
    );

    // Pulls keep working.
    let r = http
        .get(s.url("/v2/full/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), manifest);
    let r = http
        .get(s.url(&format!("/v2/full/app/blobs/{ld}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), layer);

    // Not a byte left: even a tag is refused, cleanly, and the old one still resolves.
    fill(&filler, 0);
    let status = push_manifest(&http, &s, "v2", &manifest).await;
    if status != 507 {
        panic!("a tag PUT on a full disk answered {status}");
    }
    let r = http
        .get(s.url("/v2/full/app/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tags: Value = r.json().await.unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));

    // Space freed: the same pushes succeed.
    std::fs::remove_file(&filler).unwrap();
    let r = http
        .patch(&loc)
        .header("content-type", "application/octet-stream")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let loc = s.resolve(r.headers()["location"].to_str().unwrap());
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = http
        .put(format!("{loc}{sep}digest={bd}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r = http
        .get(s.url(&format!("/v2/full/app/blobs/{bd}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), big);
    assert_eq!(push_manifest(&http, &s, "v2", &manifest).await, 201);
}

#[test]
fn an_unwritable_data_directory_is_an_error_at_start() {
    let data = tempfile::tempdir().unwrap();
    let mut wrapper = tmpfs_wrapper(data.path(), "size=1m,ro");
    let program = wrapper.remove(0);
    let out = Command::new(program)
        .args(wrapper)
        .arg(env!("CARGO_BIN_EXE_dockside"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}", out.status);
    assert!(
        stderr.contains("Read-only file system")
            && stderr.contains(&data.path().display().to_string()),
        "stderr names the directory and the reason: {stderr}"
    );
}

/// A large push is written on a thread of its own once past 4 MiB (`hosts/fs_write.rs`): the
/// disk filling up under that thread must fail the push the same way, with nothing left behind.
#[tokio::test]
async fn a_full_disk_under_the_writer_thread_fails_a_large_push_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let s = Server::builder()
        .data_dir(data.path())
        .wrapper(tmpfs_wrapper(data.path(), "size=48m"))
        .start();
    let http = client();
    let root = inside(&s);
    let before = data_files(&root);

    // 64 MiB into 48: the first 4 MiB are written inline, the rest by the writer thread,
    // which meets the full disk.
    let big = pseudo_random(64 * MIB, 3);
    let bd = sha256_digest(&big);
    let r = push_blob(&http, &s, "big", big).await;
    expect_full(r, "a 64 MiB push into 48 MiB").await;
    assert_nothing_left(&http, &s, "big", &bd, &root, &before).await;

    // The space came back with the temporary file: a 40 MiB push (also past 4) fits.
    let fits = pseudo_random(40 * MIB, 4);
    let fd = sha256_digest(&fits);
    let r = push_blob(&http, &s, "big", fits.clone()).await;
    assert_eq!(
        r.status(),
        201,
        "a push that fits succeeds after the failed one"
    );
    let r = http
        .get(s.url(&format!("/v2/full/big/blobs/{fd}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.bytes().await.unwrap() == fits,
        "the blob reads back byte for byte"
    );
}
