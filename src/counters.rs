//! Counter records in the key-value store, updated by compare-and-swap: what the login throttle
//! ([`crate::throttle`]) and the upload admission limits ([`crate::admission`]) share.
//!
//! A counter is one small JSON record under its own key. Every update reads it, computes the
//! new value and swaps it in only if nobody changed it meanwhile, retrying on a lost race. Each
//! written value carries a fresh random `id`: two writers that raced from the same count would
//! otherwise write identical bytes, and a host that reports a swap as failed and is then read
//! back (Spin 4.0.2's Redis store, see `adapters/spin.rs`) could not tell the loser from the
//! winner.

use crate::error::StoreError;
use crate::host::KeyValue;

/// Attempts at one update before giving up (each lost attempt means another writer won).
pub(crate) const ATTEMPTS: usize = 32;

/// What an update decided, given the current value.
pub(crate) enum Update<T> {
    /// Write this value (its `id` is set here), then return the `T`.
    Write(serde_json::Value, T),
    /// Leave the record as it is and return the `T`.
    Keep(T),
}

/// Runs `f` on the current value of `key` (`None`: absent) until its decision is written
/// without a race, or kept. `Ok(None)`: every attempt lost a race.
pub(crate) async fn update<K: KeyValue, T>(
    kv: &K,
    key: &str,
    mut f: impl FnMut(Option<&[u8]>) -> Update<T>,
) -> Result<Option<T>, StoreError> {
    for _ in 0..ATTEMPTS {
        let current = kv.get(key).await?;
        match f(current.as_deref()) {
            Update::Keep(t) => return Ok(Some(t)),
            Update::Write(mut value, t) => {
                value["id"] = serde_json::Value::String(nonce());
                let new = serde_json::to_vec(&value).expect("a JSON value always serializes");
                if kv.compare_and_swap(key, current.as_deref(), &new).await? {
                    return Ok(Some(t));
                }
            }
        }
    }
    Ok(None)
}

fn nonce() -> String {
    let mut b = [0u8; 8];
    // Without randomness the value still changes with the count; only Spin's read-back check
    // would be weaker. Never fail a request for it.
    let _ = getrandom::fill(&mut b);
    crate::digest::to_hex(&b)
}
