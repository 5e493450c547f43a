//! Hostile anonymous clients against the real server (issue 9): connections that stall mid-body
//! or mid-headers must not hold up anyone else, a refused `Expect: 100-continue` request gets its
//! answer without `100 Continue`, and a burst of Basic credentials for unknown users runs a
//! bounded number of password checks (bounded memory).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Server, client, proc_status_kib, sha256_digest};
use reqwest::StatusCode;

const SECRET: &str = "an-edge-wide-secret-of-at-least-32-bytes";

/// How many connections stall at once: more than tokio's blocking pool (512 threads).
const STALLS: usize = 600;

/// An `[auth]` configuration with `alice` (password `alice-pw`, hashed by `hash`) who may push
/// to `alice/**`.
fn write_config(dir: &std::path::Path, hash: &str) -> std::path::PathBuf {
    let path = dir.join("dockside.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[auth]
service = "dockside-test"

[[auth.users]]
name = "alice"
password_hash = "{hash}"

[[auth.rules]]
repositories = ["alice/**"]
users = ["alice"]
actions = ["pull", "push", "delete"]
"#
        ),
    )
    .unwrap();
    path
}

/// A server with access control on and `env` (the limits under test, set through their
/// `DOCKSIDE_*` variables).
fn start(dir: &std::path::Path, hash: &str, env: &[(&str, &str)]) -> Server {
    // The binary: the limits come from its DOCKSIDE_* variables, and its RSS is measured.
    let mut b = Server::builder()
        .arg("--config")
        .arg(write_config(dir, hash))
        .env("DOCKSIDE_AUTH_SECRET", SECRET);
    for (k, v) in env {
        b = b.env(k, v);
    }
    b.start()
}

/// The soft limit on open files must allow the stalled connections (the server inherits it).
fn ensure_open_file_limit(needed: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current.is_some_and(|c| c < needed) {
        lim.current = Some(lim.maximum.map_or(needed, |m| m.min(needed)));
        setrlimit(Resource::Nofile, lim).expect("raise the soft limit on open files");
    }
    let cur = getrlimit(Resource::Nofile).current;
    assert!(
        cur.is_none_or(|c| c >= needed),
        "this test needs {needed} open files; the hard limit allows {cur:?}"
    );
}

/// One authenticated push with Basic credentials: a blob in one POST, then a manifest. Returns
/// how long it took.
async fn push(c: &reqwest::Client, s: &Server, tag: &str) -> Duration {
    let start = Instant::now();
    let config = format!("{{\"tag\":\"{tag}\"}}");
    let digest = sha256_digest(config.as_bytes());
    let r = c
        .post(s.url(&format!("/v2/alice/app/blobs/uploads/?digest={digest}")))
        .basic_auth("alice", Some("alice-pw"))
        .body(config.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest,
            "size": config.len(),
        },
        "layers": [],
    });
    let r = c
        .put(s.url(&format!("/v2/alice/app/manifests/{tag}")))
        .basic_auth("alice", Some("alice-pw"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&manifest).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    start.elapsed()
}

/// Reads until the end of the response head (or EOF, or the socket's read timeout).
fn read_head(sock: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match sock.read(&mut byte)? {
            0 => break,
            _ => head.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_do_not_delay_an_authenticated_push() {
    ensure_open_file_limit(4 * STALLS as u64);
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("alice-pw", 4).unwrap();
    // The stalled bodies must stay stalled for the whole test: a long body timeout.
    let s = start(dir.path(), &hash, &[("DOCKSIDE_BODY_TIMEOUT", "120")]);
    let c = client();

    // Unstalled: warm up, then the baseline.
    push(&c, &s, "warm").await;
    let baseline = push(&c, &s, "baseline").await;

    // 600 connections send a manifest PUT's headers, 2 of its 1000 bytes, and nothing more.
    let addr = s.addr();
    let mut stalls = tokio::task::spawn_blocking(move || {
        (0..STALLS)
            .map(|i| {
                let mut sock = TcpStream::connect(addr).unwrap();
                write!(
                    sock,
                    "PUT /v2/alice/app/manifests/stall{i} HTTP/1.1\r\nHost: {addr}\r\n\
                     Content-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                     Content-Length: 1000\r\n\r\n{{}}"
                )
                .unwrap();
                sock
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    // Let the server take them all in before measuring (setup, not an assertion: it can only
    // make the push below slower).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let bound = baseline + Duration::from_secs(1);
    let stalled = tokio::time::timeout(bound + Duration::from_secs(20), push(&c, &s, "stalled"))
        .await
        .unwrap_or_else(|_| panic!("the push did not finish within {bound:?} + 20 s"));
    eprintln!("push: {baseline:?} unstalled, {stalled:?} with {STALLS} stalled uploads");
    assert!(
        stalled <= bound,
        "600 stalled uploads delayed an authenticated push: {stalled:?} against {baseline:?} \
         unstalled"
    );

    // Each stalled PUT was refused before its body (no credentials): its 401 came at once,
    // without waiting for the 998 bytes that never come.
    let checked = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        for sock in &mut stalls {
            let left = deadline.saturating_duration_since(Instant::now());
            sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let head = read_head(sock).unwrap_or_else(|e| {
                panic!("a stalled PUT got no answer while its body was pending: {e}")
            });
            assert!(head.starts_with("HTTP/1.1 401"), "{head}");
        }
        stalls.len()
    })
    .await
    .unwrap();
    assert_eq!(checked, STALLS);
}

#[test]
fn refused_patch_with_expect_continue_gets_401_without_100_continue() {
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("alice-pw", 4).unwrap();
    let s = start(dir.path(), &hash, &[]);
    let mut sock = TcpStream::connect(s.addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        sock,
        "PATCH /v2/alice/app/blobs/uploads/0123456789abcdef0123456789abcdef HTTP/1.1\r\n\
         Host: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\
         Expect: 100-continue\r\n\r\n",
        s.addr()
    )
    .unwrap();
    let head = read_head(&mut sock).expect("an answer without sending the body");
    assert!(
        head.starts_with("HTTP/1.1 401"),
        "expected 401 at once, got: {head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer")
    );
}

/// Whether the server closed `sock`: a read returns end of file (or a reset), possibly after
/// an error response such as 408.
fn closed_by_server(sock: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false, // the read timed out: still open
        }
    }
}

#[test]
fn half_sent_headers_and_idle_connections_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("alice-pw", 4).unwrap();
    let s = start(dir.path(), &hash, &[("DOCKSIDE_HEADER_TIMEOUT", "1")]);
    let started = Instant::now();

    // Half of a request's headers, then nothing.
    let mut half = TcpStream::connect(s.addr()).unwrap();
    write!(half, "GET /v2/ HTTP/1.1\r\nHost: {}\r\n", s.addr()).unwrap();
    // A connection that sends nothing at all.
    let mut silent = TcpStream::connect(s.addr()).unwrap();
    // A keep-alive connection, idle after one request.
    let mut idle = TcpStream::connect(s.addr()).unwrap();
    write!(idle, "GET /v2/ HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr()).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let head = read_head(&mut idle).unwrap();
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    let mut body = vec![0u8; len];
    idle.read_exact(&mut body).unwrap();

    // With a 1 s header timeout, all three are closed long before 20 s.
    for (what, sock) in [
        ("half-sent headers", &mut half),
        ("a silent connection", &mut silent),
        ("an idle keep-alive connection", &mut idle),
    ] {
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        assert!(closed_by_server(sock), "{what} was not closed in 20 s");
    }
    assert!(started.elapsed() >= Duration::from_secs(1));

    // The server still answers.
    let mut ok = TcpStream::connect(s.addr()).unwrap();
    ok.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        ok,
        "GET /v2/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        s.addr()
    )
    .unwrap();
    assert!(read_head(&mut ok).unwrap().starts_with("HTTP/1.1 401"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_basic_checks_are_bounded() {
    const CLIENTS: usize = 96;
    let dir = tempfile::tempdir().unwrap();
    let hash = dockside::auth::hash_password("alice-pw", false).unwrap();
    assert!(hash.starts_with("$argon2id$"));
    let s = start(dir.path(), &hash, &[("DOCKSIDE_MAX_PASSWORD_CHECKS", "2")]);
    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(600))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let idle = proc_status_kib(s.pid(), "VmRSS:");

    let answers = futures_util::future::join_all((0..CLIENTS).map(|i| {
        let c = c.clone();
        let url = s.url("/v2/");
        async move {
            let r = c
                .get(url)
                .basic_auth(format!("nobody{i}"), Some("guess"))
                .send()
                .await
                .unwrap();
            let status = r.status();
            let retry = r.headers().get("retry-after").cloned();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, retry, body)
        }
    }))
    .await;

    let mut refused = 0;
    for (status, retry, body) in &answers {
        match *status {
            StatusCode::UNAUTHORIZED => assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED"),
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
                assert!(retry.is_some(), "429 without Retry-After");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(refused < CLIENTS, "every check was refused");

    // Two argon2id checks (19 MiB each) at a time, not 96.
    let peak = proc_status_kib(s.pid(), "VmHWM:");
    let after = proc_status_kib(s.pid(), "VmRSS:");
    eprintln!(
        "idle {idle} KiB, peak {peak} KiB, after {after} KiB; {refused} of {CLIENTS} got 429"
    );
    assert!(
        peak < idle + 150 * 1024,
        "peak RSS {peak} KiB for {CLIENTS} concurrent Basic checks (idle {idle} KiB)"
    );
    assert!(
        after < idle + 64 * 1024,
        "RSS stayed at {after} KiB after the burst (idle {idle} KiB)"
    );
}
