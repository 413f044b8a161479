//! `imgpool send`: a volume's snapshots as a stream (`docs/send-receive.md`). Here the volume
//! is found (by name, or by uuid for a resume), the package is checked and made (everything
//! that can refuse the send does so before the stream's first byte), the snapshots are kept
//! from being deleted while they are read, and the base image is read from its verified copies.
//!
//! A volume no mount has open is read under its writer lock (nothing changes it meanwhile),
//! through `SnapshotReader`s. One that a mount daemon has open is read through that mount's
//! snapshot files, which the daemon does not let anyone delete while they are open, with the
//! granule lists read through a read-only connection to its index: the send never waits for
//! the daemon's writes, nor they for it.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::volumes::VolumeLock;
use super::Pool;
use crate::core::store::{VolumeRow, VolumeState};
use crate::core::volume::send::{
    package_snapshots, stream_snapshot, Package, SendProgress, SendSource, Sent,
};
use crate::core::volume::sums::{ContentSums, GranuleReader};
use crate::core::volume::{Base, NoBase, Snapshot, SnapshotListing, Volume, WriterLock};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::locks;
use crate::format::stream::{snapshots_digest, Header, ResumeToken, StreamImage};
use crate::format::volume::VolumeFiles;

/// The temporary snapshot `send VOLUME` takes of the live volume is named this prefix and its
/// owner token's id (`send_token`); one whose send died is deleted at the next start
/// (`recover`) or by the next send of the volume. A refresh copy's "current state" is such a
/// snapshot.
pub const COPY_TEMPORARY_SNAPSHOT: &str = "copy-tmp-";

/// The owner-lock token of the send with temporary snapshot `<COPY_TEMPORARY_SNAPSHOT><id>`.
pub fn send_token(id: &str) -> String {
    format!("send-{id}")
}

/// What to send.
#[derive(Debug, Clone)]
pub enum SendSpec<'a> {
    /// `send VOLUME@SNAPSHOT [--from FROM] [--from-all] [--with-image]`; `temporary`: the
    /// snapshot is the send's own, of the live volume.
    Package {
        volume: &'a str,
        snapshot: &'a str,
        temporary: bool,
        from: Option<&'a str>,
        from_all: bool,
        with_image: bool,
    },
    /// `send --resume TOKEN`: the rest of an interrupted package.
    Resume(&'a ResumeToken),
}

/// A send checked and ready: the volume pinned, the package made, nothing written yet.
pub struct PreparedSend {
    volume: String,
    package: Package,
    pin: Pin,
    base: SharedBase,
    listing: SnapshotListing,
    sums: ContentSums,
}

/// How the snapshots are kept while they are read.
enum Pin {
    /// No mount has the volume open: it is opened here, under its writer lock.
    Locked(LockedVolume),
    /// A mount daemon has it open: its snapshot files in `MOUNT/snapshots/VOLUME`.
    Mount(PathBuf),
}

/// A volume opened here; closed (a clean close) when dropped, also after a failure, then its
/// writer lock goes.
struct LockedVolume {
    volume: Arc<Volume>,
    _writer: WriterLock,
}

impl Drop for LockedVolume {
    fn drop(&mut self) {
        if let Err(e) = self.volume.shutdown() {
            tracing::warn!("cannot close the volume after a send: {e}");
        }
    }
}

/// The base image, read by the volume and by the sender alike (one cache of verified chunks).
#[derive(Clone)]
struct SharedBase(Arc<dyn Base>);

impl Base for SharedBase {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }

    fn seek(&self, offset: u64, hole: bool) -> io::Result<Option<u64>> {
        self.0.seek(offset, hole)
    }
}

/// How long a send waits for a volume another command holds for a moment.
const HELD_WAIT: Duration = Duration::from_secs(60);
/// How long a snapshot just taken may take to show in a mount.
const MOUNT_LAG: Duration = Duration::from_secs(5);

fn no_snapshot(volume: &str, snapshot: &str) -> Error {
    Error::refused(
        ErrorKind::NotFound,
        format!("volume '{volume}' has no snapshot '{snapshot}' (`imgpool snapshot list {volume}` lists them)"),
    )
}

impl Pool {
    /// Checks that `volume` and its snapshot `from` exist, before a send of the live volume
    /// takes its temporary snapshot.
    pub fn check_send(&self, volume: &str, from: Option<&str>) -> Result<()> {
        let info = self.volume(volume)?;
        if let Some(from) = from {
            let files = VolumeFiles::new(&info.dir);
            crate::core::volume::snapshot_named(&files, from)
                .ctx(|| format!("cannot read the snapshots of volume '{volume}'"))?
                .ok_or_else(|| no_snapshot(volume, from))?;
        }
        Ok(())
    }

    /// Checks a send and pins its volume: every refusal (an unknown volume or snapshot, a
    /// package that changed since a resume token was made, a base image without a good copy)
    /// comes from here, before anything is written.
    pub fn prepare_send(&self, spec: &SendSpec) -> Result<PreparedSend> {
        loop {
            // A volume replaced (or removed) while the send waited for its lock is looked up
            // again: the send reads the volume now so named, as if started after (or finds
            // none).
            if let Some(prepared) = self.prepare_send_to(spec)? {
                return Ok(prepared);
            }
        }
    }

    /// `prepare_send` of the volume as looked up now; `None` when it was replaced or removed
    /// before the send could pin it.
    fn prepare_send_to(&self, spec: &SendSpec) -> Result<Option<PreparedSend>> {
        let name = match spec {
            SendSpec::Package { volume, .. } => volume.to_string(),
            SendSpec::Resume(token) => self
                .store
                .volumes()?
                .into_iter()
                // A row not `ready` is no volume to send: a removal under way, or the hidden
                // row of a volume a `recv --force` replaced (named after a reserved prefix).
                .find(|v| v.uuid == token.volume_uuid && v.state == VolumeState::Ready)
                .map(|v| v.name)
                .ok_or_else(|| {
                    Error::refused(
                        ErrorKind::NotFound,
                        format!(
                            "no volume has uuid {} any more: the volume the interrupted send read is gone (removed, or replaced by a `recv --force`), so its package cannot be resumed: drop the partial receive (`imgpool recv --abort VOLUME` on the receiving side) and send the volume again",
                            token.volume_uuid
                        ),
                    )
                })?,
        };
        let info = self.volume(&name)?;
        let files = VolumeFiles::new(&info.dir);
        let (base_image, base) = match info.volume.image_id {
            Some(id) => {
                let row = self
                    .store
                    .images()?
                    .into_iter()
                    .find(|i| i.id == id)
                    .ok_or_else(|| {
                        Error::refused(
                            ErrorKind::Corrupt,
                            format!("the base image of volume '{name}' is not in the store"),
                        )
                    })?;
                let image = StreamImage {
                    // An exported image's is computed now if it is not yet.
                    sha512: self.complete_sha512(&row, &mut |_| Ok(()))?,
                    name: row.name,
                    uuid: row.uuid,
                    size: row.size,
                };
                let copies: Arc<dyn Base> = Arc::new(self.verified_copies(id)?);
                (Some(image), SharedBase(copies))
            }
            None => (None, SharedBase(Arc::new(NoBase))),
        };
        let Some(pin) = self.pin_volume(&info.volume, &files, &base)? else {
            return Ok(None);
        };
        let listing = SnapshotListing::open(&files)
            .ctx(|| format!("cannot read the snapshots of volume '{name}'"))?;
        let all = listing
            .all()
            .ctx(|| format!("cannot read the snapshots of volume '{name}'"))?;
        let header = Header {
            package: uuid::Uuid::new_v4().to_string(),
            volume: name.clone(),
            volume_uuid: info.volume.uuid.clone(),
            base_image,
            from: None,
            snapshots: Vec::new(),
            from_all: false,
            with_image: false,
            resume: None,
        };
        let package = match spec {
            SendSpec::Package {
                snapshot,
                temporary,
                from,
                from_all,
                with_image,
                ..
            } => {
                let find = |n: &str| {
                    all.iter()
                        .find(|s| s.name == n)
                        .cloned()
                        .ok_or_else(|| no_snapshot(&name, n))
                };
                let to = find(snapshot)?;
                let from = from.map(find).transpose()?;
                if let Some(from) = &from {
                    if from.epoch >= to.epoch {
                        return Err(Error::refused(
                            ErrorKind::InvalidInput,
                            format!(
                                "snapshot '{}' of volume '{name}' is not older than '{}': --from names the snapshot the receiver has, taken before the one sent",
                                from.name, to.name
                            ),
                        ));
                    }
                }
                let snapshots = kept_snapshots(&all, from.as_ref(), &to, *from_all);
                make_package(header, from, snapshots, *temporary, *from_all, *with_image)
            }
            SendSpec::Resume(token) => resumed_package(header, &name, &all, token)?,
        };
        let sums =
            ContentSums::open(&files).ctx(|| format!("cannot open the sums of volume '{name}'"))?;
        // The sums of snapshots deleted since go (best effort: they are only kept too long).
        let guids = all.iter().map(|s| s.guid.clone()).collect();
        if let Err(e) = sums.retain(&guids) {
            tracing::warn!(
                volume = name,
                "cannot forget the sums of deleted snapshots: {e}"
            );
        }
        Ok(Some(PreparedSend {
            volume: name,
            package,
            pin,
            base,
            listing,
            sums,
        }))
    }

    /// Takes the volume's writer lock and opens it here, or finds the mount whose daemon has it
    /// open. Another command holding it for a moment (a snapshot, a reclaim, a receive
    /// replacing it) is waited for; `None` when the volume was replaced or removed meanwhile.
    fn pin_volume(
        &self,
        row: &VolumeRow,
        files: &VolumeFiles,
        base: &SharedBase,
    ) -> Result<Option<Pin>> {
        let name = row.name.as_str();
        let deadline = Instant::now() + HELD_WAIT;
        loop {
            match self.try_lock_volume(row, files)? {
                VolumeLock::Held(writer) => {
                    let volume = Volume::open(files, Box::new(base.clone()))
                        .ctx(|| format!("cannot open volume '{name}'"))?;
                    return Ok(Some(Pin::Locked(LockedVolume {
                        volume: Arc::new(volume),
                        _writer: writer,
                    })));
                }
                VolumeLock::Changed => return Ok(None),
                VolumeLock::Busy => {}
            }
            let holder = locks::exclusive_flock_holder(&files.writer_lock())?;
            if let Some(pid) = holder {
                if let Some(mount) = self.live_mounts()?.into_iter().find(|m| m.pid == pid) {
                    return Ok(Some(Pin::Mount(
                        mount.mountpoint.join("snapshots").join(name),
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(Error::refused(
                    ErrorKind::Busy,
                    format!("volume '{name}' stayed held for a minute by another process that is not a mount of this pool: retry when it is done"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `package_snapshots` without the temporary snapshots of other commands (an export's, another
/// send's), which the receiver would refuse to keep: a package ends with its own `to` only.
fn kept_snapshots(
    all: &[Snapshot],
    from: Option<&Snapshot>,
    to: &Snapshot,
    from_all: bool,
) -> Vec<Snapshot> {
    package_snapshots(all, from, to, from_all)
        .into_iter()
        .filter(|s| {
            s.epoch == to.epoch
                || !super::TEMPORARY_SNAPSHOT_PREFIXES
                    .iter()
                    .any(|p| s.name.starts_with(p))
        })
        .collect()
}

fn make_package(
    mut header: Header,
    from: Option<Snapshot>,
    snapshots: Vec<Snapshot>,
    temporary: bool,
    from_all: bool,
    with_image: bool,
) -> Package {
    let last = snapshots.len() - 1;
    header.from = from.as_ref().map(|f| stream_snapshot(f, false));
    header.snapshots = snapshots
        .iter()
        .enumerate()
        .map(|(i, s)| stream_snapshot(s, temporary && i == last))
        .collect();
    header.from_all = from_all;
    // A volume over zeros has no image to carry.
    header.with_image = with_image && header.base_image.is_some();
    Package {
        header,
        from,
        snapshots,
    }
}

/// The package of an interrupted send made again from the volume's snapshots (by guid), and
/// refused if it is not the same any more.
fn resumed_package(
    header: Header,
    volume: &str,
    all: &[Snapshot],
    token: &ResumeToken,
) -> Result<Package> {
    let cannot = "the interrupted package cannot be resumed: `imgpool recv --abort VOLUME` on the receiving side drops the partial receive, then send again";
    let find = |guid: &str, which: &str| {
        all.iter().find(|s| s.guid == guid).cloned().ok_or_else(|| {
            Error::refused(
                ErrorKind::NotFound,
                format!("the package changed since: its {which} snapshot (guid {guid}) is no longer a snapshot of volume '{volume}' (deleted, or the temporary snapshot of a send of the live volume, which is gone with its send); {cannot}"),
            )
        })
    };
    let to = find(&token.to, "last")?;
    if to.name.starts_with(COPY_TEMPORARY_SNAPSHOT) {
        // A leftover of a send that died: a resumed stream would keep it as a snapshot.
        return Err(Error::refused(
            ErrorKind::Conflict,
            format!("the interrupted package ends with '{}', the temporary snapshot of a send of the live volume '{volume}', which goes with its send; it cannot be resumed: `imgpool recv --abort VOLUME` on the receiving side drops the partial receive, then send the volume again", to.name),
        ));
    }
    let from = token
        .from
        .as_deref()
        .map(|g| find(g, "starting"))
        .transpose()?;
    if from.as_ref().is_some_and(|f| f.epoch >= to.epoch) {
        return Err(Error::refused(
            ErrorKind::InvalidInput,
            format!("this resume token's snapshots of volume '{volume}' are in the wrong order: it was not made by `imgpool recv --resume-token`"),
        ));
    }
    let snapshots = kept_snapshots(all, from.as_ref(), &to, token.from_all);
    let package = make_package(
        Header {
            package: token.package.clone(),
            resume: Some(token.point),
            ..header
        },
        from,
        snapshots,
        false,
        token.from_all,
        token.with_image,
    );
    if snapshots_digest(&package.header.snapshots) != token.snapshots {
        return Err(Error::refused(
            ErrorKind::Conflict,
            format!(
                "the package changed since: a snapshot of volume '{volume}' between {} and '{}' was deleted or taken after the interrupted send; {cannot}",
                package
                    .from
                    .as_ref()
                    .map_or("its first snapshot".to_string(), |f| format!("'{}'", f.name)),
                package.snapshots[package.snapshots.len() - 1].name
            ),
        ));
    }
    if token.point.done > package.snapshots.len() {
        return Err(Error::refused(
            ErrorKind::InvalidInput,
            "this resume token says more snapshots were received than its package has: it was not made by `imgpool recv --resume-token`",
        ));
    }
    Ok(package)
}

/// Output whose failures say that the stream could not be written (a reader that went away,
/// a full disk), not that the volume could not be read.
struct StreamOut<W: Write>(W);

fn write_error(e: io::Error) -> io::Error {
    let what = match e.kind() {
        io::ErrorKind::BrokenPipe => "its reader went away".to_string(),
        _ => e.to_string(),
    };
    io::Error::new(e.kind(), format!("cannot write the stream: {what}"))
}

impl<W: Write> Write for StreamOut<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(write_error)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf).map_err(write_error)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(write_error)
    }
}

/// Opens a snapshot's file in a mount (waiting a moment for one just taken to show), and
/// makes sure it is that snapshot: it cannot be deleted while open, so a name that still
/// belongs to its epoch after the open is the snapshot held.
fn open_in_mount(
    dir: &Path,
    listing: &SnapshotListing,
    volume: &str,
    snapshot: &Snapshot,
) -> io::Result<File> {
    let gone = || {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "snapshot '{}' of volume '{volume}' was deleted while the send was under way",
                snapshot.name
            ),
        )
    };
    let path = dir.join(&snapshot.name);
    let deadline = Instant::now() + MOUNT_LAG;
    let file = loop {
        match File::open(&path) {
            Ok(file) => break file,
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(gone()),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot open {}: {e}", path.display()),
                ))
            }
        }
    };
    let held = listing.by_name(&snapshot.name)?;
    if held.as_ref().map(|s| s.epoch) != Some(snapshot.epoch) {
        return Err(gone());
    }
    let len = file.metadata()?.len();
    if len != snapshot.size {
        return Err(io::Error::other(format!(
            "{} has {len} bytes, snapshot '{}' of volume '{volume}' {}: the mount does not serve this snapshot as its index has it",
            path.display(),
            snapshot.name,
            snapshot.size
        )));
    }
    Ok(file)
}

impl PreparedSend {
    pub fn header(&self) -> &Header {
        &self.package.header
    }

    /// Whether a mount daemon has the volume open (its snapshot files are read).
    pub fn through_mount(&self) -> bool {
        matches!(self.pin, Pin::Mount(_))
    }

    /// Writes the stream to `out`. The volume opened here is closed also after a failure.
    pub fn run<W: Write>(self, out: W, progress: &mut dyn FnMut(&SendProgress)) -> Result<Sent> {
        let volume = self.volume.as_str();
        let listing = &self.listing;
        let open_locked;
        let open_mounted;
        let open: &crate::core::volume::send::OpenSnapshot = match &self.pin {
            Pin::Locked(locked) => {
                open_locked = |s: &Snapshot| -> io::Result<Box<dyn GranuleReader>> {
                    Ok(Box::new(locked.volume.open_snapshot(s.epoch)?))
                };
                &open_locked
            }
            Pin::Mount(dir) => {
                open_mounted = |s: &Snapshot| -> io::Result<Box<dyn GranuleReader>> {
                    Ok(Box::new(open_in_mount(dir, listing, volume, s)?))
                };
                &open_mounted
            }
        };
        let source = SendSource {
            listing,
            open,
            base: &self.base,
            sums: &self.sums,
        };
        let sent =
            crate::core::volume::send::send(&source, &self.package, StreamOut(out), progress)
                .ctx(|| format!("cannot send volume '{volume}'"))?;
        if let Pin::Locked(locked) = &self.pin {
            locked
                .volume
                .shutdown()
                .ctx(|| format!("cannot close volume '{volume}'"))?;
        }
        tracing::info!(
            event = "volume_sent",
            volume,
            package = self.package.header.package.as_str(),
            snapshots = sent.snapshots_sent,
            bytes = sent.bytes,
            "volume '{volume}': sent {} snapshot(s), {} stream bytes",
            sent.snapshots_sent,
            sent.bytes
        );
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::stream::ResumePoint;

    fn snapshot(epoch: u64, name: &str) -> Snapshot {
        Snapshot {
            epoch,
            name: name.into(),
            guid: format!("guid-{name}"),
            created: 1,
            size: 1 << 20,
        }
    }

    fn header() -> Header {
        Header {
            package: String::new(),
            volume: "v".into(),
            volume_uuid: "uuid".into(),
            base_image: None,
            from: None,
            snapshots: Vec::new(),
            from_all: false,
            with_image: false,
            resume: None,
        }
    }

    fn token(all: &[Snapshot], from: &str, to: &str, from_all: bool) -> ResumeToken {
        let find = |n: &str| all.iter().find(|s| s.name == n).unwrap();
        let snapshots = kept_snapshots(all, Some(find(from)), find(to), from_all);
        let package = make_package(header(), None, snapshots, false, from_all, false);
        ResumeToken {
            package: "p".into(),
            volume_uuid: "uuid".into(),
            from: Some(find(from).guid.clone()),
            to: find(to).guid.clone(),
            from_all,
            with_image: false,
            snapshots: snapshots_digest(&package.header.snapshots),
            point: ResumePoint {
                done: 0,
                granule: 1,
            },
        }
    }

    /// The interrupted send's volume was replaced by a `recv --force`: its uuid now names the
    /// replaced volume's hidden row, being removed. The resume says the volume is gone, and
    /// never names that row.
    #[test]
    fn a_resume_whose_volume_was_replaced_says_it_is_gone() {
        let f = crate::core::pool::fixture(1);
        f.pool
            .create_volume("v", None, Some(1 << 20), None)
            .unwrap();
        let row = f.pool.store().volume("v").unwrap();
        assert!(f
            .pool
            .store()
            .set_volume_state(row.id, VolumeState::Ready, VolumeState::Removing)
            .unwrap());
        let all = [snapshot(1, "s1"), snapshot(2, "s2")];
        let t = ResumeToken {
            volume_uuid: row.uuid.clone(),
            ..token(&all, "s1", "s2", false)
        };
        let e = f
            .pool
            .prepare_send(&SendSpec::Resume(&t))
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains(&format!("no volume has uuid {} any more", row.uuid))
                && e.contains("send the volume again"),
            "{e}"
        );
    }

    #[test]
    fn a_package_ending_with_a_leftover_temporary_snapshot_is_not_resumed() {
        // A send of the live volume died: its temporary snapshot is still there.
        let all = [snapshot(1, "s1"), snapshot(2, "copy-tmp-1234")];
        let e = resumed_package(
            header(),
            "v",
            &all,
            &token(&all, "s1", "copy-tmp-1234", false),
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(
            e.contains("cannot be resumed") && e.contains("send the volume again"),
            "{e}"
        );
    }

    #[test]
    fn a_package_leaves_out_the_temporary_snapshots_of_other_commands() {
        let all = [
            snapshot(1, "s1"),
            snapshot(2, "export-tmp-1"),
            snapshot(3, "s2"),
            snapshot(4, "copy-tmp-2"),
            snapshot(5, "s3"),
        ];
        let names = |v: Vec<Snapshot>| v.into_iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(
            names(kept_snapshots(&all, None, &all[4], true)),
            ["s1", "s2", "s3"]
        );
        // A resumed package is made alike, whether or not they are still there.
        let t = token(&all, "s1", "s3", true);
        let without: Vec<Snapshot> = all
            .iter()
            .filter(|s| !s.name.contains("tmp"))
            .cloned()
            .collect();
        for volume in [&all[..], &without[..]] {
            let package = match resumed_package(header(), "v", volume, &t) {
                Ok(package) => package,
                Err(e) => panic!("{e}"),
            };
            assert_eq!(names(package.snapshots), ["s2", "s3"]);
        }
    }
}
