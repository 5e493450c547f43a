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

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sha2::Sha256;

mod config;
mod rules;
mod token;

pub use config::hash_password;
pub(crate) use rules::{Caller, Need, glob};
pub(crate) use token::ResourceActions;

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
    /// Whether `X-Forwarded-Proto` (`http` or `https` only) picks the scheme of a realm derived
    /// from the request. Off by default: only a proxy in front of dockside should set it.
    pub trust_forwarded_proto: bool,
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
    crate::clock::now_secs()
}

/// Shared, cheaply cloned access configuration.
pub type SharedAuth = Arc<AuthConfig>;

/// One password check, ready to run: `true` when the password matches. It costs one password
/// hash (argon2id: ~19 MiB and tens of milliseconds; bcrypt: hundreds of milliseconds), also for
/// an unknown user.
pub type PasswordCheck = Box<dyn FnOnce() -> bool + Send>;

/// A password check that was not run because too many are running or waiting; the request gets
/// 429 `TOOMANYREQUESTS` with `Retry-After`.
#[derive(Debug, Clone, Copy)]
pub struct Busy {
    pub retry_after_secs: u64,
}

/// Where and when password checks run ([`crate::Config::password_checks`]). Without one, the
/// core runs each check inline, on the task serving the request (the wasm components do: one
/// request per instance). The native server supplies one that runs checks on its blocking pool,
/// a bounded number at a time, so a burst of Basic credentials neither stalls the runtime nor
/// holds a hash's memory per request. It decides only where a check runs and whether it runs
/// now, later or not at all; the check itself (and its cost for unknown users) is unchanged.
pub trait PasswordChecks: Send + Sync + std::fmt::Debug {
    fn run(&self, check: PasswordCheck)
    -> Pin<Box<dyn Future<Output = Result<bool, Busy>> + Send>>;
}

#[cfg(test)]
mod tests {
    use super::rules::glob;
    use super::token::parse_scope;
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

    fn cheap_argon2(password: &str, m_kib: u32) -> String {
        use argon2::password_hash::{PasswordHasher, phc::SaltString};
        let params = argon2::Params::new(m_kib, 1, 1, None).unwrap();
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::from_b64("c29tZXNhbHRzb21lc2FsdA").unwrap();
        a.hash_password_with_salt(password.as_bytes(), salt.as_bytes())
            .unwrap()
            .to_string()
    }

    /// Every password check costs one verification per hash scheme in use, whether the user
    /// exists, has an argon2 or a bcrypt hash, or is given the right password: the time of an
    /// answer tells nothing about which names are users.
    #[test]
    fn password_checks_cost_the_same_for_every_user() {
        let toml = format!(
            "[auth]\nservice = \"s\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n\
             [[auth.users]]\nname = \"argon\"\npassword_hash = \"{}\"\n\
             [[auth.users]]\nname = \"argon-big\"\npassword_hash = \"{}\"\n\
             [[auth.users]]\nname = \"crypt\"\npassword_hash = \"{}\"\n\
             [[auth.users]]\nname = \"crypt2\"\npassword_hash = \"{}\"\n",
            cheap_argon2("a-pw", 64),
            cheap_argon2("b-pw", 128),
            bcrypt::hash("c-pw", 4).unwrap(),
            bcrypt::hash("d-pw", 4).unwrap(),
        );
        let auth = AuthConfig::from_toml(&toml).unwrap().unwrap();
        let cost = |user: &str, pw: &str| {
            config::VERIFICATIONS.with(|c| c.set(0));
            let ok = auth.check_password(user, pw);
            (ok, config::VERIFICATIONS.with(|c| c.get()))
        };
        // Three schemes: argon2 m=64, argon2 m=128, bcrypt cost 4.
        assert_eq!(cost("argon", "a-pw"), (true, 3));
        assert_eq!(cost("argon", "wrong"), (false, 3));
        assert_eq!(cost("argon-big", "b-pw"), (true, 3));
        assert_eq!(cost("crypt", "c-pw"), (true, 3));
        assert_eq!(cost("crypt2", "wrong"), (false, 3));
        assert_eq!(cost("nobody", "a-pw"), (false, 3));
        // Another user's password never works.
        assert_eq!(cost("crypt", "d-pw"), (false, 3));
    }

    /// bcrypt reads 72 bytes of a password: longer ones are refused when hashing, and never
    /// match when checking (a plain bcrypt check accepts any suffix after byte 72).
    #[test]
    fn long_bcrypt_passwords_are_never_truncated() {
        let long = format!("{}secret", "x".repeat(72));
        assert!(hash_password(&long, true).is_err());
        assert!(hash_password(&"x".repeat(72), true).is_err());
        assert!(hash_password(&"x".repeat(71), true).is_ok());
        assert!(hash_password(&long, false).is_ok());
        // A hash made elsewhere by a truncating bcrypt (htpasswd, bcrypt::hash).
        let truncated = bcrypt::hash(&long, 4).unwrap();
        let toml = format!(
            "[auth]\nservice = \"s\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n[[auth.users]]\nname = \"ci\"\npassword_hash = \"{truncated}\"\n"
        );
        let auth = AuthConfig::from_toml(&toml).unwrap().unwrap();
        assert!(!auth.check_password("ci", &format!("{}guess", "x".repeat(72))));
        assert!(!auth.check_password("ci", &long));
        let short = bcrypt::hash("short", 4).unwrap();
        let toml = format!(
            "[auth]\nservice = \"s\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n[[auth.users]]\nname = \"ci\"\npassword_hash = \"{short}\"\n"
        );
        let auth = AuthConfig::from_toml(&toml).unwrap().unwrap();
        assert!(auth.check_password("ci", "short"));
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
