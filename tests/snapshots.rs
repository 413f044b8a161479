//! Snapshots through a real mount: `snapshots/<volume>/<snapshot>` read with real clients
//! (sha512sum, O_DIRECT, mmap, SEEK_DATA/SEEK_HOLE, e2fsck, a read-only ext4 mount), snapshots
//! taken every 100 ms under running writers, an ext4 filesystem rolled back, and a snapshot
//! being read kept from deletion.

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// Runs a command that must fail cleanly (one line, exit 1) with a message naming each of
/// `expected`.
fn refused(pool: &TestPool, what: &str, args: &[&str], expected: &[&str]) {
    let line = failed_cleanly(what, &pool.run(args));
    for text in expected {
        assert!(line.contains(text), "{what}: {line}");
    }
}

/// One write of the writers: blocks `first..first + count`, each stamped with its block number
/// and the write's sequence number, between `start` and `end`.
struct Write {
    first: u64,
    count: u64,
    start: Instant,
    end: Instant,
}

/// A block as a writer stamps it: 16-byte words of (block, seq), seq > 0. A sequence number
/// carries its writer in its top bits.
fn stamp(block: u64, seq: u64, out: &mut [u8]) {
    for word in out.chunks_mut(16) {
        word[..8].copy_from_slice(&block.to_le_bytes());
        word[8..].copy_from_slice(&seq.to_le_bytes());
    }
}

/// The (block, seq) a block holds, (0, 0) for zeros; panics on a block that is not one write's
/// whole stamp.
fn unstamp(at: u64, data: &[u8], what: &str) -> (u64, u64) {
    let first = &data[..16];
    assert!(
        data.chunks(16).all(|w| w == first),
        "{what}: block {at} mixes writes (torn)"
    );
    let block = u64::from_le_bytes(first[..8].try_into().unwrap());
    let seq = u64::from_le_bytes(first[8..].try_into().unwrap());
    (block, seq)
}

const WRITER_SHIFT: u32 = 40;

/// Writes stamped runs of 1 to 4 blocks at random places of `blocks` until `stop`, each one
/// `pwrite`; returns every write, in order (write n has seq `writer << 40 | n + 1`).
fn writer(path: &Path, writer: u64, blocks: std::ops::Range<u64>, stop: &AtomicBool) -> Vec<Write> {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    let mut rng = writer.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut writes = Vec::new();
    let mut buf = vec![0u8; 4 * BLOCK as usize];
    while !stop.load(Ordering::Relaxed) {
        let first = blocks.start + next() % (blocks.end - blocks.start);
        let count = (1 + next() % 4).min(blocks.end - first);
        let seq = (writer << WRITER_SHIFT) | (writes.len() as u64 + 1);
        for (i, chunk) in buf[..(count * BLOCK) as usize]
            .chunks_mut(BLOCK as usize)
            .enumerate()
        {
            stamp(first + i as u64, seq, chunk);
        }
        let start = Instant::now();
        file.write_all_at(&buf[..(count * BLOCK) as usize], first * BLOCK)
            .unwrap();
        writes.push(Write {
            first,
            count,
            start,
            end: Instant::now(),
        });
    }
    writes
}

/// Snapshots taken every 100 ms through the CLI while two writers write stamped blocks: each
/// snapshot, read through the mount afterwards, holds every write that returned before its
/// command started, none that started after its command returned, and each write whole or not
/// at all.
#[test]
fn snapshots_taken_every_100_ms_under_writers_hold_states_that_existed() {
    if !can_mount("snapshots_taken_every_100_ms_under_writers_hold_states_that_existed") {
        return;
    }
    let pool = TestPool::new(1);
    let blocks = 512u64;
    pool.ok(&[
        "volume",
        "create",
        "v",
        "--size",
        &(blocks * BLOCK).to_string(),
    ]);
    let mount = pool.mount();
    let path = mount.mountpoint.join("volumes/v");
    let snapshot_path = |i: usize| mount.mountpoint.join(format!("snapshots/v/s{i}"));
    let stop = AtomicBool::new(false);
    let mut taken: Vec<(Instant, Instant)> = Vec::new();
    let mut read_while_writing = None;
    let logs: Vec<Vec<Write>> = std::thread::scope(|s| {
        let writers: Vec<_> = [(1, 0..blocks / 2), (2, blocks / 2..blocks)]
            .into_iter()
            .map(|(id, range)| {
                let (path, stop) = (&path, &stop);
                s.spawn(move || writer(path, id, range, stop))
            })
            .collect();
        // Whatever the test's outcome, the writers stop.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        std::thread::sleep(Duration::from_millis(200));
        let begun = Instant::now();
        for i in 0..30 {
            let start = Instant::now();
            pool.ok(&["snapshot", "create", &format!("v@s{i}")]);
            taken.push((start, Instant::now()));
            if i == 10 {
                // A snapshot read while the volume is written reads as it does afterwards.
                read_while_writing = Some(std::fs::read(snapshot_path(0)).unwrap());
            }
            let next = begun + Duration::from_millis(100 * (i as u64 + 1));
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let total: usize = logs.iter().map(Vec::len).sum();
    assert!(total > 300, "the writers wrote only {total} times");

    // For each block, the writes that covered it, in order (one writer per block).
    let mut by_block: Vec<Vec<u64>> = vec![Vec::new(); blocks as usize];
    for (w, log) in logs.iter().enumerate() {
        for (n, write) in log.iter().enumerate() {
            let seq = ((w as u64 + 1) << WRITER_SHIFT) | (n as u64 + 1);
            for b in write.first..write.first + write.count {
                by_block[b as usize].push(seq);
            }
        }
    }
    let write_of = |seq: u64| -> &Write {
        let log = &logs[(seq >> WRITER_SHIFT) as usize - 1];
        &log[(seq & ((1 << WRITER_SHIFT) - 1)) as usize - 1]
    };
    let mut changed_between_snapshots = 0;
    let mut previous: Option<Vec<u8>> = None;
    for (i, (started, returned)) in taken.iter().enumerate() {
        let what = format!("snapshot s{i}");
        let content = std::fs::read(snapshot_path(i)).unwrap();
        assert_eq!(content.len() as u64, blocks * BLOCK, "{what}: size");
        let seqs: Vec<u64> = (0..blocks)
            .map(|b| {
                let at = (b * BLOCK) as usize;
                let (block, seq) = unstamp(b, &content[at..at + BLOCK as usize], &what);
                assert!(
                    seq == 0 || block == b,
                    "{what}: block {b} holds block {block}"
                );
                seq
            })
            .collect();
        for b in 0..blocks as usize {
            let seq = seqs[b];
            // The last write to the block that had returned before the command started.
            let returned_before = by_block[b]
                .iter()
                .copied()
                .filter(|s| write_of(*s).end < *started)
                .max()
                .unwrap_or(0);
            assert!(
                seq >= returned_before,
                "{what}: block {b} lost write {returned_before:#x} that returned before the snapshot began (holds {seq:#x})"
            );
            if seq != 0 {
                assert!(
                    by_block[b].contains(&seq),
                    "{what}: block {b}: {seq:#x} never wrote it"
                );
                let write = write_of(seq);
                assert!(
                    write.start < *returned,
                    "{what}: block {b} holds write {seq:#x}, which started after the snapshot returned"
                );
                // Whole: every other block of that write holds it, or a later one.
                for other in write.first..write.first + write.count {
                    assert!(
                        seqs[other as usize] >= seq,
                        "{what}: write {seq:#x} is in block {b} but not in block {other}"
                    );
                }
            }
        }
        if let Some(previous) = &previous {
            if previous != &content {
                changed_between_snapshots += 1;
            }
        }
        if i == 0 {
            assert!(
                read_while_writing.as_ref() == Some(&content),
                "s0 read differently while the volume was written"
            );
        }
        previous = Some(content);
    }
    assert!(
        changed_between_snapshots >= 20,
        "only {changed_between_snapshots} snapshots differ from the one before"
    );
    mount.unmount();
}

/// The whole volume of `blocks` blocks, each block stamped with (block, generation).
fn generation(blocks: u64, generation: u64) -> Vec<u8> {
    let mut data = vec![0u8; (blocks * BLOCK) as usize];
    for (b, chunk) in data.chunks_mut(BLOCK as usize).enumerate() {
        stamp(b as u64, generation, chunk);
    }
    data
}

/// A snapshot file read in a loop through the mount keeps its bytes while the snapshots around
/// it are deleted, their space is reclaimed by the daemon and handed out again to new writes;
/// deleting it is refused the whole time.
#[test]
fn a_snapshot_being_read_keeps_its_bytes_while_others_are_deleted_and_reclaimed() {
    if !can_mount("a_snapshot_being_read_keeps_its_bytes_while_others_are_deleted_and_reclaimed") {
        return;
    }
    let pool = TestPool::new(1);
    let blocks = 512u64;
    pool.ok(&[
        "volume",
        "create",
        "v",
        "--size",
        &(blocks * BLOCK).to_string(),
    ]);
    let mount = pool.mount();
    let live = OpenOptions::new()
        .write(true)
        .open(mount.mountpoint.join("volumes/v"))
        .unwrap();
    for g in 0..20 {
        live.write_all_at(&generation(blocks, g), 0).unwrap();
        pool.ok(&["snapshot", "create", &format!("v@s{g}")]);
    }
    let held = mount.mountpoint.join("snapshots/v/s10");
    let expected = generation(blocks, 10);
    let allocated = || {
        pool.json(&["volume", "show", "v"])["allocated_bytes"]
            .as_u64()
            .unwrap()
    };
    let stop = AtomicBool::new(false);
    let reads = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let file = File::open(&held).unwrap();
            let (mut reads, mut changed) = (0, None);
            // Held open to the end, whatever it reads.
            while !stop.load(Ordering::Relaxed) {
                // O_DIRECT would do too; plain reads with the kernel's cache dropped each time.
                let content = pread(&file, 0, expected.len()).unwrap();
                // SAFETY: posix_fadvise on an open descriptor.
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                if content != expected && changed.is_none() {
                    let at = content.iter().zip(&expected).position(|(a, b)| a != b);
                    changed = Some(format!("s10 changed under its reader at byte {at:?}"));
                }
                reads += 1;
            }
            changed.map_or(Ok(reads), Err)
        });
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        // Wait for the reader's open to reach the daemon.
        assert!(poll(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || {
                !pool
                    .run(&["snapshot", "rm", "v@s10", "--dry-run"])
                    .status
                    .success()
            }
        ));
        let before = allocated();
        pool.ok(&["snapshot", "rm", "v@s0%s9"]);
        pool.ok(&["snapshot", "rm", "v@s11%s19"]);
        // The daemon reclaims in the background: the data file shrinks to the live volume and
        // s10.
        assert!(
            poll(Duration::from_secs(20), Duration::from_millis(50), || {
                allocated() <= 2 * blocks * BLOCK + 256 * 1024
            }),
            "the space was not reclaimed: {before} bytes before, {} now",
            allocated()
        );
        // `volume show` and `status` tell the reclaim still to do: none once it is done.
        let pending = || pool.json(&["volume", "show", "v"])["reclaim_pending_bytes"].as_u64();
        assert!(
            poll(
                Duration::from_secs(20),
                Duration::from_millis(50),
                || pending() == Some(0)
            ),
            "volume show says {:?} bytes still to reclaim",
            pending()
        );
        assert_eq!(
            pool.json(&["status"])["volumes"]["reclaim_pending_bytes"],
            0
        );
        // Freed slots handed out again: each snapshot makes the next writes take new slots.
        for g in 100..110 {
            pool.ok(&["snapshot", "create", &format!("v@t{g}")]);
            live.write_all_at(&generation(blocks, g), 0).unwrap();
            pool.ok(&["snapshot", "rm", &format!("v@t{g}")]);
            refused(
                &pool,
                "rm of s10 while it is read",
                &["snapshot", "rm", "v", "--keep-last", "0"],
                &["'s10'", "open"],
            );
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap()
    });
    let reads = reads.unwrap();
    assert!(reads >= 10, "the reader read s10 only {reads} times");
    drop(live);
    wait_closed(&pool, "v");
    assert!(std::fs::read(&held).unwrap() == expected);
    mount.unmount();
}

/// `fsfreeze -u` on drop: a test that fails with the filesystem frozen does not leave it so.
struct Frozen(PathBuf);

impl Frozen {
    fn new(mountpoint: &Path) -> Frozen {
        run_ok(Command::new("fsfreeze").arg("-f").arg(mountpoint));
        Frozen(mountpoint.to_path_buf())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.0).status();
    }
}

/// A tree of files of a given generation: names and contents differ by generation.
fn write_tree(root: &Path, generation: u8, files: usize) {
    for i in 0..files {
        let dir = root.join(format!("d{}", i % 3));
        std::fs::create_dir_all(&dir).unwrap();
        let len = 500 + i * 7_001;
        let content: Vec<u8> = (0..len).map(|j| (j as u8) ^ generation ^ i as u8).collect();
        std::fs::write(dir.join(format!("f{i}")), content).unwrap();
    }
}

/// Every regular file under `root` with its content, by path relative to `root`.
fn read_tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name() == Some("lost+found".as_ref()) {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else {
                let content = std::fs::read(&path).unwrap();
                files.push((path.strip_prefix(root).unwrap().to_path_buf(), content));
            }
        }
    }
    files.sort();
    files
}

/// ext4 on a volume: a snapshot taken with the filesystem frozen checks clean with `e2fsck -fn`
/// and mounts (read-only) with the files it had, while the volume is written on; a rollback is
/// refused while that snapshot is being read, and afterwards brings the filesystem back to
/// exactly those files.
#[test]
fn ext4_on_a_volume_snapshotted_frozen_checked_and_rolled_back() {
    if !can_mount("ext4_on_a_volume_snapshotted_frozen_checked_and_rolled_back") {
        return;
    }
    let pool = TestPool::new(1);
    pool.ok(&["volume", "create", "fs", "--size", "64MiB"]);
    let mount = pool.mount();
    let volume = mount.mountpoint.join("volumes/fs");
    let snapshot = mount.mountpoint.join("snapshots/fs/first");
    let fs_mnt = pool.path("fsmnt");
    let first_files;
    let snapshot_loop;
    {
        let volume_loop = LoopFile::attach(&volume);
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&volume_loop.device),
        );
        let _mounted = Mounted::new(&volume_loop.device, &fs_mnt);
        write_tree(&fs_mnt, 1, 12);
        first_files = read_tree(&fs_mnt);
        {
            let _frozen = Frozen::new(&fs_mnt);
            pool.ok(&["snapshot", "create", "fs@first"]);
        }
        // The filesystem goes on: files rewritten, added and removed.
        write_tree(&fs_mnt, 2, 16);
        std::fs::remove_file(fs_mnt.join("d0/f0")).unwrap();
        run_ok(Command::new("sync").arg("-f").arg(&fs_mnt));
        assert_ne!(read_tree(&fs_mnt), first_files);

        // The snapshot, while its volume is mounted and written: clean, and the first files.
        snapshot_loop = LoopFile::attach_read_only(&snapshot);
        run_ok(Command::new("e2fsck").arg("-fn").arg(&snapshot_loop.device));
        let snap_mnt = pool.path("snapmnt");
        std::fs::create_dir_all(&snap_mnt).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-o", "ro,noload"])
                .arg(&snapshot_loop.device)
                .arg(&snap_mnt),
        );
        let in_snapshot = read_tree(&snap_mnt);
        run_ok(Command::new("umount").arg(&snap_mnt));
        assert!(
            in_snapshot == first_files,
            "the snapshot's files are not the first ones"
        );
    }
    // Unmounted and detached: only the snapshot is open now, and it blocks the rollback.
    refused(
        &pool,
        "rollback while a snapshot is read",
        &["volume", "rollback", "fs@first"],
        &["snapshots being read: first"],
    );
    drop(snapshot_loop);
    wait_closed(&pool, "fs");
    pool.ok(&["volume", "rollback", "fs@first"]);

    let volume_loop = LoopFile::attach(&volume);
    run_ok(Command::new("e2fsck").arg("-fn").arg(&volume_loop.device));
    {
        let _mounted = Mounted::new(&volume_loop.device, &fs_mnt);
        assert!(
            read_tree(&fs_mnt) == first_files,
            "the rollback did not bring back exactly the first files"
        );
    }
    drop(volume_loop);
    wait_closed(&pool, "fs");
    mount.unmount();
}

/// A page-aligned buffer for O_DIRECT reads.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout is not zero-sized.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `layout.size()` initialised bytes, owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// The whole file read with O_DIRECT, 64 KiB at a time.
fn read_direct(path: &Path) -> Vec<u8> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut buf = Aligned::new(64 << 10);
    let mut out = Vec::new();
    loop {
        let n = file.read_at(buf.as_mut(), out.len() as u64).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf.as_mut()[..n]);
    }
}

/// The whole file read through a shared read-only mapping.
fn read_mmap(path: &Path) -> Vec<u8> {
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: a fresh read-only mapping of `len` bytes of an open file, unmapped below.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(at, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let bytes = std::slice::from_raw_parts(at as *const u8, len).to_vec();
        libc::munmap(at, len);
        bytes
    }
}

/// The data extents `lseek(SEEK_DATA/SEEK_HOLE)` reports, as (start, end).
fn data_extents(path: &Path) -> Vec<(u64, u64)> {
    let file = File::open(path).unwrap();
    let size = file.metadata().unwrap().len() as i64;
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut pos = 0i64;
    while pos < size {
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(
                e.raw_os_error(),
                Some(libc::ENXIO),
                "SEEK_DATA at {pos}: {e}"
            );
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(hole > data, "SEEK_HOLE at {data}: {hole}");
        extents.push((data as u64, hole as u64));
        pos = hole;
    }
    extents
}

/// Snapshot files read with real clients equal what the volume held when each was taken: by
/// sha512sum, O_DIRECT, mmap, with its holes where SEEK_DATA/SEEK_HOLE say; they are read-only;
/// they appear at once and disappear within a second (at once when the daemon deletes them);
/// one open cannot be deleted (nor in a dry run); a name taken again is another inode.
#[test]
fn snapshot_files_read_what_the_volume_held_and_stay_while_open() {
    if !can_mount("snapshot_files_read_what_the_volume_held_and_stay_while_open") {
        return;
    }
    let pool = TestPool::new(1);
    let source = pool.path("src.img");
    random_file(&source, MIB, 21);
    let base = std::fs::read(&source).unwrap();
    pool.add_image("base", &source, 1);
    pool.ok(&["volume", "create", "v", "--image", "base", "--size", "4MiB"]);
    let mount = pool.mount();
    let path = mount.mountpoint.join("volumes/v");
    let dir = mount.mountpoint.join("snapshots/v");

    // What the volume holds at s1: the image, one block of it discarded, 8 KiB written at
    // 2 MiB, zeros elsewhere.
    let mut expected = vec![0u8; 4 * MIB as usize];
    expected[..MIB as usize].copy_from_slice(&base);
    let written: Vec<u8> = (0..2 * BLOCK).map(|i| (i % 251) as u8 + 1).collect();
    {
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&written, 2 * MIB).unwrap();
        let punched = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on an open descriptor.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), punched, 128 << 10, BLOCK as i64) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
    expected[2 * MIB as usize..(2 * MIB + 2 * BLOCK) as usize].copy_from_slice(&written);
    expected[128 << 10..(128 << 10) + BLOCK as usize].fill(0);
    wait_closed(&pool, "v");
    // Taken with the volume closed: the mount opens it to serve the snapshot.
    pool.ok(&["snapshot", "create", "v@s1"]);
    let s1 = dir.join("s1");
    assert!(
        s1.exists(),
        "a new snapshot is in the mount when the command returns"
    );
    // The volume rewritten whole: s1 keeps what it had.
    let live = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    live.write_all_at(&vec![0xEE; 4 * MIB as usize], 0).unwrap();

    let meta = std::fs::metadata(&s1).unwrap();
    assert_eq!(meta.len(), 4 * MIB);
    assert_eq!(meta.mode() & 0o777, 0o444);
    let expected_file = pool.path("expected");
    std::fs::write(&expected_file, &expected).unwrap();
    assert_eq!(sha512sum(&s1), sha512sum(&expected_file), "sha512sum of s1");
    assert!(read_direct(&s1) == expected, "O_DIRECT reads of s1");
    assert!(read_mmap(&s1) == expected, "mmap of s1");
    let kib = |k: u64| k << 10;
    assert_eq!(
        data_extents(&s1),
        [
            (0, kib(128)),
            (kib(132), MIB),
            (2 * MIB, 2 * MIB + 2 * BLOCK)
        ],
        "SEEK_DATA/SEEK_HOLE of s1"
    );
    // A sparse copy holds the data extents only.
    let copy = pool.path("copy");
    run_ok(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&s1)
            .arg(&copy),
    );
    assert!(std::fs::read(&copy).unwrap() == expected);
    let allocated = std::fs::metadata(&copy).unwrap().blocks() * 512;
    assert!(
        allocated <= MIB - BLOCK + 2 * BLOCK + kib(64),
        "the sparse copy of s1 allocates {allocated} bytes"
    );

    // Read-only: writes, truncation, new names.
    for (what, result) in [
        (
            "open for writing",
            OpenOptions::new().write(true).open(&s1).err(),
        ),
        (
            "truncate",
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&s1)
                .err(),
        ),
        ("create", File::create(dir.join("new")).err()),
    ] {
        assert_eq!(
            result.and_then(|e| e.raw_os_error()),
            Some(libc::EROFS),
            "{what} in snapshots/v"
        );
    }

    // Open (also with the volume itself open and written): deleting it is refused, naming
    // it, and the dry run says the same.
    let reader = File::open(&s1).unwrap();
    for args in [
        &["snapshot", "rm", "v@s1"][..],
        &["snapshot", "rm", "v@s1", "--dry-run"][..],
        &["snapshot", "rm", "v", "--keep-last", "0"][..],
    ] {
        refused(&pool, "rm of an open snapshot", args, &["'s1'", "open"]);
    }
    live.write_all_at(&vec![0xDD; MIB as usize], MIB).unwrap();
    pool.ok(&["snapshot", "create", "v@s2"]);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["s1", "s2"]);
    assert!(pread(&reader, 0, 4 * MIB as usize).unwrap() == expected);
    drop(reader);

    // Closed (its release reaches the daemon after `close`), it goes; deleted by the daemon
    // that has the volume open, its name leaves the mount before the command returns.
    let old_ino = meta.ino();
    assert!(
        poll(Duration::from_secs(5), Duration::from_millis(20), || {
            pool.run(&["snapshot", "rm", "v@s1"]).status.success()
        }),
        "s1 could not be deleted once closed"
    );
    assert!(!s1.exists(), "a deleted snapshot is still in the mount");
    // Taken again, the name is another snapshot, with another inode.
    pool.ok(&["snapshot", "create", "v@s1"]);
    let again = std::fs::metadata(&s1).unwrap();
    assert_ne!(
        again.ino(),
        old_ino,
        "a new snapshot took a deleted one's inode"
    );
    let mut now = vec![0xEE; 4 * MIB as usize];
    now[MIB as usize..2 * MIB as usize].fill(0xDD);
    assert!(
        std::fs::read(&s1).unwrap() == now,
        "the new s1 holds the volume as it is now"
    );
    drop(live);
    wait_closed(&pool, "v");
    // With the volume closed, the mount opens it to serve a snapshot.
    let s2 = dir.join("s2");
    assert!(
        read_direct(&s2) == now,
        "s2 read with its volume closed holds the volume as it was then"
    );
    wait_closed(&pool, "v");
    // Deleted by the command itself (no mount has the volume open): gone within a second.
    let deleted = Instant::now();
    pool.ok(&["snapshot", "rm", "v@s2"]);
    assert!(
        poll(Duration::from_secs(3), Duration::from_millis(20), || !s2
            .exists()),
        "s2 stayed in the mount"
    );
    assert!(
        deleted.elapsed() < Duration::from_millis(1500),
        "s2 left the mount only after {:?}",
        deleted.elapsed()
    );
    wait_closed(&pool, "v");
    mount.unmount();
}
