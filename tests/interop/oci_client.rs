//! The `oci-client` crate (a dev-dependency): chunked and monolithic pushes of a generated
//! image, pull and byte comparison, tags, catalog, a cross-repository mount, an artifact pushed
//! with a `subject`, and `pull_referrers` (which must use the native referrers API, not the
//! `sha256-<hex>` tag fallback it has for registries without one).

use std::collections::BTreeMap;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::interop::image::{OCI_EMPTY, OCI_LAYER_GZIP, OCI_MANIFEST, Rng, random_image};
use crate::interop::{Registry, assert_pull_followed_redirects, seed_image, skip};

fn client(monolithic: bool) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        use_monolithic_push: monolithic,
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_client_push_pull_mount_referrers() {
    if skip("oci-client") {
        return;
    }
    let reg = Registry::start();
    let host = reg.host();
    let auth = RegistryAuth::Anonymous;
    let mut rng = Rng::from_entropy();
    let img = random_image(&mut rng, "linux", "amd64", 3);
    let layers: Vec<ImageLayer> = img
        .layers
        .iter()
        .map(|l| ImageLayer::new(l.data.clone(), OCI_LAYER_GZIP.to_owned(), None))
        .collect();
    let config = Config::oci_v1(img.config.data.clone(), None);

    // Chunked push (the client's default) and monolithic push, then pull each back.
    for (repo, monolithic) in [("ociclient/chunked", false), ("ociclient/mono", true)] {
        let c = client(monolithic);
        let reference: Reference = format!("{host}/{repo}:v1").parse().expect("a reference");
        c.push(&reference, &layers, config.clone(), &auth, None)
            .await
            .unwrap_or_else(|e| panic!("push to {repo}: {e:?}"));
        let pulled = c
            .pull(&reference, &auth, vec![OCI_LAYER_GZIP])
            .await
            .unwrap_or_else(|e| panic!("pull from {repo}: {e:?}"));
        // `pull` fetches layers concurrently and returns them in the order they finished.
        let mut got: Vec<String> = pulled
            .layers
            .iter()
            .map(|l| crate::interop::sha256(&l.data))
            .collect();
        let mut want: Vec<String> = img.layers.iter().map(|l| l.digest.clone()).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{repo}: the layers pulled back");
        assert_eq!(pulled.config.data.as_ref(), img.config.data.as_slice());
        let tags = c
            .list_tags(&reference, &auth, None, None)
            .await
            .expect("list_tags");
        assert_eq!(tags.tags, ["v1"]);
    }

    // The pushed manifest, as the registry has it.
    let c = client(false);
    let image_ref: Reference = format!("{host}/ociclient/chunked:v1").parse().expect("ref");
    let (manifest, digest) = c
        .pull_image_manifest(&image_ref, &auth)
        .await
        .expect("pull the manifest");
    let raw = c
        .pull_manifest_raw(&image_ref, &auth, &[OCI_MANIFEST])
        .await
        .expect("pull the raw manifest");
    assert_eq!(crate::interop::sha256(&raw.0), digest);
    assert_eq!(
        c.fetch_manifest_digest(&image_ref, &auth)
            .await
            .expect("HEAD the manifest"),
        digest
    );

    // Mount a layer into a third repository.
    let other: Reference = format!("{host}/ociclient/mounted:v1").parse().expect("ref");
    c.mount_blob(&other, &image_ref, &manifest.layers[0].digest)
        .await
        .expect("mount_blob");
    assert!(
        c.blob_exists(&other, &manifest.layers[0].digest)
            .await
            .expect("HEAD the mounted blob")
    );

    // Two artifacts referring to the image, of two artifact types.
    let subject = OciDescriptor {
        media_type: OCI_MANIFEST.to_owned(),
        digest: digest.clone(),
        size: raw.0.len() as i64,
        urls: None,
        annotations: None,
        artifact_type: None,
    };
    let empty = Config::new(b"{}".to_vec(), OCI_EMPTY.to_owned(), None);
    let mut pushed = Vec::new();
    for (kind, tag) in [("sbom", "sbom"), ("sig", "signature")] {
        let layer = ImageLayer::new(
            format!("{{\"kind\":\"{kind}\",\"of\":\"{digest}\"}}").into_bytes(),
            format!("application/vnd.dockside.test.{kind}.layer.v1+json"),
            None,
        );
        let mut m = OciImageManifest::build(std::slice::from_ref(&layer), &empty, None);
        m.subject = Some(subject.clone());
        m.artifact_type = Some(format!("application/vnd.dockside.test.{kind}.v1"));
        m.annotations = Some(BTreeMap::from([(
            "org.example.kind".to_owned(),
            kind.to_owned(),
        )]));
        let r: Reference = format!("{host}/ociclient/chunked:{tag}")
            .parse()
            .expect("ref");
        c.push(&r, &[layer], empty.clone(), &auth, Some(m))
            .await
            .unwrap_or_else(|e| panic!("push the {kind} referrer: {e:?}"));
        let (_, d) = c.pull_manifest(&r, &auth).await.expect("pull the referrer");
        pushed.push((kind, d));
    }

    let by_digest: Reference = format!("{host}/ociclient/chunked@{digest}")
        .parse()
        .expect("ref");
    let all = c
        .pull_referrers(&by_digest, None)
        .await
        .expect("pull_referrers");
    let mut listed: Vec<(String, Option<String>)> = all
        .manifests
        .iter()
        .map(|e| (e.digest.clone(), e.artifact_type.clone()))
        .collect();
    listed.sort();
    let mut want: Vec<(String, Option<String>)> = pushed
        .iter()
        .map(|(k, d)| {
            (
                d.clone(),
                Some(format!("application/vnd.dockside.test.{k}.v1")),
            )
        })
        .collect();
    want.sort();
    assert_eq!(listed, want);
    for e in &all.manifests {
        assert_eq!(e.media_type, OCI_MANIFEST);
        assert!(
            e.annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("org.example.kind")),
            "annotations copied into the referrers list: {e:?}"
        );
    }
    let sboms = c
        .pull_referrers(&by_digest, Some("application/vnd.dockside.test.sbom.v1"))
        .await
        .expect("pull_referrers filtered");
    assert_eq!(sboms.manifests.len(), 1);
    assert_eq!(sboms.manifests[0].digest, pushed[0].1);
    let none = c
        .pull_referrers(&by_digest, Some("application/vnd.dockside.none"))
        .await
        .expect("pull_referrers, no match");
    assert!(none.manifests.is_empty());

    // It used the referrers API, never the tag schema.
    let fallback = digest.replace(':', "-");
    let log = reg.log_lines();
    assert!(
        log.iter()
            .any(|l| l.contains(&format!("GET /v2/ociclient/chunked/referrers/{digest}"))),
        "no referrers API request in the log"
    );
    assert!(
        !log.iter().any(|l| l.contains(&fallback)),
        "the client fell back to the referrers tag {fallback}"
    );

    // sha512: blobs pushed by the client (chunked and monolithic) under sha512 digests, a
    // manifest naming them pushed by its sha512 digest, then pulled and verified by the client.
    let mut sha512_layers = Vec::new();
    for (i, l) in img.layers.iter().enumerate() {
        let d = crate::interop::sha512(&l.data);
        let r: Reference = format!("{host}/ociclient/sha512:x").parse().expect("ref");
        client(i % 2 == 1)
            .push_blob(&r, l.data.clone(), &d)
            .await
            .unwrap_or_else(|e| panic!("push_blob {d}: {e:?}"));
        sha512_layers.push((d, l.data.len()));
    }
    let cfg_d = crate::interop::sha512(&img.config.data);
    let r: Reference = format!("{host}/ociclient/sha512:x").parse().expect("ref");
    c.push_blob(&r, img.config.data.clone(), &cfg_d)
        .await
        .expect("push the sha512 config");
    let m512 = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_d, "size": img.config.data.len()},
        "layers": sha512_layers.iter().map(|(d, n)| serde_json::json!({"mediaType": OCI_LAYER_GZIP, "digest": d, "size": n})).collect::<Vec<_>>(),
    }))
    .expect("JSON");
    let m512_d = crate::interop::sha512(&m512);
    let by512: Reference = format!("{host}/ociclient/sha512@{m512_d}")
        .parse()
        .expect("ref");
    c.push_manifest_raw(&by512, m512.clone(), OCI_MANIFEST.parse().expect("header"))
        .await
        .expect("push the sha512 manifest");
    let (raw512, d512) = c
        .pull_manifest_raw(&by512, &auth, &[OCI_MANIFEST])
        .await
        .expect("pull the sha512 manifest");
    assert_eq!(raw512.as_ref(), m512.as_slice());
    assert_eq!(d512, m512_d);
    let pulled = c
        .pull(&by512, &auth, vec![OCI_LAYER_GZIP])
        .await
        .expect("pull the sha512 image (the client verifies sha512 digests)");
    let mut got: Vec<String> = pulled
        .layers
        .iter()
        .map(|l| crate::interop::sha512(&l.data))
        .collect();
    let mut want: Vec<String> = sha512_layers.iter().map(|(d, _)| d.clone()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);

    // A pull of the whole manifest through the enum type, and the catalog.
    let (m, _) = c.pull_manifest(&image_ref, &auth).await.expect("pull");
    assert!(matches!(m, OciManifest::Image(_)));
    let cat = c
        .catalog(&image_ref, &auth, None, None)
        .await
        .expect("catalog");
    for repo in ["ociclient/chunked", "ociclient/mono", "ociclient/mounted"] {
        assert!(
            cat.repositories.iter().any(|r| r == repo),
            "{repo} in {:?}",
            cat.repositories
        );
    }
}

/// Blobs in Garage behind `--blob-redirect`: `Client::pull` gets every blob through a 307 to a
/// presigned URL, byte for byte, and Garage served them. See `assert_pull_followed_redirects`.
#[test]
fn oci_client_pull_follows_blob_redirects() {
    if skip("oci-client") {
        return;
    }
    let reg = Registry::start_s3_redirect();
    let (img, digests) = seed_image(&reg, "redirect/ociclient");
    let reference: Reference = format!("{}/redirect/ociclient:v1", reg.host())
        .parse()
        .expect("a reference");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let pulled = rt
        .block_on(client(false).pull(&reference, &RegistryAuth::Anonymous, vec![OCI_LAYER_GZIP]))
        .unwrap_or_else(|e| panic!("pull: {e:?}"));
    let mut got: Vec<&[u8]> = pulled.layers.iter().map(|l| l.data.as_ref()).collect();
    let mut want: Vec<&[u8]> = img.layers.iter().map(|l| l.data.as_slice()).collect();
    // `pull` returns layers in the order they finished.
    got.sort();
    want.sort();
    assert!(got == want, "the layers pulled differ");
    assert!(pulled.config.data.as_ref() == img.config.data.as_slice());
    assert_pull_followed_redirects(&reg, "redirect/ociclient", &digests);
}
