//! What a mount daemon records in the store: its mount, the files open through it, and the
//! counter that tells it another process changed the pool.

use std::path::Path;

use super::*;
use crate::core::resources::{self, Freshness, Resources};
use crate::core::store::{CopyRow, DiskRow, ImageRow, ImageState, MountRow};
use crate::format::clock::now;

impl Pool {
    /// Records a mount served by the daemon `pid`, alive while it holds the owner lock `owner`.
    pub fn register_mount(&self, mountpoint: &Path, pid: u32, owner: &str) -> Result<i64> {
        self.store.insert_mount(mountpoint, pid, now(), owner)
    }

    pub fn unregister_mount(&self, mount_id: i64) -> Result<()> {
        self.store.delete_mount(mount_id)
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
