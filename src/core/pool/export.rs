//! Export: a volume, now or at a snapshot, becomes a new image (`image add --from-volume`),
//! imported through the same pipeline as a file. Here, for a volume that no mount has open:
//! under its writer lock, nothing changes it while it is read, and its base image is read
//! from the image's copies, each chunk checked against its digest before it is used.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
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
use crate::format::volume::{VolumeFiles, BLOCK};

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
/// next one. Never a byte that is not the image's. Several threads read it at once (the
/// export's workers): whole chunks are read and checked in the reader's own buffer.
pub(super) struct VerifiedCopies {
    image: String,
    size: u64,
    digests: ChunkDigests,
    copies: Vec<(File, PathBuf)>,
    /// The first copy opened for direct reads (`O_DIRECT`), where its filesystem allows them:
    /// whole aligned runs of chunks are read from it around the page cache, whose filling
    /// cost the export more CPU than its reads (the export's own copy is written around it
    /// too, `format::sparse`; the mount caches what it serves in its own cache).
    direct: Option<File>,
    /// The chunks last read in part, newest last: a reader that reads a chunk block by block
    /// (around what a volume wrote over it) reads it from the disk once.
    partly_read: Mutex<Vec<(u64, Vec<u8>)>>,
}

/// Chunks `partly_read` keeps: a few per export worker.
const PARTLY_READ: usize = 16;

impl VerifiedCopies {
    /// The length of chunk `index`: the last one may be short.
    fn chunk_len(&self, index: u64) -> usize {
        let chunk_size = self.digests.chunk_size();
        (self.size - index * chunk_size).min(chunk_size) as usize
    }

    /// Reads chunk `index` whole into `buf` (its length) from the first copy that has it as
    /// imported.
    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = index * self.digests.chunk_size();
        for (copy, path) in &self.copies {
            match copy.read_exact_at(buf, start) {
                Ok(()) if self.digests.matches(index, buf) => return Ok(()),
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

    /// Reads the whole chunks from `first` on into `buf` (their length, chunk-aligned) in one
    /// read of the first copy, then checks each; a chunk that does not match is read again,
    /// from the copies in turn.
    fn read_chunks(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
        let chunk_size = self.digests.chunk_size() as usize;
        let offset = first * chunk_size as u64;
        let block = BLOCK as usize;
        let aligned = offset.is_multiple_of(BLOCK)
            && buf.len().is_multiple_of(block)
            && buf.as_ptr().align_offset(block) == 0;
        let read = match (&self.direct, aligned) {
            (Some(direct), true) => match direct.read_exact_at(buf, offset) {
                // Not for this file after all: through the page cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.copies[0].0.read_exact_at(buf, offset)
                }
                read => read,
            },
            _ => self.copies[0].0.read_exact_at(buf, offset),
        }
        .is_ok();
        for (index, chunk) in (first..).zip(buf.chunks_mut(chunk_size)) {
            if !(read && self.digests.matches(index, chunk)) {
                self.read_chunk(index, chunk)?;
            }
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes of chunk `index` from byte `from` of it, read whole (or kept
    /// from a read before) and checked.
    fn read_part(&self, index: u64, from: usize, buf: &mut [u8]) -> io::Result<()> {
        let mut kept = self.partly_read.lock();
        if let Some((_, chunk)) = kept.iter().find(|(at, _)| *at == index) {
            buf.copy_from_slice(&chunk[from..from + buf.len()]);
            return Ok(());
        }
        let mut chunk = match kept.len() >= PARTLY_READ {
            true => kept.remove(0).1,
            false => Vec::new(),
        };
        drop(kept);
        chunk.resize(self.chunk_len(index), 0);
        self.read_chunk(index, &mut chunk)?;
        buf.copy_from_slice(&chunk[from..from + buf.len()]);
        let mut kept = self.partly_read.lock();
        if kept.len() < PARTLY_READ {
            kept.push((index, chunk));
        }
        Ok(())
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
            let from = (at - index * chunk_size) as usize;
            let left = buf.len() - done;
            let len = self.chunk_len(index);
            if from > 0 || left < len {
                let n = (len - from).min(left);
                self.read_part(index, from, &mut buf[done..done + n])?;
                done += n;
                continue;
            }
            // Whole chunks: the last one of the image may be short.
            let whole = (left as u64 / chunk_size)
                .min(self.size.div_ceil(chunk_size) - index)
                .max(1);
            let n = ((index + whole) * chunk_size).min(self.size) - at;
            let n = (n as usize).min(left);
            self.read_chunks(index, &mut buf[done..done + n])?;
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
                direct: File::options()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&copies[0].1)
                    .ok(),
                image: image.name.clone(),
                size: image.size,
                digests,
                copies,
                partly_read: Mutex::new(Vec::new()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::digests::ChunkHasher;
    use std::io::Write;

    /// Four threads read an image of 4 KiB chunks (and a short last one) at random offsets and
    /// lengths, whole chunks (into aligned buffers: read directly where the filesystem allows)
    /// and parts of chunks, from two copies whose first has chunks that do not match and one
    /// that is cut short: every read is the image's; a chunk no copy has right is an error,
    /// not bytes.
    #[test]
    fn concurrent_reads_get_the_image_whatever_chunks_a_copy_has_wrong() {
        let chunk_size = 4096u64;
        let size = 40 * chunk_size + 1000;
        let image: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let mut hasher = ChunkHasher::new(chunk_size);
        hasher.update(&image);
        let dir = tempfile::tempdir().unwrap();
        let copy = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            File::create(&path).unwrap().write_all(bytes).unwrap();
            (File::open(&path).unwrap(), path)
        };
        let mut damaged = image.clone();
        for chunk in [3u64, 17, 40] {
            damaged[(chunk * chunk_size) as usize + 5] ^= 0xff;
        }
        damaged.truncate(damaged.len() - 10);
        let copies = VerifiedCopies {
            image: "img".into(),
            size,
            digests: hasher.finish(),
            copies: vec![copy("damaged", &damaged), copy("good", &image)],
            partly_read: Mutex::new(Vec::new()),
            direct: File::options()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(dir.path().join("damaged"))
                .ok(),
        };
        std::thread::scope(|scope| {
            for thread in 0..4u64 {
                let (copies, image) = (&copies, &image);
                scope.spawn(move || {
                    let mut seed = thread + 1;
                    let mut below = |n: u64| {
                        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        (seed >> 33) % n
                    };
                    for _ in 0..300 {
                        let offset = match below(2) {
                            0 => below(size / chunk_size) * chunk_size,
                            _ => below(size),
                        };
                        let len = match below(2) {
                            0 => (1 + below(5)) * chunk_size,
                            _ => 1 + below(5 * chunk_size),
                        }
                        .min(size - offset) as usize;
                        let mut bytes = vec![0u8; len + BLOCK as usize];
                        let skip = bytes.as_ptr().align_offset(BLOCK as usize);
                        let buf = &mut bytes[skip..skip + len];
                        copies.read_at(buf, offset).unwrap();
                        let at = offset as usize;
                        assert!(*buf == image[at..at + len], "read of {len} at {offset}");
                    }
                });
            }
        });

        let wrong_everywhere = VerifiedCopies {
            copies: vec![copy("damaged-again", &damaged)],
            partly_read: Mutex::new(Vec::new()),
            direct: None,
            ..copies
        };
        let mut buf = vec![0u8; 3 * chunk_size as usize];
        let failed = wrong_everywhere
            .read_at(&mut buf, 2 * chunk_size)
            .unwrap_err();
        assert_eq!(failed.kind(), io::ErrorKind::InvalidData);
        assert!(failed.to_string().contains("chunk 3"), "{failed}");
        wrong_everywhere
            .read_at(&mut buf[..100], 2 * chunk_size + 7)
            .unwrap();
        assert!(buf[..100] == image[2 * chunk_size as usize + 7..][..100]);
    }
}
