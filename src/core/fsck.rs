//! `imgpool fsck`: the metadata store checked against the disks, every difference reported and,
//! with `--repair`, fixed; and the store rebuilt from the disks' labels and copy records when it
//! is lost. Fixes never delete image data that the store does not explain: such a copy is
//! adopted (as unverified) rather than removed.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::core::copies::Event;
use crate::core::owner::WorkLock;
use crate::core::pool::{check_store_file, DiskHealth, Pool, GC_HOLD};
use crate::core::store::{CopyState, ImageRow, ImageState, Store, VolumeRow, VolumeState, DB_FILE};
use crate::core::volume;
use crate::error::{Error, ErrorKind, Result};
use crate::format::clock;
use crate::format::layout::{fsync_dir, read_volume_record, CopyRecord, DiskLayout, Label};
use crate::format::volume::VolumeFiles;

/// One difference between the store and the disks.
#[derive(Debug, Clone)]
pub struct Finding {
    pub problem: String,
    /// What `--repair` did about it (or would do).
    pub fix: String,
}

enum Fix<'a> {
    FailCopy(&'a ImageRow, i64),
    Unverify(&'a ImageRow, i64),
    RewriteRecord(&'a ImageRow, &'a DiskLayout),
    /// A leftover file on a disk, named after `uuid`: removed if, when it is removed, no row
    /// explains it.
    RemoveLeftover {
        uuid: String,
        disk: i64,
        path: PathBuf,
    },
    Adopt(&'a ImageRow, i64),
    AdoptUnknown(CopyRecord, i64, PathBuf),
    /// A volume directory on a disk that the store does not list: listed again.
    AdoptVolume(VolumeRow),
    Nothing,
}

/// Checks every disk in service against the store; with `repair`, fixes what it finds (the
/// caller runs recovery first). What a dead process left for recovery, and work in progress,
/// is explained by its rows and is not a difference: a check only reads.
pub fn check(pool: &Pool, repair: bool) -> Result<Vec<Finding>> {
    let store = pool.store();
    // Leftover files are judged only while nothing writes copies: no repair (its lock) and no
    // import (an `importing` row exists before its first file).
    let repair_lock = WorkLock::try_acquire(&pool.repair_lock_path())?;
    let images = store.images()?;
    let quiet = repair_lock.is_some() && !images.iter().any(|i| i.state == ImageState::Importing);
    let copies = store.all_copies()?;
    let mut findings = Vec::new();
    let mut record = |problem: String, fix: Fix| -> Result<()> {
        let (description, apply) = describe(&fix);
        if repair {
            apply_fix(pool, fix)?;
        }
        findings.push(Finding {
            problem,
            fix: description.to_string() + if apply { "" } else { " (nothing to do)" },
        });
        Ok(())
    };
    for (disk, _) in pool.disks_in_service()? {
        if let Some(problem) = pool.disk_health(&disk).problem() {
            record(format!("disk '{}': {problem}", disk.name), Fix::Nothing)?;
            continue;
        }
        let layout = DiskLayout::new(&disk.path);
        for copy in copies.iter().filter(|c| c.disk.id == disk.id) {
            let Some(image) = images.iter().find(|i| i.id == copy.image_id) else {
                continue;
            };
            if image.state != ImageState::Ready
                || !matches!(
                    copy.state,
                    CopyState::Ready | CopyState::Damaged | CopyState::Unverified
                )
            {
                continue;
            }
            let what = format!("copy of '{}' on '{}'", image.name, disk.name);
            let data = layout.copy_path(&image.uuid);
            match fs::metadata(&data) {
                Err(e) => {
                    record(
                        format!("{what}: data file {} ({e})", data.display()),
                        Fix::FailCopy(image, disk.id),
                    )?;
                    continue;
                }
                Ok(meta) if meta.len() != image.size => {
                    record(
                        format!("{what}: {} bytes, the image has {}", meta.len(), image.size),
                        Fix::FailCopy(image, disk.id),
                    )?;
                    continue;
                }
                Ok(_) => {}
            }
            let expected = pool.record_of(image);
            match layout.read_record(&image.uuid) {
                Ok(found) if same_identity(&found, &expected) => {}
                Ok(_) => record(
                    format!("{what}: its record does not describe the image"),
                    Fix::RewriteRecord(image, &layout),
                )?,
                Err(e) => record(format!("{what}: {e}"), Fix::RewriteRecord(image, &layout))?,
            }
            if let Err(e) = layout.read_digests(
                &image.uuid,
                image.chunk_size,
                image.size,
                &image.digests_hash,
            ) {
                if matches!(copy.state, CopyState::Ready | CopyState::Damaged) {
                    record(format!("{what}: {e}"), Fix::Unverify(image, disk.id))?;
                }
            }
        }
        let listed: Vec<&str> = copies
            .iter()
            .filter(|c| c.disk.id == disk.id)
            .filter_map(|c| images.iter().find(|i| i.id == c.image_id))
            .map(|i| i.uuid.as_str())
            .collect();
        for uuid in layout.copies()? {
            if listed.contains(&uuid.as_str()) {
                continue;
            }
            let path = layout.copy_path(&uuid);
            match images.iter().find(|i| i.uuid == uuid) {
                Some(image) if image.state == ImageState::Ready => record(
                    format!(
                        "disk '{}' holds a copy of '{}' that the store does not list",
                        disk.name, image.name
                    ),
                    Fix::Adopt(image, disk.id),
                )?,
                Some(_) => {}
                None => match layout.read_record(&uuid) {
                    Ok(found) if found.pool_uuid == pool.uuid() && found.chunk_size > 0 => record(
                        format!(
                            "disk '{}' holds a copy of an image the store does not know ('{}', {uuid})",
                            disk.name, found.name
                        ),
                        Fix::AdoptUnknown(found, disk.id, path),
                    )?,
                    _ => record(
                        format!(
                            "{} has no valid record of this pool; it is left alone",
                            path.display()
                        ),
                        Fix::Nothing,
                    )?,
                },
            }
        }
        // Files of work in progress, or of work a dead process left for recovery: an image that
        // is not ready, or a copy row on this disk (the same rule `Store::unless_explained`
        // applies when a fix removes a file).
        let explained = |uuid: &str| {
            images.iter().any(|i| {
                i.uuid == uuid
                    && (i.state != ImageState::Ready
                        || copies
                            .iter()
                            .any(|c| c.image_id == i.id && c.disk.id == disk.id))
            })
        };
        if quiet {
            for name in layout.copies_dir_files()? {
                let uuid = name.split('.').next().unwrap_or_default();
                let leftover = name.ends_with(".tmp")
                    || ((name.ends_with(".json") || name.ends_with(".digests"))
                        && !layout.copy_path(uuid).exists());
                if leftover && !explained(uuid) {
                    record(
                        format!("disk '{}': leftover file {name}", disk.name),
                        Fix::RemoveLeftover {
                            uuid: uuid.to_string(),
                            disk: disk.id,
                            path: layout.copies_dir_path(&name),
                        },
                    )?;
                }
            }
            for uuid in layout.tmp_copies()? {
                if !explained(&uuid) {
                    record(
                        format!("disk '{}': leftover temporary copy {uuid}", disk.name),
                        Fix::RemoveLeftover {
                            path: layout.tmp_copy_path(&uuid),
                            uuid,
                            disk: disk.id,
                        },
                    )?;
                }
            }
        }
    }
    check_volumes(pool, &mut record)?;
    for image in images.iter().filter(|i| i.state == ImageState::Ready) {
        if !copies.iter().any(|c| c.image_id == image.id) {
            record(
                format!("image '{}' has no copy on any disk", image.name),
                Fix::Nothing,
            )?;
        }
    }
    Ok(findings)
}

/// Whether record `found` describes the image `expected` describes. A record written before
/// the image's SHA-512 was computed (an export's) has none, and still does; so does a record
/// with the sum of an image whose row has none yet (a row rebuilt from another copy's record).
fn same_identity(found: &CopyRecord, expected: &CopyRecord) -> bool {
    (
        &found.pool_uuid,
        &found.uuid,
        &found.name,
        found.size,
        &found.digests_hash,
    ) == (
        &expected.pool_uuid,
        &expected.uuid,
        &expected.name,
        expected.size,
        &expected.digests_hash,
    ) && (found.sha512.is_empty() || expected.sha512.is_empty() || found.sha512 == expected.sha512)
}

/// What a fix does, and whether it changes anything.
fn describe(fix: &Fix) -> (&'static str, bool) {
    match fix {
        Fix::FailCopy(..) => ("the copy is failed and replaced by the repair", true),
        Fix::Unverify(..) => (
            "the copy is verified again (its digest file is rewritten)",
            true,
        ),
        Fix::RewriteRecord(..) => ("the record is rewritten from the store", true),
        Fix::RemoveLeftover { .. } => ("the file is removed", true),
        Fix::Adopt(..) => (
            "the copy is listed as unverified; the repair verifies it",
            true,
        ),
        Fix::AdoptUnknown(..) => (
            "the image is listed again from the record, its copy unverified",
            true,
        ),
        Fix::AdoptVolume(..) => ("the volume is listed again from its record", true),
        Fix::Nothing => ("", false),
    }
}

fn apply_fix(pool: &Pool, fix: Fix) -> Result<()> {
    let store = pool.store();
    let now = clock::now();
    match fix {
        Fix::FailCopy(image, disk) => {
            pool.copy_event(
                image.id,
                disk,
                Event::Faulted("fsck: its data file is wrong"),
            )?;
        }
        Fix::Unverify(image, disk) => {
            pool.copy_event(
                image.id,
                disk,
                Event::Suspect("fsck: its digest file is damaged"),
            )?;
        }
        Fix::RewriteRecord(image, layout) => layout.write_record(&pool.record_of(image))?,
        // Decided again when removed: an import or repair may have started meanwhile.
        Fix::RemoveLeftover { uuid, disk, path } => {
            store.unless_explained(&uuid, disk, || match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("cannot remove {}", path.display()), e))
                }
                _ => Ok(()),
            })?;
        }
        Fix::Adopt(image, disk) => {
            pool.copy_event(image.id, disk, Event::Found)?;
        }
        Fix::AdoptUnknown(found, disk, path) => {
            let id = match store.image_by_name(&found.name)? {
                Some(existing) if existing.uuid == found.uuid => existing.id,
                Some(_) => {
                    tracing::warn!(
                        "cannot list the copy {} again: another image is named '{}'",
                        path.display(),
                        found.name
                    );
                    return Ok(());
                }
                None => store.insert_found_image(&image_from_record(&found, &path, now))?,
            };
            pool.copy_event(id, disk, Event::Found)?;
        }
        Fix::AdoptVolume(volume) => {
            store.insert_found_volume(&volume)?;
        }
        Fix::Nothing => {}
    }
    Ok(())
}

/// A volume found on a disk, as a row: its record says what it is, its index how big it is,
/// and its base image must be in the pool (a volume must not read zeros where its image was).
fn found_volume(
    store: &Store,
    pool_uuid: &str,
    disk_id: i64,
    files: &VolumeFiles,
) -> std::result::Result<VolumeRow, String> {
    let record = read_volume_record(files).map_err(|e| e.to_string())?;
    if record.pool_uuid != pool_uuid {
        return Err(format!("its record belongs to pool {}", record.pool_uuid));
    }
    let summary = volume::summary(files).map_err(|e| format!("its index: {e}"))?;
    let image_id = match &record.base {
        None => None,
        Some(base) => Some(
            store
                .images()
                .map_err(|e| e.to_string())?
                .into_iter()
                .find(|i| i.uuid == base.uuid && i.state == ImageState::Ready)
                .ok_or_else(|| {
                    format!(
                        "its base image '{}' ({}) is not in the pool: import it again first",
                        base.name, base.uuid
                    )
                })?
                .id,
        ),
    };
    Ok(VolumeRow {
        id: 0,
        name: record.name,
        uuid: record.uuid,
        disk_id,
        image_id,
        size: summary.size,
        state: VolumeState::Ready,
        created: record.created,
    })
}

/// Each ready volume against its directory, each volume directory against the rows. Data is
/// never deleted here: a directory the store does not know is listed again when its record
/// allows, and left alone otherwise.
fn check_volumes(pool: &Pool, record: &mut impl FnMut(String, Fix) -> Result<()>) -> Result<()> {
    let store = pool.store();
    let volumes = store.volumes()?;
    for (disk, serving) in pool.disks_in_service()? {
        if !serving {
            continue;
        }
        let layout = DiskLayout::new(&disk.path);
        for volume in volumes
            .iter()
            .filter(|v| v.disk_id == disk.id && v.state == VolumeState::Ready)
        {
            let files = layout.volume_files(&volume.uuid);
            let problem = match read_volume_record(&files) {
                Err(e) => Some(e.to_string()),
                Ok(r) if r.uuid != volume.uuid || r.name != volume.name => {
                    Some("its record describes another volume".to_string())
                }
                Ok(_) => volume::summary(&files)
                    .err()
                    .map(|e| format!("its index: {e}")),
            };
            if let Some(problem) = problem {
                record(
                    format!(
                        "volume '{}' on disk '{}': {problem}",
                        volume.name, disk.name
                    ),
                    Fix::Nothing,
                )?;
            }
        }
        for uuid in layout.volume_uuids()? {
            if volumes.iter().any(|v| v.uuid == uuid) {
                continue;
            }
            let files = layout.volume_files(&uuid);
            match found_volume(store, pool.uuid(), disk.id, &files) {
                Ok(volume) => record(
                    format!(
                        "disk '{}' holds volume '{}' ({uuid}), which the store does not list",
                        disk.name, volume.name
                    ),
                    Fix::AdoptVolume(volume),
                )?,
                Err(why) => record(
                    format!(
                        "{} is not a volume of this pool that can be listed ({why}); it is left alone",
                        files.dir().display()
                    ),
                    Fix::Nothing,
                )?,
            }
        }
    }
    Ok(())
}

fn image_from_record(record: &CopyRecord, data: &Path, now: i64) -> ImageRow {
    ImageRow {
        id: 0,
        name: record.name.clone(),
        uuid: record.uuid.clone(),
        size: record.size,
        // Not recorded next to the copy yet: computed again (`Pool::complete_sha512`).
        sha512: Some(record.sha512.clone()).filter(|s| !s.is_empty()),
        real_size: fs::metadata(data).map_or(0, |m| m.blocks() * 512),
        state: ImageState::Ready,
        copies_wanted: record.copies_wanted.max(1),
        source: record.source.clone(),
        created: record.created,
        unreferenced_since: Some(now),
        chunk_size: record.chunk_size,
        digests_hash: record.digests_hash.clone(),
        problem: None,
    }
}

/// Directories that may be disks: the given ones, or every mount point whose root carries an
/// imgpool label.
fn find_disks(given: &[PathBuf]) -> Result<Vec<(PathBuf, Label)>> {
    let candidates: Vec<PathBuf> = if given.is_empty() {
        crate::format::mountinfo::read()?
            .into_iter()
            .map(|m| m.mount_point)
            .collect()
    } else {
        given.to_vec()
    };
    let mut found = Vec::new();
    for dir in candidates {
        if let Ok(Some(label)) = DiskLayout::new(&dir).read_label() {
            let dir = fs::canonicalize(&dir).unwrap_or(dir);
            if !found.iter().any(|(d, _): &(PathBuf, Label)| *d == dir) {
                found.push((dir, label));
            }
        }
    }
    Ok(found)
}

/// The store as fsck finds it.
pub enum StoreCondition {
    /// No store file in the state directory: lost, or never made.
    Missing,
    /// A store file that cannot serve as it is (empty, not a database, damaged inside, holding
    /// no pool): the error that says so.
    Damaged(Error),
    Usable(Pool),
}

/// Opens the store for fsck, telling a missing or damaged store (which `fsck --repair` rebuilds
/// from the disks) from one that cannot be reached now (which it must not touch).
pub fn examine(state_dir: &Path) -> Result<StoreCondition> {
    let db = state_dir.join(DB_FILE);
    let pool = match Pool::open(state_dir) {
        Ok(pool) => pool,
        Err(Error::NoPool(_) | Error::StoreLost { .. }) if !check_store_file(state_dir)? => {
            return Ok(StoreCondition::Missing)
        }
        Err(Error::NoPool(_)) => {
            return Ok(StoreCondition::Damaged(Error::StoreUnreadable {
                path: db,
                detail: "it holds no pool".into(),
            }))
        }
        Err(e @ Error::StoreUnreadable { .. }) => return Ok(StoreCondition::Damaged(e)),
        Err(e) => return Err(e),
    };
    match pool.store().quick_check() {
        Ok(None) => Ok(StoreCondition::Usable(pool)),
        Ok(Some(problem)) => Ok(StoreCondition::Damaged(Error::StoreUnreadable {
            path: db,
            detail: problem,
        })),
        Err(e @ Error::StoreUnreadable { .. }) => Ok(StoreCondition::Damaged(e)),
        Err(e) => Err(e),
    }
}

/// A pool whose store was lost, found on disks while the store in the state directory is an
/// empty one (what `imgpool init` makes, run after the loss).
#[derive(Debug)]
pub struct LostPool {
    pub pool_uuid: String,
    pub disks: Vec<PathBuf>,
}

/// When `pool` has no disk and no image, the one other pool whose labels the disks found carry
/// (`given`, or the labelled mount points): its store was probably lost, and this one made after.
pub fn lost_pool(pool: &Pool, given: &[PathBuf]) -> Result<Option<LostPool>> {
    if !pool.store().disks()?.is_empty() || !pool.store().images()?.is_empty() {
        return Ok(None);
    }
    let found: Vec<(PathBuf, Label)> = find_disks(given)?
        .into_iter()
        .filter(|(_, label)| label.pool_uuid != pool.uuid())
        .collect();
    let mut pools: Vec<&str> = found.iter().map(|(_, l)| l.pool_uuid.as_str()).collect();
    pools.sort();
    pools.dedup();
    match pools.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(LostPool {
            pool_uuid: one.to_string(),
            disks: found.iter().map(|(path, _)| path.clone()).collect(),
        })),
        many => Err(Error::refused(
            ErrorKind::Conflict,
            format!(
                "this pool is empty, and disks of {} other pools are here ({}): pass the disks of the pool whose store was lost with --disk PATH",
                many.len(),
                many.join(", ")
            ),
        )),
    }
}

/// What `replace_store` sets aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetAside {
    /// A store that cannot serve (`StoreCondition::Damaged`).
    Damaged,
    /// An empty store made after the pool's own was lost (`lost_pool`); checked again to be
    /// empty before it is set aside.
    Empty,
}

/// `fsck --repair` of a store that cannot serve as it is: its files are set aside (renamed,
/// never deleted) and the store is rebuilt from the disks. Returns where the old store went and
/// what the rebuild found.
pub fn replace_store(
    state_dir: &Path,
    what: SetAside,
    given: &[PathBuf],
) -> Result<(PathBuf, Vec<String>)> {
    let _rebuilding = WorkLock::acquire(&state_dir.join(REBUILD_LOCK))?;
    if what == SetAside::Empty {
        let pool = Pool::open(state_dir)?;
        if !pool.store().disks()?.is_empty() || !pool.store().images()?.is_empty() {
            return Err(Error::refused(
                ErrorKind::Busy,
                "the pool got a disk or an image while fsck ran: it is not set aside; run `imgpool fsck` again",
            ));
        }
    }
    let name = match what {
        SetAside::Damaged => "damaged",
        SetAside::Empty => "empty",
    };
    let aside = set_aside(state_dir, name)?;
    let found = rebuild_locked(state_dir, given)?;
    Ok((aside, found))
}

/// Held while a store is rebuilt (and set aside first): one rebuild at a time.
const REBUILD_LOCK: &str = "rebuild.lock";

/// Renames the store's files to `pool.db.<why>-<time>` (its WAL and shared memory first: a WAL
/// left behind would be replayed into the new store).
fn set_aside(state_dir: &Path, why: &str) -> Result<PathBuf> {
    let db = state_dir.join(DB_FILE);
    let stamp = clock::now();
    let aside = (0..)
        .map(|n| match n {
            0 => state_dir.join(format!("{DB_FILE}.{why}-{stamp}")),
            n => state_dir.join(format!("{DB_FILE}.{why}-{stamp}.{n}")),
        })
        .find(|path| path.symlink_metadata().is_err())
        .expect("some name is free");
    for suffix in ["-wal", "-shm", ""] {
        let from = PathBuf::from(format!("{}{suffix}", db.display()));
        let to = PathBuf::from(format!("{}{suffix}", aside.display()));
        match fs::rename(&from, &to) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("cannot set {} aside", from.display()), e)),
            Ok(()) => {}
        }
    }
    fsync_dir(state_dir)?;
    Ok(aside)
}

/// Rebuilds a lost metadata store in `state_dir` from the disks: the pool, its disks, and every
/// image with a copy record, each copy unverified (the repair verifies them before they serve).
/// gc is held until the operator has registered the holders again. Returns what was found.
pub fn rebuild(state_dir: &Path, given: &[PathBuf]) -> Result<Vec<String>> {
    fs::create_dir_all(state_dir)
        .map_err(|e| Error::io(format!("cannot create {}", state_dir.display()), e))?;
    let _rebuilding = WorkLock::acquire(&state_dir.join(REBUILD_LOCK))?;
    rebuild_locked(state_dir, given)
}

fn rebuild_locked(state_dir: &Path, given: &[PathBuf]) -> Result<Vec<String>> {
    if state_dir.join(DB_FILE).exists() {
        return Err(Error::refused(
            ErrorKind::AlreadyExists,
            format!(
                "{} exists (another `imgpool fsck --repair` made it meanwhile?): `imgpool fsck` checks it",
                state_dir.join(DB_FILE).display()
            ),
        ));
    }
    let disks = find_disks(given)?;
    let mut pools: Vec<&str> = disks.iter().map(|(_, l)| l.pool_uuid.as_str()).collect();
    pools.sort();
    pools.dedup();
    let pool_uuid = match pools.as_slice() {
        [one] => one.to_string(),
        [] => {
            return Err(Error::refused(
                ErrorKind::NotFound,
                "no imgpool disk found: pass each disk directory with --disk PATH",
            ))
        }
        many => {
            return Err(Error::refused(
                ErrorKind::Conflict,
                format!(
                    "the disks found belong to {} pools ({}): pass the disks of one pool with --disk PATH",
                    many.len(),
                    many.join(", ")
                ),
            ))
        }
    };
    fs::create_dir_all(state_dir)
        .map_err(|e| Error::io(format!("cannot create {}", state_dir.display()), e))?;
    let store = Store::open(state_dir)?;
    let now = clock::now();
    store.create_pool(&pool_uuid, now)?;
    // Held first: a rebuild cut short must not leave a store whose gc sees no holders.
    store.set_setting(
        GC_HOLD,
        Some(&format!(
            "the store was rebuilt from the disks at {}; holders are unknown until registered again",
            crate::format::clock::timestamp(now)
        )),
    )?;
    let mut done = Vec::new();
    let mut images: BTreeMap<String, (CopyRecord, PathBuf, Vec<i64>)> = BTreeMap::new();
    for (path, label) in &disks {
        let disk = store.insert_disk(&label.disk_name, path, &label.disk_uuid, label.created)?;
        done.push(format!("disk '{}' at {}", disk.name, path.display()));
        let layout = DiskLayout::new(path);
        for uuid in layout.copies()? {
            let Ok(record) = layout.read_record(&uuid) else {
                done.push(format!(
                    "skipped {}: no readable record",
                    layout.copy_path(&uuid).display()
                ));
                continue;
            };
            if record.pool_uuid != pool_uuid || record.chunk_size == 0 || record.size == 0 {
                continue;
            }
            let entry = images
                .entry(uuid.clone())
                .or_insert_with(|| (record.clone(), layout.copy_path(&uuid), Vec::new()));
            entry.0.copies_wanted = entry.0.copies_wanted.max(record.copies_wanted);
            // The sum, if any copy's record has it: not computed again.
            if entry.0.sha512.is_empty() {
                entry.0.sha512 = record.sha512.clone();
            }
            entry.2.push(disk.id);
        }
    }
    for (record, data, disk_ids) in images.values() {
        let id = match store.insert_found_image(&image_from_record(record, data, now)) {
            Ok(id) => id,
            Err(e) => {
                done.push(format!(
                    "skipped image '{}' ({}): {e}",
                    record.name, record.uuid
                ));
                continue;
            }
        };
        for disk in disk_ids {
            // A rebuilt store has no pool yet to check labels with: every disk was just found
            // by its label.
            store.copy_event(id, *disk, Event::Found, now, &[])?;
        }
        done.push(format!(
            "image '{}' with {} copies (unverified)",
            record.name,
            disk_ids.len()
        ));
    }
    for disk in store.disks()? {
        let layout = DiskLayout::new(&disk.path);
        for uuid in layout.volume_uuids()? {
            let files = layout.volume_files(&uuid);
            let found = found_volume(&store, &pool_uuid, disk.id, &files).and_then(|v| {
                store
                    .insert_found_volume(&v)
                    .map(|_| v)
                    .map_err(|e| e.to_string())
            });
            done.push(match found {
                Ok(v) => format!("volume '{}' on disk '{}'", v.name, disk.name),
                Err(why) => format!("skipped volume {}: {why}", files.dir().display()),
            });
        }
    }
    let pool = Pool::open(state_dir)?;
    // Disks found are registered healthy only if their label checks out now.
    for disk in pool.store().disks()? {
        if pool.disk_health(&disk) != DiskHealth::Healthy {
            done.push(format!("disk '{}' is not reachable", disk.name));
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pool::fixture;

    #[test]
    fn differences_are_found_then_fixed() {
        let f = fixture(2);
        f.image("a", &vec![3u8; 70_000], 2);
        f.image("b", &vec![4u8; 1000], 1);
        assert!(check(&f.pool, false).unwrap().is_empty());
        let a = f.pool.image("a").unwrap();
        let d1 = DiskLayout::new(&f.disks[0]);
        // A lost record, a damaged digest file, a leftover temporary, a copy nobody lists.
        fs::remove_file(d1.record_path(&a.image.uuid)).unwrap();
        fs::write(d1.digests_path(&a.image.uuid), b"junk").unwrap();
        fs::write(d1.tmp_copy_path("dead-beef"), b"x").unwrap();
        let b = f.pool.image("b").unwrap();
        let b_home = &b.copies[0].disk;
        let other = if b_home == "d1" { 1 } else { 0 };
        let b_src = b.copies[0].path.clone();
        let stray = DiskLayout::new(&f.disks[other]).copy_path(&b.image.uuid);
        fs::copy(&b_src, &stray).unwrap();

        let found = check(&f.pool, false).unwrap();
        assert_eq!(found.len(), 4, "{found:#?}");
        assert!(found.iter().any(|x| x.problem.contains("does not list")));
        // Nothing changed without --repair.
        assert_eq!(check(&f.pool, false).unwrap().len(), 4);

        check(&f.pool, true).unwrap();
        crate::core::repair::repair(
            &f.pool,
            &crate::core::repair::Quiet,
            &std::sync::atomic::AtomicBool::new(false),
        )
        .unwrap();
        let left = check(&f.pool, false).unwrap();
        assert!(left.is_empty(), "{left:#?}");
        assert_eq!(f.pool.image("a").unwrap().healthy_copies(), 2);
        // The adopted copy of b was verified, then trimmed back to b's policy of one.
        assert_eq!(f.pool.image("b").unwrap().healthy_copies(), 1);
    }

    #[test]
    fn a_lost_store_is_rebuilt_from_the_disks_and_gc_waits_for_the_holders() {
        let f = fixture(3);
        let bytes = vec![7u8; 200_000];
        f.image("a", &bytes, 2);
        f.image("b", &vec![8u8; 5000], 1);
        f.pool.add_ref("a", "replica-1").unwrap();
        let state = f.pool.state_dir().to_path_buf();
        let before: Vec<_> = f.pool.images().unwrap();
        for file in ["pool.db", "pool.db-wal", "pool.db-shm"] {
            let _ = fs::remove_file(state.join(file));
        }
        assert!(Pool::open(&state).is_err());

        let found = rebuild(&state, &f.disks).unwrap();
        assert!(
            found.iter().any(|l| l.contains("image 'a' with 2 copies")),
            "{found:?}"
        );
        let pool = Pool::open(&state).unwrap();
        assert_eq!(pool.uuid(), f.pool.uuid());
        let a = pool.image("a").unwrap();
        assert_eq!(
            a.state(),
            crate::core::pool::ImageHealth::Failed,
            "unverified copies do not serve yet"
        );
        crate::core::repair::repair(
            &pool,
            &crate::core::repair::Quiet,
            &std::sync::atomic::AtomicBool::new(false),
        )
        .unwrap();
        for old in before {
            let now = pool.image(&old.image.name).unwrap();
            assert_eq!(now.image.uuid, old.image.uuid);
            assert_eq!(now.image.sha512, old.image.sha512);
            assert_eq!(now.image.copies_wanted, old.image.copies_wanted);
            assert_eq!(now.state(), crate::core::pool::ImageHealth::Ready);
        }
        // The holder was lost with the store: gc must not take the image meanwhile.
        let held = pool.gc(std::time::Duration::ZERO, false).unwrap_err();
        assert!(matches!(held, Error::GcHeld(_)), "{held}");
        assert!(held.to_string().contains("--release-hold"), "{held}");
        pool.add_ref("a", "replica-1").unwrap();
        pool.release_gc_hold().unwrap();
        assert_eq!(
            pool.gc(std::time::Duration::ZERO, false).unwrap(),
            vec!["b".to_string()]
        );
        assert!(check(&pool, false).unwrap().is_empty());
    }
}
