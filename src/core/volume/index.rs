//! The volume's index (`index.db`, SQLite): the versions of each granule, the snapshots, the free
//! slots of the data file and the reclaim still to do.
//!
//! A version is the content of one granule from the epoch it was written in (`birth`) to the
//! epoch it was replaced in (`death`, none while it is the live one). A snapshot is an epoch: it
//! sees, for each granule, the version with the greatest birth at or before its epoch. So a read
//! at any snapshot is one B-tree lookup, whatever the number of snapshots; taking a snapshot
//! inserts one row; and the versions that changed between two snapshots are those born between
//! their epochs (the `birth` index), found without reading the rest.
//!
//! Changes accumulate in one open transaction; `commit` ends it. The caller makes the data file
//! durable first, so that no committed row points at a block that is not on the disk.

use std::path::Path;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};

/// One version of one granule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub granule: u64,
    pub birth: u64,
    pub death: Option<u64>,
    /// The slot of the data file holding the `written` blocks; none when no block is written.
    pub slot: Option<u64>,
    /// Blocks whose data is in the slot.
    pub written: u16,
    /// Blocks that read as zeros (discarded), whatever the base image holds there.
    pub zeroed: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub epoch: u64,
    pub name: String,
    pub guid: String,
    pub created: i64,
    pub size: u64,
}

/// Versions born after `after` and dead by `upto` that no snapshot can see any more: what a
/// snapshot deletion leaves for the reclaim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReclaimWindow {
    pub id: i64,
    /// An epoch, or -1 for "before every version".
    pub after: i64,
    pub upto: u64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS versions (
    granule INTEGER NOT NULL,
    birth INTEGER NOT NULL,
    death INTEGER,
    slot INTEGER,
    written INTEGER NOT NULL,
    zeroed INTEGER NOT NULL,
    PRIMARY KEY (granule, birth)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS versions_by_death ON versions (death, birth) WHERE death IS NOT NULL;
CREATE INDEX IF NOT EXISTS versions_by_birth ON versions (birth, granule);
CREATE TABLE IF NOT EXISTS snapshots (
    epoch INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    guid TEXT NOT NULL,
    created INTEGER NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS free_slots (slot INTEGER PRIMARY KEY, punched INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reclaim (id INTEGER PRIMARY KEY, after INTEGER NOT NULL, upto INTEGER NOT NULL);
";

/// WAL pages past which a commit checkpoints itself (64 MiB of 4 KiB pages).
const WAL_PAGES_BOUND: i64 = 16_384;
/// How often the checkpointer copies the WAL back.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Copies an index's WAL back into it in the background, through a connection of its own
/// (a passive checkpoint never blocks the writer), until dropped.
pub struct Checkpointer {
    stop: std::sync::Arc<(parking_lot::Mutex<bool>, parking_lot::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    pub fn start(path: &Path) -> std::io::Result<Checkpointer> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| std::io::Error::other(format!("cannot open {}: {e}", path.display())))?;
        let stop =
            std::sync::Arc::new((parking_lot::Mutex::new(false), parking_lot::Condvar::new()));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("index-checkpoint".into())
            .spawn(move || {
                let (stopped, wake) = &*stopping;
                let mut stopped = stopped.lock();
                while !*stopped {
                    wake.wait_for(&mut stopped, CHECKPOINT_EVERY);
                    if *stopped {
                        break;
                    }
                    // A failure is retried at the next turn; the bound above still holds.
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!("index checkpoint: {e}");
                    }
                }
            })?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

const VERSION_COLUMNS: &str = "granule, birth, death, slot, written, zeroed";

fn version(r: &Row) -> rusqlite::Result<Version> {
    Ok(Version {
        granule: r.get::<_, i64>(0)? as u64,
        birth: r.get::<_, i64>(1)? as u64,
        death: r.get::<_, Option<i64>>(2)?.map(|d| d as u64),
        slot: r.get::<_, Option<i64>>(3)?.map(|s| s as u64),
        written: r.get::<_, i64>(4)? as u16,
        zeroed: r.get::<_, i64>(5)? as u16,
    })
}

fn snapshot(r: &Row) -> rusqlite::Result<Snapshot> {
    Ok(Snapshot {
        epoch: r.get::<_, i64>(0)? as u64,
        name: r.get(1)?,
        guid: r.get(2)?,
        created: r.get(3)?,
        size: r.get::<_, i64>(4)? as u64,
    })
}

pub struct Index {
    conn: Connection,
    in_tx: bool,
}

impl Index {
    /// Opens the index, creating its tables when `size` is given (a new volume).
    pub fn open(path: &Path, new_size: Option<u64>) -> rusqlite::Result<Index> {
        // Only a new volume creates its index: a missing one is an error, never a new empty
        // volume.
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if new_size.is_some() {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(path, flags)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // 16 MiB of pages (SQLite's default is 2 MiB): a reclaim step deletes rows all over
        // the block map, whose pages would otherwise be read again and again.
        conn.pragma_update(None, "cache_size", -16384)?;
        // The WAL is copied back into the index by a thread of the volume's
        // (`Checkpointer`), not by whichever commit crosses SQLite's default 1,000 pages: that
        // commit (a snapshot, an fsync) would wait for the copy and its sync (measured: create
        // p99 12.5 ms at 100,000 snapshots under writes, 3.8 to 5 ms without). The bound here
        // only catches a checkpointer that fell behind.
        conn.pragma_update(None, "wal_autocheckpoint", WAL_PAGES_BOUND)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        // Every statement of a write's path stays prepared (parsing them again was a seventh of
        // a receive's time); rusqlite keeps 16 by default.
        conn.set_prepared_statement_cache_capacity(64);
        let mut index = Index { conn, in_tx: false };
        if let Some(size) = new_size {
            index.conn.execute_batch(SCHEMA)?;
            index.begin()?;
            index.set_meta("size", size)?;
            index.set_meta("live_epoch", 1)?;
            index.set_meta("next_slot", 0)?;
            index.set_meta("closed_cleanly", 0)?;
            index.commit()?;
        }
        Ok(index)
    }

    /// Opens the index to read it only, beside the connection of whoever writes the volume (WAL:
    /// each side sees the other's commits, and neither waits for the other). Opened read-write
    /// but `query_only`: a read-only open of a WAL database fails while no writer has made its
    /// shared-memory file.
    pub fn open_for_reading(path: &Path) -> rusqlite::Result<Index> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.pragma_update(None, "query_only", true)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        Ok(Index { conn, in_tx: false })
    }

    fn begin(&mut self) -> rusqlite::Result<()> {
        if !self.in_tx {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            self.in_tx = true;
        }
        Ok(())
    }

    /// Ends the open transaction, if any: everything changed so far is durable.
    pub fn commit(&mut self) -> rusqlite::Result<()> {
        if self.in_tx {
            self.conn.execute_batch("COMMIT")?;
            self.in_tx = false;
        }
        Ok(())
    }

    /// Gives up the open transaction, whatever SQLite made of it after a failure.
    pub fn abandon(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.in_tx = false;
    }

    pub fn has_uncommitted(&self) -> bool {
        self.in_tx
    }

    fn meta(&self, key: &str) -> rusqlite::Result<u64> {
        self.conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
            .query_row([key], |r| r.get::<_, i64>(0))
            .map(|v| v as u64)
    }

    fn set_meta(&mut self, key: &str, value: u64) -> rusqlite::Result<()> {
        self.begin()?;
        self.conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![key, value as i64])?;
        Ok(())
    }

    /// Whether the volume was last closed by `Volume::close`, not cut short.
    pub fn closed_cleanly(&self) -> rusqlite::Result<bool> {
        self.meta("closed_cleanly").map(|v| v == 1)
    }

    pub fn set_closed_cleanly(&mut self, clean: bool) -> rusqlite::Result<()> {
        self.set_meta("closed_cleanly", u64::from(clean))
    }

    /// Versions with a slot, in key order from `(granule, birth)` on (exclusive), at most
    /// `limit`.
    pub fn slotted_after(
        &self,
        after: Option<(u64, u64)>,
        limit: usize,
    ) -> rusqlite::Result<Vec<Version>> {
        let (granule, birth) = after.map_or((-1, -1), |(g, b)| (g as i64, b as i64));
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions
             WHERE slot IS NOT NULL AND (granule, birth) > (?1, ?2)
             ORDER BY granule, birth LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![granule, birth, limit as i64], version)?;
        rows.collect()
    }

    /// Slots at or past this one were never handed out (in a committed transaction).
    pub fn slots_end(&self) -> rusqlite::Result<u64> {
        self.meta("next_slot")
    }

    pub fn all_free_slots(&self) -> rusqlite::Result<Vec<u64>> {
        let mut stmt = self.conn.prepare("SELECT slot FROM free_slots")?;
        let slots = stmt.query_map([], |r| r.get::<_, i64>(0).map(|s| s as u64))?;
        slots.collect()
    }

    pub fn size(&self) -> rusqlite::Result<u64> {
        self.meta("size")
    }

    pub fn set_size(&mut self, size: u64) -> rusqlite::Result<()> {
        self.set_meta("size", size)
    }

    /// The epoch that writes now belong to: one past the newest snapshot's.
    pub fn live_epoch(&self) -> rusqlite::Result<u64> {
        self.meta("live_epoch")
    }

    /// The epoch of the newest snapshot, if any: a version born at or before it is shared.
    pub fn newest_snapshot_epoch(&self) -> rusqlite::Result<Option<u64>> {
        self.conn
            .query_row("SELECT MAX(epoch) FROM snapshots", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|e| e.map(|e| e as u64))
    }

    /// The live version of a granule: its newest, unless it died. One step down the key,
    /// however many versions the snapshots keep of the granule.
    pub fn live(&self, granule: u64) -> rusqlite::Result<Option<Version>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions WHERE granule = ?1
             ORDER BY birth DESC LIMIT 1"
        ))?;
        let newest = stmt.query_row([granule as i64], version).optional()?;
        Ok(newest.filter(|v| v.death.is_none()))
    }

    /// The granules the volume wrote or discarded, as a snapshot at `epoch` sees it (or now,
    /// without one), in order: the rest reads from the base image.
    pub fn granules_seen(&self, epoch: Option<u64>) -> rusqlite::Result<Vec<u64>> {
        let sql = match epoch {
            Some(_) => "SELECT DISTINCT granule FROM versions WHERE birth <= ?1 ORDER BY granule",
            None => {
                "SELECT granule FROM versions WHERE death IS NULL AND ?1 IS NULL ORDER BY granule"
            }
        };
        let mut stmt = self.conn.prepare(sql)?;
        let rows = stmt.query_map([epoch.map(|e| e as i64)], |r| r.get::<_, i64>(0))?;
        rows.map(|g| g.map(|g| g as u64)).collect()
    }

    /// Up to `limit` of the granules a snapshot at `epoch` sees written or discarded, from
    /// `first` on, in order: one page of `granules_seen`, a range of the primary key.
    pub fn granules_seen_from(
        &self,
        epoch: u64,
        first: u64,
        limit: usize,
    ) -> rusqlite::Result<Vec<u64>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT granule FROM versions WHERE granule >= ?2 AND birth <= ?1
             ORDER BY granule LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![epoch as i64, first as i64, limit as i64], |r| {
            r.get::<_, i64>(0)
        })?;
        rows.map(|g| g.map(|g| g as u64)).collect()
    }

    /// The granules whose content at `at_epoch` differs, or may differ, from `after_epoch`'s:
    /// those whose version seen at `at_epoch` was born after `after_epoch`, in order. A range
    /// of the `birth` index (the versions born between the two epochs), never a scan of the
    /// volume.
    pub fn granules_changed(&self, after_epoch: u64, at_epoch: u64) -> rusqlite::Result<Vec<u64>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT granule FROM versions INDEXED BY versions_by_birth
             WHERE birth > ?1 AND birth <= ?2 AND (death IS NULL OR death > ?2)",
        )?;
        let rows = stmt.query_map(params![after_epoch as i64, at_epoch as i64], |r| {
            r.get::<_, i64>(0)
        })?;
        let mut granules = rows
            .map(|g| g.map(|g| g as u64))
            .collect::<rusqlite::Result<Vec<u64>>>()?;
        // One version of a granule is seen at an epoch; sorted and deduplicated all the same,
        // as the sender relies on it.
        granules.sort_unstable();
        granules.dedup();
        Ok(granules)
    }

    /// The version of a granule a snapshot at `epoch` sees.
    pub fn at(&self, granule: u64, epoch: u64) -> rusqlite::Result<Option<Version>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions WHERE granule = ?1 AND birth <= ?2
             ORDER BY birth DESC LIMIT 1"
        ))?;
        stmt.query_row(params![granule as i64, epoch as i64], version)
            .optional()
    }

    /// Writes a version: a new one, or new slot, masks and death for an existing key.
    pub fn put(&mut self, v: &Version) -> rusqlite::Result<()> {
        self.begin()?;
        let mut stmt = self.conn.prepare_cached(&format!(
            "INSERT INTO versions ({VERSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (granule, birth) DO UPDATE SET death = excluded.death,
                 slot = excluded.slot, written = excluded.written, zeroed = excluded.zeroed"
        ))?;
        stmt.execute(params![
            v.granule as i64,
            v.birth as i64,
            v.death.map(|d| d as i64),
            v.slot.map(|s| s as i64),
            i64::from(v.written),
            i64::from(v.zeroed),
        ])?;
        Ok(())
    }

    pub fn delete(&mut self, v: &Version) -> rusqlite::Result<()> {
        self.begin()?;
        let mut stmt = self
            .conn
            .prepare_cached("DELETE FROM versions WHERE granule = ?1 AND birth = ?2")?;
        stmt.execute(params![v.granule as i64, v.birth as i64])?;
        Ok(())
    }

    /// A slot for new data: a free one that is already committed free and punched (a reclaim
    /// punches without the volume's lock), or a new one at the end.
    pub fn allocate_slot(&mut self) -> rusqlite::Result<u64> {
        self.begin()?;
        let free: Option<i64> = self
            .conn
            .prepare_cached("SELECT slot FROM free_slots WHERE punched = 1 LIMIT 1")?
            .query_row([], |r| r.get(0))
            .optional()?;
        if let Some(slot) = free {
            self.conn
                .prepare_cached("DELETE FROM free_slots WHERE slot = ?1")?
                .execute([slot])?;
            return Ok(slot as u64);
        }
        let next = self.meta("next_slot")?;
        self.set_meta("next_slot", next + 1)?;
        Ok(next)
    }

    /// Records slots as free, not yet punched.
    pub fn free_slots(&mut self, slots: &[u64]) -> rusqlite::Result<()> {
        self.begin()?;
        let mut stmt = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO free_slots (slot, punched) VALUES (?1, 0)")?;
        for slot in slots {
            stmt.execute([*slot as i64])?;
        }
        Ok(())
    }

    /// Free slots whose space was not given back yet (a crash came between the commit that
    /// freed them and the punch).
    pub fn unpunched_slots(&self) -> rusqlite::Result<Vec<u64>> {
        let mut stmt = self
            .conn
            .prepare("SELECT slot FROM free_slots WHERE punched = 0")?;
        let slots = stmt.query_map([], |r| r.get::<_, i64>(0).map(|s| s as u64))?;
        slots.collect()
    }

    pub fn mark_punched(&mut self, slots: &[u64]) -> rusqlite::Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        self.begin()?;
        let mut stmt = self
            .conn
            .prepare_cached("UPDATE free_slots SET punched = 1 WHERE slot = ?1")?;
        for slot in slots {
            stmt.execute([*slot as i64])?;
        }
        Ok(())
    }

    /// The first granule from `granule` on that has any version (live or not): one step of
    /// the primary key, however many versions the granules have.
    pub fn next_versioned(&self, granule: u64) -> rusqlite::Result<Option<u64>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT granule FROM versions WHERE granule >= ?1 ORDER BY granule LIMIT 1",
        )?;
        stmt.query_row([granule as i64], |r| r.get::<_, i64>(0))
            .optional()
            .map(|g| g.map(|g| g as u64))
    }

    // --- snapshots ---------------------------------------------------------------------

    /// Records a snapshot at the live epoch and starts the next one.
    pub fn create_snapshot(
        &mut self,
        name: &str,
        guid: &str,
        created: i64,
    ) -> rusqlite::Result<Snapshot> {
        self.begin()?;
        let epoch = self.live_epoch()?;
        let size = self.size()?;
        self.conn.execute(
            "INSERT INTO snapshots (epoch, name, guid, created, size) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![epoch as i64, name, guid, created, size as i64],
        )?;
        self.set_meta("live_epoch", epoch + 1)?;
        Ok(Snapshot {
            epoch,
            name: name.to_string(),
            guid: guid.to_string(),
            created,
            size,
        })
    }

    pub fn snapshot_count(&self) -> rusqlite::Result<usize> {
        self.conn
            .query_row("SELECT COUNT(*) FROM snapshots", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
    }

    pub fn snapshots(&self) -> rusqlite::Result<Vec<Snapshot>> {
        let mut stmt = self
            .conn
            .prepare("SELECT epoch, name, guid, created, size FROM snapshots ORDER BY epoch")?;
        let rows = stmt.query_map([], snapshot)?;
        rows.collect()
    }

    /// For each snapshot (epochs in creation order), the blocks only it sees: what deleting it
    /// alone would free. One pass over the versions that died, each counted for the snapshots
    /// whose epochs fall in its `[birth, death)`.
    pub fn unique_blocks(&self, epochs: &[u64]) -> rusqlite::Result<Vec<u64>> {
        let mut unique = vec![0u64; epochs.len()];
        let mut stmt = self
            .conn
            .prepare("SELECT birth, death, written FROM versions WHERE death IS NOT NULL")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let (birth, death) = (row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64);
            let written = row.get::<_, i64>(2)? as u16;
            let first = epochs.partition_point(|e| *e < birth);
            let end = epochs.partition_point(|e| *e < death);
            if end == first + 1 {
                unique[first] += u64::from(written.count_ones());
            }
        }
        Ok(unique)
    }

    /// The snapshot taken at `epoch`, if it is still there.
    pub fn snapshot_at(&self, epoch: u64) -> rusqlite::Result<Option<Snapshot>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT epoch, name, guid, created, size FROM snapshots WHERE epoch = ?1",
        )?;
        stmt.query_row([epoch as i64], snapshot).optional()
    }

    /// Up to `limit` snapshots taken after `epoch`, in creation order: one page of a listing.
    pub fn snapshots_after(&self, epoch: u64, limit: usize) -> rusqlite::Result<Vec<Snapshot>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT epoch, name, guid, created, size FROM snapshots WHERE epoch > ?1
             ORDER BY epoch LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![epoch as i64, limit as i64], snapshot)?;
        rows.collect()
    }

    pub fn snapshot(&self, name: &str) -> rusqlite::Result<Option<Snapshot>> {
        self.conn
            .query_row(
                "SELECT epoch, name, guid, created, size FROM snapshots WHERE name = ?1",
                [name],
                snapshot,
            )
            .optional()
    }

    /// The names of the snapshots whose name starts with `prefix` (ASCII, not empty), found
    /// through the index on names: a range of it, not a scan of every snapshot.
    pub fn snapshots_named(&self, prefix: &str) -> rusqlite::Result<Vec<String>> {
        let mut past = prefix.as_bytes().to_vec();
        *past.last_mut().expect("a prefix") += 1;
        let past = String::from_utf8(past).expect("an ASCII prefix");
        let mut stmt = self
            .conn
            .prepare("SELECT name FROM snapshots WHERE name >= ?1 AND name < ?2 ORDER BY epoch")?;
        let rows = stmt.query_map([prefix, past.as_str()], |r| r.get(0))?;
        rows.collect()
    }

    /// Whether any version was born after the snapshot at `epoch` (none: after nothing): what
    /// the volume wrote or discarded since. One step down the `birth` index.
    pub fn written_after(&self, epoch: Option<u64>) -> rusqlite::Result<bool> {
        let after = epoch.map_or(-1, |e| e as i64);
        self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM versions WHERE birth > ?1)",
            [after],
            |r| r.get(0),
        )
    }

    /// Gives snapshots (by epoch) new names, all in the open transaction: the caller commits
    /// them together. A name taken by a snapshot that keeps its own fails the statement.
    pub fn rename_snapshots(&mut self, renames: &[(u64, String)]) -> rusqlite::Result<()> {
        self.begin()?;
        let mut stmt = self
            .conn
            .prepare_cached("UPDATE snapshots SET name = ?2 WHERE epoch = ?1")?;
        for (epoch, name) in renames {
            stmt.execute(params![*epoch as i64, name])?;
        }
        Ok(())
    }

    /// Deletes snapshots (by epoch) and queues what they alone saw for the reclaim.
    pub fn delete_snapshots(&mut self, epochs: &[u64]) -> rusqlite::Result<()> {
        self.begin()?;
        let all: Vec<u64> = self.snapshots()?.iter().map(|s| s.epoch).collect();
        let doomed: std::collections::HashSet<u64> = epochs.iter().copied().collect();
        let live = self.live_epoch()?;
        {
            let mut delete = self
                .conn
                .prepare_cached("DELETE FROM snapshots WHERE epoch = ?1")?;
            for epoch in epochs {
                delete.execute([*epoch as i64])?;
            }
        }
        // Each run of deleted snapshots between two that remain (or the live volume) is one
        // window: the versions born after the older survivor and dead by the younger one.
        let mut after: i64 = -1;
        let mut in_run = false;
        let mut windows = Vec::new();
        for epoch in all {
            if doomed.contains(&epoch) {
                in_run = true;
            } else {
                if in_run {
                    windows.push((after, epoch));
                    in_run = false;
                }
                after = epoch as i64;
            }
        }
        if in_run {
            windows.push((after, live));
        }
        let mut insert = self
            .conn
            .prepare_cached("INSERT INTO reclaim (after, upto) VALUES (?1, ?2)")?;
        for (after, upto) in windows {
            insert.execute(params![after, upto as i64])?;
        }
        Ok(())
    }

    pub fn reclaim_windows(&self) -> rusqlite::Result<Vec<ReclaimWindow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, after, upto FROM reclaim ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok(ReclaimWindow {
                id: r.get(0)?,
                after: r.get(1)?,
                upto: r.get::<_, i64>(2)? as u64,
            })
        })?;
        rows.collect()
    }

    /// What the reclaim still has to do: versions nothing sees any more, and the blocks they
    /// hold in the data file.
    pub fn reclaim_pending(&self) -> rusqlite::Result<(u64, u64)> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT written FROM versions
             WHERE death IS NOT NULL AND death > ?1 AND death <= ?2 AND birth > ?1",
        )?;
        let (mut versions, mut blocks) = (0u64, 0u64);
        for window in self.reclaim_windows()? {
            let masks = stmt.query_map(params![window.after, window.upto as i64], |r| {
                r.get::<_, i64>(0)
            })?;
            for mask in masks {
                versions += 1;
                blocks += u64::from((mask? as u16).count_ones());
            }
        }
        Ok((versions, blocks))
    }

    /// Up to `limit` versions of a window that nothing sees any more.
    pub fn unseen_versions(
        &self,
        window: &ReclaimWindow,
        limit: usize,
    ) -> rusqlite::Result<Vec<Version>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions
             WHERE death IS NOT NULL AND death > ?1 AND death <= ?2 AND birth > ?1
             ORDER BY death LIMIT ?3"
        ))?;
        let rows = stmt.query_map(
            params![window.after, window.upto as i64, limit as i64],
            version,
        )?;
        rows.collect()
    }

    pub fn finish_window(&mut self, id: i64) -> rusqlite::Result<()> {
        self.begin()?;
        self.conn
            .execute("DELETE FROM reclaim WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Index rows in all, live rows, and the written blocks of the live versions.
    #[cfg(test)]
    pub fn footprint(&self) -> rusqlite::Result<(u64, u64, u64)> {
        let rows: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM versions", [], |r| r.get(0))?;
        let mut stmt = self
            .conn
            .prepare("SELECT written FROM versions WHERE death IS NULL")?;
        let masks = stmt.query_map([], |r| r.get::<_, i64>(0))?;
        let (mut live, mut blocks) = (0u64, 0u64);
        for m in masks {
            live += 1;
            blocks += u64::from((m? as u16).count_ones());
        }
        Ok((rows as u64, live, blocks))
    }

    /// Rollback to the snapshot at `epoch`: deletes the versions born after it, returning their
    /// slots, and makes the versions it sees live again.
    pub fn roll_back_to(&mut self, epoch: u64) -> rusqlite::Result<Vec<u64>> {
        self.begin()?;
        let slots = {
            let mut stmt = self
                .conn
                .prepare("DELETE FROM versions WHERE birth > ?1 RETURNING slot")?;
            let rows = stmt.query_map([epoch as i64], |r| r.get::<_, Option<i64>>(0))?;
            rows.filter_map(|slot| slot.transpose())
                .map(|slot| slot.map(|s| s as u64))
                .collect::<rusqlite::Result<Vec<u64>>>()?
        };
        self.conn.execute(
            "UPDATE versions SET death = NULL WHERE death IS NOT NULL AND death > ?1 AND birth <= ?1",
            [epoch as i64],
        )?;
        Ok(slots)
    }
}
