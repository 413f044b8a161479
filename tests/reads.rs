//! Fast reads through a real mount: many concurrent readers (buffered, O_DIRECT, mmap) in
//! cached and passthrough mode, compared byte for byte with the source; the chunk cache's
//! byte bound and statistics as `imgpool status` reports them; the image held in RAM once.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use common::*;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug)]
enum Reader {
    Buffered,
    Direct,
    Mmap,
}

/// `reads` random ranges of `path` with one kind of reader, each compared with `expected`.
fn read_randomly(path: &Path, expected: &[u8], reader: Reader, seed: u64, reads: usize) {
    let size = expected.len() as u64;
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    match reader {
        Reader::Buffered => {
            let file = File::open(path).unwrap();
            for _ in 0..reads {
                let offset = rng.below(size);
                let len = 1 + rng.below(300_000) as usize;
                let got = pread(&file, offset, len).unwrap();
                let end = (offset as usize + len).min(expected.len());
                assert!(
                    got == expected[offset as usize..end],
                    "buffered read of {path:?} at {offset}+{len}"
                );
            }
        }
        Reader::Direct => {
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .unwrap();
            // O_DIRECT wants page-aligned memory, offsets and lengths.
            let mut buf = memmap2::MmapMut::map_anon(256 * 1024).unwrap();
            for _ in 0..reads {
                let offset = rng.below(size / PAGE) * PAGE;
                let len = ((1 + rng.below(64)) * PAGE) as usize;
                let n = file.read_at(&mut buf[..len], offset).unwrap();
                let end = (offset as usize + len).min(expected.len());
                assert_eq!(n, end - offset as usize, "O_DIRECT length at {offset}");
                assert!(
                    buf[..n] == expected[offset as usize..end],
                    "O_DIRECT read of {path:?} at {offset}+{len}"
                );
            }
        }
        Reader::Mmap => {
            let file = File::open(path).unwrap();
            // SAFETY: a read-only image that nothing modifies while mapped.
            let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
            for _ in 0..reads {
                let offset = rng.below(size) as usize;
                let end = (offset + 1 + rng.below(200_000) as usize).min(expected.len());
                assert!(
                    map[offset..end] == expected[offset..end],
                    "mmap read of {path:?} at {offset}..{end}"
                );
            }
        }
    }
}

/// Eight threads, every kind of reader, over every view of the image.
fn many_threads_read(paths: &[PathBuf], expected: &[u8]) {
    let readers = [
        Reader::Buffered,
        Reader::Direct,
        Reader::Mmap,
        Reader::Direct,
        Reader::Buffered,
        Reader::Direct,
        Reader::Mmap,
        Reader::Direct,
    ];
    std::thread::scope(|s| {
        for (i, reader) in readers.into_iter().enumerate() {
            let path = &paths[i % paths.len()];
            s.spawn(move || read_randomly(path, expected, reader, i as u64 + 1, 300));
        }
    });
}

/// The statistics the mount's daemon publishes, once `ready` holds for them (they are
/// rewritten every second).
fn mount_stats(pool: &TestPool, ready: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let seen = wait_until(Duration::from_secs(10), || {
        last = pool.json(&["status"])["mounts"][0]["stats"].clone();
        !last.is_null() && ready(&last)
    });
    assert!(seen, "the mount's statistics never got there: {last}");
    last
}

/// Seconds since the epoch, as the statistics' `updated` field counts them.
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Statistics written after this moment (they are up to a second old).
fn stats_written_after(pool: &TestPool, secs: u64) -> Value {
    mount_stats(pool, |s| counter(s, &["updated"]) > secs)
}

fn counter(stats: &Value, path: &[&str]) -> u64 {
    let mut v = stats;
    for key in path {
        v = &v[*key];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("no counter {path:?} in {stats}"))
}

/// Pages of `path` in the page cache (mincore over a mapping, which faults nothing in).
fn resident_pages(path: &Path) -> usize {
    let file = File::open(path).unwrap();
    // SAFETY: read-only mapping of a file nothing writes; only its residency is queried.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let pages = map.len().div_ceil(PAGE as usize);
    let mut vec = vec![0u8; pages];
    // SAFETY: `map` covers `map.len()` bytes and `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|v| *v & 1 == 1).count()
}

fn copy_files(pool: &TestPool) -> Vec<PathBuf> {
    pool.disks
        .iter()
        .flat_map(|d| std::fs::read_dir(d.join(".imgpool/copies")).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "img"))
        .collect()
}

#[test]
fn many_threads_read_random_ranges_byte_for_byte_in_cached_mode() {
    if !can_mount("many_threads_read_random_ranges_byte_for_byte_in_cached_mode") {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    // Not a multiple of the page or chunk size: the last chunk is short.
    random_file(&source, 40 * MIB + 12_345, 21);
    let uuid = pool.add_image("img", &source, 2);
    let expected = std::fs::read(&source).unwrap();
    // A cache far smaller than the image: the readers force evictions while they race.
    let cache = 4 * MIB;
    let mount = pool.mount_with(&["--cache-size", "4MiB"]);
    let paths = vec![
        mount.image("img"),
        mount.disk_view("d1", "img", &uuid),
        mount.bound_view(&pool.disks[1], "img", &uuid),
    ];
    many_threads_read(&paths, &expected);

    let stats = stats_written_after(&pool, now_secs());
    assert_eq!(stats["io_mode"], "cached");
    assert!(
        counter(&stats, &["read", "cache", "bytes_cached"]) <= cache,
        "{stats}"
    );
    assert!(
        counter(&stats, &["read", "cache", "evictions"]) > 0,
        "{stats}"
    );
    assert!(counter(&stats, &["read", "cache", "hits"]) > 0, "{stats}");
    mount.unmount();
}

#[test]
fn many_threads_read_random_ranges_byte_for_byte_in_passthrough_mode() {
    let test = "many_threads_read_random_ranges_byte_for_byte_in_passthrough_mode";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, 24 * MIB + 100, 22);
    let uuid = pool.add_image("img", &source, 1);
    let expected = std::fs::read(&source).unwrap();
    let mount = pool.mount_with(&["--io-mode", "passthrough"]);
    let stats = mount_stats(&pool, |_| true);
    if stats["io_mode"] != "passthrough" {
        let log = std::fs::read_to_string(pool.state.join("mount.log")).unwrap_or_default();
        assert!(
            !kernel_has_passthrough(),
            "the kernel has passthrough but the mount fell back to cached: {log}"
        );
        eprintln!("SKIPPED {test}: the kernel lacks FUSE passthrough (Linux < 6.9)");
        mount.unmount();
        return;
    }
    let paths = vec![
        mount.image("img"),
        mount.disk_view("d2", "img", &uuid),
        mount.bound_view(&pool.disks[0], "img", &uuid),
    ];
    many_threads_read(&paths, &expected);
    assert_eq!(sha512sum(&paths[1]), sha512sum(&source));

    // The kernel read the copy itself: no read reached the daemon.
    let stats = stats_written_after(&pool, now_secs());
    assert_eq!(counter(&stats, &["read", "requests"]), 0, "{stats}");
    mount.unmount();
}

#[test]
fn cache_statistics_move_as_reads_happen_and_the_image_is_held_once() {
    if !can_mount("cache_statistics_move_as_reads_happen_and_the_image_is_held_once") {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, 16 * MIB, 23);
    pool.add_image("img", &source, 1);
    let holder = pool.json(&["image", "show", "img"])["copies"][0]["disk"]
        .as_str()
        .unwrap()
        .to_string();
    let other = if holder == "d1" { "d2" } else { "d1" };
    let mount = pool.mount();
    let image = mount.image("img");
    let expected = std::fs::read(&source).unwrap();

    // O_DIRECT readers: the kernel keeps nothing, so a second read of a chunk is a cache hit.
    let direct = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&image)
        .unwrap();
    let mut buf = memmap2::MmapMut::map_anon(64 * 1024).unwrap();
    let offset = 8 * MIB;
    for _ in 0..2 {
        direct.read_at(&mut buf[..], offset).unwrap();
        assert!(buf[..] == expected[offset as usize..offset as usize + buf.len()]);
    }
    let stats = mount_stats(&pool, |s| counter(s, &["read", "requests"]) >= 2);
    let cache = &stats["read"]["cache"];
    assert_eq!(counter(cache, &["misses"]), 1, "{stats}");
    assert_eq!(counter(cache, &["hits"]), 1, "{stats}");
    assert_eq!(counter(cache, &["chunks_cached"]), 1, "{stats}");
    assert_eq!(counter(cache, &["bytes_cached"]), 64 * 1024, "{stats}");
    assert_eq!(
        counter(&stats, &["read", "disk_read_bytes", &holder]),
        64 * 1024
    );
    assert!(stats["read"]["disk_read_bytes"][other].is_null(), "{stats}");

    // A sequential reader through the page cache: readahead runs ahead of it, and every
    // chunk it was handed leaves the cache, which the kernel now holds.
    assert_eq!(sha512sum(&image), sha512sum(&source));
    let stats = mount_stats(&pool, |s| {
        counter(s, &["read", "bytes_served"]) >= 16 * MIB + 2 * 64 * 1024
    });
    let cache = &stats["read"]["cache"];
    assert!(counter(cache, &["readahead_hits"]) > 0, "{stats}");
    assert!(counter(&stats, &["read", "readahead_bytes"]) > 0, "{stats}");
    assert!(counter(cache, &["handed_to_page_cache"]) >= 255, "{stats}");
    // What stays: the O_DIRECT reader's chunk, and at most a chunk or two that readahead
    // loaded while the reader was passing it.
    assert!(counter(cache, &["chunks_cached"]) <= 3, "{stats}");

    // Held once: the page cache has the mount's pages, not the copy file's (tmpfs has no
    // O_DIRECT and keeps every file in memory: nothing to check there).
    let copies = copy_files(&pool);
    assert_eq!(copies.len(), 1);
    let on_tmpfs = nix::sys::statfs::statfs(&copies[0])
        .unwrap()
        .filesystem_type()
        == nix::sys::statfs::TMPFS_MAGIC;
    if on_tmpfs {
        eprintln!("the pool is on tmpfs: not checking the copy file's page cache");
    } else {
        assert_eq!(
            resident_pages(&copies[0]),
            0,
            "the copy file's pages are cached too"
        );
    }
    // The kernel may skip or drop a few pages (seen: 4075 of 4096); the image is there.
    let resident = resident_pages(&image) as u64;
    assert!(
        resident >= 16 * MIB / PAGE * 95 / 100,
        "{resident} pages of the mount's file cached"
    );

    let text = pool.ok(&["status"]);
    assert!(text.contains("io mode: cached"), "{text}");
    assert!(
        text.contains("hits") && text.contains(&format!("{holder} ")),
        "{text}"
    );

    // `imgpool cache drop` empties the cache (what the benchmark does before a cold run).
    direct.read_at(&mut buf[..], offset).unwrap();
    mount_stats(&pool, |s| {
        counter(s, &["read", "cache", "chunks_cached"]) >= 1
    });
    pool.ok(&["cache", "drop"]);
    mount_stats(&pool, |s| {
        counter(s, &["read", "cache", "chunks_cached"]) == 0
    });
    drop(direct);
    mount.unmount();
}

/// Two mounts of one pool (as the benchmark makes them) each probe every disk every second;
/// when their probes overlapped, one read the other's token and failed the disk holding an
/// image's only copy.
#[test]
fn two_mounts_of_one_pool_probing_every_second_serve_a_minute_of_reads_without_an_error() {
    let test =
        "two_mounts_of_one_pool_probing_every_second_serve_a_minute_of_reads_without_an_error";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(2);
    pool.ok(&["config", "set", "probe-interval", "1s"]);
    let source = pool.path("src.img");
    random_file(&source, 8 * MIB + 4321, 23);
    let uuid = pool.add_image("img", &source, 1);
    let expected = std::fs::read(&source).unwrap();
    let first = pool.mount_with(&["--cache-size", "4MiB"]);
    let second = pool.mount_at("mnt2", &["--no-bind", "--cache-size", "4MiB"]);
    let paths = [
        first.image("img"),
        second.image("img"),
        first.bound_view(&pool.disks[0], "img", &uuid),
        second.disk_view("d2", "img", &uuid),
    ];
    // O_DIRECT readers and small caches: the reads keep reaching both daemons and the disk.
    let until = std::time::Instant::now() + Duration::from_secs(60);
    std::thread::scope(|s| {
        for (i, path) in paths.iter().enumerate() {
            let expected = &expected;
            s.spawn(move || {
                let mut round = 0;
                while std::time::Instant::now() < until {
                    let reader = if i % 2 == 0 {
                        Reader::Direct
                    } else {
                        Reader::Buffered
                    };
                    read_randomly(path, expected, reader, (i * 1000 + round) as u64, 50);
                    round += 1;
                }
            });
        }
    });

    let disks = pool.json(&["disk", "list"]);
    for disk in disks.as_array().unwrap() {
        assert_eq!(disk["state"], "healthy", "{disks}");
    }
    let log = std::fs::read_to_string(pool.state.join("mount.log")).unwrap();
    assert!(
        !log.contains("failed a probe") && !log.contains("failed its probe"),
        "a probe failed: {log}"
    );
    second.unmount();
    first.unmount();
}

#[test]
fn bad_mount_options_are_refused_with_one_line() {
    let pool = TestPool::new(1);
    let mountpoint = pool.path("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let mnt = mountpoint.to_str().unwrap();
    for (args, needle) in [
        (vec!["--cache-size", "1M"], "smallest cache"),
        (vec!["--cache-size", "lots"], "not a size"),
        (vec!["--io-mode", "turbo"], "turbo"),
        (vec!["--read-ahead", "1Q"], "unknown unit"),
    ] {
        let mut all = vec!["mount", mnt];
        all.extend(args);
        let out = pool.run(&all);
        assert_eq!(out.status.code(), Some(2), "{all:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{all:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(!is_mount_point(&mountpoint));
}
