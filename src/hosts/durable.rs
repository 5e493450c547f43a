//! The key-value store of the Cloudflare Worker: one Durable Object ([`RegistryKeys`]) holds the
//! registry's whole key space in its SQLite storage, and the Worker reaches it through
//! [`DurableKv`]; built only for the Worker (`wasm32-unknown-unknown`, feature `workers`).
//!
//! Why not Workers KV: it is eventually consistent (a write may take 60 s to be seen elsewhere)
//! and has no compare-and-swap, while upload sessions are compare-and-swapped (two PATCHes
//! racing on one session must not both win) and a tag must be read back as just written. A
//! Durable Object runs one request at a time with storage that is strongly consistent, and
//! SQLite gives ordered listing by prefix with a cursor (tags, catalog, referrers) from an index.
//!
//! Every operation is one request to the object: `POST /` with a JSON [`Op`], answered with
//! JSON. The object does each one with synchronous SQL calls and no `await` in between, so a
//! compare-and-swap is atomic: no other request runs inside it. Values travel base64-encoded.
//!
//! A SQLite row of a Durable Object holds at most 2 MB, and a manifest record may be 4 MiB and
//! more (the core's `max_manifest_bytes`). So a value is stored in parts of [`ROW_BYTES`]: the
//! first in `kv` (the table listings read), the rest in `kv_more`, numbered from 1. Each write
//! runs inside `storage.transactionSync`, so a value is replaced whole or not at all, even when
//! one of its statements fails half-way.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use worker::wasm_bindgen::closure::ScopedClosure;
use worker::wasm_bindgen::{JsCast as _, JsValue};
use worker::{
    DurableObject, Env, Method, Request, RequestInit, Response, SqlStorage, SqlStorageValue as Sql,
    State, Stub, durable_object, js_sys, wasm_bindgen,
};

use crate::error::StoreError;
use crate::host::KeyValue;

/// The most of a value one row holds: half a Durable Object's SQLite row limit (2 MB), leaving
/// room for the key.
pub const ROW_BYTES: usize = 1024 * 1024;

/// One operation on the key space.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    Get {
        key: String,
    },
    SetMany {
        entries: Vec<(String, String)>,
    },
    Delete {
        key: String,
    },
    List {
        prefix: String,
        after: Option<String>,
        limit: usize,
    },
    Cas {
        key: String,
        expected: Option<String>,
        new: String,
    },
}

/// The answer to an [`Op`].
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Value(Option<String>),
    Done,
    Keys(Vec<String>),
    Swapped(bool),
}

/// The Durable Object class that holds the keys (`wrangler.toml` binds it as `KEYS`, with a
/// `new_sqlite_classes` migration). The Worker uses one instance, by a fixed name.
#[durable_object(fetch)]
pub struct RegistryKeys {
    sql: SqlStorage,
    /// The object's `DurableObjectStorage`, for `transactionSync` (workers-rs has no binding).
    storage: JsValue,
}

impl DurableObject for RegistryKeys {
    fn new(state: State, _env: Env) -> Self {
        let sql = state.storage().sql();
        // WITHOUT ROWID: the table is its key index, ordered by the bytes of the key (SQLite's
        // BINARY collation compares UTF-8 with memcmp), the order `KeyValue::list` promises.
        // `kv_more` holds the parts after the first of values longer than one row; objects
        // created before it existed get it here, and none of their values has more parts.
        for table in [
            "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID",
            "CREATE TABLE IF NOT EXISTS kv_more (k TEXT NOT NULL, n INTEGER NOT NULL, \
             v BLOB NOT NULL, PRIMARY KEY (k, n)) WITHOUT ROWID",
        ] {
            if let Err(e) = sql.exec(table, Vec::<Sql>::new()) {
                worker::console_error!("dockside: cannot create the key tables: {e}");
            }
        }
        let storage = state
            .as_raw()
            .storage()
            .map(JsValue::from)
            .unwrap_or(JsValue::UNDEFINED);
        RegistryKeys { sql, storage }
    }

    async fn fetch(&self, mut req: Request) -> worker::Result<Response> {
        let op: Op = match req.json().await {
            Ok(op) => op,
            Err(e) => return Response::error(format!("bad operation: {e}"), 400),
        };
        match self.apply(op) {
            Ok(reply) => Response::from_json(&reply),
            Err(e) => Response::error(e.to_string(), 500),
        }
    }
}

impl RegistryKeys {
    fn get(&self, key: &str) -> worker::Result<Option<Vec<u8>>> {
        let cursor = self
            .sql
            .exec("SELECT v FROM kv WHERE k = ?", vec![Sql::from(key)])?;
        let Some(row) = cursor.raw().next() else {
            return Ok(None);
        };
        let mut value = blob(key, row?)?;
        // Only a full first part can have more.
        if value.len() >= ROW_BYTES {
            let more = self.sql.exec(
                "SELECT v FROM kv_more WHERE k = ? ORDER BY n",
                vec![Sql::from(key)],
            )?;
            for row in more.raw() {
                value.extend_from_slice(&blob(key, row?)?);
            }
        }
        Ok(Some(value))
    }

    /// Replaces the value of `key`, in parts of [`ROW_BYTES`]; within a transaction.
    fn set(&self, key: &str, value: &[u8]) -> worker::Result<()> {
        let mut parts = value.chunks(ROW_BYTES);
        let first = parts.next().unwrap_or_default();
        self.sql.exec(
            "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            vec![Sql::from(key), Sql::from(first.to_vec())],
        )?;
        self.sql
            .exec("DELETE FROM kv_more WHERE k = ?", vec![Sql::from(key)])?;
        for (n, part) in (1i64..).zip(parts) {
            self.sql.exec(
                "INSERT INTO kv_more (k, n, v) VALUES (?, ?, ?)",
                vec![Sql::from(key), Sql::from(n), Sql::from(part.to_vec())],
            )?;
        }
        Ok(())
    }

    /// Runs `f` inside `storage.transactionSync`: SQLite rolls back what it wrote if it fails
    /// (a Durable Object refuses `BEGIN`; its writes without an `await` between them are
    /// coalesced into one commit, but a statement that fails would leave the ones before it).
    fn transaction<T>(&self, f: impl FnOnce() -> worker::Result<T>) -> worker::Result<T> {
        let run = js_sys::Reflect::get(&self.storage, &JsValue::from_str("transactionSync"))
            .ok()
            .and_then(|f| f.dyn_into::<js_sys::Function>().ok())
            .ok_or_else(|| worker::Error::RustError("no storage.transactionSync".into()))?;
        let mut f = Some(f);
        let mut out = None;
        let mut body = || -> Result<(), JsValue> {
            let Some(f) = f.take() else {
                return Err(JsValue::from_str("the transaction ran twice"));
            };
            let result = f();
            let failed = result.is_err();
            out = Some(result);
            if failed {
                // Thrown, so that transactionSync rolls back.
                Err(JsValue::from_str("rolled back"))
            } else {
                Ok(())
            }
        };
        let callback = ScopedClosure::<dyn FnMut() -> Result<(), JsValue>>::borrow_mut(&mut body);
        let called = run.call1(&self.storage, callback.as_js_value());
        drop(callback);
        match (out, called) {
            (Some(result), _) => result,
            (None, Err(e)) => Err(worker::Error::from(e)),
            (None, Ok(_)) => Err(worker::Error::RustError(
                "transactionSync did not run its callback".into(),
            )),
        }
    }

    /// Synchronous from start to end: a Durable Object runs no other request meanwhile.
    fn apply(&self, op: Op) -> worker::Result<Reply> {
        let decode = |v: &str| {
            B64.decode(v)
                .map_err(|e| worker::Error::RustError(format!("bad base64 value: {e}")))
        };
        Ok(match op {
            Op::Get { key } => Reply::Value(self.get(&key)?.map(|v| B64.encode(v))),
            Op::SetMany { entries } => {
                let entries = entries
                    .into_iter()
                    .map(|(k, v)| Ok((k, decode(&v)?)))
                    .collect::<worker::Result<Vec<_>>>()?;
                self.transaction(|| {
                    for (k, v) in &entries {
                        self.set(k, v)?;
                    }
                    Ok(())
                })?;
                Reply::Done
            }
            Op::Delete { key } => {
                self.transaction(|| {
                    for table in ["kv", "kv_more"] {
                        self.sql.exec(
                            &format!("DELETE FROM {table} WHERE k = ?"),
                            vec![Sql::from(key.as_str())],
                        )?;
                    }
                    Ok(())
                })?;
                Reply::Done
            }
            Op::List {
                prefix,
                after,
                limit,
            } => {
                // From the later of the prefix and the cursor, in key order; the keys with the
                // prefix come first and together, so the page ends at the first one without.
                let limit = i64::try_from(limit.min(100_000)).unwrap_or(100_000);
                let cursor = match after {
                    Some(a) if a >= prefix => self.sql.exec(
                        "SELECT k FROM kv WHERE k > ? ORDER BY k LIMIT ?",
                        vec![Sql::from(a), Sql::from(limit)],
                    )?,
                    _ => self.sql.exec(
                        "SELECT k FROM kv WHERE k >= ? ORDER BY k LIMIT ?",
                        vec![Sql::from(prefix.as_str()), Sql::from(limit)],
                    )?,
                };
                let mut keys = Vec::new();
                for row in cursor.raw() {
                    let Some(Sql::String(k)) = row?.into_iter().next() else {
                        continue;
                    };
                    if !k.starts_with(&prefix) {
                        break;
                    }
                    keys.push(k);
                }
                Reply::Keys(keys)
            }
            Op::Cas { key, expected, new } => {
                let expected = expected.as_deref().map(decode).transpose()?;
                let new = decode(&new)?;
                if self.get(&key)? != expected {
                    Reply::Swapped(false)
                } else {
                    self.transaction(|| self.set(&key, &new))?;
                    Reply::Swapped(true)
                }
            }
        })
    }
}

/// The value in a row of one `v` column.
fn blob(key: &str, row: Vec<Sql>) -> worker::Result<Vec<u8>> {
    match row.into_iter().next() {
        Some(Sql::Blob(v)) => Ok(v),
        Some(Sql::String(v)) => Ok(v.into_bytes()),
        other => Err(worker::Error::RustError(format!(
            "unexpected value for {key}: {other:?}"
        ))),
    }
}

/// The registry's [`KeyValue`] store: requests to the [`RegistryKeys`] object behind `stub`.
#[derive(Clone)]
pub struct DurableKv {
    stub: std::rc::Rc<Stub>,
}

impl DurableKv {
    /// The store held by the object named `name` in the namespace `keys` (the `KEYS` binding).
    pub fn open(keys: &worker::ObjectNamespace, name: &str) -> Result<Self, StoreError> {
        let stub = keys
            .get_by_name(name)
            .map_err(|e| StoreError::new(format!("Durable Object {name}: {e}")))?;
        Ok(DurableKv {
            stub: std::rc::Rc::new(stub),
        })
    }

    async fn call(&self, op: &Op) -> Result<Reply, StoreError> {
        let failed = |e: worker::Error| StoreError::unavailable(format!("key store: {e}"));
        let body = serde_json::to_string(op).map_err(|e| StoreError::new(e.to_string()))?;
        let mut init = RequestInit::new();
        init.with_method(Method::Post)
            .with_body(Some(wasm_bindgen::JsValue::from_str(&body)));
        // The host part is never resolved: a stub delivers every request to its object.
        let req = Request::new_with_init("https://keys/", &init).map_err(failed)?;
        let mut resp = self.stub.fetch_with_request(req).await.map_err(failed)?;
        if resp.status_code() != 200 {
            let text = resp.text().await.unwrap_or_default();
            return Err(StoreError::new(format!(
                "key store answered {}: {text}",
                resp.status_code()
            )));
        }
        resp.json().await.map_err(failed)
    }
}

fn unexpected(reply: &Reply) -> StoreError {
    let what = match reply {
        Reply::Value(_) => "a value",
        Reply::Done => "done",
        Reply::Keys(_) => "keys",
        Reply::Swapped(_) => "a swap",
    };
    StoreError::new(format!("key store: unexpected answer ({what})"))
}

impl KeyValue for DurableKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.call(&Op::Get { key: key.into() }).await? {
            Reply::Value(None) => Ok(None),
            Reply::Value(Some(v)) => B64
                .decode(v)
                .map(Some)
                .map_err(|e| StoreError::new(format!("key store: bad base64: {e}"))),
            other => Err(unexpected(&other)),
        }
    }

    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.set_many(vec![(key.to_owned(), Bytes::copy_from_slice(value))])
            .await
    }

    /// One request for the whole batch.
    async fn set_many(&self, entries: Vec<(String, Bytes)>) -> Result<(), StoreError> {
        let entries = entries
            .into_iter()
            .map(|(k, v)| (k, B64.encode(v)))
            .collect();
        match self.call(&Op::SetMany { entries }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.call(&Op::Delete { key: key.into() }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let op = Op::List {
            prefix: prefix.into(),
            after: after.map(Into::into),
            limit,
        };
        match self.call(&op).await? {
            Reply::Keys(keys) => Ok(keys),
            other => Err(unexpected(&other)),
        }
    }

    /// Atomic: the object compares and writes within one synchronous step.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let op = Op::Cas {
            key: key.into(),
            expected: expected.map(|v| B64.encode(v)),
            new: B64.encode(new),
        };
        match self.call(&op).await? {
            Reply::Swapped(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }
}
