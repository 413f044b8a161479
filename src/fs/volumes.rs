//! The mount's volumes: `volumes/<name>`, read-write files over `core::volume`, and their
//! snapshots, `snapshots/<name>/<snapshot>`, read-only files. A volume is opened (its index, its
//! data file and its writer lock) at the first open of its file or of one of its snapshots'
//! files, and closed, everything flushed, at the last release: while no file is open, commands
//! may change it. One `Volume` serves both kinds of file, so a snapshot read while the volume is
//! written needs no second writer lock, and deleting a snapshot being read goes to this daemon,
//! which knows it is open and refuses.
//!
//! The snapshot directories are listed and looked up through a read-only connection to each
//! volume's index (`SnapshotListings`), beside the writer's: a listing never waits for a write.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;

use crate::core::volume::{Base, SnapshotListing, Volume, WriterLock};
use crate::format::volume::VolumeFiles;

/// A ready volume as the mount sees it.
#[derive(Debug)]
pub struct VolumeEntry {
    pub id: i64,
    pub name: String,
    pub size: u64,
    pub files: VolumeFiles,
    pub image_id: Option<i64>,
    /// Its disk is in service: otherwise every open, read and write is EIO.
    pub in_service: bool,
    pub created: SystemTime,
}

struct Opened {
    volume: Arc<Volume>,
    name: String,
    /// Open files, and requests working on it (`acquire`).
    files: usize,
    _writer: WriterLock,
}

/// The volumes with open files, shared by all of them.
#[derive(Default)]
pub struct OpenVolumes {
    open: Mutex<HashMap<i64, Opened>>,
}

/// What a failed volume call answers: the errno of an I/O error, else EIO.
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl OpenVolumes {
    /// The volume for one more open file; `base` makes its base image reader the first time.
    pub fn open(
        &self,
        entry: &VolumeEntry,
        base: impl FnOnce() -> Result<Box<dyn Base>, i32>,
    ) -> Result<Arc<Volume>, i32> {
        if !entry.in_service {
            return Err(libc::EIO);
        }
        let mut open = self.open.lock();
        if let Some(opened) = open.get_mut(&entry.id) {
            opened.files += 1;
            return Ok(opened.volume.clone());
        }
        let writer = match WriterLock::try_acquire(&entry.files) {
            Ok(Some(writer)) => writer,
            // Another mount of the pool, or a command, writes it now.
            Ok(None) => return Err(libc::EBUSY),
            Err(e) => {
                tracing::error!("cannot lock volume '{}': {e}", entry.name);
                return Err(errno_of(&e));
            }
        };
        // Checked under the lock, which a receive holds while it writes the file: a volume with
        // a partial receive is not served until the receive is finished or aborted.
        if entry.files.receive_state().exists() {
            tracing::warn!(
                "volume '{}' holds a partial receive: not served until `imgpool recv --resume-token {}` (and a resumed stream) or `imgpool recv --abort {}` ends it",
                entry.name, entry.name, entry.name
            );
            return Err(libc::EBUSY);
        }
        let volume = Volume::open(&entry.files, base()?).map_err(|e| {
            tracing::error!("cannot open volume '{}': {e}", entry.name);
            errno_of(&e)
        })?;
        let volume = Arc::new(volume);
        resume_reclaim(&entry.name, &volume);
        open.insert(
            entry.id,
            Opened {
                volume: volume.clone(),
                name: entry.name.clone(),
                files: 1,
                _writer: writer,
            },
        );
        Ok(volume)
    }

    /// One open file of the volume is closed; the last one flushes and closes the volume.
    pub fn release(&self, id: i64, name: &str) {
        let mut open = self.open.lock();
        let Some(opened) = open.get_mut(&id) else {
            return;
        };
        opened.files -= 1;
        if opened.files == 0 {
            let opened = open.remove(&id).expect("present");
            if let Err(e) = opened.volume.shutdown() {
                tracing::error!("cannot flush volume '{name}' at its last close: {e}");
            }
        }
    }

    /// The volume if a file of it is open, held open until `release` as if one more file were:
    /// a request working on it keeps its writer lock.
    pub fn acquire(&self, id: i64) -> Option<Arc<Volume>> {
        let mut open = self.open.lock();
        let opened = open.get_mut(&id)?;
        opened.files += 1;
        Some(opened.volume.clone())
    }

    /// The volume if a file of it is open: its size is the authority then.
    pub fn get(&self, id: i64) -> Option<Arc<Volume>> {
        self.open.lock().get(&id).map(|o| o.volume.clone())
    }

    /// How many files of each open volume are open (requests working on one count as one).
    pub fn open_files(&self) -> BTreeMap<String, usize> {
        self.open
            .lock()
            .values()
            .map(|o| (o.name.clone(), o.files))
            .collect()
    }

    /// A volume whose disk went out of service: its open files read and write nothing more.
    pub fn take_out_of_service(&self, entry: &VolumeEntry) {
        if let Some(opened) = self.open.lock().get(&entry.id) {
            opened.volume.take_out_of_service(format!(
                "its disk went out of service (volume '{}')",
                entry.name
            ));
        }
    }

    /// At unmount: every open volume flushed and closed.
    pub fn shutdown(&self) {
        for (_, opened) in self.open.lock().drain() {
            if let Err(e) = opened.volume.shutdown() {
                tracing::error!("cannot flush a volume at unmount: {e}");
            }
        }
    }
}

/// A read connection to the index of each volume whose snapshot directory was looked at, kept
/// while the volume is in the catalog.
#[derive(Default)]
pub struct SnapshotListings {
    by_volume: Mutex<HashMap<i64, Arc<Mutex<SnapshotListing>>>>,
}

impl SnapshotListings {
    /// Runs `read` on the volume's listing, opened the first time. Only this volume's readers
    /// wait for each other meanwhile.
    pub fn read<T>(
        &self,
        entry: &VolumeEntry,
        read: impl FnOnce(&SnapshotListing) -> io::Result<T>,
    ) -> Result<T, i32> {
        if !entry.in_service {
            return Err(libc::EIO);
        }
        let listing = {
            let mut by_volume = self.by_volume.lock();
            match by_volume.get(&entry.id) {
                Some(listing) => listing.clone(),
                None => {
                    let listing = SnapshotListing::open(&entry.files).map_err(|e| {
                        tracing::error!(
                            "cannot read the snapshots of volume '{}': {e}",
                            entry.name
                        );
                        errno_of(&e)
                    })?;
                    let listing = Arc::new(Mutex::new(listing));
                    by_volume.insert(entry.id, listing.clone());
                    listing
                }
            }
        };
        let listing = listing.lock();
        read(&listing).map_err(|e| {
            tracing::error!("cannot read the snapshots of volume '{}': {e}", entry.name);
            errno_of(&e)
        })
    }

    /// Closes the listings of volumes that left the catalog (or whose disk failed).
    pub fn keep_only(&self, keep: impl Fn(i64) -> bool) {
        self.by_volume.lock().retain(|id, _| keep(*id));
    }
}

/// A reclaim that a crash (or a close) cut short goes on while the volume is open again, in a
/// thread of its own; it stops at the volume's last close (`Volume::reclaim` does nothing once
/// it is closed) and goes on at its next open.
fn resume_reclaim(name: &str, volume: &Arc<Volume>) {
    match volume.reclaim_pending() {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::error!("cannot read the reclaim still to do of volume '{name}': {e}");
            return;
        }
    }
    let volume = volume.clone();
    let name = name.to_string();
    let spawned = std::thread::Builder::new()
        .name("reclaim".into())
        .spawn(move || {
            if let Err(e) = volume.reclaim_throttled() {
                tracing::error!("cannot reclaim the space of volume '{name}': {e}");
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the reclaim of a volume: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::volume::NoBase;

    #[test]
    fn a_volume_with_a_partial_receive_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let files = VolumeFiles::new(dir.path());
        Volume::create(&files, 1 << 20, Box::new(NoBase))
            .unwrap()
            .close()
            .unwrap();
        let entry = VolumeEntry {
            id: 1,
            name: "v".into(),
            size: 1 << 20,
            files: files.clone(),
            image_id: None,
            in_service: true,
            created: SystemTime::now(),
        };
        let open = OpenVolumes::default();
        std::fs::write(files.receive_state(), b"{}").unwrap();
        let base = || Ok(Box::new(NoBase) as Box<dyn Base>);
        assert_eq!(open.open(&entry, base).err(), Some(libc::EBUSY));
        std::fs::remove_file(files.receive_state()).unwrap();
        assert!(open.open(&entry, base).is_ok());
        open.release(1, "v");
    }
}
