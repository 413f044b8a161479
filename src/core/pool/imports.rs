//! Images from the formats they arrive in: qcow2 files (with their backing chains) and Longhorn
//! replica directories. Each format is read in `format/` as a `SparseSource`; here it goes
//! through the one import pipeline (`Pool::import_image`), checked unchanged at the end.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::images::{ImportSource, Imported, WholeSha512};
use super::*;
use crate::core::ingest::Stamp;
use crate::error::ErrorKind;
use crate::format::longhorn::{self, Replica};
use crate::format::qcow2::Qcow2;

/// What every file an import reads looked like when it was opened.
struct Stamps(Vec<(PathBuf, Stamp)>);

impl Stamps {
    fn take(files: &[(PathBuf, &File)]) -> Result<Stamps> {
        let mut stamps = Vec::new();
        for (path, file) in files {
            let meta = file
                .metadata()
                .ctx(|| format!("cannot stat {}", path.display()))?;
            stamps.push((path.clone(), Stamp::of(&meta)));
        }
        Ok(Stamps(stamps))
    }

    /// Fails naming the first file written since it was opened.
    fn check(&self, files: &[(PathBuf, &File)]) -> Result<()> {
        for ((path, then), (_, file)) in self.0.iter().zip(files) {
            let now = file
                .metadata()
                .ctx(|| format!("cannot stat {}", path.display()))?;
            if Stamp::of(&now) != *then {
                return Err(Error::SourceChanged(path.clone()));
            }
        }
        Ok(())
    }
}

fn canonical(path: &Path) -> String {
    fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// Refuses a replica that a process has open: its engine may be writing it.
fn check_replica_closed(dir: &Path) -> Result<()> {
    let users = longhorn::processes_using(dir)
        .ctx(|| format!("cannot look for users of {}", dir.display()))?;
    if users.is_empty() {
        return Ok(());
    }
    let who: Vec<String> = users
        .iter()
        .map(|(pid, comm)| format!("{comm} (pid {pid})"))
        .collect();
    Err(Error::refused(
        ErrorKind::InUse,
        format!(
            "the Longhorn replica in {} is open by {}: it may be written while it is read; stop its replica (detach the volume) first",
            dir.display(),
            who.join(", ")
        ),
    ))
}

impl Pool {
    /// Imports the qcow2 image `file` (and its backing chain), flattened.
    pub(super) fn add_qcow2(
        &self,
        name: &str,
        file: &Path,
        copies: Option<u32>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Imported> {
        let image = Qcow2::open(file)?;
        if image.size() == 0 {
            return Err(Error::EmptyImage(file.to_path_buf()));
        }
        let files = image.chain_files();
        let stamps = Stamps::take(&files)?;
        let source = ImportSource {
            data: &image,
            size: image.size(),
            path: file.to_path_buf(),
            recorded_as: Some(canonical(file)),
            unchanged: &|| stamps.check(&files),
            // Files can change between two runs: an import starts over.
            resume_key: None,
            sha512: WholeSha512::InPass,
        };
        self.import_image(name, &source, copies, progress)
    }

    /// Imports the disk of the Longhorn replica in `dir` as of `snapshot` (or its head),
    /// over `backing` (or the backing file its `volume.meta` names).
    pub fn add_longhorn_replica(
        &self,
        name: &str,
        dir: &Path,
        snapshot: Option<&str>,
        backing: Option<&Path>,
        copies: Option<u32>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Imported> {
        let replica = Replica::open(dir, snapshot, backing)?;
        check_replica_closed(dir)?;
        let files = replica.files();
        let stamps = Stamps::take(&files)?;
        let at = snapshot.map_or("head".to_string(), |s| format!("snapshot {s}"));
        let source = ImportSource {
            data: &replica,
            size: replica.size(),
            path: dir.to_path_buf(),
            recorded_as: Some(format!("longhorn replica {} at {at}", canonical(dir))),
            unchanged: &|| {
                check_replica_closed(dir)?;
                stamps.check(&files)
            },
            resume_key: None,
            sha512: WholeSha512::InPass,
        };
        self.import_image(name, &source, copies, progress)
    }
}
