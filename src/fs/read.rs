//! The read path: every byte served through the mount comes through `ReadPath::read`, from the
//! chunk cache or from a copy on disk. A chunk read from a disk is checked against its digest
//! before anyone sees it; a chunk that cannot be read, or does not match, is read from the next
//! copy instead (failover), and the fault is reported so that the health monitor can probe the
//! disk and the repair can replace the copy. A reader sees an error only when no copy has the
//! chunk right.
//!
//! Copies are read with O_DIRECT into the cache's page-aligned buffers, so a copy's bytes do
//! not also sit in the page cache of the copy file (where the filesystem does not take
//! O_DIRECT, the read is buffered and its pages are dropped right after). Sequential readers
//! get the next chunks read ahead, in batches of one large read, by a few background threads.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::core::health::{CopyFault, FaultKind};
use crate::format::digests::ChunkDigests;
use crate::fs::cache::{
    CacheStats, Chunk, ChunkCache, ChunkKey, Claim, ReadData, CHUNK_SIZE, PAGE_SIZE,
};

/// Bounds of the default cache size (an eighth of the machine's memory).
const DEFAULT_CACHE_MIN: u64 = 256 << 20;
const DEFAULT_CACHE_MAX: u64 = 4 << 30;

/// The cache size when `imgpool mount` is not given one: an eighth of physical memory, between
/// 256 MiB and 4 GiB. O_DIRECT readers (volume engines) get no page cache, so this cache is the
/// only memory that serves their repeated reads; it fills only as chunks are read.
pub fn default_cache_size() -> u64 {
    (physical_memory() / 8).clamp(DEFAULT_CACHE_MIN, DEFAULT_CACHE_MAX)
}

/// The machine's memory in bytes; also the largest cache a mount may be given.
pub fn physical_memory() -> u64 {
    use nix::unistd::{sysconf, SysconfVar};
    let get = |var| sysconf(var).ok().flatten().unwrap_or(0).max(0) as u64;
    get(SysconfVar::_PHYS_PAGES).saturating_mul(get(SysconfVar::PAGE_SIZE))
}
/// How far ahead of a sequential reader chunks are read. Queued in half-window steps, so each
/// step gives every readahead thread a batch: 8 MiB of disk reads in flight at once, which a
/// virtio disk needs to reach its throughput (measured with fio, O_DIRECT: 1 MiB reads one at a
/// time 760-1070 MiB/s, four at a time 1150-1270), and up to 16 MiB of slack for a reader whose
/// threads wait for a CPU. A 4 MiB window kept two 1 MiB reads in flight per step.
const READAHEAD_BYTES: u64 = 16 << 20;
/// Chunks per readahead disk read (2 MiB): fewer, larger reads for the same depth.
const READAHEAD_BATCH: u64 = 32;
/// With several requests in flight (async readahead, several FUSE threads), a sequential
/// reader's requests arrive slightly out of order.
const SEQUENTIAL_SLACK: u64 = 1 << 20;
/// Consecutive sequential requests before readahead starts: a random reader's one lucky
/// neighbour does not trigger it.
const SEQUENTIAL_RUN: u32 = 2;
const READAHEAD_THREADS: usize = 4;
/// Readahead is best effort: when this many batches wait, new ones are dropped.
const READAHEAD_QUEUE: usize = 64;

/// Where one copy of an image lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyLocation {
    pub path: PathBuf,
    /// The copy's chunk digest file.
    pub digests: PathBuf,
    pub disk: String,
    pub disk_id: i64,
    /// Ready or damaged, on a disk in service: only such copies are read.
    pub serving: bool,
    /// The image's last good copy after a fault: read after every other copy, and only here,
    /// where each chunk is checked; never handed to the kernel for passthrough.
    pub damaged: bool,
}

/// The image a read is for.
#[derive(Clone, Copy)]
pub struct ImageRef<'a> {
    pub id: i64,
    pub size: u64,
    pub copies: &'a [CopyLocation],
    pub chunk_size: u64,
    /// The identity of the image's digest list (see `digests`).
    pub digests_hash: &'a str,
}

/// One reader's position (one open file): tells sequential reading from random.
#[derive(Default)]
pub struct Stream {
    next: AtomicU64,
    run: AtomicU32,
    /// Where readahead for this reader has been queued up to.
    ahead_to: AtomicU64,
}

impl Stream {
    /// Records a request; true once the reader has read sequentially for a while. Requests
    /// that arrive slightly out of order neither move the position back nor break the run.
    fn observe(&self, offset: u64, end: u64) -> bool {
        let previous = self.next.fetch_max(end, Ordering::Relaxed);
        if offset.abs_diff(previous) <= SEQUENTIAL_SLACK {
            let run = self
                .run
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                    Some(r.saturating_add(1))
                })
                .unwrap_or(u32::MAX);
            run.saturating_add(1) >= SEQUENTIAL_RUN
        } else {
            // A jump: a random reader, or a seek. Readahead starts over from here.
            self.next.store(end, Ordering::Relaxed);
            self.run.store(0, Ordering::Relaxed);
            self.ahead_to.store(0, Ordering::Relaxed);
            false
        }
    }

    /// Where the reader has got to.
    fn position(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }
}

/// What the read path has done since the mount started. Units and definitions:
/// `docs/statistics.md`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReadStats {
    pub requests: u64,
    pub bytes_served: u64,
    pub readahead_bytes: u64,
    pub cache: CacheStats,
    /// Bytes read from copies, by disk name.
    pub disk_read_bytes: BTreeMap<String, u64>,
    /// Chunk reads that failed on a copy (I/O error).
    #[serde(default)]
    pub copy_read_errors: u64,
    /// Chunks read from a copy that did not match their digest (never served).
    #[serde(default)]
    pub corrupt_chunks: u64,
    /// Chunks served from another copy after a failed or corrupt read.
    #[serde(default)]
    pub failovers: u64,
    /// The three above by disk: where the reads failed or read wrong, and where the chunks
    /// then came from.
    #[serde(default)]
    pub faults_by_disk: BTreeMap<String, DiskFaults>,
}

/// A disk's part of a mount's copy faults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskFaults {
    pub copy_read_errors: u64,
    pub corrupt_chunks: u64,
    /// Chunks served from this disk's copy after another copy failed them.
    pub failovers: u64,
}

/// An open copy file: an O_DIRECT descriptor for chunk reads, and a buffered one (kernel
/// passthrough, and filesystems without O_DIRECT).
struct OpenCopy {
    location: CopyLocation,
    path: PathBuf,
    direct: Option<File>,
    buffered: File,
    use_direct: AtomicBool,
    read_bytes: Arc<AtomicU64>,
    /// A read failed or returned wrong bytes: other copies are tried first until the pool
    /// decides (the copy or its disk is failed, and the copy leaves the image's set).
    suspect: AtomicBool,
}

impl OpenCopy {
    fn open(location: &CopyLocation, read_bytes: Arc<AtomicU64>) -> io::Result<OpenCopy> {
        let buffered = File::open(&location.path)?;
        let direct = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&location.path)
            .ok();
        Ok(OpenCopy {
            location: location.clone(),
            path: location.path.clone(),
            use_direct: AtomicBool::new(direct.is_some()),
            direct,
            buffered,
            read_bytes,
            suspect: AtomicBool::new(false),
        })
    }

    /// Reads chunks `first..first + bufs.len()` of an image of `size` bytes, in one disk read
    /// where possible; returns each chunk's length.
    fn read_chunks(&self, size: u64, first: u64, bufs: &mut [&mut [u8]]) -> io::Result<Vec<usize>> {
        let start = first * CHUNK_SIZE as u64;
        let lens: Vec<usize> = (0..bufs.len() as u64)
            .map(|i| {
                let chunk_start = start + i * CHUNK_SIZE as u64;
                size.saturating_sub(chunk_start).min(CHUNK_SIZE as u64) as usize
            })
            .collect();
        let want: usize = lens.iter().sum();
        if want == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if self.use_direct.load(Ordering::Relaxed) {
            match self.read_span(self.direct.as_ref().expect("direct fd"), start, bufs, &lens) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(
                        "{}: O_DIRECT reads refused ({e}); reading it buffered",
                        self.path.display()
                    );
                    self.use_direct.store(false, Ordering::Relaxed);
                }
                result => return result.map(|()| lens),
            }
        }
        self.read_span(&self.buffered, start, bufs, &lens)?;
        // The chunk cache holds these bytes now; the copy file's pages would hold them twice.
        let _ = posix_fadvise(
            &self.buffered,
            start as i64,
            want as i64,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        Ok(lens)
    }

    fn read_span(
        &self,
        file: &File,
        start: u64,
        bufs: &mut [&mut [u8]],
        lens: &[usize],
    ) -> io::Result<()> {
        // O_DIRECT needs whole pages: the last chunk of an image is read up to a page end.
        let mut iov: Vec<IoSliceMut> = bufs
            .iter_mut()
            .zip(lens)
            .map(|(buf, len)| IoSliceMut::new(&mut buf[..len.next_multiple_of(PAGE_SIZE)]))
            .collect();
        let want: usize = lens.iter().sum();
        let got = nix::sys::uio::preadv(file, &mut iov, start as i64).map_err(io::Error::from)?;
        self.read_bytes.fetch_add(got as u64, Ordering::Relaxed);
        if got >= want {
            return Ok(());
        }
        // A short read (rare on local filesystems): finish chunk by chunk from chunk starts,
        // which keeps O_DIRECT alignment.
        let mut chunk_start = 0usize;
        for (buf, len) in bufs.iter_mut().zip(lens) {
            if got < chunk_start + len {
                let offset = start + chunk_start as u64;
                let mut done = 0;
                while done < *len {
                    let n = nix::sys::uio::pread(
                        file,
                        &mut buf[done..len.next_multiple_of(PAGE_SIZE)],
                        (offset + done as u64) as i64,
                    )
                    .map_err(io::Error::from)?;
                    self.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    if n == 0 || (n % PAGE_SIZE != 0 && done + n < *len) {
                        // The copy is shorter than the image: never pad with invented zeros.
                        return Err(io::Error::from_raw_os_error(libc::EIO));
                    }
                    done += n;
                }
            }
            chunk_start += len;
        }
        Ok(())
    }
}

/// The serving copies of an image, opened, with the image's chunk digests.
struct OpenImage {
    size: u64,
    /// The serving copies it was built from, including any that would not open: a copy that
    /// cannot be opened is tried again when the set changes, not on every chunk read.
    locations: Vec<CopyLocation>,
    copies: Vec<Arc<OpenCopy>>,
    digests: Arc<ChunkDigests>,
    digests_hash: String,
}

impl OpenImage {
    /// Whether this is still the image's set of serving copies.
    fn is_current(&self, image: &ImageRef) -> bool {
        self.digests_hash == image.digests_hash
            && self
                .locations
                .iter()
                .eq(image.copies.iter().filter(|c| c.serving))
    }

    /// The copies in the order to try them: trusted ones first, each group in placement order.
    /// A snapshot: a copy that turns suspect while they are tried is not tried twice.
    fn candidates(&self) -> Vec<&Arc<OpenCopy>> {
        let mut copies: Vec<&Arc<OpenCopy>> = self.copies.iter().collect();
        // Trusted before suspect, undamaged before damaged, otherwise in placement order.
        copies.sort_by_key(|c| (c.is_suspect(), c.location.damaged));
        copies
    }
}

impl OpenCopy {
    fn is_suspect(&self) -> bool {
        self.suspect.load(Ordering::Relaxed)
    }
}

/// Where copy faults go: counted, and each copy's first fault sent to whoever watches (the
/// daemon's health monitor).
#[derive(Default)]
struct Faults {
    sink: Mutex<Option<Sender<CopyFault>>>,
    copy_read_errors: AtomicU64,
    corrupt_chunks: AtomicU64,
    failovers: AtomicU64,
    by_disk: Mutex<BTreeMap<String, DiskFaults>>,
}

impl Faults {
    fn failover_to(&self, copy: &OpenCopy) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
        self.by_disk
            .lock()
            .entry(copy.location.disk.clone())
            .or_default()
            .failovers += 1;
    }

    fn report_location(&self, image_id: i64, location: &CopyLocation, kind: FaultKind) {
        let fault = CopyFault {
            image_id,
            disk_id: location.disk_id,
            disk: location.disk.clone(),
            path: location.path.clone(),
            kind,
        };
        tracing::warn!("{fault}; reading other copies");
        if let Some(sink) = &*self.sink.lock() {
            let _ = sink.send(fault);
        }
    }

    fn report(&self, image_id: i64, copy: &OpenCopy, kind: FaultKind) {
        match kind {
            FaultKind::Io(_) | FaultKind::Missing => &self.copy_read_errors,
            FaultKind::Corrupt { .. } => &self.corrupt_chunks,
        }
        .fetch_add(1, Ordering::Relaxed);
        {
            let mut by_disk = self.by_disk.lock();
            let disk = by_disk.entry(copy.location.disk.clone()).or_default();
            match kind {
                FaultKind::Io(_) | FaultKind::Missing => disk.copy_read_errors += 1,
                FaultKind::Corrupt { .. } => disk.corrupt_chunks += 1,
            }
        }
        if copy.suspect.swap(true, Ordering::Relaxed) {
            return; // already reported
        }
        self.report_location(image_id, &copy.location, kind);
    }
}

/// Reads chunk `index` into `buf` from the first copy that has it right: a copy that fails
/// or returns bytes that do not match the digest is reported and the next one is tried.
/// `tried`: a copy that has just failed this chunk, not read again.
fn load_chunk(
    image_id: i64,
    open: &OpenImage,
    index: u64,
    buf: &mut [u8],
    faults: &Faults,
    tried: Option<&Arc<OpenCopy>>,
) -> io::Result<usize> {
    for copy in open.candidates() {
        if tried.is_some_and(|tried| Arc::ptr_eq(tried, copy)) {
            continue;
        }
        match copy.read_chunks(open.size, index, &mut [&mut *buf]) {
            Ok(lens) if open.digests.matches(index, &buf[..lens[0]]) => {
                // Not the preferred copy: it failed this chunk just now, or an earlier one.
                if !Arc::ptr_eq(copy, &open.copies[0]) {
                    faults.failover_to(copy);
                }
                return Ok(lens[0]);
            }
            Ok(_) => faults.report(image_id, copy, FaultKind::Corrupt { chunk: index }),
            Err(e) => faults.report(image_id, copy, FaultKind::Io(errno_of(&e))),
        }
    }
    Err(io::Error::from_raw_os_error(libc::EIO))
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Loads a run of consecutive chunks that a request claimed: one disk read from the preferred
/// copy for the whole run, then each chunk checked against its digest. A chunk that this read
/// did not get right is read on its own from the other copies (failover). Returns each chunk,
/// in order, or the error its load ended with.
fn load_claims(
    cache: &ChunkCache,
    image_id: i64,
    open: &OpenImage,
    claims: Vec<Claim>,
    faults: &Faults,
) -> Vec<io::Result<Arc<Chunk>>> {
    let Some(first) = claims.first().map(|c| c.key().index) else {
        return Vec::new();
    };
    let mut buffers = match claims
        .iter()
        .map(|_| cache.buffer())
        .collect::<io::Result<Vec<_>>>()
    {
        Ok(buffers) => buffers,
        Err(e) => {
            let errno = errno_of(&e);
            // Dropped claims release their waiters.
            return claims
                .iter()
                .map(|_| Err(io::Error::from_raw_os_error(errno)))
                .collect();
        }
    };
    let copy = open.candidates()[0].clone();
    let mut slices: Vec<&mut [u8]> = buffers.iter_mut().map(|b| b.as_mut_slice()).collect();
    let read = copy.read_chunks(open.size, first, &mut slices);
    drop(slices);
    if let Err(e) = &read {
        faults.report(image_id, &copy, FaultKind::Io(errno_of(e)));
    }
    let preferred = Arc::ptr_eq(&copy, &open.copies[0]);
    claims
        .into_iter()
        .zip(buffers)
        .enumerate()
        .map(|(i, (claim, mut buf))| {
            let index = first + i as u64;
            let len = match &read {
                Ok(lens) if open.digests.matches(index, &buf.as_slice()[..lens[i]]) => {
                    if !preferred {
                        faults.failover_to(&copy);
                    }
                    Ok(lens[i])
                }
                // A wrong chunk, or a run that did not read: this chunk alone, from the others.
                other => {
                    if other.is_ok() {
                        faults.report(image_id, &copy, FaultKind::Corrupt { chunk: index });
                    }
                    load_chunk(
                        image_id,
                        open,
                        index,
                        buf.as_mut_slice(),
                        faults,
                        Some(&copy),
                    )
                }
            };
            match len {
                Ok(len) => Ok(claim.fill(buf, len, false)),
                Err(e) => {
                    claim.fail(errno_of(&e));
                    Err(e)
                }
            }
        })
        .collect()
}

struct ReadaheadJob {
    image_id: i64,
    open: Arc<OpenImage>,
    stream: Arc<Stream>,
    /// The cache's generation when queued: a job queued before the cache was emptied is
    /// dropped.
    generation: u64,
    first: u64,
    count: u64,
}

pub struct ReadPath {
    cache: Arc<ChunkCache>,
    /// The open copies of each image being read, shared by every open file of every view.
    images: RwLock<HashMap<i64, Arc<OpenImage>>>,
    disk_read_bytes: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    readahead: SyncSender<ReadaheadJob>,
    readahead_bytes: Arc<AtomicU64>,
    faults: Arc<Faults>,
    requests: AtomicU64,
    bytes_served: AtomicU64,
}

impl Default for ReadPath {
    fn default() -> Self {
        ReadPath::new(default_cache_size())
    }
}

impl ReadPath {
    /// A read path whose chunk cache holds at most `cache_size` bytes.
    pub fn new(cache_size: u64) -> ReadPath {
        let cache = Arc::new(ChunkCache::new(cache_size));
        let readahead_bytes = Arc::new(AtomicU64::new(0));
        let faults = Arc::new(Faults::default());
        let (readahead, jobs) = sync_channel(READAHEAD_QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        for n in 0..READAHEAD_THREADS {
            let (cache, jobs, bytes, faults) = (
                cache.clone(),
                jobs.clone(),
                readahead_bytes.clone(),
                faults.clone(),
            );
            // Without readahead threads reads are still right, only slower.
            let _ = std::thread::Builder::new()
                .name(format!("readahead-{n}"))
                .spawn(move || run_readahead(&cache, &jobs, &bytes, &faults));
        }
        ReadPath {
            cache,
            images: RwLock::default(),
            disk_read_bytes: Mutex::default(),
            readahead,
            readahead_bytes,
            faults,
            requests: AtomicU64::new(0),
            bytes_served: AtomicU64::new(0),
        }
    }

    /// Sends each copy's first fault to `sink`.
    pub fn report_faults_to(&self, sink: Sender<CopyFault>) {
        *self.faults.sink.lock() = Some(sink);
    }

    /// Reads up to `len` bytes at `offset` of `image`; short only at the end of the image.
    /// `to_page_cache`: the kernel keeps what it gets (a buffered or mmap reader, not O_DIRECT).
    pub fn read(
        &self,
        image: ImageRef,
        stream: &Arc<Stream>,
        offset: u64,
        len: u32,
        to_page_cache: bool,
    ) -> io::Result<ReadData> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if offset >= image.size || len == 0 {
            return Ok(ReadData::Owned(Vec::new()));
        }
        let end = (offset + len as u64).min(image.size);
        if stream.observe(offset, end) {
            if let Ok(open) = self.open_image(image) {
                self.read_ahead(image, &open, stream, end);
            }
        }
        let chunk_size = CHUNK_SIZE as u64;
        let (first, last) = (offset / chunk_size, (end - 1) / chunk_size);
        let key = |index| ChunkKey {
            image: image.id,
            index,
        };
        // The chunks that nobody has or is reading are claimed first and read in one disk read
        // per run of consecutive chunks: a cold 1 MiB request costs one 1 MiB read, not sixteen
        // 64 KiB reads one after the other. All of them are loaded before this request waits
        // on anyone else's, so two requests that claimed each other's chunks cannot deadlock.
        let mut loaded: Vec<Option<Arc<Chunk>>> = vec![None; (last - first + 1) as usize];
        let mut runs: Vec<Vec<Claim>> = Vec::new();
        for claim in (first..=last).filter_map(|index| self.cache.claim_miss(key(index))) {
            match runs.last_mut() {
                Some(run) if run[run.len() - 1].key().index + 1 == claim.key().index => {
                    run.push(claim)
                }
                _ => runs.push(vec![claim]),
            }
        }
        if !runs.is_empty() {
            let open = self.open_image(image)?;
            for run in runs {
                let start = run[0].key().index;
                for (i, chunk) in load_claims(&self.cache, image.id, &open, run, &self.faults)
                    .into_iter()
                    .enumerate()
                {
                    loaded[(start - first) as usize + i] = Some(chunk?);
                }
            }
        }
        let mut parts = Vec::with_capacity(loaded.len());
        for (index, chunk) in (first..=last).zip(loaded) {
            let key = key(index);
            // Cached, or being read by another request or by readahead.
            let chunk = match chunk {
                Some(chunk) => chunk,
                None => {
                    self.cache
                        .get(key, |buf| {
                            let open = self.open_image(image)?;
                            load_chunk(image.id, &open, index, buf, &self.faults, None)
                        })?
                        .0
                }
            };
            let chunk_start = index * chunk_size;
            let range = (offset.max(chunk_start) - chunk_start) as usize
                ..(end.min(chunk_start + chunk_size) - chunk_start) as usize;
            if chunk.bytes().len() < range.end {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            parts.push((key, chunk, range));
        }
        let data = if parts.len() == 1 {
            let (_, chunk, range) = &parts[0];
            ReadData::Slice(chunk.clone(), range.clone())
        } else {
            let mut bytes = Vec::with_capacity((end - offset) as usize);
            for (_, chunk, range) in &parts {
                bytes.extend_from_slice(&chunk.bytes()[range.clone()]);
            }
            ReadData::Owned(bytes)
        };
        if to_page_cache {
            for (key, chunk, range) in parts {
                self.cache.handed_to_page_cache(key, &chunk, range);
            }
        }
        self.bytes_served
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// Queues readahead so that the chunks up to `READAHEAD_BYTES` past `end` are loaded or
    /// loading; queued in half-window steps, so a reader does not queue on every request. The
    /// rest of the image is queued in one go once the window reaches its end (a step would
    /// never fill there: an image's last half window would get no readahead).
    fn read_ahead(&self, image: ImageRef, open: &Arc<OpenImage>, stream: &Arc<Stream>, end: u64) {
        let target = (end + READAHEAD_BYTES).min(image.size);
        let ahead = stream.ahead_to.load(Ordering::Relaxed);
        let from = ahead.max(end);
        if target <= from || (target - from < READAHEAD_BYTES / 2 && target < image.size) {
            return;
        }
        // One thread queues a given window; the others see it moved.
        if stream
            .ahead_to
            .compare_exchange(ahead, target, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let chunk_size = CHUNK_SIZE as u64;
        let (mut first, last) = (from / chunk_size, (target - 1) / chunk_size);
        let generation = self.cache.generation();
        while first <= last {
            let count = (last - first + 1).min(READAHEAD_BATCH);
            let job = ReadaheadJob {
                image_id: image.id,
                open: open.clone(),
                stream: stream.clone(),
                generation,
                first,
                count,
            };
            if let Err(TrySendError::Full(_)) = self.readahead.try_send(job) {
                // What was not queued is tried again on the reader's next request.
                let _ = stream.ahead_to.compare_exchange(
                    target,
                    first * chunk_size,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                return;
            }
            first += count;
        }
    }

    /// Checks that some copy of the image can be opened and its digests loaded (done at open
    /// time, so that an image without a usable copy fails the open rather than the first read).
    pub fn ensure_open(&self, image: ImageRef) -> io::Result<()> {
        self.open_image(image).map(|_| ())
    }

    /// A buffered descriptor of the copy that serves `image`, and its path, for kernel
    /// passthrough: the first serving copy that has not faulted.
    pub fn backing_file(&self, image: ImageRef) -> io::Result<(File, PathBuf)> {
        let open = self.open_image(image)?;
        // The kernel checks no digest: a damaged copy is never handed to it.
        let copy = open
            .candidates()
            .into_iter()
            .find(|c| !c.location.damaged)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
        Ok((copy.buffered.try_clone()?, copy.path.clone()))
    }

    /// Where data (`hole`: a hole) starts at or after `offset` in `image`, as far as its chunk
    /// digests tell: a chunk that reads as zeros is a hole. `ENXIO` past the end, or when
    /// only holes are left and data was asked for.
    pub fn seek(&self, image: ImageRef, offset: u64, hole: bool) -> io::Result<u64> {
        let open = self.open_image(image)?;
        let found = if hole {
            open.digests.seek_hole(image.size, offset)
        } else {
            open.digests.seek_data(image.size, offset)
        };
        found.ok_or_else(|| io::Error::from_raw_os_error(libc::ENXIO))
    }

    /// Closes the descriptors of every image whose serving copies are no longer those it was
    /// opened with (`current`: the image as the catalog has it now), so that a copy that
    /// stopped serving, on a disk that failed or left service, is not held open: its
    /// filesystem can be unmounted, repaired and mounted again. The next read opens the
    /// copies that serve then. Cached chunks stay: the image's bytes did not change.
    pub fn close_stale<'a>(&self, current: impl Fn(i64) -> Option<ImageRef<'a>>) {
        self.images
            .write()
            .retain(|id, open| current(*id).is_some_and(|image| open.is_current(&image)));
    }

    /// Drops the descriptors and the cached chunks of an image that left the pool.
    pub fn forget(&self, image_id: i64) {
        self.images.write().remove(&image_id);
        self.cache.forget_image(image_id);
    }

    /// Empties the chunk cache.
    pub fn drop_cache(&self) {
        self.cache.clear();
    }

    pub fn stats(&self) -> ReadStats {
        ReadStats {
            requests: self.requests.load(Ordering::Relaxed),
            bytes_served: self.bytes_served.load(Ordering::Relaxed),
            readahead_bytes: self.readahead_bytes.load(Ordering::Relaxed),
            cache: self.cache.stats(),
            disk_read_bytes: self
                .disk_read_bytes
                .lock()
                .iter()
                .map(|(disk, bytes)| (disk.clone(), bytes.load(Ordering::Relaxed)))
                .collect(),
            copy_read_errors: self.faults.copy_read_errors.load(Ordering::Relaxed),
            corrupt_chunks: self.faults.corrupt_chunks.load(Ordering::Relaxed),
            failovers: self.faults.failovers.load(Ordering::Relaxed),
            faults_by_disk: self.faults.by_disk.lock().clone(),
        }
    }

    /// The image's serving copies, opened, and its digests: reused while the set of serving
    /// copies is unchanged, rebuilt (keeping the descriptors still in the set) when it changes.
    fn open_image(&self, image: ImageRef) -> io::Result<Arc<OpenImage>> {
        let previous = self.images.read().get(&image.id).cloned();
        if let Some(open) = &previous {
            if open.is_current(&image) {
                return Ok(open.clone());
            }
        }
        let mut copies = Vec::new();
        for location in image.copies.iter().filter(|c| c.serving) {
            let reused = previous
                .as_ref()
                .and_then(|p| p.copies.iter().find(|c| c.location == *location));
            if let Some(copy) = reused {
                copies.push(copy.clone());
                continue;
            }
            let counter = self
                .disk_read_bytes
                .lock()
                .entry(location.disk.clone())
                .or_default()
                .clone();
            match OpenCopy::open(location, counter) {
                Ok(copy) => copies.push(Arc::new(copy)),
                Err(e) => {
                    // A copy that does not open is a fault like a failed read: its disk is
                    // probed. Tried (and reported) once per change of the serving set.
                    let kind = if e.kind() == io::ErrorKind::NotFound {
                        FaultKind::Missing
                    } else {
                        FaultKind::Io(errno_of(&e))
                    };
                    self.faults.report_location(image.id, location, kind);
                }
            }
        }
        if copies.is_empty() {
            // The image exists; its data cannot be read. ENOENT here would tell the reader
            // that the name it just opened is not there.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let digests = match previous
            .as_ref()
            .filter(|p| p.digests_hash == image.digests_hash)
        {
            Some(p) => p.digests.clone(),
            None => Arc::new(load_digests(&image, &copies)?),
        };
        let open = Arc::new(OpenImage {
            size: image.size,
            locations: image.copies.iter().filter(|c| c.serving).cloned().collect(),
            copies,
            digests,
            digests_hash: image.digests_hash.to_string(),
        });
        self.images.write().insert(image.id, open.clone());
        Ok(open)
    }
}

/// The image's chunk digests, from the first copy whose digest file is intact.
fn load_digests(image: &ImageRef, copies: &[Arc<OpenCopy>]) -> io::Result<ChunkDigests> {
    for copy in copies {
        let path = &copy.location.digests;
        match std::fs::read(path) {
            Ok(bytes) => {
                match ChunkDigests::from_bytes(image.chunk_size, image.size, &bytes)
                    .filter(|d| d.list_hash() == image.digests_hash)
                {
                    Some(digests) if digests.chunk_size() == CHUNK_SIZE as u64 => {
                        return Ok(digests)
                    }
                    _ => tracing::warn!("{} is damaged; trying another copy's", path.display()),
                }
            }
            Err(e) => tracing::warn!("cannot read {}: {e}", path.display()),
        }
    }
    tracing::error!(
        "image {}: no copy has an intact digest list; its reads fail until `imgpool scrub` repairs it",
        image.id
    );
    Err(io::Error::from_raw_os_error(libc::EIO))
}

fn run_readahead(
    cache: &ChunkCache,
    jobs: &Mutex<Receiver<ReadaheadJob>>,
    bytes: &AtomicU64,
    faults: &Faults,
) {
    loop {
        // The lock is held only while waiting: one idle thread waits, the others queue behind.
        let Ok(job) = jobs.lock().recv() else {
            return;
        };
        if job.generation != cache.generation() {
            continue;
        }
        // Chunks the reader has already passed are not worth a disk read any more.
        let passed = job.stream.position() / CHUNK_SIZE as u64;
        let mut claims = Vec::new();
        for index in job.first.max(passed)..job.first + job.count {
            let claim = cache.claim(ChunkKey {
                image: job.image_id,
                index,
            });
            // Reads cover runs of consecutive chunks that are neither cached nor loading.
            match claim {
                Some(claim) => claims.push(claim),
                None => load_run(cache, &job, std::mem::take(&mut claims), bytes, faults),
            }
        }
        load_run(cache, &job, claims, bytes, faults);
    }
}

/// Reads a run of claimed chunks from the image's first trusted copy in one disk read. Chunks
/// that fail or do not match are left to the readers, whose own loads fail over.
fn load_run(
    cache: &ChunkCache,
    job: &ReadaheadJob,
    claims: Vec<Claim>,
    bytes: &AtomicU64,
    faults: &Faults,
) {
    let Some(first) = claims.first().map(|c| c.key().index) else {
        return;
    };
    let Some(&copy) = job.open.candidates().first() else {
        return;
    };
    let buffers: io::Result<Vec<_>> = claims.iter().map(|_| cache.buffer()).collect();
    let Ok(mut buffers) = buffers else {
        return; // Dropped claims release their waiters.
    };
    let mut slices: Vec<&mut [u8]> = buffers.iter_mut().map(|b| b.as_mut_slice()).collect();
    match copy.read_chunks(job.open.size, first, &mut slices) {
        Ok(lens) => {
            bytes.fetch_add(lens.iter().sum::<usize>() as u64, Ordering::Relaxed);
            for ((claim, buf), len) in claims.into_iter().zip(buffers).zip(lens) {
                let index = claim.key().index;
                if job.open.digests.matches(index, &buf.as_slice()[..len]) {
                    claim.fill(buf, len, true);
                } else {
                    faults.report(job.image_id, copy, FaultKind::Corrupt { chunk: index });
                    claim.fail(libc::EIO);
                }
            }
        }
        Err(e) => {
            faults.report(job.image_id, copy, FaultKind::Io(errno_of(&e)));
            for claim in claims {
                claim.fail(errno_of(&e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::digests::ChunkHasher;
    use std::path::Path;

    /// An image whose true content is `content`, with a copy per `(file bytes, serving)`:
    /// each copy file holds the given bytes (`None`: no file), next to the true digests.
    struct TestImage {
        id: i64,
        size: u64,
        copies: Vec<CopyLocation>,
        hash: String,
    }

    impl TestImage {
        fn new(dir: &Path, id: i64, content: &[u8], copies: &[(Option<&[u8]>, bool)]) -> Self {
            let mut hasher = ChunkHasher::new(CHUNK_SIZE as u64);
            hasher.update(content);
            let digests = hasher.finish();
            let copies = copies
                .iter()
                .enumerate()
                .map(|(n, (bytes, serving))| {
                    let path = dir.join(format!("image{id}-copy{n}"));
                    if let Some(bytes) = bytes {
                        std::fs::write(&path, bytes).unwrap();
                    }
                    let digests_path = path.with_extension("digests");
                    std::fs::write(&digests_path, digests.to_bytes()).unwrap();
                    CopyLocation {
                        path,
                        digests: digests_path,
                        disk: format!("d{n}"),
                        disk_id: n as i64,
                        serving: *serving,
                        damaged: false,
                    }
                })
                .collect();
            TestImage {
                id,
                size: content.len() as u64,
                copies,
                hash: digests.list_hash(),
            }
        }

        fn image(&self) -> ImageRef<'_> {
            ImageRef {
                id: self.id,
                size: self.size,
                copies: &self.copies,
                chunk_size: CHUNK_SIZE as u64,
                digests_hash: &self.hash,
            }
        }
    }

    fn read(reader: &ReadPath, image: ImageRef, offset: u64, len: u32) -> Vec<u8> {
        reader
            .read(image, &Arc::default(), offset, len, false)
            .unwrap()
            .to_vec()
    }

    #[test]
    fn reads_are_clipped_at_the_end_of_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"0123456789";
        let test = TestImage::new(dir.path(), 1, content, &[(Some(content), true)]);
        let reader = ReadPath::default();
        let img = test.image();
        assert_eq!(read(&reader, img, 2, 4), b"2345");
        assert_eq!(read(&reader, img, 8, 100), b"89");
        assert!(read(&reader, img, 10, 4).is_empty());
        assert!(read(&reader, img, 50, 4).is_empty());
    }

    #[test]
    fn copies_that_do_not_serve_or_are_missing_are_skipped_and_short_copies_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"abcdef";
        let test = TestImage::new(
            dir.path(),
            1,
            content,
            &[
                (Some(b"XXXXXX"), false),
                (None, true),
                (Some(content), true),
            ],
        );
        let reader = ReadPath::default();
        assert_eq!(read(&reader, test.image(), 0, 6), b"abcdef");

        let long = vec![7u8; 100];
        let short = TestImage::new(dir.path(), 2, &long, &[(Some(&long[..50]), true)]);
        let err = reader
            .read(short.image(), &Arc::default(), 0, 50, false)
            .err()
            .unwrap();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        let none = TestImage::new(dir.path(), 3, content, &[]);
        assert!(reader
            .read(none.image(), &Arc::default(), 0, 1, false)
            .is_err());
    }

    /// How many descriptors of this process are open on `path`.
    fn descriptors_on(path: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target == path)
            .count()
    }

    #[test]
    fn a_copy_that_stops_serving_is_no_longer_held_open() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..2 * CHUNK_SIZE).map(|i| (i % 241) as u8).collect();
        let test = TestImage::new(
            dir.path(),
            1,
            &content,
            &[(Some(&content), true), (Some(&content), true)],
        );
        let reader = ReadPath::default();
        assert_eq!(read(&reader, test.image(), 0, 100), content[..100]);
        assert!(descriptors_on(&test.copies[0].path) > 0);

        // The first copy's disk leaves service: the catalog no longer has it serving.
        let mut now = test.copies.clone();
        now[0].serving = false;
        let current = ImageRef {
            copies: &now,
            ..test.image()
        };
        reader.close_stale(|id| (id == test.id).then_some(current));
        assert_eq!(descriptors_on(&test.copies[0].path), 0);
        reader.drop_cache();
        assert_eq!(read(&reader, current, 0, 100), content[..100]);
        assert_eq!(descriptors_on(&test.copies[0].path), 0);
        assert!(descriptors_on(&test.copies[1].path) > 0);

        // An image that is still current keeps its descriptors.
        reader.close_stale(|id| (id == test.id).then_some(current));
        assert!(descriptors_on(&test.copies[1].path) > 0);
    }

    #[test]
    fn a_copy_whose_file_is_gone_is_reported_missing_and_the_open_fails_with_eio() {
        let dir = tempfile::tempdir().unwrap();
        let test = TestImage::new(dir.path(), 1, b"abc", &[(None, true)]);
        let reader = ReadPath::default();
        let (faults, seen) = std::sync::mpsc::channel();
        reader.report_faults_to(faults);
        let err = reader.ensure_open(test.image()).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EIO),
            "not ENOENT: the name exists"
        );
        let seen: Vec<CopyFault> = seen.try_iter().collect();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].kind, FaultKind::Missing);
    }

    #[test]
    fn seek_finds_data_and_holes_from_the_digests() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = CHUNK_SIZE as u64;
        let mut content = vec![1u8; CHUNK_SIZE];
        content.extend(vec![0u8; CHUNK_SIZE]);
        content.extend(vec![2u8; 100]);
        let test = TestImage::new(dir.path(), 1, &content, &[(Some(&content), true)]);
        let reader = ReadPath::default();
        let img = test.image();
        assert_eq!(reader.seek(img, 5, false).unwrap(), 5);
        assert_eq!(reader.seek(img, 5, true).unwrap(), chunk);
        assert_eq!(reader.seek(img, chunk, false).unwrap(), 2 * chunk);
        assert_eq!(reader.seek(img, 2 * chunk, true).unwrap(), img.size);
        let past = reader.seek(img, img.size, false).unwrap_err();
        assert_eq!(past.raw_os_error(), Some(libc::ENXIO));
    }

    #[test]
    fn a_damaged_copy_is_read_last_and_never_handed_to_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..2 * CHUNK_SIZE).map(|i| (i % 249) as u8).collect();
        let mut rotten = content.clone();
        rotten[CHUNK_SIZE + 3] ^= 0x01;
        let mut test = TestImage::new(
            dir.path(),
            1,
            &content,
            &[(Some(&rotten), true), (Some(&content), true)],
        );
        test.copies[0].damaged = true;
        let reader = ReadPath::default();
        let (_, path) = reader.backing_file(test.image()).unwrap();
        assert_eq!(
            path, test.copies[1].path,
            "the kernel gets the undamaged copy"
        );
        assert_eq!(
            read(&reader, test.image(), 0, content.len() as u32),
            content
        );
        assert_eq!(
            reader.stats().corrupt_chunks,
            0,
            "the damaged copy was not even tried while a good one serves"
        );

        let alone = TestImage::new(dir.path(), 2, &content, &[(Some(&rotten), true)]);
        let mut alone = alone;
        alone.copies[0].damaged = true;
        let refused = reader.backing_file(alone.image()).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EIO));
        // Served by the daemon, chunk by chunk: the good chunk reads, the bad one is an error.
        assert_eq!(
            read(&reader, alone.image(), 0, CHUNK_SIZE as u32),
            content[..CHUNK_SIZE]
        );
        assert!(reader
            .read(alone.image(), &Arc::default(), CHUNK_SIZE as u64, 16, false)
            .is_err());
    }

    #[test]
    fn a_corrupt_or_unreadable_chunk_is_read_from_another_copy_and_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * CHUNK_SIZE;
        let content: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut flipped = content.clone();
        flipped[2 * CHUNK_SIZE + 17] ^= 0x40;
        let truncated = &content[..CHUNK_SIZE + 10];
        let test = TestImage::new(
            dir.path(),
            1,
            &content,
            &[
                (Some(&flipped), true),
                (Some(truncated), true),
                (Some(&content), true),
            ],
        );
        let reader = ReadPath::default();
        let (faults, seen) = std::sync::mpsc::channel();
        reader.report_faults_to(faults);
        assert_eq!(read(&reader, test.image(), 0, size as u32), content);
        let seen: Vec<CopyFault> = seen.try_iter().collect();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0].kind, FaultKind::Corrupt { chunk: 2 });
        assert_eq!(seen[0].disk_id, 0);
        assert_eq!(seen[1].kind, FaultKind::Io(libc::EIO));
        assert_eq!(seen[1].disk_id, 1);
        let stats = reader.stats();
        assert_eq!(stats.corrupt_chunks, 1);
        assert_eq!(stats.copy_read_errors, 1);
        assert_eq!(stats.failovers, 1, "chunk 2 came from the third copy");
        // By disk: d0 read wrong, d1 did not read, d2 served the chunk instead.
        let by_disk = |disk: &str| stats.faults_by_disk.get(disk).cloned().unwrap_or_default();
        assert_eq!(by_disk("d0").corrupt_chunks, 1, "{stats:?}");
        assert_eq!(by_disk("d1").copy_read_errors, 1, "{stats:?}");
        assert_eq!(by_disk("d2").failovers, 1, "{stats:?}");
        assert_eq!(
            by_disk("d0").failovers + by_disk("d1").failovers,
            0,
            "{stats:?}"
        );
        // The request read its four chunks from the first copy in one read; chunks 0, 1 and 3
        // matched their digests, chunk 2 came from the third copy after the others failed it.
        let chunk = CHUNK_SIZE as u64;
        assert_eq!(stats.disk_read_bytes["d0"], 4 * chunk);
        assert_eq!(stats.disk_read_bytes["d2"], chunk);

        // Read again, chunk 3 comes from the third copy, the only one still trusted.
        reader.drop_cache();
        let chunk3 = 3 * CHUNK_SIZE;
        assert_eq!(
            read(&reader, test.image(), chunk3 as u64, CHUNK_SIZE as u32),
            &content[chunk3..]
        );
        let stats = reader.stats();
        assert_eq!(stats.failovers, 2, "{stats:?}");
        assert_eq!(stats.disk_read_bytes["d0"], 4 * chunk);
        assert_eq!(stats.disk_read_bytes["d2"], 2 * chunk);
    }

    #[test]
    fn when_no_copy_has_a_chunk_right_the_read_fails_and_serves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let content = vec![5u8; 2 * CHUNK_SIZE];
        let mut flipped = content.clone();
        flipped[CHUNK_SIZE + 1] = 6;
        let test = TestImage::new(
            dir.path(),
            1,
            &content,
            &[(Some(&flipped), true), (Some(&flipped), true)],
        );
        let reader = ReadPath::default();
        assert_eq!(read(&reader, test.image(), 0, 100), vec![5u8; 100]);
        let err = reader
            .read(test.image(), &Arc::default(), CHUNK_SIZE as u64, 100, false)
            .err()
            .unwrap();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        let stats = reader.stats();
        assert_eq!(stats.corrupt_chunks, 2, "{stats:?}");
    }

    /// A file of `size` bytes whose every 8-byte word holds its own offset.
    fn patterned_file(path: &std::path::Path, size: u64) -> Vec<u8> {
        let bytes: Vec<u8> = (0..size / 8).flat_map(|i| (i * 8).to_le_bytes()).collect();
        std::fs::write(path, &bytes).unwrap();
        bytes
    }

    #[test]
    fn reads_across_chunks_match_the_file_and_count_disk_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let size = 3 * CHUNK_SIZE as u64 + 4096 + 8;
        let expected = patterned_file(&path, size);
        let test = TestImage::new(dir.path(), 1, &expected, &[(Some(&expected), true)]);
        let img = test.image();
        let reader = ReadPath::default();
        for (offset, len) in [
            (0, 100),
            (CHUNK_SIZE as u64 - 10, 20),
            (5, 200_000),
            (size - 9, 50),
        ] {
            let got = read(&reader, img, offset, len);
            let end = (offset + len as u64).min(size) as usize;
            assert_eq!(got, &expected[offset as usize..end], "at {offset}+{len}");
        }
        let stats = reader.stats();
        assert_eq!(stats.cache.misses, 4, "each chunk read from disk once");
        assert!(stats.cache.hits >= 3);
        assert!(stats.disk_read_bytes["d0"] >= size);
        assert_eq!(
            stats.cache.chunks_cached, 4,
            "O_DIRECT readers' chunks stay"
        );
    }

    #[test]
    fn requests_that_overlap_read_each_chunk_from_disk_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let chunks = 64;
        let size = chunks * CHUNK_SIZE as u64;
        let expected = patterned_file(&path, size);
        let test = TestImage::new(dir.path(), 1, &expected, &[(Some(&expected), true)]);
        let reader = ReadPath::default();
        // Eight readers of 256 KiB requests, each starting elsewhere: their requests claim
        // runs of chunks that overlap other requests' claims.
        let request = 4 * CHUNK_SIZE as u64;
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (reader, img, expected) = (&reader, test.image(), &expected);
                s.spawn(move || {
                    let stream = Arc::new(Stream::default());
                    for n in 0..chunks / 4 {
                        let offset = (t * 3 * CHUNK_SIZE as u64 + n * request) % size;
                        let got = reader.read(img, &stream, offset, request as u32, false);
                        let end = (offset + request).min(size) as usize;
                        assert_eq!(&*got.unwrap(), &expected[offset as usize..end]);
                    }
                });
            }
        });
        let stats = reader.stats();
        assert_eq!(stats.disk_read_bytes["d0"], size, "{stats:?}");
        assert_eq!(stats.cache.chunks_cached, chunks, "{stats:?}");
    }

    #[test]
    fn sequential_readers_get_readahead_and_page_cache_readers_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let size = 8 << 20;
        let expected = patterned_file(&path, size);
        let test = TestImage::new(dir.path(), 1, &expected, &[(Some(&expected), true)]);
        let img = test.image();
        let reader = ReadPath::default();
        let stream = Arc::new(Stream::default());
        let request = 128 << 10;
        for offset in (0..size).step_by(request) {
            let got = reader
                .read(img, &stream, offset, request as u32, true)
                .unwrap();
            assert_eq!(&*got, &expected[offset as usize..offset as usize + request]);
            // Give the readahead threads a moment, as a real reader's processing would.
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let stats = reader.stats();
        assert!(stats.cache.readahead_hits > 0, "{stats:?}");
        assert!(stats.readahead_bytes > 0, "{stats:?}");
        assert_eq!(
            stats.cache.chunks_cached, 0,
            "every chunk went to the page cache: {stats:?}"
        );
        assert_eq!(stats.cache.handed_to_page_cache, size / CHUNK_SIZE as u64);
        assert_eq!(stats.bytes_served, size);
    }
}
