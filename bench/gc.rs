//! Garbage collection's benchmark: a registry of `--blobs` blobs (10 000) and `--tags` tags
//! (100 000) on the local-directory host, half of its images deleted, then:
//! - `dockside gc --dry-run` and `dockside gc`: wall time and the process's peak RSS (VmHWM,
//!   sampled from /proc), and the storage reclaimed (bytes under the data directory before and
//!   after, and the collector's own count);
//! - the latency of manifest GETs to a `dockside serve` on the same directory, without a
//!   collection and while one runs (p50 / p99 / max).
//!
//! ```text
//! cargo build --release --bin dockside --example gc-bench
//! cargo run --release --example gc-bench                          # 10 000 blobs, 100 000 tags
//! cargo run --release --example gc-bench -- --blobs 1000 --tags 10000
//! ```
//! Figures go in benchmarks' README, never in tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dockside::{Config, FsBlobs, FsKv, Registry};
use http_body_util::{BodyExt, Full};
use sha2::{Digest as _, Sha256};

const LAYERS_PER_IMAGE: usize = 5;
const REPOS: usize = 10;

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn dockside_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/examples/gc-bench -> target/<profile>/dockside
    exe.parent().unwrap().parent().unwrap().join("dockside")
}

fn du(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let m = e.metadata().unwrap();
            total += if m.is_dir() { du(&e.path()) } else { m.len() };
        }
    }
    total
}

/// Runs `cmd` to its end, sampling its peak RSS; returns (wall time, peak KiB, stdout).
fn run_measured(cmd: &mut Command) -> (Duration, u64, String) {
    // Output to a file, not a pipe: a dry run prints a line per item, more than a pipe holds
    // while nobody reads it (the child would block on the write, forever).
    let out_path =
        std::env::temp_dir().join(format!("dockside-gc-bench-{}.out", std::process::id()));
    let start = Instant::now();
    let mut child = cmd
        .stdout(std::fs::File::create(&out_path).unwrap())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Ok(s) = std::fs::read_to_string(&status)
            && let Some(l) = s.lines().find(|l| l.starts_with("VmHWM:"))
        {
            peak = peak.max(
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            );
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = start.elapsed();
    assert!(child.wait().unwrap().success());
    let out = std::fs::read_to_string(&out_path).unwrap();
    std::fs::remove_file(&out_path).unwrap();
    (elapsed, peak, out)
}

async fn send(r: &Registry<FsKv, FsBlobs>, m: http::Method, uri: &str, ct: &str, body: Vec<u8>) {
    let req = http::Request::builder()
        .method(m)
        .uri(uri)
        .header("content-type", ct)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = r.handle(req).await;
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        status.is_success(),
        "{uri}: {status} {}",
        String::from_utf8_lossy(&body)
    );
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

/// GETs manifests for 5 s (or until `until` exits, sampling its peak RSS) and returns the
/// sorted latencies and that peak (KiB).
fn latencies(
    base: &str,
    refs: &[String],
    mut until: Option<&mut std::process::Child>,
) -> (Vec<Duration>, u64) {
    let client = reqwest::blocking::Client::new();
    let mut out = Vec::new();
    let mut peak = 0u64;
    let start = Instant::now();
    let mut i = 0;
    loop {
        let r = &refs[i % refs.len()];
        i += 1;
        let t = Instant::now();
        let resp = client
            .get(format!("{base}/v2/{r}"))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .unwrap();
        assert!(resp.status().is_success(), "{r}: {}", resp.status());
        resp.bytes().unwrap();
        out.push(t.elapsed());
        match until.as_deref_mut() {
            Some(c) => {
                if let Ok(s) = std::fs::read_to_string(format!("/proc/{}/status", c.id()))
                    && let Some(l) = s.lines().find(|l| l.starts_with("VmHWM:"))
                {
                    let kib = l.split_whitespace().nth(1).and_then(|v| v.parse().ok());
                    peak = peak.max(kib.unwrap_or(0));
                }
                if c.try_wait().unwrap().is_some() {
                    break;
                }
            }
            None if start.elapsed() > Duration::from_secs(5) => break,
            None => {}
        }
    }
    out.sort();
    (out, peak)
}

fn report(what: &str, l: &[Duration]) {
    println!(
        "{what}: {} GETs, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        l.len(),
        percentile(l, 0.5).as_secs_f64() * 1e3,
        percentile(l, 0.99).as_secs_f64() * 1e3,
        l.last().unwrap().as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() {
    let mut blobs = 10_000usize;
    let mut tags = 100_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v: usize = args.next().and_then(|v| v.parse().ok()).expect("a number");
        match a.as_str() {
            "--blobs" => blobs = v,
            "--tags" => tags = v,
            _ => panic!("unknown option {a}"),
        }
    }
    println!("load average at start: {}", loadavg());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let r = Registry::new(
        FsKv::new(data.join("kv")).unwrap().fsync(false),
        FsBlobs::new(&data).unwrap().fsync(false),
        Config::default(),
    );
    let images = blobs / LAYERS_PER_IMAGE;
    let tags_per_image = tags.div_ceil(images);
    let t = Instant::now();
    let mut manifests = Vec::new();
    for i in 0..images {
        let repo = format!("bench/r{}", i % REPOS);
        let mut layers = Vec::new();
        for l in 0..LAYERS_PER_IMAGE {
            let blob = format!("image {i} layer {l} ").repeat(64).into_bytes();
            let d = sha256(&blob);
            let size = blob.len();
            send(
                &r,
                http::Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
                "application/octet-stream",
                blob,
            )
            .await;
            layers.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": size}));
        }
        let config = layers.remove(0);
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config["digest"], "size": config["size"]},
            "layers": layers,
        }))
        .unwrap();
        let d = sha256(&m);
        let mut q = String::new();
        for k in 0..tags_per_image {
            q.push_str(&format!(
                "{}tag=t{i}-{k}",
                if q.is_empty() { "?" } else { "&" }
            ));
        }
        send(
            &r,
            http::Method::PUT,
            &format!("/v2/{repo}/manifests/{d}{q}"),
            "application/vnd.oci.image.manifest.v1+json",
            m,
        )
        .await;
        manifests.push((repo, d));
    }
    println!(
        "populated {images} images, {} blobs, {} tags in {:.1} s",
        images * LAYERS_PER_IMAGE,
        images * tags_per_image,
        t.elapsed().as_secs_f64()
    );
    // Delete every other image (its tags go with it).
    let t = Instant::now();
    for (repo, d) in manifests.iter().step_by(2) {
        send(
            &r,
            http::Method::DELETE,
            &format!("/v2/{repo}/manifests/{d}"),
            "",
            Vec::new(),
        )
        .await;
    }
    println!(
        "deleted {} images by digest in {:.1} s",
        manifests.len().div_ceil(2),
        t.elapsed().as_secs_f64()
    );
    let survivors: Vec<String> = manifests
        .iter()
        .skip(1)
        .step_by(2)
        .map(|(repo, d)| format!("{repo}/manifests/{d}"))
        .collect();
    let conf = dir.path().join("gc.toml");
    std::fs::write(&conf, "grace_secs = 0\n").unwrap();
    let gc = |dry: bool| {
        let mut c = Command::new(dockside_bin());
        c.arg("gc")
            .arg("--data")
            .arg(&data)
            .arg("--gc-config")
            .arg(&conf)
            .arg("--no-fsync");
        if dry {
            c.arg("--dry-run");
        }
        c.stderr(Stdio::null());
        c
    };
    let before = du(&data);
    let (t, peak, out) = run_measured(&mut gc(true));
    println!(
        "dockside gc --dry-run: {:.2} s, peak RSS {} MiB, {}",
        t.as_secs_f64(),
        peak / 1024,
        out.lines().last().unwrap_or("")
    );

    // A server on the same directory, for latency with and without a collection running.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(dockside_bin())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--no-fsync",
            "--data",
        ])
        .arg(&data)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if reqwest::blocking::get(format!("{base}/v2/")).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (idle, _) = tokio::task::block_in_place(|| latencies(&base, &survivors, None));
    report("manifest GET latency, no collection", &idle);
    let mut collector = gc(false).stdout(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    let (during, peak) =
        tokio::task::block_in_place(|| latencies(&base, &survivors, Some(&mut collector)));
    let took = start.elapsed();
    report("manifest GET latency, while dockside gc runs", &during);
    let out = collector.wait_with_output().unwrap();
    println!(
        "dockside gc (beside the loaded server): {:.2} s, peak RSS {} MiB, {}",
        took.as_secs_f64(),
        peak / 1024,
        String::from_utf8_lossy(&out.stdout).trim()
    );
    server.kill().unwrap();
    server.wait().unwrap();
    let after = du(&data);
    println!(
        "storage: {before} bytes before, {after} after: {} reclaimed",
        before - after
    );
    // A second run on the collected registry, alone: time and peak memory of a full mark.
    let (t, peak, out) = run_measured(&mut gc(false));
    println!(
        "dockside gc (nothing left to collect, alone): {:.2} s, peak RSS {} MiB, {}",
        t.as_secs_f64(),
        peak / 1024,
        out.trim()
    );
    println!("load average at end: {}", loadavg());
}
