//! The registry: request routing, configuration, and the response helpers shared by the API
//! areas (`blobs`, `uploads`, `manifests`, `lists`).

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};

use crate::auth::{AuthConfig, Caller, Need, PasswordChecks};
use crate::body::{Body, ReadError, read_to_vec};
use crate::error::{Error, ErrorCode};
use crate::host::{BlobStore, KeyValue};
use crate::layout;
use crate::names::RepoName;
use crate::observe::{AuthFailure, Outcome, RouteClass};
use crate::request::{Query, percent_decode};
use crate::throttle::{LoginLimits, LoginThrottle};

/// What a registry allows and advertises. `Config::default()` suits a local registry; edge
/// deployments lower the size limits to what their host accepts.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest manifest accepted, in bytes; larger pushes get 413. The spec asks registries to
    /// accept at least 4 MiB.
    pub max_manifest_bytes: u64,
    /// Largest blob accepted, in bytes; an upload that grows past it gets 413.
    pub max_blob_bytes: u64,
    /// Largest request body accepted by one PATCH (or upload-closing PUT or single POST), if
    /// bounded. Advertised as `OCI-Chunk-Max-Length`. Edge hosts cap request bodies.
    pub max_chunk_bytes: Option<u64>,
    /// Advertised as `OCI-Chunk-Min-Length` when an upload starts, so clients send chunks at
    /// least this big (except the last).
    pub chunk_min_length: Option<u64>,
    /// Whether manifests and blobs may be deleted (otherwise 405 `UNSUPPORTED`).
    pub delete_enabled: bool,
    /// Whether tags may be deleted on their own (otherwise 400 `UNSUPPORTED`).
    pub tag_delete_enabled: bool,
    /// Longest repository name accepted.
    pub max_name_length: usize,
    /// Most entries in one page of the tags list or the catalog when the client asks for `n`
    /// (a larger `n` gets this many and a `Link` header), and in one page of the referrers
    /// list. Without `n`, the tags list and the catalog come whole (the spec's "whole list"),
    /// from one listing of the store.
    pub page_size: usize,
    /// How much of a refused request's body is read (and dropped) so the client can read the
    /// error before the connection closes. A body known to be longer is not read at all, and
    /// neither is one the client holds back for `100 Continue`. Adapters that drain refused
    /// bodies themselves, after answering (the native server), set 0.
    pub drain_limit: u64,
    /// Access control (`[auth]`); `None`, the default, lets everyone do everything.
    pub auth: Option<Arc<AuthConfig>>,
    /// Blob GETs answer `307` to a presigned URL of the blob store, valid this long, when the
    /// store can make one (S3): the bytes of a pull then never pass through dockside. `None`
    /// (the default) serves them.
    pub blob_redirect: Option<std::time::Duration>,
    /// With `blob_redirect`, only answers of at least this many bytes (the blob, or the range
    /// asked for) are redirected; shorter ones are served. For platforms that cap response
    /// sizes (AWS Lambda): what fits is served, the rest redirected. 0, the default: all.
    pub blob_redirect_min_bytes: u64,
    /// Where password checks (Basic credentials, `/token` logins) run; `None`, the default,
    /// runs them inline.
    pub password_checks: Option<Arc<dyn PasswordChecks>>,
    /// Limits on failed logins (Basic credentials, `/token`), counted in the key-value store
    /// per user name, client address and both (`crate::throttle`).
    pub login_limits: LoginLimits,
    /// Whether the client address is the last entry of `X-Forwarded-For` (what a proxy in
    /// front appended) rather than the adapter's [`crate::ClientAddr`]. Only behind a proxy
    /// that sets it: otherwise clients choose their own address.
    pub trust_forwarded_for: bool,
    /// Most upload sessions open at once in the whole registry; 0: unlimited.
    pub max_uploads: u64,
    /// Most upload sessions open at once in one repository; 0: unlimited.
    pub max_uploads_per_repository: u64,
    /// Seconds after which an upload session is stale (the native server purges it then) and
    /// stops counting towards the limits above; 0: never stale (sessions then count for a
    /// day).
    pub upload_expiry_secs: u64,
    /// A pull-through mirror of other registries (`crate::mirror`); `None`, the default: none.
    pub mirror: Option<Arc<crate::mirror::Mirror>>,
    /// Garbage collection: grace period, retention rules, step size (`crate::gc`).
    pub gc: crate::gc::GcConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_manifest_bytes: 4 * 1024 * 1024,
            max_blob_bytes: 64 * 1024 * 1024 * 1024,
            max_chunk_bytes: None,
            chunk_min_length: None,
            delete_enabled: true,
            tag_delete_enabled: true,
            max_name_length: 255,
            page_size: 1000,
            drain_limit: 8 * 1024 * 1024,
            auth: None,
            blob_redirect: None,
            mirror: None,
            blob_redirect_min_bytes: 0,
            password_checks: None,
            login_limits: LoginLimits::default(),
            trust_forwarded_for: false,
            max_uploads: 1000,
            max_uploads_per_repository: 100,
            upload_expiry_secs: 24 * 3600,
            gc: crate::gc::GcConfig::default(),
        }
    }
}

impl Config {
    /// The configuration from `DOCKSIDE_*` settings, looked up with `get` (environment
    /// variables, Spin variables...): `DOCKSIDE_MAX_MANIFEST_BYTES`, `DOCKSIDE_MAX_BLOB_BYTES`,
    /// `DOCKSIDE_MAX_CHUNK_BYTES`, `DOCKSIDE_CHUNK_MIN_LENGTH`, `DOCKSIDE_NO_DELETE`,
    /// `DOCKSIDE_NO_TAG_DELETE`, `DOCKSIDE_BLOB_REDIRECT` (seconds a redirect stays valid; 0
    /// or unset: off), `DOCKSIDE_BLOB_REDIRECT_MIN_BYTES` (shorter answers are served), the failed-login limits `DOCKSIDE_LOGIN_WINDOW_SECS`,
    /// `DOCKSIDE_LOGIN_FAILURES_PER_USER_ADDRESS`, `DOCKSIDE_LOGIN_FAILURES_PER_USER`,
    /// `DOCKSIDE_LOGIN_FAILURES_PER_ADDRESS` and `DOCKSIDE_TRUST_FORWARDED_FOR`, the upload
    /// limits `DOCKSIDE_MAX_UPLOADS`, `DOCKSIDE_MAX_UPLOADS_PER_REPOSITORY` and
    /// `DOCKSIDE_UPLOAD_EXPIRY_SECS`, and access control from `DOCKSIDE_AUTH_CONFIG` (a TOML
    /// document) and the overrides of [`AuthConfig::from_settings`]. Unset means the default.
    ///
    /// ```
    /// let settings = [("DOCKSIDE_MAX_CHUNK_BYTES", "104857600"), ("DOCKSIDE_NO_DELETE", "1")];
    /// let get = |k: &str| settings.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
    /// let config = dockside::Config::from_settings(get).unwrap();
    /// assert_eq!(config.max_chunk_bytes, Some(100 * 1024 * 1024));
    /// assert!(!config.delete_enabled);
    /// // A malformed value is an error naming the setting, never silently ignored.
    /// let bad = |k: &str| (k == "DOCKSIDE_MAX_BLOB_BYTES").then(|| "lots".to_owned());
    /// assert!(dockside::Config::from_settings(bad).unwrap_err().contains("DOCKSIDE_MAX_BLOB_BYTES"));
    /// ```
    pub fn from_settings(
        get: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<Self, String> {
        let num = |name: &str| -> std::result::Result<Option<u64>, String> {
            match get(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("{name} must be a whole number, not {v:?}")),
            }
        };
        let flag = |name: &str| -> std::result::Result<bool, String> {
            match get(name).as_deref().map(str::trim) {
                None | Some("") | Some("0") | Some("false") => Ok(false),
                Some("1") | Some("true") => Ok(true),
                Some(v) => Err(format!("{name} must be true or false, not {v:?}")),
            }
        };
        let d = Config::default();
        let l = &d.login_limits;
        Ok(Config {
            login_limits: LoginLimits {
                window_secs: num("DOCKSIDE_LOGIN_WINDOW_SECS")?.unwrap_or(l.window_secs),
                per_user_address: num("DOCKSIDE_LOGIN_FAILURES_PER_USER_ADDRESS")?
                    .unwrap_or(l.per_user_address),
                per_user: num("DOCKSIDE_LOGIN_FAILURES_PER_USER")?.unwrap_or(l.per_user),
                per_address: num("DOCKSIDE_LOGIN_FAILURES_PER_ADDRESS")?.unwrap_or(l.per_address),
            },
            trust_forwarded_for: flag("DOCKSIDE_TRUST_FORWARDED_FOR")?,
            max_uploads: num("DOCKSIDE_MAX_UPLOADS")?.unwrap_or(d.max_uploads),
            max_uploads_per_repository: num("DOCKSIDE_MAX_UPLOADS_PER_REPOSITORY")?
                .unwrap_or(d.max_uploads_per_repository),
            upload_expiry_secs: num("DOCKSIDE_UPLOAD_EXPIRY_SECS")?.unwrap_or(d.upload_expiry_secs),
            max_manifest_bytes: num("DOCKSIDE_MAX_MANIFEST_BYTES")?.unwrap_or(d.max_manifest_bytes),
            max_blob_bytes: num("DOCKSIDE_MAX_BLOB_BYTES")?.unwrap_or(d.max_blob_bytes),
            max_chunk_bytes: num("DOCKSIDE_MAX_CHUNK_BYTES")?.or(d.max_chunk_bytes),
            chunk_min_length: num("DOCKSIDE_CHUNK_MIN_LENGTH")?.or(d.chunk_min_length),
            delete_enabled: !flag("DOCKSIDE_NO_DELETE")?,
            tag_delete_enabled: !flag("DOCKSIDE_NO_TAG_DELETE")?,
            auth: AuthConfig::from_settings(&get, None)?.map(Arc::new),
            gc: match get("DOCKSIDE_GC_CONFIG") {
                Some(t) if !t.trim().is_empty() => crate::gc::GcConfig::from_toml(&t)
                    .map_err(|e| format!("DOCKSIDE_GC_CONFIG: {e}"))?,
                _ => d.gc.clone(),
            },
            blob_redirect: num("DOCKSIDE_BLOB_REDIRECT")?
                .filter(|&s| s > 0)
                .map(std::time::Duration::from_secs),
            blob_redirect_min_bytes: num("DOCKSIDE_BLOB_REDIRECT_MIN_BYTES")?
                .unwrap_or(d.blob_redirect_min_bytes),
            ..d
        })
    }
}

/// An OCI Distribution registry over a key-value store `K` and a blob store `B`.
///
/// On a local directory, with deletes refused (the crate's front page shows one in memory):
///
/// ```
/// use dockside::{Config, DirRegistry};
/// use http_body_util::Full;
///
/// # futures_executor::block_on(async {
/// let dir = tempfile::tempdir().unwrap();
/// let config = Config { delete_enabled: false, ..Config::default() };
/// let registry = DirRegistry::open_dir(dir.path(), config).unwrap();
/// let req = http::Request::delete("/v2/hello/manifests/latest")
///     .body(Full::new(&b""[..]))
///     .unwrap();
/// // 405 with the spec's UNSUPPORTED error.
/// assert_eq!(registry.handle(req).await.status(), 405);
/// # });
/// ```
///
/// It holds no state of its own between requests: everything lives in the two stores, so a
/// `Registry` may be built per request (as on edge hosts) or shared (natively).
pub struct Registry<K, B> {
    pub(crate) kv: K,
    pub(crate) blobs: B,
    pub(crate) config: Config,
}

/// A response of the core, whose body may stream from the blob store `B`.
pub type RegistryResponse<B> = Response<Body<<B as BlobStore>::Reader>>;

pub(crate) use crate::request::Result;

enum Route {
    Base,
    Catalog,
    Manifest(RepoName, String),
    Blob(RepoName, String),
    UploadStart(RepoName),
    Upload(RepoName, String),
    Tags(RepoName),
    Referrers(RepoName, String),
}

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    pub fn new(kv: K, blobs: B, config: Config) -> Self {
        Registry { kv, blobs, config }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Answers one request of the OCI Distribution API. Never panics on client input and never
    /// fails: errors become responses with the spec's JSON envelope.
    pub async fn handle<RB>(&self, req: Request<RB>) -> RegistryResponse<B>
    where
        RB: http_body::Body,
        RB::Error: std::fmt::Display,
    {
        let (parts, body) = req.into_parts();
        let is_head = parts.method == Method::HEAD;
        let request_id = crate::observe::request_id(&parts.headers);
        let mut outcome = Outcome {
            class: RouteClass::of(&parts.method, parts.uri.path()),
            store_error: false,
            auth_failure: None,
        };
        let mut body = Box::pin(Watched {
            body: Box::pin(body),
            polled: false,
        });
        let client = crate::throttle::client_address(&parts, self.config.trust_forwarded_for);
        let throttle = LoginThrottle::new(
            &self.kv,
            &self.config.login_limits,
            client,
            crate::auth::now_secs(),
        );
        let result = match (&self.config.auth, parts.uri.path()) {
            // Probes come before access control: they never need credentials, and say nothing
            // about what is stored.
            (_, "/live" | "/ready" | "/healthz") => self.probe(&parts).await,
            (Some(auth), "/token") => self.token(auth, &parts, &mut body, &throttle).await,
            (_, crate::gc::GC_PATH) => self.gc_request(&parts, &throttle).await,
            _ => self.route(&parts, &mut body, &throttle).await,
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                outcome.store_error = e.code == ErrorCode::Unknown && e.status.is_server_error();
                outcome.auth_failure = match e.code {
                    ErrorCode::Unauthorized
                        if parts.headers.contains_key(header::AUTHORIZATION)
                            || outcome.class == RouteClass::Token =>
                    {
                        Some(AuthFailure::BadCredentials)
                    }
                    ErrorCode::Denied => Some(AuthFailure::Denied),
                    _ => None,
                };
                if worth_draining(&parts.headers, &body, self.config.drain_limit) {
                    drain(&mut body, self.config.drain_limit).await;
                }
                error_response(&e, is_head)
            }
        };
        resp.headers_mut().insert(
            "docker-distribution-api-version",
            HeaderValue::from_static("registry/2.0"),
        );
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            resp.headers_mut()
                .insert(crate::observe::REQUEST_ID_HEADER, v);
        }
        resp.extensions_mut().insert(outcome);
        resp
    }

    /// `/live`: the process answers. `/ready` and `/healthz`: both stores answer a cheap read
    /// (a key and a blob that are never written), else 503. The body names which store failed,
    /// never why (that goes to the log).
    async fn probe(&self, parts: &http::request::Parts) -> Result<RegistryResponse<B>> {
        if !matches!(parts.method, Method::GET | Method::HEAD) {
            return Err(method_not_allowed(&parts.method, "GET, HEAD"));
        }
        let head = parts.method == Method::HEAD;
        let json = |status: StatusCode, v: serde_json::Value| {
            let mut r =
                bytes_response(status, "application/json", Bytes::from(v.to_string()), head);
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        };
        if parts.uri.path() == "/live" {
            return Ok(json(StatusCode::OK, serde_json::json!({"status": "ok"})));
        }
        let kv = self.kv.get(layout::probe_key()).await;
        let blobs = self.blobs.size(layout::probe_blob()).await;
        let state = |failed: bool| if failed { "unavailable" } else { "ok" };
        for e in [kv.as_ref().err(), blobs.as_ref().err()]
            .into_iter()
            .flatten()
        {
            tracing::warn!(error = %e.message, kind = ?e.kind, "readiness probe: a store failed");
        }
        let ready = kv.is_ok() && blobs.is_ok();
        Ok(json(
            if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            serde_json::json!({
                "status": state(!ready),
                "kv": state(kv.is_err()),
                "blobs": state(blobs.is_err()),
            }),
        ))
    }

    async fn route<RB>(
        &self,
        parts: &http::request::Parts,
        body: &mut Pin<Box<RB>>,
        throttle: &LoginThrottle<'_, K>,
    ) -> Result<RegistryResponse<B>>
    where
        RB: http_body::Body,
        RB::Error: std::fmt::Display,
    {
        let q = Query::parse(parts.uri.query().unwrap_or(""));
        let h = &parts.headers;
        let m = &parts.method;
        let allow =
            |methods: &str| -> Result<RegistryResponse<B>> { Err(method_not_allowed(m, methods)) };
        let route = self.parse_path(parts.uri.path())?;
        let auth = self.config.auth.as_deref();
        let caller = match &self.config.auth {
            None => Caller::unrestricted(),
            Some(a) => {
                let now = crate::auth::now_secs();
                a.authorize(
                    parts,
                    &need(&route, m),
                    now,
                    self.password_checks(),
                    throttle,
                )
                .await?
            }
        };
        let sub = caller.subject();
        if let Some(mirror) = &self.config.mirror
            && let Some(r) = self
                .mirror_route(mirror, &route, m, &q, h, parts.extensions.get())
                .await
        {
            return r;
        }
        match route {
            Route::Base => match *m {
                Method::GET | Method::HEAD => Ok(json_response(StatusCode::OK, b"{}".to_vec())),
                _ => allow("GET, HEAD"),
            },
            Route::Catalog => match *m {
                Method::GET => self.catalog(&q).await,
                _ => allow("GET"),
            },
            Route::Tags(name) => match *m {
                Method::GET => self.tags_list(&name, &q).await,
                _ => allow("GET"),
            },
            Route::Referrers(name, digest) => match *m {
                Method::GET => self.referrers(&name, &digest, &q).await,
                _ => allow("GET"),
            },
            Route::Manifest(name, reference) => match *m {
                Method::GET => self.get_manifest(&name, &reference, false).await,
                Method::HEAD => self.get_manifest(&name, &reference, true).await,
                Method::PUT => self.put_manifest(&name, &reference, &q, h, body).await,
                Method::DELETE => self.delete_manifest(&name, &reference).await,
                _ => allow("GET, HEAD, PUT, DELETE"),
            },
            Route::Blob(name, digest) => match *m {
                Method::GET => self.get_blob(&name, &digest, h, false).await,
                Method::HEAD => self.get_blob(&name, &digest, h, true).await,
                Method::DELETE => self.delete_blob(&name, &digest).await,
                _ => allow("GET, HEAD, DELETE"),
            },
            Route::UploadStart(name) => match *m {
                Method::POST => {
                    // Mounting from a repository the caller may not pull from is an ordinary
                    // upload (202), as if the blob were not there: nothing leaks about `from`.
                    let q = match q.get("from") {
                        Some(from) if !caller.may(auth, &Need::pull(from)) => Query(
                            q.0.into_iter()
                                .filter(|(k, _)| k != "mount" && k != "from")
                                .collect(),
                        ),
                        _ => q,
                    };
                    self.start_upload(&name, &q, h, body, sub).await
                }
                _ => allow("POST"),
            },
            Route::Upload(name, id) => match *m {
                Method::GET => self.upload_status(&name, &id, sub).await,
                Method::PATCH => self.patch_upload(&name, &id, h, body, sub).await,
                Method::PUT => self.finish_upload(&name, &id, &q, h, body, sub).await,
                Method::DELETE => self.cancel_upload(&name, &id, sub).await,
                _ => allow("GET, PATCH, PUT, DELETE"),
            },
        }
    }

    /// `GET /token` and `POST /token`: the token endpoint, when access control is on.
    async fn token<RB>(
        &self,
        auth: &Arc<AuthConfig>,
        parts: &http::request::Parts,
        body: &mut Pin<Box<RB>>,
        throttle: &LoginThrottle<'_, K>,
    ) -> Result<RegistryResponse<B>>
    where
        RB: http_body::Body,
        RB::Error: std::fmt::Display,
    {
        let now = crate::auth::now_secs();
        let (status, json) = match parts.method {
            Method::GET => {
                auth.token_endpoint(parts, None, now, self.password_checks(), throttle)
                    .await?
            }
            Method::POST => {
                let form = read_to_vec(body, 64 * 1024).await.map_err(|e| match e {
                    ReadError::TooLarge { .. } => Error::new(
                        ErrorCode::SizeInvalid,
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "the token request is too large",
                    ),
                    ReadError::Body(e) => {
                        Error::bad_request(ErrorCode::Unsupported, format!("reading the body: {e}"))
                    }
                })?;
                auth.token_endpoint(parts, Some(&form), now, self.password_checks(), throttle)
                    .await?
            }
            ref m => return Err(method_not_allowed(m, "GET, POST")),
        };
        let mut resp = json_response(status, json);
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(resp)
    }

    /// Maps a path to a route. Names may contain `/`, so the path is read from its end: the
    /// last segments say what is asked for, everything before them is the name.
    fn parse_path(&self, path: &str) -> Result<Route> {
        let not_found = || {
            Error::not_found(
                ErrorCode::Unsupported,
                format!(
                    "no such endpoint: {}",
                    path.chars().take(300).collect::<String>()
                ),
            )
        };
        let rest = match path.strip_prefix("/v2") {
            Some("") | Some("/") => return Ok(Route::Base),
            Some(r) => r.strip_prefix('/').ok_or_else(not_found)?,
            None => return Err(not_found()),
        };
        if rest == "_catalog" {
            return Ok(Route::Catalog);
        }
        let segs: Vec<String> = rest.split('/').map(percent_decode).collect();
        let n = segs.len();
        let name = |k: usize| RepoName::parse(&segs[..k].join("/"), self.config.max_name_length);
        let last = |i: usize| segs[n - i].as_str();
        if n >= 4 && last(3) == "blobs" && last(2) == "uploads" {
            return if last(1).is_empty() {
                Ok(Route::UploadStart(name(n - 3)?))
            } else {
                Ok(Route::Upload(name(n - 3)?, last(1).to_owned()))
            };
        }
        if n >= 3 {
            let (kind, arg) = (last(2), last(1).to_owned());
            match kind {
                "blobs" if arg == "uploads" => return Ok(Route::UploadStart(name(n - 2)?)),
                "tags" if arg == "list" => return Ok(Route::Tags(name(n - 2)?)),
                "manifests" => return Ok(Route::Manifest(name(n - 2)?, arg)),
                "blobs" => return Ok(Route::Blob(name(n - 2)?, arg)),
                "referrers" => return Ok(Route::Referrers(name(n - 2)?, arg)),
                _ => {}
            }
        }
        Err(not_found())
    }

    /// Answers a request for a mirrored name (`crate::mirror`): pulls fill from the upstream,
    /// writes are refused unless allowed; `None` for names that are not mirrored.
    async fn mirror_route(
        &self,
        mirror: &crate::mirror::Mirror,
        route: &Route,
        m: &Method,
        q: &Query,
        h: &http::HeaderMap,
        early: Option<&crate::mirror::EarlyResponse>,
    ) -> Option<Result<RegistryResponse<B>>> {
        let max = self.config.max_name_length;
        let target = |name: &RepoName| mirror.target(name, q.get("ns"), max);
        let pull = matches!(*m, Method::GET | Method::HEAD);
        let head = *m == Method::HEAD;
        match route {
            Route::Manifest(name, reference) if pull => {
                let t = target(name)?;
                Some(self.mirror_manifest(&t, reference, head).await)
            }
            Route::Blob(name, digest) if pull => {
                let t = target(name)?;
                Some(self.mirror_blob(&t, digest, h, head, early).await)
            }
            Route::Tags(name) if *m == Method::GET => {
                let t = target(name)?;
                Some(self.mirror_tags_list(&t, name, q).await)
            }
            Route::Referrers(name, digest) if *m == Method::GET => {
                let t = target(name)?;
                Some(self.mirror_referrers(&t, name, digest, q).await)
            }
            Route::Manifest(name, _)
            | Route::Blob(name, _)
            | Route::UploadStart(name)
            | Route::Upload(name, _)
                if !mirror.allow_push =>
            {
                target(name)?;
                Some(Err(Error::new(
                    ErrorCode::Unsupported,
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!(
                        "{name} is a mirror of another registry: pushes and deletes are refused"
                    ),
                )))
            }
            _ => None,
        }
    }

    fn password_checks(&self) -> Option<&dyn PasswordChecks> {
        self.config.password_checks.as_deref()
    }

    /// Records that repository `name` exists (for the catalog), once.
    pub(crate) async fn ensure_repository(&self, name: &RepoName) -> Result<()> {
        let key = layout::catalog(name);
        if self.kv.get(&key).await?.is_none() {
            self.kv.set(&key, b"").await?;
        }
        Ok(())
    }

    pub(crate) async fn repository_exists(&self, name: &RepoName) -> Result<bool> {
        Ok(self.kv.get(&layout::catalog(name)).await?.is_some())
    }
}

/// What a route needs of the caller.
fn need(route: &Route, m: &Method) -> Need {
    match route {
        Route::Base => Need::SignedIn,
        Route::Catalog => Need::Catalog,
        Route::Tags(name) | Route::Referrers(name, _) => Need::pull(name.as_str()),
        Route::Manifest(name, _) | Route::Blob(name, _) => match *m {
            Method::PUT if matches!(route, Route::Manifest(..)) => Need::push(name.as_str()),
            Method::DELETE => Need::delete(name.as_str()),
            _ => Need::pull(name.as_str()),
        },
        Route::UploadStart(name) | Route::Upload(name, _) => Need::push(name.as_str()),
    }
}

/// A request body that remembers whether it was ever polled: an `Expect: 100-continue` client
/// sends its body only once the adapter sees it read (hyper then sends `100 Continue`).
struct Watched<RB> {
    body: Pin<Box<RB>>,
    polled: bool,
}

impl<RB: http_body::Body> http_body::Body for Watched<RB> {
    type Data = RB::Data;
    type Error = RB::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<RB::Data>, RB::Error>>> {
        self.polled = true;
        self.body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether reading the rest of a refused request's body could help the client see the answer:
/// not when nothing is left, nor when the client holds its body back until told to send it
/// (`Expect: 100-continue`, body not read yet: reading would invite the bytes it then drops),
/// nor when more is left than `limit` (the connection closes either way).
fn worth_draining<RB: http_body::Body>(
    headers: &http::HeaderMap,
    body: &Watched<RB>,
    limit: u64,
) -> bool {
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    limit > 0
        && !http_body::Body::is_end_stream(body)
        && (body.polled || !expects_continue)
        && http_body::Body::size_hint(body).lower() <= limit
}

/// Reads and drops what is left of a refused request's body, up to `limit` bytes. A server
/// that answers early and closes while the client is still sending makes many clients lose the
/// answer to a connection reset (RFC 9112 §9.6); past the limit, closing is the lesser evil.
/// Only bytes are bounded here: the adapter bounds how long a read may wait.
async fn drain<RB>(body: &mut Pin<Box<RB>>, limit: u64)
where
    RB: http_body::Body,
{
    use http_body_util::BodyExt;
    let mut seen = 0u64;
    while !body.is_end_stream() && seen <= limit {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    seen += bytes::Buf::remaining(d) as u64;
                }
            }
            _ => return,
        }
    }
}

/// 405 `UNSUPPORTED`, with the `Allow` header listing what the endpoint takes.
fn method_not_allowed(m: &Method, methods: &str) -> Error {
    Error::new(
        ErrorCode::Unsupported,
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {m} not allowed here; allowed: {methods}"),
    )
    .with_header(header::ALLOW, methods)
}

/// A response with the given status and headers and an empty body (`Content-Length: 0`).
pub(crate) fn empty_response<R>(
    status: StatusCode,
    headers: &[(&str, String)],
) -> Response<Body<R>> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("static header names are valid"),
                v,
            );
        }
    }
    resp
}

pub(crate) fn json_response<R>(status: StatusCode, json: Vec<u8>) -> Response<Body<R>> {
    bytes_response(status, "application/json", Bytes::from(json), false)
}

/// A response carrying `body` (or, for HEAD, only its length).
pub(crate) fn bytes_response<R>(
    status: StatusCode,
    content_type: &str,
    body: Bytes,
    head: bool,
) -> Response<Body<R>> {
    let len = body.len();
    let mut resp = Response::new(if head {
        Body::empty()
    } else {
        Body::full(body)
    });
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(ct) = HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, ct);
    }
    resp
}

fn error_response<R>(e: &Error, head: bool) -> Response<Body<R>> {
    let mut resp = bytes_response(e.status, "application/json", Bytes::from(e.to_json()), head);
    for (k, v) in &e.headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            resp.headers_mut().append(k.clone(), v);
        }
    }
    resp
}
