//! Crash durability of the directory host, checked on the system calls the server makes:
//! `strace -f -ff` attaches to every thread of a running server while a client pushes an image
//! (a monolithic blob, a chunked blob, a 12 MiB blob, a manifest by tag into a new
//! repository), then the
//! trace of every thread is read. Needs strace: `cargo test --features syscalls --test
//! durability` (`.ci/run` installs it).
//!
//! A file's bytes are durable once it is fsynced, but its *name* (the rename that publishes it,
//! a directory created for it) only once the directory holding that name is fsynced too. So
//! every rename that publishes a blob or a key, and every directory created for one, must be
//! followed, on the same thread and before the request is answered, by an fsync of the
//! directory it happened in. Without that, a machine crash seconds after a 201 can lose the
//! push. (A test that cuts the power is not possible here; the syscalls are what guarantees it.)

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{Server, client, pseudo_random, sha256_digest};

/// One thread's trace, in order: the syscalls this test reads.
#[derive(Debug)]
enum Call {
    /// A directory opened (read-only, as for an fsync), with its fd.
    Open(PathBuf, i64),
    Fsync(i64),
    Rename(PathBuf),
    Mkdir(PathBuf),
}

/// The first quoted string of a strace line, unescaped for the plain paths used here.
fn quoted(line: &str, nth: usize) -> Option<String> {
    line.split('"').nth(1 + 2 * nth).map(str::to_owned)
}

fn result(line: &str) -> Option<i64> {
    line.rsplit_once(" = ")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn parse(trace: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    for line in trace.lines() {
        let ok = result(line).is_some_and(|r| r >= 0);
        if !ok {
            continue;
        }
        if line.starts_with("openat(") && line.contains("O_RDONLY") && !line.contains("O_CREAT") {
            if let (Some(p), Some(fd)) = (quoted(line, 0), result(line)) {
                calls.push(Call::Open(PathBuf::from(p), fd));
            }
        } else if let Some(rest) = line.strip_prefix("fsync(") {
            if let Some(fd) = rest.split(')').next().and_then(|f| f.parse().ok()) {
                calls.push(Call::Fsync(fd));
            }
        } else if line.starts_with("rename(") {
            calls.extend(quoted(line, 1).map(|p| Call::Rename(p.into())));
        } else if line.starts_with("renameat") {
            // renameat(AT_FDCWD, "old", AT_FDCWD, "new"[, flags])
            calls.extend(quoted(line, 1).map(|p| Call::Rename(p.into())));
        } else if line.starts_with("mkdir(") || line.starts_with("mkdirat(") {
            calls.extend(quoted(line, 0).map(|p| Call::Mkdir(p.into())));
        }
    }
    calls
}

/// Whether `calls[after..]` fsyncs directory `dir` (opened by path, then fsynced by fd).
fn syncs_dir_later(calls: &[Call], after: usize, dir: &Path) -> bool {
    let mut open: HashMap<i64, &Path> = HashMap::new();
    for c in &calls[after..] {
        match c {
            Call::Open(p, fd) => {
                open.insert(*fd, p);
            }
            Call::Fsync(fd) if open.get(fd).is_some_and(|p| *p == dir) => return true,
            _ => {}
        }
    }
    false
}

#[tokio::test]
async fn every_published_name_is_synced_into_its_directory() {
    assert!(
        std::process::Command::new("strace")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success()),
        "this test needs strace (apt-get install strace; .ci/run installs it)"
    );
    let traces = tempfile::tempdir().unwrap();
    let prefix = traces.path().join("t");
    // The binary: strace attaches to the server's process.
    let s = Server::start();
    // Attached to every thread of the running server (the tokio workers and the blocking pool
    // that does the file I/O); requests start once strace says it is attached.
    let mut strace = std::process::Command::new("strace")
        .args(["-f", "-ff", "-s", "4096", "-e"])
        .arg("trace=openat,fsync,rename,renameat,renameat2,mkdir,mkdirat,sync_file_range")
        .arg("-o")
        .arg(&prefix)
        .arg("-p")
        .arg(s.pid().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start strace");
    let mut err = std::io::BufReader::new(strace.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert!(line.contains("attached"), "strace: {line}");
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let data = s.data_dir().to_path_buf();
    let http = client();

    // A monolithic blob, a blob in two chunks, and a manifest by tag in a new repository.
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = pseudo_random(300_000, 7);
    let (cd, ld) = (sha256_digest(&config), sha256_digest(&layer));
    let r = http
        .post(s.url(&format!("/v2/durable/app/blobs/uploads/?digest={cd}")))
        .body(config.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .post(s.url("/v2/durable/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = s.resolve(r.headers()["location"].to_str().unwrap());
    let r = http
        .patch(&loc)
        .header("content-type", "application/octet-stream")
        .header("content-range", format!("0-{}", 150_000 - 1))
        .body(layer[..150_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = s.resolve(r.headers()["location"].to_str().unwrap());
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = http
        .put(format!("{loc}{sep}digest={ld}"))
        .header("content-type", "application/octet-stream")
        .body(layer[150_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A blob of 12 MiB: written behind on a thread of its own past 4 MiB, its writeback
    // started every 4 MiB as it arrives (`hosts/fs_write.rs`), so the fsync before its rename
    // only waits for the tail.
    let big = pseudo_random(12 << 20, 8);
    let bd = sha256_digest(&big);
    let r = http
        .post(s.url(&format!("/v2/durable/app/blobs/uploads/?digest={bd}")))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let r = http
        .put(s.url("/v2/durable/app/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    drop(http);
    s.stop();
    // strace ends when the process it traces has.
    assert!(strace.wait().is_ok());

    // Every thread's trace: each rename into the data directory (not into tmp/, and not of a
    // temporary name) and each directory made under it must be followed by an fsync of the
    // directory that holds the new name.
    let tmp = data.join("tmp");
    let (mut renames, mut mkdirs, mut missing) = (0, 0, Vec::new());
    let mut writebacks = 0;
    for entry in std::fs::read_dir(traces.path()).unwrap() {
        let trace = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        writebacks += trace
            .lines()
            .filter(|l| {
                l.starts_with("sync_file_range(")
                    && l.contains("SYNC_FILE_RANGE_WRITE")
                    && result(l) == Some(0)
            })
            .count();
        let calls = parse(&trace);
        for (i, c) in calls.iter().enumerate() {
            let (path, what) = match c {
                Call::Rename(p) => (p, "rename"),
                Call::Mkdir(p) => (p, "mkdir"),
                _ => continue,
            };
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if !path.starts_with(&data) || path.starts_with(&tmp) || hidden {
                continue;
            }
            match c {
                Call::Rename(_) => renames += 1,
                _ => mkdirs += 1,
            }
            let dir = path.parent().unwrap();
            if !syncs_dir_later(&calls, i + 1, dir) {
                missing.push(format!("{what} {}", path.display()));
            }
        }
    }
    // The push published names (blobs, the manifest, keys) and made directories (the new
    // repository's): the check above ran on real cases.
    assert!(renames >= 5, "only {renames} renames traced");
    assert!(mkdirs >= 1, "no directory made");
    // 12 MiB in steps of 4 MiB: the first two steps are handed over while the blob arrives,
    // the tail is left to the fsync.
    assert!(
        writebacks >= 2,
        "writeback of the 12 MiB blob started {writebacks} times while it arrived"
    );
    assert!(
        missing.is_empty(),
        "not followed by an fsync of their directory:\n{}",
        missing.join("\n")
    );
}
