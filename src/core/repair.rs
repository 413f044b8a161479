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

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::core::health;
use crate::core::pool::{self, copy_info, CopyInfo, Pool};
use crate::core::store::{CopyState, DiskRow, DiskState, FailOutcome, ImageRow, ImageState};
use crate::error::{Error, IoContext, Result};
use crate::format::clock;
use crate::format::layout::DiskLayout;
use crate::format::sparse;

/// Progress of long work (copies, verifications), for a progress bar or nothing.
pub trait Reporter: Sync {
    /// A new task of `total` bytes; the returned closure is told the bytes done.
    fn task(&self, label: String, total: u64) -> Box<dyn Fn(u64) + Send + '_>;
}

/// Reports nothing (the daemon logs what the repair did instead).
pub struct Quiet;

impl Reporter for Quiet {
    fn task(&self, _: String, _: u64) -> Box<dyn Fn(u64) + Send + '_> {
        Box::new(|_| {})
    }
}

/// A shared limit on the bytes per second the repair reads.
pub struct Throttle {
    rate: u64,
    state: Mutex<(Instant, u64)>,
}

impl Throttle {
    /// `rate` bytes per second; 0 for no limit.
    pub fn new(rate: u64) -> Throttle {
        Throttle {
            rate,
            state: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Accounts for `bytes` and sleeps as long as the work is ahead of the rate.
    pub fn consume(&self, bytes: u64) {
        if self.rate == 0 || bytes == 0 {
            return;
        }
        let due = {
            let mut state = self.state.lock();
            // An idle spell does not earn a burst: the budget restarts after a second of rest.
            let earned = state.0 + Duration::from_secs_f64(state.1 as f64 / self.rate as f64);
            if earned + Duration::from_secs(1) < Instant::now() {
                *state = (Instant::now(), 0);
            }
            state.1 += bytes;
            state.0 + Duration::from_secs_f64(state.1 as f64 / self.rate as f64)
        };
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

/// What one repair did, and what it could not do.
#[derive(Debug, Default)]
pub struct Report {
    pub done: Vec<String>,
    /// Images still short of their policy, each with what happened and what to do.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone)]
enum Action {
    Verify {
        image: ImageRow,
        disk: DiskRow,
    },
    /// Deleted only if `keep` good copies remain without it (evicting disks' copies counting
    /// with `count_evicting`), checked when it runs.
    Remove {
        image: ImageRow,
        disk: DiskRow,
        why: &'static str,
        keep: u32,
        count_evicting: bool,
    },
    Create {
        image: ImageRow,
        target: DiskRow,
        source: Source,
    },
}

#[derive(Debug, Clone)]
enum Source {
    Copy(DiskRow),
    /// The file the image was imported from, to be checked against the image's checksums.
    File(std::path::PathBuf),
}

/// Runs repair rounds until nothing is left to do or nothing more can be done. The caller holds
/// the repair lock. `stop` interrupts a copy in progress (it is undone).
pub fn repair(pool: &Pool, reporter: &dyn Reporter, stop: &AtomicBool) -> Result<Report> {
    // Whatever dead processes left is cleaned up first, a dead repairer's copies included: we
    // hold the lock.
    let recovered = crate::core::recover::recover_holding_repair_lock(pool)?;
    let settings = pool.settings()?;
    let throttle = Throttle::new(settings.repair_bandwidth);
    let mut report = Report {
        done: recovered,
        ..Report::default()
    };
    // Disks that failed a copy of an image in this repair (full, say): not chosen again for it.
    let mut refused: HashMap<i64, Vec<i64>> = HashMap::new();
    // Images whose source file no longer has their checksum.
    let changed_sources = Mutex::new(HashSet::new());
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let (actions, problems) = plan(pool, &refused, &changed_sources.lock())?;
        report.problems = problems;
        if actions.is_empty() {
            break;
        }
        let mut progressed = false;
        let (creates, others): (Vec<_>, Vec<_>) = actions
            .into_iter()
            .partition(|a| matches!(a, Action::Create { .. }));
        for action in others {
            match run_action(pool, &action, &throttle, reporter, stop, &changed_sources) {
                Ok(done) => {
                    progressed = true;
                    report.done.push(done);
                }
                Err(e) => report.done.push(format!("failed: {e}")),
            }
        }
        let results = run_parallel(creates, settings.repair_jobs.max(1) as usize, |action| {
            run_action(pool, action, &throttle, reporter, stop, &changed_sources)
        });
        for (action, result) in results {
            match result {
                Ok(done) => {
                    progressed = true;
                    report.done.push(done);
                }
                Err(e) => {
                    if let Action::Create { image, target, .. } = &action {
                        refused.entry(image.id).or_default().push(target.id);
                        // Another target may exist: trying again is progress.
                        progressed = true;
                    }
                    tracing::warn!("{e}");
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

/// Decides the next round of work from the store; also records, per image, why it cannot be
/// restored (or clears that), and returns those reasons.
fn plan(
    pool: &Pool,
    refused: &HashMap<i64, Vec<i64>>,
    changed_sources: &HashSet<i64>,
) -> Result<(Vec<Action>, Vec<String>)> {
    let store = pool.store();
    let disks = pool.disks_in_service()?;
    let all_copies = store.all_copies()?;
    let mut actions = Vec::new();
    let mut problems = Vec::new();
    for image in store.images()? {
        if image.state != ImageState::Ready {
            continue;
        }
        let rows: Vec<_> = all_copies
            .iter()
            .filter(|c| c.image_id == image.id)
            .cloned()
            .collect();
        let infos: Vec<(DiskRow, CopyInfo)> = rows
            .iter()
            .map(|c| (c.disk.clone(), copy_info(&image, c.clone(), &disks)))
            .collect();
        let reachable = |d: &DiskRow| {
            disks
                .iter()
                .any(|(disk, serving)| disk.id == d.id && *serving)
        };
        let serving: Vec<&DiskRow> = infos
            .iter()
            .filter(|(_, i)| i.serving)
            .map(|(d, _)| d)
            .collect();
        let counting = infos.iter().filter(|(_, i)| i.counts).count() as u32;
        let copying = rows
            .iter()
            .filter(|c| c.state == CopyState::Copying)
            .count() as u32;
        let mut to_verify = 0;
        for (disk, info) in &infos {
            match info.state {
                CopyState::Unverified if reachable(disk) => {
                    to_verify += 1;
                    actions.push(Action::Verify {
                        image: image.clone(),
                        disk: disk.clone(),
                    });
                }
                CopyState::Failed if reachable(disk) && !serving.is_empty() => {
                    actions.push(Action::Remove {
                        image: image.clone(),
                        disk: disk.clone(),
                        why: "failed",
                        keep: 1,
                        count_evicting: true,
                    })
                }
                _ => {}
            }
        }
        let wanted = image.copies_wanted;
        let mut problem = None;
        if counting + copying < wanted {
            let missing = wanted - counting - copying;
            let mut exclude: Vec<i64> = rows.iter().map(|c| c.disk.id).collect();
            exclude.extend(refused.get(&image.id).into_iter().flatten());
            // A damaged copy (the last good one, kept serving) is no source: its bad chunks
            // would fail the copy's checksum.
            let undamaged = infos
                .iter()
                .find(|(_, i)| i.serving && i.reason.is_none())
                .map(|(d, _)| d);
            let source = match undamaged {
                Some(disk) => Some(Source::Copy(disk.clone())),
                None if to_verify > 0 && serving.is_empty() => None, // may serve once verified
                None if changed_sources.contains(&image.id) => {
                    problem = Some(no_good_copy(
                        &image,
                        !serving.is_empty(),
                        &format!(
                            "its source {} no longer has its checksum",
                            image.source.as_deref().unwrap_or("?")
                        ),
                    ));
                    None
                }
                None => match source_file(&image) {
                    Ok(path) => Some(Source::File(path)),
                    Err(why) => {
                        problem = Some(no_good_copy(&image, !serving.is_empty(), &why));
                        None
                    }
                },
            };
            if let Some(source) = source {
                // From the source file, one copy first; the others are made from it.
                let count = if matches!(source, Source::File(_)) {
                    1
                } else {
                    missing
                };
                match pool.place(&image.name, image.real_size.max(1), count, &exclude) {
                    Ok(targets) => {
                        for target in targets {
                            actions.push(Action::Create {
                                image: image.clone(),
                                target,
                                source: source.clone(),
                            });
                        }
                    }
                    Err(e) => {
                        problem = Some(format!(
                            "'{}' has {counting} of {wanted} healthy copies and no disk can take another: {e}",
                            image.name
                        ))
                    }
                }
            }
        } else if counting >= wanted {
            // Policy met: copies on evicting disks go, then copies above the policy.
            let surplus = counting - wanted;
            for (disk, info) in &infos {
                if info.serving && !info.counts && copying == 0 {
                    let why = if info.reason.is_some() {
                        "damaged, and replaced"
                    } else {
                        "evicted"
                    };
                    actions.push(Action::Remove {
                        image: image.clone(),
                        disk: disk.clone(),
                        why,
                        keep: wanted,
                        count_evicting: false,
                    });
                }
            }
            if surplus > 0 && copying == 0 {
                let mut extra: Vec<&DiskRow> = infos
                    .iter()
                    .filter(|(_, i)| i.counts)
                    .map(|(d, _)| d)
                    .collect();
                // The disks with the least room give up their copies first.
                extra.sort_by_key(|d| {
                    crate::core::resources::probe(&d.path)
                        .map(|r| r.free)
                        .unwrap_or(0)
                });
                for disk in extra.into_iter().take(surplus as usize) {
                    actions.push(Action::Remove {
                        image: image.clone(),
                        disk: disk.clone(),
                        why: "above the copy policy",
                        keep: wanted,
                        count_evicting: false,
                    });
                }
            }
        }
        if problem.as_deref() != image.problem.as_deref() {
            store.set_image_problem(image.id, problem.as_deref())?;
        }
        problems.extend(problem);
    }
    Ok((actions, problems))
}

/// What to tell the operator about an image with no good copy to copy from: none at all (its
/// reads fail), or only a damaged one (the chunks that do not match fail).
fn no_good_copy(image: &ImageRow, damaged_serves: bool, why: &str) -> String {
    let name = &image.name;
    if damaged_serves {
        format!(
            "the only copy of '{name}' is damaged and {why}: its damaged chunks return EIO, the others are served; `imgpool scrub {name}` checks it again, or import the image again"
        )
    } else {
        format!(
            "no healthy copy of '{name}' is left and {why}: its reads return EIO; bring back a disk that held a copy (it is verified first) or import the image again"
        )
    }
}

/// The image's source file, if it still exists (its content is checked while copying).
fn source_file(image: &ImageRow) -> std::result::Result<std::path::PathBuf, String> {
    let Some(source) = &image.source else {
        return Err("its source file is unknown".into());
    };
    let path = std::path::PathBuf::from(source);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.len() == image.size => Ok(path),
        Ok(_) => Err(format!("its source {source} has another size")),
        Err(e) => Err(format!("its source {source} cannot be read ({e})")),
    }
}

fn run_action(
    pool: &Pool,
    action: &Action,
    throttle: &Throttle,
    reporter: &dyn Reporter,
    stop: &AtomicBool,
    changed_sources: &Mutex<HashSet<i64>>,
) -> Result<String> {
    match action {
        Action::Verify { image, disk } => {
            match verify_copy(pool, image, disk, throttle, reporter)? {
                Ok(()) => {
                    pool.store().set_copy_state(
                        image.id,
                        disk.id,
                        CopyState::Ready,
                        None,
                        clock::now(),
                    )?;
                    Ok(format!(
                        "verified the copy of '{}' on '{}'",
                        image.name, disk.name
                    ))
                }
                Err(why) => {
                    let kept = pool
                        .store()
                        .fail_copy(image.id, disk.id, &why, clock::now())?
                        == FailOutcome::KeptDamaged;
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
            if !pool
                .store()
                .begin_remove_copy(image.id, disk.id, *keep, *count_evicting)?
            {
                return Ok(format!(
                    "kept the copy of '{}' on '{}': fewer good copies than planned remain without it",
                    image.name, disk.name
                ));
            }
            DiskLayout::new(&disk.path).remove_copy(&image.uuid)?;
            pool.store().delete_copy(image.id, disk.id)?;
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
            if let (Err(Error::Io { source: e, .. }), Source::File(_)) = (&created, source) {
                if e.kind() == io::ErrorKind::InvalidData {
                    changed_sources.lock().insert(image.id);
                }
            }
            created.map_err(|e| describe_copy_error(image, target, e))?;
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
    if !store.insert_copy(image.id, target.id, CopyState::Copying, clock::now())? {
        return Err(Error::Usage(format!(
            "disk '{}' already has a copy of '{}'",
            target.name, image.name
        )));
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
        .ctx(|| format!("cannot open {}", source_path.display()))
        .and_then(|from| {
            let outcome = pool::write_copy(
                target,
                &pool.record_of(image),
                &from,
                Some(image),
                &mut |done, data| {
                    progress(done);
                    throttle.consume(data as u64);
                    if stop.load(Ordering::Relaxed) {
                        Err(io::Error::new(
                            io::ErrorKind::Interrupted,
                            "the repair was stopped",
                        ))
                    } else {
                        Ok(())
                    }
                },
            );
            pool::drop_cached_pages(&from);
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
            store.set_copy_state(image.id, target.id, CopyState::Ready, None, clock::now())
        }
        Err(e) => {
            // The row goes even if the files cannot (a dying target): a `copying` row would
            // count as a copy on its way; fsck reports the files.
            if let Err(cleanup) = DiskLayout::new(&target.path).remove_copy(&image.uuid) {
                tracing::warn!("{cleanup}");
            }
            store.delete_copy(image.id, target.id)?;
            if let Source::Copy(disk) = source {
                blame_source(pool, image, disk, &e)?;
            }
            // A target that cannot take writes is probed now, not at the next round.
            let target_now = store.disk_by_name(&target.name)?;
            let result = health::probe(pool.uuid(), &target_now);
            health::apply_probe(pool, &target_now, result)?;
            Err(e)
        }
    }
}

/// A copy from `disk` failed: if the source is at fault, its disk is probed and, if the disk is
/// fine, the copy is sent to verification (a mismatch) or failed (a read error).
fn blame_source(pool: &Pool, image: &ImageRow, disk: &DiskRow, e: &Error) -> Result<()> {
    let Error::Io { source, context } = e else {
        return Ok(());
    };
    let from_source = source.kind() == io::ErrorKind::InvalidData || context.contains("read");
    if !from_source {
        return Ok(());
    }
    let result = health::probe(pool.uuid(), disk);
    if health::apply_probe(pool, disk, result)? {
        return Ok(());
    }
    let state = if source.kind() == io::ErrorKind::InvalidData {
        CopyState::Unverified
    } else {
        CopyState::Failed
    };
    pool.store().set_copy_state(
        image.id,
        disk.id,
        state,
        Some(&format!("a copy from it failed: {e}")),
        clock::now(),
    )
}

fn describe_copy_error(image: &ImageRow, target: &DiskRow, e: Error) -> Error {
    match &e {
        Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            Error::Usage(format!(
                "disk '{}' filled up while copying '{}'; the partial copy was removed and another disk is tried",
                target.name, image.name
            ))
        }
        _ => Error::Usage(format!(
            "cannot copy '{}' to disk '{}': {e}",
            image.name, target.name
        )),
    }
}

/// Reads a whole copy and checks it against the image's SHA-512 and chunk digests. `Ok(Err)`
/// is a bad copy (with the reason); `Err` is a problem of the pool itself. A damaged or missing
/// digest file or record next to good data is rewritten.
pub fn verify_copy(
    pool: &Pool,
    image: &ImageRow,
    disk: &DiskRow,
    throttle: &Throttle,
    reporter: &dyn Reporter,
) -> Result<std::result::Result<(), String>> {
    let layout = DiskLayout::new(&disk.path);
    let path = layout.copy_path(&image.uuid);
    let progress = reporter.task(
        format!("verify {} on {}", image.name, disk.name),
        image.size,
    );
    let hashed = File::open(&path).and_then(|file| {
        let outcome = sparse::copy_sparse(
            &file,
            None,
            image.size,
            image.chunk_size,
            &mut |done, data| {
                progress(done);
                throttle.consume(data as u64);
                Ok(())
            },
        );
        pool::drop_cached_pages(&file);
        outcome
    });
    let outcome = match hashed {
        Ok(outcome) => outcome,
        Err(e) => {
            let result = health::probe(pool.uuid(), disk);
            if health::apply_probe(pool, disk, result)? {
                return Ok(Err(format!("its disk failed: {e}")));
            }
            return Ok(Err(format!("cannot read {}: {e}", path.display())));
        }
    };
    if outcome.sha512 != image.sha512 {
        return Ok(Err("its SHA-512 does not match the image's".into()));
    }
    if outcome.chunks.list_hash() != image.digests_hash {
        return Ok(Err("its chunk digests do not match the image's".into()));
    }
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
    Ok(Ok(()))
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
            if !in_service || !matches!(copy.state, CopyState::Ready | CopyState::Unverified) {
                report.skipped.push(format!(
                    "{label}: {}",
                    copy_state_note(&copy.disk, copy.state)
                ));
                continue;
            }
            match verify_copy(pool, &image, &copy.disk, &throttle, reporter)? {
                Ok(()) => {
                    // A good verdict also clears an earlier damage note.
                    if copy.state == CopyState::Unverified || copy.reason.is_some() {
                        pool.store().set_copy_state(
                            image.id,
                            copy.disk.id,
                            CopyState::Ready,
                            None,
                            clock::now(),
                        )?;
                    }
                    report.verified.push(label);
                }
                Err(why) => {
                    let kept =
                        pool.store()
                            .fail_copy(image.id, copy.disk.id, &why, clock::now())?
                            == FailOutcome::KeptDamaged;
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
    } else if state != CopyState::Ready && state != CopyState::Unverified {
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
pub fn run_in_background(pool: Pool, wake: &std::sync::mpsc::Receiver<()>, stop: &AtomicBool) {
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
        match repair(&pool, &Quiet, stop) {
            Ok(report) => {
                for line in &report.done {
                    tracing::info!("repair: {line}");
                }
                for problem in &report.problems {
                    if !known_problems.contains(problem) {
                        tracing::warn!("repair: {problem}");
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
        f.pool.fail_disk(&before[0], None).unwrap();
        assert_eq!(f.pool.image("a").unwrap().state(), "degraded");
        let report = run(&f.pool);
        assert!(report.problems.is_empty(), "{report:?}");
        let after = f.serving("a");
        assert_eq!(after.len(), 2, "{report:?}");
        assert!(!after.contains(&before[0]));
        assert_eq!(f.pool.image("a").unwrap().state(), "ready");
        for disk in &after {
            assert_eq!(fs::read(copy_file(&f, "a", disk)).unwrap(), bytes);
        }
        // Nothing left to do: a second repair does nothing.
        assert!(run(&f.pool).done.is_empty());
    }

    #[test]
    fn eviction_moves_every_copy_and_only_then_the_disk_can_go() {
        let f = fixture(2);
        f.image("a", &content(10_000), 1);
        let home = f.serving("a")[0].clone();
        let refused = f.pool.remove_disk(&home).unwrap_err().to_string();
        assert!(refused.contains("only good copy of a"), "{refused}");
        f.pool.evict_disk(&home).unwrap();
        // An evicting disk still serves, but does not count toward the policy.
        assert_eq!(f.serving("a"), vec![home.clone()]);
        assert_eq!(f.pool.image("a").unwrap().state(), "degraded");
        run(&f.pool);
        let now = f.serving("a");
        assert_eq!(now.len(), 1);
        assert_ne!(now[0], home);
        f.pool.remove_disk(&home).unwrap();
        assert_eq!(f.pool.store().disks().unwrap().len(), 1);
        assert_eq!(f.pool.image("a").unwrap().state(), "ready");
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
        assert_eq!(info.state(), "degraded");
        assert!(info.copies[0].serving && info.copies[0].reason.is_some());
        let report = run(&f.pool);
        assert!(report.problems.is_empty(), "{report:?}");
        let info = f.pool.image("a").unwrap();
        assert_eq!(info.state(), "ready", "{report:?}");
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
        assert_eq!(info.state(), "degraded");
        assert!(info.problem().unwrap().contains("EIO"));

        // With its only copy on a failed disk, the image is failed.
        f.pool.fail_disk(&home, None).unwrap();
        assert_eq!(f.pool.image("a").unwrap().state(), "failed");
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
        f.pool
            .store()
            .insert_copy(id, empty.id, CopyState::Copying, 0)
            .unwrap();
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

    #[test]
    fn a_removal_is_refused_when_it_would_leave_too_few_good_copies() {
        let f = fixture(2);
        f.image("a", &content(1000), 2);
        let store = f.pool.store();
        let id = f.pool.image("a").unwrap().image.id;
        let d1 = store.disk_by_name("d1").unwrap();
        f.pool.fail_disk("d2", None).unwrap();
        assert!(!store.begin_remove_copy(id, d1.id, 1, true).unwrap());
        f.pool.online_disk("d2").unwrap();
        assert!(
            !store.begin_remove_copy(id, d1.id, 1, true).unwrap(),
            "an unverified copy is not a good one"
        );
        run(&f.pool);
        assert!(store.begin_remove_copy(id, d1.id, 1, true).unwrap());
    }

    #[test]
    fn the_throttle_holds_work_to_its_rate() {
        let throttle = Throttle::new(10 << 20);
        let started = Instant::now();
        for _ in 0..20 {
            throttle.consume(100 << 10);
        }
        // 2 MB at 10 MB/s cannot take less than 0.2 s (the first 100 KiB is free).
        assert!(started.elapsed() >= Duration::from_millis(180));
        let unlimited = Throttle::new(0);
        let started = Instant::now();
        unlimited.consume(1 << 40);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
