//! Export: a volume, now or at a snapshot, becomes a new image (`image add --from-volume`),
//! imported through the same pipeline as a file. Here, for a volume that no mount has open:
//! under its writer lock, nothing changes it while it is read, and its base image is read
//! from the image's copies, each chunk checked against its digest before it is used.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use super::images::{ImportSource, Imported, WholeSha512};
use super::volumes::VolumeLock;
use super::Pool;
use crate::core::store::ImageRow;
use crate::core::volume::{Base, NoBase, Volume, VolumeSource};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::digests::ChunkDigests;
use crate::format::layout::DiskLayout;
use crate::format::volume::VolumeFiles;

/// An export of a live volume through a mount reads a temporary snapshot named this prefix and
/// its owner token's id; the snapshot of an export whose process died is deleted at the next
/// start (`recover`) or by the next export of the volume.
pub const TEMPORARY_SNAPSHOT: &str = "export-tmp-";

/// The owner-lock token of the export with temporary snapshot `<TEMPORARY_SNAPSHOT><id>`.
pub fn export_token(id: &str) -> String {
    format!("export-{id}")
}

/// An image read from its good copies on this node's disks: each chunk is checked against the
/// image's digests, and a copy whose chunk does not read or does not match gives way to the
/// next one. Never a byte that is not the image's.
pub(super) struct VerifiedCopies {
    image: String,
    size: u64,
    digests: ChunkDigests,
    copies: Vec<(File, PathBuf)>,
    /// The last chunk read: reads of a sequential pass straddle chunks.
    last: Mutex<Option<(u64, Vec<u8>)>>,
}

impl VerifiedCopies {
    fn chunk(&self, index: u64) -> io::Result<Vec<u8>> {
        if let Some((at, data)) = &*self.last.lock() {
            if *at == index {
                return Ok(data.clone());
            }
        }
        let chunk_size = self.digests.chunk_size();
        let start = index * chunk_size;
        let len = (self.size - start).min(chunk_size) as usize;
        let mut data = vec![0u8; len];
        for (copy, path) in &self.copies {
            match copy.read_exact_at(&mut data, start) {
                Ok(()) if self.digests.matches(index, &data) => {
                    *self.last.lock() = Some((index, data.clone()));
                    return Ok(data);
                }
                Ok(()) => tracing::warn!(
                    image = %self.image, copy = %path.display(), chunk = index,
                    "a chunk of the copy does not match its digest: reading another copy"
                ),
                Err(e) => tracing::warn!(
                    image = %self.image, copy = %path.display(), chunk = index,
                    "a chunk of the copy does not read ({e}): reading another copy"
                ),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "no copy of image '{}' has chunk {index} as imported: `imgpool repair` restores it from a good copy, if any",
                self.image
            ),
        ))
    }
}

impl Base for VerifiedCopies {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let chunk_size = self.digests.chunk_size();
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let index = at / chunk_size;
            let chunk = self.chunk(index)?;
            let from = (at - index * chunk_size) as usize;
            let n = (chunk.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&chunk[from..from + n]);
            done += n;
        }
        Ok(())
    }

    fn seek(&self, offset: u64, hole: bool) -> io::Result<Option<u64>> {
        Ok(if hole {
            self.digests.seek_hole(self.size, offset)
        } else {
            self.digests.seek_data(self.size, offset)
        })
    }
}

/// The owner-lock token of a temporary snapshot's id.
type OwnerToken = fn(&str) -> String;

/// The identity of a volume's snapshot as a source: an export of it resumes another's.
fn resume_key(volume_uuid: &str, snapshot_guid: &str) -> String {
    format!("volume {volume_uuid} snapshot {snapshot_guid}")
}

impl Pool {
    /// The identity of snapshot `snapshot` of volume `volume` as an export's source.
    pub fn snapshot_source_key(&self, volume: &str, snapshot: &str) -> Result<String> {
        let info = self.volume(volume)?;
        let found = crate::core::volume::snapshot_named(&VolumeFiles::new(&info.dir), snapshot)
            .ctx(|| format!("cannot read the snapshots of volume '{volume}'"))?;
        match found {
            Some(s) => Ok(resume_key(&info.volume.uuid, &s.guid)),
            None => Err(Error::refused(
                ErrorKind::NotFound,
                format!("volume '{volume}' has no snapshot '{snapshot}' (`imgpool snapshot list {volume}` lists them)"),
            )),
        }
    }

    /// The temporary snapshots of exports and sends whose process is gone, by volume:
    /// (volume, snapshot), of every volume or of `only` one.
    pub fn abandoned_temporary_snapshots(
        &self,
        only: Option<&str>,
    ) -> Result<Vec<(String, String)>> {
        let kinds: [(&str, OwnerToken); 2] = [
            (TEMPORARY_SNAPSHOT, export_token),
            (
                super::send::COPY_TEMPORARY_SNAPSHOT,
                super::send::send_token,
            ),
        ];
        let volumes = match only {
            // An unknown volume has nothing to clean: the command says it is unknown.
            Some(name) => self.volume(name).into_iter().collect(),
            None => self.volumes()?,
        };
        let mut abandoned = Vec::new();
        for volume in volumes {
            if volume.state() != "ready" {
                continue;
            }
            // In a recovery, a volume whose disk is away (missing, wrong label) has nothing to
            // clean now: the next recovery does it once the disk is back. Failing instead
            // failed every command that changes the pool while that disk was away.
            if only.is_none() && self.labelled_disk_of(&volume.volume).is_err() {
                continue;
            }
            let files = VolumeFiles::new(&volume.dir);
            for (prefix, token) in kinds {
                let names = crate::core::volume::snapshots_named(&files, prefix).ctx(|| {
                    format!(
                        "cannot read the snapshots of volume '{}'",
                        volume.volume.name
                    )
                })?;
                for snapshot in names {
                    let id = &snapshot[prefix.len()..];
                    if uuid::Uuid::parse_str(id).is_ok()
                        && !crate::core::owner::is_alive(&self.state_dir, &token(id))
                    {
                        abandoned.push((volume.volume.name.clone(), snapshot));
                    }
                }
            }
        }
        Ok(abandoned)
    }

    /// The image with id `image_id`, read from its good copies.
    pub(super) fn verified_copies(&self, image_id: i64) -> Result<VerifiedCopies> {
        let image: ImageRow = self
            .store
            .images()?
            .into_iter()
            .find(|i| i.id == image_id)
            .ok_or_else(|| {
                Error::refused(
                    ErrorKind::Corrupt,
                    "the volume's base image is not in the store",
                )
            })?;
        let info = self.image(&image.name)?;
        let disks = self.store.disks()?;
        let mut digests = None;
        let mut copies = Vec::new();
        for copy in info.copies.iter().filter(|c| c.good) {
            let Some(disk) = disks.iter().find(|d| d.name == copy.disk) else {
                continue;
            };
            let layout = DiskLayout::new(&disk.path);
            if digests.is_none() {
                digests = layout
                    .read_digests(
                        &image.uuid,
                        image.chunk_size,
                        image.size,
                        &image.digests_hash,
                    )
                    .ok();
            }
            if let Ok(file) = File::open(&copy.path) {
                copies.push((file, copy.path.clone()));
            }
        }
        match digests {
            Some(digests) if !copies.is_empty() => Ok(VerifiedCopies {
                image: image.name.clone(),
                size: image.size,
                digests,
                copies,
                last: Mutex::new(None),
            }),
            _ => Err(Error::refused(
                ErrorKind::DiskIo,
                format!(
                    "image '{}' has no good copy to read (`imgpool image show {}` says why)",
                    image.name, image.name
                ),
            )),
        }
    }

    /// Makes image `name` of volume `volume` as of its snapshot `snapshot` (or as it is now),
    /// when no mount has the volume open. `Err(pid)`: the process `pid` (a mount daemon) has
    /// it open; the export goes through its mount.
    pub fn export_volume(
        &self,
        name: &str,
        volume: &str,
        snapshot: Option<&str>,
        copies: Option<u32>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<std::result::Result<Imported, u32>> {
        crate::format::names::check_image_name(name)?;
        let info = self.volume(volume)?;
        let files = VolumeFiles::new(&info.dir);
        let _writer = match self.try_lock_volume(&info.volume, &files)? {
            VolumeLock::Held(writer) => writer,
            VolumeLock::Busy => return Ok(Err(info.open_by.unwrap_or(0))),
            // Replaced since it was looked up: the export reads the volume now so named, as
            // if started after the replacement (or finds none).
            VolumeLock::Changed => {
                return self.export_volume(name, volume, snapshot, copies, progress)
            }
        };
        let base: Box<dyn Base> = match info.volume.image_id {
            Some(id) => Box::new(self.verified_copies(id)?),
            None => Box::new(NoBase),
        };
        let opened =
            Arc::new(Volume::open(&files, base).ctx(|| format!("cannot open volume '{volume}'"))?);
        let exported = (|| {
            let at = match snapshot {
                Some(snap) => Some(
                    opened
                        .find_snapshot(snap)
                        .ctx(|| format!("cannot read the snapshots of volume '{volume}'"))?
                        .ok_or_else(|| {
                            Error::refused(
                                ErrorKind::NotFound,
                                format!("volume '{volume}' has no snapshot '{snap}' (`imgpool snapshot list {volume}` lists them)"),
                            )
                        })?,
                ),
                None => None,
            };
            let resume_key = at.as_ref().map(|s| resume_key(&info.volume.uuid, &s.guid));
            let source = VolumeSource::new(&opened, at.as_ref())
                .ctx(|| format!("cannot read volume '{volume}'"))?;
            let label = match snapshot {
                Some(snap) => format!("volume:{volume}@{snap}"),
                None => format!("volume:{volume}"),
            };
            let import = ImportSource {
                data: &source,
                size: source.size(),
                path: PathBuf::from(&label),
                recorded_as: Some(label.clone()),
                // Under the writer lock: nothing wrote it meanwhile.
                unchanged: &|| Ok(()),
                resume_key,
                sha512: WholeSha512::Later,
            };
            self.import_image(name, &import, copies, progress)
        })();
        // The source (and its snapshot reader) is gone: this is the only holder.
        let closed = Arc::try_unwrap(opened)
            .map_err(|_| io::Error::other("the volume is still read"))
            .and_then(Volume::close)
            .ctx(|| format!("cannot close volume '{volume}'"));
        let imported = exported?;
        closed?;
        Ok(Ok(imported))
    }
}
