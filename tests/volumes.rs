//! Volume commands through the real binary, without a mount: create, list, show, resize and
//! remove; the volume as a holder of its image; every bad input refused with one line and
//! nothing changed.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

const MIB: u64 = 1 << 20;

/// Runs a command that must fail cleanly (one line, exit 1) with a message naming each of
/// `expected`.
fn refused(pool: &TestPool, what: &str, args: &[&str], expected: &[&str]) {
    let line = failed_cleanly(what, &pool.run(args));
    for text in expected {
        assert!(line.contains(text), "{what}: {line}");
    }
}

#[test]
fn a_volume_is_created_listed_grown_and_removed_and_holds_its_image() {
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, 3 * MIB + 100, 7);
    pool.add_image("base", &source, 1);

    let created = pool.json(&["volume", "create", "vm1", "--image", "base", "--disk", "d2"]);
    // The image's size rounded up to 4 KiB.
    assert_eq!(created["size"], 3 * MIB + 4096);
    assert_eq!(created["image"], "base");
    assert_eq!(created["disk"], "d2");
    assert_eq!(created["state"], "ready");
    assert_eq!(created["snapshots"], 0);
    let uuid = created["uuid"].as_str().unwrap();
    let dir = pool.disks[1].join(".imgpool/volumes").join(uuid);
    for file in ["volume.json", "index.db", "data"] {
        assert!(dir.join(file).is_file(), "{file} missing in {dir:?}");
    }
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("volume.json")).unwrap()).unwrap();
    assert_eq!(record["name"], "vm1");
    assert_eq!(record["base"]["name"], "base");

    // Without --disk: the disk with the most free space; without --image: zeros, size needed.
    pool.ok(&["volume", "create", "scratch", "--size", "1GiB"]);
    let scratch = pool.json(&["volume", "show", "scratch"]);
    assert_eq!(scratch["size"], 1u64 << 30);
    assert!(scratch["image"].is_null());
    assert_eq!(pool.volume_names(), ["scratch", "vm1"]);
    let table = pool.ok(&["volume", "list"]);
    assert!(table.contains("vm1") && table.contains("base"), "{table}");

    // The volume holds its image: neither rm nor gc takes it.
    let out = pool.run(&["image", "rm", "base"]);
    let line = failed_cleanly("image rm of an image a volume uses", &out);
    assert!(line.contains("volume vm1"), "{line}");
    let collectable = pool.json(&["gc", "--grace", "0s", "--dry-run"]);
    assert!(
        !collectable.to_string().contains("base"),
        "gc would take an image a volume uses: {collectable}"
    );
    pool.ok(&["gc", "--grace", "0s"]);
    assert_eq!(pool.json(&["image", "list"]).as_array().unwrap().len(), 1);
    let holders = pool.ok(&["ref", "list", "base"]);
    assert!(holders.contains("volume vm1"), "{holders}");

    // The disk keeping a volume is not failed or forgotten without a word.
    refused(
        &pool,
        "disk fail of a volume's disk",
        &["disk", "fail", "d2"],
        &["volume vm1", "--force"],
    );
    refused(
        &pool,
        "disk rm of a volume's disk",
        &["disk", "rm", "d2"],
        &["volume vm1"],
    );
    assert_eq!(pool.json(&["volume", "show", "vm1"])["state"], "ready");
    // Failed anyway: the volume is failed, and `status` says what to do.
    pool.ok(&["disk", "fail", "d2", "--force"]);
    assert_eq!(pool.json(&["volume", "show", "vm1"])["state"], "failed");
    let status = pool.json(&["status"]);
    assert!(
        status["problems"].to_string().contains("volume vm1 failed"),
        "{status}"
    );
    pool.ok(&["disk", "online", "d2"]);
    assert_eq!(pool.json(&["volume", "show", "vm1"])["state"], "ready");

    pool.ok(&["volume", "resize", "vm1", "8MiB"]);
    assert_eq!(pool.json(&["volume", "show", "vm1"])["size"], 8 * MIB);

    pool.ok(&["volume", "rm", "vm1"]);
    assert!(!dir.exists(), "the volume's directory is left behind");
    assert_eq!(pool.volume_names(), ["scratch"]);
    pool.ok(&["image", "rm", "base"]);
}

#[test]
fn bad_volume_commands_fail_with_one_line_and_change_nothing() {
    let pool = TestPool::new(1);
    let source = pool.path("src.img");
    random_file(&source, 2 * MIB, 8);
    pool.add_image("base", &source, 1);
    pool.ok(&["volume", "create", "vm1", "--image", "base"]);
    let before = pool.ok(&["volume", "list", "--json"]);
    let files = |p: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(p.join(".imgpool/volumes"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let disk_before = files(&pool.disks[0]);

    let cases: &[(&[&str], &str)] = &[
        (
            &["volume", "create", "v2", "--image", "nope"],
            "no image named 'nope'",
        ),
        (
            &[
                "volume", "create", "v2", "--image", "base", "--size", "5000000",
            ],
            "multiple of 4096",
        ),
        (
            &[
                "volume", "create", "v2", "--image", "base", "--size", "1MiB",
            ],
            "at least its size",
        ),
        (
            &["volume", "create", "base", "--size", "1MiB"],
            "name of an image",
        ),
        (
            &["volume", "create", "vm1", "--size", "1MiB"],
            "name of a volume",
        ),
        (&["volume", "create", "v2"], "needs a size"),
        (
            &["volume", "create", "v2", "--size", "1MiB", "--disk", "d9"],
            "d9",
        ),
        (
            &["volume", "create", "bad/name", "--size", "1MiB"],
            "bad/name",
        ),
        (
            &["volume", "create", "v2", "--size", "0"],
            "multiple of 4096",
        ),
        (&["volume", "resize", "vm1", "1MiB"], "cannot shrink"),
        (&["volume", "resize", "vm1", "3000001"], "multiple of 4096"),
        (
            &["volume", "resize", "nope", "8MiB"],
            "no volume named 'nope'",
        ),
        (&["volume", "show", "nope"], "no volume named 'nope'"),
        (&["volume", "rm", "nope"], "no volume named 'nope'"),
    ];
    for (args, expected) in cases {
        let out = pool.run(args);
        let line = failed_cleanly(&args.join(" "), &out);
        assert!(line.contains(expected), "{args:?}: {line}");
    }
    // An image may not take a volume's name either.
    let out = pool.run(&["image", "add", "vm1", source.to_str().unwrap()]);
    let line = failed_cleanly("image add with a volume's name", &out);
    assert!(line.contains("name of a volume"), "{line}");

    assert_eq!(pool.ok(&["volume", "list", "--json"]), before);
    assert_eq!(files(&pool.disks[0]), disk_before);
}

#[test]
fn concurrent_creates_of_one_name_make_one_volume() {
    let pool = TestPool::new(2);
    let children: Vec<_> = (0..6)
        .map(|_| {
            pool.command(&["volume", "create", "race", "--size", "4MiB"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outcomes: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let won = outcomes.iter().filter(|o| o.status.success()).count();
    assert_eq!(won, 1, "exactly one create wins");
    for out in outcomes.iter().filter(|o| !o.status.success()) {
        let line = failed_cleanly("a losing create", out);
        assert!(line.contains("name of a volume"), "{line}");
    }
    assert_eq!(pool.volume_names(), ["race"]);
    // One directory on the disks: the losers left nothing.
    let dirs: usize = pool
        .disks
        .iter()
        .map(|d| {
            std::fs::read_dir(d.join(".imgpool/volumes"))
                .map(|r| r.count())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(dirs, 1);
}

fn pwrite(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.write_all_at(data, offset)
}

fn read_whole(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A volume through a real mount: it appears when created, reads its image and then zeros,
/// takes buffered, O_DIRECT and mmap writes, discards, refuses what would change its size,
/// keeps everything else read-only, and keeps its data across a remount.
#[test]
fn a_volume_is_a_read_write_file_of_the_mount() {
    let test = "a_volume_is_a_read_write_file_of_the_mount";
    if !can_mount(test) {
        return;
    }
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, 3 * MIB + 1000, 11);
    pool.add_image("base", &source, 1);
    let mount = pool.mount();
    // Created while mounted: it appears within a second.
    pool.ok(&[
        "volume", "create", "vm1", "--image", "base", "--size", "8MiB",
    ]);
    let path = mount.mountpoint.join("volumes/vm1");
    assert!(
        poll(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_millis(20),
            || { path.exists() }
        ),
        "the new volume did not appear within a second"
    );
    let mut model = vec![0u8; 8 * MIB as usize];
    let base = std::fs::read(&source).unwrap();
    model[..base.len()].copy_from_slice(&base);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);
    assert!(
        read_whole(&path) == model,
        "a new volume reads its image, then zeros"
    );

    // Buffered writes, unaligned, across the end of the image and across granules.
    for (offset, len, seed) in [
        (5u64, 100usize, 1u8),
        (3 * MIB - 7, 70_000, 2),
        (65_530, 20, 3),
    ] {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        pwrite(&path, offset, &data).unwrap();
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    // O_DIRECT, 4 KiB aligned.
    {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        let mut buf = memmap2::MmapMut::map_anon(64 * 1024).unwrap();
        buf.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8);
        file.write_all_at(&buf, MIB).unwrap();
        model[MIB as usize..MIB as usize + buf.len()].copy_from_slice(&buf);
        let mut back = memmap2::MmapMut::map_anon(64 * 1024).unwrap();
        file.read_exact_at(&mut back, MIB).unwrap();
        assert!(back[..] == buf[..], "O_DIRECT read after O_DIRECT write");
        file.sync_all().unwrap();
    }
    // A shared writable mapping.
    {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
        map[6 * MIB as usize..6 * MIB as usize + 5000].fill(0xAB);
        map.flush().unwrap();
        model[6 * MIB as usize..6 * MIB as usize + 5000].fill(0xAB);
    }
    // A discard reads as zeros, also where the image has data.
    let status = std::process::Command::new("fallocate")
        .args(["-p", "-o", "8192", "-l", "100000"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    model[8192..108_192].fill(0);
    assert!(
        read_whole(&path) == model,
        "the volume reads back what was written"
    );

    // Past the end: a write across it is short, as on a disk, and one beyond it is EFBIG; the
    // volume never grows. Truncation is refused; the rest of the mount stays read-only.
    {
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert_eq!(file.write_at(&[1u8; 20], 8 * MIB - 10).unwrap(), 10);
        model[8 * MIB as usize - 10..].fill(1);
        let err = file.write_at(&[1u8; 20], 8 * MIB).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
    }
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    assert_eq!(
        file.set_len(4 * MIB).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    drop(file);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);
    let err = pwrite(&mount.image("base"), 0, b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let view = pool.disks[0].join("backing-images");
    let err = std::fs::File::create(view.join("new")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    // SEEK_DATA/SEEK_HOLE see a volume's holes, as `cp --sparse` and qemu-img use them.
    pool.ok(&["volume", "create", "sparse", "--size", "8MiB"]);
    let sparse = mount.mountpoint.join("volumes/sparse");
    assert!(poll(
        std::time::Duration::from_secs(2),
        std::time::Duration::from_millis(20),
        || sparse.exists()
    ));
    pwrite(&sparse, 5 * MIB, &[9u8; 4096]).unwrap();
    let seek = std::process::Command::new("python3")
        .arg("-c")
        .arg("import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); print(os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 5*2**20, os.SEEK_HOLE))")
        .arg(&sparse)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&seek.stdout).trim(),
        format!("{} {}", 5 * MIB, 5 * MIB + 4096),
        "{}",
        String::from_utf8_lossy(&seek.stderr)
    );

    // Another user reads the image and the volume, and writes neither.
    let as_nobody = |script: &str| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "sh",
                "-c",
                script,
            ])
            .output()
            .unwrap()
    };
    let image_path = mount.image("base");
    let read = as_nobody(&format!(
        "head -c 4096 {} >/dev/null && head -c 4096 {} >/dev/null",
        image_path.display(),
        path.display()
    ));
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let write = as_nobody(&format!(
        "printf x | dd of={} conv=notrunc status=none",
        path.display()
    ));
    assert!(!write.status.success(), "another user wrote a volume");
    assert!(
        String::from_utf8_lossy(&write.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&write.stderr)
    );

    // Open through the mount: `volume show` says by whom, and commands that would write it
    // behind the daemon refuse.
    // The kernel releases a closed file a moment after close() returns.
    assert!(
        poll(
            std::time::Duration::from_secs(5),
            std::time::Duration::from_millis(20),
            || { pool.json(&["volume", "show", "vm1"])["open_by_pid"].is_null() }
        ),
        "the volume stays open after its files were closed"
    );
    let held = std::fs::File::open(&path).unwrap();
    let shown = pool.json(&["volume", "show", "vm1"]);
    assert_eq!(shown["open_by_pid"], mount.pid.unwrap());
    assert_eq!(shown["open_files"], 1, "{shown}");
    let held_too = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let listed = pool.json(&["volume", "list"]);
    let vm1 = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vm1");
    assert_eq!(vm1.unwrap()["open_files"], 2, "{listed}");
    drop(held_too);
    refused(
        &pool,
        "volume rm of an open volume",
        &["volume", "rm", "vm1"],
        &["open through a mount"],
    );
    drop(held);

    mount.unmount();
    let mount = pool.mount();
    let after = read_whole(&mount.mountpoint.join("volumes/vm1"));
    let differs = after.iter().zip(&model).position(|(a, b)| a != b);
    assert!(
        differs.is_none(),
        "the volume keeps its data across a remount; first difference at {differs:?}; log: {}",
        std::fs::read_to_string(pool.state.join("mount.log")).unwrap_or_default()
    );
    mount.unmount();
}

/// Real clients: fio writes with verification, buffered and O_DIRECT, several jobs; an ext4
/// filesystem on the volume (through a loop device) survives a check and a remount.
#[test]
fn fio_and_ext4_on_a_volume() {
    let test = "fio_and_ext4_on_a_volume";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(1);
    let source = pool.path("src.img");
    random_file(&source, 2 * MIB, 12);
    pool.add_image("base", &source, 1);
    pool.ok(&[
        "volume", "create", "fio", "--image", "base", "--size", "32MiB",
    ]);
    pool.ok(&["volume", "create", "fs", "--size", "64MiB"]);
    let mount = pool.mount();
    let fio_path = mount.mountpoint.join("volumes/fio");
    for direct in ["0", "1"] {
        let out = std::process::Command::new("fio")
            .args([
                "--name=verify",
                "--rw=randwrite",
                "--bs=4k",
                "--size=32M",
                "--io_size=8M",
                "--numjobs=1",
                "--ioengine=psync",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                &format!("--direct={direct}"),
            ])
            .arg(format!("--filename={}", fio_path.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fio direct={direct}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = std::process::Command::new("fio")
        .args([
            "--name=jobs",
            "--rw=randwrite",
            "--bs=16k",
            "--size=8M",
            "--numjobs=4",
            "--offset_increment=8M",
            "--ioengine=libaio",
            "--iodepth=8",
            "--direct=1",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .arg(format!("--filename={}", fio_path.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fio 4 jobs: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // ext4 on the volume.
    let fs_path = mount.mountpoint.join("volumes/fs");
    let loopdev = LoopFile::attach(&fs_path);
    run_ok(
        std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&loopdev.device),
    );
    let fs_mnt = pool.path("fsmnt");
    std::fs::create_dir_all(&fs_mnt).unwrap();
    {
        let _mounted = Mounted::new(&loopdev.device, &fs_mnt);
        for i in 0..20 {
            let dir = fs_mnt.join(format!("d{}", i % 4));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("f{i}")), vec![i as u8; 1000 + i * 3000]).unwrap();
        }
    }
    run_ok(
        std::process::Command::new("e2fsck")
            .args(["-fn"])
            .arg(&loopdev.device),
    );
    {
        let _mounted = Mounted::new(&loopdev.device, &fs_mnt);
        for i in 0..20 {
            let file = fs_mnt.join(format!("d{}", i % 4)).join(format!("f{i}"));
            assert_eq!(
                std::fs::read(&file).unwrap(),
                vec![i as u8; 1000 + i * 3000]
            );
        }
    }
    drop(loopdev);
    mount.unmount();
}

/// `kill -9` of the daemon while a writer writes and fsyncs: after a new mount, every write
/// whose fsync returned is there (or a later write to the same block), and fsck is clean.
#[test]
fn a_crash_loses_no_write_that_an_fsync_covered() {
    let test = "a_crash_loses_no_write_that_an_fsync_covered";
    if !can_mount(test) {
        return;
    }
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    const BLOCKS: u64 = 2048; // 8 MiB
    let pool = TestPool::new(1);
    pool.ok(&["volume", "create", "crash", "--size", "8MiB"]);
    let mount = pool.mount();
    let path = mount.mountpoint.join("volumes/crash");
    let block = |write: u64| -> Vec<u8> {
        let mut data = vec![0u8; 4096];
        for (i, chunk) in data.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&(write * 1_000_003 + i as u64).to_le_bytes());
        }
        data
    };
    // Write n goes to block (n * 7919) % BLOCKS; after each fsync that returns, n is durable.
    let target = |n: u64| (n * 7919) % BLOCKS;
    let stop = AtomicBool::new(false);
    let acked = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut acked = None;
            for n in 0.. {
                if stop.load(Ordering::Relaxed)
                    || file.write_all_at(&block(n), target(n) * 4096).is_err()
                {
                    break;
                }
                // Every fourth write is fsynced, so that unsynced writes are in flight too.
                if n % 4 == 3 {
                    if file.sync_data().is_err() {
                        break;
                    }
                    acked = Some(n);
                }
            }
            acked
        });
        std::thread::sleep(std::time::Duration::from_millis(1500));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(mount.pid.unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap()
    });
    let acked = acked.expect("some fsync returned before the kill");
    assert!(acked > 100, "too few writes before the kill: {acked}");
    drop(mount); // lazily unmounts what the dead daemon left

    let mount = pool.mount();
    let file = std::fs::File::open(mount.mountpoint.join("volumes/crash")).unwrap();
    // For each block, the last write to it that an fsync covered, and the writes after it.
    let mut last_acked: Vec<Option<u64>> = vec![None; BLOCKS as usize];
    for n in 0..=acked {
        last_acked[target(n) as usize] = Some(n);
    }
    let mut buf = vec![0u8; 4096];
    for b in 0..BLOCKS {
        file.read_exact_at(&mut buf, b * 4096).unwrap();
        let Some(durable) = last_acked[b as usize] else {
            continue;
        };
        // A later write to the block (not covered by an fsync) may be there instead.
        let ok = (durable..durable + 4 * BLOCKS).any(|n| target(n) == b && buf == block(n));
        assert!(
            ok,
            "block {b}: the write {durable}, covered by an fsync, is lost"
        );
    }
    drop(file);
    mount.unmount();
    let fsck = pool.run(&["fsck"]);
    assert!(
        fsck.status.success(),
        "fsck after the crash: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// The disks alone rebuild the volumes' rows; fsck finds a volume the store does not list and
/// lists it again, and reports a damaged record, deleting nothing.
#[test]
fn fsck_checks_volumes_and_rebuilds_them_from_the_disks() {
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, MIB, 13);
    pool.add_image("base", &source, 1);
    pool.ok(&[
        "volume", "create", "vm1", "--image", "base", "--size", "4MiB", "--disk", "d1",
    ]);
    pool.ok(&[
        "volume", "create", "blank", "--size", "2MiB", "--disk", "d2",
    ]);
    pool.ok(&["volume", "resize", "blank", "3MiB"]);
    let before = pool.ok(&["volume", "list", "--json"]);
    assert!(pool.run(&["fsck"]).status.success(), "fsck of a clean pool");

    // The store is lost: fsck --repair rebuilds it from the disks, volumes included.
    for file in ["pool.db", "pool.db-wal", "pool.db-shm"] {
        let _ = std::fs::remove_file(pool.state.join(file));
    }
    let mut args = vec!["fsck", "--repair"];
    for disk in &pool.disks {
        args.extend(["--disk", disk.to_str().unwrap()]);
    }
    let out = pool.ok(&args);
    assert!(
        out.contains("volume 'vm1'") && out.contains("volume 'blank'"),
        "{out}"
    );
    assert_eq!(pool.ok(&["volume", "list", "--json"]), before);
    // The base image is held by its volume again.
    refused(
        &pool,
        "image rm after the rebuild",
        &["image", "rm", "base"],
        &["volume vm1"],
    );

    // A volume directory the store does not list is found and listed again.
    {
        let db = rusqlite::Connection::open(pool.state.join("pool.db")).unwrap();
        db.execute("DELETE FROM volumes WHERE name = 'vm1'", [])
            .unwrap();
    }
    let out = pool.run(&["fsck"]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !out.status.success() && report.contains("holds volume 'vm1'"),
        "{report}"
    );
    pool.ok(&["fsck", "--repair"]);
    assert_eq!(pool.ok(&["volume", "list", "--json"]), before);

    // A damaged record is reported, and nothing is deleted.
    let uuid = pool.json(&["volume", "show", "blank"])["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = pool.disks[1].join(".imgpool/volumes").join(&uuid);
    std::fs::write(dir.join("volume.json"), b"{").unwrap();
    let out = pool.run(&["fsck"]);
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("volume 'blank'"), "{report}");
    pool.run(&["fsck", "--repair"]);
    assert!(dir.join("data").exists() && dir.join("index.db").exists());
}

/// Fills the volume with one byte through the mount; returns once the file is closed and the
/// daemon has let go of the volume.
fn fill(pool: &TestPool, path: &Path, byte: u8, size: usize) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&vec![byte; size], 0)
        .unwrap();
    assert!(poll(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_millis(20),
        || pool.json(&["volume", "show", "v"])["open_by_pid"].is_null()
    ));
}

/// Snapshots of a volume no file has open: taken, listed, deleted by name, range and policy
/// (a dry run and an unknown name change nothing), and rolled back to.
#[test]
fn snapshots_are_taken_listed_deleted_and_rolled_back() {
    if !can_mount("snapshots_are_taken_listed_deleted_and_rolled_back") {
        return;
    }
    let size = MIB as usize;
    let pool = TestPool::new(1);
    pool.ok(&["volume", "create", "v", "--size", "1MiB"]);
    let mount = pool.mount();
    let path = mount.mountpoint.join("volumes/v");
    fill(&pool, &path, b'A', size);
    pool.ok(&["snapshot", "create", "v@s1"]);
    fill(&pool, &path, b'B', size);
    pool.ok(&["snapshot", "create", "v@s2"]);
    fill(&pool, &path, b'C', size);
    assert_eq!(pool.snapshot_names("v"), ["s1", "s2"]);
    // Each whole fill replaced every block: each snapshot alone holds the volume's size.
    let listed = pool.json(&["snapshot", "list", "v"]);
    for s in listed.as_array().unwrap() {
        assert_eq!(s["unique_bytes"], MIB, "{listed}");
    }
    refused(
        &pool,
        "a snapshot name taken",
        &["snapshot", "create", "v@s1"],
        &["already"],
    );
    refused(
        &pool,
        "a bad target",
        &["snapshot", "create", "v"],
        &["VOLUME@SNAPSHOT"],
    );

    // A rollback over a newer snapshot needs --destroy-newer.
    refused(
        &pool,
        "rollback past s2",
        &["volume", "rollback", "v@s1"],
        &["s2", "--destroy-newer"],
    );
    pool.ok(&["volume", "rollback", "v@s1", "--destroy-newer"]);
    assert_eq!(pool.snapshot_names("v"), ["s1"]);
    assert!(
        read_whole(&path) == vec![b'A'; size],
        "the rollback restored s1"
    );

    for name in ["s3", "s4", "s5"] {
        pool.ok(&["snapshot", "create", &format!("v@{name}")]);
    }
    let dry = pool.json(&["snapshot", "rm", "v@s3%s4", "--dry-run"]);
    assert_eq!(dry["deleted"], serde_json::json!(["s3", "s4"]));
    assert_eq!(pool.snapshot_names("v"), ["s1", "s3", "s4", "s5"]);
    refused(
        &pool,
        "an unknown name",
        &["snapshot", "rm", "v@s1", "v@nope"],
        &["'nope'"],
    );
    assert_eq!(pool.snapshot_names("v"), ["s1", "s3", "s4", "s5"]);
    pool.ok(&["snapshot", "rm", "v@s3%s4"]);
    assert_eq!(pool.snapshot_names("v"), ["s1", "s5"]);
    pool.ok(&["snapshot", "rm", "v", "--keep-last", "1"]);
    assert_eq!(pool.snapshot_names("v"), ["s5"]);
    assert!(read_whole(&path) == vec![b'A'; size]);
    refused(
        &pool,
        "rm of a volume with snapshots",
        &["volume", "rm", "v"],
        &["--recursive"],
    );
    mount.unmount();
}

/// A snapshot of a volume open and written through the mount goes through its daemon: it
/// holds what was written before it, not what was written after; a rollback waits for the
/// volume to be closed.
#[test]
fn a_snapshot_of_an_open_volume_is_taken_by_its_daemon() {
    if !can_mount("a_snapshot_of_an_open_volume_is_taken_by_its_daemon") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let size = MIB as usize;
    let pool = TestPool::new(1);
    pool.ok(&["volume", "create", "v", "--size", "1MiB"]);
    let mount = pool.mount();
    let path = mount.mountpoint.join("volumes/v");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.write_all_at(&vec![b'X'; size], 0).unwrap();
    pool.ok(&["snapshot", "create", "v@while-open"]);
    file.write_all_at(&vec![b'Y'; size / 2], 0).unwrap();
    assert_eq!(pool.snapshot_names("v"), ["while-open"]);
    // Grown while open, by its daemon: the file has the new size, the store knows it.
    pool.ok(&["volume", "resize", "v", "2MiB"]);
    assert_eq!(pool.json(&["volume", "show", "v"])["size"], 2 * MIB);
    assert!(poll(
        std::time::Duration::from_secs(3),
        std::time::Duration::from_millis(50),
        || std::fs::metadata(&path).unwrap().len() == 2 * MIB
    ));
    file.write_all_at(b"past the old end", 2 * MIB - 100)
        .unwrap();
    refused(
        &pool,
        "rollback of an open volume",
        &["volume", "rollback", "v@while-open"],
        &["open"],
    );
    drop(file);
    assert!(poll(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_millis(20),
        || pool.json(&["volume", "show", "v"])["open_by_pid"].is_null()
    ));
    pool.ok(&["volume", "rollback", "v@while-open"]);
    assert!(
        read_whole(&path) == vec![b'X'; size],
        "the snapshot held the writes before it"
    );
    assert_eq!(
        pool.json(&["volume", "show", "v"])["size"],
        MIB,
        "a rollback restores the size"
    );
    mount.unmount();
}

/// A volume whose disk fills up: the write that finds no room gets ENOSPC, and every write
/// before it, fsynced, reads back; the volume keeps working for overwrites.
#[test]
fn a_full_disk_gives_enospc_and_loses_no_earlier_write() {
    if !can_mount("a_full_disk_gives_enospc_and_loses_no_earlier_write") {
        return;
    }
    let mut pool = TestPool::empty();
    let disk = LoopDisk::new(pool.dir.path(), "small", 48 * MIB, "ext4");
    pool.add_disk("small", &disk.mountpoint);
    pool.ok(&["volume", "create", "big", "--size", "256MiB"]);
    let mount = pool.mount();
    let path = mount.mountpoint.join("volumes/big");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let chunk = |i: u64| vec![(i % 251) as u8 + 1; MIB as usize];
    let mut written = 0;
    let err = loop {
        match file.write_all_at(&chunk(written), written * MIB) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 256, "a 48 MiB disk took 256 MiB");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(written > 10, "only {written} MiB fit");
    // What was written before stays, durably; overwrites still work.
    let _ = file.sync_all();
    file.write_all_at(&chunk(99), 0).unwrap();
    file.sync_all().unwrap();
    let mut back = vec![0u8; MIB as usize];
    file.read_exact_at(&mut back, 0).unwrap();
    assert!(back == chunk(99));
    for i in 1..written {
        file.read_exact_at(&mut back, i * MIB).unwrap();
        assert!(
            back == chunk(i),
            "MiB {i}, written before the disk filled, changed"
        );
    }
    drop(file);
    mount.unmount();
    drop(disk);
}

/// qemu-img reads the volume as the raw disk it is.
#[test]
fn qemu_img_converts_a_volume_to_what_was_written() {
    if !can_mount("qemu_img_converts_a_volume_to_what_was_written") {
        return;
    }
    let pool = TestPool::new(1);
    let source = pool.path("src.img");
    random_file(&source, 3 * MIB, 14);
    pool.add_image("base", &source, 1);
    pool.ok(&["volume", "create", "q", "--image", "base", "--size", "8MiB"]);
    let mount = pool.mount();
    let path = mount.mountpoint.join("volumes/q");
    pwrite(&path, 2 * MIB + 123, &[5u8; 300_000]).unwrap();
    pwrite(&path, 7 * MIB, &[6u8; 4096]).unwrap();
    let out = pool.path("out.raw");
    let convert = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&path)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        convert.status.success(),
        "{}",
        String::from_utf8_lossy(&convert.stderr)
    );
    assert_eq!(sha512sum(&out), sha512sum(&path));
    let mut expected = std::fs::read(&source).unwrap();
    expected.resize(8 * MIB as usize, 0);
    expected[2 * MIB as usize + 123..2 * MIB as usize + 300_123].fill(5);
    expected[7 * MIB as usize..7 * MIB as usize + 4096].fill(6);
    assert!(std::fs::read(&out).unwrap() == expected);
    mount.unmount();
}

/// One process writes a volume: while one mount of the pool has it open, another mount of the
/// same pool answers EBUSY to an open of it; once it is closed, the other may open it.
#[test]
fn a_second_mount_does_not_open_a_volume_the_first_has_open() {
    if !can_mount("a_second_mount_does_not_open_a_volume_the_first_has_open") {
        return;
    }
    let pool = TestPool::new(1);
    pool.ok(&["volume", "create", "v", "--size", "1MiB"]);
    let first = pool.mount();
    let second = pool.mount_at("mnt2", &["--no-bind"]);
    let held = std::fs::OpenOptions::new()
        .write(true)
        .open(first.mountpoint.join("volumes/v"))
        .unwrap();
    let err = std::fs::File::open(second.mountpoint.join("volumes/v")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
    drop(held);
    assert!(poll(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_millis(20),
        || std::fs::File::open(second.mountpoint.join("volumes/v")).is_ok()
    ));
    second.unmount();
    first.unmount();
}

/// Volume commands against themselves: snapshots taken by several commands at once all land;
/// `volume create` and a batch `snapshot rm` killed with kill -9 at random instants leave a
/// pool that fsck finds clean, whose listings match the disks, and where every success the
/// commands reported still holds.
#[test]
fn volume_commands_at_once_and_killed_midway_leave_a_consistent_pool() {
    let pool = TestPool::new(2);
    pool.ok(&["volume", "create", "v", "--size", "4MiB"]);
    let children: Vec<_> = (0..6)
        .map(|i| {
            pool.command(&["snapshot", "create", &format!("v@c{i}")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut names = pool.snapshot_names("v");
    names.sort();
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4", "c5"]);

    for round in 0..12u64 {
        let delay = std::time::Duration::from_millis(round * 3 % 25);
        let name = format!("k{round}");
        let mut create = ChildGuard(Some(
            pool.command(&["volume", "create", &name, "--size", "8MiB"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        ));
        std::thread::sleep(delay);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(create.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let finished = create
            .wait_timeout(std::time::Duration::from_secs(10))
            .unwrap()
            .success();
        // A command that changes the pool cleans up first; then the store and disks agree.
        pool.ok(&["repair"]);
        let fsck = pool.run(&["fsck"]);
        assert!(
            fsck.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let listed = pool.volume_names().contains(&name);
        assert!(
            listed || !finished,
            "round {round}: a create that succeeded is gone"
        );
        let dirs: usize = pool
            .disks
            .iter()
            .map(|d| {
                std::fs::read_dir(d.join(".imgpool/volumes"))
                    .map(|r| r.count())
                    .unwrap_or(0)
            })
            .sum();
        assert_eq!(
            dirs,
            pool.volume_names().len(),
            "round {round}: directories left"
        );
    }

    // A batch deletion killed midway: all of it or none of it is listed.
    for i in 0..40 {
        pool.ok(&["snapshot", "create", &format!("v@b{i}")]);
    }
    let mut rm = ChildGuard(Some(
        pool.command(&["snapshot", "rm", "v@b0%b39"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    ));
    std::thread::sleep(std::time::Duration::from_millis(15));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(rm.pid()),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deleted = rm
        .wait_timeout(std::time::Duration::from_secs(10))
        .unwrap()
        .success();
    let left: Vec<String> = pool
        .snapshot_names("v")
        .into_iter()
        .filter(|n| n.starts_with('b'))
        .collect();
    assert!(
        left.is_empty() || (left.len() == 40 && !deleted),
        "a batch half applied: {left:?}"
    );
    pool.ok(&["snapshot", "create", "v@after"]);
    assert!(pool.run(&["fsck"]).status.success());
}

/// `volume rm` of a volume whose disk is missing says which disk and what to do, in one line,
/// makes nothing at the disk's path, and removes the volume once the disk is back.
#[test]
fn removing_a_volume_on_a_missing_disk_names_the_disk() {
    let pool = TestPool::new(1);
    pool.ok(&["volume", "create", "vm1", "--size", "1MiB"]);
    let away = pool.path("unmounted");
    std::fs::rename(&pool.disks[0], &away).unwrap();
    let line = pool.fails(&["volume", "rm", "vm1"]);
    let made = pool.disks[0].exists();
    std::fs::rename(&away, &pool.disks[0]).unwrap_or_else(|e| panic!("{line}; {made}: {e}"));
    assert!(
        line.contains("volume 'vm1' is on disk 'd1'")
            && line.contains(&format!(
                "mount the disk's filesystem at {}",
                pool.disks[0].display()
            )),
        "{line}"
    );
    assert!(!made, "volume rm made the missing disk's path");
    assert_eq!(pool.volume_names(), ["vm1"]);
    pool.ok(&["volume", "rm", "vm1"]);
    assert!(pool.volume_names().is_empty());
}
