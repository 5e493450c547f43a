//! skopeo (Debian's package): OCI image layouts copied into dockside and back, as OCI and as
//! Docker schema 2, a multi-platform index with `--all`, `inspect --raw`, `list-tags`, `delete`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::interop::image::{
    self, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Rng, random_image, write_layout,
};
use crate::interop::{
    ACCEPT_ALL_MANIFESTS, AUTH_PASSWORD, AUTH_USER, Registry, assert_pull_followed_redirects, get,
    require_tool, requires_auth, run, run_failing, seed_image, sha256, skip,
};

fn skopeo() -> Command {
    let bin = require_tool("skopeo", &[PathBuf::from("skopeo")]);
    let mut c = Command::new(bin);
    c.arg("--insecure-policy");
    c
}

/// `skopeo copy` with plain HTTP on both sides.
fn copy(extra: &[&str], from: &str, to: &str) {
    run(
        &format!("skopeo copy {from} {to}"),
        skopeo()
            .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
            .args(extra)
            .arg(from)
            .arg(to),
    );
}

fn oci_ref(dir: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", dir.display())
}

#[test]
fn skopeo_copy_oci_v2s2_multiarch_inspect_list_delete() {
    if skip("skopeo") {
        return;
    }
    eprintln!(
        "skopeo: {}",
        crate::interop::version_of(skopeo().arg("--version"))
    );
    let reg = Registry::start();
    let host = reg.host();
    let base = reg.base_url();
    let tmp = tempfile::tempdir().expect("tmp");
    let mut rng = Rng::from_entropy();

    // An OCI image layout with one image, tagged v1.
    let img = random_image(&mut rng, "linux", "amd64", 2);
    let src = tmp.path().join("src");
    write_layout(&src, &img.blobs(), &[(&img.manifest, "v1")]);

    // 1. OCI layout -> dockside, as OCI: the manifest arrives byte for byte.
    copy(
        &[],
        &oci_ref(&src, "v1"),
        &format!("docker://{host}/skopeo/oci:v1"),
    );
    let m = get(
        &format!("{base}/v2/skopeo/oci/manifests/v1"),
        Some(ACCEPT_ALL_MANIFESTS),
    );
    assert_eq!(m.status, 200);
    assert_eq!(m.header("content-type").as_deref(), Some(OCI_MANIFEST));
    assert_eq!(
        m.header("docker-content-digest").as_deref(),
        Some(img.manifest.digest.as_str())
    );
    assert_eq!(m.body, img.manifest.data, "the manifest as pushed");
    for b in img.layers.iter().chain([&img.config]) {
        let r = get(&format!("{base}/v2/skopeo/oci/blobs/{}", b.digest), None);
        assert_eq!(r.status, 200, "blob {}", b.digest);
        assert!(r.body == b.data, "blob {} differs", b.digest);
    }

    // ... and back into a new layout: every blob byte for byte, the same manifest digest.
    let back = tmp.path().join("back");
    copy(
        &[],
        &format!("docker://{host}/skopeo/oci:v1"),
        &oci_ref(&back, "v1"),
    );
    let index = image::read_layout_index(&back);
    assert_eq!(
        index["manifests"][0]["digest"].as_str(),
        Some(img.manifest.digest.as_str()),
        "{index}"
    );
    for b in img.blobs() {
        assert!(
            image::read_layout_blob(&back, &b.digest) == b.data,
            "blob {} differs after the round trip",
            b.digest
        );
    }

    // 2. As Docker schema 2 (`--format v2s2`): skopeo converts, dockside serves it as pushed.
    copy(
        &["--format", "v2s2"],
        &oci_ref(&src, "v1"),
        &format!("docker://{host}/skopeo/v2s2:v1"),
    );
    let m = get(
        &format!("{base}/v2/skopeo/v2s2/manifests/v1"),
        Some(ACCEPT_ALL_MANIFESTS),
    );
    assert_eq!(m.status, 200);
    assert_eq!(m.header("content-type").as_deref(), Some(DOCKER_MANIFEST));
    let v2s2 = m.json();
    assert_eq!(v2s2["mediaType"], DOCKER_MANIFEST);
    assert_eq!(
        m.header("docker-content-digest"),
        Some(sha256(&m.body)),
        "Docker-Content-Digest is the digest of the body"
    );
    let dir_back = tmp.path().join("v2s2-dir");
    copy(
        &[],
        &format!("docker://{host}/skopeo/v2s2:v1"),
        &format!("dir:{}", dir_back.display()),
    );
    let pulled = std::fs::read(dir_back.join("manifest.json")).expect("dir: manifest.json");
    assert_eq!(pulled, m.body, "dir: holds the manifest as served");
    for l in &img.layers {
        let f = std::fs::read(dir_back.join(l.hex())).expect("dir: layer file");
        assert!(
            f == l.data,
            "layer {} differs in the v2s2 round trip",
            l.digest
        );
    }

    // 3. A multi-platform index with --all.
    let amd = random_image(&mut rng, "linux", "amd64", 1);
    let arm = random_image(&mut rng, "linux", "arm64", 1);
    let idx = image::index_of(&[amd.clone(), arm.clone()]);
    let multi = tmp.path().join("multi");
    let mut blobs = amd.blobs();
    blobs.extend(arm.blobs());
    write_layout(&multi, &blobs, &[(&idx, "multi")]);
    copy(
        &["--all"],
        &oci_ref(&multi, "multi"),
        &format!("docker://{host}/skopeo/multi:latest"),
    );
    let m = get(
        &format!("{base}/v2/skopeo/multi/manifests/latest"),
        Some(ACCEPT_ALL_MANIFESTS),
    );
    assert_eq!(m.status, 200);
    assert_eq!(m.header("content-type").as_deref(), Some(OCI_INDEX));
    assert_eq!(m.body, idx.data, "the index as pushed");
    for child in [&amd, &arm] {
        let r = get(
            &format!("{base}/v2/skopeo/multi/manifests/{}", child.manifest.digest),
            Some(ACCEPT_ALL_MANIFESTS),
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.body, child.manifest.data);
    }
    let multi_back = tmp.path().join("multi-back");
    copy(
        &["--all"],
        &format!("docker://{host}/skopeo/multi:latest"),
        &oci_ref(&multi_back, "multi"),
    );
    let index = image::read_layout_index(&multi_back);
    assert_eq!(
        index["manifests"][0]["digest"].as_str(),
        Some(idx.digest.as_str())
    );
    for b in &blobs {
        assert!(image::read_layout_blob(&multi_back, &b.digest) == b.data);
    }

    // 4. inspect --raw, inspect, a registry-to-registry copy, list-tags.
    let raw = run(
        "skopeo inspect --raw",
        skopeo()
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{host}/skopeo/oci:v1")),
    );
    assert_eq!(raw.stdout.as_bytes(), img.manifest.data.as_slice());
    let raw = run(
        "skopeo inspect --raw (index)",
        skopeo()
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{host}/skopeo/multi:latest")),
    );
    assert_eq!(raw.stdout.as_bytes(), idx.data.as_slice());
    let info = run(
        "skopeo inspect",
        skopeo()
            .args(["inspect", "--tls-verify=false"])
            .arg(format!("docker://{host}/skopeo/oci:v1")),
    );
    let info: serde_json::Value = serde_json::from_str(&info.stdout).expect("inspect JSON");
    assert_eq!(info["Digest"], img.manifest.digest.as_str(), "{info}");
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(
        info["Layers"].as_array().map(Vec::len),
        Some(img.layers.len())
    );
    copy(
        &[],
        &format!("docker://{host}/skopeo/oci:v1"),
        &format!("docker://{host}/skopeo/oci:v2"),
    );
    copy(
        &[],
        &format!("docker://{host}/skopeo/oci:v1"),
        &format!("docker://{host}/skopeo/copied:v1"),
    );
    let tags_of = |repo: &str| -> Vec<String> {
        let out = run(
            "skopeo list-tags",
            skopeo()
                .args(["list-tags", "--tls-verify=false"])
                .arg(format!("docker://{host}/{repo}")),
        );
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("list-tags JSON");
        v["Tags"]
            .as_array()
            .expect("Tags")
            .iter()
            .map(|t| t.as_str().expect("tag").to_owned())
            .collect()
    };
    assert_eq!(tags_of("skopeo/oci"), ["v1", "v2"]);
    assert_eq!(tags_of("skopeo/copied"), ["v1"]);

    // 5. delete: skopeo resolves the tag and deletes the manifest by digest, so every tag of
    // that digest goes with it; other repositories keep theirs.
    run(
        "skopeo delete",
        skopeo()
            .args(["delete", "--tls-verify=false"])
            .arg(format!("docker://{host}/skopeo/oci:v2")),
    );
    let gone = get(
        &format!("{base}/v2/skopeo/oci/manifests/{}", img.manifest.digest),
        Some(ACCEPT_ALL_MANIFESTS),
    );
    assert_eq!(gone.status, 404);
    assert_eq!(
        get(&format!("{base}/v2/skopeo/oci/manifests/v1"), None).status,
        404
    );
    assert!(tags_of("skopeo/oci").is_empty());
    assert_eq!(tags_of("skopeo/copied"), ["v1"]);
    let still = get(
        &format!("{base}/v2/skopeo/copied/manifests/v1"),
        Some(ACCEPT_ALL_MANIFESTS),
    );
    assert_eq!(still.status, 200);
}

/// Access control: `skopeo copy --dest-creds`, `inspect --creds`, wrong and missing
/// credentials refused, anonymous reads of a public repository.
#[test]
fn skopeo_with_credentials() {
    if skip("skopeo") {
        return;
    }
    let (reg, _config) = Registry::start_with_auth();
    let host = reg.host();
    assert!(requires_auth(&reg.base_url(), "private/sk"));
    let tmp = tempfile::tempdir().expect("tmp");
    let mut rng = Rng::from_entropy();
    let img = random_image(&mut rng, "linux", "amd64", 2);
    let layout = tmp.path().join("layout");
    write_layout(&layout, &img.blobs(), &[(&img.manifest, "v1")]);
    let src = oci_ref(&layout, "v1");
    let creds = format!("{AUTH_USER}:{AUTH_PASSWORD}");
    let private = format!("docker://{host}/private/sk:v1");
    let public = format!("docker://{host}/public/sk:v1");

    let copy_cmd = |extra: &[&str], to: &str| {
        let mut c = skopeo();
        c.args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
            .args(extra)
            .arg(&src)
            .arg(to);
        c
    };
    run_failing("copy without credentials", &mut copy_cmd(&[], &private));
    run_failing(
        "copy with a wrong password",
        &mut copy_cmd(&["--dest-creds", &format!("{AUTH_USER}:wrong")], &private),
    );
    copy(&["--dest-creds", &creds], &src, &private);
    copy(&["--dest-creds", &creds], &src, &public);

    let raw = run(
        "inspect --raw --creds",
        skopeo()
            .args(["inspect", "--raw", "--tls-verify=false", "--creds", &creds])
            .arg(&private),
    );
    assert_eq!(raw.raw, img.manifest.data);
    run_failing(
        "inspect of a private image without credentials",
        skopeo()
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(&private),
    );
    let anon = run(
        "anonymous inspect of a public image",
        skopeo()
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(&public),
    );
    assert_eq!(anon.raw, img.manifest.data);
    // And back out with credentials.
    let back = tmp.path().join("back");
    copy(&["--src-creds", &creds], &private, &oci_ref(&back, "v1"));
}

/// Blobs in Garage behind `--blob-redirect`: `skopeo copy` to an OCI layout gets every blob
/// through a 307 to a presigned URL, byte for byte, and Garage served them. See
/// `assert_pull_followed_redirects`.
#[test]
fn skopeo_copy_follows_blob_redirects() {
    if skip("skopeo") {
        return;
    }
    let reg = Registry::start_s3_redirect();
    let (img, digests) = seed_image(&reg, "redirect/skopeo");
    let tmp = tempfile::tempdir().expect("tmp");
    copy(
        &[],
        &format!("docker://{}/redirect/skopeo:v1", reg.host()),
        &oci_ref(tmp.path(), "v1"),
    );
    for b in img.layers.iter().chain([&img.config]) {
        assert!(
            image::read_layout_blob(tmp.path(), &b.digest) == b.data,
            "{} differs",
            b.digest
        );
    }
    assert_pull_followed_redirects(&reg, "redirect/skopeo", &digests);
}
