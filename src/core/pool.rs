//! The pool core: disks, images, copies, holders and garbage collection, over the metadata store
//! and the disks' own files. The CLI and the mount daemon both drive the pool through this API;
//! tests drive it directly.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::core::copies::{CopyView, Event, Outcome};
use crate::core::owner::{self, OwnerLock, WorkLock};
use crate::core::placement::{self, Candidate};
use crate::core::resources::{self, Freshness, Resources};
use crate::core::settings::Settings;
use crate::core::store::{
    CopyRow, CopyState, DiskRow, DiskState, FailedBy, HolderRow, ImageRow, ImageState, MountRow,
    Store,
};
use crate::error::{CopyError, Error, ErrorKind, IoContext, Result};
use crate::format::clock::now;
use crate::format::digests::CHUNK_SIZE;
use crate::format::layout::{CopyRecord, DiskLayout, Label};
use crate::format::names;
use crate::format::sparse::{self, CopyOutcome};

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
}

impl DiskStatus {
    /// The state to show: the pool's decision (failed, evicting) first, then what the label
    /// check sees right now (missing, wrong-label), else healthy.
    pub fn state(&self) -> &'static str {
        match (self.disk.state, &self.health) {
            (DiskState::Failed, _) => "failed",
            (_, DiskHealth::Missing(_) | DiskHealth::WrongLabel(_)) => self.health.state(),
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
        (self.disk.state == DiskState::Evicting).then(|| {
            format!(
                "evicting: its copies move to other disks (`imgpool repair` does it now); `imgpool disk rm {}` once it holds none",
                self.disk.name
            )
        })
    }
}

#[derive(Debug, Clone)]
pub struct CopyInfo {
    pub disk: String,
    pub path: PathBuf,
    pub state: CopyState,
    pub reason: Option<String>,
    /// The rules of `core::copies::CopyView`, for this copy now: whether it serves reads, is
    /// good (a source, and what keeps an image's last-good-copy guarantee), and counts toward
    /// the image's copy policy.
    pub serving: bool,
    pub good: bool,
    pub counts: bool,
}

#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub image: ImageRow,
    pub copies: Vec<CopyInfo>,
    pub holders: Vec<String>,
    pub open_handles: u64,
}

/// An image's health as listings show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageHealth {
    /// Its copies that count meet its policy.
    Ready,
    /// Some copy serves, but fewer count than its policy wants.
    Degraded,
    /// No copy serves: its reads return EIO.
    Failed,
}

impl ImageHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageHealth::Ready => "ready",
            ImageHealth::Degraded => "degraded",
            ImageHealth::Failed => "failed",
        }
    }
}

impl std::fmt::Display for ImageHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ImageInfo {
    pub fn state(&self) -> ImageHealth {
        let counting = self.copies.iter().filter(|c| c.counts).count() as u32;
        if !self.copies.iter().any(|c| c.serving) {
            ImageHealth::Failed
        } else if counting < self.image.copies_wanted {
            ImageHealth::Degraded
        } else {
            ImageHealth::Ready
        }
    }

    /// Copies that count toward the policy.
    pub fn healthy_copies(&self) -> usize {
        self.copies.iter().filter(|c| c.counts).count()
    }

    /// For an image that is not ready: what happened and what to do, in one line.
    pub fn problem(&self) -> Option<String> {
        let state = self.state();
        if state == ImageHealth::Ready {
            return None;
        }
        if let Some(problem) = &self.image.problem {
            return Some(problem.clone());
        }
        let name = &self.image.name;
        Some(match state {
            ImageHealth::Failed => format!(
                "no healthy copy of '{name}': reads return EIO; bring back a disk that held one (it is verified first) and run `imgpool repair`, or re-import the image"
            ),
            _ => format!(
                "'{name}' has {} of {} healthy copies; the mount daemon restores them, or run `imgpool repair`",
                self.healthy_copies(),
                self.image.copies_wanted
            ),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Imported {
    pub name: String,
    pub uuid: String,
    pub size: u64,
    pub sha512: String,
    pub disks: Vec<String>,
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
        if !state_dir.join(crate::core::store::DB_FILE).exists() {
            return Err(Error::NoPool(state_dir.to_path_buf()));
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

    pub fn store(&self) -> &Store {
        &self.store
    }

    // ---- disks ----

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
            out.push(DiskStatus {
                disk,
                health,
                resources,
                images,
            });
        }
        Ok(out)
    }

    pub fn settings(&self) -> Result<Settings> {
        Settings::load(&self.store)
    }

    /// The lock the one running repair holds; copies being written belong to it.
    pub fn repair_lock_path(&self) -> PathBuf {
        self.state_dir.join("repair.lock")
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
        self.store
            .set_disk_state(disk.id, DiskState::Healthy, None, None, now())?;
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
        self.store
            .set_disk_state(disk.id, DiskState::Evicting, None, None, now())?;
        Ok(self
            .store
            .all_copies()?
            .iter()
            .filter(|c| c.disk.id == disk.id)
            .count())
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
        let layout = DiskLayout::new(&disk.path);
        let reachable = self.disk_health(&disk) == DiskHealth::Healthy;
        for copy in copies.iter().filter(|c| c.disk.id == disk.id) {
            if let Some(image) = images.iter().find(|i| i.id == copy.image_id) {
                // Marked first: a removal cut short is finished by recovery.
                self.copy_event(image.id, disk.id, Event::Forget)?;
                if reachable {
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

    // ---- images ----

    /// Imports the raw image `file` as `name`, stored on `copies` distinct disks (the pool's
    /// default when `None`).
    pub fn add_image(
        &self,
        name: &str,
        file: &Path,
        copies: Option<u32>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Imported> {
        names::check_image_name(name)?;
        let copies = match copies {
            Some(n) => n,
            None => self.settings()?.copies,
        };
        if copies == 0 {
            return Err(Error::ZeroCopies);
        }
        let (source, size) = open_source(file)?;
        let needed: u64 = sparse::data_extents(&source, size)
            .ctx(|| format!("cannot read {}", file.display()))?
            .iter()
            .map(|(start, end)| end - start)
            .sum();
        let targets = self.place(name, needed, copies, &[])?;

        let uuid = uuid::Uuid::new_v4().to_string();
        let lock = OwnerLock::acquire(&self.state_dir, &import_token(&uuid))?;
        let created = now();
        let row = ImageRow {
            id: 0,
            name: name.to_string(),
            uuid: uuid.clone(),
            size,
            sha512: String::new(),
            real_size: 0,
            state: ImageState::Importing,
            copies_wanted: copies,
            source: fs::canonicalize(file)
                .ok()
                .map(|p| p.to_string_lossy().into_owned()),
            created,
            unreferenced_since: Some(created),
            chunk_size: CHUNK_SIZE,
            digests_hash: String::new(),
            problem: None,
        };
        let disk_ids: Vec<i64> = targets.iter().map(|d| d.id).collect();
        let id = match self.store.reserve_image(&row, &disk_ids) {
            Ok(id) => id,
            Err(e) => {
                lock.release();
                return Err(e);
            }
        };

        let written = (|| -> Result<(CopyOutcome, u64)> {
            let first = &targets[0];
            let mut report = |done, _| {
                progress(done, size);
                Ok(())
            };
            let outcome = write_copy(
                first,
                &self.record_of(&row),
                &source,
                file,
                None,
                &mut report,
            )
            .map_err(|e| self.write_error(name, first, needed, copies, e))?;
            let first_copy = DiskLayout::new(&first.path).copy_path(&uuid);
            let real_size = fs::metadata(&first_copy)
                .ctx(|| format!("cannot stat {}", first_copy.display()))?
                .blocks()
                * 512;
            let verified = ImageRow {
                sha512: outcome.sha512.clone(),
                digests_hash: outcome.chunks.list_hash(),
                ..row.clone()
            };
            for disk in &targets[1..] {
                let from = File::open(&first_copy)
                    .ctx(|| format!("cannot open {}", first_copy.display()))?;
                write_copy(
                    disk,
                    &self.record_of(&verified),
                    &from,
                    &first_copy,
                    Some(&verified),
                    &mut report,
                )
                .map_err(|e| self.write_error(name, disk, needed, copies, e))?;
                drop_cached_pages(&from);
            }
            Ok((outcome, real_size))
        })();

        let result = written.and_then(|(outcome, real_size)| {
            let digests_hash = outcome.chunks.list_hash();
            if !self.store.commit_import(
                id,
                &outcome.sha512,
                real_size,
                CHUNK_SIZE,
                &digests_hash,
            )? {
                return Err(Error::refused(ErrorKind::Interrupted, format!(
                    "the reservation of '{name}' was taken from this import before it committed (another process judged it abandoned): nothing was kept; run the import again"
                )));
            }
            Ok(outcome.sha512)
        });
        match result {
            Ok(sha512) => {
                lock.release();
                Ok(Imported {
                    name: name.to_string(),
                    uuid,
                    size,
                    sha512,
                    disks: targets.into_iter().map(|d| d.name).collect(),
                })
            }
            Err(e) => {
                // Undo while still holding the lock, so no other process races the cleanup.
                for disk in &targets {
                    let _ = DiskLayout::new(&disk.path).remove_copy(&uuid);
                }
                let _ = self.store.delete_image(id);
                lock.release();
                Err(e)
            }
        }
    }

    /// The self-describing record written next to each copy of `image`.
    pub fn record_of(&self, image: &ImageRow) -> CopyRecord {
        CopyRecord {
            pool_uuid: self.uuid.clone(),
            name: image.name.clone(),
            uuid: image.uuid.clone(),
            size: image.size,
            sha512: image.sha512.clone(),
            created: image.created,
            chunk_size: image.chunk_size,
            digests_hash: image.digests_hash.clone(),
            copies_wanted: image.copies_wanted,
            source: image.source.clone(),
        }
    }

    fn write_error(&self, name: &str, disk: &DiskRow, needed: u64, copies: u32, e: Error) -> Error {
        match e.kind() {
            ErrorKind::NoSpace => Error::NoSpace {
                image: name.to_string(),
                needed,
                copies,
                detail: format!(
                    "disk '{}' ({}) filled up during the import, nothing was kept",
                    disk.name,
                    disk.path.display()
                ),
            },
            _ => e,
        }
    }

    /// Chooses the disks for `copies` copies of `needed` bytes of data, from fresh free space,
    /// among the healthy disks not in `exclude`.
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
        for disk in &disks {
            if exclude.contains(&disk.id)
                || disk.state != DiskState::Healthy
                || self.disk_health(disk) != DiskHealth::Healthy
            {
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
        let chosen =
            placement::choose(&candidates, needed, copies).map_err(|detail| Error::NoSpace {
                image: name.to_string(),
                needed,
                copies,
                detail,
            })?;
        Ok(chosen
            .into_iter()
            .map(|id| disks.iter().find(|d| d.id == id).cloned().unwrap())
            .collect())
    }

    /// Applies `event` to a copy (see `core::copies`): the one way the pool changes a copy's
    /// state. Disks found without their label now do not count toward the image's good copies.
    pub fn copy_event(&self, image_id: i64, disk_id: i64, event: Event) -> Result<Outcome> {
        let unreachable: Vec<i64> = self
            .store
            .disks()?
            .iter()
            .filter(|d| self.disk_health(d) != DiskHealth::Healthy)
            .map(|d| d.id)
            .collect();
        self.store
            .copy_event(image_id, disk_id, event, now(), &unreachable)
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

    /// Every ready image, with copies and holders.
    pub fn images(&self) -> Result<Vec<ImageInfo>> {
        let live = self.live_mount_ids()?;
        let holders = self.store.holders(None)?;
        let disks = self.disks_in_service()?;
        let mut out = Vec::new();
        for image in self.store.images()? {
            if image.state != ImageState::Ready {
                continue;
            }
            out.push(self.info(image, &holders, &disks, &live)?);
        }
        Ok(out)
    }

    pub fn image(&self, name: &str) -> Result<ImageInfo> {
        let image = self
            .store
            .image_by_name(name)?
            .filter(|i| i.state == ImageState::Ready)
            .ok_or_else(|| Error::UnknownImage(name.to_string()))?;
        let live = self.live_mount_ids()?;
        let holders = self.store.holders(Some(name))?;
        let disks = self.disks_in_service()?;
        self.info(image, &holders, &disks, &live)
    }

    fn info(
        &self,
        image: ImageRow,
        holders: &[HolderRow],
        disks: &[(DiskRow, bool)],
        live: &[i64],
    ) -> Result<ImageInfo> {
        let copies = self
            .store
            .copies_of(image.id)?
            .into_iter()
            .map(|copy| copy_info(&image, copy, disks))
            .collect();
        let holders = holders
            .iter()
            .filter(|h| h.image == image.name)
            .map(|h| h.holder.clone())
            .collect();
        let open_handles = self.store.open_handles(image.id, live)?;
        Ok(ImageInfo {
            image,
            copies,
            holders,
            open_handles,
        })
    }

    /// Changes an image's copy policy; the repair adds or removes copies to match.
    pub fn set_copies(&self, name: &str, copies: u32) -> Result<ImageInfo> {
        if copies == 0 {
            return Err(Error::ZeroCopies);
        }
        let image = self.image(name)?;
        let usable = self
            .disks_in_service()?
            .iter()
            .filter(|(d, ok)| *ok && d.state == DiskState::Healthy)
            .count();
        if copies as usize > usable {
            return Err(Error::NotEnoughDisks { copies, usable });
        }
        self.store.set_copies_wanted(image.image.id, copies)?;
        self.image(name)
    }

    /// Removes an image that no holder and no open file uses.
    pub fn remove_image(&self, name: &str) -> Result<()> {
        let live = self.live_mount_ids()?;
        let image = self.store.begin_remove(name, &live)?;
        self.finish_remove(&image)
    }

    /// Deletes the copies of an image marked for removal, then its rows (if it is still
    /// `removing`). Idempotent: a removal cut short (a crash, a missing disk) is finished by the
    /// next command that changes the pool, or by the mount daemon.
    pub(crate) fn finish_remove(&self, image: &ImageRow) -> Result<()> {
        for copy in self.store.copies_of(image.id)? {
            let disk = copy.disk;
            DiskLayout::new(&disk.path)
                .remove_copy(&image.uuid)
                .map_err(|e| Error::CopyLeftBehind {
                    image: image.name.clone(),
                    disk: disk.name.clone(),
                    source: Box::new(e),
                })?;
        }
        self.store.delete_removed_image(image.id).map(|_| ())
    }

    // ---- holders and gc ----

    pub fn add_ref(&self, image: &str, holder: &str) -> Result<bool> {
        names::check_holder(holder)?;
        self.store.add_holder(image, holder, now())
    }

    pub fn remove_ref(&self, image: &str, holder: &str) -> Result<()> {
        self.store.remove_holder(image, holder, now())
    }

    pub fn refs(&self, image: Option<&str>) -> Result<Vec<HolderRow>> {
        if let Some(name) = image {
            self.image(name)?;
        }
        self.store.holders(image)
    }

    /// Why gc is held, if it is: after the store was rebuilt from the disks, the holders are
    /// unknown, and every image would look unreferenced.
    pub fn gc_hold(&self) -> Result<Option<String>> {
        self.store.setting(GC_HOLD)
    }

    pub fn release_gc_hold(&self) -> Result<()> {
        self.store.set_setting(GC_HOLD, None)
    }

    /// The images that have had no holder for longer than `grace` and are not open: what gc
    /// would remove now, whether or not it is held.
    pub fn collectable(&self, grace: Duration) -> Result<Vec<String>> {
        let cutoff = now() - grace.as_secs() as i64;
        Ok(self
            .images()?
            .into_iter()
            .filter(|info| {
                info.image.unreferenced_since.is_some_and(|t| t <= cutoff)
                    && info.holders.is_empty()
                    && info.open_handles == 0
            })
            .map(|info| info.image.name)
            .collect())
    }

    /// Removes images that have had no holder for longer than `grace` and are not open. Returns
    /// the names removed (or, with `dry_run`, that would be).
    pub fn gc(&self, grace: Duration, dry_run: bool) -> Result<Vec<String>> {
        if let Some(hold) = self.gc_hold()? {
            return Err(Error::GcHeld(hold));
        }
        let candidates = self.collectable(grace)?;
        if dry_run {
            return Ok(candidates);
        }
        let mut removed = Vec::new();
        for name in candidates {
            // Re-checked atomically: a holder or an open may have arrived since the listing.
            match self.remove_image(&name) {
                Ok(()) => removed.push(name),
                Err(Error::InUse { .. })
                | Err(Error::UnknownImage(_))
                | Err(Error::ImageBusy(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }

    // ---- mounts ----

    /// Mounts whose daemon is alive. Rows of dead daemons are only left out here; recovery
    /// deletes them.
    pub fn live_mounts(&self) -> Result<Vec<MountRow>> {
        Ok(self
            .store
            .mounts()?
            .into_iter()
            .filter(|m| owner::is_alive(&self.state_dir, &m.owner))
            .collect())
    }

    fn live_mount_ids(&self) -> Result<Vec<i64>> {
        Ok(self.live_mounts()?.iter().map(|m| m.id).collect())
    }
}

/// A copy as `image show` and the read path see it, given which disks are in service.
pub fn copy_info(image: &ImageRow, copy: CopyRow, disks: &[(DiskRow, bool)]) -> CopyInfo {
    let (disk, in_service) = disks
        .iter()
        .find(|(d, _)| d.id == copy.disk.id)
        .map_or((&copy.disk, false), |(d, ok)| (d, *ok));
    let view = CopyView {
        state: copy.state,
        disk: disk.state,
        reachable: in_service,
    };
    CopyInfo {
        path: DiskLayout::new(&disk.path).copy_path(&image.uuid),
        state: copy.state,
        reason: copy.reason.clone(),
        serving: view.serves(),
        good: view.is_good(),
        counts: view.counts(),
        disk: disk.name.clone(),
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

/// Opens an image source: a regular file or a block device, never empty.
fn open_source(file: &Path) -> Result<(File, u64)> {
    let mut source =
        File::open(file).ctx(|| format!("cannot open image file {}", file.display()))?;
    let meta = source
        .metadata()
        .ctx(|| format!("cannot stat {}", file.display()))?;
    let kind = meta.file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return Err(Error::NotAnImage(file.to_path_buf()));
    }
    let size = source
        .seek(SeekFrom::End(0))
        .ctx(|| format!("cannot read the size of {}", file.display()))?;
    if size == 0 {
        return Err(Error::EmptyImage(file.to_path_buf()));
    }
    Ok((source, size))
}

/// Drops a synced copy's pages from the page cache: readers go through the mount, which
/// caches what it serves, so the copy's own pages would only hold the image a second time.
pub fn drop_cached_pages(copy: &File) {
    let _ = nix::fcntl::posix_fadvise(
        copy,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Writes one copy on `disk`: the data under a temporary name and fsync; then its digest file
/// and record; then the rename that commits it, and fsync of the directories. With `expect`
/// (the image as imported), the data must hash to its SHA-512 and chunk digests, or nothing is
/// committed. `record` is completed with the hashes of what was written. A failure of the copy
/// itself is an `Error::Copy` that says which side failed (`from`, read from `from_path`, or
/// the new copy); the other failures (the disk's directories, digest file, record, rename) are
/// the target's.
pub fn write_copy(
    disk: &DiskRow,
    record: &CopyRecord,
    from: &File,
    from_path: &Path,
    expect: Option<&ImageRow>,
    progress: &mut dyn FnMut(u64, usize) -> std::result::Result<(), CopyError>,
) -> Result<CopyOutcome> {
    let layout = DiskLayout::new(&disk.path);
    layout.create_dirs()?;
    let (uuid, size) = (record.uuid.as_str(), record.size);
    let tmp = layout.tmp_copy_path(uuid);
    let failed = |error| Error::Copy {
        image: record.name.clone(),
        disk: disk.name.clone(),
        from: from_path.to_path_buf(),
        to: tmp.clone(),
        error,
    };
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&tmp)
        .map_err(|e| failed(CopyError::target(e)))?;
    let outcome = sparse::copy_sparse(from, Some(&dst), size, CHUNK_SIZE, progress)
        .and_then(|o| dst.sync_all().map(|()| o).map_err(CopyError::target))
        .map_err(failed)?;
    if let Some(image) = expect {
        if outcome.sha512 != image.sha512 || outcome.chunks.list_hash() != image.digests_hash {
            return Err(failed(CopyError::Mismatch));
        }
    }
    drop_cached_pages(&dst);
    layout.write_digests(uuid, &outcome.chunks)?;
    layout.write_record(&CopyRecord {
        sha512: outcome.sha512.clone(),
        digests_hash: outcome.chunks.list_hash(),
        ..record.clone()
    })?;
    let target = layout.copy_path(uuid);
    fs::rename(&tmp, &target).ctx(|| format!("cannot rename {}", tmp.display()))?;
    crate::format::layout::fsync_dir(target.parent().unwrap())?;
    crate::format::layout::fsync_dir(tmp.parent().unwrap())?;
    Ok(outcome)
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
    use super::*;

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
        assert_eq!(record.sha512, imported.sha512);
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
