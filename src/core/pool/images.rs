//! Images: import, listing, the copy policy and removal.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::core::copies::CopyView;
use crate::core::ingest::{self, drop_cached_pages, open_source, write_copy};
use crate::core::owner::OwnerLock;
use crate::core::store::{CopyRow, CopyState, DiskRow, DiskState, HolderRow, ImageRow, ImageState};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::clock::now;
use crate::format::digests::CHUNK_SIZE;
use crate::format::layout::{CopyRecord, DiskLayout};
use crate::format::names;
use crate::format::qcow2;
use crate::format::sparse::SparseSource;

/// Where an import reads an image from.
pub struct ImportSource<'a> {
    pub data: &'a dyn SparseSource,
    pub size: u64,
    /// What messages about reading it name.
    pub path: PathBuf,
    /// What the image's row and records keep as its source.
    pub recorded_as: Option<String>,
    /// Fails when the source changed while it was read (checked after the first copy).
    pub unchanged: &'a dyn Fn() -> Result<()>,
    /// The source's identity, for one that cannot change (a volume's snapshot): an import of
    /// it that dies leaves its first copy partial, and the next import of the same source
    /// resumes it.
    pub resume_key: Option<String>,
    /// When the image's SHA-512 is learnt.
    pub sha512: WholeSha512,
}

/// When an import learns the SHA-512 of the image's whole content.
pub enum WholeSha512 {
    /// In the copy's pass, before the image is committed: a file a user imports, whose sum
    /// `image add` prints for comparison with the one its publisher gave.
    InPass,
    /// Known already: the caller checked the source against it.
    Known(String),
    /// After the image is committed (`Pool::complete_sha512`): an export. SHA-512 is one
    /// serial chain over every byte, holes included, and costs more than the copy; the chunk
    /// digests, computed in the pass, protect every read meanwhile (docs/decisions.md).
    Later,
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
            ImageHealth::Failed => {
                let why: Vec<String> = self
                    .copies
                    .iter()
                    .filter_map(|c| Some(format!("copy on '{}': {}", c.disk, c.reason.as_ref()?)))
                    .collect();
                let why = if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", why.join("; "))
                };
                // Copies that failed themselves (deleted, found bad) do not come back with
                // their disk; a copy whose disk is out does.
                if self.copies.iter().all(|c| c.state == CopyState::Failed) {
                    format!(
                        "no healthy copy of '{name}'{why}: reads return EIO; import it again: `imgpool image rm {name}`, then `imgpool image add {name} FILE`"
                    )
                } else {
                    format!(
                        "no healthy copy of '{name}'{why}: reads return EIO; bring back a disk that held one (it is verified first) and run `imgpool repair`, or re-import the image"
                    )
                }
            }
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
    /// `None` when computed after the commit (`WholeSha512::Later`).
    pub sha512: Option<String>,
    pub disks: Vec<String>,
    /// Where the first copy resumed an interrupted import of the same source (0: from the
    /// start).
    pub resumed_at: u64,
}

impl Pool {
    /// Imports the image `file` (raw, or qcow2 by its content) as `name`, stored on `copies` distinct disks (the pool's
    /// default when `None`).
    pub fn add_image(
        &self,
        name: &str,
        file: &Path,
        copies: Option<u32>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Imported> {
        names::check_image_name(name)?;
        let opened = open_source(file)?;
        // The format is what the content says, never what the name suggests.
        if qcow2::is_qcow2(&opened.file).ctx(|| format!("cannot read {}", file.display()))? {
            return self.add_qcow2(name, file, copies, progress);
        }
        let source = ImportSource {
            data: &opened.file,
            size: opened.size,
            path: file.to_path_buf(),
            recorded_as: fs::canonicalize(file)
                .ok()
                .map(|p| p.to_string_lossy().into_owned()),
            unchanged: &|| opened.check_unchanged(file),
            resume_key: None,
            sha512: WholeSha512::InPass,
        };
        self.import_image(name, &source, copies, progress)
    }

    /// Imports an image from any source of bytes: its first copy is written from the source,
    /// the others from the first copy.
    pub fn import_image(
        &self,
        name: &str,
        from: &ImportSource,
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
        let (source, size, file) = (from.data, from.size, from.path.as_path());
        let needed: u64 = source
            .data_extents(size)
            .ctx(|| format!("cannot read {}", file.display()))?
            .iter()
            .map(|(start, end)| end - start)
            .sum();
        let mut targets = self.place(name, needed, copies, &[])?;
        if let Some(key) = &from.resume_key {
            // The disk that holds an interrupted copy of the same source gets the first copy.
            if let Some(at) = targets
                .iter()
                .position(|d| ingest::partial_done(d, key, size).is_some_and(|done| done > 0))
            {
                targets.swap(0, at);
            } else if let Some(elsewhere) = self
                .store
                .disks()?
                .into_iter()
                .find(|d| ingest::partial_done(d, key, size).is_some_and(|done| done > 0))
            {
                tracing::warn!(
                    image = name,
                    disk = %elsewhere.name,
                    "an interrupted import of the same source on disk '{}' is not resumed: the image goes to other disks now (placement by free space), so it starts over",
                    elsewhere.name
                );
            }
        }
        let mut resumed_at = 0;

        let uuid = uuid::Uuid::new_v4().to_string();
        let lock = OwnerLock::acquire(&self.state_dir, &import_token(&uuid))?;
        let created = now();
        let row = ImageRow {
            id: 0,
            name: name.to_string(),
            uuid: uuid.clone(),
            size,
            sha512: match &from.sha512 {
                WholeSha512::Known(sha512) => Some(sha512.clone()),
                WholeSha512::InPass | WholeSha512::Later => None,
            },
            real_size: 0,
            state: ImageState::Importing,
            copies_wanted: copies,
            source: from.recorded_as.clone(),
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

        let in_pass = matches!(from.sha512, WholeSha512::InPass);
        let written = (|| -> Result<(ImageRow, u64)> {
            let first = &targets[0];
            let mut report = |done, _| {
                progress(done, size);
                Ok(())
            };
            let outcome = match &from.resume_key {
                Some(key) => ingest::write_resumable_copy(
                    first,
                    &self.record_of(&row),
                    source,
                    file,
                    key,
                    in_pass,
                    &mut report,
                )
                .map(|(outcome, at)| {
                    resumed_at = at;
                    outcome
                }),
                None => write_copy(
                    first,
                    &self.record_of(&row),
                    source,
                    file,
                    None,
                    in_pass,
                    &mut report,
                ),
            }
            .map_err(|e| self.write_error(name, first, needed, copies, e))?;
            // Further copies are made from the first one: the source is read no more.
            (from.unchanged)()?;
            let first_copy = DiskLayout::new(&first.path).copy_path(&uuid);
            let real_size = fs::metadata(&first_copy)
                .ctx(|| format!("cannot stat {}", first_copy.display()))?
                .blocks()
                * 512;
            let verified = ImageRow {
                sha512: outcome.sha512.clone().or(row.sha512.clone()),
                digests_hash: outcome.chunks.list_hash(),
                ..row.clone()
            };
            for disk in &targets[1..] {
                let first = File::open(&first_copy)
                    .ctx(|| format!("cannot open {}", first_copy.display()))?;
                write_copy(
                    disk,
                    &self.record_of(&verified),
                    &first,
                    &first_copy,
                    Some(&verified),
                    verified.sha512.is_some(),
                    &mut report,
                )
                .map_err(|e| self.write_error(name, disk, needed, copies, e))?;
                drop_cached_pages(&first);
            }
            Ok((verified, real_size))
        })();

        let result = written.and_then(|(verified, real_size)| {
            if !self.store.commit_import(
                id,
                verified.sha512.as_deref(),
                real_size,
                CHUNK_SIZE,
                &verified.digests_hash,
            )? {
                return Err(Error::refused(ErrorKind::Interrupted, format!(
                    "the reservation of '{name}' was taken from this import before it committed (another process judged it abandoned): nothing was kept; run the import again"
                )));
            }
            Ok(verified.sha512)
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
                    resumed_at,
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
            // '': not computed yet.
            sha512: image.sha512.clone().unwrap_or_default(),
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

    /// Every ready image, with copies and holders.
    pub fn images(&self) -> Result<Vec<ImageInfo>> {
        let dead = self.dead_mount_ids()?;
        let holders = self.store.holders(None)?;
        let disks = self.disks_in_service()?;
        let mut out = Vec::new();
        for image in self.store.images()? {
            if image.state != ImageState::Ready {
                continue;
            }
            out.push(self.info(image, &holders, &disks, &dead)?);
        }
        Ok(out)
    }

    pub fn image(&self, name: &str) -> Result<ImageInfo> {
        let image = self
            .store
            .image_by_name(name)?
            .filter(|i| i.state == ImageState::Ready)
            .ok_or_else(|| Error::UnknownImage(name.to_string()))?;
        let dead = self.dead_mount_ids()?;
        let holders = self.store.holders(Some(name))?;
        let disks = self.disks_in_service()?;
        self.info(image, &holders, &disks, &dead)
    }

    fn info(
        &self,
        image: ImageRow,
        holders: &[HolderRow],
        disks: &[(DiskRow, bool)],
        dead_mounts: &[i64],
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
        let open_handles = self.store.open_handles(image.id, dead_mounts)?;
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
        let dead = self.dead_mount_ids()?;
        let image = self.store.begin_remove(name, &dead)?;
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
