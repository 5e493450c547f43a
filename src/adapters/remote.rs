//! Opening the remote stores from their URLs, shared by every native adapter that uses them
//! (the `dockside serve` command line and the Lambda function): Valkey/Redis for keys, an S3
//! bucket for blobs. Each is checked before it is returned (Redis `PING`, S3 `HeadBucket`), so a
//! store that cannot be used ends the start with a message rather than failing every request.

use std::time::Duration;

use crate::adapters::hyper_client::HyperClient;
use crate::{RedisKv, S3Blobs, S3Config, StoreError, StoreErrorKind};

/// Whether `url` names a Valkey/Redis server (`redis://`, `rediss://`, `unix://`,
/// `redis+unix://`).
pub fn is_redis_url(url: &str) -> bool {
    ["redis://", "rediss://", "unix://", "redis+unix://"]
        .iter()
        .any(|s| url.starts_with(s))
}

/// Connects to Valkey/Redis at `url`, keys under `prefix`.
pub async fn open_redis(url: &str, prefix: &str) -> Result<RedisKv, String> {
    RedisKv::connect(url, prefix)
        .await
        .map_err(|e| format!("cannot use the key-value store: {e}"))
}

/// How long a start may wait for the S3 store to answer (its requests retry with backoff).
pub const S3_CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens the S3 bucket of `url` (`s3://BUCKET[/PREFIX]?endpoint=...`, [`S3Config::from_url`]),
/// credentials looked up with `get` (environment variables), and checks that it answers.
pub async fn open_s3(
    url: &str,
    get: impl Fn(&str) -> Option<String>,
) -> Result<S3Blobs<HyperClient>, String> {
    let config =
        S3Config::from_url(url, get).map_err(|e| format!("cannot use the blob store: {e}"))?;
    let blobs = S3Blobs::new(&config, HyperClient::new()?)?;
    let checked = tokio::time::timeout(S3_CHECK_TIMEOUT, blobs.check())
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::unavailable(format!(
                "no answer within {} s",
                S3_CHECK_TIMEOUT.as_secs()
            )))
        });
    checked.map_err(|e| {
        // An answer names its status; no answer is a transport failure.
        let unreachable = e.kind == StoreErrorKind::Unavailable && !e.message.starts_with("S3 ");
        format!(
            "cannot use S3 bucket {:?} at {}: {}{}",
            config.bucket,
            config.endpoint,
            if unreachable { "cannot reach it: " } else { "" },
            e.message
        )
    })?;
    Ok(blobs)
}
