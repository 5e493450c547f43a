//! Local-directory hosts: the native server's default storage.
//!
//! Only `std::fs` is used, so the same code serves `wasi:filesystem` in a wasm component. Every
//! write goes to a temporary file, is fsynced, then renamed into place: a reader (or a restart
//! after a crash) sees a whole object or none.
//!
//! On disk, under the data directory:
//! ```text
//! <data>/kv/<key>        one file per key: each `/`-separated key segment is a directory, the
//!                        last segment the file, named <segment>= ; segments are escaped
//!                        (%XX for anything outside [A-Za-z0-9._-], and a leading '.')
//! <data>/blobs/...       blob store paths as they are (see crate::layout); an object is a
//!                        file, or, when assembled from several upload parts, a directory of
//!                        its segments 00000000, 00000001, ... (renamed in: no byte copied)
//! <data>/uploads/...
//! <data>/tmp/            objects being written; removed at startup when stale
//! ```

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

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

// ---------------------------------------------------------------------------------------------
// Key-value store

/// A key-value store on a directory tree, one file per key.
#[derive(Clone)]
pub struct FsKv {
    root: PathBuf,
    fsync: bool,
    /// Serializes compare-and-swap within this process; a lock file per key ([`KeyLock`])
    /// serializes it across processes and wasm instances sharing the directory.
    cas: Arc<Mutex<()>>,
}

impl FsKv {
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        Ok(FsKv {
            root,
            fsync: true,
            cas: Arc::default(),
        })
    }

    /// Whether writes are fsynced before they are renamed into place (the default). Without,
    /// a crash of the *machine* (not of the process) may lose or truncate recent writes.
    pub fn fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
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

    /// Collects every key below directory `dir` (whose key prefix is `base`) into `out`.
    fn walk(&self, dir: &Path, base: &str, out: &mut Vec<String>) -> io::Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue; // temporary files
            }
            if let Some(seg) = name.strip_suffix('=') {
                if let Some(seg) = unescape(seg) {
                    out.push(format!("{base}{seg}"));
                }
            } else if entry.file_type()?.is_dir()
                && let Some(seg) = unescape(name)
            {
                self.walk(&entry.path(), &format!("{base}{seg}/"), out)?;
            }
        }
        Ok(())
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
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".tmp-{}", nonce()));
        let result = write_file(&tmp, value, self.fsync).and_then(|()| fs::rename(&tmp, &path));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        Ok(result?)
    }
}

impl KeyValue for FsKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get_now(key)
    }

    async fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.set_now(key, value)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match fs::remove_file(self.path(key)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        // Walk the deepest directory that holds every key with this prefix. The cost is the
        // number of keys below it, whatever the page size.
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
        let mut keys = Vec::new();
        self.walk(&dir, &base, &mut keys)?;
        Ok(crate::host::page_of(keys, prefix, after, limit))
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
        let _lock = KeyLock::acquire(&path)?;
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
    fn acquire(key_path: &Path) -> Result<KeyLock, StoreError> {
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
                Ok(_) => return Ok(KeyLock(lock)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(dir)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let stale = fs::metadata(&lock)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .is_some_and(|age| age > LOCK_STALE);
                    if stale {
                        // Left by a crashed holder. Of several waiters that see it stale, one
                        // removes it and the others find it gone or fresh on their next try.
                        tracing::warn!(lock = %lock.display(), "removing a stale key lock");
                        let _ = fs::remove_file(&lock);
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

impl Drop for KeyLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Blob store

/// A blob store on a directory: each object a file.
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
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir)?;
        }
        match fs::rename(tmp, dest) {
            Err(e) if fs::symlink_metadata(dest).is_ok() => {
                let _ = fs::remove_dir_all(tmp).or_else(|_| fs::remove_file(tmp));
                tracing::debug!("{} already published ({e})", dest.display());
                Ok(())
            }
            other => other,
        }
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
        let mut file = File::create(&tmp).map_err(StoreError::from)?;
        let result = async {
            let mut len = 0u64;
            while let Some(chunk) = src.next_chunk().await {
                let chunk = chunk.map_err(WriteError::Source)?;
                file.write_all(&chunk).map_err(StoreError::from)?;
                len += chunk.len() as u64;
            }
            if self.fsync {
                file.sync_all().map_err(StoreError::from)?;
            }
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
        let held = KeyLock::acquire(&key).unwrap();
        let lock_file = dir.path().join(".lock-k=");
        assert!(lock_file.exists());
        // Another holder waits until the first lets go.
        let t = std::thread::spawn({
            let key = key.clone();
            move || {
                let start = std::time::Instant::now();
                let _l = KeyLock::acquire(&key).unwrap();
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
        drop(KeyLock::acquire(&key).unwrap());
        assert!(start.elapsed() < LOCK_WAIT);
        assert!(!lock_file.exists());
    }
}
