//! Disks: registering them, their health as the label check sees it, taking them out of service
//! and back, eviction and removal, and choosing disks for new copies.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::core::owner::WorkLock;
use crate::core::placement::{self, Candidate};
use crate::core::resources::{self, Freshness, Resources};
use crate::core::store::{CopyState, DiskRow, DiskState, FailedBy, ImageState};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::clock::now;
use crate::format::layout::{DiskLayout, Label};
use crate::format::names;

/// Whether a registered disk is the disk it was registered as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskHealth {
    Healthy,
    /// The path is gone or unreadable (filesystem not mounted, disk dead).
    Missing(String),
    /// Another filesystem, or another pool's disk, is mounted at the path.
    WrongLabel(String),
}

impl DiskHealth {
    pub fn state(&self) -> &'static str {
        match self {
            DiskHealth::Healthy => "healthy",
            DiskHealth::Missing(_) => "missing",
            DiskHealth::WrongLabel(_) => "wrong-label",
        }
    }

    pub fn problem(&self) -> Option<&str> {
        match self {
            DiskHealth::Healthy => None,
            DiskHealth::Missing(why) | DiskHealth::WrongLabel(why) => Some(why),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DiskStatus {
    pub disk: DiskRow,
    pub health: DiskHealth,
    pub resources: Option<Resources>,
    pub images: u64,
    /// Its filesystem is mounted read-only now: it serves its copies, takes no new ones.
    pub read_only: bool,
}

impl DiskStatus {
    /// The state to show: the pool's decision (failed) first, then what the label check sees
    /// right now (missing, wrong-label), then a read-only filesystem, else the pool's state
    /// (healthy, evicting).
    pub fn state(&self) -> &'static str {
        match (self.disk.state, &self.health) {
            (DiskState::Failed, _) => "failed",
            (_, DiskHealth::Missing(_) | DiskHealth::WrongLabel(_)) => self.health.state(),
            (_, DiskHealth::Healthy) if self.read_only => "read-only",
            (state, DiskHealth::Healthy) => state.as_str(),
        }
    }

    /// Why the disk is not healthy, and what to do, in one line.
    pub fn problem(&self) -> Option<String> {
        if self.disk.state == DiskState::Failed {
            let why = self.disk.reason.as_deref().unwrap_or("no reason recorded");
            return Some(match self.disk.failed_by {
                Some(FailedBy::Operator) => format!(
                    "failed by the operator ({why}); `imgpool disk online {}` returns it to service, `imgpool disk rm {}` forgets it",
                    self.disk.name, self.disk.name
                ),
                _ => format!(
                    "failed: {why}; it returns to service by itself once its probes pass (its copies are verified first), or replace it and `imgpool disk rm {}`",
                    self.disk.name
                ),
            });
        }
        if let Some(problem) = self.health.problem() {
            return Some(problem.to_string());
        }
        if self.read_only {
            return Some(format!(
                "its filesystem is mounted read-only (ext4 does that after an error: see `dmesg`); it serves its copies, each chunk checked, but takes no new ones: check the filesystem, then `mount -o remount,rw {}`",
                self.disk.path.display()
            ));
        }
        (self.disk.state == DiskState::Evicting).then(|| {
            format!(
                "evicting: its copies move to other disks (`imgpool repair` does it now); `imgpool disk rm {}` once it holds none",
                self.disk.name
            )
        })
    }

    /// Whether the disk has no room left for any copy: its free space is within the reserve
    /// that placement leaves on every disk. It still serves; it only takes no new copies.
    pub fn is_full(&self) -> bool {
        self.resources
            .as_ref()
            .is_some_and(|r| r.free <= placement::reserve(r.capacity))
    }

    /// For a full disk, what that means and what to do, in one line.
    pub fn full_note(&self) -> Option<String> {
        let r = self.resources.as_ref().filter(|_| self.is_full())?;
        Some(format!(
            "full: {} free of {}: it takes no new copies (imports and repairs go to other disks); free space on it, or add a disk with `imgpool disk add`",
            crate::format::units::bytes(r.free),
            crate::format::units::bytes(r.capacity)
        ))
    }
}

impl Pool {
    pub fn add_disk(&self, name: &str, path: &Path) -> Result<DiskRow> {
        names::check_disk_name(name)?;
        let path =
            fs::canonicalize(path).ctx(|| format!("cannot use {} as a disk", path.display()))?;
        if !path.is_dir() {
            return Err(Error::NotADirectory(path));
        }
        // Checked before anything is written to the directory: a registered disk whose
        // filesystem is not mounted must not get a label on the empty mount point.
        for disk in self.store.disks()? {
            if disk.path == path {
                return Err(Error::DiskPathRegistered {
                    path,
                    disk: disk.name,
                });
            }
            if disk.name == name {
                return Err(Error::DiskExists(name.to_string()));
            }
        }
        // One `disk add` at a time: the checks below read the registered disks, and two adds of
        // nested (or equal) paths at once would each pass them and both label their directory.
        let _adding = WorkLock::acquire(&self.state_dir.join("disks.lock"))?;
        if let Some(conflict) = self.nesting(&path, true)? {
            return Err(Error::refused(
                ErrorKind::InvalidInput,
                format!(
                    "{} cannot be a disk: it {conflict}; give each disk a directory tree of its own (normally the mount point of its own filesystem), apart from the other disks and the state directory: copies on nested disks share one tree, so their redundancy would be an illusion",
                    path.display()
                ),
            ));
        }
        let layout = DiskLayout::new(&path);
        let disk_uuid = match layout.read_label()? {
            Some(label) if label.pool_uuid != self.uuid => {
                return Err(Error::ForeignLabel {
                    path,
                    pool: label.pool_uuid,
                })
            }
            Some(label) => {
                if let Some(d) = self
                    .store
                    .disks()?
                    .into_iter()
                    .find(|d| d.uuid == label.disk_uuid)
                {
                    return Err(Error::DiskPathRegistered { path, disk: d.name });
                }
                // This pool's label on an unregistered directory: an earlier `disk add` died
                // between labelling and registering. Adopt the disk.
                label.disk_uuid
            }
            None => uuid::Uuid::new_v4().to_string(),
        };
        layout.create_dirs()?;
        layout.write_label(&Label {
            pool_uuid: self.uuid.clone(),
            disk_uuid: disk_uuid.clone(),
            disk_name: name.to_string(),
            created: now(),
        })?;
        let row = self.store.insert_disk(name, &path, &disk_uuid, now())?;
        tracing::info!(
            event = "disk_added",
            disk = name,
            path = &*path.to_string_lossy(),
            "disk '{name}' added at {}",
            path.display()
        );
        Ok(row)
    }

    /// Refuses a mount point inside, or around, a disk or the state directory: the mount would
    /// hide what the pool keeps there (a disk's label, its copies, the store).
    pub fn check_mount_point(&self, mountpoint: &Path) -> Result<()> {
        match self.nesting(mountpoint, false)? {
            None => Ok(()),
            Some(conflict) => Err(Error::refused(
                ErrorKind::InvalidInput,
                format!(
                    "cannot mount at {}: it {conflict}, which the mount would hide; mount the pool outside every disk and the state directory, e.g. at /run/imgpool",
                    mountpoint.display()
                ),
            )),
        }
    }

    /// How `path` nests with what the pool keeps (the state directory, every registered disk
    /// and, for a new disk, every live mount of the pool), as a phrase: "is inside disk 'd1'
    /// (/mnt/d1)". `None` when it is apart from all of them. Paths are compared canonical, and
    /// also by directory identity (device and inode), so that a symlink or a bind mount that
    /// reaches a disk by another path is recognised.
    fn nesting(&self, path: &Path, with_mounts: bool) -> Result<Option<String>> {
        let mut kept = vec![("the state directory".to_string(), self.state_dir.clone())];
        for disk in self.store.disks()? {
            kept.push((format!("disk '{}'", disk.name), disk.path));
        }
        if with_mounts {
            for mount in self.live_mounts()? {
                kept.push(("the pool's mount".to_string(), mount.mountpoint));
            }
        }
        let path = canonical(path);
        Ok(kept.into_iter().find_map(|(what, other)| {
            let other = canonical(&other);
            let relation = if path == other || same_directory(&path, &other) {
                "is"
            } else if lies_under(&path, &other) {
                "is inside"
            } else if lies_under(&other, &path) {
                "contains"
            } else {
                return None;
            };
            Some(format!("{relation} {what} ({})", other.display()))
        }))
    }

    /// Checks that the disk at its path is the one registered.
    pub fn disk_health(&self, disk: &DiskRow) -> DiskHealth {
        check_label(&self.uuid, disk)
    }

    /// Every disk with its health, resources and image count, for listings: only reads.
    pub fn disk_status(&self) -> Result<Vec<DiskStatus>> {
        let counts = self.store.copies_per_disk()?;
        let mut out = Vec::new();
        for disk in self.store.disks()? {
            let health = self.disk_health(&disk);
            let resources = match health {
                DiskHealth::Missing(_) => None,
                _ => resources::disk_resources(
                    &self.store,
                    &disk,
                    Freshness::ListingWithin(resources::LISTING_FREE_TTL),
                    now(),
                )
                .ok(),
            };
            let images = counts
                .iter()
                .find(|(id, _)| *id == disk.id)
                .map_or(0, |(_, n)| *n);
            let read_only = health == DiskHealth::Healthy && resources::read_only(&disk.path);
            out.push(DiskStatus {
                disk,
                health,
                resources,
                images,
                read_only,
            });
        }
        Ok(out)
    }

    /// `disk fail`: takes a disk out of service by hand. Its copies stop serving at once and
    /// the repair re-creates them elsewhere; it stays out until `disk online`. Refused, unless
    /// `force`, while the disk holds an image's last serving copy: its reads would fail.
    pub fn fail_disk(&self, name: &str, reason: Option<&str>, force: bool) -> Result<DiskRow> {
        let disk = self.store.disk_by_name(name)?;
        let reason = reason.unwrap_or("marked failed by the operator");
        let last = self.store.fail_disk_unless_last(
            disk.id,
            reason,
            now(),
            &self.unreachable_disks()?,
            force,
        )?;
        if !last.is_empty() && !force {
            return Err(Error::refused(
                ErrorKind::Conflict,
                format!(
                    "disk '{name}' holds the last serving copy of {}: failing it makes their reads fail (EIO) until it returns; `imgpool disk evict {name}` moves images off first (a volume has its one copy there), or pass --force to fail it anyway",
                    last.join(", ")
                ),
            ));
        }
        tracing::info!(
            event = "disk_failed",
            disk = name,
            reason,
            by = "operator",
            "disk '{name}' taken out of service by hand: {reason}"
        );
        self.store.disk_by_name(name)
    }

    /// `disk online`: returns a failed or evicting disk to service. Its copies are verified
    /// before they serve again. Returns how many copies wait for verification.
    pub fn online_disk(&self, name: &str) -> Result<usize> {
        let disk = self.store.disk_by_name(name)?;
        if disk.state == DiskState::Healthy {
            return Err(Error::refused(
                ErrorKind::Conflict,
                format!("disk '{name}' is already in service"),
            ));
        }
        if let Some(problem) = self.disk_health(&disk).problem() {
            return Err(Error::refused(
                ErrorKind::Conflict,
                format!("disk '{name}' cannot return to service: {problem}"),
            ));
        }
        self.change_checked_state(&disk, DiskState::Healthy)?;
        tracing::info!(
            event = "disk_back",
            disk = name,
            by = "operator",
            "disk '{name}' returned to service by hand; its copies are verified before they serve"
        );
        Ok(self
            .store
            .all_copies()?
            .iter()
            .filter(|c| c.disk.id == disk.id && c.state == CopyState::Unverified)
            .count())
    }

    /// `disk evict`: the disk keeps serving while the repair moves each of its copies to other
    /// disks; once it holds none, `disk rm` forgets it. Returns how many copies must move.
    /// Refused, unless `force`, while it holds an image's last serving copy that no other disk
    /// can take now: the eviction could not finish, and the image would count as degraded.
    pub fn evict_disk(&self, name: &str, force: bool) -> Result<usize> {
        let disk = self.store.disk_by_name(name)?;
        if disk.state == DiskState::Failed {
            return Err(Error::refused(ErrorKind::Conflict, format!(
                "disk '{name}' is failed: its copies are re-created from other disks already; `imgpool disk rm {name}` once `imgpool status` shows no image needing it"
            )));
        }
        if !force {
            let stuck = self.copies_with_nowhere_to_go(&disk)?;
            if !stuck.is_empty() {
                return Err(Error::refused(
                    ErrorKind::Conflict,
                    format!(
                        "disk '{name}' holds the last serving copy of {}, and no other disk can take it now ({}): add a disk with room first, or pass --force to mark it evicting anyway",
                        stuck.iter().map(|(image, _)| image.as_str()).collect::<Vec<_>>().join(", "),
                        stuck[0].1
                    ),
                ));
            }
        }
        self.change_checked_state(&disk, DiskState::Evicting)?;
        tracing::info!(
            event = "disk_evicting",
            disk = name,
            "disk '{name}' is evicting: the repair moves its copies to other disks"
        );
        Ok(self
            .store
            .all_copies()?
            .iter()
            .filter(|c| c.disk.id == disk.id)
            .count())
    }

    /// The images whose last serving copy is on `disk` and that placement finds no other disk
    /// for now, each with the reason.
    fn copies_with_nowhere_to_go(&self, disk: &DiskRow) -> Result<Vec<(String, String)>> {
        let mut stuck = Vec::new();
        let copies = self.store.all_copies()?;
        for name in self
            .store
            .last_serving_copies_on(disk.id, &self.unreachable_disks()?)?
        {
            let Some(image) = self.store.image_by_name(&name)? else {
                continue;
            };
            let holding: Vec<i64> = copies
                .iter()
                .filter(|c| c.image_id == image.id)
                .map(|c| c.disk.id)
                .collect();
            match self.place(&name, image.real_size, 1, &holding) {
                Ok(_) => {}
                Err(Error::NoSpace { detail, .. }) => stuck.push((name, detail)),
                Err(Error::NoDisks) => stuck.push((name, "the pool has no other disk".into())),
                Err(e) => return Err(e),
            }
        }
        Ok(stuck)
    }

    /// Changes a disk's state only from the state `disk` was read in: a probe or another command
    /// that changed it meanwhile wins, and the operator is told.
    fn change_checked_state(&self, disk: &DiskRow, to: DiskState) -> Result<()> {
        let expected = Some((disk.state, disk.failed_by));
        if self
            .store
            .set_disk_state_if(disk.id, expected, to, None, None, now())?
        {
            Ok(())
        } else {
            Err(Error::refused(
                ErrorKind::Busy,
                format!(
                    "disk '{}' changed state while this command ran (a probe, or another command): `imgpool disk list` shows it now; run the command again if it still applies",
                    disk.name
                ),
            ))
        }
    }

    /// `disk rm`: forgets a disk, deleting the copies it still holds when it is reachable.
    /// Refused while any of those copies is the last good one of its image.
    pub fn remove_disk(&self, name: &str) -> Result<()> {
        // No repair may copy to or from the disk meanwhile.
        let _repair = WorkLock::acquire(&self.repair_lock_path())?;
        let disk = self.store.disk_by_name(name)?;
        let volumes = self.store.volumes_on_disk(disk.id)?;
        if !volumes.is_empty() {
            return Err(Error::refused(
                ErrorKind::InUse,
                format!(
                    "disk '{name}' keeps {}, whose only copy is there: remove them first (`imgpool volume rm`)",
                    volumes.join(", ")
                ),
            ));
        }
        let copies = self.store.all_copies()?;
        let images = self.store.images()?;
        let disks = self.disks_in_service()?;
        let mut only_copy = Vec::new();
        for copy in copies.iter().filter(|c| c.disk.id == disk.id) {
            let Some(image) = images.iter().find(|i| i.id == copy.image_id) else {
                continue;
            };
            if image.state == ImageState::Importing || copy.state == CopyState::Copying {
                return Err(Error::CopyBeingWritten {
                    disk: name.to_string(),
                    image: image.name.clone(),
                });
            }
            let elsewhere = copies.iter().any(|other| {
                other.image_id == image.id
                    && other.disk.id != disk.id
                    && copy_info(image, other.clone(), &disks).good
            });
            if image.state == ImageState::Ready && !elsewhere {
                only_copy.push(image.name.clone());
            }
        }
        if !only_copy.is_empty() {
            return Err(Error::OnlyGoodCopy {
                disk: name.to_string(),
                images: only_copy,
            });
        }
        // Checked again, and marked, in one transaction: a copy elsewhere may have failed since
        // the listing above. Marked first: a removal cut short is finished by recovery.
        self.store
            .forget_disk_copies(&disk, now(), &self.unreachable_disks()?)?;
        let layout = DiskLayout::new(&disk.path);
        let reachable = self.disk_health(&disk) == DiskHealth::Healthy;
        if reachable {
            for copy in copies.iter().filter(|c| c.disk.id == disk.id) {
                if let Some(image) = images.iter().find(|i| i.id == copy.image_id) {
                    layout.remove_copy(&image.uuid)?;
                }
            }
        }
        self.store.delete_disk(disk.id)?;
        if reachable {
            // The directory is no longer this pool's: a later `disk add` starts afresh.
            let _ = fs::remove_file(layout.label_path());
        }
        tracing::info!(event = "disk_removed", disk = name, "disk '{name}' removed");
        Ok(())
    }

    /// Chooses the disks for `copies` copies of `needed` bytes of data, from fresh free space,
    /// among the healthy, writable disks not in `exclude`.
    pub fn place(
        &self,
        name: &str,
        needed: u64,
        copies: u32,
        exclude: &[i64],
    ) -> Result<Vec<DiskRow>> {
        let disks = self.store.disks()?;
        if disks.is_empty() {
            return Err(Error::NoDisks);
        }
        let mut candidates = Vec::new();
        let mut read_only = Vec::new();
        for disk in &disks {
            if exclude.contains(&disk.id)
                || disk.state != DiskState::Healthy
                || self.disk_health(disk) != DiskHealth::Healthy
            {
                continue;
            }
            if resources::read_only(&disk.path) {
                read_only.push(format!("'{}'", disk.name));
                continue;
            }
            if let Ok(r) = resources::disk_resources(&self.store, disk, Freshness::FreshFree, now())
            {
                candidates.push(Candidate {
                    disk_id: disk.id,
                    name: disk.name.clone(),
                    device: r.device,
                    capacity: r.capacity,
                    free: r.free,
                });
            }
        }
        let chosen = placement::choose(&candidates, needed, copies).map_err(|detail| {
            let detail = if read_only.is_empty() {
                detail
            } else {
                format!(
                    "{detail} (read-only, taking no new copy: {})",
                    read_only.join(", ")
                )
            };
            Error::NoSpace {
                image: name.to_string(),
                needed,
                copies,
                detail,
            }
        })?;
        Ok(chosen
            .into_iter()
            .map(|id| disks.iter().find(|d| d.id == id).cloned().unwrap())
            .collect())
    }

    /// Which disks may serve reads now: not failed, and carrying their label. Evicting disks
    /// serve until their copies have moved.
    pub fn disks_in_service(&self) -> Result<Vec<(DiskRow, bool)>> {
        Ok(self
            .store
            .disks()?
            .into_iter()
            .map(|d| {
                let serving =
                    d.state != DiskState::Failed && self.disk_health(&d) == DiskHealth::Healthy;
                (d, serving)
            })
            .collect())
    }
}

pub fn check_label(pool_uuid: &str, disk: &DiskRow) -> DiskHealth {
    let layout = DiskLayout::new(&disk.path);
    match layout.read_label() {
        Ok(Some(label)) if label.pool_uuid != pool_uuid => DiskHealth::WrongLabel(format!(
            "{} carries the label of another pool ({})",
            disk.path.display(),
            label.pool_uuid
        )),
        Ok(Some(label)) if label.disk_uuid != disk.uuid => DiskHealth::WrongLabel(format!(
            "{} carries the label of another disk of this pool ({}); mount the right filesystem there",
            disk.path.display(),
            label.disk_uuid
        )),
        Ok(Some(_)) => DiskHealth::Healthy,
        Ok(None) if disk.path.is_dir() => DiskHealth::WrongLabel(format!(
            "{} carries no imgpool label: is the disk's filesystem mounted there?",
            disk.path.display()
        )),
        Ok(None) => DiskHealth::Missing(format!("{} does not exist", disk.path.display())),
        Err(e) => DiskHealth::Missing(e.to_string()),
    }
}

/// `path` with symlinks resolved where it exists (a missing disk keeps its registered path).
fn canonical(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The device and inode of an existing directory: its identity, whatever path reaches it.
fn identity(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn same_directory(a: &Path, b: &Path) -> bool {
    identity(a).is_some_and(|a| Some(a) == identity(b))
}

/// Whether `inner` lies strictly under `outer`: by its path, or because one of its ancestors is
/// `outer`'s directory reached by another path.
fn lies_under(inner: &Path, outer: &Path) -> bool {
    if inner != outer && inner.starts_with(outer) {
        return true;
    }
    let Some(outer) = identity(outer) else {
        return false;
    };
    inner
        .ancestors()
        .skip(1)
        .any(|ancestor| identity(ancestor) == Some(outer))
}
