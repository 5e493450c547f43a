//! Scenarios shared by the end-to-end tests of the components (`tests/edge.rs` under
//! `wasmtime serve`, `tests/spin.rs` under `spin up`): each drives a registry that is already
//! running at `addr` (`127.0.0.1:PORT`) through its HTTP surface only.

use std::collections::BTreeMap;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::{pseudo_random, sha256_digest};

/// A three-layer image pushed with `oci-client` in 4 MiB chunked PATCHes (on an edge host each
/// chunk may land on a fresh instance, so the running hash must travel through the store),
/// pulled back byte for byte, its tags listed, a referrer pushed and found through the
/// referrers API, the error envelope, a ranged read and a HEAD.
pub async fn push_and_pull(addr: &str) {
    push_and_pull_checking(addr, HeadLength::Exact).await
}

/// What the scenario's final HEAD of a blob must say about the blob's length.
#[allow(dead_code)]
pub enum HeadLength {
    /// `Content-Length` is the blob's length (the spec's HEAD).
    Exact,
    /// The host moves the answer's `Content-Length` to `x-amzn-Remapped-Content-Length`, as
    /// Lambda function URLs do with streamed answers (and `cargo lambda watch` after them).
    Remapped,
}

/// [`push_and_pull`], with the HEAD's length checked as `head` says.
pub async fn push_and_pull_checking(addr: &str, head: HeadLength) {
    let base = format!("http://{addr}");
    let http = super::client();

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
    let image: Reference = format!("{}/edge/app:v1", addr).parse().unwrap();
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
        .map(|l| (sha256_digest(&l.data), l.data.len()))
        .collect();
    let mut want: Vec<_> = layers
        .iter()
        .map(|l| (sha256_digest(&l.data), l.data.len()))
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
    assert_eq!(digest, sha256_digest(&raw));

    // A referrer: an artifact whose subject is the image.
    let sig = pseudo_random(500, 9);
    let empty = b"{}".to_vec();
    let artifact = OciImageManifest {
        artifact_type: Some("application/vnd.example.signature".to_owned()),
        config: OciDescriptor {
            media_type: "application/vnd.oci.empty.v1+json".to_owned(),
            digest: sha256_digest(&empty),
            size: 2,
            ..Default::default()
        },
        layers: vec![OciDescriptor {
            media_type: "application/octet-stream".to_owned(),
            digest: sha256_digest(&sig),
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
    let sig_ref: Reference = format!("{}/edge/app:sig", addr).parse().unwrap();
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
    let by_digest = Reference::with_digest(addr.to_owned(), "edge/app".to_owned(), digest.clone());
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
    let d0 = sha256_digest(layer0);
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
    assert_eq!(r.headers()["docker-content-digest"], d0.as_str());
    match head {
        HeadLength::Exact => assert_eq!(
            r.headers()["content-length"].to_str().unwrap(),
            layer0.len().to_string()
        ),
        HeadLength::Remapped => {
            assert_eq!(
                r.headers()["x-amzn-remapped-content-length"]
                    .to_str()
                    .unwrap(),
                layer0.len().to_string()
            );
            assert!(r.headers().get("content-length").is_none());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Access control

pub const AUTH_SECRET: &str = "edge-instances-share-this-secret-0123456789";

pub fn auth_toml() -> String {
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

pub async fn get_token(
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

/// Access control enforced by a registry configured with [`auth_toml`] and [`AUTH_SECRET`]:
/// challenges, `oci-client` logging in and pushing, anonymous pulls of `public/`, refused
/// anonymous pushes, bad passwords and tokens, and upload sessions kept to their opener.
pub async fn access_control(addr: &str) {
    let base = format!("http://{addr}");
    let http = super::client();

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
    let image: Reference = format!("{}/public/app:v1", addr).parse().unwrap();
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
    assert_eq!(
        sha256_digest(&pulled.layers[0].data),
        sha256_digest(&layers[0].data)
    );
    let fresh = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let err = fresh
        .push(
            &format!("{}/public/app:anon", addr).parse().unwrap(),
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
}
