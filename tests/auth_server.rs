//! Access control on the real server: `dockside serve --config FILE`, the secret from the
//! environment, the token flow over HTTP, Basic auth, `oci-client` logging in, and refusing to
//! start without a secret.

mod common;

use std::process::Command;

use common::{Server, client, sha256_digest};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use reqwest::StatusCode;
use serde_json::Value;

const SECRET: &str = "an-edge-wide-secret-of-at-least-32-bytes";

fn write_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let hash = |pw: &str| bcrypt::hash(pw, 4).unwrap();
    let path = dir.join("dockside.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[auth]
service = "dockside-test"
{extra}

[[auth.users]]
name = "alice"
password_hash = "{}"

[[auth.users]]
name = "bob"
password_hash = "{}"

[[auth.rules]]
repositories = ["alice/**"]
users = ["alice"]
actions = ["pull", "push", "delete"]

[[auth.rules]]
repositories = ["public/*"]
users = ["anonymous"]
actions = ["pull"]

[[auth.rules]]
repositories = ["public/*"]
users = ["alice"]
actions = ["push"]
"#,
            hash("alice-pw"),
            hash("bob-pw")
        ),
    )
    .unwrap();
    path
}

fn start(dir: &std::path::Path) -> Server {
    let cfg = write_config(dir, "");
    // The binary: --config FILE and the secret from its environment are under test.
    Server::builder()
        .arg("--config")
        .arg(cfg)
        .env("DOCKSIDE_AUTH_SECRET", SECRET)
        .start()
}

#[tokio::test]
async fn challenge_token_and_basic_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    let c = client();

    // The challenge names the realm at this server (from the Host header).
    let r = c.get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let ch = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert_eq!(
        ch,
        format!(
            "Bearer realm=\"http://{}/token\",service=\"dockside-test\"",
            s.addr()
        )
    );
    let r = c
        .post(s.url("/v2/alice/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .ends_with(",scope=\"repository:alice/app:pull,push\"")
    );

    // Wrong password at the token endpoint.
    let r = c
        .get(s.url("/token?service=dockside-test&scope=repository:alice/app:pull"))
        .basic_auth("alice", Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A token, then a push with it.
    let r = c
        .get(s.url("/token?service=dockside-test&scope=repository:alice/app:pull,push"))
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let j: Value = r.json().await.unwrap();
    let token = j["token"].as_str().unwrap().to_owned();
    let blob = b"hello over http";
    let digest = sha256_digest(blob);
    let r = c
        .post(s.url(&format!("/v2/alice/app/blobs/uploads/?digest={digest}")))
        .bearer_auth(&token)
        .body(&blob[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = c
        .get(s.url(&format!("/v2/alice/app/blobs/{digest}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(&r.bytes().await.unwrap()[..], blob);

    // Basic straight on /v2/: bob is known but has no access.
    let r = c
        .get(s.url(&format!("/v2/alice/app/blobs/{digest}")))
        .basic_auth("bob", Some("bob-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["errors"][0]["code"], "DENIED");
    let r = c
        .get(s.url(&format!("/v2/alice/app/blobs/{digest}")))
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // The log never shows a password or a token.
    let log = s.log_lines().join("\n");
    assert!(log.contains("access control is on"), "{log}");
    for secret in ["alice-pw", "bob-pw", "nope", token.as_str(), SECRET] {
        assert!(!log.contains(secret), "the log shows {secret:?}:\n{log}");
    }
}

#[tokio::test]
async fn oci_client_logs_in_pushes_and_pulls() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    let oci = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let reference: Reference = format!("{}/public/hello:v1", s.addr()).parse().unwrap();
    let layers = vec![ImageLayer::oci_v1(vec![7u8; 300_000], None)];
    let config = Config::oci_v1(br#"{"architecture":"amd64","os":"linux"}"#.to_vec(), None);

    // Anonymous push is refused.
    let err = oci
        .push(
            &reference,
            &layers,
            config.clone(),
            &RegistryAuth::Anonymous,
            None,
        )
        .await;
    assert!(err.is_err(), "anonymous push went through");

    // Alice pushes with her password (the client follows the Bearer challenge).
    let alice = RegistryAuth::Basic("alice".into(), "alice-pw".into());
    let oci = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    oci.push(&reference, &layers, config, &alice, None)
        .await
        .expect("alice pushes");

    // Anyone pulls public/*.
    let anon = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let image = anon
        .pull(
            &reference,
            &RegistryAuth::Anonymous,
            vec![oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE],
        )
        .await
        .expect("anonymous pull of a public repository");
    assert_eq!(image.layers[0].data.len(), 300_000);

    // Bob (signed in, no rule for public/ pushes) cannot push.
    let bob = RegistryAuth::Basic("bob".into(), "bob-pw".into());
    let fresh = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let other: Reference = format!("{}/public/hello:bob", s.addr()).parse().unwrap();
    let err = fresh
        .push(
            &other,
            &[ImageLayer::oci_v1(vec![1u8; 10], None)],
            Config::oci_v1(b"{}".to_vec(), None),
            &bob,
            None,
        )
        .await;
    assert!(err.is_err(), "bob pushed");
}

#[test]
fn refuses_to_start_without_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let clean = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dockside"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DOCKSIDE_") {
                cmd.env_remove(&k);
            }
        }
        cmd
    };
    let out = clean()
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no token secret"), "{err}");
    // DOCKSIDE_CONFIG names the file too; a short secret is refused.
    let out = clean()
        .env("DOCKSIDE_DATA", dir.path().join("data"))
        .env("DOCKSIDE_CONFIG", &cfg)
        .env("DOCKSIDE_AUTH_SECRET", "short")
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 32 bytes"), "{err}");
}

#[test]
fn hash_password_subcommand() {
    use std::io::Write;
    for (args, prefix) in [(&[][..], "$argon2id$"), (&["--bcrypt"][..], "$2b$")] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dockside"))
            .arg("hash-password")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let hash = String::from_utf8(out.stdout).unwrap();
        assert!(hash.starts_with(prefix), "{hash}");
        // The hash works in a configuration.
        let toml = format!(
            "[auth]\nsecret = \"{SECRET}\"\n[[auth.users]]\nname = \"u\"\npassword_hash = \"{}\"\n",
            hash.trim()
        );
        dockside::AuthConfig::from_toml(&toml).unwrap().unwrap();
    }
}

/// A client whose connections come from `ip` (any 127.x.y.z is loopback on Linux): to the
/// server, another client address.
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Password guessing over HTTP against the real server: the throttle engages with 429 and
/// `Retry-After` in the spec's envelope, refuses the right password too from the guessing
/// address, leaves the user's other addresses and other users alone, and lets the right
/// password in once the window has passed, no later. Failures at `/token` and with Basic on
/// `/v2/` count together. The server is given the peer address; `X-Forwarded-For` is ignored
/// unless trusted.
#[tokio::test]
async fn password_guessing_is_throttled_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    // The binary: the --login-* flags.
    let s = Server::builder()
        .arg("--config")
        .arg(cfg)
        .args(["--login-window-secs", "4"])
        .args(["--login-failures-per-user-address", "5"])
        .args(["--login-failures-per-user", "20"])
        .args(["--login-failures-per-address", "20"])
        .env("DOCKSIDE_AUTH_SECRET", SECRET)
        .start();
    let attacker = client_from("127.0.0.1");
    let elsewhere = client_from("127.0.0.2");
    let token = s.url("/token?service=dockside-test&scope=repository:alice/app:pull");
    let v2 = s.url("/v2/");
    let first = std::time::Instant::now();
    for i in 0..5 {
        let url = if i % 2 == 0 { &token } else { &v2 };
        let r = attacker
            .get(url)
            .basic_auth("alice", Some(format!("guess-{i}")))
            // Spoofed: not trusted, so not the address.
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "guess {i}");
    }
    let mut retry_after = 0;
    for (url, pw) in [(&token, "guess-5"), (&v2, "alice-pw"), (&token, "alice-pw")] {
        let r = attacker
            .get(url)
            .basic_auth("alice", Some(pw))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        retry_after = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap();
        assert!((1..=4).contains(&retry_after), "Retry-After {retry_after}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS", "{body}");
    }
    // Alice from another address, and Bob from the guessing one, get in.
    let r = elsewhere
        .get(&token)
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = attacker
        .get(&v2)
        .basic_auth("bob", Some("bob-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Once Retry-After has passed, the right password works from the guessing address too.
    tokio::time::sleep(std::time::Duration::from_millis(retry_after * 1000 + 100)).await;
    let r = attacker
        .get(&token)
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let locked = first.elapsed();
    assert!(
        locked < std::time::Duration::from_millis(5500),
        "locked out for {locked:?} with a 4 s window"
    );
    println!("locked out for {locked:?} with a 4 s window");
}

/// The same with `--trust-forwarded-for` (dockside behind a proxy): the address is the last
/// `X-Forwarded-For` entry, so clients behind one proxy are told apart.
#[tokio::test]
async fn forwarded_for_is_the_address_when_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    // The binary: --trust-forwarded-for.
    let s = Server::builder()
        .arg("--config")
        .arg(cfg)
        .arg("--trust-forwarded-for")
        .args(["--login-failures-per-user-address", "2"])
        .env("DOCKSIDE_AUTH_SECRET", SECRET)
        .start();
    let c = client();
    let login = |from: &'static str, pw: &'static str| {
        c.get(s.url("/v2/"))
            .basic_auth("alice", Some(pw))
            .header("x-forwarded-for", from)
            .send()
    };
    for _ in 0..2 {
        let r = login("6.6.6.6, 203.0.113.9", "nope").await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let r = login("7.7.7.7, 203.0.113.9", "alice-pw").await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let r = login("203.0.113.10", "alice-pw").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}
