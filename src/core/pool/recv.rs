//! Receiving a stream (`imgpool recv`, docs/send-receive.md): a whole stream makes a new
//! volume, an incremental one adds snapshots to the volume it was made from. Every record is
//! checked before it is applied (`format::stream`), and each snapshot's content digest before
//! the snapshot is taken; nothing of the stream is visible before its `End`: a new volume stays
//! `creating`, and an existing one takes its snapshots under staged names
//! (`recv-tmp-<package>-<n>`), renamed to their real names in one index transaction at the end.
//!
//! A failure leaves the target as it was: a new volume is removed, an existing one is rolled
//! back to the snapshot the stream applies on (with its staged snapshots). With `--resumable`,
//! what was applied and made durable stays, described by the volume's `receive.json`; the
//! receive goes on with a stream resumed from there (`send --resume TOKEN`), or is dropped
//! (`recv --abort`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};

use super::images::{ImportSource, WholeSha512};
use super::volumes::{
    check_size, has_partial_receive, partial_receive_refusal, NewVolume, VolumeLock,
};
use super::Pool;
use crate::core::crash_point::{self, CrashPoint};
use crate::core::owner::{self, Owner, OwnerLock};
use crate::core::store::{ImageRow, VolumeRow, VolumeState};
use crate::core::volume::sums::{sum_changes, BaseGranules, ContentSums, GranuleReader};
use crate::core::volume::{Base, NoBase, Snapshot, Volume, WriterLock};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::layout::{fsync_dir, read_volume_record, write_durably, write_volume_record};
use crate::format::names;
use crate::format::stream::{
    snapshots_digest, ContentHash, Header, ReadAhead, Record, Records, ResumePoint, ResumeToken,
    StreamError, StreamReader, StreamSnapshot,
};
use crate::format::volume::{VolumeFiles, GRANULE};

/// The names received snapshots take until the stream's end.
pub const STAGED_PREFIX: &str = "recv-tmp-";

/// Applied bytes between two records of a resumable receive's progress.
const CHECKPOINT_BYTES: u64 = 256 << 20;

/// Bytes written between two starts of the data file's writeback: the sync at each snapshot's
/// end then waits for the last few only (it waited 0.6 s for a whole GiB, after the writes).
const WRITEBACK_BYTES: u64 = 32 << 20;

/// How `recv` takes a stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReceiveOptions {
    /// Discard what the target has that the stream's `from` snapshot does not.
    pub force: bool,
    /// Keep what was received when the stream fails, to go on with a resumed stream.
    pub resumable: bool,
}

/// What a receive did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Received {
    pub volume: String,
    /// The stream made the volume.
    pub created: bool,
    /// The snapshots received and kept, by name, oldest first.
    pub snapshots: Vec<String>,
    /// The stream's bytes read (of this stream, when it resumed another).
    pub bytes: u64,
    /// The base image imported from the stream, if any.
    pub imported_image: Option<String>,
    /// `--force`: the snapshots deleted, and whether writes since the newest were dropped.
    pub discarded_snapshots: Vec<String>,
    pub discarded_writes: bool,
    /// The stream continued an interrupted receive.
    pub resumed: bool,
    /// The stream replaced an existing volume (`--force`, a whole stream): the volume's
    /// snapshots before are `discarded_snapshots`.
    pub replaced: bool,
}

/// `receive.json`: a receive under way, or a partial, resumable one. Every receive writes it
/// before it changes the target, so that one that dies is found: a resumable one is kept, a
/// plain one undone by the next `recover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PartialReceive {
    /// A failure keeps what was received (`--resumable`); otherwise a dead receiver's work is
    /// undone.
    resumable: bool,
    /// The package's header as its first stream had it (`resume` none).
    header: Header,
    /// The stream makes the volume (it stays `creating` until the end).
    new_volume: bool,
    /// The snapshots received whole, and of the next one, the granules before `granule`.
    point: ResumePoint,
    /// The content sum of the volume as it is at `point` (hex).
    sum: String,
    /// Written (durably) once every snapshot is taken, just before the transaction that
    /// renames the staged snapshots and deletes the temporary ones: without it, that
    /// transaction never ran, whatever the volume holds.
    #[serde(default)]
    commit_started: bool,
    /// The uuid of the volume this receive replaces (a whole stream onto an existing volume,
    /// `--force`): the new volume takes its name only in the store transaction that retires it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replaces: Option<String>,
}

impl PartialReceive {
    fn sum(&self) -> Result<ContentHash> {
        hex::decode(&self.sum)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
            .map(|b| ContentHash::from_bytes(&b))
            .ok_or_else(|| {
                Error::refused(
                    ErrorKind::Corrupt,
                    "the partial receive's state (receive.json) is damaged: drop it with `imgpool recv --abort`",
                )
            })
    }
}

fn read_partial(files: &VolumeFiles) -> Result<Option<PartialReceive>> {
    let path = files.receive_state();
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::refused(
                ErrorKind::Corrupt,
                format!(
                    "{} is damaged ({e}): drop the partial receive with `imgpool recv --abort`",
                    path.display()
                ),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
    }
}

/// The partial receive as the volume has it: `receive.json`, brought forward past a snapshot
/// taken just before a crash kept the file from saying so (the snapshot's sum was recorded
/// before it was taken).
fn current_partial(files: &VolumeFiles) -> Result<Option<PartialReceive>> {
    let Some(mut partial) = read_partial(files)? else {
        return Ok(None);
    };
    loop {
        let index = partial.point.done;
        let Some(s) = partial.header.snapshots.get(index) else {
            return Ok(Some(partial));
        };
        let staged = staged_name(&partial.header.package, index);
        let taken = crate::core::volume::snapshot_named(files, &staged)
            .ctx(|| format!("cannot read {}", files.index().display()))?
            .is_some();
        if !taken {
            return Ok(Some(partial));
        }
        let sum = ContentSums::open(files)
            .and_then(|sums| sums.get(&s.guid))
            .ctx(|| format!("cannot read {}", files.content_sums().display()))?
            .ok_or_else(|| {
                Error::refused(
                    ErrorKind::Corrupt,
                    "the partial receive lost a received snapshot's sum: drop it with `imgpool recv --abort`",
                )
            })?;
        partial.point = ResumePoint {
            done: index + 1,
            granule: 0,
        };
        partial.sum = hex::encode(sum.to_bytes());
    }
}

fn write_partial(files: &VolumeFiles, partial: &PartialReceive) -> Result<()> {
    let json = serde_json::to_vec_pretty(partial).expect("the state serializes");
    write_durably(&files.receive_state(), &json)
}

fn remove_partial(files: &VolumeFiles) -> Result<()> {
    match fs::remove_file(files.receive_state()) {
        Ok(()) => fsync_dir(files.dir()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("cannot remove receive.json", e)),
    }
}

fn stream_error(e: StreamError) -> Error {
    Error::refused(ErrorKind::Corrupt, e.to_string())
}

fn malformed(why: impl Into<String>) -> Error {
    Error::refused(
        ErrorKind::Corrupt,
        format!("the stream is malformed: {}", why.into()),
    )
}

fn staged_name(package: &str, index: usize) -> String {
    format!("{STAGED_PREFIX}{}-{index}", short(package))
}

fn staged_prefix(package: &str) -> String {
    format!("{STAGED_PREFIX}{}-", short(package))
}

/// The name of the `creating` row of a volume received to replace volume `name`: reserved
/// (`check_user_volume_name`), so no user volume has it and no listing shows it.
fn replacing_name(package: &str, name: &str) -> String {
    format!("{STAGED_PREFIX}{}-{name}", short(package))
}

/// The name a replaced volume's row takes while it is removed (its name goes to the new one).
fn tombstone_name(uuid: &str) -> String {
    format!("{STAGED_PREFIX}replaced-{uuid}")
}

/// Refuses a volume name that a user may not give: an image name (a path component in the
/// mount) that does not start with the prefix of the rows a replacing receive keeps out of
/// sight (`replacing_name`, `tombstone_name`).
pub fn check_user_volume_name(name: &str) -> Result<()> {
    names::check_image_name(name)?;
    if name.starts_with(STAGED_PREFIX) {
        return Err(Error::refused(
            ErrorKind::InvalidInput,
            format!("volume names starting with '{STAGED_PREFIX}' are kept for the volumes a receive makes out of sight: pick another name"),
        ));
    }
    Ok(())
}

fn short(text: &str) -> &str {
    let end = text.char_indices().nth(8).map_or(text.len(), |(at, _)| at);
    &text[..end]
}

/// The checks of a header on its own: what any target needs of it.
fn check_header(header: &Header) -> Result<()> {
    if header.snapshots.is_empty() {
        return Err(malformed("its header lists no snapshot"));
    }
    let mut seen = std::collections::HashSet::new();
    let last = header.snapshots.len() - 1;
    for (i, s) in header.snapshots.iter().enumerate() {
        if s.temporary && i != last {
            return Err(malformed(format!(
                "snapshot '{}' is marked temporary but is not the package's last",
                s.name
            )));
        }
        if !s.temporary {
            if let Some(prefix) = super::TEMPORARY_SNAPSHOT_PREFIXES
                .iter()
                .find(|p| s.name.starts_with(**p))
            {
                // A name this pool gives its own temporary snapshots: kept, it would be taken
                // for one (deleted by a recovery, or in the way of a receive).
                return Err(Error::refused(
                    ErrorKind::InvalidInput,
                    format!(
                        "the stream would keep snapshot '{}', but names starting with '{prefix}' are those of temporary snapshots: rename that snapshot on the sending side (or leave it out of the package) and send again",
                        s.name
                    ),
                ));
            }
            names::check_snapshot_name(&s.name)?;
            if !seen.insert(s.name.as_str()) {
                return Err(malformed(format!(
                    "its header lists snapshot '{}' twice",
                    s.name
                )));
            }
        }
        if s.size == 0 || !s.size.is_multiple_of(crate::format::volume::BLOCK) {
            return Err(malformed(format!(
                "snapshot '{}' has size {}, not a positive multiple of 4096",
                s.name, s.size
            )));
        }
    }
    if header.with_image && header.base_image.is_none() {
        return Err(malformed("it carries a base image but names none"));
    }
    Ok(())
}

/// The volume a receive writes, open under its writer lock (an existing volume) or under its
/// creator's owner lock (a new one).
struct Target {
    name: String,
    row: VolumeRow,
    files: VolumeFiles,
    volume: Arc<Volume>,
    new_volume: bool,
    /// The snapshot the stream applies on (an incremental stream).
    from: Option<Snapshot>,
    base_sha512: Option<String>,
    /// The volume a whole stream replaces (`--force`), held until it is retired.
    replacing: Option<Replaced>,
    _owner: Option<OwnerLock>,
    _locks: ReceiveLocks,
}

/// The existing volume a replacing receive retires at its end, under its writer lock from the
/// first check to its removal: no mount opens it and no command changes it meanwhile.
struct Replaced {
    row: VolumeRow,
    _locks: ReceiveLocks,
}

impl Pool {
    /// The base a volume over `image` reads (none: zeros), from the image's verified copies.
    fn base_of(&self, image_id: Option<i64>) -> Result<Box<dyn Base>> {
        Ok(match image_id {
            Some(id) => Box::new(self.verified_copies(id)?),
            None => Box::new(NoBase),
        })
    }

    /// The volume row named `name`, whatever its state.
    fn volume_row_any_state(&self, name: &str) -> Result<Option<VolumeRow>> {
        Ok(self.store.volumes()?.into_iter().find(|v| v.name == name))
    }

    fn volume_files_of(&self, row: &VolumeRow) -> Result<VolumeFiles> {
        let disk = self
            .store
            .disks()?
            .into_iter()
            .find(|d| d.id == row.disk_id)
            .ok_or_else(|| {
                Error::refused(ErrorKind::Internal, "a volume's disk is not registered")
            })?;
        Ok(crate::format::layout::DiskLayout::new(&disk.path).volume_files(&row.uuid))
    }

    /// Whether the volume (a row in any state) holds a partial receive kept to be resumed
    /// (one whose state cannot be read counts: `recv --abort` drops it).
    pub(crate) fn volume_has_resumable_receive(&self, row: &VolumeRow) -> Result<bool> {
        Ok(match read_partial(&self.volume_files_of(row)?) {
            Ok(partial) => partial.is_some_and(|p| p.resumable),
            Err(_) => true,
        })
    }

    /// Whether the `creating` volume `row` was being received to replace another: its
    /// receive never swapped it in, so that other one is as it was (recovery's report).
    pub(crate) fn volume_was_replacing(&self, row: &VolumeRow) -> bool {
        self.volume_files_of(row)
            .and_then(|files| read_partial(&files))
            .is_ok_and(|p| p.is_some_and(|p| p.replaces.is_some()))
    }

    /// Applies the stream `input` to volume `name` (docs/send-receive.md, "Receiving");
    /// `progress` hears of each record read. (`imgpool recv` reads ahead in a thread:
    /// `receive_read_ahead`.)
    #[cfg(test)]
    pub fn receive(
        &self,
        name: &str,
        input: &mut dyn Read,
        options: ReceiveOptions,
        progress: &mut dyn FnMut(&ReceiveProgress),
    ) -> Result<Received> {
        let reader = StreamReader::new(input).map_err(stream_error)?;
        self.receive_checkpointing(name, Box::new(reader), options, CHECKPOINT_BYTES, progress)
    }

    /// `receive` from an input of its own, whose records a thread reads and checks ahead of
    /// the receive (standard input, for `imgpool recv`).
    pub fn receive_read_ahead(
        &self,
        name: &str,
        input: impl Read + Send + 'static,
        options: ReceiveOptions,
        progress: &mut dyn FnMut(&ReceiveProgress),
    ) -> Result<Received> {
        let reader = StreamReader::new(input).map_err(stream_error)?;
        let records =
            ReadAhead::start(reader).ctx(|| "cannot start reading the stream".to_string())?;
        self.receive_checkpointing(name, Box::new(records), options, CHECKPOINT_BYTES, progress)
    }

    /// `receive`, recording a resumable receive's progress every `checkpoint_bytes` applied.
    fn receive_checkpointing(
        &self,
        name: &str,
        mut reader: Box<dyn Records + '_>,
        options: ReceiveOptions,
        checkpoint_bytes: u64,
        progress: &mut dyn FnMut(&ReceiveProgress),
    ) -> Result<Received> {
        // A reserved name is refused where a volume would be made under it; a volume an
        // earlier version let its user give such a name (before the prefix was reserved)
        // stays that user's, and receives. Checked here to refuse before the stream is read,
        // and again where a new volume is made (`receive_checked`): the old volume may be
        // removed meanwhile.
        let named_before = name.starts_with(STAGED_PREFIX) && self.store.volume(name).is_ok();
        if !named_before {
            check_user_volume_name(name)?;
        }
        let header = match reader.next().map_err(stream_error)? {
            Record::Header(header) => header,
            _ => return Err(malformed("it does not start with its header")),
        };
        let checked = self.check_stream(name, header, options)?;
        let mut incoming = Incoming::new(reader, &checked.header, progress);
        self.receive_checked(name, &mut incoming, checked, options, checkpoint_bytes)
    }

    /// The checks of a stream's header against what volume `name` has, before any lock: they
    /// refuse early, and are made again under the lock where they matter.
    fn check_stream(
        &self,
        name: &str,
        header: Header,
        options: ReceiveOptions,
    ) -> Result<CheckedStream> {
        check_header(&header)?;
        let existing = self.volume_row_any_state(name)?;
        let partial = match &existing {
            Some(row) => current_partial(&self.volume_files_of(row)?)?,
            None => None,
        };
        match (&header.resume, &partial) {
            (_, Some(partial)) if !partial.resumable => {
                // Its receiver runs, or died and the next `recover` undoes its work.
                return Err(Error::refused(
                    ErrorKind::Busy,
                    format!("another `imgpool recv` is receiving into volume '{name}' (or died doing so: `imgpool repair` cleans that up): retry when it is done"),
                ));
            }
            (None, Some(_)) => return Err(partial_receive_refusal(name)),
            (Some(_), None) => {
                return Err(Error::refused(
                    ErrorKind::Conflict,
                    format!("the stream resumes an interrupted receive, but volume '{name}' has none to resume: send the package again without --resume"),
                ))
            }
            (Some(point), Some(partial)) => {
                let first = &partial.header;
                // The whole package, not only its digest (of guids): a snapshot marked
                // temporary in one and not in the other would be kept, or its name lost.
                if first.package != header.package
                    || first.snapshots != header.snapshots
                    || first.from != header.from
                    || first.base_image.as_ref().map(|i| &i.sha512)
                        != header.base_image.as_ref().map(|i| &i.sha512)
                    || partial.point != *point
                {
                    return Err(Error::refused(
                        ErrorKind::Conflict,
                        format!("the stream resumes another package, or from another point, than the partial receive of volume '{name}' (its snapshots, its starting snapshot or its base image differ): use the token `imgpool recv --resume-token {name}` prints now, or drop the partial receive with `imgpool recv --abort {name}`"),
                    ));
                }
            }
            (None, None) => {}
        }
        if existing.is_some() && header.from.is_none() && partial.is_none() {
            // Before the base image is read or imported: the stream goes nowhere here.
            if !options.force {
                return Err(exists_refusal(name));
            }
            if options.resumable {
                return Err(Error::refused(
                    ErrorKind::InvalidInput,
                    format!("volume '{name}' exists, and a whole stream replacing it (--force) cannot be resumable: its partial state would be a second volume kept out of sight while '{name}' stays in use; receive it again without --resumable (a cut leaves '{name}' as it was)"),
                ));
            }
        }
        // A resumed stream is applied as the package its first stream began: only whether it
        // carries the image (the token says if the receiver still needs it) is its own.
        let header = match &partial {
            Some(partial) => Header {
                resume: header.resume,
                with_image: header.with_image,
                ..partial.header.clone()
            },
            None => header,
        };
        Ok(CheckedStream {
            header,
            existing,
            partial,
        })
    }

    /// Applies a stream whose header `check_stream` checked; the stream's next record is the
    /// one after its header.
    fn receive_checked(
        &self,
        name: &str,
        reader: &mut Incoming,
        checked: CheckedStream,
        options: ReceiveOptions,
        checkpoint_bytes: u64,
    ) -> Result<Received> {
        let CheckedStream {
            header,
            existing,
            partial,
        } = checked;
        let mut received = Received {
            volume: name.to_string(),
            resumed: partial.is_some(),
            ..Received::default()
        };
        let resumable = options.resumable || partial.is_some();
        // Each target is locked and checked before the stream's image records are read.
        let target = match (&existing, &partial) {
            (None, _) => {
                // No volume has the name (looked up after the reserved-name check above): a
                // volume made now would be a new one under it.
                check_user_volume_name(name)?;
                check_new_target(name, &header)?;
                // A new volume is made over its base: the image comes first.
                let base = self.stream_base(&header, reader, &mut received)?;
                self.new_target(name, name, &header, base.as_ref())?
            }
            // A whole stream onto an existing volume: `check_stream` let only `--force` by.
            (Some(row), None) if header.from.is_none() => {
                self.replacing_target(row, &header, reader, &mut received)?
            }
            (Some(row), Some(partial)) if partial.new_volume => {
                self.resumed_new_target(name, row, &header, partial, reader, &mut received)?
            }
            (Some(row), _) => {
                if row.state != VolumeState::Ready {
                    return Err(Error::refused(
                        ErrorKind::Busy,
                        format!("volume '{name}' is being created or removed by another command: retry when it is done"),
                    ));
                }
                self.existing_target(
                    row,
                    &header,
                    partial.as_ref(),
                    options.force,
                    reader,
                    &mut received,
                )?
            }
        };
        received.created = target.new_volume && target.replacing.is_none();
        received.replaced = target.replacing.is_some();
        let start = match &partial {
            Some(partial) => partial.sum()?,
            None => self.start_sum(&target)?,
        };
        let point = partial.as_ref().map(|p| p.point);
        let state = PartialReceive {
            resumable,
            header: Header {
                resume: None,
                ..header.clone()
            },
            new_volume: target.new_volume,
            point: point.unwrap_or(ResumePoint {
                done: 0,
                granule: 0,
            }),
            sum: hex::encode(start.to_bytes()),
            commit_started: false,
            replaces: target.replacing.as_ref().map(|r| r.row.uuid.clone()),
        };
        let mut apply = Apply {
            target: &target,
            header: &header,
            state,
            resumable,
            checkpoint_bytes,
            since_checkpoint: 0,
            since_writeback: 0,
            content_mismatch: false,
            before: vec![0u8; GRANULE as usize],
            after: vec![0u8; GRANULE as usize],
        };
        let applied = (|| {
            if partial.is_none() {
                write_partial(&target.files, &apply.state)?;
            }
            apply.run(reader, start)?;
            self.commit_receive(&target, &header, &apply.state)
        })();
        let content_mismatch = apply.content_mismatch;
        received.bytes = reader.bytes();
        match applied {
            Ok(kept) => {
                received.snapshots = kept;
                self.finish_target(target);
                Ok(received)
            }
            // A snapshot whose content does not match the sender's would not match when resumed
            // either (the same records, onto the same volume): kept, it could only fail again.
            Err(e) if resumable && !content_mismatch && has_partial_receive(&target.files) => {
                // What was applied since the last record of progress is not committed: the
                // volume is let go without a flush, and its next open recovers it as after a
                // crash, to the state `receive.json` describes.
                drop(target);
                Err(Error::refused(
                    e.kind(),
                    format!("{e}; what was received is kept: `imgpool recv --resume-token {name}` prints the token to resume it (`imgpool send --resume TOKEN`), `imgpool recv --abort {name}` drops it"),
                ))
            }
            Err(e) => {
                if let Err(undo) = self.undo_receive(target, &header) {
                    tracing::error!("cannot undo the failed receive into '{name}': {undo}");
                    return Err(e);
                }
                if resumable && content_mismatch {
                    return Err(Error::refused(
                        e.kind(),
                        format!("{e}; the partial receive is dropped, since resuming it could only fail the same way: send the package again without --resume"),
                    ));
                }
                Err(e)
            }
        }
    }

    /// The pool's image the stream's volume reads as its base: found by SHA-512, or imported
    /// from the stream. Reads the stream's image records, if any.
    fn stream_base(
        &self,
        header: &Header,
        reader: &mut Incoming,
        received: &mut Received,
    ) -> Result<Option<ImageRow>> {
        let Some(image) = &header.base_image else {
            return Ok(None);
        };
        let found = self.ready_image_by_sha512(&image.sha512, image.size)?;
        if !header.with_image {
            return found.map(Some).ok_or_else(|| {
                Error::refused(
                    ErrorKind::NotFound,
                    format!(
                        "this pool has no image with the content of the stream's base image '{}' (uuid {}, SHA-512 {}): import it, or send with `imgpool send --with-image`",
                        image.name, image.uuid, image.sha512
                    ),
                )
            });
        }
        let id = uuid::Uuid::new_v4().to_string();
        // Taken before the file exists: a file without a live owner is a dead receive's.
        let owner = OwnerLock::acquire(&self.state_dir, &image_token(&id))?;
        let path = received_image_path(&self.state_dir, &id);
        let imported = (|| {
            let dir = path.parent().expect("in a directory");
            fs::create_dir_all(dir).ctx(|| format!("cannot create {}", dir.display()))?;
            let file = match found {
                None => Some(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .ctx(|| format!("cannot create {}", path.display()))?,
                ),
                // The pool has it: its records are read past.
                Some(_) => None,
            };
            if let Some(file) = &file {
                file.set_len(image.size)
                    .ctx(|| format!("cannot size {}", path.display()))?;
            }
            let sha512 = loop {
                match reader.next()? {
                    Record::ImageData { offset, data } => {
                        let end = offset.checked_add(data.len() as u64);
                        if end.is_none_or(|end| end > image.size) {
                            return Err(malformed(format!(
                                "image data at {offset} lies past the image's end, {}",
                                image.size
                            )));
                        }
                        if let Some(file) = &file {
                            file.write_all_at(&data, offset)
                                .ctx(|| format!("cannot write {}", path.display()))?;
                        }
                    }
                    Record::ImageEnd { sha512 } => break hex::encode(sha512),
                    _ => return Err(malformed("the base image's records end without ImageEnd")),
                }
            };
            if sha512 != image.sha512 {
                return Err(malformed(
                    "the image it carries is not the one its header names (their SHA-512 differ)",
                ));
            }
            let Some(file) = file else {
                return Ok(None);
            };
            file.sync_all()
                .ctx(|| format!("cannot sync {}", path.display()))?;
            if sha512_of(&file, image.size).ctx(|| format!("cannot read {}", path.display()))?
                != image.sha512
            {
                return Err(Error::refused(
                    ErrorKind::Corrupt,
                    format!(
                        "the base image '{}' the stream carries does not have the SHA-512 it claims: the stream was damaged; send it again",
                        image.name
                    ),
                ));
            }
            let name = match self.store.image_by_name(&image.name)? {
                None => image.name.clone(),
                Some(_) => format!("{}-{}", image.name, &image.sha512[..8]),
            };
            let source = ImportSource {
                data: &file,
                size: image.size,
                path: path.clone(),
                recorded_as: Some(format!("stream:{}", image.name)),
                // A file of ours, written whole before the import.
                unchanged: &|| Ok(()),
                resume_key: None,
                // Checked against the stream's just above.
                sha512: WholeSha512::Known(image.sha512.clone()),
            };
            let done = self.import_image(&name, &source, None, &mut |_, _| {})?;
            Ok(Some(done.name))
        })();
        let _ = fs::remove_file(&path);
        owner.release();
        match imported? {
            Some(name) => {
                tracing::info!(
                    image = name.as_str(),
                    "imported the base image of a received stream"
                );
                received.imported_image = Some(name.clone());
                self.store.image_by_name(&name)?.map(Some).ok_or_else(|| {
                    Error::refused(
                        ErrorKind::Conflict,
                        format!("the image '{name}' just imported was removed meanwhile"),
                    )
                })
            }
            None => Ok(self.ready_image_by_sha512(&image.sha512, image.size)?),
        }
    }

    /// A new volume for a whole stream: `creating` until the end, its row named `row_name`
    /// (`name`, or the reserved name of a replacement).
    fn new_target(
        &self,
        name: &str,
        row_name: &str,
        header: &Header,
        base: Option<&ImageRow>,
    ) -> Result<Target> {
        let size = header.snapshots[0].size;
        check_size(size, base.map(|i| (i.name.as_str(), i.size)))?;
        let NewVolume { row, files, _owner } = self.start_volume(row_name, base, size, None)?;
        // Held as for an existing volume: once it is ready, a mount's open is refused (EBUSY)
        // until the receive lets go of it.
        let opened = self
            .lock_for_receive(name, &row, &files)
            .and_then(|writer| {
                let base = self.base_of(row.image_id)?;
                Volume::open(&files, base)
                    .ctx(|| format!("cannot open volume '{name}'"))
                    .map(|volume| (volume, writer))
            });
        let (volume, writer) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                self.remove_new_volume(&row)?;
                return Err(e);
            }
        };
        Ok(Target {
            name: name.to_string(),
            row,
            files,
            volume: Arc::new(volume),
            new_volume: true,
            from: None,
            base_sha512: base.and_then(|i| i.sha512.clone()),
            replacing: None,
            _owner: Some(_owner),
            _locks: writer,
        })
    }

    /// A new volume for a whole stream that replaces the existing volume `row` (`--force`):
    /// received beside it under a reserved name, while the receive holds the old one's writer
    /// lock. The old one is checked first, under that lock; nothing of it changes until the
    /// swap at the end (`commit_receive`).
    fn replacing_target(
        &self,
        row: &VolumeRow,
        header: &Header,
        reader: &mut Incoming,
        received: &mut Received,
    ) -> Result<Target> {
        let name = row.name.as_str();
        if row.state != VolumeState::Ready {
            return Err(Error::refused(
                ErrorKind::Busy,
                format!("volume '{name}' is being created or removed by another command: retry when it is done"),
            ));
        }
        let files = self.volume_files_of(row)?;
        // Under the lock, its row is read again (`lock_for_receive`) and then its partial
        // receive: removed, replaced, or given a partial receive since the first look.
        let locks = self.lock_for_receive(name, row, &files)?;
        if has_partial_receive(&files) {
            return Err(partial_receive_refusal(name));
        }
        let discarded = crate::core::volume::snapshot_names(&files)
            .ctx(|| format!("cannot read the snapshots of volume '{name}'"))?;
        let base = self.stream_base(header, reader, received)?;
        let target = self.new_target(
            name,
            &replacing_name(&header.package, name),
            header,
            base.as_ref(),
        )?;
        received.discarded_snapshots = discarded;
        // Its whole content goes: its writes since its newest snapshot with it.
        received.discarded_writes = true;
        Ok(Target {
            replacing: Some(Replaced {
                row: row.clone(),
                _locks: locks,
            }),
            ..target
        })
    }

    /// The new volume of an interrupted receive, taken over from its dead receiver.
    fn resumed_new_target(
        &self,
        name: &str,
        row: &VolumeRow,
        header: &Header,
        partial: &PartialReceive,
        reader: &mut Incoming,
        received: &mut Received,
    ) -> Result<Target> {
        let owner = self.take_over(name, row)?;
        // Read again now that it is ours: a `recv --abort` may have removed it meanwhile.
        let still = self.volume_row_any_state(name)?;
        if still
            .as_ref()
            .is_none_or(|r| r.id != row.id || r.state != VolumeState::Creating)
        {
            return Err(partial_changed(name));
        }
        let files = self.volume_files_of(row)?;
        let writer = self.lock_for_receive(name, row, &files)?;
        check_partial_unchanged(&files, partial, name)?;
        let base = self.stream_base(header, reader, received)?;
        if base.as_ref().map(|i| i.id) != row.image_id {
            return Err(Error::refused(
                ErrorKind::Conflict,
                format!("the base image of the partial receive of '{name}' is not the stream's"),
            ));
        }
        let volume = Volume::open(&files, self.base_of(row.image_id)?)
            .ctx(|| format!("cannot open volume '{name}'"))?;
        Ok(Target {
            name: name.to_string(),
            row: row.clone(),
            files,
            volume: Arc::new(volume),
            new_volume: true,
            from: None,
            base_sha512: header.base_image.as_ref().map(|i| i.sha512.clone()),
            replacing: None,
            _owner: Some(owner),
            _locks: writer,
        })
    }

    /// The owner lock of a `creating` volume whose receive died.
    fn take_over(&self, name: &str, row: &VolumeRow) -> Result<OwnerLock> {
        let token = super::volume_token(&row.uuid);
        match owner::check(&self.state_dir, &token) {
            Owner::Alive => Err(Error::refused(
                ErrorKind::Busy,
                format!("another `imgpool recv` is receiving volume '{name}' now"),
            )),
            Owner::Dead(Some(lock)) => Ok(lock),
            Owner::Dead(None) => OwnerLock::acquire(&self.state_dir, &token),
        }
    }

    /// An existing volume for an incremental stream, checked against the header and (with
    /// `--force`) brought back to the stream's `from` snapshot.
    fn existing_target(
        &self,
        row: &VolumeRow,
        header: &Header,
        partial: Option<&PartialReceive>,
        force: bool,
        reader: &mut Incoming,
        received: &mut Received,
    ) -> Result<Target> {
        let name = row.name.as_str();
        let files = self.volume_files_of(row)?;
        if header.from.is_none() {
            return Err(exists_refusal(name));
        }
        let writer = self.lock_for_receive(name, row, &files)?;
        // Read again under the lock: a partial receive that appeared meanwhile is not ours, and
        // one resumed must still be the one checked (`recv --abort` may have dropped it, or
        // another resumed stream moved it on).
        match partial {
            Some(partial) => check_partial_unchanged(&files, partial, name)?,
            None if has_partial_receive(&files) => return Err(partial_receive_refusal(name)),
            None => {}
        }
        let resumed = partial.is_some();
        let ours = match row.image_id {
            Some(id) => match self.store.images()?.into_iter().find(|i| i.id == id) {
                Some(image) => {
                    let sha512 = self.complete_sha512(&image, &mut |_| Ok(()))?;
                    Some((image.name, sha512))
                }
                None => None,
            },
            None => None,
        };
        let theirs = header.base_image.as_ref();
        if ours.as_ref().map(|o| &o.1) != theirs.map(|t| &t.sha512) {
            let describe =
                |n: Option<&str>| n.map_or("none (zeros)".to_string(), |n| format!("'{n}'"));
            return Err(Error::refused(
                ErrorKind::Conflict,
                format!(
                    "volume '{name}' is over base image {}, the stream's volume over {}: the stream does not apply to it",
                    describe(ours.as_ref().map(|o| o.0.as_str())),
                    describe(theirs.map(|t| t.name.as_str()))
                ),
            ));
        }
        // Its base is the pool's image with that SHA-512: image records are read past.
        self.stream_base(header, reader, received)?;
        let volume = Arc::new(
            Volume::open(&files, self.base_of(row.image_id)?)
                .ctx(|| format!("cannot open volume '{name}'"))?,
        );
        let target = Target {
            name: name.to_string(),
            row: row.clone(),
            files,
            volume,
            new_volume: false,
            from: None,
            base_sha512: theirs.map(|t| t.sha512.clone()),
            replacing: None,
            _owner: None,
            _locks: writer,
        };
        // What earlier receives (or commands) left to reclaim, while the volume is held anyway:
        // a volume no mount opens would otherwise keep it.
        let reclaimed = (|| {
            while target.volume.reclaim()? {}
            Ok(())
        })()
        .ctx(|| format!("cannot reclaim the space of volume '{name}'"));
        // A refusal closes the volume cleanly (dropped open, its next open would scan it).
        match reclaimed.and_then(|()| self.bring_to_from(&target, header, resumed, force, received))
        {
            Ok(from) => Ok(Target {
                from: Some(from),
                ..target
            }),
            Err(e) => {
                let _ = target.volume.shutdown();
                Err(e)
            }
        }
    }

    /// Finds the stream's `from` snapshot in the target and checks that the target is still
    /// at it (with `--force`, brings it back there).
    fn bring_to_from(
        &self,
        target: &Target,
        header: &Header,
        resumed: bool,
        force: bool,
        received: &mut Received,
    ) -> Result<Snapshot> {
        {
            let name = target.name.as_str();
            let volume = &target.volume;
            let from = header
                .from
                .as_ref()
                .expect("checked: an incremental stream");
            let all = volume
                .snapshots()
                .ctx(|| format!("cannot read the snapshots of volume '{name}'"))?;
            let Some(at) = all.iter().position(|s| s.guid == from.guid) else {
                return Err(Error::refused(
                ErrorKind::Conflict,
                format!(
                    "volume '{name}' has no snapshot '{}' (guid {}), which the stream was made from: send from a snapshot both sides have (`imgpool snapshot list {name}`), or the whole volume under another name",
                    from.name, from.guid
                ),
            ));
            };
            let from_snapshot = all[at].clone();
            if resumed {
                // Its staged snapshots follow `from`: they are the receive's own.
                return Ok(from_snapshot);
            }
            let newer: Vec<&Snapshot> = all[at + 1..].iter().collect();
            let written = volume
                .written_since_newest_snapshot()
                .ctx(|| format!("cannot read volume '{name}'"))?
                || volume.size() != from_snapshot.size;
            let kept: std::collections::HashSet<&str> =
                all[..=at].iter().map(|s| s.name.as_str()).collect();
            let taken: std::collections::HashSet<&str> = if force {
                kept
            } else {
                all.iter().map(|s| s.name.as_str()).collect()
            };
            if let Some(clash) = header
                .snapshots
                .iter()
                .find(|s| !s.temporary && taken.contains(s.name.as_str()))
            {
                return Err(Error::refused(
                ErrorKind::AlreadyExists,
                format!(
                    "volume '{name}' has a snapshot '{}' already, which the stream would add: rename or delete it first",
                    clash.name
                ),
            ));
            }
            if (newer.is_empty() && !written) || !force {
                if !newer.is_empty() || written {
                    let mut what = Vec::new();
                    if !newer.is_empty() {
                        let names: Vec<&str> = newer.iter().map(|s| s.name.as_str()).collect();
                        what.push(format!(
                            "snapshots {} were taken after it",
                            names.join(", ")
                        ));
                    }
                    if written {
                        what.push("it was written since".to_string());
                    }
                    return Err(Error::refused(
                    ErrorKind::Conflict,
                    format!(
                        "volume '{name}' has changed since snapshot '{}', which the stream applies on: {}; `imgpool recv --force` discards that",
                        from_snapshot.name,
                        what.join(", and ")
                    ),
                ));
                }
                return Ok(from_snapshot);
            }
            let epochs: Vec<u64> = newer.iter().map(|s| s.epoch).collect();
            volume.rollback(&from_snapshot, &epochs).ctx(|| {
                format!(
                    "cannot roll volume '{name}' back to '{}'",
                    from_snapshot.name
                )
            })?;
            self.record_volume_size(name, from_snapshot.size)?;
            received.discarded_snapshots = newer.iter().map(|s| s.name.clone()).collect();
            received.discarded_writes = written;
            tracing::info!(
                event = "recv_discarded",
                volume = name,
                snapshots = received.discarded_snapshots.len(),
                writes = written,
                "volume '{name}': discarded what it had since snapshot '{}' (recv --force)",
                from_snapshot.name
            );
            Ok(from_snapshot)
        }
    }

    /// The content sum of the target as the stream starts on it: none for a new volume, the
    /// `from` snapshot's (recorded, or computed once from its own granules) for an existing one.
    fn start_sum(&self, target: &Target) -> Result<ContentHash> {
        let Some(from) = &target.from else {
            return Ok(ContentHash::default());
        };
        let name = &target.name;
        let sums =
            ContentSums::open(&target.files).ctx(|| format!("cannot open the sums of '{name}'"))?;
        if let Some(sum) = sums
            .get(&from.guid)
            .ctx(|| format!("cannot read the sums of '{name}'"))?
        {
            return Ok(sum);
        }
        let computed = (|| {
            let granules = target.volume.granules_seen(from.epoch)?;
            let reader = target.volume.open_snapshot(from.epoch)?;
            let base = self
                .base_of(target.row.image_id)
                .map_err(|e| io::Error::other(e.to_string()))?;
            sum_changes(
                ContentHash::default(),
                &granules,
                &BaseGranules(base.as_ref()),
                &reader,
            )
        })()
        .ctx(|| format!("cannot compute the content sum of '{name}@{}'", from.name))?;
        sums.put(&from.guid, &computed)
            .ctx(|| format!("cannot record the sums of '{name}'"))?;
        Ok(computed)
    }

    /// The stream ended: the staged snapshots take their names in one transaction, and the
    /// volume is ready. Returns the names of the snapshots kept.
    fn commit_receive(
        &self,
        target: &Target,
        header: &Header,
        state: &PartialReceive,
    ) -> Result<Vec<String>> {
        let name = &target.name;
        let snapshots = target
            .volume
            .snapshots()
            .ctx(|| format!("cannot read the snapshots of '{name}'"))?;
        let (mut renames, mut deletes) = (Vec::new(), Vec::new());
        for (index, s) in header.snapshots.iter().enumerate() {
            let staged = staged_name(&header.package, index);
            let epoch = snapshots
                .iter()
                .find(|x| x.name == staged)
                .map(|x| x.epoch)
                .ok_or_else(|| {
                    Error::refused(
                        ErrorKind::Internal,
                        format!("the staged snapshot '{staged}' of '{name}' is missing"),
                    )
                })?;
            if s.temporary {
                deletes.push(epoch);
            } else {
                renames.push((epoch, s.name.clone()));
            }
        }
        // A receive that dies from here on is judged by what the index holds (`settle`).
        write_partial(
            &target.files,
            &PartialReceive {
                commit_started: true,
                ..state.clone()
            },
        )?;
        // An existing volume's commit point.
        target
            .volume
            .rename_and_delete_snapshots(&renames, &deletes)
            .ctx(|| format!("cannot name the received snapshots of '{name}'"))?;
        if target.new_volume {
            target
                .volume
                .flush()
                .ctx(|| format!("cannot flush volume '{name}'"))?;
            self.store
                .set_volume_size(target.row.id, target.volume.size())?;
        }
        if let Some(old) = &target.replacing {
            // Its record takes the final name first: after the swap, nothing else is done
            // before its row says it is the volume.
            let mut record = read_volume_record(&target.files)?;
            record.name = name.clone();
            write_volume_record(&target.files, &record)?;
            crash_point::reached(CrashPoint::ReplaceRecordRenamed);
            // The commit point: one store transaction retires the old volume and names the
            // new one. Before it, a crash leaves the old one as it was (recovery removes the
            // new one, `creating`); after it, the new one is the volume.
            if !self.store.swap_volumes(
                old.row.id,
                &tombstone_name(&old.row.uuid),
                target.row.id,
                name,
            )? {
                return Err(Error::refused(
                    ErrorKind::Interrupted,
                    format!("volume '{name}' changed while this stream replaced it: it is as it was; send it again"),
                ));
            }
            crash_point::reached(CrashPoint::ReplaceSwapped);
        } else if target.new_volume
            && !self.store.set_volume_state(
                target.row.id,
                VolumeState::Creating,
                VolumeState::Ready,
            )?
        {
            return Err(Error::refused(
                ErrorKind::Interrupted,
                format!("the creation of '{name}' was taken from this receive (another process judged it abandoned): nothing was kept; send it again"),
            ));
        }
        // Committed: what is left does not make the receive fail, which would tell a volume
        // that has the stream that it does not. A step that fails leaves `receive.json`, and
        // the next `recover` (which every command that changes the pool runs first) finishes
        // it as for a receive that died here: the size recorded, the file removed. Until
        // then the volume is not served.
        let finished = (|| {
            if !target.new_volume {
                target
                    .volume
                    .flush()
                    .ctx(|| format!("cannot flush volume '{name}'"))?;
                self.record_volume_size(name, target.volume.size())?;
            }
            // Last: until it goes, the volume is not served.
            remove_partial(&target.files)
        })();
        if let Err(e) = finished {
            tracing::warn!(
                "volume '{name}' received; finishing it failed ({e}): the next `imgpool repair` (or any command that changes the pool) finishes it, and the volume is served from then on"
            );
        }
        tracing::info!(
            event = "recv_done",
            volume = name.as_str(),
            snapshots = renames.len(),
            "volume '{name}': received {} snapshot(s) of package {}",
            renames.len(),
            header.package
        );
        Ok(renames.into_iter().map(|(_, n)| n).collect())
    }

    /// After the end: the sums of snapshots that went are forgotten, and the volume closed and
    /// let go at once (a mount's open is refused while the receive holds it). The space of the
    /// snapshots it deleted is reclaimed by the volume's next holder: a mount's open resumes
    /// it in the background, and the next receive does it before it changes anything.
    /// Everything is applied and durable by then: a failure here is logged, not the receive's.
    /// A replaced volume's files go as any removal's do (`finish_volume_removal`: moved out of
    /// `volumes/`, then deleted), its writer lock held until they are moved: a command that
    /// looked the volume up before the swap and polls its lock gets it only once the files are
    /// out of its reach, then reads the name again (`try_lock_volume`) and finds the new one.
    /// A removal cut short is finished by the next `recover`.
    fn finish_target(&self, mut target: Target) {
        let name = &target.name;
        let volume = &target.volume;
        let tidied = (|| -> io::Result<()> {
            let keep = volume.snapshots()?.into_iter().map(|s| s.guid).collect();
            ContentSums::open(&target.files)?.retain(&keep)?;
            volume.shutdown()
        })();
        if let Err(e) = tidied {
            tracing::warn!("volume '{name}' received; tidying it up after failed: {e}");
        }
        if let Some(old) = target.replacing.take() {
            let retired = VolumeRow {
                state: VolumeState::Removing,
                name: tombstone_name(&old.row.uuid),
                ..old.row.clone()
            };
            match self.finish_volume_removal(&retired) {
                Ok(()) => tracing::info!(
                    event = "recv_replaced",
                    volume = name.as_str(),
                    "volume '{name}': the volume it replaced (uuid {}) is removed",
                    old.row.uuid
                ),
                Err(e) => tracing::warn!(
                    "volume '{name}' replaced; removing the volume it replaced failed (the next start finishes it): {e}"
                ),
            }
        }
    }

    /// A receive that failed, not resumable: the target as it was.
    fn undo_receive(&self, target: Target, header: &Header) -> Result<()> {
        let name = target.name.clone();
        if target.new_volume {
            let _ = target.volume.shutdown();
            let row = target.row.clone();
            // The owner lock is held until the removal is done.
            let result = self.remove_new_volume(&row);
            drop(target);
            return result;
        }
        let from = target.from.clone().expect("an existing target has `from`");
        // A failure after the commit point (closing, recording the size) keeps what committed.
        let commit_started = read_partial(&target.files)?.is_some_and(|p| p.commit_started);
        let unfinished = Unfinished {
            header,
            commit_started,
            from: &from,
        };
        self.settle(&name, &target.volume, &target.files, unfinished, true)?;
        let _ = target.volume.reclaim();
        target
            .volume
            .shutdown()
            .ctx(|| format!("cannot close volume '{name}'"))
    }

    /// Ends an existing volume's receive that did not finish: kept if it had committed (see
    /// `committed`: only `receive.json` was left to remove), else, with `roll_back`, rolled
    /// back to `from` with its staged snapshots. Says which (`None`: left as it is).
    fn settle(
        &self,
        name: &str,
        volume: &Volume,
        files: &VolumeFiles,
        unfinished: Unfinished,
        roll_back: bool,
    ) -> Result<Option<String>> {
        let Unfinished {
            header,
            commit_started,
            from,
        } = unfinished;
        let staged_left = volume
            .snapshots()
            .ctx(|| format!("cannot read the snapshots of '{name}'"))?
            .iter()
            .any(|s| s.name.starts_with(&staged_prefix(&header.package)));
        if committed(commit_started, staged_left) {
            remove_partial(files)?;
            self.record_volume_size(name, volume.size())?;
            return Ok(Some(format!("the receive into '{name}' had completed")));
        }
        if !roll_back {
            return Ok(None);
        }
        if commit_started {
            // Its commit failed before its transaction: once the staged snapshots are rolled
            // back, none is left, which with the mark would read as committed.
            if let Some(partial) = read_partial(files)? {
                write_partial(
                    files,
                    &PartialReceive {
                        commit_started: false,
                        ..partial
                    },
                )?;
            }
        }
        self.roll_back_staged(volume, from, &header.package, name)?;
        remove_partial(files)?;
        self.record_volume_size(name, from.size)?;
        Ok(Some(format!(
            "dropped the partial receive of '{name}': it is back at snapshot '{}'",
            from.name
        )))
    }

    fn roll_back_staged(
        &self,
        volume: &Volume,
        from: &Snapshot,
        package: &str,
        name: &str,
    ) -> Result<()> {
        let prefix = staged_prefix(package);
        let staged: Vec<u64> = volume
            .snapshots()
            .ctx(|| format!("cannot read the snapshots of '{name}'"))?
            .into_iter()
            .filter(|s| s.epoch > from.epoch && s.name.starts_with(&prefix))
            .map(|s| s.epoch)
            .collect();
        volume
            .rollback(from, &staged)
            .ctx(|| format!("cannot roll volume '{name}' back to '{}'", from.name))
    }

    fn remove_new_volume(&self, row: &VolumeRow) -> Result<()> {
        if self
            .store
            .set_volume_state(row.id, VolumeState::Creating, VolumeState::Removing)?
        {
            self.finish_volume_removal(row)?;
        }
        Ok(())
    }

    /// The token that resumes volume `name`'s partial receive (`recv --resume-token`).
    pub fn receive_resume_token(&self, name: &str) -> Result<ResumeToken> {
        let (_, files) = self.partial_target(name)?;
        let partial = current_partial(&files)?
            .filter(|p| p.resumable)
            .ok_or_else(|| no_partial(name))?;
        let header = &partial.header;
        let needs_image = match &header.base_image {
            Some(image) if header.with_image => self
                .ready_image_by_sha512(&image.sha512, image.size)?
                .is_none(),
            _ => false,
        };
        Ok(ResumeToken {
            package: header.package.clone(),
            volume_uuid: header.volume_uuid.clone(),
            from: header.from.as_ref().map(|f| f.guid.clone()),
            to: header
                .snapshots
                .last()
                .map(|s| s.guid.clone())
                .unwrap_or_default(),
            from_all: header.from_all,
            with_image: needs_image,
            snapshots: snapshots_digest(&header.snapshots),
            point: partial.point,
        })
    }

    /// Drops volume `name`'s partial receive (`recv --abort`): a new volume is removed, an
    /// existing one rolled back to the snapshot the stream applied on. Returns what it did.
    pub fn receive_abort(&self, name: &str) -> Result<String> {
        let (row, files) = self.partial_target(name)?;
        let partial = read_partial(&files)?.ok_or_else(|| no_partial(name))?;
        if partial.new_volume && row.state == VolumeState::Creating {
            let _owner = self.take_over(name, &row)?;
            self.remove_new_volume(&row)?;
            return Ok(format!(
                "dropped the partial receive of '{name}': the volume it was making is removed"
            ));
        }
        // Another process may hold the volume a moment (a recovery looking at it, a mount's
        // refused open).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut partial = partial;
        loop {
            if let Some(done) = self.settle_ready(&row, &files, &partial, true)? {
                return Ok(done);
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::refused(
                    ErrorKind::Busy,
                    format!("another process has volume '{name}' (a receive still running?): retry when it is done"),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            partial = read_partial(&files)?.ok_or_else(|| no_partial(name))?;
        }
    }

    /// What `recover` does for a ready volume that a receive left `receive.json` in: a
    /// receive that had completed is finished, a plain one that died is rolled back; a
    /// resumable one that did not complete is kept. `None` when there is nothing to do, or
    /// the receiver still runs.
    pub(crate) fn settle_dead_receive(&self, row: &VolumeRow) -> Result<Option<String>> {
        let files = self.volume_files_of(row)?;
        match read_partial(&files) {
            Ok(Some(_)) if owner::is_alive(&self.state_dir, &receiver_token(&row.uuid)) => Ok(None),
            Ok(Some(partial))
                if partial.resumable && !partial.new_volume && !committed_unopened(&files)? =>
            {
                // Kept for a resumed stream.
                Ok(None)
            }
            Ok(Some(partial)) => {
                // Its receiver is dead: whoever has the volume now (another recovery, a
                // mount's refused open) lets go soon; what it did is read again under the lock.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                loop {
                    if let Some(done) = self.settle_ready(row, &files, &partial, false)? {
                        return Ok(Some(done));
                    }
                    let changed = read_partial(&files).ok().flatten().as_ref() != Some(&partial);
                    if changed || std::time::Instant::now() > deadline {
                        return Ok(None);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            _ => Ok(None),
        }
    }

    /// Settles the receive of a ready volume, under its writer lock (`None` while another
    /// process has it, or when it is left as it is): a new volume that became ready had
    /// completed; an existing one is kept or rolled back (`settle`), a resumable one that did
    /// not complete only when aborted.
    fn settle_ready(
        &self,
        row: &VolumeRow,
        files: &VolumeFiles,
        partial: &PartialReceive,
        abort: bool,
    ) -> Result<Option<String>> {
        let name = row.name.as_str();
        let Some(_writer) =
            WriterLock::try_acquire(files).ctx(|| format!("cannot lock volume '{name}'"))?
        else {
            return Ok(None);
        };
        // Read again under the lock: a receive that ended meanwhile removed it.
        if read_partial(files)?.as_ref() != Some(partial) {
            return Ok(None);
        }
        if partial.new_volume {
            remove_partial(files)?;
            return Ok(Some(format!("the receive of '{name}' had completed")));
        }
        let roll_back = abort || !partial.resumable;
        if !roll_back && !committed_unopened(files)? {
            // Kept for a resumed stream: not even opened.
            return Ok(None);
        }
        let volume =
            Volume::open(files, Box::new(NoBase)).ctx(|| format!("cannot open volume '{name}'"))?;
        let from_guid = partial.header.from.as_ref().map(|f| f.guid.clone());
        let settled = volume
            .snapshots()
            .ctx(|| format!("cannot read the snapshots of '{name}'"))
            .and_then(|all| {
                all.into_iter()
                    .find(|s| Some(&s.guid) == from_guid.as_ref())
                    .ok_or_else(|| {
                        Error::refused(
                            ErrorKind::Corrupt,
                            format!(
                                "volume '{name}' lost the snapshot its partial receive applied on"
                            ),
                        )
                    })
            })
            .and_then(|from| {
                let unfinished = Unfinished {
                    header: &partial.header,
                    commit_started: partial.commit_started,
                    from: &from,
                };
                self.settle(name, &volume, files, unfinished, roll_back)
            });
        while volume.reclaim().unwrap_or(false) {}
        let closed = volume
            .close()
            .ctx(|| format!("cannot close volume '{name}'"));
        let settled = settled?;
        closed?;
        Ok(settled)
    }

    fn partial_target(&self, name: &str) -> Result<(VolumeRow, VolumeFiles)> {
        let row = self
            .volume_row_any_state(name)?
            .ok_or_else(|| Error::UnknownVolume(name.to_string()))?;
        let files = self.volume_files_of(&row)?;
        Ok((row, files))
    }
}

/// A receive into an existing volume that did not remove its `receive.json`.
struct Unfinished<'a> {
    header: &'a Header,
    /// Its `receive.json` says the commit had started.
    commit_started: bool,
    /// The snapshot it applied on.
    from: &'a Snapshot,
}

/// Whether a receive that did not remove its `receive.json` had committed: it had started the
/// transaction that renames and deletes its staged snapshots, and none is left, so that
/// transaction ran. What the volume holds otherwise says nothing: a receive's writes can be
/// durable before its end (a resumable one's progress, a rollback cut short), and a package of
/// temporary snapshots alone leaves no name to look for.
fn committed(commit_started: bool, staged_left: bool) -> bool {
    commit_started && !staged_left
}

/// `committed` for a resumable receive, read without opening the volume.
fn committed_unopened(files: &VolumeFiles) -> Result<bool> {
    let Some(partial) = read_partial(files)? else {
        return Ok(false);
    };
    let staged =
        crate::core::volume::snapshots_named(files, &staged_prefix(&partial.header.package))
            .map_err(|e| Error::io(format!("cannot read {}", files.index().display()), e))?;
    Ok(committed(partial.commit_started, !staged.is_empty()))
}

/// The owner-lock token of the receive writing the base image file `id`.
fn image_token(id: &str) -> String {
    format!("recv-image-{id}")
}

const RECEIVED_IMAGE_PREFIX: &str = "recv-";

/// Where a receive writes the base image a stream carries, before importing it.
fn received_image_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir
        .join("tmp")
        .join(format!("{RECEIVED_IMAGE_PREFIX}{id}.img"))
}

impl Pool {
    /// Deletes the base image files of receives that died while writing them; one line each.
    pub(crate) fn remove_abandoned_received_images(&self) -> Vec<String> {
        let mut done = Vec::new();
        let Ok(entries) = fs::read_dir(self.state_dir.join("tmp")) else {
            return done;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = file
                .strip_prefix(RECEIVED_IMAGE_PREFIX)
                .and_then(|f| f.strip_suffix(".img"))
                .filter(|id| uuid::Uuid::parse_str(id).is_ok())
            else {
                continue;
            };
            let owner = owner::check(&self.state_dir, &image_token(id));
            if let Owner::Alive = owner {
                continue;
            }
            match fs::remove_file(entry.path()) {
                Ok(()) => done.push(format!(
                    "removed {}, the base image a receive that died was writing",
                    entry.path().display()
                )),
                Err(e) => tracing::warn!("cannot remove {}: {e}", entry.path().display()),
            }
            owner.finish();
        }
        done
    }
}

/// What a running receive holds: the volume's writer lock, and the owner lock that tells a
/// recovery the receiver lives (so that one that finds the writer lock taken while the
/// receiver is dead knows another process settles it, and waits).
struct ReceiveLocks {
    _writer: WriterLock,
    _receiving: OwnerLock,
}

/// The owner-lock token of the receive into the volume with `uuid`.
fn receiver_token(uuid: &str) -> String {
    format!("recv-volume-{uuid}")
}

impl Pool {
    /// The locks of a receive into `row`, or the refusal while another process has the volume.
    /// A ready volume (looked up by name before) is read again once locked: one replaced or
    /// removed since is refused, the stream not applied to another volume than the one its
    /// header was checked against.
    fn lock_for_receive(
        &self,
        name: &str,
        row: &VolumeRow,
        files: &VolumeFiles,
    ) -> Result<ReceiveLocks> {
        let busy = || {
            Error::refused(
                ErrorKind::InUse,
                format!("volume '{name}' is open through a mount, or another command has it (another receive, say): close it there, or retry once that command is done"),
            )
        };
        let writer = if row.state == VolumeState::Ready {
            match self.try_lock_volume(row, files)? {
                VolumeLock::Held(writer) => writer,
                VolumeLock::Busy => return Err(busy()),
                VolumeLock::Changed => {
                    return Err(Error::refused(
                        ErrorKind::Conflict,
                        format!("volume '{name}' was replaced or removed while this stream started: nothing was received; send it again"),
                    ))
                }
            }
        } else {
            // A volume this receive makes (or took over), under its owner lock: its row is
            // this receive's.
            WriterLock::try_acquire(files)
                .ctx(|| format!("cannot lock volume '{name}'"))?
                .ok_or_else(busy)?
        };
        // One receiver at a time holds the writer lock: the token is this one's.
        let receiving = OwnerLock::acquire(&self.state_dir, &receiver_token(&row.uuid))?;
        Ok(ReceiveLocks {
            _writer: writer,
            _receiving: receiving,
        })
    }
}

/// How far a receive is: `recv`'s progress bar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveProgress {
    /// 1-based, of `snapshots`: the snapshot being received (0 before the first, while the
    /// base image is read).
    pub snapshot: usize,
    pub snapshots: usize,
    /// Stream bytes read so far.
    pub bytes: u64,
}

/// The records of a stream after its header, each told to the receive's progress.
struct Incoming<'r, 'p> {
    reader: Box<dyn Records + 'r>,
    progress: &'p mut dyn FnMut(&ReceiveProgress),
    at: ReceiveProgress,
}

impl<'r, 'p> Incoming<'r, 'p> {
    fn new(
        reader: Box<dyn Records + 'r>,
        header: &Header,
        progress: &'p mut dyn FnMut(&ReceiveProgress),
    ) -> Incoming<'r, 'p> {
        Incoming {
            reader,
            progress,
            at: ReceiveProgress {
                snapshot: 0,
                snapshots: header.snapshots.len(),
                bytes: 0,
            },
        }
    }

    fn next(&mut self) -> Result<Record> {
        let record = self.reader.next().map_err(stream_error)?;
        if let Record::SnapshotBegin { index, .. } = &record {
            self.at.snapshot = *index as usize + 1;
        }
        self.at.bytes = self.reader.bytes();
        (self.progress)(&self.at);
        Ok(record)
    }

    fn bytes(&self) -> u64 {
        self.reader.bytes()
    }
}

/// A stream whose header was checked against the target as it was before any lock.
struct CheckedStream {
    /// The header to apply: a resumed stream's is its package's, as its first stream had it.
    header: Header,
    existing: Option<VolumeRow>,
    /// The partial receive a resumed stream goes on with.
    partial: Option<PartialReceive>,
}

/// A whole stream can make volume `name`, which does not exist.
fn check_new_target(name: &str, header: &Header) -> Result<()> {
    match &header.from {
        Some(from) => Err(Error::refused(
            ErrorKind::NotFound,
            format!(
                "volume '{name}' does not exist here; an incremental stream needs the snapshot '{}' it was made from: send the whole volume first",
                from.name
            ),
        )),
        None => Ok(()),
    }
}

/// Refuses unless the volume's partial receive is still `checked` (read before its lock).
fn check_partial_unchanged(
    files: &VolumeFiles,
    checked: &PartialReceive,
    name: &str,
) -> Result<()> {
    if current_partial(files)?.as_ref() == Some(checked) {
        Ok(())
    } else {
        Err(partial_changed(name))
    }
}

fn partial_changed(name: &str) -> Error {
    Error::refused(
        ErrorKind::Conflict,
        format!("the partial receive of volume '{name}' changed while this stream started (dropped by `imgpool recv --abort`, or moved on by another resumed stream): `imgpool recv --resume-token {name}` prints the token of what is there now, if anything"),
    )
}

fn exists_refusal(name: &str) -> Error {
    Error::refused(
        ErrorKind::AlreadyExists,
        format!("volume '{name}' exists: a whole stream makes a new volume; add --force to replace '{name}' with it (its snapshots and content are discarded once the stream has arrived whole), or receive it under another name"),
    )
}

fn no_partial(name: &str) -> Error {
    Error::refused(
        ErrorKind::NotFound,
        format!("volume '{name}' has no partial receive (only a `recv --resumable` that failed leaves one)"),
    )
}

fn sha512_of(file: &File, size: u64) -> io::Result<String> {
    let mut hasher = Sha512::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (buf.len() as u64).min(size - at) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The granule being changed: its content before the first record that touched it.
/// The snapshot being received.
struct Current {
    index: usize,
    size: u64,
    /// Where the last record ended: records come in ascending offsets.
    end: u64,
    /// The granule the records are changing; its content before is in `Apply::before`.
    open: Option<u64>,
}

/// The records after the header (and the image) applied to the target.
struct Apply<'a> {
    target: &'a Target,
    header: &'a Header,
    /// What `receive.json` says (kept up to date when resumable).
    state: PartialReceive,
    resumable: bool,
    /// Applied bytes between two records of progress.
    checkpoint_bytes: u64,
    since_checkpoint: u64,
    /// Bytes written since the data file's writeback was last started.
    since_writeback: u64,
    /// A snapshot's content did not match its digest.
    content_mismatch: bool,
    /// The open granule's content before the records changed it, and after: one buffer each
    /// for the whole receive (a fresh pair per granule was 5 % of a receive).
    before: Vec<u8>,
    after: Vec<u8>,
}

impl Apply<'_> {
    fn run(&mut self, reader: &mut Incoming, start: ContentHash) -> Result<()> {
        let mut sum = start;
        let mut next = self.state.point.done;
        // A resumed stream goes on from its point: nothing before it comes again.
        let mut resumed_from = Some(self.state.point.granule * GRANULE);
        let mut current: Option<Current> = None;
        let (target, header) = (self.target, self.header);
        let volume = &target.volume;
        let name = &target.name;
        let io = |what: &'static str| {
            move |e: io::Error| Error::io(format!("cannot {what} volume '{name}'"), e)
        };
        let sums = ContentSums::open(&target.files).map_err(io("open the content sums of"))?;
        loop {
            match reader.next()? {
                Record::SnapshotBegin { index, size } => {
                    let index = index as usize;
                    if current.is_some() || index != next || index >= header.snapshots.len() {
                        return Err(malformed(format!(
                            "snapshot {index} begins where snapshot {next} was due"
                        )));
                    }
                    if size != header.snapshots[index].size {
                        return Err(malformed(format!(
                            "snapshot {index} begins with size {size}, its header says {}",
                            header.snapshots[index].size
                        )));
                    }
                    if size < volume.size() {
                        return Err(malformed(format!(
                            "snapshot {index} is {size} bytes, smaller than the volume ({}): a volume does not shrink",
                            volume.size()
                        )));
                    }
                    if size > volume.size() {
                        volume.resize(size).map_err(io("resize"))?;
                    }
                    current = Some(Current {
                        index,
                        size,
                        end: resumed_from.take().unwrap_or(0),
                        open: None,
                    });
                }
                Record::Data { offset, data } => {
                    let c = current
                        .as_mut()
                        .ok_or_else(|| malformed("data outside a snapshot"))?;
                    Self::check_range(c, offset, data.len() as u64)?;
                    let mut done = 0usize;
                    while done < data.len() {
                        let at = offset + done as u64;
                        let n = ((GRANULE - at % GRANULE) as usize).min(data.len() - done);
                        let granule = at / GRANULE;
                        let bytes = &data[done..done + n];
                        self.touch(c, granule, &mut sum)?;
                        volume.write_at(bytes, at).map_err(io("write"))?;
                        if n == GRANULE as usize {
                            // The whole granule is this record's: what it holds now is these
                            // bytes, hashed without reading them back.
                            sum.change(granule, &self.before, bytes);
                            c.open = None;
                        }
                        done += n;
                    }
                    self.since_checkpoint += data.len() as u64;
                    self.since_writeback += data.len() as u64;
                    if self.since_writeback >= WRITEBACK_BYTES {
                        volume.start_writeback().map_err(io("write"))?;
                        self.since_writeback = 0;
                    }
                }
                Record::Zero { offset, len } => {
                    let c = current
                        .as_mut()
                        .ok_or_else(|| malformed("zeros outside a snapshot"))?;
                    Self::check_range(c, offset, len)?;
                    let mut at = offset;
                    while at < offset + len {
                        let n = (GRANULE - at % GRANULE).min(offset + len - at);
                        self.touch(c, at / GRANULE, &mut sum)?;
                        volume.discard(at, n).map_err(io("write"))?;
                        at += n;
                    }
                }
                Record::SnapshotEnd { index, digest } => {
                    let mut c = current
                        .take()
                        .filter(|c| c.index == index as usize)
                        .ok_or_else(|| {
                            malformed(format!("snapshot {index} ends where it did not begin"))
                        })?;
                    self.close_granule(&mut c, &mut sum)?;
                    let s = &header.snapshots[c.index];
                    if sum.digest(c.size, target.base_sha512.as_deref()) != digest {
                        self.content_mismatch = true;
                        return Err(Error::refused(
                            ErrorKind::Corrupt,
                            format!("the content of snapshot '{}' does not match the sender's: the stream does not apply to this volume or was damaged", s.name),
                        ));
                    }
                    // The sum first: a crash after the snapshot and before `receive.json` says
                    // so is resumed from the snapshot and its recorded sum. The snapshot
                    // commits the snapshot's writes with its row, in one transaction: a
                    // temporary one too (deleted at the end), so that no crash can leave its
                    // writes durable without a record of them.
                    sums.put(&s.guid, &sum)
                        .map_err(io("record the content sums of"))?;
                    self.take_snapshot(c.index, s)?;
                    next = c.index + 1;
                    self.checkpoint(next, 0, &sum)?;
                }
                Record::End => {
                    if current.is_some() || next != header.snapshots.len() {
                        return Err(malformed(format!(
                            "it ends after {next} of its {} snapshots",
                            header.snapshots.len()
                        )));
                    }
                    // Nothing may follow.
                    reader.next()?;
                    return Ok(());
                }
                Record::Header(_) => return Err(malformed("a second header")),
                Record::ImageData { .. } | Record::ImageEnd { .. } => {
                    return Err(malformed("base image records where snapshots were due"))
                }
            }
        }
    }

    fn check_range(c: &mut Current, offset: u64, len: u64) -> Result<()> {
        if offset < c.end {
            return Err(malformed(format!(
                "records of snapshot {} go backwards (offset {offset} after {})",
                c.index, c.end
            )));
        }
        let end = offset + len;
        if end > c.size {
            return Err(malformed(format!(
                "a record of snapshot {} ends at {end}, past its size {}",
                c.index, c.size
            )));
        }
        c.end = end;
        Ok(())
    }

    /// A record is about to change `granule`: the one changed before it is done (its change
    /// goes into the sum), and this one's content before the change is kept.
    fn touch(&mut self, c: &mut Current, granule: u64, sum: &mut ContentHash) -> Result<()> {
        if c.open == Some(granule) {
            return Ok(());
        }
        self.close_granule(c, sum)?;
        if self.resumable && self.since_checkpoint >= self.checkpoint_bytes {
            // Every granule before this one is done and in the sum: a resumed stream goes on
            // from here.
            self.target
                .volume
                .flush()
                .ctx(|| format!("cannot flush volume '{}'", self.target.name))?;
            self.checkpoint(c.index, granule, sum)?;
        }
        GranuleReader::read_granule(&*self.target.volume, granule, &mut self.before)
            .ctx(|| format!("cannot read volume '{}'", self.target.name))?;
        c.open = Some(granule);
        Ok(())
    }

    fn close_granule(&mut self, c: &mut Current, sum: &mut ContentHash) -> Result<()> {
        if let Some(granule) = c.open.take() {
            GranuleReader::read_granule(&*self.target.volume, granule, &mut self.after)
                .ctx(|| format!("cannot read volume '{}'", self.target.name))?;
            sum.change(granule, &self.before, &self.after);
        }
        Ok(())
    }

    fn take_snapshot(&self, index: usize, s: &StreamSnapshot) -> Result<()> {
        let staged = staged_name(&self.header.package, index);
        let name = &self.target.name;
        if let Some(left) = self
            .target
            .volume
            .find_snapshot(&staged)
            .ctx(|| format!("cannot read the snapshots of '{name}'"))?
        {
            // A resumed stream repeats nothing already received: this is a leftover.
            return Err(Error::refused(
                ErrorKind::Conflict,
                format!(
                    "volume '{name}' already has the staged snapshot '{}'",
                    left.name
                ),
            ));
        }
        self.target
            .volume
            .snapshot(&staged, &s.guid, s.created)
            .ctx(|| format!("cannot take snapshot '{}' of '{name}'", s.name))?;
        Ok(())
    }

    /// Records where the receive is, once what it describes is durable.
    fn checkpoint(&mut self, done: usize, granule: u64, sum: &ContentHash) -> Result<()> {
        self.since_checkpoint = 0;
        if !self.resumable {
            return Ok(());
        }
        self.state.point = ResumePoint { done, granule };
        self.state.sum = hex::encode(sum.to_bytes());
        write_partial(&self.target.files, &self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pool::{fixture, Fixture};
    use crate::format::stream::{StreamImage, StreamWriter};
    use crate::format::volume::BLOCK;

    const SIZE: u64 = 8 * GRANULE;

    /// Bytes that differ everywhere from other seeds.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 33) as u8
            })
            .collect()
    }

    /// One snapshot as the sender has it: the model of its whole content.
    #[derive(Clone)]
    struct Snap {
        name: String,
        guid: String,
        content: Vec<u8>,
        temporary: bool,
    }

    fn snap(name: &str, content: Vec<u8>) -> Snap {
        Snap {
            name: name.into(),
            guid: format!("guid-{name}"),
            content,
            temporary: false,
        }
    }

    fn stream_snapshot(s: &Snap) -> StreamSnapshot {
        StreamSnapshot {
            name: s.name.clone(),
            guid: s.guid.clone(),
            created: 1_700_000_000,
            size: s.content.len() as u64,
            temporary: s.temporary,
        }
    }

    /// The sender's side, from the model: the base image, and a package's snapshots.
    struct Sender {
        base: Vec<u8>,
        image: Option<StreamImage>,
    }

    impl Sender {
        fn padded(&self, content: &[u8], size: usize) -> Vec<u8> {
            let mut out = content.to_vec();
            out.resize(size, 0);
            out
        }

        /// The content sum of a whole content against the base.
        fn sum(&self, content: &[u8]) -> ContentHash {
            let base = self.padded(&self.base, content.len());
            let mut sum = ContentHash::default();
            let g = GRANULE as usize;
            for (i, (new, old)) in content.chunks(g).zip(base.chunks(g)).enumerate() {
                sum.change(i as u64, old, new);
            }
            sum
        }

        fn header(&self, package: &str, from: Option<&Snap>, snaps: &[Snap]) -> Header {
            Header {
                package: package.into(),
                volume: "src".into(),
                volume_uuid: "src-uuid".into(),
                base_image: self.image.clone(),
                from: from.map(stream_snapshot),
                snapshots: snaps.iter().map(stream_snapshot).collect(),
                from_all: snaps.len() > 1,
                with_image: false,
                resume: None,
            }
        }

        /// The records of a package after its header; from `point` on when resumed.
        fn records(
            &self,
            header: &Header,
            from: Option<&Snap>,
            snaps: &[Snap],
            point: Option<ResumePoint>,
        ) -> Vec<Record> {
            let mut out = Vec::new();
            let point = point.unwrap_or(ResumePoint {
                done: 0,
                granule: 0,
            });
            let mut prev = match from {
                Some(f) => f.content.clone(),
                None => self.base.clone(),
            };
            for (i, s) in snaps.iter().enumerate() {
                let size = s.content.len();
                let old = self.padded(&prev, size);
                prev = s.content.clone();
                if i < point.done {
                    continue;
                }
                out.push(Record::SnapshotBegin {
                    index: i as u32,
                    size: size as u64,
                });
                let b = BLOCK as usize;
                let skip = if i == point.done {
                    point.granule * GRANULE
                } else {
                    0
                };
                // One record per changed block, merged into runs within a granule.
                let mut at = skip as usize;
                while at < size {
                    if s.content[at..at + b] == old[at..at + b] {
                        at += b;
                        continue;
                    }
                    let zero = s.content[at..at + b].iter().all(|x| *x == 0);
                    let mut end = at + b;
                    while end < size
                        && !end.is_multiple_of(GRANULE as usize)
                        && s.content[end..end + b] != old[end..end + b]
                        && s.content[end..end + b].iter().all(|x| *x == 0) == zero
                    {
                        end += b;
                    }
                    out.push(if zero {
                        Record::Zero {
                            offset: at as u64,
                            len: (end - at) as u64,
                        }
                    } else {
                        Record::Data {
                            offset: at as u64,
                            data: s.content[at..end].to_vec(),
                        }
                    });
                    at = end;
                }
                out.push(Record::SnapshotEnd {
                    index: i as u32,
                    digest: self.sum(&s.content).digest(
                        size as u64,
                        header.base_image.as_ref().map(|i| i.sha512.as_str()),
                    ),
                });
            }
            out.push(Record::End);
            out
        }

        fn encode(header: &Header, records: &[Record]) -> Vec<u8> {
            let mut w = StreamWriter::new(Vec::new()).unwrap();
            w.write(&Record::Header(header.clone())).unwrap();
            for r in records {
                w.write(r).unwrap();
            }
            w.into_inner()
        }

        fn stream(&self, package: &str, from: Option<&Snap>, snaps: &[Snap]) -> Vec<u8> {
            let header = self.header(package, from, snaps);
            Self::encode(&header, &self.records(&header, from, snaps, None))
        }

        fn resumed(
            &self,
            package: &str,
            from: Option<&Snap>,
            snaps: &[Snap],
            point: ResumePoint,
        ) -> Vec<u8> {
            let mut header = self.header(package, from, snaps);
            let records = self.records(&header, from, snaps, Some(point));
            header.resume = Some(point);
            Self::encode(&header, &records)
        }
    }

    /// A pool with image `base`, and the sender of volumes over it.
    fn setup() -> (Fixture, Sender) {
        let f = fixture(1);
        let base = noise(1, (3 * GRANULE + 5 * BLOCK) as usize);
        f.image("base", &base, 1);
        let row = f.pool.store().image_by_name("base").unwrap().unwrap();
        let image = StreamImage {
            name: "base".into(),
            uuid: "sender-image-uuid".into(),
            sha512: row.sha512.clone().unwrap(),
            size: base.len() as u64,
        };
        (
            f,
            Sender {
                base,
                image: Some(image),
            },
        )
    }

    /// Contents of the sender's volume: s1 written here and there over the base, s2 with more
    /// and a discarded range, s3 grown.
    fn history(sender: &Sender) -> Vec<Snap> {
        let mut c = sender.padded(&sender.base, SIZE as usize);
        let b = BLOCK as usize;
        c[b..3 * b].copy_from_slice(&noise(2, 2 * b));
        c[5 * GRANULE as usize..5 * GRANULE as usize + b].copy_from_slice(&noise(3, b));
        let s1 = snap("s1", c.clone());
        c[GRANULE as usize - b..GRANULE as usize + 2 * b].copy_from_slice(&noise(4, 3 * b));
        c[2 * GRANULE as usize..2 * GRANULE as usize + 3 * b].fill(0);
        let s2 = snap("s2", c.clone());
        c.resize((SIZE + 2 * GRANULE) as usize, 0);
        c[(SIZE + GRANULE) as usize..(SIZE + GRANULE) as usize + b].copy_from_slice(&noise(5, b));
        c[7 * b..9 * b].copy_from_slice(&noise(6, 2 * b));
        // Several granules whole: a resumable receive records its progress within the snapshot.
        c[4 * GRANULE as usize..7 * GRANULE as usize]
            .copy_from_slice(&noise(8, 3 * GRANULE as usize));
        let s3 = snap("s3", c.clone());
        c[0..b].copy_from_slice(&noise(7, b));
        let s4 = snap("s4", c);
        vec![s1, s2, s3, s4]
    }

    /// What a volume holds: its snapshots (name, guid, content) and its live content.
    #[derive(Debug, PartialEq, Eq)]
    struct State {
        snapshots: Vec<(String, String, Vec<u8>)>,
        live: Vec<u8>,
    }

    fn open(f: &Fixture, name: &str) -> Arc<Volume> {
        let row = f.pool.store().volume(name).unwrap();
        let files = f.pool.volume_files_of(&row).unwrap();
        Arc::new(Volume::open(&files, f.pool.base_of(row.image_id).unwrap()).unwrap())
    }

    fn state(f: &Fixture, name: &str) -> State {
        let volume = open(f, name);
        let read = |size: u64, at: &dyn Fn(&mut [u8]) -> usize| {
            let mut buf = vec![0u8; size as usize];
            assert_eq!(at(&mut buf), size as usize);
            buf
        };
        let mut snapshots = Vec::new();
        for s in volume.snapshots().unwrap() {
            let reader = volume.open_snapshot(s.epoch).unwrap();
            let content = read(s.size, &|b| reader.read_at(b, 0).unwrap());
            snapshots.push((s.name.clone(), s.guid.clone(), content));
        }
        let live = read(volume.size(), &|b| volume.read_at(b, 0).unwrap());
        assert_eq!(
            f.pool.store().volume(name).unwrap().size,
            volume.size(),
            "the store's size follows the index"
        );
        Arc::try_unwrap(volume).ok().unwrap().close().unwrap();
        State { snapshots, live }
    }

    fn expected(snaps: &[&Snap], live: &Snap) -> State {
        State {
            snapshots: snaps
                .iter()
                .map(|s| (s.name.clone(), s.guid.clone(), s.content.clone()))
                .collect(),
            live: live.content.clone(),
        }
    }

    fn recv(f: &Fixture, name: &str, stream: &[u8], options: ReceiveOptions) -> Result<Received> {
        f.pool.receive_checkpointing(
            name,
            Box::new(StreamReader::new(stream).unwrap()),
            options,
            GRANULE,
            &mut |_| {},
        )
    }

    const PLAIN: ReceiveOptions = ReceiveOptions {
        force: false,
        resumable: false,
    };
    const RESUMABLE: ReceiveOptions = ReceiveOptions {
        force: false,
        resumable: true,
    };

    /// No trace of a volume: no row in any state, no directory on the disk.
    fn assert_gone(f: &Fixture, name: &str) {
        assert!(f.pool.volume_row_any_state(name).unwrap().is_none());
        let volumes = crate::format::layout::DiskLayout::new(&f.disks[0])
            .volume_uuids()
            .unwrap();
        assert!(volumes.is_empty(), "left on the disk: {volumes:?}");
    }

    #[test]
    fn a_whole_stream_makes_the_volume_and_an_incremental_one_adds_to_it() {
        let (f, sender) = setup();
        let h = history(&sender);
        let whole = sender.stream("p1", None, &h[..2]);
        let got = recv(&f, "v", &whole, PLAIN).unwrap();
        assert!(got.created);
        assert_eq!(got.snapshots, vec!["s1", "s2"]);
        assert_eq!(got.bytes, whole.len() as u64);
        assert_eq!(state(&f, "v"), expected(&[&h[0], &h[1]], &h[1]));
        let inc = sender.stream("p2", Some(&h[1]), &h[2..]);
        let got = recv(&f, "v", &inc, PLAIN).unwrap();
        assert!(!got.created);
        assert_eq!(got.snapshots, vec!["s3", "s4"]);
        assert_eq!(
            state(&f, "v"),
            expected(&[&h[0], &h[1], &h[2], &h[3]], &h[3])
        );
        // The sums are kept: an incremental starts from them without reading the volume.
        let row = f.pool.store().volume("v").unwrap();
        let sums = ContentSums::open(&f.pool.volume_files_of(&row).unwrap()).unwrap();
        assert_eq!(
            sums.get("guid-s4").unwrap(),
            Some(sender.sum(&h[3].content))
        );
    }

    #[test]
    fn an_incremental_onto_a_volume_without_recorded_sums_computes_its_start() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let row = f.pool.store().volume("v").unwrap();
        let files = f.pool.volume_files_of(&row).unwrap();
        fs::remove_file(files.content_sums()).unwrap();
        recv(&f, "v", &sender.stream("p2", Some(&h[1]), &h[2..3]), PLAIN).unwrap();
        assert_eq!(state(&f, "v"), expected(&[&h[0], &h[1], &h[2]], &h[2]));
    }

    /// The second package of a refresh: the live content as a temporary snapshot alone.
    fn temporary(of: &Snap) -> Snap {
        Snap {
            name: "copy-tmp-6f1c2a8e-0000-4000-8000-000000000000".into(),
            temporary: true,
            ..of.clone()
        }
    }

    #[test]
    fn a_failed_receive_of_a_temporary_snapshot_alone_leaves_the_volume_as_before() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let before = state(&f, "v");
        let tmp = temporary(&h[2]);
        let inc = sender.stream("p2", Some(&h[1]), std::slice::from_ref(&tmp));
        let header = sender.header("p2", Some(&h[1]), std::slice::from_ref(&tmp));
        let mut records = sender.records(&header, Some(&h[1]), &[tmp], None);
        let last_end = records.len() - 2;
        if let Record::SnapshotEnd { digest, .. } = &mut records[last_end] {
            digest[0] ^= 1;
        }
        let faults = [
            ("a wrong digest", Sender::encode(&header, &records)),
            ("a cut", inc[..inc.len() * 3 / 4].to_vec()),
        ];
        for (what, stream) in faults {
            assert!(recv(&f, "v", &stream, PLAIN).is_err(), "{what} went unseen");
            assert_eq!(state(&f, "v"), before, "{what} changed the volume");
        }
        recv(&f, "v", &inc, PLAIN).unwrap();
        assert_eq!(state(&f, "v"), expected(&[&h[0], &h[1]], &h[2]));
    }

    #[test]
    fn recovery_rolls_back_a_dead_temporary_only_receive_whose_writes_were_durable() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let before = state(&f, "v");
        let inc = sender.stream("p2", Some(&h[1]), &[temporary(&h[2])]);
        // Cut inside the snapshot after a record of progress: writes of the package are
        // durable, its snapshot is not taken.
        assert!(recv(&f, "v", &inc[..inc.len() * 3 / 4], RESUMABLE).is_err());
        assert!(token(&f, "v").point.granule > 0);
        as_if_died_plain(&f, "v");
        let done = crate::core::recover::recover(&f.pool).unwrap();
        assert!(
            done.iter()
                .any(|d| d.contains("dropped the partial receive")),
            "{done:?}"
        );
        assert_eq!(state(&f, "v"), before);
    }

    /// A resumable receive of `snaps` (from `from`) cut inside a snapshot after a record of
    /// progress there; returns its token.
    fn cut_inside_a_snapshot(
        f: &Fixture,
        sender: &Sender,
        package: &str,
        from: Option<&Snap>,
        snaps: &[Snap],
    ) -> ResumeToken {
        let stream = sender.stream(package, from, snaps);
        for eighth in 1..8 {
            assert!(recv(f, "v", &stream[..stream.len() * eighth / 8], RESUMABLE).is_err());
            let t = token(f, "v");
            if t.point.granule > 0 {
                return t;
            }
            f.pool.receive_abort("v").unwrap();
        }
        panic!("no cut fell inside a snapshot after a record of progress");
    }

    /// The header of `stream` checked as `recv` checks it before any lock, and the reader at
    /// the record after it.
    fn checked_before_lock<'a>(
        f: &Fixture,
        input: &'a mut dyn Read,
    ) -> (CheckedStream, Incoming<'a, 'static>) {
        let mut reader = StreamReader::new(input).unwrap();
        let Record::Header(header) = reader.next().unwrap() else {
            panic!("a stream starts with its header");
        };
        let checked = f.pool.check_stream("v", header, RESUMABLE).unwrap();
        let incoming = Incoming::new(
            Box::new(reader),
            &checked.header,
            Box::leak(Box::new(|_: &ReceiveProgress| {})),
        );
        (checked, incoming)
    }

    #[test]
    fn a_resumed_stream_whose_partial_receive_was_dropped_meanwhile_is_refused() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..1]), PLAIN).unwrap();
        let snaps = &h[2..3];
        let t = cut_inside_a_snapshot(&f, &sender, "p2", Some(&h[0]), snaps);
        let resumed = sender.resumed("p2", Some(&h[0]), snaps, t.point);
        let mut bytes = &resumed[..];
        let (checked, mut reader) = checked_before_lock(&f, &mut bytes);
        // `recv --abort` runs between the resumed receive's checks and its lock.
        f.pool.receive_abort("v").unwrap();
        let before = state(&f, "v");
        let e = f
            .pool
            .receive_checked("v", &mut reader, checked, PLAIN, GRANULE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("changed while"), "{e}");
        assert!(
            state(&f, "v") == before,
            "the refused stream changed the volume"
        );

        // Another resumed stream finished the receive meanwhile.
        let t = cut_inside_a_snapshot(&f, &sender, "p3", Some(&h[0]), snaps);
        let resumed = sender.resumed("p3", Some(&h[0]), snaps, t.point);
        let mut bytes = &resumed[..];
        let (checked, mut reader) = checked_before_lock(&f, &mut bytes);
        recv(&f, "v", &resumed, PLAIN).unwrap();
        let done = state(&f, "v");
        assert!(done == expected(&[&h[0], &h[2]], &h[2]));
        let e = f
            .pool
            .receive_checked("v", &mut reader, checked, PLAIN, GRANULE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("changed while"), "{e}");
        assert!(
            state(&f, "v") == done,
            "the refused stream changed the volume"
        );
    }

    #[test]
    fn a_resumed_new_volume_removed_meanwhile_is_refused() {
        let (f, sender) = setup();
        let h = history(&sender);
        let t = cut_inside_a_snapshot(&f, &sender, "p1", None, &h[..3]);
        let resumed = sender.resumed("p1", None, &h[..3], t.point);
        let mut bytes = &resumed[..];
        let (checked, mut reader) = checked_before_lock(&f, &mut bytes);
        f.pool.receive_abort("v").unwrap();
        let e = f
            .pool
            .receive_checked("v", &mut reader, checked, PLAIN, GRANULE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("changed while"), "{e}");
        assert_gone(&f, "v");
    }

    #[test]
    fn a_resumed_stream_must_carry_its_package_as_first_sent() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..1]), PLAIN).unwrap();
        let tmp = Snap {
            name: "now".into(),
            ..temporary(&h[1])
        };
        let inc = sender.stream("p2", Some(&h[0]), std::slice::from_ref(&tmp));
        assert!(recv(&f, "v", &inc[..inc.len() / 2], RESUMABLE).is_err());
        let t = token(&f, "v");
        // The same guids (so the same snapshots digest), but the temporary snapshot not marked
        // so, renamed, or another starting snapshot's name: each refused, nothing changed.
        let kept = Snap {
            temporary: false,
            ..tmp.clone()
        };
        let renamed = Snap {
            name: "then".into(),
            ..tmp.clone()
        };
        let mut other_from = h[0].clone();
        other_from.name = "elsewhere".into();
        for (what, from, snap) in [
            ("not temporary", &h[0], &kept),
            ("renamed", &h[0], &renamed),
            ("another from", &other_from, &tmp),
        ] {
            let resumed = sender.resumed("p2", Some(from), std::slice::from_ref(snap), t.point);
            let e = recv(&f, "v", &resumed, PLAIN).unwrap_err().to_string();
            assert!(e.contains("another package"), "{what}: {e}");
            assert_eq!(token(&f, "v"), t, "{what}");
        }
        // What a sender that rebuilt the package of a send of the live volume sent: refused
        // by its name alone.
        let rebuilt = Snap {
            name: "copy-tmp-6f1c2a8e".into(),
            temporary: false,
            ..tmp.clone()
        };
        assert!(recv(
            &f,
            "v",
            &sender.resumed("p2", Some(&h[0]), &[rebuilt], t.point),
            PLAIN
        )
        .is_err());
        assert_eq!(token(&f, "v"), t);
        let resumed = sender.resumed("p2", Some(&h[0]), &[tmp], t.point);
        let got = recv(&f, "v", &resumed, PLAIN).unwrap();
        assert!(got.snapshots.is_empty(), "{:?}", got.snapshots);
        assert!(state(&f, "v") == expected(&[&h[0]], &h[1]));
    }

    #[test]
    fn reserved_snapshot_names_are_kept_by_no_stream() {
        let (f, sender) = setup();
        let h = history(&sender);
        for name in ["copy-tmp-1", "export-tmp-1", "recv-tmp-p1-0"] {
            let named = Snap {
                name: name.into(),
                ..h[0].clone()
            };
            let e = recv(&f, "v", &sender.stream("p1", None, &[named]), PLAIN)
                .unwrap_err()
                .to_string();
            assert!(e.contains("temporary snapshots"), "{name}: {e}");
            assert_gone(&f, "v");
        }
        // A temporary snapshot is the package's last, or the stream is malformed.
        let first_temporary = [temporary(&h[0]), h[1].clone()];
        let e = recv(&f, "v", &sender.stream("p1", None, &first_temporary), PLAIN)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not the package's last"), "{e}");
        assert_gone(&f, "v");
    }

    #[test]
    fn a_content_mismatch_drops_a_resumable_receive() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..1]), PLAIN).unwrap();
        let before = state(&f, "v");
        let snaps = &h[1..3];
        let header = sender.header("p2", Some(&h[0]), snaps);
        let mut records = sender.records(&header, Some(&h[0]), snaps, None);
        let last_end = records.len() - 2;
        if let Record::SnapshotEnd { digest, .. } = &mut records[last_end] {
            digest[0] ^= 1;
        }
        let e = recv(&f, "v", &Sender::encode(&header, &records), RESUMABLE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not match") && e.contains("dropped"), "{e}");
        assert!(f.pool.receive_resume_token("v").is_err());
        assert!(
            state(&f, "v") == before,
            "the failed receive changed the volume"
        );
        // A resumed stream with a mismatch: dropped too (a new volume is removed).
        let t = cut_inside_a_snapshot(&f, &sender, "p3", Some(&h[0]), snaps);
        let mut records = sender.records(&header, Some(&h[0]), snaps, Some(t.point));
        let last_end = records.len() - 2;
        if let Record::SnapshotEnd { digest, .. } = &mut records[last_end] {
            digest[0] ^= 1;
        }
        let mut resumed_header = sender.header("p3", Some(&h[0]), snaps);
        resumed_header.resume = Some(t.point);
        let e = recv(&f, "v", &Sender::encode(&resumed_header, &records), PLAIN)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dropped"), "{e}");
        assert!(f.pool.receive_resume_token("v").is_err());
        assert!(
            state(&f, "v") == before,
            "the failed resumed receive changed the volume"
        );
    }

    #[test]
    fn a_receive_lets_go_of_the_volume_before_reclaiming_and_the_next_one_reclaims_first() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let volume = open(&f, "v");
        volume.snapshot("local", "guid-local", 1).unwrap();
        volume.write_at(&[8u8; 4096], 8192).unwrap();
        Arc::try_unwrap(volume).ok().unwrap().close().unwrap();
        let force = ReceiveOptions {
            force: true,
            resumable: false,
        };
        let got = recv(&f, "v", &sender.stream("p2", Some(&h[1]), &h[2..3]), force).unwrap();
        assert_eq!(got.discarded_snapshots, ["local"]);
        let pending = |f: &Fixture| {
            let volume = open(f, "v");
            let pending = volume.reclaim_pending().unwrap();
            Arc::try_unwrap(volume).ok().unwrap().close().unwrap();
            pending
        };
        assert!(
            pending(&f),
            "the receive reclaimed before it let go of the volume"
        );
        recv(&f, "v", &sender.stream("p3", Some(&h[2]), &h[3..]), PLAIN).unwrap();
        assert!(!pending(&f));
        assert!(state(&f, "v") == expected(&[&h[0], &h[1], &h[2], &h[3]], &h[3]));
    }

    #[test]
    fn progress_tells_the_bytes_read_and_the_snapshot_received() {
        let (f, sender) = setup();
        let h = history(&sender);
        let whole = sender.stream("p1", None, &h[..3]);
        let mut heard = Vec::new();
        f.pool
            .receive("v", &mut &whole[..], PLAIN, &mut |p| heard.push(*p))
            .unwrap();
        assert!(heard.iter().all(|p| p.snapshots == 3));
        assert!(heard
            .windows(2)
            .all(|w| w[0].bytes <= w[1].bytes && w[0].snapshot <= w[1].snapshot));
        let snapshots: std::collections::BTreeSet<usize> =
            heard.iter().map(|p| p.snapshot).collect();
        assert_eq!(snapshots, [1, 2, 3].into());
        assert_eq!(heard.last().unwrap().bytes, whole.len() as u64);
    }

    #[test]
    fn a_receive_that_died_after_its_commit_started_but_before_its_transaction_is_rolled_back() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..1]), PLAIN).unwrap();
        let before = state(&f, "v");
        let inc = sender.stream("p2", Some(&h[0]), &[h[1].clone(), temporary(&h[2])]);
        // Cut just before `End`: every snapshot is taken under its staged name.
        assert!(recv(&f, "v", &inc[..inc.len() - 5], RESUMABLE).is_err());
        let row = f.pool.store().volume("v").unwrap();
        let files = f.pool.volume_files_of(&row).unwrap();
        let partial = read_partial(&files).unwrap().unwrap();
        write_partial(
            &files,
            &PartialReceive {
                resumable: false,
                commit_started: true,
                ..partial
            },
        )
        .unwrap();
        let done = crate::core::recover::recover(&f.pool).unwrap();
        assert!(
            done.iter()
                .any(|d| d.contains("dropped the partial receive")),
            "{done:?}"
        );
        assert!(!has_partial_receive(&files));
        assert!(state(&f, "v") == before, "the receive was kept");
    }

    #[test]
    fn a_temporary_snapshot_sets_the_content_and_is_not_kept() {
        let (f, sender) = setup();
        let h = history(&sender);
        let mut tmp = h[1].clone();
        tmp.name = "copy-tmp-x".into();
        tmp.temporary = true;
        let got = recv(
            &f,
            "v",
            &sender.stream("p1", None, &[h[0].clone(), tmp]),
            PLAIN,
        )
        .unwrap();
        assert_eq!(got.snapshots, vec!["s1"]);
        assert_eq!(state(&f, "v"), expected(&[&h[0]], &h[1]));
    }

    const FORCE: ReceiveOptions = ReceiveOptions {
        force: true,
        resumable: false,
    };

    /// Another volume, over zeros, whose snapshots share nothing with `history`'s (one has the
    /// name `s1`, under another guid): its whole stream with the live state as a temporary
    /// snapshot, and the snapshots it keeps.
    fn other_volume() -> (Vec<u8>, Vec<Snap>) {
        let sender = Sender {
            base: Vec::new(),
            image: None,
        };
        let (b, g) = (BLOCK as usize, GRANULE as usize);
        let mut c = vec![0u8; SIZE as usize];
        c[3 * b..6 * b].copy_from_slice(&noise(11, 3 * b));
        let s1 = Snap {
            guid: "guid-other-s1".into(),
            ..snap("s1", c.clone())
        };
        c[g..2 * g].copy_from_slice(&noise(12, g));
        let t2 = snap("t2", c.clone());
        c[0..b].copy_from_slice(&noise(13, b));
        let live = temporary(&snap("live", c));
        let stream = sender.stream("p9", None, &[s1.clone(), t2.clone(), live.clone()]);
        (stream, vec![s1, t2, live])
    }

    /// The volume rows (any state) and the volume directories on the disk, those of removals
    /// under way (`removed-volumes/`) too.
    fn rows_and_dirs(f: &Fixture) -> (Vec<String>, Vec<String>) {
        let rows = f.pool.store().volumes().unwrap();
        let layout = crate::format::layout::DiskLayout::new(&f.disks[0]);
        let mut dirs = layout.volume_uuids().unwrap();
        dirs.extend(
            layout
                .removed_volume_uuids()
                .unwrap()
                .into_iter()
                .map(|uuid| format!("removed {uuid}")),
        );
        (
            rows.into_iter()
                .map(|r| format!("{} {}", r.name, r.uuid))
                .collect(),
            dirs,
        )
    }

    #[test]
    fn a_forced_whole_stream_replaces_an_existing_volume_in_one_step() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let before = state(&f, "v");
        let old = f.pool.store().volume("v").unwrap();
        let (whole, o) = other_volume();
        let e = recv(&f, "v", &whole, PLAIN).unwrap_err().to_string();
        assert!(e.contains("exists") && e.contains("--force"), "{e}");
        let e = recv(
            &f,
            "v",
            &whole,
            ReceiveOptions {
                force: true,
                resumable: true,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot be resumable"), "{e}");
        assert_eq!(state(&f, "v"), before);
        let create = crate::core::volume::requests::Request::Create {
            name: "x".into(),
            guid: "g".into(),
            created: 1,
        };
        let mut looked = 0;
        let got = f
            .pool
            .receive("v", &mut &whole[..], FORCE, &mut |p| {
                if p.snapshot == 0 {
                    return;
                }
                // While it runs, the old volume alone is there, under its name, held: a
                // snapshot request waits (its CLI retries) instead of changing it.
                let listed: Vec<String> = f
                    .pool
                    .volumes()
                    .unwrap()
                    .into_iter()
                    .map(|v| v.volume.name)
                    .collect();
                assert_eq!(listed, ["v"]);
                assert_eq!(f.pool.volume("v").unwrap().volume.uuid, old.uuid);
                assert!(matches!(f.pool.snapshot_request("v", &create), Ok(Err(_))));
                looked += 1;
            })
            .unwrap();
        assert!(looked > 0);
        assert!(got.replaced && !got.created, "{got:?}");
        assert_eq!(got.snapshots, ["s1", "t2"]);
        assert_eq!(got.discarded_snapshots, ["s1", "s2"]);
        assert!(got.discarded_writes);
        assert_eq!(state(&f, "v"), expected(&[&o[0], &o[1]], &o[2]));
        let row = f.pool.store().volume("v").unwrap();
        assert_ne!(row.uuid, old.uuid);
        assert_eq!(
            row.image_id, None,
            "the stream's base, not the old volume's"
        );
        // Nothing else is left: one row, one directory, whose record has the volume's name.
        assert_eq!(
            rows_and_dirs(&f),
            (vec![format!("v {}", row.uuid)], vec![row.uuid.clone()])
        );
        let files = f.pool.volume_files_of(&row).unwrap();
        assert_eq!(read_volume_record(&files).unwrap().name, "v");
        assert!(!has_partial_receive(&files));
        // The reserved names are no user's.
        for name in [replacing_name("p9", "v"), tombstone_name(&old.uuid)] {
            assert!(f.pool.create_volume(&name, None, Some(SIZE), None).is_err());
            assert!(recv(&f, &name, &whole, PLAIN).is_err());
        }
        assert_eq!(rows_and_dirs(&f).0.len(), 1);
    }

    #[test]
    fn the_swap_of_a_replacement_changes_both_rows_or_neither() {
        let f = fixture(1);
        let store = f.pool.store();
        let rows = || -> Vec<(i64, String, VolumeState)> {
            let mut rows: Vec<_> = store
                .volumes()
                .unwrap()
                .into_iter()
                .map(|r| (r.id, r.name, r.state))
                .collect();
            rows.sort_by_key(|r| r.0);
            rows
        };
        f.pool.create_volume("v", None, Some(SIZE), None).unwrap();
        f.pool.create_volume("w", None, Some(SIZE), None).unwrap();
        let (v, w) = (store.volume("v").unwrap(), store.volume("w").unwrap());
        let tomb = tombstone_name(&v.uuid);
        // The new row is not `creating` (taken by a recovery, say): the old row's change is
        // dropped with it.
        let before = rows();
        assert!(store.swap_volumes(v.id, &tomb, w.id, "v").is_err());
        assert_eq!(rows(), before);
        let new = f
            .pool
            .start_volume(&replacing_name("p1", "v"), None, SIZE, None)
            .unwrap();
        // The old row is not the ready volume of that name: nothing changes.
        let before = rows();
        assert!(!store.swap_volumes(w.id, &tomb, new.row.id, "v").unwrap());
        assert_eq!(rows(), before);
        assert!(store.swap_volumes(v.id, &tomb, new.row.id, "v").unwrap());
        let mut after = vec![
            (v.id, tomb, VolumeState::Removing),
            (w.id, "w".to_string(), VolumeState::Ready),
            (new.row.id, "v".to_string(), VolumeState::Ready),
        ];
        after.sort_by_key(|r| r.0);
        assert_eq!(rows(), after);
    }

    #[test]
    fn each_fault_of_a_replacing_stream_leaves_the_old_volume_exactly_as_it_was() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let before = (state(&f, "v"), rows_and_dirs(&f));
        let (whole, _) = other_volume();
        for (what, stream) in damaged(&whole) {
            assert!(recv(&f, "v", &stream, FORCE).is_err(), "{what} went unseen");
            assert_eq!((state(&f, "v"), rows_and_dirs(&f)), before, "after {what}");
        }
    }

    /// A send of the volume started while a replace holds the old one waits for its writer
    /// lock (`pin_volume`, up to a minute), with the old row's files looked up before. Once
    /// the replace is done it must act on the volume now so named, as the volume requests do
    /// (`snapshot_request`), or refuse saying what to do: not fail on the old volume's
    /// directory, gone (or, polling while it is being removed, recreate its lock file in it
    /// and open what is left of it).
    #[test]
    fn a_send_waiting_for_a_replaced_volume_sends_the_new_one_or_says_what_to_do() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let old = f.pool.store().volume("v").unwrap();
        let (whole, _) = other_volume();
        let spec = crate::core::pool::SendSpec::Package {
            volume: "v",
            snapshot: "s1",
            temporary: false,
            from: None,
            from_all: false,
            with_image: false,
        };
        let sent = std::thread::scope(|scope| {
            let mut waiting = None;
            f.pool
                .receive("v", &mut &whole[..], FORCE, &mut |p| {
                    if p.snapshot == 1 && waiting.is_none() {
                        waiting = Some(scope.spawn(|| {
                            f.pool
                                .prepare_send(&spec)
                                .map(|prepared| prepared.header().volume_uuid.clone())
                        }));
                        // It has looked the volume up, and waits for its lock.
                        std::thread::sleep(std::time::Duration::from_millis(500));
                    }
                })
                .unwrap();
            waiting.unwrap().join().unwrap()
        });
        let new = f.pool.store().volume("v").unwrap();
        assert_ne!(new.uuid, old.uuid);
        match sent {
            Ok(uuid) => assert_eq!(uuid, new.uuid, "the send read the replaced volume"),
            Err(e) => {
                let e = e.to_string();
                assert!(
                    !e.contains("os error") && (e.contains("retry") || e.contains("again")),
                    "a send that waited for the replaced volume: {e}"
                );
            }
        }
    }

    /// Commands that looked the volume up before a replace and reach its lock after it: the
    /// lock of the row read then says the name changed (its files were moved away: no bare
    /// "no such file"), a receive refuses with a line that says to send again, and a `volume
    /// rm` that waited meanwhile removes nothing and says to run it again (or that the
    /// volume is held, while the replace still has it).
    #[test]
    fn commands_that_looked_up_a_replaced_volume_say_to_run_again_and_change_nothing() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let old = f.pool.store().volume("v").unwrap();
        let old_files = f.pool.volume_files_of(&old).unwrap();
        let (whole, o) = other_volume();
        let removed = std::thread::scope(|scope| {
            let mut waiting = None;
            f.pool
                .receive("v", &mut &whole[..], FORCE, &mut |p| {
                    if p.snapshot == 1 && waiting.is_none() {
                        waiting = Some(scope.spawn(|| f.pool.remove_volume("v", true)));
                        // It has looked the volume up, and waits (a second) for its lock.
                        std::thread::sleep(std::time::Duration::from_millis(200));
                    }
                })
                .unwrap();
            waiting.unwrap().join().unwrap()
        });
        // Refused as a command that met the replacement, not as one that found the volume held
        // (whose line also says to retry).
        let e = removed.expect_err("the volume rm went through").to_string();
        assert!(
            e.contains("was replaced") && e.contains("run the command again"),
            "{e}"
        );
        assert_eq!(state(&f, "v"), expected(&[&o[0], &o[1]], &o[2]));
        assert!(matches!(
            f.pool.try_lock_volume(&old, &old_files).unwrap(),
            VolumeLock::Changed
        ));
        let e = f
            .pool
            .lock_for_receive("v", &old, &old_files)
            .err()
            .expect("locked the replaced volume")
            .to_string();
        assert!(
            !e.contains("os error") && e.contains("send it again"),
            "{e}"
        );
        assert!(!old_files.dir().exists());
    }

    /// A volume named `recv-tmp-...` by a version that allowed the name (before the prefix
    /// was reserved) stays a volume of its user: an incremental stream goes on applying to it
    /// (there is no rename to get out of the reserved prefix).
    #[test]
    fn a_volume_named_with_the_reserved_prefix_before_it_was_reserved_still_receives() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..1]), PLAIN).unwrap();
        // Its row takes the name an older version let its user give it.
        let store = f.pool.store();
        let v = store.volume("v").unwrap();
        let spare = f.pool.start_volume("spare", None, SIZE, None).unwrap();
        assert!(store
            .swap_volumes(v.id, "recv-tmp-legacy", spare.row.id, "v")
            .unwrap());
        assert!(store
            .set_volume_state(v.id, VolumeState::Removing, VolumeState::Ready)
            .unwrap());
        let inc = sender.stream("p2", Some(&h[0]), &h[1..2]);
        let got = recv(&f, "recv-tmp-legacy", &inc, PLAIN);
        assert!(got.is_ok(), "{:?}", got.err().map(|e| e.to_string()));
    }

    /// A whole stream to a name taken by a volume from before the prefix was reserved, removed
    /// between the receive's name check and its lookup of the volume: refused, as for any
    /// reserved name, not made as a new volume under it.
    #[test]
    fn a_reserved_name_whose_old_volume_goes_meanwhile_is_not_made_again() {
        struct RemovingFirst<'a> {
            pool: &'a Pool,
            inner: StreamReader<&'a [u8]>,
            removed: bool,
        }
        impl Records for RemovingFirst<'_> {
            fn next(&mut self) -> std::result::Result<Record, StreamError> {
                if !self.removed {
                    self.removed = true;
                    self.pool.remove_volume("recv-tmp-legacy", true).unwrap();
                }
                self.inner.next()
            }
            fn bytes(&self) -> u64 {
                self.inner.bytes()
            }
        }
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..1]), PLAIN).unwrap();
        let store = f.pool.store();
        let v = store.volume("v").unwrap();
        let spare = f.pool.start_volume("spare", None, SIZE, None).unwrap();
        assert!(store
            .swap_volumes(v.id, "recv-tmp-legacy", spare.row.id, "v")
            .unwrap());
        assert!(store
            .set_volume_state(v.id, VolumeState::Removing, VolumeState::Ready)
            .unwrap());
        let stream = sender.stream("p2", None, &h[..1]);
        let records = RemovingFirst {
            pool: &f.pool,
            inner: StreamReader::new(&stream[..]).unwrap(),
            removed: false,
        };
        let got = f.pool.receive_checkpointing(
            "recv-tmp-legacy",
            Box::new(records),
            PLAIN,
            GRANULE,
            &mut |_| {},
        );
        let e = got.expect_err("refused").to_string();
        assert!(
            e.contains("are kept for the volumes a receive makes"),
            "{e}"
        );
        assert!(f
            .pool
            .volume_row_any_state("recv-tmp-legacy")
            .unwrap()
            .is_none());
    }

    /// The commands that met a replace in progress poll the old volume's writer lock (the
    /// CLI's `snapshot_request` every 20 ms, `send`'s `pin_volume`, a mount's open by a stale
    /// catalog entry): `WriterLock::try_acquire` creates the lock file. Polling while the old
    /// volume's directory is being removed must not leave it behind (nor its row).
    #[test]
    fn commands_polling_the_old_volume_do_not_keep_its_removal_from_finishing() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (f, sender) = setup();
        let h = history(&sender);
        let (other, _) = other_volume();
        let streams = [other, sender.stream("p1", None, &h[..2])];
        recv(&f, "v", &streams[1], PLAIN).unwrap();
        for round in 0..60 {
            let old = f.pool.store().volume("v").unwrap();
            let files = f.pool.volume_files_of(&old).unwrap();
            let done = AtomicBool::new(false);
            let recreated = std::thread::scope(|scope| {
                let mut poller = None;
                f.pool
                    .receive("v", &mut &streams[round % 2][..], FORCE, &mut |p| {
                        // The replace holds the old volume from here on.
                        if p.snapshot == 1 && poller.is_none() {
                            poller = Some(scope.spawn(|| {
                                let mut recreated = 0;
                                while !done.load(Ordering::Relaxed) {
                                    if let Ok(Some(lock)) = WriterLock::try_acquire(&files) {
                                        recreated += 1;
                                        drop(lock);
                                    }
                                }
                                recreated
                            }));
                        }
                    })
                    .unwrap();
                done.store(true, Ordering::Relaxed);
                poller.unwrap().join().unwrap()
            });
            let (rows, dirs) = rows_and_dirs(&f);
            let left: Vec<_> = std::fs::read_dir(files.dir())
                .map(|d| d.map(|e| e.unwrap().file_name()).collect())
                .unwrap_or_default();
            assert_eq!(
                (rows.len(), dirs.len()),
                (1, 1),
                "round {round}: the poller took the old volume's lock {recreated} time(s); rows {rows:?}, directories {dirs:?}, left in the old one {left:?}"
            );
        }
    }

    #[test]
    fn a_replacing_receive_that_died_is_undone_by_recovery_at_every_record() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let before = (state(&f, "v"), rows_and_dirs(&f));
        let (whole, o) = other_volume();
        for dies_at in 1.. {
            // Unwound at the record `dies_at`: its locks go, its files and rows stay, as
            // after a `kill -9`.
            let mut heard = 0;
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                f.pool.receive("v", &mut &whole[..], FORCE, &mut |_| {
                    heard += 1;
                    if heard == dies_at {
                        panic!("the receiver dies at record {dies_at}");
                    }
                })
            }));
            let Err(_) = run else {
                // It reached its end: the volume is the new one.
                assert_eq!(state(&f, "v"), expected(&[&o[0], &o[1]], &o[2]));
                assert!(dies_at > 3, "too few records to die at");
                break;
            };
            assert!(
                rows_and_dirs(&f) != before.1,
                "no replacement was under way"
            );
            let done = crate::core::recover::recover(&f.pool).unwrap();
            assert!(
                done.iter().any(|d| d.contains("recv --force")),
                "record {dies_at}: {done:?}"
            );
            assert_eq!(
                (state(&f, "v"), rows_and_dirs(&f)),
                before,
                "record {dies_at}"
            );
        }
    }

    /// A replacing receive that dies inside its commit (`crash_point`): right after the new
    /// volume's record takes the name, right after the store swap (`receive.json` still
    /// there), after the old volume's directory was moved out of `volumes/`, after its files
    /// were deleted. After the next `recover` the volume is exactly the old one (before the
    /// swap) or exactly the new one (after), one row and one directory, and fsck is clean.
    #[test]
    fn a_replacing_receive_that_dies_inside_its_commit_is_the_old_volume_or_the_new_one() {
        let (f, sender) = setup();
        let h = history(&sender);
        let (other, o) = other_volume();
        let mine = sender.stream("p1", None, &h[..2]);
        recv(&f, "v", &mine, PLAIN).unwrap();
        let theirs = expected(&[&o[0], &o[1]], &o[2]);
        let ours = state(&f, "v");
        let points = [
            (CrashPoint::ReplaceRecordRenamed, false),
            (CrashPoint::ReplaceSwapped, true),
            (CrashPoint::RemovalMoved, true),
            (CrashPoint::RemovalDeleted, true),
        ];
        for (point, replaced) in points {
            // Each round replaces the volume with the other content.
            let (stream, now, next) = if state(&f, "v") == ours {
                (&other, &ours, &theirs)
            } else {
                (&mine, &theirs, &ours)
            };
            let old = f.pool.store().volume("v").unwrap();
            crash_point::at(point, move || {
                panic!("the receiver dies at {}", point.name())
            });
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                f.pool.receive("v", &mut &stream[..], FORCE, &mut |_| {})
            }));
            assert!(run.is_err(), "{point:?} was not reached");
            // What the dead receive left: two rows, or a row and the old files.
            let left = rows_and_dirs(&f);
            assert!(
                left.0.len() == 2 || left.1.len() == 2,
                "{point:?}: {left:?}"
            );
            crate::core::recover::recover(&f.pool).unwrap();
            let want = if replaced { next } else { now };
            assert!(&state(&f, "v") == want, "{point:?}: the wrong volume");
            let row = f.pool.store().volume("v").unwrap();
            assert_eq!(row.uuid != old.uuid, replaced, "{point:?}");
            assert_eq!(
                rows_and_dirs(&f),
                (vec![format!("v {}", row.uuid)], vec![row.uuid.clone()]),
                "{point:?}"
            );
            assert!(!has_partial_receive(&f.pool.volume_files_of(&row).unwrap()));
            let findings = crate::core::fsck::check(&f.pool, false).unwrap();
            assert!(findings.is_empty(), "{point:?}: {findings:?}");
        }
    }

    /// Once the swap committed, a step after it that fails (removing `receive.json`) does not
    /// make the receive fail: the volume was replaced, and `recv` says so (exit 0). The
    /// file's removal is left to the next `recover`.
    #[test]
    fn a_replace_that_committed_succeeds_when_finishing_it_fails() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let (whole, o) = other_volume();
        // The path and the bytes of the file set aside.
        type SetAside = Option<(PathBuf, Vec<u8>)>;
        let kept: std::rc::Rc<std::cell::RefCell<SetAside>> = Default::default();
        let taken = kept.clone();
        // The new volume's `receive.json` (the only one) becomes a directory, which cannot be
        // removed as a file.
        let layout = crate::format::layout::DiskLayout::new(&f.disks[0]);
        crash_point::at(CrashPoint::ReplaceSwapped, move || {
            let path = layout
                .volume_uuids()
                .unwrap()
                .into_iter()
                .map(|uuid| layout.volume_files(&uuid).receive_state())
                .find(|path| path.exists())
                .unwrap();
            let bytes = fs::read(&path).unwrap();
            fs::remove_file(&path).unwrap();
            fs::create_dir_all(path.join("in-the-way")).unwrap();
            *taken.borrow_mut() = Some((path, bytes));
        });
        let got = recv(&f, "v", &whole, FORCE);
        let got = got.unwrap_or_else(|e| panic!("a replace that committed failed: {e}"));
        assert!(got.replaced, "{got:?}");
        // The file as the receive left it, for the recovery to finish.
        let (path, bytes) = kept.borrow_mut().take().expect("the swap was reached");
        fs::remove_dir_all(&path).unwrap();
        fs::write(&path, bytes).unwrap();
        let done = crate::core::recover::recover(&f.pool).unwrap();
        assert!(done.iter().any(|d| d.contains("had completed")), "{done:?}");
        assert_eq!(state(&f, "v"), expected(&[&o[0], &o[1]], &o[2]));
        assert_eq!(rows_and_dirs(&f).0.len(), 1);
        assert!(crate::core::fsck::check(&f.pool, false).unwrap().is_empty());
    }

    /// A file's path and bytes, set aside by a step a test armed.
    type SetAsideFile = std::rc::Rc<std::cell::RefCell<Option<(PathBuf, Vec<u8>)>>>;

    /// The `receive.json` of the one volume that has one, swapped for a directory (which
    /// cannot be removed as a file) once the receive's snapshots took their names: every step
    /// after that sees it in the way. Returns the path and bytes set aside, to put back.
    fn receive_json_in_the_way_after_the_names(f: &Fixture) -> SetAsideFile {
        let kept: SetAsideFile = Default::default();
        let taken = kept.clone();
        let layout = crate::format::layout::DiskLayout::new(&f.disks[0]);
        crash_point::at(CrashPoint::SnapshotsRenamed, move || {
            let path = layout
                .volume_uuids()
                .unwrap()
                .into_iter()
                .map(|uuid| layout.volume_files(&uuid).receive_state())
                .find(|path| path.exists())
                .unwrap();
            let bytes = fs::read(&path).unwrap();
            fs::remove_file(&path).unwrap();
            fs::create_dir_all(path.join("in-the-way")).unwrap();
            *taken.borrow_mut() = Some((path, bytes));
        });
        kept
    }

    /// An incremental receive whose `receive.json` cannot be removed after its commit: it
    /// succeeds with its snapshots there, and the next `recover` removes the file.
    #[test]
    fn an_incremental_receive_that_committed_succeeds_when_finishing_it_fails() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let kept = receive_json_in_the_way_after_the_names(&f);
        let got = recv(&f, "v", &sender.stream("p2", Some(&h[1]), &h[2..]), PLAIN)
            .unwrap_or_else(|e| panic!("a receive that committed failed: {e}"));
        assert_eq!(got.snapshots, vec!["s3", "s4"]);
        let (path, bytes) = kept.borrow_mut().take().expect("the commit was reached");
        fs::remove_dir_all(&path).unwrap();
        fs::write(&path, bytes).unwrap();
        let done = crate::core::recover::recover(&f.pool).unwrap();
        assert!(done.iter().any(|d| d.contains("had completed")), "{done:?}");
        assert_eq!(
            state(&f, "v"),
            expected(&[&h[0], &h[1], &h[2], &h[3]], &h[3])
        );
        assert!(crate::core::fsck::check(&f.pool, false).unwrap().is_empty());
    }

    /// A whole stream making a new volume, whose `receive.json` cannot be removed after its
    /// commit: the volume is made (exit 0), with its snapshots.
    #[test]
    fn a_new_volume_receive_that_committed_succeeds_when_finishing_it_fails() {
        let (f, sender) = setup();
        let h = history(&sender);
        let kept = receive_json_in_the_way_after_the_names(&f);
        let got = recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN)
            .unwrap_or_else(|e| panic!("a receive that committed failed: {e}"));
        assert!(got.created);
        assert_eq!(got.snapshots, vec!["s1", "s2"]);
        assert_eq!(
            f.pool.store().volume("v").unwrap().state,
            VolumeState::Ready
        );
        let (path, bytes) = kept.borrow_mut().take().expect("the commit was reached");
        fs::remove_dir_all(&path).unwrap();
        fs::write(&path, bytes).unwrap();
        crate::core::recover::recover(&f.pool).unwrap();
        assert!(!path.exists(), "recovery left {}", path.display());
        assert_eq!(state(&f, "v"), expected(&[&h[0], &h[1]], &h[1]));
        assert!(crate::core::fsck::check(&f.pool, false).unwrap().is_empty());
    }

    /// The volume's index fails right after it committed a receive's snapshot names (here its
    /// snapshot table renamed away by another connection): the receive succeeded, and says so.
    #[test]
    fn a_receive_whose_index_fails_right_after_its_commit_succeeds() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let row = f.pool.store().volume("v").unwrap();
        let index = f.pool.volume_files_of(&row).unwrap().index();
        let other = rusqlite::Connection::open(&index).unwrap();
        crash_point::at(CrashPoint::SnapshotsRenamed, move || {
            other
                .execute_batch("ALTER TABLE snapshots RENAME TO snapshots_away")
                .unwrap();
        });
        let got = recv(&f, "v", &sender.stream("p2", Some(&h[1]), &h[2..]), PLAIN);
        let back = rusqlite::Connection::open(&index).unwrap();
        back.execute_batch("ALTER TABLE snapshots_away RENAME TO snapshots")
            .unwrap();
        let got = got.unwrap_or_else(|e| panic!("a receive that committed failed: {e}"));
        assert_eq!(got.snapshots, vec!["s3", "s4"]);
        crate::core::recover::recover(&f.pool).unwrap();
        assert_eq!(
            state(&f, "v"),
            expected(&[&h[0], &h[1], &h[2], &h[3]], &h[3])
        );
    }

    /// A removal cut short (its row `removing`, its files not yet moved) whose disk is then
    /// missing (its filesystem not mounted: the path is gone). The next `recover` cannot
    /// delete the files: it must keep the row to finish the removal once the disk is back,
    /// and must not make the disk's path (and `.imgpool/removed-volumes/`) on whatever
    /// filesystem is under it. Otherwise, once the disk returns, the removed volume's
    /// directory is still under `volumes/`, no row accounts for it, and fsck lists it again.
    #[test]
    fn a_removal_cut_short_on_a_disk_now_missing_is_not_taken_for_done() {
        let f = fixture(1);
        f.pool.create_volume("v", None, Some(SIZE), None).unwrap();
        let row = f.pool.store().volume("v").unwrap();
        // `volume rm` marked it, and died before its files moved.
        assert!(f
            .pool
            .store()
            .set_volume_state(row.id, VolumeState::Ready, VolumeState::Removing)
            .unwrap());
        // The disk goes missing.
        let away = f.dir.path().join("unmounted");
        fs::rename(&f.disks[0], &away).unwrap();
        let recovered = crate::core::recover::recover(&f.pool);
        let made = f.disks[0].exists();
        let rows = f.pool.store().volumes().unwrap().len();
        // The disk comes back.
        if made {
            fs::remove_dir_all(&f.disks[0]).unwrap();
        }
        fs::rename(&away, &f.disks[0]).unwrap();
        let findings = crate::core::fsck::check(&f.pool, false).unwrap();
        assert_eq!(
            rows, 1,
            "the row went while the files stayed on the missing disk ({recovered:?}); fsck once it is back: {findings:?}"
        );
        assert!(
            !made,
            "recover made the missing disk's path {}",
            f.disks[0].display()
        );
        // Back, the next recovery finishes the removal.
        crate::core::recover::recover(&f.pool).unwrap();
        assert!(f.pool.store().volumes().unwrap().is_empty());
        let findings = crate::core::fsck::check(&f.pool, false).unwrap();
        assert!(findings.is_empty(), "{findings:?}");
    }

    /// `volume rm` of a volume whose disk is missing: one line naming the disk and what to do,
    /// and nothing changed (not the row, not the disk's path).
    #[test]
    fn removing_a_volume_on_a_missing_disk_names_the_disk_and_changes_nothing() {
        let f = fixture(1);
        f.pool.create_volume("v", None, Some(SIZE), None).unwrap();
        let away = f.dir.path().join("unmounted");
        fs::rename(&f.disks[0], &away).unwrap();
        let e = f.pool.remove_volume("v", false).unwrap_err().to_string();
        let made = f.disks[0].exists();
        let state = f.pool.store().volume("v").unwrap().state;
        if made {
            fs::remove_dir_all(&f.disks[0]).unwrap();
        }
        fs::rename(&away, &f.disks[0]).unwrap();
        assert!(
            e.contains("is on disk") && e.contains("mount the disk's filesystem at"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        assert_eq!(state, VolumeState::Ready);
        assert!(!made, "volume rm made the missing disk's path");
        f.pool.remove_volume("v", false).unwrap();
        assert!(f.pool.store().volumes().unwrap().is_empty());
    }

    /// A removal waiting for its missing disk ends when the disk is forgotten (`disk rm`).
    #[test]
    fn forgetting_a_missing_disk_ends_the_volume_removals_waiting_for_it() {
        let f = fixture(1);
        f.pool.create_volume("v", None, Some(SIZE), None).unwrap();
        let row = f.pool.store().volume("v").unwrap();
        assert!(f
            .pool
            .store()
            .set_volume_state(row.id, VolumeState::Ready, VolumeState::Removing)
            .unwrap());
        fs::rename(&f.disks[0], f.dir.path().join("dead")).unwrap();
        crate::core::recover::recover(&f.pool).unwrap();
        assert_eq!(f.pool.store().volumes().unwrap().len(), 1);
        f.pool.remove_disk("d1").unwrap();
        assert!(f.pool.store().volumes().unwrap().is_empty());
    }

    /// A removal moved the volume's directory out of `volumes/` and the store lost the row (a
    /// store rebuilt by `fsck --repair`): the next `recover` deletes the leftover, which fsck
    /// never reports.
    #[test]
    fn recovery_deletes_the_files_of_a_removal_no_row_accounts_for() {
        let f = fixture(1);
        f.pool.create_volume("v", None, Some(SIZE), None).unwrap();
        let row = f.pool.store().volume("v").unwrap();
        let layout = crate::format::layout::DiskLayout::new(&f.disks[0]);
        crash_point::at(CrashPoint::RemovalMoved, || panic!("dies"));
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            f.pool.remove_volume("v", false)
        }));
        assert!(run.is_err());
        assert_eq!(
            layout.removed_volume_uuids().unwrap(),
            std::slice::from_ref(&row.uuid)
        );
        assert!(f
            .pool
            .store()
            .delete_volume(row.id, VolumeState::Removing)
            .unwrap());
        assert!(crate::core::fsck::check(&f.pool, false).unwrap().is_empty());
        let done = crate::core::recover::recover(&f.pool).unwrap();
        assert!(done.iter().any(|d| d.contains(&row.uuid)), "{done:?}");
        assert_eq!(rows_and_dirs(&f), (vec![], vec![]));
    }

    /// Damaged versions of `stream`: bytes flipped and cuts at several points.
    fn damaged(stream: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for at in [20, stream.len() / 3, stream.len() / 2, stream.len() - 10] {
            let mut flipped = stream.to_vec();
            flipped[at] ^= 0x04;
            out.push((format!("a flip at byte {at}"), flipped));
        }
        for at in [
            9,
            stream.len() / 4,
            stream.len() / 2,
            stream.len() * 3 / 4,
            stream.len() - 1,
        ] {
            out.push((format!("a cut at byte {at}"), stream[..at].to_vec()));
        }
        let mut trailing = stream.to_vec();
        trailing.push(0);
        out.push(("a byte after the end".into(), trailing));
        out
    }

    #[test]
    fn a_damaged_whole_stream_leaves_no_volume() {
        let (f, sender) = setup();
        let h = history(&sender);
        let whole = sender.stream("p1", None, &h[..2]);
        for (what, stream) in damaged(&whole) {
            assert!(recv(&f, "v", &stream, PLAIN).is_err(), "{what} went unseen");
            assert_gone(&f, "v");
        }
        recv(&f, "v", &whole, PLAIN).unwrap();
    }

    #[test]
    fn each_fault_leaves_an_existing_volume_exactly_as_before() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let before = state(&f, "v");
        let inc = sender.stream("p2", Some(&h[1]), &h[2..]);
        let mut faults = damaged(&inc);
        // A wrong digest: the last snapshot's content differs from what its end says.
        let header = sender.header("p2", Some(&h[1]), &h[2..]);
        let mut records = sender.records(&header, Some(&h[1]), &h[2..], None);
        let last_end = records.len() - 2;
        if let Record::SnapshotEnd { digest, .. } = &mut records[last_end] {
            digest[0] ^= 1;
        }
        faults.push(("a wrong digest".into(), Sender::encode(&header, &records)));
        // A base snapshot the volume does not have.
        let mut other = h[1].clone();
        other.guid = "guid-elsewhere".into();
        faults.push((
            "a wrong base guid".into(),
            sender.stream("p3", Some(&other), &h[2..]),
        ));
        // Records that go backwards.
        let mut records = sender.records(&header, Some(&h[1]), &h[2..], None);
        let data: Vec<usize> = (0..records.len())
            .filter(|&i| matches!(records[i], Record::Data { .. }))
            .take(2)
            .collect();
        records.swap(data[0], data[1]);
        faults.push((
            "records out of order".into(),
            Sender::encode(&header, &records),
        ));
        // A snapshot name the volume has.
        let mut clash = h[2].clone();
        clash.name = "s1".into();
        faults.push((
            "a name clash".into(),
            sender.stream("p5", Some(&h[1]), &[clash]),
        ));
        // Another base image.
        let elsewhere = Sender {
            base: sender.base.clone(),
            image: None,
        };
        faults.push((
            "another base image".into(),
            elsewhere.stream("p6", Some(&h[1]), &h[2..]),
        ));
        for (what, stream) in faults {
            for options in [
                PLAIN,
                ReceiveOptions {
                    force: true,
                    resumable: false,
                },
            ] {
                assert!(
                    recv(&f, "v", &stream, options).is_err(),
                    "{what} went unseen"
                );
                assert_eq!(state(&f, "v"), before, "{what} changed the volume");
            }
        }
        // A whole stream onto an existing volume, without --force (with it, it replaces the
        // volume: `a_forced_whole_stream_replaces_an_existing_volume_in_one_step`).
        let whole = sender.stream("p4", None, &h[..1]);
        assert!(recv(&f, "v", &whole, PLAIN).is_err());
        assert_eq!(state(&f, "v"), before, "a whole stream changed the volume");
        recv(&f, "v", &inc, PLAIN).unwrap();
        assert_eq!(
            state(&f, "v"),
            expected(&[&h[0], &h[1], &h[2], &h[3]], &h[3])
        );
    }

    #[test]
    fn a_diverged_volume_is_refused_and_force_discards_exactly_what_it_names() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let inc = sender.stream("p2", Some(&h[1]), &h[2..3]);
        // Written since s2.
        let volume = open(&f, "v");
        volume.write_at(&[9u8; 4096], 0).unwrap();
        Arc::try_unwrap(volume).ok().unwrap().close().unwrap();
        let written = state(&f, "v");
        let e = recv(&f, "v", &inc, PLAIN).unwrap_err().to_string();
        assert!(e.contains("written since") && e.contains("--force"), "{e}");
        assert_eq!(state(&f, "v"), written);
        // And a snapshot taken since.
        let volume = open(&f, "v");
        volume.snapshot("local", "guid-local", 1).unwrap();
        volume.write_at(&[8u8; 4096], 8192).unwrap();
        Arc::try_unwrap(volume).ok().unwrap().close().unwrap();
        let diverged = state(&f, "v");
        let e = recv(&f, "v", &inc, PLAIN).unwrap_err().to_string();
        assert!(e.contains("local"), "{e}");
        assert_eq!(state(&f, "v"), diverged);
        let force = ReceiveOptions {
            force: true,
            resumable: false,
        };
        let got = recv(&f, "v", &inc, force).unwrap();
        assert_eq!(got.discarded_snapshots, vec!["local"]);
        assert!(got.discarded_writes);
        assert_eq!(state(&f, "v"), expected(&[&h[0], &h[1], &h[2]], &h[2]));
        // Nothing to discard: nothing named.
        let got = recv(&f, "v", &sender.stream("p3", Some(&h[2]), &h[3..]), force).unwrap();
        assert!(got.discarded_snapshots.is_empty() && !got.discarded_writes);
    }

    #[test]
    fn a_failed_force_leaves_the_volume_at_its_base_snapshot() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..2]), PLAIN).unwrap();
        let volume = open(&f, "v");
        volume.snapshot("local", "guid-local", 1).unwrap();
        Arc::try_unwrap(volume).ok().unwrap().close().unwrap();
        let inc = sender.stream("p2", Some(&h[1]), &h[2..]);
        let force = ReceiveOptions {
            force: true,
            resumable: false,
        };
        assert!(recv(&f, "v", &inc[..inc.len() / 2], force).is_err());
        // What the user asked to discard is gone; nothing of the stream is there.
        assert_eq!(state(&f, "v"), expected(&[&h[0], &h[1]], &h[1]));
    }

    fn token(f: &Fixture, name: &str) -> ResumeToken {
        f.pool.receive_resume_token(name).unwrap()
    }

    #[test]
    fn a_resumed_whole_stream_equals_an_uninterrupted_one() {
        let (f, sender) = setup();
        let h = history(&sender);
        let whole = sender.stream("p1", None, &h[..3]);
        let mut cuts = vec![whole.len() / 5, whole.len() / 2, whole.len() - 5];
        cuts.sort();
        for cut in cuts {
            let e = recv(&f, "v", &whole[..cut], RESUMABLE)
                .unwrap_err()
                .to_string();
            assert!(e.contains("--resume-token"), "{e}");
            // Invisible meanwhile, and kept by the recovery of dead creators.
            assert!(f.pool.store().volume("v").is_err());
            crate::core::recover::recover(&f.pool).unwrap();
            assert!(f.pool.volume_row_any_state("v").unwrap().is_some());
            let e = recv(&f, "v", &whole, PLAIN).unwrap_err().to_string();
            assert!(e.contains("--abort"), "{e}");
            let t = token(&f, "v");
            assert_eq!(t.package, "p1");
            assert_eq!(t.volume_uuid, "src-uuid");
            assert_eq!(t.to, "guid-s3");
            assert_eq!(
                t.snapshots,
                snapshots_digest(&sender.header("p1", None, &h[..3]).snapshots)
            );
            assert!(!t.with_image);
            // A resumed stream from another point is refused, and changes nothing.
            let wrong = ResumePoint {
                done: t.point.done,
                granule: t.point.granule + 1,
            };
            assert!(recv(&f, "v", &sender.resumed("p1", None, &h[..3], wrong), PLAIN).is_err());
            assert_eq!(token(&f, "v"), t);
            if cut == whole.len() - 5 {
                let got = recv(
                    &f,
                    "v",
                    &sender.resumed("p1", None, &h[..3], t.point),
                    PLAIN,
                )
                .unwrap();
                assert!(got.resumed && got.created);
                assert_eq!(got.snapshots, vec!["s1", "s2", "s3"]);
            } else {
                // Resumed, and cut again: it goes on from further along.
                let resumed = sender.resumed("p1", None, &h[..3], t.point);
                let _ = recv(&f, "v", &resumed[..resumed.len() / 2], PLAIN);
                let again = token(&f, "v");
                assert!((again.point.done, again.point.granule) >= (t.point.done, t.point.granule));
                let resumed = sender.resumed("p1", None, &h[..3], again.point);
                recv(&f, "v", &resumed, PLAIN).unwrap();
            }
            assert_eq!(state(&f, "v"), expected(&[&h[0], &h[1], &h[2]], &h[2]));
            f.pool.remove_volume("v", true).unwrap();
        }
    }

    #[test]
    fn abort_restores_an_existing_volume_and_commands_wait_for_it() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..1]), PLAIN).unwrap();
        let before = state(&f, "v");
        let inc = sender.stream("p2", Some(&h[0]), &h[1..]);
        assert!(recv(&f, "v", &inc[..inc.len() * 2 / 3], RESUMABLE).is_err());
        let row = f.pool.store().volume("v").unwrap();
        let files = f.pool.volume_files_of(&row).unwrap();
        assert!(has_partial_receive(&files));
        let request = crate::core::volume::requests::Request::Create {
            name: "x".into(),
            guid: "g".into(),
            created: 1,
        };
        let e = f
            .pool
            .snapshot_request("v", &request)
            .unwrap_err()
            .to_string();
        assert!(e.contains("recv --abort"), "{e}");
        assert!(f.pool.remove_volume("v", true).is_err());
        f.pool.receive_abort("v").unwrap();
        assert!(!has_partial_receive(&files));
        assert_eq!(state(&f, "v"), before);
        recv(&f, "v", &inc, PLAIN).unwrap();
    }

    #[test]
    fn a_resumed_incremental_equals_an_uninterrupted_one() {
        let mut points = Vec::new();
        for eighth in 1..8 {
            let (f, sender) = setup();
            let h = history(&sender);
            recv(&f, "v", &sender.stream("p1", None, &h[..1]), PLAIN).unwrap();
            let inc = sender.stream("p2", Some(&h[0]), &h[1..]);
            assert!(recv(&f, "v", &inc[..inc.len() * eighth / 8], RESUMABLE).is_err());
            let t = token(&f, "v");
            assert_eq!(t.from.as_deref(), Some("guid-s1"));
            points.push(t.point);
            let resumed = sender.resumed("p2", Some(&h[0]), &h[1..], t.point);
            let got = recv(&f, "v", &resumed, PLAIN).unwrap();
            assert_eq!(got.snapshots, vec!["s2", "s3", "s4"]);
            assert_eq!(
                state(&f, "v"),
                expected(&[&h[0], &h[1], &h[2], &h[3]], &h[3]),
                "resumed at {:?}",
                t.point
            );
        }
        // Some cut fell in the middle of a snapshot, after a record of progress there.
        assert!(points.iter().any(|p| p.granule > 0), "{points:?}");
    }

    #[test]
    fn a_crash_after_a_snapshot_before_its_progress_is_resumed_after_it() {
        let (f, sender) = setup();
        let h = history(&sender);
        let whole = sender.stream("p1", None, &h[..2]);
        assert!(recv(&f, "v", &whole[..whole.len() - 5], RESUMABLE).is_err());
        let row = f.pool.volume_row_any_state("v").unwrap().unwrap();
        let files = f.pool.volume_files_of(&row).unwrap();
        // receive.json as it was before the last snapshot's end.
        let mut partial = read_partial(&files).unwrap().unwrap();
        assert_eq!(partial.point.done, 2);
        partial.point = ResumePoint {
            done: 1,
            granule: 3,
        };
        write_partial(&files, &partial).unwrap();
        let t = token(&f, "v");
        assert_eq!(
            t.point,
            ResumePoint {
                done: 2,
                granule: 0
            }
        );
        recv(
            &f,
            "v",
            &sender.resumed("p1", None, &h[..2], t.point),
            PLAIN,
        )
        .unwrap();
        assert_eq!(state(&f, "v"), expected(&[&h[0], &h[1]], &h[1]));
    }

    #[test]
    fn abort_removes_a_new_volume_and_recovery_removes_a_dead_plain_one() {
        let (f, sender) = setup();
        let h = history(&sender);
        let whole = sender.stream("p1", None, &h[..2]);
        assert!(recv(&f, "v", &whole[..whole.len() / 2], RESUMABLE).is_err());
        f.pool.receive_abort("v").unwrap();
        assert_gone(&f, "v");
        assert!(f.pool.receive_abort("v").is_err());
        // A receive that died without --resumable leaves a `creating` volume with no owner.
        let base = f.pool.store().image_by_name("base").unwrap();
        let new = f.pool.start_volume("w", base.as_ref(), SIZE, None).unwrap();
        drop(new);
        crate::core::recover::recover(&f.pool).unwrap();
        assert_gone(&f, "w");
    }

    /// A receive that died: what a cut left, as a plain `recv` would have left it.
    fn as_if_died_plain(f: &Fixture, name: &str) {
        let row = f.pool.volume_row_any_state(name).unwrap().unwrap();
        let files = f.pool.volume_files_of(&row).unwrap();
        let mut partial = read_partial(&files).unwrap().unwrap();
        partial.resumable = false;
        write_partial(&files, &partial).unwrap();
    }

    #[test]
    fn recovery_undoes_a_plain_receive_that_died() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..1]), PLAIN).unwrap();
        let before = state(&f, "v");
        let inc = sender.stream("p2", Some(&h[0]), &h[1..]);
        assert!(recv(&f, "v", &inc[..inc.len() * 2 / 3], RESUMABLE).is_err());
        as_if_died_plain(&f, "v");
        assert!(f.pool.receive_resume_token("v").is_err());
        let done = crate::core::recover::recover(&f.pool).unwrap();
        assert!(done.iter().any(|d| d.contains("'v'")), "{done:?}");
        assert_eq!(state(&f, "v"), before);
        // A new volume: removed.
        let whole = sender.stream("p3", None, &h[..2]);
        assert!(recv(&f, "w", &whole[..whole.len() / 2], RESUMABLE).is_err());
        as_if_died_plain(&f, "w");
        crate::core::recover::recover(&f.pool).unwrap();
        assert!(f.pool.volume_row_any_state("w").unwrap().is_none());
        assert_eq!(state(&f, "v"), before);
    }

    #[test]
    fn a_receive_that_died_after_it_committed_is_finished_not_undone() {
        let (f, sender) = setup();
        let h = history(&sender);
        recv(&f, "v", &sender.stream("p1", None, &h[..1]), PLAIN).unwrap();
        recv(&f, "v", &sender.stream("p2", Some(&h[0]), &h[1..3]), PLAIN).unwrap();
        let after = state(&f, "v");
        // `receive.json` as a receive leaves it when it dies between its commit (the rename,
        // or a new volume made ready) and the removal of the file.
        let left = |name: &str, header: Header, new_volume: bool, resumable: bool| {
            let row = f.pool.store().volume(name).unwrap();
            let files = f.pool.volume_files_of(&row).unwrap();
            let partial = PartialReceive {
                resumable,
                header,
                new_volume,
                point: ResumePoint {
                    done: 2,
                    granule: 0,
                },
                sum: hex::encode(ContentHash::default().to_bytes()),
                commit_started: true,
                replaces: None,
            };
            write_partial(&files, &partial).unwrap();
            files
        };
        for resumable in [false, true] {
            let files = left(
                "v",
                sender.header("p2", Some(&h[0]), &h[1..3]),
                false,
                resumable,
            );
            let done = crate::core::recover::recover(&f.pool).unwrap();
            assert!(done.iter().any(|d| d.contains("had completed")), "{done:?}");
            assert!(!has_partial_receive(&files));
            assert_eq!(state(&f, "v"), after);
        }
        // A package of a temporary snapshot alone: committed once its staged snapshot went.
        let mut tmp = h[3].clone();
        tmp.name = "copy-tmp-1".into();
        tmp.temporary = true;
        let got = recv(
            &f,
            "v",
            &sender.stream("p4", Some(&h[2]), &[tmp.clone()]),
            PLAIN,
        )
        .unwrap();
        assert!(got.snapshots.is_empty());
        let current = state(&f, "v");
        assert_eq!(current.live, h[3].content);
        assert_eq!(current.snapshots, after.snapshots);
        let files = left(
            "v",
            sender.header("p4", Some(&h[2]), &[tmp.clone()]),
            false,
            false,
        );
        let done = crate::core::recover::recover(&f.pool).unwrap();
        assert!(done.iter().any(|d| d.contains("had completed")), "{done:?}");
        assert!(!has_partial_receive(&files));
        assert_eq!(state(&f, "v"), current);

        recv(&f, "w", &sender.stream("p3", None, &h[..2]), PLAIN).unwrap();
        let whole = state(&f, "w");
        let files = left("w", sender.header("p3", None, &h[..2]), true, false);
        crate::core::recover::recover(&f.pool).unwrap();
        assert!(!has_partial_receive(&files));
        assert_eq!(state(&f, "w"), whole);
    }

    #[test]
    fn the_image_file_of_a_receive_that_died_goes_and_a_live_ones_stays() {
        let f = fixture(1);
        let state = f.pool.state_dir().to_path_buf();
        let (dead, live) = (
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        );
        let _owner = OwnerLock::acquire(&state, &image_token(&live)).unwrap();
        for id in [&dead, &live] {
            let path = received_image_path(&state, id);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, b"part of an image").unwrap();
        }
        let done = crate::core::recover::recover(&f.pool).unwrap();
        assert!(done.iter().any(|d| d.contains(&dead)), "{done:?}");
        assert!(!received_image_path(&state, &dead).exists());
        assert!(received_image_path(&state, &live).exists());
    }

    /// The records of `sender`'s base image, as `send --with-image` sends them.
    fn image_records(sender: &Sender) -> Vec<Record> {
        let mut records = vec![];
        for (i, chunk) in sender.base.chunks(1 << 16).enumerate() {
            if chunk.iter().any(|b| *b != 0) {
                records.push(Record::ImageData {
                    offset: (i as u64) << 16,
                    data: chunk.to_vec(),
                });
            }
        }
        let mut sha512 = [0u8; 64];
        sha512.copy_from_slice(&hex::decode(&sender.image.as_ref().unwrap().sha512).unwrap());
        records.push(Record::ImageEnd { sha512 });
        records
    }

    #[test]
    fn a_stream_refused_by_its_target_imports_no_image() {
        let (_sending_side, sender) = setup();
        let h = history(&sender);
        let other = fixture(1);
        // The receiving pool's 'v' is over no image: the stream's volume is over another.
        let over_zeros = Sender {
            base: Vec::new(),
            image: None,
        };
        let whole = over_zeros.stream("p0", None, &h[..1]);
        other
            .pool
            .receive("v", &mut &whole[..], PLAIN, &mut |_| {})
            .unwrap();
        let mut header = sender.header("p1", Some(&h[0]), &h[1..2]);
        header.with_image = true;
        let mut records = image_records(&sender);
        records.extend(sender.records(&header, Some(&h[0]), &h[1..2], None));
        let stream = Sender::encode(&header, &records);
        for target in ["v", "missing"] {
            let e = other
                .pool
                .receive(target, &mut &stream[..], PLAIN, &mut |_| {})
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("base image") || e.contains("does not exist"),
                "{e}"
            );
            assert!(
                other.pool.store().images().unwrap().is_empty(),
                "{target}: the image was imported although the stream goes nowhere"
            );
        }
    }

    #[test]
    fn a_missing_base_image_is_named_or_imported_from_the_stream() {
        let (_sending_side, sender) = setup();
        let h = history(&sender);
        let other = fixture(1);
        let whole = sender.stream("p1", None, &h[..1]);
        let e = other
            .pool
            .receive("v", &mut &whole[..], PLAIN, &mut |_| {})
            .unwrap_err()
            .to_string();
        let sha = &sender.image.as_ref().unwrap().sha512;
        assert!(
            e.contains("--with-image") && e.contains(sha.as_str()),
            "{e}"
        );
        assert!(other.pool.volume_row_any_state("v").unwrap().is_none());
        // With the image: imported under its name, or another when that is taken.
        other.image("base", b"another image", 1);
        let mut header = sender.header("p1", None, &h[..1]);
        header.with_image = true;
        let mut records = image_records(&sender);
        records.extend(sender.records(&header, None, &h[..1], None));
        let stream = Sender::encode(&header, &records);
        let got = other
            .pool
            .receive("v", &mut &stream[..], PLAIN, &mut |_| {})
            .unwrap();
        let imported = format!("base-{}", &sha[..8]);
        assert_eq!(got.imported_image.as_deref(), Some(imported.as_str()));
        assert_eq!(state(&other, "v"), expected(&[&h[0]], &h[0]));
        // The pool has it now: a second stream with the image reads past it.
        let got = other
            .pool
            .receive("w", &mut &stream[..], PLAIN, &mut |_| {})
            .unwrap();
        assert_eq!(got.imported_image, None);
        assert_eq!(state(&other, "w"), expected(&[&h[0]], &h[0]));
        // An image whose bytes do not match its SHA-512 is refused, and nothing is kept.
        let mut bad = records.clone();
        if let Record::ImageData { data, .. } = &mut bad[0] {
            data[0] ^= 1;
        }
        let stream = Sender::encode(&header, &bad);
        let third = fixture(1);
        assert!(third
            .pool
            .receive("v", &mut &stream[..], PLAIN, &mut |_| {})
            .is_err());
        assert!(third.pool.store().images().unwrap().is_empty());
        assert!(third.pool.volume_row_any_state("v").unwrap().is_none());
    }
}
