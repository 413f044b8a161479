//! The errors the pool core reports. Each message is one line that says what is wrong and, where
//! the operator can act, what to do; `main` prints it as is and exits non-zero.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

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

    #[error("{0}")]
    Usage(String),

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

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
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
