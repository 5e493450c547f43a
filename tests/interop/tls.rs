//! Real clients over TLS (`dockside serve --tls-cert/--tls-key`), on `dockside.test:<port>`: a
//! name that does not look like loopback, so every client insists on verified HTTPS. The CA
//! is made in the test (rcgen); `.ci/interop` maps `dockside.test` to 127.0.0.1 in /etc/hosts.
//! Each client gets the CA its own way: docker from `/etc/docker/certs.d/<host:port>/ca.crt`,
//! podman and skopeo with `--cert-dir`, crane with `SSL_CERT_FILE`. podman, skopeo and crane
//! also fail without it, which shows that the certificate is really checked (dockerd checks
//! none on a loopback address, whatever its name: see the docker test).

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::interop::image::{Rng, random_image, write_layout};
use crate::interop::test_ca::TestCa;
use crate::interop::{Output, Registry, require_tool, run, run_failing, skip, try_run};

/// The name the test certificates carry and `.ci/interop` puts in /etc/hosts.
const NAME: &str = "dockside.test";

/// A registry on HTTPS and where its CA is, for each kind of client.
struct TlsRegistry {
    reg: Registry,
    ca: TestCa,
    /// Holds `ca.crt` (podman and skopeo `--cert-dir`).
    cert_dir: PathBuf,
    /// The CA certificate (crane's `SSL_CERT_FILE`).
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsRegistry {
    fn start() -> TlsRegistry {
        let resolved: Vec<_> = (NAME, 443)
            .to_socket_addrs()
            .map(|a| a.map(|a| a.ip()).collect())
            .unwrap_or_default();
        assert!(
            resolved.iter().any(|ip| ip.is_loopback()),
            "{NAME} does not resolve to 127.0.0.1 (got {resolved:?}): .ci/interop adds \
             `127.0.0.1 {NAME}` to /etc/hosts"
        );
        let dir = tempfile::tempdir().expect("tmp");
        let ca = TestCa::new("dockside interop CA");
        let (cert, key) = ca.issue_into(dir.path());
        let cert_dir = dir.path().join("certs");
        std::fs::create_dir_all(&cert_dir).expect("mkdir");
        ca.write(&cert_dir.join("ca.crt"));
        let ca_file = ca.write(&dir.path().join("ca.pem"));
        let reg = Registry::start_with(&[
            "--tls-cert",
            cert.to_str().expect("utf-8"),
            "--tls-key",
            key.to_str().expect("utf-8"),
        ]);
        assert!(
            reg.log_lines()
                .iter()
                .any(|l| l.contains("listening on https://")),
            "the server does not serve HTTPS"
        );
        TlsRegistry {
            reg,
            ca,
            cert_dir,
            ca_file,
            _dir: dir,
        }
    }

    /// `dockside.test:PORT`.
    fn host(&self) -> String {
        format!("{NAME}:{}", self.reg.port())
    }

    /// The manifest of `repo:tag`, read over HTTPS by a client that trusts the test CA.
    fn manifest(&self, repo: &str, tag: &str) -> Vec<u8> {
        let url = format!("https://{}/v2/{repo}/manifests/{tag}", self.host());
        let client = self.ca.client(false);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(async {
                let r = client
                    .get(&url)
                    .header("accept", crate::interop::ACCEPT_ALL_MANIFESTS)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("GET {url}: {e}"));
                assert_eq!(r.status(), 200, "GET {url}");
                r.bytes().await.expect("body").to_vec()
            })
    }
}

/// An OCI image layout with one small image tagged `v1`; returns its manifest.
fn layout(dir: &Path) -> Vec<u8> {
    let mut rng = Rng::from_entropy();
    let img = random_image(&mut rng, "linux", "amd64", 1);
    write_layout(dir, &img.blobs(), &[(&img.manifest, "v1")]);
    img.manifest.data.clone()
}

fn says_unknown_authority(out: &Output) -> bool {
    let all = format!("{}{}", out.stdout, out.stderr).to_ascii_lowercase();
    all.contains("certificate") || all.contains("x509") || all.contains("tls")
}

#[test]
fn skopeo_over_tls_with_cert_dir() {
    if skip("skopeo") {
        return;
    }
    let t = TlsRegistry::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    let manifest = layout(&src);
    let skopeo = || {
        let mut c = Command::new(require_tool("skopeo", &[PathBuf::from("skopeo")]));
        c.arg("--insecure-policy");
        c
    };
    let dest = format!("docker://{}/tls/skopeo:v1", t.host());
    let cert_dir = t.cert_dir.to_str().expect("utf-8");
    run(
        "skopeo copy over TLS",
        skopeo()
            .args(["copy", "--dest-cert-dir", cert_dir])
            .arg(format!("oci:{}:v1", src.display()))
            .arg(&dest),
    );
    assert_eq!(t.manifest("tls/skopeo", "v1"), manifest);
    let raw = run(
        "skopeo inspect over TLS",
        skopeo().args(["inspect", "--raw", "--cert-dir", cert_dir, &dest]),
    );
    assert_eq!(raw.raw, manifest);
    // Without the CA, skopeo refuses the certificate.
    let out = run_failing(
        "skopeo without the CA",
        skopeo().args(["inspect", "--raw", &dest]),
    );
    assert!(says_unknown_authority(&out), "{}", out.stderr);
}

#[test]
fn crane_over_tls_with_ssl_cert_file() {
    if skip("crane") {
        return;
    }
    let t = TlsRegistry::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    let manifest = layout(&src);
    let image = format!("{}/tls/crane:v1", t.host());
    let crane = || {
        let mut c = Command::new(crate::crane::crane_bin());
        c.env("SSL_CERT_FILE", &t.ca_file);
        c
    };
    run(
        "crane push over TLS",
        crane().args(["push", src.to_str().expect("utf-8"), &image]),
    );
    let m = run(
        "crane manifest over TLS",
        crane().args(["manifest", &image]),
    );
    assert_eq!(m.raw, manifest);
    assert_eq!(t.manifest("tls/crane", "v1"), manifest);
    // Trusting nothing but another CA, crane refuses the certificate.
    let other = tempfile::NamedTempFile::new().expect("tmp");
    TestCa::new("another CA").write(other.path());
    let out = run_failing(
        "crane with another CA",
        Command::new(crate::crane::crane_bin())
            .env("SSL_CERT_FILE", other.path())
            .args(["manifest", &image]),
    );
    assert!(says_unknown_authority(&out), "{}", out.stderr);
}

#[test]
fn podman_over_tls_with_cert_dir() {
    if skip("podman") {
        return;
    }
    let t = TlsRegistry::start();
    let work = tempfile::Builder::new()
        .prefix("dspodtls-")
        .tempdir_in("/var/tmp")
        .expect("tmp");
    let store = work.path().join("store");
    std::fs::create_dir_all(store.join("tmp")).expect("mkdir");
    let podman = |args: &[&str]| -> Output {
        run(
            &format!("podman {}", args.join(" ")),
            crate::podman::tool("podman", &store).args(args),
        )
    };
    let image = format!("{}/tls/podman:v1", t.host());
    let cert_dir = t.cert_dir.to_str().expect("utf-8");
    let ctx = work.path().join("ctx");
    crate::podman::context(&mut Rng::from_entropy(), &ctx);
    let ctx_s = ctx.to_str().expect("utf-8");
    podman(&[
        "build",
        "--isolation",
        "chroot",
        "-t",
        &image,
        "-f",
        &format!("{ctx_s}/Containerfile"),
        ctx_s,
    ]);
    podman(&["push", "--cert-dir", cert_dir, &image]);
    assert!(!t.manifest("tls/podman", "v1").is_empty());
    podman(&["rmi", "-a", "-f"]);
    podman(&["pull", "--cert-dir", cert_dir, &image]);
    let listed = podman(&["images", "--format", "{{.Repository}}:{{.Tag}}"]).stdout;
    assert!(listed.contains(&image), "{listed}");
    podman(&["rmi", "-a", "-f"]);
    // Without the CA (and without the default CA directories knowing it), podman refuses.
    let (ok, out) = try_run(
        crate::podman::tool("podman", &store).args(["pull", &image]),
        crate::interop::COMMAND_TIMEOUT,
    )
    .expect("podman runs");
    assert!(!ok, "podman pulled without the CA");
    assert!(says_unknown_authority(&out), "{}", out.stderr);
}

/// `/etc/docker/certs.d/<host:port>/ca.crt` for the test's lifetime: dockerd reads it on
/// every connection to that registry.
struct DockerCa(PathBuf);

impl DockerCa {
    fn install(host: &str, ca: &TestCa) -> DockerCa {
        let dir = PathBuf::from("/etc/docker/certs.d").join(host);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        ca.write(&dir.join("ca.crt"));
        DockerCa(dir)
    }
}

impl Drop for DockerCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn docker_over_tls_with_certs_d() {
    if skip("docker") {
        return;
    }
    let t = TlsRegistry::start();
    let d = crate::docker::Dockerd::start();
    let host = t.host();
    let image = format!("{host}/tls/docker:v1");
    let ctx = tempfile::tempdir().expect("tmp");
    let data = Rng::from_entropy().bytes(100_000);
    std::fs::write(ctx.path().join("a.bin"), &data).expect("write");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY a.bin /a.bin\nCMD [\"/a.bin\"]\n",
    )
    .expect("write the Dockerfile");
    d.docker(&["build", "-t", &image, ctx.path().to_str().expect("utf-8")]);
    // dockerd treats every registry whose name resolves into 127.0.0.0/8 as insecure (moby
    // always adds that range to the insecure CIDRs): it still speaks HTTPS first, but without
    // checking the certificate. So on loopback this shows that docker pushes and pulls over
    // TLS (the port speaks nothing else), with the CA where a real deployment puts it; the
    // other clients show verification.
    let _ca = DockerCa::install(&host, &t.ca);
    d.docker(&["push", &image]);
    assert!(!t.manifest("tls/docker", "v1").is_empty());
    assert!(
        t.reg
            .log_lines()
            .iter()
            .any(|l| l.contains("PUT /v2/tls/docker/manifests/v1 201")),
        "docker's push is not in the access log"
    );
    d.docker(&["rmi", &image]);
    d.docker(&["pull", &image]);
    d.docker(&["image", "inspect", &image]);
}
