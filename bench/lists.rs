//! Listing cost on the local-directory host: `cargo run --release --example lists [-- N ...]`.
//!
//! Creates N tags of one repository straight through `FsKv` (no fsync), then times, through
//! `Registry::handle`: the whole tags list (no `n`, which also fills the listing cache); a walk
//! of every page with `n=1000` following the `Link` header while the directory keeps changing
//! (a tag written and deleted before each page: the cache catches up from the directory's
//! change journal, two records); and the same walk with the directory unchanged.

use std::time::Instant;

use bytes::Bytes;
use dockside::{Config, FsBlobs, FsKv, KeyValue, Registry};
use http_body_util::{BodyExt, Full};

async fn get(r: &Registry<FsKv, FsBlobs>, uri: &str) -> (serde_json::Value, Option<String>) {
    let req = http::Request::get(uri)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = r.handle(req).await;
    assert_eq!(resp.status(), 200);
    let link = resp.headers().get("link").map(|l| {
        let l = l.to_str().unwrap();
        l[1..l.find('>').unwrap()].to_owned()
    });
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (serde_json::from_slice(&body).unwrap(), link)
}

/// Walks every page of n=1000; returns the pages and the seconds taken.
async fn walk(r: &Registry<FsKv, FsBlobs>, kv: &FsKv, n: usize, churn: bool) -> (usize, f64) {
    let t = Instant::now();
    let (mut pages, mut seen) = (0, 0);
    let mut next = Some("/v2/r/tags/list?n=1000".to_owned());
    while let Some(uri) = next.take() {
        if churn {
            let k = "repositories/r/_manifests/tags/zz-churn";
            kv.set(k, b"").await.unwrap();
            kv.delete(k).await.unwrap();
        }
        let (body, link) = get(r, &uri).await;
        seen += body["tags"].as_array().unwrap().len();
        pages += 1;
        next = link;
    }
    assert_eq!(seen, n);
    (pages, t.elapsed().as_secs_f64())
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a tag count"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10_000, 20_000, 40_000, 80_000]
    } else {
        sizes
    };
    futures_executor::block_on(async {
        for n in sizes {
            let dir = tempfile::tempdir().unwrap();
            let kv = FsKv::new(dir.path().join("kv")).unwrap().fsync(false);
            kv.set("catalog/r", b"").await.unwrap();
            for i in 0..n {
                let key = format!("repositories/r/_manifests/tags/t{i:07}");
                kv.set(&key, b"sha256:00").await.unwrap();
            }
            let r = Registry::new(
                kv.clone(),
                FsBlobs::new(dir.path()).unwrap(),
                Config::default(),
            );
            let t = Instant::now();
            let (body, _) = get(&r, "/v2/r/tags/list").await;
            let whole = t.elapsed().as_secs_f64();
            assert_eq!(body["tags"].as_array().unwrap().len(), n);
            let (pages, changing) = walk(&r, &kv, n, true).await;
            let (_, settled) = walk(&r, &kv, n, false).await;
            println!(
                "{n:>7} tags: whole list {whole:.3} s; {pages} pages of n=1000: \
                 {changing:.3} s changing ({:.2} ms/page), {settled:.3} s unchanged ({:.2} ms/page)",
                changing * 1000.0 / pages as f64,
                settled * 1000.0 / pages as f64
            );
        }
    });
}
