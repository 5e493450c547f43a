//! Rules, and authorizing a request against them and the credentials it carries.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};

use super::config::{hash_scheme, password_matches};
use super::*;
use crate::error::{Error, ErrorCode};
use crate::host::KeyValue;
use crate::request::header_str;
use crate::throttle::LoginThrottle;

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
    pub(super) fn repo_actions(&self, user: Option<&str>, name: &str) -> u8 {
        self.rules
            .iter()
            .filter(|r| Self::applies(r, user))
            .filter(|r| r.repositories.iter().any(|p| glob(p, name)))
            .fold(0, |acc, r| acc | r.actions)
    }

    pub(super) fn catalog_allowed(&self, user: Option<&str>) -> bool {
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
    /// The realm advertised in challenges: the configured one, else built from the request's
    /// host, taken only when it is a plain `host[:port]` (a `Host` is client input and lands in
    /// a header parameter clients follow with credentials).
    fn realm(&self, h: &HeaderMap, uri: &http::Uri) -> String {
        if let Some(r) = &self.realm {
            return r.clone();
        }
        let host = uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| header_str(h, header::HOST))
            .filter(|h| plain_host(h))
            .unwrap_or("localhost");
        let forwarded = self
            .trust_forwarded_proto
            .then(|| header_str(h, "x-forwarded-proto"))
            .flatten()
            .map(str::to_ascii_lowercase)
            .filter(|p| p == "http" || p == "https");
        let proto = forwarded
            .or_else(|| uri.scheme_str().map(str::to_owned))
            .filter(|p| p == "http" || p == "https")
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
            "Bearer realm={},service={}",
            quoted(&self.realm(&parts.headers, &parts.uri)),
            quoted(&self.service)
        );
        if let Some(s) = need.scope() {
            c.push_str(&format!(",scope={}", quoted(&s)));
        }
        if let Some(e) = error {
            c.push_str(&format!(",error={}", quoted(e)));
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
    /// Nothing here reads the repositories: the answer is the same whether the repository
    /// exists or not. Only the failed-login counts of `throttle` are read (and written).
    ///
    /// Basic credentials are checked through `checks` (inline without it): a busy check queue
    /// answers 429 `TOOMANYREQUESTS`, and so does `throttle` after too many failures.
    pub(crate) async fn authorize<K: KeyValue>(
        self: &Arc<Self>,
        parts: &http::request::Parts,
        need: &Need,
        now: u64,
        checks: Option<&dyn PasswordChecks>,
        throttle: &LoginThrottle<'_, K>,
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
            if !self
                .verify_password(checks, throttle, &user, &password)
                .await?
            {
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

    /// [`Self::check_password`], run where `checks` says (inline without it), unless
    /// `throttle` refuses it, and counted by `throttle`. `Err`: 429, when too many logins
    /// failed or too many checks are running or waiting.
    pub(super) async fn verify_password<K: KeyValue>(
        self: &Arc<Self>,
        checks: Option<&dyn PasswordChecks>,
        throttle: &LoginThrottle<'_, K>,
        user: &str,
        password: &str,
    ) -> Result<bool, Error> {
        let admitted = throttle.admit(user).await?;
        let ok = self.run_check(checks, user, password).await?;
        throttle.record(user, ok, admitted).await?;
        Ok(ok)
    }

    async fn run_check(
        self: &Arc<Self>,
        checks: Option<&dyn PasswordChecks>,
        user: &str,
        password: &str,
    ) -> Result<bool, Error> {
        let Some(checks) = checks else {
            return Ok(self.check_password(user, password));
        };
        let (me, user, password) = (Arc::clone(self), user.to_owned(), password.to_owned());
        checks
            .run(Box::new(move || me.check_password(&user, &password)))
            .await
            .map_err(|busy| {
                Error::new(
                    ErrorCode::TooManyRequests,
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many password checks in progress: retry later, or use a token",
                )
                .with_header(header::RETRY_AFTER, busy.retry_after_secs.to_string())
            })
    }

    /// Checks a user's password. Every check costs the same, whoever the user and whether they
    /// exist: one verification per distinct hash scheme among the configured users (against
    /// the user's own hash for theirs, and against another user's hash of each other scheme,
    /// result discarded). Otherwise the time of a wrong password would tell which names are
    /// users, and which of them have bcrypt (slow) or argon2 hashes.
    pub(super) fn check_password(&self, user: &str, password: &str) -> bool {
        let target = self.users.iter().find(|u| u.name == user);
        let mut matched = false;
        let mut seen: Vec<&str> = Vec::new();
        for u in &self.users {
            let scheme = hash_scheme(&u.hash);
            if seen.contains(&scheme) {
                continue;
            }
            seen.push(scheme);
            match target {
                Some(t) if hash_scheme(&t.hash) == scheme => {
                    matched = password_matches(&t.hash, password);
                }
                // A stand-in of the same cost; its answer means nothing.
                _ => {
                    let _ = password_matches(&u.hash, password);
                }
            }
        }
        matched && target.is_some()
    }
}

/// Whether `h` is a bare `host[:port]`: a DNS name or IPv4 address, or a bracketed IPv6
/// address, and an optional numeric port. No userinfo, path, quote or space.
pub(super) fn plain_host(h: &str) -> bool {
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.is_empty()
            || !v6
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        match after {
            "" => ("x", None),
            p => match p.strip_prefix(':') {
                Some(p) => ("x", Some(p)),
                None => return false,
            },
        }
    } else {
        match h.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (h, None),
        }
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

/// An RFC 9110 quoted-string: `"` and `\` escaped, control characters dropped.
pub(super) fn quoted(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
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

pub(super) fn decode_basic(cred: &str) -> Option<(String, String)> {
    let raw = STANDARD.decode(cred.as_bytes()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}
