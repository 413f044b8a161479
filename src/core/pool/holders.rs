//! What keeps an image in the pool: its holders and the files open through live mounts; gc of
//! the images nothing keeps.

use std::time::Duration;

use super::*;
use crate::core::owner;
use crate::core::store::{HolderRow, MountRow};
use crate::error::{Error, Result};
use crate::format::clock::now;
use crate::format::names;

impl Pool {
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
        if !removed.is_empty() {
            tracing::info!(
                event = "gc",
                count = removed.len(),
                images = &*removed.join(","),
                "gc removed {} unreferenced image(s): {}",
                removed.len(),
                removed.join(", ")
            );
        }
        Ok(removed)
    }

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

    /// Mounts whose daemon was found dead: their open files count for nothing. (Asked this
    /// way round so that a mount that starts after the question counts.)
    pub(super) fn dead_mount_ids(&self) -> Result<Vec<i64>> {
        Ok(self
            .store
            .mounts()?
            .into_iter()
            .filter(|m| !owner::is_alive(&self.state_dir, &m.owner))
            .map(|m| m.id)
            .collect())
    }
}
