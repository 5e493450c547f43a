#![allow(dead_code)]
//! A real S3 server for the tests: Garage (crates.io `garage`, installed by `.ci/backends`),
//! single node, on free loopback ports, with a bucket and a key made at start.
//!
//! One server per test process, started on first use. It is stopped when the test process
//! ends, however it ends: it runs under a small shell that holds a pipe from this process on
//! its stdin, and kills Garage (and removes its directory) when that pipe closes.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub struct Garage {
    /// `http://127.0.0.1:PORT`: the S3 API.
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    /// Garage's own log (one line per S3 request), when the test started it.
    pub log: Option<std::path::PathBuf>,
    _guard: Option<Mutex<(Child, ChildStdin)>>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).unwrap();
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Garage binary: `DOCKSIDE_GARAGE`, else where `.ci/backends` installs it.
pub fn garage_bin() -> String {
    if let Ok(b) = std::env::var("DOCKSIDE_GARAGE") {
        return b;
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let b = format!("{home}/.cache/dockside-ci/garage-2.5.0/bin/garage");
    assert!(
        std::path::Path::new(&b).exists(),
        "Garage is not installed at {b}: run .ci/backends (which installs it) or set DOCKSIDE_GARAGE"
    );
    b
}

/// The shared Garage of this test process; or, when `DOCKSIDE_TEST_S3_ENDPOINT` is set, that
/// S3 server instead (with `DOCKSIDE_TEST_S3_BUCKET`, `_ACCESS_KEY`, `_SECRET_KEY`, `_REGION`),
/// to run the suite against another engine.
pub fn garage() -> &'static Garage {
    static G: OnceLock<Garage> = OnceLock::new();
    G.get_or_init(|| match std::env::var("DOCKSIDE_TEST_S3_ENDPOINT") {
        Ok(endpoint) => {
            let var = |k: &str| {
                std::env::var(format!("DOCKSIDE_TEST_S3_{k}"))
                    .unwrap_or_else(|_| panic!("DOCKSIDE_TEST_S3_{k} is not set"))
            };
            Garage {
                endpoint,
                bucket: var("BUCKET"),
                access_key: var("ACCESS_KEY"),
                secret_key: var("SECRET_KEY"),
                region: var("REGION"),
                log: None,
                _guard: None,
            }
        }
        Err(_) => start(),
    })
}

fn start() -> Garage {
    let bin = garage_bin();
    let dir = tempfile::tempdir().unwrap().keep();
    let (rpc, s3, admin) = (free_port(), free_port(), free_port());
    let config = dir.join("garage.toml");
    std::fs::write(
        &config,
        format!(
            r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
            d = dir.display(),
            secret = hex(32),
        ),
    )
    .unwrap();
    let access_key = format!("GK{}", hex(12));
    let secret_key = hex(32);
    let bucket = "dockside-test".to_owned();
    // The shell waits on its stdin (our pipe); when it closes, Garage goes.
    let script = format!(
        r#"GARAGE_DEFAULT_ACCESS_KEY={access_key} GARAGE_DEFAULT_SECRET_KEY={secret_key} \
GARAGE_DEFAULT_BUCKET={bucket} "$0" -c "$1" server --single-node --default-bucket >"$2/log" 2>&1 &
pid=$!
cat >/dev/null
kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$2""#
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(&bin)
        .arg(&config)
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start sh for Garage");
    let stdin = child.stdin.take().unwrap();
    let endpoint = format!("http://127.0.0.1:{s3}");
    // Serving once the admin API says healthy and the S3 API answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if healthy(admin) && std::net::TcpStream::connect(("127.0.0.1", s3)).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            panic!("Garage did not become healthy within 60 s:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Garage {
        endpoint,
        bucket,
        access_key,
        secret_key,
        region: "garage".into(),
        log: Some(dir.join("log")),
        _guard: Some(Mutex::new((child, stdin))),
    }
}

fn healthy(admin: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.contains(" 200 ")
}

impl Garage {
    /// What Garage has logged so far (requests: `ADDR (key K) METHOD URI`, query included).
    /// Panics for an outside S3 server, whose requests this process cannot see.
    pub fn log_text(&self) -> String {
        let path = self
            .log
            .as_ref()
            .expect("Garage's log: not available with DOCKSIDE_TEST_S3_ENDPOINT");
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// An `s3://` URL for this Garage's bucket under `prefix`, and the settings it needs.
    pub fn url(&self, prefix: &str) -> String {
        format!(
            "s3://{}/{prefix}?endpoint={}&region={}",
            self.bucket, self.endpoint, self.region
        )
    }

    /// Credentials as the environment would give them.
    pub fn env(&self) -> impl Fn(&str) -> Option<String> + '_ {
        move |k| match k {
            "DOCKSIDE_S3_ACCESS_KEY" => Some(self.access_key.clone()),
            "DOCKSIDE_S3_SECRET_KEY" => Some(self.secret_key.clone()),
            _ => None,
        }
    }
}

/// A fresh, unique key prefix, so tests sharing the bucket never see each other's objects.
pub fn unique_prefix() -> String {
    format!("t-{}", hex(6))
}

/// Every object under the configuration's prefix (prefix stripped), sorted: to check what a
/// test left in the bucket.
pub async fn list_objects(config: &dockside::S3Config) -> Vec<String> {
    use rusty_s3::S3Action as _;
    let bucket = rusty_s3::Bucket::new(
        config.endpoint.parse().unwrap(),
        rusty_s3::UrlStyle::Path,
        config.bucket.clone(),
        config.region.clone(),
    )
    .unwrap();
    let creds = rusty_s3::Credentials::new(&config.access_key, &config.secret_key);
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut action = rusty_s3::actions::ListObjectsV2::new(&bucket, Some(&creds));
        action.with_prefix(config.prefix.clone());
        if let Some(t) = &token {
            action.with_continuation_token(t.clone());
        }
        let url = action.sign(Duration::from_secs(60));
        let text = reqwest::get(url.as_str())
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let resp = rusty_s3::actions::ListObjectsV2::parse_response(&text)
            .unwrap_or_else(|e| panic!("ListObjectsV2: {e}: {text}"));
        for c in resp.contents {
            out.push(c.key[config.prefix.len()..].to_owned());
        }
        match resp.next_continuation_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    out.sort();
    out
}
