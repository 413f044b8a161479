//! Volumes: creating, listing, growing and removing them. A volume's row in the store indexes
//! its directory on its disk (`format::volume`), where `core::volume` keeps its data.

use std::fs;
use std::io;
use std::path::PathBuf;

use super::Pool;
use crate::core::crash_point::{self, CrashPoint};
use crate::core::owner::OwnerLock;
use crate::core::store::{DiskRow, DiskState, ImageRow, VolumeRow, VolumeState};
use crate::core::volume::{self, requests, Base, Volume, WriterLock};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::clock::now;
use crate::format::layout::{fsync_dir, write_volume_record, DiskLayout};
use crate::format::locks;
use crate::format::volume::{BaseImageRef, VolumeFiles, VolumeRecord, BLOCK, FORMAT_VERSION};

/// The owner-lock token of the creation of the volume with `uuid`.
pub(crate) fn volume_token(uuid: &str) -> String {
    format!("volume-{uuid}")
}

/// A volume as `volume list` and `volume show` report it.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub volume: VolumeRow,
    pub disk: String,
    pub disk_state: DiskState,
    pub image: Option<String>,
    /// Bytes the volume's data file takes on its disk.
    pub allocated: u64,
    pub snapshots: usize,
    /// Bytes the reclaim of deleted snapshots has yet to give back (listings only: a walk of
    /// what is left to reclaim, which commands do not pay for).
    pub reclaim_bytes: Option<u64>,
    /// The process writing it now (a mount daemon with the volume's file open), if any.
    pub open_by: Option<u32>,
    pub dir: PathBuf,
}

impl VolumeInfo {
    /// `ready`, or `failed` when its disk is out of service (its reads and writes fail).
    pub fn state(&self) -> &'static str {
        match self.disk_state {
            DiskState::Failed => "failed",
            _ => "ready",
        }
    }
}

/// Whether a receive into the volume is partial: the mount does not serve it, and commands do
/// not change it, until it is resumed to its end or aborted.
pub fn has_partial_receive(files: &VolumeFiles) -> bool {
    files.receive_state().exists()
}

/// The refusal of a change to a volume with a partial receive.
pub fn partial_receive_refusal(volume: &str) -> Error {
    Error::refused(
        ErrorKind::Conflict,
        format!(
            "volume '{volume}' holds a partial receive: finish it (`imgpool recv --resume-token {volume}` prints the token for `imgpool send --resume`) or drop it with `imgpool recv --abort {volume}`"
        ),
    )
}

/// What trying the writer lock of a volume looked up earlier found (`try_lock_volume`).
pub(crate) enum VolumeLock {
    /// Held, and the volume is still the one so named.
    Held(WriterLock),
    /// Another process holds it (a mount that has it open, a command changing it).
    Busy,
    /// The name is no longer that volume's: a receive replaced it, or it was removed.
    Changed,
}

/// The refusal of a command whose volume was replaced or removed while it waited for it.
pub(crate) fn changed_refusal(name: &str) -> Error {
    Error::refused(
        ErrorKind::Conflict,
        format!("volume '{name}' was replaced (by `imgpool recv --force`) or removed while this command waited for it: nothing was done; run the command again"),
    )
}

/// A volume being created: its `creating` row, its files, and its creator's owner lock.
pub(super) struct NewVolume {
    pub row: VolumeRow,
    pub files: VolumeFiles,
    pub _owner: OwnerLock,
}

/// Commands that change a volume's size or snapshots never read its base image.
struct NotRead;

impl Base for NotRead {
    fn size(&self) -> u64 {
        0
    }

    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::other("the base image is not read here"))
    }
}

pub(super) fn check_size(size: u64, image: Option<(&str, u64)>) -> Result<()> {
    if size == 0 || !size.is_multiple_of(BLOCK) {
        return Err(Error::refused(
            ErrorKind::InvalidInput,
            format!("a volume's size must be a positive multiple of 4096 bytes, not {size}"),
        ));
    }
    if let Some((name, image_size)) = image {
        if size < image_size {
            return Err(Error::refused(
                ErrorKind::InvalidInput,
                format!(
                    "a volume over image '{name}' needs at least its size, {image_size} bytes; {size} is smaller"
                ),
            ));
        }
    }
    Ok(())
}

impl Pool {
    /// Creates a thin volume of `size` bytes (default: the image's size) over `image` (or over
    /// zeros), on `disk` (default: the healthy disk with the most free space).
    pub fn create_volume(
        &self,
        name: &str,
        image: Option<&str>,
        size: Option<u64>,
        disk: Option<&str>,
    ) -> Result<VolumeInfo> {
        super::check_user_volume_name(name)?;
        let base = match image {
            Some(image) => Some(
                self.store
                    .image_by_name(image)?
                    .filter(|i| i.state == crate::core::store::ImageState::Ready)
                    .ok_or_else(|| Error::UnknownImage(image.to_string()))?,
            ),
            None => None,
        };
        let size = match (size, &base) {
            (Some(size), _) => size,
            (None, Some(image)) => image.size.div_ceil(BLOCK) * BLOCK,
            (None, None) => {
                return Err(Error::refused(
                    ErrorKind::InvalidInput,
                    "a volume without an image needs a size: add --size SIZE",
                ))
            }
        };
        check_size(size, base.as_ref().map(|i| (i.name.as_str(), i.size)))?;
        let new = self.start_volume(name, base.as_ref(), size, disk)?;
        self.store
            .set_volume_state(new.row.id, VolumeState::Creating, VolumeState::Ready)?;
        drop(new);
        self.volume_with_reclaim(name)
    }

    /// A new volume's row (`creating`: invisible) and its empty files, on `disk` (default: the
    /// healthy disk with the most free space), under the owner lock that keeps recovery from
    /// removing it while its creator lives. The caller makes it `ready`, or removes it.
    pub(super) fn start_volume(
        &self,
        name: &str,
        base: Option<&ImageRow>,
        size: u64,
        disk: Option<&str>,
    ) -> Result<NewVolume> {
        let disk = self.volume_disk(name, disk)?;
        let uuid = uuid::Uuid::new_v4().to_string();
        let created = now();
        // Held until the row is ready: recovery removes a `creating` volume only once its
        // creator is gone.
        let owner = OwnerLock::acquire(&self.state_dir, &volume_token(&uuid))?;
        let mut row = VolumeRow {
            id: 0,
            name: name.to_string(),
            uuid: uuid.clone(),
            disk_id: disk.id,
            image_id: base.map(|i| i.id),
            size,
            state: VolumeState::Creating,
            created,
        };
        row.id = self.store.reserve_volume(&row)?;
        let files = DiskLayout::new(&disk.path).volume_files(&uuid);
        let record = VolumeRecord {
            format: FORMAT_VERSION,
            pool_uuid: self.uuid.clone(),
            name: name.to_string(),
            uuid: uuid.clone(),
            created,
            base: base.map(|i| BaseImageRef {
                name: i.name.clone(),
                uuid: i.uuid.clone(),
                size: i.size,
            }),
        };
        if let Err(e) = write_volume_files(&files, &record, size) {
            let _ = remove_volume_files(&DiskLayout::new(&disk.path), &uuid);
            let _ = self.store.delete_volume(row.id, VolumeState::Creating);
            return Err(e);
        }
        Ok(NewVolume {
            row,
            files,
            _owner: owner,
        })
    }

    fn volume_disk(&self, volume: &str, disk: Option<&str>) -> Result<DiskRow> {
        match disk {
            Some(name) => {
                let disk = self.store.disk_by_name(name)?;
                if disk.state != DiskState::Healthy
                    || self.disk_health(&disk) != super::DiskHealth::Healthy
                {
                    return Err(Error::refused(
                        ErrorKind::Conflict,
                        format!(
                            "disk '{name}' is not in service ({}): pick a healthy disk (`imgpool disk list`)",
                            disk.state
                        ),
                    ));
                }
                Ok(disk)
            }
            // A thin volume takes no space up front: the disk with the most free space.
            None => Ok(self.place(volume, 0, 1, &[])?.remove(0)),
        }
    }

    pub fn volumes(&self) -> Result<Vec<VolumeInfo>> {
        let mut out = Vec::new();
        for volume in self.store.volumes()? {
            if volume.state == VolumeState::Ready {
                out.push(self.volume_info(volume, true)?);
            }
        }
        Ok(out)
    }

    pub fn volume(&self, name: &str) -> Result<VolumeInfo> {
        let row = self.store.volume(name)?;
        self.volume_info(row, false)
    }

    /// `volume`, with the reclaim still to do (`volume show`).
    pub fn volume_with_reclaim(&self, name: &str) -> Result<VolumeInfo> {
        let row = self.store.volume(name)?;
        self.volume_info(row, true)
    }

    fn volume_info(&self, volume: VolumeRow, with_reclaim: bool) -> Result<VolumeInfo> {
        let disk = self
            .store
            .disks()?
            .into_iter()
            .find(|d| d.id == volume.disk_id)
            .ok_or_else(|| {
                Error::refused(ErrorKind::Internal, "a volume's disk is not registered")
            })?;
        let image = match volume.image_id {
            Some(id) => self
                .store
                .images()?
                .into_iter()
                .find(|i| i.id == id)
                .map(|i| i.name),
            None => None,
        };
        let files = DiskLayout::new(&disk.path).volume_files(&volume.uuid);
        let reachable = disk.state != DiskState::Failed;
        let allocated = if reachable {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(files.data())
                .map(|m| m.blocks() * 512)
                .unwrap_or(0)
        } else {
            0
        };
        // Read only: the daemon serving the volume may be writing it.
        let snapshots = if reachable {
            volume::summary(&files).map_or(0, |s| s.snapshots)
        } else {
            0
        };
        let reclaim_bytes =
            (with_reclaim && reachable).then(|| volume::reclaim_pending_bytes(&files).unwrap_or(0));
        let open_by = if reachable {
            locks::exclusive_flock_holder(&files.writer_lock()).unwrap_or(None)
        } else {
            None
        };
        Ok(VolumeInfo {
            open_by,
            disk: disk.name,
            disk_state: disk.state,
            image,
            allocated,
            snapshots,
            reclaim_bytes,
            dir: files.dir().to_path_buf(),
            volume,
        })
    }

    fn open_volume(&self, files: &VolumeFiles) -> io::Result<Volume> {
        Volume::open(files, Box::new(NotRead))
    }

    /// Applies a snapshot request to a volume that no mount has open: here, under its writer
    /// lock, with the space of deleted snapshots reclaimed before it returns. `Err(pid)` when
    /// the process `pid` (a mount daemon) has it open: the request goes to that daemon.
    pub fn snapshot_request(
        &self,
        name: &str,
        request: &requests::Request,
    ) -> Result<std::result::Result<requests::Outcome, u32>> {
        let info = self.volume(name)?;
        let files = VolumeFiles::new(&info.dir);
        if requests::reads_only(request) {
            // A dry run of a deletion says what the deletion would: only a mount daemon that
            // has the volume open knows which of its snapshots are being read.
            let dry_run = matches!(request, requests::Request::Delete { .. });
            if let Some(pid) = info.open_by.filter(|_| dry_run) {
                if self.live_mounts()?.iter().any(|m| m.pid == pid) {
                    return Ok(Err(pid));
                }
            }
            return requests::answer_from_files(&files, name, request).map(Ok);
        }
        let _writer = match self.try_lock_volume(&info.volume, &files)? {
            VolumeLock::Held(writer) => writer,
            VolumeLock::Busy => return Ok(Err(info.open_by.unwrap_or(0))),
            // Replaced since it was looked up: the request goes to the volume now so named,
            // as if typed after the replacement (or finds none).
            VolumeLock::Changed => return self.snapshot_request(name, request),
        };
        // Checked under the lock, which a receive holds while it writes the file.
        if has_partial_receive(&files) {
            return Err(partial_receive_refusal(name));
        }
        let volume = self
            .open_volume(&files)
            .ctx(|| format!("cannot open volume '{name}'"))?;
        let outcome = requests::apply(&volume, name, request).and_then(|outcome| {
            let deleted = matches!(request, requests::Request::Delete { dry_run: false, .. })
                .then_some(outcome.snapshots.len())
                .filter(|&count| count > 0);
            if let Some(count) = deleted {
                tracing::info!(
                    event = "snapshots_deleted",
                    volume = name,
                    count,
                    first = outcome.snapshots[0].name.as_str(),
                    last = outcome.snapshots[count - 1].name.as_str(),
                    "volume '{name}': deleted {count} snapshot(s)"
                );
            }
            let started = std::time::Instant::now();
            while volume
                .reclaim()
                .ctx(|| format!("cannot reclaim the space of volume '{name}'"))?
            {}
            if deleted.is_some() {
                tracing::info!(
                    event = "reclaim_done",
                    volume = name,
                    seconds = started.elapsed().as_secs_f64(),
                    "volume '{name}': the space of its deleted snapshots is reclaimed"
                );
            }
            Ok(outcome)
        });
        // Closed also after a failure: a volume left open would be recovered as after a crash.
        let closed = volume
            .close()
            .ctx(|| format!("cannot close volume '{name}'"));
        let outcome = outcome?;
        closed?;
        Ok(Ok(outcome))
    }

    /// Tries the writer lock of volume `row`, whose files are `files`, looked up by name
    /// earlier. Once it is held, or its lock file cannot be opened, the name is read again: a
    /// receive that replaced the volume held the old one's lock until its files were moved
    /// away (and a removal moves them too), so a command that looked it up before learns here
    /// that it is not the volume so named any more (`Changed`), and never acts on the old
    /// one's files nor fails on them with a bare "no such file".
    pub(crate) fn try_lock_volume(
        &self,
        row: &VolumeRow,
        files: &VolumeFiles,
    ) -> Result<VolumeLock> {
        let locked = match WriterLock::try_acquire(files) {
            Ok(None) => return Ok(VolumeLock::Busy),
            Ok(Some(writer)) => Ok(writer),
            Err(e) => Err(e),
        };
        let still = match self.store.volume(&row.name) {
            Ok(now) => now.id == row.id,
            Err(Error::UnknownVolume(_)) => false,
            Err(e) => return Err(e),
        };
        if !still {
            return Ok(VolumeLock::Changed);
        }
        locked
            .map(VolumeLock::Held)
            .ctx(|| format!("cannot lock volume '{}'", row.name))
    }

    /// The right to change a volume from this process: refused while a mount serves it open.
    /// The volume's writer lock. The kernel tells the mount daemon of a file's last close a
    /// moment after `close` returned, so a holder gets a second to let go before the refusal.
    fn lock_volume(&self, row: &VolumeRow, files: &VolumeFiles) -> Result<WriterLock> {
        let name = row.name.as_str();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            match self.try_lock_volume(row, files)? {
                VolumeLock::Held(writer) => return Ok(writer),
                VolumeLock::Changed => return Err(changed_refusal(name)),
                VolumeLock::Busy => {}
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::refused(
                    ErrorKind::InUse,
                    format!("volume '{name}' is open through a mount, or another command has it (a receive replacing it, say): close it there, or retry once that command is done"),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The ready volumes a mount serves: each with its disk's path, and whether that disk is in
    /// service (a volume on a failed disk answers EIO).
    pub fn volumes_to_serve(&self) -> Result<Vec<(VolumeRow, PathBuf, bool)>> {
        let disks = self.store.disks()?;
        let mut out = Vec::new();
        for volume in self.store.volumes()? {
            if volume.state != VolumeState::Ready {
                continue;
            }
            if let Some(disk) = disks.iter().find(|d| d.id == volume.disk_id) {
                let serving = disk.state != DiskState::Failed
                    && self.disk_health(disk) == super::DiskHealth::Healthy;
                out.push((volume, disk.path.clone(), serving));
            }
        }
        Ok(out)
    }

    /// Checks a new size for a volume, before it is asked of whoever has the volume open.
    pub fn check_volume_size(&self, size: u64) -> Result<()> {
        check_size(size, None)
    }

    /// Records a volume's size as its index has it after a request (a resize, a rollback).
    pub fn record_volume_size(&self, name: &str, size: u64) -> Result<()> {
        let row = self.store.volume(name)?;
        if row.size != size {
            self.store.set_volume_size(row.id, size)?;
        }
        Ok(())
    }

    /// Removes a volume and its data; one with snapshots only with `recursive`.
    pub fn remove_volume(&self, name: &str, recursive: bool) -> Result<()> {
        let row = self.store.volume(name)?;
        // Its files cannot be deleted while its disk is away: refused, with the disk named,
        // rather than failing on the first missing path (its snapshots, read next).
        self.labelled_disk_of(&row)?;
        let info = self.volume_info(row, false)?;
        if info.snapshots > 0 && !recursive {
            return Err(Error::refused(
                ErrorKind::InUse,
                format!(
                    "volume '{name}' has {} snapshots: remove them first, or add --recursive to remove them with it",
                    info.snapshots
                ),
            ));
        }
        let files = VolumeFiles::new(&info.dir);
        // A volume replaced meanwhile is refused, not removed: its check above (snapshots
        // without --recursive) was of the old one, and the user never saw the new one.
        let _writer = self.lock_volume(&info.volume, &files)?;
        if has_partial_receive(&files) {
            return Err(partial_receive_refusal(name));
        }
        if !self.store.set_volume_state(
            info.volume.id,
            VolumeState::Ready,
            VolumeState::Removing,
        )? {
            return Err(Error::UnknownVolume(name.to_string()));
        }
        self.finish_volume_removal(&info.volume)
    }

    /// Deletes a `removing` volume's files, then its row (any command may finish a removal).
    /// Only on its disk carrying its label: on a disk that is missing (or has another
    /// filesystem at its path) no file is found, which is not "deleted", so the row stays
    /// `removing` and the next recovery tries again (at the next start, and in every repair
    /// round of a mount). A disk the pool forgot (`disk rm`) takes the row with it.
    pub(crate) fn finish_volume_removal(&self, volume: &VolumeRow) -> Result<()> {
        if let Some(disk) = self.labelled_disk_of(volume)? {
            remove_volume_files(&DiskLayout::new(&disk.path), &volume.uuid)?;
        }
        crash_point::reached(CrashPoint::RemovalDeleted);
        self.store.delete_volume(volume.id, VolumeState::Removing)?;
        Ok(())
    }

    /// The disk holding `volume`'s files, if the pool still has it (`None` once forgotten),
    /// refused unless the disk at its path carries its label.
    pub(super) fn labelled_disk_of(&self, volume: &VolumeRow) -> Result<Option<DiskRow>> {
        let Some(disk) = self
            .store
            .disks()?
            .into_iter()
            .find(|d| d.id == volume.disk_id)
        else {
            return Ok(None);
        };
        match self.disk_health(&disk).problem() {
            None => Ok(Some(disk)),
            Some(problem) => Err(Error::refused(
                ErrorKind::Conflict,
                format!(
                    "volume '{}' is on disk '{}', which is not reachable ({problem}): mount the disk's filesystem at {} and run again",
                    volume.name,
                    disk.name,
                    disk.path.display()
                ),
            )),
        }
    }

    /// Deletes the directories of removed volumes that no row accounts for: a removal whose
    /// row went without its moved files (a store rebuilt by `fsck --repair`, a creation that
    /// failed and could not delete them). Those of a `removing` row are that removal's to
    /// finish. One line for each.
    pub(crate) fn remove_unlisted_removed_volumes(&self) -> Result<Vec<String>> {
        let mut done = Vec::new();
        for disk in self.store.disks()? {
            let layout = DiskLayout::new(&disk.path);
            let Ok(uuids) = layout.removed_volume_uuids() else {
                continue;
            };
            for uuid in uuids {
                // Read after the directory was seen: a row that still had it was deleted only
                // once its files were gone, so none can come back for it.
                if self.store.volumes()?.iter().any(|v| v.uuid == uuid) {
                    continue;
                }
                match delete_removed_volume(&layout.removed_volume_dir(&uuid)) {
                    Ok(Deleted::ByUs) => done.push(format!(
                        "deleted the files of a removed volume ({uuid}) on disk '{}'",
                        disk.name
                    )),
                    // Another process finishing the same removal deleted them.
                    Ok(Deleted::Already) => {}
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
        Ok(done)
    }
}

fn write_volume_files(files: &VolumeFiles, record: &VolumeRecord, size: u64) -> Result<()> {
    let dir = files.dir();
    fs::create_dir_all(dir).ctx(|| format!("cannot create {}", dir.display()))?;
    Volume::create(files, size, Box::new(NotRead))
        .and_then(|v| v.close())
        .ctx(|| format!("cannot create the volume's files in {}", dir.display()))?;
    write_volume_record(files, record)?;
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// Removes volume `uuid`'s directory from the disk of `layout`: first moved out of `volumes/`
/// into `removed-volumes/` (one rename, made durable), then deleted there. Once moved, no path
/// a command knows leads to its files: a command still trying the volume's writer lock (which
/// creates the lock file) or its index finds no directory, instead of making files in the
/// dying one that keep it from being deleted. Missing files are fine: a removal may be
/// finished twice (a recovery beside the remover), or after a crash between the move and the
/// deletion.
pub(super) fn remove_volume_files(layout: &DiskLayout, uuid: &str) -> Result<()> {
    let files = layout.volume_files(uuid);
    let dir = files.dir();
    let removed = layout.removed_volume_dir(uuid);
    let removed_parent = removed.parent().expect("in removed-volumes/");
    // Made only inside the disk's pool directory, never with it: a disk path without it is
    // not the disk (unmounted), and nothing is created on what lies under it.
    match fs::create_dir(removed_parent) {
        Ok(()) => fsync_dir(removed_parent.parent().expect("in the pool directory"))?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::io(
                format!("cannot create {}", removed_parent.display()),
                e,
            ))
        }
    }
    match fs::rename(dir, &removed) {
        Ok(()) => {
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
            fsync_dir(removed_parent)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::io(
                format!("cannot move {} to {}", dir.display(), removed.display()),
                e,
            ))
        }
    }
    crash_point::reached(CrashPoint::RemovalMoved);
    delete_removed_volume(&removed).map(|_| ())
}

/// Who deleted a removed volume's directory.
#[derive(Debug)]
enum Deleted {
    ByUs,
    /// It was gone when we looked, or went while we deleted it: another process finishing the
    /// same removal.
    Already,
}

/// Deletes a removed volume's moved directory (`remove_volume_files`); missing is fine.
fn delete_removed_volume(removed: &std::path::Path) -> Result<Deleted> {
    // A command that found the directory at its old path an instant before the move may still
    // create its lock file in it after the move: the deletion then meets a directory that is
    // not empty, and goes again. Nothing else can reach it.
    let mut attempts = 0;
    loop {
        match fs::remove_dir_all(removed) {
            Ok(()) => break,
            Err(e) => {
                // Gone only when a look says so: a look that fails otherwise (EIO, EACCES) is
                // not "gone", and the removal fails, keeping its row.
                let gone = matches!(fs::symlink_metadata(removed),
                    Err(look) if look.kind() == io::ErrorKind::NotFound);
                if gone {
                    return Ok(Deleted::Already);
                }
                // Another process finishing the same removal deleted part of it meanwhile
                // (NotFound), or a lock file came.
                let retry = matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                );
                if !retry || attempts >= 10 {
                    return Err(Error::io(format!("cannot delete {}", removed.display()), e));
                }
                attempts += 1;
            }
        }
    }
    if let Some(parent) = removed.parent() {
        fsync_dir(parent)?;
    }
    Ok(Deleted::ByUs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deletion whose look at the directory fails otherwise than "not found" (here ELOOP;
    /// EIO and EACCES alike) is a failure, not a removal done.
    #[test]
    fn a_removed_volume_that_cannot_be_looked_at_is_not_taken_for_gone() {
        let dir = tempfile::tempdir().unwrap();
        let looping = dir.path().join("loop");
        std::os::unix::fs::symlink(&looping, &looping).unwrap();
        let e = delete_removed_volume(&looping.join("uuid")).unwrap_err();
        assert!(e.to_string().contains("cannot delete"), "{e}");
    }

    #[test]
    fn a_removed_volume_already_gone_is_not_said_to_be_deleted_by_us() {
        let dir = tempfile::tempdir().unwrap();
        let removed = dir.path().join("uuid");
        assert!(matches!(
            delete_removed_volume(&removed).unwrap(),
            Deleted::Already
        ));
        fs::create_dir(&removed).unwrap();
        fs::write(removed.join("index"), b"x").unwrap();
        assert!(matches!(
            delete_removed_volume(&removed).unwrap(),
            Deleted::ByUs
        ));
        assert!(!removed.exists());
    }
}
