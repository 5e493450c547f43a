//! A key-value host on Valkey or Redis (native only: feature `redis`, part of `server`).
//!
//! In the server, under a namespace prefix (default `dockside:`) so that several registries
//! can share one server:
//! ```text
//! <prefix>k:<key>     a string per key: the value (one key per fact, as everywhere)
//! <prefix>index       a sorted set of every key (the bare key as member, score 0), so that
//!                     ZRANGEBYLEX lists keys in byte order from a cursor: O(log n + page)
//! ```
//! The value and its index entry change together: `set` and `delete` are MULTI/EXEC
//! transactions, compare-and-swap is a Lua script (EVALSHA, loaded again on NOSCRIPT). Both
//! keys of a namespace must live on one server: Redis Cluster is not supported.
//!
//! Every command runs as a task on the tokio runtime [`RedisKv::connect`] ran on, so the
//! store is usable from any executor (the API tests drive it from plain threads) and a lost
//! connection is re-established in the background by the redis crate's `ConnectionManager`.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};
use tokio::runtime::Handle;

use crate::error::StoreError;
use crate::host::KeyValue;

/// The namespace used when none is given.
pub const DEFAULT_PREFIX: &str = "dockside:";

/// How long one attempt to open a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a command may wait for its answer (values are at most a few MiB).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection attempts after the connection drops, backing off from 100 ms to at most 1 s:
/// a request that meets a dead server fails within seconds instead of hanging.
const RECONNECT_RETRIES: usize = 2;

/// Sets `KEYS[1]` to `ARGV[3]` if its value is `ARGV[2]` (`ARGV[1]` = "1") or if it is absent
/// (`ARGV[1]` = "0"), and adds `ARGV[4]` to the index `KEYS[2]`. Lua runs atomically in the
/// server; GET of a missing key is `false` in Lua, which never equals a string.
const CAS_LUA: &str = r"
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur ~= ARGV[2] then return 0 end
elseif cur then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], 0, ARGV[4])
return 1
";

static CAS_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CAS_LUA));

/// A [`KeyValue`] store on Valkey/Redis. Cheap to clone: clones share the connection.
///
/// With blobs in S3 ([`crate::S3Blobs`]), the stores of a registry that any number of
/// instances can serve (`dockside serve --kv redis://... --blobs s3://...` builds exactly this):
///
/// ```no_run
/// use dockside::adapters::hyper_client::HyperClient;
/// use dockside::{Config, RedisKv, Registry, S3Blobs, S3Config};
///
/// # #[tokio::main] async fn main() -> Result<(), String> {
/// let kv = RedisKv::connect("redis://127.0.0.1:6379", "dockside:").await?;
/// let s3 = S3Config::from_url(
///     "s3://registry?endpoint=http://127.0.0.1:3900&region=garage",
///     |name| std::env::var(name).ok(),
/// )?;
/// let blobs = S3Blobs::new(&s3, HyperClient::new()?)?;
/// blobs.check().await.map_err(|e| e.to_string())?;
/// let registry = Registry::new(kv, blobs, Config::default());
/// # let _ = registry; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisKv {
    con: ConnectionManager,
    runtime: Handle,
    prefix: String,
}

impl std::fmt::Debug for RedisKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKv")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisKv {
    /// Connects to `url` (`redis://[user:password@]host[:port][/db]`, `rediss://` is not
    /// built in, `unix:///path`) and checks the server answers PING, so that a server started
    /// with an unreachable store refuses to start. Must run on a tokio runtime, which then
    /// carries every command. `prefix` namespaces every key (see [`DEFAULT_PREFIX`]).
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisKv, String> {
        let runtime = Handle::try_current()
            .map_err(|_| "the Redis key-value store needs a tokio runtime".to_owned())?;
        let client =
            redis::Client::open(url).map_err(|e| format!("invalid Redis URL {url:?}: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(Duration::from_secs(1));
        // On the runtime, like every later command: the manager spawns its tasks there.
        let setup = runtime.spawn(async move {
            let mut con = ConnectionManager::new_with_config(client, config).await?;
            redis::cmd("PING").query_async::<String>(&mut con).await?;
            let memory = redis::cmd("INFO")
                .arg("memory")
                .query_async::<String>(&mut con)
                .await
                .unwrap_or_default();
            RedisResult::Ok((con, memory))
        });
        let (con, memory) = match setup.await {
            Ok(Ok(ok)) => ok,
            Ok(Err(e)) => return Err(format!("cannot reach Redis at {}: {e}", redact(url))),
            Err(e) => return Err(format!("connecting to Redis failed: {e}")),
        };
        if let Some(policy) = eviction_policy(&memory)
            && policy != "noeviction"
        {
            // Eviction under memory pressure would silently drop tags, links and sessions.
            tracing::warn!(
                policy,
                "Redis evicts keys when full (maxmemory-policy); set it to noeviction"
            );
        }
        Ok(RedisKv {
            con,
            runtime,
            prefix: prefix.to_owned(),
        })
    }

    /// The same server and connection, under another namespace.
    pub fn with_prefix(&self, prefix: &str) -> RedisKv {
        RedisKv {
            prefix: prefix.to_owned(),
            ..self.clone()
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key holding the value of `key`.
    fn value_key(&self, key: &str) -> String {
        format!("{}k:{key}", self.prefix)
    }

    /// The Redis key of the sorted set indexing every key of the namespace.
    fn index_key(&self) -> String {
        format!("{}index", self.prefix)
    }

    /// Runs `op` on a clone of the connection, as a task on the store's runtime, and turns any
    /// failure (refused, timed out, dropped, a server error, the runtime gone) into a
    /// `StoreError` naming `what`.
    async fn run<T, F>(
        &self,
        what: impl FnOnce() -> String,
        op: impl FnOnce(ConnectionManager) -> F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = RedisResult<T>> + Send + 'static,
    {
        match self.runtime.spawn(op(self.con.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::new(format!("redis {}: {e}", what()))),
            Err(e) => Err(StoreError::new(format!("redis {}: {e}", what()))),
        }
    }
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// `maxmemory_policy` from the text of `INFO memory`, when the server reports it.
fn eviction_policy(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|l| l.strip_prefix("maxmemory_policy:"))
        .map(str::trim)
}

/// The ZRANGEBYLEX bounds of the keys that start with `prefix`, strictly after `after`.
/// Members compare as bytes (memcmp), like Rust strings. The upper bound is `prefix` followed
/// by 0xff, a byte UTF-8 never contains, so every key with the prefix sorts below it.
fn lex_range(prefix: &str, after: Option<&str>) -> (Vec<u8>, Vec<u8>) {
    let min = match after {
        // A cursor below the prefix would let in keys between it and the prefix.
        Some(a) if a >= prefix => [b"(", a.as_bytes()].concat(),
        _ => [b"[", prefix.as_bytes()].concat(),
    };
    let max = [b"[", prefix.as_bytes(), &[0xff]].concat();
    (min, max)
}

impl KeyValue for RedisKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let k = self.value_key(key);
        self.run(
            || format!("GET {key}"),
            |mut con| async move {
                redis::cmd("GET")
                    .arg(k)
                    .query_async::<Option<Vec<u8>>>(&mut con)
                    .await
            },
        )
        .await
    }

    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let (k, index, member, value) = (
            self.value_key(key),
            self.index_key(),
            key.to_owned(),
            value.to_vec(),
        );
        self.run(
            || format!("SET {key}"),
            |mut con| async move {
                redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(k)
                    .arg(value)
                    .ignore()
                    .cmd("ZADD")
                    .arg(index)
                    .arg(0)
                    .arg(member)
                    .ignore()
                    .exec_async(&mut con)
                    .await
            },
        )
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let (k, index, member) = (self.value_key(key), self.index_key(), key.to_owned());
        self.run(
            || format!("DEL {key}"),
            |mut con| async move {
                redis::pipe()
                    .atomic()
                    .cmd("DEL")
                    .arg(k)
                    .ignore()
                    .cmd("ZREM")
                    .arg(index)
                    .arg(member)
                    .ignore()
                    .exec_async(&mut con)
                    .await
            },
        )
        .await
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (min, max) = lex_range(prefix, after);
        let index = self.index_key();
        // A negative count would mean "no limit" to Redis.
        let count = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(
            || format!("ZRANGEBYLEX {prefix}"),
            |mut con| async move {
                redis::cmd("ZRANGEBYLEX")
                    .arg(index)
                    .arg(min)
                    .arg(max)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(count)
                    .query_async::<Vec<String>>(&mut con)
                    .await
            },
        )
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let (k, index, member) = (self.value_key(key), self.index_key(), key.to_owned());
        let (has_expected, expected) = match expected {
            Some(e) => ("1", e.to_vec()),
            None => ("0", Vec::new()),
        };
        let new = new.to_vec();
        let swapped = self
            .run(
                || format!("compare-and-swap {key}"),
                |mut con| async move {
                    CAS_SCRIPT
                        .key(k)
                        .key(index)
                        .arg(has_expected)
                        .arg(expected)
                        .arg(new)
                        .arg(member)
                        .invoke_async::<i64>(&mut con)
                        .await
                },
            )
            .await?;
        Ok(swapped == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::{eviction_policy, lex_range, redact};

    #[test]
    fn ranges() {
        assert_eq!(
            lex_range("a/", None),
            (b"[a/".to_vec(), b"[a/\xff".to_vec())
        );
        assert_eq!(
            lex_range("a/", Some("a/x")),
            (b"(a/x".to_vec(), b"[a/\xff".to_vec())
        );
        // A cursor before the prefix starts at the prefix.
        assert_eq!(lex_range("b/", Some("a")).0, b"[b/".to_vec());
        assert_eq!(lex_range("", None), (b"[".to_vec(), b"[\xff".to_vec()));
    }

    #[test]
    fn eviction_policy_is_read() {
        let info = "# Memory\r\nused_memory:1\r\nmaxmemory_policy:allkeys-lru\r\n";
        assert_eq!(eviction_policy(info), Some("allkeys-lru"));
        assert_eq!(eviction_policy("# Memory\r\n"), None);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact("redis://u@h"), "redis://u@h");
    }
}
