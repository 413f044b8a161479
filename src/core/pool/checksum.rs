//! An image's SHA-512 computed after its import committed (an export's: `WholeSha512::Later`):
//! read from its good copies, each chunk checked against its digest first, so the sum is the
//! sum of the content the image was imported with. Whoever needs the sum first computes it (the
//! mount daemon's background thread, `image checksum`, a send that names the image, a receive
//! matching a base, a scrub). One process computes an image's sum at a time (a `TurnLock` per
//! image): a command that needs it waits for the one computing it and finds it recorded; the
//! background thread passes over an image a command is computing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Pool;
use crate::core::owner::TurnLock;
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
        self.complete_sha512_if(image, true, progress)
            .map(|done| done.expect("waited for the lock"))
    }

    /// `complete_sha512`; `None` when another process is computing this image's SHA-512 and
    /// `wait` is false.
    fn complete_sha512_if(
        &self,
        image: &ImageRow,
        wait: bool,
        progress: &mut dyn FnMut(u64) -> std::result::Result<(), CopyError>,
    ) -> Result<Option<String>> {
        if let Some(sha512) = self.ready_row(image)?.sha512 {
            return Ok(Some(sha512));
        }
        let token = format!("sha512-{}", image.uuid);
        let Some(_computing) = TurnLock::acquire(&self.state_dir, &token, wait)? else {
            return Ok(None);
        };
        // Read again under the lock: the process that held it may have computed this one.
        let row = self.ready_row(image)?;
        if let Some(sha512) = row.sha512 {
            return Ok(Some(sha512));
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
        self.record_computed_sha512(&row, &sha512).map(Some)
    }

    /// A ready image of `size` bytes whose content has SHA-512 `sha512`, if this pool has one
    /// (a received volume's base). Images of that size whose sum is not computed yet are
    /// hashed first: an exported image is found as soon as it is committed.
    pub fn ready_image_by_sha512(&self, sha512: &str, size: u64) -> Result<Option<ImageRow>> {
        if sha512.is_empty() {
            return Ok(None);
        }
        if let Some(found) = self.store.ready_image_by_sha512(sha512)? {
            return Ok(Some(found));
        }
        for image in self.store.images_without_sha512()? {
            if image.size != size {
                continue;
            }
            if let Err(e) = self.complete_sha512(&image, &mut |_| Ok(())) {
                tracing::warn!(image = %image.name, "{e}");
            }
        }
        // Looked up again even if this completed none: another process (the daemon's thread)
        // may have recorded the sum between the first look and the list of pending ones.
        self.store.ready_image_by_sha512(sha512)
    }

    /// Records `sha512`, computed from `image`'s content checked against its chunk digests,
    /// as its SHA-512, in the store and next to its copies. Returns the image's SHA-512: another
    /// process may have recorded it first (from the same content).
    pub(crate) fn record_computed_sha512(&self, image: &ImageRow, sha512: &str) -> Result<String> {
        if !self.store.record_sha512(image.id, &image.uuid, sha512)? {
            return self
                .ready_row(image)?
                .sha512
                .ok_or_else(|| Error::UnknownImage(image.name.clone()));
        }
        self.record_sha512_on_copies(image, sha512);
        tracing::info!(image = %image.name, "computed the image's SHA-512");
        Ok(sha512.to_string())
    }

    /// `image`'s row as it is now, while it is still that image and ready.
    fn ready_row(&self, image: &ImageRow) -> Result<ImageRow> {
        self.store
            .image_by_name(&image.name)?
            .filter(|r| r.uuid == image.uuid && r.state == ImageState::Ready)
            .ok_or_else(|| Error::UnknownImage(image.name.clone()))
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
                match self.complete_sha512_if(&image, false, &mut stopped) {
                    // `None`: a command is computing it.
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

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    use sha2::{Digest, Sha512};

    use super::*;
    use crate::core::pool::{fixture, Fixture, ImportSource, WholeSha512};
    use crate::core::repair::{self, Quiet};
    use crate::core::{fsck, test_rng::Rng};

    /// Data, a hole, data: an odd size, so the last chunk is short.
    fn content(seed: u64) -> Vec<u8> {
        let mut rng = Rng(seed * 0x9e37_79b9 + 1);
        let mut bytes = vec![0u8; (3 << 20) + 12_345];
        for at in (0..bytes.len()).filter(|i| !((1 << 20)..(2 << 20)).contains(i)) {
            bytes[at] = rng.below(256) as u8;
        }
        bytes
    }

    fn sum(bytes: &[u8]) -> String {
        hex::encode(Sha512::digest(bytes))
    }

    /// Imports `bytes` as an export does: committed before its SHA-512 is known.
    fn exported(f: &Fixture, name: &str, bytes: &[u8], copies: u32) -> ImageRow {
        let path = f.dir.path().join(format!("{name}.src"));
        fs::write(&path, bytes).unwrap();
        let file = File::open(&path).unwrap();
        let imported = f
            .pool
            .import_image(
                name,
                &ImportSource {
                    data: &file,
                    size: bytes.len() as u64,
                    path: path.clone(),
                    recorded_as: None,
                    unchanged: &|| Ok(()),
                    resume_key: None,
                    sha512: WholeSha512::Later,
                },
                Some(copies),
                &mut |_, _| {},
            )
            .unwrap();
        assert_eq!(imported.sha512, None);
        let row = f.pool.store().image_by_name(name).unwrap().unwrap();
        assert_eq!(
            (row.state, row.sha512.as_deref()),
            (ImageState::Ready, None)
        );
        row
    }

    fn recorded(f: &Fixture, name: &str) -> Option<String> {
        f.pool.store().image_by_name(name).unwrap().unwrap().sha512
    }

    fn assert_fsck_clean(f: &Fixture) {
        let findings = fsck::check(&f.pool, false).unwrap();
        assert!(findings.is_empty(), "{findings:?}");
    }

    fn record_sums(f: &Fixture, row: &ImageRow) -> Vec<String> {
        f.disks
            .iter()
            .map(|d| DiskLayout::new(d).read_record(&row.uuid).unwrap().sha512)
            .collect()
    }

    #[test]
    fn a_sum_computed_after_the_commit_is_the_contents_and_is_recorded_once() {
        let f = fixture(2);
        let bytes = content(1);
        let row = exported(&f, "e", &bytes, 2);
        // Its copies' records say nothing of a sum yet, and fsck takes that as it is.
        assert_eq!(record_sums(&f, &row), ["", ""]);
        assert_fsck_clean(&f);

        let mut hashed = 0;
        let sha512 = f
            .pool
            .complete_sha512(&row, &mut |done| {
                hashed = done;
                Ok(())
            })
            .unwrap();
        assert_eq!(sha512, sum(&bytes));
        assert_eq!(hashed, bytes.len() as u64);
        assert_eq!(recorded(&f, "e"), Some(sum(&bytes)));
        assert_eq!(record_sums(&f, &row), [sum(&bytes), sum(&bytes)]);
        assert_fsck_clean(&f);

        // Known now: returned without reading the image again.
        let mut read_again = false;
        let again = f
            .pool
            .complete_sha512(&row, &mut |_| {
                read_again = true;
                Ok(())
            })
            .unwrap();
        assert_eq!((again, read_again), (sum(&bytes), false));
    }

    #[test]
    fn a_copy_that_rotted_is_passed_over_and_no_copy_right_means_no_sum() {
        let f = fixture(2);
        let bytes = content(2);
        let row = exported(&f, "e", &bytes, 2);
        let copy = |disk: usize| DiskLayout::new(&f.disks[disk]).copy_path(&row.uuid);
        let rot = |disk: usize| {
            let file = File::options().write(true).open(copy(disk)).unwrap();
            file.write_all_at(&[0xAA; 3], 5000).unwrap();
        };
        rot(0);
        let sha512 = f.pool.complete_sha512(&row, &mut |_| Ok(())).unwrap();
        assert_eq!(sha512, sum(&bytes), "read from the good copy");

        let row = exported(&f, "e2", &bytes, 2);
        for disk in 0..2 {
            let file = File::options()
                .write(true)
                .open(DiskLayout::new(&f.disks[disk]).copy_path(&row.uuid))
                .unwrap();
            file.write_all_at(&[0x55; 3], 70_000).unwrap();
        }
        let e = f.pool.complete_sha512(&row, &mut |_| Ok(())).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot compute the SHA-512 of image 'e2'"),
            "{e}"
        );
        assert_eq!(
            recorded(&f, "e2"),
            None,
            "no sum of bytes that are not the image's"
        );
    }

    #[test]
    fn a_stopped_computation_leaves_the_image_pending_and_usable() {
        let f = fixture(1);
        let bytes = content(3);
        let row = exported(&f, "e", &bytes, 1);
        let e = f
            .pool
            .complete_sha512(&row, &mut |_| Err(CopyError::Stopped))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Interrupted, "{e}");
        assert_eq!(recorded(&f, "e"), None);
        assert_fsck_clean(&f);
        assert_eq!(
            f.pool.complete_sha512(&row, &mut |_| Ok(())).unwrap(),
            sum(&bytes)
        );
    }

    #[test]
    fn a_stop_is_seen_inside_a_long_hole() {
        let f = fixture(1);
        let mut bytes = vec![0u8; 64 << 20];
        bytes[..1 << 20].fill(7);
        bytes[(63 << 20)..].fill(9);
        let row = exported(&f, "holey", &bytes, 1);
        let mut stopped_at = 0;
        let e = f
            .pool
            .complete_sha512(&row, &mut |done| {
                if done > 8 << 20 {
                    stopped_at = done;
                    return Err(CopyError::Stopped);
                }
                Ok(())
            })
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Interrupted, "{e}");
        assert!(stopped_at <= 9 << 20, "stopped only at {stopped_at}");
    }

    #[test]
    fn processes_computing_at_once_record_one_sum_and_all_answer_it() {
        let f = fixture(2);
        let bytes = content(4);
        let rows: Vec<ImageRow> = (0..3)
            .map(|i| exported(&f, &format!("e{i}"), &bytes, 2))
            .collect();
        let state_dir = f.pool.state_dir.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let background = {
            let (pool, stop) = (Pool::open(&state_dir).unwrap(), stop.clone());
            std::thread::spawn(move || pool.complete_sha512s_in_background(&stop))
        };
        let commands: Vec<_> = (0..3)
            .map(|i| {
                let (pool, rows) = (Pool::open(&state_dir).unwrap(), rows.clone());
                std::thread::spawn(move || {
                    // Each asks for every image, starting from a different one.
                    (0..3)
                        .map(|k| {
                            let row = &rows[(i + k) % 3];
                            let sha512 = pool.complete_sha512(row, &mut |_| Ok(())).unwrap();
                            (row.name.clone(), sha512)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for answers in commands.into_iter().map(|c| c.join().unwrap()) {
            for (name, sha512) in answers {
                assert_eq!(sha512, sum(&bytes), "{name}");
            }
        }
        stop.store(true, Ordering::Relaxed);
        background.join().unwrap();
        for row in &rows {
            assert_eq!(recorded(&f, &row.name), Some(sum(&bytes)));
            assert_eq!(record_sums(&f, row), [sum(&bytes), sum(&bytes)]);
        }
        assert_fsck_clean(&f);
    }

    #[test]
    fn one_process_computes_an_image_sum_the_others_wait_for_it_and_other_images_do_not_wait() {
        let f = fixture(1);
        let bytes = content(9);
        let row = exported(&f, "e", &bytes, 1);
        let other = exported(&f, "o", &content(10), 1);
        let state_dir = f.pool.state_dir.clone();
        let start = Arc::new(std::sync::Barrier::new(3));
        let askers: Vec<_> = (0..3)
            .map(|_| {
                let (pool, row, start) =
                    (Pool::open(&state_dir).unwrap(), row.clone(), start.clone());
                std::thread::spawn(move || {
                    let mut computed = false;
                    start.wait();
                    let sha512 = pool
                        .complete_sha512(&row, &mut |_| {
                            computed = true;
                            Ok(())
                        })
                        .unwrap();
                    (sha512, computed)
                })
            })
            .collect();
        let answers: Vec<_> = askers.into_iter().map(|a| a.join().unwrap()).collect();
        assert!(answers.iter().all(|(sha512, _)| *sha512 == sum(&bytes)));
        assert_eq!(
            answers.iter().filter(|(_, computed)| *computed).count(),
            1,
            "the others found the sum recorded"
        );

        // Image `o` being computed elsewhere (its turn held): the background thread passes it
        // over, and a command for it waits for that turn; `e2` is not held up by it.
        let held = TurnLock::acquire(&state_dir, &format!("sha512-{}", other.uuid), true)
            .unwrap()
            .unwrap();
        let e2 = exported(&f, "e2", &bytes, 1);
        assert_eq!(
            f.pool.complete_sha512(&e2, &mut |_| Ok(())).unwrap(),
            sum(&bytes)
        );
        let stop = Arc::new(AtomicBool::new(false));
        let background = {
            let (pool, stop) = (Pool::open(&state_dir).unwrap(), stop.clone());
            std::thread::spawn(move || pool.complete_sha512s_in_background(&stop))
        };
        let (done, waited) = std::sync::mpsc::channel();
        let waiting = {
            let (pool, other) = (Pool::open(&state_dir).unwrap(), other.clone());
            std::thread::spawn(move || {
                let sha512 = pool.complete_sha512(&other, &mut |_| Ok(()));
                done.send(()).unwrap();
                sha512
            })
        };
        assert!(
            waited.recv_timeout(Duration::from_millis(500)).is_err(),
            "the command did not wait for the turn held"
        );
        assert_eq!(
            recorded(&f, "o"),
            None,
            "the background thread took a held turn"
        );
        drop(held);
        assert_eq!(waiting.join().unwrap().unwrap(), sum(&content(10)));
        stop.store(true, Ordering::Relaxed);
        background.join().unwrap();
        let locks: Vec<_> = fs::read_dir(state_dir.join("locks"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with("sha512-"))
            .collect();
        assert!(locks.is_empty(), "turn files left: {locks:?}");
    }

    #[test]
    fn the_background_work_completes_every_pending_image_and_stops_when_told() {
        let f = fixture(1);
        let (a, b) = (content(5), content(6));
        exported(&f, "a", &a, 1);
        exported(&f, "b", &b, 1);
        let stop = Arc::new(AtomicBool::new(false));
        let background = {
            let (pool, stop) = (Pool::open(&f.pool.state_dir).unwrap(), stop.clone());
            std::thread::spawn(move || pool.complete_sha512s_in_background(&stop))
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while (recorded(&f, "a").is_none() || recorded(&f, "b").is_none())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        background.join().unwrap();
        assert_eq!(recorded(&f, "a"), Some(sum(&a)));
        assert_eq!(recorded(&f, "b"), Some(sum(&b)));
    }

    #[test]
    fn a_pending_image_is_found_by_its_sum_and_a_scrub_records_it() {
        let f = fixture(1);
        let bytes = content(7);
        let row = exported(&f, "e", &bytes, 1);
        // Another size: not hashed to look.
        assert_eq!(
            f.pool.ready_image_by_sha512(&sum(&bytes), 4096).unwrap(),
            None
        );
        assert_eq!(recorded(&f, "e"), None);
        let found = f
            .pool
            .ready_image_by_sha512(&sum(&bytes), bytes.len() as u64)
            .unwrap()
            .unwrap();
        assert_eq!((found.id, found.sha512), (row.id, Some(sum(&bytes))));

        exported(&f, "s", &content(8), 1);
        let report = repair::scrub(&f.pool, Some("s"), &Quiet).unwrap();
        assert!(report.bad.is_empty(), "{report:?}");
        assert_eq!(recorded(&f, "s"), Some(sum(&content(8))));
        assert_fsck_clean(&f);
    }

    #[test]
    fn an_empty_sum_names_no_image_though_one_is_pending() {
        let f = fixture(1);
        let bytes = content(9);
        exported(&f, "e", &bytes, 1);
        // A stream's header is not checked for the form of its base's sum: '' must match
        // nothing, not the image whose sum is '' in the store because it is not known yet.
        assert_eq!(f.pool.store().ready_image_by_sha512("").unwrap(), None);
        assert_eq!(
            f.pool
                .ready_image_by_sha512("", bytes.len() as u64)
                .unwrap(),
            None
        );
    }

    #[test]
    fn a_store_rebuilt_from_records_with_and_without_the_sum_is_clean() {
        let f = fixture(2);
        let bytes = content(10);
        let row = exported(&f, "e", &bytes, 2);
        f.pool.complete_sha512(&row, &mut |_| Ok(())).unwrap();
        // The first disk's record has no sum (its copy was made from a row read before the sum
        // was known, or its disk was out of service when the sum was recorded); the second has.
        let first = DiskLayout::new(&f.disks[0]);
        let mut record = first.read_record(&row.uuid).unwrap();
        record.sha512 = String::new();
        first.write_record(&record).unwrap();
        assert_eq!(record_sums(&f, &row), [String::new(), sum(&bytes)]);
        assert_fsck_clean(&f);

        let state = f.pool.state_dir().to_path_buf();
        for file in ["pool.db", "pool.db-wal", "pool.db-shm"] {
            let _ = fs::remove_file(state.join(file));
        }
        fsck::rebuild(&state, &f.disks).unwrap();
        let pool = Pool::open(&state).unwrap();
        assert_eq!(
            pool.store().image_by_name("e").unwrap().unwrap().sha512,
            Some(sum(&bytes)),
            "the rebuilt row takes the sum a record has"
        );
        let findings = fsck::check(&pool, false).unwrap();
        assert!(findings.is_empty(), "{findings:?}");
        assert_eq!(
            record_sums(&f, &row)[1],
            sum(&bytes),
            "the sum next to a copy is kept"
        );
    }

    /// A reporter that removes an image as soon as a task on it reports progress.
    struct RemovesWhileRead<'a>(&'a Pool, &'a str);

    impl repair::Reporter for RemovesWhileRead<'_> {
        fn task(&self, _: String, _: u64) -> Box<dyn Fn(u64) + Send + '_> {
            let removed = std::sync::atomic::AtomicBool::new(false);
            Box::new(move |_| {
                if !removed.swap(true, Ordering::Relaxed) {
                    let _ = self.0.remove_image(self.1);
                }
            })
        }
    }

    #[test]
    fn a_scrub_goes_on_when_a_pending_image_is_removed_while_its_copy_is_read() {
        let f = fixture(1);
        exported(&f, "gone", &content(11), 1);
        let kept = content(12);
        exported(&f, "kept", &kept, 1);
        let other = Pool::open(f.pool.state_dir()).unwrap();
        let report = repair::scrub(&f.pool, None, &RemovesWhileRead(&other, "gone"));
        let report = report.expect("a scrub is not a failure because an image was removed");
        assert!(report.bad.is_empty(), "{report:?}");
        assert!(f.pool.store().image_by_name("gone").unwrap().is_none());
        assert_eq!(recorded(&f, "kept"), Some(sum(&kept)), "{report:?}");
        assert_fsck_clean(&f);
    }

    #[test]
    fn a_sum_that_cannot_be_computed_names_the_image_not_a_volume() {
        let f = fixture(1);
        let row = exported(&f, "e", &content(13), 1);
        fs::remove_file(DiskLayout::new(&f.disks[0]).digests_path(&row.uuid)).unwrap();
        let e = f.pool.complete_sha512(&row, &mut |_| Ok(())).unwrap_err();
        let message = e.to_string();
        assert!(message.contains("image 'e'"), "{message}");
        assert!(
            !message.contains("volume"),
            "not a volume's base: {message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }
}
