//! Which disks get the copies of a new image: distinct disks, most free space first, each with
//! room for the image's data plus a reserve, on distinct filesystems when the pool has enough of
//! them. Disks that share one filesystem share its free space, so a choice is charged against
//! the filesystem, not the directory.

use std::collections::HashMap;

/// A disk that may take a copy, with its free space read just now.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub disk_id: i64,
    pub name: String,
    pub device: u64,
    pub capacity: u64,
    pub free: u64,
}

/// The share of a filesystem that placement leaves free, so that a new copy never fills a disk
/// to the last block (other tenants of the filesystem, and its own metadata, need room).
pub fn reserve(capacity: u64) -> u64 {
    capacity / 100
}

/// Picks `copies` distinct disks for an image whose data takes `needed` bytes. On failure, says
/// in one phrase why no placement exists.
pub fn choose(candidates: &[Candidate], needed: u64, copies: u32) -> Result<Vec<i64>, String> {
    let copies = copies as usize;
    if candidates.len() < copies {
        return Err(format!(
            "{copies} copies need {copies} usable disks, the pool has {}",
            candidates.len()
        ));
    }
    let mut by_free: Vec<&Candidate> = candidates.iter().collect();
    by_free.sort_by(|a, b| b.free.cmp(&a.free).then(a.name.cmp(&b.name)));

    // First a copy per filesystem (copies on one filesystem die together), then, if the pool
    // has fewer filesystems than copies, disks that share one.
    let mut left_on_device: HashMap<u64, u64> = HashMap::new();
    let mut chosen: Vec<i64> = Vec::with_capacity(copies);
    for share_filesystems in [false, true] {
        for disk in &by_free {
            if chosen.contains(&disk.disk_id) {
                continue;
            }
            let used = left_on_device.contains_key(&disk.device);
            if used && !share_filesystems {
                continue;
            }
            let left = left_on_device.entry(disk.device).or_insert(disk.free);
            if *left >= needed.saturating_add(reserve(disk.capacity)) {
                *left -= needed;
                chosen.push(disk.disk_id);
                if chosen.len() == copies {
                    return Ok(chosen);
                }
            }
        }
    }
    let most_free = candidates.iter().map(|c| c.free).max().unwrap_or(0);
    Err(format!(
        "only {} of {copies} copies fit (the emptiest disk has {most_free} bytes free, each copy needs {needed} plus a 1% reserve)",
        chosen.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn disk(id: i64, device: u64, free: u64) -> Candidate {
        Candidate {
            disk_id: id,
            name: format!("d{id}"),
            device,
            capacity: 100 * GIB,
            free,
        }
    }

    #[test]
    fn picks_the_disks_with_most_free_space() {
        let disks = [
            disk(1, 1, 10 * GIB),
            disk(2, 2, 50 * GIB),
            disk(3, 3, 30 * GIB),
        ];
        assert_eq!(choose(&disks, GIB, 1).unwrap(), vec![2]);
        assert_eq!(choose(&disks, GIB, 2).unwrap(), vec![2, 3]);
        assert_eq!(choose(&disks, GIB, 3).unwrap(), vec![2, 3, 1]);
    }

    #[test]
    fn skips_disks_without_room_including_the_reserve() {
        // Disk 2 has the most space but not image + 1% of 100 GiB.
        let disks = [disk(1, 1, 10 * GIB), disk(2, 2, 5 * GIB + GIB / 2)];
        assert_eq!(choose(&disks, 5 * GIB, 1).unwrap(), vec![1]);
        let err = choose(&disks, 20 * GIB, 1).unwrap_err();
        assert!(err.contains("only 0 of 1"), "{err}");
    }

    #[test]
    fn copies_land_on_distinct_disks_or_fail() {
        let disks = [disk(1, 1, 50 * GIB), disk(2, 2, 50 * GIB)];
        let err = choose(&disks, GIB, 3).unwrap_err();
        assert!(err.contains("3 copies need 3 usable disks"), "{err}");
    }

    #[test]
    fn disks_on_one_filesystem_share_its_free_space() {
        // Two directories on one 10 GiB-free filesystem cannot both take a 6 GiB image.
        let disks = [
            disk(1, 7, 10 * GIB),
            disk(2, 7, 10 * GIB),
            disk(3, 8, 4 * GIB),
        ];
        let err = choose(&disks, 6 * GIB, 2).unwrap_err();
        assert!(err.contains("only 1 of 2"), "{err}");
        // Two copies go to two filesystems, although d2 has more room than d3.
        assert_eq!(choose(&disks, 3 * GIB, 2).unwrap(), vec![1, 3]);
        // Three copies on two filesystems: one filesystem takes two.
        assert_eq!(choose(&disks, GIB, 3).unwrap(), vec![1, 3, 2]);
    }
}
