//! The test registry (`dockside::testing`, feature `testing`) as a user's tests would use it:
//! from a plain `#[test]` and from `#[tokio::test]`, in memory and in a directory, with users
//! and anonymous pulls; and stopped when dropped.

use dockside::testing::TestRegistry;

/// A blocking push of one blob and a pull, through HTTP.
fn blob_round_trip(base: &str, auth: Option<(&str, &str)>) -> reqwest::StatusCode {
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    let data = b"a blob for the test registry".to_vec();
    let digest = format!("sha256:{}", sha256_hex(&data));
    let mut req = http
        .post(format!("{base}/v2/t/app/blobs/uploads/?digest={digest}"))
        .body(data.clone());
    if let Some((u, p)) = auth {
        req = req.basic_auth(u, Some(p));
    }
    let r = req.send().unwrap();
    if r.status() != 201 {
        return r.status();
    }
    let got = http
        .get(format!("{base}/v2/t/app/blobs/{digest}"))
        .send()
        .unwrap();
    let status = got.status();
    if status == 200 {
        assert_eq!(got.bytes().unwrap().as_ref(), data.as_slice());
    }
    status
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn from_a_plain_test_in_memory_then_stopped_when_dropped() {
    let registry = TestRegistry::start();
    assert!(registry.url().starts_with("http://127.0.0.1:"));
    assert_eq!(registry.url(), format!("http://{}", registry.host()));
    assert_eq!(blob_round_trip(registry.url(), None), 200);
    let addr = registry.addr();
    drop(registry);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening after drop"
    );
}

#[tokio::test]
async fn from_a_tokio_test_on_its_current_thread() {
    let registry = TestRegistry::start();
    let r = reqwest::Client::new()
        .get(format!("{}/v2/", registry.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    // Dropped inside the runtime: must not block it or panic.
}

#[test]
fn in_a_directory_kept_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestRegistry::builder().dir(dir.path()).start();
    assert_eq!(blob_round_trip(first.url(), None), 200);
    drop(first);
    let second = TestRegistry::builder().dir(dir.path()).start();
    let r = reqwest::blocking::get(format!(
        "{}/v2/t/app/blobs/sha256:{}",
        second.url(),
        sha256_hex(b"a blob for the test registry")
    ))
    .unwrap();
    assert_eq!(r.status(), 200, "the blob outlived the first registry");
}

#[test]
fn a_temporary_directory_goes_with_the_registry() {
    let registry = TestRegistry::builder().temp_dir().start();
    assert_eq!(blob_round_trip(registry.url(), None), 200);
}

#[test]
fn users_and_anonymous_pulls() {
    let registry = TestRegistry::builder()
        .user("alice", "alice-password")
        .anonymous_pull()
        .start();
    let base = registry.url();
    // Anonymous: the push is challenged.
    assert_eq!(blob_round_trip(base, None), 401);
    assert_eq!(blob_round_trip(base, Some(("alice", "wrong"))), 401);
    // Alice pushes; anyone pulls.
    assert_eq!(
        blob_round_trip(base, Some(("alice", "alice-password"))),
        200
    );
    // A token from the registry's own token endpoint.
    let r = reqwest::blocking::Client::new()
        .get(format!("{base}/token?scope=repository:t/app:pull,push"))
        .basic_auth("alice", Some("alice-password"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let token: serde_json::Value = r.json().unwrap();
    assert!(token["token"].as_str().is_some_and(|t| t.len() > 20));
    // Without anonymous_pull, an anonymous pull is challenged too.
    let closed = TestRegistry::builder().user("bob", "pw").start();
    let r = reqwest::blocking::get(format!("{}/v2/t/app/tags/list", closed.url())).unwrap();
    assert_eq!(r.status(), 401);
}

#[test]
#[should_panic(expected = "anonymous_pull() needs at least one user()")]
fn anonymous_pull_without_users_is_a_mistake() {
    TestRegistry::builder().anonymous_pull().start();
}

#[test]
fn requests_lists_what_was_served_in_order() {
    let registry = TestRegistry::start();
    assert!(registry.requests().is_empty());
    assert_eq!(blob_round_trip(registry.url(), None), 200);
    let missing = format!("{}/v2/t/app/manifests/nope", registry.url());
    assert_eq!(reqwest::blocking::get(missing).unwrap().status(), 404);
    let seen: Vec<_> = registry
        .requests()
        .into_iter()
        .map(|r| (r.method.to_string(), r.path, r.status.as_u16()))
        .collect();
    let digest = format!("sha256:{}", sha256_hex(b"a blob for the test registry"));
    assert_eq!(
        seen,
        vec![
            (
                "POST".to_owned(),
                format!("/v2/t/app/blobs/uploads/?digest={digest}"),
                201
            ),
            ("GET".to_owned(), format!("/v2/t/app/blobs/{digest}"), 200),
            ("GET".to_owned(), "/v2/t/app/manifests/nope".to_owned(), 404),
        ]
    );
}

#[test]
fn data_dir_is_where_blobs_are_stored() {
    assert!(TestRegistry::start().data_dir().is_none());
    let registry = TestRegistry::builder().temp_dir().start();
    assert_eq!(blob_round_trip(registry.url(), None), 200);
    let hex = sha256_hex(b"a blob for the test registry");
    let path = registry
        .data_dir()
        .unwrap()
        .join(format!("blobs/sha256/{}/{hex}", &hex[..2]));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"a blob for the test registry"
    );
}

#[test]
fn access_rules_from_the_config() {
    let auth = dockside::AuthConfig::from_toml(
        r#"
[auth]
secret = "a-token-secret-for-this-test-0123456789"
[[auth.rules]]
repositories = ["t/*"]
users = ["anonymous"]
actions = ["pull", "push"]
"#,
    )
    .unwrap()
    .map(std::sync::Arc::new);
    let registry = TestRegistry::builder()
        .config(dockside::Config {
            auth,
            ..Default::default()
        })
        .start();
    // Anonymous pushes to t/app are allowed by the rule; elsewhere they are challenged.
    assert_eq!(blob_round_trip(registry.url(), None), 200);
    let r = reqwest::blocking::get(format!("{}/v2/other/app/tags/list", registry.url())).unwrap();
    assert_eq!(r.status(), 401);
}
