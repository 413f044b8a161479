//! The states of disks, images and copies as the metadata store records them. Each is read
//! strictly: a value this code does not know is an error, never mapped onto a state that
//! recovery would act on (a store written by a newer imgpool is refused when it is opened; this
//! is the second line of defence).

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

/// Implements the text form of a state enum, in the store and in `--json` output.
macro_rules! stored_enum {
    ($name:ident, $what:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $name {
            #[cfg(test)]
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            pub fn parse(text: &str) -> Option<$name> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = value.as_str()?;
                $name::parse(text).ok_or_else(|| {
                    FromSqlError::Other(format!("unknown {} {text:?}", $what).into())
                })
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }
    };
}

/// A disk's state as the pool decided it (the label check is a separate, live observation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskState {
    Healthy,
    /// Out of service: its copies neither serve reads nor count toward any image's policy.
    Failed,
    /// Still serving, while its copies are moved to other disks; then it can be removed.
    Evicting,
}

stored_enum!(DiskState, "disk state", {
    Healthy => "healthy",
    Failed => "failed",
    Evicting => "evicting",
});

/// Who took a disk out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailedBy {
    /// The health monitor: the disk returns to service when its probes pass again.
    Probe,
    /// `imgpool disk fail`: it stays out until `imgpool disk online`.
    Operator,
}

stored_enum!(FailedBy, "disk failer", {
    Probe => "probe",
    Operator => "operator",
});

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageState {
    /// Reserved by an import that has not committed: never visible in the mount.
    Importing,
    Ready,
    /// Being removed: invisible, and any command may finish the removal.
    Removing,
}

stored_enum!(ImageState, "image state", {
    Importing => "importing",
    Ready => "ready",
    Removing => "removing",
});

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VolumeState {
    /// Being created: its files are being written; invisible until it is ready.
    Creating,
    Ready,
    /// Being removed: invisible, and any command may finish the removal.
    Removing,
}

stored_enum!(VolumeState, "volume state", {
    Creating => "creating",
    Ready => "ready",
    Removing => "removing",
});

/// The state of one copy of an image on one disk. `core::copies` owns the transitions between
/// them and the rule for which copies are good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CopyState {
    /// Being written by the repair: a temporary file, never served.
    Copying,
    /// Verified; serves reads while its disk is in service.
    Ready,
    /// The image's last good copy after a fault: it keeps serving (every chunk is checked as it
    /// is read, so its good chunks are still right) but is no source and does not count toward
    /// the policy; the repair replaces it from the image's source when it can.
    Damaged,
    /// Present but not trusted (its disk came back, or the index was rebuilt): verified before
    /// it serves again.
    Unverified,
    /// Unreadable or corrupt: never served; deleted and replaced by the repair.
    Failed,
    /// Being deleted; any command finishes the deletion.
    Removing,
}

stored_enum!(CopyState, "copy state", {
    Copying => "copying",
    Ready => "ready",
    Damaged => "damaged",
    Unverified => "unverified",
    Failed => "failed",
    Removing => "removing",
});

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    #[test]
    fn every_state_reads_back_as_itself_and_an_unknown_one_is_an_error() {
        let conn = Connection::open_in_memory().unwrap();
        for state in CopyState::ALL {
            let back: CopyState = conn.query_row("SELECT ?1", [state], |r| r.get(0)).unwrap();
            assert_eq!(back, *state);
        }
        for state in DiskState::ALL {
            let back: DiskState = conn.query_row("SELECT ?1", [state], |r| r.get(0)).unwrap();
            assert_eq!(back, *state);
        }
        for state in ImageState::ALL {
            let back: ImageState = conn.query_row("SELECT ?1", [state], |r| r.get(0)).unwrap();
            assert_eq!(back, *state);
        }
        for state in VolumeState::ALL {
            let back: VolumeState = conn.query_row("SELECT ?1", [state], |r| r.get(0)).unwrap();
            assert_eq!(back, *state);
        }
        for by in FailedBy::ALL {
            let back: FailedBy = conn.query_row("SELECT ?1", [by], |r| r.get(0)).unwrap();
            assert_eq!(back, *by);
        }
        let unknown = conn.query_row("SELECT 'vanished'", [], |r| r.get::<_, ImageState>(0));
        let message = unknown.unwrap_err().to_string();
        assert!(message.contains("unknown image state"), "{message}");
        assert!(conn
            .query_row("SELECT 'sideways'", [], |r| r.get::<_, CopyState>(0))
            .is_err());
    }
}
