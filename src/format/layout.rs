//! What the pool keeps on each disk: an identity label and, per copy, the image data next to a
//! self-describing record. Each disk is the truth about what it holds; the node's metadata store
//! only indexes it.
//!
//! ```text
//! <disk>/.imgpool/label.json           which pool and which disk this is
//! <disk>/.imgpool/copies/<uuid>.img    a committed copy (immutable)
//! <disk>/.imgpool/copies/<uuid>.json   its record: name, uuid, size, sha512, policy
//! <disk>/.imgpool/copies/<uuid>.digests  BLAKE3 of each chunk, in chunk order
//! <disk>/.imgpool/tmp/<uuid>.img       a copy being written (never served)
//! <disk>/.imgpool/probe                rewritten by the health monitor's probes
//! <disk>/.imgpool/volumes/<uuid>/      a volume (`format::volume`)
//! <disk>/.imgpool/removed-volumes/<uuid>/  a volume whose removal started: moved out of
//!                                      `volumes/` first, then deleted
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::format::digests::ChunkDigests;

pub const POOL_DIR: &str = ".imgpool";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    pub pool_uuid: String,
    pub disk_uuid: String,
    pub disk_name: String,
    pub created: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRecord {
    pub pool_uuid: String,
    pub name: String,
    pub uuid: String,
    pub size: u64,
    pub sha512: String,
    pub created: i64,
    /// Chunk size of the digest file and the BLAKE3 of its bytes.
    pub chunk_size: u64,
    pub digests_hash: String,
    /// The image's copy policy and source when this copy was written: what `fsck --repair`
    /// restores when the metadata store is lost.
    pub copies_wanted: u32,
    pub source: Option<String>,
}

/// The paths of the pool's files on one disk.
#[derive(Debug, Clone)]
pub struct DiskLayout {
    root: PathBuf,
}

impl DiskLayout {
    pub fn new(disk_path: &Path) -> Self {
        DiskLayout {
            root: disk_path.join(POOL_DIR),
        }
    }

    pub fn label_path(&self) -> PathBuf {
        self.root.join("label.json")
    }

    fn copies_dir(&self) -> PathBuf {
        self.root.join("copies")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn copy_path(&self, uuid: &str) -> PathBuf {
        self.copies_dir().join(format!("{uuid}.img"))
    }

    pub fn record_path(&self, uuid: &str) -> PathBuf {
        self.copies_dir().join(format!("{uuid}.json"))
    }

    pub fn digests_path(&self, uuid: &str) -> PathBuf {
        self.copies_dir().join(format!("{uuid}.digests"))
    }

    pub fn tmp_copy_path(&self, uuid: &str) -> PathBuf {
        self.tmp_dir().join(format!("{uuid}.img"))
    }

    /// Interrupted first copies of imports that can resume, by the id of their source.
    pub fn partial_dir(&self) -> PathBuf {
        self.root.join("partial")
    }

    pub fn partial_copy_path(&self, source_id: &str) -> PathBuf {
        self.partial_dir().join(format!("{source_id}.img"))
    }

    /// How much of the partial copy is durable, and of what (`PartialProgress`).
    pub fn partial_progress_path(&self, source_id: &str) -> PathBuf {
        self.partial_dir().join(format!("{source_id}.json"))
    }

    fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    /// Where a volume's directory is moved when its removal starts, before its files are
    /// deleted: out of `volumes/`, where every command looks for it.
    fn removed_volumes_dir(&self) -> PathBuf {
        self.root.join("removed-volumes")
    }

    /// The directory volume `uuid`'s files are moved to when its removal starts.
    pub fn removed_volume_dir(&self, uuid: &str) -> PathBuf {
        self.removed_volumes_dir().join(uuid)
    }

    /// The uuids of the volume directories on this disk.
    pub fn volume_uuids(&self) -> Result<Vec<String>> {
        dirs_in(&self.volumes_dir())
    }

    /// The uuids of the directories of volumes whose removal started and did not finish.
    pub fn removed_volume_uuids(&self) -> Result<Vec<String>> {
        dirs_in(&self.removed_volumes_dir())
    }

    /// The files of the volume with `uuid` on this disk.
    pub fn volume_files(&self, uuid: &str) -> crate::format::volume::VolumeFiles {
        crate::format::volume::VolumeFiles::new(&self.volumes_dir().join(uuid))
    }

    pub fn probe_path(&self) -> PathBuf {
        self.root.join("probe")
    }

    /// Creates the pool directory tree on the disk (idempotent).
    pub fn create_dirs(&self) -> Result<()> {
        for dir in [self.root.clone(), self.copies_dir(), self.tmp_dir()] {
            fs::create_dir_all(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(())
    }

    /// The label on the disk, or `None` when the directory carries none.
    pub fn read_label(&self) -> Result<Option<Label>> {
        let path = self.label_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::io(
                    format!("cannot parse disk label {}", path.display()),
                    io::Error::new(io::ErrorKind::InvalidData, e),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
        }
    }

    pub fn write_label(&self, label: &Label) -> Result<()> {
        write_durably(&self.label_path(), &to_json(label))
    }

    pub fn write_record(&self, record: &CopyRecord) -> Result<()> {
        write_durably(&self.record_path(&record.uuid), &to_json(record))
    }

    pub fn read_record(&self, uuid: &str) -> Result<CopyRecord> {
        let path = self.record_path(uuid);
        let bytes = fs::read(&path).ctx(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::io(
                format!("cannot parse copy record {}", path.display()),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        })
    }

    pub fn write_digests(&self, uuid: &str, digests: &ChunkDigests) -> Result<()> {
        write_durably(&self.digests_path(uuid), &digests.to_bytes())
    }

    /// The copy's digest file, if it is the list the image was imported with (`list_hash`).
    pub fn read_digests(
        &self,
        uuid: &str,
        chunk_size: u64,
        size: u64,
        list_hash: &str,
    ) -> Result<ChunkDigests> {
        let path = self.digests_path(uuid);
        let bytes = fs::read(&path).ctx(|| format!("cannot read {}", path.display()))?;
        ChunkDigests::from_bytes(chunk_size, size, &bytes)
            .filter(|d| d.list_hash() == list_hash)
            .ok_or_else(|| {
                Error::io(
                    format!("{} is damaged", path.display()),
                    io::Error::new(io::ErrorKind::InvalidData, "digest list hash mismatch"),
                )
            })
    }

    /// The uuids of committed copies on this disk.
    pub fn copies(&self) -> Result<Vec<String>> {
        uuids_in(&self.copies_dir(), "img")
    }

    /// Every file in the copies directory, by name.
    pub fn copies_dir_files(&self) -> Result<Vec<String>> {
        let dir = self.copies_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("cannot list {}", dir.display()), e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.ctx(|| format!("cannot list {}", dir.display()))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    pub fn copies_dir_path(&self, file: &str) -> PathBuf {
        self.copies_dir().join(file)
    }

    /// Removes every file of a copy, committed or not. Missing files are fine: removal is
    /// idempotent so that an interrupted removal can simply be run again.
    pub fn remove_copy(&self, uuid: &str) -> Result<()> {
        // The data first: a copy is committed by its data file, so a removal cut short leaves
        // at worst a record without data, which nothing serves.
        for path in [
            self.tmp_copy_path(uuid),
            self.copy_path(uuid),
            self.record_path(uuid),
            self.digests_path(uuid),
            durable_tmp(&self.record_path(uuid)),
            durable_tmp(&self.digests_path(uuid)),
        ] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("cannot remove {}", path.display()), e)),
            }
        }
        fsync_dir(&self.copies_dir())
    }

    /// The uuids of copies that are still being written (or were, when a writer died).
    pub fn tmp_copies(&self) -> Result<Vec<String>> {
        uuids_in(&self.tmp_dir(), "img")
    }
}

/// The paths in `dir` (none when it does not exist).
fn paths_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("cannot list {}", dir.display()), e)),
    };
    entries
        .map(|entry| {
            entry
                .map(|e| e.path())
                .ctx(|| format!("cannot list {}", dir.display()))
        })
        .collect()
}

fn uuids_in(dir: &Path, extension: &str) -> Result<Vec<String>> {
    Ok(paths_in(dir)?
        .into_iter()
        .filter(|path| path.extension().and_then(|e| e.to_str()) == Some(extension))
        .filter_map(|path| Some(path.file_stem()?.to_str()?.to_string()))
        .collect())
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("plain structs serialise");
    bytes.push(b'\n');
    bytes
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content:
/// temporary name, fsync, rename, fsync of the directory.
/// The temporary name `write_durably` writes `path` under.
fn durable_tmp(path: &Path) -> PathBuf {
    path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ))
}

/// Reads a volume's record.
pub fn read_volume_record(
    files: &crate::format::volume::VolumeFiles,
) -> Result<crate::format::volume::VolumeRecord> {
    let path = files.record();
    let bytes = fs::read(&path).ctx(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::io(
            format!("cannot parse volume record {}", path.display()),
            io::Error::new(io::ErrorKind::InvalidData, e),
        )
    })
}

/// Writes a volume's record durably.
pub fn write_volume_record(
    files: &crate::format::volume::VolumeFiles,
    record: &crate::format::volume::VolumeRecord,
) -> Result<()> {
    write_durably(&files.record(), &to_json(record))
}

pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .expect("durable writes target a file in a directory");
    let tmp = durable_tmp(path);
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(format!("cannot write {}", path.display()), e));
    }
    fsync_dir(dir)
}

/// The names of the directories in `dir` (none when it does not exist), sorted.
fn dirs_in(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = paths_in(dir)?
        .into_iter()
        .filter(|path| path.is_dir())
        .filter_map(|path| Some(path.file_name()?.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    Ok(names)
}

/// Starts writing what was written to `file` so far to the disk, without waiting: a long run
/// of writes then finds most of it on the disk when it syncs, instead of all of it at once.
/// An error of that writeback is reported by the next sync.
pub fn start_writeback(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range takes a file descriptor we own and plain integers; it touches
    // no memory of ours. (nix has no wrapper for it.)
    #[allow(unsafe_code)]
    let done =
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("cannot sync directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_round_trips_and_absence_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let layout = DiskLayout::new(dir.path());
        assert_eq!(layout.read_label().unwrap(), None);
        layout.create_dirs().unwrap();
        let label = Label {
            pool_uuid: "p".into(),
            disk_uuid: "d".into(),
            disk_name: "disk1".into(),
            created: 7,
        };
        layout.write_label(&label).unwrap();
        assert_eq!(layout.read_label().unwrap(), Some(label));
    }

    #[test]
    fn remove_copy_is_idempotent_and_lists_follow() {
        let dir = tempfile::tempdir().unwrap();
        let layout = DiskLayout::new(dir.path());
        layout.create_dirs().unwrap();
        fs::write(layout.tmp_copy_path("u1"), b"partial").unwrap();
        fs::write(layout.copy_path("u2"), b"data").unwrap();
        fs::write(layout.record_path("u2"), b"{}").unwrap();
        assert_eq!(layout.tmp_copies().unwrap(), vec!["u1".to_string()]);
        layout.remove_copy("u1").unwrap();
        layout.remove_copy("u1").unwrap();
        layout.remove_copy("u2").unwrap();
        assert!(layout.tmp_copies().unwrap().is_empty());
        assert!(!layout.copy_path("u2").exists());
        assert!(!layout.record_path("u2").exists());
    }

    #[test]
    fn durable_write_replaces_content_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_durably(&path, b"one").unwrap();
        write_durably(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
