//! `image add NAME --from-volume VOLUME[@SNAP]`: a volume, now or at a snapshot, becomes an
//! image. A volume no mount has open is read here, under its writer lock. One that a mount
//! daemon has open is read through that mount, from the snapshot's file, which the daemon does
//! not let anyone delete while it is open; a live volume gets a temporary snapshot for that,
//! deleted afterwards (and, if this process died first, by the next export of the volume).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::core::owner::OwnerLock;
use crate::core::pool::{export_token, ImportSource, Imported, Pool, TEMPORARY_SNAPSHOT};
use crate::core::volume::requests::{Request, Selection};
use crate::error::{Error, ErrorKind, IoContext, Result};

pub fn export(
    pool: &Pool,
    state_dir: &Path,
    name: &str,
    target: &str,
    copies: Option<u32>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Imported> {
    let (volume, snapshot) = match target.rsplit_once('@') {
        Some((v, s)) if !v.is_empty() && !s.is_empty() => (v, Some(s)),
        Some(_) => {
            return Err(Error::refused(
                ErrorKind::InvalidInput,
                format!("'{target}' is not VOLUME or VOLUME@SNAPSHOT"),
            ))
        }
        None => (target, None),
    };
    remove_abandoned_snapshots(pool, state_dir)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pid = match pool.export_volume(name, volume, snapshot, copies, progress)? {
            Ok(imported) => return Ok(imported),
            Err(pid) => pid,
        };
        if let Some(mount) = pool.live_mounts()?.into_iter().find(|m| m.pid == pid) {
            return through_mount(
                pool,
                state_dir,
                &mount.mountpoint,
                name,
                volume,
                snapshot,
                copies,
                progress,
            );
        }
        // Another command holds the volume for a moment.
        if Instant::now() > deadline {
            return Err(Error::refused(
                ErrorKind::Busy,
                format!("volume '{volume}' stayed held for a minute by another process that is not a mount of this pool: retry when it is done"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[allow(clippy::too_many_arguments)]
fn through_mount(
    pool: &Pool,
    state_dir: &Path,
    mountpoint: &Path,
    name: &str,
    volume: &str,
    snapshot: Option<&str>,
    copies: Option<u32>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Imported> {
    crate::format::names::check_image_name(name)?;
    let Some(snapshot) = snapshot else {
        let id = uuid::Uuid::new_v4().to_string();
        let owner = OwnerLock::acquire(state_dir, &export_token(&id))?;
        let temporary = format!("{TEMPORARY_SNAPSHOT}{id}");
        super::snapshot_request(
            pool,
            state_dir,
            volume,
            &Request::Create {
                name: temporary.clone(),
                guid: uuid::Uuid::new_v4().to_string(),
                created: crate::format::clock::now(),
            },
        )?;
        let exported = read_snapshot_file(
            pool,
            mountpoint,
            name,
            volume,
            &temporary,
            format!("volume:{volume}"),
            copies,
            progress,
        );
        let removed = delete_snapshot(pool, state_dir, volume, &temporary);
        owner.release();
        let imported = exported?;
        removed?;
        return Ok(imported);
    };
    read_snapshot_file(
        pool,
        mountpoint,
        name,
        volume,
        snapshot,
        format!("volume:{volume}@{snapshot}"),
        copies,
        progress,
    )
}

#[allow(clippy::too_many_arguments)]
fn read_snapshot_file(
    pool: &Pool,
    mountpoint: &Path,
    name: &str,
    volume: &str,
    snapshot: &str,
    label: String,
    copies: Option<u32>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Imported> {
    let path: PathBuf = mountpoint.join("snapshots").join(volume).join(snapshot);
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
    };
    pool.import_image(name, &source, copies, progress)
}

fn delete_snapshot(pool: &Pool, state_dir: &Path, volume: &str, snapshot: &str) -> Result<()> {
    super::snapshot_request(
        pool,
        state_dir,
        volume,
        &Request::Delete {
            selection: Selection::Names(vec![snapshot.to_string()]),
            dry_run: false,
        },
    )
    .map(drop)
}

/// Deletes the temporary snapshots of exports whose process died, also of volumes a mount
/// daemon has open (which `recover` leaves).
fn remove_abandoned_snapshots(pool: &Pool, state_dir: &Path) -> Result<()> {
    for (volume, snapshot) in pool.abandoned_export_snapshots()? {
        tracing::info!(
            volume,
            snapshot,
            "deleting the temporary snapshot of an export that died"
        );
        delete_snapshot(pool, state_dir, &volume, &snapshot)?;
    }
    Ok(())
}
