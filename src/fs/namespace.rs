//! The mount's namespace and file operations in plain Rust, with no FUSE types: `fuse.rs` maps
//! kernel requests onto these calls and errors onto errnos.
//!
//! ```text
//! /images/<name>                              the image (read-only file)
//! /disks/<disk>/<name>-<uuid>/backing         the same inode as /images/<name>
//! /disks/<disk>/<name>-<uuid>/backing.cfg     Longhorn's per-copy config (JSON)
//! /volumes/<name>                             a volume (read-write file, see `volumes`)
//! /snapshots/<name>/<snapshot>                 a snapshot of the volume (read-only file)
//! ```
//!
//! Inode numbers are computed from the store's ids, which are never reused, so one image is one
//! inode in every view and no inode table has to be kept. A snapshot's inode is its volume's id
//! and its epoch, which no other snapshot of any volume ever has, even one of the same name
//! taken after it was deleted: the kernel's pages of a snapshot file are always that snapshot's.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use serde_json::json;

use crate::core::pool::{self, Pool};
use crate::core::store::{DiskRow, FailedBy};
use crate::core::volume::{Base, NoBase, Snapshot, SnapshotReader, Volume};
use crate::error::Result;
use crate::format::layout::DiskLayout;
use crate::fs::cache::ReadData;
use crate::fs::ops::errno_name;
use crate::fs::read::{CopyLocation, ImageRef, ReadPath, ReadStats, Stream};
use crate::fs::volumes::{errno_of, OpenVolumes, SnapshotListings, VolumeEntry};

pub const ROOT_INO: u64 = 1;
const IMAGES_DIR_INO: u64 = 2;
const DISKS_DIR_INO: u64 = 3;
const VOLUMES_DIR_INO: u64 = 4;
const SNAPSHOTS_DIR_INO: u64 = 5;
const KIND_SHIFT: u32 = 56;
const DISK_SHIFT: u32 = 32;
const KIND_BACKING: u64 = 4;
const KIND_CONFIG: u64 = 5;
const KIND_DISK_DIR: u64 = 6;
const KIND_IMAGE_DIR: u64 = 7;
const KIND_VOLUME: u64 = 8;
const KIND_SNAPSHOT_DIR: u64 = 9;
const KIND_SNAPSHOT: u64 = 10;
/// The largest volume id and epoch a snapshot's inode number holds (24 and 32 bits).
const MAX_SNAPSHOT_VOLUME: i64 = 0xFF_FFFF;
const MAX_SNAPSHOT_EPOCH: u64 = 0xFFFF_FFFF;
/// Snapshots read from the index for one readdir call: about what the kernel's buffer takes
/// (the reader's getdents buffer, up to 128 KiB; `ls` asks 32 KiB, some 800 short names), so
/// one query answers a call, however many snapshots the directory has.
const SNAPSHOTS_PER_READDIR: usize = 1024;

/// How often disk health is re-read even when the store has not changed.
const HEALTH_RECHECK: Duration = Duration::from_secs(5);
/// After an image's first failed read is logged, further failures of it are counted and
/// logged at most this often (one line with the count), so a reader retrying a bad chunk does
/// not flood the log.
const READ_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

pub const IMAGES_DIR: &str = "images";
pub const DISKS_DIR: &str = "disks";
pub const VOLUMES_DIR: &str = "volumes";
pub const SNAPSHOTS_DIR: &str = "snapshots";
pub const BACKING: &str = "backing";
pub const BACKING_CFG: &str = "backing.cfg";

pub const XATTR_SHA512: &str = "user.imgpool.sha512";
pub const XATTR_UUID: &str = "user.imgpool.uuid";
pub const XATTR_NAME: &str = "user.imgpool.name";

/// What an inode number stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Root,
    ImagesDir,
    DisksDir,
    DiskDir {
        disk: i64,
    },
    ImageDir {
        disk: i64,
        image: i64,
    },
    /// `copy`: in passthrough mode, the disk id of the copy the kernel reads (each change of
    /// serving copy is a new inode, because the kernel binds one backing file to an inode);
    /// 0 in cached mode.
    Backing {
        image: i64,
        copy: i64,
    },
    Config {
        image: i64,
    },
    VolumesDir,
    Volume {
        volume: i64,
    },
    SnapshotsDir,
    /// `snapshots/<volume>/`
    SnapshotDir {
        volume: i64,
    },
    Snapshot {
        volume: i64,
        epoch: u64,
    },
}

impl Node {
    pub fn ino(self) -> u64 {
        let id = |kind: u64, disk: i64, image: i64| {
            (kind << KIND_SHIFT) | ((disk as u64) << DISK_SHIFT) | image as u64
        };
        match self {
            Node::Root => ROOT_INO,
            Node::ImagesDir => IMAGES_DIR_INO,
            Node::DisksDir => DISKS_DIR_INO,
            Node::DiskDir { disk } => id(KIND_DISK_DIR, disk, 0),
            Node::ImageDir { disk, image } => id(KIND_IMAGE_DIR, disk, image),
            Node::Backing { image, copy } => id(KIND_BACKING, copy, image),
            Node::Config { image } => id(KIND_CONFIG, 0, image),
            Node::VolumesDir => VOLUMES_DIR_INO,
            Node::Volume { volume } => id(KIND_VOLUME, 0, volume),
            Node::SnapshotsDir => SNAPSHOTS_DIR_INO,
            Node::SnapshotDir { volume } => id(KIND_SNAPSHOT_DIR, 0, volume),
            Node::Snapshot { volume, epoch } => id(KIND_SNAPSHOT, volume, epoch as i64),
        }
    }

    /// A snapshot's node; EOVERFLOW if its volume id or epoch does not fit an inode number
    /// (16 million volumes, 4 billion snapshots of one volume), rather than one that aliases.
    fn snapshot(volume: i64, epoch: u64) -> Result<Node, i32> {
        if !(0..=MAX_SNAPSHOT_VOLUME).contains(&volume) || epoch > MAX_SNAPSHOT_EPOCH {
            return Err(libc::EOVERFLOW);
        }
        Ok(Node::Snapshot { volume, epoch })
    }

    pub fn from_ino(ino: u64) -> Option<Node> {
        let disk = ((ino >> DISK_SHIFT) & 0xFF_FFFF) as i64;
        let image = (ino & 0xFFFF_FFFF) as i64;
        Some(match (ino >> KIND_SHIFT, ino) {
            (0, ROOT_INO) => Node::Root,
            (0, IMAGES_DIR_INO) => Node::ImagesDir,
            (0, DISKS_DIR_INO) => Node::DisksDir,
            (0, VOLUMES_DIR_INO) => Node::VolumesDir,
            (0, SNAPSHOTS_DIR_INO) => Node::SnapshotsDir,
            (KIND_VOLUME, _) => Node::Volume { volume: image },
            (KIND_SNAPSHOT_DIR, _) => Node::SnapshotDir { volume: image },
            (KIND_SNAPSHOT, _) => Node::Snapshot {
                volume: disk,
                epoch: image as u64,
            },
            (KIND_DISK_DIR, _) => Node::DiskDir { disk },
            (KIND_IMAGE_DIR, _) => Node::ImageDir { disk, image },
            (KIND_BACKING, _) => Node::Backing { image, copy: disk },
            (KIND_CONFIG, _) => Node::Config { image },
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Directory,
    File,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub blocks: u64,
    pub mtime: SystemTime,
    pub perm: u16,
    pub nlink: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: OsString,
    /// Where a listing resumes after this entry. Derived from the never-reused inode number, so
    /// a listing that spans a change of the directory neither skips nor repeats an entry.
    pub cookie: u64,
}

/// A name the kernel may still cache that is gone: `fuse.rs` tells the kernel to forget it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gone {
    pub parent: u64,
    pub name: OsString,
}

pub struct FsStats {
    pub capacity: u64,
    pub free: u64,
    pub files: u64,
}

/// A ready image as the mount sees it.
#[derive(Debug)]
pub struct Image {
    pub id: i64,
    pub name: String,
    pub uuid: String,
    pub size: u64,
    /// `None` until computed (an export's is computed after its import).
    pub sha512: Option<String>,
    pub real_size: u64,
    pub created: SystemTime,
    pub chunk_size: u64,
    pub digests_hash: String,
    pub copies: Vec<CopyLocation>,
    /// The disk of the first serving copy (0: none).
    pub serving_disk: i64,
    /// `<name>-<uuid>`: the directory Longhorn expects in each disk's view.
    pub dir_name: String,
    pub config: Vec<u8>,
}

impl Image {
    fn as_ref_for_read(&self) -> ImageRef<'_> {
        ImageRef {
            id: self.id,
            size: self.size,
            copies: &self.copies,
            chunk_size: self.chunk_size,
            digests_hash: &self.digests_hash,
        }
    }
}

#[derive(Debug, Clone)]
struct Disk {
    id: i64,
    name: String,
    path: PathBuf,
    healthy: bool,
    bind: BindWanted,
    row: DiskRow,
}

/// What the daemon does with a disk's bind mount at `<disk>/backing-images`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindWanted {
    /// In service: bound, and bound again when the bind goes missing or stale.
    Bound,
    /// Failed by the operator: its filesystem is fine and replicas on it may still use the
    /// bind, so one that exists stays; none is made.
    Kept,
    /// Its filesystem failed a probe or is not there: the bind is released, so that nothing
    /// of the daemon's keeps the filesystem busy (it can be unmounted, repaired and mounted
    /// again).
    Released,
}

/// A registered disk's view, as the bind mounts need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskBind {
    pub name: String,
    pub path: PathBuf,
    /// The inode of `disks/<name>`; it carries the disk's id, so a bind made of an earlier disk
    /// of that name (removed and added again) is told apart.
    pub ino: u64,
    pub wanted: BindWanted,
}

/// A snapshot of what the mount shows, rebuilt when the store changes.
#[derive(Default)]
struct Catalog {
    images: BTreeMap<String, Arc<Image>>,
    by_id: HashMap<i64, Arc<Image>>,
    disks: BTreeMap<String, Disk>,
    disk_ids: HashMap<i64, Disk>,
    volumes: BTreeMap<String, Arc<VolumeEntry>>,
    volume_ids: HashMap<i64, Arc<VolumeEntry>>,
}

enum Handle {
    Image {
        image: Arc<Image>,
        stream: Arc<Stream>,
    },
    Config(Arc<Image>),
    Volume {
        entry: Arc<VolumeEntry>,
        volume: Arc<Volume>,
    },
    Snapshot {
        entry: Arc<VolumeEntry>,
        reader: SnapshotReader,
    },
}

/// A volume's base image, read through the mount's read path (checked chunks, failover).
struct ImageBase {
    reader: Arc<ReadPath>,
    catalog: Arc<RwLock<Arc<Catalog>>>,
    image: i64,
    size: u64,
    stream: Arc<Stream>,
}

impl ImageBase {
    /// The image as the catalog has it now (its serving copies may have changed).
    fn image(&self) -> std::io::Result<Arc<Image>> {
        self.catalog
            .read()
            .by_id
            .get(&self.image)
            .cloned()
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EIO))
    }
}

impl Base for ImageBase {
    fn size(&self) -> u64 {
        self.size
    }

    fn seek(&self, offset: u64, hole: bool) -> std::io::Result<Option<u64>> {
        let image = self.image()?;
        match self.reader.seek(image.as_ref_for_read(), offset, hole) {
            Ok(found) => Ok(Some(found)),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let image = self.image()?;
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done).min(1 << 20) as u32;
            let data = self.reader.read(
                image.as_ref_for_read(),
                &self.stream,
                offset + done as u64,
                want,
                false,
            )?;
            if data.is_empty() {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            buf[done..done + data.len()].copy_from_slice(&data);
            done += data.len();
        }
        Ok(())
    }
}

pub struct PoolFs {
    pool: Pool,
    mount_id: i64,
    catalog: Arc<RwLock<Arc<Catalog>>>,
    /// Store version and time of the last catalog load.
    last_load: Mutex<Option<(i64, Instant)>>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_handle: AtomicU64,
    reader: Arc<ReadPath>,
    volumes: OpenVolumes,
    snapshot_listings: SnapshotListings,
    /// Names of snapshots deleted here, for the kernel to forget (`forget_snapshots`).
    forgotten: Mutex<Vec<Gone>>,
    mounted_at: SystemTime,
    /// Passthrough mode: an image's inode changes with its serving copy (see `Node::Backing`).
    inode_per_copy: AtomicBool,
    read_failures: Mutex<HashMap<i64, RepeatedFailures>>,
}

/// The failed reads of one image since its last log line.
struct RepeatedFailures {
    logged_at: Instant,
    since: u64,
}

fn longhorn_config(image: &Image) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(&json!({
        "name": image.name,
        "uuid": image.uuid,
        "size": image.size,
        "virtualSize": image.size,
        "realSize": image.real_size,
        // Empty until the image's SHA-512 is computed, as Longhorn writes it before it has one.
        "expectedChecksum": image.sha512.as_deref().unwrap_or_default(),
        "currentChecksum": image.sha512.as_deref().unwrap_or_default(),
        "modificationTime": humantime::format_rfc3339_seconds(image.created).to_string(),
    }))
    .expect("JSON values serialise");
    bytes.push(b'\n');
    bytes
}

impl PoolFs {
    /// Serves `pool` as mount `mount_id` (the row the daemon registered), reading through
    /// `reader`.
    pub fn new(pool: Pool, mount_id: i64, reader: ReadPath) -> Result<PoolFs> {
        let fs = PoolFs {
            pool,
            mount_id,
            catalog: Arc::new(RwLock::new(Arc::new(Catalog::default()))),
            last_load: Mutex::new(None),
            handles: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            reader: Arc::new(reader),
            volumes: OpenVolumes::default(),
            snapshot_listings: SnapshotListings::default(),
            forgotten: Mutex::default(),
            mounted_at: SystemTime::now(),
            inode_per_copy: AtomicBool::new(false),
            read_failures: Mutex::default(),
        };
        fs.refresh()?;
        Ok(fs)
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn mount_id(&self) -> i64 {
        self.mount_id
    }

    /// Called once the kernel agreed to passthrough: from then on an image's inode names its
    /// serving copy, so that new opens after a failover get a new inode with a healthy backing
    /// file while files open on the old copy keep the old inode.
    pub fn use_inode_per_copy(&self) {
        self.inode_per_copy.store(true, Ordering::Relaxed);
    }

    /// The inode an image's `backing` file has now.
    fn backing_node(&self, image: &Image) -> Node {
        let copy = if self.inode_per_copy.load(Ordering::Relaxed) {
            image.serving_disk
        } else {
            0
        };
        Node::Backing {
            image: image.id,
            copy,
        }
    }

    /// Whether the disk `name` carries its label now: its filesystem is mounted at its path.
    pub fn carries_label(&self, name: &str) -> bool {
        let row = self.catalog.read().disks.get(name).map(|d| d.row.clone());
        row.is_some_and(|row| self.pool.disk_health(&row) == pool::DiskHealth::Healthy)
    }

    /// Every registered disk's view, with what to do with its bind mount.
    pub fn disk_binds(&self) -> Vec<DiskBind> {
        self.catalog
            .read()
            .disks
            .values()
            .map(|d| DiskBind {
                name: d.name.clone(),
                path: d.path.clone(),
                ino: Node::DiskDir { disk: d.id }.ino(),
                wanted: d.bind,
            })
            .collect()
    }

    /// Reloads the catalog if the store changed since the last load, or if the last load is
    /// older than `HEALTH_RECHECK` (disk health changes without any store write); returns the
    /// names that disappeared, so that the kernel can be told to drop them.
    pub fn refresh(&self) -> Result<Vec<Gone>> {
        let version = self.pool.data_version()?;
        let mut last = self.last_load.lock();
        if last.is_some_and(|(seen, at)| seen == version && at.elapsed() < HEALTH_RECHECK) {
            return Ok(std::mem::take(&mut *self.forgotten.lock()));
        }
        let next = Arc::new(self.load()?);
        let first = last.is_none();
        // Recorded only once the load worked: a failed load is retried on the next call.
        *last = Some((version, Instant::now()));
        drop(last);
        let previous = std::mem::replace(&mut *self.catalog.write(), next.clone());
        for entry in next.volumes.values().filter(|v| !v.in_service) {
            self.volumes.take_out_of_service(entry);
        }
        if !first {
            log_catalog_changes(&previous, &next);
        }
        self.reader
            .close_stale(|id| next.by_id.get(&id).map(|i| i.as_ref_for_read()));
        // Taken once the load worked: a failed refresh leaves them for the next.
        let mut gone = std::mem::take(&mut *self.forgotten.lock());
        for (name, image) in &previous.images {
            if next.images.get(name).map(|i| i.id) != Some(image.id) {
                self.reader.forget(image.id);
                gone.push(Gone {
                    parent: IMAGES_DIR_INO,
                    name: name.into(),
                });
                for disk in previous.disks.values() {
                    gone.push(Gone {
                        parent: Node::DiskDir { disk: disk.id }.ino(),
                        name: image.dir_name.clone().into(),
                    });
                }
            }
        }
        if self.inode_per_copy.load(Ordering::Relaxed) {
            for image in previous.images.values() {
                let moved = next
                    .by_id
                    .get(&image.id)
                    .is_some_and(|n| n.serving_disk != image.serving_disk);
                if moved {
                    // The names now lead to a new inode: the kernel must look them up again.
                    gone.push(Gone {
                        parent: IMAGES_DIR_INO,
                        name: image.name.clone().into(),
                    });
                    for disk in previous.disks.values() {
                        gone.push(Gone {
                            parent: Node::ImageDir {
                                disk: disk.id,
                                image: image.id,
                            }
                            .ino(),
                            name: BACKING.into(),
                        });
                    }
                }
            }
        }
        for (name, volume) in &previous.volumes {
            if next.volumes.get(name).map(|v| v.id) != Some(volume.id) {
                for parent in [VOLUMES_DIR_INO, SNAPSHOTS_DIR_INO] {
                    gone.push(Gone {
                        parent,
                        name: name.into(),
                    });
                }
            }
        }
        // The index of a volume gone, or on a disk out of service, is not held open.
        self.snapshot_listings
            .keep_only(|id| next.volume_ids.get(&id).is_some_and(|v| v.in_service));
        for (name, disk) in &previous.disks {
            if next.disks.get(name).map(|d| d.id) != Some(disk.id) {
                gone.push(Gone {
                    parent: DISKS_DIR_INO,
                    name: name.into(),
                });
            }
        }
        Ok(gone)
    }

    fn load(&self) -> Result<Catalog> {
        let disks = self.pool.disks_in_service()?;
        let (images, copies) = self.pool.catalog_rows()?;
        let mut catalog = Catalog::default();
        for (d, serving) in &disks {
            let bind = if *serving {
                BindWanted::Bound
            } else if d.failed_by == Some(FailedBy::Operator) {
                BindWanted::Kept
            } else {
                BindWanted::Released
            };
            let disk = Disk {
                id: d.id,
                name: d.name.clone(),
                path: d.path.clone(),
                healthy: *serving,
                bind,
                row: d.clone(),
            };
            catalog.disk_ids.insert(d.id, disk.clone());
            catalog.disks.insert(d.name.clone(), disk);
        }
        for row in images {
            let copies: Vec<CopyLocation> = copies
                .iter()
                .filter(|c| c.image_id == row.id)
                .map(|c| {
                    let info = pool::copy_info(&row, c.clone(), &disks);
                    CopyLocation {
                        digests: DiskLayout::new(&c.disk.path).digests_path(&row.uuid),
                        path: info.path,
                        disk: info.disk,
                        disk_id: c.disk.id,
                        serving: info.serving,
                        damaged: info.serving && !info.good,
                    }
                })
                .collect();
            let mut image = Image {
                id: row.id,
                dir_name: format!("{}-{}", row.name, row.uuid),
                name: row.name,
                uuid: row.uuid,
                size: row.size,
                sha512: row.sha512,
                real_size: row.real_size,
                created: UNIX_EPOCH + Duration::from_secs(row.created.max(0) as u64),
                chunk_size: row.chunk_size,
                digests_hash: row.digests_hash,
                serving_disk: copies
                    .iter()
                    .find(|c| c.serving && !c.damaged)
                    .map_or(0, |c| c.disk_id),
                copies,
                config: Vec::new(),
            };
            image.config = longhorn_config(&image);
            let image = Arc::new(image);
            catalog.by_id.insert(image.id, image.clone());
            catalog.images.insert(image.name.clone(), image);
        }
        for (row, disk_path, in_service) in self.pool.volumes_to_serve()? {
            let entry = Arc::new(VolumeEntry {
                id: row.id,
                files: DiskLayout::new(&disk_path).volume_files(&row.uuid),
                name: row.name,
                size: row.size,
                image_id: row.image_id,
                in_service,
                created: UNIX_EPOCH + Duration::from_secs(row.created.max(0) as u64),
            });
            catalog.volume_ids.insert(entry.id, entry.clone());
            catalog.volumes.insert(entry.name.clone(), entry);
        }
        Ok(catalog)
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().clone()
    }

    fn dir_attr(&self, node: Node, subdirs: usize) -> Attr {
        Attr {
            ino: node.ino(),
            kind: Kind::Directory,
            size: 0,
            blocks: 0,
            mtime: self.mounted_at,
            perm: 0o555,
            nlink: 2 + subdirs as u32,
        }
    }

    fn attr_of(&self, catalog: &Catalog, node: Node) -> Result<Attr, i32> {
        let image = |id: i64| catalog.by_id.get(&id).ok_or(libc::ENOENT);
        let disk = |id: i64| catalog.disk_ids.get(&id).ok_or(libc::ENOENT);
        Ok(match node {
            Node::Root => self.dir_attr(node, 4),
            Node::VolumesDir => self.dir_attr(node, 0),
            Node::SnapshotsDir => self.dir_attr(node, catalog.volumes.len()),
            Node::SnapshotDir { volume } => {
                catalog.volume_ids.get(&volume).ok_or(libc::ENOENT)?;
                self.dir_attr(node, 0)
            }
            Node::Snapshot { volume, epoch } => {
                let entry = catalog.volume_ids.get(&volume).ok_or(libc::ENOENT)?;
                let snapshot = self
                    .snapshot_listings
                    .read(entry, |l| l.by_epoch(epoch))?
                    .ok_or(libc::ENOENT)?;
                snapshot_attr(node, &snapshot)
            }
            Node::Volume { volume } => {
                let entry = catalog.volume_ids.get(&volume).ok_or(libc::ENOENT)?;
                // An open volume knows its size best (a resize through the daemon).
                let size = self.volumes.get(volume).map_or(entry.size, |v| v.size());
                let blocks = {
                    use std::os::unix::fs::MetadataExt;
                    std::fs::metadata(entry.files.data()).map_or(0, |m| m.blocks())
                };
                Attr {
                    ino: node.ino(),
                    kind: Kind::File,
                    size,
                    blocks,
                    mtime: entry.created,
                    perm: 0o644,
                    nlink: 1,
                }
            }
            Node::ImagesDir => self.dir_attr(node, 0),
            Node::DisksDir => self.dir_attr(node, catalog.disks.len()),
            Node::DiskDir { disk: d } => {
                disk(d)?;
                self.dir_attr(node, catalog.images.len())
            }
            Node::ImageDir { disk: d, image: i } => {
                disk(d)?;
                image(i)?;
                self.dir_attr(node, 0)
            }
            Node::Backing { image: i, .. } => {
                let image = image(i)?;
                Attr {
                    ino: node.ino(),
                    kind: Kind::File,
                    size: image.size,
                    blocks: image.real_size.div_ceil(512),
                    mtime: image.created,
                    perm: 0o444,
                    // One entry under images/ and one per disk view.
                    nlink: 1 + catalog.disks.len() as u32,
                }
            }
            Node::Config { image: i } => {
                let image = image(i)?;
                Attr {
                    ino: node.ino(),
                    kind: Kind::File,
                    size: image.config.len() as u64,
                    blocks: (image.config.len() as u64).div_ceil(512),
                    mtime: image.created,
                    perm: 0o444,
                    nlink: catalog.disks.len() as u32,
                }
            }
        })
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, i32> {
        let node = Node::from_ino(ino).ok_or(libc::ENOENT)?;
        self.attr_of(&self.catalog(), node)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, i32> {
        let catalog = self.catalog();
        let name = name.to_str().ok_or(libc::ENOENT)?;
        let node = match Node::from_ino(parent).ok_or(libc::ENOENT)? {
            Node::Root => match name {
                IMAGES_DIR => Node::ImagesDir,
                DISKS_DIR => Node::DisksDir,
                VOLUMES_DIR => Node::VolumesDir,
                SNAPSHOTS_DIR => Node::SnapshotsDir,
                _ => return Err(libc::ENOENT),
            },
            Node::VolumesDir => Node::Volume {
                volume: catalog.volumes.get(name).ok_or(libc::ENOENT)?.id,
            },
            Node::SnapshotsDir => Node::SnapshotDir {
                volume: catalog.volumes.get(name).ok_or(libc::ENOENT)?.id,
            },
            Node::SnapshotDir { volume } => {
                let entry = catalog.volume_ids.get(&volume).ok_or(libc::ENOENT)?;
                let snapshot = self
                    .snapshot_listings
                    .read(entry, |l| l.by_name(name))?
                    .ok_or(libc::ENOENT)?;
                return Ok(snapshot_attr(
                    Node::snapshot(volume, snapshot.epoch)?,
                    &snapshot,
                ));
            }
            Node::ImagesDir => self.backing_node(catalog.images.get(name).ok_or(libc::ENOENT)?),
            Node::DisksDir => Node::DiskDir {
                disk: catalog.disks.get(name).ok_or(libc::ENOENT)?.id,
            },
            Node::DiskDir { disk } => {
                // `<name>-<uuid>`: the uuid is the fixed-length tail. Any name may arrive here,
                // so the split must not assume a character boundary.
                let split = name.len().checked_sub(37).ok_or(libc::ENOENT)?;
                let (image_name, suffix) = (name.get(..split), name.get(split..));
                let (Some(image_name), Some(suffix)) = (image_name, suffix) else {
                    return Err(libc::ENOENT);
                };
                let image = catalog.images.get(image_name).ok_or(libc::ENOENT)?;
                if suffix.strip_prefix('-') != Some(image.uuid.as_str()) {
                    return Err(libc::ENOENT);
                }
                Node::ImageDir {
                    disk,
                    image: image.id,
                }
            }
            Node::ImageDir { image, .. } => match name {
                BACKING => self.backing_node(catalog.by_id.get(&image).ok_or(libc::ENOENT)?),
                BACKING_CFG => Node::Config { image },
                _ => return Err(libc::ENOENT),
            },
            Node::Backing { .. }
            | Node::Config { .. }
            | Node::Volume { .. }
            | Node::Snapshot { .. } => return Err(libc::ENOTDIR),
        };
        self.attr_of(&catalog, node)
    }

    /// Snapshots this daemon deleted: their names go to the kernel at the next `refresh`
    /// (which the request then asks for), so that they leave the mount before the command
    /// returns. Snapshots deleted by a command, while no mount had the volume open, leave it
    /// when the kernel's entry expires (`TTL`, 1 s); none of them is open.
    pub fn forget_snapshots(&self, volume: &str, names: impl IntoIterator<Item = String>) {
        let Some(entry) = self.catalog().volumes.get(volume).cloned() else {
            return;
        };
        let parent = Node::SnapshotDir { volume: entry.id }.ino();
        self.forgotten
            .lock()
            .extend(names.into_iter().map(|name| Gone {
                parent,
                name: name.into(),
            }));
    }

    /// The entries of a directory after the one whose cookie is `after` (0: from the start):
    /// `.` and `..` first, then the children in inode order.
    pub fn readdir(&self, ino: u64, after: u64) -> Result<Vec<DirEntry>, i32> {
        let catalog = self.catalog();
        let node = Node::from_ino(ino).ok_or(libc::ENOENT)?;
        self.attr_of(&catalog, node)?;
        // Cookies 1 and 2 are `.` and `..`; children follow above them.
        let entry = |node: Node, kind: Kind, name: &str| DirEntry {
            ino: node.ino(),
            kind,
            name: name.into(),
            cookie: node.ino() + 3,
        };
        let dir = |node: Node, name: &str| entry(node, Kind::Directory, name);
        let file = |node: Node, name: &str| entry(node, Kind::File, name);
        let (parent, mut children) = match node {
            Node::Root => (
                Node::Root,
                vec![
                    dir(Node::ImagesDir, IMAGES_DIR),
                    dir(Node::DisksDir, DISKS_DIR),
                    dir(Node::VolumesDir, VOLUMES_DIR),
                    dir(Node::SnapshotsDir, SNAPSHOTS_DIR),
                ],
            ),
            Node::SnapshotsDir => (
                Node::Root,
                catalog
                    .volumes
                    .values()
                    .map(|v| dir(Node::SnapshotDir { volume: v.id }, &v.name))
                    .collect(),
            ),
            Node::VolumesDir => (
                Node::Root,
                catalog
                    .volumes
                    .values()
                    .map(|v| file(Node::Volume { volume: v.id }, &v.name))
                    .collect(),
            ),
            Node::ImagesDir => (
                Node::Root,
                catalog
                    .images
                    .values()
                    .map(|i| file(self.backing_node(i), &i.name))
                    .collect(),
            ),
            Node::DisksDir => (
                Node::Root,
                catalog
                    .disks
                    .values()
                    .map(|d| dir(Node::DiskDir { disk: d.id }, &d.name))
                    .collect(),
            ),
            Node::DiskDir { disk } => (
                Node::DisksDir,
                catalog
                    .images
                    .values()
                    .map(|i| dir(Node::ImageDir { disk, image: i.id }, &i.dir_name))
                    .collect(),
            ),
            Node::ImageDir { disk, image } => (
                Node::DiskDir { disk },
                vec![
                    file(
                        self.backing_node(catalog.by_id.get(&image).ok_or(libc::ENOENT)?),
                        BACKING,
                    ),
                    file(Node::Config { image }, BACKING_CFG),
                ],
            ),
            Node::Backing { .. }
            | Node::Config { .. }
            | Node::Volume { .. }
            | Node::Snapshot { .. } => return Err(libc::ENOTDIR),
            Node::SnapshotDir { volume } => return self.readdir_snapshots(&catalog, volume, after),
        };
        children.sort_by_key(|e| e.cookie);
        let mut entries = vec![
            DirEntry {
                cookie: 1,
                ..dir(node, ".")
            },
            DirEntry {
                cookie: 2,
                ..dir(parent, "..")
            },
        ];
        entries.append(&mut children);
        entries.retain(|e| e.cookie > after);
        Ok(entries)
    }

    /// One page of `snapshots/<volume>/`, after the entry whose cookie is `after`: `.` and `..`,
    /// then the snapshots in creation order, each with its epoch (+ 3) as cookie, read from the
    /// index a page at a time (a directory of a million snapshots is never held whole).
    fn readdir_snapshots(
        &self,
        catalog: &Catalog,
        volume: i64,
        after: u64,
    ) -> Result<Vec<DirEntry>, i32> {
        let entry = catalog.volume_ids.get(&volume).ok_or(libc::ENOENT)?;
        let this = Node::SnapshotDir { volume };
        let mut entries = Vec::new();
        for (cookie, node, name) in [(1, this, "."), (2, Node::SnapshotsDir, "..")] {
            if after < cookie {
                entries.push(DirEntry {
                    ino: node.ino(),
                    kind: Kind::Directory,
                    name: name.into(),
                    cookie,
                });
            }
        }
        let page = self.snapshot_listings.read(entry, |l| {
            l.after(after.saturating_sub(3), SNAPSHOTS_PER_READDIR)
        })?;
        entries.extend(page.into_iter().filter_map(|s| {
            // One whose inode cannot be made cannot be looked up either.
            let node = Node::snapshot(volume, s.epoch).ok()?;
            Some(DirEntry {
                ino: node.ino(),
                kind: Kind::File,
                name: s.name.into(),
                cookie: s.epoch + 3,
            })
        }));
        Ok(entries)
    }

    /// Opens a file; write access is EROFS for all but volumes.
    pub fn open(&self, ino: u64, write: bool) -> Result<u64, i32> {
        let catalog = self.catalog();
        let node = Node::from_ino(ino).ok_or(libc::ENOENT)?;
        let attr = self.attr_of(&catalog, node)?;
        if write && !matches!(node, Node::Volume { .. }) {
            return Err(libc::EROFS);
        }
        if attr.kind == Kind::Directory {
            return Err(libc::EISDIR);
        }
        let handle = match node {
            Node::Backing { image, copy } => {
                let image = catalog.by_id[&image].clone();
                if self.backing_node(&image).ino()
                    != (Node::Backing {
                        image: image.id,
                        copy,
                    })
                    .ino()
                {
                    // An inode of a copy that no longer serves: the kernel looks the name up
                    // again (it retries an open that gets ESTALE) and finds the current one.
                    return Err(libc::ESTALE);
                }
                self.reader
                    .ensure_open(image.as_ref_for_read())
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                // Recorded in the store so that `image rm` in another process sees the open.
                match self.pool.open_handle(self.mount_id, image.id) {
                    Ok(true) => {}
                    Ok(false) => return Err(libc::ENOENT),
                    Err(e) => {
                        tracing::error!("cannot record open of {}: {e}", image.name);
                        return Err(libc::EIO);
                    }
                }
                Handle::Image {
                    image,
                    stream: Arc::default(),
                }
            }
            Node::Config { image } => Handle::Config(catalog.by_id[&image].clone()),
            Node::Volume { volume } => {
                let entry = catalog.volume_ids[&volume].clone();
                let volume = self
                    .volumes
                    .open(&entry, || self.base_of(&catalog, &entry))?;
                Handle::Volume { entry, volume }
            }
            Node::Snapshot { volume, epoch } => {
                let entry = catalog.volume_ids[&volume].clone();
                let volume = self
                    .volumes
                    .open(&entry, || self.base_of(&catalog, &entry))?;
                match volume.open_snapshot(epoch) {
                    Ok(reader) => Handle::Snapshot { entry, reader },
                    Err(e) => {
                        self.volumes.release(entry.id, &entry.name);
                        // Deleted since it was looked up.
                        if e.kind() == std::io::ErrorKind::NotFound {
                            return Err(libc::ENOENT);
                        }
                        tracing::error!("cannot open a snapshot of volume '{}': {e}", entry.name);
                        return Err(errno_of(&e));
                    }
                }
            }
            _ => return Err(libc::EISDIR),
        };
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.write().insert(fh, Arc::new(handle));
        Ok(fh)
    }

    /// Reads an open file. `to_page_cache`: the kernel keeps what it gets (not O_DIRECT).
    pub fn read(
        &self,
        fh: u64,
        offset: u64,
        len: u32,
        to_page_cache: bool,
    ) -> Result<ReadData, i32> {
        let handle = self.handles.read().get(&fh).cloned().ok_or(libc::EBADF)?;
        match &*handle {
            Handle::Image { image, stream } => self
                .reader
                .read(
                    self.current(image).as_ref_for_read(),
                    stream,
                    offset,
                    len,
                    to_page_cache,
                )
                .map_err(|e| {
                    self.log_read_failure(image, offset, &e);
                    e.raw_os_error().unwrap_or(libc::EIO)
                }),
            Handle::Config(image) => {
                let config = &image.config;
                let start = (offset as usize).min(config.len());
                let end = start.saturating_add(len as usize).min(config.len());
                Ok(ReadData::Owned(config[start..end].to_vec()))
            }
            Handle::Volume { entry, volume } => {
                let mut buf = vec![0u8; len as usize];
                let n = volume.read_at(&mut buf, offset).map_err(|e| {
                    tracing::error!(
                        volume = entry.name.as_str(),
                        op = "read",
                        errno = errno_name(errno_of(&e)),
                        offset,
                        "read of volume '{}' at {offset} failed: {e}",
                        entry.name
                    );
                    errno_of(&e)
                })?;
                buf.truncate(n);
                Ok(ReadData::Owned(buf))
            }
            Handle::Snapshot { entry, reader } => {
                let mut buf = vec![0u8; len as usize];
                let n = reader.read_at(&mut buf, offset).map_err(|e| {
                    tracing::error!(
                        "read of snapshot '{}@{}' at {offset} failed: {e}",
                        entry.name,
                        reader.snapshot().name
                    );
                    errno_of(&e)
                })?;
                buf.truncate(n);
                Ok(ReadData::Owned(buf))
            }
        }
    }

    /// Logs an image's first failed read, then, at most every `READ_FAILURE_LOG_INTERVAL`, how
    /// many failed since (each copy's fault is logged once by the read path).
    fn log_read_failure(&self, image: &Image, offset: u64, error: &std::io::Error) {
        let mut failures = self.read_failures.lock();
        match failures.get_mut(&image.id) {
            None => {
                failures.insert(
                    image.id,
                    RepeatedFailures {
                        logged_at: Instant::now(),
                        since: 0,
                    },
                );
                tracing::error!(
                    image = image.name.as_str(),
                    op = "read",
                    errno = errno_name(error.raw_os_error().unwrap_or(libc::EIO)),
                    offset,
                    "read of {} at {offset} failed: {error} (further failed reads of it are counted, and logged at most every {} s)",
                    image.name,
                    READ_FAILURE_LOG_INTERVAL.as_secs()
                );
            }
            Some(repeated) if repeated.logged_at.elapsed() >= READ_FAILURE_LOG_INTERVAL => {
                tracing::error!(
                    "{} more reads of {} failed in the last {} s, the latest at {offset}: {error}",
                    repeated.since + 1,
                    image.name,
                    repeated.logged_at.elapsed().as_secs()
                );
                repeated.logged_at = Instant::now();
                repeated.since = 0;
            }
            Some(repeated) => repeated.since += 1,
        }
    }

    /// `lseek(SEEK_DATA)` (`hole` false) or `lseek(SEEK_HOLE)` on an open file: where data or
    /// a hole starts at or after `offset`. An image's holes are its chunks that read as zeros
    /// (from its digests); a volume's and a snapshot's, where neither it nor its image holds
    /// data; `backing.cfg` is all data.
    pub fn seek(&self, fh: u64, offset: u64, hole: bool) -> Result<u64, i32> {
        let handle = self.handles.read().get(&fh).cloned().ok_or(libc::EBADF)?;
        let all_data = |len: u64| match (offset < len, hole) {
            (false, _) => Err(libc::ENXIO),
            (true, false) => Ok(offset),
            (true, true) => Ok(len),
        };
        match &*handle {
            Handle::Image { image, .. } => self
                .reader
                .seek(self.current(image).as_ref_for_read(), offset, hole)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)),
            Handle::Config(image) => all_data(image.config.len() as u64),
            Handle::Volume { entry, volume } => match volume.seek(offset, hole) {
                Ok(Some(found)) => Ok(found),
                Ok(None) => Err(libc::ENXIO),
                Err(e) => {
                    tracing::error!("seek in volume '{}' failed: {e}", entry.name);
                    Err(errno_of(&e))
                }
            },
            Handle::Snapshot { entry, reader } => match reader.seek(offset, hole) {
                Ok(Some(found)) => Ok(found),
                Ok(None) => Err(libc::ENXIO),
                Err(e) => {
                    tracing::error!(
                        "seek in snapshot '{}@{}' failed: {e}",
                        entry.name,
                        reader.snapshot().name
                    );
                    Err(errno_of(&e))
                }
            },
        }
    }

    /// What a volume reads where it never wrote: its image, or zeros when it has none. An image
    /// the catalog does not have (yet) is an error: zeros in its place would be wrong bytes, and
    /// an unaligned write would make them durable.
    fn base_of(&self, catalog: &Catalog, entry: &VolumeEntry) -> Result<Box<dyn Base>, i32> {
        let Some(id) = entry.image_id else {
            return Ok(Box::new(NoBase));
        };
        let image = catalog.by_id.get(&id).ok_or_else(|| {
            tracing::error!(
                "volume '{}': its base image (id {id}) is not in the mount's catalog",
                entry.name
            );
            libc::EIO
        })?;
        Ok(Box::new(ImageBase {
            reader: self.reader.clone(),
            catalog: self.catalog.clone(),
            image: image.id,
            size: image.size,
            stream: Arc::default(),
        }))
    }

    fn open_volume(&self, fh: u64) -> Result<(Arc<VolumeEntry>, Arc<Volume>), i32> {
        let handle = self.handles.read().get(&fh).cloned().ok_or(libc::EBADF)?;
        match &*handle {
            Handle::Volume { entry, volume } => Ok((entry.clone(), volume.clone())),
            // Only volumes are ever opened for writing.
            _ => Err(libc::EROFS),
        }
    }

    /// Writes to an open volume; returns the bytes written.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let (entry, volume) = self.open_volume(fh)?;
        // A write across the end is cut there, as a disk does; one past it is EFBIG.
        let size = volume.size();
        let data = match size.checked_sub(offset) {
            Some(room) if room > 0 => &data[..data.len().min(room as usize)],
            _ => return Err(libc::EFBIG),
        };
        volume.write_at(data, offset).map_err(|e| {
            if e.raw_os_error() != Some(libc::EFBIG) {
                tracing::error!(
                    volume = entry.name.as_str(),
                    op = "write",
                    errno = errno_name(errno_of(&e)),
                    offset,
                    "write to volume '{}' at {offset} failed: {e}",
                    entry.name
                );
            }
            errno_of(&e)
        })?;
        Ok(data.len() as u32)
    }

    /// Makes an open volume's writes durable (fsync, fdatasync).
    pub fn fsync(&self, fh: u64) -> Result<(), i32> {
        let handle = self.handles.read().get(&fh).cloned().ok_or(libc::EBADF)?;
        match &*handle {
            Handle::Volume { entry, volume } => volume.flush().map_err(|e| {
                tracing::error!("fsync of volume '{}' failed: {e}", entry.name);
                errno_of(&e)
            }),
            // Images are durable from their import on.
            _ => Ok(()),
        }
    }

    /// fallocate on an open volume: discards (PUNCH_HOLE, ZERO_RANGE) free the range, which
    /// reads as zeros; plain allocation within the volume has nothing to do (a volume is thin).
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<(), i32> {
        let (entry, volume) = self.open_volume(fh)?;
        let discard = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        let known = discard | libc::FALLOC_FL_KEEP_SIZE;
        if mode & !known != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        let end = offset.checked_add(len).ok_or(libc::EFBIG)?;
        if end > volume.size() {
            // A volume does not grow by writes: `imgpool volume resize` does that.
            return Err(libc::EFBIG);
        }
        if mode & discard == 0 {
            return Ok(());
        }
        volume.discard(offset, len).map_err(|e| {
            tracing::error!("discard in volume '{}' at {offset} failed: {e}", entry.name);
            errno_of(&e)
        })
    }

    /// truncate: a volume keeps its size (only `imgpool volume resize` changes it); anything
    /// else is read-only.
    pub fn set_size(&self, ino: u64, size: u64) -> Result<Attr, i32> {
        let attr = self.getattr(ino)?;
        match Node::from_ino(ino) {
            Some(Node::Volume { .. }) if size == attr.size => Ok(attr),
            Some(Node::Volume { .. }) => Err(libc::EPERM),
            _ => Err(libc::EROFS),
        }
    }

    /// Runs `work` on the volume `name` if this mount has it open (`None` otherwise), keeping
    /// it open meanwhile; `work` answers whether the volume must stay held after it returns
    /// (and then calls `release_volume` itself).
    pub fn with_open_volume<T>(
        &self,
        name: &str,
        work: impl FnOnce(i64, &Arc<Volume>) -> (T, bool),
    ) -> Option<T> {
        let entry = self.catalog().volumes.get(name).cloned()?;
        let volume = self.volumes.acquire(entry.id)?;
        let (result, keep) = work(entry.id, &volume);
        if !keep {
            self.volumes.release(entry.id, &entry.name);
        }
        Some(result)
    }

    /// Lets go of a volume held by `with_open_volume`.
    pub fn release_volume(&self, id: i64) {
        let name = self
            .catalog()
            .volume_ids
            .get(&id)
            .map_or_else(String::new, |e| e.name.clone());
        self.volumes.release(id, &name);
    }

    /// Whether the inode may be opened for writing.
    pub fn writable(&self, ino: u64) -> bool {
        matches!(Node::from_ino(ino), Some(Node::Volume { .. }))
    }

    /// Whether the content of a read-only file can change: an image's `backing.cfg` gains its
    /// checksum when the image's SHA-512 is computed after its import (an export's).
    pub fn may_change(&self, ino: u64) -> bool {
        matches!(Node::from_ino(ino), Some(Node::Config { .. }))
    }

    /// At unmount: open volumes are flushed and closed.
    pub fn shutdown(&self) {
        self.volumes.shutdown();
    }

    /// A descriptor of the copy file behind an open image, and its path, for kernel
    /// passthrough; `None` for what the daemon serves itself: other files (`backing.cfg`), and
    /// an image whose only serving copies are damaged (the kernel would check no chunk).
    pub fn backing_file(&self, fh: u64) -> Option<std::io::Result<(std::fs::File, PathBuf)>> {
        let handle = self.handles.read().get(&fh).cloned()?;
        match &*handle {
            Handle::Image { image, .. } => {
                let image = self.current(image);
                if !image.copies.iter().any(|c| c.serving && !c.damaged) {
                    return None;
                }
                Some(self.reader.backing_file(image.as_ref_for_read()))
            }
            Handle::Config(_) | Handle::Volume { .. } | Handle::Snapshot { .. } => None,
        }
    }

    /// The image as the catalog has it now: an open file reads the copies that serve now, not
    /// the ones that served when it was opened.
    fn current(&self, opened: &Arc<Image>) -> Arc<Image> {
        self.catalog()
            .by_id
            .get(&opened.id)
            .cloned()
            .unwrap_or_else(|| opened.clone())
    }

    /// Sends copy faults seen on the read path to `sink` (the health monitor).
    pub fn report_faults_to(&self, sink: std::sync::mpsc::Sender<crate::core::health::CopyFault>) {
        self.reader.report_faults_to(sink);
    }

    pub fn release(&self, fh: u64) {
        let handle = self.handles.write().remove(&fh);
        match handle.as_deref() {
            Some(Handle::Image { image, .. }) => {
                if let Err(e) = self.pool.close_handle(self.mount_id, image.id) {
                    tracing::error!("cannot record close of {}: {e}", image.name);
                }
            }
            Some(Handle::Volume { entry, .. }) => self.volumes.release(entry.id, &entry.name),
            Some(Handle::Snapshot { entry, .. }) => {
                let entry = entry.clone();
                // The snapshot may be deleted once its reader is gone, before the volume is.
                drop(handle);
                self.volumes.release(entry.id, &entry.name);
            }
            _ => {}
        }
    }

    pub fn drop_cache(&self) {
        self.reader.drop_cache();
    }

    pub fn read_stats(&self) -> ReadStats {
        self.reader.stats()
    }

    pub fn volume_open_files(&self) -> BTreeMap<String, usize> {
        self.volumes.open_files()
    }

    fn xattrs(&self, ino: u64) -> Result<Vec<(&'static str, Vec<u8>)>, i32> {
        let catalog = self.catalog();
        let node = Node::from_ino(ino).ok_or(libc::ENOENT)?;
        self.attr_of(&catalog, node)?;
        Ok(match node {
            Node::Backing { image, .. } | Node::ImageDir { image, .. } => {
                let image = &catalog.by_id[&image];
                let mut xattrs = vec![
                    (XATTR_UUID, image.uuid.clone().into_bytes()),
                    (XATTR_NAME, image.name.clone().into_bytes()),
                ];
                // Absent (ENODATA) until computed.
                if let Some(sha512) = &image.sha512 {
                    xattrs.insert(0, (XATTR_SHA512, sha512.clone().into_bytes()));
                }
                xattrs
            }
            _ => Vec::new(),
        })
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, i32> {
        self.xattrs(ino)?
            .into_iter()
            .find(|(n, _)| OsStr::new(n) == name)
            .map(|(_, value)| value)
            .ok_or(libc::ENODATA)
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<&'static str>, i32> {
        Ok(self.xattrs(ino)?.into_iter().map(|(n, _)| n).collect())
    }

    /// Capacity and free space of the healthy disks, from the resource cache; disks sharing a
    /// filesystem count it once.
    pub fn statfs(&self) -> FsStats {
        let catalog = self.catalog();
        let mut stats = FsStats {
            capacity: 0,
            free: 0,
            files: catalog.images.len() as u64,
        };
        let mut devices_seen = Vec::new();
        for (disk, _) in self.pool.disks_in_service().unwrap_or_default() {
            if !catalog.disk_ids.get(&disk.id).is_some_and(|d| d.healthy) {
                continue;
            }
            if let Ok(r) = self.pool.listed_resources(&disk) {
                if !devices_seen.contains(&r.device) {
                    devices_seen.push(r.device);
                    stats.capacity += r.capacity;
                    stats.free += r.free;
                }
            }
        }
        stats
    }
}

/// A snapshot file: read-only, of the volume's size when it was taken. Its blocks count as all
/// allocated: what it holds is shared with the volume and its other snapshots (`snapshot list`
/// tells what is its alone), and a file claiming none would be archived as all holes by tools
/// that trust the count (`tar --sparse`); readers that want its holes ask SEEK_DATA/SEEK_HOLE.
fn snapshot_attr(node: Node, snapshot: &Snapshot) -> Attr {
    Attr {
        ino: node.ino(),
        kind: Kind::File,
        size: snapshot.size,
        blocks: snapshot.size.div_ceil(512),
        mtime: UNIX_EPOCH + Duration::from_secs(snapshot.created.max(0) as u64),
        perm: 0o444,
        nlink: 1,
    }
}

/// One log line for each image or volume that appeared in or left the mount (with its id, so
/// that a removal and a new one under the same name are two lines each).
fn log_catalog_changes(previous: &Catalog, next: &Catalog) {
    for (name, image) in &next.images {
        if previous.images.get(name).map(|i| i.id) != Some(image.id) {
            tracing::info!(
                event = "image_added",
                image = name.as_str(),
                uuid = %image.uuid,
                "image '{name}' is in the mount"
            );
        }
    }
    for (name, image) in &previous.images {
        if next.images.get(name).map(|i| i.id) != Some(image.id) {
            tracing::info!(
                event = "image_removed",
                image = name.as_str(),
                uuid = %image.uuid,
                "image '{name}' left the mount"
            );
        }
    }
    for (name, volume) in &next.volumes {
        if previous.volumes.get(name).map(|v| v.id) != Some(volume.id) {
            tracing::info!(
                event = "volume_added",
                volume = name.as_str(),
                volume_id = volume.id,
                size = volume.size,
                "volume '{name}' is in the mount"
            );
        }
    }
    for (name, volume) in &previous.volumes {
        if next.volumes.get(name).map(|v| v.id) != Some(volume.id) {
            tracing::info!(
                event = "volume_removed",
                volume = name.as_str(),
                volume_id = volume.id,
                "volume '{name}' left the mount"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_round_trip_and_do_not_collide() {
        let nodes = [
            Node::Root,
            Node::ImagesDir,
            Node::DisksDir,
            Node::DiskDir { disk: 3 },
            Node::ImageDir { disk: 3, image: 9 },
            Node::ImageDir { disk: 4, image: 9 },
            Node::Backing { image: 9, copy: 0 },
            Node::Backing { image: 9, copy: 3 },
            Node::Config { image: 9 },
            Node::Backing {
                image: 0xFFFF_FFFF,
                copy: 0xFF_FFFF,
            },
            Node::VolumesDir,
            Node::Volume { volume: 9 },
            Node::SnapshotsDir,
            Node::SnapshotDir { volume: 9 },
            Node::Snapshot {
                volume: 9,
                epoch: 3,
            },
            Node::Snapshot {
                volume: 3,
                epoch: 9,
            },
            Node::snapshot(MAX_SNAPSHOT_VOLUME, MAX_SNAPSHOT_EPOCH).unwrap(),
        ];
        let mut inos: Vec<u64> = nodes.iter().map(|n| n.ino()).collect();
        for (node, ino) in nodes.iter().zip(&inos) {
            assert_eq!(Node::from_ino(*ino), Some(*node));
        }
        inos.sort();
        inos.dedup();
        assert_eq!(inos.len(), nodes.len());
        assert_eq!(Node::from_ino(99), None);
        // Past what the bits hold, no inode rather than another's.
        assert_eq!(
            Node::snapshot(MAX_SNAPSHOT_VOLUME + 1, 1),
            Err(libc::EOVERFLOW)
        );
        assert_eq!(
            Node::snapshot(1, MAX_SNAPSHOT_EPOCH + 1),
            Err(libc::EOVERFLOW)
        );
    }

    fn pool_with_image(dir: &std::path::Path, bytes: &[u8]) -> (PoolFs, String) {
        let pool = Pool::init(&dir.join("state")).unwrap();
        for disk in ["d1", "d2"] {
            std::fs::create_dir(dir.join(disk)).unwrap();
            pool.add_disk(disk, &dir.join(disk)).unwrap();
        }
        std::fs::write(dir.join("src"), bytes).unwrap();
        let uuid = pool
            .add_image("img", &dir.join("src"), Some(1), &mut |_, _| {})
            .unwrap()
            .uuid;
        let mount = pool.register_mount(&dir.join("mnt"), 1, "test").unwrap();
        (PoolFs::new(pool, mount, ReadPath::default()).unwrap(), uuid)
    }

    fn walk(fs: &PoolFs, path: &[&str]) -> Result<Attr, i32> {
        let mut attr = fs.getattr(ROOT_INO)?;
        for name in path {
            attr = fs.lookup(attr.ino, OsStr::new(name))?;
        }
        Ok(attr)
    }

    #[test]
    fn every_view_resolves_to_one_inode_and_odd_names_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, uuid) = pool_with_image(dir.path(), b"hello image");
        let dir_name = format!("img-{uuid}");
        let direct = walk(&fs, &["images", "img"]).unwrap();
        for disk in ["d1", "d2"] {
            let via_disk = walk(&fs, &["disks", disk, &dir_name, BACKING]).unwrap();
            assert_eq!(via_disk, direct);
        }
        assert_eq!(direct.size, 11);
        assert_eq!(direct.nlink, 3);
        let cfg = walk(&fs, &["disks", "d1", &dir_name, BACKING_CFG]).unwrap();
        assert_ne!(cfg.ino, direct.ino);

        let disk_dir = walk(&fs, &["disks", "d1"]).unwrap().ino;
        let multibyte = format!("\u{e9}{}", "a".repeat(36));
        for name in [
            multibyte.as_str(),
            &format!("imgX{uuid}"),
            &format!("other-{uuid}"),
            "img",
            "",
        ] {
            assert_eq!(
                fs.lookup(disk_dir, OsStr::new(name)),
                Err(libc::ENOENT),
                "{name:?}"
            );
        }
        assert_eq!(walk(&fs, &["images", "img", "x"]), Err(libc::ENOTDIR));
        let names: Vec<OsString> = fs
            .readdir(disk_dir, 0)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(
            names,
            vec![OsString::from("."), "..".into(), dir_name.into()]
        );
    }

    #[test]
    fn opens_for_writing_fail_and_reads_stop_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, uuid) = pool_with_image(dir.path(), b"0123456789");
        let image = walk(&fs, &["images", "img"]).unwrap();
        assert_eq!(fs.open(image.ino, true), Err(libc::EROFS));
        assert_eq!(fs.open(ROOT_INO, false), Err(libc::EISDIR));
        let fh = fs.open(image.ino, false).unwrap();
        assert_eq!(&*fs.read(fh, 7, 100, true).unwrap(), b"789");
        assert!(fs.read(fh, 10, 100, true).unwrap().is_empty());
        fs.release(fh);
        assert_eq!(fs.read(fh, 0, 1, true).err(), Some(libc::EBADF));

        let cfg = walk(&fs, &["disks", "d2", &format!("img-{uuid}"), BACKING_CFG]).unwrap();
        let fh = fs.open(cfg.ino, false).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&fs.read(fh, 0, 4096, true).unwrap()).unwrap();
        assert_eq!(json["uuid"], uuid.as_str());
        assert_eq!(json["size"], 10);
        assert_eq!(json["expectedChecksum"], json["currentChecksum"]);
        assert_eq!(
            fs.getxattr(image.ino, OsStr::new(XATTR_UUID)).unwrap(),
            uuid.as_bytes()
        );
        assert_eq!(
            fs.getxattr(image.ino, OsStr::new("user.nope")),
            Err(libc::ENODATA)
        );
    }

    /// A snapshot request as the CLI makes it: here when no file of the volume is open, else
    /// through the daemon's path (`with_open_volume`).
    fn snapshot_request(
        fs: &PoolFs,
        volume: &str,
        request: crate::core::volume::requests::Request,
    ) -> Result<crate::core::volume::requests::Outcome> {
        use crate::core::volume::requests;
        match fs.with_open_volume(volume, |_, v| (requests::apply(v, volume, &request), false)) {
            Some(outcome) => outcome,
            None => Ok(fs
                .pool
                .snapshot_request(volume, &request)?
                .expect("not open elsewhere")),
        }
    }

    fn take(fs: &PoolFs, volume: &str, name: &str) {
        use crate::core::volume::requests::Request;
        let request = Request::Create {
            name: name.into(),
            guid: "g".into(),
            created: 1_700_000_000,
        };
        snapshot_request(fs, volume, request).unwrap();
    }

    fn delete(fs: &PoolFs, volume: &str, names: &[&str], dry_run: bool) -> Result<()> {
        use crate::core::volume::requests::{Request, Selection};
        let selection = Selection::Names(names.iter().map(|n| n.to_string()).collect());
        snapshot_request(fs, volume, Request::Delete { selection, dry_run }).map(|_| ())
    }

    #[test]
    fn snapshots_are_read_only_files_with_inodes_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, _) = pool_with_image(dir.path(), b"base");
        // Created by another connection, as by the CLI, for the refresh to see it.
        let cli = Pool::open(&dir.path().join("state")).unwrap();
        cli.create_volume("v", None, Some(1 << 20), None).unwrap();
        fs.refresh().unwrap();
        let live = walk(&fs, &["volumes", "v"]).unwrap();
        let fh = fs.open(live.ino, true).unwrap();
        fs.write(fh, 4096, b"first").unwrap();
        take(&fs, "v", "s1");
        fs.write(fh, 4096, b"later").unwrap();
        fs.release(fh);

        let s1 = walk(&fs, &["snapshots", "v", "s1"]).unwrap();
        assert_eq!((s1.size, s1.perm, s1.kind), (1 << 20, 0o444, Kind::File));
        assert_eq!(fs.open(s1.ino, true), Err(libc::EROFS));
        let fh = fs.open(s1.ino, false).unwrap();
        assert_eq!(&*fs.read(fh, 4096, 5, true).unwrap(), b"first");
        assert_eq!(fs.seek(fh, 0, false), Ok(4096));
        assert_eq!(fs.seek(fh, 4096, true), Ok(8192));
        assert_eq!(fs.seek(fh, 8192, false), Err(libc::ENXIO));
        assert_eq!(fs.write(fh, 0, b"x"), Err(libc::EROFS));
        // Open: its deletion is refused, naming it, and so is a dry run of it.
        for dry_run in [true, false] {
            let refused = delete(&fs, "v", &["s1"], dry_run).unwrap_err().to_string();
            assert!(
                refused.contains("'s1'") && refused.contains("open"),
                "{refused}"
            );
        }
        fs.release(fh);
        delete(&fs, "v", &["s1"], false).unwrap();
        assert_eq!(walk(&fs, &["snapshots", "v", "s1"]), Err(libc::ENOENT));
        assert_eq!(fs.getattr(s1.ino), Err(libc::ENOENT));
        // The same name again is another snapshot, with another inode.
        take(&fs, "v", "s1");
        let again = walk(&fs, &["snapshots", "v", "s1"]).unwrap();
        assert_ne!(again.ino, s1.ino);
        let fh = fs.open(again.ino, false).unwrap();
        assert_eq!(&*fs.read(fh, 4096, 5, true).unwrap(), b"later");
        fs.release(fh);
        assert_eq!(fs.open(s1.ino, false), Err(libc::ENOENT));
    }

    #[test]
    fn a_snapshot_directory_is_listed_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, _) = pool_with_image(dir.path(), b"base");
        // Created by another connection, as by the CLI, for the refresh to see it.
        let cli = Pool::open(&dir.path().join("state")).unwrap();
        cli.create_volume("v", None, Some(1 << 20), None).unwrap();
        fs.refresh().unwrap();
        let count = SNAPSHOTS_PER_READDIR * 2 + 10;
        // Held open meanwhile: each snapshot is one commit, not an open and close of the volume.
        let held = fs
            .open(walk(&fs, &["volumes", "v"]).unwrap().ino, false)
            .unwrap();
        for i in 0..count {
            take(&fs, "v", &format!("s{i}"));
        }
        let snapshots = walk(&fs, &["snapshots"]).unwrap().ino;
        let names = |entries: &[DirEntry]| -> Vec<String> {
            entries
                .iter()
                .map(|e| e.name.clone().into_string().unwrap())
                .collect()
        };
        assert_eq!(names(&fs.readdir(snapshots, 0).unwrap()), [".", "..", "v"]);
        let v = walk(&fs, &["snapshots", "v"]).unwrap().ino;
        let later = format!("s{}", SNAPSHOTS_PER_READDIR + 100);
        let mut listed = Vec::new();
        let mut after = 0;
        let mut calls = 0;
        loop {
            let page = fs.readdir(v, after).unwrap();
            assert!(page.len() <= SNAPSHOTS_PER_READDIR + 2);
            let Some(last) = page.last() else { break };
            after = last.cookie;
            listed.extend(names(&page));
            calls += 1;
            if calls == 1 {
                // Deleted between two calls, one listed already and one not: the listing
                // neither repeats nor skips the others.
                delete(&fs, "v", &["s0", &later], false).unwrap();
            }
        }
        let mut expected = vec![".".to_string(), "..".to_string()];
        expected.extend((0..count).map(|i| format!("s{i}")).filter(|n| *n != later));
        assert!(
            listed == expected,
            "listed {} names, not the {} expected",
            listed.len(),
            expected.len()
        );
        assert_eq!(calls, 3);
        for entry in fs.readdir(v, 2).unwrap().iter().take(3) {
            let looked_up = fs.lookup(v, &entry.name).unwrap();
            assert_eq!(looked_up.ino, entry.ino);
        }
        fs.release(held);
    }

    #[test]
    fn a_listing_resumes_after_its_cookie_even_when_the_directory_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, _) = pool_with_image(dir.path(), b"a");
        // Changes come from another connection, as from a CLI command.
        let cli = Pool::open(&dir.path().join("state")).unwrap();
        for name in ["b", "c"] {
            let src = dir.path().join(name);
            std::fs::write(&src, name).unwrap();
            cli.add_image(name, &src, Some(1), &mut |_, _| {}).unwrap();
        }
        fs.refresh().unwrap();
        let images = walk(&fs, &["images"]).unwrap().ino;
        let names = |after| -> Vec<String> {
            fs.readdir(images, after)
                .unwrap()
                .into_iter()
                .map(|e| e.name.into_string().unwrap())
                .collect()
        };
        let all = fs.readdir(images, 0).unwrap();
        assert_eq!(names(0), [".", "..", "img", "b", "c"]);
        let after_b = all[3].cookie;
        assert_eq!(names(after_b), ["c"]);
        // The first image goes away between two calls: the listing neither repeats nor skips.
        cli.remove_image("img").unwrap();
        let gone = fs.refresh().unwrap();
        assert!(gone.iter().any(|g| g.name == "img" && g.parent == images));
        assert_eq!(names(all[2].cookie), ["b", "c"]);
        assert_eq!(names(after_b), ["c"]);
    }
}
