//! Disks: registering them, their health as the label check sees it, taking them out of service
//! and back, eviction and removal, and choosing disks for new copies.

use std::fs;
use std::path::Path;

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
        self.store.insert_disk(name, &path, &disk_uuid, now())
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
    /// the repair re-creates them elsewhere; it stays out until `disk online`.
    pub fn fail_disk(&self, name: &str, reason: Option<&str>) -> Result<DiskRow> {
        let disk = self.store.disk_by_name(name)?;
        let reason = reason.unwrap_or("marked failed by the operator");
        self.store.set_disk_state(
            disk.id,
            DiskState::Failed,
            Some(FailedBy::Operator),
            Some(reason),
            now(),
        )?;
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
        Ok(self
            .store
            .all_copies()?
            .iter()
            .filter(|c| c.disk.id == disk.id && c.state == CopyState::Unverified)
            .count())
    }

    /// `disk evict`: the disk keeps serving while the repair moves each of its copies to other
    /// disks; once it holds none, `disk rm` forgets it. Returns how many copies must move.
    pub fn evict_disk(&self, name: &str) -> Result<usize> {
        let disk = self.store.disk_by_name(name)?;
        if disk.state == DiskState::Failed {
            return Err(Error::refused(ErrorKind::Conflict, format!(
                "disk '{name}' is failed: its copies are re-created from other disks already; `imgpool disk rm {name}` once `imgpool status` shows no image needing it"
            )));
        }
        self.change_checked_state(&disk, DiskState::Evicting)?;
        Ok(self
            .store
            .all_copies()?
            .iter()
            .filter(|c| c.disk.id == disk.id)
            .count())
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
