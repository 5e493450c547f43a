//! A repository too large for one step, judged in pages: the same decisions as
//! `collect_repository`, but with what that keeps in memory (the retention order, the live
//! manifests, the blobs they reference) kept in the key-value store, so every step does about
//! `step_items` store calls however large the repository is, and resumes from `gc/state`.
//!
//! Stages, each a pass over one listing from a cursor (the argument for why it stays correct
//! while pushes go on is in docs/DESIGN.md, "Garbage collection", "Large repositories"):
//! 1. `rank` (retention with `keep_newest` only): the tags in pages; the `keep_newest` newest
//!    non-protected ones, as (time, tag), kept in the state (a set bounded by `keep_newest`).
//! 2. `tags`: the tags again: retention removes those ranked below that set (and old, and
//!    unprotected), marking their manifest `_dropped`; every other tag's manifest is marked
//!    `_live`, with what it reaches.
//! 3. `roots`: the manifests: the young ones, and (unless `untagged`) every one but a referrer
//!    whose subject is gone and one retention just untagged, are marked `_live`.
//! 4. `sweep`: the manifests again: the unmarked and old are claimed and deleted; each kept
//!    one marks the blobs it references `_want`.
//! 5. `links`: the links: the unwanted and old go; live ones mark their blob record.
//! 6. `empty`: if nothing is left, the cache (mirror records, these marks) goes, then the
//!    catalog entry.
//!
//! Marking a manifest reads it and queues its child manifests and referrers on a stack kept in
//! the state (bounded by what one manifest references), drained before the next item.

use serde::{Deserialize, Serialize};

use super::Sweep;
use crate::blobs::BlobLink;
use crate::digest::Digest;
use crate::error::StoreError;
use crate::host::{BlobStore, KeyValue};
use crate::layout;
use crate::manifests::{decode_record, references_of};
use crate::names::{RepoName, Tag};
use crate::registry::Registry;

type StoreResult<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    #[default]
    Rank,
    Tags,
    Roots,
    Sweep,
    Links,
    Empty,
}

/// Where the repository judged in pages stands (part of `gc/state`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RepoProgress {
    pub name: String,
    pub stage: Stage,
    /// The last key of the stage's listing handled.
    pub cursor: Option<String>,
    /// When judging this repository began: what was touched since is young.
    pub started: u64,
    /// Retention: the `keep_newest` newest non-protected tags seen, as (time, tag), newest
    /// first (ties by tag).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(u64, String)>,
    /// Manifests to mark live, with what they reach.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stack: Vec<String>,
}

/// Retention order: newest first, ties by tag name (so a run is deterministic).
fn ranks_before(a: (u64, &str), b: (u64, &str)) -> bool {
    (std::cmp::Reverse(a.0), a.1) <= (std::cmp::Reverse(b.0), b.1)
}

fn generation_of(raw: Option<Vec<u8>>) -> u64 {
    raw.and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl<K: KeyValue, B: BlobStore> Registry<K, B> {
    /// Whether `name` holds more tags, manifests and links than one step's budget: then it is
    /// judged in pages. Costs three bounded listings.
    pub(super) async fn repository_large(
        &self,
        name: &RepoName,
        budget: usize,
    ) -> StoreResult<bool> {
        let mut n = 0;
        for prefix in [
            layout::tags_prefix(name),
            layout::manifests_prefix(name),
            layout::layers_prefix(name),
        ] {
            n += self.kv.list(&prefix, None, budget + 1).await?.len();
            if n > budget {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Goes on judging `rp.name` for about `budget` store calls. Returns whether it is done,
    /// and the calls made.
    pub(super) async fn page_repository(
        &self,
        rp: &mut RepoProgress,
        sweep: &mut Sweep,
        budget: usize,
    ) -> StoreResult<(bool, usize)> {
        let Ok(name) = RepoName::parse(&rp.name, usize::MAX) else {
            return Ok((true, 0));
        };
        let grace = self.config.gc.grace_secs;
        let now = rp.started;
        let old = |at: u64| at.saturating_add(grace) <= now;
        let rule = self.rule_for(&name).cloned();
        let mut used = 0;
        loop {
            // The marks queued by the last item first.
            if !self.drain(&name, rp, sweep, budget, &mut used).await? {
                return Ok((false, used));
            }
            if used >= budget {
                return Ok((false, used));
            }
            let prefix = match rp.stage {
                Stage::Rank | Stage::Tags => layout::tags_prefix(&name),
                Stage::Roots | Stage::Sweep => layout::manifests_prefix(&name),
                Stage::Links => layout::layers_prefix(&name),
                Stage::Empty => {
                    let (done, n) = self.empty_repository(&name, sweep, budget - used).await?;
                    return Ok((done, used + n));
                }
            };
            if rp.stage == Stage::Rank && rule.as_ref().is_none_or(|r| r.keep_newest.is_none()) {
                rp.stage = Stage::Tags;
                continue;
            }
            // A page of what the budget has left: listings are what cost most on hosts that
            // list by a pass over every key (Spin) or a read of a whole directory.
            let page = self
                .kv
                .list(&prefix, rp.cursor.as_deref(), budget - used)
                .await?;
            used += 1;
            if page.is_empty() {
                rp.cursor = None;
                rp.stage = match rp.stage {
                    Stage::Rank => Stage::Tags,
                    Stage::Tags => Stage::Roots,
                    Stage::Roots => Stage::Sweep,
                    Stage::Sweep => Stage::Links,
                    Stage::Links | Stage::Empty => Stage::Empty,
                };
                continue;
            }
            for key in page {
                let suffix = &key[prefix.len()..];
                used += match rp.stage {
                    Stage::Rank => self.rank_tag(&name, suffix, rule.as_ref(), rp).await?,
                    Stage::Tags => {
                        self.judge_tag(&name, suffix, rule.as_ref(), &old, rp, sweep)
                            .await?
                    }
                    Stage::Roots => self.judge_root(&name, suffix, &old, rp, sweep).await?,
                    Stage::Sweep => self.sweep_manifest(&name, suffix, &old, sweep).await?,
                    Stage::Links => self.sweep_link(&name, suffix, &old, sweep).await?,
                    Stage::Empty => 0,
                };
                rp.cursor = Some(key);
                if !self.drain(&name, rp, sweep, budget, &mut used).await? || used >= budget {
                    return Ok((false, used));
                }
            }
        }
    }

    /// Marks what is queued on the stack while the budget lasts; whether it emptied.
    async fn drain(
        &self,
        name: &RepoName,
        rp: &mut RepoProgress,
        sweep: &mut Sweep,
        budget: usize,
        used: &mut usize,
    ) -> StoreResult<bool> {
        while let Some(d) = rp.stack.pop() {
            if *used >= budget {
                rp.stack.push(d);
                return Ok(false);
            }
            if let Ok(d) = Digest::parse(&d) {
                *used += self.mark_live(name, &d, sweep, &mut rp.stack).await?;
            }
        }
        Ok(true)
    }

    /// The digest tag key `key` names, if any.
    async fn tag_target(&self, key: &str) -> StoreResult<Option<Digest>> {
        Ok(self
            .kv
            .get(key)
            .await?
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|s| Digest::parse(&s).ok()))
    }

    /// The time of manifest `d` of `name` (0 if it is not stored), a tag's time for retention.
    async fn manifest_at(&self, name: &RepoName, d: Option<&Digest>) -> StoreResult<u64> {
        let Some(d) = d else { return Ok(0) };
        Ok(match self.kv.get(&layout::manifest(name, d)).await? {
            Some(raw) => decode_record(raw)?.at,
            None => 0,
        })
    }

    async fn rank_tag(
        &self,
        name: &RepoName,
        tag: &str,
        rule: Option<&super::RetentionRule>,
        rp: &mut RepoProgress,
    ) -> StoreResult<usize> {
        let (Some(rule), Some(n)) = (rule, rule.and_then(|r| r.keep_newest)) else {
            return Ok(0);
        };
        if n == 0 || rule.protect.iter().any(|p| crate::auth::glob(p, tag)) {
            return Ok(0);
        }
        let d = self.tag_target(&(layout::tags_prefix(name) + tag)).await?;
        let at = self.manifest_at(name, d.as_ref()).await?;
        let pos = rp
            .top
            .iter()
            .position(|(a, t)| !ranks_before((*a, t), (at, tag)))
            .unwrap_or(rp.top.len());
        if pos < n {
            rp.top.insert(pos, (at, tag.to_owned()));
            rp.top.truncate(n);
        }
        Ok(2)
    }

    async fn judge_tag(
        &self,
        name: &RepoName,
        tag: &str,
        rule: Option<&super::RetentionRule>,
        old: &impl Fn(u64) -> bool,
        rp: &mut RepoProgress,
        sweep: &mut Sweep,
    ) -> StoreResult<usize> {
        let key = layout::tags_prefix(name) + tag;
        let d = self.tag_target(&key).await?;
        let mut used = 1;
        if let Some(rule) = rule
            && !rule.protect.iter().any(|p| crate::auth::glob(p, tag))
            && (rule.keep_newest.is_some() || rule.keep_younger_than_secs.is_some())
        {
            // Read now, not at the rank pass: a touch since only makes it newer (kept).
            let at = self.manifest_at(name, d.as_ref()).await?;
            used += 1;
            let in_top = rule.keep_newest.is_some_and(|n| {
                rp.top.len() < n
                    || rp
                        .top
                        .get(n.wrapping_sub(1))
                        .is_some_and(|(a, t)| ranks_before((at, tag), (*a, t)))
            });
            let keep = in_top
                || rule
                    .keep_younger_than_secs
                    .is_some_and(|s| at.saturating_add(s) > rp.started)
                || !old(at);
            if !keep {
                sweep.stats.tags += 1;
                sweep.note(|| format!("tag {name}:{tag}"));
                if !sweep.dry {
                    // Re-read just before: a push that moved the tag meanwhile keeps it.
                    if self.tag_target(&key).await? == d {
                        // The mark first: a step stopped after the tag's delete would leave
                        // its manifest, untagged, to be kept as a root.
                        if let Some(d) = &d {
                            self.kv
                                .set(
                                    &layout::gc_dropped(name, d),
                                    sweep.generation.to_string().as_bytes(),
                                )
                                .await?;
                        }
                        self.kv.delete(&key).await?;
                        if let Ok(t) = Tag::parse(tag) {
                            self.kv.delete(&layout::mirror_tag(name, &t)).await?;
                        }
                    }
                    used += 4;
                }
                return Ok(used);
            }
        }
        if let Some(d) = d {
            rp.stack.push(d.to_string());
        }
        Ok(used)
    }

    async fn judge_root(
        &self,
        name: &RepoName,
        suffix: &str,
        old: &impl Fn(u64) -> bool,
        rp: &mut RepoProgress,
        sweep: &mut Sweep,
    ) -> StoreResult<usize> {
        let Some(d) = layout::digest_from_suffix(suffix) else {
            return Ok(0);
        };
        let Some(raw) = self.kv.get(&layout::manifest(name, &d)).await? else {
            return Ok(1);
        };
        let m = decode_record(raw)?;
        if m.gone {
            // Claimed by a collector that stopped before deleting it: finish.
            if !sweep.dry {
                self.forget_manifest(name, &d, &m).await?;
            }
            return Ok(6);
        }
        let mut used = 1;
        let root = if !old(m.at) {
            true
        } else if self.config.gc.untagged {
            false
        } else {
            let orphan = match &m.subject {
                Some(s) => {
                    used += 1;
                    match self.kv.get(&layout::manifest(name, s)).await? {
                        None => true,
                        Some(raw) => decode_record(raw)?.gone,
                    }
                }
                None => false,
            };
            used += 1;
            let dropped = generation_of(self.kv.get(&layout::gc_dropped(name, &d)).await?)
                == sweep.generation;
            !orphan && !dropped
        };
        if root {
            rp.stack.push(d.to_string());
        }
        Ok(used)
    }

    /// Marks manifest `d` live (once per run), queueing its child manifests and referrers.
    async fn mark_live(
        &self,
        name: &RepoName,
        d: &Digest,
        sweep: &mut Sweep,
        stack: &mut Vec<String>,
    ) -> StoreResult<usize> {
        let key = layout::gc_live(name, d);
        if generation_of(self.kv.get(&key).await?) == sweep.generation {
            return Ok(1);
        }
        let Some(raw) = self.kv.get(&layout::manifest(name, d)).await? else {
            return Ok(2);
        };
        let m = decode_record(raw)?;
        if m.gone {
            return Ok(2);
        }
        self.kv
            .set(&key, sweep.generation.to_string().as_bytes())
            .await?;
        for (child, is_manifest) in references_of(&m) {
            if is_manifest {
                stack.push(child.to_string());
            }
        }
        let prefix = layout::referrers_prefix(name, d);
        for k in self.kv.list(&prefix, None, usize::MAX).await? {
            if let Some(r) = layout::digest_from_suffix(&k[prefix.len()..]) {
                stack.push(r.to_string());
            }
        }
        Ok(4)
    }

    async fn sweep_manifest(
        &self,
        name: &RepoName,
        suffix: &str,
        old: &impl Fn(u64) -> bool,
        sweep: &mut Sweep,
    ) -> StoreResult<usize> {
        let Some(d) = layout::digest_from_suffix(suffix) else {
            return Ok(0);
        };
        let key = layout::manifest(name, &d);
        let Some(raw) = self.kv.get(&key).await? else {
            return Ok(1);
        };
        let m = decode_record(raw.clone())?;
        if m.gone {
            // Claimed by a step that stopped before deleting it: finish.
            self.forget_manifest(name, &d, &m).await?;
            return Ok(6);
        }
        let live =
            generation_of(self.kv.get(&layout::gc_live(name, &d)).await?) == sweep.generation;
        let mut used = 2;
        if !live && old(m.at) {
            sweep.stats.manifests += 1;
            sweep.note(|| format!("manifest {name}@{d}"));
            // A push that touched it since it was read keeps it.
            if self.claim_and_forget_manifest(name, &d, &raw, &m).await? {
                return Ok(used + 8);
            }
            sweep.stats.manifests -= 1;
            used += 1;
        }
        // Kept: the blobs it references stay linked.
        let g = sweep.generation.to_string();
        for (b, is_manifest) in references_of(&m) {
            if is_manifest {
                continue;
            }
            let k = layout::gc_want(name, &b);
            used += 1;
            if self.kv.get(&k).await?.as_deref() != Some(g.as_bytes()) {
                self.kv.set(&k, g.as_bytes()).await?;
                used += 1;
            }
        }
        Ok(used)
    }

    async fn sweep_link(
        &self,
        name: &RepoName,
        suffix: &str,
        old: &impl Fn(u64) -> bool,
        sweep: &mut Sweep,
    ) -> StoreResult<usize> {
        let Some(d) = layout::digest_from_suffix(suffix) else {
            return Ok(0);
        };
        let k = layout::blob_link(name, &d);
        let Some(raw) = self.kv.get(&k).await? else {
            return Ok(1);
        };
        let link = BlobLink::decode(&raw)?;
        let want_key = layout::gc_want(name, &d);
        let wanted = generation_of(self.kv.get(&want_key).await?) == sweep.generation;
        if !link.gone && (wanted || !old(link.at)) {
            self.mark_blob(&d, link.at, true, sweep).await?;
            return Ok(4);
        }
        self.mark_blob(&d, link.at, false, sweep).await?;
        if link.gone {
            self.kv.delete(&k).await?;
            self.kv.delete(&want_key).await?;
            return Ok(6);
        }
        sweep.stats.links += 1;
        sweep.note(|| format!("link {name} -> {d}"));
        let claimed = BlobLink { gone: true, ..link }.encode();
        if self.kv.compare_and_swap(&k, Some(&raw), &claimed).await? {
            self.kv.delete(&k).await?;
            self.kv.delete(&want_key).await?;
        } else {
            // Touched meanwhile by a push: live after all.
            sweep.stats.links -= 1;
            self.mark_blob(&d, link.at, true, sweep).await?;
        }
        Ok(8)
    }

    /// If `name` holds nothing any more, deletes its cache (mirror records, the collector's
    /// marks) a page at a time, then its catalog entry. Returns whether done, and the calls.
    async fn empty_repository(
        &self,
        name: &RepoName,
        sweep: &mut Sweep,
        budget: usize,
    ) -> StoreResult<(bool, usize)> {
        if !self.repository_empty(name).await? {
            // Still has content: only the marks of deleted items went with them.
            return Ok((true, 4));
        }
        let mut used = 4;
        for prefix in cache_prefixes(name) {
            loop {
                let page = self.kv.list(&prefix, None, budget.max(1)).await?;
                used += 1;
                if page.is_empty() {
                    break;
                }
                for k in page {
                    self.kv.delete(&k).await?;
                    used += 1;
                }
                // Checked after a page deleted, so every step makes progress.
                if used >= budget {
                    return Ok((false, used));
                }
            }
        }
        self.drop_catalog_entry(name, sweep).await?;
        Ok((true, used + 8))
    }
}

/// What a repository holds that is cache, not content: it does not keep the repository in the
/// catalog, and goes with it. The mirror's tag records (refetched from the upstream when
/// missing) and the collector's own marks.
pub(super) fn cache_prefixes(name: &RepoName) -> [String; 2] {
    [layout::mirror_prefix(name), layout::gc_repo_prefix(name)]
}
