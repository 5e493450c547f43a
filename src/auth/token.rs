//! Tokens: issuing (HS256) and verifying (HS256, external RS256/ES256/EdDSA) JWTs, the
//! `/token` endpoint.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use http::{StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;

use super::rules::decode_basic;
use super::*;
use crate::error::{Error, ErrorCode};
use crate::host::KeyValue;
use crate::request::{Query, header_str};
use crate::throttle::LoginThrottle;

// ---------------------------------------------------------------------------------------------
// Tokens

/// One entry of a token's `access` claim.
#[derive(Deserialize, serde::Serialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResourceActions {
    #[serde(rename = "type")]
    pub(crate) typ: String,
    pub(crate) name: String,
    pub(crate) actions: Vec<String>,
}

pub(super) struct Claims {
    pub(super) sub: String,
    pub(super) access: Vec<ResourceActions>,
    pub(super) external: bool,
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

    pub(super) fn verify_access_token(
        &self,
        token: &str,
        now: u64,
    ) -> Result<Claims, &'static str> {
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
    /// Passwords are checked through `checks` (inline without it).
    pub(crate) async fn token_endpoint<K: KeyValue>(
        self: &Arc<Self>,
        parts: &http::request::Parts,
        form: Option<&[u8]>,
        now: u64,
        checks: Option<&dyn PasswordChecks>,
        throttle: &LoginThrottle<'_, K>,
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
                        if !self.verify_password(checks, throttle, &u, &p).await? {
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
                        if !self.verify_password(checks, throttle, u, p).await? {
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
pub(super) fn parse_scope(s: &str) -> Option<(String, String, Vec<String>)> {
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
