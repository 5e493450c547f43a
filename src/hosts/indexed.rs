//! Listing indexes over a key-value store that cannot list by prefix.
//!
//! Spin's key-value API lists every key of the store, unordered and unfiltered, so a tags list
//! read through it costs O(keys in the store), chunk keys of every blob included (a few GiB of
//! layers are thousands of keys). [`IndexedKv`] wraps such a store, as `object_store`'s
//! wrappers wrap a store: for the listings the core makes (a repository's tags, the catalog,
//! the referrers of one subject; [`layout::listing_of`]), it keeps one index value per listing,
//! a sorted JSON array of the listed keys, updated by compare-and-swap whenever a listed key is
//! set or deleted. A page then costs one `get` of that value: O(entries listed), whatever else
//! the store holds.
//!
//! This trades "one key per fact" for the listing, knowingly and only on hosts without prefix
//! listing: every tag push rewrites its repository's index (O(tags) bytes), and racing writers
//! retry their compare-and-swap. Order keeps the failure modes benign: a key is written before
//! it is added to the index and removed from the index before it is deleted, so a crash in
//! between leaves a key that exists but is not listed, never a listed key that does not exist
//! (a later write of the same key lists it again).
//!
//! A store written before indexes existed: its first write of a listed key builds every index
//! from one pass over the store, then sets a marker ([`layout::listing_index_marker`]). Until
//! the marker exists, listings go through the store's own listing; once it does, a listing
//! without an index is empty (a subject with no referrers costs one `get`, not a pass).
//!
//! An index must fit in one value: Fermyon Cloud's 1 MB values hold some 25 000 tags of a
//! repository.

use crate::error::{StoreError, StoreErrorKind};
use crate::host::KeyValue;
use crate::layout;

/// Attempts at updating one index before giving up (each lost one means another writer won).
const ATTEMPTS: usize = 64;

/// A key-value store with listing indexes kept beside its keys.
#[derive(Clone)]
pub struct IndexedKv<K>(pub K);

fn parse(raw: &[u8]) -> Result<Vec<String>, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::new(format!("corrupt listing index: {e}")))
}

impl<K: KeyValue> IndexedKv<K> {
    /// Builds every listing index from one pass over the store, once per store: what was
    /// written before indexes existed becomes listed. Racing builders write the same indexes;
    /// an index already there is kept (it was made by a builder or a write since).
    async fn ensure_indexed(&self) -> Result<(), StoreError> {
        let marker = layout::listing_index_marker();
        if self.0.get(marker).await?.is_some() {
            return Ok(());
        }
        let mut indexes: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for key in self.0.list("", None, usize::MAX).await? {
            if let Some(prefix) = layout::listing_of(&key) {
                indexes
                    .entry(prefix.to_owned())
                    .or_default()
                    .push(key[prefix.len()..].to_owned());
            }
        }
        for (prefix, mut members) in indexes {
            members.sort();
            let v = serde_json::to_vec(&members).expect("serializes");
            self.0
                .compare_and_swap(&layout::listing_index(&prefix), None, &v)
                .await?;
        }
        self.0.set(marker, b"1").await
    }

    /// Adds (`add`) or removes the key `key`, listed under `prefix`, to or from its index.
    async fn update(&self, prefix: &str, key: &str, add: bool) -> Result<(), StoreError> {
        self.ensure_indexed().await?;
        let index = layout::listing_index(prefix);
        let member = &key[prefix.len()..];
        for _ in 0..ATTEMPTS {
            let current = self.0.get(&index).await?;
            let mut members = match &current {
                Some(raw) => parse(raw)?,
                None if !add => return Ok(()),
                None => Vec::new(),
            };
            match (members.binary_search_by(|m| m.as_str().cmp(member)), add) {
                (Ok(_), true) | (Err(_), false) => return Ok(()),
                (Err(at), true) => members.insert(at, member.to_owned()),
                (Ok(at), false) => {
                    members.remove(at);
                }
            }
            let new = serde_json::to_vec(&members).expect("serializes");
            if self
                .0
                .compare_and_swap(&index, current.as_deref(), &new)
                .await?
            {
                return Ok(());
            }
        }
        Err(StoreError {
            message: format!("listing index {index}: too many concurrent updates"),
            kind: StoreErrorKind::Unavailable,
        })
    }
}

impl<K: KeyValue> KeyValue for IndexedKv<K> {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key).await
    }

    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.0.set(key, value).await?;
        if let Some(prefix) = layout::listing_of(key) {
            self.update(prefix, key, true).await?;
        }
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        if let Some(prefix) = layout::listing_of(key) {
            self.update(prefix, key, false).await?;
        }
        self.0.delete(key).await
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        // Only a listing's own prefix has an index (probe with a key that would be under it).
        let indexed = layout::listing_of(&format!("{prefix}x")) == Some(prefix);
        if !indexed {
            return self.0.list(prefix, after, limit).await;
        }
        let members = match self.0.get(&layout::listing_index(prefix)).await? {
            Some(raw) => parse(&raw)?,
            None if self.0.get(layout::listing_index_marker()).await?.is_some() => Vec::new(),
            // A store from before indexes, not written since.
            None => return self.0.list(prefix, after, limit).await,
        };
        let start = match after.and_then(|a| a.strip_prefix(prefix)) {
            Some(a) => members.partition_point(|m| m.as_str() <= a),
            // A cursor before the prefix starts at the beginning; one after it, past the end.
            None if after.is_some_and(|a| a > prefix) => members.len(),
            None => 0,
        };
        Ok(members[start..]
            .iter()
            .take(limit)
            .map(|m| format!("{prefix}{m}"))
            .collect())
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let swapped = self.0.compare_and_swap(key, expected, new).await?;
        if swapped && let Some(prefix) = layout::listing_of(key) {
            self.update(prefix, key, true).await?;
        }
        Ok(swapped)
    }
}
