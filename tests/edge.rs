//! The wasi:http component under a real runtime: `wasmtime serve`, which starts a fresh
//! instance for every request, so a push that works here keeps no state in memory.
//!
//! Needs the built component and the wasmtime CLI: `.ci/edge` builds and installs both and runs
//! `cargo test --features edge --test edge` with `DOCKSIDE_WASI_COMPONENT` and
//! `DOCKSIDE_WASMTIME` set. Without them the test fails and says so; it never skips.
#![cfg(feature = "edge")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};

struct Wasmtime {
    child: Child,
    addr: String,
    _data: tempfile::TempDir,
}

impl Drop for Wasmtime {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run .ci/edge, which builds the component and installs wasmtime")
    })
}

/// Starts `wasmtime serve` on a free loopback port with a fresh data directory.
fn serve() -> Wasmtime {
    serve_with(&[], |_| {})
}

/// [`serve`] with `--env NAME=VALUE` settings, after `prepare` has filled the data directory.
fn serve_with(env: &[(&str, String)], prepare: impl FnOnce(&std::path::Path)) -> Wasmtime {
    let wasmtime = required_env("DOCKSIDE_WASMTIME");
    let component = required_env("DOCKSIDE_WASI_COMPONENT");
    let data = tempfile::tempdir().unwrap();
    prepare(data.path());
    let mut cmd = Command::new(&wasmtime);
    cmd.args(["serve", "-Scli", "--addr", "127.0.0.1:0", "--dir"])
        .arg(format!("{}::/data", data.path().display()));
    for (k, v) in env {
        cmd.arg("--env").arg(format!("{k}={v}"));
    }
    let mut child = cmd
        .arg(&component)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {wasmtime}: {e}"));
    // wasmtime prints "Serving HTTP on http://127.0.0.1:PORT/" once it listens.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("http://").nth(1) {
                let _ = tx.send(rest.trim_end_matches('/').to_owned());
            }
        }
    });
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || for _ in BufReader::new(stdout).lines() {});
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("wasmtime serve did not start listening within 60 s");
    Wasmtime {
        child,
        addr,
        _data: data,
    }
}

fn sha256(data: &[u8]) -> String {
    let h = Sha256::digest(data);
    format!(
        "sha256:{}",
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn push_and_pull_through_the_wasi_component() {
    let w = serve();
    let base = format!("http://{}", w.addr);
    let http = reqwest::Client::new();

    let r = http.get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );

    // A multi-layer image through oci-client, whose chunked upload sends 4 MiB PATCHes: each
    // chunk lands on a new instance, so the running hash must travel through the store.
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        use_monolithic_push: false,
        ..Default::default()
    });
    let auth = RegistryAuth::Anonymous;
    let layers = vec![
        ImageLayer::oci_v1(pseudo_random(9 * 1024 * 1024 + 17, 1), None),
        ImageLayer::oci_v1(pseudo_random(3 * 1024 * 1024, 2), None),
        ImageLayer::oci_v1(pseudo_random(1000, 3), None),
    ];
    let config = Config::oci_v1(br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), None);
    let manifest = OciImageManifest::build(&layers, &config, None);
    let image: Reference = format!("{}/edge/app:v1", w.addr).parse().unwrap();
    client
        .push(
            &image,
            &layers,
            config.clone(),
            &auth,
            Some(manifest.clone()),
        )
        .await
        .expect("push through the wasi component");

    let pulled = client
        .pull(
            &image,
            &auth,
            vec![oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE],
        )
        .await
        .expect("pull through the wasi component");
    // The client fetches layers concurrently and returns them as they finish: compare as sets,
    // by digest and length (a failure should not print megabytes).
    let mut got: Vec<_> = pulled
        .layers
        .iter()
        .map(|l| (sha256(&l.data), l.data.len()))
        .collect();
    let mut want: Vec<_> = layers
        .iter()
        .map(|l| (sha256(&l.data), l.data.len()))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "the layers came back different");
    assert!(
        pulled.config.data == config.data,
        "the config came back different"
    );

    // Tags, and the manifest as pushed.
    let tags = client
        .list_tags(&image, &auth, None, None)
        .await
        .expect("tags list");
    assert_eq!(tags.tags, ["v1"]);
    let (raw, digest) = client
        .pull_manifest_raw(&image, &auth, &[oci_client::manifest::OCI_IMAGE_MEDIA_TYPE])
        .await
        .unwrap();
    assert_eq!(digest, sha256(&raw));

    // A referrer: an artifact whose subject is the image.
    let sig = pseudo_random(500, 9);
    let empty = b"{}".to_vec();
    let artifact = OciImageManifest {
        artifact_type: Some("application/vnd.example.signature".to_owned()),
        config: OciDescriptor {
            media_type: "application/vnd.oci.empty.v1+json".to_owned(),
            digest: sha256(&empty),
            size: 2,
            ..Default::default()
        },
        layers: vec![OciDescriptor {
            media_type: "application/octet-stream".to_owned(),
            digest: sha256(&sig),
            size: sig.len() as i64,
            ..Default::default()
        }],
        subject: Some(OciDescriptor {
            media_type: oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.to_owned(),
            digest: digest.clone(),
            size: raw.len() as i64,
            ..Default::default()
        }),
        annotations: Some(BTreeMap::from([("k".to_owned(), "v".to_owned())])),
        ..Default::default()
    };
    let sig_ref: Reference = format!("{}/edge/app:sig", w.addr).parse().unwrap();
    client
        .push(
            &sig_ref,
            &[ImageLayer::new(
                sig.clone(),
                "application/octet-stream".to_owned(),
                None,
            )],
            Config::new(
                empty.clone(),
                "application/vnd.oci.empty.v1+json".to_owned(),
                None,
            ),
            &auth,
            Some(artifact),
        )
        .await
        .expect("push of the referrer");
    let by_digest = Reference::with_digest(w.addr.clone(), "edge/app".to_owned(), digest.clone());
    let index = client
        .pull_referrers(&by_digest, Some("application/vnd.example.signature"))
        .await
        .expect("referrers");
    assert_eq!(index.manifests.len(), 1);
    assert_eq!(
        index.manifests[0].artifact_type.as_deref(),
        Some("application/vnd.example.signature")
    );

    // The error envelope, from the component.
    let r = http
        .get(format!("{base}/v2/edge/app/manifests/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");

    // A ranged read of a layer, and HEAD.
    let layer0 = &layers[0].data;
    let d0 = sha256(layer0);
    let r = http
        .get(format!("{base}/v2/edge/app/blobs/{d0}"))
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &layer0[1000..2000]);
    let r = http
        .head(format!("{base}/v2/edge/app/blobs/{d0}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        layer0.len().to_string()
    );
}

// ---------------------------------------------------------------------------------------------
// Access control, enforced by the component

const SECRET: &str = "edge-instances-share-this-secret-0123456789";

fn auth_toml() -> String {
    format!(
        r#"
[auth]
service = "edge"

[[auth.users]]
name = "alice"
password_hash = "{}"

[[auth.users]]
name = "mallory"
password_hash = "{}"

[[auth.rules]]
repositories = ["team/**"]
users = ["alice", "mallory"]
actions = ["pull", "push"]

[[auth.rules]]
repositories = ["public/*"]
users = ["anonymous"]
actions = ["pull"]

[[auth.rules]]
repositories = ["public/*"]
users = ["alice"]
actions = ["push"]
"#,
        bcrypt::hash("alice-pw", 4).unwrap(),
        bcrypt::hash("mallory-pw", 4).unwrap()
    )
}

async fn get_token(
    http: &reqwest::Client,
    base: &str,
    user: &str,
    pw: &str,
    scope: &str,
) -> String {
    let r = http
        .get(format!("{base}/token?service=edge&scope={scope}"))
        .basic_auth(user, Some(pw))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let j: serde_json::Value = r.json().await.unwrap();
    j["token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn access_control_in_the_wasi_component() {
    let w = serve_with(
        &[
            ("DOCKSIDE_AUTH_CONFIG", auth_toml()),
            ("DOCKSIDE_AUTH_SECRET", SECRET.to_owned()),
        ],
        |_| {},
    );
    let base = format!("http://{}", w.addr);
    let http = reqwest::Client::new();

    // Anonymous: 401 with a challenge whose realm is this host.
    let r = http.get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"].to_str().unwrap(),
        format!("Bearer realm=\"{base}/token\",service=\"edge\"")
    );
    let r = http
        .post(format!("{base}/v2/team/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // oci-client logs in (Bearer challenge, token endpoint) and pushes; anonymous pulls public/.
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let alice = RegistryAuth::Basic("alice".into(), "alice-pw".into());
    let layers = vec![ImageLayer::oci_v1(
        pseudo_random(5 * 1024 * 1024 + 1, 4),
        None,
    )];
    let config = Config::oci_v1(br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), None);
    let image: Reference = format!("{}/public/app:v1", w.addr).parse().unwrap();
    client
        .push(&image, &layers, config.clone(), &alice, None)
        .await
        .expect("alice pushes through the component");
    let anon = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let pulled = anon
        .pull(
            &image,
            &RegistryAuth::Anonymous,
            vec![oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE],
        )
        .await
        .expect("anonymous pull of public/app");
    assert_eq!(sha256(&pulled.layers[0].data), sha256(&layers[0].data));
    let fresh = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let err = fresh
        .push(
            &format!("{}/public/app:anon", w.addr).parse().unwrap(),
            &layers,
            config,
            &RegistryAuth::Anonymous,
            None,
        )
        .await;
    assert!(err.is_err(), "an anonymous push went through");

    // Wrong password; a tampered token; alg none.
    let r = http
        .get(format!(
            "{base}/token?service=edge&scope=repository:team/app:pull"
        ))
        .basic_auth("alice", Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let t = get_token(
        &http,
        &base,
        "alice",
        "alice-pw",
        "repository:team/app:pull,push",
    )
    .await;
    let mut tampered = t.clone();
    tampered.pop();
    tampered.push(if t.ends_with('A') { 'B' } else { 'A' });
    let none = {
        let mut p = t.split('.');
        let _ = p.next();
        format!("eyJhbGciOiJub25lIn0.{}.", p.next().unwrap())
    };
    for bad in [&tampered, &none] {
        let r = http
            .get(format!("{base}/v2/team/app/tags/list"))
            .bearer_auth(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{bad}");
    }

    // An upload session is its opener's alone, on every instance.
    let r = http
        .post(format!("{base}/v2/team/app/blobs/uploads/"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    let m = get_token(
        &http,
        &base,
        "mallory",
        "mallory-pw",
        "repository:team/app:pull,push",
    )
    .await;
    let r = http
        .patch(format!("{base}{loc}"))
        .bearer_auth(&m)
        .body("evil")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .get(format!("{base}{loc}"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    drop(w);

    // The configuration from a file in the preopened directory; without a secret the
    // component refuses to serve (500) rather than run open.
    let w = serve_with(
        &[("DOCKSIDE_AUTH_CONFIG_FILE", "/data/auth.toml".to_owned())],
        |dir| std::fs::write(dir.join("auth.toml"), auth_toml()).unwrap(),
    );
    let r = http
        .get(format!("http://{}/v2/public/app/tags/list", w.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let body = r.text().await.unwrap();
    assert!(body.contains("no token secret"), "{body}");
}

/// Limits reach the component through `--env` (`Config::from_settings`): the chunk bounds are
/// advertised, an oversized PATCH is refused with 413 and stores nothing, and a malformed
/// setting is reported rather than ignored.
#[tokio::test(flavor = "multi_thread")]
async fn limits_from_the_environment() {
    let w = serve_with(
        &[
            ("DOCKSIDE_MAX_CHUNK_BYTES", "1000".to_owned()),
            ("DOCKSIDE_CHUNK_MIN_LENGTH", "500".to_owned()),
            ("DOCKSIDE_NO_DELETE", "true".to_owned()),
        ],
        |_| {},
    );
    let base = format!("http://{}", w.addr);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v2/lim/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["oci-chunk-max-length"], "1000");
    assert_eq!(r.headers()["oci-chunk-min-length"], "500");
    let loc = format!("{base}{}", r.headers()["location"].to_str().unwrap());
    let r = http.patch(&loc).body(vec![7u8; 2000]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "SIZE_INVALID");
    let r = http.get(&loc).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["range"],
        "0-0",
        "the refused PATCH stored nothing"
    );
    let r = http.delete(&loc).send().await.unwrap();
    assert_eq!(
        r.status(),
        204,
        "cancelling an upload is not a delete of content"
    );
    let r = http
        .delete(format!("{base}/v2/lim/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405, "DOCKSIDE_NO_DELETE=true");

    let bad = serve_with(&[("DOCKSIDE_MAX_CHUNK_BYTES", "lots".to_owned())], |_| {});
    let r = http
        .get(format!("http://{}/v2/", bad.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let text = r.text().await.unwrap();
    assert!(text.contains("DOCKSIDE_MAX_CHUNK_BYTES"), "{text}");
}

/// 16 clients PATCH the same first chunk of one upload session at once, 20 rounds, under
/// `wasmtime serve` (a fresh instance per request, the directory host over wasi:filesystem):
/// exactly one wins each round (the others get 416 with the session's state), so no accepted
/// chunk is silently dropped, and the session then closes into a blob that matches its digest.
#[tokio::test(flavor = "multi_thread")]
async fn racing_patches_on_one_session_have_one_winner() {
    let wt = serve();
    let base = format!("http://{}", wt.addr);
    let http = reqwest::Client::new();
    for round in 0..20u64 {
        let r = http
            .post(format!("{base}/v2/race/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let loc = r.headers()["location"].to_str().unwrap().to_owned();
        let loc = if loc.starts_with('/') {
            format!("{base}{loc}")
        } else {
            loc
        };
        let chunk = pseudo_random(64 * 1024, round);
        let range = format!("0-{}", chunk.len() - 1);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (http, loc, chunk, range) =
                    (http.clone(), loc.clone(), chunk.clone(), range.clone());
                tokio::spawn(async move {
                    let r = http
                        .patch(&loc)
                        .header("content-range", range)
                        .header("content-type", "application/octet-stream")
                        .body(chunk)
                        .send()
                        .await
                        .unwrap();
                    let status = r.status().as_u16();
                    let loc = r
                        .headers()
                        .get("location")
                        .map(|l| l.to_str().unwrap().to_owned());
                    (status, loc)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            let (status, l) = t.await.unwrap();
            match status {
                202 => winners.push(l.unwrap()),
                416 => {}
                s => panic!("round {round}: a racing PATCH answered {s}"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: {} PATCHes won",
            winners.len()
        );
        let next = &winners[0];
        let next = if next.starts_with('/') {
            format!("{base}{next}")
        } else {
            next.clone()
        };
        let sep = if next.contains('?') { '&' } else { '?' };
        let r = http
            .put(format!("{next}{sep}digest={}", sha256(&chunk)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "round {round}");
        let got = http
            .get(format!("{base}/v2/race/blobs/{}", sha256(&chunk)))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(got == chunk, "round {round}: the blob does not match");
    }
}
