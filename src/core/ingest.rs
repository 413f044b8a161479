//! Writing one copy of an image on a disk, the one pipeline that imports and repairs share (and
//! that export and receive will): data under a temporary name, hashed as it is written, fsync;
//! digest file and record; the rename that commits it; fsync of the directories.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::core::store::{DiskRow, ImageRow};
use crate::error::{CopyError, Error, IoContext, Result};
use crate::format::digests::CHUNK_SIZE;
use crate::format::layout::{start_writeback, write_durably, CopyRecord, DiskLayout};
use crate::format::sparse::{self, CopyOutcome, SparseSource};
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

/// A file being imported: a regular file or a block device, not empty, with what its metadata
/// said when it was opened.
pub struct Source {
    pub file: File,
    pub size: u64,
    opened: Stamp,
}

/// What a write to a file changes: its size, its mtime and its ctime (which, unlike the mtime,
/// nobody can set back).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub(crate) fn of(meta: &Metadata) -> Stamp {
        Stamp {
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Opens an image source for reading. Its type is checked before the open (opening a device
/// can have effects of its own) and again on the descriptor (the path may have been swapped
/// meanwhile). The open does not block: opening a FIFO for reading waits for a writer, forever
/// if none comes.
pub fn open_source(path: &Path) -> Result<Source> {
    let is_image = |meta: &Metadata| {
        let kind = meta.file_type();
        kind.is_file() || kind.is_block_device()
    };
    let meta = fs::metadata(path).ctx(|| format!("cannot open image file {}", path.display()))?;
    if !is_image(&meta) {
        return Err(Error::NotAnImage(path.to_path_buf()));
    }
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .ctx(|| format!("cannot open image file {}", path.display()))?;
    let meta = file
        .metadata()
        .ctx(|| format!("cannot stat {}", path.display()))?;
    if !is_image(&meta) {
        return Err(Error::NotAnImage(path.to_path_buf()));
    }
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(|e| Error::io(format!("cannot read {}", path.display()), e.into()))?;
    let size = file
        .seek(SeekFrom::End(0))
        .ctx(|| format!("cannot read the size of {}", path.display()))?;
    if size == 0 {
        return Err(Error::EmptyImage(path.to_path_buf()));
    }
    Ok(Source {
        file,
        size,
        opened: Stamp::of(&meta),
    })
}

impl Source {
    /// Fails when the file was written since it was opened: its bytes were read while they
    /// changed, so what was read may be no version of the file at all. (A block device's node
    /// keeps its times when the device is written: only its size is checked.)
    pub fn check_unchanged(&self, path: &Path) -> Result<()> {
        let now = self
            .file
            .metadata()
            .ctx(|| format!("cannot stat {}", path.display()))?;
        if Stamp::of(&now) == self.opened {
            Ok(())
        } else {
            Err(Error::SourceChanged(path.to_path_buf()))
        }
    }
}

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
    from: &dyn SparseSource,
    from_path: &Path,
    expect: Option<&ImageRow>,
    with_sha512: bool,
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
    let outcome = sparse::copy_sparse(from, Some(&dst), size, CHUNK_SIZE, with_sha512, progress)
        .and_then(|o| dst.sync_all().map(|()| o).map_err(CopyError::target))
        .map_err(failed)?;
    if let Some(image) = expect {
        // A SHA-512 not known yet cannot be compared; the chunk digests cover every byte.
        let sha512_differs = matches!((&outcome.sha512, &image.sha512), (Some(ours), Some(theirs)) if ours != theirs);
        if sha512_differs || outcome.chunks.list_hash() != image.digests_hash {
            return Err(failed(CopyError::Mismatch));
        }
    }
    drop_cached_pages(&dst);
    layout.write_digests(uuid, &outcome.chunks)?;
    layout.write_record(&CopyRecord {
        sha512: outcome
            .sha512
            .clone()
            .unwrap_or_else(|| record.sha512.clone()),
        digests_hash: outcome.chunks.list_hash(),
        ..record.clone()
    })?;
    let target = layout.copy_path(uuid);
    fs::rename(&tmp, &target).ctx(|| format!("cannot rename {}", tmp.display()))?;
    crate::format::layout::fsync_dir(target.parent().unwrap())?;
    crate::format::layout::fsync_dir(tmp.parent().unwrap())?;
    Ok(outcome)
}

/// Bytes a resumable copy writes between two starts of its writeback: its syncs then find
/// most of it on the disk already, instead of all of it at once.
const WRITEBACK: u64 = 32 << 20;
/// How often a resumable copy makes what it wrote durable and records how far it got.
const CHECKPOINT: u64 = 64 << 20;
/// A partial copy nobody resumed for this long is removed (`recover`).
const PARTIAL_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// What `<partial>/<id>.json` says: the first `done` bytes of the copy of `source` (`size`
/// bytes) are durable in `<id>.img`.
#[derive(Debug, Serialize, Deserialize)]
struct PartialProgress {
    source: String,
    size: u64,
    done: u64,
}

/// The file name of the partial copy of a source with identity `key`.
fn source_id(key: &str) -> String {
    use sha2::{Digest, Sha512};
    hex::encode(&Sha512::digest(key.as_bytes())[..16])
}

/// How far an interrupted copy of the source `key` got on `disk`, if it left one there.
pub fn partial_done(disk: &DiskRow, key: &str, size: u64) -> Option<u64> {
    let layout = DiskLayout::new(&disk.path);
    let bytes = fs::read(layout.partial_progress_path(&source_id(key))).ok()?;
    let progress: PartialProgress = serde_json::from_slice(&bytes).ok()?;
    (progress.source == key && progress.size == size).then_some(progress.done)
}

/// `write_copy` for the first copy of an import whose source has a stable identity `key` (a
/// volume's snapshot): the data goes to a partial copy that survives the process, made durable
/// every `CHECKPOINT` bytes, and a later import of the same source resumes it where it was
/// durable instead of starting over. Returns the outcome and the byte it resumed at. When
/// another process is writing the same partial copy, this one writes its own, from the start.
pub fn write_resumable_copy(
    disk: &DiskRow,
    record: &CopyRecord,
    from: &dyn SparseSource,
    from_path: &Path,
    key: &str,
    with_sha512: bool,
    progress: &mut dyn FnMut(u64, usize) -> std::result::Result<(), CopyError>,
) -> Result<(CopyOutcome, u64)> {
    let layout = DiskLayout::new(&disk.path);
    layout.create_dirs()?;
    let dir = layout.partial_dir();
    fs::create_dir_all(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
    let id = source_id(key);
    let (path, progress_path) = (
        layout.partial_copy_path(&id),
        layout.partial_progress_path(&id),
    );
    let dst = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o444)
        .open(&path)
        .ctx(|| format!("cannot open {}", path.display()))?;
    match dst.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return write_copy(disk, record, from, from_path, None, with_sha512, progress)
                .map(|o| (o, 0))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::io(format!("cannot lock {}", path.display()), e))
        }
    }
    let size = record.size;
    let done = partial_done(disk, key, size).unwrap_or(0);
    let failed = |error| Error::Copy {
        image: record.name.clone(),
        disk: disk.name.clone(),
        from: from_path.to_path_buf(),
        to: path.clone(),
        error,
    };
    // Past the last checkpoint the file may hold anything: cut there.
    dst.set_len(done)
        .map_err(|e| failed(CopyError::target(e)))?;
    let reached = Reached {
        at: Mutex::new((done, false)),
        changed: Condvar::new(),
    };
    let (copied, checkpointed) = std::thread::scope(|scope| {
        let checkpoints = scope.spawn(|| {
            let record = |at| PartialProgress {
                source: key.to_string(),
                size,
                done: at,
            };
            make_durable_behind(&dst, &reached, done, size, &|at| {
                write_durably(
                    &progress_path,
                    &serde_json::to_vec(&record(at)).expect("serialises"),
                )
                .map_err(|e| std::io::Error::other(e.to_string()))
            })
        });
        // Told however the copy ends, a panic too: the scope waits for the thread.
        let ends = Ends(&reached);
        let copied = sparse::resume_sparse(
            from,
            Some(&dst),
            done,
            size,
            CHUNK_SIZE,
            with_sha512,
            &mut |at, n| {
                progress(at, n)?;
                // Ended before the copy: it failed, and its error is the copy's.
                if checkpoints.is_finished() {
                    return Err(CopyError::Stopped);
                }
                reached.advance(at);
                Ok(())
            },
        );
        drop(ends);
        let checkpointed = checkpoints.join().expect("the checkpoints do not panic");
        (copied, checkpointed)
    });
    let outcome = checkpointed
        .map_err(CopyError::target)
        .and(copied)
        .and_then(|o| dst.sync_all().map(|()| o).map_err(CopyError::target))
        .map_err(failed)?;
    drop_cached_pages(&dst);
    layout.write_digests(&record.uuid, &outcome.chunks)?;
    layout.write_record(&CopyRecord {
        sha512: outcome
            .sha512
            .clone()
            .unwrap_or_else(|| record.sha512.clone()),
        digests_hash: outcome.chunks.list_hash(),
        ..record.clone()
    })?;
    let target = layout.copy_path(&record.uuid);
    fs::rename(&path, &target).ctx(|| format!("cannot rename {}", path.display()))?;
    crate::format::layout::fsync_dir(target.parent().unwrap())?;
    let _ = fs::remove_file(&progress_path);
    crate::format::layout::fsync_dir(&dir)?;
    Ok((outcome, done))
}

/// How far a resumable copy got (every byte below is written), and whether it ended: what
/// the thread that makes it durable behind it waits on.
struct Reached {
    at: Mutex<(u64, bool)>,
    changed: Condvar,
}

impl Reached {
    fn advance(&self, at: u64) {
        self.at.lock().0 = at;
        self.changed.notify_one();
    }

    fn end(&self) {
        self.at.lock().1 = true;
        self.changed.notify_one();
    }
}

/// Tells the thread behind a copy that it ended, when dropped.
struct Ends<'a>(&'a Reached);

impl Drop for Ends<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Makes a resumable copy durable behind it, so that the copy never waits for the disk: starts
/// the writeback every `WRITEBACK` bytes, and every `CHECKPOINT` bytes syncs the data and only
/// then `record`s how far it is durable. Returns when the copy ends, or at a failure.
fn make_durable_behind(
    dst: &File,
    reached: &Reached,
    from: u64,
    size: u64,
    record: &dyn Fn(u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let (mut written_back, mut recorded) = (from, from);
    loop {
        let at = {
            let mut state = reached.at.lock();
            while !state.1 && state.0 < written_back + WRITEBACK {
                reached.changed.wait(&mut state);
            }
            if state.1 {
                return Ok(());
            }
            state.0
        };
        start_writeback(dst)?;
        written_back = at;
        if at >= recorded + CHECKPOINT && at < size {
            dst.sync_data()?;
            record(at)?;
            recorded = at;
        }
    }
}

/// A partial copy nobody is writing and nobody resumed for `PARTIAL_MAX_AGE` is removed:
/// returns the files removed.
pub fn remove_stale_partials(disk: &DiskRow) -> Vec<std::path::PathBuf> {
    let dir = DiskLayout::new(&disk.path).partial_dir();
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > PARTIAL_MAX_AGE);
        if !stale || path.extension().is_some_and(|e| e == "json") {
            continue;
        }
        // Not while a process holds it.
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if file.try_lock().is_ok() {
            let _ = fs::remove_file(path.with_extension("json"));
            if fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread behind a resumable copy records a checkpoint at most every `CHECKPOINT`
    /// bytes, at points the copy reached, never at the end (the copy's own commit is that);
    /// it returns when the copy ends, and at once with the error of a record that fails.
    #[test]
    fn checkpoints_follow_the_copy_and_a_failed_one_ends_them() {
        let dir = tempfile::tempdir().unwrap();
        let dst = File::create(dir.path().join("copy")).unwrap();
        let size = 10 * CHECKPOINT;
        let reached = Reached {
            at: Mutex::new((CHECKPOINT / 2, false)),
            changed: Condvar::new(),
        };
        let recorded = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            let behind = scope.spawn(|| {
                make_durable_behind(&dst, &reached, CHECKPOINT / 2, size, &|at| {
                    recorded.lock().push(at);
                    Ok(())
                })
            });
            let mut at = CHECKPOINT / 2;
            while at < size {
                at = (at + (7 << 20)).min(size);
                reached.advance(at);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            reached.end();
            behind.join().unwrap().unwrap();
        });
        let recorded = recorded.into_inner();
        assert!(!recorded.is_empty(), "nothing recorded in {size} bytes");
        let mut last = CHECKPOINT / 2;
        for &at in &recorded {
            assert!(at >= last + CHECKPOINT && at < size, "{recorded:?}");
            assert_eq!(
                (at - CHECKPOINT / 2) % (7 << 20),
                0,
                "not a point reached: {at}"
            );
            last = at;
        }

        let reached = Reached {
            at: Mutex::new((0, false)),
            changed: Condvar::new(),
        };
        reached.advance(2 * CHECKPOINT);
        let failed = make_durable_behind(&dst, &reached, 0, size, &|_| {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        });
        assert_eq!(failed.unwrap_err().raw_os_error(), Some(libc::EIO));
    }

    /// A resumable copy that panics (in its source, or in `progress`) passes the panic on:
    /// the thread that makes it durable behind it is told that it ended, and the copy does not
    /// wait for that thread forever (holding the import's and the volume's locks).
    #[test]
    fn a_resumable_copy_that_panics_passes_the_panic_on() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskRow {
            id: 1,
            name: "d1".into(),
            path: dir.path().join("d1"),
            uuid: "disk-1".into(),
            added: 0,
            state: crate::core::store::DiskState::Healthy,
            failed_by: None,
            reason: None,
            state_since: None,
        };
        fs::create_dir(&disk.path).unwrap();
        let source = dir.path().join("src");
        fs::write(&source, vec![3u8; 1 << 20]).unwrap();
        let record = CopyRecord {
            pool_uuid: "pool".into(),
            name: "img".into(),
            uuid: "image-1".into(),
            size: 1 << 20,
            sha512: String::new(),
            created: 0,
            chunk_size: CHUNK_SIZE,
            digests_hash: String::new(),
            copies_wanted: 1,
            source: None,
        };
        let (ended, ends) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let from = File::open(&source).unwrap();
            let copied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                write_resumable_copy(&disk, &record, &from, &source, "key", true, &mut |_, _| {
                    panic!("a progress that panics")
                })
            }));
            let _ = ended.send(copied.is_err());
            drop(dir);
        });
        let panicked = ends
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the copy never ended: it waits for its checkpoint thread forever");
        assert!(panicked, "the panic was not passed on");
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(open_source(&fifo), Err(Error::NotAnImage(_))));
        assert!(matches!(
            open_source(Path::new("/dev/zero")),
            Err(Error::NotAnImage(_))
        ));
    }

    #[test]
    fn a_source_written_after_it_was_opened_is_told() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("src");
        fs::write(&path, vec![1u8; 10_000]).unwrap();
        let source = open_source(&path).unwrap();
        assert_eq!(source.size, 10_000);
        source.check_unchanged(&path).unwrap();
        // Same size, new bytes.
        let writer = OpenOptions::new().write(true).open(&path).unwrap();
        writer.write_all_at(&[2u8; 100], 5000).unwrap();
        assert!(matches!(
            source.check_unchanged(&path),
            Err(Error::SourceChanged(_))
        ));
        // A new size.
        let source = open_source(&path).unwrap();
        writer.set_len(20_000).unwrap();
        let changed = source.check_unchanged(&path).unwrap_err();
        assert_eq!(changed.kind(), crate::error::ErrorKind::Busy);
    }
}
