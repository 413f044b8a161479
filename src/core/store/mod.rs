//! The node's metadata store: disks, images, copies, holders, mounts and open handles, in SQLite
//! (WAL) under the state directory. Every change that must be atomic is one IMMEDIATE
//! transaction, so concurrent CLI commands and the mount daemon serialise on the database rather
//! than on files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::core::copies::{self, Event, Outcome};
use crate::error::{Error, Result};

pub use crate::core::state::{CopyState, DiskState, FailedBy, ImageState, VolumeState};

mod migrations;

pub const DB_FILE: &str = "pool.db";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRow {
    pub id: i64,
    pub name: String,
    pub path: PathBuf,
    pub uuid: String,
    pub added: i64,
    pub state: DiskState,
    pub failed_by: Option<FailedBy>,
    pub reason: Option<String>,
    pub state_since: Option<i64>,
}

/// One copy of an image, with the disk that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRow {
    pub image_id: i64,
    pub disk: DiskRow,
    pub state: CopyState,
    pub reason: Option<String>,
    pub since: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    pub id: i64,
    pub name: String,
    pub uuid: String,
    pub size: u64,
    /// Hex SHA-512 of the whole content; `None` while it is not computed yet (an export's is
    /// computed after the image is committed: see `Pool::complete_sha512`). Stored as ''.
    pub sha512: Option<String>,
    pub real_size: u64,
    pub state: ImageState,
    pub copies_wanted: u32,
    pub source: Option<String>,
    pub created: i64,
    pub unreferenced_since: Option<i64>,
    /// The chunk size of the per-chunk digests, and the BLAKE3 of the digest list.
    pub chunk_size: u64,
    pub digests_hash: String,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRow {
    pub id: i64,
    pub name: String,
    pub uuid: String,
    pub disk_id: i64,
    /// The base image, if any.
    pub image_id: Option<i64>,
    pub size: u64,
    pub state: VolumeState,
    pub created: i64,
}

const VOLUME_COLUMNS: &str = "id, name, uuid, disk_id, image_id, size, state, created";

fn volume_from_row(row: &rusqlite::Row) -> rusqlite::Result<VolumeRow> {
    Ok(VolumeRow {
        id: row.get(0)?,
        name: row.get(1)?,
        uuid: row.get(2)?,
        disk_id: row.get(3)?,
        image_id: row.get(4)?,
        size: row.get::<_, i64>(5)? as u64,
        state: row.get(6)?,
        created: row.get(7)?,
    })
}

/// Which kind of thing a name belongs to, if any: images and volumes share one namespace.
fn name_taken(c: &Connection, name: &str) -> rusqlite::Result<Option<&'static str>> {
    let image: Option<i64> = c
        .query_row("SELECT id FROM images WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?;
    if image.is_some() {
        return Ok(Some("an image"));
    }
    let volume: Option<i64> = c
        .query_row("SELECT id FROM volumes WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(volume.map(|_| "a volume"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderRow {
    pub image: String,
    pub holder: String,
    pub added: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRow {
    pub id: i64,
    pub mountpoint: PathBuf,
    pub pid: u32,
    pub started: i64,
    /// The liveness lock the daemon holds while it runs (see `owner`).
    pub owner: String,
}

/// Cached facts about a disk's filesystem, with the time each part was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRow {
    pub fs_type: String,
    pub device: u64,
    pub capacity: u64,
    pub static_at: i64,
    pub free: u64,
    pub free_at: i64,
}

pub(in crate::core) struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

const IMAGE_COLUMNS: &str = "id, name, uuid, size, sha512, real_size, state, copies_wanted, source, created, unreferenced_since, chunk_size, digests_hash, problem";
const DISK_COLUMNS: &str =
    "d.id, d.name, d.path, d.uuid, d.added, d.state, d.failed_by, d.reason, d.state_since";

fn image_from_row(row: &rusqlite::Row) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        id: row.get(0)?,
        name: row.get(1)?,
        uuid: row.get(2)?,
        size: row.get::<_, i64>(3)? as u64,
        sha512: Some(row.get::<_, String>(4)?).filter(|s| !s.is_empty()),
        real_size: row.get::<_, i64>(5)? as u64,
        state: row.get(6)?,
        copies_wanted: row.get(7)?,
        source: row.get(8)?,
        created: row.get(9)?,
        unreferenced_since: row.get(10)?,
        chunk_size: row.get::<_, i64>(11)? as u64,
        digests_hash: row.get(12)?,
        problem: row.get(13)?,
    })
}

fn disk_from_row(row: &rusqlite::Row) -> rusqlite::Result<DiskRow> {
    Ok(DiskRow {
        id: row.get(0)?,
        name: row.get(1)?,
        path: PathBuf::from(row.get::<_, String>(2)?),
        uuid: row.get(3)?,
        added: row.get(4)?,
        state: row.get(5)?,
        failed_by: row.get(6)?,
        reason: row.get(7)?,
        state_since: row.get(8)?,
    })
}

/// A copy row selected with `DISK_COLUMNS` followed by image id, state, reason, since.
fn copy_from_row(row: &rusqlite::Row) -> rusqlite::Result<CopyRow> {
    Ok(CopyRow {
        disk: disk_from_row(row)?,
        image_id: row.get(9)?,
        state: row.get(10)?,
        reason: row.get(11)?,
        since: row.get(12)?,
    })
}

/// See `Store::last_serving_copies_on`.
fn last_serving_on(
    conn: &Connection,
    disk_id: i64,
    unreachable: &[i64],
) -> rusqlite::Result<Vec<String>> {
    let unreachable: Vec<String> = unreachable.iter().map(i64::to_string).collect();
    let mut stmt = conn.prepare(&format!(
        "SELECT i.name FROM copies c JOIN disks d ON d.id = c.disk_id
         JOIN images i ON i.id = c.image_id
         WHERE i.state = 'ready' AND {} AND c.disk_id NOT IN ({})
         GROUP BY c.image_id HAVING SUM(c.disk_id != ?1) = 0 AND SUM(c.disk_id = ?1) > 0
         ORDER BY i.name",
        copies::SERVING_SQL,
        unreachable.join(", ")
    ))?;
    let names = stmt.query_map([disk_id], |r| r.get(0))?;
    names.collect()
}

/// A store error as the operator should read it: a damaged store file, or one on a filesystem
/// that no longer takes writes, says so and what to do; SQLite's own words alone ("file is not
/// a database") do not.
pub(super) fn store_error(path: &Path, source: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode;
    match source.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => Error::StoreUnreadable {
            path: path.to_path_buf(),
            detail: source.to_string(),
        },
        // A store in WAL mode on a read-only filesystem fails in several ways ("attempt to
        // write a readonly database", or "unable to open database file" for want of its
        // shared-memory file): the filesystem says which it is.
        Some(ErrorCode::ReadOnly | ErrorCode::CannotOpen | ErrorCode::SystemIoFailure)
            if on_read_only_filesystem(path) =>
        {
            Error::StoreReadOnly(path.to_path_buf())
        }
        _ => Error::Store {
            path: path.to_path_buf(),
            source,
        },
    }
}

fn on_read_only_filesystem(db: &Path) -> bool {
    nix::sys::statvfs::statvfs(db.parent().unwrap_or(Path::new("/")))
        .is_ok_and(|fs| fs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

impl Store {
    /// Opens (creating if needed) the store in `state_dir`. Whether a pool exists in it is the
    /// caller's question (`pool_uuid`).
    pub fn open(state_dir: &Path) -> Result<Store> {
        let path = state_dir.join(DB_FILE);
        let mut conn = Connection::open(&path).map_err(|source| store_error(&path, source))?;
        let setup = |c: &Connection| -> rusqlite::Result<()> {
            c.busy_timeout(Duration::from_secs(30))?;
            c.pragma_update(None, "journal_mode", "WAL")?;
            c.pragma_update(None, "synchronous", "FULL")?;
            c.pragma_update(None, "foreign_keys", "ON")
        };
        setup(&conn).map_err(|source| store_error(&path, source))?;
        migrations::upgrade(state_dir, &path, &mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// SQLite's check of the store file's structure: `None` when sound, else what is wrong.
    pub fn quick_check(&self) -> Result<Option<String>> {
        self.run(|c| {
            let mut stmt = c.prepare("PRAGMA quick_check")?;
            let rows: Vec<String> = stmt
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok((rows != ["ok"]).then(|| rows.join("; ")))
        })
    }

    fn err(&self, source: rusqlite::Error) -> Error {
        store_error(&self.path, source)
    }

    fn run<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        f(&self.conn.lock()).map_err(|e| self.err(e))
    }

    /// Runs `f` in one IMMEDIATE transaction: it takes the write lock up front, so a
    /// check-then-change inside `f` cannot race another process.
    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction) -> Result<T>) -> Result<T> {
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let value = f(&tx)?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(value)
    }

    /// Commits stop waiting for fsync (WAL stays consistent; a power loss may drop the last
    /// commits). For the mount daemon, whose writes are open-file counts that die with it anyway,
    /// so that an open never waits for the state directory's disk.
    pub fn relax_durability(&self) -> Result<()> {
        self.run(|c| c.pragma_update(None, "synchronous", "NORMAL"))
    }

    /// A counter that changes whenever another connection commits: a cheap way for the mount
    /// daemon to notice CLI changes.
    pub fn data_version(&self) -> Result<i64> {
        self.run(|c| c.query_row("PRAGMA data_version", [], |r| r.get(0)))
    }

    // ---- pool ----

    pub fn pool_uuid(&self) -> Result<Option<String>> {
        self.run(|c| {
            c.query_row("SELECT uuid FROM pool WHERE id = 1", [], |r| r.get(0))
                .optional()
        })
    }

    /// Records the pool; a store that already has one refuses with `Ok(false)`.
    pub fn create_pool(&self, uuid: &str, now: i64) -> Result<bool> {
        self.run(|c| {
            c.execute(
                "INSERT OR IGNORE INTO pool (id, uuid, created) VALUES (1, ?1, ?2)",
                params![uuid, now],
            )
            .map(|inserted| inserted == 1)
        })
    }

    // ---- disks ----

    pub fn insert_disk(&self, name: &str, path: &Path, uuid: &str, now: i64) -> Result<DiskRow> {
        self.write(|tx| {
            if let Some(existing) = tx
                .query_row(
                    "SELECT name FROM disks WHERE path = ?1",
                    [path.to_string_lossy()],
                    |r| r.get::<_, String>(0),
                )
                .optional()
                .map_err(|e| self.err(e))?
            {
                return Err(Error::DiskPathRegistered {
                    path: path.to_path_buf(),
                    disk: existing,
                });
            }
            tx.execute(
                "INSERT INTO disks (name, path, uuid, added) VALUES (?1, ?2, ?3, ?4)",
                params![name, path.to_string_lossy(), uuid, now],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    Error::DiskExists(name.to_string())
                } else {
                    self.err(e)
                }
            })?;
            Ok(DiskRow {
                id: tx.last_insert_rowid(),
                name: name.to_string(),
                path: path.to_path_buf(),
                uuid: uuid.to_string(),
                added: now,
                state: DiskState::Healthy,
                failed_by: None,
                reason: None,
                state_since: None,
            })
        })
    }

    pub fn disks(&self) -> Result<Vec<DiskRow>> {
        self.run(|c| {
            let mut stmt =
                c.prepare(&format!("SELECT {DISK_COLUMNS} FROM disks d ORDER BY name"))?;
            let rows = stmt.query_map([], disk_from_row)?;
            rows.collect()
        })
    }

    pub fn disk_by_name(&self, name: &str) -> Result<DiskRow> {
        self.run(|c| {
            c.query_row(
                &format!("SELECT {DISK_COLUMNS} FROM disks d WHERE name = ?1"),
                [name],
                disk_from_row,
            )
            .optional()
        })?
        .ok_or_else(|| Error::UnknownDisk(name.to_string()))
    }

    /// Changes a disk's state; with `expect`, only if the disk is still in that state (and
    /// `failed_by`) when the transaction runs: a probe's verdict must not undo what the operator
    /// did meanwhile. Taking a disk out of service records who did it and why; returning it to
    /// service clears both. When a failed disk returns, the copies it holds are no longer
    /// trusted: they become unverified, in the same transaction. Returns whether it changed the
    /// disk.
    pub fn set_disk_state_if(
        &self,
        id: i64,
        expect: Option<(DiskState, Option<FailedBy>)>,
        state: DiskState,
        failed_by: Option<FailedBy>,
        reason: Option<&str>,
        now: i64,
    ) -> Result<bool> {
        self.write(|tx| {
            let current: (DiskState, Option<FailedBy>) = tx
                .query_row(
                    "SELECT state, failed_by FROM disks WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(|e| self.err(e))?;
            if expect.is_some_and(|e| e != current) {
                return Ok(false);
            }
            tx.execute(
                "UPDATE disks SET state = ?2, failed_by = ?3, reason = ?4, state_since = ?5 WHERE id = ?1",
                params![id, state, failed_by, reason, now],
            )
            .map_err(|e| self.err(e))?;
            if current.0 == DiskState::Failed && state != DiskState::Failed {
                copies::disk_returned(tx, id, now).map_err(|e| self.err(e))?;
            }
            Ok(true)
        })
    }

    /// The ready images whose every serving copy is on disk `disk_id` (disks in `unreachable`
    /// serve nothing): taking the disk out of service leaves them without one.
    pub fn last_serving_copies_on(&self, disk_id: i64, unreachable: &[i64]) -> Result<Vec<String>> {
        self.run(|c| last_serving_on(c, disk_id, unreachable))
    }

    /// `disk fail` by the operator, in one transaction with the check that the disk holds no
    /// image's last serving copy (unless `force`). Returns those images; when there are some
    /// and `force` is not given, the disk was left as it was.
    pub fn fail_disk_unless_last(
        &self,
        id: i64,
        reason: &str,
        now: i64,
        unreachable: &[i64],
        force: bool,
    ) -> Result<Vec<String>> {
        self.write(|tx| {
            let mut last = last_serving_on(tx, id, unreachable).map_err(|e| self.err(e))?;
            // A volume has one copy, on its disk.
            last.extend(volumes_on(tx, id).map_err(|e| self.err(e))?);
            if last.is_empty() || force {
                tx.execute(
                    "UPDATE disks SET state = ?2, failed_by = ?3, reason = ?4, state_since = ?5 WHERE id = ?1",
                    params![id, DiskState::Failed, FailedBy::Operator, reason, now],
                )
                .map_err(|e| self.err(e))?;
            }
            Ok(last)
        })
    }

    /// `disk rm`'s first step: marks every copy on the disk `removing` in one transaction, or
    /// none when the disk may hold the last good data of a ready image (`OnlyGoodCopy`).
    pub fn forget_disk_copies(&self, disk: &DiskRow, now: i64, unreachable: &[i64]) -> Result<()> {
        self.write(|tx| {
            let kept =
                copies::forget_disk(tx, disk.id, now, unreachable).map_err(|e| self.err(e))?;
            if kept.is_empty() {
                Ok(())
            } else {
                // Returning the error rolls the transaction back: no copy was marked.
                Err(Error::OnlyGoodCopy {
                    disk: disk.name.clone(),
                    images: kept,
                })
            }
        })
    }

    /// The volumes kept on a disk, as "volume NAME".
    pub fn volumes_on_disk(&self, disk_id: i64) -> Result<Vec<String>> {
        self.run(|c| volumes_on(c, disk_id))
    }

    /// Forgets a disk whose copies were all forgotten (`forget_disk_copies`) first. Volume
    /// removals waiting for the disk to come back (`removing`) end with it: their files are
    /// on a disk the pool no longer has.
    pub fn delete_disk(&self, id: i64) -> Result<()> {
        self.write(|tx| {
            copies::delete_on_disk(tx, id)
                .and_then(|()| {
                    tx.execute(
                        "DELETE FROM volumes WHERE disk_id = ?1 AND state = 'removing'",
                        [id],
                    )
                })
                .and_then(|_| tx.execute("DELETE FROM disks WHERE id = ?1", [id]))
                .map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    /// The ready images whose only good copy is on this disk.
    pub fn sole_good_copies_on(&self, disk_id: i64) -> Result<Vec<String>> {
        self.run(|c| copies::sole_good_on(c, disk_id))
    }

    /// Number of committed copies on each disk, by disk id.
    pub fn copies_per_disk(&self) -> Result<Vec<(i64, u64)>> {
        self.run(|c| {
            let mut stmt = c.prepare(
                "SELECT c.disk_id, COUNT(*) FROM copies c JOIN images i ON i.id = c.image_id
                 WHERE i.state = 'ready' GROUP BY c.disk_id",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
            rows.collect()
        })
    }

    pub fn resources(&self, disk_id: i64) -> Result<Option<ResourceRow>> {
        self.run(|c| {
            c.query_row(
                "SELECT fs_type, device, capacity, static_at, free, free_at
                 FROM disk_resources WHERE disk_id = ?1",
                [disk_id],
                |r| {
                    Ok(ResourceRow {
                        fs_type: r.get(0)?,
                        device: r.get::<_, i64>(1)? as u64,
                        capacity: r.get::<_, i64>(2)? as u64,
                        static_at: r.get(3)?,
                        free: r.get::<_, i64>(4)? as u64,
                        free_at: r.get(5)?,
                    })
                },
            )
            .optional()
        })
    }

    pub fn save_resources(&self, disk_id: i64, r: &ResourceRow) -> Result<()> {
        self.run(|c| {
            c.execute(
                "INSERT OR REPLACE INTO disk_resources
                 (disk_id, fs_type, device, capacity, static_at, free, free_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    disk_id,
                    r.fs_type,
                    r.device as i64,
                    r.capacity as i64,
                    r.static_at,
                    r.free as i64,
                    r.free_at
                ],
            )
            .map(|_| ())
        })
    }

    // ---- images ----

    /// Reserves `name` for an import: the row is invisible until `commit_import`.
    pub fn reserve_image(&self, image: &ImageRow, disk_ids: &[i64]) -> Result<i64> {
        self.write(|tx| {
            let existing: Option<ImageState> = tx
                .query_row(
                    "SELECT state FROM images WHERE name = ?1",
                    [&image.name],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| self.err(e))?;
            match existing {
                Some(ImageState::Ready) => return Err(Error::ImageExists(image.name.clone())),
                Some(ImageState::Importing) => return Err(Error::ImageBusy(image.name.clone())),
                Some(ImageState::Removing) => {
                    return Err(Error::ImageRemoving(image.name.clone()))
                }
                None => {}
            }
            if name_taken(tx, &image.name).map_err(|e| self.err(e))? == Some("a volume") {
                return Err(Error::NameTaken {
                    name: image.name.clone(),
                    by: "a volume",
                });
            }
            tx.execute(
                "INSERT INTO images (name, uuid, size, state, copies_wanted, source, created, unreferenced_since)
                 VALUES (?1, ?2, ?3, 'importing', ?4, ?5, ?6, ?6)",
                params![
                    image.name,
                    image.uuid,
                    image.size as i64,
                    image.copies_wanted,
                    image.source,
                    image.created
                ],
            )
            .map_err(|e| self.err(e))?;
            let id = tx.last_insert_rowid();
            for disk_id in disk_ids {
                copies::apply(tx, id, *disk_id, Event::Reserved, image.created, &[])
                    .map_err(|e| self.err(e))?;
            }
            Ok(id)
        })
    }

    /// Makes an import visible: the last step, after every copy is durable on its disk.
    /// `false` when the reservation is no longer this import's (nothing was committed): the
    /// import must then fail, not report an image that is not there.
    pub fn commit_import(
        &self,
        id: i64,
        sha512: Option<&str>,
        real_size: u64,
        chunk_size: u64,
        digests_hash: &str,
    ) -> Result<bool> {
        self.run(|c| {
            c.execute(
                "UPDATE images SET state = 'ready', sha512 = ?2, real_size = ?3, chunk_size = ?4,
                 digests_hash = ?5 WHERE id = ?1 AND state = 'importing'",
                params![
                    id,
                    sha512.unwrap_or_default(),
                    real_size as i64,
                    chunk_size as i64,
                    digests_hash
                ],
            )
            .map(|n| n == 1)
        })
    }

    pub fn set_copies_wanted(&self, id: i64, copies: u32) -> Result<()> {
        self.run(|c| {
            c.execute(
                "UPDATE images SET copies_wanted = ?2 WHERE id = ?1",
                params![id, copies],
            )
            .map(|_| ())
        })
    }

    /// Records why the repair cannot restore an image (`None`: it can, or did).
    pub fn set_image_problem(&self, id: i64, problem: Option<&str>) -> Result<()> {
        self.run(|c| {
            c.execute(
                "UPDATE images SET problem = ?2 WHERE id = ?1",
                params![id, problem],
            )
            .map(|_| ())
        })
    }

    /// Inserts a ready image found on the disks (`fsck --repair` rebuilding a lost index).
    pub fn insert_found_image(&self, image: &ImageRow) -> Result<i64> {
        self.run(|c| {
            c.execute(
                "INSERT INTO images (name, uuid, size, sha512, real_size, state, copies_wanted,
                 source, created, unreferenced_since, chunk_size, digests_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'ready', ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    image.name,
                    image.uuid,
                    image.size as i64,
                    image.sha512.as_deref().unwrap_or_default(),
                    image.real_size as i64,
                    image.copies_wanted,
                    image.source,
                    image.created,
                    image.unreferenced_since,
                    image.chunk_size as i64,
                    image.digests_hash
                ],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    // ---- copies ----

    /// Applies `event` to the copy of `image_id` on `disk_id` (see `core::copies`), in one
    /// transaction with the checks the event needs; copies on the `unreachable` disks do not
    /// count as good. `Pool::copy_event` finds those disks; call that.
    pub fn copy_event(
        &self,
        image_id: i64,
        disk_id: i64,
        event: Event,
        now: i64,
        unreachable: &[i64],
    ) -> Result<Outcome> {
        self.write(|tx| {
            copies::apply(tx, image_id, disk_id, event, now, unreachable).map_err(|e| self.err(e))
        })
    }

    pub fn images(&self) -> Result<Vec<ImageRow>> {
        self.run(|c| {
            let mut stmt =
                c.prepare(&format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY name"))?;
            let rows = stmt.query_map([], image_from_row)?;
            rows.collect()
        })
    }

    pub fn image_by_name(&self, name: &str) -> Result<Option<ImageRow>> {
        self.run(|c| {
            c.query_row(
                &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1"),
                [name],
                image_from_row,
            )
            .optional()
        })
    }

    /// Records the SHA-512 computed after image `id` (`uuid`) was committed. `false`: the
    /// image is gone, or its SHA-512 was recorded meanwhile (by another process: the same
    /// value, computed from the same verified content).
    pub fn record_sha512(&self, id: i64, uuid: &str, sha512: &str) -> Result<bool> {
        self.run(|c| {
            c.execute(
                "UPDATE images SET sha512 = ?3 WHERE id = ?1 AND uuid = ?2 AND sha512 = ''
                 AND state = 'ready'",
                params![id, uuid, sha512],
            )
            .map(|n| n == 1)
        })
    }

    /// Ready images whose SHA-512 is not computed yet, oldest first.
    pub fn images_without_sha512(&self) -> Result<Vec<ImageRow>> {
        self.run(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {IMAGE_COLUMNS} FROM images WHERE sha512 = '' AND state = 'ready'
                 ORDER BY id"
            ))?;
            let rows = stmt.query_map([], image_from_row)?;
            rows.collect()
        })
    }

    /// A ready image whose content has this SHA-512 (hex), whatever its name: the base a
    /// received volume uses. Images whose SHA-512 is not computed yet are not found: callers
    /// complete those first (`Pool::ready_image_by_sha512`). No sum names them: '' (a stream
    /// header's, unchecked) finds nothing.
    pub fn ready_image_by_sha512(&self, sha512: &str) -> Result<Option<ImageRow>> {
        if sha512.is_empty() {
            return Ok(None);
        }
        self.run(|c| {
            c.query_row(
                &format!(
                    "SELECT {IMAGE_COLUMNS} FROM images WHERE sha512 = ?1 AND state = 'ready'
                     ORDER BY id LIMIT 1"
                ),
                [sha512],
                image_from_row,
            )
            .optional()
        })
    }

    /// The copies of an image, whatever their state, in the order they were placed.
    pub fn copies_of(&self, image_id: i64) -> Result<Vec<CopyRow>> {
        self.run(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {DISK_COLUMNS}, c.image_id, c.state, c.reason, c.since FROM copies c
                 JOIN disks d ON d.id = c.disk_id WHERE c.image_id = ?1 ORDER BY c.rowid"
            ))?;
            let rows = stmt.query_map([image_id], copy_from_row)?;
            rows.collect()
        })
    }

    /// Every copy of every image, for building the mount's catalog in one query.
    pub fn all_copies(&self) -> Result<Vec<CopyRow>> {
        self.run(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {DISK_COLUMNS}, c.image_id, c.state, c.reason, c.since FROM copies c
                 JOIN disks d ON d.id = c.disk_id ORDER BY c.rowid"
            ))?;
            let rows = stmt.query_map([], copy_from_row)?;
            rows.collect()
        })
    }

    // ---- settings ----

    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        self.run(|c| {
            c.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    pub fn set_setting(&self, key: &str, value: Option<&str>) -> Result<()> {
        self.run(|c| {
            match value {
                Some(value) => c.execute(
                    "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)",
                    params![key, value],
                ),
                None => c.execute("DELETE FROM settings WHERE key = ?1", [key]),
            }
            .map(|_| ())
        })
    }

    /// Marks a ready image for removal if nothing uses it: no holder, and no file open through
    /// a mount other than the `dead_mounts` (so that a mount started meanwhile counts).
    pub fn begin_remove(&self, name: &str, dead_mounts: &[i64]) -> Result<ImageRow> {
        self.write(|tx| {
            let image = tx
                .query_row(
                    &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1"),
                    [name],
                    image_from_row,
                )
                .optional()
                .map_err(|e| self.err(e))?;
            let image = match image {
                Some(image) if image.state == ImageState::Ready => image,
                Some(image) if image.state == ImageState::Removing => {
                    return Err(Error::ImageRemoving(name.to_string()))
                }
                Some(_) => return Err(Error::ImageBusy(name.to_string())),
                None => return Err(Error::UnknownImage(name.to_string())),
            };
            let holders = holders_in(tx, image.id).map_err(|e| self.err(e))?;
            let open_handles =
                open_handles_in(tx, image.id, dead_mounts).map_err(|e| self.err(e))?;
            if !holders.is_empty() || open_handles > 0 {
                return Err(Error::InUse {
                    name: name.to_string(),
                    holders,
                    open_handles,
                });
            }
            tx.execute(
                "UPDATE images SET state = 'removing' WHERE id = ?1",
                [image.id],
            )
            .map_err(|e| self.err(e))?;
            Ok(image)
        })
    }

    /// Deletes an image's rows (its copies, holders and handles go with it).
    pub fn delete_image(&self, id: i64) -> Result<()> {
        self.run(|c| {
            c.execute("DELETE FROM images WHERE id = ?1", [id])
                .map(|_| ())
        })
    }

    // ---- taking over work a dead process left ----
    //
    // Each of these re-reads, inside the transaction that changes it, that the row is still in
    // the state that made it look abandoned; the caller has made sure beforehand that its owner
    // is dead and stays so (it holds the owner's lock, or the repair lock).

    /// Turns the reservation of an import whose importer is dead into a removal, if the row is
    /// still that import (`importing`, with `uuid`): an importer that committed or undid its
    /// work before it died keeps what it did. Returns whether the row was taken over; its files
    /// and rows are then deleted like any removal's, and a crash meanwhile is finished later.
    pub fn abandon_import(&self, id: i64, uuid: &str) -> Result<bool> {
        self.write(|tx| {
            tx.execute(
                "UPDATE images SET state = 'removing' WHERE id = ?1 AND uuid = ?2 AND state = 'importing'",
                params![id, uuid],
            )
            .map(|n| n == 1)
            .map_err(|e| self.err(e))
        })
    }

    /// Deletes the rows of an image being removed (its copies, holders and handles go with
    /// it), if it is still `removing`. Returns whether it did.
    pub fn delete_removed_image(&self, id: i64) -> Result<bool> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM images WHERE id = ?1 AND state = 'removing'",
                [id],
            )
            .map(|n| n == 1)
            .map_err(|e| self.err(e))
        })
    }

    /// Deletes the row of a mount whose daemon is dead (its open handles go with it), if it is
    /// still that daemon's. Returns whether it did.
    pub fn delete_dead_mount(&self, id: i64, owner: &str) -> Result<bool> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM mounts WHERE id = ?1 AND owner = ?2",
                params![id, owner],
            )
            .map(|n| n == 1)
            .map_err(|e| self.err(e))
        })
    }

    /// Runs `delete` (of a file named after `uuid` on disk `disk_id`) only if no row explains
    /// the file: no image has the uuid, or the image is ready and has no copy on that disk.
    /// Checked and done inside one IMMEDIATE transaction, so that no import or repair can record
    /// the file's owner in between (each records it before it creates a file). Returns whether
    /// it ran.
    pub fn unless_explained(
        &self,
        uuid: &str,
        disk_id: i64,
        delete: impl FnOnce() -> Result<()>,
    ) -> Result<bool> {
        self.write(|tx| {
            let owner: Option<(ImageState, bool)> = tx
                .query_row(
                    "SELECT i.state, EXISTS (SELECT 1 FROM copies c
                         WHERE c.image_id = i.id AND c.disk_id = ?2)
                     FROM images i WHERE i.uuid = ?1",
                    params![uuid, disk_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(|e| self.err(e))?;
            if owner.is_some_and(|(state, copy)| state != ImageState::Ready || copy) {
                return Ok(false);
            }
            delete()?;
            Ok(true)
        })
    }

    // ---- volumes ----

    /// Records a new volume as `creating`, if its name is free and its base image is ready.
    pub fn reserve_volume(&self, volume: &VolumeRow) -> Result<i64> {
        self.insert_volume(volume, VolumeState::Creating)
    }

    /// Lists a volume found on a disk (fsck), ready, on the same conditions.
    pub fn insert_found_volume(&self, volume: &VolumeRow) -> Result<i64> {
        self.insert_volume(volume, VolumeState::Ready)
    }

    fn insert_volume(&self, volume: &VolumeRow, state: VolumeState) -> Result<i64> {
        self.write(|tx| {
            if let Some(by) = name_taken(tx, &volume.name).map_err(|e| self.err(e))? {
                return Err(Error::NameTaken {
                    name: volume.name.clone(),
                    by,
                });
            }
            if let Some(image_id) = volume.image_id {
                let image: Option<ImageState> = tx
                    .query_row("SELECT state FROM images WHERE id = ?1", [image_id], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(|e| self.err(e))?;
                if image != Some(ImageState::Ready) {
                    return Err(Error::refused(
                        crate::error::ErrorKind::Conflict,
                        "the base image is being removed or imported: pick a ready image (`imgpool image list`)",
                    ));
                }
            }
            tx.execute(
                "INSERT INTO volumes (name, uuid, disk_id, image_id, size, state, created)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    volume.name,
                    volume.uuid,
                    volume.disk_id,
                    volume.image_id,
                    volume.size as i64,
                    state,
                    volume.created
                ],
            )
            .map_err(|e| self.err(e))?;
            Ok(tx.last_insert_rowid())
        })
    }

    pub fn volumes(&self) -> Result<Vec<VolumeRow>> {
        self.run(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes ORDER BY name"
            ))?;
            let rows = stmt.query_map([], volume_from_row)?;
            rows.collect()
        })
    }

    /// A ready volume by name.
    pub fn volume(&self, name: &str) -> Result<VolumeRow> {
        self.run(|c| {
            c.query_row(
                &format!(
                    "SELECT {VOLUME_COLUMNS} FROM volumes WHERE name = ?1 AND state = 'ready'"
                ),
                [name],
                volume_from_row,
            )
            .optional()
        })?
        .ok_or_else(|| Error::UnknownVolume(name.to_string()))
    }

    /// Moves a volume from one state to another; false if it is not in `from` any more.
    pub fn set_volume_state(&self, id: i64, from: VolumeState, to: VolumeState) -> Result<bool> {
        self.write(|tx| {
            let n = tx
                .execute(
                    "UPDATE volumes SET state = ?3 WHERE id = ?1 AND state = ?2",
                    params![id, from, to],
                )
                .map_err(|e| self.err(e))?;
            Ok(n == 1)
        })
    }

    /// The swap at the end of a receive that replaces a volume (`recv --force` of a whole
    /// stream), in one transaction: the old row, still ready under `name`, becomes `removing`
    /// under `tombstone`, and the new row, still `creating`, takes `name` and becomes ready.
    /// False, changing nothing, when either row is no longer in that state.
    pub fn swap_volumes(&self, old: i64, tombstone: &str, new: i64, name: &str) -> Result<bool> {
        self.write(|tx| {
            let retired = tx
                .execute(
                    "UPDATE volumes SET state = ?3, name = ?4
                     WHERE id = ?1 AND name = ?2 AND state = ?5",
                    params![old, name, VolumeState::Removing, tombstone, VolumeState::Ready],
                )
                .map_err(|e| self.err(e))?;
            if retired != 1 {
                return Ok(false);
            }
            let named = tx
                .execute(
                    "UPDATE volumes SET state = ?3, name = ?2 WHERE id = ?1 AND state = ?4",
                    params![new, name, VolumeState::Ready, VolumeState::Creating],
                )
                .map_err(|e| self.err(e))?;
            if named != 1 {
                // Dropped with the transaction: the old row stays as it was.
                return Err(Error::refused(
                    crate::error::ErrorKind::Interrupted,
                    format!("the volume replacing '{name}' was taken from its receive (another process judged it abandoned): '{name}' is as it was"),
                ));
            }
            Ok(true)
        })
    }

    pub fn set_volume_size(&self, id: i64, size: u64) -> Result<()> {
        self.run(|c| {
            c.execute(
                "UPDATE volumes SET size = ?2 WHERE id = ?1",
                params![id, size as i64],
            )
            .map(|_| ())
        })
    }

    /// Deletes a volume's row if it is still in `state`.
    pub fn delete_volume(&self, id: i64, state: VolumeState) -> Result<bool> {
        self.run(|c| {
            c.execute(
                "DELETE FROM volumes WHERE id = ?1 AND state = ?2",
                params![id, state],
            )
            .map(|n| n == 1)
        })
    }

    // ---- holders ----

    pub fn add_holder(&self, image: &str, holder: &str, now: i64) -> Result<bool> {
        self.write(|tx| {
            let id = ready_image_id(tx, image).map_err(|e| self.err(e))?;
            let id = id.ok_or_else(|| Error::UnknownImage(image.to_string()))?;
            let inserted = tx
                .execute(
                    "INSERT OR IGNORE INTO holders (image_id, holder, added) VALUES (?1, ?2, ?3)",
                    params![id, holder, now],
                )
                .map_err(|e| self.err(e))?;
            tx.execute(
                "UPDATE images SET unreferenced_since = NULL WHERE id = ?1",
                [id],
            )
            .map_err(|e| self.err(e))?;
            Ok(inserted > 0)
        })
    }

    pub fn remove_holder(&self, image: &str, holder: &str, now: i64) -> Result<()> {
        self.write(|tx| {
            let id = ready_image_id(tx, image).map_err(|e| self.err(e))?;
            let id = id.ok_or_else(|| Error::UnknownImage(image.to_string()))?;
            let removed = tx
                .execute(
                    "DELETE FROM holders WHERE image_id = ?1 AND holder = ?2",
                    params![id, holder],
                )
                .map_err(|e| self.err(e))?;
            if removed == 0 {
                return Err(Error::UnknownHolder {
                    image: image.to_string(),
                    holder: holder.to_string(),
                });
            }
            // The grace period of `gc` starts when the last holder lets go.
            tx.execute(
                "UPDATE images SET unreferenced_since = ?2 WHERE id = ?1
                 AND NOT EXISTS (SELECT 1 FROM holders WHERE image_id = ?1)",
                params![id, now],
            )
            .map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    /// The holders of one image or of all: the references, and the volumes based on them.
    pub fn holders(&self, image: Option<&str>) -> Result<Vec<HolderRow>> {
        self.run(|c| {
            let mut stmt = c.prepare(
                "SELECT i.name, h.holder, h.added FROM holders h JOIN images i ON i.id = h.image_id
                 WHERE i.state = 'ready' AND (?1 IS NULL OR i.name = ?1)
                 UNION ALL
                 SELECT i.name, 'volume ' || v.name, v.created FROM volumes v
                 JOIN images i ON i.id = v.image_id
                 WHERE i.state = 'ready' AND (?1 IS NULL OR i.name = ?1)
                 ORDER BY 1, 2",
            )?;
            let rows = stmt.query_map([image], |r| {
                Ok(HolderRow {
                    image: r.get(0)?,
                    holder: r.get(1)?,
                    added: r.get(2)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn open_handles(&self, image_id: i64, dead_mounts: &[i64]) -> Result<u64> {
        self.run(|c| open_handles_in(c, image_id, dead_mounts))
    }

    // ---- mounts and their open handles ----

    pub fn insert_mount(&self, mountpoint: &Path, pid: u32, now: i64, owner: &str) -> Result<i64> {
        self.run(|c| {
            c.execute(
                "INSERT INTO mounts (mountpoint, pid, started, owner) VALUES (?1, ?2, ?3, ?4)",
                params![mountpoint.to_string_lossy(), pid, now, owner],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    pub fn delete_mount(&self, id: i64) -> Result<()> {
        self.run(|c| {
            c.execute("DELETE FROM mounts WHERE id = ?1", [id])
                .map(|_| ())
        })
    }

    pub fn mounts(&self) -> Result<Vec<MountRow>> {
        self.run(|c| {
            let mut stmt =
                c.prepare("SELECT id, mountpoint, pid, started, owner FROM mounts ORDER BY id")?;
            let rows = stmt.query_map([], |r| {
                Ok(MountRow {
                    id: r.get(0)?,
                    mountpoint: PathBuf::from(r.get::<_, String>(1)?),
                    pid: r.get(2)?,
                    started: r.get(3)?,
                    owner: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Records one more open file of a ready image through a mount; `false` when the image is
    /// gone or going (the open must then fail).
    pub fn open_handle(&self, mount_id: i64, image_id: i64) -> Result<bool> {
        self.write(|tx| {
            let ready: bool = tx
                .query_row(
                    "SELECT COUNT(*) FROM images WHERE id = ?1 AND state = 'ready'",
                    [image_id],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(|e| self.err(e))?
                > 0;
            if ready {
                tx.execute(
                    "INSERT INTO open_handles (mount_id, image_id, count) VALUES (?1, ?2, 1)
                     ON CONFLICT (mount_id, image_id) DO UPDATE SET count = count + 1",
                    params![mount_id, image_id],
                )
                .map_err(|e| self.err(e))?;
            }
            Ok(ready)
        })
    }

    pub fn close_handle(&self, mount_id: i64, image_id: i64) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE open_handles SET count = count - 1 WHERE mount_id = ?1 AND image_id = ?2",
                params![mount_id, image_id],
            )
            .and_then(|_| {
                tx.execute(
                    "DELETE FROM open_handles WHERE count <= 0 AND mount_id = ?1",
                    [mount_id],
                )
            })
            .map_err(|e| self.err(e))?;
            Ok(())
        })
    }
}

fn ready_image_id(c: &Connection, name: &str) -> rusqlite::Result<Option<i64>> {
    c.query_row(
        "SELECT id FROM images WHERE name = ?1 AND state = 'ready'",
        [name],
        |r| r.get(0),
    )
    .optional()
}

/// The volumes kept on a disk, as "volume NAME".
fn volumes_on(c: &Connection, disk_id: i64) -> rusqlite::Result<Vec<String>> {
    let mut stmt = c.prepare(
        "SELECT 'volume ' || name FROM volumes WHERE disk_id = ?1 AND state != 'removing'
         ORDER BY name",
    )?;
    let rows = stmt.query_map([disk_id], |r| r.get(0))?;
    rows.collect()
}

fn holders_in(c: &Connection, image_id: i64) -> rusqlite::Result<Vec<String>> {
    let mut stmt = c.prepare(
        "SELECT holder FROM holders WHERE image_id = ?1
         UNION ALL SELECT 'volume ' || name FROM volumes WHERE image_id = ?1
         ORDER BY 1",
    )?;
    let rows = stmt.query_map([image_id], |r| r.get(0))?;
    rows.collect()
}

/// Files open through every mount but the `dead_mounts` (whose daemons were found dead): a mount
/// that started after the caller looked counts.
fn open_handles_in(c: &Connection, image_id: i64, dead_mounts: &[i64]) -> rusqlite::Result<u64> {
    let mut stmt = c.prepare("SELECT mount_id, count FROM open_handles WHERE image_id = ?1")?;
    let rows = stmt.query_map([image_id], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
    })?;
    let mut total = 0;
    for row in rows {
        let (mount_id, count) = row?;
        if !dead_mounts.contains(&mount_id) {
            total += count.max(0) as u64;
        }
    }
    Ok(total)
}
