//! The repair: brings every image's copies back to its policy. It verifies copies that are not
//! trusted (their disk came back, or the index was rebuilt), deletes failed copies once a good
//! one exists elsewhere, re-creates missing copies on healthy disks with room (from a good copy,
//! sparse-aware, checked against the image's SHA-512 and chunk digests before the copy serves),
//! moves copies off evicting disks, and trims copies above the policy. With no good copy left,
//! an image whose source file still has the same checksum is re-imported from it; otherwise
//! the image is failed and the reason recorded for `status`.
//!
//! One process repairs at a time (the repair lock); copies it is writing belong to it, and a
//! dead repairer's are cleaned up by recovery (`recover`), which each round starts with.
//! Everything the repair decides comes from the store each round, so a restarted daemon resumes
//! where the dead one stopped (a copy that was being written starts over).

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::core::copies::{Event, Outcome};
use crate::core::health;
use crate::core::ingest;
use crate::core::pool::{DiskHealth, Pool};
use crate::core::resources::{self, Freshness};
use crate::core::store::{CopyState, DiskRow, DiskState, ImageRow, ImageState};
use crate::error::{Blame, CopyError, Error, ErrorKind, Result};
use crate::format::clock;
use crate::format::layout::DiskLayout;
use crate::format::qcow2::{self, Qcow2};
use crate::format::sparse;

mod plan;
mod throttle;

#[cfg(test)]
mod plan_model_tests;

pub use plan::{Action, Source};
use plan::{DiskView, ImageView, Plan, PoolState, SourceFile, Space};
pub use throttle::Throttle;

/// Progress of long work (copies, verifications), for a progress bar or nothing.
pub trait Reporter: Sync {
    /// A new task of `total` bytes; the returned closure is told the bytes done.
    fn task(&self, label: String, total: u64) -> Box<dyn Fn(u64) + Send + '_>;

    /// `bytes` were just read to copy or verify a copy (holes are skipped, not read).
    fn data(&self, _work: Work, _bytes: u64) {}
}

/// What a repair's bytes were for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Read from a source to make a new copy.
    Copy,
    /// Read from a copy to check it against its image's checksum.
    Verify,
}

/// The bytes the daemon's repair copied and verified since it started (the metrics' source).
#[derive(Debug, Default)]
pub struct RepairCounters {
    pub copied_bytes: AtomicU64,
    pub verified_bytes: AtomicU64,
    /// Rounds that found work to do.
    pub rounds: AtomicU64,
}

impl Reporter for RepairCounters {
    fn task(&self, _: String, _: u64) -> Box<dyn Fn(u64) + Send + '_> {
        Box::new(|_| {})
    }

    fn data(&self, work: Work, bytes: u64) {
        match work {
            Work::Copy => &self.copied_bytes,
            Work::Verify => &self.verified_bytes,
        }
        .fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Reports nothing (the tests' reporter; the daemon counts bytes with `RepairCounters`).
#[cfg(test)]
pub struct Quiet;

#[cfg(test)]
impl Reporter for Quiet {
    fn task(&self, _: String, _: u64) -> Box<dyn Fn(u64) + Send + '_> {
        Box::new(|_| {})
    }
}

/// What one repair did, and what it could not do.
#[derive(Debug, Default)]
pub struct Report {
    pub done: Vec<String>,
    /// Images still short of their policy, each with what happened and what to do.
    pub problems: Vec<String>,
}

/// Runs repair rounds until nothing is left to do or nothing more can be done. The caller holds
/// the repair lock. `stop` interrupts a copy in progress (it is undone).
pub fn repair(pool: &Pool, reporter: &dyn Reporter, stop: &AtomicBool) -> Result<Report> {
    // Whatever dead processes left is cleaned up first, a dead repairer's copies included: we
    // hold the lock.
    let recovered = crate::core::recover::recover_holding_repair_lock(pool)?;
    for line in &recovered {
        tracing::info!(event = "recovered", "repair: {line}");
    }
    let settings = pool.settings()?;
    let throttle = Throttle::new(settings.repair_bandwidth);
    let mut report = Report {
        done: recovered,
        ..Report::default()
    };
    // Disks that failed a copy of an image in this repair (full, say): not chosen again for it.
    let mut refused: HashMap<i64, Vec<i64>> = HashMap::new();
    // Images whose source file did not read or no longer has their checksum, with why.
    let unusable_sources = Mutex::new(HashMap::new());
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let state = snapshot(pool, &refused, &unusable_sources.lock())?;
        let Plan { actions, problems } = plan::plan(&state);
        report.problems = record_problems(pool, &state, &problems)?;
        if actions.is_empty() {
            break;
        }
        let mut progressed = false;
        let (creates, others): (Vec<_>, Vec<_>) = actions
            .into_iter()
            .partition(|a| matches!(a, Action::Create { .. }));
        for action in others {
            let result = run_action(pool, &action, &throttle, reporter, stop, &unusable_sources);
            log_action(&action, &result);
            match result {
                Ok(done) => {
                    progressed = true;
                    report.done.push(done);
                }
                Err(e) => report.done.push(format!("failed: {e}")),
            }
        }
        let results = run_parallel(creates, settings.repair_jobs.max(1) as usize, |action| {
            run_action(pool, action, &throttle, reporter, stop, &unusable_sources)
        });
        for (action, result) in results {
            log_action(&action, &result);
            match result {
                Ok(done) => {
                    progressed = true;
                    report.done.push(done);
                }
                Err(e) => {
                    if let Action::Create { image, target, .. } = &action {
                        // Only a target at fault is not chosen again for the image. A source at
                        // fault was failed or sent to verification, so the next round copies
                        // from another source; a stopped copy blames nobody.
                        if e.copy_blame().unwrap_or(Blame::Target) == Blame::Target {
                            refused.entry(image.id).or_default().push(target.id);
                        }
                        // Another target or source may exist: trying again is progress.
                        progressed = true;
                    }
                    report.done.push(format!("failed: {e}"));
                }
            }
        }
        if !progressed {
            break;
        }
    }
    Ok(report)
}

/// One log line for each repair action: what it did, or why it failed, to which image's copy
/// on which disk.
fn log_action(action: &Action, result: &Result<String>) {
    let (op, image, disk) = match action {
        Action::Verify { image, disk } => ("verify", image, disk),
        Action::Remove { image, disk, .. } => ("remove", image, disk),
        Action::Create { image, target, .. } => ("copy", image, target),
    };
    let (image, disk) = (image.name.as_str(), disk.name.as_str());
    match result {
        Ok(done) => tracing::info!(event = "repair_done", op, image, disk, "repair: {done}"),
        Err(e) => tracing::warn!(
            event = "repair_failed",
            op,
            image,
            disk,
            error = %e,
            "repair: {op} of '{image}' on '{disk}' failed: {e}"
        ),
    }
}

/// Reads what the planner needs: the disks (with their labels checked and their free space read
/// now), the ready images with their copies, and whether each image's source file could serve.
fn snapshot(
    pool: &Pool,
    refused: &HashMap<i64, Vec<i64>>,
    unusable_sources: &HashMap<i64, String>,
) -> Result<PoolState> {
    let store = pool.store();
    let now = clock::now();
    let mut disks = Vec::new();
    for (row, in_service) in pool.disks_in_service()? {
        let reachable = in_service || pool.disk_health(&row) == DiskHealth::Healthy;
        let space = (row.state == DiskState::Healthy && reachable)
            .then(|| resources::disk_resources(store, &row, Freshness::FreshFree, now).ok())
            .flatten()
            .map(|r| Space {
                device: r.device,
                capacity: r.capacity,
                free: r.free,
            });
        let read_only = reachable && resources::read_only(&row.path);
        disks.push(DiskView {
            row,
            reachable,
            space,
            read_only,
        });
    }
    let all_copies = store.all_copies()?;
    let images = store
        .images()?
        .into_iter()
        .filter(|i| i.state == ImageState::Ready)
        .map(|row| {
            let source = match unusable_sources.get(&row.id) {
                Some(why) => SourceFile::Unusable(why.clone()),
                None => source_file(&row),
            };
            ImageView {
                copies: all_copies
                    .iter()
                    .filter(|c| c.image_id == row.id)
                    .cloned()
                    .collect(),
                row,
                source,
            }
        })
        .collect();
    Ok(PoolState {
        disks,
        images,
        refused: refused.clone(),
    })
}

/// The repair's queue as its planner sees the pool now: the actions of its next round, by
/// work (`create`: a copy to make, `verify`: a copy to check, `remove`: one to delete).
pub fn queue(pool: &Pool) -> Result<[(&'static str, usize); 3]> {
    let state = snapshot(pool, &HashMap::new(), &HashMap::new())?;
    let mut queue = [("create", 0), ("verify", 0), ("remove", 0)];
    for action in plan::plan(&state).actions {
        let at = match action {
            Action::Create { .. } => 0,
            Action::Verify { .. } => 1,
            Action::Remove { .. } => 2,
        };
        queue[at].1 += 1;
    }
    Ok(queue)
}

/// Records, per image, why the repair cannot restore it (or clears that); returns the reasons.
fn record_problems(
    pool: &Pool,
    state: &PoolState,
    problems: &[(i64, Option<String>)],
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (id, problem) in problems {
        let known = state
            .images
            .iter()
            .find(|i| i.row.id == *id)
            .and_then(|i| i.row.problem.as_deref());
        if problem.as_deref() != known {
            pool.store().set_image_problem(*id, problem.as_deref())?;
        }
        out.extend(problem.clone());
    }
    Ok(out)
}

/// The image's source file, if it still exists with the image's size (its content is checked
/// while copying).
fn source_file(image: &ImageRow) -> SourceFile {
    let Some(source) = &image.source else {
        return SourceFile::Unusable("its source file is unknown".into());
    };
    let path = std::path::PathBuf::from(source);
    if !path.is_absolute() {
        return SourceFile::Unusable(format!(
            "its source ({source}) is not a file the repair can read again"
        ));
    }
    // A qcow2 file holds the image at its virtual size. Only regular files are opened here (a
    // FIFO put in the file's place would block the open).
    let size = std::fs::metadata(&path).and_then(|meta| {
        if !meta.is_file() {
            return Ok(meta.len());
        }
        Ok(qcow2::virtual_size(&File::open(&path)?)?.unwrap_or(meta.len()))
    });
    match size {
        Ok(size) if size == image.size => SourceFile::Usable(path),
        Ok(_) => SourceFile::Unusable(format!("its source {source} has another size")),
        Err(e) => SourceFile::Unusable(format!("its source {source} cannot be read ({e})")),
    }
}

/// Runs `work` on each item with at most `jobs` at once, returning each item's result.
fn run_parallel<T: Send + Sync, R: Send>(
    items: Vec<T>,
    jobs: usize,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<(T, R)> {
    let queue = Mutex::new(items.into_iter().collect::<Vec<_>>());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let Some(item) = queue.lock().pop() else {
                    return;
                };
                let result = work(&item);
                results.lock().push((item, result));
            });
        }
    });
    results.into_inner()
}

fn run_action(
    pool: &Pool,
    action: &Action,
    throttle: &Throttle,
    reporter: &dyn Reporter,
    stop: &AtomicBool,
    unusable_sources: &Mutex<HashMap<i64, String>>,
) -> Result<String> {
    match action {
        Action::Verify { image, disk } => {
            match verify_copy(pool, image, disk, throttle, reporter)? {
                Verdict::Good => {
                    pool.copy_event(image.id, disk.id, Event::Verified)?;
                    Ok(format!(
                        "verified the copy of '{}' on '{}'",
                        image.name, disk.name
                    ))
                }
                Verdict::DiskFailed(why) => Ok(format!(
                    "could not verify the copy of '{}' on '{}' ({why}); it is verified when the disk returns",
                    image.name, disk.name
                )),
                Verdict::Bad(why) => {
                    let kept = pool.copy_event(image.id, disk.id, Event::Faulted(&why))?
                        == Outcome::Now(CopyState::Damaged);
                    let fate = if kept {
                        "it is the last good copy and keeps serving its good chunks"
                    } else {
                        "it is replaced"
                    };
                    Ok(format!(
                        "the copy of '{}' on '{}' is bad ({why}); {fate}",
                        image.name, disk.name
                    ))
                }
            }
        }
        Action::Remove {
            image,
            disk,
            why,
            keep,
            count_evicting,
        } => {
            let marked = pool.copy_event(
                image.id,
                disk.id,
                Event::Remove {
                    keep: *keep,
                    count_evicting: *count_evicting,
                },
            )?;
            if marked != Outcome::Now(CopyState::Removing) {
                return Ok(format!(
                    "kept the copy of '{}' on '{}': fewer good copies than planned remain without it",
                    image.name, disk.name
                ));
            }
            DiskLayout::new(&disk.path).remove_copy(&image.uuid)?;
            pool.copy_event(image.id, disk.id, Event::Deleted)?;
            Ok(format!(
                "removed the copy of '{}' on '{}' ({why})",
                image.name, disk.name
            ))
        }
        Action::Create {
            image,
            target,
            source,
        } => {
            let started = Instant::now();
            let created = create_copy(pool, image, target, source, throttle, reporter, stop);
            if let (Err(e), Source::File(path)) = (&created, source) {
                // A source file that does not read, or no longer hashes to the image: not
                // used again in this repair.
                if e.copy_blame() == Some(Blame::Source) {
                    let why = match e {
                        Error::Copy {
                            error: CopyError::Mismatch,
                            ..
                        } => format!("its source {} no longer has its checksum", path.display()),
                        _ => format!("its source {} cannot be read ({e})", path.display()),
                    };
                    unusable_sources.lock().insert(image.id, why);
                }
            }
            created?;
            let from = match source {
                Source::Copy(disk) => format!("from '{}'", disk.name),
                Source::File(path) => format!("from its source {}", path.display()),
            };
            Ok(format!(
                "copied '{}' to '{}' {from} ({} in {:.1} s)",
                image.name,
                target.name,
                crate::format::units::bytes(image.real_size),
                started.elapsed().as_secs_f64()
            ))
        }
    }
}

/// Writes a new copy of `image` on `target`. The row exists (as `copying`, never served) from
/// before the first byte until the copy is committed or undone.
fn create_copy(
    pool: &Pool,
    image: &ImageRow,
    target: &DiskRow,
    source: &Source,
    throttle: &Throttle,
    reporter: &dyn Reporter,
    stop: &AtomicBool,
) -> Result<()> {
    let store = pool.store();
    let started = pool.copy_event(image.id, target.id, Event::StartCopy)?;
    if started != Outcome::Now(CopyState::Copying) {
        return Err(Error::refused(
            ErrorKind::AlreadyExists,
            format!(
                "disk '{}' already has a copy of '{}'",
                target.name, image.name
            ),
        ));
    }
    let source_path = match source {
        Source::Copy(disk) => DiskLayout::new(&disk.path).copy_path(&image.uuid),
        Source::File(path) => path.clone(),
    };
    let progress = reporter.task(
        format!("copy {} to {}", image.name, target.name),
        image.size,
    );
    let written = File::open(&source_path)
        .map_err(|e| Error::Copy {
            image: image.name.clone(),
            disk: target.name.clone(),
            from: source_path.clone(),
            to: DiskLayout::new(&target.path).tmp_copy_path(&image.uuid),
            error: CopyError::SourceRead(e),
        })
        .and_then(|from| {
            // A qcow2 source holds the image through its format (and backing chain).
            let qcow2 = match source {
                Source::File(path) => qcow2::is_qcow2(&from)
                    .and_then(|is| {
                        is.then(|| {
                            Qcow2::open(path).map_err(|e| std::io::Error::other(e.to_string()))
                        })
                        .transpose()
                    })
                    .map_err(|e| Error::Copy {
                        image: image.name.clone(),
                        disk: target.name.clone(),
                        from: source_path.clone(),
                        to: DiskLayout::new(&target.path).tmp_copy_path(&image.uuid),
                        error: CopyError::SourceRead(e),
                    })?,
                Source::Copy(_) => None,
            };
            let data: &dyn sparse::SparseSource = match &qcow2 {
                Some(image) => image,
                None => &from,
            };
            let outcome = ingest::write_copy(
                target,
                &pool.record_of(image),
                data,
                &source_path,
                Some(image),
                image.sha512.is_some(),
                &mut |done, data| {
                    progress(done);
                    reporter.data(Work::Copy, data as u64);
                    throttle.consume(data as u64);
                    if stop.load(Ordering::Relaxed) {
                        Err(CopyError::Stopped)
                    } else {
                        Ok(())
                    }
                },
            );
            ingest::drop_cached_pages(&from);
            outcome
        });
    match written {
        Ok(_) => {
            // The image may have been removed meanwhile: then the new files go with it.
            let still_there = store
                .image_by_name(&image.name)?
                .is_some_and(|i| i.id == image.id && i.state == ImageState::Ready);
            if !still_there {
                DiskLayout::new(&target.path).remove_copy(&image.uuid)?;
                return Err(Error::UnknownImage(image.name.clone()));
            }
            pool.copy_event(image.id, target.id, Event::Committed)?;
            Ok(())
        }
        Err(e) => {
            // The row goes even if the files cannot (a dying target): a `copying` row would
            // count as a copy on its way; fsck reports the files.
            if let Err(cleanup) = DiskLayout::new(&target.path).remove_copy(&image.uuid) {
                tracing::warn!("{cleanup}");
            }
            pool.copy_event(image.id, target.id, Event::Deleted)?;
            // Any failure other than a copy's own (the target's digest file, record or rename)
            // is the target's.
            match e.copy_blame().unwrap_or(Blame::Target) {
                Blame::Source => {
                    if let Source::Copy(disk) = source {
                        blame_source(pool, image, disk, &e)?;
                    }
                }
                Blame::Target => {
                    // A target that cannot take writes is probed now, not at the next round.
                    let target_now = store.disk_by_name(&target.name)?;
                    let result = health::probe(pool.uuid(), &target_now);
                    health::apply_probe(pool, &target_now, result)?;
                }
                Blame::Neither => {}
            }
            Err(e)
        }
    }
}

/// A copy from `disk` failed on the source's side: its disk is probed and, if the disk is fine,
/// the fault is the copy's own. A read error, or bytes that do not hash to the image, fail it;
/// the image's last good copy keeps serving as `damaged` instead, as on the read path, where
/// every chunk is checked.
fn blame_source(pool: &Pool, image: &ImageRow, disk: &DiskRow, e: &Error) -> Result<()> {
    if !matches!(e, Error::Copy { .. }) {
        return Ok(());
    }
    let result = health::probe(pool.uuid(), disk);
    if health::apply_probe(pool, disk, result)? {
        return Ok(());
    }
    let reason = format!("a copy from it failed: {e}");
    let outcome = pool.copy_event(image.id, disk.id, Event::Faulted(&reason))?;
    tracing::warn!(
        "the copy of '{}' on '{}' is {}: {reason}",
        image.name,
        disk.name,
        match outcome {
            Outcome::Now(CopyState::Unverified) => "verified again before it serves",
            Outcome::Now(CopyState::Damaged) =>
                "damaged, and kept serving its good chunks (the last good copy)",
            Outcome::Now(CopyState::Failed) => "failed; another copy is the source",
            _ => "left as it is",
        }
    );
    Ok(())
}

/// What reading a whole copy found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Good,
    /// The copy's own fault: it does not read, or its bytes are not the image's.
    Bad(String),
    /// Its disk failed the probe that followed a read error: the disk is out of service and
    /// the copy is left as it is, to be verified when the disk returns.
    DiskFailed(String),
}

/// Reads a whole copy and checks it against the image's SHA-512 and chunk digests; `Err` is a
/// problem of the pool itself. A damaged or missing digest file or record next to good data is
/// rewritten.
pub fn verify_copy(
    pool: &Pool,
    image: &ImageRow,
    disk: &DiskRow,
    throttle: &Throttle,
    reporter: &dyn Reporter,
) -> Result<Verdict> {
    let layout = DiskLayout::new(&disk.path);
    let path = layout.copy_path(&image.uuid);
    let progress = reporter.task(
        format!("verify {} on {}", image.name, disk.name),
        image.size,
    );
    let hashed = File::open(&path)
        .map_err(CopyError::SourceRead)
        .and_then(|file| {
            let outcome = sparse::copy_sparse(
                &file,
                None,
                image.size,
                image.chunk_size,
                true,
                &mut |done, data| {
                    progress(done);
                    reporter.data(Work::Verify, data as u64);
                    throttle.consume(data as u64);
                    Ok(())
                },
            );
            ingest::drop_cached_pages(&file);
            outcome
        });
    let outcome = match hashed {
        Ok(outcome) => outcome,
        Err(e) => {
            let result = health::probe(pool.uuid(), disk);
            if health::apply_probe(pool, disk, result)? {
                return Ok(Verdict::DiskFailed(format!("its disk failed: {e}")));
            }
            return Ok(Verdict::Bad(format!("cannot read {}: {e}", path.display())));
        }
    };
    if outcome.chunks.list_hash() != image.digests_hash {
        return Ok(Verdict::Bad(
            "its chunk digests do not match the image's".into(),
        ));
    }
    let sha512 = outcome.sha512.expect("asked for the SHA-512");
    let image = &match &image.sha512 {
        Some(known) if *known != sha512 => {
            return Ok(Verdict::Bad(
                "its SHA-512 does not match the image's".into(),
            ))
        }
        Some(_) => image.clone(),
        // Its content is the image's (every chunk matches): its sum is the image's, not
        // computed yet (an export's).
        None => match pool.record_computed_sha512(image, &sha512) {
            Ok(sha512) => ImageRow {
                sha512: Some(sha512),
                ..image.clone()
            },
            // Removed while its copy was read: the copy was the image's, and no file of it is
            // written again.
            Err(Error::UnknownImage(_)) => return Ok(Verdict::Good),
            Err(e) => return Err(e),
        },
    };
    if layout
        .read_digests(
            &image.uuid,
            image.chunk_size,
            image.size,
            &image.digests_hash,
        )
        .is_err()
    {
        tracing::warn!(
            "rewriting the damaged digest file of '{}' on '{}'",
            image.name,
            disk.name
        );
        layout.write_digests(&image.uuid, &outcome.chunks)?;
    }
    let record = pool.record_of(image);
    if layout.read_record(&image.uuid).ok().as_ref() != Some(&record) {
        layout.write_record(&record)?;
    }
    Ok(Verdict::Good)
}

/// What `scrub` found.
#[derive(Debug, Default)]
pub struct ScrubReport {
    pub verified: Vec<String>,
    pub bad: Vec<String>,
    pub skipped: Vec<String>,
}

/// Verifies every copy (of `only`, or of every image) on the disks in service; bad copies are
/// failed, for the repair to replace. The caller holds the repair lock.
pub fn scrub(pool: &Pool, only: Option<&str>, reporter: &dyn Reporter) -> Result<ScrubReport> {
    if let Some(name) = only {
        pool.image(name)?;
    }
    let throttle = Throttle::new(pool.settings()?.repair_bandwidth);
    let disks = pool.disks_in_service()?;
    let mut report = ScrubReport::default();
    for image in pool.store().images()? {
        if image.state != ImageState::Ready || only.is_some_and(|n| n != image.name) {
            continue;
        }
        for copy in pool.store().copies_of(image.id)? {
            let label = format!("'{}' on '{}'", image.name, copy.disk.name);
            let in_service = disks.iter().any(|(d, ok)| d.id == copy.disk.id && *ok);
            let checkable = matches!(
                copy.state,
                CopyState::Ready | CopyState::Damaged | CopyState::Unverified
            );
            if !in_service || !checkable {
                report.skipped.push(format!(
                    "{label}: {}",
                    copy_state_note(&copy.disk, copy.state)
                ));
                continue;
            }
            match verify_copy(pool, &image, &copy.disk, &throttle, reporter)? {
                Verdict::DiskFailed(why) => {
                    report.skipped.push(format!("{label}: {why}"));
                }
                Verdict::Good => {
                    // A good verdict also clears an earlier damage note.
                    if copy.state != CopyState::Ready || copy.reason.is_some() {
                        pool.copy_event(image.id, copy.disk.id, Event::Verified)?;
                    }
                    report.verified.push(label);
                }
                Verdict::Bad(why) => {
                    let kept = pool.copy_event(image.id, copy.disk.id, Event::Faulted(&why))?
                        == Outcome::Now(CopyState::Damaged);
                    let note = if kept {
                        " (the last good copy: it keeps serving its good chunks)"
                    } else {
                        ""
                    };
                    report.bad.push(format!("{label}: {why}{note}"));
                }
            }
        }
    }
    Ok(report)
}

fn copy_state_note(disk: &DiskRow, state: CopyState) -> String {
    if disk.state == DiskState::Failed {
        format!("disk '{}' is failed", disk.name)
    } else if !matches!(
        state,
        CopyState::Ready | CopyState::Damaged | CopyState::Unverified
    ) {
        format!("the copy is {}", state.as_str())
    } else {
        format!("disk '{}' is not reachable", disk.name)
    }
}

/// How often the daemon's repair looks for work when nothing wakes it.
const BACKGROUND_INTERVAL: Duration = Duration::from_secs(30);

/// The mount daemon's repair: a round at start (resuming what a dead daemon left), then one
/// whenever the store changes or `wake` is told, and every `BACKGROUND_INTERVAL`; each round
/// only if no other process is repairing. Logs what it does and, once each, what it cannot.
pub fn run_in_background(
    pool: Pool,
    wake: &std::sync::mpsc::Receiver<()>,
    stop: &AtomicBool,
    counters: &RepairCounters,
) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut last_round: Option<(Instant, i64)> = None;
    let mut known_problems: Vec<String> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let woken = match wake.recv_timeout(Duration::from_secs(1)) {
            Ok(()) => true,
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let version = pool.store().data_version().unwrap_or(0);
        let due = match last_round {
            None => true,
            Some((at, seen)) => woken || seen != version || at.elapsed() >= BACKGROUND_INTERVAL,
        };
        if !due {
            continue;
        }
        let Ok(Some(_lock)) = crate::core::owner::WorkLock::try_acquire(&pool.repair_lock_path())
        else {
            continue;
        };
        match repair(&pool, counters, stop) {
            Ok(report) => {
                if !report.done.is_empty() {
                    counters.rounds.fetch_add(1, Ordering::Relaxed);
                }
                for problem in &report.problems {
                    if !known_problems.contains(problem) {
                        tracing::warn!(event = "repair_problem", "repair: {problem}");
                    }
                }
                known_problems = report.problems;
            }
            Err(e) => tracing::error!("repair: {e}"),
        }
        // The round's own writes do not count as a change.
        last_round = Some((Instant::now(), pool.store().data_version().unwrap_or(0)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pool::fixture;
    use std::fs;

    fn run(pool: &Pool) -> Report {
        repair(pool, &Quiet, &AtomicBool::new(false)).unwrap()
    }

    fn content(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 253) as u8).collect()
    }

    fn copy_file(f: &crate::core::pool::Fixture, name: &str, disk: &str) -> std::path::PathBuf {
        let info = f.pool.image(name).unwrap();
        info.copies
            .iter()
            .find(|c| c.disk == disk)
            .map(|c| c.path.clone())
            .unwrap()
    }

    /// Flips one byte of a copy file, as a rotting disk would.
    fn flip(path: &std::path::Path, at: usize) {
        let mut bytes = fs::read(path).unwrap();
        bytes[at] ^= 0x01;
        let mut perms = fs::metadata(path).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        fs::set_permissions(path, perms).unwrap();
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_failed_disk_s_copies_are_recreated_on_another_disk() {
        let f = fixture(3);
        let bytes = content(300_000);
        f.image("a", &bytes, 2);
        let before = f.serving("a");
        f.pool.fail_disk(&before[0], None, true).unwrap();
        assert_eq!(
            f.pool.image("a").unwrap().state(),
            crate::core::pool::ImageHealth::Degraded
        );
        let report = run(&f.pool);
        assert!(report.problems.is_empty(), "{report:?}");
        let after = f.serving("a");
        assert_eq!(after.len(), 2, "{report:?}");
        assert!(!after.contains(&before[0]));
        assert_eq!(
            f.pool.image("a").unwrap().state(),
            crate::core::pool::ImageHealth::Ready
        );
        for disk in &after {
            assert_eq!(fs::read(copy_file(&f, "a", disk)).unwrap(), bytes);
        }
        // Nothing left to do: a second repair does nothing.
        assert!(run(&f.pool).done.is_empty());
    }

    /// `disk rm` checks and marks in one transaction: a copy elsewhere that failed after the
    /// command's first look does not let the disk take the last good copy with it.
    #[test]
    fn a_disk_is_not_forgotten_with_the_last_good_copy_even_if_the_other_failed_meanwhile() {
        let f = fixture(2);
        f.image("a", &content(10_000), 2);
        let id = f.pool.image("a").unwrap().image.id;
        let d1 = f.pool.store().disk_by_name("d1").unwrap();
        let d2 = f.pool.store().disk_by_name("d2").unwrap();
        assert_eq!(
            f.pool
                .copy_event(id, d2.id, Event::Faulted("bad sector"))
                .unwrap(),
            Outcome::Now(CopyState::Failed)
        );
        let refused = f.pool.store().forget_disk_copies(&d1, 0, &[]).unwrap_err();
        assert!(matches!(refused, Error::OnlyGoodCopy { .. }), "{refused}");
        let info = f.pool.image("a").unwrap();
        let on_d1 = info.copies.iter().find(|c| c.disk == "d1").unwrap();
        assert_eq!(on_d1.state, CopyState::Ready, "nothing was marked");
        assert!(on_d1.good);
        assert!(matches!(
            f.pool.remove_disk("d1"),
            Err(Error::OnlyGoodCopy { .. })
        ));
        f.pool.remove_disk("d2").unwrap();
    }

    #[test]
    fn eviction_moves_every_copy_and_only_then_the_disk_can_go() {
        let f = fixture(2);
        f.image("a", &content(10_000), 1);
        let home = f.serving("a")[0].clone();
        match f.pool.remove_disk(&home) {
            Err(Error::OnlyGoodCopy { disk, images }) => {
                assert_eq!((disk, images), (home.clone(), vec!["a".to_string()]))
            }
            other => panic!("expected OnlyGoodCopy, got {other:?}"),
        }
        f.pool.evict_disk(&home, true).unwrap();
        // An evicting disk still serves, but does not count toward the policy.
        assert_eq!(f.serving("a"), vec![home.clone()]);
        assert_eq!(
            f.pool.image("a").unwrap().state(),
            crate::core::pool::ImageHealth::Degraded
        );
        run(&f.pool);
        let now = f.serving("a");
        assert_eq!(now.len(), 1);
        assert_ne!(now[0], home);
        f.pool.remove_disk(&home).unwrap();
        assert_eq!(f.pool.store().disks().unwrap().len(), 1);
        assert_eq!(
            f.pool.image("a").unwrap().state(),
            crate::core::pool::ImageHealth::Ready
        );
    }

    #[test]
    fn the_copy_count_can_be_raised_and_lowered() {
        let f = fixture(3);
        f.image("a", &content(50_000), 1);
        f.pool.set_copies("a", 3).unwrap();
        run(&f.pool);
        assert_eq!(f.serving("a").len(), 3);
        f.pool.set_copies("a", 1).unwrap();
        run(&f.pool);
        assert_eq!(f.serving("a").len(), 1);
        let on_disk: usize = f
            .disks
            .iter()
            .filter(|d| d.join(".imgpool/copies").read_dir().unwrap().count() > 0)
            .count();
        assert_eq!(on_disk, 1, "removed copies leave no files");
        assert!(
            f.pool.set_copies("a", 4).is_err(),
            "3 disks cannot hold 4 copies"
        );
    }

    #[test]
    fn a_copy_that_comes_back_is_verified_before_it_serves() {
        let f = fixture(2);
        let bytes = content(200_000);
        f.image("a", &bytes, 2);
        f.image("b", &content(1000), 2);
        let d1 = f.pool.store().disk_by_name("d1").unwrap();
        crate::core::health::apply_probe(&f.pool, &d1, Err("gone".into())).unwrap();
        assert_eq!(f.serving("a"), vec!["d2".to_string()]);
        // While away, a's copy on d1 rots.
        flip(&copy_file(&f, "a", "d1"), 100_000);
        let d1 = f.pool.store().disk_by_name("d1").unwrap();
        crate::core::health::apply_probe(&f.pool, &d1, Ok(())).unwrap();
        assert_eq!(
            f.serving("a"),
            vec!["d2".to_string()],
            "unverified copies do not serve"
        );
        let report = run(&f.pool);
        assert!(
            report.done.iter().any(|l| l.contains("is bad")),
            "{report:?}"
        );
        assert_eq!(f.serving("b").len(), 2, "b's copy verified: {report:?}");
        // a's bad copy was failed, deleted and copied again from d2.
        assert_eq!(f.serving("a").len(), 2, "{report:?}");
        assert_eq!(fs::read(copy_file(&f, "a", "d1")).unwrap(), bytes);
    }

    #[test]
    fn with_no_good_copy_left_an_image_comes_back_from_its_source_or_is_failed() {
        let f = fixture(2);
        let bytes = content(100_000);
        let src = f.image("a", &bytes, 1);
        let home = f.serving("a")[0].clone();
        flip(&copy_file(&f, "a", &home), 5);
        let scrubbed = scrub(&f.pool, Some("a"), &Quiet).unwrap();
        assert_eq!(scrubbed.bad.len(), 1, "{scrubbed:?}");
        // The last copy keeps serving its good chunks, but no longer counts.
        let info = f.pool.image("a").unwrap();
        assert_eq!(info.state(), crate::core::pool::ImageHealth::Degraded);
        assert!(info.copies[0].serving && info.copies[0].reason.is_some());
        let report = run(&f.pool);
        assert!(report.problems.is_empty(), "{report:?}");
        let info = f.pool.image("a").unwrap();
        assert_eq!(
            info.state(),
            crate::core::pool::ImageHealth::Ready,
            "{report:?}"
        );
        assert_eq!(info.copies.len(), 1, "the damaged copy went: {report:?}");
        let home = f.serving("a")[0].clone();
        assert_eq!(fs::read(copy_file(&f, "a", &home)).unwrap(), bytes);

        // Now the source changes and the copy rots again: nothing can restore it.
        fs::write(&src, vec![9u8; 100_000]).unwrap();
        flip(&copy_file(&f, "a", &home), 5);
        scrub(&f.pool, Some("a"), &Quiet).unwrap();
        let report = run(&f.pool);
        assert_eq!(report.problems.len(), 1, "{report:?}");
        assert!(report.problems[0].contains("damaged"), "{report:?}");
        let info = f.pool.image("a").unwrap();
        assert_eq!(info.state(), crate::core::pool::ImageHealth::Degraded);
        assert!(info.problem().unwrap().contains("EIO"));

        // With its only copy on a failed disk, the image is failed.
        f.pool.fail_disk(&home, None, true).unwrap();
        assert_eq!(
            f.pool.image("a").unwrap().state(),
            crate::core::pool::ImageHealth::Failed
        );
    }

    #[test]
    fn a_repair_killed_mid_copy_is_cleaned_up_by_the_next_command() {
        let f = fixture(2);
        f.image("a", &content(10_000), 1);
        let uuid = f.pool.image("a").unwrap().image.uuid;
        let empty = f
            .pool
            .store()
            .disks()
            .unwrap()
            .into_iter()
            .find(|d| f.serving("a")[0] != d.name)
            .unwrap();
        let id = f.pool.image("a").unwrap().image.id;
        // What a repair leaves when killed after its record and before the commit.
        f.pool.copy_event(id, empty.id, Event::StartCopy).unwrap();
        let layout = DiskLayout::new(&empty.path);
        layout.create_dirs().unwrap();
        fs::write(layout.tmp_copy_path(&uuid), b"partial").unwrap();
        fs::write(layout.record_path(&uuid), b"{}").unwrap();
        let reopened = Pool::open(f.pool.state_dir()).unwrap();
        crate::core::recover::recover(&reopened).unwrap();
        assert_eq!(reopened.image("a").unwrap().copies.len(), 1);
        assert!(!layout.tmp_copy_path(&uuid).exists());
        assert!(!layout.record_path(&uuid).exists());
        assert!(crate::core::fsck::check(&reopened, false)
            .unwrap()
            .is_empty());
    }

    /// Four disks and image `a` with two copies, the first in placement order (the one the
    /// repair copies from) made unreadable: a directory in its place opens, and every read of it
    /// fails (EISDIR), while its disk passes its probe. Returns the fixture, the bad and the
    /// good copy's disks, the bad copy's path and the image's bytes.
    fn unreadable_first_copy() -> (
        crate::core::pool::Fixture,
        String,
        String,
        std::path::PathBuf,
        Vec<u8>,
    ) {
        let f = fixture(4);
        let bytes = content(300_000);
        f.image("a", &bytes, 2);
        let serving = f.serving("a");
        let (bad, good) = (serving[0].clone(), serving[1].clone());
        let bad_path = copy_file(&f, "a", &bad);
        fs::remove_file(&bad_path).unwrap();
        fs::create_dir(&bad_path).unwrap();
        (f, bad, good, bad_path, bytes)
    }

    #[test]
    fn a_source_copy_that_does_not_read_is_failed_and_no_target_is_blamed() {
        let (f, bad, good, bad_path, _) = unreadable_first_copy();
        let store = f.pool.store();
        let disk = |name: &str| store.disk_by_name(name).unwrap();
        let image = f.pool.image("a").unwrap().image;
        let target = ["d1", "d2", "d3", "d4"]
            .into_iter()
            .find(|d| *d != bad && *d != good)
            .unwrap();
        // One copy from the bad source: the error is the source's, the source copy is failed
        // with the read error as its reason, and the target is neither failed nor left with a
        // copy.
        let err = create_copy(
            &f.pool,
            &image,
            &disk(target),
            &Source::Copy(disk(&bad)),
            &Throttle::new(0),
            &Quiet,
            &AtomicBool::new(false),
        )
        .unwrap_err();
        assert_eq!(err.copy_blame(), Some(Blame::Source), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("cannot read {}", bad_path.display())),
            "{err}"
        );
        let info = f.pool.image("a").unwrap();
        let bad_copy = info.copies.iter().find(|c| c.disk == bad).unwrap();
        assert_eq!(bad_copy.state, CopyState::Failed);
        assert!(
            bad_copy.reason.as_deref().unwrap().contains("cannot read"),
            "{bad_copy:?}"
        );
        assert!(info.copies.iter().all(|c| c.disk != target), "{info:?}");
        assert_eq!(f.serving("a"), vec![good.clone()]);
        for d in store.disks().unwrap() {
            assert_eq!(d.state, DiskState::Healthy, "{d:?}");
        }
    }

    #[test]
    fn a_repair_copies_from_another_copy_when_its_source_does_not_read() {
        let (f, bad, good, bad_path, bytes) = unreadable_first_copy();
        // Three copies wanted: the first copy is tried from the bad one, which is failed; the
        // copies then come from the good one, onto both other disks (so no target was refused).
        f.pool.set_copies("a", 3).unwrap();
        let report = run(&f.pool);
        assert!(report.problems.is_empty(), "{report:?}");
        assert!(
            report
                .done
                .iter()
                .any(|l| l.starts_with("failed: cannot copy 'a'")
                    && l.contains(&format!("cannot read {}", bad_path.display()))),
            "{report:?}"
        );
        assert_eq!(
            f.pool.image("a").unwrap().state(),
            crate::core::pool::ImageHealth::Ready,
            "{report:?}"
        );
        let mut holders = f.serving("a");
        holders.sort();
        let others: Vec<String> = ["d1", "d2", "d3", "d4"]
            .into_iter()
            .filter(|d| *d != bad)
            .map(String::from)
            .collect();
        assert_eq!(holders, others, "{report:?}");
        for disk in &holders {
            if *disk != good {
                let from_good = format!("copied 'a' to '{disk}' from '{good}'");
                assert!(
                    report.done.iter().any(|l| l.starts_with(&from_good)),
                    "{report:?}"
                );
            }
            assert_eq!(fs::read(copy_file(&f, "a", disk)).unwrap(), bytes);
        }
        for d in f.pool.store().disks().unwrap() {
            assert_eq!(d.state, DiskState::Healthy, "{d:?}");
        }
    }

    #[test]
    fn a_removal_is_refused_when_it_would_leave_too_few_good_copies() {
        let f = fixture(2);
        f.image("a", &content(1000), 2);
        let store = f.pool.store();
        let id = f.pool.image("a").unwrap().image.id;
        let d1 = store.disk_by_name("d1").unwrap();
        f.pool.fail_disk("d2", None, true).unwrap();
        let remove = || {
            let event = Event::Remove {
                keep: 1,
                count_evicting: true,
            };
            f.pool.copy_event(id, d1.id, event).unwrap() == Outcome::Now(CopyState::Removing)
        };
        assert!(!remove());
        f.pool.online_disk("d2").unwrap();
        assert!(!remove(), "an unverified copy is not a good one");
        run(&f.pool);
        assert!(remove());
    }
}
