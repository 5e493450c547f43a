//! The Cloudflare Worker under `wrangler dev` (Cloudflare's `workerd` runtime, with a local R2
//! bucket and local Durable Object storage), driven through its HTTP surface only.
//!
//! Needs the Worker built (workers/build.sh, wrangler.toml's build command, writes build/) and
//! the wrangler CLI: `.ci/workers` builds and installs both, then runs `cargo test --features
//! workers-e2e --test workers` with `DOCKSIDE_WRANGLER` set. Without them every test fails and says why; none skips.
//! Each test runs its own `wrangler dev` on a free loopback port, with its own state directory,
//! from a copy of the repository's `wrangler.toml` without the `[build]` step (the Worker is
//! built once, by the script), and without telemetry or a Cloudflare login.
//!
//! skopeo is Debian's (`.ci/workers` installs it), or `DOCKSIDE_SKOPEO`.
#![cfg(feature = "workers-e2e")]

mod common;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::scenarios;
use common::{pseudo_random, sha256_digest};

/// How long `wrangler dev` may take to answer its first request.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn wrangler_cli() -> PathBuf {
    let p = std::env::var("DOCKSIDE_WRANGLER").unwrap_or_else(|_| {
        panic!("DOCKSIDE_WRANGLER is not set: run .ci/workers, which installs wrangler from npm")
    });
    let p = PathBuf::from(p);
    assert!(
        p.is_file(),
        "DOCKSIDE_WRANGLER={} is not a file",
        p.display()
    );
    p
}

/// The Worker's entry point (`main` in wrangler.toml), with the build it imports in place.
fn entry_point() -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("wrangler.toml")).expect("wrangler.toml");
    let main = text
        .lines()
        .find_map(|l| l.strip_prefix("main = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("wrangler.toml names its main module");
    let p = repo_root().join(main);
    assert!(p.is_file(), "{} is missing", p.display());
    let wasm = repo_root().join("build/index_bg.wasm");
    assert!(
        wasm.is_file(),
        "{} is missing: build the Worker first (.ci/workers runs workers/build.sh)",
        wasm.display()
    );
    p
}

/// The repository's wrangler.toml, its entry point absolute and its `[build]` step left out.
fn config_without_build() -> String {
    let text = std::fs::read_to_string(repo_root().join("wrangler.toml")).expect("wrangler.toml");
    let mut out = String::new();
    let mut in_build = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_build = t == "[build]";
        }
        if in_build {
            continue;
        }
        if t.starts_with("main =") {
            out.push_str(&format!(
                "main = {:?}\n",
                entry_point().display().to_string()
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(out.contains("main = "), "wrangler.toml names no main");
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `wrangler dev` in a process group of its own (wrangler runs workerd as a child), stopped
/// together on drop. Its output goes to a file in its state directory.
struct Wrangler {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Wrangler {
    async fn start(vars: &[(&str, &str)]) -> Wrangler {
        for _ in 0..3 {
            if let Some(w) = Wrangler::try_start(vars).await {
                return w;
            }
        }
        panic!("wrangler dev could not get a free port in three tries");
    }

    async fn try_start(vars: &[(&str, &str)]) -> Option<Wrangler> {
        let dir = tempfile::Builder::new()
            .prefix("dockside-wrangler-")
            .tempdir()
            .expect("a state directory");
        let config = dir.path().join("wrangler.toml");
        std::fs::write(&config, config_without_build()).expect("write wrangler.toml");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("wrangler.log")).expect("log file");
        let mut cmd = Command::new(wrangler_cli());
        cmd.arg("dev")
            .arg("--config")
            .arg(&config)
            .args(["--local", "--ip", "127.0.0.1", "--port", &port.to_string()])
            .arg("--persist-to")
            .arg(dir.path().join("state"))
            .args([
                "--log-level",
                "info",
                "--show-interactive-dev-session=false",
            ])
            // No inspector port to collide between tests.
            .args(["--inspector-port", &free_port().to_string()]);
        for (k, v) in vars {
            cmd.arg("--var").arg(format!("{k}:{v}"));
        }
        cmd.current_dir(dir.path())
            .env("WRANGLER_SEND_METRICS", "false")
            .env("CI", "true")
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run wrangler: {e}"));
        let mut w = Wrangler {
            child,
            addr: format!("127.0.0.1:{port}"),
            dir,
        };
        let http = common::client();
        let started = Instant::now();
        loop {
            if http
                .get(format!("http://{}/v2/", w.addr))
                .send()
                .await
                .is_ok()
            {
                eprintln!("wrangler dev answered after {:?}", started.elapsed());
                return Some(w);
            }
            if let Some(status) = w.child.try_wait().expect("try_wait") {
                let log = w.log();
                if log.contains("EADDRINUSE") || log.contains("in use") {
                    return None;
                }
                panic!("wrangler dev exited with {status}:\n{log}");
            }
            assert!(
                started.elapsed() < STARTUP_TIMEOUT,
                "wrangler dev did not answer within {STARTUP_TIMEOUT:?}:\n{}",
                w.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("wrangler.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Wrangler {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- wrangler dev output ----\n{}", self.log());
        }
    }
}

fn location(base: &str, r: &reqwest::Response) -> String {
    let l = r.headers()["location"].to_str().unwrap();
    if l.starts_with("http") {
        l.to_owned()
    } else {
        format!("{base}{l}")
    }
}

fn with_digest(loc: &str, digest: &str) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}digest={digest}")
}

/// The Content-Length header as sent (reqwest's `content_length()` would also count a body it
/// has already buffered, so the header itself is read), `None` if the answer came without it.
fn content_length(r: &reqwest::Response) -> Option<u64> {
    assert!(
        r.headers().get("transfer-encoding").is_none()
            || r.headers().get("content-length").is_none(),
        "both Content-Length and Transfer-Encoding"
    );
    r.headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().parse().expect("a number"))
}

async fn envelope_code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.expect("a JSON error envelope");
    let code = body["errors"][0]["code"].as_str().unwrap_or("").to_owned();
    (status, code)
}

// ---------------------------------------------------------------------------------------------
// The tests

/// The oci-client scenario shared with the other components: a three-layer image in 4 MiB
/// chunks (each PATCH its own request to the Worker, the running hash through the Durable
/// Object), pulled back, tags, a referrer, the error envelope, a Range GET and a HEAD.
#[tokio::test(flavor = "multi_thread")]
async fn oci_client_push_and_pull() {
    let w = Wrangler::start(&[]).await;
    tokio::time::timeout(Duration::from_secs(300), scenarios::push_and_pull(&w.addr))
        .await
        .expect("the oci-client push and pull stalled under wrangler dev");
}

/// The body cap as `max_chunk_bytes` (4 MiB here, so the test stays small: the deployed
/// setting is the plan's 100 MB): the cap is advertised, a PATCH over it is refused with the
/// spec's envelope, and a 23 MiB layer (more than two R2 parts) goes up in chunks under the cap,
/// comes back whole, and in ranges across the chunks' and the parts' boundaries.
#[tokio::test(flavor = "multi_thread")]
async fn layer_larger_than_the_body_cap_in_chunks_and_ranges() {
    const CAP: usize = 4 * 1024 * 1024;
    let w = Wrangler::start(&[("DOCKSIDE_MAX_CHUNK_BYTES", &CAP.to_string())]).await;
    let base = w.base();
    let http = common::client();
    let data = pseudo_random(23 * 1024 * 1024 + 321, 7);
    let digest = sha256_digest(&data);

    let r = http
        .post(format!("{base}/v2/big/layer/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.headers()["oci-chunk-max-length"].to_str().unwrap(),
        CAP.to_string(),
        "the cap is advertised so clients chunk"
    );
    let mut loc = location(&base, &r);

    // Over the cap: refused, in the envelope, and the session is still usable.
    let r = http
        .patch(&loc)
        .header("content-type", "application/octet-stream")
        .header("content-range", format!("0-{}", CAP))
        .body(data[..CAP + 1].to_vec())
        .send()
        .await
        .unwrap();
    let (status, code) = envelope_code(r).await;
    assert_eq!(status, 413, "a chunk over the cap");
    assert_eq!(code, "SIZE_INVALID");

    // Chunks of the cap, odd last one in the closing PUT.
    let mut offset = 0;
    while data.len() - offset > CAP {
        let chunk = &data[offset..offset + CAP];
        let r = http
            .patch(&loc)
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("{}-{}", offset, offset + chunk.len() - 1),
            )
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
        offset += chunk.len();
        assert_eq!(
            r.headers()["range"].to_str().unwrap(),
            format!("0-{}", offset - 1)
        );
        loc = location(&base, &r);
    }
    let r = http
        .put(with_digest(&loc, &digest))
        .header("content-type", "application/octet-stream")
        .body(data[offset..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());

    let url = format!("{base}/v2/big/layer/blobs/{digest}");
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The spec's GET blob answers with Content-Length: the adapter sends the body through a
    // FixedLengthStream, or workerd would send it chunked.
    assert_eq!(content_length(&r), Some(data.len() as u64), "GET blob");
    let got = r.bytes().await.unwrap();
    assert_eq!(got.len(), data.len());
    assert_eq!(sha256_digest(&got), digest, "the layer came back different");

    // Ranges: inside one chunk, across a chunk boundary, across the first R2 part boundary
    // (10 MiB), the last bytes, a suffix, and one past the end.
    let part = 10 * 1024 * 1024;
    for (start, end) in [
        (0, 0),
        (CAP - 5, CAP + 5),
        (part - 100, part + 100),
        (data.len() - 10, data.len() - 1),
    ] {
        let r = http
            .get(&url)
            .header("range", format!("bytes={start}-{end}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206, "range {start}-{end}");
        assert_eq!(
            r.headers()["content-range"].to_str().unwrap(),
            format!("bytes {start}-{end}/{}", data.len())
        );
        assert_eq!(
            content_length(&r),
            Some((end + 1 - start) as u64),
            "range {start}-{end}"
        );
        assert_eq!(&r.bytes().await.unwrap()[..], &data[start..=end]);
    }
    let r = http
        .get(&url)
        .header("range", "bytes=-7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(content_length(&r), Some(7), "suffix range");
    assert_eq!(&r.bytes().await.unwrap()[..], &data[data.len() - 7..]);
    let r = http
        .get(&url)
        .header("range", format!("bytes={}-", data.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
}

/// A monolithic push larger than one R2 part (a multipart upload from one request body) and a
/// small one (one put), read back; a blob that is not there is the spec's BLOB_UNKNOWN.
#[tokio::test(flavor = "multi_thread")]
async fn monolithic_pushes_single_and_multipart() {
    let w = Wrangler::start(&[]).await;
    let base = w.base();
    let http = common::client();
    for (len, seed) in [(12 * 1024 * 1024 + 5, 11u64), (777, 12)] {
        let data = pseudo_random(len, seed);
        let digest = sha256_digest(&data);
        let r = http
            .post(format!("{base}/v2/mono/blobs/uploads/?digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
        let r = http
            .get(format!("{base}/v2/mono/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            content_length(&r),
            Some(len as u64),
            "GET blob of {len} bytes"
        );
        let got = r.bytes().await.unwrap();
        assert_eq!(
            sha256_digest(&got),
            digest,
            "{len} bytes came back different"
        );
    }
    let missing = sha256_digest(b"never pushed");
    let r = http
        .get(format!("{base}/v2/mono/blobs/{missing}"))
        .send()
        .await
        .unwrap();
    let (status, code) = envelope_code(r).await;
    assert_eq!((status, code.as_str()), (404, "BLOB_UNKNOWN"));
}

/// PATCHes racing on one upload session: the Durable Object's compare-and-swap lets exactly
/// one of each pair win (the other gets 416), and the blob is the winner's bytes.
#[tokio::test(flavor = "multi_thread")]
async fn racing_patches_one_winner() {
    let w = Wrangler::start(&[]).await;
    let base = w.base();
    let http = common::client();
    for round in 0..4u64 {
        let r = http
            .post(format!("{base}/v2/race/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let loc = location(&base, &r);
        let a = pseudo_random(64 * 1024, 100 + round);
        let b = pseudo_random(64 * 1024, 200 + round);
        let send = |body: Vec<u8>| {
            let http = http.clone();
            let loc = loc.clone();
            async move {
                http.patch(&loc)
                    .header("content-type", "application/octet-stream")
                    .header("content-range", format!("0-{}", body.len() - 1))
                    .body(body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        };
        let (sa, sb) = tokio::join!(send(a.clone()), send(b.clone()));
        let wins = [sa, sb].iter().filter(|&&s| s == 202).count();
        assert_eq!(wins, 1, "round {round}: statuses {sa} and {sb}");
        assert!(
            [sa, sb].contains(&416),
            "round {round}: the loser sees the session moved (416): {sa} and {sb}"
        );
        let winner = if sa == 202 { &a } else { &b };
        let r = http
            .put(with_digest(&loc, &sha256_digest(winner)))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "round {round}: the winner's bytes close the upload"
        );
    }
}

/// Manifests longer than a Durable Object's SQLite row (2 MB) up to the core's 4 MiB cap: the
/// key store splits them across rows (src/hosts/durable.rs). Each comes back byte for byte with
/// its Content-Length; a deleted one is gone (its later rows with it) and can be pushed again;
/// one byte over the cap is still 413.
#[tokio::test(flavor = "multi_thread")]
async fn manifests_larger_than_a_row() {
    const CAP: usize = 4 * 1024 * 1024;
    let w = Wrangler::start(&[]).await;
    let base = w.base();
    let http = common::client();
    let repo = format!("{base}/v2/bigm/manifests");
    let mut descriptors = Vec::new();
    for (len, seed) in [(1234usize, 31u64), (77, 32)] {
        let data = pseudo_random(len, seed);
        let digest = sha256_digest(&data);
        let r = http
            .post(format!("{base}/v2/bigm/blobs/uploads/?digest={digest}"))
            .body(data)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        descriptors.push((digest, len));
    }
    // A manifest of exactly `len` bytes: an annotation pads it.
    let manifest = |len: usize, tag: &str| {
        let make = |pad: usize| {
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": descriptors[1].0, "size": descriptors[1].1},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": descriptors[0].0, "size": descriptors[0].1}],
                "annotations": {"org.example.tag": tag, "org.example.padding": "x".repeat(pad)},
            }))
            .unwrap()
        };
        let m = make(len - make(0).len());
        assert_eq!(m.len(), len);
        m
    };
    let put = |tag: &str, body: Vec<u8>| {
        http.put(format!("{repo}/{tag}"))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(body)
            .send()
    };
    let check = |tag: String, want: Vec<u8>| {
        let http = http.clone();
        let repo = repo.clone();
        async move {
            let r = http.get(format!("{repo}/{tag}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "GET {tag}");
            assert_eq!(content_length(&r), Some(want.len() as u64), "GET {tag}");
            assert_eq!(
                r.headers()["docker-content-digest"].to_str().unwrap(),
                sha256_digest(&want)
            );
            let got = r.bytes().await.unwrap();
            assert!(
                got == want,
                "{tag}: {} bytes came back different",
                want.len()
            );
        }
    };

    // One row, two rows, and the cap itself (five rows).
    let sizes = [900 * 1024, 1536 * 1024, CAP];
    let mut pushed = Vec::new();
    for (i, len) in sizes.into_iter().enumerate() {
        let tag = format!("s{i}");
        let m = manifest(len, &tag);
        let r = put(&tag, m.clone()).await.unwrap();
        assert_eq!(
            r.status(),
            201,
            "{len} bytes: {}",
            r.text().await.unwrap_or_default()
        );
        pushed.push((tag, m));
    }
    for (tag, m) in &pushed {
        check(tag.clone(), m.clone()).await;
    }
    let tags: serde_json::Value = http
        .get(format!("{base}/v2/bigm/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["s0", "s1", "s2"]));

    // Deleted, then pushed again.
    let (tag, m) = pushed.pop().unwrap();
    let digest = sha256_digest(&m);
    let r = http
        .delete(format!("{repo}/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = http.get(format!("{repo}/{digest}")).send().await.unwrap();
    let (status, code) = envelope_code(r).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    let r = put(&tag, m.clone()).await.unwrap();
    assert_eq!(r.status(), 201);
    check(tag.clone(), m).await;

    // The cap is the core's, as on every host.
    let mut over = manifest(CAP, "over");
    over.insert(over.len() - 1, b' ');
    let (status, code) = envelope_code(put("over", over).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (413, "SIZE_INVALID"));
}

/// skopeo copies an OCI layout into the Worker and back out to a second layout: the pulled
/// layer is its digest and holds the original bytes (skopeo gzips it on the way up).
#[tokio::test(flavor = "multi_thread")]
async fn skopeo_push_and_pull() {
    let skopeo = std::env::var("DOCKSIDE_SKOPEO").unwrap_or_else(|_| "skopeo".to_owned());
    let w = Wrangler::start(&[]).await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let layer = pseudo_random(2 * 1024 * 1024 + 3, 21);
    write_layout(&src, &layer);

    let run = |args: &[&str]| {
        let out = Command::new(&skopeo)
            .arg("--insecure-policy")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {skopeo}: {e} (.ci/workers installs it)"));
        assert!(
            out.status.success(),
            "skopeo {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let remote = format!("docker://{}/skopeo/img:v1", w.addr);
    run(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", src.display()),
        &remote,
    ]);
    let dst = tmp.path().join("dst");
    run(&[
        "copy",
        "--src-tls-verify=false",
        &remote,
        &format!("oci:{}:v1", dst.display()),
    ]);
    // skopeo gzips an uncompressed layer on its way to a registry, so what comes back is the
    // pushed image as the registry holds it: the layer, through the pulled manifest, must
    // decompress to the original bytes.
    let read = |d: &str| {
        std::fs::read(dst.join("blobs/sha256").join(&d["sha256:".len()..]))
            .unwrap_or_else(|e| panic!("{d} not in {}: {e}", dst.display()))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("index.json")).unwrap()).unwrap();
    let pulled: serde_json::Value =
        serde_json::from_slice(&read(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let layer_digest = pulled["layers"][0]["digest"].as_str().unwrap();
    let got = read(layer_digest);
    assert_eq!(
        sha256_digest(&got),
        layer_digest,
        "the pulled layer is its digest"
    );
    let got = if got.starts_with(&[0x1f, 0x8b]) {
        let mut child = Command::new("gzip")
            .arg("-dc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("gzip");
        let mut stdin = child.stdin.take().unwrap();
        let feed = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &got));
        let out = child.wait_with_output().unwrap();
        feed.join().unwrap().unwrap();
        out.stdout
    } else {
        got
    };
    assert!(got == layer, "the layer came back different");
}

/// A one-image OCI layout in `dir`.
fn write_layout(dir: &Path, layer: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let d = sha256_digest(data);
        std::fs::write(blobs.join(&d["sha256:".len()..]), data).unwrap();
        d
    };
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = put(config);
    let layer_digest = put(layer);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer.len()}],
    }))
    .unwrap();
    let manifest_digest = put(&manifest);
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": "v1"}}],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
}
