//! docker (Debian's `docker.io`: dockerd, containerd, runc): a dockerd of the test's own (temp
//! `--data-root`/`--exec-root`, its own unix socket, vfs, no iptables, no bridge), stopped by
//! PID. Builds a `FROM scratch` image with the legacy builder, pushes it, removes it, pulls it
//! back (and checks a file in it byte for byte), then tags and pushes it into a second
//! repository, where docker mounts the layers across repositories.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::interop::image::{self, DOCKER_MANIFEST, OCI_INDEX, Rng, random_image};
use crate::interop::{
    ACCEPT_ALL_MANIFESTS, AUTH_PASSWORD, AUTH_USER, Output, Registry,
    assert_pull_followed_redirects, get, push_index, require_tool, requires_auth, run, run_failing,
    seed_image, sha256, skip, tags, try_run, version_of,
};

/// A dockerd process of the test's own.
pub(crate) struct Dockerd {
    child: Child,
    dir: tempfile::TempDir,
    docker: PathBuf,
}

impl Dockerd {
    pub(crate) fn start() -> Dockerd {
        Dockerd::start_with(&[])
    }

    /// A daemon with `extra` flags (e.g. `--registry-mirror URL`).
    pub(crate) fn start_with(extra: &[&str]) -> Dockerd {
        let dockerd = require_tool(
            "docker",
            &[PathBuf::from("/usr/sbin/dockerd"), PathBuf::from("dockerd")],
        );
        let docker = require_tool(
            "docker",
            &[PathBuf::from("/usr/bin/docker"), PathBuf::from("docker")],
        );
        // Short paths: the unix socket path must stay under 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("dsd-")
            .tempdir_in("/tmp")
            .expect("tmp");
        let log = std::fs::File::create(dir.path().join("dockerd.log")).expect("log file");
        let child = Command::new(dockerd)
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("dockerd.pid"))
            .arg("--host")
            .arg(format!(
                "unix://{}",
                dir.path().join("docker.sock").display()
            ))
            .args([
                "--storage-driver",
                "vfs",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let d = Dockerd { child, dir, docker };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok((true, _)) = try_run(d.cmd().arg("info"), Duration::from_secs(20)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not come up; its log:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// A `docker` command talking to this daemon, with a config directory of its own.
    pub(crate) fn cmd(&self) -> Command {
        let mut c = Command::new(&self.docker);
        c.env(
            "DOCKER_HOST",
            format!("unix://{}", self.dir.path().join("docker.sock").display()),
        )
        .env("DOCKER_CONFIG", self.dir.path().join("config"))
        .env("DOCKER_BUILDKIT", "0")
        .env("NO_PROXY", "127.0.0.1,localhost");
        c
    }

    pub(crate) fn docker(&self, args: &[&str]) -> Output {
        run(&format!("docker {}", args.join(" ")), self.cmd().args(args))
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        // The containerd that dockerd started stops with it; if it did not, stop it by PID.
        let pidfile = self.dir.path().join("exec/containerd/containerd.pid");
        if let Ok(pid) = std::fs::read_to_string(pidfile) {
            let pid = pid.trim();
            if !pid.is_empty() && Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "---- dockerd log (last 40 lines) ----\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// The digest `docker push` reports (`<tag>: digest: sha256:... size: N`).
fn pushed_digest(out: &Output) -> String {
    out.stdout
        .lines()
        .find_map(|l| l.split("digest: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no digest in the push output:\n{}", out.stdout))
        .to_owned()
}

#[test]
fn docker_build_push_rmi_pull_retag_push() {
    if skip("docker") {
        return;
    }
    let d = Dockerd::start();
    eprintln!(
        "docker: {}",
        version_of(d.cmd().args(["version", "--format", "{{.Server.Version}}"]))
    );
    let reg = Registry::start();
    let host = reg.host();
    let base = reg.base_url();
    let mut rng = Rng::from_entropy();

    // A FROM scratch image of two random files (two layers), built by the legacy builder.
    let ctx = tempfile::tempdir().expect("tmp");
    let a = rng.bytes(3_000_000);
    let b = rng.bytes(30_000);
    std::fs::write(ctx.path().join("a.bin"), &a).expect("write");
    std::fs::write(ctx.path().join("b.bin"), &b).expect("write");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY a.bin /data/a.bin\nCOPY b.bin /data/b.bin\n\
         LABEL org.example.test=dockside-interop\nCMD [\"/data/a.bin\"]\n",
    )
    .expect("write the Dockerfile");
    let image = format!("{host}/docker/app:v1");
    d.docker(&["build", "-t", &image, ctx.path().to_str().expect("utf-8")]);

    // push
    let out = d.docker(&["push", &image]);
    let digest = pushed_digest(&out);
    let m = get(
        &format!("{base}/v2/docker/app/manifests/v1"),
        Some(ACCEPT_ALL_MANIFESTS),
    );
    assert_eq!(m.status, 200);
    assert_eq!(m.header("content-type").as_deref(), Some(DOCKER_MANIFEST));
    assert_eq!(sha256(&m.body), digest);
    assert_eq!(m.json()["layers"].as_array().map(Vec::len), Some(2));

    // remove it locally, pull it back, check a file in it.
    d.docker(&["rmi", &image]);
    run_failing(
        "the image is gone",
        d.cmd().args(["image", "inspect", &image]),
    );
    d.docker(&["pull", &image]);
    let repo_digests = d.docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .RepoDigests}}",
        &image,
    ]);
    assert!(
        repo_digests
            .stdout
            .contains(&format!("{host}/docker/app@{digest}")),
        "{}",
        repo_digests.stdout
    );
    let out_dir = tempfile::tempdir().expect("tmp");
    let name = format!("dockside-interop-{}", std::process::id());
    d.docker(&["create", "--name", &name, &image]);
    let target = out_dir.path().join("a.bin");
    d.docker(&[
        "cp",
        &format!("{name}:/data/a.bin"),
        target.to_str().expect("utf-8"),
    ]);
    d.docker(&["rm", &name]);
    assert!(
        std::fs::read(&target).expect("copied file") == a,
        "a.bin differs after the round trip"
    );

    // retag into a second repository and push: the layers are mounted, not uploaded.
    let other = format!("{host}/docker/other:v2");
    d.docker(&["tag", &image, &other]);
    let out = d.docker(&["push", &other]);
    assert_eq!(pushed_digest(&out), digest);
    assert!(
        out.stdout.contains("Mounted from docker/app"),
        "docker did not mount across repositories:\n{}",
        out.stdout
    );
    // Both layers mounted (a POST answered 201); only the config is uploaded again.
    let log = reg.log_lines();
    let mounts = log
        .iter()
        .filter(|l| l.contains("POST /v2/docker/other/blobs/uploads/ 201"))
        .count();
    let uploads = log
        .iter()
        .filter(|l| l.contains(" PUT /v2/docker/other/blobs/uploads/"))
        .count();
    assert!(
        mounts == 2 && uploads <= 1,
        "docker/other: {mounts} mounts, {uploads} uploads:\n{}",
        log.join("\n")
    );

    // pull by digest from the second repository.
    d.docker(&["rmi", &other, &image]);
    d.docker(&["pull", &format!("{host}/docker/other@{digest}")]);

    // An OCI image index made here (linux/amd64 and linux/arm64): docker picks amd64.
    let amd = random_image(&mut rng, "linux", "amd64", 2);
    let arm = random_image(&mut rng, "linux", "arm64", 1);
    let index = image::index_of(&[amd.clone(), arm.clone()]);
    push_index(&base, "docker/multi", "latest", &[amd.clone(), arm], &index);
    let multi = format!("{host}/docker/multi:latest");
    let out = d.docker(&["pull", &multi]);
    assert!(
        out.stdout.contains(&format!("Digest: {}", index.digest)),
        "docker pull reports the index digest:\n{}",
        out.stdout
    );
    let id = d.docker(&["image", "inspect", "--format", "{{.Id}}", &multi]);
    assert_eq!(
        id.stdout.trim(),
        amd.config.digest,
        "docker chose the amd64 image"
    );
}

/// containerd's `ctr` (Debian's `containerd`, which `docker.io` brings), against the containerd
/// that a dockerd of the test's own manages: pulls a multi-platform OCI index made here (all
/// platforms), pushes an image and an index back into other repositories, pulls by digest.
#[test]
fn containerd_ctr_pull_push() {
    if skip("containerd") || skip("docker") {
        return;
    }
    let ctr_bin = require_tool(
        "containerd",
        &[PathBuf::from("/usr/bin/ctr"), PathBuf::from("ctr")],
    );
    let d = Dockerd::start();
    let sock = d.dir.path().join("exec/containerd/containerd.sock");
    let ctr = |args: &[&str]| -> Output {
        run(
            &format!("ctr {}", args.join(" ")),
            Command::new(&ctr_bin)
                .arg("--address")
                .arg(&sock)
                .args(["--namespace", "dockside-interop"])
                .args(args),
        )
    };
    eprintln!(
        "ctr: {}",
        version_of(Command::new(&ctr_bin).arg("--version"))
    );
    let reg = Registry::start();
    let host = reg.host();
    let base = reg.base_url();
    let mut rng = Rng::from_entropy();

    let amd = random_image(&mut rng, "linux", "amd64", 2);
    let arm = random_image(&mut rng, "linux", "arm64", 1);
    let index = image::index_of(&[amd.clone(), arm.clone()]);
    push_index(
        &base,
        "ctr/multi",
        "v1",
        &[amd.clone(), arm.clone()],
        &index,
    );

    // Pull every platform, then push the index into another repository, and one platform's
    // manifest into a third.
    let src = format!("{host}/ctr/multi:v1");
    ctr(&["images", "pull", "--plain-http", "--all-platforms", &src]);
    let listed = ctr(&["images", "ls"]);
    assert!(listed.stdout.contains(&index.digest), "{}", listed.stdout);
    let copy = format!("{host}/ctr/copy:v1");
    ctr(&["images", "tag", &src, &copy]);
    ctr(&["images", "push", "--plain-http", &copy]);
    let m = get(
        &format!("{base}/v2/ctr/copy/manifests/v1"),
        Some(ACCEPT_ALL_MANIFESTS),
    );
    assert_eq!(m.status, 200);
    assert_eq!(m.header("content-type").as_deref(), Some(OCI_INDEX));
    assert_eq!(m.body, index.data, "ctr pushed the index byte for byte");
    for img in [&amd, &arm] {
        for b in img.layers.iter().chain([&img.config]) {
            let r = get(&format!("{base}/v2/ctr/copy/blobs/{}", b.digest), None);
            assert_eq!(r.status, 200, "{} in ctr/copy", b.digest);
            assert!(r.body == b.data);
        }
    }
    let single = format!("{host}/ctr/single:amd64");
    ctr(&["images", "tag", &src, &single]);
    ctr(&[
        "images",
        "push",
        "--plain-http",
        "--platform",
        "linux/amd64",
        &single,
    ]);
    assert_eq!(tags(&reg, "ctr/single"), ["amd64"]);

    // Pull by digest after removing the local images.
    ctr(&["images", "rm", &src, &copy, &single]);
    let by_digest = format!("{host}/ctr/copy@{}", index.digest);
    ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--platform",
        "linux/arm64",
        &by_digest,
    ]);
    ctr(&["images", "rm", &by_digest]);
    // No `ctr content prune` here: this containerd and its store are thrown away with the
    // test, and prune races containerd's own garbage collector ("content digest ... not found").
}

/// Access control: `docker login` (the Bearer challenge, the token endpoint, the refresh token
/// docker keeps), push, pull, `docker logout`; anonymous pull of a public repository.
#[test]
fn docker_login_push_pull_logout() {
    if skip("docker") {
        return;
    }
    let d = Dockerd::start();
    let (reg, _config) = Registry::start_with_auth();
    let host = reg.host();
    assert!(requires_auth(&reg.base_url(), "private/app"));

    let ctx = tempfile::tempdir().expect("tmp");
    std::fs::write(ctx.path().join("f.bin"), Rng::from_entropy().bytes(200_000)).expect("write");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY f.bin /f.bin\nCMD [\"/f.bin\"]\n",
    )
    .expect("write the Dockerfile");
    let image = format!("{host}/private/app:v1");
    let public = format!("{host}/public/app:v1");
    d.docker(&["build", "-t", &image, ctx.path().to_str().expect("utf-8")]);
    d.docker(&["tag", &image, &public]);

    run_failing("push before login", d.cmd().args(["push", &image]));
    run_failing(
        "login with a wrong password",
        d.cmd()
            .args(["login", &host, "-u", AUTH_USER, "-p", "wrong-password"]),
    );
    d.docker(&["login", &host, "-u", AUTH_USER, "-p", AUTH_PASSWORD]);
    d.docker(&["push", &image]);
    d.docker(&["push", &public]);
    d.docker(&["rmi", &image, &public]);
    d.docker(&["pull", &image]);

    d.docker(&["logout", &host]);
    d.docker(&["rmi", &image]);
    run_failing(
        "pull of a private image after logout",
        d.cmd().args(["pull", &image]),
    );
    d.docker(&["pull", &public]);
}

/// Access control with containerd's `ctr --user`: containerd asks for tokens with the OAuth2
/// form (`POST /token`, `grant_type=password`), falling back to GET only on 404/405.
#[test]
fn containerd_ctr_with_credentials() {
    if skip("containerd") || skip("docker") {
        return;
    }
    let ctr_bin = require_tool(
        "containerd",
        &[PathBuf::from("/usr/bin/ctr"), PathBuf::from("ctr")],
    );
    let d = Dockerd::start();
    let sock = d.dir.path().join("exec/containerd/containerd.sock");
    let ctr = |args: &[&str]| -> Command {
        let mut c = Command::new(&ctr_bin);
        c.arg("--address")
            .arg(&sock)
            .args(["--namespace", "dockside-interop-auth"])
            .args(args);
        c
    };
    let (reg, _config) = Registry::start_with_auth();
    let host = reg.host();
    let base = reg.base_url();
    assert!(requires_auth(&base, "private/ctr"));

    // Seed an image with Basic credentials straight on /v2/.
    let basic = {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{AUTH_USER}:{AUTH_PASSWORD}"))
        )
    };
    let img = random_image(&mut Rng::from_entropy(), "linux", "amd64", 1);
    for b in img.layers.iter().chain([&img.config]) {
        let r = crate::interop::http(
            "POST",
            &format!("{base}/v2/private/ctr/blobs/uploads/?digest={}", b.digest),
            &[("authorization", &basic)],
            b.data.clone(),
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }
    let r = crate::interop::http(
        "PUT",
        &format!("{base}/v2/private/ctr/manifests/v1"),
        &[
            ("authorization", &basic),
            ("content-type", img.manifest.media_type.as_str()),
        ],
        img.manifest.data.clone(),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    let src = format!("{host}/private/ctr:v1");
    let creds = format!("{AUTH_USER}:{AUTH_PASSWORD}");
    run_failing(
        "ctr pull without credentials",
        &mut ctr(&["images", "pull", "--plain-http", &src]),
    );
    run_failing(
        "ctr pull with a wrong password",
        &mut ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--user",
            &format!("{AUTH_USER}:wrong"),
            &src,
        ]),
    );
    run(
        "ctr pull --user",
        &mut ctr(&["images", "pull", "--plain-http", "--user", &creds, &src]),
    );
    let copy = format!("{host}/private/ctr-copy:v1");
    run("ctr tag", &mut ctr(&["images", "tag", &src, &copy]));
    run(
        "ctr push --user",
        &mut ctr(&["images", "push", "--plain-http", "--user", &creds, &copy]),
    );
    let r = crate::interop::http(
        "GET",
        &format!("{base}/v2/private/ctr-copy/manifests/v1"),
        &[("authorization", &basic), ("accept", ACCEPT_ALL_MANIFESTS)],
        Vec::new(),
    );
    assert_eq!(r.status, 200);
    assert!(
        r.body == img.manifest.data,
        "ctr pushed the manifest byte for byte"
    );
    assert!(
        reg.log_lines()
            .iter()
            .any(|l| l.contains(" POST /token 200")),
        "containerd did not use the OAuth2 form of the token endpoint"
    );
    let _ = ctr(&["images", "rm", &src, &copy]).output();
}

/// Blobs in Garage behind `--blob-redirect`: `docker pull` gets every blob through a 307 to a
/// presigned URL (dockerd checks each digest and the layers' diff_ids; the image is the one
/// pushed), and Garage served them. See `assert_pull_followed_redirects`.
#[test]
fn docker_pull_follows_blob_redirects() {
    if skip("docker") {
        return;
    }
    let d = Dockerd::start();
    let reg = Registry::start_s3_redirect();
    let (img, digests) = seed_image(&reg, "redirect/docker");
    let image = format!("{}/redirect/docker:v1", reg.host());
    d.docker(&["pull", &image]);
    let id = d.docker(&["image", "inspect", "--format", "{{.Id}}", &image]);
    assert_eq!(id.stdout.trim(), img.config.digest);
    assert_pull_followed_redirects(&reg, "redirect/docker", &digests);
}

/// The same with containerd's `ctr`: the pulled blobs, read back from containerd's content
/// store, are the bytes pushed.
#[test]
fn containerd_ctr_pull_follows_blob_redirects() {
    if skip("containerd") || skip("docker") {
        return;
    }
    let ctr_bin = require_tool(
        "containerd",
        &[PathBuf::from("/usr/bin/ctr"), PathBuf::from("ctr")],
    );
    let d = Dockerd::start();
    let sock = d.dir.path().join("exec/containerd/containerd.sock");
    let ctr = |args: &[&str]| -> Output {
        run(
            &format!("ctr {}", args.join(" ")),
            Command::new(&ctr_bin)
                .arg("--address")
                .arg(&sock)
                .args(["--namespace", "dockside-redirect"])
                .args(args),
        )
    };
    let reg = Registry::start_s3_redirect();
    let (img, digests) = seed_image(&reg, "redirect/ctr");
    ctr(&[
        "images",
        "pull",
        "--plain-http",
        &format!("{}/redirect/ctr:v1", reg.host()),
    ]);
    for b in img.layers.iter().chain([&img.config]) {
        let got = ctr(&["content", "get", &b.digest]);
        assert!(got.raw == b.data, "{} differs in containerd", b.digest);
    }
    assert_pull_followed_redirects(&reg, "redirect/ctr", &digests);
}
