//! Liveness of the processes that own pool work in progress (an import, a mount daemon).
//!
//! The owner holds an exclusive `flock` on `<state dir>/locks/<token>.lock` for as long as it
//! runs; the kernel drops the lock when the process dies, however it dies (`kill -9` included).
//! Anyone else can then tell a live owner from a dead one without trusting pids, which are reused.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

const LOCKS_DIR: &str = "locks";
/// Age after which a lock still under its staging name is known to be abandoned.
const STAGING_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);
/// Age under which a lock under its staging name may not be locked by its creator yet.
const STAGING_MIN_AGE: std::time::Duration = std::time::Duration::from_millis(100);

/// A lock held by this process while it owns some work.
#[derive(Debug)]
pub struct OwnerLock {
    path: PathBuf,
    _file: File,
}

/// The directory of the locks, made if missing. Only root may open (and so flock) a lock:
/// anyone else could fake a live owner.
fn locks_dir(state_dir: &Path) -> Result<PathBuf> {
    let dir = state_dir.join(LOCKS_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .ctx(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn lock_path(state_dir: &Path, token: &str) -> PathBuf {
    state_dir.join(LOCKS_DIR).join(format!("{token}.lock"))
}

/// Takes the exclusive `flock` on `file` if nobody holds it.
fn try_flock(file: &File) -> io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

impl OwnerLock {
    /// Takes the lock named `token` (a fresh uuid, so nobody else holds it). The file is locked
    /// under a temporary name and renamed into place, so a lock file is never seen unlocked
    /// while its owner lives.
    pub fn acquire(state_dir: &Path, token: &str) -> Result<OwnerLock> {
        let dir = locks_dir(state_dir)?;
        let path = lock_path(state_dir, token);
        let staging = dir.join(format!(".{token}.new"));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&staging)
            .ctx(|| format!("cannot create lock {}", staging.display()))?;
        if !try_flock(&file).ctx(|| format!("cannot lock {}", staging.display()))? {
            return Err(crate::error::Error::io(
                format!("lock {} is held by another process", staging.display()),
                io::Error::from(io::ErrorKind::WouldBlock),
            ));
        }
        fs::rename(&staging, &path).ctx(|| format!("cannot create lock {}", path.display()))?;
        Ok(OwnerLock { path, _file: file })
    }

    /// Ends ownership: the lock file goes, then the lock with the descriptor.
    pub fn release(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// An exclusive lock on one piece of work named `token` (`<state dir>/locks/<token>.lock`),
/// which other processes wanting the same work wait for. Unlike a `WorkLock` its file goes when
/// the holder lets go (none is left per piece of work); a waiter that then holds a file already
/// removed sees it and takes a new one, so two processes never both think they hold it.
#[derive(Debug)]
pub struct TurnLock {
    path: PathBuf,
    _file: File,
}

impl TurnLock {
    /// The lock, waiting for its holder (`wait`), or `None` when it is held and not `wait`.
    pub fn acquire(state_dir: &Path, token: &str, wait: bool) -> Result<Option<TurnLock>> {
        use std::os::unix::fs::MetadataExt;
        locks_dir(state_dir)?;
        let path = lock_path(state_dir, token);
        loop {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .ctx(|| format!("cannot open lock {}", path.display()))?;
            if wait {
                file.lock()
                    .ctx(|| format!("cannot lock {}", path.display()))?;
            } else if !try_flock(&file).ctx(|| format!("cannot lock {}", path.display()))? {
                return Ok(None);
            }
            let ours = file
                .metadata()
                .ctx(|| format!("cannot stat {}", path.display()))?;
            match fs::metadata(&path) {
                Ok(now) if (now.dev(), now.ino()) == (ours.dev(), ours.ino()) => {
                    return Ok(Some(TurnLock { path, _file: file }))
                }
                // Removed by the holder we waited for (or a sweep): not the lock any more.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(crate::error::Error::io(
                        format!("cannot stat {}", path.display()),
                        e,
                    ))
                }
            }
        }
    }
}

impl Drop for TurnLock {
    /// The file goes while it is still locked, then the lock with the descriptor.
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// An exclusive lock on a fixed file that is never deleted, for work only one process may do at
/// a time (the repair). Unlike an `OwnerLock` it is contended, so it must not be renamed or
/// removed: a process could otherwise lock a file that another has just replaced.
#[derive(Debug)]
pub struct WorkLock {
    _file: File,
}

impl WorkLock {
    fn open(path: &Path) -> Result<File> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .ctx(|| format!("cannot open lock {}", path.display()))
    }

    /// The lock if nobody holds it.
    pub fn try_acquire(path: &Path) -> Result<Option<WorkLock>> {
        let file = Self::open(path)?;
        Ok(try_flock(&file)
            .ctx(|| format!("cannot lock {}", path.display()))?
            .then_some(WorkLock { _file: file }))
    }

    /// The lock, waiting for the holder to let go.
    pub fn acquire(path: &Path) -> Result<WorkLock> {
        let file = Self::open(path)?;
        file.lock()
            .ctx(|| format!("cannot lock {}", path.display()))?;
        Ok(WorkLock { _file: file })
    }
}

/// What became of the owner of `token`.
pub enum Owner {
    Alive,
    /// The owner is gone. Holding this keeps others from concluding the same at once, so that
    /// one process cleans up after it; `finish` removes the lock file when the cleanup is done.
    Dead(Option<OwnerLock>),
}

impl Owner {
    pub fn finish(self) {
        if let Owner::Dead(Some(lock)) = self {
            lock.release();
        }
    }
}

/// Whether the owner of `token` is alive, for a cleaner: when it is dead, the caller gets its
/// lock, so that no other process concludes the same until the caller is done. An owner releases
/// its lock only after its last change to the store is committed, so whatever the caller reads
/// from the store after this call is final for a dead owner.
pub fn check(state_dir: &Path, token: &str) -> Owner {
    let path = lock_path(state_dir, token);
    // A lock file disappears only with its owner's work done or cleaned up, and it is created
    // before the work is recorded; so a missing file means a dead owner.
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Owner::Dead(None),
        // Unreadable: nothing can be concluded, and only a dead owner's work may be touched.
        Err(_) => return Owner::Alive,
    };
    match try_flock(&file) {
        Ok(true) => Owner::Dead(Some(OwnerLock { path, _file: file })),
        _ => Owner::Alive,
    }
}

/// Whether the owner of `token` is alive, for a reader (a listing) that must change nothing: a
/// shared lock taken for the instant of the test, which does not keep other readers from the
/// same answer, and is never kept. A cleaner holding a dead owner's lock makes the owner look
/// alive here until it is done.
pub fn is_alive(state_dir: &Path, token: &str) -> bool {
    let file = match File::open(lock_path(state_dir, token)) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
        Err(_) => return true,
    };
    !matches!(file.try_lock_shared(), Ok(()))
}

/// Removes the lock files of dead owners that no record refers to (an owner that died after
/// taking its lock but before recording its work). `referenced` tells whether a token is
/// recorded; it is asked while the dead owner's lock is held, so a record it does not see cannot
/// appear. Recorded tokens are left to whoever cleans up the recorded work.
pub fn sweep(state_dir: &Path, referenced: impl Fn(&str) -> bool) {
    let Ok(entries) = fs::read_dir(state_dir.join(LOCKS_DIR)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name.ends_with(".new") {
            // Left by an owner killed between creating and renaming its lock. A live one locks
            // it right after creating it and renames it within microseconds: one that is not
            // brand new and whose lock is free is abandoned (and one that old is, whatever).
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default())
                .unwrap_or_default();
            let abandoned = age > STAGING_MAX_AGE
                || (age > STAGING_MIN_AGE
                    && File::open(entry.path()).is_ok_and(|f| try_flock(&f).unwrap_or(false)));
            if abandoned {
                let _ = fs::remove_file(entry.path());
            }
            continue;
        }
        let Some(token) = name.strip_suffix(".lock") else {
            continue;
        };
        if let dead @ Owner::Dead(_) = check(state_dir, token) {
            if !referenced(token) {
                dead.finish();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_is_held_by_one_process_at_a_time_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = lock_path(dir.path(), "work");
        let first = TurnLock::acquire(dir.path(), "work", true)
            .unwrap()
            .unwrap();
        assert!(TurnLock::acquire(dir.path(), "work", false)
            .unwrap()
            .is_none());
        let state_dir = dir.path().to_path_buf();
        let (took, taken) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let second = TurnLock::acquire(&state_dir, "work", true)
                .unwrap()
                .unwrap();
            took.send(()).unwrap();
            // Held by the waiter now, under a file that exists (not the one removed).
            assert!(TurnLock::acquire(&state_dir, "work", false)
                .unwrap()
                .is_none());
            drop(second);
        });
        assert!(taken
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err());
        drop(first);
        waiter.join().unwrap();
        assert!(!path.exists(), "{} left", path.display());
    }

    #[test]
    fn a_staging_lock_is_swept_once_its_creator_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let locks = dir.path().join(LOCKS_DIR);
        fs::create_dir_all(&locks).unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(1);
        let abandoned = locks.join(".dead.new");
        File::create(&abandoned).unwrap().set_modified(old).unwrap();
        let held = locks.join(".alive.new");
        let creator = File::create(&held).unwrap();
        creator.lock().unwrap();
        creator.set_modified(old).unwrap();
        let fresh = locks.join(".fresh.new");
        File::create(&fresh).unwrap();
        sweep(dir.path(), |_| false);
        assert!(!abandoned.exists(), "an abandoned staging lock stays");
        assert!(held.exists(), "a live creator's staging lock went");
        assert!(fresh.exists(), "a brand new staging lock went");
    }

    #[test]
    fn a_held_lock_is_alive_and_a_released_one_is_dead() {
        let dir = tempfile::tempdir().unwrap();
        let lock = OwnerLock::acquire(dir.path(), "t1").unwrap();
        assert!(matches!(check(dir.path(), "t1"), Owner::Alive));
        drop(lock); // as when the process dies: the file stays, the flock goes
        let owner = check(dir.path(), "t1");
        assert!(matches!(owner, Owner::Dead(Some(_))));
        // While one cleaner holds the dead owner's lock, another sees it as busy.
        assert!(matches!(check(dir.path(), "t1"), Owner::Alive));
        owner.finish();
        assert!(matches!(check(dir.path(), "t1"), Owner::Dead(None)));
        assert!(!lock_path(dir.path(), "t1").exists());
    }

    #[test]
    fn is_alive_answers_without_taking_or_removing_anything() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_alive(dir.path(), "t1"));
        let lock = OwnerLock::acquire(dir.path(), "t1").unwrap();
        assert!(is_alive(dir.path(), "t1"));
        drop(lock); // the owner dies
        assert!(!is_alive(dir.path(), "t1"));
        assert!(!is_alive(dir.path(), "t1"));
        // Nothing was kept or removed: a cleaner still finds the dead owner and its file.
        assert!(lock_path(dir.path(), "t1").exists());
        assert!(matches!(check(dir.path(), "t1"), Owner::Dead(Some(_))));
    }

    #[test]
    fn sweep_removes_only_dead_unreferenced_locks() {
        let dir = tempfile::tempdir().unwrap();
        let live = OwnerLock::acquire(dir.path(), "live").unwrap();
        drop(OwnerLock::acquire(dir.path(), "dead").unwrap());
        drop(OwnerLock::acquire(dir.path(), "recorded").unwrap());
        // Staging files: a fresh one may belong to an owner about to rename it, an old one not.
        let locks = dir.path().join(LOCKS_DIR);
        fs::write(locks.join(".fresh.new"), b"").unwrap();
        let old = fs::File::create(locks.join(".old.new")).unwrap();
        old.set_modified(std::time::SystemTime::now() - 2 * STAGING_MAX_AGE)
            .unwrap();
        sweep(dir.path(), |token| token == "recorded");
        assert!(locks.join(".fresh.new").exists());
        assert!(!locks.join(".old.new").exists());
        assert!(matches!(check(dir.path(), "live"), Owner::Alive));
        assert!(!lock_path(dir.path(), "dead").exists());
        assert!(lock_path(dir.path(), "recorded").exists());
        live.release();
        assert!(!lock_path(dir.path(), "live").exists());
    }
}
