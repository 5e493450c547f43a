//! The scale section (`--sections scale`): many tags in one repository and many repositories,
//! on dockside (directory host, fsync on) and distribution, each started fresh for it.
//!
//! For each registry: one tiny image is pushed, then tagged `DOCKSIDE_BENCH_TAGS` times (100 000
//! by default) in one repository by `--connections` clients at once (tag PUTs/s), then the tags
//! list is read: its first page and its last page (`n=100`, the last with `last=`), each the
//! median of 20, and the whole list walked by following `Link` with `n=1000`. Then the image
//! goes into `DOCKSIDE_BENCH_REPOS` repositories (10 000 by default: two blob mounts and a
//! manifest PUT each, repositories/s), and the catalog is read the same way.

use std::time::Instant;

use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};

use crate::{Figure, Opts, Target, client, line, start_distribution, start_dockside};

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sha256(data: &[u8]) -> String {
    format!(
        "sha256:{}",
        Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// A tiny image: its config and layer (data, digest) and its manifest.
struct Image {
    blobs: Vec<(Vec<u8>, String)>,
    manifest: Vec<u8>,
}

fn image() -> Image {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let layer = b"a small layer for the scale section".to_vec();
    let (cd, ld) = (sha256(&config), sha256(&layer));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}],
    }))
    .unwrap();
    Image {
        blobs: vec![(config, cd), (layer, ld)],
        manifest,
    }
}

async fn push_blobs(c: &reqwest::Client, t: &Target, repo: &str, img: &Image) {
    for (data, digest) in &img.blobs {
        let r = c
            .post(format!("{}/v2/{repo}/blobs/uploads/", t.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}: POST upload", t.name);
        let loc = crate::resolve(&t.base, r.headers()["location"].to_str().unwrap());
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = c
            .put(format!("{loc}{sep}digest={digest}"))
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}: blob PUT", t.name);
    }
}

async fn put_manifest(c: &reqwest::Client, t: &Target, repo: &str, reference: &str, m: &[u8]) {
    let r = c
        .put(format!("{}/v2/{repo}/manifests/{reference}", t.base))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(m.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        201,
        "{}: manifest PUT {repo}:{reference}",
        t.name
    );
}

/// Runs `job(i)` for `i` in `0..n`, `conns` at a time; returns the rate per second.
async fn run_all<F, Fut>(n: usize, conns: usize, job: F) -> f64
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let t0 = Instant::now();
    futures_util::stream::iter(0..n)
        .map(job)
        .buffer_unordered(conns)
        .collect::<Vec<()>>()
        .await;
    n as f64 / t0.elapsed().as_secs_f64()
}

/// A GET of a listing: (names in it, the next page's URL from `Link`).
async fn get_list(
    c: &reqwest::Client,
    t: &Target,
    url: &str,
    field: &str,
) -> (usize, Option<String>) {
    let r = c.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}: GET {url}", t.name);
    let link = r.headers().get("link").map(|l| {
        let l = l.to_str().unwrap();
        crate::resolve(&t.base, &l[1..l.find('>').unwrap()])
    });
    let v: serde_json::Value = r.json().await.unwrap();
    (v[field].as_array().map_or(0, Vec::len), link)
}

/// Latencies (ms) of 20 GETs of `url`, and how many names the last one held (a registry that
/// ignores `n` answers with the whole list: the figure says so).
async fn page_ms(c: &reqwest::Client, t: &Target, url: &str, field: &str) -> (Figure, usize) {
    let mut f = Figure::new();
    let mut got = 0;
    for _ in 0..20 {
        let t0 = Instant::now();
        got = get_list(c, t, url, field).await.0;
        f.values.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    (f, got)
}

/// Walks a listing from `first` by `Link`; returns (seconds, pages, names seen).
async fn walk(c: &reqwest::Client, t: &Target, first: String, field: &str) -> (f64, usize, usize) {
    let t0 = Instant::now();
    let (mut pages, mut seen) = (0, 0);
    let mut next = Some(first);
    while let Some(url) = next.take() {
        let (n, link) = get_list(c, t, &url, field).await;
        pages += 1;
        seen += n;
        next = link;
    }
    (t0.elapsed().as_secs_f64(), pages, seen)
}

/// One listing's figures: first page, last page, the walk.
async fn listing(
    c: &reqwest::Client,
    t: &Target,
    path: &str,
    field: &str,
    last: &str,
    total: usize,
    what: &str,
) {
    let (first, got) = page_ms(c, t, &format!("{}{path}?n=100", t.base), field).await;
    line(
        &t.name,
        &format!("{what}: first page (n=100)"),
        &first,
        &format!("ms ({got} names)"),
    );
    let url = format!("{}{path}?n=100&last={last}", t.base);
    let (last_page, got) = page_ms(c, t, &url, field).await;
    line(
        &t.name,
        &format!("{what}: last page (n=100)"),
        &last_page,
        &format!("ms ({got} names)"),
    );
    let (secs, pages, seen) = walk(c, t, format!("{}{path}?n=1000", t.base), field).await;
    if seen != total {
        eprintln!("{}: {what}: the walk saw {seen} names of {total}", t.name);
    }
    let mut f = Figure::new();
    f.values.push(secs);
    line(
        &t.name,
        &format!("{what}: walk by Link (n=1000)"),
        &f,
        &format!("s ({pages} pages, {seen} names)"),
    );
}

async fn measure(t: &Target, o: &Opts, tags: usize, repos: usize) {
    let c = client();
    let img = image();
    let digest = sha256(&img.manifest);
    // Many tags in one repository.
    push_blobs(&c, t, "scale/tags", &img).await;
    put_manifest(&c, t, "scale/tags", &digest, &img.manifest).await;
    // The first tenth (at most 1000) one at a time, the rest by all the clients at once: a
    // small write's rate alone, then with concurrent writes whose fsyncs can share commits.
    let alone = (tags / 10).min(1000);
    for (range, conns) in [(0..alone, 1), (alone..tags, o.connections)] {
        let n = range.len();
        let rate = run_all(n, conns, |i| {
            let (c, m) = (&c, &img.manifest);
            let tag = format!("t{:07}", range.start + i);
            async move { put_manifest(c, t, "scale/tags", &tag, m).await }
        })
        .await;
        let mut f = Figure::new();
        f.values.push(rate);
        line(
            &t.name,
            &format!("tag PUTs, {conns} client(s)"),
            &f,
            &format!("tags/s ({n} tags)"),
        );
    }
    let last = format!("t{:07}", tags.saturating_sub(2));
    listing(
        &c,
        t,
        "/v2/scale/tags/tags/list",
        "tags",
        &last,
        tags,
        "tags list",
    )
    .await;
    // Many repositories: the blobs mounted from the first, the manifest put by digest.
    let rate = run_all(repos, o.connections, |i| {
        let (c, img) = (&c, &img);
        async move {
            let repo = format!("scale/r{i:06}");
            for (_, d) in &img.blobs {
                let r = c
                    .post(format!(
                        "{}/v2/{repo}/blobs/uploads/?mount={d}&from=scale/tags",
                        t.base
                    ))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201, "{}: mount into {repo}", t.name);
            }
            put_manifest(c, t, &repo, "latest", &img.manifest).await;
        }
    })
    .await;
    let mut f = Figure::new();
    f.values.push(rate);
    line(
        &t.name,
        &format!("repositories, {} clients", o.connections),
        &f,
        &format!("repos/s ({repos}: 2 mounts + 1 manifest PUT each)"),
    );
    // The catalog holds the repositories, then scale/tags: the last page's cursor is the last
    // repository.
    let last = format!("scale/r{:06}", repos.saturating_sub(1));
    listing(
        &c,
        t,
        "/v2/_catalog",
        "repositories",
        &last,
        repos + 1,
        "catalog",
    )
    .await;
}

pub async fn section(dir: &std::path::Path, o: &Opts) {
    let tags = env_count("DOCKSIDE_BENCH_TAGS", 100_000);
    let repos = env_count("DOCKSIDE_BENCH_REPOS", 10_000);
    println!(
        "\n# scale: {tags} tags in one repository, {repos} repositories, {} clients (fresh registries)",
        o.connections
    );
    if o.target("dockside") {
        let t = start_dockside(dir, "dockside-scale", &[]);
        measure(&t, o, tags, repos).await;
    }
    for (name, bin) in &o.builds {
        let t = crate::start_dockside_bin(
            dir,
            &format!("{name}-scale"),
            std::path::Path::new(bin),
            &[],
            &[],
        );
        measure(&t, o, tags, repos).await;
    }
    if o.target("distribution") {
        let t = start_distribution(dir, "distrib-scale");
        measure(&t, o, tags, repos).await;
    }
}
