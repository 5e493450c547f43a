//! The command line around the server: `healthcheck` against a running server and a closed
//! port, shell completions and the manual page generated from the command line definition.

mod common;

use std::process::Command;

use common::Server;

fn dockside(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dockside"))
        .args(args)
        .output()
        .expect("run dockside")
}

#[test]
fn healthcheck_succeeds_on_a_ready_server_and_fails_otherwise() {
    // The binary: `dockside healthcheck` probes a running `dockside serve`.
    let s = Server::start();
    let out = dockside(&["healthcheck", "--url", &s.url("/ready")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a probe: a 404 is not healthy.
    let out = dockside(&["healthcheck", "--url", &s.url("/nothing")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
    let addr = s.addr();
    drop(s);
    let out = dockside(&["healthcheck", "--url", &format!("http://{addr}/ready")]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a stopped server is not healthy"
    );
    let out = dockside(&["healthcheck", "--url", "https://127.0.0.1:1/ready"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only http://"));
}

#[test]
fn completions_and_manual_page() {
    let out = dockside(&["completions", "bash"]);
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("_dockside()") && script.contains("--tls-cert"));
    let out = dockside(&["completions", "zsh"]);
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("#compdef dockside")
    );
    let out = dockside(&["completions", "nosuchshell"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses an unknown shell");
    let out = dockside(&["man"]);
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH dockside 1") && page.contains("healthcheck"));
}

/// `dockside gc` takes the store and collection options it uses, not the server's: its help
/// lists them, and a server flag is refused rather than silently ignored.
#[test]
fn gc_takes_store_options_only() {
    let out = dockside(&["gc", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--dry-run",
        "--data",
        "--kv",
        "--blobs",
        "--gc-config",
        "--upload-expiry-secs",
    ] {
        assert!(help.contains(flag), "gc --help lacks {flag}:\n{help}");
    }
    for flag in [
        "--listen",
        "--tls-cert",
        "--max-connections",
        "--gc-interval",
    ] {
        assert!(!help.contains(flag), "gc --help lists {flag}:\n{help}");
    }
    let out = dockside(&["gc", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}
