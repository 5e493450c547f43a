//! Admission limits: a cap on open upload sessions, in total and per repository
//! ([`crate::Config::max_uploads`], [`crate::Config::max_uploads_per_repository`]). A POST
//! that would open one more gets 429 `TOOMANYREQUESTS` with `Retry-After`.
//!
//! The counts live in the key-value store, so they hold across instances: one counter record
//! for every repository together and one per repository ([`crate::layout`]), each updated by
//! compare-and-swap ([`crate::counters`]). Counting sessions by listing them would cost a
//! pass over the sessions (on Spin, over every key) per POST.
//!
//! A counter that is only added to and taken from would drift for good whenever a step is
//! lost: a crash between counting a session and writing it, or between closing it and
//! uncounting it, and sessions abandoned where no purge runs (the edge components). So a
//! count is kept per span of start times (`spans`: `[start, count]`, spans of 1/24 of the
//! horizon), and a span stops counting once every session in it is older than the horizon
//! (the upload expiry, `DOCKSIDE_UPLOAD_EXPIRY_SECS`, or a day when uploads never expire).
//! Closing or cancelling a session takes it from its span; an expired session stops counting
//! at most one span late whether or not anything purged it, and a count lost to a crash
//! lapses the same way. A session records whether it was counted, so only those are
//! uncounted.

use http::{StatusCode, header};
use serde::Deserialize;
use serde_json::json;

use crate::counters::{Update, update};
use crate::error::{Error, ErrorCode};
use crate::host::{BlobStore, KeyValue};
use crate::layout;
use crate::names::RepoName;
use crate::registry::{Registry, Result};

/// How long a session counts when uploads never expire.
const DEFAULT_HORIZON: u64 = 24 * 3600;

/// `Retry-After` of a refused POST: sessions close within seconds when pushes go well.
const RETRY_AFTER_SECS: u64 = 10;

#[derive(Deserialize, Default)]
struct Spans {
    spans: Vec<(u64, u64)>,
}

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    /// Seconds a session counts, and the span of start times counted together.
    fn horizon(&self) -> (u64, u64) {
        let h = match self.config.upload_expiry_secs {
            0 => DEFAULT_HORIZON,
            s => s,
        };
        (h, (h / 24).max(1))
    }

    /// The counters a session of `name` goes into: (key, cap, what it counts).
    fn upload_caps(&self, name: &RepoName) -> Vec<(String, u64, String)> {
        let mut out = Vec::new();
        if self.config.max_uploads_per_repository > 0 {
            out.push((
                layout::upload_count(name),
                self.config.max_uploads_per_repository,
                format!("in repository {name}"),
            ));
        }
        if self.config.max_uploads > 0 {
            out.push((
                layout::upload_count_total().to_owned(),
                self.config.max_uploads,
                "in this registry".to_owned(),
            ));
        }
        out
    }

    /// The spans of `raw` still counting at `now`.
    pub(crate) fn live_spans(&self, raw: Option<&[u8]>, now: u64) -> Vec<(u64, u64)> {
        let (horizon, span) = self.horizon();
        let spans: Spans = raw
            .and_then(|r| serde_json::from_slice(r).ok())
            .unwrap_or_default();
        spans
            .spans
            .into_iter()
            .filter(|&(start, n)| n > 0 && now < start.saturating_add(span + horizon))
            .collect()
    }

    /// Counts a new session of `name` started at `started`, or refuses it (429) when a cap is
    /// reached. `Ok(false)`: no cap is set, nothing was counted.
    pub(crate) async fn admit_upload(&self, name: &RepoName, started: u64) -> Result<bool> {
        let caps = self.upload_caps(name);
        if caps.is_empty() {
            return Ok(false);
        }
        let (_, span) = self.horizon();
        let bucket = started - started % span;
        let mut taken: Vec<String> = Vec::new();
        for (key, cap, what) in caps {
            let outcome = update(&self.kv, &key, |raw| {
                let mut spans = self.live_spans(raw, started);
                if spans.iter().map(|s| s.1).sum::<u64>() >= cap {
                    return Update::Keep(false);
                }
                match spans.iter_mut().find(|s| s.0 == bucket) {
                    Some(s) => s.1 += 1,
                    None => spans.push((bucket, 1)),
                }
                Update::Write(json!({ "spans": spans }), true)
            })
            .await;
            let refused = match outcome {
                Ok(Some(true)) => {
                    taken.push(key);
                    continue;
                }
                Ok(Some(false)) => format!(
                    "too many upload sessions open {what} (at most {cap}): finish or cancel \
                     some, or retry later"
                ),
                Ok(None) => "too many upload sessions starting at once: retry".to_owned(),
                Err(e) => {
                    self.uncount(&taken, started).await;
                    return Err(e.into());
                }
            };
            self.uncount(&taken, started).await;
            return Err(Error::new(
                ErrorCode::TooManyRequests,
                StatusCode::TOO_MANY_REQUESTS,
                refused,
            )
            .with_header(header::RETRY_AFTER, RETRY_AFTER_SECS.to_string()));
        }
        Ok(true)
    }

    /// Takes a counted session of `name` started at `started` from the counts (its close, its
    /// cancel, its purge). Never fails the request: a count that cannot be updated lapses
    /// with its span.
    pub(crate) async fn release_upload(&self, name: &RepoName, started: u64) {
        let keys: Vec<String> = self
            .upload_caps(name)
            .into_iter()
            .map(|(k, _, _)| k)
            .collect();
        self.uncount(&keys, started).await;
    }

    async fn uncount(&self, keys: &[String], started: u64) {
        let (_, span) = self.horizon();
        let bucket = started - started % span;
        let now = crate::auth::now_secs();
        for key in keys {
            let outcome = update(&self.kv, key, |raw| {
                let mut spans = self.live_spans(raw, now);
                let Some(s) = spans.iter_mut().find(|s| s.0 == bucket) else {
                    // Its span already lapsed (or was never counted here).
                    return Update::Keep(());
                };
                s.1 -= 1;
                spans.retain(|s| s.1 > 0);
                Update::Write(json!({ "spans": spans }), ())
            })
            .await;
            match outcome {
                Ok(Some(())) => {}
                Ok(None) => tracing::warn!(key, "an upload count could not be updated: it lapses"),
                Err(e) => tracing::warn!(key, error = %e, "an upload count could not be updated"),
            }
        }
    }
}
