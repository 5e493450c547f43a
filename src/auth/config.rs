//! The `[auth]` configuration: parsing and checking it, password hashes.

use serde::Deserialize;

use super::*;

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
    trust_forwarded_proto: Option<bool>,
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
    ///   `DOCKSIDE_AUTH_ISSUER`, `DOCKSIDE_AUTH_TOKEN_TTL` and
    ///   `DOCKSIDE_AUTH_TRUST_FORWARDED_PROTO` override its fields.
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
        if let Some(v) = get("DOCKSIDE_AUTH_TRUST_FORWARDED_PROTO") {
            raw.trust_forwarded_proto = Some(match v.trim() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                _ => {
                    return Err(format!(
                        "DOCKSIDE_AUTH_TRUST_FORWARDED_PROTO must be true or false, not {v:?}"
                    ));
                }
            });
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
            trust_forwarded_proto: raw.trust_forwarded_proto.unwrap_or(false),
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
        // bcrypt reads at most 72 bytes (71 and a NUL): refuse rather than drop the rest.
        if password.len() > BCRYPT_MAX_PASSWORD {
            return Err(format!(
                "bcrypt uses only the first {BCRYPT_MAX_PASSWORD} bytes of a password and this \
                 one has {}: use argon2id (the default) or a shorter password",
                password.len()
            ));
        }
        bcrypt::non_truncating_hash(password, 12).map_err(|e| e.to_string())
    } else {
        use argon2::password_hash::PasswordHasher;
        argon2::Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    }
}

/// Longest password bcrypt reads in full, in bytes (72 with its terminating NUL; the `bcrypt`
/// crate's non-truncating functions refuse 72 and more).
pub const BCRYPT_MAX_PASSWORD: usize = 71;

/// What the cost of checking a password against `hash` depends on: the algorithm and its
/// parameters (argon2's variant, version, memory, passes, lanes; bcrypt's cost), not the salt
/// or the hash. Checks against two hashes of one scheme take the same time.
pub(super) fn hash_scheme(hash: &str) -> &str {
    if hash.starts_with("$argon2") {
        // $argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>: all but the last two fields.
        hash.rsplitn(3, '$').nth(2).unwrap_or(hash)
    } else {
        // $2b$12$<salt+hash>: the cost (the variants 2a/2b/2y cost the same).
        hash.get(4..6).unwrap_or(hash)
    }
}

/// Checks a password against an argon2 or bcrypt hash (constant time in the crates).
pub(super) fn password_matches(hash: &str, password: &str) -> bool {
    #[cfg(test)]
    VERIFICATIONS.with(|c| c.set(c.get() + 1));
    if hash.starts_with("$argon2") {
        use argon2::password_hash::PasswordVerifier;
        match argon2::password_hash::phc::PasswordHash::new(hash) {
            Ok(h) => argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok(),
            Err(_) => false,
        }
    } else {
        // A password longer than bcrypt reads never matches: with plain `verify`, anything
        // sharing the first 72 bytes would.
        bcrypt::non_truncating_verify(password, hash).unwrap_or(false)
    }
}

#[cfg(test)]
thread_local! {
    /// Password verifications run on this thread (tests count them: every check must cost the
    /// same number, whoever the user).
    pub(super) static VERIFICATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}
