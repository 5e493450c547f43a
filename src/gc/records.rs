//! Bookkeeping records that outlive their use: a cached upstream token past its expiry
//! (`mirror-tokens/`, one per upstream, user and repository scope a mirror ever pulled), a
//! mirror lease left by a fetcher that crashed (`mirror-leases/`, released otherwise), and an
//! upload-count record whose spans have all lapsed (`upload-counts/`, one per repository ever
//! pushed to with a cap on). Nothing reads them as anything but absent, so they only take
//! keys: a mirror of many repositories, or a registry with caps, would gather them for good.
//! The collector's first phase removes them (so `dockside gc` and the edge components'
//! collection requests do), and the native server's periodic purge, with failed-login counts.
//!
//! Each is judged from one read and deleted after it; the key-value interface has no
//! conditional delete. A record renewed in between is lost: a token is fetched again; a lease
//! (judged only a minute after its expiry, when waiters have long taken it over) lets one
//! more fetch of that blob run, which writes the same verified bytes; an upload count loses
//! one session for at most the upload expiry (the cap is a bound on load, not an account).

use serde::Deserialize;

use crate::error::StoreError;
use crate::host::{BlobStore, KeyValue};
use crate::layout;
use crate::registry::Registry;

/// How long past its expiry a lease is left: one that a waiter is taking over right at its
/// expiry must not be judged from its old value.
const LEASE_LAPSED_AFTER_SECS: u64 = 60;

#[derive(Deserialize)]
struct Expiring {
    expires: u64,
}

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    /// The bookkeeping keys that have lapsed at `now` (see the module's description).
    pub(crate) async fn lapsed_records(&self, now: u64) -> Result<Vec<String>, StoreError> {
        let mut lapsed = Vec::new();
        // How each kind lapses: at its `expires` plus a margin, or (`None`) when none of its
        // upload-count spans is live.
        for (prefix, margin) in [
            (
                layout::mirror_leases_prefix(),
                Some(LEASE_LAPSED_AFTER_SECS),
            ),
            (layout::mirror_tokens_prefix(), Some(0)),
            (layout::upload_counts_prefix(), None),
        ] {
            // One listing each (see `purge_stale_uploads`).
            for key in self.kv.list(prefix, None, usize::MAX).await? {
                let Some(raw) = self.kv.get(&key).await? else {
                    continue;
                };
                let gone = match margin {
                    None => self.live_spans(Some(&raw), now).is_empty(),
                    // Unreadable reads as absent (a free lease, no token): nothing to keep.
                    Some(margin) => serde_json::from_slice::<Expiring>(&raw)
                        .map_or(true, |e| e.expires.saturating_add(margin) <= now),
                };
                if gone {
                    lapsed.push(key);
                }
            }
        }
        Ok(lapsed)
    }

    /// Deletes the bookkeeping keys that have lapsed; returns how many.
    pub async fn purge_lapsed_records(&self) -> Result<usize, StoreError> {
        let lapsed = self.lapsed_records(crate::auth::now_secs()).await?;
        for key in &lapsed {
            self.kv.delete(key).await?;
        }
        Ok(lapsed.len())
    }
}
