//! The content sums of a volume's snapshots (`format::stream::ContentHash`), by guid: what an
//! incremental stream's digest starts from. A snapshot's content never changes, so a sum once
//! known stays true; they live in `content-sums.db`, apart from the index, so that a sender can
//! record one while a mount daemon has the index's write transaction open. A sum that is not
//! there (never sent or received, or the file lost) is computed from the snapshot's own
//! granules, once.

use std::io;
use std::os::unix::fs::FileExt;

use rusqlite::{params, Connection, OptionalExtension};

use super::{Base, SnapshotReader, Volume};
use crate::format::stream::ContentHash;
use crate::format::volume::{VolumeFiles, GRANULE};

/// Reads one granule's 64 KiB of some content; bytes past its end read as zeros.
pub trait GranuleReader {
    fn read_granule(&self, granule: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Fills `buf` from a reader that returns short at its end (`read_at` of a volume, a snapshot
/// or a file); the rest is zeros.
fn fill(
    buf: &mut [u8],
    offset: u64,
    mut read_at: impl FnMut(&mut [u8], u64) -> io::Result<usize>,
) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    buf[done..].fill(0);
    Ok(())
}

impl GranuleReader for SnapshotReader {
    fn read_granule(&self, granule: u64, buf: &mut [u8]) -> io::Result<()> {
        fill(buf, granule * GRANULE, |b, at| self.read_at(b, at))
    }
}

impl GranuleReader for Volume {
    fn read_granule(&self, granule: u64, buf: &mut [u8]) -> io::Result<()> {
        fill(buf, granule * GRANULE, |b, at| self.read_at(b, at))
    }
}

/// A snapshot's file in a mount (`MOUNT/snapshots/V/S`), or any file.
impl GranuleReader for std::fs::File {
    fn read_granule(&self, granule: u64, buf: &mut [u8]) -> io::Result<()> {
        fill(buf, granule * GRANULE, |b, at| self.read_at(b, at))
    }
}

/// The base image a volume reads where it never wrote; zeros past its end.
pub struct BaseGranules<'a>(pub &'a dyn Base);

impl GranuleReader for BaseGranules<'_> {
    fn read_granule(&self, granule: u64, buf: &mut [u8]) -> io::Result<()> {
        let size = self.0.size();
        let offset = granule * GRANULE;
        let len = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        if len > 0 {
            self.0.read_at(&mut buf[..len], offset)?;
        }
        buf[len..].fill(0);
        Ok(())
    }
}

/// The sum of a content that differs from `old` only in `granules`: `start` plus, for each, the
/// change from `old` to `new` (a whole snapshot: `start` empty, `old` the base image).
pub fn sum_changes(
    start: ContentHash,
    granules: &[u64],
    old: &dyn GranuleReader,
    new: &dyn GranuleReader,
) -> io::Result<ContentHash> {
    let mut sum = start;
    let mut before = vec![0u8; GRANULE as usize];
    let mut after = vec![0u8; GRANULE as usize];
    for &granule in granules {
        old.read_granule(granule, &mut before)?;
        new.read_granule(granule, &mut after)?;
        sum.change(granule, &before, &after);
    }
    Ok(sum)
}

/// The sums recorded for one volume.
pub struct ContentSums {
    conn: Connection,
}

fn db_error(e: rusqlite::Error) -> io::Error {
    io::Error::other(format!("content sums: {e}"))
}

impl ContentSums {
    pub fn open(files: &VolumeFiles) -> io::Result<ContentSums> {
        let conn = Connection::open(files.content_sums()).map_err(db_error)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_error)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(db_error)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sums (guid TEXT PRIMARY KEY, sum BLOB NOT NULL) WITHOUT ROWID;",
        )
        .map_err(db_error)?;
        Ok(ContentSums { conn })
    }

    pub fn get(&self, guid: &str) -> io::Result<Option<ContentHash>> {
        let sum: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT sum FROM sums WHERE guid = ?1", [guid], |r| r.get(0))
            .optional()
            .map_err(db_error)?;
        // A damaged row is a missing sum: it is computed again.
        Ok(sum
            .and_then(|s| <[u8; 64]>::try_from(s.as_slice()).ok())
            .map(|s| ContentHash::from_bytes(&s)))
    }

    pub fn put(&self, guid: &str, sum: &ContentHash) -> io::Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO sums (guid, sum) VALUES (?1, ?2)",
                params![guid, sum.to_bytes().as_slice()],
            )
            .map_err(db_error)?;
        Ok(())
    }

    /// Forgets the sums of snapshots that are gone (any guid not in `keep`).
    pub fn retain(&self, keep: &std::collections::HashSet<String>) -> io::Result<()> {
        let all: Vec<String> = self
            .conn
            .prepare("SELECT guid FROM sums")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(db_error)?;
        for guid in all.iter().filter(|g| !keep.contains(*g)) {
            self.conn
                .execute("DELETE FROM sums WHERE guid = ?1", [guid])
                .map_err(db_error)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bytes(Vec<u8>);

    impl GranuleReader for Bytes {
        fn read_granule(&self, granule: u64, buf: &mut [u8]) -> io::Result<()> {
            let start = (granule * GRANULE) as usize;
            let end = (start + buf.len()).min(self.0.len());
            let n = end.saturating_sub(start);
            buf[..n].copy_from_slice(&self.0[start.min(end)..end]);
            buf[n..].fill(0);
            Ok(())
        }
    }

    #[test]
    fn a_sum_from_changes_equals_the_sum_of_the_whole() {
        let g = GRANULE as usize;
        let base = Bytes((0..4 * g).map(|i| (i % 251) as u8).collect());
        let mut a = base.0.clone();
        a[g..g + 10].fill(1);
        let mut b = a.clone();
        b[3 * g + 7] = 9;
        b[g + 3] = 2;
        let (a, b) = (Bytes(a), Bytes(b));
        let whole_a = sum_changes(ContentHash::default(), &[0, 1, 2, 3], &base, &a).unwrap();
        let whole_b = sum_changes(ContentHash::default(), &[0, 1, 2, 3], &base, &b).unwrap();
        // Only the granules that differ from the base count: the others add nothing.
        assert_eq!(
            sum_changes(ContentHash::default(), &[1], &base, &a).unwrap(),
            whole_a
        );
        assert_eq!(sum_changes(whole_a, &[1, 3], &a, &b).unwrap(), whole_b);
        assert_ne!(whole_a, whole_b);
    }

    #[test]
    fn sums_are_kept_by_guid_and_forgotten_when_their_snapshot_goes() {
        let dir = tempfile::tempdir().unwrap();
        let files = VolumeFiles::new(dir.path());
        let sums = ContentSums::open(&files).unwrap();
        let mut sum = ContentHash::default();
        sum.change(3, &[0; GRANULE as usize], &[1; GRANULE as usize]);
        sums.put("a", &sum).unwrap();
        sums.put("b", &ContentHash::default()).unwrap();
        let again = ContentSums::open(&files).unwrap();
        assert_eq!(again.get("a").unwrap(), Some(sum));
        again
            .retain(&["b".to_string()].into_iter().collect())
            .unwrap();
        assert_eq!(again.get("a").unwrap(), None);
        assert_eq!(again.get("b").unwrap(), Some(ContentHash::default()));
    }
}
