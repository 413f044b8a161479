//! What a volume keeps on its disk: a directory per volume, next to the image copies.
//!
//! ```text
//! <disk>/.imgpool/volumes/<uuid>/volume.json   its record: pool, name, uuid, base image, created
//! <disk>/.imgpool/volumes/<uuid>/index.db      the block map with its versions, the snapshots,
//!                                             the free slots and the reclaim still to do (SQLite)
//! <disk>/.imgpool/volumes/<uuid>/data          the written blocks, in 64 KiB slots (sparse)
//! <disk>/.imgpool/volumes/<uuid>/writer.lock   flock of the one process that writes it
//! <disk>/.imgpool/volumes/<uuid>/content-sums.db  the content sums of its snapshots, by guid
//!                                             (send/receive; a cache: lost, it is computed)
//! ```
//!
//! The volume's logical address space is cut into granules of `GRANULE` bytes; each granule's
//! content at each epoch is one row of the index (see `docs/on-disk-format.md`, "Volumes").

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The unit a volume is written and discarded in, and the alignment O_DIRECT writers use.
pub const BLOCK: u64 = 4096;

/// The unit of the block map: one index row per granule version, one slot of the data file.
/// The same size as an image chunk, so that a granule's base data is one chunk of the image.
pub const GRANULE: u64 = 64 * 1024;

/// Blocks per granule: the width of the masks in an index row.
pub const BLOCKS_PER_GRANULE: u32 = (GRANULE / BLOCK) as u32;

/// The volume format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// What a volume is, on its disk: enough to rebuild the store's row without the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub format: u32,
    pub pool_uuid: String,
    pub name: String,
    pub uuid: String,
    pub created: i64,
    /// The image whose data reads where the volume never wrote, if any.
    pub base: Option<BaseImageRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseImageRef {
    pub name: String,
    pub uuid: String,
    pub size: u64,
}

/// The files of one volume.
#[derive(Debug, Clone)]
pub struct VolumeFiles {
    dir: PathBuf,
}

impl VolumeFiles {
    pub fn new(dir: &Path) -> VolumeFiles {
        VolumeFiles {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn record(&self) -> PathBuf {
        self.dir.join("volume.json")
    }

    pub fn index(&self) -> PathBuf {
        self.dir.join("index.db")
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Locked (flock) by the one process that may write the volume.
    pub fn writer_lock(&self) -> PathBuf {
        self.dir.join("writer.lock")
    }

    /// The content sums of its snapshots (`core::volume::sums`), apart from the index so that
    /// a sender may record one while a mount daemon writes the volume.
    pub fn content_sums(&self) -> PathBuf {
        self.dir.join("content-sums.db")
    }

    /// Present while a receive into the volume is partial and resumable (`core::pool::recv`):
    /// until it goes, neither the mount nor a command may change the volume.
    pub fn receive_state(&self) -> PathBuf {
        self.dir.join("receive.json")
    }
}
