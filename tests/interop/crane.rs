//! crane (go-containerregistry, built by `.ci/interop` from Debian's Go sources): push of an
//! OCI layout, catalog, ls, digest, manifest, copy (cross-repository mounts), tag, append,
//! validate --remote, blob, config, delete by tag and by digest.

use std::path::PathBuf;
use std::process::Command;

use crate::interop::image::{self, OCI_INDEX, Rng, random_image, write_layout};
use crate::interop::{
    ACCEPT_ALL_MANIFESTS, AUTH_PASSWORD, AUTH_USER, Output, Registry,
    assert_pull_followed_redirects, get, require_tool, requires_auth, run, run_failing, seed_image,
    sha256, skip, tools_dir,
};

pub(crate) fn crane_bin() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("DOCKSIDE_INTEROP_CRANE") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(tools_dir().join("bin/crane"));
    candidates.push(PathBuf::from("crane"));
    require_tool("crane", &candidates)
}

fn crane(args: &[&str]) -> Output {
    let mut c = Command::new(crane_bin());
    c.arg("--insecure").args(args);
    run(&format!("crane {}", args.join(" ")), &mut c)
}

fn lines(o: &Output) -> Vec<String> {
    o.stdout.lines().map(str::to_owned).collect()
}

#[test]
fn crane_catalog_ls_digest_manifest_copy_tag_append_validate_blob_delete() {
    if skip("crane") {
        return;
    }
    let reg = Registry::start();
    let host = reg.host();
    let base = reg.base_url();
    let tmp = tempfile::tempdir().expect("tmp");
    let mut rng = Rng::from_entropy();

    // push: an OCI image layout holding one image.
    let img = random_image(&mut rng, "linux", "amd64", 2);
    let layout = tmp.path().join("layout");
    write_layout(&layout, &img.blobs(), &[(&img.manifest, "v1")]);
    let src = format!("{host}/crane/base:v1");
    crane(&["push", layout.to_str().expect("utf-8"), &src]);

    // digest, manifest: exactly what was pushed.
    let d = crane(&["digest", &src]);
    assert_eq!(d.stdout.trim(), img.manifest.digest);
    let m = crane(&["manifest", &src]);
    assert_eq!(m.raw, img.manifest.data);
    let by_digest = format!("{host}/crane/base@{}", img.manifest.digest);
    assert_eq!(crane(&["manifest", &by_digest]).raw, img.manifest.data);

    // config, blob: byte for byte.
    assert_eq!(crane(&["config", &src]).raw, img.config.data);
    for l in &img.layers {
        let b = crane(&["blob", &format!("{host}/crane/base@{}", l.digest)]);
        assert!(b.raw == l.data, "crane blob {}", l.digest);
    }

    // validate --remote: crane pulls every layer and checks digests and diff_ids.
    crane(&["validate", "--remote", &src]);

    // copy into another repository: blobs are mounted (a POST answered 201), not uploaded
    // again (no PATCH or PUT of an upload session).
    let copied = format!("{host}/crane/copy:v1");
    crane(&["copy", &src, &copied]);
    assert_eq!(
        crane(&["digest", &copied]).stdout.trim(),
        img.manifest.digest
    );
    let log = reg.log_lines();
    let mounts = log
        .iter()
        .filter(|l| l.contains("POST /v2/crane/copy/blobs/uploads/ 201"))
        .count();
    let uploads = log
        .iter()
        .filter(|l| l.contains(" PATCH /v2/crane/copy/") || l.contains(" PUT /v2/crane/copy/blobs"))
        .count();
    assert!(
        mounts == img.layers.len() + 1 && uploads == 0,
        "crane copy: {mounts} mounts, {uploads} upload requests; the log:\n{}",
        log.join("\n")
    );

    // tag, ls, catalog.
    crane(&["tag", &src, "v2"]);
    crane(&["tag", &src, "a-first"]);
    assert_eq!(
        lines(&crane(&["ls", &format!("{host}/crane/base")])),
        ["a-first", "v1", "v2"]
    );
    let catalog = lines(&crane(&["catalog", &host]));
    for repo in ["crane/base", "crane/copy"] {
        assert!(catalog.iter().any(|r| r == repo), "{repo} in {catalog:?}");
    }

    // append: a new layer on top of the image, pushed as a new image, then validated.
    let (layer_tar, layer_gz) = image::random_layer(&mut rng, "appended", 2, 20_000);
    let layer_path = tmp.path().join("layer.tar.gz");
    std::fs::write(&layer_path, &layer_gz.data).expect("write the layer");
    let appended = format!("{host}/crane/appended:v1");
    crane(&[
        "append",
        "-b",
        &src,
        "-f",
        layer_path.to_str().expect("utf-8"),
        "-t",
        &appended,
    ]);
    crane(&["validate", "--remote", &appended]);
    let config: serde_json::Value =
        serde_json::from_slice(&crane(&["config", &appended]).raw).expect("config JSON");
    let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    assert_eq!(diff_ids.len(), img.layers.len() + 1, "{config}");
    assert_eq!(
        diff_ids.last().and_then(|v| v.as_str()),
        Some(sha256(&layer_tar).as_str())
    );

    // An index: pushed from a layout with --index, copied, validated.
    let amd = random_image(&mut rng, "linux", "amd64", 1);
    let arm = random_image(&mut rng, "linux", "arm64", 1);
    let multi = tmp.path().join("multi");
    let mut blobs = amd.blobs();
    blobs.extend(arm.blobs());
    write_layout(
        &multi,
        &blobs,
        &[(&amd.manifest, "amd64"), (&arm.manifest, "arm64")],
    );
    let multi_ref = format!("{host}/crane/multi:latest");
    crane(&[
        "push",
        "--index",
        multi.to_str().expect("utf-8"),
        &multi_ref,
    ]);
    let idx = get(
        &format!("{base}/v2/crane/multi/manifests/latest"),
        Some(ACCEPT_ALL_MANIFESTS),
    );
    assert_eq!(idx.status, 200);
    assert_eq!(idx.header("content-type").as_deref(), Some(OCI_INDEX));
    crane(&[
        "copy",
        &multi_ref,
        &format!("{host}/crane/multi-copy:latest"),
    ]);
    crane(&[
        "validate",
        "--remote",
        &format!("{host}/crane/multi-copy:latest"),
    ]);
    let copied_idx = crane(&["manifest", &format!("{host}/crane/multi-copy:latest")]);
    assert_eq!(copied_idx.raw, idx.body);

    // delete by tag: that tag only.
    crane(&["delete", &format!("{host}/crane/base:v2")]);
    assert_eq!(
        lines(&crane(&["ls", &format!("{host}/crane/base")])),
        ["a-first", "v1"]
    );
    assert_eq!(crane(&["digest", &src]).stdout.trim(), img.manifest.digest);

    // delete by digest: the manifest and every tag on it.
    crane(&["delete", &by_digest]);
    let gone = get(
        &format!("{base}/v2/crane/base/manifests/{}", img.manifest.digest),
        Some(ACCEPT_ALL_MANIFESTS),
    );
    assert_eq!(gone.status, 404);
    assert!(lines(&crane(&["ls", &format!("{host}/crane/base")])).is_empty());
    // Other repositories keep their copy.
    assert_eq!(
        crane(&["digest", &copied]).stdout.trim(),
        img.manifest.digest
    );
}

/// Access control: `crane auth login` (credentials in a DOCKER_CONFIG of the test's own), push,
/// ls, catalog (a grant of its own), manifest; a wrong password and no login are refused.
#[test]
fn crane_auth_login_push_catalog() {
    if skip("crane") {
        return;
    }
    let (reg, config) = Registry::start_with_auth();
    let host = reg.host();
    assert!(requires_auth(&reg.base_url(), "private/crane"));
    let docker_config = config.path().join("docker");
    let crane_cmd = |args: &[&str]| {
        let mut c = Command::new(crane_bin());
        c.env("DOCKER_CONFIG", &docker_config)
            .arg("--insecure")
            .args(args);
        c
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let img = random_image(&mut Rng::from_entropy(), "linux", "amd64", 1);
    let layout = tmp.path().join("layout");
    write_layout(&layout, &img.blobs(), &[(&img.manifest, "v1")]);
    let layout = layout.to_str().expect("utf-8");
    let dest = format!("{host}/private/crane:v1");

    run_failing(
        "push before login",
        &mut crane_cmd(&["push", layout, &dest]),
    );
    run(
        "crane auth login (wrong password)",
        &mut crane_cmd(&["auth", "login", &host, "-u", AUTH_USER, "-p", "wrong"]),
    );
    run_failing(
        "push with a wrong password",
        &mut crane_cmd(&["push", layout, &dest]),
    );
    run(
        "crane auth login",
        &mut crane_cmd(&["auth", "login", &host, "-u", AUTH_USER, "-p", AUTH_PASSWORD]),
    );
    run("crane push", &mut crane_cmd(&["push", layout, &dest]));
    let m = run("crane manifest", &mut crane_cmd(&["manifest", &dest]));
    assert_eq!(m.raw, img.manifest.data);
    let ls = run(
        "crane ls",
        &mut crane_cmd(&["ls", &format!("{host}/private/crane")]),
    );
    assert_eq!(ls.stdout.trim(), "v1");
    let cat = run("crane catalog", &mut crane_cmd(&["catalog", &host]));
    assert!(
        cat.stdout.lines().any(|l| l == "private/crane"),
        "{}",
        cat.stdout
    );
    // Without the credentials: refused.
    let mut anon = Command::new(crane_bin());
    anon.env("DOCKER_CONFIG", tmp.path().join("empty"))
        .args(["--insecure", "manifest", &dest]);
    run_failing("anonymous manifest of a private image", &mut anon);
}

/// Blobs in Garage behind `--blob-redirect`: `crane pull --format oci` gets every blob through
/// a 307 to a presigned URL, byte for byte, and Garage served them. See
/// `assert_pull_followed_redirects`.
#[test]
fn crane_pull_follows_blob_redirects() {
    if skip("crane") {
        return;
    }
    let reg = Registry::start_s3_redirect();
    let (img, digests) = seed_image(&reg, "redirect/crane");
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("layout");
    crane(&[
        "pull",
        "--format",
        "oci",
        &format!("{}/redirect/crane:v1", reg.host()),
        out.to_str().expect("utf-8"),
    ]);
    for b in img.layers.iter().chain([&img.config]) {
        assert!(
            image::read_layout_blob(&out, &b.digest) == b.data,
            "{} differs",
            b.digest
        );
    }
    assert_pull_followed_redirects(&reg, "redirect/crane", &digests);
}
