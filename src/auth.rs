//! Access control: who may pull, push and delete (Docker token auth, Basic auth, rules).
//!
//! Off unless the configuration has an `[auth]` table. When on, every `/v2/` request is
//! authorized before it touches storage, so an answer never depends on whether a repository
//! exists. Credentials are, in order of preference:
//!
//! - **Bearer tokens** (JWT). Issued by dockside itself at `GET`/`POST /token` and signed with
//!   HS256 under a shared secret (every instance of an edge deployment must agree on it), or
//!   issued by an external token service and verified with its public keys (RS256, ES256,
//!   EdDSA). Verifying one is an HMAC or a signature check: cheap, no per-request state.
//! - **Basic credentials** sent straight to `/v2/...`: checked against the user's argon2 or
//!   bcrypt hash on every request (deliberately slow: tens of milliseconds natively; nothing is
//!   cached). Clients that follow the Bearer challenge pay this once per token instead.
//!
//! Rules grant `pull`, `push` and `delete` on repository patterns to users, to every signed-in
//! user (`"*"`) or to everyone (`"anonymous"`), and the catalog to those with `catalog = true`.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::error::{Error, ErrorCode};
use crate::registry::{Query, header_str};

/// Default lifetime of an access token, in seconds.
pub const DEFAULT_TOKEN_TTL: u64 = 300;
/// Default lifetime of a refresh token (`offline_token=true`, `access_type=offline`).
pub const DEFAULT_REFRESH_TTL: u64 = 7 * 24 * 3600;
/// Shortest HS256 secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY: u64 = 30;

const PULL: u8 = 1;
const PUSH: u8 = 2;
const DELETE: u8 = 4;
const ALL: u8 = PULL | PUSH | DELETE;

/// The access configuration (the `[auth]` table). Its `Debug` shows no secret and no hash.
pub struct AuthConfig {
    /// The service name: the `service` of challenges and the `aud` of tokens.
    pub service: String,
    /// The `iss` of the tokens dockside issues.
    pub issuer: String,
    /// The token endpoint advertised in challenges; derived from the request's `Host` (and
    /// `X-Forwarded-Proto`) when not set.
    pub realm: Option<String>,
    /// Lifetime of access tokens, seconds.
    pub token_ttl: u64,
    /// Lifetime of refresh tokens, seconds.
    pub refresh_ttl: u64,
    /// Whether Basic credentials are accepted on `/v2/` requests.
    pub basic: bool,
    secret: Option<Vec<u8>>,
    users: Vec<User>,
    rules: Vec<Rule>,
    external: Option<External>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("service", &self.service)
            .field("issuer", &self.issuer)
            .field("realm", &self.realm)
            .field("token_ttl", &self.token_ttl)
            .field("basic", &self.basic)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field(
                "users",
                &self.users.iter().map(|u| &u.name).collect::<Vec<_>>(),
            )
            .field("rules", &self.rules.len())
            .field("external", &self.external.as_ref().map(|e| &e.issuer))
            .finish()
    }
}

struct User {
    name: String,
    hash: String,
}

enum Who {
    Everyone,
    SignedIn,
    User(String),
}

struct Rule {
    repositories: Vec<String>,
    who: Vec<Who>,
    actions: u8,
    catalog: bool,
}

struct External {
    issuer: String,
    audience: String,
    keys: Vec<(Option<String>, PublicKey)>,
}

enum PublicKey {
    Rsa(Box<rsa::pkcs1v15::VerifyingKey<Sha256>>),
    P256(p256::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// The configuration file. Unknown tables are errors: a misspelt `[auth]` must not leave a
/// registry open.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    auth: Option<RawAuth>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    service: Option<String>,
    issuer: Option<String>,
    realm: Option<String>,
    secret: Option<String>,
    token_ttl: Option<u64>,
    refresh_ttl: Option<u64>,
    basic: Option<bool>,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    rules: Vec<RawRule>,
    external: Option<RawExternal>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    password_hash: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    repositories: Vec<String>,
    users: Vec<String>,
    #[serde(default)]
    actions: Vec<String>,
    #[serde(default)]
    catalog: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExternal {
    issuer: String,
    audience: Option<String>,
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    kid: Option<String>,
    pem: String,
}

impl AuthConfig {
    /// Parses a TOML document; `Ok(None)` when it has no `[auth]` table (auth off).
    pub fn from_toml(text: &str) -> Result<Option<Self>, String> {
        Self::from_toml_with(text, |_| None)
    }

    /// The access configuration from settings looked up with `get` (environment variables,
    /// Spin variables...), over an optional TOML document `file`:
    ///
    /// - the TOML comes from `file`, else `DOCKSIDE_AUTH_CONFIG` (the document itself; adapters
    ///   with a filesystem may fill it from a file, as the wasi:http component does with
    ///   `DOCKSIDE_AUTH_CONFIG_FILE`);
    /// - `DOCKSIDE_AUTH_SECRET`, `DOCKSIDE_AUTH_REALM`, `DOCKSIDE_AUTH_SERVICE`,
    ///   `DOCKSIDE_AUTH_ISSUER` and `DOCKSIDE_AUTH_TOKEN_TTL` override its fields.
    ///
    /// `Ok(None)` when there is no `[auth]` table anywhere: access control is off. Reads no
    /// file itself (the Spin component has no filesystem).
    pub fn from_settings(
        get: impl Fn(&str) -> Option<String>,
        file: Option<&str>,
    ) -> Result<Option<Self>, String> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let text = match file {
            Some(t) => Some(t.to_owned()),
            None => get("DOCKSIDE_AUTH_CONFIG"),
        };
        match text {
            None => Ok(None),
            Some(t) => Self::from_toml_with(&t, get),
        }
    }

    fn from_toml_with(
        text: &str,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, String> {
        let file: RawFile =
            toml::from_str(text).map_err(|e| format!("invalid access configuration: {e}"))?;
        let Some(mut raw) = file.auth else {
            return Ok(None);
        };
        if let Some(v) = get("DOCKSIDE_AUTH_SECRET") {
            raw.secret = Some(v);
        }
        if let Some(v) = get("DOCKSIDE_AUTH_REALM") {
            raw.realm = Some(v);
        }
        if let Some(v) = get("DOCKSIDE_AUTH_SERVICE") {
            raw.service = Some(v);
        }
        if let Some(v) = get("DOCKSIDE_AUTH_ISSUER") {
            raw.issuer = Some(v);
        }
        if let Some(v) = get("DOCKSIDE_AUTH_TOKEN_TTL") {
            raw.token_ttl = Some(v.trim().parse().map_err(|_| {
                format!("DOCKSIDE_AUTH_TOKEN_TTL must be a number of seconds, not {v:?}")
            })?);
        }
        Self::build(raw).map(Some)
    }

    fn build(raw: RawAuth) -> Result<Self, String> {
        let service = raw.service.unwrap_or_else(|| "dockside".to_owned());
        let external = raw
            .external
            .map(|e| -> Result<External, String> {
                if e.keys.is_empty() {
                    return Err("auth.external.keys is empty".into());
                }
                let keys = e
                    .keys
                    .into_iter()
                    .map(|k| Ok((k.kid, parse_public_key(&k.pem)?)))
                    .collect::<Result<Vec<_>, String>>()?;
                Ok(External {
                    issuer: e.issuer,
                    audience: e.audience.unwrap_or_else(|| service.clone()),
                    keys,
                })
            })
            .transpose()?;
        let secret = raw.secret.map(String::into_bytes);
        match (&secret, &external) {
            (Some(s), _) if s.len() < MIN_SECRET_BYTES => {
                return Err(format!(
                    "the token secret (auth.secret or DOCKSIDE_AUTH_SECRET) must be at least \
                     {MIN_SECRET_BYTES} bytes; e.g. `openssl rand -hex 32`"
                ));
            }
            (None, None) => {
                return Err(
                    "access control is on but no token secret is set: set auth.secret or \
                     DOCKSIDE_AUTH_SECRET (at least 32 random bytes, the same on every instance), \
                     or configure auth.external"
                        .into(),
                );
            }
            (None, Some(_)) if raw.realm.is_none() => {
                return Err(
                    "with an external token issuer and no secret, auth.realm must name the \
                     issuer's token endpoint"
                        .into(),
                );
            }
            _ => {}
        }
        let mut users: Vec<User> = Vec::new();
        for u in raw.users {
            if u.name.is_empty() || u.name.contains(':') {
                return Err(format!("invalid user name {:?}", u.name));
            }
            if !valid_hash(&u.password_hash) {
                return Err(format!(
                    "user {}: password_hash is not an argon2 or bcrypt hash (make one with \
                     `dockside hash-password`)",
                    u.name
                ));
            }
            if users.iter().any(|x| x.name == u.name) {
                return Err(format!("user {} is defined twice", u.name));
            }
            users.push(User {
                name: u.name,
                hash: u.password_hash,
            });
        }
        let mut rules = Vec::new();
        for (i, r) in raw.rules.into_iter().enumerate() {
            let mut actions = 0;
            for a in &r.actions {
                actions |= match a.as_str() {
                    "pull" => PULL,
                    "push" => PUSH,
                    "delete" => DELETE,
                    "*" => ALL,
                    other => return Err(format!("rule {}: unknown action {other:?}", i + 1)),
                };
            }
            if actions == 0 && !r.catalog {
                return Err(format!("rule {}: grants nothing", i + 1));
            }
            if actions != 0 && r.repositories.is_empty() {
                return Err(format!("rule {}: actions but no repositories", i + 1));
            }
            let who = r
                .users
                .into_iter()
                .map(|u| match u.as_str() {
                    "anonymous" => Who::Everyone,
                    "*" => Who::SignedIn,
                    _ => Who::User(u),
                })
                .collect();
            rules.push(Rule {
                repositories: r.repositories,
                who,
                actions,
                catalog: r.catalog,
            });
        }
        Ok(AuthConfig {
            issuer: raw.issuer.unwrap_or_else(|| service.clone()),
            service,
            realm: raw.realm,
            token_ttl: raw.token_ttl.unwrap_or(DEFAULT_TOKEN_TTL).max(1),
            refresh_ttl: raw.refresh_ttl.unwrap_or(DEFAULT_REFRESH_TTL).max(1),
            basic: raw.basic.unwrap_or(true),
            secret,
            users,
            rules,
            external,
        })
    }
}

fn valid_hash(h: &str) -> bool {
    if h.starts_with("$argon2") {
        argon2::password_hash::phc::PasswordHash::new(h).is_ok()
    } else {
        ["$2a$", "$2b$", "$2y$", "$2x$"]
            .iter()
            .any(|p| h.starts_with(p))
            && h.len() == 60
    }
}

fn parse_public_key(pem: &str) -> Result<PublicKey, String> {
    use rsa::pkcs8::DecodePublicKey;
    if let Ok(k) = rsa::PublicKey::from_public_key_pem(pem) {
        return Ok(PublicKey::Rsa(Box::new(rsa::pkcs1v15::VerifyingKey::new(
            k,
        ))));
    }
    if let Ok(k) = p256::ecdsa::VerifyingKey::from_public_key_pem(pem) {
        return Ok(PublicKey::P256(k));
    }
    if let Ok(k) = ed25519_dalek::VerifyingKey::from_public_key_pem(pem) {
        return Ok(PublicKey::Ed25519(k));
    }
    Err("auth.external.keys: not a PEM public key (SPKI) of RSA, P-256 or Ed25519".into())
}

/// Hashes a password for `users[].password_hash`: argon2id with the crate's defaults
/// (19 MiB, 2 passes), or bcrypt at cost 12.
pub fn hash_password(password: &str, use_bcrypt: bool) -> Result<String, String> {
    if use_bcrypt {
        bcrypt::hash(password, 12).map_err(|e| e.to_string())
    } else {
        use argon2::password_hash::PasswordHasher;
        argon2::Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    }
}

/// Checks a password against an argon2 or bcrypt hash (constant time in the crates).
fn password_matches(hash: &str, password: &str) -> bool {
    if hash.starts_with("$argon2") {
        use argon2::password_hash::PasswordVerifier;
        match argon2::password_hash::phc::PasswordHash::new(hash) {
            Ok(h) => argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok(),
            Err(_) => false,
        }
    } else {
        bcrypt::verify(password, hash).unwrap_or(false)
    }
}

// ---------------------------------------------------------------------------------------------
// Rules

/// Whether `name` matches `pattern`: `*` is any run of characters but `/`, `**` any run at all.
pub(crate) fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some(b'*') => {
                let deep = p.get(1) == Some(&b'*');
                let rest = if deep { &p[2..] } else { &p[1..] };
                for i in 0..=n.len() {
                    if go(rest, &n[i..]) {
                        return true;
                    }
                    if i < n.len() && !deep && n[i] == b'/' {
                        return false;
                    }
                }
                false
            }
            Some(&c) => n.first() == Some(&c) && go(&p[1..], &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

impl AuthConfig {
    fn applies(rule: &Rule, user: Option<&str>) -> bool {
        rule.who.iter().any(|w| match w {
            Who::Everyone => true,
            Who::SignedIn => user.is_some(),
            Who::User(u) => user == Some(u.as_str()),
        })
    }

    /// The actions `user` (None: anonymous) has on repository `name`.
    fn repo_actions(&self, user: Option<&str>, name: &str) -> u8 {
        self.rules
            .iter()
            .filter(|r| Self::applies(r, user))
            .filter(|r| r.repositories.iter().any(|p| glob(p, name)))
            .fold(0, |acc, r| acc | r.actions)
    }

    fn catalog_allowed(&self, user: Option<&str>) -> bool {
        self.rules
            .iter()
            .any(|r| r.catalog && Self::applies(r, user))
    }

    fn rules_allow(&self, user: Option<&str>, need: &Need) -> bool {
        match need {
            Need::SignedIn => false,
            Need::Repo(name, a) => self.repo_actions(user, name) & a == *a,
            Need::Catalog => self.catalog_allowed(user),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Authorizing a request

/// What a request needs.
pub(crate) enum Need {
    /// Any valid credentials (the `/v2/` base endpoint).
    SignedIn,
    /// These actions (bit set) on this repository.
    Repo(String, u8),
    /// The catalog (`registry:catalog:*`).
    Catalog,
}

impl Need {
    pub(crate) fn pull(name: &str) -> Self {
        Need::Repo(name.to_owned(), PULL)
    }
    pub(crate) fn push(name: &str) -> Self {
        Need::Repo(name.to_owned(), PUSH)
    }
    pub(crate) fn delete(name: &str) -> Self {
        Need::Repo(name.to_owned(), DELETE)
    }

    /// The `scope` of a challenge for this need. Pushing clients also need pull (to check
    /// what is there), so a push challenge asks for both.
    fn scope(&self) -> Option<String> {
        match self {
            Need::SignedIn => None,
            Need::Catalog => Some("registry:catalog:*".into()),
            Need::Repo(name, a) => {
                let actions = if a & PUSH != 0 {
                    "pull,push"
                } else if a & DELETE != 0 {
                    "delete"
                } else {
                    "pull"
                };
                Some(format!("repository:{name}:{actions}"))
            }
        }
    }
}

/// Who made a request, and what they may do.
pub(crate) struct Caller {
    /// The authenticated user (or token subject); `None` for anonymous callers.
    subject: Option<String>,
    grants: Grants,
}

enum Grants {
    /// Access control is off.
    Everything,
    /// Rules for this subject (anonymous or Basic-authenticated).
    Rules,
    /// A token's `access` claim (plus what everyone may do).
    Token(Vec<ResourceActions>),
}

impl Caller {
    pub(crate) fn unrestricted() -> Self {
        Caller {
            subject: None,
            grants: Grants::Everything,
        }
    }

    /// The subject upload sessions are bound to.
    pub(crate) fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// Whether the caller may do what `need` says.
    pub(crate) fn may(&self, auth: Option<&AuthConfig>, need: &Need) -> bool {
        let Some(auth) = auth else { return true };
        match &self.grants {
            Grants::Everything => true,
            Grants::Rules => {
                matches!(need, Need::SignedIn) && self.subject.is_some()
                    || auth.rules_allow(self.subject.as_deref(), need)
            }
            Grants::Token(access) => {
                matches!(need, Need::SignedIn)
                    || token_covers(access, need)
                    || auth.rules_allow(None, need)
            }
        }
    }
}

fn token_covers(access: &[ResourceActions], need: &Need) -> bool {
    let has = |typ: &str, name: &str, action: &str| {
        access.iter().any(|r| {
            r.typ == typ && r.name == name && r.actions.iter().any(|a| a == action || a == "*")
        })
    };
    match need {
        Need::SignedIn => true,
        Need::Catalog => has("registry", "catalog", "*"),
        Need::Repo(name, a) => {
            (a & PULL == 0 || has("repository", name, "pull"))
                && (a & PUSH == 0 || has("repository", name, "push"))
                && (a & DELETE == 0 || has("repository", name, "delete"))
        }
    }
}

impl AuthConfig {
    /// The realm advertised in challenges.
    fn realm(&self, h: &HeaderMap, uri: &http::Uri) -> String {
        if let Some(r) = &self.realm {
            return r.clone();
        }
        let host = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| header_str(h, header::HOST).map(str::to_owned))
            .unwrap_or_else(|| "localhost".to_owned());
        let proto = header_str(h, "x-forwarded-proto")
            .map(str::to_owned)
            .or_else(|| uri.scheme_str().map(str::to_owned))
            .unwrap_or_else(|| "http".to_owned());
        format!("{proto}://{host}/token")
    }

    /// A 401 with the Bearer challenge for `need`.
    fn challenge(
        &self,
        parts: &http::request::Parts,
        need: &Need,
        error: Option<&str>,
        message: &str,
    ) -> Error {
        let mut c = format!(
            "Bearer realm=\"{}\",service=\"{}\"",
            self.realm(&parts.headers, &parts.uri),
            self.service
        );
        if let Some(s) = need.scope() {
            c.push_str(&format!(",scope=\"{s}\""));
        }
        if let Some(e) = error {
            c.push_str(&format!(",error=\"{e}\""));
        }
        let mut e = Error::new(ErrorCode::Unauthorized, StatusCode::UNAUTHORIZED, message);
        if let Some(s) = need.scope() {
            e = e.with_detail(access_detail(&s));
        }
        e.with_header(header::WWW_AUTHENTICATE, c)
    }

    /// Authorizes a request for `need`: the caller, or the error to answer with.
    ///
    /// - no credentials, and what everyone may do is not enough: 401 with a challenge;
    /// - bad credentials (wrong password, bad, expired or tampered token): 401;
    /// - a valid anonymous token lacking the access: 401 with a challenge;
    /// - a valid token lacking the access, whose subject could get it: 403 `DENIED` with a
    ///   challenge carrying `error="insufficient_scope"` (the client fetches a token for it);
    /// - a known user who may not do this: 403 `DENIED`, no challenge.
    ///
    /// Nothing here reads storage: the answer is the same whether the repository exists or not.
    pub(crate) fn authorize(
        &self,
        parts: &http::request::Parts,
        need: &Need,
        now: u64,
    ) -> Result<Caller, Error> {
        let authz = header_str(&parts.headers, header::AUTHORIZATION).unwrap_or("");
        let (scheme, cred) = authz.split_once(' ').unwrap_or((authz, ""));
        let cred = cred.trim();
        if authz.is_empty() {
            let caller = Caller {
                subject: None,
                grants: Grants::Rules,
            };
            return if caller.may(Some(self), need) {
                Ok(caller)
            } else {
                Err(self.challenge(parts, need, None, "authentication required"))
            };
        }
        if scheme.eq_ignore_ascii_case("basic") && self.basic {
            let Some((user, password)) = decode_basic(cred) else {
                return Err(self.challenge(parts, need, None, "malformed Basic credentials"));
            };
            if !self.check_password(&user, &password) {
                return Err(self.challenge(parts, need, None, "invalid username or password"));
            }
            let caller = Caller {
                subject: Some(user),
                grants: Grants::Rules,
            };
            return if caller.may(Some(self), need) {
                Ok(caller)
            } else {
                Err(denied(need))
            };
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            let claims = match self.verify_access_token(cred, now) {
                Ok(c) => c,
                Err(why) => {
                    return Err(self.challenge(parts, need, Some("invalid_token"), why));
                }
            };
            let subject = (!claims.sub.is_empty()).then_some(claims.sub);
            let caller = Caller {
                subject,
                grants: Grants::Token(claims.access),
            };
            if caller.may(Some(self), need) {
                return Ok(caller);
            }
            return match (&caller.subject, claims.external) {
                // An anonymous token: signing in is the remedy.
                (None, _) => Err(self.challenge(parts, need, None, "authentication required")),
                // A user of ours who may not do this whatever token they fetch.
                (Some(u), false) if !self.rules_allow(Some(u), need) => Err(denied(need)),
                // A token for less than its subject may have: 403 with a challenge naming the
                // scope (RFC 6750 §3.1, `insufficient_scope`), which clients that ask for a
                // narrow token first (oras-py) answer by fetching a wider one.
                _ => {
                    let mut e = self.challenge(
                        parts,
                        need,
                        Some("insufficient_scope"),
                        "the token does not grant this access",
                    );
                    e.code = ErrorCode::Denied;
                    e.status = StatusCode::FORBIDDEN;
                    Err(e)
                }
            };
        }
        Err(self.challenge(parts, need, None, "unsupported authorization scheme"))
    }

    /// Checks a user's password. An unknown user costs the same as a wrong password.
    fn check_password(&self, user: &str, password: &str) -> bool {
        match self.users.iter().find(|u| u.name == user) {
            Some(u) => password_matches(&u.hash, password),
            None => {
                let _ = hash_password(password, false);
                false
            }
        }
    }
}

fn denied(need: &Need) -> Error {
    let mut e = Error::new(
        ErrorCode::Denied,
        StatusCode::FORBIDDEN,
        "requested access to the resource is denied",
    );
    if let Some(s) = need.scope() {
        e = e.with_detail(access_detail(&s));
    }
    e
}

/// The `detail` of an auth error: the access asked for, as distribution reports it.
fn access_detail(scope: &str) -> Value {
    let mut it = scope.rsplitn(2, ':');
    let actions = it.next().unwrap_or("");
    let rest = it.next().unwrap_or("");
    let (typ, name) = rest.split_once(':').unwrap_or((rest, ""));
    json!([{"Type": typ, "Name": name, "Action": actions}])
}

fn decode_basic(cred: &str) -> Option<(String, String)> {
    let raw = STANDARD.decode(cred.as_bytes()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

// ---------------------------------------------------------------------------------------------
// Tokens

/// One entry of a token's `access` claim.
#[derive(Deserialize, serde::Serialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResourceActions {
    #[serde(rename = "type")]
    typ: String,
    name: String,
    actions: Vec<String>,
}

struct Claims {
    sub: String,
    access: Vec<ResourceActions>,
    external: bool,
}

#[derive(Deserialize)]
struct RawClaims {
    iss: Option<String>,
    #[serde(default)]
    sub: String,
    aud: Option<Value>,
    exp: Option<u64>,
    nbf: Option<u64>,
    #[serde(default)]
    access: Vec<ResourceActions>,
}

#[derive(Deserialize)]
struct JwtHeader {
    alg: String,
    kid: Option<String>,
}

fn hmac(secret: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes keys of any length")
}

fn refresh_audience(service: &str) -> String {
    format!("{service}#refresh")
}

impl AuthConfig {
    /// Signs claims as an HS256 JWT.
    fn sign(&self, claims: &Value) -> Option<String> {
        let secret = self.secret.as_ref()?;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let input = format!("{header}.{payload}");
        let mut mac = hmac(secret);
        mac.update(input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        Some(format!("{input}.{sig}"))
    }

    fn claims(
        &self,
        sub: &str,
        aud: &str,
        now: u64,
        ttl: u64,
        access: Option<&[ResourceActions]>,
    ) -> Value {
        let mut c = json!({
            "iss": self.issuer,
            "sub": sub,
            "aud": aud,
            "exp": now + ttl,
            "nbf": now,
            "iat": now,
            "jti": random_id(),
        });
        if let Some(a) = access {
            c["access"] = json!(a);
        }
        c
    }

    fn verify_access_token(&self, token: &str, now: u64) -> Result<Claims, &'static str> {
        self.verify(token, &self.service, now)
    }

    /// Verifies a JWT: signature (HS256 under our secret, or RS256/ES256/EdDSA under the
    /// external issuer's keys; nothing else, `none` least of all), issuer, audience, `exp`
    /// and `nbf`. Returns why it fails, for the challenge.
    fn verify(&self, token: &str, audience: &str, now: u64) -> Result<Claims, &'static str> {
        const BAD: &str = "malformed token";
        let mut it = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
            return Err(BAD);
        };
        let header: JwtHeader =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).map_err(|_| BAD)?)
                .map_err(|_| BAD)?;
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| BAD)?;
        let input = &token[..h.len() + 1 + p.len()];
        let (issuer, aud, external) = match header.alg.as_str() {
            "HS256" => {
                let secret = self.secret.as_ref().ok_or("token signature not accepted")?;
                let mut mac = hmac(secret);
                mac.update(input.as_bytes());
                mac.verify_slice(&sig)
                    .map_err(|_| "invalid token signature")?;
                (self.issuer.as_str(), audience, false)
            }
            "RS256" | "ES256" | "EdDSA" => {
                let ext = self
                    .external
                    .as_ref()
                    .ok_or("token signature not accepted")?;
                let ok = ext.keys.iter().any(|(kid, key)| {
                    if let (Some(want), Some(have)) = (&header.kid, kid)
                        && want != have
                    {
                        return false;
                    }
                    verify_signature(&header.alg, key, input.as_bytes(), &sig)
                });
                if !ok {
                    return Err("invalid token signature");
                }
                if audience != self.service {
                    // Refresh tokens are ours alone.
                    return Err("token signature not accepted");
                }
                (ext.issuer.as_str(), ext.audience.as_str(), true)
            }
            _ => return Err("token algorithm not accepted"),
        };
        let claims: RawClaims =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).map_err(|_| BAD)?)
                .map_err(|_| BAD)?;
        if claims.iss.as_deref() != Some(issuer) {
            return Err("token issuer not accepted");
        }
        let aud_ok = match &claims.aud {
            Some(Value::String(a)) => a == aud,
            Some(Value::Array(v)) => v.iter().any(|a| a.as_str() == Some(aud)),
            _ => false,
        };
        if !aud_ok {
            return Err("token audience not accepted");
        }
        match claims.exp {
            Some(exp) if now < exp.saturating_add(LEEWAY) => {}
            Some(_) => return Err("token expired"),
            None => return Err("token has no expiry"),
        }
        if let Some(nbf) = claims.nbf
            && nbf > now.saturating_add(LEEWAY)
        {
            return Err("token not valid yet");
        }
        Ok(Claims {
            // External subjects live in their issuer's namespace, apart from our users (upload
            // sessions are bound to the subject).
            sub: if external && !claims.sub.is_empty() {
                format!("{issuer}#{}", claims.sub)
            } else {
                claims.sub
            },
            access: claims.access,
            external,
        })
    }

    /// What `user` may have of the requested scopes: the intersection, per the token spec
    /// (asking for more is not an error; the token just grants less).
    fn grant(&self, user: Option<&str>, scopes: &[String]) -> Vec<ResourceActions> {
        let mut out: Vec<ResourceActions> = Vec::new();
        for scope in scopes {
            let Some((typ, name, actions)) = parse_scope(scope) else {
                continue;
            };
            let granted: Vec<String> = match typ.as_str() {
                "repository" => {
                    let have = self.repo_actions(user, &name);
                    let mut g = Vec::new();
                    for (a, bit) in [("pull", PULL), ("push", PUSH), ("delete", DELETE)] {
                        let asked = actions.iter().any(|x| x == a || x == "*");
                        if asked && have & bit != 0 {
                            g.push(a.to_owned());
                        }
                    }
                    g
                }
                "registry" if name == "catalog" && actions.iter().any(|a| a == "*") => {
                    if self.catalog_allowed(user) {
                        vec!["*".to_owned()]
                    } else {
                        Vec::new()
                    }
                }
                _ => Vec::new(),
            };
            if granted.is_empty() {
                continue;
            }
            match out.iter_mut().find(|r| r.typ == typ && r.name == name) {
                Some(r) => {
                    for a in granted {
                        if !r.actions.contains(&a) {
                            r.actions.push(a);
                        }
                    }
                }
                None => out.push(ResourceActions {
                    typ,
                    name,
                    actions: granted,
                }),
            }
        }
        out
    }

    /// `GET /token` (docker token spec) and `POST /token` (its OAuth2 form: `grant_type` of
    /// `password` or `refresh_token`). `form` is the POST body, already read.
    pub(crate) fn token_endpoint(
        &self,
        parts: &http::request::Parts,
        form: Option<&[u8]>,
        now: u64,
    ) -> Result<(StatusCode, Vec<u8>), Error> {
        if self.secret.is_none() {
            return Err(Error::not_found(
                ErrorCode::Unsupported,
                "this registry does not issue tokens: its tokens come from the external issuer",
            ));
        }
        let q = Query::parse(parts.uri.query().unwrap_or(""));
        let mut scopes: Vec<String> = Vec::new();
        let user: Option<String>;
        let mut refresh: Option<String> = None;
        let offline;
        let bad_credentials = || {
            Error::new(
                ErrorCode::Unauthorized,
                StatusCode::UNAUTHORIZED,
                "invalid username or password",
            )
        };
        match form {
            None => {
                for s in q.all("scope") {
                    scopes.extend(s.split(' ').filter(|s| !s.is_empty()).map(str::to_owned));
                }
                offline = q.get("offline_token") == Some("true");
                user = match header_str(&parts.headers, header::AUTHORIZATION) {
                    None => None,
                    Some(a) => {
                        let (scheme, cred) = a.split_once(' ').unwrap_or((a, ""));
                        if !scheme.eq_ignore_ascii_case("basic") {
                            return Err(bad_credentials());
                        }
                        let (u, p) = decode_basic(cred.trim()).ok_or_else(bad_credentials)?;
                        if !self.check_password(&u, &p) {
                            return Err(bad_credentials());
                        }
                        Some(u)
                    }
                };
            }
            Some(body) => {
                let f = Query::parse(&String::from_utf8_lossy(body));
                for s in f.all("scope") {
                    scopes.extend(s.split(' ').filter(|s| !s.is_empty()).map(str::to_owned));
                }
                offline = f.get("access_type") == Some("offline");
                user = match f.get("grant_type") {
                    Some("password") => {
                        let u = f.get("username").unwrap_or("");
                        let p = f.get("password").unwrap_or("");
                        if !self.check_password(u, p) {
                            return Err(bad_credentials());
                        }
                        Some(u.to_owned())
                    }
                    Some("refresh_token") => {
                        let t = f.get("refresh_token").unwrap_or("");
                        let claims = self
                            .verify(t, &refresh_audience(&self.service), now)
                            .map_err(|_| bad_credentials())?;
                        if !self.users.iter().any(|u| u.name == claims.sub) {
                            return Err(bad_credentials());
                        }
                        refresh = Some(t.to_owned());
                        Some(claims.sub)
                    }
                    _ => {
                        return Err(Error::bad_request(
                            ErrorCode::Unsupported,
                            "grant_type must be password or refresh_token",
                        ));
                    }
                };
            }
        }
        let access = self.grant(user.as_deref(), &scopes);
        let sub = user.as_deref().unwrap_or("");
        let token = self
            .sign(&self.claims(sub, &self.service, now, self.token_ttl, Some(&access)))
            .expect("a secret is set");
        let mut body = json!({
            "token": token,
            "access_token": token,
            "expires_in": self.token_ttl,
            "issued_at": rfc3339(now),
        });
        if form.is_some() {
            body["scope"] = json!(
                access
                    .iter()
                    .map(|r| format!("{}:{}:{}", r.typ, r.name, r.actions.join(",")))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        if let Some(u) = &user {
            if refresh.is_none() && offline {
                refresh = self.sign(&self.claims(
                    u,
                    &refresh_audience(&self.service),
                    now,
                    self.refresh_ttl,
                    None,
                ));
            }
            if let Some(r) = refresh {
                body["refresh_token"] = json!(r);
            }
        }
        Ok((StatusCode::OK, body.to_string().into_bytes()))
    }
}

fn verify_signature(alg: &str, key: &PublicKey, msg: &[u8], sig: &[u8]) -> bool {
    use signature_verify::Verifier;
    match (alg, key) {
        ("RS256", PublicKey::Rsa(k)) => {
            rsa::pkcs1v15::Signature::try_from(sig).is_ok_and(|s| k.verify(msg, &s).is_ok())
        }
        ("ES256", PublicKey::P256(k)) => {
            p256::ecdsa::Signature::from_slice(sig).is_ok_and(|s| k.verify(msg, &s).is_ok())
        }
        ("EdDSA", PublicKey::Ed25519(k)) => ed25519_dalek::Signature::from_slice(sig)
            .is_ok_and(|s| k.verify_strict(msg, &s).is_ok()),
        _ => false,
    }
}

mod signature_verify {
    pub use rsa::signature::Verifier;
}

/// `type:name:actions` (the type may carry a `(class)`; the name may not hold `:` but a
/// registry host in it might, so the actions are after the last colon).
fn parse_scope(s: &str) -> Option<(String, String, Vec<String>)> {
    let (rest, actions) = s.rsplit_once(':')?;
    let (typ, name) = rest.split_once(':')?;
    let typ = typ.split('(').next().unwrap_or(typ);
    if name.is_empty() {
        return None;
    }
    Some((
        typ.to_owned(),
        name.to_owned(),
        actions.split(',').map(str::to_owned).collect(),
    ))
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    // Without randomness the jti is still unique enough with the time in it; never fail.
    let _ = getrandom::fill(&mut b);
    crate::digest::to_hex(&b)
}

/// Seconds since the epoch as RFC 3339 UTC.
pub(crate) fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Shared, cheaply cloned access configuration.
pub type SharedAuth = Arc<AuthConfig>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("team-a/*", "team-a/app"));
        assert!(!glob("team-a/*", "team-a/app/sub"));
        assert!(glob("team-a/**", "team-a/app/sub"));
        assert!(glob("**", "x/y/z"));
        assert!(glob("public", "public"));
        assert!(!glob("public", "public2"));
        assert!(glob("*/base", "library/base"));
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn scopes() {
        assert_eq!(
            parse_scope("repository(plugin):a/b:pull,push"),
            Some((
                "repository".into(),
                "a/b".into(),
                vec!["pull".into(), "push".into()]
            ))
        );
        assert_eq!(parse_scope("registry:catalog:*").unwrap().1, "catalog");
        assert_eq!(parse_scope("nonsense"), None);
    }
}
