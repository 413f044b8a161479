//! Recovery: cleaning up after processes that died mid-way. An import whose importer is gone
//! loses its reservation and files, a removal cut short is finished, copies a dead repair was
//! writing or deleting go, mount rows of dead daemons are dropped (their open files with them),
//! and stale lock files and stray temporary copies are deleted.
//!
//! Opening the pool does none of this: listings only read. Commands that change the pool call
//! `recover` first, every repair round does (`imgpool repair`, `scrub`, `fsck --repair`, and the
//! mount daemon's repair thread, at start and then on every store change and every 30 s), and the
//! mount daemon calls it when it starts.
//!
//! Other processes run meanwhile, so every cleanup of another process's work follows one rule:
//! the decision "this is abandoned" and the deletion are not separated by a window in which the
//! owner can finish. First the cleaner makes sure the owner is dead and stays so: it takes the
//! dead owner's lock (`owner::check`), or the repair lock for copies the repair writes. An owner
//! lets go of its lock only after its last change to the store is committed, so what the cleaner
//! reads afterwards is final. Then, inside the IMMEDIATE transaction that changes it, it re-reads
//! the row and acts only if the row is still in the state that made it look abandoned. Files go
//! only after that: an abandoned import or copy is first marked `removing`, so that a crash
//! between its files and its row is finished later like any removal.

use crate::core::copies::{Event, Outcome};
use crate::core::owner::{self, Owner, WorkLock};
use crate::core::pool::{import_token, volume_token, Pool, TEMPORARY_SNAPSHOT};
use crate::core::store::{CopyState, ImageRow, ImageState, Store, VolumeState};
use crate::core::volume::requests;
use crate::error::Result;
use crate::format::layout::DiskLayout;

/// Cleans up what dead processes left; returns one line for each thing cleaned up. Copies a
/// dead repair left are cleaned only when no repair runs (otherwise they are the live repair's).
/// A disk that cannot be cleaned now is logged and retried next time; only a failing store is
/// an error.
pub fn recover(pool: &Pool) -> Result<Vec<String>> {
    run(pool, false)
}

/// `recover` for the holder of the repair lock (the repair itself): every copy left `copying`
/// or `removing` is then abandoned.
pub fn recover_holding_repair_lock(pool: &Pool) -> Result<Vec<String>> {
    run(pool, true)
}

fn run(pool: &Pool, holding_repair_lock: bool) -> Result<Vec<String>> {
    let mut done = Vec::new();
    dead_mounts(pool, &mut done)?;
    dead_imports_and_removals(pool, &mut done)?;
    dead_volume_work(pool, &mut done)?;
    done.extend(pool.remove_unlisted_removed_volumes()?);
    dead_receives(pool, &mut done)?;
    abandoned_temporary_snapshots(pool, &mut done)?;
    if holding_repair_lock {
        abandoned_copies(pool, &mut done)?;
    } else if pool
        .store()
        .all_copies()?
        .iter()
        .any(|c| matches!(c.state, CopyState::Removing | CopyState::Copying))
    {
        if let Some(_repair) = WorkLock::try_acquire(&pool.repair_lock_path())? {
            abandoned_copies(pool, &mut done)?;
        }
    }
    stale_locks(pool);
    stray_temporary_copies(pool, &mut done)?;
    done.extend(pool.remove_abandoned_received_images());
    for disk in pool.store().disks()? {
        for path in crate::core::ingest::remove_stale_partials(&disk) {
            done.push(format!(
                "removed {}, the partial copy of an export nobody resumed for a week",
                path.display()
            ));
        }
    }
    Ok(done)
}

/// The temporary snapshots of exports and sends that died, of volumes no mount has open (one
/// that a daemon has open is left to the next export or send of the volume, which asks that
/// daemon).
fn abandoned_temporary_snapshots(pool: &Pool, done: &mut Vec<String>) -> Result<()> {
    for (volume, snapshot) in pool.abandoned_temporary_snapshots(None)? {
        let request = requests::Request::Delete {
            selection: requests::Selection::Names(vec![snapshot.clone()]),
            dry_run: false,
        };
        if let Ok(_deleted) = pool.snapshot_request(&volume, &request)? {
            done.push(format!(
                "deleted the temporary snapshot '{snapshot}' of volume '{volume}' left by {} that died",
                if snapshot.starts_with(TEMPORARY_SNAPSHOT) { "an export" } else { "a send" }
            ));
        }
    }
    Ok(())
}

/// Mount rows whose daemon is dead: dropped, and their open handles with them.
fn dead_mounts(pool: &Pool, done: &mut Vec<String>) -> Result<()> {
    for mount in pool.store().mounts()? {
        let dead @ Owner::Dead(_) = owner::check(pool.state_dir(), &mount.owner) else {
            continue;
        };
        if pool.store().delete_dead_mount(mount.id, &mount.owner)? {
            done.push(format!(
                "dropped the mount at {} of a daemon that died (pid {})",
                mount.mountpoint.display(),
                mount.pid
            ));
        }
        dead.finish();
    }
    Ok(())
}

/// Removals cut short are finished; imports whose importer died are undone.
fn dead_imports_and_removals(pool: &Pool, done: &mut Vec<String>) -> Result<()> {
    for image in pool.store().images()? {
        match image.state {
            ImageState::Ready => {}
            ImageState::Removing => finish_removal(pool, &image, "a removal cut short", done),
            ImageState::Importing => {
                let owner = owner::check(pool.state_dir(), &import_token(&image.uuid));
                if let Owner::Alive = owner {
                    continue;
                }
                // Dead, and its lock is ours (or gone with its work): a row still `importing`
                // now will never be committed. One that was committed or undone after we
                // listed it is left alone.
                if pool.store().abandon_import(image.id, &image.uuid)? {
                    let removing = ImageRow {
                        state: ImageState::Removing,
                        ..image
                    };
                    finish_removal(pool, &removing, "an import whose importer died", done);
                }
                owner.finish();
            }
        }
    }
    Ok(())
}

/// Volumes whose creator died before they were ready, and removals cut short: their files and
/// rows go.
fn dead_volume_work(pool: &Pool, done: &mut Vec<String>) -> Result<()> {
    for volume in pool.store().volumes()? {
        let what = match volume.state {
            VolumeState::Ready => continue,
            VolumeState::Removing => "a volume removal cut short",
            VolumeState::Creating => {
                let owner = owner::check(pool.state_dir(), &volume_token(&volume.uuid));
                if let Owner::Alive = owner {
                    continue;
                }
                // A resumable receive that failed or died: kept for `recv --resume-token` or
                // `recv --abort` (read while holding its dead owner's lock: final).
                if pool.volume_has_resumable_receive(&volume)? {
                    owner.finish();
                    continue;
                }
                // Re-checked in the transaction: only a row still `creating` is abandoned.
                let abandoned = pool.store().set_volume_state(
                    volume.id,
                    VolumeState::Creating,
                    VolumeState::Removing,
                )?;
                owner.finish();
                if !abandoned {
                    continue;
                }
                if pool.volume_was_replacing(&volume) {
                    "the volume a `recv --force` that died was receiving to replace another (which is as it was)"
                } else {
                    "a volume whose creator died"
                }
            }
        };
        match pool.finish_volume_removal(&volume) {
            Ok(()) => done.push(format!("removed {what}: '{}'", volume.name)),
            Err(e) => tracing::warn!("cannot finish {what} ('{}'): {e}", volume.name),
        }
    }
    Ok(())
}

/// Ready volumes whose `recv` died: finished if it had completed, rolled back to where the
/// stream started if it was plain (a resumable one is kept), under their writer lock (which a
/// running receive holds).
fn dead_receives(pool: &Pool, done: &mut Vec<String>) -> Result<()> {
    for volume in pool.store().volumes()? {
        if volume.state != VolumeState::Ready {
            continue;
        }
        match pool.settle_dead_receive(&volume) {
            Ok(Some(what)) => done.push(format!("{what} (its `recv` had died)")),
            Ok(None) => {}
            // Retried by the next recovery.
            Err(e) => tracing::warn!("cannot undo a dead receive into '{}': {e}", volume.name),
        }
    }
    Ok(())
}

fn finish_removal(pool: &Pool, image: &ImageRow, what: &str, done: &mut Vec<String>) {
    match pool.finish_remove(image) {
        Ok(()) => done.push(format!("cleaned up '{}': {what}", image.name)),
        // Retried by the next recovery.
        Err(e) => tracing::warn!("{e}"),
    }
}

/// Copies left `copying` or `removing` by a repair that is no longer running: deleted with
/// whatever their writer left, even a data file already renamed into place (a `copying` row
/// never served). Only for the holder of the repair lock: then no process is writing them.
fn abandoned_copies(pool: &Pool, done: &mut Vec<String>) -> Result<()> {
    let store = pool.store();
    let images = store.images()?;
    for copy in store.all_copies()? {
        if !matches!(copy.state, CopyState::Removing | CopyState::Copying) {
            continue;
        }
        let Some(image) = images.iter().find(|i| i.id == copy.image_id) else {
            continue;
        };
        let taken = pool.copy_event(image.id, copy.disk.id, Event::Abandoned)?;
        if taken != Outcome::Now(CopyState::Removing) {
            continue;
        }
        match DiskLayout::new(&copy.disk.path).remove_copy(&image.uuid) {
            Ok(()) => {
                if pool.copy_event(image.id, copy.disk.id, Event::Deleted)? == Outcome::Deleted {
                    done.push(format!(
                        "cleaned up the copy of '{}' on '{}' that a repair left {}",
                        image.name,
                        copy.disk.name,
                        copy.state.as_str()
                    ));
                }
            }
            // The row stays `removing`: retried by the next recovery.
            Err(e) => tracing::warn!(
                "cannot clean up the copy of '{}' on '{}': {e}",
                image.name,
                copy.disk.name
            ),
        }
    }
    Ok(())
}

/// Lock files of dead owners that no row refers to (an owner that died after taking its lock
/// but before recording its work). Whether a row refers to the token is asked while the dead
/// owner's lock is held.
fn stale_locks(pool: &Pool) {
    let store = pool.store();
    owner::sweep(pool.state_dir(), |token| referenced(store, token));
}

fn referenced(store: &Store, token: &str) -> bool {
    // When the store cannot say, the lock stays.
    let images = store
        .images()
        .map(|images| images.iter().any(|i| import_token(&i.uuid) == token))
        .unwrap_or(true);
    let volumes = store
        .volumes()
        .map(|volumes| volumes.iter().any(|v| volume_token(&v.uuid) == token))
        .unwrap_or(true);
    images
        || volumes
        || store
            .mounts()
            .map(|mounts| mounts.iter().any(|m| m.owner == token))
            .unwrap_or(true)
}

/// Temporary copies that no row explains (the metadata store was reset, or a repair could not
/// delete what it wrote on a dying disk): no image has the uuid, or the image is ready and has
/// no copy on that disk. Asked in the transaction that deletes the file: an import reserves its
/// row, and a repair records its copy, before creating the file, and cannot do so while the
/// transaction holds the store.
fn stray_temporary_copies(pool: &Pool, done: &mut Vec<String>) -> Result<()> {
    for disk in pool.store().disks()? {
        let layout = DiskLayout::new(&disk.path);
        let Ok(tmp) = layout.tmp_copies() else {
            continue;
        };
        for uuid in tmp {
            // Only the temporary file: data under `copies/` is fsck's to judge, which adopts
            // rather than deletes what the store does not list.
            let path = layout.tmp_copy_path(&uuid);
            let mut failed = None;
            let removed = pool.store().unless_explained(&uuid, disk.id, || {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => failed = Some(e),
                    _ => {}
                }
                Ok(())
            })?;
            match failed {
                Some(e) => {
                    tracing::warn!("cannot remove {}: {e}", path.display())
                }
                None if removed => done.push(format!(
                    "removed a temporary copy ({uuid}) on '{}' that no image explains",
                    disk.name
                )),
                None => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::owner::OwnerLock;
    use crate::core::pool::fixture;
    use crate::error::Error;
    use crate::format::clock::now;
    use crate::format::digests::CHUNK_SIZE;
    use std::fs;
    use std::path::Path;

    /// The row an import reserves before it writes anything.
    fn importing_row(name: &str, uuid: &str) -> ImageRow {
        ImageRow {
            id: 0,
            name: name.into(),
            uuid: uuid.into(),
            size: 7,
            sha512: None,
            real_size: 0,
            state: ImageState::Importing,
            copies_wanted: 1,
            source: None,
            created: now(),
            unreferenced_since: None,
            chunk_size: CHUNK_SIZE,
            digests_hash: String::new(),
            problem: None,
        }
    }

    /// Every file under the disks' pool directories and the state directory's locks, sorted.
    fn files(f: &crate::core::pool::Fixture) -> Vec<String> {
        let mut dirs: Vec<_> = f
            .disks
            .iter()
            .flat_map(|d| {
                ["copies", "tmp"].map(|sub| d.join(crate::format::layout::POOL_DIR).join(sub))
            })
            .collect();
        dirs.push(f.pool.state_dir().join("locks"));
        let mut out: Vec<String> = dirs
            .iter()
            .filter_map(|dir| fs::read_dir(dir).ok())
            .flat_map(|entries| entries.map(|e| e.unwrap().path().display().to_string()))
            .collect();
        out.sort();
        out
    }

    /// Every row of the tables that hold the pool's state, as text.
    fn rows(pool: &Pool) -> String {
        format!(
            "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
            pool.store().disks().unwrap(),
            pool.store().images().unwrap(),
            pool.store().all_copies().unwrap(),
            pool.store().holders(None).unwrap(),
            pool.store().mounts().unwrap(),
            pool.settings().unwrap().values(),
        )
    }

    /// A dead import with a temporary copy, a stray temporary copy, a removal cut short, a dead
    /// mount daemon's row with an open file, and a copy a dead repair was writing.
    fn leave_dead_work(f: &crate::core::pool::Fixture) -> (String, std::path::PathBuf) {
        let state = f.pool.state_dir().to_path_buf();
        let src = f.image("kept", b"keep me", 2);
        f.image("going", b"keep me", 2);
        f.image("copied", b"copy me", 1);
        let store = f.pool.store();
        let disks = store.disks().unwrap();
        let uuid = "00000000-0000-0000-0000-000000000001";
        drop(OwnerLock::acquire(&state, &import_token(uuid)).unwrap());
        store
            .reserve_image(&importing_row("half", uuid), &[disks[0].id])
            .unwrap();
        fs::write(
            DiskLayout::new(&disks[0].path).tmp_copy_path(uuid),
            b"partial",
        )
        .unwrap();
        fs::write(DiskLayout::new(&disks[1].path).tmp_copy_path("stray"), b"x").unwrap();
        store.begin_remove("going", &[]).unwrap();
        drop(OwnerLock::acquire(&state, "mount-dead").unwrap());
        let mount = store
            .insert_mount(Path::new("/mnt"), 1, now(), "mount-dead")
            .unwrap();
        let kept = store.image_by_name("kept").unwrap().unwrap();
        assert!(store.open_handle(mount, kept.id).unwrap());
        let copied = store.image_by_name("copied").unwrap().unwrap();
        let empty = disks
            .iter()
            .find(|d| store.copies_of(copied.id).unwrap()[0].disk.id != d.id)
            .unwrap();
        f.pool
            .copy_event(copied.id, empty.id, Event::StartCopy)
            .unwrap();
        fs::write(
            DiskLayout::new(&empty.path).tmp_copy_path(&copied.uuid),
            b"partial",
        )
        .unwrap();
        (uuid.to_string(), src)
    }

    #[test]
    fn opening_and_listing_change_nothing_and_recovery_cleans_up() {
        let f = fixture(2);
        let (uuid, src) = leave_dead_work(&f);
        let (rows_before, files_before) = (rows(&f.pool), files(&f));

        let pool = Pool::open(f.pool.state_dir()).unwrap();
        assert_eq!(pool.images().unwrap().len(), 2, "kept and copied");
        assert_eq!(pool.image("kept").unwrap().open_handles, 0);
        assert!(pool.image("half").is_err());
        assert!(pool.live_mounts().unwrap().is_empty());
        pool.disk_status().unwrap();
        pool.refs(None).unwrap();
        pool.collectable(std::time::Duration::ZERO).unwrap();
        assert_eq!(pool.gc(std::time::Duration::ZERO, true).unwrap().len(), 2);
        crate::core::fsck::check(&pool, false).unwrap();
        assert_eq!(rows(&pool), rows_before);
        assert_eq!(files(&f), files_before);

        let done = recover(&pool).unwrap();
        assert_eq!(done.len(), 5, "{done:#?}");
        let names: Vec<String> = pool
            .images()
            .unwrap()
            .into_iter()
            .map(|i| i.image.name)
            .collect();
        assert_eq!(names, ["copied", "kept"]);
        assert!(pool.store().mounts().unwrap().is_empty());
        assert_eq!(pool.image("copied").unwrap().copies.len(), 1);
        let left = files(&f);
        assert!(
            !left.iter().any(|p| p.contains(&uuid)
                || p.contains("stray")
                || p.contains("/.imgpool/tmp/")
                || p.contains("locks")),
            "{left:#?}"
        );
        // kept's copy, record and digests on both disks; copied's on one.
        assert_eq!(left.len(), 9, "{left:#?}");
        // The name of the dead import is free again.
        pool.add_image("half", &src, Some(1), &mut |_, _| {})
            .unwrap();
        assert!(recover(&pool).unwrap().is_empty());
    }

    #[test]
    fn a_live_import_is_not_cleaned_up_by_another_process() {
        let f = fixture(1);
        let state = f.pool.state_dir().to_path_buf();
        let uuid = "00000000-0000-0000-0000-000000000002";
        let _importer = OwnerLock::acquire(&state, &import_token(uuid)).unwrap();
        let row = importing_row("busy", uuid);
        let disk = f.pool.store().disks().unwrap().remove(0);
        f.pool.store().reserve_image(&row, &[disk.id]).unwrap();
        let tmp = DiskLayout::new(&disk.path).tmp_copy_path(uuid);
        fs::write(&tmp, b"in progress").unwrap();
        let other = Pool::open(&state).unwrap();
        assert!(recover(&other).unwrap().is_empty());
        assert!(tmp.exists());
        assert!(matches!(
            other.add_image("busy", &tmp, Some(1), &mut |_, _| {}),
            Err(Error::ImageBusy(_))
        ));
        assert!(
            other.image("busy").is_err(),
            "an import in progress is visible"
        );
    }

    /// The race of issue 8: a cleaner lists an import as `importing`, the importer commits and
    /// lets go of its lock, and the cleaner then finds the owner dead. The row is re-read in the
    /// transaction that would take it over, so the committed import stays.
    #[test]
    fn an_import_committed_after_the_listing_is_kept() {
        let f = fixture(1);
        let state = f.pool.state_dir().to_path_buf();
        let uuid = "00000000-0000-0000-0000-000000000003";
        let importer = OwnerLock::acquire(&state, &import_token(uuid)).unwrap();
        let store = f.pool.store();
        let disk = store.disks().unwrap().remove(0);
        let id = store
            .reserve_image(&importing_row("racy", uuid), &[disk.id])
            .unwrap();
        let listed = store.image_by_name("racy").unwrap().unwrap();
        assert_eq!(listed.state, ImageState::Importing);
        assert!(store
            .commit_import(id, Some("sha"), 7, CHUNK_SIZE, "hash")
            .unwrap());
        importer.release();
        let owner = owner::check(&state, &import_token(uuid));
        assert!(matches!(owner, Owner::Dead(_)));
        assert!(!store.abandon_import(listed.id, &listed.uuid).unwrap());
        owner.finish();
        assert_eq!(
            store.image_by_name("racy").unwrap().unwrap().state,
            ImageState::Ready
        );
        // And an import whose reservation was taken cannot commit.
        let uuid = "00000000-0000-0000-0000-000000000004";
        let id = store
            .reserve_image(&importing_row("taken", uuid), &[disk.id])
            .unwrap();
        assert!(store.abandon_import(id, uuid).unwrap());
        assert!(!store
            .commit_import(id, Some("sha"), 7, CHUNK_SIZE, "hash")
            .unwrap());
    }
}
