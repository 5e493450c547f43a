//! Pull-through mirror benchmark: dockside `--mirror-config` against distribution 2.8.2's
//! `proxy` mode (Debian's `docker-registry`), both in front of the same upstream (a plain
//! `dockside serve` on loopback), in one run. Each mirror gets a cold pull (nothing cached)
//! then a warm pull of the same image: the manifest by tag, then every blob, `PARALLEL` at a
//! time as clients do. Upstream requests are counted from the upstream's access log.
//!
//! ```text
//! cargo build --release && cargo run --release --example mirror-bench [LAYER_MIB] [LAYERS]
//! ```
//!
//! Defaults: 4 layers of 64 MiB. Needs `docker-registry` (`apt-get install docker-registry`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

const PARALLEL: usize = 3;

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_ready(base: &str) {
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(format!("{base}/v2/"))
        .send()
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(Instant::now() < deadline, "{base} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dockside(dir: &Path, name: &str, extra: &[&str]) -> (String, Guard) {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("dockside");
    assert!(
        bin.exists(),
        "build the server first: cargo build --release ({bin:?})"
    );
    let port = free_port();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(&bin)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(dir.join(format!("{name}-data")))
        .args(extra)
        .env("DOCKSIDE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start dockside");
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&base);
    (base, Guard(child))
}

fn distribution_proxy(dir: &Path, upstream: &str) -> (String, Guard) {
    let port = free_port();
    let config = dir.join("proxy.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\nproxy:\n  remoteurl: {upstream}\n",
            dir.join("proxy-data").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start docker-registry (apt-get install docker-registry)");
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&base);
    (base, Guard(child))
}

fn digest(b: &[u8]) -> String {
    let h = Sha256::digest(b);
    format!(
        "sha256:{}",
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn seed(
    http: &reqwest::blocking::Client,
    base: &str,
    layer_mib: usize,
    layers: usize,
) -> Vec<String> {
    let mut descs = Vec::new();
    let mut digests = Vec::new();
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15 ^ layer_mib as u64;
    for _ in 0..layers {
        let mut b = Vec::with_capacity(layer_mib << 20);
        while b.len() < layer_mib << 20 {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            b.extend_from_slice(&s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let d = digest(&b);
        let len = b.len();
        let r = http
            .post(format!("{base}/v2/library/bench/blobs/uploads/?digest={d}"))
            .body(b)
            .send()
            .unwrap();
        assert_eq!(r.status(), 201);
        descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": len}));
        digests.push(d);
    }
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let cd = digest(&config);
    let r = http
        .post(format!(
            "{base}/v2/library/bench/blobs/uploads/?digest={cd}"
        ))
        .body(config.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    digests.push(cd.clone());
    let m = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let r = http
        .put(format!("{base}/v2/library/bench/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(m)
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    digests
}

/// One pull: the manifest by tag, then every blob, `PARALLEL` at a time, each hashed and
/// checked. Returns the seconds it took.
fn pull(base: &str, blobs: &[String]) -> f64 {
    let start = Instant::now();
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let r = http
        .get(format!("{base}/v2/library/bench/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{base}");
    for chunk in blobs.chunks(PARALLEL) {
        std::thread::scope(|s| {
            for d in chunk {
                let http = http.clone();
                s.spawn(move || {
                    let mut r = http
                        .get(format!("{base}/v2/library/bench/blobs/{d}"))
                        .send()
                        .unwrap();
                    assert_eq!(r.status(), 200, "{base} {d}");
                    let mut h = Sha256::new();
                    std::io::copy(&mut r, &mut HashWriter(&mut h)).unwrap();
                    let got = format!(
                        "sha256:{}",
                        h.finalize()
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<String>()
                    );
                    assert_eq!(&got, d);
                });
            }
        });
    }
    start.elapsed().as_secs_f64()
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Upstream GETs of blobs and of manifests so far (access-log lines).
fn upstream_requests(dir: &Path) -> (usize, usize) {
    let log = std::fs::read_to_string(dir.join("upstream.log")).unwrap_or_default();
    let count = |what: &str| {
        log.lines()
            .filter(|l| l.contains("dockside::access") && l.contains(what))
            .count()
    };
    (
        count("GET /v2/library/bench/blobs/"),
        count(" /v2/library/bench/manifests/"),
    )
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let layer_mib = args.first().copied().unwrap_or(64);
    let layers = args.get(1).copied().unwrap_or(4);
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    let (up, _up) = dockside(dir.path(), "upstream", &[]);
    let blobs = seed(&http, &up, layer_mib, layers);
    let total_mib = layer_mib * layers;
    println!(
        "upstream: dockside on loopback; image: {layers} layers of {layer_mib} MiB + config; {PARALLEL} blobs at a time"
    );
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>14} {:>14}",
        "mirror", "cold s", "cold MB/s", "warm s", "upstream blob", "upstream mfst"
    );
    let mirror_toml = dir.path().join("mirror.toml");
    std::fs::write(&mirror_toml, format!("[[upstream]]\nurl = \"{up}\"\n")).unwrap();
    let run = |name: &str, base: &str| {
        let before = upstream_requests(dir.path());
        let cold = pull(base, &blobs);
        let warm = pull(base, &blobs);
        let after = upstream_requests(dir.path());
        println!(
            "{name:<24} {cold:>9.2} {:>9.0} {warm:>9.2} {:>14} {:>14}",
            total_mib as f64 * 1.048_576 / cold,
            after.0 - before.0,
            after.1 - before.1
        );
    };
    {
        let (base, _g) = dockside(
            dir.path(),
            "mirror",
            &["--mirror-config", mirror_toml.to_str().unwrap()],
        );
        run("dockside --mirror-config", &base);
    }
    {
        let (base, _g) = distribution_proxy(dir.path(), &up);
        run("distribution 2.8.2 proxy", &base);
    }
}
