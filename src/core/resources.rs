//! Per-disk filesystem facts, read on demand and cached in the metadata store so that every
//! command and the daemon share them. Static facts (filesystem type, device, capacity) live a day;
//! free space is re-read when it is older than the caller can accept: placement asks for it
//! fresh, listings accept a short-lived value.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use crate::core::store::{DiskRow, ResourceRow, Store};
use crate::error::{IoContext, Result};

pub const STATIC_TTL: Duration = Duration::from_secs(24 * 3600);
/// How old a free-space figure may be in a listing.
pub const LISTING_FREE_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Free space read now: for placement, where a stale figure fills a disk.
    FreshFree,
    /// Free space at most this old.
    FreeWithin(Duration),
    /// As `FreeWithin`, for a listing, which only reads: figures read afresh are not saved.
    ListingWithin(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub fs_type: String,
    pub device: u64,
    pub capacity: u64,
    pub free: u64,
}

/// The one function every caller uses to learn a disk's resources.
pub(in crate::core) fn disk_resources(
    store: &Store,
    disk: &DiskRow,
    freshness: Freshness,
    now: i64,
) -> Result<Resources> {
    let cached = store.resources(disk.id)?;
    let static_fresh = cached
        .as_ref()
        .is_some_and(|c| age(c.static_at, now) < STATIC_TTL);
    let free_fresh = match freshness {
        Freshness::FreshFree => false,
        Freshness::FreeWithin(ttl) | Freshness::ListingWithin(ttl) => {
            cached.as_ref().is_some_and(|c| age(c.free_at, now) < ttl)
        }
    };
    let row = match cached {
        Some(row) if static_fresh && free_fresh => row,
        cached => {
            let probe = probe(&disk.path)?;
            let row = match cached {
                Some(old) if static_fresh => ResourceRow {
                    free: probe.free,
                    free_at: now,
                    ..old
                },
                _ => ResourceRow {
                    fs_type: probe.fs_type,
                    device: probe.device,
                    capacity: probe.capacity,
                    static_at: now,
                    free: probe.free,
                    free_at: now,
                },
            };
            if !matches!(freshness, Freshness::ListingWithin(_)) {
                store.save_resources(disk.id, &row)?;
            }
            row
        }
    };
    Ok(Resources {
        fs_type: row.fs_type,
        device: row.device,
        capacity: row.capacity,
        free: row.free,
    })
}

fn age(then: i64, now: i64) -> Duration {
    Duration::from_secs(now.saturating_sub(then).max(0) as u64)
}

/// Reads the facts from the filesystem that holds `path`.
pub fn probe(path: &Path) -> Result<Resources> {
    let vfs = nix::sys::statvfs::statvfs(path)
        .map_err(std::io::Error::from)
        .ctx(|| format!("cannot statvfs {}", path.display()))?;
    let fs = nix::sys::statfs::statfs(path)
        .map_err(std::io::Error::from)
        .ctx(|| format!("cannot statfs {}", path.display()))?;
    let device = std::fs::metadata(path)
        .ctx(|| format!("cannot stat {}", path.display()))?
        .dev();
    let fragment = vfs.fragment_size();
    Ok(Resources {
        fs_type: fs_type_name(fs.filesystem_type().0 as i64),
        device,
        capacity: vfs.blocks() * fragment,
        free: vfs.blocks_available() * fragment,
    })
}

/// Whether the filesystem that holds `path` is mounted read-only now (by the operator, or by
/// ext4 after an error with `errors=remount-ro`). Not cached: it changes with a remount. A
/// filesystem that cannot be asked counts as writable; writing to it says what is wrong.
pub fn read_only(path: &Path) -> bool {
    nix::sys::statvfs::statvfs(path)
        .is_ok_and(|vfs| vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

fn fs_type_name(magic: i64) -> String {
    match magic {
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlay".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x6573_5546 => "fuse".into(),
        other => format!("0x{other:x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with_disk(dir: &Path) -> (Store, DiskRow) {
        let store = Store::open(dir).unwrap();
        let disk = store.insert_disk("d1", dir, "uuid-1", 0).unwrap();
        (store, disk)
    }

    #[test]
    fn probe_reads_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let r = probe(dir.path()).unwrap();
        assert!(r.capacity > 0);
        assert!(r.free <= r.capacity);
        assert!(!r.fs_type.is_empty());
    }

    #[test]
    fn static_facts_are_cached_for_a_day_and_free_space_by_freshness() {
        let dir = tempfile::tempdir().unwrap();
        let (store, disk) = store_with_disk(dir.path());
        let first = disk_resources(&store, &disk, Freshness::FreshFree, 1000).unwrap();
        // Plant a recognisable cached value: a cache hit returns it, a probe overwrites it.
        let planted = ResourceRow {
            fs_type: "planted".into(),
            device: 1,
            capacity: 42,
            static_at: 1000,
            free: 7,
            free_at: 1000,
        };
        store.save_resources(disk.id, &planted).unwrap();

        let within = Freshness::FreeWithin(Duration::from_secs(30));
        let hit = disk_resources(&store, &disk, within, 1010).unwrap();
        assert_eq!((hit.capacity, hit.free), (42, 7));

        // Free space too old for the caller: re-read, static facts still cached.
        let refreshed = disk_resources(&store, &disk, within, 1100).unwrap();
        assert_eq!(refreshed.capacity, 42);
        assert_ne!(refreshed.free, 7);

        // Placement always reads free space now.
        store.save_resources(disk.id, &planted).unwrap();
        let fresh = disk_resources(&store, &disk, Freshness::FreshFree, 1001).unwrap();
        assert_eq!(fresh.fs_type, "planted");
        assert_ne!(fresh.free, 7);

        // After a day everything is read again.
        let day_later = disk_resources(&store, &disk, within, 1000 + 86_400).unwrap();
        assert_eq!(day_later.capacity, first.capacity);
        assert_eq!(day_later.fs_type, first.fs_type);
    }
}
