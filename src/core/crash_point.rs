//! Named instants inside a commit where tests make a command die as a `kill -9` would, so that
//! the windows between its durable steps are tested where timing alone rarely lands (a few
//! milliseconds at the end of a long run).
//!
//! In unit tests (`cfg(test)`) a thread arms one point (`at`) with what to do there: panic (its
//! locks go as a dead process's do, its files and rows stay), or break the next step. In a debug build of
//! the binary (what `cargo test` runs in `tests/`), `IMGPOOL_TEST_DIE_AT=POINT` makes the
//! process send itself SIGKILL there. A release build has neither: `reached` does nothing.

/// An instant of a receive's commit (docs/send-receive.md, "Replacing a volume") or of a
/// volume's removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// A receive's snapshots took their names in the volume's index (an existing volume's
    /// commit point); nothing else of the commit ran.
    SnapshotsRenamed,
    /// The new volume's `volume.json` has the final name; the store swap has not run.
    ReplaceRecordRenamed,
    /// The store swap committed; the new volume's `receive.json` is still there.
    ReplaceSwapped,
    /// A removal moved the volume's directory out of `volumes/` and deleted nothing yet.
    RemovalMoved,
    /// A removal deleted the volume's files; its row is still there.
    RemovalDeleted,
}

impl CrashPoint {
    /// Its name in `IMGPOOL_TEST_DIE_AT` (not in a release build, which has no crash points).
    #[cfg(any(test, debug_assertions))]
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::SnapshotsRenamed => "snapshots-renamed",
            CrashPoint::ReplaceRecordRenamed => "replace-record-renamed",
            CrashPoint::ReplaceSwapped => "replace-swapped",
            CrashPoint::RemovalMoved => "removal-moved",
            CrashPoint::RemovalDeleted => "removal-deleted",
        }
    }
}

#[cfg(test)]
type Action = Box<dyn FnOnce()>;

#[cfg(test)]
thread_local! {
    static ARMED: std::cell::RefCell<Option<(CrashPoint, Action)>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `action` when this thread reaches `point`, once: a panic to die there, or a change
/// that makes the next step fail.
#[cfg(test)]
pub fn at(point: CrashPoint, action: impl FnOnce() + 'static) {
    ARMED.with(|armed| *armed.borrow_mut() = Some((point, Box::new(action))));
}

/// The command reached `point`: it dies here if a test asked it to.
pub fn reached(point: CrashPoint) {
    #[cfg(test)]
    {
        let action = ARMED.with(|armed| {
            let mut armed = armed.borrow_mut();
            match armed.take() {
                Some((at, action)) if at == point => Some(action),
                other => {
                    *armed = other;
                    None
                }
            }
        });
        if let Some(action) = action {
            action();
        }
    }
    #[cfg(all(debug_assertions, not(test)))]
    if std::env::var_os("IMGPOOL_TEST_DIE_AT").is_some_and(|p| p == point.name()) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    let _ = point;
}
