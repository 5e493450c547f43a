//! The Valkey/Redis key-value host on its own (the whole API suite also runs on it: the
//! `redis` host of `tests/api.rs`): the key-value contract at its edges, compare-and-swap
//! under real concurrency from several connections, a 20 000-key listing walked by cursor at
//! one ZRANGEBYLEX per page, and what a dead server looks like to the store and to a client.
//! Needs `valkey-server` or `redis-server` on PATH (`.ci/run` installs it); fails without.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dockside::{Config, KeyValue, MemoryBlobs, RedisKv, Registry};
use http_body_util::Full;

#[path = "common/redis_server.rs"]
mod redis_server;

use redis_server::{RedisServer, fresh_prefix};

async fn fresh() -> RedisKv {
    RedisKv::connect(&RedisServer::shared().url, &fresh_prefix())
        .await
        .unwrap()
}

#[tokio::test]
async fn key_value_contract() {
    let kv = fresh().await;
    let other = kv.with_prefix(&fresh_prefix());

    assert_eq!(kv.get("a/b").await.unwrap(), None);
    // Values are bytes, any bytes; empty is a value, not absence.
    let binary: Vec<u8> = (0..=255).collect();
    kv.set("a/b", &binary).await.unwrap();
    kv.set("a/empty", b"").await.unwrap();
    assert_eq!(kv.get("a/b").await.unwrap(), Some(binary.clone()));
    assert_eq!(kv.get("a/empty").await.unwrap(), Some(Vec::new()));
    // Namespaces do not see each other.
    assert_eq!(other.get("a/b").await.unwrap(), None);
    assert!(other.list("", None, 10).await.unwrap().is_empty());

    // Compare-and-swap: absent vs empty vs a value.
    assert!(!kv.compare_and_swap("a/empty", None, b"x").await.unwrap());
    assert!(
        !kv.compare_and_swap("a/none", Some(b""), b"x")
            .await
            .unwrap()
    );
    assert!(
        kv.compare_and_swap("a/empty", Some(b""), b"1")
            .await
            .unwrap()
    );
    assert!(
        !kv.compare_and_swap("a/empty", Some(b""), b"2")
            .await
            .unwrap()
    );
    assert_eq!(kv.get("a/empty").await.unwrap(), Some(b"1".to_vec()));
    assert!(kv.compare_and_swap("a/new", None, b"n").await.unwrap());
    assert!(!kv.compare_and_swap("a/new", None, b"m").await.unwrap());
    assert!(
        !kv.compare_and_swap("a/b", Some(&binary[1..]), b"y")
            .await
            .unwrap()
    );
    assert!(
        kv.compare_and_swap("a/b", Some(&binary), b"y")
            .await
            .unwrap()
    );

    // A key created by compare-and-swap is listed; a deleted one is not.
    assert_eq!(
        kv.list("a/", None, 10).await.unwrap(),
        ["a/b", "a/empty", "a/new"]
    );
    kv.delete("a/empty").await.unwrap();
    kv.delete("a/empty").await.unwrap(); // absent: not an error
    assert_eq!(kv.get("a/empty").await.unwrap(), None);
    assert_eq!(kv.list("a/", None, 10).await.unwrap(), ["a/b", "a/new"]);
    assert_eq!(kv.list("a/", Some("a/b"), 10).await.unwrap(), ["a/new"]);
    assert!(kv.list("a/", None, 0).await.unwrap().is_empty());
}

/// Prefix boundaries and byte order, against `MemoryKv` (the reference: a `BTreeMap`).
#[tokio::test]
async fn listing_matches_the_memory_host() {
    let kv = fresh().await;
    let mem = dockside::MemoryKv::new();
    let keys = [
        "t", "t/", "t/a", "t/B", "t/a/b", "t/a-b", "t/a.b", "t/a_b", "t/é", "t/~", "t/\u{7f}",
        "t0", "t.", "s/x", "u",
    ];
    for k in keys {
        kv.set(k, k.as_bytes()).await.unwrap();
        mem.set(k, k.as_bytes()).await.unwrap();
    }
    for prefix in ["", "t", "t/", "t/a", "t/é", "v", "s/"] {
        for after in [
            None,
            Some(""),
            Some("a"),
            Some("t/"),
            Some("t/a"),
            Some("t/~"),
            Some("z"),
        ] {
            for limit in [1, 3, 100] {
                assert_eq!(
                    kv.list(prefix, after, limit).await.unwrap(),
                    mem.list(prefix, after, limit).await.unwrap(),
                    "prefix {prefix:?} after {after:?} limit {limit}"
                );
            }
        }
    }
}

/// Many compare-and-swaps racing on one key, from 4 connections and 32 tasks on 2 threads:
/// each round, every task read the same value and tries to replace it; exactly one wins.
/// (With the trait's default read-then-write instead of the Lua script, 49 of 50 rounds had
/// several winners when this was written.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_swap_has_one_winner_per_round() {
    const CONNECTIONS: usize = 4;
    const TASKS: usize = 32;
    const ROUNDS: usize = 50;
    let first = fresh().await;
    let mut stores = vec![first.clone()];
    for _ in 1..CONNECTIONS {
        let kv = RedisKv::connect(&RedisServer::shared().url, first.prefix())
            .await
            .unwrap();
        stores.push(kv);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let kv = stores[t % CONNECTIONS].clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for round in 0..ROUNDS {
                // Everyone reads the value the last round left, then all swap at once.
                let current = kv.get("session").await.unwrap();
                barrier.wait().await;
                let new = format!("{round}:{t}");
                if kv
                    .compare_and_swap("session", current.as_deref(), new.as_bytes())
                    .await
                    .unwrap()
                {
                    won.push(round);
                }
                // Nobody reads the next round's value before this round's swaps are done.
                barrier.wait().await;
            }
            won
        }));
    }
    let mut winners = vec![Vec::new(); ROUNDS];
    for (t, task) in tasks.into_iter().enumerate() {
        for round in task.await.unwrap() {
            winners[round].push(t);
        }
    }
    for (round, w) in winners.iter().enumerate() {
        assert_eq!(w.len(), 1, "round {round}: winners {w:?}");
    }
    let last = winners[ROUNDS - 1][0];
    assert_eq!(
        first.get("session").await.unwrap(),
        Some(format!("{}:{last}", ROUNDS - 1).into_bytes())
    );
    assert_eq!(first.list("", None, 10).await.unwrap(), ["session"]);
}

/// 20 000 keys (and neighbours outside the prefix, and another namespace), walked a page at
/// a time by cursor: every key once, in byte order, and each page one ZRANGEBYLEX.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_20000_keys_by_cursor() {
    const N: usize = 20_000;
    const PAGE: usize = 1000;
    // A server of its own, so that its command counts are this test's alone.
    let server = RedisServer::start();
    let kv = RedisKv::connect(&server.url, "a:").await.unwrap();
    let neighbour = kv.with_prefix("b:");
    let prefix = "repositories/r/_manifests/tags/";
    // Tags numbered without padding, so byte order is not numeric order; mixed case and
    // punctuation; one non-ASCII key, which sorts after every ASCII one.
    let mut expected: BTreeSet<String> = (0..N)
        .map(|i| match i % 4 {
            0 => format!("{prefix}v{i}"),
            1 => format!("{prefix}V{i}"),
            2 => format!("{prefix}v{i}-rc.1"),
            _ => format!("{prefix}_{i}"),
        })
        .collect();
    expected.insert(format!("{prefix}é"));
    let outside = [
        "repositories/r/_manifests/tags",
        "repositories/r/_manifests/tag",
        "repositories/r/_manifests/tags0",
        "repositories/r/_manifests/tags.",
        "repositories/r0/_manifests/tags/v1",
        "catalog/r",
    ];
    let started = Instant::now();
    let all: Vec<&String> = expected.iter().collect();
    for batch in all.chunks(500) {
        let writes = batch.iter().map(|k| kv.set(k, b"sha256:x"));
        for r in futures_util::future::join_all(writes).await {
            r.unwrap();
        }
    }
    for k in outside {
        kv.set(k, b"").await.unwrap();
    }
    for i in 0..100 {
        neighbour.set(&format!("{prefix}n{i}"), b"").await.unwrap();
    }
    let wrote = started.elapsed();

    let before = zrangebylex_calls(&server);
    let started = Instant::now();
    let mut listed = Vec::new();
    let mut pages = 0;
    let mut after: Option<String> = None;
    loop {
        let page = kv.list(prefix, after.as_deref(), PAGE).await.unwrap();
        pages += 1;
        assert!(page.len() <= PAGE);
        let full = page.len() == PAGE;
        after = page.last().cloned();
        listed.extend(page);
        if !full {
            break;
        }
    }
    let walked = started.elapsed();
    assert_eq!(
        zrangebylex_calls(&server) - before,
        pages,
        "one ZRANGEBYLEX per page"
    );
    assert_eq!(pages, N / PAGE + 1);

    let unique: HashSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "a key listed twice");
    assert!(listed.windows(2).all(|w| w[0] < w[1]), "not in byte order");
    assert_eq!(listed, expected.iter().cloned().collect::<Vec<_>>());
    assert_eq!(listed.last().unwrap(), &format!("{prefix}é"));

    // A page from deep in the index costs about what the first one does (O(log n + page)).
    let cursor = &listed[N - 10];
    let t = Instant::now();
    assert_eq!(kv.list(prefix, Some(cursor), PAGE).await.unwrap().len(), 10);
    let deep = t.elapsed();
    println!(
        "{} keys written in {wrote:?}; listed in {pages} pages of {PAGE} in {walked:?}; \
         a page after key {} in {deep:?}",
        expected.len(),
        N - 10
    );
    drop(server);
}

fn zrangebylex_calls(server: &RedisServer) -> usize {
    let line = server
        .info_line("commandstats", "cmdstat_zrangebylex")
        .unwrap_or_default();
    // calls=N,usec=...
    line.split(',')
        .find_map(|f| f.strip_prefix("calls="))
        .map_or(0, |n| n.parse().unwrap())
}

/// An unreachable server: `connect` fails and says where it tried; a server that goes away
/// later makes each operation a `StoreError` within seconds (no hang, no panic), which the
/// core answers with an opaque 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}/");
    let t = Instant::now();
    let err = RedisKv::connect(&url, "x:").await.unwrap_err();
    assert!(
        err.contains("cannot reach Redis") && err.contains(&port.to_string()),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "connect took {:?}",
        t.elapsed()
    );
    let err = RedisKv::connect("http://nowhere", "x:").await.unwrap_err();
    assert!(err.contains("invalid Redis URL"), "{err}");

    let server = RedisServer::start();
    let kv = RedisKv::connect(&server.url, "x:").await.unwrap();
    kv.set("catalog/r", b"").await.unwrap();
    drop(server);
    for _ in 0..2 {
        let t = Instant::now();
        let err = kv.get("catalog/r").await.unwrap_err();
        assert!(err.message.contains("redis GET catalog/r"), "{err}");
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "took {:?}",
            t.elapsed()
        );
    }
    let registry = Registry::new(kv, MemoryBlobs::new(), Config::default());
    let req = http::Request::get("/v2/_catalog")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = registry.handle(req).await;
    assert_eq!(resp.status(), 500);
}
