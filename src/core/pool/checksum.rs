//! An image's SHA-512 computed after its import committed (an export's: `WholeSha512::Later`):
//! read from its good copies, each chunk checked against its digest first, so the sum is the
//! sum of the content the image was imported with. Whoever needs the sum first computes it (the
//! mount daemon's background thread, `image checksum`, a send that names the image, a receive
//! matching a base, a scrub); the first to record it wins, and the others computed the same.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Pool;
use crate::core::state::ImageState;
use crate::core::store::ImageRow;
use crate::core::volume::BaseSource;
use crate::error::{CopyError, Error, ErrorKind, Result};
use crate::format::layout::DiskLayout;
use crate::format::sparse;

/// How often the background thread looks for images without a SHA-512.
const LOOK_EVERY: Duration = Duration::from_secs(2);
/// How long it leaves an image whose sum could not be computed before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(300);

impl Pool {
    /// The SHA-512 of `image`'s whole content: the recorded one, or computed now and recorded.
    /// `progress` is told the bytes hashed and may stop the computation (`CopyError::Stopped`).
    pub fn complete_sha512(
        &self,
        image: &ImageRow,
        progress: &mut dyn FnMut(u64) -> std::result::Result<(), CopyError>,
    ) -> Result<String> {
        let gone = || Error::UnknownImage(image.name.clone());
        let current = |store: &crate::core::store::Store| {
            store
                .image_by_name(&image.name)
                .map(|row| row.filter(|r| r.uuid == image.uuid && r.state == ImageState::Ready))
        };
        let row = current(&self.store)?.ok_or_else(gone)?;
        if let Some(sha512) = row.sha512 {
            return Ok(sha512);
        }
        let copies = self.verified_copies(row.id)?;
        let outcome = sparse::copy_sparse(
            &BaseSource(&copies),
            None,
            row.size,
            row.chunk_size,
            true,
            &mut |done, _| progress(done),
        )
        .map_err(|e| match e {
            CopyError::Stopped => Error::refused(
                ErrorKind::Interrupted,
                format!(
                    "the SHA-512 of image '{}' was not finished: it is computed again later",
                    row.name
                ),
            ),
            e => Error::refused(
                ErrorKind::DiskIo,
                format!("cannot compute the SHA-512 of image '{}': {e}", row.name),
            ),
        })?;
        let sha512 = outcome.sha512.expect("asked for the SHA-512");
        // Every chunk was checked against its digest as it was read: this cannot differ but
        // for a digest list that is not the image's.
        if outcome.chunks.list_hash() != row.digests_hash {
            return Err(Error::refused(
                ErrorKind::Corrupt,
                format!("the content of image '{}' read from its copies does not match its chunk digests: `imgpool scrub {}` checks its copies", row.name, row.name),
            ));
        }
        self.record_computed_sha512(&row, &sha512)
    }

    /// A ready image of `size` bytes whose content has SHA-512 `sha512`, if this pool has one
    /// (a received volume's base). Images of that size whose sum is not computed yet are
    /// hashed first: an exported image is found as soon as it is committed.
    pub fn ready_image_by_sha512(&self, sha512: &str, size: u64) -> Result<Option<ImageRow>> {
        if let Some(found) = self.store.ready_image_by_sha512(sha512)? {
            return Ok(Some(found));
        }
        let mut completed = false;
        for image in self.store.images_without_sha512()? {
            if image.size != size {
                continue;
            }
            match self.complete_sha512(&image, &mut |_| Ok(())) {
                Ok(_) => completed = true,
                Err(e) => tracing::warn!(image = %image.name, "{e}"),
            }
        }
        match completed {
            true => self.store.ready_image_by_sha512(sha512),
            false => Ok(None),
        }
    }

    /// Records `sha512`, computed from `image`'s content checked against its chunk digests,
    /// as its SHA-512, in the store and next to its copies. Returns the image's SHA-512: another
    /// process may have recorded it first (from the same content).
    pub(crate) fn record_computed_sha512(&self, image: &ImageRow, sha512: &str) -> Result<String> {
        if !self.store.record_sha512(image.id, &image.uuid, sha512)? {
            return self
                .store
                .image_by_name(&image.name)?
                .filter(|r| r.uuid == image.uuid)
                .and_then(|r| r.sha512)
                .ok_or_else(|| Error::UnknownImage(image.name.clone()));
        }
        self.record_sha512_on_copies(image, sha512);
        tracing::info!(image = %image.name, "computed the image's SHA-512");
        Ok(sha512.to_string())
    }

    /// Writes the SHA-512 into the records next to the image's copies (they were written with
    /// none). Best effort: a record without one is still the image's (fsck accepts it, and a
    /// rebuilt store computes the sum again).
    fn record_sha512_on_copies(&self, image: &ImageRow, sha512: &str) {
        let Ok(disks) = self.disks_in_service() else {
            return;
        };
        for (disk, _) in disks {
            let layout = DiskLayout::new(&disk.path);
            let Ok(mut record) = layout.read_record(&image.uuid) else {
                continue;
            };
            if record.sha512.is_empty() {
                record.sha512 = sha512.to_string();
                if let Err(e) = layout.write_record(&record) {
                    tracing::warn!(image = %image.name, disk = %disk.name, "cannot write the SHA-512 into the copy's record: {e}");
                }
            }
        }
    }

    /// The images whose SHA-512 is not computed yet, each computed in turn, until `stop`: the
    /// mount daemon's background work. An image whose sum fails is tried again later.
    pub fn complete_sha512s_in_background(&self, stop: &AtomicBool) {
        let mut failed: Vec<(String, Instant)> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            failed.retain(|(_, at)| at.elapsed() < RETRY_AFTER);
            let pending = match self.store.images_without_sha512() {
                Ok(pending) => pending,
                Err(e) => {
                    tracing::warn!("cannot list the images without a SHA-512: {e}");
                    Vec::new()
                }
            };
            for image in pending {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if failed.iter().any(|(uuid, _)| *uuid == image.uuid) {
                    continue;
                }
                let mut stopped = |_| match stop.load(Ordering::Relaxed) {
                    true => Err(CopyError::Stopped),
                    false => Ok(()),
                };
                match self.complete_sha512(&image, &mut stopped) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => return,
                    Err(e) => {
                        tracing::warn!(image = %image.name, "{e}");
                        failed.push((image.uuid, Instant::now()));
                    }
                }
            }
            sleep_unless_stopped(stop, LOOK_EVERY);
        }
    }
}

fn sleep_unless_stopped(stop: &AtomicBool, how_long: Duration) {
    let until = Instant::now() + how_long;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
}
