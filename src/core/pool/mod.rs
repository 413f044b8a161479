//! The `Pool` API: what the CLI and the mount daemon call, and what tests drive directly. One
//! `impl Pool` per concern: `disks` (registering, health, service, eviction, placement),
//! `images` (import, listing, policy, removal), `holders` (references, open files, gc). Copies
//! change state only through `Pool::copy_event` (see `core::copies`); copies are written by
//! `core::ingest`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::core::copies::{Event, Outcome};
use crate::core::settings::Settings;
use crate::core::store::Store;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::clock::now;

mod checksum;
mod disks;
mod export;
mod holders;
mod images;
mod imports;
mod mounts;
mod recv;
mod send;
mod volumes;

pub use disks::{check_label, DiskHealth, DiskStatus};
pub use export::{export_token, TEMPORARY_SNAPSHOT};
#[cfg(test)]
pub(crate) use images::ImageHealth;
pub use images::{copy_info, CopyInfo, ImageInfo, ImportSource, Imported, WholeSha512};
pub use recv::{check_user_volume_name, ReceiveOptions, ReceiveProgress, Received};
pub use send::{send_token, SendSpec, COPY_TEMPORARY_SNAPSHOT};
pub(crate) use volumes::volume_token;
pub use volumes::VolumeInfo;

/// The name prefixes of the snapshots this pool takes for a moment (an export's, a send's of
/// the live volume, a receive's staged ones): never the name of a snapshot a stream keeps.
pub(crate) const TEMPORARY_SNAPSHOT_PREFIXES: [&str; 3] = [
    TEMPORARY_SNAPSHOT,
    COPY_TEMPORARY_SNAPSHOT,
    recv::STAGED_PREFIX,
];

/// Refuses a name that a user would give a snapshot of their own but that this pool uses for
/// its temporary ones: such a snapshot would be deleted by a recovery, left out of a `send
/// --from-all`, or refused by a receiver.
pub fn check_user_snapshot_name(name: &str) -> Result<()> {
    crate::format::names::check_snapshot_name(name)?;
    match TEMPORARY_SNAPSHOT_PREFIXES
        .iter()
        .find(|p| name.starts_with(**p))
    {
        Some(prefix) => Err(Error::refused(
            ErrorKind::InvalidInput,
            format!("snapshot names starting with '{prefix}' are kept for imgpool's temporary snapshots: pick another name"),
        )),
        None => Ok(()),
    }
}

pub struct Pool {
    state_dir: PathBuf,
    store: Store,
    uuid: String,
}

/// The setting that holds gc, and why.
pub const GC_HOLD: &str = "gc-hold";

/// The owner-lock token of the import of the image with `uuid`.
pub(crate) fn import_token(uuid: &str) -> String {
    format!("import-{uuid}")
}

impl Pool {
    /// Creates a new, empty pool in `state_dir`.
    pub fn init(state_dir: &Path) -> Result<Pool> {
        fs::create_dir_all(state_dir)
            .ctx(|| format!("cannot create state directory {}", state_dir.display()))?;
        // A damaged store is not taken for a missing one: a new pool would be made over it.
        check_store_file(state_dir)?;
        let store = Store::open(state_dir)?;
        if let Some(uuid) = store.pool_uuid()? {
            return Err(Error::PoolExists {
                path: state_dir.to_path_buf(),
                uuid,
            });
        }
        let uuid = uuid::Uuid::new_v4().to_string();
        if !store.create_pool(&uuid, now())? {
            // Two `init`s at once: the loser sees the winner's pool.
            return Err(Error::PoolExists {
                path: state_dir.to_path_buf(),
                uuid: store.pool_uuid()?.unwrap_or_default(),
            });
        }
        Ok(Pool {
            state_dir: state_dir.to_path_buf(),
            store,
            uuid,
        })
    }

    /// Opens the pool in `state_dir`. Opening only reads: what dead processes left is cleaned
    /// up by `recover::recover`, which commands that change the pool call.
    pub fn open(state_dir: &Path) -> Result<Pool> {
        if !check_store_file(state_dir)? {
            return Err(match pool_trace(state_dir) {
                Some(trace) => Error::StoreLost {
                    path: state_dir.join(crate::core::store::DB_FILE),
                    trace,
                },
                None => Error::NoPool(state_dir.to_path_buf()),
            });
        }
        let store = Store::open(state_dir)?;
        let uuid = store
            .pool_uuid()?
            .ok_or_else(|| Error::NoPool(state_dir.to_path_buf()))?;
        Ok(Pool {
            state_dir: state_dir.to_path_buf(),
            store,
            uuid,
        })
    }

    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The metadata store, for the rest of the core; the layers above go through `Pool`.
    pub(in crate::core) fn store(&self) -> &Store {
        &self.store
    }

    /// `config set`: changes one setting.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<Settings> {
        let usable = self
            .disks_in_service()?
            .iter()
            .filter(|(d, ok)| *ok && d.state == crate::core::store::DiskState::Healthy)
            .count();
        Settings::set(&self.store, key, value, usable as u32)
    }

    pub fn settings(&self) -> Result<Settings> {
        Settings::load(&self.store)
    }

    /// The lock the one running repair holds; copies being written belong to it.
    pub fn repair_lock_path(&self) -> PathBuf {
        self.state_dir.join("repair.lock")
    }

    /// Applies `event` to a copy (see `core::copies`): the one way the pool changes a copy's
    /// state. Disks found without their label now do not count toward the image's good copies.
    pub fn copy_event(&self, image_id: i64, disk_id: i64, event: Event) -> Result<Outcome> {
        // Only the disks of the image's other copies are looked at: a hung disk elsewhere does
        // not hold up a change to this image.
        let unreachable: Vec<i64> = self
            .store
            .copies_of(image_id)?
            .iter()
            .filter(|c| c.disk.id != disk_id && self.disk_health(&c.disk) != DiskHealth::Healthy)
            .map(|c| c.disk.id)
            .collect();
        self.store
            .copy_event(image_id, disk_id, event, now(), &unreachable)
    }

    /// The disks found without their label just now: their copies are no image's good copies.
    fn unreachable_disks(&self) -> Result<Vec<i64>> {
        Ok(self
            .store
            .disks()?
            .iter()
            .filter(|d| self.disk_health(d) != DiskHealth::Healthy)
            .map(|d| d.id)
            .collect())
    }
}

/// Whether the store file exists, refusing one that cannot be reached or is empty (SQLite
/// would take an empty file for a new store, and the pool's index would silently be gone).
pub(crate) fn check_store_file(state_dir: &Path) -> Result<bool> {
    let db = state_dir.join(crate::core::store::DB_FILE);
    match fs::metadata(&db) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::StoreUnreachable { path: db, source }),
        Ok(meta) if meta.len() == 0 => Err(Error::StoreUnreadable {
            path: db,
            detail: "the file is empty".into(),
        }),
        Ok(_) => Ok(true),
    }
}

/// What a pool leaves in its state directory besides the store, if any is there: the sign that
/// a missing store was lost rather than never made.
fn pool_trace(state_dir: &Path) -> Option<PathBuf> {
    ["locks", "control", "repair.lock", "disks.lock", "mount.log"]
        .iter()
        .map(|name| state_dir.join(name))
        .find(|path| path.symlink_metadata().is_ok())
}

/// A pool with plain-directory disks `d1`..`dn` in a temporary directory, for core tests.
#[cfg(test)]
pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub pool: Pool,
    pub disks: Vec<PathBuf>,
}

#[cfg(test)]
impl Fixture {
    /// Imports `bytes` as `name` with `copies` copies; returns the source file's path.
    pub fn image(&self, name: &str, bytes: &[u8], copies: u32) -> PathBuf {
        let src = self.dir.path().join(format!("{name}.src"));
        fs::write(&src, bytes).unwrap();
        self.pool
            .add_image(name, &src, Some(copies), &mut |_, _| {})
            .unwrap();
        src
    }

    /// The disks (names) holding a serving copy of `name`, in placement order.
    pub fn serving(&self, name: &str) -> Vec<String> {
        let info = self.pool.image(name).unwrap();
        info.copies
            .into_iter()
            .filter(|c| c.serving)
            .map(|c| c.disk)
            .collect()
    }
}

#[cfg(test)]
pub(crate) fn fixture(disks: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::init(&dir.path().join("state")).unwrap();
    let mut paths = Vec::new();
    for i in 1..=disks {
        let path = dir.path().join(format!("d{i}"));
        fs::create_dir(&path).unwrap();
        pool.add_disk(&format!("d{i}"), &path).unwrap();
        paths.push(path);
    }
    Fixture {
        dir,
        pool,
        disks: paths,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::core::owner::OwnerLock;
    use crate::format::layout::CopyRecord;

    fn source(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, bytes).unwrap();
        path
    }

    fn files_on(disk: &Path) -> usize {
        ["copies", "tmp"]
            .iter()
            .filter_map(|sub| {
                fs::read_dir(disk.join(crate::format::layout::POOL_DIR).join(sub)).ok()
            })
            .map(|d| d.count())
            .sum()
    }

    #[test]
    fn import_stores_verified_copies_on_distinct_disks() {
        let f = fixture(3);
        let src = source(f.dir.path(), "a.img", &[7u8; 10_000]);
        let imported = f
            .pool
            .add_image("a", &src, Some(2), &mut |_, _| {})
            .unwrap();
        assert_eq!(imported.disks.len(), 2);
        assert_ne!(imported.disks[0], imported.disks[1]);
        let info = f.pool.image("a").unwrap();
        assert_eq!(info.state(), crate::core::pool::ImageHealth::Ready);
        for copy in &info.copies {
            assert_eq!(fs::read(&copy.path).unwrap(), vec![7u8; 10_000]);
        }
        let record: CopyRecord =
            serde_json::from_slice(&fs::read(info.copies[0].path.with_extension("json")).unwrap())
                .unwrap();
        assert_eq!(Some(record.sha512), imported.sha512);
        assert_eq!(record.pool_uuid, f.pool.uuid());
        assert!(matches!(
            f.pool.add_image("a", &src, Some(1), &mut |_, _| {}),
            Err(Error::ImageExists(_))
        ));
    }

    #[test]
    fn holders_block_removal_and_gc_waits_for_the_grace_period() {
        let f = fixture(1);
        let src = source(f.dir.path(), "a.img", b"image");
        f.pool
            .add_image("a", &src, Some(1), &mut |_, _| {})
            .unwrap();
        f.pool.add_ref("a", "r1").unwrap();
        match f.pool.remove_image("a") {
            Err(Error::InUse { holders, .. }) => assert_eq!(holders, vec!["r1".to_string()]),
            other => panic!("expected InUse, got {other:?}"),
        }
        assert!(f.pool.gc(Duration::ZERO, false).unwrap().is_empty());
        f.pool.remove_ref("a", "r1").unwrap();
        assert!(f
            .pool
            .gc(Duration::from_secs(3600), false)
            .unwrap()
            .is_empty());
        assert_eq!(
            f.pool.gc(Duration::ZERO, true).unwrap(),
            vec!["a".to_string()]
        );
        assert!(f.pool.image("a").is_ok(), "a dry run removed the image");
        assert_eq!(
            f.pool.gc(Duration::ZERO, false).unwrap(),
            vec!["a".to_string()]
        );
        assert!(matches!(f.pool.image("a"), Err(Error::UnknownImage(_))));
        assert_eq!(files_on(&f.disks[0]), 0);
    }

    #[test]
    fn open_files_of_live_mounts_block_removal_and_dead_ones_do_not() {
        let f = fixture(1);
        let src = source(f.dir.path(), "a.img", b"image");
        f.pool
            .add_image("a", &src, Some(1), &mut |_, _| {})
            .unwrap();
        let image_id = f.pool.image("a").unwrap().image.id;
        let state = f.pool.state_dir().to_path_buf();
        let lock = OwnerLock::acquire(&state, "mount-test").unwrap();
        let mount = f
            .pool
            .store()
            .insert_mount(Path::new("/mnt"), 1, now(), "mount-test")
            .unwrap();
        assert!(f.pool.store().open_handle(mount, image_id).unwrap());
        assert!(matches!(
            f.pool.remove_image("a"),
            Err(Error::InUse {
                open_handles: 1,
                ..
            })
        ));
        // The daemon dies without closing: its handles no longer count, and listings leave
        // its row to recovery.
        drop(lock);
        assert!(f.pool.live_mounts().unwrap().is_empty());
        f.pool.remove_image("a").unwrap();
        assert_eq!(f.pool.store().mounts().unwrap().len(), 1);
        crate::core::recover::recover(&f.pool).unwrap();
        assert!(f.pool.store().mounts().unwrap().is_empty());
    }
}
