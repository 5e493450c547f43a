//! Online garbage collection: mark and sweep over the two stores, in bounded, resumable steps,
//! while pushes go on. Runs on the host traits only, so on every host.
//!
//! A run has phases, each resumable from a cursor kept in the key-value store (`gc/state`):
//! 1. `uploads`: stale upload sessions are cancelled (`Registry::purge_stale_uploads`), and
//!    lapsed bookkeeping records (upstream tokens, crashed fetchers' leases, upload counts)
//!    deleted (`records`).
//! 2. `repositories`, one repository at a time, in catalog order: retention rules remove tags;
//!    manifests no tag, index or young age keeps alive go (only with `untagged`), and so do
//!    referrers whose subject is gone; blob links no surviving manifest references go; an
//!    emptied repository leaves the catalog, with its cache (mirror records).
//!    A repository larger than a step's budget is judged in pages on the admin request, its
//!    retention order and marks kept in the key-value store (`paged`).
//!    Every blob a surviving link reaches is *marked*: its `gc/blobs/<digest>` record gets the
//!    run's generation (one compare-and-swap per live blob per run, none if already marked).
//! 3. `blobs`: every `gc/blobs/<digest>` record (one per stored blob, written when the blob is
//!    written or linked) not marked by this run, and last touched a grace period before the run
//!    started, is claimed, its content deleted, then the record: one read per blob, however
//!    many repositories there are.
//!
//! Safety against pushes (the argument is in docs/DESIGN.md, "Garbage collection"): every
//! write that makes content reachable first *touches* a time (`at`) by compare-and-swap: a blob
//! commit or mount its `gc/blobs` record, a manifest push each link and child manifest it
//! references. The collector deletes only what is older than the grace period, and claims it by
//! a compare-and-swap from the exact value it judged (to `gone`/`deleting`) before deleting it:
//! a touch between judgement and claim makes the claim fail, and a claimed item reads as absent,
//! so a push racing the claim gets a clean error (blob unknown, or 503 to retry), never a
//! manifest that references deleted bytes.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::blobs::BlobLink;
use crate::digest::Digest;
use crate::error::{Error, ErrorCode, StoreError};
use crate::host::{BlobStore, KeyValue};
use crate::layout;
use crate::manifests::{StoredManifest, decode_record, encode_record, references_of};
use crate::names::RepoName;
use crate::registry::Registry;

mod paged;
mod records;

pub use paged::{RepoProgress, Stage};

type StoreResult<T> = std::result::Result<T, StoreError>;

/// What garbage collection keeps and how it steps. TOML (`DOCKSIDE_GC_CONFIG`, `--gc-config`):
///
/// ```toml
/// grace_secs = 3600        # never delete what was written, linked or referenced this recently
/// untagged = false         # also collect manifests no tag (or tagged index) reaches
/// step_items = 500         # work per step (keys judged), the bound on one admin request
///
/// [[retention]]            # the first rule whose pattern matches a repository applies
/// repositories = "team/**" # `*`: any run but `/`, `**`: any run
/// keep_newest = 10         # keep the 10 most recently pushed tags ...
/// keep_younger_than_secs = 604800   # ... and any pushed within a week
/// protect = ["v*", "latest"]        # never removed
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcConfig {
    pub grace_secs: u64,
    pub untagged: bool,
    pub step_items: usize,
    pub retention: Vec<RetentionRule>,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            grace_secs: 3600,
            untagged: false,
            step_items: 500,
            retention: Vec::new(),
        }
    }
}

/// Which tags of the repositories matching `repositories` to keep. A tag is kept if it matches
/// a `protect` pattern, or is among the `keep_newest` most recently pushed, or was pushed within
/// `keep_younger_than_secs`; a rule with neither keep condition keeps every tag.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    pub repositories: String,
    #[serde(default)]
    pub keep_newest: Option<usize>,
    #[serde(default)]
    pub keep_younger_than_secs: Option<u64>,
    #[serde(default)]
    pub protect: Vec<String>,
}

impl GcConfig {
    pub fn from_toml(text: &str) -> std::result::Result<Self, String> {
        let c: GcConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if c.step_items == 0 {
            return Err("step_items must be at least 1".into());
        }
        Ok(c)
    }
}

/// What a collection removed (or, dry, would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GcStats {
    pub uploads: u64,
    pub tags: u64,
    pub manifests: u64,
    pub links: u64,
    pub blobs: u64,
    pub bytes: u64,
    pub repositories: u64,
    /// Lapsed bookkeeping records (upload counts, upstream tokens, leases: `gc/records.rs`).
    pub records: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Idle,
    Uploads,
    Repositories,
    Blobs,
}

/// The collector's state, kept in the key-value store so any process or request resumes it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GcProgress {
    /// Runs started so far; this one's number while one is under way.
    pub generation: u64,
    pub phase: Phase,
    /// The last repository or blob record done in the current phase.
    pub cursor: Option<String>,
    pub started: u64,
    /// The repository being judged in pages (larger than one step's budget), and where in it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo: Option<RepoProgress>,
    /// Whether this run marks live blobs in their records (a run started by a version that
    /// did not is restarted: its blob phase would find no marks).
    pub marks: bool,
    /// This run's counts so far.
    pub stats: GcStats,
    /// The last finished run: when it ended, and what it removed.
    pub finished: Option<u64>,
    pub last: Option<GcStats>,
}

impl GcProgress {
    /// Whether no run is under way (the last one finished).
    pub fn done(&self) -> bool {
        self.phase == Phase::Idle
    }
}

/// The blob record (`gc/blobs/<digest>`).
#[derive(Serialize, Deserialize)]
struct BlobRecord {
    at: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    deleting: bool,
    /// The generation of the last run whose repository phase found a live link to it.
    #[serde(default, skip_serializing_if = "is_zero")]
    mark: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A dry run's account: the counts and one line per item that would go.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub stats: GcStats,
    pub items: Vec<String>,
}

/// One pass's context: the times it judges by, and in a dry run what it pretended to remove.
struct Sweep {
    dry: bool,
    now: u64,
    /// When the run started: blob records are judged by it (their marks are this run's).
    started: u64,
    /// The run's generation, the mark of a live blob.
    generation: u64,
    stats: GcStats,
    items: Vec<String>,
    /// Dry runs only: the blobs a real run would have marked (a dry run writes nothing).
    marked: HashSet<Digest>,
}

impl Sweep {
    fn note(&mut self, item: impl FnOnce() -> String) {
        if self.dry {
            self.items.push(item());
        }
    }
}

fn now_secs() -> u64 {
    crate::auth::now_secs()
}

/// A grace of a quarter: a touch is skipped while the time it would replace is this recent,
/// so a push of many images over the same layers does not rewrite their links every time.
pub(crate) fn fresh(at: u64, now: u64, grace: u64) -> bool {
    at.saturating_add(grace / 4) > now
}

fn corrupt(what: &str, key: &str) -> StoreError {
    StoreError::new(format!("corrupt {what} at {key}"))
}

/// Touches go through compare-and-swap; a lost race is retried this many times.
pub(crate) const TOUCH_ATTEMPTS: usize = 16;

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    /// Marks blob `digest` as written or linked now, before the caller trusts stored content or
    /// links it. 503 (retry) while the collector is deleting it.
    pub(crate) async fn touch_blob(&self, digest: &Digest) -> crate::registry::Result<()> {
        let key = layout::gc_blob(digest);
        let grace = self.config.gc.grace_secs;
        for _ in 0..TOUCH_ATTEMPTS {
            let now = now_secs();
            let raw = self.kv.get(&key).await?;
            let mut mark = 0;
            if let Some(raw) = &raw {
                let r: BlobRecord =
                    serde_json::from_slice(raw).map_err(|_| corrupt("blob record", &key))?;
                if r.deleting {
                    return Err(collecting(digest));
                }
                if fresh(r.at, now, grace) {
                    return Ok(());
                }
                mark = r.mark;
            }
            let new = serde_json::to_vec(&BlobRecord {
                at: now,
                deleting: false,
                mark,
            })
            .expect("serializes");
            if self.kv.compare_and_swap(&key, raw.as_deref(), &new).await? {
                return Ok(());
            }
        }
        Err(collecting(digest))
    }

    /// A manifest push's check of a blob it references: the link's size if `name` links it,
    /// with the link's time touched (so the collector spares it while the push completes).
    pub(crate) async fn touch_link(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> crate::registry::Result<Option<u64>> {
        let key = layout::blob_link(name, digest);
        for _ in 0..TOUCH_ATTEMPTS {
            let now = now_secs();
            let Some(raw) = self.kv.get(&key).await? else {
                return Ok(None);
            };
            let mut link = BlobLink::decode(&raw)?;
            if link.gone {
                return Ok(None);
            }
            if fresh(link.at, now, self.config.gc.grace_secs) {
                return Ok(Some(link.size));
            }
            link.at = now;
            if self
                .kv
                .compare_and_swap(&key, Some(&raw), &link.encode())
                .await?
            {
                return Ok(Some(link.size));
            }
        }
        Err(collecting(digest))
    }

    /// A manifest push's check of a child manifest: its length, with its time touched.
    pub(crate) async fn touch_manifest(
        &self,
        name: &RepoName,
        digest: &Digest,
    ) -> crate::registry::Result<Option<u64>> {
        let key = layout::manifest(name, digest);
        for _ in 0..TOUCH_ATTEMPTS {
            let now = now_secs();
            let Some(raw) = self.kv.get(&key).await? else {
                return Ok(None);
            };
            let m = decode_record(raw.clone())?;
            if m.gone {
                return Ok(None);
            }
            if fresh(m.at, now, self.config.gc.grace_secs) {
                return Ok(Some(m.bytes.len() as u64));
            }
            let new = encode_record(&m.media_type, m.subject.as_ref(), &m.bytes, now, false);
            if self.kv.compare_and_swap(&key, Some(&raw), &new).await? {
                return Ok(Some(m.bytes.len() as u64));
            }
        }
        Err(collecting(digest))
    }

    /// The collector's state, as stored.
    pub async fn gc_progress(&self) -> StoreResult<GcProgress> {
        Ok(self.load_progress().await?.1)
    }

    async fn load_progress(&self) -> StoreResult<(Option<Vec<u8>>, GcProgress)> {
        let raw = self.kv.get(layout::gc_state()).await?;
        let p = match &raw {
            None => GcProgress::default(),
            Some(r) => serde_json::from_slice(r)
                .map_err(|_| corrupt("collector state", layout::gc_state()))?,
        };
        Ok((raw, p))
    }

    /// Runs one bounded step of garbage collection (about `step_items` keys judged or store
    /// calls made; a repository larger than that is judged in pages, `paged`), starting a run if none is under way, and saves where it stopped.
    /// Returns the state after the step: `done()` once the run has finished. Concurrent steps
    /// are safe (every deletion is claimed by compare-and-swap); the state is saved by
    /// compare-and-swap too, so of two steps from the same state one saves and the other's
    /// work is redone, idempotently, by the next.
    pub async fn gc_step(&self) -> StoreResult<GcProgress> {
        self.step(false).await
    }

    /// One step; `whole`: judge each repository in one go, however large (native runs, which
    /// have no request time limit), instead of in pages of about `step_items` store calls.
    async fn step(&self, whole: bool) -> StoreResult<GcProgress> {
        let (raw, mut p) = self.load_progress().await?;
        let now = now_secs();
        if p.phase == Phase::Idle || !p.marks {
            p.generation += 1;
            p.phase = Phase::Uploads;
            p.cursor = None;
            p.started = now;
            p.marks = true;
            p.stats = GcStats::default();
            p.repo = None;
        }
        let mut sweep = Sweep {
            dry: false,
            now,
            started: p.started,
            generation: p.generation,
            stats: GcStats::default(),
            items: Vec::new(),
            marked: HashSet::new(),
        };
        let (next_phase, cursor) = self
            .run_phase(p.phase, p.cursor.take(), &mut p.repo, whole, &mut sweep)
            .await?;
        add(&mut p.stats, &sweep.stats);
        p.cursor = cursor;
        if p.cursor.is_none() && p.repo.is_none() {
            p.phase = next_phase;
            if p.phase == Phase::Idle {
                p.finished = Some(now_secs());
                p.last = Some(p.stats.clone());
                tracing::info!(generation = p.generation, stats = ?p.stats, "garbage collection finished");
            }
        }
        let new = serde_json::to_vec(&p).expect("serializes");
        if !self
            .kv
            .compare_and_swap(layout::gc_state(), raw.as_deref(), &new)
            .await?
        {
            // Another step moved the state on meanwhile: report where it stands.
            return self.gc_progress().await;
        }
        Ok(p)
    }

    /// Steps until the run under way (or a new one) finishes.
    pub async fn gc_run(&self) -> StoreResult<GcProgress> {
        loop {
            let p = self.step(true).await?;
            if p.done() {
                return Ok(p);
            }
        }
    }

    /// What a run would remove now, removing nothing and saving no state.
    pub async fn gc_dry_run(&self) -> StoreResult<GcReport> {
        let now = now_secs();
        let mut sweep = Sweep {
            dry: true,
            now,
            started: now,
            generation: 0,
            stats: GcStats::default(),
            items: Vec::new(),
            marked: HashSet::new(),
        };
        let mut phase = Phase::Uploads;
        let mut cursor = None;
        while phase != Phase::Idle {
            let (next, c) = self
                .run_phase(phase, cursor, &mut None, true, &mut sweep)
                .await?;
            cursor = c;
            if cursor.is_none() {
                phase = next;
            }
        }
        Ok(GcReport {
            stats: sweep.stats,
            items: sweep.items,
        })
    }

    /// One step of `phase` from `cursor` (and `repo`, a repository judged in pages): the phase
    /// after it, and the cursor to resume from (`None`, with `repo` `None`: the phase is
    /// finished).
    async fn run_phase(
        &self,
        phase: Phase,
        cursor: Option<String>,
        repo: &mut Option<RepoProgress>,
        whole: bool,
        sweep: &mut Sweep,
    ) -> StoreResult<(Phase, Option<String>)> {
        let budget = self.config.gc.step_items.max(1);
        match phase {
            Phase::Idle => Ok((Phase::Idle, None)),
            Phase::Uploads => {
                let expiry = self.config.upload_expiry_secs;
                if expiry > 0 {
                    if sweep.dry {
                        sweep.stats.uploads += self.count_stale_uploads(expiry, sweep).await?;
                    } else {
                        sweep.stats.uploads += self.purge_stale_uploads(expiry).await? as u64;
                    }
                }
                if sweep.dry {
                    for key in self.lapsed_records(sweep.now).await? {
                        sweep.stats.records += 1;
                        sweep.note(|| format!("record {key}"));
                    }
                } else {
                    sweep.stats.records += self.purge_lapsed_records().await? as u64;
                }
                Ok((Phase::Repositories, None))
            }
            Phase::Repositories => {
                // A page of catalog entries per listing, not one (a listing of one entry
                // reads the catalog's directory whole on the directory host: quadratic).
                let mut done = 0;
                let mut cursor = cursor;
                // A repository judged in pages goes on where the last step left it.
                if let Some(rp) = repo.as_mut() {
                    let (finished, used) = self.page_repository(rp, sweep, budget).await?;
                    if !finished {
                        return Ok((Phase::Repositories, cursor));
                    }
                    done += used;
                    cursor = Some(layout::catalog_prefix().to_owned() + &rp.name);
                    *repo = None;
                    if done >= budget {
                        return Ok((Phase::Repositories, cursor));
                    }
                }
                loop {
                    let page = self
                        .kv
                        .list(layout::catalog_prefix(), cursor.as_deref(), budget)
                        .await?;
                    let full = page.len() == budget;
                    for key in page {
                        let name = &key[layout::catalog_prefix().len()..];
                        if let Ok(name) = RepoName::parse(name, usize::MAX) {
                            if !whole && self.repository_large(&name, budget).await? {
                                let mut rp = RepoProgress {
                                    name: name.to_string(),
                                    started: now_secs().max(sweep.now),
                                    ..RepoProgress::default()
                                };
                                let (finished, used) =
                                    self.page_repository(&mut rp, sweep, budget - done).await?;
                                if !finished {
                                    *repo = Some(rp);
                                    return Ok((Phase::Repositories, cursor));
                                }
                                done += used;
                            } else {
                                done += self.collect_repository(&name, sweep).await?;
                            }
                        }
                        done += 1;
                        cursor = Some(key);
                        if done >= budget {
                            return Ok((Phase::Repositories, cursor));
                        }
                    }
                    if !full {
                        return Ok((Phase::Blobs, None));
                    }
                }
            }
            Phase::Blobs => {
                let page = self
                    .kv
                    .list(layout::gc_blobs_prefix(), cursor.as_deref(), budget)
                    .await?;
                if page.is_empty() {
                    return Ok((Phase::Idle, None));
                }
                for key in &page {
                    self.collect_blob(key, sweep).await?;
                }
                let last = page.last().cloned();
                Ok(if page.len() < budget {
                    (Phase::Idle, None)
                } else {
                    (Phase::Blobs, last)
                })
            }
        }
    }

    async fn count_stale_uploads(&self, expiry: u64, sweep: &mut Sweep) -> StoreResult<u64> {
        let cutoff = sweep.now.saturating_sub(expiry);
        let prefix = layout::upload_index_prefix();
        let mut n = 0;
        for k in self.kv.list(prefix, None, usize::MAX).await? {
            let started = k[prefix.len()..]
                .split_once('/')
                .and_then(|(s, _)| s.parse::<u64>().ok());
            if started.is_some_and(|s| s >= cutoff) {
                break;
            }
            n += 1;
            sweep.note(|| format!("upload {}", &k[prefix.len()..]));
        }
        Ok(n)
    }

    /// Collects inside one repository; returns how many keys it judged.
    async fn collect_repository(&self, name: &RepoName, sweep: &mut Sweep) -> StoreResult<usize> {
        let grace = self.config.gc.grace_secs;
        // Judged by a time taken before anything is read (see the argument in docs/DESIGN.md).
        let now = now_secs().max(sweep.now);
        let old = |at: u64| at.saturating_add(grace) <= now;
        let mut judged = 0;

        // Tags: name -> (key, digest).
        let tags_prefix = layout::tags_prefix(name);
        let mut tags: BTreeMap<String, (String, Option<Digest>)> = BTreeMap::new();
        for k in self.kv.list(&tags_prefix, None, usize::MAX).await? {
            let v = self.kv.get(&k).await?;
            let d = v
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|s| Digest::parse(&s).ok());
            tags.insert(k[tags_prefix.len()..].to_owned(), (k, d));
        }
        judged += tags.len();

        // Manifests: digest -> (record as read, parsed).
        let m_prefix = layout::manifests_prefix(name);
        let mut manifests: HashMap<Digest, (Vec<u8>, StoredManifest)> = HashMap::new();
        for k in self.kv.list(&m_prefix, None, usize::MAX).await? {
            let Some(d) = layout::digest_from_suffix(&k[m_prefix.len()..]) else {
                continue;
            };
            let Some(raw) = self.kv.get(&k).await? else {
                continue;
            };
            let m = decode_record(raw.clone())?;
            if m.gone {
                // Claimed by a collector that stopped before deleting it: finish.
                if !sweep.dry {
                    self.forget_manifest(name, &d, &m).await?;
                }
                continue;
            }
            manifests.insert(d, (raw, m));
        }
        judged += manifests.len();

        // Retention rules remove tags; the manifests only they reached go too, even with
        // `untagged` off (retention is there to reclaim space).
        let mut untagged_now: HashSet<Digest> = HashSet::new();
        if let Some(rule) = self.rule_for(name) {
            // Tags this run removed before it stopped (a crash, a failed step) are gone, but
            // their manifests were marked first: they are no roots either.
            let prefix = layout::gc_dropped_prefix(name);
            for k in self.kv.list(&prefix, None, usize::MAX).await? {
                let Some(d) = layout::digest_from_suffix(&k[prefix.len()..]) else {
                    continue;
                };
                let g = self
                    .kv
                    .get(&k)
                    .await?
                    .and_then(|v| String::from_utf8(v).ok());
                if g.is_some_and(|g| g == sweep.generation.to_string()) {
                    untagged_now.insert(d);
                }
            }
            let at_of = |d: &Option<Digest>| {
                d.as_ref()
                    .and_then(|d| manifests.get(d))
                    .map_or(0, |(_, m)| m.at)
            };
            let mut candidates: Vec<(&String, u64)> = tags
                .iter()
                .filter(|(t, _)| !rule.protect.iter().any(|p| crate::auth::glob(p, t)))
                .map(|(t, (_, d))| (t, at_of(d)))
                .collect();
            // Newest first; ties by name so a run is deterministic.
            candidates.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            let mut remove = Vec::new();
            for (i, (t, at)) in candidates.into_iter().enumerate() {
                let keep = (rule.keep_newest.is_none() && rule.keep_younger_than_secs.is_none())
                    || rule.keep_newest.is_some_and(|n| i < n)
                    || rule
                        .keep_younger_than_secs
                        .is_some_and(|s| at.saturating_add(s) > now)
                    || !old(at);
                if !keep {
                    remove.push(t.clone());
                }
            }
            for t in remove {
                let (key, d) = tags.remove(&t).expect("listed");
                if let Some(d) = &d {
                    untagged_now.insert(d.clone());
                }
                sweep.stats.tags += 1;
                sweep.note(|| format!("tag {name}:{t}"));
                if !sweep.dry {
                    // Re-read just before: a push that moved the tag meanwhile keeps it.
                    let now_v = self.kv.get(&key).await?;
                    let same = now_v
                        .and_then(|v| String::from_utf8(v).ok())
                        .and_then(|s| Digest::parse(&s).ok())
                        == d;
                    if same {
                        // Marked first: a run stopped after the delete still knows the
                        // manifest lost its tag to retention, not to a client.
                        if let Some(d) = &d {
                            self.kv
                                .set(
                                    &layout::gc_dropped(name, d),
                                    sweep.generation.to_string().as_bytes(),
                                )
                                .await?;
                        }
                        self.kv.delete(&key).await?;
                        // The mirror's record of it is cache for the tag: it goes too.
                        if let Ok(t) = crate::names::Tag::parse(&t) {
                            self.kv.delete(&layout::mirror_tag(name, &t)).await?;
                        }
                    }
                }
            }
        }

        // Mark: tagged manifests, young ones, and (unless `untagged`) every manifest but a
        // referrer whose subject is gone; then what they reach (children, referrers).
        let untagged = self.config.gc.untagged;
        let mut live: HashSet<Digest> = HashSet::new();
        let mut stack: Vec<Digest> = Vec::new();
        for (_, d) in tags.values() {
            if let Some(d) = d
                && manifests.contains_key(d)
            {
                stack.push(d.clone());
            }
        }
        for (d, (_, m)) in &manifests {
            let orphan_referrer = m
                .subject
                .as_ref()
                .is_some_and(|s| !manifests.contains_key(s));
            let keep_untagged = !untagged && !untagged_now.contains(d);
            if !old(m.at) || (keep_untagged && !orphan_referrer) {
                stack.push(d.clone());
            }
        }
        // Referrers by subject, so a live subject keeps its referrers.
        let mut referrers: HashMap<&Digest, Vec<&Digest>> = HashMap::new();
        for (d, (_, m)) in &manifests {
            if let Some(s) = &m.subject {
                referrers.entry(s).or_default().push(d);
            }
        }
        while let Some(d) = stack.pop() {
            if !live.insert(d.clone()) {
                continue;
            }
            let Some((_, m)) = manifests.get(&d) else {
                continue;
            };
            for (child, is_manifest) in references_of(m) {
                if is_manifest && manifests.contains_key(&child) && !live.contains(&child) {
                    stack.push(child);
                }
            }
            if let Some(rs) = referrers.get(&d) {
                stack.extend(
                    rs.iter()
                        .filter(|r| !live.contains(**r))
                        .map(|r| (*r).clone()),
                );
            }
        }

        // Sweep manifests.
        let dead: Vec<Digest> = manifests
            .keys()
            .filter(|d| !live.contains(*d))
            .cloned()
            .collect();
        for d in dead {
            let (raw, m) = manifests.remove(&d).expect("listed");
            sweep.stats.manifests += 1;
            sweep.note(|| format!("manifest {name}@{d}"));
            if sweep.dry {
                continue;
            }
            if !self.claim_and_forget_manifest(name, &d, &raw, &m).await? {
                sweep.stats.manifests -= 1;
            }
        }

        // Blobs the surviving manifests reference.
        let mut wanted: HashSet<Digest> = HashSet::new();
        for (_, m) in manifests.values() {
            for (d, is_manifest) in references_of(m) {
                if !is_manifest {
                    wanted.insert(d);
                }
            }
        }

        // Sweep links.
        let l_prefix = layout::layers_prefix(name);
        let links = self.kv.list(&l_prefix, None, usize::MAX).await?;
        judged += links.len();
        let mut links_left = 0;
        for k in links {
            let Some(d) = layout::digest_from_suffix(&k[l_prefix.len()..]) else {
                continue;
            };
            let Some(raw) = self.kv.get(&k).await? else {
                continue;
            };
            let link = BlobLink::decode(&raw)?;
            if !link.gone && (wanted.contains(&d) || !old(link.at)) {
                links_left += 1;
                self.mark_blob(&d, link.at, true, sweep).await?;
                continue;
            }
            // Blobs stored before garbage collection existed have no record yet.
            self.mark_blob(&d, link.at, false, sweep).await?;
            if link.gone {
                // Claimed by a collector that stopped before deleting it.
                if !sweep.dry {
                    self.kv.delete(&k).await?;
                }
                continue;
            }
            sweep.stats.links += 1;
            sweep.note(|| format!("link {name} -> {d}"));
            if sweep.dry {
                continue;
            }
            let claimed = BlobLink { gone: true, ..link }.encode();
            if self.kv.compare_and_swap(&k, Some(&raw), &claimed).await? {
                self.kv.delete(&k).await?;
            } else {
                // Touched meanwhile by a push: live after all.
                sweep.stats.links -= 1;
                links_left += 1;
                self.mark_blob(&d, link.at, true, sweep).await?;
            }
        }

        // An emptied repository leaves the catalog.
        if tags.is_empty() && manifests.is_empty() && links_left == 0 {
            let uploads = self.kv.list(&layout::uploads_prefix(name), None, 1).await?;
            if uploads.is_empty() {
                if !sweep.dry {
                    // Its cache goes with it (`paged::cache_prefixes`).
                    for prefix in paged::cache_prefixes(name) {
                        for k in self.kv.list(&prefix, None, usize::MAX).await? {
                            self.kv.delete(&k).await?;
                        }
                    }
                }
                self.drop_catalog_entry(name, sweep).await?;
            }
        }
        Ok(judged)
    }

    /// Takes emptied repository `name` out of the catalog (dry: counts it).
    async fn drop_catalog_entry(&self, name: &RepoName, sweep: &mut Sweep) -> StoreResult<()> {
        sweep.stats.repositories += 1;
        sweep.note(|| format!("repository {name}"));
        if sweep.dry {
            return Ok(());
        }
        // (Deleting the marker only makes the next delete by digest read every tag; it is
        // never wrong.)
        self.kv.delete(&layout::tagged_complete(name)).await?;
        self.kv.delete(&layout::catalog(name)).await?;
        // A push that wrote into it meanwhile may have found the catalog entry still there:
        // look again, and put it back if the repository has content.
        if !self.repository_empty(name).await? {
            self.kv.set(&layout::catalog(name), b"").await?;
            sweep.stats.repositories -= 1;
        }
        Ok(())
    }

    /// The retention rule for `name`: the first whose pattern matches.
    fn rule_for(&self, name: &RepoName) -> Option<&RetentionRule> {
        self.config
            .gc
            .retention
            .iter()
            .find(|r| crate::auth::glob(&r.repositories, name.as_str()))
    }

    async fn repository_empty(&self, name: &RepoName) -> StoreResult<bool> {
        for prefix in [
            layout::tags_prefix(name),
            layout::manifests_prefix(name),
            layout::layers_prefix(name),
            layout::uploads_prefix(name),
        ] {
            if !self.kv.list(&prefix, None, 1).await?.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Claims manifest `d`'s record `raw` (compare-and-swap to the same record marked gone), then
    /// deletes it; false when a push wrote the record since it was read (it stays). Both the
    /// whole and the paged judgement delete manifests only through this.
    pub(crate) async fn claim_and_forget_manifest(
        &self,
        name: &RepoName,
        d: &Digest,
        raw: &[u8],
        m: &StoredManifest,
    ) -> StoreResult<bool> {
        let claimed = encode_record(&m.media_type, m.subject.as_ref(), &m.bytes, m.at, true);
        if !self
            .kv
            .compare_and_swap(&layout::manifest(name, d), Some(raw), &claimed)
            .await?
        {
            return Ok(false);
        }
        self.forget_manifest(name, d, m).await?;
        Ok(true)
    }

    /// Deletes a claimed manifest: its referrer record first, the record last (so a crash in
    /// between leaves the claimed record, which the next run finishes).
    async fn forget_manifest(
        &self,
        name: &RepoName,
        d: &Digest,
        m: &StoredManifest,
    ) -> StoreResult<()> {
        if let Some(s) = &m.subject {
            self.kv.delete(&layout::referrer(name, s, d)).await?;
        }
        // No tag points at it (or it would be live): its reverse entries are stale.
        self.forget_tagged(name, d).await?;
        // And the marks of a judgement in pages.
        self.kv.delete(&layout::gc_live(name, d)).await?;
        self.kv.delete(&layout::gc_dropped(name, d)).await?;
        self.kv.delete(&layout::manifest(name, d)).await
    }

    /// Gives blob `d`, met through a link of time `at`, a record if it has none (blobs stored
    /// before garbage collection existed), marked with this run's generation if `live`.
    async fn mark_blob(
        &self,
        d: &Digest,
        at: u64,
        live: bool,
        sweep: &mut Sweep,
    ) -> StoreResult<()> {
        if sweep.dry {
            if live {
                sweep.marked.insert(d.clone());
            }
            return Ok(());
        }
        let key = layout::gc_blob(d);
        let mark = if live { sweep.generation } else { 0 };
        for _ in 0..TOUCH_ATTEMPTS {
            let raw = self.kv.get(&key).await?;
            let new = match &raw {
                None => BlobRecord {
                    at,
                    deleting: false,
                    mark,
                },
                Some(raw) => {
                    let r: BlobRecord =
                        serde_json::from_slice(raw).map_err(|_| corrupt("blob record", &key))?;
                    // Claimed: a link written since would have failed its touch, so this is
                    // one the claiming run judged dead; the blob phase finishes the claim.
                    if !live || r.deleting || r.mark == mark {
                        return Ok(());
                    }
                    BlobRecord { mark, ..r }
                }
            };
            let new = serde_json::to_vec(&new).expect("serializes");
            // Lost to a concurrent touch (or mark): read again.
            if self.kv.compare_and_swap(&key, raw.as_deref(), &new).await? {
                return Ok(());
            }
        }
        // Touched that often meanwhile: fresh, so the blob phase keeps it anyway.
        Ok(())
    }

    /// Deletes the blob of record `key` if this run did not mark it live and it was past the
    /// grace when the run started.
    async fn collect_blob(&self, key: &str, sweep: &mut Sweep) -> StoreResult<()> {
        let Some(d) = layout::digest_from_suffix(&key[layout::gc_blobs_prefix().len()..]) else {
            return Ok(());
        };
        // Judged by the run's start, taken before any repository was read: a link the
        // repository phase did not see (written after it read that repository) belongs to a
        // push that touched the record after that time, so the record reads fresh (see the
        // argument in docs/DESIGN.md).
        let started = sweep.started;
        let Some(raw) = self.kv.get(key).await? else {
            return Ok(());
        };
        let r: BlobRecord =
            serde_json::from_slice(&raw).map_err(|_| corrupt("blob record", key))?;
        let data = layout::blob_data(&d);
        if r.deleting {
            // Claimed by a collector that stopped before finishing.
            if !sweep.dry {
                self.blobs.delete(&data).await?;
                self.kv.delete(key).await?;
            }
            return Ok(());
        }
        if r.at.saturating_add(self.config.gc.grace_secs) > started {
            return Ok(());
        }
        let live = if sweep.dry {
            sweep.marked.contains(&d)
        } else {
            r.mark == sweep.generation
        };
        if live {
            return Ok(());
        }
        let size = self.blobs.size(&data).await?.unwrap_or(0);
        sweep.stats.blobs += 1;
        sweep.stats.bytes += size;
        sweep.note(|| format!("blob {d} ({size} bytes)"));
        if sweep.dry {
            return Ok(());
        }
        let claimed = serde_json::to_vec(&BlobRecord {
            deleting: true,
            ..r
        })
        .expect("serializes");
        if !self.kv.compare_and_swap(key, Some(&raw), &claimed).await? {
            sweep.stats.blobs -= 1;
            sweep.stats.bytes -= size;
            return Ok(());
        }
        self.blobs.delete(&data).await?;
        self.kv.delete(key).await
    }
}

fn add(total: &mut GcStats, s: &GcStats) {
    total.uploads += s.uploads;
    total.tags += s.tags;
    total.manifests += s.manifests;
    total.links += s.links;
    total.blobs += s.blobs;
    total.bytes += s.bytes;
    total.repositories += s.repositories;
    total.records += s.records;
}

/// 503 with `Retry-After`: the collector is deleting this blob (or manifest record) right now;
/// once it is gone, a retried upload (or manifest push) stores it again.
pub(crate) fn collecting(digest: &Digest) -> Error {
    Error::new(
        ErrorCode::Unknown,
        http::StatusCode::SERVICE_UNAVAILABLE,
        format!("{digest} is being garbage-collected; retry shortly"),
    )
    .with_header(http::header::RETRY_AFTER, "1")
}

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    /// `/v2/_dockside/gc`: `GET` the collector's state, `POST` one bounded step (both as JSON),
    /// `POST ?dry-run=1` what a whole run would remove (not bounded). With access control,
    /// only a caller with the delete action on the pseudo-repository `_dockside/gc` (a rule
    /// for `**`, or a token scope `repository:_dockside/gc:delete`) may.
    pub(crate) async fn gc_request(
        &self,
        parts: &http::request::Parts,
        throttle: &crate::throttle::LoginThrottle<'_, K>,
    ) -> crate::registry::Result<crate::registry::RegistryResponse<B>> {
        use http::Method;
        if let Some(auth) = &self.config.auth {
            auth.authorize(
                parts,
                &crate::auth::Need::delete(GC_RESOURCE),
                now_secs(),
                self.config.password_checks.as_deref(),
                throttle,
            )
            .await?;
        }
        let q = crate::request::Query::parse(parts.uri.query().unwrap_or(""));
        let json = match parts.method {
            Method::GET => serde_json::to_vec(&self.gc_progress().await?),
            Method::POST if q.get("dry-run").is_some_and(|v| v != "0" && v != "false") => {
                serde_json::to_vec(&self.gc_dry_run().await?)
            }
            Method::POST => serde_json::to_vec(&self.gc_step().await?),
            ref m => {
                return Err(Error::new(
                    ErrorCode::Unsupported,
                    http::StatusCode::METHOD_NOT_ALLOWED,
                    format!("method {m} not allowed here; allowed: GET, POST"),
                )
                .with_header(http::header::ALLOW, "GET, POST"));
            }
        }
        .expect("serializes");
        let mut resp = crate::registry::json_response(http::StatusCode::OK, json);
        resp.headers_mut().insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        Ok(resp)
    }
}

/// The path of the admin request: outside every `/v2/<name>/` route, since no repository name
/// has a component starting with `_`.
pub const GC_PATH: &str = "/v2/_dockside/gc";

/// The pseudo-repository whose delete action allows the admin request.
const GC_RESOURCE: &str = "_dockside/gc";
