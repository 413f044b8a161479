//! The chunk cache: fixed-size chunks of image data, read from a copy on disk, shared by every
//! view of every image and bounded in bytes.
//!
//! The cache is *exclusive* of the kernel's page cache: once every page of a chunk has been
//! handed to a page-cache (buffered or mmap) reader, the kernel holds those bytes and the chunk
//! leaves the cache, so an image read through the mount sits in RAM once. What stays is what
//! the kernel does not hold: chunks read by O_DIRECT readers (Longhorn's engine), chunks only
//! partly handed over, and chunks read ahead of a sequential reader.
//!
//! Chunks are spread over shards, each an LRU behind its own lock, so concurrent readers of
//! different chunks do not serialise. A miss registers the chunk as loading; concurrent misses
//! on the same chunk wait for that one read instead of reading the disk again.

use std::collections::HashMap;
use std::io;
use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use memmap2::MmapMut;
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

/// The unit of caching and of disk reads: the chunk of the images' digests, so that every chunk
/// the cache holds was checked against one digest (see `format::digests::CHUNK_SIZE`).
pub const CHUNK_SIZE: usize = crate::format::digests::CHUNK_SIZE as usize;
/// Alignment and length granule of O_DIRECT reads, and the kernel's page size.
pub const PAGE_SIZE: usize = 4096;
const PAGES_PER_CHUNK: usize = CHUNK_SIZE / PAGE_SIZE;
// One bit per page of a chunk in an `AtomicU64`.
const _: () = assert!(PAGES_PER_CHUNK <= 64);
const SHARDS: usize = 64;
/// Every shard must be able to hold one chunk.
pub const MIN_CACHE_SIZE: u64 = (SHARDS * CHUNK_SIZE) as u64;
/// Freed chunk buffers kept for reuse (saves an mmap, a munmap and 16 page faults per load);
/// beyond this, memory goes back to the system.
const SPARE_BUFFERS: usize = 256;
/// How many times a reader waits on other threads' failed loads before reading itself.
const MAX_JOINS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub image: i64,
    pub index: u64,
}

impl ChunkKey {
    fn shard(&self) -> usize {
        // Fibonacci hashing: neighbouring chunks and images land on different shards.
        let mixed = (self.image as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29)
            ^ self.index.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        (mixed >> 58) as usize % SHARDS
    }
}

/// A page-aligned chunk-sized buffer (O_DIRECT reads land in it), recycled through the cache.
pub struct ChunkBuf {
    map: Option<MmapMut>,
    spares: Arc<Mutex<Vec<MmapMut>>>,
}

impl ChunkBuf {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_mut().expect("live buffer")
    }

    pub fn as_slice(&self) -> &[u8] {
        self.map.as_ref().expect("live buffer")
    }
}

impl Drop for ChunkBuf {
    fn drop(&mut self) {
        if let Some(map) = self.map.take() {
            let mut spares = self.spares.lock();
            if spares.len() < SPARE_BUFFERS {
                spares.push(map);
            }
        }
    }
}

/// One cached chunk: its bytes (shorter than `CHUNK_SIZE` only at the end of an image).
pub struct Chunk {
    buf: ChunkBuf,
    len: usize,
    /// Pages handed to the kernel's page cache, one bit each.
    delivered: AtomicU64,
    /// Loaded by readahead and not yet read: its first hit is a readahead hit.
    unread_readahead: AtomicBool,
}

impl Chunk {
    pub fn bytes(&self) -> &[u8] {
        &self.buf.map.as_ref().expect("live buffer")[..self.len]
    }

    fn all_pages(&self) -> u64 {
        let pages = self.len.div_ceil(PAGE_SIZE);
        if pages == 64 {
            u64::MAX
        } else {
            (1u64 << pages) - 1
        }
    }

    /// The pages wholly inside `range` (bytes of this chunk; the chunk's end counts as a
    /// page end).
    fn pages_covered(&self, range: &Range<usize>) -> u64 {
        let first = range.start.div_ceil(PAGE_SIZE);
        let end = if range.end >= self.len {
            self.len.div_ceil(PAGE_SIZE)
        } else {
            range.end / PAGE_SIZE
        };
        (first..end).fold(0, |mask, page| mask | 1 << page)
    }
}

/// How a lookup was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// In memory.
    Hit,
    /// In memory, put there by readahead, and read for the first time.
    ReadaheadHit,
    /// Read from disk by this lookup.
    Miss,
    /// Not in memory; another thread was already reading it, and this lookup waited.
    Joined,
}

/// Counters since the cache was created, and its current size. Units and definitions:
/// `docs/statistics.md`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    pub capacity_bytes: u64,
    pub chunk_size: u64,
    pub bytes_cached: u64,
    pub chunks_cached: u64,
    pub hits: u64,
    pub readahead_hits: u64,
    pub misses: u64,
    pub joined: u64,
    pub evictions: u64,
    pub handed_to_page_cache: u64,
    pub readahead_chunks: u64,
}

#[derive(Default)]
struct Counters {
    bytes_cached: AtomicU64,
    hits: AtomicU64,
    readahead_hits: AtomicU64,
    misses: AtomicU64,
    joined: AtomicU64,
    evictions: AtomicU64,
    handed_to_page_cache: AtomicU64,
    readahead_chunks: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

type LoadResult = Result<Arc<Chunk>, i32>;

/// A chunk being read; waiters sleep on it until the reader publishes the result.
#[derive(Default)]
struct Loading {
    result: Mutex<Option<LoadResult>>,
    done: Condvar,
}

impl Loading {
    fn wait(&self) -> LoadResult {
        let mut result = self.result.lock();
        while result.is_none() {
            self.done.wait(&mut result);
        }
        result.clone().expect("set before notify")
    }
}

struct Shard {
    /// Each chunk occupies a whole `CHUNK_SIZE` buffer, so the count bounds the memory.
    chunks: LruCache<ChunkKey, Arc<Chunk>>,
    loading: HashMap<ChunkKey, Arc<Loading>>,
}

pub struct ChunkCache {
    shards: Box<[Mutex<Shard>]>,
    /// Chunks per shard: the shard's equal share of the capacity.
    shard_chunks: usize,
    spares: Arc<Mutex<Vec<MmapMut>>>,
    counters: Counters,
    /// Bumped when chunks are dropped wholesale (`clear`, `forget_image`): loads that started
    /// before hand their chunk to their waiters but do not cache it.
    generation: AtomicU64,
}

/// The right to load one chunk: other lookups of it wait until it is filled or dropped.
pub struct Claim<'a> {
    cache: &'a ChunkCache,
    key: ChunkKey,
    loading: Arc<Loading>,
    generation: u64,
    settled: bool,
}

impl Claim<'_> {
    pub fn key(&self) -> ChunkKey {
        self.key
    }

    /// Publishes the chunk's first `len` bytes of `buf`.
    pub fn fill(mut self, buf: ChunkBuf, len: usize, by_readahead: bool) -> Arc<Chunk> {
        let chunk = Arc::new(Chunk {
            buf,
            len,
            delivered: AtomicU64::new(0),
            unread_readahead: AtomicBool::new(by_readahead),
        });
        if by_readahead {
            bump(&self.cache.counters.readahead_chunks);
        }
        self.cache
            .publish(self.key, &self.loading, Ok(chunk.clone()), self.generation);
        self.settled = true;
        chunk
    }

    /// Gives up: waiters get `errno` (and read themselves if they may).
    pub fn fail(mut self, errno: i32) {
        self.cache
            .publish(self.key, &self.loading, Err(errno), self.generation);
        self.settled = true;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.settled {
            // A loader that returned early (or panicked) must not strand its waiters.
            self.cache
                .publish(self.key, &self.loading, Err(libc::EIO), self.generation);
        }
    }
}

impl ChunkCache {
    /// A cache of at most `capacity` bytes (at least `MIN_CACHE_SIZE`).
    pub fn new(capacity: u64) -> ChunkCache {
        let shard_chunks = capacity.max(MIN_CACHE_SIZE) as usize / SHARDS / CHUNK_SIZE;
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    chunks: LruCache::unbounded(),
                    loading: HashMap::new(),
                })
            })
            .collect();
        ChunkCache {
            shards,
            shard_chunks,
            spares: Arc::default(),
            counters: Counters::default(),
            generation: AtomicU64::new(0),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn capacity(&self) -> u64 {
        (self.shard_chunks * SHARDS * CHUNK_SIZE) as u64
    }

    /// A buffer to load a chunk into.
    pub fn buffer(&self) -> io::Result<ChunkBuf> {
        let map = match self.spares.lock().pop() {
            Some(map) => map,
            None => MmapMut::map_anon(CHUNK_SIZE)?,
        };
        Ok(ChunkBuf {
            map: Some(map),
            spares: self.spares.clone(),
        })
    }

    /// The chunk at `key`, from memory, from another thread's read, or read now with `load`
    /// (which fills the buffer and returns the number of valid bytes).
    pub fn get(
        &self,
        key: ChunkKey,
        load: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<(Arc<Chunk>, Found)> {
        let mut joins = 0;
        loop {
            let waiting_on = {
                let mut shard = self.shards[key.shard()].lock();
                if let Some(chunk) = shard.chunks.get(&key) {
                    let chunk = chunk.clone();
                    drop(shard);
                    bump(&self.counters.hits);
                    let found = if chunk.unread_readahead.swap(false, Ordering::Relaxed) {
                        bump(&self.counters.readahead_hits);
                        Found::ReadaheadHit
                    } else {
                        Found::Hit
                    };
                    return Ok((chunk, found));
                }
                match shard.loading.get(&key) {
                    Some(loading) if joins < MAX_JOINS => Some(loading.clone()),
                    _ => None,
                }
            };
            if let Some(loading) = waiting_on {
                joins += 1;
                if let Ok(chunk) = loading.wait() {
                    bump(&self.counters.misses);
                    bump(&self.counters.joined);
                    chunk.unread_readahead.store(false, Ordering::Relaxed);
                    return Ok((chunk, Found::Joined));
                }
                // The other read failed (readahead is best effort): look again, then read.
                continue;
            }
            let Some(claim) = self.claim_inner(key, joins >= MAX_JOINS) else {
                continue;
            };
            bump(&self.counters.misses);
            let mut buf = self.buffer()?;
            return match load(buf.as_mut_slice()) {
                Ok(len) => Ok((claim.fill(buf, len, false), Found::Miss)),
                Err(e) => {
                    claim.fail(e.raw_os_error().unwrap_or(libc::EIO));
                    Err(e)
                }
            };
        }
    }

    /// The right to load `key`, unless it is cached or already being loaded (readahead uses
    /// this to skip what is there).
    pub fn claim(&self, key: ChunkKey) -> Option<Claim<'_>> {
        self.claim_inner(key, false)
    }

    /// `claim` for a reader's request, which counts as a miss: a request claims the chunks that
    /// nobody has or is reading, so that it can read a run of them in one disk read.
    pub fn claim_miss(&self, key: ChunkKey) -> Option<Claim<'_>> {
        let claim = self.claim_inner(key, false)?;
        bump(&self.counters.misses);
        Some(claim)
    }

    /// `force`: take over even if another load is registered (after repeated failed joins).
    fn claim_inner(&self, key: ChunkKey, force: bool) -> Option<Claim<'_>> {
        let mut shard = self.shards[key.shard()].lock();
        if shard.chunks.contains(&key) || (!force && shard.loading.contains_key(&key)) {
            return None;
        }
        let loading = Arc::new(Loading::default());
        shard.loading.insert(key, loading.clone());
        Some(Claim {
            cache: self,
            key,
            loading,
            generation: self.generation(),
            settled: false,
        })
    }

    fn publish(&self, key: ChunkKey, loading: &Arc<Loading>, result: LoadResult, generation: u64) {
        let mut evicted = Vec::new();
        {
            let mut shard = self.shards[key.shard()].lock();
            if shard
                .loading
                .get(&key)
                .is_some_and(|l| Arc::ptr_eq(l, loading))
            {
                shard.loading.remove(&key);
            }
            let current = generation == self.generation();
            if let (Ok(chunk), true) = (&result, current) {
                if let Some((old_key, old)) = shard.chunks.push(key, chunk.clone()) {
                    // Only a forced load can race a published chunk; keep the accounting right.
                    if old_key == key {
                        self.uncount(&old);
                    }
                }
                self.counters
                    .bytes_cached
                    .fetch_add(chunk.len as u64, Ordering::Relaxed);
                while shard.chunks.len() > self.shard_chunks {
                    let Some((_, victim)) = shard.chunks.pop_lru() else {
                        break;
                    };
                    self.uncount(&victim);
                    bump(&self.counters.evictions);
                    // Freed outside the lock.
                    evicted.push(victim);
                }
            }
        }
        *loading.result.lock() = Some(result);
        loading.done.notify_all();
        drop(evicted);
    }

    fn uncount(&self, chunk: &Chunk) {
        self.counters
            .bytes_cached
            .fetch_sub(chunk.len as u64, Ordering::Relaxed);
    }

    /// Records that `range` (bytes of the chunk) went to the kernel's page cache; once all of
    /// its pages have, the chunk leaves the cache.
    pub fn handed_to_page_cache(&self, key: ChunkKey, chunk: &Arc<Chunk>, range: Range<usize>) {
        let pages = chunk.pages_covered(&range);
        if pages == 0 {
            return;
        }
        let all = chunk.all_pages();
        let before = chunk.delivered.fetch_or(pages, Ordering::Relaxed);
        if before & all == all || (before | pages) & all != all {
            return;
        }
        let mut shard = self.shards[key.shard()].lock();
        if shard
            .chunks
            .peek(&key)
            .is_some_and(|cached| Arc::ptr_eq(cached, chunk))
        {
            shard.chunks.pop(&key);
            self.uncount(chunk);
            bump(&self.counters.handed_to_page_cache);
        }
    }

    /// Drops every chunk of an image that left the pool.
    pub fn forget_image(&self, image: i64) {
        self.remove_where(|key| key.image == image);
    }

    /// Empties the cache (as `drop_caches` empties the kernel's), for cold measurements.
    pub fn clear(&self) {
        self.remove_where(|_| true);
    }

    fn remove_where(&self, doomed: impl Fn(&ChunkKey) -> bool) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let keys: Vec<ChunkKey> = shard
                .chunks
                .iter()
                .map(|(key, _)| *key)
                .filter(|key| doomed(key))
                .collect();
            for key in keys {
                if let Some(chunk) = shard.chunks.pop(&key) {
                    self.uncount(&chunk);
                }
            }
        }
    }

    #[cfg(test)]
    fn contains(&self, key: ChunkKey) -> bool {
        self.shards[key.shard()].lock().chunks.contains(&key)
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CacheStats {
            capacity_bytes: self.capacity(),
            chunk_size: CHUNK_SIZE as u64,
            bytes_cached: load(&c.bytes_cached),
            chunks_cached: self
                .shards
                .iter()
                .map(|s| s.lock().chunks.len() as u64)
                .sum(),
            hits: load(&c.hits),
            readahead_hits: load(&c.readahead_hits),
            misses: load(&c.misses),
            joined: load(&c.joined),
            evictions: load(&c.evictions),
            handed_to_page_cache: load(&c.handed_to_page_cache),
            readahead_chunks: load(&c.readahead_chunks),
        }
    }
}

/// Bytes of a read: one chunk's slice (no copy), or several chunks joined.
pub enum ReadData {
    Slice(Arc<Chunk>, Range<usize>),
    Owned(Vec<u8>),
}

impl Deref for ReadData {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            ReadData::Slice(chunk, range) => &chunk.bytes()[range.clone()],
            ReadData::Owned(bytes) => bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Barrier;
    use std::time::Duration;

    fn key(index: u64) -> ChunkKey {
        ChunkKey { image: 1, index }
    }

    /// Fills a chunk with its index, so that a wrong chunk shows.
    fn load_index(index: u64) -> impl FnOnce(&mut [u8]) -> io::Result<usize> {
        move |buf| {
            buf.fill(index as u8);
            Ok(CHUNK_SIZE)
        }
    }

    /// Keys that all fall in one shard, to test one LRU's order.
    fn same_shard_keys(n: usize) -> Vec<ChunkKey> {
        let shard = key(0).shard();
        (0..)
            .map(key)
            .filter(|k| k.shard() == shard)
            .take(n)
            .collect()
    }

    #[test]
    fn a_shard_evicts_its_least_recently_used_chunk() {
        // Capacity for 2 chunks per shard.
        let cache = ChunkCache::new(2 * MIN_CACHE_SIZE);
        let keys = same_shard_keys(3);
        for k in &keys[..2] {
            assert_eq!(cache.get(*k, load_index(k.index)).unwrap().1, Found::Miss);
        }
        // Touch the first, so the second is the least recently used.
        assert_eq!(cache.get(keys[0], load_index(99)).unwrap().1, Found::Hit);
        cache.get(keys[2], load_index(keys[2].index)).unwrap();
        assert!(cache.contains(keys[0]));
        assert!(!cache.contains(keys[1]), "the LRU chunk is evicted");
        assert!(cache.contains(keys[2]));
        let (chunk, found) = cache.get(keys[0], load_index(99)).unwrap();
        assert_eq!(found, Found::Hit);
        assert!(chunk.bytes().iter().all(|b| *b == keys[0].index as u8));
        assert_eq!(cache.stats().evictions, 1);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity() {
        let capacity = 4 * MIN_CACHE_SIZE;
        let cache = ChunkCache::new(capacity);
        for index in 0..2000 {
            cache.get(key(index), load_index(index)).unwrap();
            let stats = cache.stats();
            assert!(stats.bytes_cached <= capacity, "{stats:?}");
        }
        let stats = cache.stats();
        assert!(stats.bytes_cached > capacity / 2, "{stats:?}");
        assert_eq!(stats.misses, 2000);
        assert_eq!(stats.chunks_cached + stats.evictions, 2000);
        assert_eq!(stats.bytes_cached, stats.chunks_cached * CHUNK_SIZE as u64);
    }

    #[test]
    fn concurrent_misses_on_one_chunk_read_the_disk_once() {
        let cache = ChunkCache::new(MIN_CACHE_SIZE);
        let reads = AtomicUsize::new(0);
        let threads = 8;
        let start = Barrier::new(threads);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    start.wait();
                    let (chunk, _) = cache
                        .get(key(7), |buf| {
                            reads.fetch_add(1, Ordering::SeqCst);
                            // Slow enough that every other thread arrives while it reads.
                            std::thread::sleep(Duration::from_millis(200));
                            buf.fill(7);
                            Ok(CHUNK_SIZE)
                        })
                        .unwrap();
                    assert!(chunk.bytes().iter().all(|b| *b == 7));
                });
            }
        });
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        // A thread that a busy machine ran only after the read finished finds a cached chunk.
        let stats = cache.stats();
        assert_eq!(stats.misses - stats.joined, 1, "{stats:?}");
        assert_eq!(stats.joined + stats.hits, threads as u64 - 1, "{stats:?}");
        assert!(stats.joined > 0, "{stats:?}");
    }

    #[test]
    fn a_failed_load_is_not_cached_and_waiters_read_again() {
        let cache = ChunkCache::new(MIN_CACHE_SIZE);
        let err = cache
            .get(key(1), |_| Err(io::Error::from_raw_os_error(libc::EIO)))
            .err()
            .unwrap();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(!cache.contains(key(1)));

        // A waiter on a failed (readahead) claim loads the chunk itself.
        let claim = cache.claim(key(2)).unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| cache.get(key(2), load_index(2)).unwrap());
            std::thread::sleep(Duration::from_millis(50));
            claim.fail(libc::EIO);
            let (chunk, found) = waiter.join().unwrap();
            assert_eq!(found, Found::Miss);
            assert_eq!(chunk.bytes()[0], 2);
        });
    }

    #[test]
    fn readahead_chunks_count_one_readahead_hit() {
        let cache = ChunkCache::new(MIN_CACHE_SIZE);
        assert!(cache.claim(key(3)).is_some(), "a dropped claim is released");
        let claim = cache.claim(key(3)).unwrap();
        assert!(cache.claim(key(3)).is_none(), "one claim at a time");
        let mut buf = cache.buffer().unwrap();
        buf.as_mut_slice().fill(3);
        claim.fill(buf, 100, true);
        assert!(
            cache.claim(key(3)).is_none(),
            "cached chunks are not claimed"
        );
        assert_eq!(
            cache.get(key(3), load_index(9)).unwrap().1,
            Found::ReadaheadHit
        );
        let (chunk, found) = cache.get(key(3), load_index(9)).unwrap();
        assert_eq!(found, Found::Hit);
        assert_eq!(chunk.bytes(), &[3u8; 100][..]);
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.readahead_hits), (2, 1));
        assert_eq!(stats.readahead_chunks, 1);
        assert_eq!(stats.bytes_cached, 100);
    }

    #[test]
    fn a_chunk_leaves_once_the_page_cache_holds_all_its_pages() {
        let cache = ChunkCache::new(MIN_CACHE_SIZE);
        let (chunk, _) = cache.get(key(4), load_index(4)).unwrap();
        cache.handed_to_page_cache(key(4), &chunk, 0..CHUNK_SIZE / 2);
        // A partial page does not count.
        cache.handed_to_page_cache(key(4), &chunk, CHUNK_SIZE / 2..CHUNK_SIZE - 1);
        assert!(cache.contains(key(4)));
        cache.handed_to_page_cache(key(4), &chunk, CHUNK_SIZE - PAGE_SIZE..CHUNK_SIZE);
        assert!(!cache.contains(key(4)));
        let stats = cache.stats();
        assert_eq!(stats.handed_to_page_cache, 1);
        assert_eq!((stats.chunks_cached, stats.bytes_cached), (0, 0));

        // The last chunk of an image ends mid-page: its tail counts as a whole page.
        let (tail, _) = cache.get(key(5), |_| Ok(PAGE_SIZE + 10)).unwrap();
        cache.handed_to_page_cache(key(5), &tail, 0..PAGE_SIZE + 10);
        assert!(!cache.contains(key(5)));
    }

    #[test]
    fn forgetting_an_image_drops_only_its_chunks_and_clear_drops_all() {
        let cache = ChunkCache::new(MIN_CACHE_SIZE * 4);
        for index in 0..10 {
            cache.get(key(index), load_index(index)).unwrap();
            cache
                .get(ChunkKey { image: 2, index }, load_index(index))
                .unwrap();
        }
        cache.forget_image(1);
        assert!((0..10).all(|i| !cache.contains(key(i))));
        assert!((0..10).all(|index| cache.contains(ChunkKey { image: 2, index })));
        assert_eq!(cache.stats().chunks_cached, 10);
        // A load in flight while the cache is emptied serves its reader but is not kept.
        let claim = cache.claim(key(50)).unwrap();
        cache.clear();
        assert_eq!(
            (cache.stats().chunks_cached, cache.stats().bytes_cached),
            (0, 0)
        );
        let chunk = claim.fill(cache.buffer().unwrap(), 10, false);
        assert_eq!(chunk.bytes().len(), 10);
        assert!(!cache.contains(key(50)));
    }
}
