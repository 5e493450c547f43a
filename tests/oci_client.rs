//! The `oci-client` crate against the server (the test registry of `dockside::testing`, which
//! serves through the binary's server adapter, as another crate's tests would use it): push an image (config and two layers of a few
//! MiB, so the client's chunked upload sends several PATCHes), pull it back byte for byte, and
//! find an artifact through the referrers API.

mod common;

use std::collections::BTreeMap;

use common::{pseudo_random, sha256_digest};
use dockside::testing::TestRegistry;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor,
    OciImageManifest, OciManifest,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

const SBOM: &str = "application/vnd.example.sbom.v1";
const SIGNATURE_CONFIG: &str = "application/vnd.example.signature.config.v1+json";
const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

fn oci_client(monolithic: bool) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        use_monolithic_push: monolithic,
        ..Default::default()
    })
}

fn reference(s: &TestRegistry, repo: &str, tag: &str) -> Reference {
    format!("{}/{repo}:{tag}", s.addr())
        .parse()
        .expect("a valid reference")
}

fn by_digest(s: &TestRegistry, repo: &str, digest: &str) -> Reference {
    Reference::with_digest(s.addr().to_string(), repo.to_owned(), digest.to_owned())
}

/// An image: an OCI config and two layers of pseudo-random bytes. The layers are not multiples
/// of the client's 4 MiB chunk size, so each goes up in several chunks with a short last one.
fn image(seed: u64) -> (Config, Vec<ImageLayer>) {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": ["SEED=".to_owned() + &seed.to_string()] },
        "rootfs": { "type": "layers", "diff_ids": [] },
    }))
    .unwrap();
    let layers = vec![
        ImageLayer::oci_v1(pseudo_random(9 * 1024 * 1024 + 123, seed), None),
        ImageLayer::oci_v1(
            pseudo_random(5 * 1024 * 1024 + 7, seed + 1),
            Some(BTreeMap::from([(
                "org.example.layer".to_owned(),
                "second".to_owned(),
            )])),
        ),
    ];
    (Config::oci_v1(config, None), layers)
}

/// Requests of `method` under `/v2/<repo>/blobs/uploads/` the registry answered.
fn upload_requests(s: &TestRegistry, method: &str, repo: &str) -> usize {
    let prefix = format!("/v2/{repo}/blobs/uploads/");
    s.requests()
        .iter()
        .filter(|r| r.method == method && r.path.starts_with(&prefix))
        .count()
}

/// Pushes an image with `client`, pulls it back and checks every byte; returns the manifest's
/// raw bytes and digest.
async fn push_and_pull(
    s: &TestRegistry,
    client: &Client,
    repo: &str,
    seed: u64,
) -> (bytes::Bytes, String) {
    let auth = RegistryAuth::Anonymous;
    let image_ref = reference(s, repo, "v1");
    let (config, layers) = image(seed);
    let expected_manifest = OciImageManifest::build(&layers, &config, None);

    let pushed = client
        .push(&image_ref, &layers, config.clone(), &auth, None)
        .await
        .expect("push");
    assert!(
        pushed
            .manifest_url
            .contains(&format!("/v2/{repo}/manifests/")),
        "{}",
        pushed.manifest_url
    );
    for layer in &layers {
        assert!(
            client
                .blob_exists(&image_ref, &layer.sha256_digest())
                .await
                .unwrap(),
            "layer {} missing after the push",
            layer.sha256_digest()
        );
    }

    let pulled = client
        .pull(&image_ref, &auth, vec![IMAGE_LAYER_MEDIA_TYPE])
        .await
        .expect("pull");
    // oci-client downloads layers concurrently and returns them in the order they finish, so
    // match them up by digest; the manifest gives the order.
    assert_eq!(pulled.layers.len(), layers.len());
    for (i, want) in layers.iter().enumerate() {
        let got = pulled
            .layers
            .iter()
            .find(|l| l.sha256_digest() == want.sha256_digest())
            .unwrap_or_else(|| panic!("layer {i} ({}) was not pulled", want.sha256_digest()));
        assert_eq!(got.media_type, want.media_type, "layer {i}");
        assert_eq!(got.data.len(), want.data.len(), "layer {i}");
        assert!(got.data == want.data, "layer {i}: bytes differ");
    }
    assert_eq!(pulled.config.media_type, IMAGE_CONFIG_MEDIA_TYPE);
    assert!(pulled.config.data == config.data, "config bytes differ");
    let manifest = pulled.manifest.expect("the pulled manifest");
    assert_eq!(
        serde_json::to_value(&manifest).unwrap(),
        serde_json::to_value(&expected_manifest).unwrap()
    );
    assert_eq!(manifest.layers[1].annotations, layers[1].annotations);

    // The raw manifest: its digest is the one the registry reports.
    let (raw, digest) = client
        .pull_manifest_raw(&image_ref, &auth, &[OCI_IMAGE_MEDIA_TYPE])
        .await
        .expect("pull the raw manifest");
    assert_eq!(digest, sha256_digest(&raw));
    assert_eq!(pulled.digest.as_deref(), Some(digest.as_str()));
    let reparsed: OciImageManifest = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        serde_json::to_value(&reparsed).unwrap(),
        serde_json::to_value(&expected_manifest).unwrap()
    );
    // ... also by digest.
    let (raw_by_digest, _) = client
        .pull_manifest_raw(&by_digest(s, repo, &digest), &auth, &[OCI_IMAGE_MEDIA_TYPE])
        .await
        .expect("pull the manifest by digest");
    assert_eq!(raw_by_digest, raw);
    (raw, digest)
}

#[tokio::test]
async fn chunked_push_then_pull_byte_for_byte() {
    let s = TestRegistry::start();
    let client = oci_client(false);
    push_and_pull(&s, &client, "oci/chunked", 1).await;

    // The chunked path was taken: 9 MiB and 5 MiB in 4 MiB chunks (3 and 2), plus the config.
    const EXPECTED_PATCHES: usize = 3 + 2 + 1;
    let patches = upload_requests(&s, "PATCH", "oci/chunked");
    assert_eq!(patches, EXPECTED_PATCHES, "PATCH requests of the push");

    let tags = client
        .list_tags(
            &reference(&s, "oci/chunked", "v1"),
            &RegistryAuth::Anonymous,
            None,
            None,
        )
        .await
        .expect("list tags");
    assert_eq!(tags.name, "oci/chunked");
    assert_eq!(tags.tags, vec!["v1".to_owned()]);
}

#[tokio::test]
async fn monolithic_push_then_pull_byte_for_byte() {
    let s = TestRegistry::start();
    let client = oci_client(true);
    push_and_pull(&s, &client, "oci/monolithic", 2).await;
    assert_eq!(upload_requests(&s, "PATCH", "oci/monolithic"), 0);
    assert_eq!(upload_requests(&s, "PUT", "oci/monolithic"), 3);
}

#[tokio::test]
async fn mount_between_repositories() {
    let s = TestRegistry::start();
    let client = oci_client(false);
    let data = pseudo_random(1 << 20, 3);
    let digest = sha256_digest(&data);
    let source = reference(&s, "oci/source", "x");
    let target = reference(&s, "oci/target", "x");
    client
        .push_blob(&source, data.clone(), &digest)
        .await
        .expect("push a blob");
    assert!(!client.blob_exists(&target, &digest).await.unwrap());
    client
        .mount_blob(&target, &source, &digest)
        .await
        .expect("mount");
    assert!(client.blob_exists(&target, &digest).await.unwrap());
    let mut pulled = Vec::new();
    let descriptor = OciDescriptor {
        media_type: IMAGE_LAYER_MEDIA_TYPE.to_owned(),
        digest: digest.clone(),
        size: data.len() as i64,
        ..Default::default()
    };
    client
        .pull_blob(&target, &descriptor, &mut pulled)
        .await
        .expect("pull the mounted blob");
    assert!(pulled == data);
}

#[tokio::test]
async fn referrers_of_an_image() {
    let s = TestRegistry::start();
    let client = oci_client(false);
    let auth = RegistryAuth::Anonymous;
    let repo = "oci/referred";
    let (image_manifest, image_digest) = push_and_pull(&s, &client, repo, 4).await;
    let image_ref = reference(&s, repo, "v1");
    let subject = OciDescriptor {
        media_type: OCI_IMAGE_MEDIA_TYPE.to_owned(),
        digest: image_digest.clone(),
        size: image_manifest.len() as i64,
        ..Default::default()
    };

    // Before any referrer: an empty list.
    let index = client
        .pull_referrers(&by_digest(&s, repo, &image_digest), None)
        .await
        .expect("pull referrers");
    assert!(index.manifests.is_empty(), "{index:?}");

    // An SBOM with an artifactType and the empty config.
    let empty = b"{}".to_vec();
    client
        .push_blob(&image_ref, empty.clone(), &sha256_digest(&empty))
        .await
        .unwrap();
    let sbom_data = br#"{"spdxVersion":"SPDX-2.3","packages":[]}"#.to_vec();
    client
        .push_blob(&image_ref, sbom_data.clone(), &sha256_digest(&sbom_data))
        .await
        .unwrap();
    let annotations = BTreeMap::from([(
        "org.opencontainers.image.created".to_owned(),
        "2026-01-01T00:00:00Z".to_owned(),
    )]);
    let sbom = OciImageManifest {
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_owned()),
        artifact_type: Some(SBOM.to_owned()),
        config: OciDescriptor {
            media_type: OCI_EMPTY.to_owned(),
            digest: sha256_digest(&empty),
            size: empty.len() as i64,
            ..Default::default()
        },
        layers: vec![OciDescriptor {
            media_type: "application/spdx+json".to_owned(),
            digest: sha256_digest(&sbom_data),
            size: sbom_data.len() as i64,
            ..Default::default()
        }],
        subject: Some(subject.clone()),
        annotations: Some(annotations.clone()),
        ..Default::default()
    };
    let sbom_bytes = serde_json::to_vec(&sbom).unwrap();
    let sbom_digest = sha256_digest(&sbom_bytes);
    client
        .push_manifest_raw(
            &by_digest(&s, repo, &sbom_digest),
            sbom_bytes.clone(),
            OCI_IMAGE_MEDIA_TYPE.parse().unwrap(),
        )
        .await
        .expect("push the SBOM manifest");

    // A signature without an artifactType: its config's media type stands in.
    let sig_config = br#"{"keyid":"test"}"#.to_vec();
    client
        .push_blob(&image_ref, sig_config.clone(), &sha256_digest(&sig_config))
        .await
        .unwrap();
    let signature = OciImageManifest {
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_owned()),
        config: OciDescriptor {
            media_type: SIGNATURE_CONFIG.to_owned(),
            digest: sha256_digest(&sig_config),
            size: sig_config.len() as i64,
            ..Default::default()
        },
        layers: vec![],
        subject: Some(subject),
        ..Default::default()
    };
    client
        .push_manifest(&reference(&s, repo, "signature"), &signature.into())
        .await
        .expect("push the signature manifest");
    let (signature_bytes, signature_digest) = client
        .pull_manifest_raw(
            &reference(&s, repo, "signature"),
            &auth,
            &[OCI_IMAGE_MEDIA_TYPE],
        )
        .await
        .unwrap();

    let subject_ref = by_digest(&s, repo, &image_digest);
    let index = client
        .pull_referrers(&subject_ref, None)
        .await
        .expect("pull referrers");
    assert_eq!(
        index.media_type.as_deref(),
        Some("application/vnd.oci.image.index.v1+json")
    );
    let mut found: Vec<_> = index
        .manifests
        .iter()
        .map(|m| {
            (
                m.digest.clone(),
                m.media_type.clone(),
                m.size,
                m.artifact_type.clone(),
                m.annotations.clone(),
            )
        })
        .collect();
    found.sort();
    let mut expected = vec![
        (
            sbom_digest.clone(),
            OCI_IMAGE_MEDIA_TYPE.to_owned(),
            sbom_bytes.len() as i64,
            Some(SBOM.to_owned()),
            Some(annotations),
        ),
        (
            signature_digest.clone(),
            OCI_IMAGE_MEDIA_TYPE.to_owned(),
            signature_bytes.len() as i64,
            Some(SIGNATURE_CONFIG.to_owned()),
            None,
        ),
    ];
    expected.sort();
    assert_eq!(found, expected);

    // Filtered by artifactType.
    let index = client
        .pull_referrers(&subject_ref, Some(SBOM))
        .await
        .expect("pull filtered referrers");
    let digests: Vec<_> = index.manifests.iter().map(|m| m.digest.as_str()).collect();
    assert_eq!(digests, vec![sbom_digest.as_str()]);
    let index = client
        .pull_referrers(&subject_ref, Some("application/vnd.example.none"))
        .await
        .expect("pull filtered referrers");
    assert!(index.manifests.is_empty(), "{index:?}");

    // The referrer itself pulls back with its subject.
    let (pulled, digest) = client
        .pull_manifest(&by_digest(&s, repo, &sbom_digest), &auth)
        .await
        .expect("pull the SBOM manifest");
    assert_eq!(digest, sbom_digest);
    let OciManifest::Image(pulled) = pulled else {
        panic!("the SBOM came back as an index");
    };
    assert_eq!(pulled.subject.map(|d| d.digest), Some(image_digest.clone()));
    assert_eq!(pulled.artifact_type.as_deref(), Some(SBOM));
}
