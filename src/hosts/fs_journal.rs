//! Change journals of large key directories: how a process's listing cache (`fs.rs`,
//! `ListingCache`) learns exactly of the entries that other processes sharing the data
//! directory (another `dockside serve`, `wasmtime serve` instances, `dockside gc`) create and
//! remove, by reading only what changed. The argument is in `docs/DESIGN.md`, "Listings".
//!
//! A journal is the file `.journal` inside the directory it describes (a dot-name: never a
//! key's file name, skipped by listings). It exists only for directories a listing found
//! large enough to cache: the reader creates it, and writers append to it only if it exists.
//! Every record is `\n<op><name>\n`: `op` is `+` (written after the rename or `mkdir` that
//! made the entry) or `-` (after the unlink or `rmdir`), `name` the entry's file name as on
//! disk (`<escaped segment>=` for a key, the escaped segment for a subdirectory). A reader
//! does not trust the op: for every name it reads it looks at the entry itself and caches
//! what it finds, so records that arrive out of order, twice, or torn cannot make it keep a
//! dead entry or drop a live one. The leading newline ends whatever a killed writer left
//! unfinished, so a torn record never swallows the next one.
//!
//! Appends are one `write` with `O_APPEND`, never fsynced: the journal is derived data, and a
//! machine crash, which could lose its tail, also empties every process's cache.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The journal's file name inside the directory it describes.
pub(super) const JOURNAL: &str = ".journal";

/// A writer whose append takes the journal past this size removes it: every reader then
/// sees it gone, reads the directory afresh and starts a new one (about 50 000 records).
pub(super) const ROTATE_AT: u64 = 1024 * 1024;

/// A cached directory is read afresh at least this often: a writer killed between its rename
/// and its append leaves a change no record tells of, and this bounds how long a cache can
/// miss it. The only other source of staleness, bounded the same way, is a journal replaced by
/// one that the file system gave the same identity (see [`Identity`]).
pub(super) const MAX_AGE: Duration = Duration::from_secs(60);

/// More new bytes than this since the last listing: the directory is read afresh instead of
/// looking at each named entry (a read of the whole directory is then the cheaper way).
pub(super) const CATCH_UP_MAX: u64 = 64 * 1024;

/// Which file a journal path names: device, inode and (where the file system keeps it) birth
/// time, so that a journal removed and created again is seen as another even if it got the
/// freed inode back.
pub(super) type Identity = (u64, u64, Option<SystemTime>);

/// The journal's identity, or `None` where the platform gives none (wasm): there nothing is
/// cached, but writers still append, for the native processes sharing the directory.
#[cfg(unix)]
pub(super) fn identity(m: &fs::Metadata) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    Some((m.dev(), m.ino(), m.created().ok()))
}

#[cfg(not(unix))]
pub(super) fn identity(_: &fs::Metadata) -> Option<Identity> {
    None
}

/// Records that entry `name` of `dir` was created (`b'+'`) or removed (`b'-'`), if `dir` has
/// a journal. Called after the change, before the write is acknowledged. An append that fails
/// or is cut short removes the journal, so that every reader reads the directory afresh rather
/// than miss the change.
pub(super) fn note(dir: &Path, op: u8, name: &str) {
    let path = dir.join(JOURNAL);
    let mut f = match OpenOptions::new().append(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return, // not a cached directory
        Err(e) => return drop_journal(&path, &e),
    };
    let mut record = Vec::with_capacity(name.len() + 3);
    record.push(b'\n');
    record.push(op);
    record.extend_from_slice(name.as_bytes());
    record.push(b'\n');
    // One write: with O_APPEND it lands whole after every earlier one. Not `write_all`, whose
    // second write for a short first one could land after another writer's record.
    match f.write(&record) {
        Ok(n) if n == record.len() => {}
        Ok(_) => return drop_journal(&path, &io::Error::other("short write")),
        Err(e) => return drop_journal(&path, &e),
    }
    // O_APPEND left the position at the end: the journal's size, without another stat.
    if f.stream_position().is_ok_and(|end| end > ROTATE_AT) {
        let _ = fs::remove_file(&path);
    }
}

fn drop_journal(path: &Path, e: &io::Error) {
    tracing::warn!(journal = %path.display(), "cannot append to a listing journal ({e}): removing it");
    let _ = fs::remove_file(path);
}

/// Creates `dir`'s journal if it has none (the directory must exist).
pub(super) fn create(dir: &Path) -> io::Result<()> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join(JOURNAL))
        .map(drop)
}

/// The bytes of the journal at `path` from `offset` to `end`, if it still has that identity.
pub(super) fn read(
    path: &Path,
    id: Identity,
    offset: u64,
    end: u64,
) -> io::Result<Option<Vec<u8>>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // Replaced between the caller's stat and this open: the caller reads the directory afresh.
    if identity(&f.metadata()?) != Some(id) {
        return Ok(None);
    }
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity((end - offset) as usize);
    f.take(end - offset).read_to_end(&mut buf)?;
    Ok(Some(buf))
}

/// The entry names in the complete records of `bytes`, and how many bytes they take (up to
/// and including the last newline). What follows the last newline is a record still being
/// written, or left unfinished by a killed writer: it is not consumed, and read again with
/// what follows. Lines that are not a record (empty, a torn piece that a later record's
/// leading newline ended, anything else) are skipped; a torn piece that happens to look like
/// a record only makes the reader look at one more entry.
pub(super) fn parse(bytes: &[u8]) -> (Vec<&str>, usize) {
    let Some(last) = bytes.iter().rposition(|&b| b == b'\n') else {
        return (Vec::new(), 0);
    };
    let names = bytes[..last]
        .split(|&b| b == b'\n')
        .filter_map(|line| match line.split_first() {
            Some((b'+' | b'-', name)) if is_entry_name(name) => std::str::from_utf8(name).ok(),
            _ => None,
        })
        .collect();
    (names, last + 1)
}

/// Whether `name` can be a listed entry's file name: an escaped segment (see `fs::escape`:
/// `[A-Za-z0-9._%-]`, not starting with a dot), with `=` after it for a key's file.
fn is_entry_name(name: &[u8]) -> bool {
    let seg = name.strip_suffix(b"=").unwrap_or(name);
    !seg.is_empty()
        && seg[0] != b'.'
        && seg
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'%'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_records_are_read_and_a_torn_tail_waits() {
        let (names, used) = parse(b"\n+v1=\n\n-v2=\n\n+sub\n");
        assert_eq!(names, ["v1=", "v2=", "sub"]);
        assert_eq!(used, 18);
        // The last record is still being written: not consumed, not parsed.
        let bytes = b"\n+v1=\n\n+v1.1";
        let (names, used) = parse(bytes);
        assert_eq!(names, ["v1="]);
        assert_eq!(&bytes[used..], b"+v1.1");
        // Its end arrives: read from where the last read stopped, it is whole.
        let (names, used) = parse(b"+v1.1=\n");
        assert_eq!((names, used), (vec!["v1.1="], 7));
        // Nothing complete at all.
        assert_eq!(parse(b"\n+v"), (vec![], 1));
        assert_eq!(parse(b"+v"), (vec![], 0));
        assert_eq!(parse(b""), (vec![], 0));
    }

    /// A writer killed mid-record left a piece; the next writer's record starts with a
    /// newline, so the piece is a line of its own and the record after it is read whole.
    #[test]
    fn a_torn_record_never_swallows_the_next_one() {
        let (names, _) = parse(b"\n+v1=\n\n+v2\n-v3=\n");
        // "+v2" is a torn piece: read as a subdirectory name, which the reader looks up and
        // does not find (no harm); "-v3=" is whole.
        assert_eq!(names, ["v1=", "v2", "v3="]);
        let (names, _) = parse(b"\n+v\n+lat\n+latest=\n");
        assert_eq!(names, ["v", "lat", "latest="]);
        // A reader that starts mid-record (the journal's size, taken while a record was half
        // written, when it read the directory: which already held that change) skips the rest
        // of it, and reads the next one whole.
        let (names, _) = parse(b"st=\n\n+next=\n");
        assert_eq!(names, ["next="]);
    }

    #[test]
    fn lines_that_are_not_records_are_skipped() {
        let bytes: &[u8] = b"\n*v1=\n\n+\n\n+.journal\n\n+.tmp-1\n\n+a/b=\n\n+a=b=\n\n+\xff\xfe=\n\n+a b=\n\n+=\n\n-ok%3A=\n";
        let (names, used) = parse(bytes);
        assert_eq!(names, ["ok%3A="]);
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn records_are_appended_only_where_a_journal_exists() {
        let dir = tempfile::tempdir().unwrap();
        note(dir.path(), b'+', "a=");
        assert!(!dir.path().join(JOURNAL).exists());
        create(dir.path()).unwrap();
        note(dir.path(), b'+', "a=");
        note(dir.path(), b'-', "sub");
        let bytes = fs::read(dir.path().join(JOURNAL)).unwrap();
        assert_eq!(bytes, b"\n+a=\n\n-sub\n");
        assert_eq!(parse(&bytes).0, ["a=", "sub"]);
    }

    /// A journal past `ROTATE_AT` is removed by the writer that took it there.
    #[test]
    fn a_large_journal_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path()).unwrap();
        let name = "x".repeat(1000);
        let mut appended = 0;
        while dir.path().join(JOURNAL).exists() {
            note(dir.path(), b'+', &name);
            appended += 1;
            assert!(appended < 2000);
        }
        assert_eq!(appended, ROTATE_AT as usize / 1003 + 1);
    }
}
