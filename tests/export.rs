//! Export: `image add NAME --from-volume VOLUME[@SNAP]` makes an image of a volume, now or at a
//! snapshot, whether a mount has the volume open or not; the image holds the volume's bytes,
//! stores only its data, serves as a base, and outlives the volume.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Duration;

use sha2::{Digest, Sha512};

use common::*;

const MIB: usize = 1 << 20;
const BLOCK: usize = 4096;

fn sha512_hex(bytes: &[u8]) -> String {
    hex::encode(Sha512::digest(bytes))
}

/// An image's SHA-512 from `image checksum`, which computes it if the daemon has not yet (an
/// export's is computed after the export returns).
fn checksum(pool: &TestPool, image: &str) -> String {
    let out = pool.json(&["image", "checksum", image]);
    assert_eq!(out["name"], image, "{out}");
    out["sha512"].as_str().unwrap().to_string()
}

/// Bytes that are not zero in any 4 KiB block: what a sparse image stores.
fn nonzero_blocks(bytes: &[u8]) -> u64 {
    bytes
        .chunks(BLOCK)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64
        * BLOCK as u64
}

/// Stored bytes of an image's copies, from `image show`.
fn stored_bytes(pool: &TestPool, image: &str) -> u64 {
    let info = pool.json(&["image", "show", image]);
    info["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            std::fs::metadata(c["path"].as_str().unwrap())
                .unwrap()
                .blocks()
                * 512
        })
        .sum()
}

/// A volume over a sparse base image, written through the mount in ways that matter to an
/// export: over base data, past the base's end, zeros written, a range discarded (zeros where
/// the base has data). Returns the volume's content at snapshot `s1` and now.
fn a_written_volume(pool: &TestPool, mount: &MountGuard) -> (Vec<u8>, Vec<u8>) {
    // Base: 1 MiB of data, a 2 MiB hole, 1 MiB of data.
    let base_path = pool.path("base.img");
    let mut base = vec![0u8; 4 * MIB];
    for (i, b) in base.iter_mut().enumerate() {
        if !(MIB..3 * MIB).contains(&i) {
            *b = (i * 7 % 253 + 1) as u8;
        }
    }
    std::fs::write(&base_path, &base).unwrap();
    let punch = std::process::Command::new("fallocate")
        .args(["--punch-hole", "--offset", "1048576", "--length", "2097152"])
        .arg(&base_path)
        .status()
        .unwrap();
    assert!(punch.success());
    pool.add_image("base", &base_path, 1);
    pool.ok(&[
        "volume", "create", "v", "--image", "base", "--size", "8388608",
    ]);
    let path = mount.mountpoint.join("volumes/v");
    assert!(poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || path.exists()
    ));

    let mut content = base.clone();
    content.resize(8 * MIB, 0);
    let write = |file: &File, content: &mut Vec<u8>, offset: usize, data: &[u8]| {
        file.write_all_at(data, offset as u64).unwrap();
        content[offset..offset + data.len()].copy_from_slice(data);
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    write(&file, &mut content, 512 * 1024 + 100, &[0xAB; 70_000]);
    write(&file, &mut content, 5 * MIB, &[0xCD; 3 * BLOCK]);
    write(&file, &mut content, 3 * MIB + 8 * BLOCK, &[0u8; 2 * BLOCK]);
    file.sync_all().unwrap();
    // A discard over the base's data reads as zeros.
    let zero = std::process::Command::new("fallocate")
        .args(["--zero-range", "--offset", "3211264", "--length", "65536"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(zero.success());
    content[3_211_264..3_211_264 + 65_536].fill(0);
    drop(file);
    wait_closed(pool, "v");
    pool.ok(&["snapshot", "create", "v@s1"]);
    let at_s1 = content.clone();

    let file = OpenOptions::new().write(true).open(&path).unwrap();
    write(&file, &mut content, 100, &[0xEF; 5000]);
    write(&file, &mut content, 7 * MIB, &[0x11; BLOCK]);
    drop(file);
    wait_closed(pool, "v");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        content,
        "the volume reads back"
    );
    (at_s1, content)
}

#[test]
fn a_volume_exports_as_an_image_of_its_bytes_storing_only_its_data() {
    let test = "a_volume_exports_as_an_image_of_its_bytes_storing_only_its_data";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(2);
    let mount = pool.mount();
    let (at_s1, now) = a_written_volume(&pool, &mount);
    // Not open through the mount: read here, under the volume's writer lock.
    let added = pool.json(&["image", "add", "from-s1", "--from-volume", "v@s1"]);
    // Committed before its SHA-512 is computed (docs/decisions.md, "Export").
    assert!(added["sha512"].is_null(), "{added}");
    pool.ok(&[
        "image",
        "add",
        "from-now",
        "--from-volume",
        "v",
        "--copies",
        "2",
    ]);

    for (image, expected) in [("from-s1", &at_s1), ("from-now", &now)] {
        // The mount daemon computes the SHA-512 in the background, and Longhorn's
        // backing.cfg beside the image then carries it.
        let mut info = pool.json(&["image", "show", image]);
        assert!(
            poll(Duration::from_secs(60), Duration::from_millis(50), || {
                info = pool.json(&["image", "show", image]);
                !info["sha512"].is_null()
            }),
            "{image}: the daemon did not compute its SHA-512: {info}"
        );
        assert_eq!(info["sha512"], sha512_hex(expected), "{image}: {info}");
        assert_eq!(info["size"], expected.len() as u64);
        let served = mount.image(image);
        assert!(poll(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || served.exists()
        ));
        let config_path = mount
            .disk_view("d1", image, info["uuid"].as_str().unwrap())
            .with_file_name("backing.cfg");
        let mut config = serde_json::Value::Null;
        assert!(
            poll(Duration::from_secs(5), Duration::from_millis(50), || {
                config = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
                config["expectedChecksum"] == info["sha512"]
            }),
            "{image}: backing.cfg {config}"
        );
        assert_eq!(
            sha512sum(&served),
            sha512_hex(expected),
            "{image} through the mount"
        );
        // Holes and zero blocks are not stored (the filesystem may add a block of metadata).
        let copies = info["copies"].as_array().unwrap().len() as u64;
        let stored = stored_bytes(&pool, image);
        let data = nonzero_blocks(expected) * copies;
        assert!(
            stored >= data && stored <= data + copies * 64 * 1024,
            "{image}: {stored} bytes stored for {data} bytes of data"
        );
    }
    let info = pool.json(&["image", "show", "from-s1"]);
    assert_eq!(info["source"], "volume:v@s1", "{info}");

    // The image does not need the volume; a volume over it reads the same.
    pool.ok(&["volume", "rm", "v", "--recursive"]);
    pool.ok(&["volume", "create", "w", "--image", "from-s1"]);
    let w = mount.mountpoint.join("volumes/w");
    assert!(poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || w.exists()
    ));
    assert_eq!(std::fs::read(&w).unwrap(), at_s1);
    mount.unmount();
}

#[test]
fn bad_exports_fail_with_one_line_and_change_nothing() {
    let pool = TestPool::new(1);
    let image = pool.path("img");
    random_file(&image, MIB as u64, 3);
    pool.add_image("img", &image, 1);
    pool.ok(&["volume", "create", "v", "--image", "img"]);
    pool.ok(&["snapshot", "create", "v@s"]);
    let images = || pool.json(&["image", "list"]).as_array().unwrap().len();
    let before = images();
    for (args, expected) in [
        (vec!["image", "add", "x", "--from-volume", "nope"], "nope"),
        (vec!["image", "add", "x", "--from-volume", "v@nope"], "nope"),
        (
            vec!["image", "add", "x", "--from-volume", "v@"],
            "VOLUME@SNAPSHOT",
        ),
        (vec!["image", "add", "img", "--from-volume", "v@s"], "img"),
        (vec!["image", "add", "v", "--from-volume", "v@s"], "v"),
        (
            vec!["image", "add", "bad/name", "--from-volume", "v@s"],
            "bad/name",
        ),
    ] {
        let line = failed_cleanly(&format!("{args:?}"), &pool.run(&args));
        assert!(line.contains(expected), "{args:?}: {line}");
    }
    let both = pool.run(&["image", "add", "x", "/etc/hostname", "--from-volume", "v@s"]);
    assert!(
        !both.status.success(),
        "a file and a volume at once were taken"
    );
    assert_eq!(images(), before, "a refused export left an image");
    assert!(
        pool.json(&["snapshot", "list", "v"])
            .as_array()
            .unwrap()
            .len()
            == 1
    );
}

fn assert_fsck_clean(pool: &TestPool, after: &str) {
    let out = pool.run(&["fsck"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("clean: the store and the disks agree"),
        "fsck after {after}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Volume `v` of `size` bytes with random data in `data` (zeros elsewhere), written through
/// the mount, closed, and its snapshot `v@s`; returns its content.
fn a_snapshot_of_random_data(
    pool: &TestPool,
    mount: &MountGuard,
    size: usize,
    data: std::ops::Range<usize>,
    seed: u64,
) -> Vec<u8> {
    pool.ok(&["volume", "create", "v", "--size", &size.to_string()]);
    let path = mount.mountpoint.join("volumes/v");
    assert!(poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || path.exists()
    ));
    let source = pool.path("random");
    random_file(&source, data.len() as u64, seed);
    let mut content = vec![0u8; size];
    content[data.clone()].copy_from_slice(&std::fs::read(&source).unwrap());
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    for (i, piece) in content[data.clone()].chunks(8 * MIB).enumerate() {
        file.write_all_at(piece, (data.start + i * 8 * MIB) as u64)
            .unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    wait_closed(pool, "v");
    pool.ok(&["snapshot", "create", "v@s"]);
    content
}

/// `kill -9` of exports at instants spread over their run: no image appears half made, the
/// next command that changes the pool cleans up, `fsck` is clean, and the export then works.
#[test]
fn an_export_killed_anywhere_leaves_nothing_and_runs_again() {
    let test = "an_export_killed_anywhere_leaves_nothing_and_runs_again";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(2);
    let mount = pool.mount();
    let content = a_snapshot_of_random_data(&pool, &mount, 64 * MIB, 8 * MIB..56 * MIB, 17);

    // How long one export takes here, to spread the kills over it.
    let started = std::time::Instant::now();
    pool.ok(&[
        "image",
        "add",
        "timed",
        "--from-volume",
        "v@s",
        "--copies",
        "2",
    ]);
    let took = started.elapsed();
    pool.ok(&["image", "rm", "timed"]);

    let instants = 8u32;
    for i in 0..instants {
        let at = took * (i + 1) / (instants + 1);
        let mut child = ChildGuard::quiet(
            &pool,
            &["image", "add", "e", "--from-volume", "v@s", "--copies", "2"],
        );
        std::thread::sleep(at);
        let _ = child.kill_9();
        let what = format!("a kill at {at:?} of {took:?}");
        // Either it finished before the kill, whole, or nothing of it is listed.
        if pool.image_names().contains(&"e".to_string()) {
            assert_eq!(checksum(&pool, "e"), sha512_hex(&content), "{what}");
            pool.ok(&["image", "rm", "e"]);
        }
        pool.ok(&["gc"]);
        assert_fsck_clean(&pool, &what);
        for disk in &pool.disks {
            let tmp = disk.join(".imgpool/tmp");
            let left: Vec<_> = std::fs::read_dir(&tmp)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "{what}: partial copies left: {left:?}");
        }
    }
    pool.ok(&["image", "add", "e", "--from-volume", "v@s", "--copies", "2"]);
    assert_eq!(checksum(&pool, "e"), sha512_hex(&content));
    assert_eq!(sha512sum(&mount.image("e")), sha512_hex(&content));
    mount.unmount();
}

/// A volume that the mount has open (a writer holds it) is exported through the mount: a
/// snapshot from its file, the live volume from a temporary snapshot deleted afterwards, also
/// when the export is killed (then by the next export).
#[test]
fn an_open_volume_exports_through_its_mount() {
    let test = "an_open_volume_exports_through_its_mount";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(1);
    let mount = pool.mount();
    let (at_s1, now) = a_written_volume(&pool, &mount);
    let path = mount.mountpoint.join("volumes/v");
    let writer = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let shown = pool.json(&["volume", "show", "v"]);
    assert!(!shown["open_by_pid"].is_null(), "{shown}");

    pool.ok(&["image", "add", "open-s1", "--from-volume", "v@s1"]);
    pool.ok(&["image", "add", "open-now", "--from-volume", "v"]);
    assert_eq!(checksum(&pool, "open-s1"), sha512_hex(&at_s1));
    assert_eq!(checksum(&pool, "open-now"), sha512_hex(&now));
    assert_eq!(
        pool.snapshot_names("v"),
        ["s1"],
        "the temporary snapshot stays"
    );

    // Killed while it reads its temporary snapshot: the next export deletes it.
    pool.ok(&["volume", "create", "big", "--size", "134217728"]);
    let big_path = mount.mountpoint.join("volumes/big");
    assert!(poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || big_path.exists()
    ));
    let big = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&big_path)
        .unwrap();
    let random = pool.path("random");
    random_file(&random, 128 * MIB as u64, 31);
    big.write_all_at(&std::fs::read(&random).unwrap(), 0)
        .unwrap();
    let mut child = ChildGuard::quiet(&pool, &["image", "add", "killed", "--from-volume", "big"]);
    assert!(
        poll(Duration::from_secs(10), Duration::from_millis(5), || {
            pool.snapshot_names("big")
                .iter()
                .any(|s| s.starts_with("export-tmp-"))
        }),
        "no temporary snapshot appeared"
    );
    let _ = child.kill_9();
    if !pool.image_names().contains(&"killed".to_string()) {
        // It died before it finished: its snapshot is left until the next export, since the
        // daemon has the volume open (which `recover` leaves alone).
        pool.ok(&["image", "add", "after", "--from-volume", "v@s1"]);
    }
    assert!(
        pool.snapshot_names("big").is_empty(),
        "left by the killed export"
    );
    drop(big);
    drop(writer);
    mount.unmount();
}

/// An export of a snapshot killed after it made part of its copy durable resumes there.
#[test]
fn a_killed_export_of_a_snapshot_resumes_where_it_was_durable() {
    let test = "a_killed_export_of_a_snapshot_resumes_where_it_was_durable";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(1);
    let mount = pool.mount();
    let content = a_snapshot_of_random_data(&pool, &mount, 384 * MIB, 0..384 * MIB, 29);

    let progress = pool.disks[0].join(".imgpool/partial");
    let checkpointed = || {
        std::fs::read_dir(&progress)
            .map(|d| {
                d.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "json"))
            })
            .unwrap_or(false)
    };
    let mut child = ChildGuard::quiet(&pool, &["image", "add", "e", "--from-volume", "v@s"]);
    let reached = poll(
        Duration::from_secs(60),
        Duration::from_millis(2),
        checkpointed,
    );
    let finished = child.kill_9().is_some_and(|s| s.success());
    assert!(
        reached && !finished,
        "the export ended before its first checkpoint"
    );
    assert!(!pool.image_names().contains(&"e".to_string()));

    let out = pool.json(&["image", "add", "e", "--from-volume", "v@s"]);
    let resumed = out["resumed_at"].as_u64().unwrap();
    assert!(resumed >= 64 * MIB as u64, "resumed at {resumed}: {out}");
    assert_eq!(checksum(&pool, "e"), sha512_hex(&content));
    assert_eq!(sha512sum(&mount.image("e")), sha512_hex(&content));
    assert_fsck_clean(&pool, "a resumed export");
    assert!(!checkpointed(), "the partial copy's progress is left");
    mount.unmount();
}

/// Exports of one snapshot at once, and a deletion of that snapshot racing them: each export
/// that reports success holds the snapshot's bytes, the deletion happens after them, and fsck
/// is clean.
#[test]
fn exports_at_once_and_a_racing_deletion_leave_only_true_results() {
    let test = "exports_at_once_and_a_racing_deletion_leave_only_true_results";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(2);
    let mount = pool.mount();
    let content = a_snapshot_of_random_data(&pool, &mount, 96 * MIB, 0..96 * MIB, 41);
    let mut exports: Vec<(String, ChildGuard)> = (0..3)
        .map(|i| {
            let name = format!("e{i}");
            let child = ChildGuard::quiet(&pool, &["image", "add", &name, "--from-volume", "v@s"]);
            (name, child)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let deletion = pool.run(&["snapshot", "rm", "v@s"]);
    let mut made = 0;
    for (name, child) in &mut exports {
        let status = child.wait_timeout(Duration::from_secs(120));
        match status {
            Some(s) if s.success() => {
                made += 1;
                assert_eq!(checksum(&pool, name), sha512_hex(&content), "{name}");
            }
            // Too late: the snapshot was deleted first; nothing of it may be left.
            _ => assert!(!pool.image_names().contains(name), "{name} half made"),
        }
    }
    assert!(
        deletion.status.success(),
        "{}",
        String::from_utf8_lossy(&deletion.stderr)
    );
    assert!(pool.snapshot_names("v").is_empty());
    eprintln!("{made} of 3 exports finished before the deletion");
    pool.ok(&["gc"]);
    assert_fsck_clean(&pool, "exports at once and a deletion");
    mount.unmount();
}

/// `image checksum` of an export (no mount, so no daemon computes it meanwhile) killed at
/// instants spread over its run: the image stays usable with its sum pending, fsck is clean,
/// and the next `image checksum` computes the right sum and leaves no lock behind. Two at once
/// agree.
#[test]
fn a_checksum_killed_anywhere_leaves_the_sum_pending_and_the_next_one_computes_it() {
    let pool = TestPool::new(1);
    let size = 512u64 << 20;
    pool.ok(&["volume", "create", "v", "--size", &size.to_string()]);
    pool.ok(&["snapshot", "create", "v@s"]);
    let zeros_sum = {
        let mut hasher = Sha512::new();
        let block = vec![0u8; MIB];
        for _ in 0..size / MIB as u64 {
            hasher.update(&block);
        }
        hex::encode(hasher.finalize())
    };
    let checksum_json = |name: &str| pool.json(&["image", "show", name])["sha512"].clone();

    // How long one takes here, to spread the kills over it.
    pool.ok(&["image", "add", "timed", "--from-volume", "v@s"]);
    let started = std::time::Instant::now();
    assert_eq!(checksum(&pool, "timed"), zeros_sum);
    let took = started.elapsed();

    pool.ok(&["image", "add", "e", "--from-volume", "v@s"]);
    for i in 0..4u32 {
        let at = took * (i + 1) / 5;
        let mut child = ChildGuard::quiet(&pool, &["image", "checksum", "e"]);
        std::thread::sleep(at);
        let finished = child.kill_9().is_some_and(|s| s.success());
        let what = format!("a kill at {at:?} of {took:?}");
        match finished {
            true => assert_eq!(checksum_json("e"), zeros_sum, "{what}"),
            false => assert!(
                checksum_json("e").is_null(),
                "{what}: a sum not computed whole"
            ),
        }
        assert_fsck_clean(&pool, &what);
        if finished {
            break;
        }
    }
    let both: Vec<_> = (0..2)
        .map(|_| {
            pool.command(&["image", "checksum", "e", "--json"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in both {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["sha512"], zeros_sum);
    }
    assert_eq!(checksum_json("e"), zeros_sum);
    let locks: Vec<_> = std::fs::read_dir(pool.state.join("locks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("sha512-"))
        .collect();
    assert!(locks.is_empty(), "left: {locks:?}");
    assert_fsck_clean(&pool, "the checksums");
}
