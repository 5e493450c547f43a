//! The test registry with the `oci-client` crate: start a registry in this process, push an
//! image (a config and one layer), pull it back, check every byte. What a test of your own
//! looks like, here as a program: `cargo run --example testing --features testing`.
//!
//! In a test, the same body goes in a `#[tokio::test] async fn`, or in a plain `#[test]` with a
//! runtime of its own: the registry runs on its own thread either way.

use dockside::testing::TestRegistry;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::OciImageManifest;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

#[tokio::main]
async fn main() {
    // Memory storage, open to anyone, on 127.0.0.1 and a free port; stopped when dropped.
    let registry = TestRegistry::start();

    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let reference: Reference = format!("{}/examples/hello:v1", registry.host())
        .parse()
        .expect("a reference");
    let layer = ImageLayer::oci_v1(b"hello from a layer".to_vec(), None);
    let config = Config::oci_v1(br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), None);
    let manifest = OciImageManifest::build(std::slice::from_ref(&layer), &config, None);
    client
        .push(
            &reference,
            std::slice::from_ref(&layer),
            config,
            &RegistryAuth::Anonymous,
            Some(manifest),
        )
        .await
        .expect("push");

    let image = client
        .pull(
            &reference,
            &RegistryAuth::Anonymous,
            vec![oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE],
        )
        .await
        .expect("pull");
    assert_eq!(image.layers.len(), 1);
    assert_eq!(image.layers[0].data, layer.data);
    println!(
        "pushed and pulled {reference} through {} ({})",
        registry.url(),
        image.digest.unwrap_or_default()
    );
}
