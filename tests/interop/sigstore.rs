//! @sigstore/oci (npm, installed by `.ci/interop` under the tools directory): attaches a
//! signature-like referrer to an image. dockside answers the manifest PUT with `OCI-Subject`
//! and the referrers API with 200, so the client must use the referrers API and must not fall
//! back to the `sha256-<hex>` referrers tag schema.

use std::path::PathBuf;
use std::process::Command;

use crate::interop::image::{OCI_INDEX, Rng, random_image};
use crate::interop::{Registry, get, push_image, require_tool, run, skip, tags, tools_dir};

const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

fn node_modules() -> PathBuf {
    let dir = std::env::var_os("DOCKSIDE_INTEROP_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| tools_dir().join("npm/node_modules"));
    assert!(
        dir.join("@sigstore/oci/package.json").is_file(),
        "interop client `sigstore` (@sigstore/oci) is not installed under {}. Install it with \
         `.ci/interop`, or skip it explicitly with DOCKSIDE_INTEROP_SKIP=sigstore",
        dir.display()
    );
    dir
}

#[test]
fn sigstore_oci_attaches_a_referrer_through_the_referrers_api() {
    if skip("sigstore") {
        return;
    }
    let node = require_tool("sigstore", &[PathBuf::from("node")]);
    let modules = node_modules();
    let reg = Registry::start();
    let base = reg.base_url();
    let mut rng = Rng::from_entropy();
    let img = random_image(&mut rng, "linux", "amd64", 1);
    push_image(&base, "sigstore/app", "v1", &img);

    let out = run(
        "sigstore_scenario.js",
        Command::new(node)
            .arg(crate::interop::suite_dir().join("sigstore_scenario.js"))
            .arg(format!("{}/sigstore/app", reg.host()))
            .arg("v1")
            .env("NODE_PATH", &modules)
            .env("NO_PROXY", "127.0.0.1,localhost"),
    );
    let last = out.stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("no report from the script ({e}):\n{}", out.stdout));
    eprintln!("@sigstore/oci {}", report["version"]);
    assert_eq!(report["imageDigest"], img.manifest.digest.as_str());
    let artifact = report["descriptor"]["digest"]
        .as_str()
        .expect("the artifact's digest")
        .to_owned();
    // The client saw OCI-Subject on its manifest PUT.
    assert_eq!(
        report["descriptor"]["subjectDigest"],
        img.manifest.digest.as_str(),
        "{report}"
    );

    // The referrers API lists the artifact, with its artifactType and annotations.
    let r = get(
        &format!("{base}/v2/sigstore/app/referrers/{}", img.manifest.digest),
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some(OCI_INDEX));
    let list = r.json();
    let manifests = list["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "{list}");
    assert_eq!(manifests[0]["digest"], artifact.as_str());
    assert_eq!(manifests[0]["artifactType"], BUNDLE, "{list}");
    assert_eq!(
        manifests[0]["annotations"]["dev.sigstore.bundle.predicateType"],
        "https://slsa.dev/provenance/v1"
    );

    // No fallback to the referrers tag schema: no sha256-<hex> tag, no such manifest PUT.
    let fallback_tag = img.manifest.digest.replace(':', "-");
    assert_eq!(tags(&reg, "sigstore/app"), ["v1"]);
    let log = reg.log_lines();
    assert!(
        !log.iter().any(|l| l.contains(&fallback_tag)),
        "the client touched the referrers tag {fallback_tag}:\n{}",
        log.join("\n")
    );
    // The artifact manifest itself is there, pushed by digest.
    let m = get(
        &format!("{base}/v2/sigstore/app/manifests/{artifact}"),
        Some("application/vnd.oci.image.manifest.v1+json"),
    );
    assert_eq!(m.status, 200);
    assert_eq!(m.json()["subject"]["digest"], img.manifest.digest.as_str());
}
