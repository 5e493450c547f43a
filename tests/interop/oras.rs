//! oras-py (PyPI `oras`, in the virtual environment `.ci/interop` makes): the scenario is
//! `oras_scenario.py` (monolithic and chunked pushes with custom media types, pull and byte
//! comparison, a referrer pushed with `subject=`, the referrers API with and without a filter,
//! tags, delete).

use std::path::PathBuf;
use std::process::Command;

use crate::interop::{
    AUTH_PASSWORD, AUTH_USER, Registry, assert_pull_followed_redirects, require_tool,
    requires_auth, run, seed_image, skip, suite_dir, tools_dir,
};

/// The Python that has `oras` installed: `DOCKSIDE_INTEROP_PYTHON`, else the virtual
/// environment under the tools directory.
pub fn python_with_oras() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("DOCKSIDE_INTEROP_PYTHON") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(tools_dir().join("venv/bin/python"));
    let python = require_tool("oras", &candidates);
    let probe = Command::new(&python)
        .args(["-c", "import oras.version; print(oras.version.__version__)"])
        .output()
        .expect("run python");
    assert!(
        probe.status.success(),
        "interop client `oras` is not installed in {} (`import oras` failed: {}). Install it \
         with `.ci/interop`, or skip it explicitly with DOCKSIDE_INTEROP_SKIP=oras",
        python.display(),
        String::from_utf8_lossy(&probe.stderr)
    );
    eprintln!("oras-py {}", String::from_utf8_lossy(&probe.stdout).trim());
    python
}

#[test]
fn oras_push_pull_chunked_referrers() {
    if skip("oras") {
        return;
    }
    let python = python_with_oras();
    let reg = Registry::start();
    let work = tempfile::tempdir().expect("tmp");
    let out = run(
        "oras_scenario.py",
        Command::new(python)
            .arg(suite_dir().join("oras_scenario.py"))
            .arg(reg.host())
            .arg(work.path())
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost"),
    );
    let last = out.stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("no report from the script ({e}):\n{}", out.stdout));
    assert_eq!(report["mono_push"], "ok");
    assert_eq!(report["chunked_push"], "ok");
    assert_eq!(report["referrers"], 2);
}

/// Access control: oras-py with credentials (`login`, then push and pull through the token
/// endpoint, widening its token on a 403 `insufficient_scope` challenge); anonymous push refused.
#[test]
fn oras_login_push_pull() {
    if skip("oras") {
        return;
    }
    let python = python_with_oras();
    let (reg, _config) = Registry::start_with_auth();
    assert!(requires_auth(&reg.base_url(), "private/oras"));
    let work = tempfile::tempdir().expect("tmp");
    let out = run(
        "oras_login_scenario.py",
        Command::new(python)
            .arg(suite_dir().join("oras_login_scenario.py"))
            .arg(reg.host())
            .arg(work.path())
            .env("DOCKSIDE_USER", AUTH_USER)
            .env("DOCKSIDE_PASSWORD", AUTH_PASSWORD)
            .env("HOME", work.path())
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost"),
    );
    let last = out.stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("no report from the script ({e}):\n{}", out.stdout));
    assert_eq!(report["anonymous_push"], "refused");
    assert_eq!(report["push"], "ok");
    assert_eq!(report["pull"], "ok");
}

/// Blobs in Garage behind `--blob-redirect`: oras-py's `download_blob` (what its `pull` calls
/// for each layer; `pull` itself would unpack these tar+gzip layers) gets every blob through a
/// 307 to a presigned URL, byte for byte (oras-py checks no digest: the comparison is the
/// test's), and Garage served them. See `assert_pull_followed_redirects`.
#[test]
fn oras_pull_follows_blob_redirects() {
    if skip("oras") {
        return;
    }
    let python = python_with_oras();
    let reg = Registry::start_s3_redirect();
    let (img, digests) = seed_image(&reg, "redirect/oras");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cmd = Command::new(python);
    cmd.args([
        "-c",
        "import sys, oras.provider\n\
         r = oras.provider.Registry(hostname=sys.argv[1], insecure=True)\n\
         for d in sys.argv[4:]:\n    r.download_blob(sys.argv[2], d, sys.argv[3] + '/' + d)",
    ])
    .arg(reg.host())
    .arg(format!("{}/redirect/oras:v1", reg.host()))
    .arg(tmp.path())
    .args(&digests);
    run("oras-py download_blob", &mut cmd);
    for b in img.layers.iter().chain([&img.config]) {
        let got = std::fs::read(tmp.path().join(&b.digest))
            .unwrap_or_else(|e| panic!("{} not pulled: {e}", b.digest));
        assert!(got == b.data, "{} differs", b.digest);
    }
    assert_pull_followed_redirects(&reg, "redirect/oras", &digests);
}
