//! The pull-through mirror with real clients, in front of Debian's `docker-registry`
//! (distribution 2.8.2, no auth) seeded with two-platform images: skopeo and crane (a cold
//! pull: its blobs stream through the mirror) straight at the mirror, docker with `--registry-mirror`, podman with a `registries.conf` mirror,
//! containerd's `ctr` with a `hosts.toml` mirror (which adds `?ns=docker.io`). Each pull is
//! checked against the seeded bytes, and the mirror's access log shows it served them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::docker::Dockerd;
use crate::interop::image::{self, Rng, index_of, random_image};
use crate::interop::{
    ACCEPT_ALL_MANIFESTS, Registry, get, push_index, require_tool, run, sha256, skip, try_run,
};

/// Debian's `docker-registry` on a free loopback port, its storage in a temporary directory,
/// its log in a file; stopped by PID when dropped.
pub(crate) struct Distribution {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Distribution {
    pub(crate) fn start() -> Distribution {
        let bin = require_tool(
            "docker-registry",
            &[PathBuf::from("/usr/bin/docker-registry")],
        );
        let dir = tempfile::tempdir().expect("tmp");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("write config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut d = Distribution { child, dir, port };
        // Until it listens, a connection is refused: wait for the port before asking `/v2/`
        // (on a loaded machine docker-registry takes seconds to bind).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && get(&format!("{}/v2/", d.base_url()), None).status == 200
            {
                break d;
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("docker-registry exited ({status}): {}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The mirror: every name maps to `upstream` (docker, podman); so does containerd's
/// `?ns=docker.io`, whose content is kept under `ctr/` (so the test sees it arrive there).
fn start_mirror(upstream: &str, dir: &Path) -> Registry {
    let f = dir.join("mirror.toml");
    std::fs::write(
        &f,
        format!(
            "[[upstream]]\nurl = \"{upstream}\"\n\n\
             [[upstream]]\nurl = \"{upstream}\"\nprefix = \"ctr/\"\nhosts = [\"docker.io\"]\n"
        ),
    )
    .expect("write");
    Registry::start_with(&["--mirror-config", f.to_str().expect("utf-8")])
}

/// Requests the mirror answered whose access-log line contains `needle`.
fn served(mirror: &Registry, needle: &str) -> usize {
    mirror
        .log_lines()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

struct Seeded {
    images: Vec<image::Image>,
    index: image::Blob,
}

fn seed(upstream: &str, repo: &str) -> Seeded {
    let mut rng = Rng::from_entropy();
    let images = vec![
        random_image(&mut rng, "linux", "amd64", 2),
        random_image(&mut rng, "linux", "arm64", 2),
    ];
    let index = index_of(&images);
    push_index(upstream, repo, "v1", &images, &index);
    Seeded { images, index }
}

#[test]
fn mirror_of_distribution_with_skopeo_crane_docker_podman_containerd() {
    let up = Distribution::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let mirror = start_mirror(&up.base_url(), tmp.path());
    let host = mirror.host();
    let s = seed(&up.base_url(), "library/mirrored");

    // The index through the mirror: the upstream's bytes, type and digest.
    let r = get(
        &format!("{}/v2/library/mirrored/manifests/v1", mirror.base_url()),
        Some(ACCEPT_ALL_MANIFESTS),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, s.index.data);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(s.index.digest.clone())
    );
    assert_eq!(r.header("content-type").as_deref(), Some(image::OCI_INDEX));

    if !skip("skopeo") {
        let out = tmp.path().join("skopeo-out");
        run(
            "skopeo copy --all from the mirror",
            Command::new("skopeo").args([
                "copy",
                "--all",
                "--src-tls-verify=false",
                &format!("docker://{host}/library/mirrored:v1"),
                &format!("oci:{}:v1", out.display()),
            ]),
        );
        for img in &s.images {
            for b in img.blobs() {
                assert_eq!(
                    image::read_layout_blob(&out, &b.digest),
                    b.data,
                    "skopeo got {} byte for byte",
                    b.digest
                );
            }
        }
        assert_eq!(image::read_layout_blob(&out, &s.index.digest), s.index.data);
    }

    if !skip("crane") {
        // An image of its own, never pulled before: crane's pull is cold, so its blobs stream
        // through the mirror while they are fetched.
        let c = seed(&up.base_url(), "library/craned");
        let reference = format!("{host}/library/craned:v1");
        let crane = |args: &[&str]| {
            let mut cmd = Command::new(crate::crane::crane_bin());
            cmd.arg("--insecure").args(args);
            run(&format!("crane {}", args.join(" ")), &mut cmd)
        };
        assert!(
            crane(&["manifest", &reference]).raw == c.index.data,
            "crane manifest: the upstream's index byte for byte"
        );
        let out = tmp.path().join("crane-out");
        // `--platform` defaults to all: the whole index goes into the OCI layout.
        crane(&[
            "pull",
            "--format",
            "oci",
            &reference,
            out.to_str().expect("utf-8"),
        ]);
        let mut blobs = 0;
        for img in &c.images {
            for b in img.blobs() {
                assert_eq!(
                    image::read_layout_blob(&out, &b.digest),
                    b.data,
                    "crane got {} byte for byte",
                    b.digest
                );
                blobs += 1;
            }
        }
        assert_eq!(image::read_layout_blob(&out, &c.index.digest), c.index.data);
        assert!(blobs > 0);
        for img in &c.images {
            for l in &img.layers {
                assert!(
                    served(
                        &mirror,
                        &format!("GET /v2/library/craned/blobs/{} 200", l.digest)
                    ) >= 1,
                    "the mirror served crane layer {}",
                    l.digest
                );
            }
        }
    }

    let amd64 = &s.images[0];
    if !skip("docker") {
        let before = served(&mirror, "GET /v2/library/mirrored/manifests/");
        let d = Dockerd::start_with(&["--registry-mirror", &mirror.base_url()]);
        d.docker(&["pull", "--platform", "linux/amd64", "mirrored:v1"]);
        let o = d.docker(&[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            "mirrored:v1",
        ]);
        assert!(
            o.stdout.contains(&s.index.digest),
            "docker pulled the index {} through the mirror: {}",
            s.index.digest,
            o.stdout
        );
        assert!(served(&mirror, "GET /v2/library/mirrored/manifests/") > before);
        assert!(
            served(
                &mirror,
                &format!("GET /v2/library/mirrored/blobs/{} 200", amd64.config.digest)
            ) >= 1
        );
    }

    if !skip("podman") {
        let dir = tmp.path().join("podman");
        std::fs::create_dir_all(dir.join("tmp")).expect("mkdir");
        let conf = dir.join("registries.conf");
        std::fs::write(
            &conf,
            format!(
                "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n\
                 [[registry.mirror]]\nlocation = \"{host}\"\ninsecure = true\n"
            ),
        )
        .expect("write registries.conf");
        let before = served(&mirror, "GET /v2/library/mirrored/manifests/v1 200");
        let mut c = crate::podman::tool("podman", &dir);
        c.env("CONTAINERS_REGISTRIES_CONF", &conf).args([
            "pull",
            "--arch",
            "amd64",
            "docker.io/library/mirrored:v1",
        ]);
        run("podman pull through a registries.conf mirror", &mut c);
        let mut c = crate::podman::tool("podman", &dir);
        c.args([
            "image",
            "inspect",
            "--format",
            "{{.Digest}}",
            "docker.io/library/mirrored:v1",
        ]);
        let o = run("podman image inspect", &mut c);
        // The instance's digest or the index's, depending on podman's version.
        let got = o.stdout.trim();
        assert!(
            got == amd64.manifest.digest || got == s.index.digest,
            "podman pulled the amd64 image: {got}"
        );
        assert!(served(&mirror, "GET /v2/library/mirrored/manifests/v1 200") > before);
    }

    if !skip("containerd") {
        let c = Containerd::start();
        let hosts = tmp.path().join("hosts.d/docker.io");
        std::fs::create_dir_all(&hosts).expect("mkdir");
        std::fs::write(
            hosts.join("hosts.toml"),
            format!(
                "server = \"https://registry-1.docker.io\"\n\n\
                 [host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .expect("write hosts.toml");
        run(
            "ctr content fetch through a hosts.toml mirror",
            c.ctr().args([
                "content",
                "fetch",
                "--hosts-dir",
                tmp.path().join("hosts.d").to_str().expect("utf-8"),
                "--platform",
                "linux/arm64",
                "docker.io/library/mirrored:v1",
            ]),
        );
        let arm64 = &s.images[1];
        for b in arm64.layers.iter().chain([&arm64.config, &arm64.manifest]) {
            let o = run(
                "ctr content get",
                c.ctr().args(["content", "get", &b.digest]),
            );
            assert!(
                o.raw == b.data,
                "containerd holds {} byte for byte",
                b.digest
            );
        }
        // Asked with ?ns=docker.io, cached under the `ctr/` prefix; its tags list is the
        // upstream's (`src/mirror/lists.rs`).
        let r = get(
            &format!("{}/v2/ctr/library/mirrored/tags/list", mirror.base_url()),
            None,
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["tags"], serde_json::json!(["v1"]));
    }

    // Upstream gone: what was pulled still comes from the mirror; the rest fails cleanly.
    drop(up);
    let r = get(
        &format!(
            "{}/v2/library/mirrored/blobs/{}",
            mirror.base_url(),
            amd64.layers[0].digest
        ),
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(sha256(&r.body), amd64.layers[0].digest);
    let r = get(
        &format!("{}/v2/library/other/manifests/v1", mirror.base_url()),
        Some(ACCEPT_ALL_MANIFESTS),
    );
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["errors"][0]["code"], "UNKNOWN");
}

/// A containerd of the test's own (root, state and socket in a temporary directory, the CRI
/// plugin off), stopped by PID.
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        let bin = require_tool("containerd", &[PathBuf::from("/usr/bin/containerd")]);
        let dir = tempfile::Builder::new()
            .prefix("dsc-")
            .tempdir_in("/tmp")
            .expect("tmp");
        let p = dir.path();
        let config = p.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{}\"\n",
                p.join("root").display(),
                p.join("state").display(),
                p.join("c.sock").display()
            ),
        )
        .expect("write config");
        let log = std::fs::File::create(p.join("containerd.log")).expect("log");
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((true, _)) = try_run(c.ctr().arg("version"), Duration::from_secs(10)) {
                break;
            }
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.dir.path().join("c.sock"))
            .env("NO_PROXY", "127.0.0.1,localhost");
        c
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
