//! What a mount daemon records in the store: its mount, the files open through it, and the
//! counter that tells it another process changed the pool; and which entries of the kernel's
//! mount table are this pool's, live or left dead by a daemon that was killed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::*;
use crate::core::resources::{self, Freshness, Resources};
use crate::core::store::{CopyRow, DiskRow, ImageRow, ImageState, MountRow};
use crate::format::clock::now;
use crate::format::mountinfo::{self, MountEntry, MountSource};

impl Pool {
    /// Records a mount served by the daemon `pid`, alive while it holds the owner lock `owner`.
    pub fn register_mount(&self, mountpoint: &Path, pid: u32, owner: &str) -> Result<i64> {
        self.store.insert_mount(mountpoint, pid, now(), owner)
    }

    pub fn unregister_mount(&self, mount_id: i64) -> Result<()> {
        self.store.delete_mount(mount_id)
    }

    /// The lock a daemon holds from checking its mount point until its mount and binds are in
    /// place, so that two mounts of the pool started at once cannot both find the place free.
    pub fn mount_lock_path(&self) -> PathBuf {
        self.state_dir.join("mount.lock")
    }

    /// The source the mount recorded as `mount_id` carries in the kernel's mount table, it and
    /// each of its binds.
    pub fn mount_source(&self, mount_id: i64) -> MountSource {
        MountSource {
            pool: self.uuid.clone(),
            mount_id,
        }
    }

    /// Whether `entry` of the mount table is a mount (or bind) of this pool: `None` when it
    /// cannot tell (a mount made before mounts named their pool).
    pub fn owns_mount(&self, entry: &MountEntry) -> Option<bool> {
        MountSource::parse(&entry.source).map(|source| source.pool == self.uuid)
    }

    /// This pool's mounts and binds in the kernel's mount table whose daemon is gone: every
    /// access to them fails ("Transport endpoint is not connected") until they are unmounted.
    /// Binds come before the mounts they were made from. Told from the mount rows, never by
    /// touching the mount, which would hang on a daemon that is alive but stuck.
    pub fn dead_mounts(&self) -> Result<Vec<MountEntry>> {
        let before = mountinfo::read()?;
        // A daemon records its row (and holds its lock) before it mounts, and unmounts before it
        // lets go: a mount seen before the rows are read and still there after is dead exactly
        // when its row is not live.
        let live: HashSet<i64> = self.live_mounts()?.iter().map(|m| m.id).collect();
        let after = mountinfo::read()?;
        // Topmost first, binds before the mounts they were made from: the order to unmount in.
        let mut dead: Vec<MountEntry> = after
            .into_iter()
            .rev()
            .filter(|m| before.contains(m))
            .filter(|m| {
                MountSource::parse(&m.source)
                    .is_some_and(|s| s.pool == self.uuid && !live.contains(&s.mount_id))
            })
            .collect();
        dead.sort_by_key(|m| !m.is_bind());
        Ok(dead)
    }

    /// Every recorded mount, live or not (`live_mounts` tells them apart).
    pub fn mounts(&self) -> Result<Vec<MountRow>> {
        self.store.mounts()
    }

    /// Records one more file of a ready image open through `mount_id`; `false` when the image
    /// is gone or going (the open must then fail).
    pub fn open_handle(&self, mount_id: i64, image_id: i64) -> Result<bool> {
        self.store.open_handle(mount_id, image_id)
    }

    pub fn close_handle(&self, mount_id: i64, image_id: i64) -> Result<()> {
        self.store.close_handle(mount_id, image_id)
    }

    /// A counter that changes whenever another process commits a change to the pool.
    pub fn data_version(&self) -> Result<i64> {
        self.store.data_version()
    }

    /// For the mount daemon, whose own writes are open-file counts: see
    /// `Store::relax_durability`.
    pub fn relax_durability(&self) -> Result<()> {
        self.store.relax_durability()
    }

    /// The ready images and every copy row: what the mount's catalog is built from.
    pub fn catalog_rows(&self) -> Result<(Vec<ImageRow>, Vec<CopyRow>)> {
        let images = self
            .store
            .images()?
            .into_iter()
            .filter(|i| i.state == ImageState::Ready)
            .collect();
        Ok((images, self.store.all_copies()?))
    }

    /// A disk's capacity and free space as listings show them (free space at most
    /// `LISTING_FREE_TTL` old).
    pub fn listed_resources(&self, disk: &DiskRow) -> Result<Resources> {
        let freshness = Freshness::FreeWithin(resources::LISTING_FREE_TTL);
        resources::disk_resources(&self.store, disk, freshness, now())
    }
}
