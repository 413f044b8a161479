//! Longhorn replica directories, read offline as the disk they hold at the head or at a
//! snapshot. Longhorn's engine lays a replica out as `volume.meta` (JSON: Size, Head, Dirty,
//! Rebuilding, Error, Parent, SectorSize, BackingFilePath, Encrypted), and per layer a sparse
//! file `volume-head-NNN.img` or `volume-snap-<name>.img` with its `<file>.meta` (JSON: Name,
//! Parent, Removed, UserCreated, Created, Labels), over an optional backing file (raw or
//! qcow2). A 4 KiB block reads from the newest layer of the chain whose file has data there
//! (an allocated extent, whatever its bytes), else from the backing file, else as zeros.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};
use crate::format::qcow2::{self, Qcow2};
use crate::format::sparse::{self, SparseSource};

pub const VOLUME_META: &str = "volume.meta";
const META_SUFFIX: &str = ".meta";
const SNAPSHOT_PREFIX: &str = "volume-snap-";
const DISK_SUFFIX: &str = ".img";

/// `volume.meta`, as the engine writes it (Go field names).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VolumeMeta {
    pub size: u64,
    pub head: String,
    #[serde(default)]
    pub rebuilding: bool,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub backing_file_path: String,
    #[serde(default)]
    pub encrypted: bool,
}

/// A layer's `<file>.meta`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DiskMeta {
    #[serde(default)]
    parent: String,
    #[serde(default)]
    removed: bool,
}

/// The bottom of a replica's chain: its backing file.
enum BackingLayer {
    Raw { file: File, len: u64 },
    Qcow2(Box<Qcow2>),
}

/// A replica's disk at one point of its chain: the layers' files and who holds each block.
pub struct Replica {
    size: u64,
    /// The chain's layer files, newest first, with their paths.
    layers: Vec<(PathBuf, File)>,
    backing: Option<(PathBuf, BackingLayer)>,
    /// Who holds each byte that is not zero: sorted, disjoint (start, end, owner), where owner
    /// indexes `layers`, and `layers.len()` is the backing file.
    owners: Vec<(u64, u64, usize)>,
}

/// The replica's `volume.meta`; a directory without one is not a replica.
fn read_volume_meta(dir: &Path) -> Result<VolumeMeta> {
    let path = dir.join(VOLUME_META);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::refused(
                ErrorKind::InvalidInput,
                format!(
                    "{} is not a Longhorn replica directory: it has no {VOLUME_META}",
                    dir.display()
                ),
            ))
        }
        Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
    };
    serde_json::from_slice(&text).map_err(|e| {
        Error::refused(
            ErrorKind::Corrupt,
            format!(
                "{} is not a Longhorn replica's {VOLUME_META} ({e}); Longhorn rewrites it when the replica starts",
                path.display()
            ),
        )
    })
}

impl Replica {
    /// Opens the replica in `dir` as of `snapshot` (that snapshot and its ancestors), or as of
    /// its head. `backing_override` replaces the backing file path `volume.meta` records (the
    /// engine gets it from its command line, so a directory copied from another node names a
    /// path of that node). Refuses a directory that is not a replica, one being rebuilt, in
    /// error or encrypted, a chain with a missing link, an unknown snapshot.
    pub fn open(
        dir: &Path,
        snapshot: Option<&str>,
        backing_override: Option<&Path>,
    ) -> Result<Replica> {
        if !dir.is_dir() {
            return Err(Error::refused(
                ErrorKind::InvalidInput,
                format!(
                    "{} is not a directory: give a Longhorn replica directory",
                    dir.display()
                ),
            ));
        }
        let volume = read_volume_meta(dir)?;
        if volume.rebuilding {
            return Err(Error::refused(
                ErrorKind::Conflict,
                format!(
                    "the Longhorn replica in {} is being rebuilt ({VOLUME_META} says Rebuilding), so its layers are incomplete: import a healthy replica",
                    dir.display()
                ),
            ));
        }
        if !volume.error.is_empty() {
            return Err(Error::refused(
                ErrorKind::Conflict,
                format!(
                    "the Longhorn replica in {} is in error ({:?}): import a healthy replica",
                    dir.display(),
                    volume.error
                ),
            ));
        }
        if volume.encrypted {
            return Err(Error::refused(
                ErrorKind::InvalidInput,
                format!(
                    "the Longhorn replica in {} is encrypted: its layers hold ciphertext, which imgpool does not decrypt",
                    dir.display()
                ),
            ));
        }
        if volume.size == 0 {
            return Err(Error::refused(
                ErrorKind::Corrupt,
                format!("{} records a size of 0", dir.join(VOLUME_META).display()),
            ));
        }

        let disks = read_disk_metas(dir)?;
        let top =
            match snapshot {
                None => volume.head.clone(),
                Some(name) => {
                    let disk = if name.starts_with(SNAPSHOT_PREFIX) && name.ends_with(DISK_SUFFIX) {
                        name.to_string()
                    } else {
                        format!("{SNAPSHOT_PREFIX}{name}{DISK_SUFFIX}")
                    };
                    match disks.get(&disk) {
                        Some(meta) if meta.removed => {
                            return Err(Error::refused(
                                ErrorKind::NotFound,
                                format!(
                                    "snapshot '{name}' of the replica in {} was removed",
                                    dir.display()
                                ),
                            ))
                        }
                        Some(_) => disk,
                        None => {
                            let known: Vec<&str> = disks
                                .iter()
                                .filter(|(_, meta)| !meta.removed)
                                .filter_map(|(d, _)| {
                                    d.strip_prefix(SNAPSHOT_PREFIX)?.strip_suffix(DISK_SUFFIX)
                                })
                                .collect();
                            return Err(Error::refused(
                                ErrorKind::NotFound,
                                format!(
                                "the replica in {} has no snapshot '{name}' (its snapshots: {})",
                                dir.display(),
                                if known.is_empty() { "none".to_string() } else { known.join(", ") }
                            ),
                            ));
                        }
                    }
                }
            };
        if top.is_empty() {
            return Err(Error::refused(
                ErrorKind::Corrupt,
                format!("{} names no Head", dir.join(VOLUME_META).display()),
            ));
        }

        // The chain, newest first: each layer's file and metadata must be there.
        let mut layers = Vec::new();
        let mut seen = HashSet::new();
        let mut current = top;
        let mut child: Option<String> = None;
        while !current.is_empty() {
            if !seen.insert(current.clone()) {
                return Err(Error::refused(
                    ErrorKind::Corrupt,
                    format!(
                        "the chain of the replica in {} loops at {current}",
                        dir.display()
                    ),
                ));
            }
            let named_by = match &child {
                Some(c) => format!("{c}.meta names it as its parent"),
                None => format!("{VOLUME_META} names it as the head"),
            };
            let Some(meta) = disks.get(&current) else {
                return Err(Error::refused(
                    ErrorKind::Corrupt,
                    format!(
                        "the chain of the replica in {} is broken: {current}{META_SUFFIX} is missing ({named_by})",
                        dir.display()
                    ),
                ));
            };
            let path = dir.join(&current);
            let file = File::open(&path).map_err(|e| {
                Error::refused(
                    ErrorKind::Corrupt,
                    format!(
                        "the chain of the replica in {} is broken: {current} cannot be opened ({e}; {named_by})",
                        dir.display()
                    ),
                )
            })?;
            layers.push((path, file));
            child = Some(current);
            current = meta.parent.clone();
        }

        let backing_path = match backing_override {
            Some(path) => Some(path.to_path_buf()),
            None if volume.backing_file_path.is_empty() => None,
            None => Some(PathBuf::from(&volume.backing_file_path)),
        };
        let backing = match backing_path {
            None => None,
            Some(path) => Some(open_backing(dir, &path)?),
        };

        let mut replica = Replica {
            size: volume.size,
            layers,
            backing,
            owners: Vec::new(),
        };
        replica.owners = replica.map_owners()?;
        Ok(replica)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Every file read: the layers, newest first, then the backing file's chain.
    pub fn files(&self) -> Vec<(PathBuf, &File)> {
        let mut files: Vec<(PathBuf, &File)> =
            self.layers.iter().map(|(p, f)| (p.clone(), f)).collect();
        match &self.backing {
            Some((path, BackingLayer::Raw { file, .. })) => files.push((path.clone(), file)),
            Some((_, BackingLayer::Qcow2(q))) => files.extend(q.chain_files()),
            None => {}
        }
        files
    }

    fn backing_source(&self) -> Option<(&dyn SparseSource, u64)> {
        match &self.backing {
            Some((_, BackingLayer::Raw { file, len })) => Some((file, *len)),
            Some((_, BackingLayer::Qcow2(q))) => Some((q.as_ref(), q.size())),
            None => None,
        }
    }

    /// Paints the layers' extents from the newest down: each byte goes to the first layer
    /// that has data there.
    fn map_owners(&self) -> Result<Vec<(u64, u64, usize)>> {
        let mut per_layer: Vec<Vec<(u64, u64)>> = Vec::new();
        for (path, file) in &self.layers {
            per_layer.push(
                sparse::data_extents(file, self.size)
                    .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?,
            );
        }
        if let Some((source, len)) = self.backing_source() {
            let path = &self.backing.as_ref().unwrap().0;
            per_layer.push(
                source
                    .data_extents(self.size.min(len))
                    .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?,
            );
        }
        // Every extent boundary of every layer; between two neighbours, one owner.
        let mut cuts: Vec<u64> = per_layer
            .iter()
            .flatten()
            .flat_map(|&(s, e)| [s, e])
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut next = vec![0usize; per_layer.len()];
        let mut owners: Vec<(u64, u64, usize)> = Vec::new();
        for pair in cuts.windows(2) {
            let (start, end) = (pair[0], pair[1]);
            let mut owner = None;
            for (layer, extents) in per_layer.iter().enumerate() {
                while next[layer] < extents.len() && extents[next[layer]].1 <= start {
                    next[layer] += 1;
                }
                if owner.is_none() && next[layer] < extents.len() && extents[next[layer]].0 <= start
                {
                    owner = Some(layer);
                }
            }
            if let Some(owner) = owner {
                match owners.last_mut() {
                    Some(last) if last.1 == start && last.2 == owner => last.1 = end,
                    _ => owners.push((start, end, owner)),
                }
            }
        }
        Ok(owners)
    }
}

/// Every layer's metadata in `dir`, by layer file name.
fn read_disk_metas(dir: &Path) -> Result<BTreeMap<String, DiskMeta>> {
    let mut disks = BTreeMap::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(disk) = name.strip_suffix(META_SUFFIX) else {
            continue;
        };
        if name == VOLUME_META || !disk.ends_with(DISK_SUFFIX) {
            continue;
        }
        let path = entry.path();
        let text = std::fs::read(&path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        let meta: DiskMeta = serde_json::from_slice(&text).map_err(|e| {
            Error::refused(
                ErrorKind::Corrupt,
                format!(
                    "{} is not a Longhorn layer's metadata ({e})",
                    path.display()
                ),
            )
        })?;
        disks.insert(disk.to_string(), meta);
    }
    Ok(disks)
}

/// Opens the backing file as the engine does: a directory holding exactly one file stands for
/// that file; qcow2 or raw by content.
fn open_backing(dir: &Path, path: &Path) -> Result<(PathBuf, BackingLayer)> {
    let missing = |why: String| {
        Error::refused(
            ErrorKind::NotFound,
            format!(
                "the backing file {} of the replica in {} {why}: pass the image's path with --backing-file",
                path.display(),
                dir.display()
            ),
        )
    };
    let mut file_path = path.to_path_buf();
    if path.is_dir() {
        let inside: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| Error::io(format!("cannot list {}", path.display()), e))?
            .filter_map(|e| e.ok())
            .collect();
        match inside.as_slice() {
            [one] => file_path = one.path(),
            _ => {
                return Err(missing(format!(
                    "is a directory with {} entries, not one file",
                    inside.len()
                )))
            }
        }
    }
    let file = File::open(&file_path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            missing("is missing".to_string())
        } else {
            missing(format!("cannot be opened ({e})"))
        }
    })?;
    let layer = if qcow2::is_qcow2(&file)
        .map_err(|e| Error::io(format!("cannot read {}", file_path.display()), e))?
    {
        BackingLayer::Qcow2(Box::new(Qcow2::open(&file_path)?))
    } else {
        let len = qcow2::length(&file, &file_path)?;
        BackingLayer::Raw { file, len }
    };
    Ok((file_path, layer))
}

/// The processes that have a file of `dir` open, as (pid, command name): an engine or replica
/// process serving it, or anything else writing it.
pub fn processes_using(dir: &Path) -> io::Result<Vec<(u32, String)>> {
    let dir = std::fs::canonicalize(dir)?;
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Processes come and go, and others' fds may be closed to us: skip what we cannot read.
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let uses = fds
            .filter_map(|fd| fd.ok())
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(&dir)));
        if uses {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push((pid, comm.trim().to_string()));
        }
    }
    Ok(found)
}

impl SparseSource for Replica {
    fn data_extents(&self, size: u64) -> io::Result<Vec<(u64, u64)>> {
        let mut extents: Vec<(u64, u64)> = Vec::new();
        for &(start, end, _) in &self.owners {
            if start >= size {
                break;
            }
            let end = end.min(size);
            match extents.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => extents.push((start, end)),
            }
        }
        Ok(extents)
    }

    fn read_full_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let end = (offset + buf.len() as u64).min(self.size);
        let buf = &mut buf[..(end - offset) as usize];
        buf.fill(0);
        let first = self.owners.partition_point(|&(_, e, _)| e <= offset);
        for &(start, stop, owner) in &self.owners[first..] {
            if start >= end {
                break;
            }
            let (from, to) = (start.max(offset), stop.min(end));
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            let got = match self.layers.get(owner) {
                Some((_, file)) => sparse::read_full_at(file, out, from)?,
                None => match self.backing_source() {
                    Some((source, _)) => source.read_full_at(out, from)?,
                    None => 0,
                },
            };
            if got != out.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("a layer of the replica ended at byte {}", from + got as u64),
                ));
            }
        }
        Ok(buf.len())
    }
}
