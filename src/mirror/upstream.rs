//! Requests to an upstream registry: the Bearer challenge flow (distribution's token
//! authentication: a 401 with `WWW-Authenticate: Bearer realm=...,service=...,scope=...`, a
//! token from the realm, the request again), tokens cached in the key-value store until they
//! expire, and redirects followed (registries send blob GETs to object storage).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::host::KeyValue;
#[cfg(target_arch = "wasm32")]
use crate::http_client::HttpClient;
use crate::http_client::OutBody;
use crate::layout;
use crate::mirror::Upstream;

// Natively the registry's futures run on tokio's threads, so what the mirror holds across an
// await must be `Send`; wasm has no threads and its clients are not `Send`.
#[cfg(not(target_arch = "wasm32"))]
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
#[cfg(target_arch = "wasm32")]
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// An upstream response body.
#[cfg(not(target_arch = "wasm32"))]
pub type UpBody = Pin<Box<dyn http_body::Body<Data = Bytes, Error = StoreError> + Send>>;
#[cfg(target_arch = "wasm32")]
pub type UpBody = Pin<Box<dyn http_body::Body<Data = Bytes, Error = StoreError>>>;

/// [`crate::HttpClient`] behind a trait object, so the registry's type does not grow a parameter.
#[cfg(not(target_arch = "wasm32"))]
pub trait UpstreamClient: Send + Sync {
    fn send_boxed(
        &self,
        req: Request<OutBody>,
    ) -> BoxFuture<'_, Result<Response<UpBody>, StoreError>>;
    fn sleep_boxed(&self, d: Duration) -> BoxFuture<'_, ()>;
}

#[cfg(target_arch = "wasm32")]
pub trait UpstreamClient {
    fn send_boxed(
        &self,
        req: Request<OutBody>,
    ) -> BoxFuture<'_, Result<Response<UpBody>, StoreError>>;
    fn sleep_boxed(&self, d: Duration) -> BoxFuture<'_, ()>;
}

// On wasm every client qualifies; natively only those whose futures are `Send`, which a
// blanket impl cannot state for `impl Future` returns, so the native client opts in
// (`adapters/hyper_client.rs`).
#[cfg(target_arch = "wasm32")]
impl<C> UpstreamClient for C
where
    C: HttpClient,
    C::Body: 'static,
{
    fn send_boxed(
        &self,
        req: Request<OutBody>,
    ) -> BoxFuture<'_, Result<Response<UpBody>, StoreError>> {
        Box::pin(async move {
            let r = self.send(req).await?;
            Ok(r.map(|b| Box::pin(b) as UpBody))
        })
    }
    fn sleep_boxed(&self, d: Duration) -> BoxFuture<'_, ()> {
        Box::pin(self.sleep(d))
    }
}

/// A token as kept in the key-value store.
#[derive(Serialize, Deserialize)]
struct CachedToken {
    token: String,
    expires: u64,
}

/// The parameters of a `WWW-Authenticate` challenge (RFC 9110 §11.6.1): scheme and
/// `key="value"` pairs, values possibly holding commas.
pub(crate) fn parse_challenge(v: &str) -> Option<(String, Vec<(String, String)>)> {
    let v = v.trim();
    let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
    let mut params = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (val, rest) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (q[..end].to_owned(), &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.push((k, val));
        s = rest.trim_start().trim_start_matches(',').trim_start();
    }
    Some((scheme.to_ascii_lowercase(), params))
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn unavailable(up: &Upstream, what: impl std::fmt::Display) -> StoreError {
    StoreError::unavailable(format!("upstream {}: {what}", up.url))
}

/// Reads a small body whole (a token answer, a manifest), at most `limit` bytes.
pub(crate) async fn read_small(body: UpBody, limit: u64) -> Result<Bytes, StoreError> {
    let v = crate::body::read_to_vec(body, limit)
        .await
        .map_err(|e| match e {
            crate::body::ReadError::TooLarge { limit } => {
                StoreError::new(format!("upstream answer larger than {limit} bytes"))
            }
            crate::body::ReadError::Body(e) => StoreError::unavailable(e),
        })?;
    Ok(Bytes::from(v))
}

/// Sends `method path` (path and query under the upstream's URL) with `accept`, answering the
/// upstream's challenges; `scope` is the token scope it is expected to need
/// (`repository:<name>:pull`). Follows up to five redirects (without credentials to another
/// host). The response may be any status: the caller judges it.
pub(crate) async fn send<K: KeyValue>(
    kv: &K,
    client: &dyn UpstreamClient,
    up: &Upstream,
    method: Method,
    path: &str,
    accept: Option<&str>,
    scope: &str,
) -> Result<Response<UpBody>, StoreError> {
    // Per identity: an anonymous upstream entry must never use a token got with credentials.
    let who = up.username.as_deref().unwrap_or("");
    let token_key = layout::mirror_token(&up.url, who, scope);
    let now = crate::auth::now_secs();
    // A fixed token, else a cached one still valid for a while.
    let mut auth = match &up.token {
        Some(t) => Some(format!("Bearer {t}")),
        None => match kv.get(&token_key).await? {
            Some(v) => serde_json::from_slice::<CachedToken>(&v)
                .ok()
                .filter(|t| t.expires > now + 5)
                .map(|t| format!("Bearer {}", t.token)),
            None => None,
        },
    };
    let mut url = format!("{}{path}", up.url);
    let mut challenged = false;
    let mut hops = 0;
    loop {
        let mut req = Request::builder().method(method.clone()).uri(&url);
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        // Credentials go only to the upstream itself, never to where it redirects.
        let same_host = url.starts_with(&up.url);
        if same_host && let Some(a) = &auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let req = req
            .body(OutBody::empty())
            .map_err(|e| unavailable(up, format!("bad request URL {url:?}: {e}")))?;
        let resp = client.send_boxed(req).await?;
        let status = resp.status();
        if status.is_redirection() && hops < 5 {
            let Some(loc) = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
            else {
                return Ok(resp);
            };
            url = if loc.starts_with("http://") || loc.starts_with("https://") {
                loc.to_owned()
            } else if loc.starts_with('/') {
                format!("{}{loc}", origin(&url))
            } else {
                return Err(unavailable(up, format!("unusable redirect to {loc:?}")));
            };
            hops += 1;
            continue;
        }
        if status != StatusCode::UNAUTHORIZED || challenged || !same_host {
            return Ok(resp);
        }
        challenged = true;
        let Some((scheme, params)) = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge)
        else {
            return Ok(resp);
        };
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        match scheme.as_str() {
            "basic" => match (&up.username, &up.password) {
                (Some(u), Some(p)) => auth = Some(basic(u, p)),
                _ => return Ok(resp),
            },
            "bearer" => {
                let Some(realm) = param("realm") else {
                    return Ok(resp);
                };
                let scope = param("scope").unwrap_or(scope);
                let token = fetch_token(client, up, realm, param("service"), scope).await?;
                let Some((token, expires_in)) = token else {
                    return Ok(resp);
                };
                let cached = CachedToken {
                    token: token.clone(),
                    expires: crate::auth::now_secs() + expires_in,
                };
                kv.set(
                    &token_key,
                    &serde_json::to_vec(&cached).expect("serializes"),
                )
                .await?;
                auth = Some(format!("Bearer {token}"));
            }
            _ => return Ok(resp),
        }
    }
}

fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    match url[after..].find('/') {
        Some(i) => &url[..after + i],
        None => url,
    }
}

/// Asks the token service for a token for `scope`, with the upstream's credentials if any.
/// `None` when it refuses (the caller passes the upstream's 401 on).
async fn fetch_token(
    client: &dyn UpstreamClient,
    up: &Upstream,
    realm: &str,
    service: Option<&str>,
    scope: &str,
) -> Result<Option<(String, u64)>, StoreError> {
    let enc = crate::request::query_escape;
    let sep = if realm.contains('?') { '&' } else { '?' };
    let mut url = format!("{realm}{sep}scope={}", enc(scope));
    if let Some(s) = service {
        url.push_str(&format!("&service={}", enc(s)));
    }
    let mut req = Request::get(&url);
    if let (Some(u), Some(p)) = (&up.username, &up.password) {
        req = req.header(header::AUTHORIZATION, basic(u, p));
    }
    let req = req
        .body(OutBody::empty())
        .map_err(|e| unavailable(up, format!("bad token realm {realm:?}: {e}")))?;
    let resp = client.send_boxed(req).await?;
    if !resp.status().is_success() {
        tracing::warn!(upstream = %up.url, status = %resp.status(), "upstream token service refused");
        return Ok(None);
    }
    let body = read_small(resp.into_body(), 1024 * 1024).await?;
    #[derive(Deserialize)]
    struct Answer {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let a: Answer = serde_json::from_slice(&body)
        .map_err(|e| unavailable(up, format!("token answer is not JSON: {e}")))?;
    let Some(token) = a.token.or(a.access_token) else {
        return Err(unavailable(up, "token answer without a token"));
    };
    // distribution's token spec: 60 s when the service does not say.
    Ok(Some((token, a.expires_in.unwrap_or(60))))
}

/// The header value, if it is text.
pub(crate) fn header_of<'a>(resp: &'a Response<UpBody>, name: &str) -> Option<&'a str> {
    resp.headers()
        .get(name)
        .and_then(|v: &HeaderValue| v.to_str().ok())
}
