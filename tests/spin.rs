//! The Spin component under `spin up` (Spin 4), driven through its HTTP surface only, on
//! Spin's default SQLite key-value store and on Redis (or Valkey) through a runtime
//! configuration file. Spin instantiates the component per request, so every PATCH of a chunked
//! upload lands on a fresh instance and all state goes through the key-value store.
//!
//! Needs the Spin CLI and the component built by `spin build`: `.ci/spin` builds it, installs
//! Redis and runs `cargo test --features spin-e2e --test spin`. The CLI is `DOCKSIDE_SPIN` if
//! set, else `<repository>/../shared/tools/spin`, else `/work/shared/tools/spin`; the Redis
//! server is `DOCKSIDE_REDIS_SERVER` if set, else `valkey-server` or `redis-server` on `PATH`.
//! The S3 tests (blobs in Garage, keys in Redis) also need Garage: `DOCKSIDE_GARAGE`, installed
//! by `.ci/garage`, which `.ci/spin` runs. Without them every test fails and says why; none
//! skips.
//!
//! `DOCKSIDE_SPIN_LARGE_MIB` sets the size of the large layer (default 1024: a 1 GiB layer).
#![cfg(feature = "spin-e2e")]

mod common;
#[path = "backends/garage.rs"]
mod garage;
#[path = "common/gate.rs"]
mod gate;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::scenarios::{self, AUTH_SECRET, auth_toml};
use common::{proc_status_kib, pseudo_random, sha256_digest, sha256_finish};
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};

/// How long `spin up` may take to answer its first request (the first start of a machine
/// compiles the component; Spin caches that).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Spin CLI: `DOCKSIDE_SPIN`, else `../shared/tools/spin` beside the repository, else
/// `/work/shared/tools/spin`. Panics when there is none: these tests were asked for.
pub fn spin_cli() -> PathBuf {
    if let Ok(p) = std::env::var("DOCKSIDE_SPIN")
        && !p.is_empty()
    {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "DOCKSIDE_SPIN={} is not a file", p.display());
        return p;
    }
    let candidates = [
        repo_root().join("../shared/tools/spin"),
        PathBuf::from("/work/shared/tools/spin"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no Spin CLI: set DOCKSIDE_SPIN, or provide one of {candidates:?} (see \
                 ../shared/tools/README.md)"
            )
        })
}

/// The Spin component `spin.toml` names, which `spin build` must have built.
fn component() -> PathBuf {
    let manifest = std::fs::read_to_string(repo_root().join("spin.toml")).expect("spin.toml");
    let source = manifest
        .lines()
        .find_map(|l| l.strip_prefix("source = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("spin.toml names the component's source");
    let path = repo_root().join(source);
    assert!(
        path.is_file(),
        "{} is missing: run `spin build` first (.ci/spin does)",
        path.display()
    );
    path
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The lines a child process wrote, read by background threads so its pipes never fill.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<String>>>);

impl Output {
    fn drain(&self, pipe: impl Read + Send + 'static) {
        let out = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut v = out.0.lock().unwrap_or_else(|p| p.into_inner());
                if v.len() > 5000 {
                    v.drain(..2500);
                }
                v.push(line);
            }
        });
    }

    fn tail(&self) -> String {
        let v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        v[v.len().saturating_sub(40)..].join("\n")
    }
}

// ---------------------------------------------------------------------------------------------
// Redis (or Valkey), for the Redis key-value store

/// The Redis server binary: `DOCKSIDE_REDIS_SERVER`, else `valkey-server`, else
/// `redis-server` on `PATH`.
fn redis_server_binary() -> PathBuf {
    if let Ok(p) = std::env::var("DOCKSIDE_REDIS_SERVER")
        && !p.is_empty()
    {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["valkey-server", "redis-server"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "neither valkey-server nor redis-server is on PATH (set DOCKSIDE_REDIS_SERVER): \
         .ci/spin installs one"
    )
}

/// A Redis server on a free loopback port, in memory only, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    out: Output,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let bin = redis_server_binary();
        let dir = tempfile::tempdir().expect("a directory for redis");
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "yes",
                ])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
            let out = Output::default();
            out.drain(child.stdout.take().unwrap());
            out.drain(child.stderr.take().unwrap());
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                if ping(port) {
                    return Redis {
                        child,
                        port,
                        out,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("redis on port {port} did not start:\n{}", out.tail());
        }
        panic!("{} did not start in three tries", bin.display());
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// `KEYS *` on the Redis server at `port`, through RESP by hand (a test-only scan of a small
/// store).
fn redis_keys(port: u16) -> Vec<String> {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&s).write_all(b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n").unwrap();
    let mut r = BufReader::new(&s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let n: usize = line
        .trim_end()
        .strip_prefix('*')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("KEYS answered {line:?}"));
    let mut keys = Vec::with_capacity(n);
    for _ in 0..n {
        line.clear();
        r.read_line(&mut line).unwrap();
        let len: usize = line.trim_end().strip_prefix('$').unwrap().parse().unwrap();
        let mut key = vec![0u8; len + 2];
        r.read_exact(&mut key).unwrap();
        key.truncate(len);
        keys.push(String::from_utf8_lossy(&key).into_owned());
    }
    keys
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- redis output ----\n{}", self.out.tail());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// spin up

#[derive(Clone, Copy, Debug, PartialEq)]
enum Store {
    /// Spin's default key-value store: SQLite in the state directory.
    Sqlite,
    /// Redis, through `--runtime-config-file`.
    Redis,
}

/// `spin up` of the repository's own `spin.toml`, with a state directory of its own, on a free
/// loopback port. `spin up` runs the HTTP trigger as a child process: both are in a process
/// group of their own, stopped together on drop.
struct Spin {
    child: Child,
    addr: String,
    out: Output,
    _state: tempfile::TempDir,
    _redis: Option<Redis>,
}

impl Spin {
    async fn start(store: Store, variables: &[(&str, String)]) -> Spin {
        for _ in 0..3 {
            if let Some(spin) = Spin::try_start(store, variables).await {
                return spin;
            }
        }
        panic!("spin up could not get a free port in three tries");
    }

    /// `None` if the port was taken meanwhile.
    async fn try_start(store: Store, variables: &[(&str, String)]) -> Option<Spin> {
        let cli = spin_cli();
        let manifest = repo_root().join("spin.toml");
        component();
        let state = tempfile::Builder::new()
            .prefix("dockside-spin-")
            .tempdir()
            .expect("a state directory");
        let redis = (store == Store::Redis).then(Redis::start);
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(&cli);
        cmd.arg("up")
            .arg("--from")
            .arg(&manifest)
            .args(["--listen", &addr])
            .arg("--state-dir")
            .arg(state.path());
        if let Some(r) = &redis {
            let rc = state.path().join("runtime-config.toml");
            std::fs::write(
                &rc,
                format!(
                    "[key_value_store.default]\ntype = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\n",
                    r.port
                ),
            )
            .expect("write runtime-config.toml");
            cmd.arg("--runtime-config-file").arg(rc);
        }
        // Only the variables given here reach the component.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SPIN_VARIABLE_") {
                cmd.env_remove(&k);
            }
        }
        for (k, v) in variables {
            cmd.env(format!("SPIN_VARIABLE_{}", k.to_uppercase()), v);
        }
        let mut child = cmd
            .current_dir(state.path())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", cli.display()));
        let out = Output::default();
        out.drain(child.stdout.take().unwrap());
        out.drain(child.stderr.take().unwrap());
        let mut spin = Spin {
            child,
            addr,
            out,
            _state: state,
            _redis: redis,
        };
        let http = common::client();
        let started = Instant::now();
        loop {
            // Any answer will do (401 with access control on, 500 with a bad setting): the
            // component is serving.
            if http
                .get(format!("http://{}/v2/", spin.addr))
                .send()
                .await
                .is_ok()
            {
                eprintln!("spin up ({store:?}) answered after {:?}", started.elapsed());
                return Some(spin);
            }
            if let Some(status) = spin.child.try_wait().expect("try_wait") {
                if spin.out.tail().contains("in use") {
                    eprintln!("port taken, retrying:\n{}", spin.out.tail());
                    return None;
                }
                panic!("spin up exited with {status}:\n{}", spin.out.tail());
            }
            assert!(
                started.elapsed() < STARTUP_TIMEOUT,
                "spin up did not answer within {STARTUP_TIMEOUT:?}:\n{}",
                spin.out.tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the component wrote on stderr: Spin keeps it in the state directory.
    fn component_stderr(&self) -> String {
        std::fs::read_to_string(self._state.path().join("logs/dockside_stderr.txt"))
            .unwrap_or_default()
    }

    /// Every key in the Redis store (`KEYS *`), for a `Store::Redis` run.
    fn redis_keys(&self) -> Vec<String> {
        let port = self._redis.as_ref().expect("a Redis store").port;
        redis_keys(port)
    }

    /// The pids of the process group: `spin up` and its trigger process.
    fn pids(&self) -> Vec<u32> {
        let pgid = self.child.id();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            // /proc/<pid>/stat: "pid (comm) state ppid pgrp ..."; comm may hold spaces.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid) {
                pids.push(pid);
            }
        }
        assert!(pids.contains(&pgid), "spin up ({pgid}) is not running");
        pids
    }

    /// The peak resident set (`VmHWM`) of `spin up` and its children, added up, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        self.pids()
            .into_iter()
            .map(|p| proc_status_kib(p, "VmHWM:"))
            .sum()
    }
}

impl Drop for Spin {
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
        // Whatever is left of the group (the trigger process, if it outlived its parent).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- spin up output ----\n{}", self.out.tail());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small HTTP helpers

fn location(base: &str, r: &reqwest::Response) -> String {
    let l = r.headers()["location"].to_str().unwrap();
    if l.starts_with("http") {
        l.to_owned()
    } else {
        format!("{base}{l}")
    }
}

async fn open_upload(http: &reqwest::Client, base: &str, repo: &str) -> String {
    let r = http
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    location(base, &r)
}

fn with_digest(loc: &str, digest: &str) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}digest={digest}")
}

// ---------------------------------------------------------------------------------------------
// The tests, each on both stores

/// Defines `sqlite_<name>` and `redis_<name>` running `$body(store)`.
macro_rules! on_both_stores {
    ($($name:ident => $f:ident;)*) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                super::$f(super::Store::Sqlite).await;
            })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                super::$f(super::Store::Redis).await;
            })*
        }
    };
}

on_both_stores! {
    oci_client_push_and_pull => push_and_pull;
    chunked_push_on_fresh_instances => chunked_push;
    large_layer_in_bounded_memory => large_layer;
    access_control_from_spin_variables => access_control;
    racing_patches_one_winner => racing_patches;
    login_throttle_and_upload_caps_across_instances => limits_across_instances;
}

/// The oci-client scenario shared with the wasi:http component's test.
async fn push_and_pull(store: Store) {
    let spin = Spin::start(store, &[]).await;
    // A stall fails the test instead of holding CI (the layers go up concurrently: the case
    // that once deadlocked Spin's SQLite store, see `SpinKv::list`).
    tokio::time::timeout(
        Duration::from_secs(300),
        scenarios::push_and_pull(&spin.addr),
    )
    .await
    .expect("the oci-client push and pull stalled under spin up");
}

/// A chunked upload by hand: chunks of odd sizes (not multiples of the store's 1 MiB chunk
/// values), each PATCH with its `Content-Range` on a fresh instance, the session's progress
/// read back between them, the last chunk in the closing PUT; then the blob whole, and ranges
/// across the parts' boundaries.
async fn chunked_push(store: Store) {
    chunked_push_with(store, &[]).await;
}

async fn chunked_push_with(store: Store, variables: &[(&str, String)]) {
    let spin = Spin::start(store, variables).await;
    chunked_push_on(&spin).await;
}

/// The chunked push of [`chunked_push`] on a running `spin up`; returns the blob's digest and
/// size.
async fn chunked_push_on(spin: &Spin) -> (String, usize) {
    let base = spin.base();
    let http = common::client();
    let data = pseudo_random(7 * 1_500_007 + 4321, 42);
    let digest = sha256_digest(&data);
    let mut loc = open_upload(&http, &base, "chunks/app").await;
    let mut offset = 0usize;
    for piece in data[..7 * 1_500_007].chunks(1_500_007) {
        let end = offset + piece.len();
        let r = http
            .patch(&loc)
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{offset}-{}", end - 1))
            .body(piece.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
        assert_eq!(r.headers()["range"], format!("0-{}", end - 1).as_str());
        loc = location(&base, &r);
        let r = http.get(&loc).send().await.unwrap();
        assert_eq!(r.status(), 204);
        assert_eq!(r.headers()["range"], format!("0-{}", end - 1).as_str());
        offset = end;
    }
    // A chunk out of order is refused (416) and changes nothing.
    let r = http
        .patch(&loc)
        .header("content-type", "application/octet-stream")
        .header("content-range", "5-9")
        .body(vec![0u8; 5])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    let r = http
        .put(with_digest(&loc, &digest))
        .header("content-type", "application/octet-stream")
        .body(data[offset..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    let blob = format!("{base}/v2/chunks/app/blobs/{digest}");
    let got = http.get(&blob).send().await.unwrap();
    assert_eq!(got.status(), 200);
    let got = got.bytes().await.unwrap();
    assert!(
        got.len() == data.len() && got[..] == data[..],
        "the blob came back different"
    );
    for (from, to) in [(1_500_000, 1_500_020), (1_048_570, 3_100_000), (0, 0)] {
        let r = http
            .get(&blob)
            .header("range", format!("bytes={from}-{to}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert!(r.bytes().await.unwrap()[..] == data[from..=to]);
    }
    (digest, data.len())
}

/// Block `i` of the large layer: a fixed pseudo-random MiB with `i` in its first 8 bytes, so a
/// block out of place or repeated changes the digest.
fn block(base: &[u8], i: u64) -> bytes::Bytes {
    let mut b = base.to_vec();
    b[..8].copy_from_slice(&i.to_le_bytes());
    bytes::Bytes::from(b)
}

/// A large layer pushed in one streamed PATCH and pulled back, byte for byte (by digest and
/// length), while the memory of `spin up` and its trigger process stays bounded: neither
/// buffers the layer.
async fn large_layer(store: Store) {
    let mib: u64 = std::env::var("DOCKSIDE_SPIN_LARGE_MIB")
        .ok()
        .map(|v| v.parse().expect("DOCKSIDE_SPIN_LARGE_MIB is a number"))
        .unwrap_or(1024);
    let spin = Spin::start(store, &[]).await;
    let base = spin.base();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(1800))
        .build()
        .unwrap();
    let unit = pseudo_random(1024 * 1024, 7);
    let mut h = Sha256::new();
    for i in 0..mib {
        h.update(block(&unit, i));
    }
    let digest = sha256_finish(h);
    let size = mib * 1024 * 1024;
    // Warm up (a small push and pull), then take the baseline.
    scenarios_small_push(&http, &base).await;
    let before = spin.peak_rss_kib();

    let loc = open_upload(&http, &base, "large/app").await;
    let unit2 = unit.clone();
    let body = futures_util::stream::iter(
        (0..mib).map(move |i| Ok::<_, std::io::Error>(block(&unit2, i))),
    );
    let t = Instant::now();
    let r = http
        .patch(&loc)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    let loc = location(&base, &r);
    let r = http.put(with_digest(&loc, &digest)).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    let push = t.elapsed();

    let t = Instant::now();
    let r = http
        .get(format!("{base}/v2/large/app/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        size.to_string()
    );
    let mut h = Sha256::new();
    let mut got = 0u64;
    let mut stream = r.bytes_stream();
    while let Some(b) = stream.next().await {
        let b = b.expect("the layer's body");
        got += b.len() as u64;
        h.update(&b);
    }
    let pull = t.elapsed();
    assert_eq!(got, size, "the pulled layer's length");
    assert_eq!(sha256_finish(h), digest, "the pulled layer's digest");

    let after = spin.peak_rss_kib();
    let rate = |d: Duration| mib as f64 / d.as_secs_f64();
    eprintln!(
        "spin up ({store:?}), {mib} MiB layer: push {push:.2?} ({:.0} MiB/s), pull {pull:.2?} \
         ({:.0} MiB/s); peak RSS of spin up and its trigger: {} KiB before, {} KiB after",
        rate(push),
        rate(pull),
        before,
        after
    );
    // The layer passes through in chunks: spin's memory may not grow by anything like it.
    let bound = 96 * 1024;
    assert!(
        after.saturating_sub(before) < bound,
        "spin up's peak RSS grew by {} KiB during a {mib} MiB push and pull (bound {bound} KiB)",
        after - before
    );
}

/// A one-request push and a pull of a small blob.
async fn scenarios_small_push(http: &reqwest::Client, base: &str) {
    let data = pseudo_random(100_000, 3);
    let d = sha256_digest(&data);
    let r = http
        .post(format!("{base}/v2/warm/app/blobs/uploads/?digest={d}"))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .get(format!("{base}/v2/warm/app/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert!(r.bytes().await.unwrap()[..] == data[..]);
}

/// Access control from Spin variables (`SPIN_VARIABLE_AUTH_CONFIG`,
/// `SPIN_VARIABLE_AUTH_SECRET`): the scenario shared with the wasi:http component; and without
/// a secret the component refuses to serve rather than run open.
async fn access_control(store: Store) {
    let spin = Spin::start(
        store,
        &[
            ("auth_config", auth_toml()),
            ("auth_secret", AUTH_SECRET.to_owned()),
        ],
    )
    .await;
    scenarios::access_control(&spin.addr).await;
    drop(spin);

    let spin = Spin::start(store, &[("auth_config", auth_toml())]).await;
    let r = common::client()
        .get(format!("{}/v2/public/app/tags/list", spin.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let body = r.text().await.unwrap();
    assert!(body.contains("no token secret"), "{body}");
}

/// The probes are the core's, so the Spin component answers them; each request leaves one JSON
/// access line (the component's metrics) with the id of its `X-Request-Id` header.
#[tokio::test(flavor = "multi_thread")]
async fn probes_and_access_lines_on_spin() {
    let spin = Spin::start(Store::Sqlite, &[]).await;
    let http = common::client();
    for path in ["/live", "/ready", "/healthz"] {
        let r = http
            .get(format!("http://{}{path}", spin.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["status"], "ok", "{path}");
    }
    let r = http
        .get(format!("http://{}/v2/spin/tags/list", spin.addr))
        .header("x-request-id", "spin-probe-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-request-id"], "spin-probe-1");
    let started = Instant::now();
    let line = loop {
        let tail = spin.out.tail();
        if let Some(l) = tail.lines().find(|l| l.contains("spin-probe-1")) {
            break l.to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no access line in spin's output:\n{tail}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
    assert_eq!(v["class"], "tags");
    assert_eq!(v["status"], 404);
}

/// Limits from Spin variables: advertised, enforced before anything is stored, and a malformed
/// value reported rather than ignored. (Settings do not depend on the store: SQLite only.)
#[tokio::test(flavor = "multi_thread")]
async fn limits_from_spin_variables() {
    let spin = Spin::start(
        Store::Sqlite,
        &[
            ("max_chunk_bytes", "1000".to_owned()),
            ("chunk_min_length", "500".to_owned()),
            ("no_delete", "true".to_owned()),
        ],
    )
    .await;
    let base = spin.base();
    let http = common::client();
    let r = http
        .post(format!("{base}/v2/lim/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["oci-chunk-max-length"], "1000");
    assert_eq!(r.headers()["oci-chunk-min-length"], "500");
    let loc = location(&base, &r);
    let r = http.patch(&loc).body(vec![7u8; 2000]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let r = http.get(&loc).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["range"],
        "0-0",
        "the refused PATCH stored nothing"
    );
    let r = http
        .delete(format!("{base}/v2/lim/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405, "no_delete=true");
    drop(spin);

    let bad = Spin::start(Store::Sqlite, &[("max_chunk_bytes", "lots".to_owned())]).await;
    let r = http
        .get(format!("{}/v2/", bad.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let text = r.text().await.unwrap();
    assert!(text.contains("DOCKSIDE_MAX_CHUNK_BYTES"), "{text}");
}

/// Compare-and-swap on the upload record: 16 PATCHes of the same first chunk race on one
/// session, 20 rounds. Exactly one wins (202) each round, the others see the session moved
/// (416), and the closing PUT yields a blob that matches its digest.
async fn racing_patches(store: Store) {
    const RACERS: usize = 16;
    const ROUNDS: u64 = 20;
    let spin = Spin::start(store, &[]).await;
    let base = spin.base();
    let http = common::client();
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let chunk = pseudo_random(256 * 1024 + round as usize, 100 + round);
        let digest = sha256_digest(&chunk);
        let loc = open_upload(&http, &base, "race/app").await;
        let racers = (0..RACERS).map(|_| {
            let (http, loc, chunk) = (http.clone(), loc.clone(), chunk.clone());
            tokio::spawn(async move {
                let r = http
                    .patch(&loc)
                    .header("content-type", "application/octet-stream")
                    .header("content-range", format!("0-{}", chunk.len() - 1))
                    .body(chunk)
                    .send()
                    .await
                    .expect("a PATCH");
                let status = r.status().as_u16();
                let next = r
                    .headers()
                    .get("location")
                    .map(|l| l.to_str().unwrap().to_owned());
                (status, next)
            })
        });
        let results: Vec<(u16, Option<String>)> = futures_util::future::join_all(racers)
            .await
            .into_iter()
            .map(|r| r.expect("a racer"))
            .collect();
        let mut statuses: Vec<u16> = results.iter().map(|(s, _)| *s).collect();
        statuses.sort_unstable();
        let won = statuses.iter().filter(|&&s| s == 202).count();
        if won != 1 || statuses.iter().any(|&s| s != 202 && s != 416) {
            failures.push(format!("round {round}: {statuses:?}"));
        }
        let r = http.get(&loc).send().await.unwrap();
        assert_eq!(r.status(), 204);
        assert_eq!(
            r.headers()["range"],
            format!("0-{}", chunk.len() - 1).as_str(),
            "round {round}: the session holds the chunk once ({statuses:?})"
        );
        let r = http.put(with_digest(&loc, &digest)).send().await.unwrap();
        assert_eq!(
            r.status(),
            201,
            "round {round}: {}",
            r.text().await.unwrap_or_default()
        );
        let got = http
            .get(format!("{base}/v2/race/app/blobs/{digest}"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(
            got[..] == chunk[..],
            "round {round}: the blob came back different"
        );
    }
    assert!(
        failures.is_empty(),
        "racing PATCHes on one session ({store:?}): not exactly one 202 and the rest 416:\n{}",
        failures.join("\n")
    );
}

/// The chunk size of blobs in the key-value store from the Spin variable `chunk_bytes`: an odd
/// size (so chunk, part and range boundaries all differ) pushes and reads back intact, and a
/// value out of bounds is reported rather than ignored. (SQLite only: the store does not care.)
#[tokio::test(flavor = "multi_thread")]
async fn chunk_size_from_spin_variable() {
    chunked_push_with(Store::Sqlite, &[("chunk_bytes", "65537".to_owned())]).await;
    for bad in ["12", "lots", "1000000000"] {
        let spin = Spin::start(Store::Sqlite, &[("chunk_bytes", bad.to_owned())]).await;
        let r = common::client()
            .get(format!("{}/v2/", spin.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500, "chunk_bytes={bad}");
        let text = r.text().await.unwrap();
        assert!(text.contains("chunk_bytes"), "{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Blobs in S3 (Garage, tests/backends/garage.rs), keys in Redis: the Spin variables `blobs`,
// `s3_endpoint` (also spin.toml's allowed_outbound_hosts), `s3_access_key`, `s3_secret_key`,
// `blob_redirect`; nothing in spin.toml edited.

const MIB: usize = 1024 * 1024;

/// The Spin variables for blobs in a fresh prefix of Garage's bucket, plus `extra`; and the S3
/// configuration, to look into the bucket.
fn s3_variables(
    extra: &[(&'static str, String)],
) -> (Vec<(&'static str, String)>, dockside::S3Config) {
    let g = garage::garage();
    let prefix = garage::unique_prefix();
    let s3 = dockside::S3Config::from_url(&g.url(&prefix), g.env()).unwrap();
    let mut vars = vec![
        (
            "blobs",
            format!("s3://{}/{prefix}?region={}", g.bucket, g.region),
        ),
        ("s3_endpoint", g.endpoint.clone()),
        ("s3_access_key", g.access_key.clone()),
        ("s3_secret_key", g.secret_key.clone()),
    ];
    vars.extend(extra.iter().cloned());
    (vars, s3)
}

/// Pushes `data` in one POST; returns its digest.
async fn push_monolithic(http: &reqwest::Client, base: &str, repo: &str, data: &[u8]) -> String {
    let d = sha256_digest(data);
    let r = http
        .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 201, "{}", r.text().await.unwrap_or_default());
    d
}

/// `spin up` with blobs in Garage and keys in Redis: a 20 MiB blob in one POST (a multipart
/// upload of 8 MiB parts) and the chunked push of odd-sized PATCHes (parts under S3's 5 MiB
/// minimum, regrouped by the store), pulled back byte for byte and by ranges; a manifest over
/// them; then exactly those blobs in the bucket under the prefix, and keys but no chunk in
/// Redis.
#[tokio::test(flavor = "multi_thread")]
async fn s3_blobs_and_redis_keys() {
    let (vars, s3) = s3_variables(&[]);
    let spin = Spin::start(Store::Redis, &vars).await;
    let base = spin.base();
    let http = common::client();

    // The store's 5 MiB minimum part is advertised.
    let r = http
        .post(format!("{base}/v2/s3/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.headers()["oci-chunk-min-length"],
        (5 * MIB).to_string().as_str()
    );

    let big = pseudo_random(20 * MIB, 51);
    let d_big = push_monolithic(&http, &base, "s3/app", &big).await;
    let r = http
        .get(format!("{base}/v2/s3/app/blobs/{d_big}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        big.len().to_string().as_str()
    );
    assert_eq!(r.headers()["docker-content-digest"], d_big.as_str());
    let got = r.bytes().await.unwrap();
    assert!(got[..] == big[..], "the 20 MiB blob came back different");
    for (from, to) in [
        (8 * MIB - 100, 8 * MIB + 99),
        (big.len() - 10, big.len() - 1),
    ] {
        let r = http
            .get(format!("{base}/v2/s3/app/blobs/{d_big}"))
            .header("range", format!("bytes={from}-{to}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes {from}-{to}/{}", big.len()).as_str()
        );
        assert!(r.bytes().await.unwrap()[..] == big[from..=to]);
    }

    let (d_chunked, chunked_len) = chunked_push_on(&spin).await;

    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let d_config = push_monolithic(&http, &base, "s3/app", config).await;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": d_config, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d_big, "size": big.len()},
        ],
    })
    .to_string();
    let r = http
        .put(format!("{base}/v2/s3/app/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    let r = http
        .get(format!("{base}/v2/s3/app/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), manifest);

    // The bucket holds the three blobs, under the prefix, at their content addresses; no upload
    // part is left behind.
    let mut expected: Vec<String> = [&d_big, &d_chunked, &d_config]
        .iter()
        .map(|d| {
            let hex = d.strip_prefix("sha256:").unwrap();
            format!("blobs/sha256/{}/{hex}", &hex[..2])
        })
        .collect();
    expected.sort();
    assert_eq!(garage::list_objects(&s3).await, expected);
    assert!(s3.prefix.starts_with("t-") && s3.prefix.ends_with('/'));
    // Their sizes, as a client sees them.
    let r = http
        .head(format!("{base}/v2/chunks/app/blobs/{d_chunked}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        chunked_len.to_string().as_str()
    );

    // Keys in Redis (the tag, the manifest, the blob links), no blob chunk.
    let keys = spin.redis_keys();
    assert!(
        keys.iter().any(|k| k.contains("_manifests/tags/v1")),
        "{keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.contains("_layers/sha256/")),
        "{keys:?}"
    );
    assert!(
        !keys.iter().any(|k| k.contains("kvblob/")),
        "blob chunks in Redis: {keys:?}"
    );
}

/// `blob_redirect`: a blob GET answers 307 to a presigned URL of the bucket; a client that
/// follows it gets the bytes from Garage, not from Spin.
#[tokio::test(flavor = "multi_thread")]
async fn s3_blob_gets_redirect() {
    let (vars, _s3) = s3_variables(&[("blob_redirect", "60".to_owned())]);
    let spin = Spin::start(Store::Redis, &vars).await;
    let base = spin.base();
    let http = common::client();
    let data = pseudo_random(3 * MIB + 17, 52);
    let d = push_monolithic(&http, &base, "s3/redir", &data).await;
    let no_follow = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_follow
        .get(format!("{base}/v2/s3/redir/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    let url = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        url.starts_with(&garage::garage().endpoint) && url.contains("X-Amz-Signature="),
        "{url}"
    );
    // A client following the redirect (reqwest's default policy) gets the right bytes.
    let r = http
        .get(format!("{base}/v2/s3/redir/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // From the bucket: the object's URL (the signature's date may differ by a second).
    let object = url.split('?').next().unwrap();
    assert_eq!(
        r.url().as_str().split('?').next().unwrap(),
        object,
        "served from the bucket"
    );
    assert!(r.bytes().await.unwrap()[..] == data[..]);
    // HEAD is answered by the component itself.
    let r = no_follow
        .head(format!("{base}/v2/s3/redir/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        data.len().to_string().as_str()
    );
}

/// The spec's error envelope, `{"errors":[{"code","message",...}]}`, with its code.
async fn envelope_code(r: reqwest::Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    let code = v["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error envelope: {text}"))
        .to_owned();
    assert!(v["errors"][0]["message"].is_string(), "{text}");
    (status, code, text)
}

/// A one-byte blob pushed in one POST: the first request that reaches the bucket.
async fn push_one_byte(base: &str) -> reqwest::Response {
    common::client()
        .post(format!(
            "{base}/v2/err/app/blobs/uploads/?digest={}",
            sha256_digest(b"x")
        ))
        .header("content-type", "application/octet-stream")
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap()
}

/// Storage that fails answers the spec's error envelope, never a trap: wrong credentials (500),
/// an endpoint that does not answer (503 with `Retry-After`, after the S3 host's retries), an
/// endpoint Spin does not allow (500, and Spin's log says what to set); settings that cannot
/// work (a malformed `blobs`, `blob_redirect` without S3) answer 500 naming the variable.
#[tokio::test(flavor = "multi_thread")]
async fn s3_failures_answer_the_error_envelope() {
    let g = garage::garage();

    let (vars, _) = s3_variables(&[("s3_secret_key", "0".repeat(64))]);
    let spin = Spin::start(Store::Sqlite, &vars).await;
    let (status, code, text) = envelope_code(push_one_byte(&spin.base()).await).await;
    assert_eq!(
        (status, code.as_str()),
        (500, "UNKNOWN"),
        "wrong secret key: {text}"
    );
    // The client is told nothing more; the component's log (the core's `tracing` events as
    // JSON lines on stderr) keeps what the store answered.
    assert!(
        !text.contains("403"),
        "storage detail leaked to the client: {text}"
    );
    let log = spin.component_stderr();
    let failure = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "storage failure")
        .unwrap_or_else(|| panic!("no storage failure in the component's log:\n{log}"));
    assert_eq!(failure["level"], "ERROR", "{failure}");
    assert!(
        failure["error"].as_str().unwrap_or("").contains("403"),
        "the log does not keep the store's answer: {failure}"
    );
    drop(spin);

    let closed = free_port(); // nothing listens there
    let (vars, _) = s3_variables(&[("s3_endpoint", format!("http://127.0.0.1:{closed}"))]);
    let spin = Spin::start(Store::Sqlite, &vars).await;
    let r = push_one_byte(&spin.base()).await;
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let (status, code, text) = envelope_code(r).await;
    assert_eq!(
        (status, code.as_str()),
        (503, "UNKNOWN"),
        "endpoint not answering: {text}"
    );
    drop(spin);

    // The bucket's endpoint in the URL, but s3_endpoint (what Spin allows) left unset.
    let (mut vars, _) = s3_variables(&[]);
    vars.retain(|(k, _)| *k != "s3_endpoint");
    vars[0].1 = format!("{}&endpoint={}", vars[0].1, g.endpoint);
    let spin = Spin::start(Store::Sqlite, &vars).await;
    let (status, code, text) = envelope_code(push_one_byte(&spin.base()).await).await;
    assert_eq!(
        (status, code.as_str()),
        (500, "UNKNOWN"),
        "endpoint not allowed: {text}"
    );
    let log = spin.component_stderr();
    assert!(
        log.contains("not in allowed_outbound_hosts") && log.contains("s3_endpoint"),
        "the component's log does not say what to set:\n{log}"
    );
    drop(spin);

    for (vars, needle) in [
        (vec![("blobs", "s3://".to_owned())], "blobs"),
        (
            vec![("blobs", format!("s3://{}?region=garage", g.bucket))],
            "s3_endpoint",
        ),
        (vec![("blob_redirect", "60".to_owned())], "blob_redirect"),
    ] {
        let spin = Spin::start(Store::Sqlite, &vars).await;
        let r = common::client()
            .get(format!("{}/v2/", spin.base()))
            .send()
            .await
            .unwrap();
        let (status, code, text) = envelope_code(r).await;
        assert_eq!(
            (status, code.as_str()),
            (500, "UNKNOWN"),
            "{vars:?}: {text}"
        );
        assert!(text.contains(needle), "{vars:?}: {text}");
    }
}

/// A client whose connections come from `ip` (any 127.x.y.z is loopback on Linux).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Brute-force protection and admission limits from Spin variables, where every request may
/// run on a fresh instance, so the counts live in the key-value store: failed logins lock the
/// guessing address out of the user (429 + `Retry-After`, the right password too) while the
/// user gets in from another address, which the component learns from Spin's
/// `spin-client-addr` (a client sending its own is overridden); and a repository's open upload
/// sessions are capped, a cancel freeing a slot.
async fn limits_across_instances(store: Store) {
    let spin = Spin::start(
        store,
        &[
            ("auth_config", auth_toml()),
            ("auth_secret", AUTH_SECRET.to_owned()),
            ("login_failures_per_user_address", "3".to_owned()),
            ("max_uploads_per_repository", "2".to_owned()),
        ],
    )
    .await;
    let base = spin.base();
    let attacker = client_from("127.0.0.1");
    let elsewhere = client_from("127.0.0.2");
    let v2 = format!("{base}/v2/");
    for i in 0..3 {
        let r = attacker
            .get(&v2)
            .basic_auth("alice", Some(format!("guess-{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "guess {i}");
    }
    let r = attacker
        .get(&v2)
        .basic_auth("alice", Some("alice-pw"))
        .header("spin-client-addr", "203.0.113.9:4000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS", "{body}");
    let r = elsewhere
        .get(&v2)
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "alice from another address");

    let uploads = format!("{base}/v2/team/app/blobs/uploads/");
    let mut open = Vec::new();
    for _ in 0..2 {
        let r = elsewhere
            .post(&uploads)
            .basic_auth("alice", Some("alice-pw"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        open.push(location(&base, &r));
    }
    let r = elsewhere
        .post(&uploads)
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let r = elsewhere
        .delete(&open[0])
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = elsewhere
        .post(&uploads)
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

/// The pull-through mirror under `spin up` (README, "Mirror"): the upstream a native test
/// registry with token auth, reached through Spin's outbound HTTP (allowed by the
/// variable `mirror_upstream`). Every request is a fresh instance, so the upstream token and
/// the one-fetch lease can only be in the key-value store.
#[tokio::test(flavor = "multi_thread")]
async fn mirror_through_spin() {
    let up = common::upstream_with_scenario_auth(None);
    let http = common::client();
    let base = up.url().to_owned();
    let push = |path: String, body: Vec<u8>, ct: &'static str| {
        let http = http.clone();
        async move {
            let r = http
                .request(
                    if path.contains("/manifests/") {
                        reqwest::Method::PUT
                    } else {
                        reqwest::Method::POST
                    },
                    path,
                )
                .basic_auth("alice", Some("alice-pw"))
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        }
    };
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = pseudo_random(8 * 1024 * 1024 + 3, 42);
    let (cd, ld) = (sha256_digest(&config), sha256_digest(&layer));
    for (d, b) in [(&cd, &config), (&ld, &layer)] {
        let url = format!("{base}/v2/team/app/blobs/uploads/?digest={d}");
        push(url, b.clone(), "application/octet-stream").await;
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}],
    }))
    .unwrap();
    let url = format!("{base}/v2/team/app/manifests/v1");
    push(
        url,
        manifest.clone(),
        "application/vnd.oci.image.manifest.v1+json",
    )
    .await;

    let mirror_config = format!(
        "[[upstream]]\nurl = \"{base}\"\nprefix = \"up/\"\nusername = \"alice\"\npassword = \"alice-pw\"\n"
    );
    let spin = Spin::start(
        Store::Sqlite,
        &[
            ("mirror_config", mirror_config),
            ("mirror_upstream", base.clone()),
        ],
    )
    .await;
    let sb = spin.base();
    let r = http
        .get(format!("{sb}/v2/up/team/app/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", spin.component_stderr());
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(r.bytes().await.unwrap(), manifest);

    // Four instances ask for the uncached layer at once: one upstream fetch.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (http, url) = (http.clone(), format!("{sb}/v2/up/team/app/blobs/{ld}"));
        tasks.push(tokio::spawn(async move {
            let r = http.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            sha256_digest(&r.bytes().await.unwrap())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), ld);
    }
    let blob = format!("/v2/team/app/blobs/{ld}");
    assert_eq!(common::served(&up, "GET", &blob, Some(200)), 1);
    // The token from the first request served the others (kept in Spin's key-value store).
    assert_eq!(
        common::served(&up, "GET", "/token", Some(200)),
        1,
        "{:?}",
        up.requests()
    );

    // Range from the cache; pushes refused; upstream stopped, the cached layer still served.
    let r = http
        .get(format!("{sb}/v2/up/team/app/blobs/{ld}"))
        .header("range", "bytes=5-9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), layer[5..10]);
    let r = http
        .post(format!("{sb}/v2/up/team/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    drop(up);
    let r = http
        .get(format!("{sb}/v2/up/team/app/blobs/{ld}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256_digest(&r.bytes().await.unwrap()), ld);
    let r = http
        .get(format!("{sb}/v2/up/team/other/blobs/{cd}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "{}", spin.component_stderr());
}

/// A mirror whose upstream's token realm is on another host (as Docker Hub's is:
/// registry-1.docker.io challenges with a realm on auth.docker.io). The realm here is
/// `http://localhost:<port>/token`, a forwarder to the upstream, while the upstream is reached as
/// `http://127.0.0.1:<port>`: without the Spin variable `mirror_auth_host` Spin refuses the token
/// request (a 500, and the component's log names the variable); with it the pull goes through.
#[tokio::test(flavor = "multi_thread")]
async fn mirror_token_realm_on_another_host_through_spin() {
    let realm_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let realm_port = realm_listener.local_addr().unwrap().port();
    let realm_origin = format!("http://localhost:{realm_port}");
    let up = common::upstream_with_scenario_auth(Some(&format!("{realm_origin}/token")));
    // The token service's host: every connection forwarded to the upstream.
    let up_addr = up.addr();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = realm_listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut u) = tokio::net::TcpStream::connect(up_addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
            });
        }
    });
    let http = common::client();
    let base = up.url().to_owned();
    let layer = pseudo_random(300_000, 43);
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let (cd, ld) = (sha256_digest(&config), sha256_digest(&layer));
    for (d, b) in [(&cd, &config), (&ld, &layer)] {
        let r = http
            .post(format!("{base}/v2/team/realm/blobs/uploads/?digest={d}"))
            .basic_auth("alice", Some("alice-pw"))
            .header("content-type", "application/octet-stream")
            .body(b.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}],
    }))
    .unwrap();
    let r = http
        .put(format!("{base}/v2/team/realm/manifests/v1"))
        .basic_auth("alice", Some("alice-pw"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // The challenge names the other host.
    let r = http
        .get(format!("{base}/v2/team/realm/manifests/v1"))
        .send()
        .await
        .unwrap();
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.contains(&realm_origin), "{challenge}");

    let mirror_config = format!(
        "[[upstream]]\nurl = \"{base}\"\nprefix = \"up/\"\nusername = \"alice\"\npassword = \"alice-pw\"\n"
    );
    let pull = |sb: String| {
        let http = http.clone();
        async move {
            http.get(format!("{sb}/v2/up/team/realm/manifests/v1"))
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
                .await
                .unwrap()
        }
    };
    {
        let spin = Spin::start(
            Store::Sqlite,
            &[
                ("mirror_config", mirror_config.clone()),
                ("mirror_upstream", base.clone()),
            ],
        )
        .await;
        let r = pull(spin.base()).await;
        assert_eq!(r.status(), 500, "{}", spin.component_stderr());
        let log = spin.component_stderr();
        assert!(
            log.contains(&format!("localhost:{realm_port}")) && log.contains("mirror_auth_host"),
            "the component's log names the refused host and the variable: {log}"
        );
    }
    let spin = Spin::start(
        Store::Sqlite,
        &[
            ("mirror_config", mirror_config),
            ("mirror_upstream", base.clone()),
            ("mirror_auth_host", realm_origin.clone()),
        ],
    )
    .await;
    let r = pull(spin.base()).await;
    assert_eq!(r.status(), 200, "{}", spin.component_stderr());
    assert_eq!(r.bytes().await.unwrap(), manifest);
    let r = http
        .get(format!("{}/v2/up/team/realm/blobs/{ld}", spin.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", spin.component_stderr());
    assert_eq!(sha256_digest(&r.bytes().await.unwrap()), ld);
    assert!(
        common::served(&up, "GET", "/token", Some(200)) > 0,
        "a token from the realm on the other host"
    );
}

/// A cold blob streams through the Spin component while it is fetched (its body polls the
/// request's future, which feeds it): the upstream, a native test registry behind a gate, is
/// held at 4 MiB of 24 while the client must already have 1 MiB; then the whole blob, byte for
/// byte, fetched once, and served again from Spin's key-value store.
#[tokio::test(flavor = "multi_thread")]
async fn mirror_streams_a_cold_blob_through_spin() {
    // In a directory: the corrupted-blob check below edits its store.
    let up = dockside::testing::TestRegistry::builder()
        .temp_dir()
        .start();
    let http = common::client();
    let len = 24 * 1024 * 1024;
    let data = pseudo_random(len, 79);
    let d = sha256_digest(&data);
    let r = http
        .post(format!(
            "{}/v2/library/big/blobs/uploads/?digest={d}",
            up.url()
        ))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let budget = 4 * 1024 * 1024;
    let (gate_url, gate) = gate::gate(up.addr(), budget).await;
    let spin = Spin::start(
        Store::Sqlite,
        &[
            (
                "mirror_config",
                format!("[[upstream]]\nurl = \"{gate_url}\"\n"),
            ),
            ("mirror_upstream", gate_url.clone()),
        ],
    )
    .await;
    let url = format!("{}/v2/library/big/blobs/{d}", spin.base());
    let mut r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", spin.component_stderr());
    let mut h = Sha256::new();
    let mut got = 0;
    while got < 1024 * 1024 {
        let c = tokio::time::timeout(Duration::from_secs(60), r.chunk())
            .await
            .expect("bytes while the upstream is held")
            .unwrap()
            .expect("not the end yet");
        got += c.len();
        h.update(&c);
    }
    let sent = gate.sent();
    assert!(
        sent <= budget && sent < len as u64,
        "the client has {got} bytes while the upstream sent {sent} of {len}"
    );
    gate.open();
    while let Some(c) = r.chunk().await.unwrap() {
        got += c.len();
        h.update(&c);
    }
    assert_eq!(got, len);
    assert_eq!(sha256_finish(h), d);
    let again = http.get(&url).send().await.unwrap();
    assert_eq!(again.status(), 200, "{}", spin.component_stderr());
    assert!(again.bytes().await.unwrap() == data);
    let blob = format!("/v2/library/big/blobs/{d}");
    assert_eq!(common::served(&up, "GET", &blob, Some(200)), 1);

    // A corrupted blob: the streaming client's transfer fails, and it is never cached.
    let (bad, bad_len) = common::seed_corrupted(&http, &up, "library/bad").await;
    let url = format!("{}/v2/library/bad/blobs/{bad}", spin.base());
    common::assert_streamed_transfer_fails(&http, &url, bad_len).await;
}

// ---------------------------------------------------------------------------------------------
// Garbage collection: the admin request under `spin up`

/// Every key of the store `spin` runs on: Redis's `KEYS *`, or the rows of Spin's SQLite
/// key-value database in the state directory (read with Python's sqlite3, read-only).
fn store_keys(spin: &Spin, store: Store) -> Vec<String> {
    if store == Store::Redis {
        return spin.redis_keys();
    }
    let db = spin._state.path().join("sqlite_key_value.db");
    assert!(db.is_file(), "no {}", db.display());
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             c = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True)\n\
             for (k,) in c.execute('select key from spin_key_value'): print(k)",
        )
        .arg(&db)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `POST /v2/_dockside/gc` end to end under `spin up`, settings from the Spin variable
/// `gc_config` (no grace, 3 keys a step, so a run takes several requests, each on a fresh
/// instance, resuming from the state in the store, the repository judged in pages): an anonymous caller gets 401 and a
/// pull-only user 403, both in the error envelope; the admin steps until the run is done; the
/// deleted image's blobs are gone from the store (their chunk keys too), the other image
/// pulls byte for byte.
async fn gc_admin_request(store: Store) {
    let hash = bcrypt::hash("pw", 4).unwrap();
    let auth = format!(
        r#"
[auth]
service = "edge"

[[auth.users]]
name = "admin"
password_hash = "{hash}"

[[auth.users]]
name = "reader"
password_hash = "{hash}"

[[auth.rules]]
repositories = ["**"]
users = ["admin"]
actions = ["pull", "push", "delete"]

[[auth.rules]]
repositories = ["**"]
users = ["reader"]
actions = ["pull"]
"#
    );
    let spin = Spin::start(
        store,
        &[
            ("auth_config", auth),
            ("auth_secret", AUTH_SECRET.to_owned()),
            ("gc_config", "grace_secs = 0\nstep_items = 3\n".to_owned()),
        ],
    )
    .await;
    let base = spin.base();
    let http = common::client();
    let admin = |r: reqwest::RequestBuilder| r.basic_auth("admin", Some("pw"));

    // Two images of a config and a layer each, nothing shared.
    let mut images = Vec::new();
    for name in ["gone", "kept"] {
        let mut descs = Vec::new();
        for (part, len) in [("config", 300), ("layer", 50_000)] {
            let mut data = format!("{name} {part} ").into_bytes();
            data.extend(pseudo_random(len, name.len() as u64));
            let d = sha256_digest(&data);
            let r = admin(http.post(format!("{base}/v2/team/app/blobs/uploads/?digest={d}")))
                .header("content-type", "application/octet-stream")
                .body(data.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
            descs.push((d, data));
        }
        let m = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": descs[0].0, "size": descs[0].1.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": descs[1].0, "size": descs[1].1.len()}],
        }))
        .unwrap();
        let md = sha256_digest(&m);
        let r = admin(http.put(format!("{base}/v2/team/app/manifests/{name}")))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(m.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        images.push((md, m, descs));
    }
    let r = admin(http.delete(format!("{base}/v2/team/app/manifests/{}", images[0].0)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let object = |d: &str| {
        let (alg, hex) = d.split_once(':').unwrap();
        format!("kvblob/obj/blobs/{alg}/{}/{hex}", &hex[..2])
    };
    let keys = store_keys(&spin, store);
    for (d, _) in &images[0].2 {
        assert!(keys.iter().any(|k| k.ends_with(&object(d))), "{keys:?}");
    }
    let chunks_before = keys.iter().filter(|k| k.contains("kvblob/chunk/")).count();

    // Refused: anonymous (401, with the challenge), a pull-only user (403).
    let gc = format!("{base}/v2/_dockside/gc");
    let r = http.post(&gc).send().await.unwrap();
    assert!(r.headers().contains_key("www-authenticate"));
    let (status, code, _) = envelope_code(r).await;
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    let r = http
        .post(&gc)
        .basic_auth("reader", Some("pw"))
        .send()
        .await
        .unwrap();
    let (status, code, _) = envelope_code(r).await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));

    // The grace is 0, judged by whole seconds: let the pushes' second pass.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut steps = 0;
    let mut paged = false;
    let last = loop {
        steps += 1;
        assert!(steps < 200, "the run never finished");
        let r = admin(http.post(&gc)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let p: serde_json::Value = r.json().await.unwrap();
        // Its tag, manifest and four links are more than a step's 3: judged in pages.
        paged |= p["repo"]["name"] == "team/app";
        if p["phase"] == "idle" {
            break p["last"].clone();
        }
    };
    assert!(steps > 1, "3 keys a step: a run takes several requests");
    assert!(paged, "team/app was not judged in pages");
    assert_eq!(last["blobs"], 2, "{last}");
    assert_eq!(last["links"], 2, "{last}");
    let total: usize = images[0].2.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(last["bytes"], total, "{last}");
    // The state reads back the same.
    let r = admin(http.get(&gc)).send().await.unwrap();
    let p: serde_json::Value = r.json().await.unwrap();
    assert_eq!(p["phase"], "idle");
    assert_eq!(p["last"], last);

    // The bytes are gone from the store: the objects and their chunks.
    let keys = store_keys(&spin, store);
    for (d, _) in &images[0].2 {
        assert!(
            !keys.iter().any(|k| k.ends_with(&object(d))),
            "{d} still stored"
        );
    }
    for (d, _) in &images[1].2 {
        assert!(keys.iter().any(|k| k.ends_with(&object(d))), "{d} lost");
    }
    let chunks_after = keys.iter().filter(|k| k.contains("kvblob/chunk/")).count();
    assert!(
        chunks_after < chunks_before,
        "chunks: {chunks_before} before, {chunks_after} after"
    );
    // The survivor pulls byte for byte; the deleted image's blobs do not.
    let r = admin(http.get(format!("{base}/v2/team/app/manifests/kept")))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), images[1].1);
    for (d, data) in &images[1].2 {
        let r = admin(http.get(format!("{base}/v2/team/app/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.bytes().await.unwrap()[..] == data[..], "{d}");
    }
    for (d, _) in &images[0].2 {
        let r = admin(http.get(format!("{base}/v2/team/app/blobs/{d}")))
            .send()
            .await
            .unwrap();
        let (status, code, _) = envelope_code(r).await;
        assert_eq!((status, code.as_str()), (404, "BLOB_UNKNOWN"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_admin_request_sqlite() {
    gc_admin_request(Store::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_admin_request_redis() {
    gc_admin_request(Store::Redis).await;
}
