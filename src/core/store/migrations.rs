//! Schema migrations of the metadata store, forward only, with `rusqlite_migration` (the schema
//! version is SQLite's `user_version`, as it always was here). A store older than this binary is
//! upgraded in place when it is opened, after a backup copy is taken; a store newer than this
//! binary is refused, since it may hold states this code would misread.

use std::fs::{self, File};
use std::path::Path;

use rusqlite::Connection;
use rusqlite_migration::{Migrations, M};

use crate::core::owner::{self, WorkLock};
use crate::error::{Error, ErrorKind, Result};
use crate::format::layout::fsync_dir;

/// Version 2: disks, images, copies with their states, holders, mounts, open handles, settings.
const V2_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS pool (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    uuid TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS disks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL UNIQUE,
    uuid TEXT NOT NULL UNIQUE,
    added INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'healthy' CHECK (state IN ('healthy', 'failed', 'evicting')),
    -- Who failed the disk: 'probe' (it comes back by itself once its probes pass again) or
    -- 'operator' (it stays failed until `disk online`).
    failed_by TEXT,
    reason TEXT,
    state_since INTEGER
);
CREATE TABLE IF NOT EXISTS disk_resources (
    disk_id INTEGER PRIMARY KEY REFERENCES disks(id) ON DELETE CASCADE,
    fs_type TEXT NOT NULL,
    device INTEGER NOT NULL,
    capacity INTEGER NOT NULL,
    static_at INTEGER NOT NULL,
    free INTEGER NOT NULL,
    free_at INTEGER NOT NULL
);
-- Ids are AUTOINCREMENT so that they are never reused: the mount derives inode numbers from them.
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    uuid TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    sha512 TEXT NOT NULL DEFAULT '',
    real_size INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL CHECK (state IN ('importing', 'ready', 'removing')),
    copies_wanted INTEGER NOT NULL,
    source TEXT,
    created INTEGER NOT NULL,
    unreferenced_since INTEGER,
    chunk_size INTEGER NOT NULL DEFAULT 0,
    digests_hash TEXT NOT NULL DEFAULT '',
    -- Why the repair could not restore the image, when it could not.
    problem TEXT
);
CREATE TABLE IF NOT EXISTS copies (
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    disk_id INTEGER NOT NULL REFERENCES disks(id),
    state TEXT NOT NULL DEFAULT 'ready'
        CHECK (state IN ('copying', 'ready', 'unverified', 'failed', 'removing')),
    reason TEXT,
    since INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (image_id, disk_id)
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS holders (
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    holder TEXT NOT NULL,
    added INTEGER NOT NULL,
    PRIMARY KEY (image_id, holder)
);
CREATE TABLE IF NOT EXISTS mounts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mountpoint TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started INTEGER NOT NULL,
    owner TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS open_handles (
    mount_id INTEGER NOT NULL REFERENCES mounts(id) ON DELETE CASCADE,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    count INTEGER NOT NULL,
    PRIMARY KEY (mount_id, image_id)
);
"#;

/// Version 3: a damaged copy (the last good copy of an image, kept serving its good chunks after
/// a fault) is a state of its own, `damaged`, instead of `ready` with a reason. The table is
/// rebuilt because SQLite cannot change a CHECK constraint in place; rowids are kept, since they
/// are the copies' placement order.
const V3_DAMAGED_COPIES: &str = r#"
CREATE TABLE copies_v3 (
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    disk_id INTEGER NOT NULL REFERENCES disks(id),
    state TEXT NOT NULL DEFAULT 'ready'
        CHECK (state IN ('copying', 'ready', 'damaged', 'unverified', 'failed', 'removing')),
    reason TEXT,
    since INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (image_id, disk_id)
);
INSERT INTO copies_v3 (rowid, image_id, disk_id, state, reason, since)
    SELECT rowid, image_id, disk_id,
           CASE WHEN state = 'ready' AND reason IS NOT NULL THEN 'damaged' ELSE state END,
           reason, since
    FROM copies;
DROP TABLE copies;
ALTER TABLE copies_v3 RENAME TO copies;
"#;

/// Version 4: volumes. A volume's data and snapshots live on its disk
/// (`<disk>/.imgpool/volumes/<uuid>/`); the row indexes it. `image_id` is its base image, which
/// cannot be removed while the volume exists. Ids are never reused (inode numbers).
const V4_VOLUMES: &str = r#"
CREATE TABLE volumes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    uuid TEXT NOT NULL UNIQUE,
    disk_id INTEGER NOT NULL REFERENCES disks(id),
    image_id INTEGER REFERENCES images(id),
    size INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'removing')),
    created INTEGER NOT NULL
);
"#;

/// The migrations in order; migration `n` (from 1) leaves the store at `user_version` n.
fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(V2_SCHEMA),
        // Version 1 was never released: the first migration creates version 2's schema whole,
        // and a store that says it is version 1 is refused below.
        M::up(""),
        M::up(V3_DAMAGED_COPIES),
        M::up(V4_VOLUMES),
    ])
}

/// The schema version this binary reads and writes.
pub(super) fn latest() -> usize {
    4
}

/// Brings the store at `db` up to `latest()`: creates the schema in a new store, upgrades an
/// older one in place (after `VACUUM INTO` a backup next to it), refuses one it cannot read.
/// An up-to-date store is only read.
pub(super) fn upgrade(state_dir: &Path, db: &Path, conn: &mut Connection) -> Result<()> {
    let store_error = |source| Error::Store {
        path: db.to_path_buf(),
        source,
    };
    let read_version = |c: &Connection| -> rusqlite::Result<(usize, i64)> {
        let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let tables: i64 = c.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |r| r.get(0),
        )?;
        Ok((version.max(0) as usize, tables))
    };
    let (version, tables) = read_version(conn).map_err(store_error)?;
    check_readable(db, version, tables)?;
    if version == latest() {
        return Ok(());
    }
    // One process migrates; the others wait here and then find the store up to date.
    let _lock = WorkLock::acquire(&state_dir.join("migrate.lock"))?;
    let (version, tables) = read_version(conn).map_err(store_error)?;
    check_readable(db, version, tables)?;
    if version == latest() {
        return Ok(());
    }
    if tables > 0 {
        refuse_while_old_daemons_run(state_dir, db, version, conn)?;
        backup(db, version, conn)?;
    }
    migrations().to_latest(conn).map_err(|e| match e {
        rusqlite_migration::Error::RusqliteError { err, .. } => store_error(err),
        other => Error::StoreUnreadable {
            path: db.to_path_buf(),
            detail: other.to_string(),
        },
    })
}

/// A mount daemon of the older imgpool still serving the pool would go on writing the old
/// schema's values into the new one (a damaged copy as `ready`, say): the upgrade waits until it
/// is stopped.
fn refuse_while_old_daemons_run(
    state_dir: &Path,
    db: &Path,
    version: usize,
    conn: &Connection,
) -> Result<()> {
    let mounts: Vec<(u32, String, String)> = conn
        .prepare("SELECT pid, mountpoint, owner FROM mounts ORDER BY id")
        .and_then(|mut stmt| {
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
        .map_err(|source| Error::Store {
            path: db.to_path_buf(),
            source,
        })?;
    let running: Vec<String> = mounts
        .into_iter()
        .filter(|(_, _, owner)| owner::is_alive(state_dir, owner))
        .map(|(pid, mountpoint, _)| format!("{mountpoint} (pid {pid})"))
        .collect();
    if running.is_empty() {
        return Ok(());
    }
    Err(Error::refused(
        ErrorKind::Busy,
        format!(
            "the metadata store {} must be upgraded from schema version {version} to {}, but the older imgpool's mount daemon still serves it at {}: unmount with that imgpool (`imgpool umount`), then run this command again",
            db.display(),
            latest(),
            running.join(", ")
        ),
    ))
}

/// Keeps the store as it was before its first upgrade from `version`, beside it: written under a
/// temporary name, synced, then renamed, so a backup that exists is whole.
fn backup(db: &Path, version: usize, conn: &Connection) -> Result<()> {
    let backup = db.with_extension(format!("db.v{version}-backup"));
    if backup.exists() {
        return Ok(());
    }
    let tmp = db.with_extension(format!("db.v{version}-backup.tmp"));
    let io_error = |what: &str, e| Error::io(format!("cannot {what} {}", tmp.display()), e);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_error("remove", e)),
        _ => {}
    }
    conn.execute("VACUUM INTO ?1", [tmp.to_string_lossy()])
        .map_err(|source| Error::Store {
            path: db.to_path_buf(),
            source,
        })?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error("sync", e))?;
    fs::rename(&tmp, &backup).map_err(|e| io_error("rename", e))?;
    fsync_dir(db.parent().unwrap_or(Path::new(".")))?;
    tracing::info!(
        "upgrading the metadata store {} from schema version {version} to {}; the old store is kept at {}",
        db.display(),
        latest(),
        backup.display()
    );
    Ok(())
}

fn check_readable(db: &Path, version: usize, tables: i64) -> Result<()> {
    if version > latest() {
        return Err(Error::StoreTooNew {
            path: db.to_path_buf(),
            version,
            latest: latest(),
        });
    }
    if version == 1 || (version == 0 && tables > 0) {
        return Err(Error::StoreUnreadable {
            path: db.to_path_buf(),
            detail: format!("it has schema version {version}, which no released imgpool wrote"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migrations_are_valid_and_end_at_the_latest_version() {
        migrations().validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pool.db");
        let mut conn = Connection::open(&db).unwrap();
        upgrade(dir.path(), &db, &mut conn).unwrap();
        let version: usize = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, latest());
    }

    #[test]
    fn a_store_newer_than_this_binary_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pool.db");
        let mut conn = Connection::open(&db).unwrap();
        upgrade(dir.path(), &db, &mut conn).unwrap();
        conn.pragma_update(None, "user_version", latest() as i64 + 1)
            .unwrap();
        let err = upgrade(dir.path(), &db, &mut conn).unwrap_err();
        assert!(matches!(err, Error::StoreTooNew { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("newer"), "{message}");
        assert!(!message.contains('\n'));
        let version: usize = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, latest() + 1);
    }

    #[test]
    fn a_damaged_copy_of_version_2_becomes_its_own_state_and_copies_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pool.db");
        let mut conn = Connection::open(&db).unwrap();
        migrations().to_version(&mut conn, 2).unwrap();
        conn.execute_batch(
            "INSERT INTO disks (id, name, path, uuid, added) VALUES (1, 'd1', '/d1', 'u1', 0),
                                                                (2, 'd2', '/d2', 'u2', 0);
             INSERT INTO images (id, name, uuid, size, state, copies_wanted, created)
                 VALUES (1, 'a', 'ua', 1, 'ready', 2, 0);
             INSERT INTO copies (image_id, disk_id, state, reason) VALUES (1, 2, 'ready', NULL);
             INSERT INTO copies (image_id, disk_id, state, reason)
                 VALUES (1, 1, 'ready', 'chunk 3 does not match its digest');",
        )
        .unwrap();
        upgrade(dir.path(), &db, &mut conn).unwrap();
        let rows: Vec<(i64, String, Option<String>)> = conn
            .prepare("SELECT disk_id, state, reason FROM copies ORDER BY rowid")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (2, "ready".to_string(), None),
                (
                    1,
                    "damaged".to_string(),
                    Some("chunk 3 does not match its digest".to_string())
                ),
            ]
        );
        assert!(dir.path().join("pool.db.v2-backup").exists());
    }

    #[test]
    fn a_version_2_store_is_not_upgraded_while_an_older_daemon_serves_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pool.db");
        let mut conn = Connection::open(&db).unwrap();
        migrations().to_version(&mut conn, 2).unwrap();
        conn.execute(
            "INSERT INTO mounts (mountpoint, pid, started, owner) VALUES ('/mnt/pool', 42, 0, 'mount-old')",
            [],
        )
        .unwrap();
        let daemon = owner::OwnerLock::acquire(dir.path(), "mount-old").unwrap();
        let refused = upgrade(dir.path(), &db, &mut conn).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Busy, "{refused}");
        assert!(
            refused.to_string().contains("/mnt/pool (pid 42)"),
            "{refused}"
        );
        let version: usize = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 2, "nothing was upgraded");
        assert!(!dir.path().join("pool.db.v2-backup").exists());
        drop(daemon);
        upgrade(dir.path(), &db, &mut conn).unwrap();
        assert!(dir.path().join("pool.db.v2-backup").exists());
        assert!(!dir.path().join("pool.db.v2-backup.tmp").exists());
    }

    #[test]
    fn a_version_1_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pool.db");
        let mut conn = Connection::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE pool (id INTEGER); PRAGMA user_version = 1;")
            .unwrap();
        assert!(matches!(
            upgrade(dir.path(), &db, &mut conn),
            Err(Error::StoreUnreadable { .. })
        ));
    }
}
