//! Throwaway Valkey/Redis servers for the tests of the Redis key-value host (`tests/api.rs`,
//! `tests/redis.rs`), included with `#[path]`.
//!
//! A server is never left behind, however the test process ends (panic, abort, SIGKILL, and
//! also a static that is never dropped, since Rust runs no static destructors). It is started
//! by a small `sh` watchdog whose stdin is a pipe from the test process:
//!
//! ```text
//! test process ──pipe──► sh: starts redis-server in the background, prints its pid,
//!                            `read` blocks on the pipe; at EOF: kill redis-server, wait
//! ```
//!
//! The test process never writes to the pipe. When it exits, for any reason, the kernel closes
//! its end, `read` returns, and the watchdog stops the server. (The pipe is close-on-exec, so
//! other children the tests spawn do not keep it open.) Dropping a [`RedisServer`] closes the
//! pipe too, for servers that belong to one test.
//!
//! `valkey-server` is used when installed, else `redis-server`. With neither, the tests fail
//! and say what to install: they never skip silently.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a new server may take to answer PING.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RedisServer {
    pub url: String,
    pub port: u16,
    /// The server's log (`--logfile`), shown when it does not come up.
    log: PathBuf,
    watchdog: Child,
    /// Our end of the watchdog's stdin: closing it stops the server.
    pipe: Option<ChildStdin>,
}

/// The server binary: valkey-server, else redis-server, on PATH.
fn binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["valkey-server", "redis-server"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "the Redis key-value host tests need valkey-server or redis-server on PATH: \
         install one (Debian: `apt-get install redis-server`; .ci/run does)"
    );
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().unwrap().port()
}

/// Whether something on `port` answers PING with PONG.
fn pong(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl RedisServer {
    /// Starts a server of its own on a free 127.0.0.1 port, without persistence.
    pub fn start() -> RedisServer {
        let bin = binary();
        let mut last_log = String::new();
        // The port is free when picked, but another process may take it before the server
        // binds it: then the server exits, and we try another.
        for _ in 0..5 {
            let port = free_port();
            let log = std::env::temp_dir().join(format!(
                "dockside-test-redis-{}-{port}.log",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&log);
            let mut watchdog = Command::new("sh")
                .arg("-c")
                .arg(
                    r#""$@" </dev/null >/dev/null 2>&1 & pid=$!
echo "$pid"
read -r _ || true
kill "$pid" 2>/dev/null
wait "$pid""#,
                )
                .arg("redis-watchdog")
                .arg(&bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(std::env::temp_dir())
                .arg("--logfile")
                .arg(&log)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn sh");
            let mut line = String::new();
            BufReader::new(watchdog.stdout.take().unwrap())
                .read_line(&mut line)
                .expect("read the server's pid");
            let pid: u32 = line.trim().parse().expect("the watchdog prints a pid");
            let pipe = watchdog.stdin.take();
            let server = RedisServer {
                url: format!("redis://127.0.0.1:{port}/"),
                port,
                log: log.clone(),
                watchdog,
                pipe,
            };
            let deadline = Instant::now() + STARTUP_TIMEOUT;
            while Instant::now() < deadline && alive(pid) {
                if pong(port) {
                    return server;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
            drop(server);
        }
        panic!(
            "{} did not start (log of the last attempt follows)\n{last_log}",
            bin.display()
        );
    }

    /// One server for the whole test process, started on first use.
    pub fn shared() -> &'static RedisServer {
        static SERVER: OnceLock<RedisServer> = OnceLock::new();
        SERVER.get_or_init(RedisServer::start)
    }

    /// One `INFO <section>` field, e.g. `commandstats` / `cmdstat_zrangebylex`.
    pub fn info_line(&self, section: &str, field: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("INFO {section}\r\n").as_bytes()).ok()?;
        let mut r = BufReader::new(s);
        let mut header = String::new();
        r.read_line(&mut header).ok()?;
        let len: usize = header.strip_prefix('$')?.trim().parse().ok()?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).ok()?;
        String::from_utf8(body).ok()?.lines().find_map(|l| {
            l.strip_prefix(field)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(str::to_owned)
        })
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // EOF on the watchdog's stdin: it kills the server and waits for it.
        drop(self.pipe.take());
        let _ = self.watchdog.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A namespace no other test (or earlier run) uses.
pub fn fresh_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "t{}-{nanos}-{}:",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
