//! A registry for tests, in one line (feature `testing`).
//!
//! [`TestRegistry::start`] runs a registry in this process on `127.0.0.1` and a free port,
//! storing in memory, and returns once it answers; dropping it stops it. It runs on a thread and
//! a Tokio runtime of its own, so it works the same from `#[test]` and from `#[tokio::test]`
//! (of either flavour), and a test's runtime shutting down never strands it.
//!
//! ```no_run
//! let registry = dockside::testing::TestRegistry::start();
//! let reference = format!("{}/library/hello:v1", registry.host());
//! // push to and pull from `reference` with any client; `registry.url()` is its base URL.
//! # drop(reference);
//! ```
//!
//! Storage in a temporary or a given directory, and access control (users with passwords, and
//! optionally anonymous pulls) through [`TestRegistry::builder`]:
//!
//! ```no_run
//! let registry = dockside::testing::TestRegistry::builder()
//!     .temp_dir()
//!     .user("alice", "secret")
//!     .anonymous_pull()
//!     .start();
//! ```
//!
//! What it served is recorded, for tests that check which requests a client sent
//! ([`TestRegistry::requests`]):
//!
//! ```no_run
//! let registry = dockside::testing::TestRegistry::start();
//! // ... a client pushes an image ...
//! let patches = registry
//!     .requests()
//!     .iter()
//!     .filter(|r| r.method == "PATCH" && r.path.starts_with("/v2/library/hello/blobs/uploads/"))
//!     .count();
//! # drop(patches);
//! ```
//!
//! `examples/testing.rs` pushes and pulls an image with the `oci-client` crate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::adapters::server::{self, Limits, PasswordCheckers};
use crate::{AuthConfig, Config, FsBlobs, FsKv, MemoryBlobs, MemoryKv, Registry};

/// Where a [`TestRegistry`] stores.
#[derive(Debug, Clone)]
enum Storage {
    Memory,
    TempDir,
    Dir(PathBuf),
}

/// Options for a [`TestRegistry`]: see [`TestRegistry::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    storage: Storage,
    users: Vec<(String, String)>,
    anonymous_pull: bool,
    config: Config,
}

impl Builder {
    /// Store in a temporary directory, removed when the registry is dropped.
    pub fn temp_dir(mut self) -> Self {
        self.storage = Storage::TempDir;
        self
    }

    /// Store in `dir` (created if missing, kept afterwards): for a registry restarted on the
    /// same data.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.storage = Storage::Dir(dir.into());
        self
    }

    /// Turns access control on and adds a user who may pull, push and delete everywhere and
    /// list the catalog. Clients sign in as usual (`docker login`, Basic credentials, or the
    /// token endpoint at `<url>/token`).
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.users.push((name.to_owned(), password.to_owned()));
        self
    }

    /// With users: anyone may also pull, without signing in.
    pub fn anonymous_pull(mut self) -> Self {
        self.anonymous_pull = true;
        self
    }

    /// The core's settings (limits, deletes...). Its `auth`, when set, is the access control
    /// (rules beyond "every user does everything", e.g. from [`AuthConfig::from_toml`]) unless
    /// [`user`](Self::user) is also called, which replaces it.
    ///
    /// ```no_run
    /// use dockside::{AuthConfig, Config};
    /// let auth = AuthConfig::from_toml(
    ///     r#"
    /// [auth]
    /// secret = "at-least-32-bytes-of-token-secret-here"
    /// [[auth.rules]]
    /// repositories = ["public/*"]
    /// users = ["anonymous"]
    /// actions = ["pull"]
    /// "#,
    /// )
    /// .unwrap()
    /// .map(std::sync::Arc::new);
    /// let registry = dockside::testing::TestRegistry::builder()
    ///     .config(Config { auth, ..Config::default() })
    ///     .start();
    /// ```
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Starts the registry and returns once it listens. Panics if it cannot (no free port, an
    /// unusable directory): in a test, that is the right answer.
    pub fn start(self) -> TestRegistry {
        TestRegistry::launch(self).unwrap_or_else(|e| panic!("cannot start a test registry: {e}"))
    }

    /// The access configuration the users and anonymous pulls make: every user may do
    /// everything, anonymous users pull when asked for.
    fn auth(&self) -> Result<Option<AuthConfig>, String> {
        if self.users.is_empty() {
            if self.anonymous_pull {
                return Err("anonymous_pull() needs at least one user()".into());
            }
            return Ok(None);
        }
        let mut toml = String::from("[auth]\n");
        let mut names = Vec::new();
        for (name, password) in &self.users {
            let hash = crate::auth::hash_password(password, false)?;
            toml.push_str(&format!(
                "[[auth.users]]\nname = {}\npassword_hash = {}\n",
                toml_string(name),
                toml_string(&hash)
            ));
            names.push(toml_string(name));
        }
        let names = names.join(", ");
        toml.push_str(&format!(
            "[[auth.rules]]\nrepositories = [\"**\"]\nusers = [{names}]\nactions = [\"*\"]\n\
             [[auth.rules]]\ncatalog = true\nusers = [{names}]\n"
        ));
        if self.anonymous_pull {
            toml.push_str(
                "[[auth.rules]]\nrepositories = [\"**\"]\nusers = [\"anonymous\"]\n\
                 actions = [\"pull\"]\n",
            );
        }
        // A fresh token secret per registry: tokens of one test never open another's.
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| format!("no randomness: {e}"))?;
        let secret = crate::digest::to_hex(&secret);
        AuthConfig::from_settings(
            |k| (k == "DOCKSIDE_AUTH_SECRET").then(|| secret.clone()),
            Some(&toml),
        )
    }
}

/// One request a [`TestRegistry`] answered, as [`TestRegistry::requests`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedRequest {
    /// The request's method (compares with a `&str`: `r.method == "PATCH"`).
    pub method: http::Method,
    /// The path and query as sent, e.g. `/v2/app/blobs/uploads/?digest=sha256:...`.
    pub path: String,
    /// The status of the answer (its headers: a body cut short later is not seen here).
    pub status: http::StatusCode,
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// A registry running in this process for a test; stopped when dropped.
pub struct TestRegistry {
    addr: SocketAddr,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    requests: Arc<Mutex<Vec<ServedRequest>>>,
    dir: Option<PathBuf>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The temporary directory, removed after the server thread ends.
    _dir: Option<tempfile::TempDir>,
}

impl TestRegistry {
    /// A registry storing in memory, open to anyone: push and pull without signing in.
    pub fn start() -> TestRegistry {
        TestRegistry::builder().start()
    }

    /// Options: storage in a directory, users, anonymous pulls, the core's settings.
    pub fn builder() -> Builder {
        Builder {
            storage: Storage::Memory,
            users: Vec::new(),
            anonymous_pull: false,
            config: Config::default(),
        }
    }

    /// The base URL, e.g. `http://127.0.0.1:40123` (no trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `127.0.0.1:<port>`: the registry part of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The requests answered so far, oldest first: method, path and query, status. A request
    /// is listed once its answer's headers are ready, so a client holding a response finds its
    /// request here. Every request is kept for the registry's life (a test's worth).
    pub fn requests(&self) -> Vec<ServedRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The directory it stores in ([`Builder::dir`] or [`Builder::temp_dir`]; `None` in
    /// memory), laid out as `dockside serve --data` lays it out: `blobs/sha256/<2>/<hex>`,
    /// `kv/`, `uploads/`, `tmp/`.
    pub fn data_dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn launch(b: Builder) -> Result<TestRegistry, String> {
        let auth = b.auth()?;
        let (dir, tmp) = match &b.storage {
            Storage::Memory => (None, None),
            Storage::TempDir => {
                let t = tempfile::Builder::new()
                    .prefix("dockside-test-")
                    .tempdir()
                    .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
                (Some(t.path().to_path_buf()), Some(t))
            }
            Storage::Dir(d) => (Some(d.clone()), None),
        };
        let stored_in = dir.clone();
        let limits = Limits::default();
        let config = Config {
            auth: auth.map(Arc::new).or(b.config.auth.clone()),
            ..b.config
        };
        // Bound here, so the address is known and the port taken before `start` returns.
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dockside-test-registry")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        // Stores are opened before the thread starts, so their errors reach the caller.
        let stores = match dir {
            None => None,
            Some(d) => {
                let kv = FsKv::new(d.join("kv"))
                    .map_err(|e| format!("cannot use {}: {e}", d.join("kv").display()))?;
                let blobs =
                    FsBlobs::new(&d).map_err(|e| format!("cannot use {}: {e}", d.display()))?;
                Some((kv, blobs))
            }
        };
        let checks = PasswordCheckers::new(2).map_err(|e| e.to_string())?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let ops = server::Ops {
            record: Some(requests.clone()),
            ..server::Ops::default()
        };

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("dockside-test-registry".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("a listener for this runtime");
                    let shutdown = async {
                        let _ = stopped.await;
                    };
                    let result = match stores {
                        Some((kv, blobs)) => {
                            let registry = server::registry(kv, blobs, config, &limits)
                                .expect("password checkers");
                            server::serve_registry(
                                listener,
                                Arc::new(registry),
                                limits,
                                ops,
                                shutdown,
                            )
                            .await
                        }
                        None => {
                            let registry = Arc::new(Registry::new(
                                MemoryKv::new(),
                                MemoryBlobs::new(),
                                Config {
                                    // The server drains refused bodies itself.
                                    drain_limit: 0,
                                    password_checks: Some(Arc::new(checks)),
                                    ..config
                                },
                            ));
                            server::serve(
                                listener,
                                move |req| {
                                    let registry = registry.clone();
                                    async move { registry.handle(req).await }
                                },
                                limits,
                                ops,
                                shutdown,
                            )
                            .await
                        }
                    };
                    if let Err(e) = result {
                        tracing::error!("test registry stopped: {e}");
                    }
                });
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        Ok(TestRegistry {
            addr,
            url: format!("http://{addr}"),
            stop: Some(stop),
            requests,
            dir: stored_in,
            thread: Some(thread),
            _dir: tmp,
        })
    }
}

impl Drop for TestRegistry {
    /// Stops accepting, lets requests in flight finish, and waits for the server's thread
    /// (idle keep-alive connections are closed at once).
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for TestRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRegistry")
            .field("url", &self.url)
            .finish()
    }
}
