//! `image add NAME --from-volume VOLUME[@SNAP]`: a volume, now or at a snapshot, becomes an
//! image. A volume no mount has open is read here, under its writer lock. One that a mount
//! daemon has open is read through that mount, from the snapshot's file, which the daemon does
//! not let anyone delete while it is open; a live volume gets a temporary snapshot for that,
//! deleted afterwards (and, if this process died first, at the next start or export).

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::core::owner::OwnerLock;
use crate::core::pool::{
    export_token, ImportSource, Imported, Pool, WholeSha512, TEMPORARY_SNAPSHOT,
};
use crate::core::volume::requests::{Request, Selection};
use crate::error::{Error, ErrorKind, IoContext, Result};

/// One export: the new image's name and copies, from `volume`.
pub struct Export<'a> {
    pub pool: &'a Pool,
    pub state_dir: &'a Path,
    pub name: &'a str,
    pub volume: &'a str,
    pub copies: Option<u32>,
}

/// Splits `VOLUME[@SNAP]`.
pub fn parse_target(target: &str) -> Result<(&str, Option<&str>)> {
    match target.rsplit_once('@') {
        Some((v, s)) if !v.is_empty() && !s.is_empty() => Ok((v, Some(s))),
        Some(_) => Err(Error::refused(
            ErrorKind::InvalidInput,
            format!("'{target}' is not VOLUME or VOLUME@SNAPSHOT"),
        )),
        None => Ok((target, None)),
    }
}

impl Export<'_> {
    pub fn run(
        &self,
        snapshot: Option<&str>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Imported> {
        crate::format::names::check_image_name(self.name)?;
        self.remove_abandoned_snapshots()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let exported =
                self.pool
                    .export_volume(self.name, self.volume, snapshot, self.copies, progress)?;
            let pid = match exported {
                Ok(imported) => return Ok(imported),
                Err(pid) => pid,
            };
            if let Some(mount) = self.pool.live_mounts()?.into_iter().find(|m| m.pid == pid) {
                return self.through_mount(&mount.mountpoint, snapshot, progress);
            }
            // Another command holds the volume for a moment.
            if Instant::now() > deadline {
                return Err(Error::refused(
                    ErrorKind::Busy,
                    format!("volume '{}' stayed held for a minute by another process that is not a mount of this pool: retry when it is done", self.volume),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn through_mount(
        &self,
        mountpoint: &Path,
        snapshot: Option<&str>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Imported> {
        let volume = self.volume;
        if let Some(snapshot) = snapshot {
            let key = self.pool.snapshot_source_key(volume, snapshot)?;
            let label = format!("volume:{volume}@{snapshot}");
            return self.read_snapshot_file(mountpoint, snapshot, label, Some(key), progress);
        }
        let id = uuid::Uuid::new_v4().to_string();
        let owner = OwnerLock::acquire(self.state_dir, &export_token(&id))?;
        let temporary = format!("{TEMPORARY_SNAPSHOT}{id}");
        super::snapshot_request(
            self.pool,
            self.state_dir,
            volume,
            &Request::Create {
                name: temporary.clone(),
                guid: uuid::Uuid::new_v4().to_string(),
                created: crate::format::clock::now(),
            },
        )?;
        // The live volume changes: its export does not resume another.
        let label = format!("volume:{volume}");
        let exported = self.read_snapshot_file(mountpoint, &temporary, label, None, progress);
        let removed = self.delete_snapshot(volume, &temporary);
        owner.release();
        let imported = exported?;
        removed?;
        Ok(imported)
    }

    fn read_snapshot_file(
        &self,
        mountpoint: &Path,
        snapshot: &str,
        label: String,
        resume_key: Option<String>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Imported> {
        let volume = self.volume;
        let path = mountpoint.join("snapshots").join(volume).join(snapshot);
        // A snapshot just taken shows in the mount at its next look at the index.
        let deadline = Instant::now() + Duration::from_secs(5);
        let file = loop {
            match File::open(&path) {
                Ok(file) => break file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::refused(
                        ErrorKind::NotFound,
                        format!("volume '{volume}' has no snapshot '{snapshot}' (`imgpool snapshot list {volume}` lists them)"),
                    ))
                }
                Err(e) => return Err(Error::io(format!("cannot open {}", path.display()), e)),
            }
        };
        let size = file
            .metadata()
            .ctx(|| format!("cannot stat {}", path.display()))?
            .len();
        let source = ImportSource {
            data: &file,
            size,
            path: path.clone(),
            recorded_as: Some(label),
            // A snapshot does not change.
            unchanged: &|| Ok(()),
            resume_key,
            sha512: WholeSha512::Later,
        };
        self.pool
            .import_image(self.name, &source, self.copies, progress)
    }

    fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        let request = Request::Delete {
            selection: Selection::Names(vec![snapshot.to_string()]),
            dry_run: false,
        };
        super::snapshot_request(self.pool, self.state_dir, volume, &request).map(drop)
    }

    /// Deletes the temporary snapshots of exports and sends whose process died, also of
    /// volumes a mount daemon has open (which `recover` leaves).
    fn remove_abandoned_snapshots(&self) -> Result<()> {
        for (volume, snapshot) in self.pool.abandoned_temporary_snapshots(None)? {
            tracing::info!(
                volume,
                snapshot,
                "deleting the temporary snapshot of an export or send that died"
            );
            self.delete_snapshot(&volume, &snapshot)?;
        }
        Ok(())
    }
}
