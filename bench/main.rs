//! dockside's benchmark: the same client code against dockside and against CNCF distribution
//! (Debian's `docker-registry` 2.8.2), in one run, with the machine's own limits beside them.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example bench     # start dockside (with and without fsync) and distribution
//! cargo run --release --example bench -- --rounds 5 --size-mib 1024 --seconds 10
//! cargo run --release --example bench -- --url name=http://127.0.0.1:5000[,pid=1234] ...
//! cargo run --release --example bench -- --s3-only --rounds 3   # only the S3 section
//! ```
//!
//! Prints one line per figure (min / median / max over the rounds). Blobs are fresh random
//! bytes every round, so no registry can answer "already have it". Server CPU comes from
//! `/proc/<pid>/stat` and peak RSS from sampling `/proc/<pid>/status`, for the registries it
//! starts (or is given a pid for). Needs `docker-registry`, `hey`, `iperf3` and `openssl`
//! (`apt-get install docker-registry hey iperf3 openssl`).
//!
//! The S3 section (unless `--no-s3`) starts a single-node Garage (`DOCKSIDE_GARAGE`, else where
//! `.ci/garage` installs it) and measures, on it: a monolithic push and a pull through dockside
//! (`--blobs s3://`, `--blob-redirect`: the pull follows a 307 to Garage), the same through
//! distribution's `s3` storage driver (its redirects on, as by default), and Garage's own rate
//! for the same bytes (one signed PUT and GET of the object, no registry), with Garage's CPU
//! beside each so the figures say what bounds them.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

const MIB: u64 = 1024 * 1024;

struct Opts {
    rounds: usize,
    size_mib: u64,
    chunk_mib: u64,
    seconds: u64,
    connections: usize,
    urls: Vec<(String, String, Option<u32>)>,
    /// Which sections run: `push` (pushes, pulls, ranges), `small`, `s3`, `machine`, `scale`.
    sections: Vec<String>,
    /// Which of the registries the bench starts are measured (`dockside`, `dockside-nofs`,
    /// `distribution`); empty: all.
    targets: Vec<String>,
    /// Other dockside binaries to start and measure beside (name, path): A/B in one run.
    builds: Vec<(String, String)>,
}

impl Opts {
    fn section(&self, name: &str) -> bool {
        self.sections.iter().any(|s| s == name)
    }
    fn target(&self, name: &str) -> bool {
        self.targets.is_empty() || self.targets.iter().any(|t| t == name)
    }
}

/// The sections run when `--sections` is not given (`scale` takes long: only on request).
const DEFAULT_SECTIONS: &[&str] = &["machine", "push", "small", "s3"];

fn parse_opts() -> Opts {
    let mut o = Opts {
        rounds: 3,
        size_mib: 1024,
        chunk_mib: 16,
        seconds: 10,
        connections: 16,
        urls: Vec::new(),
        sections: DEFAULT_SECTIONS.iter().map(|s| s.to_string()).collect(),
        targets: Vec::new(),
        builds: Vec::new(),
    };
    let list = |v: String| v.split(',').map(str::to_owned).collect::<Vec<_>>();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--rounds" => o.rounds = val().parse().unwrap_or_else(|_| usage("--rounds N")),
            "--size-mib" => o.size_mib = val().parse().unwrap_or_else(|_| usage("--size-mib N")),
            "--chunk-mib" => o.chunk_mib = val().parse().unwrap_or_else(|_| usage("--chunk-mib N")),
            "--seconds" => o.seconds = val().parse().unwrap_or_else(|_| usage("--seconds N")),
            "--connections" => {
                o.connections = val().parse().unwrap_or_else(|_| usage("--connections N"))
            }
            "--url" => {
                // name=URL[,pid=N]
                let v = val();
                let (name, rest) = v.split_once('=').unwrap_or_else(|| usage("--url name=URL"));
                let (url, pid) = match rest.split_once(",pid=") {
                    Some((u, p)) => (u, Some(p.parse().unwrap_or_else(|_| usage("pid=N")))),
                    None => (rest, None),
                };
                o.urls
                    .push((name.to_owned(), url.trim_end_matches('/').to_owned(), pid));
            }
            "--no-s3" => o.sections.retain(|s| s != "s3"),
            "--s3-only" => o.sections = vec!["s3".into()],
            "--sections" => o.sections = list(val()),
            "--targets" => o.targets = list(val()),
            "--build" => {
                // name=PATH: another dockside binary (an older commit's), measured beside.
                let v = val();
                let (name, path) = v
                    .split_once('=')
                    .unwrap_or_else(|| usage("--build name=PATH"));
                o.builds.push((name.to_owned(), path.to_owned()));
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    o
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("bench: {msg}");
    }
    eprintln!(
        "usage: cargo run --release --example bench -- [--rounds N] [--size-mib N] [--chunk-mib N] \
         [--seconds N] [--connections N] [--url name=http://host:port[,pid=N]]... \
         [--no-s3 | --s3-only] [--sections machine,push,small,s3,scale] \
         [--targets dockside,dockside-nofs,distribution] [--build name=PATH]...\n\
         Sections: machine (SHA-256, loopback, dd conv=fsync rates), push (1 GiB pushes, \
         pulls, ranges), small (small requests under load), s3 (on Garage), scale (many tags \
         and repositories; sizes from DOCKSIDE_BENCH_TAGS, DOCKSIDE_BENCH_REPOS)."
    );
    std::process::exit(2)
}

/// A registry under test.
struct Target {
    name: String,
    base: String,
    pid: Option<u32>,
    _child: Option<ChildGuard>,
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
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

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server on {port} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_dockside(dir: &std::path::Path, name: &str, extra: &[&str]) -> Target {
    start_dockside_env(dir, name, extra, &[])
}

fn start_dockside_env(
    dir: &std::path::Path,
    name: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Target {
    let exe = std::env::current_exe().unwrap();
    // target/release/examples/bench -> target/release/dockside
    let bin = exe.parent().unwrap().parent().unwrap().join("dockside");
    start_dockside_bin(dir, name, &bin, extra, env)
}

fn start_dockside_bin(
    dir: &std::path::Path,
    name: &str,
    bin: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Target {
    assert!(
        bin.exists(),
        "build the server first: cargo build --release ({bin:?})"
    );
    let port = free_port();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(bin)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(dir.join(format!("{name}-data")))
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start dockside");
    wait_listening(port);
    Target {
        name: name.into(),
        base: format!("http://127.0.0.1:{port}"),
        pid: Some(child.id()),
        _child: Some(ChildGuard(child)),
    }
}

fn start_distribution(dir: &std::path::Path, name: &str) -> Target {
    let port = free_port();
    let config = dir.join(format!("{name}.yml"));
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.join(format!("{name}-data")).display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start docker-registry (apt-get install docker-registry)");
    wait_listening(port);
    Target {
        name: name.into(),
        base: format!("http://127.0.0.1:{port}"),
        pid: Some(child.id()),
        _child: Some(ChildGuard(child)),
    }
}

/// A single-node Garage of the bench's own, with one bucket and one key.
struct Garage {
    endpoint: String,
    bucket: String,
    access_key: String,
    secret_key: String,
    pid: Option<u32>,
    _child: ChildGuard,
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).unwrap();
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn start_garage(dir: &std::path::Path) -> Garage {
    let bin = std::env::var("DOCKSIDE_GARAGE").unwrap_or_else(|_| {
        format!(
            "{}/.cache/dockside-ci/garage-2.5.0/bin/garage",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into())
        )
    });
    assert!(
        std::path::Path::new(&bin).exists(),
        "no Garage at {bin}: `bash .ci/garage` installs it (or set DOCKSIDE_GARAGE, or pass --no-s3)"
    );
    let gdir = dir.join("garage");
    std::fs::create_dir_all(&gdir).unwrap();
    let (rpc, s3, admin) = (free_port(), free_port(), free_port());
    let config = gdir.join("garage.toml");
    std::fs::write(
        &config,
        format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
             replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
             root_domain = \".s3.garage.localhost\"\n\n[admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
            d = gdir.display(),
            secret = random_hex(32),
        ),
    )
    .unwrap();
    let access_key = format!("GK{}", random_hex(12));
    let secret_key = random_hex(32);
    let bucket = "bench".to_owned();
    let log = std::fs::File::create(gdir.join("log")).unwrap();
    let child = Command::new(&bin)
        .arg("-c")
        .arg(&config)
        .args(["server", "--single-node", "--default-bucket"])
        .env("GARAGE_DEFAULT_ACCESS_KEY", &access_key)
        .env("GARAGE_DEFAULT_SECRET_KEY", &secret_key)
        .env("GARAGE_DEFAULT_BUCKET", &bucket)
        // Request lines at info cost Garage time; the bench wants its rate, not its log.
        .env("RUST_LOG", "garage=warn,netapp=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start Garage");
    let pid = Some(child.id());
    let guard = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let healthy = || {
        use std::io::{BufRead, Write};
        let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", admin)) else {
            return false;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
        if c.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut line = String::new();
        std::io::BufReader::new(c).read_line(&mut line).is_ok() && line.contains(" 200 ")
    };
    while !(healthy() && std::net::TcpStream::connect(("127.0.0.1", s3)).is_ok()) {
        assert!(Instant::now() < deadline, "Garage did not become healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
    Garage {
        endpoint: format!("http://127.0.0.1:{s3}"),
        bucket,
        access_key,
        secret_key,
        pid,
        _child: guard,
    }
}

/// distribution with its `s3` storage driver on `g`, under its own root directory. Its
/// redirects stay on (the default): a blob GET is a 307 to a presigned URL, as dockside's with
/// `--blob-redirect`.
fn start_distribution_s3(dir: &std::path::Path, g: &Garage) -> Target {
    let port = free_port();
    let config = dir.join("distribution-s3.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nstorage:\n  s3:\n    accesskey: {}\n    secretkey: {}\n    region: garage\n\
             \x20   regionendpoint: {}\n    forcepathstyle: true\n    bucket: {}\n\
             \x20   rootdirectory: /distribution\n    secure: false\n    v4auth: true\n\
             \x20 delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            g.access_key, g.secret_key, g.endpoint, g.bucket
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("distribution-s3.log")).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        // With AWS_CA_BUNDLE set (some machines set it for every tool), distribution 2.8.2
        // panics at start ("unable to load custom CA bundle, HTTPClient's transport
        // unsupported type"); the endpoint here is plain http anyway.
        .env_remove("AWS_CA_BUNDLE")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start docker-registry (apt-get install docker-registry)");
    wait_listening(port);
    Target {
        name: "distrib-s3".into(),
        base: format!("http://127.0.0.1:{port}"),
        pid: Some(child.id()),
        _child: Some(ChildGuard(child)),
    }
}

fn clock_ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of a process (and its threads).
fn cpu_secs(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return f64::NAN };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / clock_ticks()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples a process's RSS every 5 ms until stopped; yields the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: Option<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = pid.map(|pid| {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        });
        RssSampler { stop, peak, thread }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// Deterministic pseudo-random blob content, generated in 1 MiB pieces (never held whole).
#[derive(Clone, Copy)]
struct Gen {
    seed: u64,
    size: u64,
}

impl Gen {
    fn piece(&self, i: u64) -> Bytes {
        let len = (self.size - i * MIB).min(MIB) as usize;
        let mut x = self.seed ^ (i.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.truncate(len);
        Bytes::from(v)
    }

    fn pieces(&self) -> u64 {
        self.size.div_ceil(MIB)
    }

    fn digest(&self) -> String {
        let mut h = Sha256::new();
        for i in 0..self.pieces() {
            h.update(self.piece(i));
        }
        format!(
            "sha256:{}",
            h.finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    }

    /// Bytes `[from, to)` as a streaming request body.
    fn body(self, from: u64, to: u64) -> reqwest::Body {
        let stream = futures_util::stream::iter((from / MIB)..to.div_ceil(MIB)).map(move |i| {
            let p = self.piece(i);
            let start = i * MIB;
            let a = from.saturating_sub(start) as usize;
            let b = ((to - start).min(p.len() as u64)) as usize;
            Ok::<_, std::io::Error>(p.slice(a..b))
        });
        reqwest::Body::wrap_stream(stream)
    }
}

use futures_util::StreamExt;

mod scale;

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b)
}

fn resolve(base: &str, location: &str) -> String {
    if location.starts_with("http") {
        location.to_owned()
    } else {
        format!("{base}{location}")
    }
}

/// A measured figure: one value per round.
struct Figure {
    values: Vec<f64>,
}

impl Figure {
    fn new() -> Self {
        Figure { values: Vec::new() }
    }
    fn stats(&self) -> (f64, f64, f64) {
        let mut v = self.values.clone();
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (v[0], v[v.len() / 2], v[v.len() - 1])
    }
}

fn line(target: &str, what: &str, f: &Figure, unit: &str) {
    let (min, med, max) = f.stats();
    println!("{target:<13} {what:<38} {min:>10.3} {med:>10.3} {max:>10.3}  {unit}");
}

struct Results {
    name: String,
    push_mono: Figure,
    push_mono_cpu: Figure,
    push_mono_rss: Figure,
    push_chunked: Figure,
    push_chunked_cpu: Figure,
    pull: Figure,
    pull_cpu: Figure,
    range_ms: Figure,
    small: Vec<(String, Figure, Figure, Figure, Figure)>,
}

async fn push_monolithic(c: &reqwest::Client, t: &Target, repo: &str, g: Gen, digest: &str) {
    let r = c
        .post(format!("{}/v2/{repo}/blobs/uploads/", t.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}: POST upload", t.name);
    let loc = resolve(&t.base, r.headers()["location"].to_str().unwrap());
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{loc}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .header("content-length", g.size)
        .body(g.body(0, g.size))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}: PUT blob", t.name);
}

async fn push_chunked(
    c: &reqwest::Client,
    t: &Target,
    repo: &str,
    g: Gen,
    digest: &str,
    chunk: u64,
) {
    let r = c
        .post(format!("{}/v2/{repo}/blobs/uploads/", t.base))
        .header("content-length", 0)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}: POST upload", t.name);
    let mut loc = resolve(&t.base, r.headers()["location"].to_str().unwrap());
    let mut off = 0;
    while off < g.size {
        let end = (off + chunk).min(g.size);
        let r = c
            .patch(&loc)
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{off}-{}", end - 1))
            .header("content-length", end - off)
            .body(g.body(off, end))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}: PATCH", t.name);
        loc = resolve(&t.base, r.headers()["location"].to_str().unwrap());
        off = end;
    }
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{loc}{sep}digest={digest}"))
        .header("content-length", 0)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}: closing PUT", t.name);
}

async fn pull(c: &reqwest::Client, t: &Target, repo: &str, digest: &str, size: u64) {
    let r = c
        .get(format!("{}/v2/{repo}/blobs/{digest}", t.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}: GET blob", t.name);
    let mut s = r.bytes_stream();
    let mut n = 0u64;
    while let Some(b) = s.next().await {
        n += b.unwrap().len() as u64;
    }
    assert_eq!(n, size, "{}: pulled length", t.name);
}

/// Pushes a tiny image tagged `latest` in `repo`; returns the URLs the small-request load uses.
async fn small_setup(
    c: &reqwest::Client,
    t: &Target,
    repo: &str,
) -> Vec<(String, &'static str, String)> {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = b"a small layer";
    let mut digests = Vec::new();
    for data in [&config[..], &layer[..]] {
        let g = format!(
            "sha256:{}",
            Sha256::digest(data)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let r = c
            .post(format!("{}/v2/{repo}/blobs/uploads/", t.base))
            .send()
            .await
            .unwrap();
        let loc = resolve(&t.base, r.headers()["location"].to_str().unwrap());
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = c
            .put(format!("{loc}{sep}digest={g}"))
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        digests.push(g);
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digests[0], "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digests[1], "size": layer.len()}],
    });
    let r = c
        .put(format!("{}/v2/{repo}/manifests/latest", t.base))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&manifest).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}: manifest PUT", t.name);
    vec![
        (
            "manifest GET by tag".into(),
            "GET",
            format!("{}/v2/{repo}/manifests/latest", t.base),
        ),
        (
            "manifest HEAD by tag".into(),
            "HEAD",
            format!("{}/v2/{repo}/manifests/latest", t.base),
        ),
        (
            "blob HEAD".into(),
            "HEAD",
            format!("{}/v2/{repo}/blobs/{}", t.base, digests[1]),
        ),
        (
            "tags list".into(),
            "GET",
            format!("{}/v2/{repo}/tags/list", t.base),
        ),
    ]
}

/// Runs `hey` for `seconds` with `conns` connections; returns (requests/s, p50 ms, p99 ms,
/// total requests).
fn hey(method: &str, url: &str, seconds: u64, conns: usize) -> (f64, f64, f64, f64) {
    let out = Command::new("hey")
        .args([
            "-z",
            &format!("{seconds}s"),
            "-c",
            &conns.to_string(),
            "-m",
            method,
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            url,
        ])
        .output()
        .expect("run hey (apt-get install hey)");
    let text = String::from_utf8_lossy(&out.stdout);
    let num = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let rps = num("Requests/sec:");
    let p50 = num("50% in") * 1000.0;
    let p99 = num("99% in") * 1000.0;
    let ok: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("[200]"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    if !text.contains("[200]") {
        eprintln!("hey {method} {url}: no 200 answers:\n{text}");
    }
    (rps, p50, p99, ok)
}

impl Results {
    fn new(name: &str) -> Self {
        Results {
            name: name.into(),
            push_mono: Figure::new(),
            push_mono_cpu: Figure::new(),
            push_mono_rss: Figure::new(),
            push_chunked: Figure::new(),
            push_chunked_cpu: Figure::new(),
            pull: Figure::new(),
            pull_cpu: Figure::new(),
            range_ms: Figure::new(),
            small: Vec::new(),
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(4)
        .build()
        .unwrap()
}

/// Writes every dirty page of the machine to its disk (`sync`) before a timed push. distribution
/// does not fsync what it stores, so the kernel wrote its last 1 GiB back during whatever ran
/// next: a dockside push right after it measured 1.5-2.5x slower than one after its own round
/// (4.4 CPU-s per GiB instead of 1.7). Each push now starts on a disk with nothing pending.
fn settle_disk() {
    let _ = Command::new("sync").status();
}

/// One round of the push section on `t`: a monolithic push, its pull and range GETs, a chunked
/// push. Rounds of the registries alternate, so load from elsewhere spreads over all of them.
async fn measure_round(t: &Target, o: &Opts, round: usize, r: &mut Results) {
    let c = client();
    let size = o.size_mib * MIB;
    let gib = size as f64 / (1024.0 * MIB as f64);
    let mb = size as f64 / 1e6;
    let repo = format!("bench/r{round}");
    // Monolithic.
    let g = Gen {
        seed: random_seed(),
        size,
    };
    let d = g.digest();
    settle_disk();
    let idle = t.pid.map_or(0, rss_kib);
    let sampler = RssSampler::start(t.pid);
    let cpu0 = cpu_secs(t.pid);
    let t0 = Instant::now();
    push_monolithic(&c, t, &repo, g, &d).await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(t.pid) - cpu0;
    let peak = sampler.finish();
    r.push_mono.values.push(mb / secs);
    r.push_mono_cpu.values.push(cpu / gib);
    r.push_mono_rss.values.push(if t.pid.is_some() {
        peak.saturating_sub(idle) as f64 / 1024.0
    } else {
        f64::NAN
    });
    // Pull it.
    let cpu0 = cpu_secs(t.pid);
    let t0 = Instant::now();
    pull(&c, t, &repo, &d, size).await;
    let secs = t0.elapsed().as_secs_f64();
    r.pull.values.push(mb / secs);
    r.pull_cpu.values.push((cpu_secs(t.pid) - cpu0) / gib);
    // A 1 MiB range from the middle.
    let mut lat = Vec::new();
    for _ in 0..20 {
        let from = size / 2;
        let t0 = Instant::now();
        let resp = c
            .get(format!("{}/v2/{repo}/blobs/{d}", t.base))
            .header("range", format!("bytes={from}-{}", from + MIB - 1))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 206, "{}: range GET", t.name);
        assert_eq!(resp.bytes().await.unwrap().len() as u64, MIB);
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    r.range_ms.values.push(lat[lat.len() / 2]);
    // Chunked.
    let g = Gen {
        seed: random_seed(),
        size,
    };
    let d = g.digest();
    settle_disk();
    let cpu0 = cpu_secs(t.pid);
    let t0 = Instant::now();
    push_chunked(&c, t, &repo, g, &d, o.chunk_mib * MIB).await;
    let secs = t0.elapsed().as_secs_f64();
    r.push_chunked.values.push(mb / secs);
    r.push_chunked_cpu
        .values
        .push((cpu_secs(t.pid) - cpu0) / gib);
    eprintln!("  {} round {} done", t.name, round + 1);
}

/// The small-request section on `t`.
async fn measure_small(t: &Target, o: &Opts, r: &mut Results) {
    let c = client();
    let urls = small_setup(&c, t, "bench/small").await;
    for (what, method, url) in urls {
        let (mut rps, mut p50, mut p99, mut cpu_us) =
            (Figure::new(), Figure::new(), Figure::new(), Figure::new());
        for _ in 0..o.rounds {
            let cpu0 = cpu_secs(t.pid);
            let (x, a, b, n) = hey(method, &url, o.seconds, o.connections);
            let cpu = cpu_secs(t.pid) - cpu0;
            rps.values.push(x);
            p50.values.push(a);
            p99.values.push(b);
            cpu_us.values.push(cpu / n * 1e6);
        }
        r.small.push((what, rps, p50, p99, cpu_us));
    }
}

/// The S3 section's figures for one registry (or Garage alone).
struct S3Results {
    name: String,
    push: Figure,
    push_cpu: Figure,
    push_rss: Figure,
    push_garage_cpu: Figure,
    pull: Figure,
    pull_cpu: Figure,
    pull_garage_cpu: Figure,
}

impl S3Results {
    fn new(name: &str) -> Self {
        S3Results {
            name: name.into(),
            push: Figure::new(),
            push_cpu: Figure::new(),
            push_rss: Figure::new(),
            push_garage_cpu: Figure::new(),
            pull: Figure::new(),
            pull_cpu: Figure::new(),
            pull_garage_cpu: Figure::new(),
        }
    }

    fn print(&self) {
        let n = &self.name;
        // Garage alone has no registry: its registry lines would be empty.
        let registry = self.push_cpu.values.iter().any(|v| v.is_finite());
        let (push, pull) = if registry {
            ("push monolithic to S3", "pull from S3 (following the 307)")
        } else {
            (
                "one signed PUT of the object",
                "one signed GET of the object",
            )
        };
        line(n, push, &self.push, "MB/s");
        if registry {
            line(n, "  server CPU", &self.push_cpu, "CPU-s/GiB");
            line(n, "  server peak RSS over idle", &self.push_rss, "MiB");
        }
        line(n, "  Garage CPU", &self.push_garage_cpu, "CPU-s/GiB");
        line(n, pull, &self.pull, "MB/s");
        if registry {
            line(n, "  server CPU", &self.pull_cpu, "CPU-s/GiB");
        }
        line(n, "  Garage CPU", &self.pull_garage_cpu, "CPU-s/GiB");
    }
}

/// A registry on Garage: monolithic pushes and redirected pulls of fresh blobs.
async fn measure_s3(t: &Target, g: &Garage, o: &Opts) -> S3Results {
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    // The pull must be a redirect: checked once with a client that does not follow.
    let no_follow = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let size = o.size_mib * MIB;
    let gib = size as f64 / (1024.0 * MIB as f64);
    let mb = size as f64 / 1e6;
    let mut r = S3Results::new(&t.name);
    for round in 0..o.rounds {
        let repo = format!("bench/s3r{round}");
        let gen_ = Gen {
            seed: random_seed(),
            size,
        };
        let d = gen_.digest();
        let idle = t.pid.map_or(0, rss_kib);
        let sampler = RssSampler::start(t.pid);
        let (cpu0, gcpu0) = (cpu_secs(t.pid), cpu_secs(g.pid));
        let t0 = Instant::now();
        push_monolithic(&c, t, &repo, gen_, &d).await;
        let secs = t0.elapsed().as_secs_f64();
        r.push_cpu.values.push((cpu_secs(t.pid) - cpu0) / gib);
        r.push_garage_cpu
            .values
            .push((cpu_secs(g.pid) - gcpu0) / gib);
        let peak = sampler.finish();
        r.push.values.push(mb / secs);
        r.push_rss.values.push(if t.pid.is_some() {
            peak.saturating_sub(idle) as f64 / 1024.0
        } else {
            f64::NAN
        });
        if round == 0 {
            let resp = no_follow
                .get(format!("{}/v2/{repo}/blobs/{d}", t.base))
                .send()
                .await
                .unwrap();
            assert_eq!(
                resp.status(),
                307,
                "{}: a blob GET is not a redirect",
                t.name
            );
        }
        let (cpu0, gcpu0) = (cpu_secs(t.pid), cpu_secs(g.pid));
        let t0 = Instant::now();
        pull(&c, t, &repo, &d, size).await;
        let secs = t0.elapsed().as_secs_f64();
        r.pull.values.push(mb / secs);
        r.pull_cpu.values.push((cpu_secs(t.pid) - cpu0) / gib);
        r.pull_garage_cpu
            .values
            .push((cpu_secs(g.pid) - gcpu0) / gib);
        eprintln!("  {} S3 round {} done", t.name, round + 1);
    }
    r
}

/// Garage alone: one presigned PUT of the whole object (streamed, like the registries' pushes
/// receive it) and one GET, with Garage's CPU: the rate the registries' S3 figures are bounded by.
async fn measure_garage(g: &Garage, o: &Opts) -> S3Results {
    use rusty_s3::S3Action as _;
    let bucket = rusty_s3::Bucket::new(
        g.endpoint.parse().unwrap(),
        rusty_s3::UrlStyle::Path,
        g.bucket.clone(),
        "garage".to_owned(),
    )
    .unwrap();
    let creds = rusty_s3::Credentials::new(&g.access_key, &g.secret_key);
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let size = o.size_mib * MIB;
    let gib = size as f64 / (1024.0 * MIB as f64);
    let mb = size as f64 / 1e6;
    let mut r = S3Results::new("garage alone");
    for round in 0..o.rounds {
        let key = format!("direct/r{round}");
        let gen_ = Gen {
            seed: random_seed(),
            size,
        };
        let url = rusty_s3::actions::PutObject::new(&bucket, Some(&creds), &key)
            .sign(Duration::from_secs(3600));
        let gcpu0 = cpu_secs(g.pid);
        let t0 = Instant::now();
        let resp = c
            .put(url.as_str())
            .header("content-length", size)
            .body(gen_.body(0, size))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "Garage PUT: {}", resp.status());
        r.push.values.push(mb / t0.elapsed().as_secs_f64());
        r.push_garage_cpu
            .values
            .push((cpu_secs(g.pid) - gcpu0) / gib);
        let url = rusty_s3::actions::GetObject::new(&bucket, Some(&creds), &key)
            .sign(Duration::from_secs(3600));
        let gcpu0 = cpu_secs(g.pid);
        let t0 = Instant::now();
        let resp = c.get(url.as_str()).send().await.unwrap();
        assert_eq!(resp.status(), 200, "Garage GET");
        let mut s = resp.bytes_stream();
        let mut n = 0u64;
        while let Some(b) = s.next().await {
            n += b.unwrap().len() as u64;
        }
        assert_eq!(n, size, "Garage GET length");
        r.pull.values.push(mb / t0.elapsed().as_secs_f64());
        r.pull_garage_cpu
            .values
            .push((cpu_secs(g.pid) - gcpu0) / gib);
    }
    r
}

/// The S3 section: Garage alone, then dockside and distribution on it.
async fn s3_section(dir: &std::path::Path, o: &Opts) {
    let g = start_garage(dir);
    println!(
        "\n# S3: {} MiB blobs on a single-node Garage 2.5.0 (same machine), pulls follow a 307 to Garage",
        o.size_mib
    );
    let url = format!(
        "s3://{}/dockside?endpoint={}&region=garage",
        g.bucket, g.endpoint
    );
    let garage = measure_garage(&g, o).await;
    garage.print();
    let d = start_dockside_env(
        dir,
        "dockside-s3",
        &["--blobs", &url, "--blob-redirect", "600"],
        &[
            ("DOCKSIDE_S3_ACCESS_KEY", &g.access_key),
            ("DOCKSIDE_S3_SECRET_KEY", &g.secret_key),
        ],
    );
    let ds = measure_s3(&d, &g, o).await;
    ds.print();
    drop(d);
    let dist = start_distribution_s3(dir, &g);
    let di = measure_s3(&dist, &g, o).await;
    di.print();
    println!();
    let names = ("dockside-s3", "distrib-s3");
    ratio("S3 push MB/s", &ds.push, &di.push, true, names);
    ratio("S3 push CPU/GiB", &ds.push_cpu, &di.push_cpu, false, names);
    ratio("S3 pull MB/s", &ds.pull, &di.pull, true, names);
    let (_, gp, _) = garage.push.stats();
    let (_, dp, _) = ds.push.stats();
    println!(
        "bound         dockside-s3 push / Garage's own PUT rate  {:>10.2}x",
        dp / gp
    );
}

/// The machine's own rates, measured in the same run as the registries (a round of them
/// before each round of the registries): what a push or a pull could reach at best.
struct Machine {
    sha_openssl: Figure,
    sha_inproc: Figure,
    loopback: Figure,
    dd_fsync: Figure,
}

impl Machine {
    fn new() -> Self {
        Machine {
            sha_openssl: Figure::new(),
            sha_inproc: Figure::new(),
            loopback: Figure::new(),
            dd_fsync: Figure::new(),
        }
    }

    fn print(&self, o: &Opts) {
        let m = "machine";
        line(
            m,
            "openssl speed sha256 (16 KiB blocks)",
            &self.sha_openssl,
            "MB/s",
        );
        line(
            m,
            "SHA-256 in process (sha2, 1 MiB)",
            &self.sha_inproc,
            "MB/s",
        );
        line(m, "loopback TCP (iperf3, 1 stream)", &self.loopback, "MB/s");
        line(
            m,
            &format!("dd {} MiB conv=fsync (same disk)", o.size_mib),
            &self.dd_fsync,
            "MB/s",
        );
    }
}

/// One round of the machine's rates.
fn machine_round(dir: &std::path::Path, o: &Opts, m: &mut Machine) {
    // SHA-256 throughput, 16 KiB blocks.
    if let Ok(out) = Command::new("openssl")
        .args(["speed", "-evp", "sha256", "-seconds", "2"])
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(l) = text.lines().rev().find(|l| l.starts_with("sha256")) {
            let v: f64 = l
                .split_whitespace()
                .last()
                .and_then(|v| v.trim_end_matches('k').parse().ok())
                .unwrap_or(f64::NAN);
            m.sha_openssl.values.push(v * 1000.0 / 1e6);
        }
    }
    // The same hash the server runs (sha2), over 1 MiB buffers: 512 MiB.
    let buf = Gen {
        seed: random_seed(),
        size: MIB,
    }
    .piece(0);
    let t0 = Instant::now();
    let mut h = Sha256::new();
    for _ in 0..512 {
        h.update(&buf);
    }
    std::hint::black_box(h.finalize());
    m.sha_inproc
        .values
        .push(512.0 * MIB as f64 / 1e6 / t0.elapsed().as_secs_f64());
    // Loopback TCP.
    let port = free_port();
    if let Ok(server) = Command::new("iperf3")
        .args(["-s", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        let _guard = ChildGuard(server);
        // Not wait_listening: a probe connection would upset iperf3's first test.
        std::thread::sleep(Duration::from_millis(500));
        if let Ok(out) = Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-t", "3", "-J"])
            .output()
        {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let bps = v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(f64::NAN);
            m.loopback.values.push(bps / 8e6);
        }
    }
    // The push's size written and fsynced, as a push with fsync must (timed here, not by dd,
    // so that the figure includes the fsync whatever dd prints).
    let file = dir.join("dd.bin");
    let t0 = Instant::now();
    let ok = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=1M", &format!("count={}", o.size_mib), "conv=fsync"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        m.dd_fsync
            .values
            .push((o.size_mib * MIB) as f64 / 1e6 / t0.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_file(&file);
}

fn ratio(what: &str, a: &Figure, b: &Figure, higher_is_better: bool, names: (&str, &str)) {
    let (_, ma, _) = a.stats();
    let (_, mb, _) = b.stats();
    let r = if higher_is_better { ma / mb } else { mb / ma };
    println!(
        "ratio         {what:<38} {r:>10.2}x  ({} vs {}, medians; >1 means {} is better)",
        names.0, names.1, names.0
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let o = parse_opts();
    let dir = tempfile::tempdir_in(std::env::current_dir().unwrap().join("target")).unwrap();
    let local = o.section("push") || o.section("small");
    let targets: Vec<Target> = if !local {
        Vec::new()
    } else if o.urls.is_empty() {
        let mut t = Vec::new();
        if o.target("dockside") {
            t.push(start_dockside(dir.path(), "dockside", &[]));
        }
        for (name, bin) in &o.builds {
            t.push(start_dockside_bin(
                dir.path(),
                name,
                std::path::Path::new(bin),
                &[],
                &[],
            ));
        }
        if o.target("dockside-nofs") {
            t.push(start_dockside(dir.path(), "dockside-nofs", &["--no-fsync"]));
        }
        if o.target("distribution") {
            t.push(start_distribution(dir.path(), "distribution"));
        }
        t
    } else {
        o.urls
            .iter()
            .map(|(n, u, p)| Target {
                name: n.clone(),
                base: u.clone(),
                pid: *p,
                _child: None,
            })
            .collect()
    };
    println!(
        "# dockside bench: {} rounds, {} MiB blobs, {} MiB chunks, {} connections x {} s for small requests",
        o.rounds, o.size_mib, o.chunk_mib, o.connections, o.seconds
    );
    println!(
        "{:<13} {:<38} {:>10} {:>10} {:>10}  unit",
        "registry", "figure", "min", "median", "max"
    );
    let mut machine = Machine::new();
    let mut all: Vec<Results> = targets.iter().map(|t| Results::new(&t.name)).collect();
    // Rounds alternate: the machine's rates, then each registry, then again.
    for round in 0..o.rounds {
        if o.section("machine") {
            machine_round(dir.path(), &o, &mut machine);
        }
        if o.section("push") {
            for (t, r) in targets.iter().zip(&mut all) {
                measure_round(t, &o, round, r).await;
            }
        }
    }
    if o.section("small") {
        for (t, r) in targets.iter().zip(&mut all) {
            measure_small(t, &o, r).await;
        }
    }
    if o.section("machine") {
        println!("\n# the machine (same run, a round before each round of the registries)");
        machine.print(&o);
    }
    for r in &all {
        if o.section("push") {
            println!();
            line(&r.name, "push monolithic (POST+PUT)", &r.push_mono, "MB/s");
            line(
                &r.name,
                "push monolithic server CPU",
                &r.push_mono_cpu,
                "CPU-s/GiB",
            );
            line(
                &r.name,
                "push monolithic peak RSS over idle",
                &r.push_mono_rss,
                "MiB",
            );
            line(
                &r.name,
                &format!("push chunked ({} MiB PATCHes)", o.chunk_mib),
                &r.push_chunked,
                "MB/s",
            );
            line(
                &r.name,
                "push chunked server CPU",
                &r.push_chunked_cpu,
                "CPU-s/GiB",
            );
            line(&r.name, "pull", &r.pull, "MB/s");
            line(&r.name, "pull server CPU", &r.pull_cpu, "CPU-s/GiB");
            line(
                &r.name,
                "1 MiB range GET from the middle",
                &r.range_ms,
                "ms (median of 20)",
            );
        }
        for (what, rps, p50, p99, cpu) in &r.small {
            line(&r.name, &format!("{what}: throughput"), rps, "req/s");
            line(&r.name, &format!("{what}: p50"), p50, "ms");
            line(&r.name, &format!("{what}: p99"), p99, "ms");
            line(&r.name, &format!("{what}: server CPU"), cpu, "us/req");
        }
    }
    // Every registry against the last one (distribution, when the bench starts them).
    let others: &[Results] = all.split_last().map_or(&[], |(_, o)| o);
    for a in others {
        let b = all.last().expect("a last registry");
        let names = (a.name.as_str(), b.name.as_str());
        println!();
        if o.section("push") {
            ratio(
                "push monolithic MB/s",
                &a.push_mono,
                &b.push_mono,
                true,
                names,
            );
            ratio(
                "push monolithic CPU/GiB",
                &a.push_mono_cpu,
                &b.push_mono_cpu,
                false,
                names,
            );
            ratio(
                "push chunked MB/s",
                &a.push_chunked,
                &b.push_chunked,
                true,
                names,
            );
            ratio("pull MB/s", &a.pull, &b.pull, true, names);
            ratio("pull CPU/GiB", &a.pull_cpu, &b.pull_cpu, false, names);
            ratio(
                "1 MiB range GET latency",
                &a.range_ms,
                &b.range_ms,
                false,
                names,
            );
        }
        for ((what, ra, _, _, ca), (_, rb, _, _, cb)) in a.small.iter().zip(&b.small) {
            ratio(&format!("{what} req/s"), ra, rb, true, names);
            ratio(&format!("{what} CPU/req"), ca, cb, false, names);
        }
    }
    // Each registry's pushes against the machine's bounds of the same run.
    if o.section("machine") && o.section("push") {
        println!();
        let (_, dd, _) = machine.dd_fsync.stats();
        let (_, sha, _) = machine.sha_inproc.stats();
        for r in &all {
            let (_, mono, _) = r.push_mono.stats();
            let (_, chunked, _) = r.push_chunked.stats();
            println!(
                "bound         {:<38} {:>10.2}x {:>10.2}x  of dd conv=fsync, of SHA-256 (medians)",
                format!("{} push monolithic", r.name),
                mono / dd,
                mono / sha
            );
            println!(
                "bound         {:<38} {:>10.2}x {:>10.2}x  of dd conv=fsync, of SHA-256 (medians)",
                format!("{} push chunked", r.name),
                chunked / dd,
                chunked / sha
            );
        }
    }
    if o.section("s3") && o.urls.is_empty() {
        s3_section(dir.path(), &o).await;
    }
    if o.section("scale") {
        scale::section(dir.path(), &o).await;
    }
}
