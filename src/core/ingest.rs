//! Writing one copy of an image on a disk, the one pipeline that imports and repairs share (and
//! that export and receive will): data under a temporary name, hashed as it is written, fsync;
//! digest file and record; the rename that commits it; fsync of the directories.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::core::store::{DiskRow, ImageRow};
use crate::error::{CopyError, Error, IoContext, Result};
use crate::format::digests::CHUNK_SIZE;
use crate::format::layout::{CopyRecord, DiskLayout};
use crate::format::sparse::{self, CopyOutcome};

/// Drops a synced copy's pages from the page cache: readers go through the mount, which
/// caches what it serves, so the copy's own pages would only hold the image a second time.
pub fn drop_cached_pages(copy: &File) {
    let _ = nix::fcntl::posix_fadvise(
        copy,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Writes one copy on `disk`: the data under a temporary name and fsync; then its digest file
/// and record; then the rename that commits it, and fsync of the directories. With `expect`
/// (the image as imported), the data must hash to its SHA-512 and chunk digests, or nothing is
/// committed. `record` is completed with the hashes of what was written. A failure of the copy
/// itself is an `Error::Copy` that says which side failed (`from`, read from `from_path`, or
/// the new copy); the other failures (the disk's directories, digest file, record, rename) are
/// the target's.
pub fn write_copy(
    disk: &DiskRow,
    record: &CopyRecord,
    from: &File,
    from_path: &Path,
    expect: Option<&ImageRow>,
    progress: &mut dyn FnMut(u64, usize) -> std::result::Result<(), CopyError>,
) -> Result<CopyOutcome> {
    let layout = DiskLayout::new(&disk.path);
    layout.create_dirs()?;
    let (uuid, size) = (record.uuid.as_str(), record.size);
    let tmp = layout.tmp_copy_path(uuid);
    let failed = |error| Error::Copy {
        image: record.name.clone(),
        disk: disk.name.clone(),
        from: from_path.to_path_buf(),
        to: tmp.clone(),
        error,
    };
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&tmp)
        .map_err(|e| failed(CopyError::target(e)))?;
    let outcome = sparse::copy_sparse(from, Some(&dst), size, CHUNK_SIZE, progress)
        .and_then(|o| dst.sync_all().map(|()| o).map_err(CopyError::target))
        .map_err(failed)?;
    if let Some(image) = expect {
        if outcome.sha512 != image.sha512 || outcome.chunks.list_hash() != image.digests_hash {
            return Err(failed(CopyError::Mismatch));
        }
    }
    drop_cached_pages(&dst);
    layout.write_digests(uuid, &outcome.chunks)?;
    layout.write_record(&CopyRecord {
        sha512: outcome.sha512.clone(),
        digests_hash: outcome.chunks.list_hash(),
        ..record.clone()
    })?;
    let target = layout.copy_path(uuid);
    fs::rename(&tmp, &target).ctx(|| format!("cannot rename {}", tmp.display()))?;
    crate::format::layout::fsync_dir(target.parent().unwrap())?;
    crate::format::layout::fsync_dir(tmp.parent().unwrap())?;
    Ok(outcome)
}
