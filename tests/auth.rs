//! Access control through `Registry::handle`: the token endpoint, Bearer and Basic credentials,
//! rules, upload sessions bound to their user, and the attacks the issue lists (expired,
//! tampered, `alg: none`, a token for one repository used on another, upload hijacking).

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use dockside::{AuthConfig, Config, MemoryBlobs, MemoryKv, MemoryRegistry, Registry};
use hmac::{KeyInit, Mac};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";
const REALM: &str = "https://registry.example/token";

/// A cheap argon2id hash (tests only: real hashes use `dockside hash-password`).
fn argon2_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, phc::SaltString};
    let params = argon2::Params::new(256, 1, 1, None).unwrap();
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::from_b64("c29tZXNhbHRzb21lc2FsdA").unwrap();
    a.hash_password_with_salt(password.as_bytes(), salt.as_bytes())
        .unwrap()
        .to_string()
}

fn bcrypt_hash(password: &str) -> String {
    bcrypt::hash(password, 4).unwrap()
}

fn config_toml(extra: &str) -> String {
    format!(
        r#"
[auth]
service = "test-registry"
secret = "{SECRET}"
realm = "{REALM}"
{extra}

[[auth.users]]
name = "alice"
password_hash = "{alice}"

[[auth.users]]
name = "bob"
password_hash = "{bob}"

[[auth.users]]
name = "pusher"
password_hash = "{pusher}"

[[auth.users]]
name = "puller"
password_hash = "{puller}"

[[auth.users]]
name = "admin"
password_hash = "{admin}"

[[auth.rules]]
repositories = ["team-a/**"]
users = ["alice"]
actions = ["pull", "push", "delete"]

[[auth.rules]]
repositories = ["team-b/*"]
users = ["bob"]
actions = ["pull", "push"]

[[auth.rules]]
repositories = ["public/*"]
users = ["anonymous"]
actions = ["pull"]

[[auth.rules]]
repositories = ["drop"]
users = ["pusher"]
actions = ["push"]

[[auth.rules]]
repositories = ["drop", "team-a/**"]
users = ["puller"]
actions = ["pull"]

[[auth.rules]]
catalog = true
users = ["admin"]

[[auth.rules]]
repositories = ["**"]
users = ["admin"]
actions = ["*"]
"#,
        alice = argon2_hash("alice-pw"),
        bob = bcrypt_hash("bob-pw"),
        pusher = bcrypt_hash("pusher-pw"),
        puller = bcrypt_hash("puller-pw"),
        admin = bcrypt_hash("admin-pw"),
    )
}

fn registry_with(toml: &str) -> MemoryRegistry {
    let auth = AuthConfig::from_toml(toml)
        .unwrap()
        .expect("an [auth] table");
    Registry::new(
        MemoryKv::new(),
        MemoryBlobs::new(),
        Config {
            auth: Some(Arc::new(auth)),
            ..Config::default()
        },
    )
}

fn registry() -> MemoryRegistry {
    registry_with(&config_toml(""))
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    fn code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap()
            .to_owned()
    }
    #[track_caller]
    fn expect(&self, status: u16) -> &Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "headers {:?} body: {}",
            self.headers,
            String::from_utf8_lossy(&self.body)
        );
        self
    }
    /// A 401 with a Bearer challenge; returns the challenge.
    #[track_caller]
    fn unauthorized(&self) -> String {
        self.expect(401);
        if !self.body.is_empty() {
            assert_eq!(self.code(), "UNAUTHORIZED");
        }
        let c = self
            .header("www-authenticate")
            .expect("a challenge")
            .to_owned();
        assert!(c.starts_with("Bearer realm=\""), "{c}");
        c
    }
    /// A 403 `DENIED` with a challenge for a wider token; returns the challenge.
    #[track_caller]
    fn insufficient(&self) -> String {
        self.expect(403);
        assert_eq!(self.code(), "DENIED");
        let c = self
            .header("www-authenticate")
            .expect("a challenge")
            .to_owned();
        assert!(c.contains("error=\"insufficient_scope\""), "{c}");
        c
    }
    #[track_caller]
    fn denied(&self) {
        self.expect(403);
        assert_eq!(self.code(), "DENIED");
        assert!(self.header("www-authenticate").is_none());
    }
}

#[derive(Clone, Copy)]
enum Cred<'a> {
    None,
    Basic(&'a str, &'a str),
    Bearer(&'a str),
}

async fn call(r: &MemoryRegistry, method: &str, uri: &str, cred: Cred<'_>, body: &[u8]) -> Resp {
    call_h(r, method, uri, cred, body, &[]).await
}

async fn call_h(
    r: &MemoryRegistry,
    method: &str,
    uri: &str,
    cred: Cred<'_>,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Resp {
    let mut b = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(uri);
    match cred {
        Cred::None => {}
        Cred::Basic(u, p) => {
            b = b.header(
                "authorization",
                format!("Basic {}", STANDARD.encode(format!("{u}:{p}"))),
            )
        }
        Cred::Bearer(t) => b = b.header("authorization", format!("Bearer {t}")),
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = r
        .handle(b.body(Full::new(Bytes::copy_from_slice(body))).unwrap())
        .await;
    let (parts, body) = resp.into_parts();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn digest(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// A token from `GET /token` for these scopes.
async fn token(r: &MemoryRegistry, cred: Cred<'_>, scopes: &[&str]) -> String {
    let mut uri = "/token?service=test-registry".to_owned();
    for s in scopes {
        uri.push_str(&format!("&scope={s}"));
    }
    let resp = call(r, "GET", &uri, cred, b"").await;
    resp.expect(200);
    let j = resp.json();
    assert_eq!(j["token"], j["access_token"]);
    j["token"].as_str().unwrap().to_owned()
}

fn claims(token: &str) -> Value {
    let p = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
}

/// An HS256 JWT over `header` and `claims` signed with `secret`.
fn forge(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn good_claims(sub: &str, repo: &str, actions: &[&str]) -> Value {
    let n = now();
    json!({"iss": "test-registry", "sub": sub, "aud": "test-registry", "exp": n + 300,
           "nbf": n, "iat": n, "jti": "x",
           "access": [{"type": "repository", "name": repo, "actions": actions}]})
}

/// Pushes a one-layer image to `repo:tag` with `cred`; returns the manifest digest.
async fn push_image(r: &MemoryRegistry, repo: &str, tag: &str, cred: Cred<'_>) -> String {
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = format!("layer of {repo}").into_bytes();
    for blob in [&config[..], &layer[..]] {
        call(
            r,
            "POST",
            &format!("/v2/{repo}/blobs/uploads/?digest={}", digest(blob)),
            cred,
            blob,
        )
        .await
        .expect(201);
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(&layer), "size": layer.len()}],
    })
    .to_string();
    call_h(
        r,
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        cred,
        manifest.as_bytes(),
        &[("content-type", "application/vnd.oci.image.manifest.v1+json")],
    )
    .await
    .expect(201);
    digest(manifest.as_bytes())
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn off_by_default_no_token_endpoint() {
    let r = MemoryRegistry::in_memory();
    call(&r, "GET", "/v2/", Cred::None, b"").await.expect(200);
    call(&r, "GET", "/token", Cred::None, b"").await.expect(404);
}

#[tokio::test]
async fn anonymous_is_denied_with_a_challenge() {
    let r = registry();
    let c = call(&r, "GET", "/v2/", Cred::None, b"")
        .await
        .unauthorized();
    assert_eq!(
        c,
        format!("Bearer realm=\"{REALM}\",service=\"test-registry\"")
    );

    let resp = call(
        &r,
        "GET",
        "/v2/team-a/app/manifests/latest",
        Cred::None,
        b"",
    )
    .await;
    let c = resp.unauthorized();
    assert_eq!(
        c,
        format!(
            "Bearer realm=\"{REALM}\",service=\"test-registry\",scope=\"repository:team-a/app:pull\""
        )
    );
    let c = call(&r, "POST", "/v2/team-a/app/blobs/uploads/", Cred::None, b"")
        .await
        .unauthorized();
    assert!(
        c.ends_with("scope=\"repository:team-a/app:pull,push\""),
        "{c}"
    );
    let c = call(
        &r,
        "DELETE",
        "/v2/team-a/app/manifests/latest",
        Cred::None,
        b"",
    )
    .await
    .unauthorized();
    assert!(c.ends_with("scope=\"repository:team-a/app:delete\""), "{c}");
    let c = call(&r, "GET", "/v2/_catalog", Cred::None, b"")
        .await
        .unauthorized();
    assert!(c.ends_with("scope=\"registry:catalog:*\""), "{c}");
    // HEAD: the challenge, no body.
    let resp = call(
        &r,
        "HEAD",
        "/v2/team-a/app/manifests/latest",
        Cred::None,
        b"",
    )
    .await;
    resp.unauthorized();
    assert!(resp.body.is_empty());
}

#[tokio::test]
async fn a_private_repository_is_not_revealed() {
    let r = registry();
    push_image(&r, "team-a/app", "v1", Cred::Basic("alice", "alice-pw")).await;
    // Anonymous, a wrong password and a user without access get the same answers whether the
    // repository exists or not.
    for cred in [
        Cred::None,
        Cred::Basic("alice", "nope"),
        Cred::Basic("bob", "bob-pw"),
    ] {
        for path in [
            "manifests/v1",
            "tags/list",
            "blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            let a = call(&r, "GET", &format!("/v2/team-a/app/{path}"), cred, b"").await;
            let b = call(&r, "GET", &format!("/v2/team-a/nope/{path}"), cred, b"").await;
            assert_eq!(a.status, b.status);
            assert!(a.status == 401 || a.status == 403, "{}", a.status);
            assert_eq!(
                String::from_utf8_lossy(&a.body).replace("team-a/app", "X"),
                String::from_utf8_lossy(&b.body).replace("team-a/nope", "X")
            );
        }
    }
}

#[tokio::test]
async fn anonymous_pull_where_configured() {
    let r = registry();
    let digest = push_image(
        &r,
        "public/base",
        "latest",
        Cred::Basic("admin", "admin-pw"),
    )
    .await;
    // Straight, with no credentials at all.
    call(
        &r,
        "GET",
        "/v2/public/base/manifests/latest",
        Cred::None,
        b"",
    )
    .await
    .expect(200);
    call(&r, "GET", "/v2/public/base/tags/list", Cred::None, b"")
        .await
        .expect(200);
    // The docker way: an anonymous token for the scope.
    let t = token(&r, Cred::None, &["repository:public/base:pull,push"]).await;
    let c = claims(&t);
    assert_eq!(c["sub"], "");
    assert_eq!(
        c["access"],
        json!([{"type":"repository","name":"public/base","actions":["pull"]}])
    );
    call(
        &r,
        "GET",
        &format!("/v2/public/base/manifests/{digest}"),
        Cred::Bearer(&t),
        b"",
    )
    .await
    .expect(200);
    // ... and the base endpoint accepts that token.
    call(&r, "GET", "/v2/", Cred::Bearer(&t), b"")
        .await
        .expect(200);
    // No anonymous push, nor pull elsewhere.
    call(
        &r,
        "POST",
        "/v2/public/base/blobs/uploads/",
        Cred::None,
        b"",
    )
    .await
    .unauthorized();
    call(
        &r,
        "POST",
        "/v2/public/base/blobs/uploads/",
        Cred::Bearer(&t),
        b"",
    )
    .await
    .unauthorized();
    call(&r, "GET", "/v2/public/base/sub/tags/list", Cred::None, b"")
        .await
        .unauthorized();
    // A signed-in user keeps what everyone has.
    call(
        &r,
        "GET",
        "/v2/public/base/manifests/latest",
        Cred::Basic("bob", "bob-pw"),
        b"",
    )
    .await
    .expect(200);
}

#[tokio::test]
async fn token_endpoint_issues_what_rules_grant() {
    let r = registry();
    let resp = call(
        &r,
        "GET",
        "/token?service=test-registry&scope=repository:team-a/app:pull,push,delete&scope=repository:team-b/x:pull&account=alice",
        Cred::Basic("alice", "alice-pw"),
        b"",
    )
    .await;
    resp.expect(200);
    assert_eq!(resp.header("cache-control"), Some("no-store"));
    let j = resp.json();
    assert_eq!(j["expires_in"], 300);
    assert!(j["issued_at"].as_str().unwrap().ends_with('Z'));
    assert!(j.get("refresh_token").is_none());
    let t = j["token"].as_str().unwrap();
    let c = claims(t);
    for k in ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"] {
        assert!(c.get(k).is_some(), "claim {k} missing: {c}");
    }
    assert_eq!(c["iss"], "test-registry");
    assert_eq!(c["aud"], "test-registry");
    assert_eq!(c["sub"], "alice");
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 300);
    assert_eq!(
        c["access"],
        json!([{"type":"repository","name":"team-a/app","actions":["pull","push","delete"]}])
    );
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(t.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "HS256");

    // The token pushes, pulls and deletes.
    let digest = push_image(&r, "team-a/app", "v1", Cred::Bearer(t)).await;
    call(
        &r,
        "GET",
        "/v2/team-a/app/manifests/v1",
        Cred::Bearer(t),
        b"",
    )
    .await
    .expect(200);
    call(
        &r,
        "DELETE",
        &format!("/v2/team-a/app/manifests/{digest}"),
        Cred::Bearer(t),
        b"",
    )
    .await
    .expect(202);
}

#[tokio::test]
async fn wrong_password() {
    let r = registry();
    for (u, p) in [
        ("alice", "wrong"),
        ("bob", "alice-pw"),
        ("nobody", "x"),
        ("alice", ""),
    ] {
        let resp = call(
            &r,
            "GET",
            "/token?scope=repository:team-a/app:pull",
            Cred::Basic(u, p),
            b"",
        )
        .await;
        resp.expect(401);
        assert_eq!(resp.code(), "UNAUTHORIZED");
        assert!(!String::from_utf8_lossy(&resp.body).contains(p) || p.is_empty() || p == "x");
        call(
            &r,
            "GET",
            "/v2/team-a/app/tags/list",
            Cred::Basic(u, p),
            b"",
        )
        .await
        .unauthorized();
    }
    let resp = call(
        &r,
        "POST",
        "/token",
        Cred::None,
        b"grant_type=password&username=alice&password=wrong&service=test-registry&client_id=t",
    )
    .await;
    resp.expect(401);
    // Malformed Basic credentials.
    let resp = call_h(
        &r,
        "GET",
        "/v2/",
        Cred::None,
        b"",
        &[("authorization", "Basic !!!")],
    )
    .await;
    resp.unauthorized();
    let resp = call_h(
        &r,
        "GET",
        "/v2/",
        Cred::None,
        b"",
        &[("authorization", "Digest x")],
    )
    .await;
    resp.unauthorized();
}

#[tokio::test]
async fn basic_auth_directly_on_v2() {
    let r = registry();
    call(&r, "GET", "/v2/", Cred::Basic("alice", "alice-pw"), b"")
        .await
        .expect(200);
    push_image(&r, "team-a/app", "v1", Cred::Basic("alice", "alice-pw")).await;
    call(
        &r,
        "GET",
        "/v2/team-a/app/manifests/v1",
        Cred::Basic("alice", "alice-pw"),
        b"",
    )
    .await
    .expect(200);
    // A known user without access: 403 DENIED.
    call(
        &r,
        "GET",
        "/v2/team-a/app/manifests/v1",
        Cred::Basic("bob", "bob-pw"),
        b"",
    )
    .await
    .denied();
    // Basic can be switched off.
    let r = registry_with(&config_toml("basic = false"));
    call(&r, "GET", "/v2/", Cred::Basic("alice", "alice-pw"), b"")
        .await
        .unauthorized();
    // ... the token endpoint still takes the password.
    let t = token(&r, Cred::Basic("alice", "alice-pw"), &[]).await;
    call(&r, "GET", "/v2/", Cred::Bearer(&t), b"")
        .await
        .expect(200);
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens() {
    let r = registry();
    let mut c = good_claims("alice", "team-a/app", &["pull"]);
    let h = json!({"alg": "HS256", "typ": "JWT"});
    // A well-formed token works...
    let ok = forge(&h, &c, SECRET.as_bytes());
    call(
        &r,
        "GET",
        "/v2/team-a/app/tags/list",
        Cred::Bearer(&ok),
        b"",
    )
    .await
    .expect(404);
    // ... expired it does not.
    c["exp"] = json!(now() - 120);
    let expired = forge(&h, &c, SECRET.as_bytes());
    let ch = call(
        &r,
        "GET",
        "/v2/team-a/app/tags/list",
        Cred::Bearer(&expired),
        b"",
    )
    .await
    .unauthorized();
    assert!(ch.contains("error=\"invalid_token\""), "{ch}");
    // Not valid before a time to come.
    let mut c = good_claims("alice", "team-a/app", &["pull"]);
    c["nbf"] = json!(now() + 3600);
    call(
        &r,
        "GET",
        "/v2/team-a/app/tags/list",
        Cred::Bearer(&forge(&h, &c, SECRET.as_bytes())),
        b"",
    )
    .await
    .unauthorized();
    // No expiry at all.
    let mut c = good_claims("alice", "team-a/app", &["pull"]);
    c.as_object_mut().unwrap().remove("exp");
    call(
        &r,
        "GET",
        "/v2/team-a/app/tags/list",
        Cred::Bearer(&forge(&h, &c, SECRET.as_bytes())),
        b"",
    )
    .await
    .unauthorized();
    // Tokens expire after token_ttl.
    let r = registry_with(&config_toml("token_ttl = 1"));
    let t = token(
        &r,
        Cred::Basic("alice", "alice-pw"),
        &["repository:team-a/app:pull"],
    )
    .await;
    let c = claims(&t);
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 1);
}

#[tokio::test]
async fn wrong_issuer_or_audience() {
    let r = registry();
    let h = json!({"alg": "HS256", "typ": "JWT"});
    for (k, v) in [("iss", "someone-else"), ("aud", "other-registry")] {
        let mut c = good_claims("alice", "team-a/app", &["pull"]);
        c[k] = json!(v);
        call(
            &r,
            "GET",
            "/v2/team-a/app/tags/list",
            Cred::Bearer(&forge(&h, &c, SECRET.as_bytes())),
            b"",
        )
        .await
        .unauthorized();
    }
    // An audience list that holds ours is fine.
    let mut c = good_claims("alice", "team-a/app", &["pull"]);
    c["aud"] = json!(["x", "test-registry"]);
    call(
        &r,
        "GET",
        "/v2/team-a/app/tags/list",
        Cred::Bearer(&forge(&h, &c, SECRET.as_bytes())),
        b"",
    )
    .await
    .expect(404);
}

#[tokio::test]
async fn token_for_repo_a_used_on_repo_b() {
    let r = registry();
    push_image(&r, "team-a/b", "v1", Cred::Basic("admin", "admin-pw")).await;
    push_image(&r, "team-b/x", "v1", Cred::Basic("admin", "admin-pw")).await;
    let t = token(
        &r,
        Cred::Basic("alice", "alice-pw"),
        &["repository:team-a/a:pull,push"],
    )
    .await;
    // Alice may have team-a/b, with another token: 403 with a challenge for the scope.
    let resp = call(
        &r,
        "GET",
        "/v2/team-a/b/manifests/v1",
        Cred::Bearer(&t),
        b"",
    )
    .await;
    resp.expect(403);
    assert_eq!(resp.code(), "DENIED");
    let c = resp.header("www-authenticate").unwrap();
    assert!(c.contains("scope=\"repository:team-a/b:pull\""), "{c}");
    assert!(c.contains("error=\"insufficient_scope\""), "{c}");
    let resp = call(
        &r,
        "POST",
        "/v2/team-a/b/blobs/uploads/",
        Cred::Bearer(&t),
        b"",
    )
    .await;
    resp.expect(403);
    assert!(
        resp.header("www-authenticate")
            .unwrap()
            .contains("repository:team-a/b:pull,push")
    );
    // Never team-b/x: 403 DENIED.
    call(
        &r,
        "GET",
        "/v2/team-b/x/manifests/v1",
        Cred::Bearer(&t),
        b"",
    )
    .await
    .denied();
    // A token that asked for team-b/x got nothing for it.
    let t = token(
        &r,
        Cred::Basic("alice", "alice-pw"),
        &["repository:team-b/x:pull"],
    )
    .await;
    assert_eq!(claims(&t)["access"], json!([]));
    call(
        &r,
        "GET",
        "/v2/team-b/x/manifests/v1",
        Cred::Bearer(&t),
        b"",
    )
    .await
    .denied();
}

#[tokio::test]
async fn push_only_and_pull_only_grants() {
    let r = registry();
    // Push-only: can write into `drop`, cannot read it back.
    let t = token(
        &r,
        Cred::Basic("pusher", "pusher-pw"),
        &["repository:drop:pull,push"],
    )
    .await;
    assert_eq!(
        claims(&t)["access"],
        json!([{"type":"repository","name":"drop","actions":["push"]}])
    );
    let digest = push_image(&r, "drop", "v1", Cred::Bearer(&t)).await;
    call(&r, "GET", "/v2/drop/manifests/v1", Cred::Bearer(&t), b"")
        .await
        .denied();
    call(
        &r,
        "GET",
        "/v2/drop/manifests/v1",
        Cred::Basic("pusher", "pusher-pw"),
        b"",
    )
    .await
    .denied();
    call(
        &r,
        "DELETE",
        &format!("/v2/drop/manifests/{digest}"),
        Cred::Bearer(&t),
        b"",
    )
    .await
    .denied();
    // Pull-only: can read it, cannot write.
    let t = token(
        &r,
        Cred::Basic("puller", "puller-pw"),
        &["repository:drop:pull,push"],
    )
    .await;
    assert_eq!(
        claims(&t)["access"],
        json!([{"type":"repository","name":"drop","actions":["pull"]}])
    );
    call(
        &r,
        "GET",
        &format!("/v2/drop/manifests/{digest}"),
        Cred::Bearer(&t),
        b"",
    )
    .await
    .expect(200);
    call(&r, "POST", "/v2/drop/blobs/uploads/", Cred::Bearer(&t), b"")
        .await
        .denied();
    call(
        &r,
        "PUT",
        "/v2/drop/manifests/v2",
        Cred::Basic("puller", "puller-pw"),
        b"{}",
    )
    .await
    .denied();
    call(
        &r,
        "DELETE",
        &format!("/v2/drop/manifests/{digest}"),
        Cred::Basic("puller", "puller-pw"),
        b"",
    )
    .await
    .denied();
}

#[tokio::test]
async fn catalog_needs_its_own_grant() {
    let r = registry();
    push_image(&r, "team-a/app", "v1", Cred::Basic("alice", "alice-pw")).await;
    let t = token(
        &r,
        Cred::Basic("admin", "admin-pw"),
        &["registry:catalog:*"],
    )
    .await;
    assert_eq!(
        claims(&t)["access"],
        json!([{"type":"registry","name":"catalog","actions":["*"]}])
    );
    let resp = call(&r, "GET", "/v2/_catalog", Cred::Bearer(&t), b"").await;
    resp.expect(200);
    assert_eq!(resp.json()["repositories"], json!(["team-a/app"]));
    call(
        &r,
        "GET",
        "/v2/_catalog",
        Cred::Basic("admin", "admin-pw"),
        b"",
    )
    .await
    .expect(200);
    // Alice may push to team-a but not list the catalog.
    let t = token(
        &r,
        Cred::Basic("alice", "alice-pw"),
        &["registry:catalog:*"],
    )
    .await;
    assert_eq!(claims(&t)["access"], json!([]));
    call(&r, "GET", "/v2/_catalog", Cred::Bearer(&t), b"")
        .await
        .denied();
    call(
        &r,
        "GET",
        "/v2/_catalog",
        Cred::Basic("alice", "alice-pw"),
        b"",
    )
    .await
    .denied();
    call(&r, "GET", "/v2/_catalog", Cred::None, b"")
        .await
        .unauthorized();
}

#[tokio::test]
async fn upload_hijack_attempts() {
    let r = registry();
    let alice = Cred::Basic("alice", "alice-pw");
    let resp = call(&r, "POST", "/v2/team-a/app/blobs/uploads/", alice, b"").await;
    resp.expect(202);
    let loc = resp.header("location").unwrap().to_owned();
    call_h(
        &r,
        "PATCH",
        &loc,
        alice,
        b"hello ",
        &[("content-range", "0-5")],
    )
    .await
    .expect(202);
    let blob = b"hello world";
    let fin = format!("{loc}?digest={}", digest(blob));
    // The admin may push anywhere, but not into alice's session: it is unknown to them.
    let admin_token = token(
        &r,
        Cred::Basic("admin", "admin-pw"),
        &["repository:team-a/app:pull,push"],
    )
    .await;
    for cred in [Cred::Basic("admin", "admin-pw"), Cred::Bearer(&admin_token)] {
        for (m, uri, body) in [
            ("GET", loc.as_str(), &b""[..]),
            ("PATCH", loc.as_str(), &b"evil"[..]),
            ("PUT", fin.as_str(), &b"world"[..]),
            ("DELETE", loc.as_str(), &b""[..]),
        ] {
            let resp = call(&r, m, uri, cred, body).await;
            resp.expect(404);
            assert_eq!(resp.code(), "BLOB_UPLOAD_UNKNOWN");
        }
    }
    // An anonymous token (sub "") is no better, nor is no credential at all.
    let anon = token(&r, Cred::None, &[]).await;
    call(&r, "PATCH", &loc, Cred::Bearer(&anon), b"evil")
        .await
        .unauthorized();
    call(&r, "PATCH", &loc, Cred::None, b"evil")
        .await
        .unauthorized();
    // A forged token for the right scope but another subject: unknown session too.
    let h = json!({"alg": "HS256", "typ": "JWT"});
    let bob = forge(
        &h,
        &good_claims("bob", "team-a/app", &["pull", "push"]),
        SECRET.as_bytes(),
    );
    call(&r, "PATCH", &loc, Cred::Bearer(&bob), b"evil")
        .await
        .expect(404);
    // The same session through the other repository name is unknown as well.
    let other = loc.replace("team-a/app", "team-a/other");
    call(&r, "GET", &other, alice, b"").await.expect(404);
    // Alice, with a token now, finishes her upload: the bytes are hers alone.
    let t = token(&r, alice, &["repository:team-a/app:pull,push"]).await;
    call(&r, "GET", &loc, Cred::Bearer(&t), b"")
        .await
        .expect(204);
    call(&r, "PUT", &fin, Cred::Bearer(&t), b"world")
        .await
        .expect(201);
    let resp = call(
        &r,
        "GET",
        &format!("/v2/team-a/app/blobs/{}", digest(blob)),
        alice,
        b"",
    )
    .await;
    resp.expect(200);
    assert_eq!(&resp.body[..], blob);
}

#[tokio::test]
async fn tampered_signature() {
    let r = registry();
    let t = token(
        &r,
        Cred::Basic("alice", "alice-pw"),
        &["repository:team-a/app:pull"],
    )
    .await;
    call(&r, "GET", "/v2/team-a/app/tags/list", Cred::Bearer(&t), b"")
        .await
        .expect(404);
    let parts: Vec<&str> = t.split('.').collect();
    // Grant more in the payload, keep the signature.
    let mut c = claims(&t);
    c["access"] = json!([{"type":"repository","name":"team-b/x","actions":["pull","push"]}]);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(c.to_string()),
        parts[2]
    );
    let ch = call(
        &r,
        "GET",
        "/v2/team-b/x/tags/list",
        Cred::Bearer(&tampered),
        b"",
    )
    .await
    .unauthorized();
    assert!(ch.contains("invalid_token"), "{ch}");
    // Flip one bit of the signature.
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[0] ^= 1;
    let flipped = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
    call(
        &r,
        "GET",
        "/v2/team-a/app/tags/list",
        Cred::Bearer(&flipped),
        b"",
    )
    .await
    .unauthorized();
    // Signed with another secret.
    let other = forge(
        &json!({"alg":"HS256","typ":"JWT"}),
        &good_claims("alice", "team-b/x", &["pull"]),
        b"another secret, just as long as the real one",
    );
    call(
        &r,
        "GET",
        "/v2/team-b/x/tags/list",
        Cred::Bearer(&other),
        b"",
    )
    .await
    .unauthorized();
    // Garbage.
    for junk in ["", "a.b", "a.b.c.d", "...", "eyJ.eyJ.x"] {
        call(
            &r,
            "GET",
            "/v2/team-a/app/tags/list",
            Cred::Bearer(junk),
            b"",
        )
        .await
        .unauthorized();
    }
}

#[tokio::test]
async fn alg_none_and_other_algorithms() {
    let r = registry();
    let c = good_claims("alice", "team-a/app", &["pull", "push"]);
    for alg in [
        "none", "None", "NONE", "HS384", "HS512", "RS256", "ES256", "EdDSA",
    ] {
        let h = json!({"alg": alg, "typ": "JWT"});
        let unsigned = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(h.to_string()),
            URL_SAFE_NO_PAD.encode(c.to_string())
        );
        let ch = call(
            &r,
            "GET",
            "/v2/team-a/app/tags/list",
            Cred::Bearer(&unsigned),
            b"",
        )
        .await
        .unauthorized();
        assert!(ch.contains("invalid_token"), "{alg}: {ch}");
        // With an HMAC of our secret under a header that names another algorithm.
        let signed = forge(&h, &c, SECRET.as_bytes());
        call(
            &r,
            "GET",
            "/v2/team-a/app/tags/list",
            Cred::Bearer(&signed),
            b"",
        )
        .await
        .unauthorized();
    }
}

#[tokio::test]
async fn oauth_post_and_refresh_tokens() {
    let r = registry();
    let resp = call(
        &r,
        "POST",
        "/token",
        Cred::None,
        b"grant_type=password&username=alice&password=alice-pw&service=test-registry&client_id=docker&access_type=offline&scope=repository%3Ateam-a%2Fapp%3Apull%2Cpush",
    )
    .await;
    resp.expect(200);
    let j = resp.json();
    let access = j["access_token"].as_str().unwrap();
    let refresh = j["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(j["scope"], "repository:team-a/app:pull,push");
    call(
        &r,
        "POST",
        "/v2/team-a/app/blobs/uploads/",
        Cred::Bearer(access),
        b"",
    )
    .await
    .expect(202);
    // The refresh token is no access token.
    call(&r, "GET", "/v2/", Cred::Bearer(&refresh), b"")
        .await
        .unauthorized();
    // It buys access tokens.
    let body = format!(
        "grant_type=refresh_token&refresh_token={refresh}&service=test-registry&client_id=docker&scope=repository:team-a/other:pull"
    );
    let resp = call(&r, "POST", "/token", Cred::None, body.as_bytes()).await;
    resp.expect(200);
    let t = resp.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(claims(&t)["sub"], "alice");
    call(
        &r,
        "GET",
        "/v2/team-a/other/tags/list",
        Cred::Bearer(&t),
        b"",
    )
    .await
    .expect(404);
    // An access token is no refresh token.
    let body = format!("grant_type=refresh_token&refresh_token={access}&client_id=docker");
    call(&r, "POST", "/token", Cred::None, body.as_bytes())
        .await
        .expect(401);
    // GET with offline_token=true hands out a refresh token too (docker login).
    let resp = call(
        &r,
        "GET",
        "/token?offline_token=true&client_id=docker",
        Cred::Basic("alice", "alice-pw"),
        b"",
    )
    .await;
    resp.expect(200);
    assert!(resp.json()["refresh_token"].is_string());
    // Unknown grant types.
    call(
        &r,
        "POST",
        "/token",
        Cred::None,
        b"grant_type=client_credentials",
    )
    .await
    .expect(400);
    call(&r, "PUT", "/token", Cred::None, b"").await.expect(405);
}

#[tokio::test]
async fn mount_needs_pull_on_the_source() {
    let r = registry();
    let admin = Cred::Basic("admin", "admin-pw");
    push_image(&r, "team-a/app", "v1", admin).await;
    let layer = b"layer of team-a/app";
    let uri = format!(
        "/v2/team-b/x/blobs/uploads/?mount={}&from=team-a/app",
        digest(layer)
    );
    // Bob may push to team-b/x but not pull team-a/app: an ordinary upload, no mount.
    let resp = call(&r, "POST", &uri, Cred::Basic("bob", "bob-pw"), b"").await;
    resp.expect(202);
    call(
        &r,
        "HEAD",
        &format!("/v2/team-b/x/blobs/{}", digest(layer)),
        Cred::Basic("bob", "bob-pw"),
        b"",
    )
    .await
    .expect(404);
    // The admin may do both: mounted.
    call(&r, "POST", &uri, admin, b"").await.expect(201);
}

#[tokio::test]
async fn realm_from_the_host_header() {
    let toml = config_toml("").replace(&format!("realm = \"{REALM}\""), "");
    let r = registry_with(&toml);
    let resp = call_h(
        &r,
        "GET",
        "/v2/",
        Cred::None,
        b"",
        &[("host", "reg.local:5000")],
    )
    .await;
    assert_eq!(
        resp.unauthorized(),
        "Bearer realm=\"http://reg.local:5000/token\",service=\"test-registry\""
    );
    let resp = call_h(
        &r,
        "GET",
        "/v2/",
        Cred::None,
        b"",
        &[("host", "reg.example"), ("x-forwarded-proto", "https")],
    )
    .await;
    // X-Forwarded-Proto is client input unless a proxy is configured as setting it.
    assert!(
        resp.unauthorized()
            .starts_with("Bearer realm=\"http://reg.example/token\""),
        "{}",
        resp.unauthorized()
    );
    // A Host that would inject challenge parameters, or carries userinfo or a path, is not
    // used: the realm falls back to localhost and holds exactly the parameters we put there.
    for host in [
        "evil.example/x\",service=\"other",
        "evil.example\"",
        "user@evil.example",
        "evil.example/path",
        "evil example",
        "evil.example:80x",
    ] {
        let resp = call_h(&r, "GET", "/v2/", Cred::None, b"", &[("host", host)]).await;
        assert_eq!(
            resp.unauthorized(),
            "Bearer realm=\"http://localhost/token\",service=\"test-registry\"",
            "Host {host:?}"
        );
    }
    let resp = call_h(
        &r,
        "GET",
        "/v2/",
        Cred::None,
        b"",
        &[("host", "[::1]:5000")],
    )
    .await;
    assert!(
        resp.unauthorized()
            .starts_with("Bearer realm=\"http://[::1]:5000/token\""),
        "{}",
        resp.unauthorized()
    );

    let trusting = toml.replace("[auth]\n", "[auth]\ntrust_forwarded_proto = true\n");
    assert_ne!(trusting, toml);
    let r = registry_with(&trusting);
    for (proto, want) in [("https", "https"), ("HTTPS", "https"), ("gopher", "http")] {
        let resp = call_h(
            &r,
            "GET",
            "/v2/",
            Cred::None,
            b"",
            &[("host", "reg.example"), ("x-forwarded-proto", proto)],
        )
        .await;
        assert!(
            resp.unauthorized()
                .starts_with(&format!("Bearer realm=\"{want}://reg.example/token\"")),
            "{proto}: {}",
            resp.unauthorized()
        );
    }
}

/// Every challenge parameter is a quoted-string with `"` and `\` escaped (RFC 9110 §5.6.4),
/// whatever the configured service holds.
#[tokio::test]
async fn challenge_parameters_are_escaped() {
    let toml = config_toml("").replace("service = \"test-registry\"", "service = 'reg\"istry\\x'");
    assert!(toml.contains("reg\"istry"), "{toml}");
    let r = registry_with(&toml);
    let resp = call(&r, "GET", "/v2/team-a/app/tags/list", Cred::None, b"").await;
    assert_eq!(
        resp.unauthorized(),
        format!(
            "Bearer realm=\"{REALM}\",service=\"reg\\\"istry\\\\x\",scope=\"repository:team-a/app:pull\""
        )
    );
}

#[test]
fn configuration_errors() {
    let err = |t: &str| AuthConfig::from_toml(t).unwrap_err();
    assert!(
        err("[auth]\n").contains("no token secret"),
        "{}",
        err("[auth]\n")
    );
    assert!(err("[auth]\nsecret = \"short\"\n").contains("at least 32 bytes"));
    assert!(err("[auht]\n").contains("auht"));
    assert!(err(&format!("[auth]\nsecret = \"{SECRET}\"\n[[auth.users]]\nname = \"a\"\npassword_hash = \"plain\"\n")).contains("hash-password"));
    assert!(err(&format!("[auth]\nsecret = \"{SECRET}\"\n[[auth.rules]]\nrepositories = [\"x\"]\nusers = [\"a\"]\nactions = [\"write\"]\n")).contains("unknown action"));
    assert!(AuthConfig::from_toml("").unwrap().is_none());
    // The secret may come from the environment instead of the file; it is never printed.
    let a = AuthConfig::from_settings(
        |k| (k == "DOCKSIDE_AUTH_SECRET").then(|| SECRET.to_owned()),
        Some("[auth]\nservice = \"s\"\n"),
    )
    .unwrap()
    .unwrap();
    assert_eq!(a.service, "s");
    assert!(!format!("{a:?}").contains(SECRET));
    // The whole configuration from DOCKSIDE_AUTH_CONFIG (the edge components' way).
    let cfg = Config::from_settings(|k| match k {
        "DOCKSIDE_AUTH_CONFIG" => Some(format!("[auth]\nsecret = \"{SECRET}\"\n")),
        "DOCKSIDE_AUTH_REALM" => Some("https://x/token".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(cfg.auth.unwrap().realm.as_deref(), Some("https://x/token"));
    assert!(Config::from_settings(|_| None).unwrap().auth.is_none());
}

#[test]
fn password_hashes() {
    for bcrypt in [false, true] {
        let h = dockside::auth::hash_password("pw", bcrypt).unwrap();
        assert!(
            h.starts_with(if bcrypt { "$2" } else { "$argon2id$" }),
            "{h}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// An external token issuer (ES256, EdDSA, RS256)

fn external_toml(pems: &[(&str, String)]) -> String {
    let mut t = "[auth]\nservice = \"test-registry\"\nrealm = \"https://auth.example/token\"\n\n[auth.external]\nissuer = \"https://auth.example\"\naudience = \"registry.example\"\n"
        .to_owned();
    for (kid, pem) in pems {
        t.push_str(&format!(
            "\n[[auth.external.keys]]\nkid = \"{kid}\"\npem = \"\"\"\n{pem}\"\"\"\n"
        ));
    }
    t
}

fn ext_claims(repo: &str, actions: &[&str]) -> Value {
    let n = now();
    json!({"iss": "https://auth.example", "sub": "carol", "aud": "registry.example",
           "exp": n + 60, "nbf": n, "iat": n, "jti": "j",
           "access": [{"type": "repository", "name": repo, "actions": actions}]})
}

fn sign_with(alg: &str, kid: &str, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(json!({"alg": alg, "typ": "JWT", "kid": kid}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

#[tokio::test]
async fn external_issuer_tokens() {
    use ed25519_dalek::pkcs8::EncodePublicKey as _;
    use p256::ecdsa::signature::Signer as _;
    let ec = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
    let ec_pem = ec
        .verifying_key()
        .to_public_key_pem(Default::default())
        .unwrap();
    let ed = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let ed_pem = ed
        .verifying_key()
        .to_public_key_pem(Default::default())
        .unwrap();
    let r = registry_with(&external_toml(&[("ec", ec_pem), ("ed", ed_pem)]));
    let es = |c: &Value| {
        sign_with("ES256", "ec", c, |m| {
            let s: p256::ecdsa::Signature = ec.sign(m);
            s.to_bytes().to_vec()
        })
    };
    let eddsa = |c: &Value| sign_with("EdDSA", "ed", c, |m| ed.sign(m).to_bytes().to_vec());

    for make in [&es as &dyn Fn(&Value) -> String, &eddsa] {
        let t = make(&ext_claims("ext/app", &["pull", "push"]));
        call(
            &r,
            "POST",
            "/v2/ext/app/blobs/uploads/",
            Cred::Bearer(&t),
            b"",
        )
        .await
        .expect(202);
        // Its access claim is all it grants: 403, and a challenge to fetch a wider token.
        let c = call(&r, "GET", "/v2/ext/other/tags/list", Cred::Bearer(&t), b"")
            .await
            .insufficient();
        assert!(
            c.starts_with("Bearer realm=\"https://auth.example/token\",service=\"test-registry\""),
            "{c}"
        );
        // Wrong issuer, wrong audience, expired.
        for (k, v) in [
            ("iss", json!("https://evil.example")),
            ("aud", json!("test-registry")),
            ("exp", json!(now() - 100)),
        ] {
            let mut c = ext_claims("ext/app", &["pull"]);
            c[k] = v;
            call(
                &r,
                "GET",
                "/v2/ext/app/tags/list",
                Cred::Bearer(&make(&c)),
                b"",
            )
            .await
            .unauthorized();
        }
    }
    // A key named by kid that does not match the signature's.
    let wrong_kid = sign_with("ES256", "ed", &ext_claims("ext/app", &["pull"]), |m| {
        let s: p256::ecdsa::Signature = ec.sign(m);
        s.to_bytes().to_vec()
    });
    call(
        &r,
        "GET",
        "/v2/ext/app/tags/list",
        Cred::Bearer(&wrong_kid),
        b"",
    )
    .await
    .unauthorized();
    // Another key altogether.
    let other = p256::ecdsa::SigningKey::from_slice(&[8u8; 32]).unwrap();
    let forged = sign_with("ES256", "ec", &ext_claims("ext/app", &["pull"]), |m| {
        let s: p256::ecdsa::Signature = other.sign(m);
        s.to_bytes().to_vec()
    });
    call(
        &r,
        "GET",
        "/v2/ext/app/tags/list",
        Cred::Bearer(&forged),
        b"",
    )
    .await
    .unauthorized();
    // HS256 (no secret here: nothing to confuse the public keys with) and none.
    let hs = forge(
        &json!({"alg":"HS256"}),
        &ext_claims("ext/app", &["pull"]),
        b"",
    );
    call(&r, "GET", "/v2/ext/app/tags/list", Cred::Bearer(&hs), b"")
        .await
        .unauthorized();
    // dockside issues no tokens in this setup.
    call(&r, "GET", "/token", Cred::None, b"").await.expect(404);
}

#[tokio::test]
async fn external_issuer_rs256() {
    // RSA keys are slow to generate in a debug build: use openssl when it is there.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("openssl not available: RS256 not tested");
        return;
    }
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    let pem = String::from_utf8(out.stdout).unwrap();
    let r = registry_with(&external_toml(&[("rsa", pem)]));
    let sign = |c: &Value| {
        sign_with("RS256", "rsa", c, |m| {
            let msg = dir.path().join("msg");
            std::fs::write(&msg, m).unwrap();
            let out = std::process::Command::new("openssl")
                .args(["dgst", "-sha256", "-sign"])
                .arg(&key)
                .arg(&msg)
                .output()
                .unwrap();
            assert!(out.status.success());
            out.stdout
        })
    };
    let t = sign(&ext_claims("ext/app", &["pull"]));
    call(&r, "GET", "/v2/ext/app/tags/list", Cred::Bearer(&t), b"")
        .await
        .expect(404);
    let mut c = ext_claims("ext/app", &["pull"]);
    c["iss"] = json!("nope");
    call(
        &r,
        "GET",
        "/v2/ext/app/tags/list",
        Cred::Bearer(&sign(&c)),
        b"",
    )
    .await
    .unauthorized();
    // An HS256 token whose HMAC key is the public key PEM (the classic confusion): refused.
    let hs = forge(
        &json!({"alg":"HS256"}),
        &ext_claims("ext/app", &["pull"]),
        std::fs::read(&key).unwrap().as_slice(),
    );
    call(&r, "GET", "/v2/ext/app/tags/list", Cred::Bearer(&hs), b"")
        .await
        .unauthorized();
}

/// The README's worked example is a working configuration, and grants what its comments say.
#[tokio::test]
async fn readme_worked_example() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("`dockside.toml`:\n\n```toml\n")
        .expect("the worked example")
        + 25;
    let end = start + readme[start..].find("```").unwrap();
    let mut toml = String::new();
    for line in readme[start..end].lines() {
        if line.starts_with("password_hash") {
            let user = if toml.contains("\"alice\"\npassword") {
                "ci"
            } else {
                "alice"
            };
            toml.push_str(&format!(
                "password_hash = \"{}\"\n",
                bcrypt_hash(&format!("{user}-pw"))
            ));
        } else if line.starts_with("[auth]") {
            toml.push_str(&format!("[auth]\nsecret = \"{SECRET}\"\n"));
        } else {
            toml.push_str(line);
            toml.push('\n');
        }
    }
    let r = registry_with(&toml);
    let alice = Cred::Basic("alice", "alice-pw");
    let ci = Cred::Basic("ci", "ci-pw");
    push_image(&r, "team-a/app", "v1", ci).await;
    let d = push_image(&r, "public/base", "v1", alice).await;
    call(&r, "GET", "/v2/team-a/app/manifests/v1", ci, b"")
        .await
        .expect(200);
    call(&r, "GET", "/v2/team-a/app/manifests/v1", Cred::None, b"")
        .await
        .unauthorized();
    call(&r, "GET", "/v2/public/base/manifests/v1", Cred::None, b"")
        .await
        .expect(200);
    call(
        &r,
        "DELETE",
        &format!("/v2/public/base/manifests/{d}"),
        ci,
        b"",
    )
    .await
    .denied();
    call(&r, "GET", "/v2/_catalog", ci, b"").await.denied();
    call(&r, "GET", "/v2/_catalog", alice, b"")
        .await
        .expect(200);
    push_image(&r, "team-a/deep/app", "v1", alice).await;
    call(&r, "POST", "/v2/team-a/deep/app/blobs/uploads/", ci, b"")
        .await
        .denied();
    let t = token(&r, alice, &["repository:team-a/app:pull,push,delete"]).await;
    assert_eq!(claims(&t)["aud"], "registry.example.com");
    assert_eq!(
        claims(&t)["exp"].as_u64().unwrap() - claims(&t)["iat"].as_u64().unwrap(),
        300
    );
}

/// Password checks that run inline and count, or refuse as busy.
#[derive(Debug, Default)]
struct CountingChecks {
    runs: std::sync::atomic::AtomicUsize,
    busy: bool,
}

impl dockside::auth::PasswordChecks for CountingChecks {
    fn run(
        &self,
        check: dockside::auth::PasswordCheck,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<bool, dockside::auth::Busy>> + Send>,
    > {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let result = if self.busy {
            Err(dockside::auth::Busy {
                retry_after_secs: 7,
            })
        } else {
            Ok(check())
        };
        Box::pin(std::future::ready(result))
    }
}

fn registry_with_checks(checks: Arc<CountingChecks>) -> MemoryRegistry {
    let auth = AuthConfig::from_toml(&config_toml(""))
        .unwrap()
        .expect("an [auth] table");
    Registry::new(
        MemoryKv::new(),
        MemoryBlobs::new(),
        Config {
            auth: Some(Arc::new(auth)),
            password_checks: Some(checks),
            ..Config::default()
        },
    )
}

#[tokio::test]
async fn password_checks_run_where_the_adapter_says() {
    let checks = Arc::new(CountingChecks::default());
    let r = registry_with_checks(checks.clone());
    let runs = || checks.runs.load(std::sync::atomic::Ordering::SeqCst);
    call(&r, "GET", "/v2/", Cred::Basic("alice", "alice-pw"), b"")
        .await
        .expect(200);
    call(&r, "GET", "/v2/", Cred::Basic("nobody", "x"), b"")
        .await
        .unauthorized();
    assert_eq!(runs(), 2);
    let t = token(
        &r,
        Cred::Basic("bob", "bob-pw"),
        &["repository:team-b/x:pull"],
    )
    .await;
    assert_eq!(runs(), 3);
    // A token costs no password check.
    call(&r, "GET", "/v2/", Cred::Bearer(&t), b"")
        .await
        .expect(200);
    assert_eq!(runs(), 3);

    // Busy: 429 TOOMANYREQUESTS with Retry-After, on /v2/ and at the token endpoint.
    let busy = Arc::new(CountingChecks {
        busy: true,
        ..CountingChecks::default()
    });
    let r = registry_with_checks(busy);
    for uri in ["/v2/", "/token?service=test-registry"] {
        let resp = call(&r, "GET", uri, Cred::Basic("alice", "alice-pw"), b"").await;
        resp.expect(429);
        assert_eq!(resp.code(), "TOOMANYREQUESTS");
        assert_eq!(resp.header("retry-after"), Some("7"));
    }
}

/// A request body of `len` bytes that records whether it was read.
struct Tracked {
    left: usize,
    polled: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.polled.store(true, std::sync::atomic::Ordering::SeqCst);
        let n = self.left.min(64 * 1024);
        self.left -= n;
        std::task::Poll::Ready((n > 0).then(|| Ok(http_body::Frame::data(Bytes::from(vec![0; n])))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left as u64)
    }
}

#[tokio::test]
async fn refused_bodies_are_read_only_when_it_helps() {
    let r = registry();
    // (Expect: 100-continue, body length, whether the refused body is read)
    for (expect, len, read) in [
        (false, 1000, true),               // small: read, so the client sees the 401
        (true, 1000, false),               // the client waits for 100 Continue: not read
        (false, 100 * 1024 * 1024, false), // past drain_limit: not read at all
    ] {
        let polled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut b = Request::builder()
            .method("PATCH")
            .uri("/v2/team-a/app/blobs/uploads/0123456789abcdef0123456789abcdef");
        if expect {
            b = b.header("expect", "100-continue");
        }
        let body = Tracked {
            left: len,
            polled: polled.clone(),
        };
        let resp = r.handle(b.body(body).unwrap()).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            polled.load(std::sync::atomic::Ordering::SeqCst),
            read,
            "expect {expect}, {len} bytes"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Brute-force protection: failed logins counted in the key-value store (src/throttle.rs)

fn throttled(
    limits: dockside::LoginLimits,
    trust_forwarded_for: bool,
) -> (MemoryKv, MemoryRegistry) {
    let auth = AuthConfig::from_toml(&config_toml(""))
        .unwrap()
        .expect("an [auth] table");
    let kv = MemoryKv::new();
    let r = Registry::new(
        kv.clone(),
        MemoryBlobs::new(),
        Config {
            auth: Some(Arc::new(auth)),
            login_limits: limits,
            trust_forwarded_for,
            ..Config::default()
        },
    );
    (kv, r)
}

/// A request as the native server hands it over: with the peer's address (`from`), if known.
async fn call_from(
    r: &MemoryRegistry,
    from: Option<&str>,
    method: &str,
    uri: &str,
    cred: Cred<'_>,
    headers: &[(&str, &str)],
) -> Resp {
    let mut b = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(uri);
    if let Cred::Basic(u, p) = cred {
        b = b.header(
            "authorization",
            format!("Basic {}", STANDARD.encode(format!("{u}:{p}"))),
        );
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    if let Some(a) = from {
        b = b.extension(dockside::ClientAddr(a.parse().unwrap()));
    }
    let resp = r.handle(b.body(Full::new(Bytes::new())).unwrap()).await;
    let (parts, body) = resp.into_parts();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Basic credentials on `/v2/` from `from`.
async fn login(r: &MemoryRegistry, from: Option<&str>, user: &str, pw: &str) -> Resp {
    call_from(r, from, "GET", "/v2/", Cred::Basic(user, pw), &[]).await
}

/// A 429 `TOOMANYREQUESTS` in the spec's envelope; returns its `Retry-After`.
#[track_caller]
fn throttled_for(resp: &Resp, window: u64) -> u64 {
    resp.expect(429);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.code(), "TOOMANYREQUESTS");
    let wait: u64 = resp
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=window).contains(&wait), "Retry-After {wait}");
    wait
}

fn limits(window: u64, user_address: u64, user: u64, address: u64) -> dockside::LoginLimits {
    dockside::LoginLimits {
        window_secs: window,
        per_user_address: user_address,
        per_user: user,
        per_address: address,
    }
}

/// The three counts engage as designed: one address guessing one user is locked out of that
/// user (right password too) while the user logs in from elsewhere and others log in from that
/// address; enough failures from one address lock it out for every name; enough for one name
/// from anywhere lock that name out everywhere; and everything works again once the window
/// (counted from the first failure) has passed, no later.
#[tokio::test]
async fn failed_logins_are_throttled_per_user_and_address() {
    // Counts start at the whole second of their first failure: the lockout lasts between
    // WINDOW - 1 and WINDOW seconds, time enough for the checks below on a loaded machine.
    const WINDOW: u64 = 4;
    let (_, r) = throttled(limits(WINDOW, 3, 5, 4), false);
    let (a, b, c) = (Some("10.0.0.1"), Some("10.0.0.2"), Some("10.0.0.3"));
    let first = std::time::Instant::now();
    for _ in 0..3 {
        login(&r, a, "alice", "guess").await.unauthorized();
    }
    throttled_for(&login(&r, a, "alice", "guess").await, WINDOW);
    // The right password is refused too, on every way in, while the lockout lasts.
    throttled_for(&login(&r, a, "alice", "alice-pw").await, WINDOW);
    let tok = "/token?service=test-registry&scope=repository:team-a/app:pull";
    throttled_for(
        &call_from(&r, a, "GET", tok, Cred::Basic("alice", "alice-pw"), &[]).await,
        WINDOW,
    );
    // Alice from elsewhere, and Bob from the attacker's address, are unaffected.
    login(&r, b, "alice", "alice-pw").await.expect(200);
    login(&r, a, "bob", "bob-pw").await.expect(200);
    // A fourth failure from the address (another name) locks the address for every name.
    login(&r, a, "bob", "guess").await.unauthorized();
    throttled_for(&login(&r, a, "bob", "bob-pw").await, WINDOW);
    throttled_for(&login(&r, a, "nobody", "x").await, WINDOW);
    login(&r, b, "bob", "bob-pw").await.expect(200);
    // Two more failures for alice from b make five for the name: locked out everywhere.
    for _ in 0..2 {
        login(&r, b, "alice", "guess").await.unauthorized();
    }
    let wait = throttled_for(&login(&r, c, "alice", "alice-pw").await, WINDOW);
    login(&r, c, "bob", "bob-pw").await.expect(200);
    // After the window, the right password works from everywhere.
    tokio::time::sleep(std::time::Duration::from_millis(wait * 1000 + 100)).await;
    login(&r, a, "alice", "alice-pw").await.expect(200);
    login(&r, c, "alice", "alice-pw").await.expect(200);
    login(&r, a, "bob", "bob-pw").await.expect(200);
    assert!(
        first.elapsed() < std::time::Duration::from_millis(WINDOW * 1000 + 1200),
        "the lockout outlasted the window: {:?}",
        first.elapsed()
    );
}

/// The token endpoint's logins (GET with Basic, POST `grant_type=password`) count like Basic
/// on `/v2/`, and every name is counted whether a user has it or not (a name that never locks
/// would tell which names are users).
#[tokio::test]
async fn token_logins_count_and_unknown_names_lock_alike() {
    let (_, r) = throttled(limits(60, 2, 0, 0), false);
    let a = Some("192.0.2.7");
    let tok = "/token?service=test-registry";
    call_from(&r, a, "GET", tok, Cred::Basic("alice", "x"), &[])
        .await
        .expect(401);
    let post = |user: &'static str, pw: &'static str| {
        let r = &r;
        async move {
            let body = format!("grant_type=password&username={user}&password={pw}&service=s");
            let b = Request::builder()
                .method("POST")
                .uri("/token")
                .extension(dockside::ClientAddr("192.0.2.7".parse().unwrap()))
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let resp = r.handle(b).await;
            let (parts, body) = resp.into_parts();
            Resp {
                status: parts.status,
                headers: parts.headers,
                body: body.collect().await.unwrap().to_bytes(),
            }
        }
    };
    post("alice", "y").await.expect(401);
    throttled_for(&post("alice", "alice-pw").await, 60);
    login(&r, a, "nobody", "1").await.unauthorized();
    login(&r, a, "nobody", "2").await.unauthorized();
    throttled_for(&login(&r, a, "nobody", "3").await, 60);
}

/// Without a client address (an adapter that cannot tell) the tight count is per user name.
#[tokio::test]
async fn without_an_address_the_user_name_is_counted() {
    let (_, r) = throttled(limits(60, 3, 0, 0), false);
    for _ in 0..3 {
        login(&r, None, "alice", "guess").await.unauthorized();
    }
    throttled_for(&login(&r, None, "alice", "alice-pw").await, 60);
    login(&r, None, "bob", "bob-pw").await.expect(200);
    // A known address has its own count.
    login(&r, Some("10.1.1.1"), "alice", "alice-pw")
        .await
        .expect(200);
}

/// `X-Forwarded-For` is the client address only when trusted, and then only its last entry
/// (what the proxy appended): a client cannot pick an address by sending the header.
#[tokio::test]
async fn forwarded_for_only_when_trusted() {
    let proxy = Some("10.9.9.9");
    let (_, r) = throttled(limits(60, 2, 0, 0), false);
    for i in 0..2 {
        let xff = format!("203.0.113.{i}");
        call_from(
            &r,
            proxy,
            "GET",
            "/v2/",
            Cred::Basic("alice", "x"),
            &[("x-forwarded-for", &xff)],
        )
        .await
        .unauthorized();
    }
    let resp = call_from(
        &r,
        proxy,
        "GET",
        "/v2/",
        Cred::Basic("alice", "alice-pw"),
        &[("x-forwarded-for", "203.0.113.50")],
    )
    .await;
    throttled_for(&resp, 60);

    let (_, r) = throttled(limits(60, 2, 0, 0), true);
    let from = |xff: &'static str| [("x-forwarded-for", xff)];
    for _ in 0..2 {
        call_from(
            &r,
            proxy,
            "GET",
            "/v2/",
            Cred::Basic("alice", "x"),
            &from("1.2.3.4, 203.0.113.1"),
        )
        .await
        .unauthorized();
    }
    // The same client, whatever it puts first.
    let resp = call_from(
        &r,
        proxy,
        "GET",
        "/v2/",
        Cred::Basic("alice", "alice-pw"),
        &from("5.6.7.8, 203.0.113.1"),
    )
    .await;
    throttled_for(&resp, 60);
    // Another client behind the same proxy.
    call_from(
        &r,
        proxy,
        "GET",
        "/v2/",
        Cred::Basic("alice", "alice-pw"),
        &from("203.0.113.2"),
    )
    .await
    .expect(200);
    // No usable header: the peer (the proxy) is the address.
    call_from(
        &r,
        proxy,
        "GET",
        "/v2/",
        Cred::Basic("alice", "alice-pw"),
        &from("garbage"),
    )
    .await
    .expect(200);
}

/// IPv6 clients are counted by /64 (one host usually has a whole /64); IPv4-mapped addresses
/// as the IPv4 address.
#[tokio::test]
async fn ipv6_addresses_count_by_prefix() {
    let (_, r) = throttled(limits(60, 0, 0, 2), false);
    login(&r, Some("2001:db8::1"), "alice", "x")
        .await
        .unauthorized();
    login(&r, Some("2001:db8::ffff:2"), "bob", "x")
        .await
        .unauthorized();
    throttled_for(&login(&r, Some("2001:db8::3"), "bob", "bob-pw").await, 60);
    login(&r, Some("2001:db8:0:1::1"), "bob", "bob-pw")
        .await
        .expect(200);
    login(&r, Some("::ffff:10.0.0.1"), "alice", "x")
        .await
        .unauthorized();
    login(&r, Some("10.0.0.1"), "alice", "x")
        .await
        .unauthorized();
    throttled_for(&login(&r, Some("10.0.0.1"), "bob", "bob-pw").await, 60);
}

/// A successful login clears its own (user, address) count, so a user who mistyped starts
/// afresh; the per-user count is not cleared (an attacker's own successes must not help).
#[tokio::test]
async fn a_success_resets_only_its_own_count() {
    let (_, r) = throttled(limits(60, 3, 0, 0), false);
    let a = Some("10.0.0.1");
    for _ in 0..2 {
        login(&r, a, "alice", "typo").await.unauthorized();
    }
    login(&r, a, "alice", "alice-pw").await.expect(200);
    for _ in 0..3 {
        login(&r, a, "alice", "typo").await.unauthorized();
    }
    throttled_for(&login(&r, a, "alice", "alice-pw").await, 60);

    let (_, r) = throttled(limits(60, 0, 3, 0), false);
    for _ in 0..2 {
        login(&r, a, "alice", "typo").await.unauthorized();
    }
    login(&r, a, "alice", "alice-pw").await.expect(200);
    login(&r, a, "alice", "typo").await.unauthorized();
    throttled_for(&login(&r, a, "alice", "alice-pw").await, 60);
}

/// A limit of 0 turns its count off, a window of 0 all of them; and with every count off
/// nothing is written to the store.
#[tokio::test]
async fn throttle_limits_of_zero_are_off() {
    let (kv, r) = throttled(limits(0, 1, 1, 1), false);
    for _ in 0..5 {
        login(&r, Some("10.0.0.1"), "alice", "x")
            .await
            .unauthorized();
    }
    login(&r, Some("10.0.0.1"), "alice", "alice-pw")
        .await
        .expect(200);
    assert!(kv.keys().iter().all(|k| !k.starts_with("login-failures/")));
    let (_, r) = throttled(limits(60, 0, 0, 2), false);
    for _ in 0..5 {
        login(&r, None, "alice", "x").await.unauthorized();
    }
}

/// The purge frees the keys of counts whose window has passed, and keeps running ones.
#[tokio::test]
async fn lapsed_failure_counts_are_purged() {
    // A window of 3 s: the first purge runs well within it, even on a loaded machine.
    let (kv, r) = throttled(limits(3, 5, 5, 5), false);
    let count = || {
        kv.keys()
            .iter()
            .filter(|k| k.starts_with("login-failures/"))
            .count()
    };
    login(&r, Some("10.0.0.1"), "someone", "x")
        .await
        .unauthorized();
    assert_eq!(count(), 3);
    assert_eq!(r.purge_login_failures().await.unwrap(), 0);
    assert_eq!(count(), 3);
    tokio::time::sleep(std::time::Duration::from_millis(4100)).await;
    assert_eq!(r.purge_login_failures().await.unwrap(), 3);
    assert_eq!(count(), 0);
}

#[test]
fn limit_settings() {
    let settings = [
        ("DOCKSIDE_LOGIN_WINDOW_SECS", "30"),
        ("DOCKSIDE_LOGIN_FAILURES_PER_USER_ADDRESS", "4"),
        ("DOCKSIDE_LOGIN_FAILURES_PER_USER", "0"),
        ("DOCKSIDE_LOGIN_FAILURES_PER_ADDRESS", "9"),
        ("DOCKSIDE_TRUST_FORWARDED_FOR", "true"),
        ("DOCKSIDE_MAX_UPLOADS", "7"),
        ("DOCKSIDE_MAX_UPLOADS_PER_REPOSITORY", "0"),
        ("DOCKSIDE_UPLOAD_EXPIRY_SECS", "600"),
    ];
    let get = |k: &str| {
        settings
            .iter()
            .find(|(s, _)| *s == k)
            .map(|(_, v)| v.to_string())
    };
    let c = Config::from_settings(get).unwrap();
    assert_eq!(c.login_limits, limits(30, 4, 0, 9));
    assert!(c.trust_forwarded_for);
    assert_eq!(
        (
            c.max_uploads,
            c.max_uploads_per_repository,
            c.upload_expiry_secs
        ),
        (7, 0, 600)
    );
    let d = Config::from_settings(|_| None).unwrap();
    assert_eq!(d.login_limits, limits(60, 10, 100, 50));
    assert_eq!((d.max_uploads, d.max_uploads_per_repository), (1000, 100));
    assert!(!d.trust_forwarded_for);
    let e = Config::from_settings(|k| (k == "DOCKSIDE_MAX_UPLOADS").then(|| "lots".to_owned()))
        .unwrap_err();
    assert!(e.contains("DOCKSIDE_MAX_UPLOADS"), "{e}");
}
