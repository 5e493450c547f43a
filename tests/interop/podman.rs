//! podman and buildah (Debian's packages), on vfs storage of the test's own (`--root`,
//! `--runroot`): build `FROM scratch` images with each, push them (as OCI and as Docker schema
//! 2), remove them, pull them back (and check a file byte for byte), push into another
//! repository.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::interop::image::{
    self, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST, Rng, random_image,
};
use crate::interop::{
    ACCEPT_ALL_MANIFESTS, AUTH_PASSWORD, AUTH_USER, Output, Registry,
    assert_pull_followed_redirects, get, push_index, require_tool, requires_auth, run, run_failing,
    seed_image, sha256, skip, tags, version_of,
};

/// podman or buildah with storage under `dir`.
pub(crate) fn tool(name: &str, dir: &Path) -> Command {
    let bin = require_tool(name, &[PathBuf::from(name)]);
    let mut c = Command::new(bin);
    c.arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args(["--storage-driver", "vfs"]);
    if name == "podman" {
        c.args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
    }
    c.env("TMPDIR", dir.join("tmp"))
        .env("NO_PROXY", "127.0.0.1,localhost");
    c
}

fn sh(name: &str, dir: &Path, args: &[&str]) -> Output {
    run(
        &format!("{name} {}", args.join(" ")),
        tool(name, dir).args(args),
    )
}

/// A build context with a Containerfile copying two random files into a scratch image.
pub(crate) fn context(rng: &mut Rng, dir: &Path) -> Vec<u8> {
    std::fs::create_dir_all(dir).expect("mkdir");
    let a = rng.bytes(150_000);
    std::fs::write(dir.join("a.bin"), &a).expect("write");
    std::fs::write(dir.join("b.txt"), format!("{:x}\n", rng.next_u64())).expect("write");
    std::fs::write(
        dir.join("Containerfile"),
        "FROM scratch\nCOPY a.bin /data/a.bin\nCOPY b.txt /data/b.txt\n\
         LABEL org.example.test=dockside-interop\nCMD [\"/data/a.bin\"]\n",
    )
    .expect("write the Containerfile");
    a
}

/// The manifest of `repo:tag` on the registry: (Content-Type, digest).
fn manifest_of(base: &str, repo: &str, tag: &str) -> (String, String) {
    let m = get(
        &format!("{base}/v2/{repo}/manifests/{tag}"),
        Some(ACCEPT_ALL_MANIFESTS),
    );
    assert_eq!(m.status, 200, "{repo}:{tag}");
    (
        m.header("content-type").unwrap_or_default(),
        sha256(&m.body),
    )
}

#[test]
fn podman_and_buildah_build_push_pull_push_elsewhere() {
    let skip_podman = skip("podman");
    let skip_buildah = skip("buildah");
    if skip_podman && skip_buildah {
        return;
    }
    let reg = Registry::start();
    let host = reg.host();
    let base = reg.base_url();
    let mut rng = Rng::from_entropy();
    let work = tempfile::Builder::new()
        .prefix("dspod-")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    let store = work.path().join("store");
    std::fs::create_dir_all(store.join("tmp")).expect("mkdir");

    if !skip_buildah {
        eprintln!(
            "buildah: {}",
            version_of(tool("buildah", &store).arg("--version"))
        );
        let ctx = work.path().join("ctx-buildah");
        context(&mut rng, &ctx);
        let ctx_s = ctx.to_str().expect("utf-8");
        sh(
            "buildah",
            &store,
            &[
                "bud",
                "--isolation",
                "chroot",
                "-t",
                "localhost/buildah-app:v1",
                "-f",
                &format!("{ctx_s}/Containerfile"),
                ctx_s,
            ],
        );
        // buildah's default format is OCI; push it as OCI, then as Docker schema 2.
        sh(
            "buildah",
            &store,
            &[
                "push",
                "--tls-verify=false",
                "localhost/buildah-app:v1",
                &format!("docker://{host}/buildah/app:v1"),
            ],
        );
        let (ct, digest) = manifest_of(&base, "buildah/app", "v1");
        assert_eq!(ct, OCI_MANIFEST);
        sh(
            "buildah",
            &store,
            &[
                "push",
                "--tls-verify=false",
                "--format",
                "v2s2",
                "localhost/buildah-app:v1",
                &format!("docker://{host}/buildah/app-v2s2:v1"),
            ],
        );
        assert_eq!(
            manifest_of(&base, "buildah/app-v2s2", "v1").0,
            DOCKER_MANIFEST
        );
        // Pull it back with buildah and push it into another repository.
        sh("buildah", &store, &["rmi", "-a", "-f"]);
        sh(
            "buildah",
            &store,
            &[
                "pull",
                "--tls-verify=false",
                &format!("{host}/buildah/app:v1"),
            ],
        );
        sh(
            "buildah",
            &store,
            &[
                "push",
                "--tls-verify=false",
                &format!("{host}/buildah/app:v1"),
                &format!("docker://{host}/buildah/other:v1"),
            ],
        );
        assert_eq!(manifest_of(&base, "buildah/other", "v1").1, digest);
    }

    if !skip_podman {
        eprintln!(
            "podman: {}",
            version_of(tool("podman", &store).arg("--version"))
        );
        let ctx = work.path().join("ctx-podman");
        let a = context(&mut rng, &ctx);
        let ctx_s = ctx.to_str().expect("utf-8");
        let image = format!("{host}/podman/app:v1");
        sh(
            "podman",
            &store,
            &[
                "build",
                "--isolation",
                "chroot",
                "-t",
                &image,
                "-f",
                &format!("{ctx_s}/Containerfile"),
                ctx_s,
            ],
        );
        sh("podman", &store, &["push", "--tls-verify=false", &image]);
        let (ct, digest) = manifest_of(&base, "podman/app", "v1");
        assert_eq!(ct, OCI_MANIFEST);
        sh(
            "podman",
            &store,
            &[
                "push",
                "--tls-verify=false",
                "--format",
                "v2s2",
                &image,
                &format!("{host}/podman/app-v2s2:v1"),
            ],
        );
        assert_eq!(
            manifest_of(&base, "podman/app-v2s2", "v1").0,
            DOCKER_MANIFEST
        );

        // Remove every local image, pull it back, check a file in it.
        sh("podman", &store, &["rmi", "-a", "-f"]);
        sh("podman", &store, &["pull", "--tls-verify=false", &image]);
        let inspect = sh(
            "podman",
            &store,
            &[
                "image",
                "inspect",
                "--format",
                "{{json .RepoDigests}}",
                &image,
            ],
        );
        assert!(
            inspect
                .stdout
                .contains(&format!("{host}/podman/app@{digest}")),
            "{}",
            inspect.stdout
        );
        let name = format!("dockside-interop-{}", std::process::id());
        sh("podman", &store, &["create", "--name", &name, &image]);
        let out = work.path().join("a.out");
        sh(
            "podman",
            &store,
            &[
                "cp",
                &format!("{name}:/data/a.bin"),
                out.to_str().expect("utf-8"),
            ],
        );
        sh("podman", &store, &["rm", &name]);
        assert!(
            std::fs::read(&out).expect("copied file") == a,
            "a.bin differs after the round trip"
        );

        // Tag and push into another repository, then pull that by digest.
        let other = format!("{host}/podman/other:v2");
        sh("podman", &store, &["tag", &image, &other]);
        sh("podman", &store, &["push", "--tls-verify=false", &other]);
        assert_eq!(manifest_of(&base, "podman/other", "v2").1, digest);
        assert_eq!(tags(&reg, "podman/other"), ["v2"]);
        sh("podman", &store, &["rmi", "-a", "-f"]);
        sh(
            "podman",
            &store,
            &[
                "pull",
                "--tls-verify=false",
                &format!("{host}/podman/other@{digest}"),
            ],
        );

        // An OCI index made here: podman pulls the linux/amd64 image of it.
        let amd = random_image(&mut rng, "linux", "amd64", 2);
        let arm = random_image(&mut rng, "linux", "arm64", 1);
        let index = image::index_of(&[amd.clone(), arm.clone()]);
        push_index(&base, "podman/multi", "latest", &[amd.clone(), arm], &index);
        let multi = format!("{host}/podman/multi:latest");
        sh(
            "podman",
            &store,
            &["pull", "--tls-verify=false", "--arch", "amd64", &multi],
        );
        let id = sh(
            "podman",
            &store,
            &["image", "inspect", "--format", "{{.Id}}", &multi],
        );
        assert_eq!(
            format!("sha256:{}", id.stdout.trim()),
            amd.config.digest,
            "podman chose the amd64 image"
        );

        // A manifest list made by podman (`podman manifest`), pushed with --all.
        sh(
            "podman",
            &store,
            &["manifest", "create", "localhost/dockside-list"],
        );
        sh(
            "podman",
            &store,
            &[
                "manifest",
                "add",
                "--tls-verify=false",
                "localhost/dockside-list",
                &format!("docker://{host}/podman/app:v1"),
            ],
        );
        sh(
            "podman",
            &store,
            &[
                "manifest",
                "push",
                "--all",
                "--tls-verify=false",
                "localhost/dockside-list",
                &format!("docker://{host}/podman/list:v1"),
            ],
        );
        let list = get(
            &format!("{base}/v2/podman/list/manifests/v1"),
            Some(ACCEPT_ALL_MANIFESTS),
        );
        assert_eq!(list.status, 200);
        let ct = list.header("content-type").unwrap_or_default();
        assert!(
            ct == OCI_INDEX || ct == DOCKER_MANIFEST_LIST,
            "a manifest list: {ct}"
        );
        let entries = list.json()["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(entries.len(), 1, "{}", String::from_utf8_lossy(&list.body));
        assert_eq!(entries[0]["digest"], digest.as_str());
    }
}

/// Access control: `podman login` (wrong password refused), push, pull, `podman logout`.
#[test]
fn podman_login_push_pull_logout() {
    if skip("podman") {
        return;
    }
    let (reg, config) = Registry::start_with_auth();
    let host = reg.host();
    assert!(requires_auth(&reg.base_url(), "private/app"));
    let work = tempfile::Builder::new()
        .prefix("dspod-")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    let store = work.path().join("store");
    std::fs::create_dir_all(store.join("tmp")).expect("mkdir");
    let authfile = config.path().join("auth.json");
    let authfile = authfile.to_str().expect("utf-8");
    let ctx = work.path().join("ctx");
    context(&mut Rng::from_entropy(), &ctx);
    let ctx_s = ctx.to_str().expect("utf-8");
    let image = format!("{host}/private/podman:v1");
    sh(
        "podman",
        &store,
        &[
            "build",
            "--isolation",
            "chroot",
            "-t",
            &image,
            "-f",
            &format!("{ctx_s}/Containerfile"),
            ctx_s,
        ],
    );
    let push = ["push", "--tls-verify=false", "--authfile", authfile, &image];
    run_failing("push before login", tool("podman", &store).args(push));
    run_failing(
        "login with a wrong password",
        tool("podman", &store).args([
            "login",
            "--tls-verify=false",
            "--authfile",
            authfile,
            "-u",
            AUTH_USER,
            "-p",
            "wrong-password",
            &host,
        ]),
    );
    sh(
        "podman",
        &store,
        &[
            "login",
            "--tls-verify=false",
            "--authfile",
            authfile,
            "-u",
            AUTH_USER,
            "-p",
            AUTH_PASSWORD,
            &host,
        ],
    );
    sh("podman", &store, &push);
    sh("podman", &store, &["rmi", &image]);
    let pull = ["pull", "--tls-verify=false", "--authfile", authfile, &image];
    sh("podman", &store, &pull);
    sh("podman", &store, &["logout", "--authfile", authfile, &host]);
    sh("podman", &store, &["rmi", &image]);
    run_failing("pull after logout", tool("podman", &store).args(pull));
}

/// Blobs in Garage behind `--blob-redirect`: `podman pull` gets every blob through a 307 to a
/// presigned URL (podman checks each digest; the image is the one pushed), and Garage served
/// them. See `assert_pull_followed_redirects`.
#[test]
fn podman_pull_follows_blob_redirects() {
    if skip("podman") {
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("dspod-")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    let store = work.path().join("store");
    std::fs::create_dir_all(store.join("tmp")).expect("mkdir");
    let reg = Registry::start_s3_redirect();
    let (img, digests) = seed_image(&reg, "redirect/podman");
    let image = format!("{}/redirect/podman:v1", reg.host());
    sh("podman", &store, &["pull", "--tls-verify=false", &image]);
    let id = sh(
        "podman",
        &store,
        &["image", "inspect", "--format", "{{.Id}}", &image],
    );
    assert_eq!(format!("sha256:{}", id.stdout.trim()), img.config.digest);
    assert_pull_followed_redirects(&reg, "redirect/podman", &digests);
}
