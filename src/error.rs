//! The errors the pool core reports. Each message is one line that says what is wrong and, where
//! the operator can act, what to do; `main` prints it as is and exits non-zero.
//!
//! Every error also has a kind (`Error::kind`), for code that must act on what happened rather
//! than on the text: the repair, a control socket, exit codes. Copy failures carry a
//! `CopyError`, which says which side of the copy failed.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an error is. Every `Error` has exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The named pool, disk, image, holder, setting or mount does not exist.
    NotFound,
    /// The name or path is taken already.
    AlreadyExists,
    /// Holders or open files use it: release them first.
    InUse,
    /// Another process is working on it right now: wait, then retry.
    Busy,
    /// The arguments are wrong: a bad name, value, path or file.
    InvalidInput,
    /// Not enough room, or not enough disks, for the data.
    NoSpace,
    /// An I/O error on a disk or a file.
    DiskIo,
    /// Data or metadata that does not match what it should be (checksums, records, labels).
    Corrupt,
    /// The system refused access.
    Permission,
    /// The command needs root.
    NotRoot,
    /// The pool's state does not allow it now; the message says what to change first.
    Conflict,
    /// The work was stopped before it finished (a shutdown); running it again starts over.
    Interrupted,
    /// A failure of imgpool itself or of its metadata store.
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::InUse,
        ErrorKind::Busy,
        ErrorKind::InvalidInput,
        ErrorKind::NoSpace,
        ErrorKind::DiskIo,
        ErrorKind::Corrupt,
        ErrorKind::Permission,
        ErrorKind::NotRoot,
        ErrorKind::Conflict,
        ErrorKind::Interrupted,
        ErrorKind::Internal,
    ];

    /// The kind's name in JSON and on the wire: `not-found`, `no-space`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::AlreadyExists => "already-exists",
            ErrorKind::InUse => "in-use",
            ErrorKind::Busy => "busy",
            ErrorKind::InvalidInput => "invalid-input",
            ErrorKind::NoSpace => "no-space",
            ErrorKind::DiskIo => "disk-io",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Permission => "permission",
            ErrorKind::NotRoot => "not-root",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::Internal => "internal",
        }
    }

    pub fn parse(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The kind of an I/O error, from its errno where it has one.
    pub fn of_io(e: &io::Error) -> ErrorKind {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => return ErrorKind::NoSpace,
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                return ErrorKind::Permission
            }
            Some(libc::EBUSY) => return ErrorKind::Busy,
            _ => {}
        }
        match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            io::ErrorKind::PermissionDenied => ErrorKind::Permission,
            io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => ErrorKind::Corrupt,
            io::ErrorKind::Interrupted => ErrorKind::Interrupted,
            _ => ErrorKind::DiskIo,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a copy of an image's data (import, repair) failed, by the side that failed. Its display
/// is the cause only; `Error::Copy` names the image, the disk and the file.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Opening or reading the source failed, or it ended early.
    #[error("{0}")]
    SourceRead(#[source] io::Error),
    /// Creating, writing or syncing the new copy failed (but not for lack of room).
    #[error("{0}")]
    TargetWrite(#[source] io::Error),
    /// The data read does not hash to the image's SHA-512 and chunk digests.
    #[error("the data read does not match the image's checksums")]
    Mismatch,
    /// The target's filesystem filled up (ENOSPC, EDQUOT).
    #[error("no space left on the disk")]
    NoSpace,
    /// The copy was stopped (the repair is shutting down).
    #[error("the copy was stopped")]
    Stopped,
}

/// Which side of a failed copy is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The source: its copy (or its disk) is checked, another source is used.
    Source,
    /// The target: its disk is checked, and another disk takes the copy.
    Target,
    /// Neither (the copy was stopped).
    Neither,
}

impl CopyError {
    /// A failure on the target's side: ENOSPC and EDQUOT are `NoSpace`, everything else a
    /// write error. The one place where a full disk is recognised.
    pub fn target(e: io::Error) -> CopyError {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => CopyError::NoSpace,
            _ => CopyError::TargetWrite(e),
        }
    }

    /// Who is at fault: a read error or a mismatch is the source's (the bytes are hashed as
    /// they are read, before they are written); a write error or a full disk is the target's.
    pub fn blame(&self) -> Blame {
        match self {
            CopyError::SourceRead(_) | CopyError::Mismatch => Blame::Source,
            CopyError::TargetWrite(_) | CopyError::NoSpace => Blame::Target,
            CopyError::Stopped => Blame::Neither,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            CopyError::SourceRead(e) | CopyError::TargetWrite(e) => match ErrorKind::of_io(e) {
                // A copy file that is not there is a disk's problem, not an unknown name.
                ErrorKind::NotFound => ErrorKind::DiskIo,
                kind => kind,
            },
            CopyError::Mismatch => ErrorKind::Corrupt,
            CopyError::NoSpace => ErrorKind::NoSpace,
            CopyError::Stopped => ErrorKind::Interrupted,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no pool in {0}: run `imgpool init` first, or pass the right --state-dir")]
    NoPool(PathBuf),

    #[error("a pool already exists in {path} (uuid {uuid}): use it, or pick another --state-dir")]
    PoolExists { path: PathBuf, uuid: String },

    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: String,
    },

    #[error("no image named '{0}': `imgpool image list` shows the pool's images")]
    UnknownImage(String),

    #[error("no disk named '{0}': `imgpool disk list` shows the registered disks")]
    UnknownDisk(String),

    #[error(
        "an image named '{0}' already exists: pick another name, or `imgpool image rm` it first"
    )]
    ImageExists(String),

    #[error("an image named '{0}' is being imported by another command: wait for it, or pick another name")]
    ImageBusy(String),

    #[error("image '{0}' is being removed; a copy on a disk that is not available now is deleted when the disk is back (any imgpool command retries)")]
    ImageRemoving(String),

    #[error("'{name}' is the name of {by} already: pick another name")]
    NameTaken { name: String, by: &'static str },

    #[error("no volume named '{0}': `imgpool volume list` shows the volumes")]
    UnknownVolume(String),

    #[error("a disk named '{0}' is already registered: pick another name")]
    DiskExists(String),

    #[error("{path} is already registered as disk '{disk}'")]
    DiskPathRegistered { path: PathBuf, disk: String },

    #[error("{path} carries the label of another imgpool pool (uuid {pool}): pick another directory, or remove {path}/.imgpool if that pool is gone for good")]
    ForeignLabel { path: PathBuf, pool: String },

    #[error("image '{name}' is in use ({}): release it first (`imgpool ref rm {name} HOLDER`, close open files)", describe_use(.holders, *.open_handles))]
    InUse {
        name: String,
        holders: Vec<String>,
        open_handles: u64,
    },

    #[error(
        "'{holder}' does not hold image '{image}': `imgpool ref list {image}` shows its holders"
    )]
    UnknownHolder { image: String, holder: String },

    #[error("not enough room for '{image}' ({needed} bytes, {copies} copies): {detail}; free space or add a disk with `imgpool disk add`")]
    NoSpace {
        image: String,
        needed: u64,
        copies: u32,
        detail: String,
    },

    #[error("{0} needs root: run it as root (e.g. with sudo)")]
    NotRoot(&'static str),

    #[error("{} is not a directory: a disk is a directory, normally the mount point of its own filesystem", .0.display())]
    NotADirectory(PathBuf),

    #[error("{} is not a regular file or block device: give the path of a raw image", .0.display())]
    NotAnImage(PathBuf),

    #[error("{} is empty: an image needs at least one byte", .0.display())]
    EmptyImage(PathBuf),

    #[error("--copies must be at least 1")]
    ZeroCopies,

    #[error("{copies} copies need {copies} healthy disks, the pool has {usable}: add disks with `imgpool disk add` first")]
    NotEnoughDisks { copies: u32, usable: usize },

    #[error("the pool has no disks: add one with `imgpool disk add NAME PATH`")]
    NoDisks,

    #[error("disk '{disk}' holds the only good copy of {}: `imgpool disk evict {disk}` moves them off first (or bring the disk back if it failed)", .images.join(", "))]
    OnlyGoodCopy { disk: String, images: Vec<String> },

    #[error(
        "a copy of '{image}' is being written to disk '{disk}': wait for it to finish, then retry"
    )]
    CopyBeingWritten { disk: String, image: String },

    #[error("image '{image}' is removed from the pool but its copy on disk '{disk}' could not be deleted ({source}); the mount daemon, or any later imgpool command that changes the pool, retries")]
    CopyLeftBehind {
        image: String,
        disk: String,
        source: Box<Error>,
    },

    #[error("gc is held: {0}; once every holder is registered again with `imgpool ref add`, run `imgpool gc --release-hold`")]
    GcHeld(String),

    #[error("cannot bind-mount disk '{disk}' view at {}: {source}", .target.display())]
    BindMount {
        disk: String,
        target: PathBuf,
        source: io::Error,
    },

    /// Images a repair could not bring back to their policy, each with what happened and what
    /// to do.
    #[error("{}", describe_unrestored(.0))]
    Unrestored(Vec<String>),

    /// A copy of an image's data to `disk` failed: `error` says which side and why.
    #[error("{}", describe_copy(.image, .disk, .from, .to, .error))]
    Copy {
        image: String,
        disk: String,
        /// What was read: a copy file, or the file the image was imported from.
        from: PathBuf,
        /// The new copy being written (a temporary file).
        to: PathBuf,
        error: CopyError,
    },

    /// A refusal or failure that happens in one place only: its kind, and its one line.
    #[error("{message}")]
    Refused { kind: ErrorKind, message: String },

    #[error("the metadata store {path} has schema version {version}, newer than this imgpool reads ({latest}): run the imgpool that wrote it, or a newer one")]
    StoreTooNew {
        path: PathBuf,
        version: usize,
        latest: usize,
    },

    #[error("cannot read the metadata store {path}: {detail}; rebuild the index from the disks with `imgpool fsck --repair` after moving it aside")]
    StoreUnreadable { path: PathBuf, detail: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("metadata store in {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

fn describe_use(holders: &[String], open_handles: u64) -> String {
    let mut parts = Vec::new();
    if !holders.is_empty() {
        parts.push(format!("held by {}", holders.join(", ")));
    }
    if open_handles > 0 {
        parts.push(format!("{open_handles} open file(s) through the mount"));
    }
    parts.join("; ")
}

fn describe_unrestored(problems: &[String]) -> String {
    match problems {
        [one] => one.clone(),
        _ => format!(
            "{} images could not be restored (reasons above); `imgpool status` tracks them",
            problems.len()
        ),
    }
}

fn describe_copy(
    image: &str,
    disk: &str,
    from: &std::path::Path,
    to: &std::path::Path,
    error: &CopyError,
) -> String {
    let cannot = format!("cannot copy '{image}' to disk '{disk}'");
    match error {
        CopyError::SourceRead(e) => format!("{cannot}: cannot read {}: {e}", from.display()),
        CopyError::TargetWrite(e) => format!("{cannot}: cannot write {}: {e}", to.display()),
        CopyError::Mismatch => format!(
            "{cannot}: the data read from {} does not match the image's checksums",
            from.display()
        ),
        CopyError::NoSpace => format!(
            "disk '{disk}' filled up while copying '{image}'; the partial copy was removed and another disk is tried"
        ),
        CopyError::Stopped => format!("{cannot}: the copy was stopped"),
    }
}

fn store_kind(e: &rusqlite::Error) -> ErrorKind {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => ErrorKind::Busy,
        Some(ErrorCode::DiskFull) => ErrorKind::NoSpace,
        Some(ErrorCode::SystemIoFailure) => ErrorKind::DiskIo,
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => ErrorKind::Corrupt,
        Some(ErrorCode::PermissionDenied | ErrorCode::ReadOnly | ErrorCode::CannotOpen) => {
            ErrorKind::Permission
        }
        _ => ErrorKind::Internal,
    }
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A one-off refusal or failure, with its kind; `message` is the line the operator reads.
    pub fn refused(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error::Refused {
            kind,
            message: message.into(),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NoPool(_)
            | Error::UnknownImage(_)
            | Error::UnknownDisk(_)
            | Error::UnknownHolder { .. } => ErrorKind::NotFound,
            Error::PoolExists { .. }
            | Error::ImageExists(_)
            | Error::DiskExists(_)
            | Error::DiskPathRegistered { .. } => ErrorKind::AlreadyExists,
            Error::ImageBusy(_) | Error::ImageRemoving(_) | Error::CopyBeingWritten { .. } => {
                ErrorKind::Busy
            }
            Error::InUse { .. } => ErrorKind::InUse,
            Error::NameTaken { .. } => ErrorKind::AlreadyExists,
            Error::UnknownVolume(_) => ErrorKind::NotFound,
            Error::InvalidName { .. }
            | Error::NotADirectory(_)
            | Error::NotAnImage(_)
            | Error::EmptyImage(_)
            | Error::ZeroCopies => ErrorKind::InvalidInput,
            Error::NoSpace { .. } | Error::NotEnoughDisks { .. } | Error::NoDisks => {
                ErrorKind::NoSpace
            }
            Error::NotRoot(_) => ErrorKind::NotRoot,
            Error::StoreUnreadable { .. } => ErrorKind::Corrupt,
            Error::ForeignLabel { .. }
            | Error::StoreTooNew { .. }
            | Error::OnlyGoodCopy { .. }
            | Error::GcHeld(_)
            | Error::Unrestored(_) => ErrorKind::Conflict,
            Error::CopyLeftBehind { source, .. } => source.kind(),
            Error::BindMount { source, .. } | Error::Io { source, .. } => ErrorKind::of_io(source),
            Error::Copy { error, .. } => error.kind(),
            Error::Refused { kind, .. } => *kind,
            Error::Store { source, .. } => store_kind(source),
        }
    }

    /// The error as one line for another process (the mount daemon tells its parent why it
    /// could not start): `[kind] message`.
    pub fn to_relay(&self) -> String {
        format!("[{}] {self}", self.kind())
    }

    /// An error relayed by `to_relay`, with its kind (`internal` when the line names none).
    pub fn from_relay(line: &str) -> Error {
        let parsed = line
            .strip_prefix('[')
            .and_then(|rest| rest.split_once("] "))
            .and_then(|(kind, message)| Some((ErrorKind::parse(kind)?, message)));
        match parsed {
            Some((kind, message)) => Error::refused(kind, message),
            None => Error::refused(ErrorKind::Internal, line),
        }
    }

    /// For a failed copy, which side is at fault; `None` for any other error.
    pub fn copy_blame(&self) -> Option<Blame> {
        match self {
            Error::Copy { error, .. } => Some(error.blame()),
            _ => None,
        }
    }
}

/// Attaches a human context to an `io::Result`, turning it into our one-line error.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_name_that_parses_back() {
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ErrorKind::parse("usage"), None);
    }

    #[test]
    fn a_full_disk_is_recognised_once_and_blamed_on_the_target() {
        let full = CopyError::target(io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(full, CopyError::NoSpace), "{full:?}");
        assert_eq!(full.blame(), Blame::Target);
        assert_eq!(full.kind(), ErrorKind::NoSpace);
        let eio = CopyError::target(io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(eio, CopyError::TargetWrite(_)), "{eio:?}");
        assert_eq!(eio.blame(), Blame::Target);
        assert_eq!(eio.kind(), ErrorKind::DiskIo);
    }

    #[test]
    fn a_copy_failure_is_blamed_on_the_side_that_failed() {
        let read = CopyError::SourceRead(io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(read.blame(), Blame::Source);
        assert_eq!(read.kind(), ErrorKind::DiskIo);
        assert_eq!(CopyError::Mismatch.blame(), Blame::Source);
        assert_eq!(CopyError::Mismatch.kind(), ErrorKind::Corrupt);
        assert_eq!(CopyError::Stopped.blame(), Blame::Neither);
        assert_eq!(CopyError::Stopped.kind(), ErrorKind::Interrupted);

        let copy = |error| Error::Copy {
            image: "a".into(),
            disk: "d3".into(),
            from: "/d1/.imgpool/copies/u.img".into(),
            to: "/d3/.imgpool/tmp/u.img".into(),
            error,
        };
        let read = copy(CopyError::SourceRead(io::Error::from_raw_os_error(
            libc::EIO,
        )));
        assert_eq!(read.copy_blame(), Some(Blame::Source));
        assert!(
            read.to_string().starts_with(
                "cannot copy 'a' to disk 'd3': cannot read /d1/.imgpool/copies/u.img: "
            ),
            "{read}"
        );
        let write = copy(CopyError::TargetWrite(io::Error::from_raw_os_error(
            libc::EIO,
        )));
        assert!(
            write
                .to_string()
                .contains("cannot write /d3/.imgpool/tmp/u.img"),
            "{write}"
        );
        assert_eq!(
            copy(CopyError::NoSpace).to_string(),
            "disk 'd3' filled up while copying 'a'; the partial copy was removed and another disk is tried"
        );
        assert_eq!(Error::NoDisks.copy_blame(), None);
    }

    #[test]
    fn a_relayed_error_keeps_its_kind_and_its_line() {
        let original = Error::ImageBusy("a".into());
        let relayed = Error::from_relay(&original.to_relay());
        assert_eq!(relayed.kind(), ErrorKind::Busy);
        assert_eq!(relayed.to_string(), original.to_string());
        let plain = Error::from_relay("something went wrong");
        assert_eq!(plain.kind(), ErrorKind::Internal);
        assert_eq!(plain.to_string(), "something went wrong");
    }

    #[test]
    fn errors_carry_their_kind() {
        assert_eq!(Error::UnknownImage("a".into()).kind(), ErrorKind::NotFound);
        assert_eq!(Error::ZeroCopies.kind(), ErrorKind::InvalidInput);
        assert_eq!(
            Error::OnlyGoodCopy {
                disk: "d1".into(),
                images: vec!["a".into()]
            }
            .kind(),
            ErrorKind::Conflict
        );
        assert_eq!(
            Error::io("x", io::Error::from_raw_os_error(libc::EACCES)).kind(),
            ErrorKind::Permission
        );
        assert_eq!(
            Error::io("x", io::Error::new(io::ErrorKind::InvalidData, "bad json")).kind(),
            ErrorKind::Corrupt
        );
        let left = Error::CopyLeftBehind {
            image: "a".into(),
            disk: "d1".into(),
            source: Box::new(Error::io("x", io::Error::from_raw_os_error(libc::EIO))),
        };
        assert_eq!(left.kind(), ErrorKind::DiskIo);
        let refused = Error::refused(ErrorKind::InUse, "busy: close the files");
        assert_eq!(refused.kind(), ErrorKind::InUse);
        assert_eq!(refused.to_string(), "busy: close the files");
    }
}
