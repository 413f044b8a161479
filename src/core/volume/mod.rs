//! Thin writable volumes over pool images, with snapshots.
//!
//! A volume is a block map (`index`) over a data file (`data`): each granule of the volume is
//! either untouched (it reads from the base image, or zeros past it) or has versions, each of
//! which says, block by block, whether the block's data is in the version's slot of the data
//! file, reads as zeros (discarded), or still reads from the base image.
//!
//! Writes go in place while no snapshot sees the granule's live version; the first write after
//! a snapshot that sees it copies the version's other written blocks into a new slot (at most
//! one granule, 60 KiB) and starts a new version. A snapshot is one index row. Deleting
//! snapshots removes their rows in one transaction and queues "windows" of versions that no
//! snapshot sees any more; `reclaim` frees them later, by punching their slots: no data is
//! copied. A snapshot is read through a `SnapshotReader`, which keeps it from being deleted
//! while it exists: what a snapshot reads is never reclaimed under it.
//!
//! Crash discipline: the data file is synced before the index commits, so a committed row never
//! points at data that is not on the disk; a slot freed in the open transaction is reused only
//! after the commit; freed slots are punched after the commit that freed them (and, after a
//! crash between the two, when the volume is opened). Writes in place that a crash cut off from
//! their index change leave blocks that no row says are written: a volume that was not closed
//! cleanly has its slots' unwritten blocks and its free slots punched when it is opened.

mod data;
mod export;
mod index;
#[cfg(test)]
mod model_tests;
pub mod requests;
pub mod send;
pub mod sums;

pub use export::{BaseSource, VolumeSource};

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::core::crash_point::{self, CrashPoint};
use crate::format::volume::{VolumeFiles, BLOCK, BLOCKS_PER_GRANULE, GRANULE};

use data::DataFile;
pub use index::Snapshot;
use index::{Index, Version};

/// Where a volume's unwritten blocks read from: the base image (the mount's read path, or a
/// test's bytes).
pub trait Base: Send + Sync {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; the range lies within `size()`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// As `lseek(SEEK_DATA)` (`hole` false) or `lseek(SEEK_HOLE)` from `offset` within the
    /// image: the next data, or none before its end; the next hole, its end at the latest.
    /// Without a better answer, everything is data.
    fn seek(&self, offset: u64, hole: bool) -> io::Result<Option<u64>> {
        Ok(match (offset < self.size(), hole) {
            (false, false) => None,
            (false, true) => Some(offset),
            (true, false) => Some(offset),
            (true, true) => Some(self.size()),
        })
    }
}

/// No base image: unwritten blocks read as zeros.
pub struct NoBase;

impl Base for NoBase {
    fn size(&self) -> u64 {
        0
    }

    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
}

/// The right to write a volume: an exclusive `flock` on its `writer.lock`, held by the mount
/// daemon while the volume is open through it, or by a command that changes the volume. The
/// kernel drops it when its holder dies.
pub struct WriterLock {
    _file: std::fs::File,
}

impl WriterLock {
    /// The lock, or `None` while another process holds it.
    pub fn try_acquire(files: &VolumeFiles) -> io::Result<Option<WriterLock>> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(files.writer_lock())?;
        match file.try_lock() {
            Ok(()) => Ok(Some(WriterLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

/// A volume as its index describes it, read without opening it for writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub size: u64,
    pub snapshots: usize,
}

/// Reads a volume's size and snapshot count; changes nothing (a mount daemon may be writing it:
/// SQLite's WAL lets a reader look meanwhile).
pub fn summary(files: &VolumeFiles) -> io::Result<Summary> {
    let index = Index::open(&files.index(), None).map_err(index_error)?;
    Ok(Summary {
        size: index.size().map_err(index_error)?,
        snapshots: index.snapshot_count().map_err(index_error)?,
    })
}

/// Bytes deleted snapshots alone held that the reclaim has yet to give back, read without
/// opening the volume: a walk of the versions still to reclaim, for listings, not for commands.
pub fn reclaim_pending_bytes(files: &VolumeFiles) -> io::Result<u64> {
    let index = Index::open(&files.index(), None).map_err(index_error)?;
    Ok(index.reclaim_pending().map_err(index_error)?.1 * BLOCK)
}

/// A volume's snapshots with the bytes only each holds, read without opening the volume (its
/// writer, if any, keeps writing meanwhile: snapshots are always committed).
/// A volume's snapshot by name, read without opening it.
pub fn snapshot_named(files: &VolumeFiles, name: &str) -> io::Result<Option<Snapshot>> {
    let index = Index::open(&files.index(), None).map_err(index_error)?;
    index.snapshot(name).map_err(index_error)
}

/// The names of a volume's snapshots that start with `prefix`, read without opening it.
pub fn snapshots_named(files: &VolumeFiles, prefix: &str) -> io::Result<Vec<String>> {
    let index = Index::open(&files.index(), None).map_err(index_error)?;
    index.snapshots_named(prefix).map_err(index_error)
}

/// The names of a volume's snapshots, oldest first, read without opening it.
pub fn snapshot_names(files: &VolumeFiles) -> io::Result<Vec<String>> {
    let index = Index::open(&files.index(), None).map_err(index_error)?;
    let all = index.snapshots().map_err(index_error)?;
    Ok(all.into_iter().map(|s| s.name).collect())
}

pub fn list_snapshots(files: &VolumeFiles) -> io::Result<(u64, Vec<(Snapshot, u64)>)> {
    let index = Index::open(&files.index(), None).map_err(index_error)?;
    Ok((index.size().map_err(index_error)?, listing(&index)?))
}

/// The snapshots in creation order, each with the bytes only it holds.
fn listing(index: &Index) -> io::Result<Vec<(Snapshot, u64)>> {
    let all = index.snapshots().map_err(index_error)?;
    let epochs: Vec<u64> = all.iter().map(|s| s.epoch).collect();
    let unique = index.unique_blocks(&epochs).map_err(index_error)?;
    Ok(all
        .into_iter()
        .zip(unique)
        .map(|(s, blocks)| (s, blocks * BLOCK))
        .collect())
}

/// Reclaims of this many versions per transaction: small enough not to hold writers up.
const RECLAIM_BATCH: usize = 1024;

fn index_error(e: rusqlite::Error) -> io::Error {
    // A full disk under the index is the writer's ENOSPC, as under the data.
    if let rusqlite::Error::SqliteFailure(f, _) = &e {
        if f.code == rusqlite::ErrorCode::DiskFull {
            return io::Error::from_raw_os_error(libc::ENOSPC);
        }
    }
    io::Error::other(format!("volume index: {e}"))
}

/// The blocks `first..first + count` of a granule, as a mask.
fn mask(first: u32, count: u32) -> u16 {
    debug_assert!(first + count <= BLOCKS_PER_GRANULE);
    if count == 0 {
        return 0;
    }
    (((1u32 << count) - 1) << first) as u16
}

fn has(mask: u16, block: u32) -> bool {
    mask & (1 << block) != 0
}

/// What one block of a version reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Slot(u64),
    Zeros,
    Base,
}

fn source(version: Option<&Version>, block: u32) -> Source {
    match version {
        Some(v) if has(v.written, block) => {
            Source::Slot(v.slot.expect("written blocks have a slot"))
        }
        Some(v) if has(v.zeroed, block) => Source::Zeros,
        _ => Source::Base,
    }
}

struct State {
    index: Index,
    /// The epoch new versions are born in.
    live_epoch: u64,
    /// The newest snapshot's epoch: versions born at or before it are shared.
    newest_snapshot: Option<u64>,
    size: u64,
    /// Slots freed in the open transaction: reusable only once it commits.
    freed: Vec<u64>,
    /// Why the volume serves nothing more until it is opened again: an index change or a data
    /// sync failed, so what is in memory may not match the index or the disk (SQLite may have
    /// rolled the transaction back; a failed writeback is reported once). Opening it again
    /// recovers from the disk as after a crash.
    broken: Option<String>,
    /// Closed (`shutdown`): a reclaim thread still holding it must stop writing.
    closed: bool,
    /// The snapshots being read (`SnapshotReader`s), by epoch: their names and how many
    /// readers each has. They cannot be deleted meanwhile, so the reclaim never frees a block
    /// they read.
    readers: BTreeMap<u64, (String, usize)>,
}

impl State {
    /// Refuses work on a volume that is broken or closed.
    fn usable(&self) -> io::Result<()> {
        match (&self.broken, self.closed) {
            (Some(why), _) => Err(io::Error::other(format!(
                "the volume is out of service since {why}: it serves again once its files are closed and opened again"
            ))),
            (None, true) => Err(io::Error::other("the volume is closed")),
            (None, false) => Ok(()),
        }
    }

    /// An index failure in the middle of a change: the transaction is abandoned and the volume
    /// serves no more until it is opened again.
    fn break_on(&mut self, e: rusqlite::Error) -> io::Error {
        let error = index_error(e);
        self.fail(format!("an index change failed ({error})"));
        error
    }

    fn fail(&mut self, why: String) {
        tracing::error!("volume out of service: {why}");
        self.index.abandon();
        self.freed.clear();
        self.broken.get_or_insert(why);
    }

    fn shared(&self, v: &Version) -> bool {
        self.newest_snapshot.is_some_and(|n| v.birth <= n)
    }

    /// Refuses a change that would delete any of `epochs` while it is being read.
    fn refuse_if_read(&self, epochs: &[u64]) -> io::Result<()> {
        let read: Vec<String> = epochs
            .iter()
            .filter_map(|e| self.readers.get(e))
            .map(|(name, _)| format!("'{name}'"))
            .collect();
        if read.is_empty() {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!(
                "snapshot {} open (a file of the mount, or being read): close it first",
                if read.len() == 1 {
                    format!("{} is", read[0])
                } else {
                    format!("{} are", read.join(", "))
                }
            ),
        ))
    }
}

pub struct Volume {
    data: DataFile,
    base: Box<dyn Base>,
    state: Mutex<State>,
    /// Held shared by reads between their lookup and their data read, exclusively (under the
    /// state lock) while freed slots become reusable.
    slot_reuse: RwLock<()>,
    /// Stopped at `shutdown` (its connection let go) or when the volume is dropped.
    checkpointer: Mutex<Option<index::Checkpointer>>,
}

impl Volume {
    /// Creates a volume's index and data file in `files.dir()`, which exists and is empty.
    pub fn create(files: &VolumeFiles, size: u64, base: Box<dyn Base>) -> io::Result<Volume> {
        let data = DataFile::open(&files.data(), true)?;
        data.sync()?;
        Index::open(&files.index(), Some(size)).map_err(index_error)?;
        std::fs::File::open(files.dir())?.sync_all()?;
        Volume::open(files, base)
    }

    pub fn open(files: &VolumeFiles, base: Box<dyn Base>) -> io::Result<Volume> {
        let mut index = Index::open(&files.index(), None).map_err(index_error)?;
        let data = DataFile::open(&files.data(), false)?;
        if index.closed_cleanly().map_err(index_error)? {
            // A crash between the commit that freed slots and their punch left them taken.
            let unpunched = index.unpunched_slots().map_err(index_error)?;
            punch_free(&data, &mut index, &unpunched)?;
        } else {
            give_back_unreferenced_blocks(&data, &mut index)?;
        }
        index.set_closed_cleanly(false).map_err(index_error)?;
        index.commit().map_err(index_error)?;
        let state = State {
            live_epoch: index.live_epoch().map_err(index_error)?,
            newest_snapshot: index.newest_snapshot_epoch().map_err(index_error)?,
            size: index.size().map_err(index_error)?,
            index,
            freed: Vec::new(),
            broken: None,
            closed: false,
            readers: BTreeMap::new(),
        };
        let checkpointer = index::Checkpointer::start(&files.index())?;
        Ok(Volume {
            data,
            base,
            state: Mutex::new(state),
            slot_reuse: RwLock::new(()),
            checkpointer: Mutex::new(Some(checkpointer)),
        })
    }

    pub fn size(&self) -> u64 {
        self.state.lock().size
    }

    /// Flushes and records a clean close: the next open skips the space scan a crash needs.
    pub fn close(self) -> io::Result<()> {
        self.shutdown()
    }

    /// `close` for a volume shared with others, who must not write it any more.
    pub fn shutdown(&self) -> io::Result<()> {
        self.checkpointer.lock().take();
        let mut state = self.state.lock();
        if state.closed {
            return Ok(());
        }
        let committed = self.commit_locked(&mut state);
        state.closed = true;
        // A broken volume is not marked clean: its next open recovers as after a crash.
        committed?;
        state
            .index
            .set_closed_cleanly(true)
            .map_err(|e| state.break_on(e))?;
        state.index.commit().map_err(|e| state.break_on(e))
    }

    // --- reads -------------------------------------------------------------------------

    /// Reads the live volume from `offset`; returns the bytes read (short at the end).
    /// Takes the volume out of service (its disk failed): every read and write from now on is
    /// an error, even of blocks that its base image or a cache could still answer.
    pub fn take_out_of_service(&self, why: String) {
        let mut state = self.state.lock();
        if state.broken.is_none() && !state.closed {
            state.fail(why);
        }
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = {
            let state = self.state.lock();
            state.usable()?;
            state.size
        };
        self.read_versions(None, size, buf, offset)
    }

    /// Reads granule by granule: each version is looked up under the state lock, and its data
    /// read after the lock is dropped (so that readers wait on the disk side by side), under a
    /// shared hold of `slot_reuse`: no slot freed meanwhile is handed out again before the read
    /// is done, so it never returns another granule's bytes.
    fn read_versions(
        &self,
        epoch: Option<u64>,
        size: u64,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<usize> {
        if offset >= size {
            return Ok(0);
        }
        let len = buf.len().min((size - offset) as usize);
        let end = offset + len as u64;
        // The version, and a shared hold of `slot_reuse` taken before the state lock is let
        // go: no change can free and reuse its slot before the read is done.
        let lookup = |granule: u64| {
            let state = self.state.lock();
            let version = match epoch {
                None => state.index.live(granule),
                Some(e) => state.index.at(granule, e),
            }
            .map_err(index_error)?;
            Ok::<_, io::Error>((version, self.slot_reuse.read()))
        };
        let mut pos = offset;
        while pos < end {
            let granule = pos / GRANULE;
            let mut run_end = ((granule + 1) * GRANULE).min(end);
            let (Some(version), _no_reuse) = lookup(granule)? else {
                // Granules the volume never wrote are read from the base in one request, as
                // the sequential read they are (the image's read path reads ahead for those).
                while run_end < end && lookup(run_end / GRANULE)?.0.is_none() {
                    run_end = (run_end + GRANULE).min(end);
                }
                let at = (pos - offset) as usize;
                self.read_base(&mut buf[at..(run_end - offset) as usize], pos)?;
                pos = run_end;
                continue;
            };
            #[cfg(test)]
            model_tests::pause_between_lookup_and_read();
            let at = (pos - offset) as usize;
            self.read_granule(
                Some(&version),
                pos,
                &mut buf[at..(run_end - offset) as usize],
            )?;
            pos = run_end;
        }
        Ok(len)
    }

    /// Reads `buf.len()` bytes at `pos`, all within one granule whose version is `version`.
    fn read_granule(&self, version: Option<&Version>, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        let granule_start = pos - pos % GRANULE;
        let mut done = 0;
        let mut scratch = [0u8; BLOCK as usize];
        while done < buf.len() {
            let at = pos + done as u64;
            let block = ((at - granule_start) / BLOCK) as u32;
            let in_block = (at % BLOCK) as usize;
            // A run of blocks with the same source, read at once.
            let src = source(version, block);
            let mut last = block;
            while last + 1 < BLOCKS_PER_GRANULE
                && granule_start + u64::from(last + 1) * BLOCK < pos + buf.len() as u64
                && source(version, last + 1) == src
            {
                last += 1;
            }
            let run_end = (granule_start + u64::from(last + 1) * BLOCK).min(pos + buf.len() as u64);
            let n = (run_end - at) as usize;
            let out = &mut buf[done..done + n];
            match src {
                Source::Zeros => out.fill(0),
                Source::Base => self.read_base(out, at)?,
                Source::Slot(slot) if in_block == 0 && n.is_multiple_of(BLOCK as usize) => {
                    self.data.read(slot, block, out)?
                }
                Source::Slot(slot) => {
                    // Not block-aligned: block by block through a scratch block.
                    let mut copied = 0;
                    let mut b = block;
                    while copied < n {
                        self.data.read(slot, b, &mut scratch)?;
                        let from = if copied == 0 { in_block } else { 0 };
                        let m = (BLOCK as usize - from).min(n - copied);
                        out[copied..copied + m].copy_from_slice(&scratch[from..from + m]);
                        copied += m;
                        b += 1;
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    fn read_base(&self, out: &mut [u8], at: u64) -> io::Result<()> {
        let base_size = self.base.size();
        let from_base = if at < base_size {
            ((base_size - at) as usize).min(out.len())
        } else {
            0
        };
        if from_base > 0 {
            self.base.read_at(&mut out[..from_base], at)?;
        }
        out[from_base..].fill(0);
        Ok(())
    }

    /// `lseek(SEEK_DATA)` (`hole` false) or `lseek(SEEK_HOLE)` from `offset`: a block is data
    /// where the volume wrote it, or where it reads from a base image that has data there; a
    /// hole where it was discarded, or reads a hole of its image or the zeros past its end.
    /// `None`: no data at or after `offset` (ENXIO), or `offset` at or past the end.
    pub fn seek(&self, offset: u64, hole: bool) -> io::Result<Option<u64>> {
        self.seek_versions(None, self.size(), offset, hole)
    }

    /// `seek` in the live volume (`epoch` none) or in the snapshot at `epoch`, of `size` bytes.
    /// Each granule is looked up under the state lock, taken granule by granule.
    fn seek_versions(
        &self,
        epoch: Option<u64>,
        size: u64,
        offset: u64,
        hole: bool,
    ) -> io::Result<Option<u64>> {
        if offset >= size {
            return Ok(None);
        }
        let mut pos = offset;
        while pos < size {
            let granule = pos / GRANULE;
            let (version, next_versioned) = {
                let state = self.state.lock();
                let version = match epoch {
                    None => state.index.live(granule),
                    Some(e) => state.index.at(granule, e),
                }
                .map_err(index_error)?;
                // A granule with versions, none of them seen at `epoch`, reads its image as
                // an untouched one does: the next lap finds that out.
                let next = state
                    .index
                    .next_versioned(granule + 1)
                    .map_err(index_error)?;
                (version, next)
            };
            let Some(version) = version else {
                // Up to the next granule with a version, the volume reads its image.
                let limit = next_versioned.map_or(size, |g| (g * GRANULE).min(size));
                if let Some(found) = self.base_seek(pos, hole, limit)? {
                    return Ok(Some(found));
                }
                pos = limit;
                continue;
            };
            let granule_end = ((granule + 1) * GRANULE).min(size);
            while pos < granule_end {
                let block = ((pos % GRANULE) / BLOCK) as u32;
                let block_end = (granule * GRANULE + u64::from(block + 1) * BLOCK).min(size);
                let found = match source(Some(&version), block) {
                    Source::Slot(_) => (!hole).then_some(pos),
                    Source::Zeros => hole.then_some(pos),
                    Source::Base => self.base_seek(pos, hole, block_end)?,
                };
                if found.is_some() {
                    return Ok(found);
                }
                pos = block_end;
            }
        }
        // The end of the volume is a hole.
        Ok(hole.then_some(size))
    }

    /// What the base image says about `[pos, limit)`: its next data (or hole) there, if any;
    /// past the image's end everything reads zeros, a hole.
    fn base_seek(&self, pos: u64, hole: bool, limit: u64) -> io::Result<Option<u64>> {
        let base_size = self.base.size();
        let found = if pos >= base_size {
            hole.then_some(pos)
        } else {
            match self.base.seek(pos, hole)? {
                // The image's end starts the zeros after it.
                Some(at) if hole => Some(at.min(base_size)),
                other => other,
            }
        };
        Ok(found.filter(|at| *at < limit).map(|at| at.max(pos)))
    }

    // --- writes ------------------------------------------------------------------------

    /// Writes `data` at `offset`; the range must lie within the volume (`EFBIG` otherwise).
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        state.usable()?;
        check_range(&state, offset, data.len() as u64)?;
        let mut done = 0;
        while done < data.len() {
            let pos = offset + done as u64;
            let granule = pos / GRANULE;
            let in_granule = pos % GRANULE;
            let n = ((GRANULE - in_granule) as usize).min(data.len() - done);
            self.write_granule(&mut state, granule, in_granule, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes within one granule; partial blocks are completed with what they read now.
    fn write_granule(
        &self,
        state: &mut State,
        granule: u64,
        in_granule: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let first = (in_granule / BLOCK) as u32;
        let end = in_granule + data.len() as u64;
        let last = ((end - 1) / BLOCK) as u32;
        let count = last - first + 1;
        let head = (in_granule % BLOCK) as usize;
        let aligned = head == 0 && end.is_multiple_of(BLOCK);
        let current = state.index.live(granule).map_err(|e| state.break_on(e))?;
        let blocks: std::borrow::Cow<[u8]> = if aligned {
            data.into()
        } else {
            // Only the partial blocks at the edges keep some of what they hold now.
            let block = BLOCK as usize;
            let mut whole = vec![0u8; count as usize * block];
            let start = granule * GRANULE + u64::from(first) * BLOCK;
            if head != 0 {
                self.read_granule(current.as_ref(), start, &mut whole[..block])?;
            }
            if !end.is_multiple_of(BLOCK) && (count > 1 || head == 0) {
                let last = (count as usize - 1) * block;
                let at = start + last as u64;
                self.read_granule(current.as_ref(), at, &mut whole[last..])?;
            }
            whole[head..head + data.len()].copy_from_slice(data);
            whole.into()
        };
        self.put_blocks(state, granule, current, first, count, Some(&blocks))
    }

    /// Discards `len` bytes at `offset`: they read as zeros, and whole blocks give their space
    /// back (what PUNCH_HOLE and ZERO_RANGE ask for).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        state.usable()?;
        check_range(&state, offset, len)?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let granule = pos / GRANULE;
            let granule_end = ((granule + 1) * GRANULE).min(end);
            let first_whole = pos.div_ceil(BLOCK) * BLOCK;
            let last_whole = granule_end / BLOCK * BLOCK;
            if first_whole >= last_whole {
                // No whole block: zeros are written.
                let zeros = vec![0u8; (granule_end - pos) as usize];
                self.write_granule(&mut state, granule, pos % GRANULE, &zeros)?;
            } else {
                if pos < first_whole {
                    let zeros = vec![0u8; (first_whole - pos) as usize];
                    self.write_granule(&mut state, granule, pos % GRANULE, &zeros)?;
                }
                let current = state.index.live(granule).map_err(|e| state.break_on(e))?;
                let first = ((first_whole % GRANULE) / BLOCK) as u32;
                let count = ((last_whole - first_whole) / BLOCK) as u32;
                self.put_blocks(&mut state, granule, current, first, count, None)?;
                if last_whole < granule_end {
                    let zeros = vec![0u8; (granule_end - last_whole) as usize];
                    self.write_granule(&mut state, granule, last_whole % GRANULE, &zeros)?;
                }
            }
            pos = granule_end;
        }
        Ok(())
    }

    /// Sets blocks `first..first + count` of a granule to `data` (whole blocks), or to zeros
    /// (discarded) when `data` is `None`.
    fn put_blocks(
        &self,
        state: &mut State,
        granule: u64,
        current: Option<Version>,
        first: u32,
        count: u32,
        data: Option<&[u8]>,
    ) -> io::Result<()> {
        let blocks = mask(first, count);
        let live = state.live_epoch;
        match current {
            Some(mut v) if !state.shared(&v) => {
                // Nobody else sees this version: in place.
                match data {
                    Some(data) => {
                        let slot = match v.slot {
                            Some(slot) => slot,
                            None => {
                                let slot = self.new_slot(state)?;
                                self.write_new_slot(state, slot, || {
                                    self.data.write(slot, first, data)
                                })?;
                                slot
                            }
                        };
                        if v.slot.is_some() {
                            self.data.write(slot, first, data)?;
                        }
                        v.slot = Some(slot);
                        v.written |= blocks;
                        v.zeroed &= !blocks;
                    }
                    None => {
                        if let Some(slot) = v.slot {
                            if v.written & blocks != 0 {
                                self.data.punch(slot, first, count)?;
                            }
                        }
                        v.written &= !blocks;
                        v.zeroed |= blocks;
                        if v.written == 0 {
                            if let Some(slot) = v.slot.take() {
                                state.freed.push(slot);
                            }
                        }
                    }
                }
                state.index.put(&v).map_err(|e| state.break_on(e))
            }
            Some(old) => {
                // A snapshot sees the live version: a new version, with the old one's other
                // written blocks copied into a new slot.
                let keep = old.written & !blocks;
                let written = match data {
                    Some(_) => keep | blocks,
                    None => keep,
                };
                let slot = if written != 0 {
                    Some(self.new_slot(state)?)
                } else {
                    None
                };
                if let Some(to) = slot {
                    self.write_new_slot(state, to, || {
                        if let Some(from) = old.slot {
                            self.copy_blocks(from, to, keep)?;
                        }
                        match data {
                            Some(data) => self.data.write(to, first, data),
                            None => Ok(()),
                        }
                    })?;
                }
                let zeroed = match data {
                    Some(_) => old.zeroed & !blocks,
                    None => old.zeroed | blocks,
                };
                state
                    .index
                    .put(&Version {
                        death: Some(live),
                        ..old
                    })
                    .map_err(|e| state.break_on(e))?;
                new_live_version(state, granule, slot, written, zeroed)
            }
            None => {
                let (slot, written, zeroed) = match data {
                    Some(data) => {
                        let slot = self.new_slot(state)?;
                        self.write_new_slot(state, slot, || self.data.write(slot, first, data))?;
                        (Some(slot), blocks, 0)
                    }
                    None => (None, 0, blocks),
                };
                new_live_version(state, granule, slot, written, zeroed)
            }
        }
    }

    /// A slot for a new version. It holds no data: free slots are punched when freed, slots
    /// past the high-water mark were never written, and after a crash `open` punched the free
    /// slots and cut the file at the mark before anything was allocated.
    fn new_slot(&self, state: &mut State) -> io::Result<u64> {
        state.index.allocate_slot().map_err(|e| state.break_on(e))
    }

    /// Fills a slot just allocated; if that fails (ENOSPC, EIO), the slot goes back to the free
    /// ones at the next commit, punched, rather than stay taken with no row pointing at it.
    fn write_new_slot(
        &self,
        state: &mut State,
        slot: u64,
        fill: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        fill().inspect_err(|_| state.freed.push(slot))
    }

    fn copy_blocks(&self, from: u64, to: u64, blocks: u16) -> io::Result<()> {
        let mut buf = vec![0u8; BLOCK as usize];
        for block in 0..BLOCKS_PER_GRANULE {
            if has(blocks, block) {
                self.data.read(from, block, &mut buf)?;
                self.data.write(to, block, &buf)?;
            }
        }
        Ok(())
    }

    /// Starts writing the data written so far to the disk, without waiting and without
    /// committing anything (`DataFile::start_writeback`).
    pub fn start_writeback(&self) -> io::Result<()> {
        self.data.start_writeback()
    }

    /// Makes every write so far durable: the data file first, then the index that points at it.
    pub fn flush(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        self.commit_locked(&mut state)
    }

    fn commit_locked(&self, state: &mut State) -> io::Result<()> {
        state.usable()?;
        if !state.index.has_uncommitted() {
            return Ok(());
        }
        self.sync_data_locked(state)?;
        self.commit_synced(state)
    }

    /// Makes the data file durable, so that the rows of the open transaction may commit.
    fn sync_data_locked(&self, state: &mut State) -> io::Result<()> {
        self.data.sync().inspect_err(|e| {
            // The kernel reports a failed writeback once: a later sync would pass and commit
            // rows pointing at data that never reached the disk.
            state.fail(format!("the data file could not be synced ({e})"));
        })
    }

    /// Commits the open transaction, whose data `sync_data_locked` made durable, and gives the
    /// slots it freed back to the filesystem.
    fn commit_synced(&self, state: &mut State) -> io::Result<()> {
        let freed = std::mem::take(&mut state.freed);
        // Reads that looked a freed slot up before it was freed finish first.
        let _reuse = (!freed.is_empty()).then(|| self.slot_reuse.write());
        state
            .index
            .free_slots(&freed)
            .map_err(|e| state.break_on(e))?;
        state.index.commit().map_err(|e| state.break_on(e))?;
        // Their rows are gone for good: their space can go back to the filesystem.
        for slot in &freed {
            self.data.punch(*slot, 0, BLOCKS_PER_GRANULE)?;
        }
        // Reusable from now on; recorded with the next commit (a crash before it leaves them
        // to be punched again at the next open).
        state
            .index
            .mark_punched(&freed)
            .map_err(|e| state.break_on(e))
    }

    /// Grows the volume (durably).
    pub fn resize(&self, size: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        if size < state.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a volume cannot shrink",
            ));
        }
        self.commit_locked(&mut state)?;
        state.index.set_size(size).map_err(|e| state.break_on(e))?;
        state.index.commit().map_err(|e| state.break_on(e))?;
        state.size = size;
        Ok(())
    }

    // --- snapshots ---------------------------------------------------------------------

    /// Takes a snapshot of every write that returned before the call: durable when it returns.
    pub fn snapshot(&self, name: &str, guid: &str, created: i64) -> io::Result<Snapshot> {
        let mut state = self.state.lock();
        state.usable()?;
        // The writes not yet committed and the snapshot's row commit in one transaction: one
        // sync of the data file and one of the index, whatever the number of snapshots.
        if state.index.has_uncommitted() {
            self.sync_data_locked(&mut state)?;
        }
        let snapshot = match state.index.create_snapshot(name, guid, created) {
            Ok(snapshot) => snapshot,
            // Its name is taken (two creates of one name at once): SQLite undid the failed
            // statement alone, the writes before it stay in the transaction.
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("a snapshot named '{name}' exists"),
                ));
            }
            Err(e) => return Err(state.break_on(e)),
        };
        self.commit_synced(&mut state)?;
        state.newest_snapshot = Some(snapshot.epoch);
        state.live_epoch = snapshot.epoch + 1;
        Ok(snapshot)
    }

    pub fn snapshots(&self) -> io::Result<Vec<Snapshot>> {
        self.state.lock().index.snapshots().map_err(index_error)
    }

    /// The snapshots, each with the bytes only it holds (what deleting it alone would free).
    pub fn snapshots_with_unique_bytes(&self) -> io::Result<Vec<(Snapshot, u64)>> {
        listing(&self.state.lock().index)
    }

    pub fn find_snapshot(&self, name: &str) -> io::Result<Option<Snapshot>> {
        self.state.lock().index.snapshot(name).map_err(index_error)
    }

    /// Whether the volume wrote or discarded anything since its newest snapshot (since it was
    /// made, without one).
    pub fn written_since_newest_snapshot(&self) -> io::Result<bool> {
        let state = self.state.lock();
        state
            .index
            .written_after(state.newest_snapshot)
            .map_err(index_error)
    }

    /// The granules the snapshot at `epoch` wrote or discarded (the rest reads as the base).
    pub fn granules_seen(&self, epoch: u64) -> io::Result<Vec<u64>> {
        let state = self.state.lock();
        state.index.granules_seen(Some(epoch)).map_err(index_error)
    }

    /// Renames snapshots (by epoch) and deletes others, in one durable step: all or none (a
    /// receive's staged snapshots take their names, and its temporary ones go).
    pub fn rename_and_delete_snapshots(
        &self,
        renames: &[(u64, String)],
        deletes: &[u64],
    ) -> io::Result<()> {
        let mut state = self.state.lock();
        self.commit_locked(&mut state)?;
        let touched: Vec<u64> = renames
            .iter()
            .map(|(e, _)| *e)
            .chain(deletes.iter().copied())
            .collect();
        state.refuse_if_read(&touched)?;
        // The newest snapshot is read inside the transaction: a receive's names are committed
        // by it, and nothing after the commit may fail (the receive would say it failed, with
        // its snapshots there).
        let changed = state
            .index
            .delete_snapshots(deletes)
            .and_then(|()| state.index.rename_snapshots(renames))
            .and_then(|()| state.index.newest_snapshot_epoch());
        let newest = match changed {
            Ok(newest) => newest,
            Err(e) => {
                // A name taken: nothing of the batch stays.
                state.index.abandon();
                return Err(index_error(e));
            }
        };
        state.index.commit().map_err(|e| state.break_on(e))?;
        crash_point::reached(CrashPoint::SnapshotsRenamed);
        state.newest_snapshot = newest;
        Ok(())
    }

    /// Deletes snapshots in one durable step; their space is reclaimed by `reclaim`.
    pub fn delete_snapshots(&self, epochs: &[u64]) -> io::Result<()> {
        let mut state = self.state.lock();
        state.refuse_if_read(epochs)?;
        self.commit_locked(&mut state)?;
        // Read inside the transaction, as in `rename_and_delete_snapshots`: nothing after the
        // commit may fail.
        let newest = state
            .index
            .delete_snapshots(epochs)
            .and_then(|()| state.index.newest_snapshot_epoch())
            .map_err(|e| state.break_on(e))?;
        state.index.commit().map_err(|e| state.break_on(e))?;
        state.newest_snapshot = newest;
        Ok(())
    }

    /// Whether deleted snapshots left space to reclaim (a reclaim cut short by a crash, say).
    pub fn reclaim_pending(&self) -> io::Result<bool> {
        let state = self.state.lock();
        Ok(!state
            .index
            .reclaim_windows()
            .map_err(index_error)?
            .is_empty())
    }

    /// Frees up to one batch of versions that no snapshot sees any more; returns false when
    /// there was nothing left to reclaim.
    ///
    /// The slots it frees are punched without the state lock, so that reads and writes go on
    /// meanwhile (a batch's punches took most of a step, hundreds of milliseconds under load):
    /// a free slot is handed out again only once it is marked punched.
    /// Reclaims everything, throttled for a daemon serving the volume meanwhile: after each
    /// step it waits a quarter of the step's time (reads, writes and other commands get the
    /// volume's lock between steps; the reclaim takes at most 4/5 of the time).
    pub fn reclaim_throttled(&self) -> io::Result<()> {
        loop {
            let step = std::time::Instant::now();
            if !self.reclaim()? {
                return Ok(());
            }
            std::thread::sleep(step.elapsed() / 4);
        }
    }

    pub fn reclaim(&self) -> io::Result<bool> {
        let freed = {
            let mut state = self.state.lock();
            if state.closed {
                // Its writer let go of it: not a byte more.
                return Ok(false);
            }
            self.commit_locked(&mut state)?;
            let Some(window) = state
                .index
                .reclaim_windows()
                .map_err(|e| state.break_on(e))?
                .into_iter()
                .next()
            else {
                return Ok(false);
            };
            let unseen = state
                .index
                .unseen_versions(&window, RECLAIM_BATCH)
                .map_err(|e| state.break_on(e))?;
            let mut freed = Vec::new();
            for v in &unseen {
                state.index.delete(v).map_err(|e| state.break_on(e))?;
                freed.extend(v.slot);
            }
            if unseen.len() < RECLAIM_BATCH {
                state
                    .index
                    .finish_window(window.id)
                    .map_err(|e| state.break_on(e))?;
            }
            state
                .index
                .free_slots(&freed)
                .map_err(|e| state.break_on(e))?;
            self.commit_locked(&mut state)?;
            // Reads that looked one of these slots up before its row went finish first; later
            // ones cannot find it.
            drop(self.slot_reuse.write());
            freed
        };
        for slot in &freed {
            self.data.punch(*slot, 0, BLOCKS_PER_GRANULE)?;
        }
        let mut state = self.state.lock();
        if state.usable().is_err() {
            // Closed or broken meanwhile: the next open punches what is not marked.
            return Ok(true);
        }
        // Committed with the next step, or the next flush.
        state
            .index
            .mark_punched(&freed)
            .map_err(|e| state.break_on(e))?;
        Ok(true)
    }

    /// The volume's content becomes the snapshot's; the snapshots `newer` (all those after it)
    /// are deleted in the same transaction.
    ///
    /// The writes not yet committed are dropped in the same transaction, not committed before
    /// it: a crash leaves the volume as at its last commit, or rolled back, never with those
    /// writes durable and not rolled back (a failed receive's partial writes, say).
    pub fn rollback(&self, snapshot: &Snapshot, newer: &[u64]) -> io::Result<()> {
        let mut state = self.state.lock();
        state.usable()?;
        state.refuse_if_read(newer)?;
        // Checked before anything changes: a refusal leaves the open transaction as it is.
        let newest = state
            .index
            .snapshots()
            .map_err(index_error)?
            .into_iter()
            .map(|s| s.epoch)
            .filter(|e| !newer.contains(e))
            .max();
        if newest != Some(snapshot.epoch) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only the newest snapshot can be rolled back to",
            ));
        }
        state
            .index
            .delete_snapshots(newer)
            .map_err(|e| state.break_on(e))?;
        state.newest_snapshot = newest;
        let freed = state
            .index
            .roll_back_to(snapshot.epoch)
            .map_err(|e| state.break_on(e))?;
        state.freed.extend(freed);
        state
            .index
            .set_size(snapshot.size)
            .map_err(|e| state.break_on(e))?;
        state.size = snapshot.size;
        // One transaction: a crash leaves the volume as it was, or rolled back.
        self.commit_locked(&mut state)
    }
}

impl Volume {
    /// Opens the snapshot taken at `epoch` for reading (`NotFound` once it is deleted). Until
    /// the reader is dropped the snapshot cannot be deleted, by a batch or by a rollback, so
    /// nothing it reads is ever reclaimed under it.
    pub fn open_snapshot(self: &Arc<Self>, epoch: u64) -> io::Result<SnapshotReader> {
        let mut state = self.state.lock();
        state.usable()?;
        let snapshot = state
            .index
            .snapshot_at(epoch)
            .map_err(index_error)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        state
            .readers
            .entry(epoch)
            .or_insert_with(|| (snapshot.name.clone(), 0))
            .1 += 1;
        Ok(SnapshotReader {
            volume: self.clone(),
            snapshot,
        })
    }

    /// Refuses (`ResourceBusy`, naming them) if any of `epochs` is being read: what deleting
    /// them would answer now.
    pub fn refuse_if_read(&self, epochs: &[u64]) -> io::Result<()> {
        self.state.lock().refuse_if_read(epochs)
    }

    /// The names of the snapshots being read now, oldest first.
    pub fn snapshots_being_read(&self) -> Vec<String> {
        let state = self.state.lock();
        state
            .readers
            .values()
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// A snapshot open for reading: what it held when it was taken, whatever the volume is written
/// since. Keeps the snapshot from being deleted until it is dropped.
pub struct SnapshotReader {
    volume: Arc<Volume>,
    snapshot: Snapshot,
}

impl SnapshotReader {
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Reads from `offset`; returns the bytes read (short at the end).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.volume.state.lock().usable()?;
        let s = &self.snapshot;
        self.volume
            .read_versions(Some(s.epoch), s.size, buf, offset)
    }

    /// As `Volume::seek`, in the snapshot.
    pub fn seek(&self, offset: u64, hole: bool) -> io::Result<Option<u64>> {
        let s = &self.snapshot;
        self.volume
            .seek_versions(Some(s.epoch), s.size, offset, hole)
    }
}

impl Drop for SnapshotReader {
    fn drop(&mut self) {
        let mut state = self.volume.state.lock();
        let epoch = self.snapshot.epoch;
        if let Some((_, count)) = state.readers.get_mut(&epoch) {
            *count -= 1;
            if *count == 0 {
                state.readers.remove(&epoch);
            }
        }
    }
}

/// A volume's snapshots, read from its index through a connection of their own: without the
/// volume open, and without waiting for its writer (what the mount lists and looks up).
pub struct SnapshotListing {
    index: Index,
}

impl SnapshotListing {
    pub fn open(files: &VolumeFiles) -> io::Result<SnapshotListing> {
        Ok(SnapshotListing {
            index: Index::open_for_reading(&files.index()).map_err(index_error)?,
        })
    }

    pub fn by_name(&self, name: &str) -> io::Result<Option<Snapshot>> {
        self.index.snapshot(name).map_err(index_error)
    }

    pub fn by_epoch(&self, epoch: u64) -> io::Result<Option<Snapshot>> {
        self.index.snapshot_at(epoch).map_err(index_error)
    }

    /// Up to `limit` snapshots taken after `epoch` (0: from the first), in creation order.
    pub fn after(&self, epoch: u64, limit: usize) -> io::Result<Vec<Snapshot>> {
        self.index
            .snapshots_after(epoch, limit)
            .map_err(index_error)
    }
}

#[cfg(test)]
impl Volume {
    /// Index rows in all, live rows, and the blocks the live versions hold in the data file.
    pub(crate) fn footprint(&self) -> (u64, u64, u64) {
        self.state.lock().index.footprint().unwrap()
    }

    pub(crate) fn data_bytes(&self) -> u64 {
        self.data.allocated_bytes().unwrap()
    }
}

/// Records a granule's new live version, born in the live epoch.
fn new_live_version(
    state: &mut State,
    granule: u64,
    slot: Option<u64>,
    written: u16,
    zeroed: u16,
) -> io::Result<()> {
    let version = Version {
        granule,
        birth: state.live_epoch,
        death: None,
        slot,
        written,
        zeroed,
    };
    state.index.put(&version).map_err(|e| state.break_on(e))
}

fn punch_free(data: &DataFile, index: &mut Index, slots: &[u64]) -> io::Result<()> {
    for slot in slots {
        data.punch(*slot, 0, BLOCKS_PER_GRANULE)?;
    }
    if !slots.is_empty() {
        index.mark_punched(slots).map_err(index_error)?;
    }
    Ok(())
}

/// After a crash: every free slot, and every block of a slot that its row does not say is
/// written, goes back to the filesystem (writes in place whose index change was lost, slots a
/// lost transaction had taken).
fn give_back_unreferenced_blocks(data: &DataFile, index: &mut Index) -> io::Result<()> {
    data.truncate_to_slots(index.slots_end().map_err(index_error)?)?;
    let free = index.all_free_slots().map_err(index_error)?;
    punch_free(data, index, &free)?;
    let mut after = None;
    loop {
        let versions = index
            .slotted_after(after, RECLAIM_BATCH)
            .map_err(index_error)?;
        let Some(last) = versions.last() else {
            return Ok(());
        };
        after = Some((last.granule, last.birth));
        for v in &versions {
            let slot = v.slot.expect("selected with a slot");
            let mut block = 0;
            while block < BLOCKS_PER_GRANULE {
                if has(v.written, block) {
                    block += 1;
                    continue;
                }
                let start = block;
                while block < BLOCKS_PER_GRANULE && !has(v.written, block) {
                    block += 1;
                }
                data.punch(slot, start, block - start)?;
            }
        }
    }
}

fn check_range(state: &State, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= state.size => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::EFBIG)),
    }
}

#[cfg(test)]
pub(crate) fn open_for_test(dir: &std::path::Path, size: u64, base: Box<dyn Base>) -> Volume {
    let files = VolumeFiles::new(dir);
    if files.index().exists() {
        Volume::open(&files, base).unwrap()
    } else {
        std::fs::create_dir_all(dir).unwrap();
        Volume::create(&files, size, base).unwrap()
    }
}
