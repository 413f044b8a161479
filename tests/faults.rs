//! Fault injection on real disks (ext4 on loop devices): a disk that dies under a reader
//! (`xfs_io -x -c shutdown`, after which every I/O on the filesystem fails with EIO), bad sectors
//! under one copy (`FaultyDisk`), a byte flipped in a copy, a disk that fills up while the repair
//! writes to it, a repair and a mount daemon killed with SIGKILL at arbitrary instants; and, on
//! plain directories, eviction.
//!
//! Every test asserts what a reader and an operator see: the bytes read, the errors returned,
//! and the pool's own account (`disk list`, `image show`, `status`, `fsck`).

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use sha2::{Digest, Sha512};

use common::*;

const MIB: u64 = 1 << 20;
/// Each O_DIRECT read of the readers here.
const READ_SIZE: usize = 1 << 20;

// ---- helpers ----

/// ext4 loop disks, each registered under its name; mounted under the pool's temporary
/// directory. Declared after the pool and before any mount, so that drops run mount, disks,
/// pool.
fn add_loop_disks(pool: &mut TestPool, disks: &[(&str, u64)]) -> Vec<LoopDisk> {
    let mut made = Vec::new();
    for (name, size) in disks {
        let disk = LoopDisk::new(pool.dir.path(), name, *size, "ext4");
        pool.add_disk(name, &disk.mountpoint);
        made.push(disk);
    }
    made
}

fn loop_disk<'a>(disks: &'a [LoopDisk], name: &str) -> &'a LoopDisk {
    disks
        .iter()
        .find(|d| d.mountpoint.file_name().is_some_and(|n| n == name))
        .unwrap_or_else(|| panic!("no loop disk {name}"))
}

/// Kills the filesystem of a loop disk: every later I/O on it fails with EIO.
fn shut_down(disk: &LoopDisk) {
    let out = Command::new("xfs_io")
        .args(["-x", "-c", "shutdown"])
        .arg(&disk.mountpoint)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xfs_io shutdown {:?}: {}",
        disk.mountpoint,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn show(pool: &TestPool, name: &str) -> Value {
    pool.json(&["image", "show", name])
}

/// The disks of the copies that serve, in placement order (the read path reads the first).
fn serving_disks(info: &Value) -> Vec<String> {
    info["copies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["serving"] == true)
        .map(|c| c["disk"].as_str().unwrap().to_string())
        .collect()
}

fn copy_path(info: &Value, disk: &str) -> PathBuf {
    let copy = info["copies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["disk"] == disk)
        .unwrap_or_else(|| panic!("no copy on {disk}: {info}"));
    PathBuf::from(copy["path"].as_str().unwrap())
}

fn disk_state(pool: &TestPool, name: &str) -> String {
    let disks = pool.json(&["disk", "list"]);
    let disk = disks
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no disk {name}: {disks}"));
    disk["state"].as_str().unwrap().to_string()
}

/// Whether the image has `copies` healthy copies, served by exactly the disks `on`.
fn has_copies_on(info: &Value, copies: u64, on: &[&str]) -> bool {
    let serving: BTreeSet<String> = serving_disks(info).into_iter().collect();
    let wanted: BTreeSet<String> = on.iter().map(|d| d.to_string()).collect();
    info["healthy_copies"].as_u64() == Some(copies) && serving == wanted
}

/// Waits until the image has `copies` healthy copies on exactly the disks `on`; returns
/// `image show` then.
fn wait_for_copies(
    pool: &TestPool,
    name: &str,
    copies: u64,
    on: &[&str],
    timeout: Duration,
) -> Value {
    let mut info = Value::Null;
    let done = poll(timeout, Duration::from_millis(100), || {
        info = show(pool, name);
        has_copies_on(&info, copies, on)
    });
    assert!(
        done,
        "'{name}' never got {copies} healthy copies on {on:?} within {timeout:?}: {info}"
    );
    info
}

/// Asserts that every serving copy's file hashes to `sha512`.
fn assert_copies_match(info: &Value, sha512: &str) {
    for disk in serving_disks(info) {
        let path = copy_path(info, &disk);
        assert_eq!(sha512sum(&path), sha512, "copy on {disk}: {path:?}");
    }
}

/// The statistics of the pool's only mount, once `ready` holds for them (they are published
/// every second).
fn mount_stats(pool: &TestPool, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let seen = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        last = pool.json(&["status"])["mounts"][0]["stats"].clone();
        !last.is_null() && ready(&last)
    });
    assert!(
        seen,
        "{what}: the mount's statistics never got there: {last}"
    );
    last
}

fn read_counter(stats: &Value, key: &str) -> u64 {
    stats["read"][key].as_u64().unwrap_or(0)
}

fn open_direct(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// The whole file through O_DIRECT reads of `READ_SIZE` (page-aligned buffer), or the first
/// error.
fn read_all_direct(file: &File) -> io::Result<Vec<u8>> {
    let mut buf = memmap2::MmapMut::map_anon(READ_SIZE)?;
    let mut bytes = Vec::new();
    let mut offset = 0u64;
    loop {
        let n = file.read_at(&mut buf[..], offset)?;
        if n == 0 {
            return Ok(bytes);
        }
        bytes.extend_from_slice(&buf[..n]);
        offset += n as u64;
    }
}

fn sha512_hex(bytes: &[u8]) -> String {
    hex::encode(Sha512::digest(bytes))
}

/// Flips every bit of the byte at `offset` of a file (a copy: mode 0444, so this needs root)
/// and syncs it to the disk.
fn flip_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0xff;
    file.write_all_at(&byte, offset).unwrap();
    file.sync_all().unwrap();
}

/// Files in a directory (none when it does not exist).
fn files_in(dir: &Path) -> Vec<String> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// `imgpool fsck` must exit 0 and say the store and the disks agree.
fn assert_fsck_clean(pool: &TestPool, after: &str) {
    let out = pool.run(&["fsck"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("clean: the store and the disks agree"),
        "fsck after {after}: {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
}

/// Sets a flag when dropped: tells a reader thread to stop, also when the test fails.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What a reader that reads an image over and over saw.
#[derive(Debug, Default)]
struct ReaderReport {
    reads: u64,
    errors: u64,
    first_error: Option<String>,
    wrong_reads: u64,
    first_wrong: Option<u64>,
    /// The longest single read before, and since, the fault.
    longest_before: Duration,
    longest_after: Duration,
    reads_after: u64,
}

/// Reads `path` (O_DIRECT, `READ_SIZE` at a time) in whole passes, each read compared with
/// `expected`, until `stop`; counts finished passes in `passes`. Reads that start once
/// `faulted` is set count as reads during the failure.
fn read_in_passes(
    path: &Path,
    expected: &[u8],
    passes: &AtomicU64,
    faulted: &AtomicBool,
    stop: &AtomicBool,
) -> ReaderReport {
    let mut report = ReaderReport::default();
    let file = open_direct(path).unwrap();
    let mut buf = memmap2::MmapMut::map_anon(READ_SIZE).unwrap();
    let size = expected.len() as u64;
    while !stop.load(Ordering::Relaxed) {
        for offset in (0..size).step_by(READ_SIZE) {
            if stop.load(Ordering::Relaxed) {
                return report;
            }
            let after = faulted.load(Ordering::Relaxed);
            let started = Instant::now();
            let result = file.read_at(&mut buf[..], offset);
            let took = started.elapsed();
            report.reads += 1;
            if after {
                report.reads_after += 1;
                report.longest_after = report.longest_after.max(took);
            } else {
                report.longest_before = report.longest_before.max(took);
            }
            let end = (offset as usize + READ_SIZE).min(expected.len());
            match result {
                Ok(n)
                    if n == end - offset as usize && buf[..n] == expected[offset as usize..end] => {
                }
                Ok(_) => {
                    report.wrong_reads += 1;
                    report.first_wrong.get_or_insert(offset);
                }
                Err(e) => {
                    report.errors += 1;
                    report
                        .first_error
                        .get_or_insert_with(|| format!("at {offset}: {e}"));
                }
            }
        }
        passes.fetch_add(1, Ordering::Relaxed);
    }
    report
}

/// Three 256 MiB ext4 disks and a 64 MiB image with two copies, its source and uuid.
struct TwoCopies {
    source: PathBuf,
    uuid: String,
    sha512: String,
    /// The disk of the first serving copy (the one the read path reads), the other copy's
    /// disk, and the disk without a copy.
    first: String,
    second: String,
    spare: String,
}

fn two_copies_of_64_mib(pool: &TestPool, seed: u64) -> TwoCopies {
    let source = pool.path("source.img");
    random_file(&source, 64 * MIB, seed);
    let uuid = pool.add_image("img", &source, 2);
    let info = show(pool, "img");
    let serving = serving_disks(&info);
    assert_eq!(serving.len(), 2, "{info}");
    let spare = ["d1", "d2", "d3"]
        .into_iter()
        .find(|d| !serving.iter().any(|s| s == d))
        .unwrap()
        .to_string();
    TwoCopies {
        sha512: sha512sum(&source),
        source,
        uuid,
        first: serving[0].clone(),
        second: serving[1].clone(),
        spare,
    }
}

// ---- a disk that dies ----

#[test]
fn a_reader_sees_no_error_when_the_disk_of_its_copy_dies() {
    if !can_mount("a_reader_sees_no_error_when_the_disk_of_its_copy_dies") {
        return;
    }
    let mut pool = TestPool::empty();
    let disks = add_loop_disks(
        &mut pool,
        &[("d1", 256 * MIB), ("d2", 256 * MIB), ("d3", 256 * MIB)],
    );
    let img = two_copies_of_64_mib(&pool, 101);
    pool.ok(&["config", "set", "probe-interval", "1s"]);
    let expected = fs::read(&img.source).unwrap();
    let mount = pool.mount_with(&["--cache-size", "4MiB"]);
    // The reader's path is on the disk without a copy: it survives the other disks.
    let view = mount.bound_view(&loop_disk(&disks, &img.spare).mountpoint, "img", &img.uuid);
    let survivors = [img.second.as_str(), img.spare.as_str()];

    let passes = AtomicU64::new(0);
    let faulted = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let mut healed_after = Duration::ZERO;
    let mut passes_at_fault = 0;
    let report = std::thread::scope(|s| {
        let reader = s.spawn(|| read_in_passes(&view, &expected, &passes, &faulted, &stop));
        let stopper = StopOnDrop(&stop);
        assert!(
            poll(Duration::from_secs(60), Duration::from_millis(10), || {
                passes.load(Ordering::Relaxed) >= 1 || reader.is_finished()
            }) && !reader.is_finished(),
            "the reader never finished a first pass"
        );
        passes_at_fault = passes.load(Ordering::Relaxed);
        faulted.store(true, Ordering::Relaxed);
        let died = Instant::now();
        shut_down(loop_disk(&disks, &img.first));

        // The monitor fails the disk and the repair writes a new copy, while the reader reads.
        let mut state = String::new();
        assert!(
            poll(Duration::from_secs(60), Duration::from_millis(100), || {
                state = disk_state(&pool, &img.first);
                state == "failed"
            }),
            "disk {} is {state}, not failed, after its filesystem died",
            img.first
        );
        wait_for_copies(&pool, "img", 2, &survivors, Duration::from_secs(60));
        healed_after = died.elapsed();
        // At least two whole passes after the failure.
        assert!(
            poll(Duration::from_secs(120), Duration::from_millis(10), || {
                passes.load(Ordering::Relaxed) >= passes_at_fault + 3 || reader.is_finished()
            }),
            "the reader did not finish two more passes"
        );
        drop(stopper);
        reader.join().unwrap()
    });

    eprintln!(
        "FIGURE: longest read latency during the failure: {:.1} ms (before it: {:.1} ms; {} KiB O_DIRECT reads)",
        report.longest_after.as_secs_f64() * 1000.0,
        report.longest_before.as_secs_f64() * 1000.0,
        READ_SIZE / 1024
    );
    eprintln!(
        "FIGURE: reads done: {} ({} after the disk died, {} passes of the image)",
        report.reads,
        report.reads_after,
        passes.load(Ordering::Relaxed)
    );
    eprintln!("FIGURE: read errors: {}", report.errors);
    eprintln!(
        "FIGURE: seconds from shutdown to 2 healthy copies: {:.1}",
        healed_after.as_secs_f64()
    );
    eprintln!("FIGURE: copy size: {} MiB", expected.len() as u64 / MIB);

    assert_eq!(report.errors, 0, "{report:?}");
    assert_eq!(report.wrong_reads, 0, "{report:?}");
    assert!(
        passes.load(Ordering::Relaxed) >= passes_at_fault + 3,
        "{report:?}"
    );

    let stats = mount_stats(&pool, "a fault on the read path", |s| {
        read_counter(s, "copy_read_errors") + read_counter(s, "corrupt_chunks") >= 1
            || read_counter(s, "failovers") >= 1
    });
    eprintln!("read statistics after the failure: {}", stats["read"]);
    // By disk, the faults are the dead disk's, and no other disk's.
    let by_disk = &stats["read"]["faults_by_disk"];
    let faults_of = |disk: &str| {
        by_disk[disk]["copy_read_errors"].as_u64().unwrap_or(0)
            + by_disk[disk]["corrupt_chunks"].as_u64().unwrap_or(0)
    };
    let total = read_counter(&stats, "copy_read_errors") + read_counter(&stats, "corrupt_chunks");
    assert_eq!(faults_of(&img.first), total, "{by_disk}");

    let info = show(&pool, "img");
    assert!(has_copies_on(&info, 2, &survivors), "{info}");
    assert_eq!(info["state"], "ready", "{info}");
    // The new copy is on the disk that had none.
    assert_eq!(sha512sum(&copy_path(&info, &img.spare)), img.sha512);
    assert_copies_match(&info, &img.sha512);
    assert_eq!(disk_state(&pool, &img.first), "failed");
    mount.unmount();
}

#[test]
fn passthrough_open_files_see_eio_and_new_opens_read_a_healthy_copy() {
    let test = "passthrough_open_files_see_eio_and_new_opens_read_a_healthy_copy";
    if !can_mount(test) {
        return;
    }
    let mut pool = TestPool::empty();
    let disks = add_loop_disks(
        &mut pool,
        &[("d1", 256 * MIB), ("d2", 256 * MIB), ("d3", 256 * MIB)],
    );
    let img = two_copies_of_64_mib(&pool, 102);
    pool.ok(&["config", "set", "probe-interval", "1s"]);
    let expected = fs::read(&img.source).unwrap();
    let mount = pool.mount_with(&["--cache-size", "4MiB", "--io-mode", "passthrough"]);
    let stats = mount_stats(&pool, "the mount's io mode", |_| true);
    if stats["io_mode"] != "passthrough" {
        eprintln!(
            "SKIPPED {test}: the mount runs in {} mode (the kernel lacks FUSE passthrough: {})",
            stats["io_mode"],
            if kernel_has_passthrough() {
                "unexpected, Linux >= 6.9"
            } else {
                "Linux < 6.9"
            }
        );
        mount.unmount();
        return;
    }
    let view = mount.bound_view(&loop_disk(&disks, &img.spare).mountpoint, "img", &img.uuid);
    let survivors = [img.second.as_str(), img.spare.as_str()];

    // The kernel reads the first serving copy itself for this file.
    let old = open_direct(&view).unwrap();
    assert!(read_all_direct(&old).unwrap() == expected, "first read");

    let died = Instant::now();
    shut_down(loop_disk(&disks, &img.first));
    // Already-open files keep reading the dead copy: EIO, never wrong bytes.
    let mut buf = memmap2::MmapMut::map_anon(READ_SIZE).unwrap();
    let (mut eio, mut other_errors, mut wrong, mut reads) = (0u64, Vec::new(), 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut offset = 0u64;
    while Instant::now() < deadline && (eio == 0 || reads < 16) {
        reads += 1;
        match old.read_at(&mut buf[..], offset) {
            Ok(n) => {
                let end = offset as usize + n;
                if n != READ_SIZE || buf[..n] != expected[offset as usize..end] {
                    wrong += 1;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EIO) => eio += 1,
            Err(e) => other_errors.push(e.to_string()),
        }
        offset = (offset + READ_SIZE as u64) % expected.len() as u64;
    }
    eprintln!(
        "FIGURE: passthrough: {eio} of {reads} reads on the already-open file failed with EIO"
    );
    assert!(
        eio >= 1,
        "no EIO in {reads} reads of the open file on a dead copy"
    );
    assert_eq!(
        wrong, 0,
        "wrong bytes read from the open file on a dead copy"
    );
    assert!(
        other_errors.is_empty(),
        "errors other than EIO: {other_errors:?}"
    );

    let mut state = String::new();
    assert!(
        poll(Duration::from_secs(60), Duration::from_millis(50), || {
            state = disk_state(&pool, &img.first);
            state == "failed"
        }),
        "disk {} is {state}, not failed, after its filesystem died",
        img.first
    );
    eprintln!(
        "FIGURE: passthrough: disk failed by the monitor {:.1} s after its filesystem died",
        died.elapsed().as_secs_f64()
    );

    // A new open while the old file is still open: it reads a good copy. Each step is
    // checked, and what went wrong is reported at the end, so that one failure does not hide
    // the next.
    let mut problems = Vec::new();
    // The daemon's catalog follows the store within its 200 ms refresh; until then a new open
    // still gets the dead copy. Opens are retried for a second, no longer.
    let mut new = None;
    let mut last = String::new();
    let tried = poll(
        Duration::from_secs(1),
        Duration::from_millis(100),
        || match open_direct(&view).and_then(|f| read_all_direct(&f).map(|b| (f, b))) {
            Ok((f, bytes)) if sha512_hex(&bytes) == img.sha512 => {
                new = Some(f);
                true
            }
            Ok(_) => {
                last = "read wrong bytes".into();
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        },
    );
    if !tried {
        problems.push(format!(
            "a new open after the disk failed, while the old file is open, does not read a good copy: {last}"
        ));
    }
    drop(new);
    drop(old);
    // With every file closed, a fresh open reads a healthy copy (through the kernel again).
    match read_all_direct(&open_direct(&view).unwrap()) {
        Ok(bytes) if sha512_hex(&bytes) == img.sha512 => {}
        Ok(_) => {
            problems.push("a fresh open after the old file was closed read wrong bytes".into())
        }
        Err(e) => problems.push(format!(
            "a fresh open after the old file was closed cannot read: {e}"
        )),
    }

    let info = wait_for_copies(&pool, "img", 2, &survivors, Duration::from_secs(60));
    assert_copies_match(&info, &img.sha512);
    // And once more after the redistribution: what a replica opening now reads.
    let again = open_direct(&view).unwrap();
    assert_eq!(sha512_hex(&read_all_direct(&again).unwrap()), img.sha512);
    drop(again);
    mount.unmount();
    assert!(problems.is_empty(), "{problems:#?}");
}

// ---- a corrupt copy ----

#[test]
fn a_flipped_byte_is_never_served_and_the_copy_is_repaired() {
    if !can_mount("a_flipped_byte_is_never_served_and_the_copy_is_repaired") {
        return;
    }
    let mut pool = TestPool::empty();
    let _disks = add_loop_disks(
        &mut pool,
        &[("d1", 256 * MIB), ("d2", 256 * MIB), ("d3", 256 * MIB)],
    );
    let source = pool.path("source.img");
    random_file(&source, 16 * MIB, 103);
    pool.add_image("img", &source, 2);
    let sha512 = sha512sum(&source);
    let mount = pool.mount_with(&["--cache-size", "4MiB"]);

    let info = show(&pool, "img");
    let serving = serving_disks(&info);
    let (bad_disk, good_disk) = (serving[0].clone(), serving[1].clone());
    let third = ["d1", "d2", "d3"]
        .into_iter()
        .find(|d| *d != bad_disk && *d != good_disk)
        .unwrap();
    let bad = copy_path(&info, &bad_disk);
    flip_byte(&bad, 5 * MIB + 3);

    // The chunk with the flipped byte is read from the first copy, fails its digest, and is
    // read from the other copy: the reader gets the image's bytes.
    assert_eq!(
        sha512sum(&mount.image("img")),
        sha512,
        "read through the mount"
    );
    let stats = mount_stats(&pool, "a corrupt chunk", |s| {
        read_counter(s, "corrupt_chunks") >= 1
    });
    eprintln!("read statistics after the corrupt read: {}", stats["read"]);

    // The copy is failed and replaced on the third disk; the bad file goes.
    let info = wait_for_copies(
        &pool,
        "img",
        2,
        &[good_disk.as_str(), third],
        Duration::from_secs(60),
    );
    assert_copies_match(&info, &sha512);
    assert!(
        !bad.exists() || sha512sum(&bad) == sha512,
        "the bad copy {bad:?} is still there with its flipped byte: {info}"
    );
    assert_eq!(sha512sum(&mount.image("img")), sha512);

    // Scrub finds a flipped byte that no reader has touched yet, and has the copy replaced.
    let info = show(&pool, "img");
    let victim = serving_disks(&info)[0].clone();
    flip_byte(&copy_path(&info, &victim), 11 * MIB + 7);
    let out = pool.run(&["scrub", "img"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scrub: {stdout}\n{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("BAD") && l.contains(&victim)),
        "scrub: no BAD line for the copy on {victim}: {stdout}"
    );
    assert!(stdout.contains("scrub: 1 good, 1 bad"), "{stdout}");
    let info = show(&pool, "img");
    assert_eq!(info["healthy_copies"], 2, "{info}");
    assert!(!serving_disks(&info).contains(&victim), "{info}");
    assert_copies_match(&info, &sha512);
    assert_eq!(sha512sum(&mount.image("img")), sha512);
    assert_fsck_clean(&pool, "scrub");
    mount.unmount();
}

// ---- a disk that fills up ----

#[test]
fn a_disk_that_fills_up_during_a_repair_sends_the_copy_elsewhere() {
    if !can_mount("a_disk_that_fills_up_during_a_repair_sends_the_copy_elsewhere") {
        return;
    }
    let mut pool = TestPool::empty();
    let mut disks = add_loop_disks(&mut pool, &[("d1", 256 * MIB), ("d2", 256 * MIB)]);
    let source = pool.path("source.img");
    random_file(&source, 64 * MIB, 104);
    let uuid = pool.add_image("a", &source, 2);
    let sha512 = sha512sum(&source);
    assert!(has_copies_on(&show(&pool, "a"), 2, &["d1", "d2"]));
    // d3 has the most room: the repair picks it first.
    disks.extend(add_loop_disks(
        &mut pool,
        &[("d3", 512 * MIB), ("d4", 256 * MIB)],
    ));
    pool.ok(&["config", "set", "repair-bandwidth", "16MiB"]);
    pool.ok(&["disk", "fail", "d1", "--reason", "test"]);

    let d3 = loop_disk(&disks, "d3").mountpoint.clone();
    let tmp = d3.join(format!(".imgpool/tmp/{uuid}.img"));
    let (stdout_path, stderr_path) = (pool.path("repair.out"), pool.path("repair.err"));
    let mut repair = ChildGuard(Some(
        pool.command(&["repair"])
            .stdout(File::create(&stdout_path).unwrap())
            .stderr(File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    ));
    assert!(
        wait_until(Duration::from_secs(30), || tmp.exists()),
        "the repair never started writing to d3"
    );
    // Another tenant takes all the room left on d3 while the copy is being written.
    let fill = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "status=none"])
        .arg(format!("of={}", d3.join("hog").display()))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!fill.success(), "dd should fill d3");

    let status = repair
        .wait_timeout(Duration::from_secs(120))
        .expect("the repair did not finish");
    let stdout = fs::read_to_string(&stdout_path).unwrap();
    let stderr = fs::read_to_string(&stderr_path).unwrap();
    eprintln!("repair said:\n{stdout}{stderr}");
    match status.code() {
        Some(0) => {}
        Some(1) => {
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.starts_with("imgpool: "), "{stderr}");
        }
        _ => panic!("repair: {status:?}: {stderr}"),
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stdout.contains("failed: disk 'd3' filled up while copying 'a'"),
        "{stdout}"
    );
    assert_eq!(
        status.code(),
        Some(0),
        "the copy should have gone to d4: {stdout}{stderr}"
    );

    let info = show(&pool, "a");
    assert!(has_copies_on(&info, 2, &["d2", "d4"]), "{info}");
    assert_copies_match(&info, &sha512);
    assert!(
        info["copies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["disk"] != "d3"),
        "{info}"
    );
    assert_eq!(files_in(&d3.join(".imgpool/tmp")), Vec::<String>::new());
    let on_d3: Vec<String> = files_in(&d3.join(".imgpool/copies"))
        .into_iter()
        .filter(|f| f.starts_with(&uuid))
        .collect();
    assert!(on_d3.is_empty(), "d3 still holds {on_d3:?}");
    assert_ne!(
        disk_state(&pool, "d3"),
        "failed",
        "a full disk is not a dead disk"
    );
    assert_fsck_clean(&pool, "a repair that filled a disk");
}

// ---- a source copy with bad sectors ----

#[test]
fn a_source_copy_that_does_not_read_is_failed_and_the_repair_copies_from_another() {
    if !can_mount("a_source_copy_that_does_not_read_is_failed_and_the_repair_copies_from_another") {
        return;
    }
    let mut pool = TestPool::empty();
    // d1: ext4 on a device whose sectors can fail; the image's first copy goes there, so it is
    // the first in placement order, the one the repair copies from.
    let bad = FaultyDisk::new(pool.dir.path(), "d1", 256 * MIB);
    pool.add_disk("d1", &bad.mountpoint);
    let source = pool.path("source.img");
    random_file(&source, 16 * MIB, 109);
    let sha512 = sha512sum(&source);
    pool.add_image("img", &source, 1);
    // d2 (a plain directory) gets the second copy, read from d1 while d1 still reads.
    for name in ["d2", "d3", "d4"] {
        fs::create_dir(pool.path(name)).unwrap();
    }
    pool.add_disk("d2", &pool.path("d2"));
    pool.ok(&["image", "set", "img", "--copies", "2"]);
    pool.ok(&["repair"]);
    let info = show(&pool, "img");
    assert!(has_copies_on(&info, 2, &["d1", "d2"]), "{info}");
    assert_eq!(serving_disks(&info)[0], "d1", "{info}");

    // Bad sectors under d1's copy, and only there: the disk's label and probe file still read
    // and write.
    let bad_copy = copy_path(&info, "d1");
    let ranges = bad.fail_reads_of(&bad_copy);
    eprintln!("failing reads of {bad_copy:?}: device bytes {ranges:?}");
    let read = fs::read(&bad_copy);
    assert!(
        read.as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::EIO)),
        "the copy on d1 should not read: {:?}",
        read.map(|b| b.len())
    );

    // Two empty disks, and a third copy wanted: the repair first copies from d1.
    pool.add_disk("d3", &pool.path("d3"));
    pool.add_disk("d4", &pool.path("d4"));
    pool.ok(&["image", "set", "img", "--copies", "3"]);
    let out = pool.run(&["repair", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("repair said:\n{stdout}{stderr}");
    assert!(out.status.success(), "repair failed: {stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let done: Vec<&str> = report["done"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    // The copy from d1 failed on its read, and says so...
    let read_error = format!("cannot read {}: ", bad_copy.display());
    let failed: Vec<&&str> = done
        .iter()
        .filter(|l| l.starts_with("failed: cannot copy 'img' to disk"))
        .collect();
    assert_eq!(failed.len(), 1, "{done:?}");
    assert!(failed[0].contains(&read_error), "{done:?}");
    // ...so d1's copy was failed (and, a good copy existing, deleted)...
    assert!(
        done.contains(&"removed the copy of 'img' on 'd1' (failed)"),
        "{done:?}"
    );
    // ...and the copies came from d2, to both empty disks: the target of the failed copy was
    // not blamed for d1's sectors.
    for target in ["d3", "d4"] {
        let from_d2 = format!("copied 'img' to '{target}' from 'd2'");
        assert!(done.iter().any(|l| l.starts_with(&from_d2)), "{done:?}");
    }
    assert!(bad.failed_reads() > 0, "the device never failed a read");

    let info = show(&pool, "img");
    assert!(has_copies_on(&info, 3, &["d2", "d3", "d4"]), "{info}");
    assert_eq!(info["state"], "ready", "{info}");
    assert_copies_match(&info, &sha512);
    for disk in ["d1", "d2", "d3", "d4"] {
        assert_eq!(
            disk_state(&pool, disk),
            "healthy",
            "d1 passes its probe (the fault is its copy's), and no target is to blame"
        );
    }
    assert_fsck_clean(&pool, "a repair around a source copy with bad sectors");
}

// ---- SIGKILL at arbitrary instants ----

#[test]
fn kill_9_at_random_instants_of_a_repair_leaves_a_clean_pool() {
    if !can_mount("kill_9_at_random_instants_of_a_repair_leaves_a_clean_pool") {
        return;
    }
    let mut pool = TestPool::empty();
    let mut disks = add_loop_disks(&mut pool, &[("d1", 256 * MIB), ("d2", 256 * MIB)]);
    let source = pool.path("source.img");
    random_file(&source, 64 * MIB, 105);
    let uuid = pool.add_image("a", &source, 2);
    let sha512 = sha512sum(&source);
    disks.extend(add_loop_disks(&mut pool, &[("d3", 256 * MIB)]));
    pool.ok(&["config", "set", "repair-bandwidth", "32MiB"]);
    pool.ok(&["disk", "fail", "d1"]);

    let d3_tmp = loop_disk(&disks, "d3")
        .mountpoint
        .join(format!(".imgpool/tmp/{uuid}.img"));
    const SEED: u64 = 0x5EED_0009_2024_0001;
    eprintln!("kill instants from seed {SEED:#x}");
    let mut rng = Rng(SEED);
    for round in 1..=8 {
        let delay = Duration::from_millis(50 + rng.below(1451));
        let mut repair = ChildGuard(Some(
            pool.command(&["repair"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        std::thread::sleep(delay);
        let writing = d3_tmp.exists();
        let ended = match repair.wait_timeout(Duration::ZERO) {
            Some(status) => format!("exited by itself ({status})"),
            None => {
                kill(Pid::from_raw(repair.pid()), Signal::SIGKILL).unwrap();
                let status = repair.wait_timeout(Duration::from_secs(10));
                assert!(status.is_some(), "the repair survived SIGKILL");
                "killed".to_string()
            }
        };
        eprintln!(
            "round {round}: repair {ended} after {} ms{}",
            delay.as_millis(),
            if writing {
                ", while writing the copy"
            } else {
                ""
            }
        );
        assert_fsck_clean(
            &pool,
            &format!(
                "round {round} (repair {ended} after {} ms, seed {SEED:#x})",
                delay.as_millis()
            ),
        );
    }

    let out = pool.run(&["repair"]);
    assert!(
        out.status.success(),
        "repair: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let info = show(&pool, "a");
    assert!(has_copies_on(&info, 2, &["d2", "d3"]), "{info}");
    assert_eq!(sha512sum(&copy_path(&info, "d3")), sha512);
    for disk in &disks {
        let tmp = disk.mountpoint.join(".imgpool/tmp");
        assert_eq!(files_in(&tmp), Vec::<String>::new(), "{tmp:?}");
    }
    assert_fsck_clean(&pool, "the repair that completed");

    // The daemon's repair, killed: d1 returns (its copy is verified before it serves) and the
    // image wants three copies; the daemon dies with -9 while it works on them.
    let mount = pool.mount_with(&["--cache-size", "4MiB"]);
    let daemon = mount.pid.unwrap();
    let before = read_chars(daemon);
    pool.ok(&["disk", "online", "d1"]);
    pool.ok(&["image", "set", "a", "--copies", "3"]);
    // Killed once the daemon has read 8 MiB of the 64 MiB it verifies (2 s at 32 MiB/s).
    let verifying = wait_until(Duration::from_secs(10), || {
        read_chars(daemon) >= before + 8 * MIB
    });
    kill(Pid::from_raw(daemon), Signal::SIGKILL).unwrap();
    assert!(verifying, "the daemon never started verifying d1's copy");
    assert!(wait_until(Duration::from_secs(10), || !mount.daemon_alive()));
    pool.ok(&["umount", "--lazy", mount.mountpoint.to_str().unwrap()]);
    assert!(!is_mount_point(&mount.mountpoint));
    for target in mount.targets() {
        assert!(!is_mount_point(&target), "{target:?} is still mounted");
    }
    assert_fsck_clean(&pool, "the mount daemon was killed");
    // The verification was cut short: the copy does not serve before one completes.
    let info = show(&pool, "a");
    let d1 = info["copies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["disk"] == "d1")
        .unwrap_or_else(|| panic!("no copy on d1: {info}"));
    assert_eq!(d1["state"], "unverified", "{info}");
    assert_eq!(d1["serving"], false, "{info}");
    let out = pool.run(&["repair"]);
    assert!(
        out.status.success(),
        "repair after the daemon was killed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let info = show(&pool, "a");
    assert!(has_copies_on(&info, 3, &["d1", "d2", "d3"]), "{info}");
    assert_copies_match(&info, &sha512);
    for disk in &disks {
        let tmp = disk.mountpoint.join(".imgpool/tmp");
        assert_eq!(files_in(&tmp), Vec::<String>::new(), "{tmp:?}");
    }
    assert!(
        !files_in(&pool.disks[0].join(".imgpool/copies")).is_empty(),
        "d1's copy of {uuid}"
    );
    assert_fsck_clean(&pool, "the last repair");
}

/// Bytes process `pid` has read with read(2) and the like (`rchar` of /proc/PID/io).
fn read_chars(pid: i32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

// ---- eviction (plain directories) ----

#[test]
fn eviction_moves_every_copy_and_disk_rm_refuses_an_only_copy() {
    let pool = TestPool::new(3);
    let (a_src, b_src) = (pool.path("a.img"), pool.path("b.img"));
    random_file(&a_src, 3 * MIB + 17, 106);
    random_file(&b_src, 2 * MIB, 107);
    let a_uuid = pool.add_image("a", &a_src, 1);
    pool.add_image("b", &b_src, 2);
    let (a_sha, b_sha) = (sha512sum(&a_src), sha512sum(&b_src));
    let holder = serving_disks(&show(&pool, "a"))[0].clone();
    let holder_path = pool.disks[holder[1..].parse::<usize>().unwrap() - 1].clone();

    let line = pool.fails(&["disk", "rm", &holder]);
    assert!(line.contains("'a'") || line.contains(" a"), "{line}");
    assert!(line.contains("only good copy"), "{line}");
    assert!(holder_path
        .join(format!(".imgpool/copies/{a_uuid}.img"))
        .exists());

    pool.ok(&["disk", "evict", &holder]);
    let stdout = pool.ok(&["repair"]);
    assert!(stdout.contains("copied 'a'"), "{stdout}");
    let a = show(&pool, "a");
    let b = show(&pool, "b");
    for (info, copies) in [(&a, 1), (&b, 2)] {
        assert_eq!(info["healthy_copies"], copies, "{info}");
        assert!(
            info["copies"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["disk"] != holder.as_str()),
            "{info}"
        );
    }
    assert_copies_match(&a, &a_sha);
    assert_copies_match(&b, &b_sha);
    let left: Vec<String> = files_in(&holder_path.join(".imgpool/copies"))
        .into_iter()
        .filter(|f| f.ends_with(".img"))
        .collect();
    assert!(left.is_empty(), "{holder} still holds {left:?}");

    pool.ok(&["disk", "rm", &holder]);
    let disks = pool.json(&["disk", "list"]);
    assert!(
        disks
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["name"] != holder.as_str()),
        "{disks}"
    );
    let a = show(&pool, "a");
    assert_eq!(a["healthy_copies"], 1, "{a}");
    assert_eq!(a["copies_wanted"], 1, "{a}");
    assert_eq!(a["state"], "ready", "{a}");
    assert_fsck_clean(&pool, "eviction and disk rm");
}

// ---- disks that leave and return, copies lost behind the pool's back ----

/// Runs a system command that must succeed (`umount`, `mount`), with what it printed on failure.
fn run_ok(program: &str, args: &[&std::ffi::OsStr]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `path` reads whole (buffered, through the kernel) with the SHA-512 `sha512`.
fn reads_as(path: &Path, sha512: &str) -> bool {
    fs::read(path).is_ok_and(|bytes| sha512_hex(&bytes) == sha512)
}

/// Lines of the pool's mount daemon log that contain `needle`.
fn log_lines(pool: &TestPool, needle: &str) -> Vec<String> {
    fs::read_to_string(pool.state.join("mount.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

fn status_problems(pool: &TestPool) -> Vec<String> {
    pool.json(&["status"])["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_disk_mounted_again_or_added_again_gets_its_bind_back() {
    let test = "a_disk_mounted_again_or_added_again_gets_its_bind_back";
    if !can_mount(test) {
        return;
    }
    let mut pool = TestPool::empty();
    let disks = add_loop_disks(&mut pool, &[("d1", 128 * MIB), ("d2", 128 * MIB)]);
    let source = pool.path("source.img");
    random_file(&source, 8 * MIB, 211);
    let uuid = pool.add_image("img", &source, 2);
    let sha512 = sha512sum(&source);
    pool.ok(&["config", "set", "probe-interval", "1s"]);
    let mount = pool.mount();
    let d1 = loop_disk(&disks, "d1");
    let bind = d1.mountpoint.join("backing-images");
    let view = mount.bound_view(&d1.mountpoint, "img", &uuid);
    assert!(reads_as(&view, &sha512));

    // The disk's filesystem is unmounted (lazily: the daemon still reads its copy, and the
    // bind goes with it) and mounted again once the monitor has noticed.
    run_ok("umount", &["-l".as_ref(), d1.mountpoint.as_os_str()]);
    assert!(!is_mount_point(&bind));
    assert!(
        poll(Duration::from_secs(20), Duration::from_millis(100), || {
            disk_state(&pool, "d1") == "failed"
        }),
        "d1 is {} after its filesystem went away",
        disk_state(&pool, "d1")
    );
    run_ok("mount", &[d1.device.as_ref(), d1.mountpoint.as_os_str()]);
    let remounted = Instant::now();
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(100), || {
            reads_as(&view, &sha512)
        }),
        "{view:?} does not serve the image 10 s after its disk's filesystem came back; status: {}",
        pool.json(&["status"])
    );
    eprintln!(
        "FIGURE: seconds from the disk's mount to its bind serving again: {:.1}",
        remounted.elapsed().as_secs_f64()
    );
    assert!(is_mount_point(&bind));

    // `disk rm` and `disk add` of the same path while mounted: the old bind shows a disk that
    // is gone, and is replaced by one of the new disk's view.
    wait_for_copies(&pool, "img", 2, &["d1", "d2"], Duration::from_secs(30));
    pool.ok(&["disk", "rm", "d1"]);
    pool.ok(&["disk", "add", "d1", d1.mountpoint.to_str().unwrap()]);
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(100), || {
            reads_as(&view, &sha512)
        }),
        "{view:?} does not serve the image 10 s after its disk was added again"
    );
    wait_for_copies(&pool, "img", 2, &["d1", "d2"], Duration::from_secs(30));

    // A bind unmounted by hand while the pool is mounted comes back: the daemon keeps it.
    let d2 = loop_disk(&disks, "d2");
    let d2_bind = d2.mountpoint.join("backing-images");
    run_ok("umount", &[d2_bind.as_os_str()]);
    let d2_view = mount.bound_view(&d2.mountpoint, "img", &uuid);
    assert!(
        poll(Duration::from_secs(5), Duration::from_millis(100), || {
            reads_as(&d2_view, &sha512)
        }),
        "d2's bind did not come back"
    );

    // A bind the daemon cannot make is a problem `status` names, until it is made.
    let d3 = pool.path("d3");
    fs::create_dir(&d3).unwrap();
    let squatter = TmpfsMount::new(&d3.join("backing-images"));
    pool.ok(&["disk", "add", "d3", d3.to_str().unwrap()]);
    let mut problems = Vec::new();
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(200), || {
            problems = status_problems(&pool);
            problems
                .iter()
                .any(|p| p.starts_with("disk d3:") && p.contains("already a mount point"))
        }),
        "status does not report d3's missing bind: {problems:?}"
    );
    drop(squatter);
    let d3_view = mount.bound_view(&d3, "img", &uuid);
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(200), || {
            reads_as(&d3_view, &sha512)
                && !status_problems(&pool)
                    .iter()
                    .any(|p| p.starts_with("disk d3:"))
        }),
        "d3 was not bound once its directory was free: {:?}",
        status_problems(&pool)
    );
    // `imgpool umount` takes d3's bind too: it belongs to the mount.
    mount.unmount();
    assert!(!is_mount_point(&d3.join("backing-images")));
}

#[test]
fn a_dead_disk_is_let_go_repaired_and_returns_to_service() {
    let test = "a_dead_disk_is_let_go_repaired_and_returns_to_service";
    if !can_mount(test) {
        return;
    }
    let mut pool = TestPool::empty();
    let disks = add_loop_disks(&mut pool, &[("d1", 128 * MIB), ("d2", 128 * MIB)]);
    let source = pool.path("source.img");
    random_file(&source, 16 * MIB, 223);
    let uuid = pool.add_image("img", &source, 2);
    let expected = fs::read(&source).unwrap();
    let sha512 = sha512sum(&source);
    pool.ok(&["config", "set", "probe-interval", "1s"]);
    let mount = pool.mount_with(&["--cache-size", "4MiB"]);
    let d1 = loop_disk(&disks, "d1");

    // A reader holds the image open: the daemon has both copies open for it.
    let reader = open_direct(&mount.image("img")).unwrap();
    assert_eq!(read_all_direct(&reader).unwrap(), expected);
    shut_down(d1);
    assert!(
        poll(Duration::from_secs(20), Duration::from_millis(100), || {
            disk_state(&pool, "d1") == "failed"
        }),
        "d1 is {} after its filesystem died",
        disk_state(&pool, "d1")
    );

    // Nothing of the daemon's keeps the dead filesystem: a plain umount works, and the device
    // can be checked and mounted again, with a fresh superblock.
    let mut last = String::new();
    let unmounted = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        let out = Command::new("umount").arg(&d1.mountpoint).output().unwrap();
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        out.status.success()
    });
    assert!(unmounted, "the dead filesystem stays busy: {last}");
    assert_eq!(
        read_all_direct(&reader).unwrap(),
        expected,
        "the reader reads on"
    );
    let fsck = Command::new("fsck.ext4")
        .args(["-f", "-y"])
        .arg(&d1.device)
        .output()
        .unwrap();
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "fsck.ext4: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    run_ok("mount", &[d1.device.as_ref(), d1.mountpoint.as_os_str()]);

    // It returns by itself: its copy is verified, serves again, and its bind is back.
    let info = wait_for_copies(&pool, "img", 2, &["d1", "d2"], Duration::from_secs(60));
    assert_copies_match(&info, &sha512);
    assert_eq!(disk_state(&pool, "d1"), "healthy");
    let view = mount.bound_view(&d1.mountpoint, "img", &uuid);
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(100), || {
            reads_as(&view, &sha512)
        }),
        "{view:?} does not serve the image after d1 returned"
    );
    assert_eq!(read_all_direct(&reader).unwrap(), expected);
    drop(reader);
    mount.unmount();
}

#[test]
fn a_read_only_disk_serves_its_only_copy_and_takes_no_new_one() {
    let test = "a_read_only_disk_serves_its_only_copy_and_takes_no_new_one";
    if !can_mount(test) {
        return;
    }
    let mut pool = TestPool::empty();
    // d1 has more room: it takes the only copy of the first image, and would take the next.
    let disks = add_loop_disks(&mut pool, &[("d1", 160 * MIB), ("d2", 96 * MIB)]);
    let source = pool.path("source.img");
    random_file(&source, 16 * MIB, 227);
    let uuid = pool.add_image("img", &source, 1);
    let expected = fs::read(&source).unwrap();
    assert_eq!(serving_disks(&show(&pool, "img")), ["d1"]);
    pool.ok(&["config", "set", "probe-interval", "1s"]);
    let mount = pool.mount_with(&["--cache-size", "4MiB"]);
    let d1 = loop_disk(&disks, "d1");

    // Remounted read-only, as ext4's errors=remount-ro does after an error. A probe holding
    // the probe file open for writing at that instant makes the remount busy: tried again.
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(50), || {
            Command::new("mount")
                .args(["-o", "remount,ro"])
                .arg(&d1.mountpoint)
                .status()
                .unwrap()
                .success()
        }),
        "cannot remount d1 read-only"
    );
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(100), || {
            disk_state(&pool, "d1") == "read-only"
        }),
        "d1 is {}, not read-only",
        disk_state(&pool, "d1")
    );
    // Several probe rounds later it still serves: the only copy is read from it, verified.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        assert_eq!(disk_state(&pool, "d1"), "read-only");
        std::thread::sleep(Duration::from_millis(250));
    }
    pool.ok(&["cache", "drop"]);
    let file = open_direct(&mount.image("img")).unwrap();
    assert_eq!(read_all_direct(&file).unwrap(), expected);
    drop(file);
    assert!(reads_as(
        &mount.bound_view(&d1.mountpoint, "img", &uuid),
        &sha512_hex(&expected)
    ));
    let info = show(&pool, "img");
    assert_eq!(info["state"], "ready", "{info}");
    let problems = status_problems(&pool);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("disk d1:") && p.contains("read-only")),
        "{problems:?}"
    );

    // New copies go elsewhere, however much room the read-only disk has.
    let small = pool.path("small.img");
    random_file(&small, MIB, 229);
    pool.add_image("small", &small, 1);
    assert_eq!(serving_disks(&show(&pool, "small")), ["d2"]);
    let refused = pool.fails(&[
        "image",
        "add",
        "pair",
        small.to_str().unwrap(),
        "--copies",
        "2",
    ]);
    assert!(
        refused.contains("read-only, taking no new copy: 'd1'"),
        "{refused}"
    );

    run_ok(
        "mount",
        &[
            "-o".as_ref(),
            "remount,rw".as_ref(),
            d1.mountpoint.as_os_str(),
        ],
    );
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(100), || {
            disk_state(&pool, "d1") == "healthy"
        }),
        "d1 is {} after it was made writable again",
        disk_state(&pool, "d1")
    );
    mount.unmount();
}

#[test]
fn a_copy_deleted_behind_the_pools_back_is_noticed_and_reads_fail_with_eio() {
    let test = "a_copy_deleted_behind_the_pools_back_is_noticed_and_reads_fail_with_eio";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(2);
    pool.ok(&["config", "set", "probe-interval", "1s"]);
    let solo_source = pool.path("solo.img");
    random_file(&solo_source, 4 * MIB, 233);
    pool.add_image("solo", &solo_source, 1);
    // Without its source, nothing can bring the only copy back.
    fs::remove_file(&solo_source).unwrap();
    let pair_source = pool.path("pair.img");
    random_file(&pair_source, 4 * MIB, 239);
    pool.add_image("pair", &pair_source, 2);
    let pair_sha512 = sha512sum(&pair_source);
    let mount = pool.mount_with(&["--cache-size", "4MiB"]);
    // Read once: the daemon holds both images' copies open.
    let solo_path = mount.image("solo");
    assert_eq!(fs::read(&solo_path).unwrap().len() as u64, 4 * MIB);
    assert!(reads_as(&mount.image("pair"), &pair_sha512));

    let solo = show(&pool, "solo");
    fs::remove_file(copy_path(&solo, &serving_disks(&solo)[0])).unwrap();
    fs::remove_file(copy_path(&show(&pool, "pair"), "d1")).unwrap();

    let mut info = Value::Null;
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(100), || {
            info = show(&pool, "solo");
            // The state at once; the advice once the repair has looked at it.
            info["state"] == "failed"
                && info["problem"]
                    .as_str()
                    .is_some_and(|p| p.contains("imgpool image add solo"))
        }),
        "solo is not failed, with advice, 10 s after its only copy was deleted: {info}"
    );
    let copy = &info["copies"][0];
    assert_eq!(copy["state"], "failed", "{info}");
    assert!(
        copy["reason"].as_str().unwrap().contains("missing"),
        "{info}"
    );
    let problem = info["problem"].as_str().unwrap();
    assert!(problem.contains("missing"), "{problem}");
    assert!(problem.contains("imgpool image add solo"), "{problem}");
    assert!(!problem.contains("free space"), "{problem}");

    // Its reads fail with EIO, not the deleted file's bytes, once the daemon's catalog has
    // the change (it reloads within 200 ms; until then the descriptor it holds reads the
    // deleted file's bytes, checked against the digests like any other).
    let mut read = Ok(Vec::new());
    let failed = poll(Duration::from_secs(2), Duration::from_millis(100), || {
        pool.ok(&["cache", "drop"]);
        read = open_direct(&solo_path).and_then(|f| read_all_direct(&f));
        read.is_err()
    });
    assert!(failed, "solo still reads: {:#?}", log_lines(&pool, ""));
    let err = read.unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The image with another copy is repaired from it.
    let info = wait_for_copies(&pool, "pair", 2, &["d1", "d2"], Duration::from_secs(30));
    assert_copies_match(&info, &pair_sha512);
    assert!(reads_as(&mount.image("pair"), &pair_sha512));

    // A new daemon says the same: the open fails with EIO, the name is there.
    mount.unmount();
    let mount = pool.mount();
    let err = File::open(mount.image("solo")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(show(&pool, "solo")["state"], "failed");
    mount.unmount();
}

#[test]
fn seek_data_and_seek_hole_find_an_images_holes_through_the_mount() {
    let test = "seek_data_and_seek_hole_find_an_images_holes_through_the_mount";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(1);
    // data (1 MiB) | hole (3 MiB) | data (192 KiB) | hole (1 MiB + 100 bytes) to the end
    let source = pool.path("sparse.img");
    let file = File::create(&source).unwrap();
    file.write_all_at(&vec![7u8; MIB as usize], 0).unwrap();
    file.write_all_at(&vec![9u8; 192 << 10], 4 * MIB).unwrap();
    let size = 4 * MIB + (192 << 10) + MIB + 100;
    file.set_len(size).unwrap();
    drop(file);
    let uuid = pool.add_image("img", &source, 1);
    let mount = pool.mount();
    let data_end = 4 * MIB + (192 << 10);
    let expected: [(u64, i32, Option<u64>); 8] = [
        (0, libc::SEEK_DATA, Some(0)),
        (0, libc::SEEK_HOLE, Some(MIB)),
        (100, libc::SEEK_HOLE, Some(MIB)),
        (MIB, libc::SEEK_DATA, Some(4 * MIB)),
        (4 * MIB, libc::SEEK_HOLE, Some(data_end)),
        (data_end, libc::SEEK_DATA, None),
        (size - 1, libc::SEEK_HOLE, Some(size - 1)),
        (size, libc::SEEK_DATA, None),
    ];
    // A real client: Python's os.lseek, through the kernel, on both paths a replica may use.
    let script = "import os, sys\n\
        f = os.open(sys.argv[1], os.O_RDONLY)\n\
        for arg in sys.argv[2:]:\n\
        \x20   offset, whence = arg.split(':')\n\
        \x20   try:\n\
        \x20       print(os.lseek(f, int(offset), os.SEEK_DATA if whence == 'data' else os.SEEK_HOLE))\n\
        \x20   except OSError as e:\n\
        \x20       print('errno', e.errno)\n";
    for path in [
        mount.image("img"),
        mount.bound_view(&pool.disks[0], "img", &uuid),
    ] {
        let mut command = Command::new("python3");
        command.arg("-c").arg(script).arg(&path);
        for (offset, whence, _) in &expected {
            let kind = if *whence == libc::SEEK_DATA {
                "data"
            } else {
                "hole"
            };
            command.arg(format!("{offset}:{kind}"));
        }
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        let want: Vec<String> = expected
            .iter()
            .map(|(_, _, found)| match found {
                Some(offset) => offset.to_string(),
                None => format!("errno {}", libc::ENXIO),
            })
            .collect();
        assert_eq!(got, want, "{path:?}");
    }

    // `cp --sparse=always` keeps the holes and the bytes.
    let copied = pool.path("copied.img");
    run_ok(
        "cp",
        &[
            "--sparse=always".as_ref(),
            mount.image("img").as_os_str(),
            copied.as_os_str(),
        ],
    );
    assert_eq!(sha512sum(&copied), sha512sum(&source));
    use std::os::unix::fs::MetadataExt;
    let allocated = fs::metadata(&copied).unwrap().blocks() * 512;
    assert!(
        allocated < 2 * MIB,
        "the copy is not sparse: {allocated} bytes"
    );
    assert!(
        log_lines(&pool, "lseek").is_empty(),
        "{:?}",
        log_lines(&pool, "lseek")
    );
    mount.unmount();
}

#[test]
fn repeated_failed_reads_of_a_damaged_chunk_are_logged_once_then_counted() {
    let test = "repeated_failed_reads_of_a_damaged_chunk_are_logged_once_then_counted";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(1);
    let source = pool.path("source.img");
    random_file(&source, 2 * MIB, 241);
    pool.add_image("img", &source, 1);
    // The only copy, with a flipped byte in its second chunk: that chunk can never be served.
    flip_byte(&copy_path(&show(&pool, "img"), "d1"), 70_000);
    fs::remove_file(&source).unwrap();
    let mount = pool.mount();
    let file = open_direct(&mount.image("img")).unwrap();
    let mut buf = memmap2::MmapMut::map_anon(4096).unwrap();
    for _ in 0..40 {
        let err = file.read_at(&mut buf[..], 65_536).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }
    assert_eq!(
        file.read_at(&mut buf[..], 0).unwrap(),
        4096,
        "chunk 0 is good"
    );
    drop(file);
    let lines = log_lines(&pool, "read of img at");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    mount.unmount();
}

#[test]
fn a_volume_whose_disk_dies_answers_eio_and_status_says_what_to_do() {
    let test = "a_volume_whose_disk_dies_answers_eio_and_status_says_what_to_do";
    if !can_mount(test) {
        return;
    }
    let mut pool = TestPool::empty();
    let disks = add_loop_disks(&mut pool, &[("d1", 128 * MIB), ("d2", 128 * MIB)]);
    let source = pool.path("source.img");
    random_file(&source, 8 * MIB, 229);
    let base = fs::read(&source).unwrap();
    pool.ok(&["config", "set", "probe-interval", "1s"]);
    let mount = pool.mount();
    pool.add_image("img", &source, 1);
    // The image's only copy is where the volume is not: the base stays readable.
    let image_disks = serving_disks(&show(&pool, "img"));
    let volume_disk = if image_disks == ["d1"] { "d2" } else { "d1" };
    pool.ok(&[
        "volume",
        "create",
        "vm",
        "--image",
        "img",
        "--disk",
        volume_disk,
    ]);
    let path = mount.mountpoint.join("volumes/vm");
    assert!(
        poll(Duration::from_secs(5), Duration::from_millis(50), || path
            .exists()),
        "the volume does not appear"
    );

    let volume = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let mut written = vec![0u8; READ_SIZE];
    written
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 251) as u8);
    // O_DIRECT wants page-aligned buffers: anonymous maps are.
    let mut buffer = memmap2::MmapMut::map_anon(READ_SIZE).unwrap();
    buffer.copy_from_slice(&written);
    volume.write_all_at(&buffer, 0).unwrap();
    volume.sync_all().unwrap();
    let mut read = memmap2::MmapMut::map_anon(READ_SIZE).unwrap();
    volume.read_exact_at(&mut read, 0).unwrap();
    assert_eq!(&read[..], &written[..]);
    volume.read_exact_at(&mut read, 4 * MIB).unwrap();
    assert_eq!(&read[..], &base[4 * MIB as usize..5 * MIB as usize]);

    shut_down(loop_disk(&disks, volume_disk));
    assert!(
        poll(Duration::from_secs(20), Duration::from_millis(100), || {
            disk_state(&pool, volume_disk) == "failed"
        }),
        "{volume_disk} is {} after its filesystem died",
        disk_state(&pool, volume_disk)
    );
    // Out of service as a whole: written blocks, blocks its base image holds, writes, new
    // opens. Never a byte.
    let eio = |what: &str, result: io::Result<()>| {
        let error = result.expect_err(&format!("{what} worked on a volume whose disk died"));
        assert_eq!(error.raw_os_error(), Some(libc::EIO), "{what}: {error}");
    };
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(100), || {
            volume.read_exact_at(&mut read, 4 * MIB).is_err()
        }),
        "the base blocks of a volume whose disk died are still served"
    );
    eio("a read of written data", volume.read_exact_at(&mut read, 0));
    eio(
        "a read of base data",
        volume.read_exact_at(&mut read, 4 * MIB),
    );
    eio("a write", volume.write_all_at(&buffer, MIB));
    eio("a new open", File::open(&path).map(drop));

    let shown = pool.json(&["volume", "show", "vm"]);
    assert_eq!(shown["state"], "failed", "{shown}");
    let problem = shown["problem"].as_str().unwrap_or_default().to_string();
    assert!(
        problem.contains(volume_disk) && problem.contains("EIO") && problem.contains("disk list"),
        "volume show says: {problem}"
    );
    let problems = status_problems(&pool);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("volume vm failed") && p.contains("bring the disk back")),
        "status says: {problems:?}"
    );
    drop(volume);
    mount.unmount();
}
