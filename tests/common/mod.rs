//! Shared by the integration tests: a real `dockside serve` process per test, and small helpers
//! for talking to it.
//!
//! Every [`Server`] listens on `127.0.0.1` (an ephemeral port), stores in its own temporary
//! directory unless told otherwise, has its stderr drained by a background thread (so the pipe
//! never fills, and the log stays available to the test), and is killed when dropped.

// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256, Sha512};

pub mod scenarios;
pub mod tls;

/// How long a server may take to print its "listening on" line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a server may take to exit after SIGTERM when idle.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this many stderr lines are kept per server (the oldest go first).
const MAX_LOG_LINES: usize = 20_000;

/// The server's stderr, line by line, as the drain thread reads it.
#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    /// Set once stderr reached end of file (the process exited or closed it).
    closed: bool,
}

#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

impl Log {
    fn push(&self, line: String) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.lines.len() >= MAX_LOG_LINES {
            s.lines.drain(..MAX_LOG_LINES / 2);
        }
        s.lines.push(line);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.changed.notify_all();
    }

    /// Waits until a line satisfies `pred` (returning it), stderr closes, or `timeout` passes.
    fn wait_for(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(l) = s.lines.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if s.closed || now >= deadline {
                return None;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn snapshot(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .clone()
    }
}

/// Options for starting a [`Server`]: extra command-line arguments, environment variables, and
/// the data directory.
#[derive(Default)]
pub struct ServerBuilder {
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    data: Option<PathBuf>,
    wrapper: Vec<OsString>,
}

impl ServerBuilder {
    /// An extra argument after `serve --listen 127.0.0.1:0 --data DIR`, e.g. `--no-delete`.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable for the server process (all inherited `DOCKSIDE_*` variables are
    /// removed, so only these apply).
    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Stores in `dir` (which the caller owns and keeps) instead of a fresh temporary directory:
    /// for restarting a server on the same data.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data = Some(dir.into());
        self
    }

    /// Runs the server through `wrapper` (a command that ends by `exec`ing its remaining
    /// arguments, the server's command line), e.g. `unshare` with a private mount.
    pub fn wrapper<I, S>(mut self, wrapper: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.wrapper = wrapper.into_iter().map(Into::into).collect();
        self
    }

    /// Starts the server and waits until it listens. Panics, with the server's output, if it
    /// exits or does not listen within [`STARTUP_TIMEOUT`].
    pub fn start(self) -> Server {
        assert!(
            !self
                .args
                .iter()
                .any(|a| a.to_string_lossy().starts_with("--listen")),
            "test servers always listen on 127.0.0.1:0; do not pass --listen"
        );
        let (tmp, data) = match self.data {
            Some(d) => (None, d),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("dockside-test-")
                    .tempdir()
                    .expect("create a temporary data directory");
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let mut cmd = match self.wrapper.split_first() {
            None => Command::new(env!("CARGO_BIN_EXE_dockside")),
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(env!("CARGO_BIN_EXE_dockside"));
                c
            }
        };
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data")
            .arg(&data)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The environment of whoever runs the tests must not change the server under test.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DOCKSIDE_") {
                cmd.env_remove(&k);
            }
        }
        // The "listening on" line is logged at info level.
        cmd.env("DOCKSIDE_LOG", "info");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the dockside binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Log::default());
        let drain = log.clone();
        std::thread::Builder::new()
            .name("dockside-stderr".into())
            .spawn(move || {
                let mut r = BufReader::new(stderr);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf);
                            drain.push(line.trim_end().to_owned());
                        }
                    }
                }
                drain.close();
            })
            .expect("spawn the stderr drain thread");

        let mut server = Server {
            child,
            exit: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data,
            _tmp: tmp,
            log,
            https: false,
        };
        let Some(line) = server.log.wait_for(
            |l| l.contains("listening on http://") || l.contains("listening on https://"),
            STARTUP_TIMEOUT,
        ) else {
            let status = server.child.try_wait().ok().flatten();
            let _ = server.child.kill();
            let _ = server.child.wait();
            panic!(
                "dockside did not report listening within {STARTUP_TIMEOUT:?} (exit status: \
                 {status:?}); its stderr:\n{}",
                server.log.snapshot().join("\n")
            );
        };
        server.https = line.contains("listening on https://");
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_once("://"))
            .map(|(_, rest)| rest)
            .and_then(|rest| rest.split([',', ' ']).next())
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("cannot parse the address from {line:?}"));
        assert_eq!(
            addr.ip(),
            std::net::IpAddr::from([127, 0, 0, 1]),
            "the test server must listen on 127.0.0.1 only: {line}"
        );
        assert_ne!(addr.port(), 0, "{line}");
        server.addr = addr;
        server
    }
}

/// A running `dockside serve` process.
pub struct Server {
    child: Child,
    exit: Option<ExitStatus>,
    addr: SocketAddr,
    data: PathBuf,
    /// The temporary data directory, when the server owns it; removed after the process ends.
    _tmp: Option<tempfile::TempDir>,
    log: Arc<Log>,
    /// It serves HTTPS (`--tls-cert`).
    https: bool,
}

impl Server {
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// A server with the default options and a fresh data directory.
    pub fn start() -> Server {
        Server::builder().start()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS), without a trailing slash.
    pub fn base_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// `base_url()` followed by `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        assert!(path.starts_with('/'), "{path}");
        format!("{}{path}", self.base_url())
    }

    /// An absolute URL for a `Location` header value, which may be absolute or relative.
    pub fn resolve(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_owned()
        } else {
            self.url(location)
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The stderr lines read so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.snapshot()
    }

    /// Waits for a stderr line containing `needle`; panics with the log if none comes in time.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.log
            .wait_for(|l| l.contains(needle), timeout)
            .unwrap_or_else(|| {
                panic!(
                    "no stderr line containing {needle:?} within {timeout:?}; stderr:\n{}",
                    self.log.snapshot().join("\n")
                )
            })
    }

    /// Sends SIGTERM with `kill -TERM <pid>`.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill -TERM {} failed: {status}",
            self.pid()
        );
    }

    /// SIGKILL: the process dies at once, in the middle of whatever requests it was serving.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        self.child.kill().expect("send SIGKILL");
        let status = self.child.wait().expect("wait for the killed process");
        self.exit = Some(status);
        status
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_some() {
            return self.exit;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exit = Some(status);
                return self.exit;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits for a clean exit. Panics (with the log) if the process does not exit
    /// within [`STOP_TIMEOUT`] or exits unsuccessfully. The data directory is kept as long as the
    /// returned value's owner keeps it (a caller-owned directory is never removed here).
    pub fn stop(mut self) -> ExitStatus {
        self.terminate();
        let Some(status) = self.wait_exit(STOP_TIMEOUT) else {
            panic!(
                "dockside did not exit within {STOP_TIMEOUT:?} of SIGTERM; stderr:\n{}",
                self.log.snapshot().join("\n")
            );
        };
        assert!(
            status.success(),
            "dockside exited with {status} after SIGTERM; stderr:\n{}",
            self.log.snapshot().join("\n")
        );
        status
    }

    /// The process's `VmHWM` (peak resident set size) in KiB, from `/proc/<pid>/status`.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// The process's `VmRSS` (current resident set size) in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let lines = self.log.snapshot();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "---- dockside stderr (last {} lines) ----\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// A `kB` field of `/proc/<pid>/status`.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{status}"))
}

/// An HTTP client for the tests: no proxy (the server is on loopback), and a timeout so a hung
/// server fails the test instead of hanging it.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("build the HTTP client")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

/// `sha512:<hex>` of `data`.
pub fn sha512_digest(data: &[u8]) -> String {
    format!("sha512:{}", hex(&Sha512::digest(data)))
}

/// `sha256:<hex>` of a finished hasher.
pub fn sha256_finish(h: Sha256) -> String {
    format!("sha256:{}", hex(&h.finalize()))
}

/// `len` deterministic pseudo-random bytes (xorshift64*), different for each `seed`.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------------------------
// The mirror's streaming tests (tests/edge.rs, tests/spin.rs)

/// An upstream for the mirror tests: a test registry in a temporary directory (so that a
/// test can corrupt what it stores), with the access control of `scenarios::auth_toml` and,
/// when given, a token realm of its own (`DOCKSIDE_AUTH_REALM`).
pub fn upstream_with_scenario_auth(realm: Option<&str>) -> dockside::testing::TestRegistry {
    let auth = dockside::AuthConfig::from_settings(
        |k| match k {
            "DOCKSIDE_AUTH_SECRET" => Some(scenarios::AUTH_SECRET.to_owned()),
            "DOCKSIDE_AUTH_REALM" => realm.map(str::to_owned),
            _ => None,
        },
        Some(&scenarios::auth_toml()),
    )
    .expect("the scenario's access configuration")
    .map(Arc::new);
    dockside::testing::TestRegistry::builder()
        .temp_dir()
        .config(dockside::Config {
            auth,
            ..Default::default()
        })
        .start()
}

/// How many requests `registry` answered with `method` on `path` (the query aside), with
/// `status` when given.
pub fn served(
    registry: &dockside::testing::TestRegistry,
    method: &str,
    path: &str,
    status: Option<u16>,
) -> usize {
    registry
        .requests()
        .iter()
        .filter(|r| {
            r.method == method
                && r.path.split('?').next() == Some(path)
                && status.is_none_or(|s| r.status == s)
        })
        .count()
}

/// Seeds a blob upstream (a test registry in a directory), then corrupts one byte near its end
/// in the upstream's own store: the digest the mirror is asked for no longer matches what the
/// upstream sends.
pub async fn seed_corrupted(
    http: &reqwest::Client,
    up: &dockside::testing::TestRegistry,
    repo: &str,
) -> (String, usize) {
    let len = 3 * 1024 * 1024 + 11;
    let data = pseudo_random(len, 80);
    let d = sha256_digest(&data);
    let r = http
        .post(format!("{}/v2/{repo}/blobs/uploads/?digest={d}", up.url()))
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let hex = d.trim_start_matches("sha256:");
    let path = up
        .data_dir()
        .expect("an upstream storing in a directory")
        .join(format!("blobs/sha256/{}/{hex}", &hex[..2]));
    let mut bad = std::fs::read(&path).unwrap();
    bad[len - 50] ^= 0xff;
    std::fs::write(&path, &bad).unwrap();
    (d, len)
}

/// GETs `url` twice: each time a 200 whose body then fails short of `len` bytes (never a clean
/// end with wrong bytes), so nothing was cached in between.
pub async fn assert_streamed_transfer_fails(http: &reqwest::Client, url: &str, len: usize) {
    for _ in 0..2 {
        let mut r = http.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let mut got = 0;
        let failed = loop {
            match r.chunk().await {
                Ok(Some(c)) => got += c.len(),
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        assert!(
            failed && got < len,
            "{got} of {len} bytes, failed: {failed}"
        );
    }
}
