//! Local-directory hosts: the native server's default storage.
//!
//! Only `std::fs` is used, so the same code serves `wasi:filesystem` in a wasm component. Every
//! write goes to a temporary file, is fsynced, then renamed into place, and the directory is
//! synced (so the new name is on the disk too) before the write returns: a reader (or a restart
//! after a machine crash) sees a whole object or none, and an acknowledged write stays. A
//! delete is not synced: a crash may bring a deleted key back (the collector removes it again).
//!
//! On disk, under the data directory:
//! ```text
//! <data>/kv/<key>        one file per key: each `/`-separated key segment is a directory, the
//!                        last segment the file, named <segment>= ; segments are escaped
//!                        (%XX for anything outside [A-Za-z0-9._-], and a leading '.');
//!                        a delete removes the directories it leaves empty
//! <data>/blobs/...       blob store paths as they are (see crate::layout); an object is a
//!                        file, or, when assembled from several upload parts, a directory of
//!                        its segments 00000000, 00000001, ... (renamed in: no byte copied)
//! <data>/uploads/...
//! <data>/tmp/            objects being written; removed at startup when stale
//! <data>/kv/.../.journal the change journal of a large key directory (see `fs_journal`)
//! ```
//!
//! A listing walks the key directories in key order and enters only those that can hold the
//! page. A directory is read whole (a repository's tags are one directory), so a large one is
//! kept ordered in memory (`ListingCache`), brought up to date from its change journal.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::{Bound, Range};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::fs_journal::{self, Identity};
use super::fs_write::WriteBehind;
use crate::error::StoreError;
use crate::host::{BlobStore, ByteSource, KeyValue, WriteError};

/// Size of the buffers a blob is read in.
const READ_CHUNK: usize = 256 * 1024;

fn nonce() -> String {
    let mut b = [0u8; 8];
    // Without randomness, fall back on the clock: names only need to be unique per writer.
    if getrandom::fill(&mut b).is_err() {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b = (t as u64).to_le_bytes();
    }
    crate::digest::to_hex(&b)
}

fn write_file(path: &Path, data: &[u8], fsync: bool) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    if fsync { f.sync_all() } else { Ok(()) }
}

/// Makes the entries of `dir` durable: a rename (or a file or directory created) in it is only
/// on the disk once the directory itself is synced; syncing the file makes its bytes durable,
/// not its name. Without this, a machine crash soon after a write was acknowledged can lose it.
fn sync_dir(dir: &Path) -> io::Result<()> {
    if cfg!(target_family = "wasm") {
        // wasi:filesystem has no way to open a directory as a file to sync it: the host's own
        // guarantees apply there.
        return Ok(());
    }
    File::open(dir)?.sync_all()
}

/// `fs::create_dir_all`, and with `fsync` each directory it creates is synced into its parent
/// (so a key in a new directory, e.g. a new repository's first tag, survives a crash). Each
/// one is recorded in its parent's listing journal, if it has one.
fn create_dirs(dir: &Path, fsync: bool) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut d = Some(dir);
    while let Some(p) = d
        && !p.is_dir()
    {
        missing.push(p);
        d = p.parent();
    }
    fs::create_dir_all(dir)?;
    for p in missing.iter().rev() {
        if let Some(parent) = p.parent() {
            if fsync {
                sync_dir(parent)?;
            }
            if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                fs_journal::note(parent, b'+', name);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Key-value store

/// A key-value store on a directory tree, one file per key. With [`FsBlobs`] on the same
/// directory, a registry that survives restarts (what `dockside serve` runs, through
/// `adapters::pooled` so that the disk work leaves the async runtime):
///
/// ```
/// use dockside::{Config, FsBlobs, FsKv, KeyValue, Registry};
/// use http_body_util::Full;
///
/// # futures_executor::block_on(async {
/// let dir = tempfile::tempdir().unwrap();
/// let registry = Registry::new(
///     FsKv::new(dir.path().join("kv")).unwrap(),
///     FsBlobs::new(dir.path()).unwrap(),
///     Config::default(),
/// );
/// let digest = "sha256:b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
/// let push = http::Request::post(format!("/v2/hello/blobs/uploads/?digest={digest}"))
///     .body(Full::new(&b"hello world"[..]))
///     .unwrap();
/// assert_eq!(registry.handle(push).await.status(), 201);
/// drop(registry);
///
/// // Another store on the same directory (a restarted server) sees what was written.
/// let kv = FsKv::new(dir.path().join("kv")).unwrap();
/// assert!(!kv.list("", None, 10).await.unwrap().is_empty());
/// # });
/// ```
#[derive(Clone)]
pub struct FsKv {
    root: PathBuf,
    fsync: bool,
    /// Serializes compare-and-swap within this process; a lock file per key ([`KeyLock`])
    /// serializes it across processes and wasm instances sharing the directory.
    cas: Arc<Mutex<()>>,
    cache: Arc<ListingCache>,
    /// Directory entries read by listings: see [`FsKv::entries_read`].
    entries_read: Arc<AtomicU64>,
    /// Smallest directory the listing cache takes (the tests lower it).
    cache_min_entries: usize,
    /// A cached directory is read afresh at least this often (the tests shorten it).
    cache_max_age: Duration,
}

impl FsKv {
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        Ok(FsKv {
            root,
            fsync: true,
            cas: Arc::default(),
            cache: Arc::default(),
            entries_read: Arc::default(),
            cache_min_entries: CACHE_MIN_ENTRIES,
            cache_max_age: fs_journal::MAX_AGE,
        })
    }

    /// Whether writes are fsynced before they are renamed into place, and their directory
    /// after (the default). Without, a crash of the *machine* (not of the process) may lose or
    /// truncate recent writes.
    pub fn fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// The smallest directory the listing cache keeps (1024 entries by default): smaller ones
    /// are read on every listing. For tests that need a cached directory without writing
    /// thousands of keys (`dockside serve` takes it from `DOCKSIDE_LISTING_CACHE_MIN`).
    pub fn listing_cache_min(mut self, entries: usize) -> Self {
        self.cache_min_entries = entries;
        self
    }

    /// How long a cached directory is trusted at most (60 s by default) before it is read
    /// afresh: the bound on how long a change that no journal record tells of (its writer was
    /// killed between the rename and the append) can be missed. For tests that check that
    /// bound (`dockside serve` takes it from `DOCKSIDE_LISTING_CACHE_MAX_AGE`, in seconds).
    pub fn listing_cache_max_age(mut self, age: Duration) -> Self {
        self.cache_max_age = age;
        self
    }

    /// Fails on a case-insensitive filesystem (macOS's and Windows' defaults): keys keep
    /// upper-case letters in file names, so tags `Latest` and `latest` would be one file
    /// there, and pushing one would silently move the other. The native server checks this
    /// at start.
    pub fn check_case_sensitive(&self) -> io::Result<()> {
        let probe = format!(".case-probe-{}", nonce());
        let upper = self.root.join(format!("{probe}-A"));
        File::create(&upper)?;
        let folded = fs::metadata(self.root.join(format!("{probe}-a"))).is_ok();
        let _ = fs::remove_file(&upper);
        if folded {
            return Err(io::Error::other(
                "the filesystem is case-insensitive, so tags differing only in case would \
                 collide: use a case-sensitive volume",
            ));
        }
        Ok(())
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let segments: Vec<&str> = key.split('/').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(StoreError::new(format!("invalid key {key:?}")));
        }
        let mut p = self.root.clone();
        for (i, s) in segments.iter().enumerate() {
            let mut e = escape(s);
            if i == segments.len() - 1 {
                e.push('=');
            }
            p.push(e);
        }
        Ok(p)
    }

    /// Appends to `out`, in ascending order, the keys below directory `dir` (whose keys all
    /// start with `base`) that start with `prefix` and sort after `after`, until `out` holds
    /// `limit`. Subdirectories whose keys cannot match are skipped unread. A directory known
    /// to the listing cache costs a binary search and the entries returned; any other is read
    /// once, its smallest entries *selected* (linear) and only those sorted.
    fn collect(
        &self,
        dir: &Path,
        base: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        out: &mut Vec<String>,
    ) -> io::Result<()> {
        // Everything below is compared relative to `base`, which every key here starts with.
        let rel_prefix = prefix.strip_prefix(base).unwrap_or("");
        let rel_after = match after {
            Some(a) if a.starts_with(base) => Some(&a[base.len()..]),
            Some(a) if a > base => return Ok(()), // every key here sorts before the cursor
            _ => None,
        };
        // Whether an entry holds keys of the listing: a file is one key; a directory stands
        // for the keys below it, which all extend its `rel` (`<segment>/`).
        let wanted = |e: &Listed| {
            if e.dir {
                (e.rel.starts_with(rel_prefix) || rel_prefix.starts_with(&*e.rel))
                    && rel_after.is_none_or(|a| a < &*e.rel || a.starts_with(&*e.rel))
            } else {
                e.rel.starts_with(rel_prefix) && rel_after.is_none_or(|a| &*e.rel > a)
            }
        };
        let visit = |e: &Listed, out: &mut Vec<String>| -> io::Result<()> {
            let key = format!("{base}{}", e.rel);
            if e.dir {
                let name = escape(&e.rel[..e.rel.len() - 1]);
                self.collect(&dir.join(name), &key, prefix, after, limit, out)
            } else {
                out.push(key);
                Ok(())
            }
        };
        match self.read_dir(dir)? {
            Listing::Cached(cache) => {
                // Taken from the cache a chunk at a time, each a seek in the ordered entries
                // and a copy of the chunk; its lock is not held while subdirectories are
                // listed (they may be cached too).
                let mut from = lock(&cache).start(rel_prefix, rel_after);
                'chunks: loop {
                    let want = limit.saturating_sub(out.len()).clamp(1, CHUNK);
                    let chunk = lock(&cache).chunk(&from, want);
                    for e in &chunk {
                        if out.len() >= limit
                            || (!e.rel.starts_with(rel_prefix) && !rel_prefix.starts_with(&*e.rel))
                        {
                            break 'chunks; // full, or past the keys with the prefix
                        }
                        if wanted(e) {
                            visit(e, out)?;
                        }
                    }
                    match chunk.into_iter().last() {
                        Some(last) if out.len() < limit => from = Bound::Excluded(last.rel),
                        _ => break,
                    }
                }
            }
            Listing::Unsorted(mut found) => {
                found.retain(|e| wanted(e));
                let by_rel = |a: &Listed, b: &Listed| a.rel.cmp(&b.rel);
                let mut rest = &mut found[..];
                // Usually one round; another only when directories held fewer keys than the
                // page.
                while out.len() < limit && !rest.is_empty() {
                    let want = (limit - out.len()).min(rest.len());
                    if want < rest.len() {
                        rest.select_nth_unstable_by(want - 1, by_rel);
                    }
                    let (head, tail) = rest.split_at_mut(want);
                    head.sort_unstable_by(by_rel);
                    for e in head.iter() {
                        if out.len() >= limit {
                            break;
                        }
                        visit(e, out)?;
                    }
                    rest = tail;
                }
            }
        }
        Ok(())
    }

    /// The entries of `dir`: from the listing cache when it holds them, or when the directory
    /// is large enough to be cached now; otherwise as read.
    fn read_dir(&self, dir: &Path) -> io::Result<Listing> {
        match self.cached(dir)? {
            Some(Ok(hit)) => return Ok(Listing::Cached(hit)),
            Some(Err(Stale)) => return self.build(dir),
            None => {}
        }
        // A directory that looks large (its size, which grows with its entries on the usual
        // file systems: 20 bytes an entry on tmpfs, a 4 KiB block per ~200 on ext4) gets its
        // journal before its first read, so that one read fills the cache.
        if cfg!(unix) && fs::metadata(dir).is_ok_and(|m| m.len() >= LARGE_DIR_BYTES) {
            return self.build(dir);
        }
        let found = self.read_entries(dir)?;
        if cfg!(unix) && found.len() >= self.cache_min_entries && found.len() <= CACHE_MAX_ENTRIES {
            // Large: cached from now on. Its journal must exist before the directory is read
            // (what the read misses is then recorded past the offset taken), so a directory
            // that had none and did not look large is read a second time, once.
            return self.build(dir);
        }
        Ok(Listing::Unsorted(found))
    }

    /// The cache of `dir`, brought up to date with its journal; `Some(Err(Stale))` if it
    /// must be read afresh (the journal was replaced or removed, too much changed, or the
    /// cache is older than `MAX_AGE`); `None` if it is not cached.
    fn cached(&self, dir: &Path) -> io::Result<Option<Result<Arc<Mutex<DirCache>>, Stale>>> {
        let Some(slot) = self.cache.get(dir) else {
            return Ok(None);
        };
        let mut c = lock(&slot);
        let fresh = match fs::metadata(dir.join(fs_journal::JOURNAL)) {
            Ok(m)
                if c.built.elapsed() < self.cache_max_age
                    && fs_journal::identity(&m) == Some(c.journal)
                    && m.len() >= c.offset =>
            {
                self.catch_up(dir, &mut c, m.len())
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        };
        drop(c);
        match fresh {
            Ok(true) => Ok(Some(Ok(slot))),
            Ok(false) => {
                self.cache.remove(dir, &slot);
                Ok(Some(Err(Stale)))
            }
            Err(e) => {
                self.cache.remove(dir, &slot);
                Err(e)
            }
        }
    }

    /// Brings `c` up to the journal's `end`: for each entry its new records name, caches what
    /// the directory holds now (see `fs_journal`: the record's `+` or `-` is not trusted).
    /// `false` if the directory is better read afresh.
    fn catch_up(&self, dir: &Path, c: &mut DirCache, end: u64) -> io::Result<bool> {
        if end == c.offset {
            return Ok(true);
        }
        if end - c.offset > fs_journal::CATCH_UP_MAX {
            return Ok(false);
        }
        let journal = dir.join(fs_journal::JOURNAL);
        let Some(bytes) = fs_journal::read(&journal, c.journal, c.offset, end)? else {
            return Ok(false);
        };
        let (names, used) = fs_journal::parse(&bytes);
        for name in names {
            let (rel, is_dir) = match name.strip_suffix('=') {
                Some(seg) => match unescape(seg) {
                    Some(s) => (s, false),
                    None => continue,
                },
                None => match unescape(name) {
                    Some(s) => (format!("{s}/"), true),
                    None => continue,
                },
            };
            let present = match fs::symlink_metadata(dir.join(name)) {
                Ok(m) => m.is_dir() == is_dir,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(e),
            };
            if present {
                c.entries.insert(rel.into(), is_dir);
            } else {
                c.entries.remove(rel.as_str());
            }
        }
        c.offset += used as u64;
        Ok(true)
    }

    /// Reads `dir` into the cache: its journal (created if need be) is looked at first, then
    /// the directory is read, so that any change the read misses is recorded past the offset
    /// kept. Unsorted, not cached, if the directory is small (or the journal cannot be used).
    fn build(&self, dir: &Path) -> io::Result<Listing> {
        match fs_journal::create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Listing::Unsorted(vec![])),
            Err(e) => return Err(e),
        }
        let journal = match fs::metadata(dir.join(fs_journal::JOURNAL)) {
            Ok(m) => fs_journal::identity(&m).map(|id| (id, m.len())),
            // Just removed by a writer that took it past its size: read without caching.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let found = self.read_entries(dir)?;
        let Some((journal, offset)) = journal else {
            return Ok(Listing::Unsorted(found));
        };
        if found.len() < self.cache_min_entries || found.len() > CACHE_MAX_ENTRIES {
            return Ok(Listing::Unsorted(found));
        }
        let len = found.len();
        let slot = Arc::new(Mutex::new(DirCache {
            journal,
            offset,
            built: Instant::now(),
            entries: found.into_iter().map(|e| (e.rel, e.dir)).collect(),
        }));
        self.cache.put(dir, slot.clone(), len);
        Ok(Listing::Cached(slot))
    }

    /// The entries of `dir` as read (none if it does not exist).
    fn read_entries(&self, dir: &Path) -> io::Result<Vec<Listed>> {
        let mut found = Vec::new();
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            // Removed since the parent was read (a delete left it empty).
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue; // temporary files, locks, the journal
            }
            if let Some(seg) = name.strip_suffix('=') {
                if let Some(seg) = unescape(seg) {
                    found.push(Listed {
                        rel: seg.into(),
                        dir: false,
                    });
                }
            } else if entry.file_type()?.is_dir()
                && let Some(seg) = unescape(name)
            {
                found.push(Listed {
                    rel: format!("{seg}/").into(),
                    dir: true,
                });
            }
        }
        self.entries_read
            .fetch_add(found.len() as u64, Ordering::Relaxed);
        Ok(found)
    }

    /// How many directory entries listings have read from disk since this store was opened
    /// (all its clones together): what listings cost, for tests and diagnostics.
    pub fn entries_read(&self) -> u64 {
        self.entries_read.load(Ordering::Relaxed)
    }
}

/// One entry of a key directory: `rel` is its key segment (unescaped), followed by `/` for a
/// directory, which stands for every key below it. Sorting a directory's entries by `rel` sorts
/// the keys: no key below a directory falls between it and a sibling.
#[derive(Clone)]
struct Listed {
    rel: Box<str>,
    dir: bool,
}

enum Listing {
    Cached(Arc<Mutex<DirCache>>),
    Unsorted(Vec<Listed>),
}

/// A cached directory must be read afresh.
struct Stale;

/// Directories with fewer entries are read afresh every time: a cache would save little.
const CACHE_MIN_ENTRIES: usize = 1024;
/// At most this many entries are cached, over all directories (some tens of MiB), the least
/// recently used directories dropped first.
const CACHE_MAX_ENTRIES: usize = 512 * 1024;
/// A directory at least this size (`st_size`) is taken for a large one before it is read: about
/// 800 entries on tmpfs, fewer on ext4. Only saves a read: a directory found large by reading
/// it is cached anyway (read again, once, after its journal is made).
const LARGE_DIR_BYTES: u64 = 16 * 1024;
/// Entries copied out of a cached directory at a time (the whole list, with no `n`, is
/// taken in chunks of this many).
const CHUNK: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sorted entries of large key directories (a repository's tags, the catalog), kept in this
/// process and brought up to date on each listing from the directory's change journal
/// (`fs_journal`): a page of the tags list costs a `stat` of the journal, a look at each
/// entry changed since the last listing, a seek in the ordered entries and the page, however
/// large the directory and however often it changes. It is only a copy of what the
/// directory holds: a crash cannot leave it inconsistent, and writers never wait on it.
/// Several processes sharing a data directory each keep their own, and learn of each other's
/// writes through the journals.
#[derive(Default)]
struct ListingCache(Mutex<CacheState>);

#[derive(Default)]
struct CacheState {
    dirs: HashMap<PathBuf, Slot>,
    /// Entries of all directories when they were read (what joins and leaves later is not
    /// counted: the bound is on what reads put in).
    entries: usize,
    clock: u64,
}

struct Slot {
    cache: Arc<Mutex<DirCache>>,
    len: usize,
    used: u64,
}

struct DirCache {
    /// The journal the entries follow, and how far they have read it.
    journal: Identity,
    offset: u64,
    /// When the directory was read.
    built: Instant,
    /// Each entry's `rel`, and whether it is a directory.
    entries: BTreeMap<Box<str>, bool>,
}

impl DirCache {
    /// Where a listing after `rel_after` (relative), of keys starting with `rel_prefix`,
    /// starts: past every entry that sorts at or before the cursor, except the directory
    /// that holds it.
    fn start(&self, rel_prefix: &str, rel_after: Option<&str>) -> Bound<Box<str>> {
        let Some(a) = rel_after else {
            return Bound::Included(rel_prefix.into());
        };
        if let Some((rel, true)) = self
            .entries
            .range::<str, _>((Bound::Unbounded, Bound::Included(a)))
            .next_back()
            && a.starts_with(&**rel)
        {
            let start: &str = if &**rel >= rel_prefix {
                rel
            } else {
                rel_prefix
            };
            return Bound::Included(start.into());
        }
        if rel_prefix > a {
            Bound::Included(rel_prefix.into())
        } else {
            Bound::Excluded(a.into())
        }
    }

    /// At most `n` entries from `from` on.
    fn chunk(&self, from: &Bound<Box<str>>, n: usize) -> Vec<Listed> {
        let lower = match from {
            Bound::Included(s) => Bound::Included(&**s),
            Bound::Excluded(s) => Bound::Excluded(&**s),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.entries
            .range::<str, _>((lower, Bound::Unbounded))
            .take(n)
            .map(|(rel, &dir)| Listed {
                rel: rel.clone(),
                dir,
            })
            .collect()
    }
}

impl ListingCache {
    fn get(&self, dir: &Path) -> Option<Arc<Mutex<DirCache>>> {
        let mut state = lock(&self.0);
        state.clock += 1;
        let clock = state.clock;
        let slot = state.dirs.get_mut(dir)?;
        slot.used = clock;
        Some(slot.cache.clone())
    }

    fn put(&self, dir: &Path, cache: Arc<Mutex<DirCache>>, len: usize) {
        let mut state = lock(&self.0);
        state.clock += 1;
        if let Some(old) = state.dirs.remove(dir) {
            state.entries -= old.len;
        }
        while state.entries + len > CACHE_MAX_ENTRIES {
            let oldest = state
                .dirs
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(d, _)| d.clone())
                .expect("the cache holds entries");
            let old = state.dirs.remove(&oldest).expect("just found");
            state.entries -= old.len;
        }
        state.entries += len;
        let used = state.clock;
        state.dirs.insert(dir.to_owned(), Slot { cache, len, used });
    }

    /// Drops `dir` if it still holds `cache` (another thread may have read it afresh).
    fn remove(&self, dir: &Path, cache: &Arc<Mutex<DirCache>>) {
        let mut state = lock(&self.0);
        if state
            .dirs
            .get(dir)
            .is_some_and(|s| Arc::ptr_eq(&s.cache, cache))
        {
            let old = state.dirs.remove(dir).expect("just found");
            state.entries -= old.len;
        }
    }
}

/// Escapes one key segment for use as a file name.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0);
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl FsKv {
    fn get_now(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match fs::read(self.path(key)?) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn set_now(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let dir = path.parent().expect("a key path has a parent");
        let mut retries = 0;
        loop {
            let tmp = dir.join(format!(".tmp-{}", nonce()));
            let result = create_dirs(dir, self.fsync)
                .and_then(|()| write_file(&tmp, value, self.fsync))
                .and_then(|()| fs::rename(&tmp, &path))
                .and_then(|()| if self.fsync { sync_dir(dir) } else { Ok(()) });
            if result.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            match result {
                Ok(()) => {
                    // After the rename: a reader that finds this record finds the file.
                    if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                        fs_journal::note(dir, b'+', name);
                    }
                    return Ok(());
                }
                // A delete removed a directory of the path, then empty, before the temporary
                // file was created in it (once created, it keeps the directory): make it again.
                // (`create_dir_all` reports AlreadyExists when a directory it found vanishes
                // before it checks it.) Each retry loses only to another such delete at that
                // instant; the bound only ends a loop on a path that keeps vanishing.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::AlreadyExists
                    ) && retries < 100 =>
                {
                    retries += 1
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Removes the directories above `path` that are left empty, up to the root: without this,
    /// `upload-index/<second>/` and other one-off directories would pile up, and every listing
    /// would read them. `remove_dir` refuses a directory that is not empty, so a key written
    /// meanwhile stays (and a writer that loses its directory recreates it: `set_now`).
    fn remove_empty_parents(&self, path: &Path) {
        let mut dir = path.parent();
        while let Some(d) = dir
            && d != self.root
            && d.starts_with(&self.root)
            && (fs::remove_dir(d).is_ok() || remove_if_only_journal(d))
        {
            dir = d.parent();
            if let (Some(parent), Some(name)) = (dir, d.file_name().and_then(|n| n.to_str())) {
                fs_journal::note(parent, b'-', name);
            }
        }
    }
}

/// Removes `dir` if its journal (`fs_journal`) is all it holds, the journal first: a large
/// directory emptied would otherwise stay for good. Looks only when the journal exists, and at
/// the first entries only, so a delete in a large directory costs one `stat` and one short
/// read more. A key written meanwhile keeps the directory (`remove_dir` refuses it), without
/// a journal: readers then read it afresh and start another, as after a rotation.
fn remove_if_only_journal(dir: &Path) -> bool {
    let journal = dir.join(fs_journal::JOURNAL);
    if fs::symlink_metadata(&journal).is_err() {
        return false;
    }
    let Ok(mut entries) = fs::read_dir(dir) else {
        return false;
    };
    let only_journal = entries.all(|e| e.is_ok_and(|e| e.file_name() == fs_journal::JOURNAL));
    only_journal && fs::remove_file(&journal).is_ok() && fs::remove_dir(dir).is_ok()
}

impl KeyValue for FsKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get_now(key)
    }

    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.set_now(key, value)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                if let (Some(dir), Some(name)) =
                    (path.parent(), path.file_name().and_then(|n| n.to_str()))
                {
                    fs_journal::note(dir, b'-', name);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.remove_empty_parents(&path);
        Ok(())
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        // Start at the deepest directory that holds every key with this prefix. A flat
        // directory (a repository's tags) is read whole whatever the page size, but only the
        // page is sorted, and only the subdirectories that can hold the page are entered.
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let (dir_prefix, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let mut dir = self.root.clone();
        let mut base = String::new();
        if !dir_prefix.is_empty() {
            for seg in dir_prefix.split('/') {
                if seg.is_empty() {
                    return Err(StoreError::new(format!("invalid prefix {prefix:?}")));
                }
                dir.push(escape(seg));
                base.push_str(seg);
                base.push('/');
            }
        }
        self.collect(&dir, &base, prefix, after, limit, &mut out)?;
        Ok(out)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: &[u8],
    ) -> Result<bool, StoreError> {
        // Threads of this process queue on the mutex; other processes and other instances
        // (wasmtime serve runs one per request on the same directory) on the lock file.
        let _guard = self.cas.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.path(key)?;
        let _lock = KeyLock::acquire(&path, self.fsync)?;
        if self.get_now(key)?.as_deref() != expected {
            return Ok(false);
        }
        self.set_now(key, new)?;
        Ok(true)
    }
}

/// An exclusive lock on one key, for compare-and-swap across processes and instances: a file
/// `.lock-<name>` beside the key's file, created with `O_EXCL` (`create_new`, which
/// `wasi:filesystem` provides too) and removed on drop. Dot-files are never keys, so listings
/// skip it.
struct KeyLock(PathBuf);

/// How long a compare-and-swap waits for another holder before giving up (a store error).
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// A lock file older than this was left by a holder that crashed: a compare-and-swap holds it
/// for one read and one small write, milliseconds.
const LOCK_STALE: Duration = Duration::from_secs(30);

impl KeyLock {
    /// `fsync`: directories made for the lock are synced into their parents (the key written
    /// under the lock lives in them).
    fn acquire(key_path: &Path, fsync: bool) -> Result<KeyLock, StoreError> {
        let dir = key_path.parent().expect("a key path has a parent");
        let name = key_path.file_name().expect("a key path has a name");
        let lock = dir.join(format!(".lock-{}", name.to_string_lossy()));
        let start = std::time::Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
            {
                Ok(mut f) => {
                    // Who holds it, so that a lock left by a killed process on this machine
                    // is taken over at once instead of after LOCK_STALE (see `holder_is_gone`).
                    if let Some(owner) = lock_owner() {
                        let _ = f.write_all(owner.as_bytes());
                    }
                    return Ok(KeyLock(lock));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => create_dirs(dir, fsync)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if let Some(seen) = LockSeen::read(&lock)
                        && seen.is_stale()
                    {
                        // Left by a crashed holder: removed, if it is still the one judged.
                        tracing::warn!(lock = %lock.display(), "removing a stale key lock");
                        seen.remove(&lock);
                        continue;
                    }
                    if start.elapsed() > LOCK_WAIT {
                        return Err(StoreError::new(format!(
                            "timed out waiting for the lock {}",
                            lock.display()
                        )));
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A lock file as a waiter saw it: its owner (if named) and modification time.
#[derive(PartialEq)]
struct LockSeen {
    owner: Vec<u8>,
    modified: SystemTime,
}

impl LockSeen {
    fn read(lock: &Path) -> Option<LockSeen> {
        let modified = fs::metadata(lock).and_then(|m| m.modified()).ok()?;
        let owner = fs::read(lock).ok()?;
        Some(LockSeen { owner, modified })
    }

    fn is_stale(&self) -> bool {
        holder_is_gone(&self.owner)
            || SystemTime::now()
                .duration_since(self.modified)
                .is_ok_and(|age| age > LOCK_STALE)
    }

    /// Removes `lock` if it is still this one. Two waiters may judge the same stale lock; if
    /// the first removed it and took the lock anew before the second acts, a plain remove by
    /// the second would delete a live lock, and both would hold it. So the lock is first
    /// moved aside (atomic), checked, and put back (a link, which never replaces a file) if
    /// it turns out to be another.
    fn remove(&self, lock: &Path) {
        let aside = lock.with_file_name(format!(".stale-{}", nonce()));
        if fs::rename(lock, &aside).is_err() {
            return; // gone already
        }
        if LockSeen::read(&aside).as_ref() != Some(self) && fs::hard_link(&aside, lock).is_err() {
            tracing::warn!(lock = %lock.display(), "a live key lock was moved and could not be restored");
        }
        let _ = fs::remove_file(&aside);
    }
}

/// `<pid> <boot id>` of this process on Linux: what a lock file holds. `None` elsewhere (and
/// in wasm, which has neither): such locks go stale by age only.
fn lock_owner() -> Option<String> {
    if cfg!(target_family = "wasm") {
        return None;
    }
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(format!("{} {}", std::process::id(), boot.trim()))
}

/// Whether a lock file's `owner` names a holder that has exited: a process of this machine since its
/// last boot (same boot id; another machine sharing the directory has another) whose
/// `/proc/<pid>` is gone. A reused pid only delays the takeover to LOCK_STALE.
fn holder_is_gone(owner: &[u8]) -> bool {
    let Some(ours) = lock_owner() else {
        return false;
    };
    let Ok(theirs) = std::str::from_utf8(owner) else {
        return false;
    };
    let (Some((pid, boot)), Some((_, our_boot))) = (theirs.split_once(' '), ours.split_once(' '))
    else {
        return false; // being written, or by an instance that names no owner
    };
    boot == our_boot
        && pid.parse::<u32>().is_ok()
        && matches!(fs::metadata(format!("/proc/{pid}")), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Blob store

/// A blob store on a directory: each object a file, written to `tmp/` and renamed into place
/// (synced first, unless [`fsync(false)`](FsBlobs::fsync)). Its operations are shown on
/// [`BlobStore`]; a registry on it with [`FsKv`] on [`FsKv`]'s page. A pushed blob is a
/// plain file, at the path [`crate::layout`] gives it:
///
/// ```
/// use dockside::{Config, FsBlobs, FsKv, Registry};
/// use http_body_util::Full;
///
/// # futures_executor::block_on(async {
/// let dir = tempfile::tempdir().unwrap();
/// // Tests may skip fsync; a server keeps it on.
/// let blobs = FsBlobs::new(dir.path()).unwrap().fsync(false);
/// let kv = FsKv::new(dir.path().join("kv")).unwrap().fsync(false);
/// let registry = Registry::new(kv, blobs, Config::default());
/// let hex = "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9";
/// let push = http::Request::post(format!("/v2/hello/blobs/uploads/?digest=sha256:{hex}"))
///     .body(Full::new(&b"hello world"[..]))
///     .unwrap();
/// assert_eq!(registry.handle(push).await.status(), 201);
/// let file = dir.path().join("blobs/sha256").join(&hex[..2]).join(hex);
/// assert_eq!(std::fs::read(file).unwrap(), b"hello world");
/// # });
/// ```
#[derive(Clone)]
pub struct FsBlobs {
    root: PathBuf,
    fsync: bool,
}

impl FsBlobs {
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        fs::create_dir_all(root.join("tmp"))?;
        Ok(FsBlobs { root, fsync: true })
    }

    /// Whether objects are fsynced before they are renamed into place (the default). Upload
    /// parts must reach the disk before the session records the hash state that covers them:
    /// without fsync, a machine crash can leave a part shorter than its recorded hash, and a
    /// later closing PUT would publish a blob that does not match its digest.
    pub fn fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    fn path(&self, path: &str) -> Result<PathBuf, StoreError> {
        // Paths come from crate::layout, built from validated values; check again anyway, since
        // this is where a path meets the filesystem.
        let ok = !path.is_empty()
            && path.split('/').all(|s| {
                !s.is_empty()
                    && !s.starts_with('.')
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            });
        if !ok {
            return Err(StoreError::new(format!("invalid blob path {path:?}")));
        }
        Ok(self.root.join(path))
    }

    fn temp(&self) -> PathBuf {
        self.root.join("tmp").join(nonce())
    }

    /// Removes temporary files older than `age`: what a crash or a kill left mid-write. Called
    /// by the native server at startup; returns how many it removed.
    pub fn clean_temporary(&self, age: Duration) -> io::Result<usize> {
        let mut removed = 0;
        let now = SystemTime::now();
        for entry in fs::read_dir(self.root.join("tmp"))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if now.duration_since(meta.modified()?).unwrap_or_default() >= age {
                if meta.is_dir() {
                    fs::remove_dir_all(entry.path())?;
                } else {
                    fs::remove_file(entry.path())?;
                }
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Moves a finished temporary file or segment directory to `dest`, creating its
    /// directory. If another writer published `dest` first (a rename cannot replace a
    /// directory, or a file by a directory), theirs stays: blob paths are content-addressed.
    fn publish(&self, tmp: &Path, dest: &Path) -> io::Result<()> {
        let dir = dest.parent().expect("a blob path has a parent");
        create_dirs(dir, self.fsync)?;
        match fs::rename(tmp, dest) {
            Err(e) if fs::symlink_metadata(dest).is_ok() => {
                let _ = fs::remove_dir_all(tmp).or_else(|_| fs::remove_file(tmp));
                tracing::debug!("{} already published ({e})", dest.display());
            }
            other => other?,
        }
        // Whoever published it, the name is durable before the write is acknowledged.
        if self.fsync { sync_dir(dir) } else { Ok(()) }
    }
}

impl BlobStore for FsBlobs {
    type Reader = FileReader;

    async fn write<S: ByteSource>(
        &self,
        path: &str,
        src: &mut S,
    ) -> Result<u64, WriteError<S::Error>> {
        let dest = self.path(path)?;
        let tmp = self.temp();
        let file = File::create(&tmp).map_err(StoreError::from)?;
        // Receiving and hashing (the source) on this task, writing and flushing on another.
        let mut out = WriteBehind::start(file, self.fsync);
        let result = async {
            let mut len = 0u64;
            while let Some(chunk) = src.next_chunk().await {
                let chunk = chunk.map_err(WriteError::Source)?;
                len += chunk.len() as u64;
                out.push(chunk).map_err(StoreError::from)?;
            }
            out.finish().map_err(StoreError::from)?;
            self.publish(&tmp, &dest).map_err(StoreError::from)?;
            Ok(len)
        }
        .await;
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    async fn read(
        &self,
        path: &str,
        range: Option<Range<u64>>,
    ) -> Result<Option<FileReader>, StoreError> {
        let Some(segments) = self.segments(path)? else {
            return Ok(None);
        };
        let total: u64 = segments.iter().map(|(_, len)| len).sum();
        let range = range.unwrap_or(0..total);
        // The part of each segment that falls in the range.
        let mut plan = Vec::new();
        let mut start = 0;
        for (p, len) in segments {
            let (a, b) = (range.start.max(start), range.end.min(start + len));
            if a < b {
                plan.push((p, a - start, b - a));
            }
            start += len;
        }
        Ok(Some(FileReader {
            file: None,
            in_file: 0,
            plan: plan.into_iter(),
            remaining: range.end.saturating_sub(range.start),
        }))
    }

    async fn size(&self, path: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .segments(path)?
            .map(|s| s.iter().map(|(_, len)| len).sum()))
    }

    async fn delete(&self, path: &str) -> Result<(), StoreError> {
        let p = self.path(path)?;
        let result = match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
            Ok(_) => fs::remove_file(&p),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        // Upload parts live in a directory per upload: drop it once empty.
        if path.starts_with("uploads/")
            && let Some(dir) = p.parent()
        {
            let _ = fs::remove_dir(dir);
        }
        Ok(())
    }

    async fn assemble(&self, parts: &[String], dest: &str) -> Result<(), StoreError> {
        let dest = self.path(dest)?;
        let paths = parts
            .iter()
            .map(|p| self.path(p))
            .collect::<Result<Vec<_>, _>>()?;
        match paths.as_slice() {
            // The common case (a monolithic or single-PATCH upload): a rename.
            [single] => self.publish(single, &dest)?,
            [] => {
                let tmp = self.temp();
                write_file(&tmp, b"", self.fsync)?;
                self.publish(&tmp, &dest)?;
            }
            // Several parts: a segmented object, a directory of the parts in order, built in
            // tmp/ and renamed into place. Renames only: no byte is copied (a copy would write
            // the whole blob to disk a second time).
            many => {
                let tmp = self.temp();
                let result = (|| {
                    fs::create_dir(&tmp)?;
                    for (i, p) in many.iter().enumerate() {
                        fs::rename(p, tmp.join(format!("{i:08}")))?;
                    }
                    if self.fsync {
                        sync_dir(&tmp)?;
                    }
                    self.publish(&tmp, &dest)
                })();
                if let Err(e) = result {
                    let _ = fs::remove_dir_all(&tmp);
                    return Err(e.into());
                }
            }
        }
        if let Some(dir) = paths.first().and_then(|p| p.parent()) {
            let _ = fs::remove_dir(dir);
        }
        Ok(())
    }
}

impl FsBlobs {
    /// The files of an object, in order, with their lengths: one for a plain object, the
    /// segments of a segmented one (see `assemble`). `None` if there is no such object.
    fn segments(&self, path: &str) -> Result<Option<Vec<(PathBuf, u64)>>, StoreError> {
        let p = self.path(path)?;
        let meta = match fs::metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if !meta.is_dir() {
            return Ok(Some(vec![(p, meta.len())]));
        }
        let mut segments = Vec::new();
        for entry in fs::read_dir(&p)? {
            let entry = entry?;
            segments.push((entry.path(), entry.metadata()?.len()));
        }
        segments.sort();
        Ok(Some(segments))
    }
}

/// Streams a byte range of an object, file after file (segments), in 256 KiB reads.
pub struct FileReader {
    file: Option<File>,
    /// Bytes still to read from `file`.
    in_file: u64,
    /// The files still to read: path, offset to start at, bytes to read.
    plan: std::vec::IntoIter<(PathBuf, u64, u64)>,
    remaining: u64,
}

impl FileReader {
    fn next_file(&mut self) -> io::Result<bool> {
        let Some((path, offset, len)) = self.plan.next() else {
            return Ok(false);
        };
        let mut f = File::open(path)?;
        if offset > 0 {
            f.seek(SeekFrom::Start(offset))?;
        }
        self.file = Some(f);
        self.in_file = len;
        Ok(true)
    }
}

impl http_body::Body for FileReader {
    type Data = Bytes;
    type Error = StoreError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StoreError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        while self.in_file == 0 {
            match self.next_file() {
                Ok(true) => {}
                Ok(false) => {
                    return Poll::Ready(Some(Err(StoreError::new(
                        "blob is shorter than recorded",
                    ))));
                }
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
        let want = self.in_file.min(READ_CHUNK as u64) as usize;
        // Read into spare capacity: `read_to_end` on a `Take` fills it without zeroing it
        // first (a 256 KiB memset per chunk on the pull path otherwise).
        let mut buf = Vec::with_capacity(want);
        let file = self.file.as_mut().expect("opened above");
        let n = match Read::by_ref(file).take(want as u64).read_to_end(&mut buf) {
            Ok(0) => {
                return Poll::Ready(Some(Err(StoreError::new(
                    "blob file is shorter than recorded",
                ))));
            }
            Ok(n) => n,
            Err(e) => return Poll::Ready(Some(Err(e.into()))),
        };
        self.in_file -= n as u64;
        self.remaining -= n as u64;
        if self.in_file == 0 {
            self.file = None;
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_and_is_safe() {
        for s in ["latest", "..", ".hidden", "a:b", "sha256", "x=y", "%", "ü"] {
            let e = escape(s);
            assert!(!e.starts_with('.'), "{e}");
            assert!(!e.contains('/') && !e.contains('='), "{e}");
            assert_eq!(unescape(&e).as_deref(), Some(s));
        }
    }

    /// Linux filesystems are case-sensitive: the probe passes and leaves nothing behind.
    #[test]
    fn case_probe_passes_on_a_case_sensitive_directory() {
        let dir = tempfile::tempdir().unwrap();
        let kv = FsKv::new(dir.path()).unwrap();
        kv.check_case_sensitive().unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A lock file left by a crashed holder is taken over once stale; a fresh one is waited on.
    #[test]
    fn key_locks_are_exclusive_and_recover_from_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k=");
        let held = KeyLock::acquire(&key, false).unwrap();
        let lock_file = dir.path().join(".lock-k=");
        assert!(lock_file.exists());
        // Another holder waits until the first lets go.
        let t = std::thread::spawn({
            let key = key.clone();
            move || {
                let start = std::time::Instant::now();
                let _l = KeyLock::acquire(&key, false).unwrap();
                start.elapsed()
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        drop(held);
        assert!(t.join().unwrap() >= Duration::from_millis(150));
        assert!(!lock_file.exists());
        // A crash left the lock behind, long ago: taken over at once.
        let f = File::create(&lock_file).unwrap();
        f.set_modified(SystemTime::now() - LOCK_STALE * 2).unwrap();
        drop(f);
        let start = std::time::Instant::now();
        drop(KeyLock::acquire(&key, false).unwrap());
        assert!(start.elapsed() < LOCK_WAIT);
        assert!(!lock_file.exists());
        // Left a moment ago by a process of this machine that has exited (killed mid-CAS):
        // taken over at once, not after LOCK_STALE.
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let pid = dead.id();
        dead.wait().unwrap();
        let owner = lock_owner().expect("Linux names lock owners");
        let boot = owner.split_once(' ').unwrap().1;
        fs::write(&lock_file, format!("{pid} {boot}")).unwrap();
        let start = std::time::Instant::now();
        drop(KeyLock::acquire(&key, false).unwrap());
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        // Held by a live process (this one): waited for, not taken.
        assert!(!holder_is_gone(owner.as_bytes()));
        // Of another machine (another boot id): only age makes it stale.
        assert!(!holder_is_gone(format!("{pid} not-this-boot").as_bytes()));
        // A stale lock judged by two waiters: the first removed it and took the lock anew;
        // the second, acting on what it saw, leaves the new one in place.
        fs::write(&lock_file, format!("{pid} {boot}")).unwrap();
        let seen = LockSeen::read(&lock_file).unwrap();
        assert!(seen.is_stale());
        seen.remove(&lock_file);
        let live = KeyLock::acquire(&key, false).unwrap();
        seen.remove(&lock_file);
        assert_eq!(fs::read_to_string(&lock_file).unwrap(), owner);
        drop(live);
        assert!(!lock_file.exists());
    }

    fn list(kv: &FsKv, prefix: &str, after: Option<&str>, limit: usize) -> Vec<String> {
        futures_executor::block_on(kv.list(prefix, after, limit)).unwrap()
    }

    /// The ordered walk (selection per directory, subdirectories skipped or entered) returns
    /// exactly what sorting every key would, for every prefix, cursor and limit: keys nested
    /// in directories interleave with files ('-' < '/' < '0'), like repository names do.
    #[test]
    fn listing_matches_a_full_sort() {
        listing_matches_a_full_sort_with(false);
    }

    /// The same from the listing cache (every directory cached, however small).
    #[test]
    fn cached_listing_matches_a_full_sort() {
        listing_matches_a_full_sort_with(true);
    }

    fn listing_matches_a_full_sort_with(cached: bool) {
        let dir = tempfile::tempdir().unwrap();
        let mut kv = FsKv::new(dir.path()).unwrap().fsync(false);
        let keys = [
            "c/a", "c/a-b", "c/a/x", "c/a/x/y", "c/a/y", "c/a0", "c/b", "c/b/c/d", "c/ab", "d",
            "c/%", "c/.x", "c/z", "ca", "c/a/x-", "c/a/x0",
        ];
        for k in keys {
            futures_executor::block_on(kv.set(k, b"")).unwrap();
        }
        let all: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        if cached {
            kv.cache_min_entries = 0;
            list(&kv, "", None, usize::MAX);
        }
        let read = kv.entries_read();
        for prefix in ["", "c/", "c/a", "c/a/", "c/a/x", "c/b/", "d", "e/"] {
            let mut cursors: Vec<Option<&str>> = vec![None, Some(""), Some("c/a/"), Some("zz")];
            cursors.extend(keys.iter().map(|k| Some(*k)));
            for after in cursors {
                for limit in [0, 1, 2, 3, 5, 100, usize::MAX] {
                    assert_eq!(
                        list(&kv, prefix, after, limit),
                        crate::host::page_of(all.clone(), prefix, after, limit),
                        "prefix {prefix:?} after {after:?} limit {limit}"
                    );
                }
            }
        }
        // From the cache, no directory was read again.
        assert_eq!(cached, kv.entries_read() == read);
    }

    /// A large directory is read once (its journal made first), then listed from the cache
    /// page after page; a change to
    /// it (a key added or removed, by this store or by another one on the same directory, as
    /// another process would be) is seen by the next listing without reading it again.
    #[test]
    fn large_directories_are_listed_from_the_cache_and_follow_changes() {
        let dir = tempfile::tempdir().unwrap();
        let kv = FsKv::new(dir.path()).unwrap().fsync(false);
        let other = FsKv::new(dir.path()).unwrap().fsync(false);
        let n = CACHE_MIN_ENTRIES * 2;
        let mut keys: Vec<String> = (0..n).map(|i| format!("t/k{i:05}")).collect();
        for k in &keys {
            futures_executor::block_on(kv.set(k, b"")).unwrap();
        }
        futures_executor::block_on(kv.set("t/sub/x", b"")).unwrap();
        keys.push("t/sub/x".to_owned());
        keys.sort();
        assert_eq!(list(&kv, "t/", None, 10), keys[..10]);
        assert_eq!(kv.entries_read(), n as u64 + 1);
        assert!(dir.path().join("t").join(fs_journal::JOURNAL).exists());
        let before = kv.entries_read();
        let mut seen = Vec::new();
        loop {
            let page = list(&kv, "t/", seen.last().map(String::as_str), 100);
            if page.is_empty() {
                break;
            }
            seen.extend(page);
        }
        assert_eq!(seen, keys);
        // Only the small subdirectory, not cached, on the two pages that reach it.
        assert_eq!(kv.entries_read() - before, 2);
        // A key added, one removed, by this store and by the other: seen at once, unread.
        let before = kv.entries_read();
        futures_executor::block_on(kv.set("t/k00000a", b"")).unwrap();
        futures_executor::block_on(other.delete("t/k00001")).unwrap();
        futures_executor::block_on(other.set("t/k00002a", b"")).unwrap();
        assert_eq!(
            list(&kv, "t/", Some("t/k00000"), 4),
            ["t/k00000a", "t/k00002", "t/k00002a", "t/k00003"]
        );
        // A subdirectory made and emptied by the other: in, then out.
        futures_executor::block_on(other.set("t/k00002b/x", b"")).unwrap();
        assert_eq!(
            list(&kv, "t/", Some("t/k00002a"), 2),
            ["t/k00002b/x", "t/k00003"]
        );
        futures_executor::block_on(other.delete("t/k00002b/x")).unwrap();
        assert_eq!(list(&kv, "t/", Some("t/k00002a"), 1), ["t/k00003"]);
        assert_eq!(list(&kv, "t/", Some("t/k02047"), 5), ["t/sub/x"]);
        // No read of `t` itself: one of `t/k00002b` while it existed, one of `t/sub`.
        assert_eq!(kv.entries_read() - before, 2);
        // The journal removed (as a writer does when it has grown large): read afresh, once,
        // and a new journal followed from then on.
        fs::remove_file(dir.path().join("t").join(fs_journal::JOURNAL)).unwrap();
        let before = kv.entries_read();
        assert_eq!(list(&kv, "t/", Some("t/k00000"), 1), ["t/k00000a"]);
        assert_eq!(kv.entries_read() - before, n as u64 + 2);
        futures_executor::block_on(other.delete("t/k00000a")).unwrap();
        assert_eq!(list(&kv, "t/", Some("t/k00000"), 1), ["t/k00002"]);
        assert_eq!(kv.entries_read() - before, n as u64 + 2);
    }

    /// Records that arrive out of order, as racing writers append them: the cache holds what
    /// the directory holds, whatever the last record's op says.
    #[test]
    fn records_out_of_order_cannot_mislead_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let kv = FsKv::new(dir.path())
            .unwrap()
            .fsync(false)
            .listing_cache_min(2);
        for k in ["t/a", "t/b", "t/c"] {
            futures_executor::block_on(kv.set(k, b"")).unwrap();
        }
        assert_eq!(list(&kv, "t/", None, 10), ["t/a", "t/b", "t/c"]);
        let t = dir.path().join("t");
        let append = |bytes: &[u8]| {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(t.join(fs_journal::JOURNAL))
                .unwrap();
            f.write_all(bytes).unwrap();
        };
        // W1 renamed `x` in, W2 removed it and recorded `-x`, then W1's late `+x`: gone.
        fs::write(t.join("x="), b"").unwrap();
        fs::remove_file(t.join("x=")).unwrap();
        append(b"\n-x=\n\n+x=\n");
        assert_eq!(list(&kv, "t/", None, 10), ["t/a", "t/b", "t/c"]);
        // W1 removed `b`, W2 renamed it in again and recorded `+b`, then W1's late `-b`: kept.
        fs::remove_file(t.join("b=")).unwrap();
        fs::write(t.join("b="), b"").unwrap();
        append(b"\n+b=\n\n-b=\n");
        assert_eq!(list(&kv, "t/", None, 10), ["t/a", "t/b", "t/c"]);
        // And the plain cases, by hand: a file added and its record, one removed and its.
        fs::write(t.join("d="), b"").unwrap();
        fs::remove_file(t.join("a=")).unwrap();
        append(b"\n+d=\n\n-a=\n");
        assert_eq!(list(&kv, "t/", None, 10), ["t/b", "t/c", "t/d"]);
        // All from the cache: `t` was read twice, for the first listing only.
        assert_eq!(kv.entries_read(), 6);
    }

    /// Deletes remove the directories they empty while another writer keeps creating keys in
    /// them: no write fails, and no write is lost.
    #[test]
    fn writers_survive_directories_removed_under_them() {
        let dir = tempfile::tempdir().unwrap();
        let kv = FsKv::new(dir.path()).unwrap().fsync(false);
        let churn = {
            let kv = kv.clone();
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    futures_executor::block_on(kv.set("a/b/c/churn", b"x")).unwrap();
                    futures_executor::block_on(kv.delete("a/b/c/churn")).unwrap();
                }
            })
        };
        for i in 0..1000 {
            let key = format!("a/b/{}/k", i % 2);
            futures_executor::block_on(kv.set(&key, b"v")).unwrap();
            assert!(futures_executor::block_on(kv.get(&key)).unwrap().is_some());
            futures_executor::block_on(kv.delete(&key)).unwrap();
        }
        churn.join().unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
