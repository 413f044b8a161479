//! Disk health: the probe (label present and unchanged, a small write, fsync and read back in the
//! pool directory, statfs) and the monitor that turns probe results and read-path faults into
//! disk and copy states in the store.
//!
//! A disk whose probe fails is failed "by probe": it returns to service by itself once its probes
//! pass again, and its copies are verified before they serve. A read fault on a copy triggers an
//! immediate probe of its disk: if the disk fails it, the disk is failed; if the disk passes, the
//! fault is the copy's own (a bad sector, a corrupt chunk) and the copy is failed, to be replaced.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::core::copies::{Event, Outcome};
use crate::core::pool::{self, Pool};
use crate::core::resources;
use crate::core::store::{CopyState, DiskRow, DiskState, FailedBy};
use crate::error::Result;
use crate::format::clock;
use crate::format::layout::DiskLayout;

/// Something wrong with one copy, seen on the read path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFault {
    pub image_id: i64,
    pub disk_id: i64,
    pub disk: String,
    pub path: PathBuf,
    pub kind: FaultKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// The read failed with this errno.
    Io(i32),
    /// The chunk read does not match its digest.
    Corrupt { chunk: u64 },
    /// The copy's file is not there (deleted behind the pool's back).
    Missing,
}

impl std::fmt::Display for CopyFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            FaultKind::Io(errno) => write!(
                f,
                "read error on {} ({})",
                self.path.display(),
                io::Error::from_raw_os_error(errno)
            ),
            FaultKind::Corrupt { chunk } => write!(
                f,
                "chunk {chunk} of {} does not match its digest",
                self.path.display()
            ),
            FaultKind::Missing => f.write_str(&missing_file(&self.path)),
        }
    }
}

/// A probe that has not finished by then counts as failed: a hung disk must not look healthy.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a copy whose file is gone failed: what the copy's state and `image show` say.
fn missing_file(path: &Path) -> String {
    format!(
        "its file {} is missing (deleted outside imgpool)",
        path.display()
    )
}

/// How long a disk that holds some image's last good copy is given before a failed probe is
/// tried again: failing it takes the image offline, so one probe's word is not enough.
const PROBE_CONFIRM_DELAY: Duration = Duration::from_millis(500);

/// What probes a disk: `probe` itself, or a test's stand-in.
type ProbeFn = Arc<dyn Fn(&str, &DiskRow) -> std::result::Result<(), String> + Send + Sync>;

/// Probes one disk; `Err` says what is wrong with it.
pub fn probe(pool_uuid: &str, disk: &DiskRow) -> std::result::Result<(), String> {
    if let Some(problem) = pool::check_label(pool_uuid, disk).problem() {
        return Err(problem.to_string());
    }
    let statfs = || {
        resources::probe(&disk.path)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    // A filesystem mounted read-only (ext4 remounts itself so after errors) still serves its
    // copies: it answered the label read; only the write is skipped. It takes no new copy
    // (placement and the repair look at it themselves).
    if resources::read_only(&disk.path) {
        return statfs();
    }
    let path = DiskLayout::new(&disk.path).probe_path();
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let token = format!("{} {stamp}\n", std::process::id());
    // Every mount daemon of the pool probes this one file: the write and the read back happen
    // under an exclusive flock, or one daemon reads another's token and fails a good disk.
    let written = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .and_then(|mut f| {
            // Released when `f` is closed, after the read back.
            f.lock()?;
            f.set_len(0)?;
            f.write_all(token.as_bytes())?;
            f.sync_all()?;
            Ok(f)
        });
    let _locked = match written {
        Ok(f) => f,
        // Turned read-only since the check above.
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => return statfs(),
        Err(e) => return Err(format!("cannot write {}: {e}", path.display())),
    };
    match fs::read(&path) {
        Ok(bytes) if bytes == token.as_bytes() => {}
        Ok(_) => return Err(format!("{} reads back other bytes", path.display())),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    statfs()
}

/// `probe` in its own thread, failed after `PROBE_TIMEOUT`. The thread of a hung probe is left
/// behind (nothing can interrupt it); `None` while an earlier probe of the disk still hangs.
fn probe_in_time(
    probe: &ProbeFn,
    pool_uuid: &str,
    disk: &DiskRow,
    hung: &mut HashSet<i64>,
) -> Option<std::result::Result<(), String>> {
    if hung.contains(&disk.id) {
        return None;
    }
    let (tx, rx) = mpsc::channel();
    let (uuid, row, probe) = (pool_uuid.to_string(), disk.clone(), probe.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("probe-{}", disk.name))
        .spawn(move || {
            let _ = tx.send(probe(&uuid, &row));
        });
    if let Err(e) = spawned {
        return Some(Err(format!("cannot start a probe: {e}")));
    }
    match rx.recv_timeout(PROBE_TIMEOUT) {
        Ok(result) => Some(result),
        Err(_) => {
            hung.insert(disk.id);
            Some(Err(format!(
                "a probe did not finish within {} s",
                PROBE_TIMEOUT.as_secs()
            )))
        }
    }
}

/// Applies the probe health checks and read-path faults to the store.
pub struct Monitor {
    pool: Pool,
    hung: HashSet<i64>,
    /// Disks seen read-only at the last look, so that a change is logged once.
    read_only: HashSet<i64>,
    probe: ProbeFn,
}

impl Monitor {
    pub fn new(pool: Pool) -> Monitor {
        Monitor::with_probe(pool, Arc::new(probe))
    }

    fn with_probe(pool: Pool, probe: ProbeFn) -> Monitor {
        Monitor {
            pool,
            hung: HashSet::new(),
            read_only: HashSet::new(),
            probe,
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Probes every disk; returns whether any disk changed state.
    pub fn probe_all(&mut self) -> Result<bool> {
        // A hung probe that finished since is tried again: its disk may be back.
        self.hung.clear();
        let mut changed = false;
        for disk in self.pool.store().disks()? {
            changed |= self.probe_disk(&disk)?;
        }
        changed |= self.look_at_disks_in_service()?;
        Ok(changed)
    }

    /// After the probes, on each disk still in service whose probe did not hang: logs a change
    /// to or from read-only, and fails the copies whose file is gone (deleted behind the
    /// pool's back: a reader would otherwise be served from a descriptor of the deleted file
    /// until the daemon restarts, and the copy listed as serving until a scrub). One stat per
    /// copy per round. Returns whether a copy changed state.
    fn look_at_disks_in_service(&mut self) -> Result<bool> {
        let disks: Vec<DiskRow> = self
            .pool
            .store()
            .disks()?
            .into_iter()
            .filter(|d| d.state != DiskState::Failed && !self.hung.contains(&d.id))
            .collect();
        for disk in &disks {
            let read_only = resources::read_only(&disk.path);
            if read_only && self.read_only.insert(disk.id) {
                tracing::error!(
                    event = "disk_read_only",
                    disk = disk.name.as_str(),
                    "disk '{}': its filesystem is read-only; it serves its copies but takes no new ones until it is mounted read-write again",
                    disk.name
                );
            } else if !read_only && self.read_only.remove(&disk.id) {
                tracing::warn!(
                    event = "disk_writable",
                    disk = disk.name.as_str(),
                    "disk '{}' is writable again",
                    disk.name
                );
            }
        }
        let (images, copies) = self.pool.catalog_rows()?;
        let mut changed = false;
        for copy in copies.iter().filter(|c| {
            matches!(
                c.state,
                CopyState::Ready | CopyState::Damaged | CopyState::Unverified
            )
        }) {
            let (Some(disk), Some(image)) = (
                disks.iter().find(|d| d.id == copy.disk.id),
                images.iter().find(|i| i.id == copy.image_id),
            ) else {
                continue;
            };
            let path = DiskLayout::new(&disk.path).copy_path(&image.uuid);
            let gone = matches!(fs::symlink_metadata(&path), Err(e) if e.kind() == io::ErrorKind::NotFound);
            // Checked after the stat: a filesystem unmounted meanwhile hides every file.
            if !gone || self.pool.disk_health(disk) != pool::DiskHealth::Healthy {
                continue;
            }
            let reason = missing_file(&path);
            if self
                .pool
                .copy_event(image.id, disk.id, Event::Missing(&reason))?
                == Outcome::Now(CopyState::Failed)
            {
                tracing::error!(
                    event = "copy_failed",
                    image = image.name.as_str(),
                    disk = disk.name.as_str(),
                    reason = reason.as_str(),
                    "copy of '{}' on disk '{}' failed: {reason}; the repair replaces it from another copy or the image's source",
                    image.name,
                    disk.name
                );
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Probes one disk and records the outcome; returns whether its state changed.
    pub fn probe_disk(&mut self, disk: &DiskRow) -> Result<bool> {
        let Some(mut result) = probe_in_time(&self.probe, self.pool.uuid(), disk, &mut self.hung)
        else {
            return Ok(false);
        };
        if let Err(why) = &result {
            let sole = self.pool.store().sole_good_copies_on(disk.id)?;
            if disk.state != DiskState::Failed && !sole.is_empty() {
                tracing::warn!(
                    "disk '{}' failed a probe ({why}) but holds the last good copy of {}: probing it again before failing it",
                    disk.name,
                    sole.join(", ")
                );
                std::thread::sleep(PROBE_CONFIRM_DELAY);
                // A probe that hung is not waited for twice: the disk is failed now.
                if let Some(again) =
                    probe_in_time(&self.probe, self.pool.uuid(), disk, &mut self.hung)
                {
                    result = again;
                }
            }
        }
        apply_probe(&self.pool, disk, result)
    }

    /// A fault seen on the read path: the disk is probed now; a disk that passes keeps serving
    /// and the copy is failed.
    pub fn handle_fault(&mut self, fault: &CopyFault) -> Result<()> {
        let Some(disk) = self
            .pool
            .store()
            .disks()?
            .into_iter()
            .find(|d| d.id == fault.disk_id)
        else {
            return Ok(());
        };
        self.probe_disk(&disk)?;
        let disk = self.pool.store().disk_by_name(&disk.name)?;
        if disk.state == DiskState::Failed {
            return Ok(());
        }
        let reason = fault.to_string();
        let event = match fault.kind {
            FaultKind::Missing => Event::Missing(&reason),
            _ => Event::Faulted(&reason),
        };
        match self.pool.copy_event(fault.image_id, disk.id, event)? {
            Outcome::Now(CopyState::Failed) => tracing::warn!(
                event = "copy_failed",
                image_id = fault.image_id,
                disk = disk.name.as_str(),
                reason = reason.as_str(),
                "copy on disk '{}' failed ({reason}); the repair replaces it",
                disk.name
            ),
            Outcome::Now(CopyState::Damaged) => tracing::error!(
                event = "copy_damaged",
                image_id = fault.image_id,
                disk = disk.name.as_str(),
                reason = reason.as_str(),
                "copy on disk '{}' is damaged ({reason}) and is the image's last good copy: it keeps serving its good chunks",
                disk.name
            ),
            _ => {}
        }
        Ok(())
    }
}

/// Records a probe's outcome: a failing disk in service is failed; a disk failed by an earlier
/// probe that passes again returns, its copies unverified. Returns whether the state changed.
pub fn apply_probe(
    pool: &Pool,
    disk: &DiskRow,
    result: std::result::Result<(), String>,
) -> Result<bool> {
    let now = clock::now();
    // Applied only if nobody changed the disk since it was read (an operator's `disk fail`).
    let expected = Some((disk.state, disk.failed_by));
    match (result, disk.state) {
        (Err(why), DiskState::Healthy | DiskState::Evicting) => {
            let changed = pool.store().set_disk_state_if(
                disk.id,
                expected,
                DiskState::Failed,
                Some(FailedBy::Probe),
                Some(&why),
                now,
            )?;
            if changed {
                tracing::error!(
                    event = "disk_failed",
                    disk = disk.name.as_str(),
                    reason = why.as_str(),
                    "disk '{}' failed its probe: {why}",
                    disk.name
                );
            }
            Ok(changed)
        }
        (Ok(()), DiskState::Failed) if disk.failed_by == Some(FailedBy::Probe) => {
            let changed = pool.store().set_disk_state_if(
                disk.id,
                expected,
                DiskState::Healthy,
                None,
                None,
                now,
            )?;
            if changed {
                tracing::warn!(
                    event = "disk_back",
                    disk = disk.name.as_str(),
                    "disk '{}' passes its probes again; its copies are verified before they serve",
                    disk.name
                );
            }
            Ok(changed)
        }
        _ => Ok(false),
    }
}

/// The mount daemon's monitor: probes every disk each `probe-interval`, and a disk at once when
/// the read path reports a fault on one of its copies; `changed` is told when a disk or copy
/// changed state (the repair then has work). Returns when `faults` closes or `stop` is set.
pub fn watch(
    pool: Pool,
    faults: &mpsc::Receiver<CopyFault>,
    changed: &mpsc::Sender<()>,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    use std::time::Instant;
    let mut monitor = Monitor::new(pool);
    let mut next_probe = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Woken at least every second to notice `stop`.
        let wait = next_probe
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        match faults.recv_timeout(wait) {
            Ok(fault) => {
                if let Err(e) = monitor.handle_fault(&fault) {
                    tracing::error!("cannot record the fault ({fault}): {e}");
                }
                let _ = changed.send(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= next_probe => {
                match monitor.probe_all() {
                    Ok(true) => {
                        let _ = changed.send(());
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!("cannot record disk health: {e}"),
                }
                let interval = monitor
                    .pool()
                    .settings()
                    .map(|s| s.probe_interval)
                    .unwrap_or(Duration::from_secs(10));
                next_probe = Instant::now() + interval;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pool::fixture;

    #[test]
    fn a_disk_that_fails_its_probe_is_failed_and_returns_when_it_passes() {
        let f = fixture(2);
        f.image("a", &[1u8; 5000], 2);
        let label = DiskLayout::new(&f.disks[0]).label_path();
        let mut monitor = Monitor::new(Pool::open(f.pool.state_dir()).unwrap());
        assert!(
            !monitor.probe_all().unwrap(),
            "healthy disks change nothing"
        );

        // The filesystem goes away from under the disk's path.
        fs::rename(&label, label.with_extension("away")).unwrap();
        assert!(monitor.probe_all().unwrap());
        let d1 = f.pool.store().disk_by_name("d1").unwrap();
        assert_eq!(d1.state, DiskState::Failed);
        assert_eq!(d1.failed_by, Some(FailedBy::Probe));
        assert_eq!(f.serving("a"), vec!["d2".to_string()]);

        fs::rename(label.with_extension("away"), &label).unwrap();
        assert!(monitor.probe_all().unwrap());
        assert_eq!(
            f.pool.store().disk_by_name("d1").unwrap().state,
            DiskState::Healthy
        );
        let info = f.pool.image("a").unwrap();
        let on_d1 = info.copies.iter().find(|c| c.disk == "d1").unwrap();
        assert_eq!(on_d1.state, crate::core::store::CopyState::Unverified);

        // A disk the operator failed stays failed whatever its probes say.
        f.pool.fail_disk("d2", Some("replacing it"), true).unwrap();
        assert!(!monitor.probe_all().unwrap());
        assert_eq!(
            f.pool.store().disk_by_name("d2").unwrap().state,
            DiskState::Failed
        );
    }

    /// A probe that fails the first `failures` times it is called, then passes.
    fn failing_probe(failures: usize) -> (ProbeFn, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let probe: ProbeFn = Arc::new(move |_: &str, _: &DiskRow| {
            if counter.fetch_add(1, Ordering::SeqCst) < failures {
                Err("reads back other bytes".to_string())
            } else {
                Ok(())
            }
        });
        (probe, calls)
    }

    #[test]
    fn one_failed_probe_of_the_disk_with_the_last_good_copy_is_confirmed_first() {
        use std::sync::atomic::Ordering;
        let f = fixture(2);
        f.image("only-on-d1", &[1u8; 5000], 1);
        let holder = f.serving("only-on-d1");
        let other = if holder == ["d1"] { "d2" } else { "d1" };
        let holder = f.pool.store().disk_by_name(&holder[0]).unwrap();
        let other = f.pool.store().disk_by_name(other).unwrap();
        let pool = || Pool::open(f.pool.state_dir()).unwrap();

        // A one-off failure of the disk holding the only copy: probed again, still in service.
        let (probe, calls) = failing_probe(1);
        let mut monitor = Monitor::with_probe(pool(), probe);
        assert!(!monitor.probe_disk(&holder).unwrap());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let row = f.pool.store().disk_by_name(&holder.name).unwrap();
        assert_eq!(row.state, DiskState::Healthy);

        // A disk that keeps failing is failed after the second probe.
        let (probe, calls) = failing_probe(usize::MAX);
        let mut monitor = Monitor::with_probe(pool(), probe);
        assert!(monitor.probe_disk(&holder).unwrap());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let row = f.pool.store().disk_by_name(&holder.name).unwrap();
        assert_eq!(row.state, DiskState::Failed);

        // A disk with no last good copy is failed on its first failed probe.
        let (probe, calls) = failing_probe(1);
        let mut monitor = Monitor::with_probe(pool(), probe);
        assert!(monitor.probe_disk(&other).unwrap());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let row = f.pool.store().disk_by_name(&other.name).unwrap();
        assert_eq!(row.state, DiskState::Failed);
    }

    #[test]
    fn a_copy_whose_file_was_deleted_is_failed_by_the_next_probe_round() {
        let f = fixture(2);
        f.image("two", &[2u8; 5000], 2);
        f.image("one", &[1u8; 5000], 1);
        let mut monitor = Monitor::new(Pool::open(f.pool.state_dir()).unwrap());
        assert!(!monitor.probe_all().unwrap(), "every file is there");

        let two = f.pool.image("two").unwrap();
        fs::remove_file(&two.copies[0].path).unwrap();
        let one = f.pool.image("one").unwrap();
        fs::remove_file(&one.copies[0].path).unwrap();
        assert!(monitor.probe_all().unwrap());

        let two = f.pool.image("two").unwrap();
        assert_eq!(two.copies[0].state, CopyState::Failed);
        assert!(
            two.copies[0].reason.as_deref().unwrap().contains("missing"),
            "{:?}",
            two.copies[0]
        );
        assert_eq!(two.state(), crate::core::pool::ImageHealth::Degraded);
        // The last copy too: nothing of it is left to serve.
        let one = f.pool.image("one").unwrap();
        assert_eq!(one.copies[0].state, CopyState::Failed);
        assert_eq!(one.state(), crate::core::pool::ImageHealth::Failed);
        let advice = one.problem().unwrap();
        assert!(advice.contains("missing"), "{advice}");
        assert!(advice.contains("imgpool image add one"), "{advice}");
        assert!(!monitor.probe_all().unwrap(), "reported once");
    }

    #[test]
    fn copies_the_pool_removes_while_the_monitor_looks_are_never_taken_for_missing() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let f = fixture(2);
        // An image being removed: its files go before its rows, and the monitor may have
        // listed it just before.
        f.image("going", &[3u8; 5000], 1);
        let going = f.pool.image("going").unwrap();
        f.pool.store().begin_remove("going", &[]).unwrap();
        fs::remove_file(&going.copies[0].path).unwrap();
        let d = f.pool.store().disk_by_name(&going.copies[0].disk).unwrap();
        assert_eq!(
            f.pool
                .copy_event(going.image.id, d.id, Event::Missing("gone"))
                .unwrap(),
            Outcome::Unchanged
        );

        // The same at once, with real removals: images removed, and surplus copies deleted by
        // the repair, while a monitor probes in a loop. No round may change a copy.
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let mut monitor = Monitor::new(Pool::open(f.pool.state_dir()).unwrap());
                let (mut rounds, mut changes) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    changes += monitor.probe_all().unwrap() as u32;
                    rounds += 1;
                }
                (rounds, changes)
            });
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                for i in 0..30u8 {
                    let name = format!("i{i}");
                    f.image(&name, &[i + 1; 70_000], 2);
                    f.pool.set_copies(&name, 1).unwrap();
                    let _lock =
                        crate::core::owner::WorkLock::acquire(&f.pool.repair_lock_path()).unwrap();
                    let report = crate::core::repair::repair(
                        &f.pool,
                        &crate::core::repair::Quiet,
                        &AtomicBool::new(false),
                    )
                    .unwrap();
                    assert!(report.problems.is_empty(), "{report:?}");
                    drop(_lock);
                    f.pool.remove_image(&name).unwrap();
                }
            }));
            stop.store(true, Ordering::Relaxed);
            let (rounds, changes) = watcher.join().unwrap();
            result.unwrap();
            assert!(rounds > 0);
            assert_eq!(
                changes, 0,
                "a monitor round failed a copy the pool was removing"
            );
        });
    }

    #[test]
    fn a_read_fault_on_a_healthy_disk_fails_the_copy_only() {
        let f = fixture(2);
        f.image("a", &[1u8; 5000], 2);
        let info = f.pool.image("a").unwrap();
        let d1 = f.pool.store().disk_by_name("d1").unwrap();
        let mut monitor = Monitor::new(Pool::open(f.pool.state_dir()).unwrap());
        monitor
            .handle_fault(&CopyFault {
                image_id: info.image.id,
                disk_id: d1.id,
                disk: "d1".into(),
                path: info.copies[0].path.clone(),
                kind: FaultKind::Corrupt { chunk: 0 },
            })
            .unwrap();
        assert_eq!(
            f.pool.store().disk_by_name("d1").unwrap().state,
            DiskState::Healthy
        );
        let info = f.pool.image("a").unwrap();
        let d1_copy = info.copies.iter().find(|c| c.disk == "d1").unwrap();
        assert_eq!(d1_copy.state, crate::core::store::CopyState::Failed);
        assert!(d1_copy.reason.as_deref().unwrap().contains("digest"));
        assert_eq!(info.state(), crate::core::pool::ImageHealth::Degraded);
    }
}
