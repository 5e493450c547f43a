//! Mirror configuration: a TOML document (`--mirror-config` natively, the `mirror_config` Spin
//! variable, `DOCKSIDE_MIRROR_CONFIG` under wasmtime).
//!
//! ```toml
//! tag_ttl_secs = 300          # a tag is revalidated upstream (HEAD) once this old
//! allow_push = false          # pushes to mirrored names: 405 UNSUPPORTED unless true
//!
//! [[upstream]]
//! url = "https://registry-1.docker.io"
//! prefix = "hub/"             # hub/library/alpine -> library/alpine; "" maps every name
//! hosts = ["docker.io"]       # containerd's ?ns= values answered by this upstream
//! library = true              # Docker Hub: hub/alpine -> library/alpine
//! username = "..."            # optional: Basic credentials for the token service
//! password = "..."
//! # token = "..."             # or a fixed Bearer token
//! ```

use std::sync::Arc;

use serde::Deserialize;

use crate::mirror::UpstreamClient;
use crate::names::RepoName;

/// One upstream registry.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Base URL, without a trailing `/` (`https://registry-1.docker.io`).
    pub url: String,
    /// Local names starting with this prefix map to this upstream (the prefix removed); empty:
    /// every name not claimed by a longer prefix.
    pub prefix: String,
    /// The upstream's host names as clients give them in containerd's `?ns=`.
    pub hosts: Vec<String>,
    /// Docker Hub's rule: a single-component name means `library/<name>`.
    pub library: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
}

/// The mirror: upstreams, the tag TTL, whether pushes to mirrored names are allowed, and the
/// client that reaches the upstreams.
#[derive(Clone)]
pub struct Mirror {
    pub upstreams: Vec<Upstream>,
    pub tag_ttl_secs: u64,
    pub allow_push: bool,
    /// How long a blob fetch may hold its lease before others may take over.
    pub lease_secs: u64,
    pub(crate) client: Arc<dyn UpstreamClient>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field(
                "upstreams",
                &self.upstreams.iter().map(|u| &u.url).collect::<Vec<_>>(),
            )
            .field("tag_ttl_secs", &self.tag_ttl_secs)
            .field("allow_push", &self.allow_push)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default = "default_ttl")]
    tag_ttl_secs: u64,
    #[serde(default)]
    allow_push: bool,
    #[serde(default = "default_lease")]
    lease_secs: u64,
    #[serde(default)]
    upstream: Vec<UpstreamFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamFile {
    url: String,
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    library: bool,
    username: Option<String>,
    password: Option<String>,
    token: Option<String>,
}

fn default_ttl() -> u64 {
    300
}

fn default_lease() -> u64 {
    120
}

/// Where a request for a mirrored name goes.
pub(crate) struct Target<'a> {
    pub up: &'a Upstream,
    /// The name on the upstream.
    pub remote: String,
    /// The name the content is cached under here.
    pub local: RepoName,
}

impl Mirror {
    /// Parses the TOML configuration above; `client` sends the upstream requests.
    pub fn from_toml(text: &str, client: Arc<dyn UpstreamClient>) -> Result<Self, String> {
        let f: File = toml::from_str(text).map_err(|e| format!("mirror configuration: {e}"))?;
        if f.upstream.is_empty() {
            return Err("mirror configuration: no [[upstream]]".into());
        }
        let mut upstreams = Vec::new();
        for u in f.upstream {
            let url = u.url.trim_end_matches('/').to_owned();
            let uri: http::Uri = url
                .parse()
                .map_err(|e| format!("mirror configuration: upstream url {url:?}: {e}"))?;
            let Some(host) = uri.authority().map(|a| a.to_string()) else {
                return Err(format!(
                    "mirror configuration: upstream url {url:?} has no host"
                ));
            };
            if !matches!(uri.scheme_str(), Some("http" | "https")) {
                return Err(format!(
                    "mirror configuration: upstream url {url:?}: http or https"
                ));
            }
            if !u.prefix.is_empty() && !u.prefix.ends_with('/') {
                return Err(format!(
                    "mirror configuration: prefix {:?} must end with '/'",
                    u.prefix
                ));
            }
            if u.password.is_some() != u.username.is_some() {
                return Err("mirror configuration: username and password go together".into());
            }
            let mut hosts = u.hosts;
            hosts.push(host);
            upstreams.push(Upstream {
                url,
                prefix: u.prefix,
                hosts,
                library: u.library,
                username: u.username,
                password: u.password,
                token: u.token,
            });
        }
        Ok(Mirror {
            upstreams,
            tag_ttl_secs: f.tag_ttl_secs,
            allow_push: f.allow_push,
            lease_secs: f.lease_secs.max(1),
            client,
        })
    }

    /// The upstream and names for `name`, or `None` when it is not mirrored. `ns` is
    /// containerd's `?ns=<upstream host>`: it picks the upstream by host and the name is the
    /// upstream's own (cached here under the upstream's prefix).
    pub(crate) fn target(
        &self,
        name: &RepoName,
        ns: Option<&str>,
        max_len: usize,
    ) -> Option<Target<'_>> {
        let name = name.as_str();
        let (up, remote) = match ns {
            Some(ns) => {
                let up = self
                    .upstreams
                    .iter()
                    .find(|u| u.hosts.iter().any(|h| h == ns))?;
                (up, name.to_owned())
            }
            None => {
                let up = self
                    .upstreams
                    .iter()
                    .filter(|u| name.starts_with(&u.prefix))
                    .max_by_key(|u| u.prefix.len())?;
                (up, name[up.prefix.len()..].to_owned())
            }
        };
        if remote.is_empty() {
            return None;
        }
        let remote = if up.library && !remote.contains('/') {
            format!("library/{remote}")
        } else {
            remote
        };
        let local = RepoName::parse(&format!("{}{remote}", up.prefix), max_len).ok()?;
        Some(Target { up, remote, local })
    }
}
