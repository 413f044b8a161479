//! Who holds a `flock` on a file, read from the kernel's lock table (`/proc/locks`) without
//! taking the lock: a reader that took it, even for an instant, could make its holder's own
//! attempt fail.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{IoContext, Result};

/// The pid holding an exclusive `flock` on `path`, if any (none when the file is missing).
pub fn exclusive_flock_holder(path: &Path) -> Result<Option<u32>> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(crate::error::Error::io(
                format!("cannot stat {}", path.display()),
                e,
            ))
        }
    };
    // The kernel hands `/proc/locks` out a page at a time and walks its list again for each:
    // a lock released meanwhile before ours shifts ours into the page already read, and it is
    // missed (a run of the unit tests, whose threads take and drop locks all the time, once
    // saw a held lock reported free). A miss is read again; a lock found is certain.
    for _ in 0..LOCK_TABLE_READS {
        let table =
            std::fs::read_to_string("/proc/locks").ctx(|| "cannot read /proc/locks".into())?;
        if let Some(pid) = holder_in(&table, meta.dev(), meta.ino()) {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

/// Reads of the lock table before a lock is taken for not held.
const LOCK_TABLE_READS: usize = 3;

/// Lines look like `1: FLOCK  ADVISORY  WRITE 14349 fe:00:10272884 0 EOF`: kind, mode, access,
/// pid, then the file as `major:minor:inode` (major and minor in hex).
fn holder_in(table: &str, dev: u64, ino: u64) -> Option<u32> {
    let file = format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A blocked waiter's line carries "->" after the index; it holds nothing.
        match fields.as_slice() {
            [_, "FLOCK", _, "WRITE", pid, f, ..] if *f == file => pid.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_of_an_exclusive_flock_is_found_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        assert_eq!(exclusive_flock_holder(&path).unwrap(), None);
        let file = std::fs::File::create(&path).unwrap();
        assert_eq!(exclusive_flock_holder(&path).unwrap(), None);
        file.lock().unwrap();
        assert_eq!(
            exclusive_flock_holder(&path).unwrap(),
            Some(std::process::id())
        );
        file.unlock().unwrap();
        assert_eq!(exclusive_flock_holder(&path).unwrap(), None);
        file.lock_shared().unwrap();
        assert_eq!(exclusive_flock_holder(&path).unwrap(), None);
    }

    #[test]
    fn lines_of_other_files_and_waiters_are_skipped() {
        let table = "1: FLOCK  ADVISORY  WRITE 10 fe:00:99 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 11 fe:01:7 0 EOF\n\
                     3: POSIX  ADVISORY  WRITE 12 fe:01:7 0 EOF\n\
                     4: FLOCK  ADVISORY  WRITE 13 fe:01:7 0 EOF\n";
        let dev = nix::sys::stat::makedev(0xfe, 1);
        assert_eq!(holder_in(table, dev, 7), Some(13));
        assert_eq!(holder_in(table, dev, 8), None);
    }
}
