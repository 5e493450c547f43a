//! `dockside`: the native server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dockside::adapters::hyper_client::HyperClient;
use dockside::adapters::metrics::Metrics;
use dockside::adapters::remote;
use dockside::adapters::server::{self, Limits, Ops, ServedRegistry, ServerBlobs, ServerKv, Tls};
use dockside::{AuthConfig, Config, FsBlobs, FsKv};

/// dockside: an OCI Distribution registry (docker, podman, skopeo, crane, oras, containerd push
/// to it and pull from it).
///
/// Run `dockside serve` and push to 127.0.0.1:5000, e.g.
/// `skopeo copy --dest-tls-verify=false oci:./image docker://127.0.0.1:5000/hello:latest`.
/// Loopback addresses need no TLS settings in docker or podman; for anything else, serve
/// HTTPS with `--tls-cert` and `--tls-key`.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry over HTTP, storing in a local directory, or in Valkey/Redis (keys)
    /// and S3 (blobs) shared by several instances.
    Serve(Box<ServeArgs>),
    /// Collect garbage once, online (`dockside serve` may run meanwhile, on the same stores):
    /// stale uploads, tags beyond the retention rules, unreachable manifests (with `untagged`),
    /// blob links and blobs nothing references. Takes `serve`'s store options (and the same environment variables); prints what it
    /// removed (JSON). Resumes a run that was interrupted.
    Gc(Box<GcArgs>),
    /// Print a password hash for `[[auth.users]] password_hash`, reading the password from
    /// standard input (one line).
    HashPassword(HashArgs),
    /// Ask a running dockside whether it is ready (GET /ready): exit 0 if it answers 200,
    /// 1 otherwise. For container health checks, where there is no curl.
    Healthcheck(HealthArgs),
    /// Print a shell completion script, e.g.
    /// `dockside completions bash > /etc/bash_completion.d/dockside`.
    Completions {
        /// bash, elvish, fish, powershell or zsh.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `dockside man | man -l -`.
    Man,
}

#[derive(Args)]
struct HealthArgs {
    /// The probe to ask (plain HTTP).
    #[arg(long, default_value = "http://127.0.0.1:5000/ready")]
    url: String,
    /// Seconds to wait for the whole answer.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct HashArgs {
    /// bcrypt (cost 12) instead of argon2id.
    #[arg(long)]
    bcrypt: bool,
}

#[derive(Args)]
struct GcArgs {
    /// List what a run would remove, one line each, and remove nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    collect: CollectArgs,
}

/// Where the registry stores: shared by `serve` and `gc`.
#[derive(Args)]
struct StoreArgs {
    /// Directory to store everything in (created if missing), unless --kv and --blobs say
    /// otherwise.
    #[arg(long, env = "DOCKSIDE_DATA", default_value = "./dockside-data")]
    data: PathBuf,

    /// Key-value store (tags, links, manifests, upload sessions): a directory, or a Valkey/Redis
    /// server, `redis://[user:password@]host[:port][/db]`, which several instances may share.
    /// Default: <DATA>/kv.
    #[arg(long, env = "DOCKSIDE_KV", value_name = "DIR|redis://...")]
    kv: Option<String>,

    /// Namespace of every key in Valkey/Redis, so that several registries can share a server.
    #[arg(long, env = "DOCKSIDE_KV_PREFIX", default_value = dockside::hosts::redis::DEFAULT_PREFIX)]
    kv_prefix: String,

    /// Blob store: a directory, or an S3 bucket,
    /// `s3://BUCKET[/PREFIX]?endpoint=URL[&region=R][&style=path|virtual][&part_size=BYTES]`,
    /// which several instances may share. Credentials from DOCKSIDE_S3_ACCESS_KEY and
    /// DOCKSIDE_S3_SECRET_KEY, else AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    /// Default: <DATA>.
    #[arg(long, env = "DOCKSIDE_BLOBS", value_name = "DIR|s3://...")]
    blobs: Option<String>,

    /// Do not fsync writes. Faster uploads (see docs/PERFORMANCE.md), but a crash of the
    /// machine (power loss, kernel panic) may then lose recent pushes or corrupt blobs that
    /// were acknowledged; a crash of the process alone loses nothing either way.
    #[arg(long, env = "DOCKSIDE_NO_FSYNC")]
    no_fsync: bool,
}

/// What collection keeps and removes: shared by `serve` and `gc`.
#[derive(Args)]
struct CollectArgs {
    /// Cancel upload sessions older than this many seconds, freeing their space (checked
    /// periodically); they stop counting towards --max-uploads then. 0 keeps them forever
    /// (they then count for a day).
    #[arg(long, env = "DOCKSIDE_UPLOAD_EXPIRY_SECS", default_value_t = 24 * 3600)]
    upload_expiry_secs: u64,

    /// Garbage collection settings (TOML): grace_secs (default 3600), untagged (false),
    /// step_items, [[retention]] rules. See README, "Garbage collection".
    #[arg(long, env = "DOCKSIDE_GC_CONFIG_FILE", value_name = "FILE")]
    gc_config: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on. Use 0.0.0.0:5000 to accept other machines (with TLS).
    #[arg(long, env = "DOCKSIDE_LISTEN", default_value = "127.0.0.1:5000")]
    listen: SocketAddr,

    /// Serve HTTPS (HTTP/2 or HTTP/1.1, by ALPN) with this certificate chain: a PEM file, the
    /// server's certificate first, then any intermediates. Needs --tls-key. Both files are
    /// loaded again when they change (checked every 2 s) or on SIGHUP; connections opened
    /// afterwards get the new pair. A missing, unreadable or mismatched pair stops the start.
    #[arg(
        long,
        env = "DOCKSIDE_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert: a PEM file (PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        env = "DOCKSIDE_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,

    /// Seconds a client has to finish the TLS handshake after connecting (until then it holds
    /// one of --max-connections). 0: no limit.
    #[arg(
        long,
        env = "DOCKSIDE_TLS_HANDSHAKE_TIMEOUT",
        default_value_t = 10,
        value_name = "SECS"
    )]
    tls_handshake_timeout: u64,

    /// Serve Prometheus metrics at http://ADDR/metrics, on this separate listener (plain
    /// HTTP, no authentication: bind it to an address only the monitoring network reaches,
    /// e.g. 127.0.0.1:9090 or a pod IP). Off when not set: the registry's own port never
    /// serves metrics.
    #[arg(long, env = "DOCKSIDE_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,

    /// Log format on stderr: text (one line per request and event), or json (one JSON object
    /// per line, with the request id of the X-Request-Id response header).
    #[arg(long, env = "DOCKSIDE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(flatten)]
    store: StoreArgs,

    /// Answer blob GETs with 307 to a presigned URL of the S3 store, valid this many seconds,
    /// so that the bytes do not pass through dockside (S3 blobs only). 0: off.
    #[arg(
        long,
        env = "DOCKSIDE_BLOB_REDIRECT",
        default_value_t = 0,
        value_name = "SECS"
    )]
    blob_redirect: u64,

    /// Refuse every DELETE (manifests, tags, blobs) with 405.
    #[arg(long, env = "DOCKSIDE_NO_DELETE")]
    no_delete: bool,

    /// Refuse deleting a tag on its own (400 UNSUPPORTED); manifests may still be deleted.
    #[arg(long, env = "DOCKSIDE_NO_TAG_DELETE")]
    no_tag_delete: bool,

    /// Largest manifest accepted, in bytes.
    #[arg(long, env = "DOCKSIDE_MAX_MANIFEST_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_manifest_bytes: u64,

    /// Largest blob accepted, in bytes.
    #[arg(long, env = "DOCKSIDE_MAX_BLOB_BYTES", default_value_t = 64 * 1024 * 1024 * 1024)]
    max_blob_bytes: u64,

    /// Largest body of one upload request (PATCH, closing PUT, single POST), in bytes;
    /// advertised as OCI-Chunk-Max-Length. Unbounded if not set.
    #[arg(long, env = "DOCKSIDE_MAX_CHUNK_BYTES")]
    max_chunk_bytes: Option<u64>,

    /// Chunk size to advertise as OCI-Chunk-Min-Length when an upload starts. Default: none,
    /// or 5 MiB with S3 blobs (S3's smallest multipart part: smaller chunks are copied again
    /// when the upload closes).
    #[arg(long, env = "DOCKSIDE_CHUNK_MIN_LENGTH")]
    chunk_min_length: Option<u64>,

    /// Run garbage collection every this many seconds inside the server (0: never; then run
    /// `dockside gc`). See --gc-config for what it keeps.
    #[arg(
        long,
        env = "DOCKSIDE_GC_INTERVAL",
        default_value_t = 0,
        value_name = "SECS"
    )]
    gc_interval: u64,

    #[command(flatten)]
    collect: CollectArgs,

    /// Configuration file (TOML) with an `[auth]` table: users, rules, token settings. Without
    /// one (and without DOCKSIDE_AUTH_CONFIG), anyone may pull and push. DOCKSIDE_AUTH_SECRET,
    /// DOCKSIDE_AUTH_REALM, DOCKSIDE_AUTH_SERVICE, DOCKSIDE_AUTH_ISSUER and
    /// DOCKSIDE_AUTH_TOKEN_TTL override its values.
    #[arg(long, env = "DOCKSIDE_CONFIG")]
    config: Option<PathBuf>,

    /// Seconds a client has to send a request's headers, counted from when the server starts
    /// waiting for them: also how long an idle keep-alive connection stays open. 0: no limit.
    #[arg(
        long,
        env = "DOCKSIDE_HEADER_TIMEOUT",
        default_value_t = 30,
        value_name = "SECS"
    )]
    header_timeout: u64,

    /// Seconds to wait for the next bytes of a request body before failing the request (a
    /// stalled upload then frees its connection). 0: no limit.
    #[arg(
        long,
        env = "DOCKSIDE_BODY_TIMEOUT",
        default_value_t = 60,
        value_name = "SECS"
    )]
    body_timeout: u64,

    /// Most connections open at once; past it, new connections wait in the listen queue until
    /// one closes. The open-file limit is raised to suit it where the hard limit allows.
    #[arg(
        long,
        env = "DOCKSIDE_MAX_CONNECTIONS",
        default_value_t = 1024,
        value_name = "N"
    )]
    max_connections: usize,

    /// Most password checks (Basic credentials, /token logins) running at once, each on a
    /// thread of its own (an argon2id check takes 19 MiB); 16 per thread more may wait, later
    /// ones get 429 with Retry-After. Default: the number of cores, at most 4.
    #[arg(long, env = "DOCKSIDE_MAX_PASSWORD_CHECKS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    max_password_checks: Option<u16>,

    /// Seconds a count of failed logins (Basic credentials, /token) lasts from its first
    /// failure, and so the longest lockout. While a count is at its limit, every password
    /// check it covers gets 429 with Retry-After, the right password too. 0: no limits.
    #[arg(
        long,
        env = "DOCKSIDE_LOGIN_WINDOW_SECS",
        default_value_t = 60,
        value_name = "SECS"
    )]
    login_window_secs: u64,

    /// Failed logins per window for one user name from one client address. 0: no limit.
    #[arg(
        long,
        env = "DOCKSIDE_LOGIN_FAILURES_PER_USER_ADDRESS",
        default_value_t = 10,
        value_name = "N"
    )]
    login_failures_per_user_address: u64,

    /// Failed logins per window for one user name from all addresses together: looser, since
    /// reaching it locks the user out everywhere. 0: no limit.
    #[arg(
        long,
        env = "DOCKSIDE_LOGIN_FAILURES_PER_USER",
        default_value_t = 100,
        value_name = "N"
    )]
    login_failures_per_user: u64,

    /// Failed logins per window from one client address (an IPv6 address by its /64), all
    /// user names together. 0: no limit.
    #[arg(
        long,
        env = "DOCKSIDE_LOGIN_FAILURES_PER_ADDRESS",
        default_value_t = 50,
        value_name = "N"
    )]
    login_failures_per_address: u64,

    /// Take the client address from the last entry of X-Forwarded-For (what the proxy in
    /// front of dockside appended) instead of the connection's peer. Only behind a proxy that
    /// sets it: otherwise every client picks its own address.
    #[arg(long, env = "DOCKSIDE_TRUST_FORWARDED_FOR")]
    trust_forwarded_for: bool,

    /// Most upload sessions open at once in the whole registry (counted in the key-value
    /// store, across instances); a POST beyond gets 429 with Retry-After. Sessions stop
    /// counting when closed, cancelled or expired (--upload-expiry-secs). 0: unlimited.
    #[arg(
        long,
        env = "DOCKSIDE_MAX_UPLOADS",
        default_value_t = 1000,
        value_name = "N"
    )]
    max_uploads: u64,

    /// Most upload sessions open at once in one repository. 0: unlimited.
    #[arg(
        long,
        env = "DOCKSIDE_MAX_UPLOADS_PER_REPOSITORY",
        default_value_t = 100,
        value_name = "N"
    )]
    max_uploads_per_repository: u64,

    /// Be a pull-through mirror of other registries: a TOML file naming the upstreams (URL,
    /// credentials, which local names map to them). See the README, "Mirror".
    #[arg(long, env = "DOCKSIDE_MIRROR_CONFIG", value_name = "FILE")]
    mirror_config: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("DOCKSIDE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = matches!(&cli.command, Command::Serve(a) if a.log_format == LogFormat::Json);
    if json {
        // One object per line: the event's fields at the top level, and the request id of
        // the span an event happened in (`span.id`).
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(filter)
            .init();
    }
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Gc(args) => gc(*args),
        Command::HashPassword(args) => hash_password(args),
        Command::Healthcheck(args) => healthcheck(&args),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Into a buffer first: clap_complete panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "dockside", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)
                .map_err(|e| format!("cannot write the completion script: {e}"))
        }
        Command::Man => clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut std::io::stdout())
            .map_err(|e| format!("cannot write the manual page: {e}")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dockside: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn hash_password(args: HashArgs) -> Result<(), String> {
    use std::io::{BufRead, IsTerminal};
    let tty = std::io::stdin().is_terminal();
    // On a terminal, keep the password off the screen (stty, where there is one).
    let hidden = tty
        && std::process::Command::new("stty")
            .arg("-echo")
            .stdin(std::process::Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success());
    if tty {
        eprint!("password: ");
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if hidden {
        let _ = std::process::Command::new("stty")
            .arg("echo")
            .stdin(std::process::Stdio::inherit())
            .status();
        eprintln!();
    }
    read.map_err(|e| format!("cannot read the password: {e}"))?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err("empty password".into());
    }
    println!("{}", dockside::auth::hash_password(password, args.bcrypt)?);
    Ok(())
}

/// The access configuration: the `--config` file, else `DOCKSIDE_AUTH_CONFIG(_FILE)`, with the
/// `DOCKSIDE_AUTH_*` overrides from the environment.
/// `dockside healthcheck`: one plain-HTTP GET with std's blocking socket (no runtime to start
/// for one request), success only for a 200.
fn healthcheck(args: &HealthArgs) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    let rest = args
        .url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url {}: only http:// URLs", args.url))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let timeout = Duration::from_secs(args.timeout.max(1));
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))?;
    let mut conn = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("{}: {e}", args.url))?;
    conn.set_read_timeout(Some(timeout))
        .and_then(|()| conn.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{}: {e}", args.url))?;
    let mut head = Vec::new();
    conn.take(64 * 1024)
        .read_to_end(&mut head)
        .map_err(|e| format!("{}: {e}", args.url))?;
    let status_line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => Err(format!("{} answered {status_line:?}", args.url)),
    }
}

fn auth_config(file: Option<&PathBuf>) -> Result<Option<AuthConfig>, String> {
    let text = match file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the configuration {}: {e}", path.display()))?,
        ),
        None => None,
    };
    AuthConfig::from_settings(|k| std::env::var(k).ok(), text.as_deref()).map_err(|e| match file {
        Some(path) => format!("{}: {e}", path.display()),
        None => e,
    })
}

/// The mirror configuration of `--mirror-config`, with the native client for its upstreams.
fn mirror_config(file: Option<&PathBuf>) -> Result<Option<Arc<dockside::mirror::Mirror>>, String> {
    let Some(file) = file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let client = Arc::new(HyperClient::new()?);
    let m = dockside::mirror::Mirror::from_toml(&text, client)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    for u in &m.upstreams {
        tracing::info!(upstream = %u.url, prefix = %u.prefix, "mirroring");
    }
    Ok(Some(Arc::new(m)))
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let json = args.log_format == LogFormat::Json;
    let auth = auth_config(args.config.as_ref())?;
    match &auth {
        None => tracing::info!("access control is off: anyone may pull, push and delete"),
        Some(a) => tracing::info!(
            "access control is on: service {:?}, tokens valid {} s",
            a.service,
            a.token_ttl
        ),
    }
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    let limits = Limits {
        header_timeout: secs(args.header_timeout),
        body_timeout: secs(args.body_timeout),
        max_connections: args.max_connections.max(1),
        max_password_checks: args
            .max_password_checks
            .map_or_else(server::default_password_checks, usize::from),
        tls_handshake_timeout: secs(args.tls_handshake_timeout),
        ..Limits::default()
    };
    // A pair that cannot serve stops the start here, before any store is opened.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(Tls::load(cert, key)?)),
        _ => None,
    };
    raise_open_file_limit(limits.max_connections);
    tune_malloc();
    let config = Config {
        max_manifest_bytes: args.max_manifest_bytes,
        max_blob_bytes: args.max_blob_bytes,
        max_chunk_bytes: args.max_chunk_bytes,
        chunk_min_length: args.chunk_min_length,
        delete_enabled: !args.no_delete,
        tag_delete_enabled: !args.no_tag_delete,
        auth: auth.map(Arc::new),
        login_limits: dockside::LoginLimits {
            window_secs: args.login_window_secs,
            per_user_address: args.login_failures_per_user_address,
            per_user: args.login_failures_per_user,
            per_address: args.login_failures_per_address,
        },
        trust_forwarded_for: args.trust_forwarded_for,
        max_uploads: args.max_uploads,
        max_uploads_per_repository: args.max_uploads_per_repository,
        upload_expiry_secs: args.collect.upload_expiry_secs,
        mirror: mirror_config(args.mirror_config.as_ref())?,
        gc: gc_config(args.collect.gc_config.as_ref())?,
        ..Config::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async {
        let kv = StoreSpec::kv(args.store.kv.as_deref(), &args.store.data)?;
        let blobs = StoreSpec::blobs(args.store.blobs.as_deref(), &args.store.data)?;
        let s3 = matches!(blobs, StoreSpec::S3(_));
        if args.blob_redirect > 0 && !s3 {
            return Err(format!(
                "--blob-redirect needs an S3 blob store (--blobs s3://...): {} cannot make \
                 presigned URLs",
                blobs.describe()
            ));
        }
        // With S3 blobs, OCI-Chunk-Min-Length defaults to its 5 MiB part (the store says so).
        let config = Config {
            blob_redirect: secs(args.blob_redirect),
            ..config
        };
        let fsync = !args.store.no_fsync;
        let kv_store = open_kv(&kv, &args.store.kv_prefix, fsync).await?;
        let blob_store = open_blobs(&blobs, fsync).await?;
        let registry = server::registry(kv_store, blob_store, config, &limits)
            .map_err(|e| format!("cannot start the password checkers: {e}"))?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let metrics = match args.metrics_listen {
            None => None,
            Some(at) => {
                let l = tokio::net::TcpListener::bind(at)
                    .await
                    .map_err(|e| format!("cannot listen on {at} for metrics: {e}"))?;
                let local = l.local_addr().map_err(|e| e.to_string())?;
                let m = Arc::new(Metrics::new());
                tracing::info!("metrics on http://{local}/metrics");
                tokio::spawn(server::serve_metrics(l, m.clone(), limits.clone()));
                Some(m)
            }
        };
        if let Some(tls) = &tls {
            let m = metrics.clone();
            tokio::spawn(tls.clone().watch(move || {
                if let Some(m) = &m {
                    m.tls_reloaded();
                }
            }));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let redirect = match args.blob_redirect {
            0 => String::new(),
            n => format!(", blob GETs redirected to URLs valid {n} s"),
        };
        let stores = if kv.is_dir_of(&blobs) {
            format!("storing in {}", blobs.describe())
        } else {
            format!(
                "keys in {}, blobs in {}",
                kv.describe_kv(&args.store.kv_prefix),
                blobs.describe()
            )
        };
        tracing::info!("dockside listening on {scheme}://{addr}, {stores}{redirect}");
        let registry = Arc::new(registry);
        if args.gc_interval > 0 {
            tokio::spawn(collect_garbage(registry.clone(), args.gc_interval));
        }
        if args.collect.upload_expiry_secs > 0 || args.login_window_secs > 0 {
            tokio::spawn(purge_uploads(
                registry.clone(),
                args.collect.upload_expiry_secs,
            ));
        }
        // The rest (a request record) exists only with feature `testing`.
        #[allow(clippy::needless_update)]
        let ops = Ops {
            tls,
            metrics,
            json_log: json,
            ..Ops::default()
        };
        server::serve_registry(listener, registry, limits, ops, server::shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    })
}

/// Where a store lives, as the command line says.
enum StoreSpec {
    Dir(PathBuf),
    Redis(String),
    S3(String),
}

impl StoreSpec {
    /// `--kv`: a redis:// (or unix://) URL, else a directory; default `<data>/kv`.
    fn kv(arg: Option<&str>, data: &std::path::Path) -> Result<StoreSpec, String> {
        match arg {
            None => Ok(StoreSpec::Dir(data.join("kv"))),
            Some(a) if remote::is_redis_url(a) => Ok(StoreSpec::Redis(a.to_owned())),
            Some(a) if a.contains("://") => Err(format!(
                "--kv {a:?}: the key-value store is a directory or a redis:// URL"
            )),
            Some(a) => Ok(StoreSpec::Dir(PathBuf::from(a))),
        }
    }

    /// `--blobs`: an s3:// URL, else a directory; default `<data>`.
    fn blobs(arg: Option<&str>, data: &std::path::Path) -> Result<StoreSpec, String> {
        match arg {
            None => Ok(StoreSpec::Dir(data.to_owned())),
            Some(a) if a.starts_with("s3://") => Ok(StoreSpec::S3(a.to_owned())),
            Some(a) if a.contains("://") => Err(format!(
                "--blobs {:?}: the blob store is a directory or an s3:// URL",
                dockside::hosts::redis::redact(a)
            )),
            Some(a) => Ok(StoreSpec::Dir(PathBuf::from(a))),
        }
    }

    /// For the log: never a password (Redis URLs may carry one; S3 URLs carry none).
    fn describe(&self) -> String {
        match self {
            StoreSpec::Dir(d) => d.display().to_string(),
            StoreSpec::Redis(url) => dockside::hosts::redis::redact(url),
            StoreSpec::S3(url) => url.clone(),
        }
    }

    fn describe_kv(&self, prefix: &str) -> String {
        match self {
            StoreSpec::Redis(_) => format!("{} (prefix {prefix:?})", self.describe()),
            _ => self.describe(),
        }
    }

    /// The default layout: keys in `<data>/kv`, blobs in `<data>`.
    fn is_dir_of(&self, blobs: &StoreSpec) -> bool {
        matches!((self, blobs), (StoreSpec::Dir(k), StoreSpec::Dir(b)) if *k == b.join("kv"))
    }
}

/// Opens the key-value store; a store that cannot be used is an error, before listening.
async fn open_kv(spec: &StoreSpec, prefix: &str, fsync: bool) -> Result<ServerKv, String> {
    match spec {
        StoreSpec::Dir(dir) => {
            let open = || -> std::io::Result<FsKv> {
                let mut kv = FsKv::new(dir)?.fsync(fsync);
                // Test hooks (tests/listings.rs), not settings: see FsKv::listing_cache_min and
                // FsKv::listing_cache_max_age.
                if let Some(n) = std::env::var("DOCKSIDE_LISTING_CACHE_MIN")
                    .ok()
                    .and_then(|v| v.parse().ok())
                {
                    kv = kv.listing_cache_min(n);
                }
                if let Some(age) = std::env::var("DOCKSIDE_LISTING_CACHE_MAX_AGE")
                    .ok()
                    .and_then(|v| v.parse::<f64>().ok())
                    .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
                {
                    kv = kv.listing_cache_max_age(age);
                }
                kv.check_case_sensitive()?;
                Ok(kv)
            };
            open()
                .map(ServerKv::from)
                .map_err(|e| format!("cannot use key-value directory {}: {e}", dir.display()))
        }
        StoreSpec::Redis(url) => remote::open_redis(url, prefix).await.map(ServerKv::from),
        StoreSpec::S3(_) => unreachable!("--kv never names an S3 store"),
    }
}

/// Opens the blob store; a store that cannot be used (unreachable, wrong credentials, no such
/// bucket) is an error, before listening.
async fn open_blobs(spec: &StoreSpec, fsync: bool) -> Result<ServerBlobs, String> {
    match spec {
        StoreSpec::Dir(dir) => {
            let blobs = FsBlobs::new(dir)
                .map_err(|e| format!("cannot use blob directory {}: {e}", dir.display()))?
                .fsync(fsync);
            // What a crash or kill left mid-write: never visible as blobs, removed here.
            match blobs.clean_temporary(Duration::from_secs(600)) {
                Ok(0) => {}
                Ok(n) => tracing::info!("removed {n} stale temporary files"),
                Err(e) => tracing::warn!("could not sweep temporary files: {e}"),
            }
            Ok(ServerBlobs::from(blobs))
        }
        StoreSpec::S3(url) => remote::open_s3(url, |k| std::env::var(k).ok())
            .await
            .map(ServerBlobs::from),
        StoreSpec::Redis(_) => unreachable!("--blobs never names a Redis store"),
    }
}

/// `dockside gc`: one whole run (or a dry run) on the stores `serve` would open.
fn gc(args: GcArgs) -> Result<(), String> {
    let a = args.store;
    let config = Config {
        upload_expiry_secs: args.collect.upload_expiry_secs,
        gc: gc_config(args.collect.gc_config.as_ref())?,
        ..Config::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async {
        let kv = StoreSpec::kv(a.kv.as_deref(), &a.data)?;
        let blobs = StoreSpec::blobs(a.blobs.as_deref(), &a.data)?;
        let kv = open_kv(&kv, &a.kv_prefix, !a.no_fsync).await?;
        let blobs = open_blobs(&blobs, !a.no_fsync).await?;
        let registry = dockside::Registry::new(kv, blobs, config);
        let out = if args.dry_run {
            let report = registry.gc_dry_run().await.map_err(|e| e.to_string())?;
            for item in &report.items {
                println!("{item}");
            }
            serde_json::to_string(&report.stats)
        } else {
            let p = registry.gc_run().await.map_err(|e| e.to_string())?;
            serde_json::to_string(&p.last)
        };
        println!("{}", out.expect("serializes"));
        Ok(())
    })
}

fn gc_config(file: Option<&PathBuf>) -> Result<dockside::GcConfig, String> {
    match file {
        None => Ok(dockside::GcConfig::default()),
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read {}: {e}", f.display()))?;
            dockside::GcConfig::from_toml(&text).map_err(|e| format!("{}: {e}", f.display()))
        }
    }
}

/// Runs garbage collection every `every_secs`, step by step (each step bounded, so stores are
/// never held long).
async fn collect_garbage(registry: Arc<ServedRegistry>, every_secs: u64) {
    loop {
        tokio::time::sleep(Duration::from_secs(every_secs)).await;
        match registry.gc_run().await {
            Ok(p) => tracing::info!(stats = ?p.last, "garbage collection finished"),
            Err(e) => tracing::warn!("garbage collection failed: {e}"),
        }
    }
}

/// Purges stale upload sessions now and then (unless `expiry_secs` is 0): every quarter of the
/// expiry, at most hourly; with them, failed-login counts whose window has passed and lapsed
/// bookkeeping records (`gc::records`).
async fn purge_uploads(registry: Arc<ServedRegistry>, expiry_secs: u64) {
    let every = match expiry_secs {
        0 => Duration::from_secs(3600),
        s => Duration::from_secs((s / 4).clamp(1, 3600)),
    };
    loop {
        // 0 keeps sessions forever: purging "older than 0 s" would cancel every one.
        if expiry_secs > 0 {
            match registry.purge_stale_uploads(expiry_secs).await {
                Ok(0) => {}
                Ok(n) => tracing::info!("cancelled {n} upload sessions older than {expiry_secs} s"),
                Err(e) => tracing::warn!("purging stale uploads failed: {e}"),
            }
        }
        if let Err(e) = registry.purge_login_failures().await {
            tracing::warn!("purging failed-login counts failed: {e}");
        }
        match registry.purge_lapsed_records().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                "removed {n} lapsed records (upstream tokens, leases, upload counts)"
            ),
            Err(e) => tracing::warn!("purging lapsed records failed: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Raises the soft limit on open files towards what `max_connections` needs (a socket each,
/// plus a file or two for a request streaming a blob), as far as the hard limit allows: a
/// soft limit of 1024 is common, and would fail accepts long before `--max-connections`.
fn raise_open_file_limit(max_connections: usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let want = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(256);
    let lim = getrlimit(Resource::Nofile);
    let Some(current) = lim.current else {
        return; // unlimited
    };
    if current >= want {
        return;
    }
    let raised = lim.maximum.map_or(want, |max| max.min(want));
    if raised > current {
        let new = rustix::process::Rlimit {
            current: Some(raised),
            maximum: lim.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, new) {
            tracing::warn!("cannot raise the open-file limit from {current}: {e}");
            return;
        }
    }
    if raised < want {
        tracing::warn!(
            "the open-file limit ({raised}) is low for --max-connections {max_connections}: \
             accepts may fail before it is reached"
        );
    }
}

/// Tunes glibc's malloc for a server whose memory comes and goes in bursts.
///
/// - Large, short-lived buffers go back to the system when freed: an argon2id password check
///   allocates 19 MiB. glibc's malloc raises its mmap threshold to the largest block freed so
///   far (up to 32 MiB), after which such buffers come from its arenas, which keep them: with
///   password checks two at a time, a burst of 96 Basic requests still left 380 MB resident. A
///   fixed threshold (4 MiB) turns that adjustment off.
/// - But fixing it also fixes the trim threshold at its 128 KiB default, so each arena handed
///   its top back to the kernel (`madvise`) whenever 128 KiB of it was free, and faulted it in
///   again on the next allocation. A push streams through hyper's read buffers (up to ~400 KiB
///   each, freed once written): measured with curl pushing 1 GiB, 0.35 of the server's 2.0
///   CPU-s went to those page faults, and the push ran at 620-680 MB/s; with a 4 MiB trim
///   threshold, 1.65 CPU-s and 770-805 MB/s (docs/PERFORMANCE.md, issue 13). An arena now keeps
///   at most 4 MiB free at its top.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    // SAFETY: mallopt takes two integers and only sets a parameter of glibc's allocator (under
    // its own lock); no pointer or Rust object is involved.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20) == 1
    };
    if !ok {
        tracing::warn!("could not tune malloc: memory may stay high after bursts");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}
