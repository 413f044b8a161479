//! The command line as an operator meets it: errors, disk labels, a full disk, `kill -9` in the
//! middle of an import, and several commands at once.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// Files the pool keeps for copies on a disk, committed or temporary.
fn pool_files(disk: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for sub in ["copies", "tmp"] {
        if let Ok(entries) = fs::read_dir(disk.join(".imgpool").join(sub)) {
            files.extend(entries.map(|e| e.unwrap().path().display().to_string()));
        }
    }
    files.sort();
    files
}

#[test]
fn init_twice_is_refused_and_commands_need_a_pool() {
    let pool = TestPool::empty();
    let line = pool.fails(&["init"]);
    assert!(line.contains("already exists"), "{line}");

    let elsewhere = pool.path("no-pool");
    let out = Command::new(BIN)
        .args(["--state-dir", elsewhere.to_str().unwrap(), "image", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("imgpool init"), "{stderr}");
}

#[test]
fn bad_names_are_refused_with_one_line() {
    let pool = TestPool::new(1);
    let source = pool.path("src.img");
    random_file(&source, MIB, 3);
    let long = "x".repeat(256);
    for name in ["a/b", "..", "x..y", "", long.as_str()] {
        let line = pool.fails(&["image", "add", name, source.to_str().unwrap()]);
        assert!(line.contains("invalid image name"), "{line}");
        let dir = pool.path("another");
        fs::create_dir_all(&dir).unwrap();
        let line = pool.fails(&["disk", "add", name, dir.to_str().unwrap()]);
        assert!(line.contains("invalid disk name"), "{line}");
    }
    let line = pool.fails(&["ref", "add", "nope", ""]);
    assert!(line.contains("holder"), "{line}");
    assert!(pool.json(&["image", "list"]).as_array().unwrap().is_empty());
    assert_eq!(pool.json(&["disk", "list"]).as_array().unwrap().len(), 1);
}

#[test]
fn unknown_images_disks_holders_and_sources_are_named() {
    let pool = TestPool::new(1);
    for args in [
        &["image", "show", "ghost"][..],
        &["image", "checksum", "ghost"],
        &["image", "rm", "ghost"],
        &["ref", "add", "ghost", "r1"],
        &["ref", "rm", "ghost", "r1"],
        &["ref", "list", "ghost"],
    ] {
        let line = pool.fails(args);
        assert!(line.contains("no image named 'ghost'"), "{args:?}: {line}");
    }
    let source = pool.path("src.img");
    random_file(&source, MIB, 4);
    pool.add_image("img", &source, 1);
    let line = pool.fails(&["ref", "rm", "img", "stranger"]);
    assert!(
        line.contains("'stranger' does not hold image 'img'"),
        "{line}"
    );

    let line = pool.fails(&[
        "image",
        "add",
        "x",
        pool.path("missing.img").to_str().unwrap(),
    ]);
    assert!(
        line.contains("missing.img") && line.contains("No such file"),
        "{line}"
    );
    let line = pool.fails(&["image", "add", "x", pool.dir.path().to_str().unwrap()]);
    assert!(line.contains("not a regular file"), "{line}");
    let empty = pool.path("empty.img");
    fs::write(&empty, b"").unwrap();
    let line = pool.fails(&["image", "add", "x", empty.to_str().unwrap()]);
    assert!(line.contains("empty"), "{line}");
    let line = pool.fails(&["image", "add", "img", source.to_str().unwrap()]);
    assert!(line.contains("already exists"), "{line}");
    let line = pool.fails(&[
        "image",
        "add",
        "y",
        source.to_str().unwrap(),
        "--copies",
        "2",
    ]);
    assert!(line.contains("2 copies need 2 usable disks"), "{line}");

    let line = pool.fails(&["disk", "add", "d9", pool.path("nowhere").to_str().unwrap()]);
    assert!(line.contains("nowhere"), "{line}");
    let line = pool.fails(&["disk", "add", "d1", pool.path("src.img").to_str().unwrap()]);
    assert!(
        line.contains("already registered") || line.contains("not a directory"),
        "{line}"
    );

    // Nothing half done: one image, on one disk, with its record and digests.
    let images = pool.json(&["image", "list"]);
    assert_eq!(images.as_array().unwrap().len(), 1);
    assert_eq!(pool_files(&pool.disks[0]).len(), 3);
}

#[test]
fn disk_labels_guard_against_the_wrong_filesystem() {
    let mut pool = TestPool::new(1);
    let other = TestPool::new(1);
    // A directory labelled by another pool.
    let line = pool.fails(&["disk", "add", "theirs", other.disks[0].to_str().unwrap()]);
    assert!(line.contains("another imgpool pool"), "{line}");
    // The same directory twice.
    let line = pool.fails(&["disk", "add", "again", pool.disks[0].to_str().unwrap()]);
    assert!(line.contains("already registered as disk 'd1'"), "{line}");

    // Another filesystem appears at a registered disk's path: the disk is no longer trusted.
    let d2 = pool.path("d2");
    fs::create_dir(&d2).unwrap();
    pool.add_disk("d2", &d2);
    fs::rename(&d2, pool.path("d2-real")).unwrap();
    fs::create_dir(&d2).unwrap();
    let disks = pool.json(&["disk", "list"]);
    let d2_state = disks
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "d2")
        .unwrap()["state"]
        .clone();
    assert_eq!(d2_state, "wrong-label");
    assert_eq!(pool.json(&["status"])["health"], "degraded");

    // Placement skips it: two copies cannot be made, one goes to the healthy disk.
    let source = pool.path("src.img");
    random_file(&source, MIB, 5);
    let line = pool.fails(&[
        "image",
        "add",
        "two",
        source.to_str().unwrap(),
        "--copies",
        "2",
    ]);
    assert!(line.contains("usable disks"), "{line}");
    pool.add_image("one", &source, 1);
    let shown = pool.json(&["image", "show", "one"]);
    assert_eq!(shown["copies"][0]["disk"], "d1");
    assert!(pool_files(&d2).is_empty());
}

#[test]
fn import_prints_identity_and_stores_one_copy_per_requested_disk() {
    let pool = TestPool::new(3);
    let source = pool.path("src.img");
    random_file(&source, 3 * MIB + 17, 6);
    let out = pool.ok(&[
        "image",
        "add",
        "img",
        source.to_str().unwrap(),
        "--copies",
        "2",
    ]);
    let expected = sha512sum(&source);
    for field in ["name:", "uuid:", "size:", "sha512:"] {
        assert!(out.contains(field), "{out}");
    }
    assert!(out.contains(&expected), "{out}");
    let shown = pool.json(&["image", "show", "img"]);
    assert_eq!(shown["sha512"], expected.as_str());
    assert_eq!(shown["size"], 3 * MIB + 17);
    let copies = shown["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 2);
    assert_ne!(copies[0]["disk"], copies[1]["disk"]);
    let uuid = shown["uuid"].as_str().unwrap();
    for copy in copies {
        let path = Path::new(copy["path"].as_str().unwrap());
        assert_eq!(sha512sum(path), expected);
        let record: serde_json::Value =
            serde_json::from_slice(&fs::read(path.with_extension("json")).unwrap()).unwrap();
        assert_eq!(record["uuid"], uuid);
        assert_eq!(record["sha512"], expected.as_str());
        assert_eq!(record["name"], "img");
    }
    let held: u64 = pool
        .json(&["disk", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["images"].as_u64().unwrap())
        .sum();
    assert_eq!(held, 2);
}

#[test]
fn a_disk_that_fills_up_during_import_gives_a_clean_error_and_keeps_nothing() {
    if !can_mount("a_disk_that_fills_up_during_import_gives_a_clean_error_and_keeps_nothing") {
        return;
    }
    let mut pool = TestPool::empty();
    let disk = LoopDisk::new(pool.dir.path(), "small", 256 * MIB, "ext4");
    pool.add_disk("small", &disk.mountpoint);
    let source = pool.path("src.img");
    random_file(&source, 160 * MIB, 7);

    // Too big from the start: refused before anything is written.
    let huge = pool.path("huge.img");
    random_file(&huge, 300 * MIB, 8);
    let line = pool.fails(&["image", "add", "huge", huge.to_str().unwrap()]);
    assert!(line.contains("not enough room"), "{line}");

    // Another tenant takes the free space while the import writes: a real ENOSPC mid-copy.
    let import = pool
        .command(&["image", "add", "img", source.to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let tmp = disk.mountpoint.join(".imgpool/tmp");
    assert!(
        wait_until(Duration::from_secs(20), || fs::read_dir(&tmp)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)),
        "the import never started writing"
    );
    let filler = disk.mountpoint.join("filler");
    let fill = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "status=none"])
        .arg(format!("of={}", filler.display()))
        .status()
        .unwrap();
    assert!(!fill.success(), "dd should fill the disk");
    let output = import.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("filled up during the import"), "{stderr}");

    fs::remove_file(&filler).unwrap();
    assert!(pool_files(&disk.mountpoint).is_empty());
    assert!(pool.json(&["image", "list"]).as_array().unwrap().is_empty());
    // The name is free again and the import works once there is room.
    pool.add_image("img", &source, 1);
}

#[test]
fn kill_9_during_import_leaves_nothing_visible_and_the_next_change_cleans_up() {
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, 256 * MIB, 9);
    let expected = sha512sum(&source);
    // Instants spread over the whole import: before the reservation, mid-copy, around commit.
    let delays_ms = [0u64, 5, 30, 80, 150, 250, 400, 700, 1000, 1500];
    let mut interrupted = 0;
    for (round, delay) in delays_ms.iter().enumerate() {
        let name = format!("img{round}");
        let mut child = pool
            .command(&[
                "image",
                "add",
                &name,
                source.to_str().unwrap(),
                "--copies",
                "2",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(*delay));
        let _ = child.kill(); // SIGKILL
        let finished = child.wait().unwrap().success();
        interrupted += usize::from(!finished);

        // Listings only read; the next command that changes the pool (here `repair`, the
        // explicit one) cleans up. What is left is all or nothing.
        let images = pool.json(&["image", "list"]);
        pool.ok(&["repair"]);
        let listed = images
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == name.as_str());
        if listed {
            let shown = pool.json(&["image", "show", &name]);
            assert_eq!(shown["sha512"], expected.as_str());
            for copy in shown["copies"].as_array().unwrap() {
                assert_eq!(
                    sha512sum(Path::new(copy["path"].as_str().unwrap())),
                    expected
                );
            }
            pool.ok(&["image", "rm", &name]);
        } else {
            assert!(
                !finished,
                "round {round}: import succeeded but the image is missing"
            );
        }
        for disk in &pool.disks {
            assert!(
                pool_files(disk).is_empty(),
                "round {round} (kill after {delay} ms): leftovers {:?}",
                pool_files(disk)
            );
        }
        let locks: Vec<_> = fs::read_dir(pool.state.join("locks"))
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(locks.is_empty(), "round {round}: lock files left {locks:?}");
    }
    assert!(
        interrupted > 0,
        "no round was killed before the import finished"
    );
    pool.add_image("final", &source, 2);
}

#[test]
fn concurrent_commands_corrupt_nothing() {
    let pool = TestPool::new(3);
    let source = pool.path("src.img");
    random_file(&source, 4 * MIB, 10);
    let spawn = |args: Vec<String>| {
        pool.command(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let src = source.to_str().unwrap().to_string();
    let mut children = Vec::new();
    for i in 0..8 {
        children.push((
            format!("add img{i}"),
            spawn(vec![
                "image".into(),
                "add".into(),
                format!("img{i}"),
                src.clone(),
                "--copies".into(),
                "2".into(),
            ]),
        ));
        children.push((
            format!("list {i}"),
            spawn(vec!["disk".into(), "list".into()]),
        ));
    }
    // Two imports racing for one name: exactly one wins, the other says why.
    let racers: Vec<_> = (0..2)
        .map(|_| {
            spawn(vec![
                "image".into(),
                "add".into(),
                "contested".into(),
                src.clone(),
            ])
        })
        .collect();
    for (what, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let outcomes: Vec<_> = racers
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    assert_eq!(outcomes.iter().filter(|o| o.status.success()).count(), 1);
    let loser = outcomes.iter().find(|o| !o.status.success()).unwrap();
    let message = String::from_utf8_lossy(&loser.stderr);
    assert!(
        message.contains("already exists") || message.contains("being imported"),
        "{message}"
    );

    // Holders added concurrently are all kept.
    let refs: Vec<_> = (0..8)
        .map(|i| {
            spawn(vec![
                "ref".into(),
                "add".into(),
                "img0".into(),
                format!("replica-{i}"),
            ])
        })
        .collect();
    for child in refs {
        assert!(child.wait_with_output().unwrap().status.success());
    }
    assert_eq!(
        pool.json(&["ref", "list", "img0"])
            .as_array()
            .unwrap()
            .len(),
        8
    );

    let images = pool.json(&["image", "list"]);
    assert_eq!(images.as_array().unwrap().len(), 9);
    let expected = sha512sum(&source);
    for image in images.as_array().unwrap() {
        assert_eq!(image["sha512"], expected.as_str());
    }
    let copies: usize = pool.disks.iter().map(|d| pool_files(d).len()).sum();
    assert_eq!(
        copies,
        (8 * 2 + 1) * 3,
        "an .img, a .json and a .digests per copy"
    );
}

#[test]
fn a_killed_daemon_is_cleaned_up_and_holders_survive_it() {
    if !can_mount("a_killed_daemon_is_cleaned_up_and_holders_survive_it") {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, 2 * MIB, 11);
    pool.add_image("img", &source, 1);
    pool.ok(&["ref", "add", "img", "replica-a"]);
    let mount = pool.mount();
    let mountpoint = mount.mountpoint.to_str().unwrap().to_string();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(mount.pid.unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(5), || !mount.daemon_alive()));

    // `status` reports the dead mount (and the next `mount` would unmount it: see
    // tests/mount_hardening.rs); `umount` works on it too.
    let status = pool.json(&["status"]);
    assert!(status["mounts"].as_array().unwrap().is_empty(), "{status}");
    assert_eq!(
        status["dead_mounts"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );
    pool.ok(&["umount", &mountpoint]);
    assert!(!is_mount_point(&mount.mountpoint));
    for disk in &pool.disks {
        assert!(!is_mount_point(&disk.join("backing-images")));
    }

    let line = pool.fails(&["image", "rm", "img"]);
    assert!(line.contains("replica-a"), "{line}");
    let remount = pool.mount();
    assert_eq!(sha512sum(&remount.image("img")), sha512sum(&source));
    remount.unmount();
    drop(mount);
}

#[test]
fn a_missing_disk_does_not_keep_the_others_from_being_served() {
    if !can_mount("a_missing_disk_does_not_keep_the_others_from_being_served") {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, 2 * MIB, 12);
    let uuid = pool.add_image("img", &source, 1);
    let d2 = &pool.disks[1];
    fs::rename(d2, pool.path("d2-gone")).unwrap();
    let mount = pool.mount();
    let served = mount.bound_view(&pool.disks[0], "img", &uuid);
    assert_eq!(sha512sum(&served), sha512sum(&source));
    assert!(!is_mount_point(&d2.join("backing-images")));
    assert_eq!(pool.json(&["status"])["health"], "degraded");
    mount.unmount();
}

/// SHA-512 of a whole file, in hex, read with plain `read`s (through the mount, the kernel's
/// FUSE client).
fn sha512_of(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha512};
    Ok(hex::encode(Sha512::digest(fs::read(path)?)))
}

/// Many imports at once, interleaved with removals, holder changes, listings and a mount reading
/// images: every import that exited 0 is in the pool afterwards and reads right. (Recovery in
/// one command used to delete another command's import that had just committed.)
#[test]
fn concurrent_imports_lose_no_committed_image() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    if !can_mount("concurrent_imports_lose_no_committed_image") {
        return;
    }
    const WORKERS: usize = 4;
    const IMPORTS: usize = 50;
    const VICTIMS: usize = 5;
    let pool = TestPool::new(3);
    let sources = pool.path("sources");
    fs::create_dir(&sources).unwrap();
    let small = |name: &str, seed: u64| {
        let path = sources.join(format!("{name}.img"));
        // 16 KiB to 400 KiB, not always a whole number of 64 KiB chunks.
        random_file(&path, 16 * 1024 + (seed * 7919) % (384 * 1024), seed);
        path
    };
    // Read through the mount all along; and images each worker removes while the others import.
    let steady = small("steady", 1);
    let steady_sha = sha512_of(&steady).unwrap();
    pool.add_image("steady", &steady, 2);
    for w in 0..WORKERS {
        for k in 0..VICTIMS {
            let name = format!("victim-{w}-{k}");
            pool.add_image(&name, &small(&name, 1000 + (w * VICTIMS + k) as u64), 1);
        }
    }
    let mount = pool.mount();

    // (name, uuid, sha512) of every import that exited 0.
    let committed: Mutex<Vec<(String, String, String)>> = Mutex::new(Vec::new());
    let problems: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match sha512_of(&mount.image("steady")) {
                    Ok(sha) if sha == steady_sha => {}
                    other => problems
                        .lock()
                        .unwrap()
                        .push(format!("steady through the mount: {other:?}")),
                }
                // The newest images, once the mount has them (it follows within 200 ms).
                let newest: Vec<_> = committed
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .take(4)
                    .cloned()
                    .collect();
                for (name, _, sha) in newest {
                    match sha512_of(&mount.image(&name)) {
                        Ok(read) if read == sha => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        other => problems
                            .lock()
                            .unwrap()
                            .push(format!("{name} through the mount: {other:?}")),
                    }
                }
                reads += 1;
            }
            reads
        });
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (pool, committed, problems, small) = (&pool, &committed, &problems, &small);
                s.spawn(move || {
                    let run = |args: &[&str]| {
                        let out = pool.run(args);
                        if !out.status.success() {
                            problems.lock().unwrap().push(format!(
                                "imgpool {args:?}: {}",
                                String::from_utf8_lossy(&out.stderr).trim()
                            ));
                        }
                        out
                    };
                    for i in 0..IMPORTS {
                        let name = format!("w{w}-{i}");
                        let source = small(&name, (w * 1000 + i + 7) as u64);
                        let sha = sha512_of(&source).unwrap();
                        let copies = (1 + i % 2).to_string();
                        let src = source.to_str().unwrap();
                        let out = run(&["image", "add", &name, src, "--copies", &copies, "--json"]);
                        if out.status.success() {
                            let printed: serde_json::Value =
                                serde_json::from_slice(&out.stdout).unwrap();
                            assert_eq!(printed["sha512"], sha.as_str(), "{name}");
                            let uuid = printed["uuid"].as_str().unwrap().to_string();
                            committed.lock().unwrap().push((name.clone(), uuid, sha));
                        }
                        match i % 10 {
                            3 => {
                                run(&["image", "rm", &format!("victim-{w}-{}", i / 10)]);
                            }
                            4 => {
                                run(&["ref", "add", &format!("w{w}-{}", i - 1), "holder"]);
                            }
                            6 => {
                                run(&["ref", "rm", &format!("w{w}-{}", i - 3), "holder"]);
                            }
                            8 => {
                                run(&["image", "list", "--json"]);
                                run(&["status", "--json"]);
                            }
                            9 => {
                                run(&["disk", "list"]);
                                run(&["ref", "list", "--json"]);
                            }
                            _ => {}
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let reads = reader.join().unwrap();
        eprintln!(
            "{} imports and the other commands took {:.1} s; the reader went {reads} rounds",
            WORKERS * IMPORTS,
            started.elapsed().as_secs_f64()
        );
    });

    let committed = committed.into_inner().unwrap();
    let listed = pool.json(&["image", "list"]);
    let listed = listed.as_array().unwrap();
    let mut missing = Vec::new();
    for (name, uuid, sha) in &committed {
        match listed.iter().find(|i| i["name"] == name.as_str()) {
            Some(image) => {
                assert_eq!(image["uuid"], uuid.as_str(), "{name}");
                assert_eq!(image["sha512"], sha.as_str(), "{name}");
                assert_eq!(image["state"], "ready", "{name}: {image}");
                for copy in image["copies"].as_array().unwrap() {
                    let path = Path::new(copy["path"].as_str().unwrap());
                    assert_eq!(&sha512_of(path).unwrap(), sha, "{name}: {path:?}");
                }
            }
            None => missing.push(name.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} imports that exited 0 are missing: {missing:?}",
        missing.len(),
        committed.len()
    );
    let problems = problems.into_inner().unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(committed.len(), WORKERS * IMPORTS);
    assert_eq!(listed.len(), 1 + WORKERS * IMPORTS, "no victim is left");
    // Every image reads right through the mount, once it has caught up with the last import.
    assert!(wait_until(Duration::from_secs(5), || committed
        .iter()
        .all(|(name, _, _)| mount.image(name).exists())));
    for (name, _, sha) in &committed {
        assert_eq!(&sha512_of(&mount.image(name)).unwrap(), sha, "{name}");
    }
    mount.unmount();
    let out = pool.run(&["fsck"]);
    assert!(
        out.status.success(),
        "fsck: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Every row of every table of the pool's store, as text.
fn store_rows(state: &Path) -> String {
    let db = rusqlite::Connection::open(state.join("pool.db")).unwrap();
    let mut out = String::new();
    for table in [
        "pool",
        "disks",
        "disk_resources",
        "images",
        "copies",
        "settings",
        "holders",
        "mounts",
        "open_handles",
    ] {
        let mut stmt = db
            .prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2"))
            .unwrap();
        let columns = stmt.column_count();
        let rows = stmt
            .query_map([], |row| {
                (0..columns)
                    .map(|i| row.get_ref(i).map(|v| format!("{v:?}")))
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap();
        for row in rows {
            out += &format!("{table}: {}\n", row.unwrap().join(", "));
        }
    }
    out
}

/// Every file (and directory) under `dirs`, recursively, sorted.
fn files_under(dirs: &[std::path::PathBuf]) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).into_iter().flatten() {
            let path = entry.unwrap().path();
            out.push(path.display().to_string());
            if path.is_dir() {
                walk(&path, out);
            }
        }
    }
    let mut out = Vec::new();
    for dir in dirs {
        walk(dir, &mut out);
    }
    out.sort();
    out
}

#[test]
fn listings_change_nothing_and_the_next_change_cleans_up() {
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, MIB, 20);
    pool.add_image("kept", &source, 2);
    pool.add_image("going", &source, 1);
    // What dead processes leave: a removal cut short; an import whose importer died after
    // writing a temporary copy (its lock file left, unlocked); a stray temporary copy; the row
    // of a killed mount daemon, with a file it had open.
    let dead_import = "00000000-0000-0000-0000-00000000dead";
    let tmp = |disk: usize, uuid: &str| {
        pool.disks[disk]
            .join(".imgpool/tmp")
            .join(format!("{uuid}.img"))
    };
    let db = rusqlite::Connection::open(pool.state.join("pool.db")).unwrap();
    db.execute_batch(&format!(
        "UPDATE images SET state = 'removing' WHERE name = 'going';
         INSERT INTO images (name, uuid, size, state, copies_wanted, created)
             VALUES ('half', '{dead_import}', 1048576, 'importing', 1, 0);
         INSERT INTO copies (image_id, disk_id)
             SELECT i.id, d.id FROM images i, disks d WHERE i.name = 'half' AND d.name = 'd1';
         INSERT INTO mounts (mountpoint, pid, started, owner)
             VALUES ('/nowhere', 1, 0, 'mount-dead');
         INSERT INTO open_handles (mount_id, image_id, count)
             SELECT m.id, i.id, 1 FROM mounts m, images i WHERE i.name = 'kept';"
    ))
    .unwrap();
    drop(db);
    fs::write(tmp(0, dead_import), b"partial").unwrap();
    fs::write(tmp(1, "stray"), b"x").unwrap();
    fs::write(
        pool.state.join(format!("locks/import-{dead_import}.lock")),
        b"",
    )
    .unwrap();
    let mut watched: Vec<_> = pool.disks.iter().map(|d| d.join(".imgpool")).collect();
    watched.push(pool.state.join("locks"));
    let (rows, files) = (store_rows(&pool.state), files_under(&watched));

    for listing in [
        &["status"][..],
        &["image", "list"],
        &["image", "show", "kept"],
        &["disk", "list"],
        &["ref", "list"],
        &["ref", "list", "kept"],
        &["config", "list"],
        &["gc", "--dry-run", "--grace", "0s"],
        &["gc", "--dry-run", "--release-hold"],
        &["fsck"],
    ] {
        let mut json = listing.to_vec();
        json.push("--json");
        for args in [listing, &json[..]] {
            pool.ok(args);
            assert_eq!(
                store_rows(&pool.state),
                rows,
                "imgpool {args:?} changed the store"
            );
            assert_eq!(
                files_under(&watched),
                files,
                "imgpool {args:?} changed files"
            );
        }
    }
    // The dead daemon is not counted, nor its open file; the partial import is not shown.
    let status = pool.json(&["status"]);
    assert!(status["mounts"].as_array().unwrap().is_empty(), "{status}");
    assert_eq!(pool.json(&["image", "show", "kept"])["open_handles"], 0);
    let names: Vec<_> = pool
        .json(&["image", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["kept"]);
    assert!(pool
        .fails(&["image", "show", "half"])
        .contains("no image named"));

    // A command that changes the pool cleans up first.
    pool.ok(&["ref", "add", "kept", "replica-a"]);
    let rows = store_rows(&pool.state);
    for gone in ["going", "half", "/nowhere", "open_handles:"] {
        assert!(!rows.contains(gone), "{gone} is left:\n{rows}");
    }
    let files = files_under(&watched);
    for gone in [dead_import, "stray", ".lock"] {
        assert!(
            !files.iter().any(|f| f.contains(gone)),
            "{gone} is left: {files:#?}"
        );
    }
    // kept's copy, record and digests on each disk, and nothing else under copies/ or tmp/.
    let left: Vec<_> = files
        .iter()
        .filter(|f| f.contains(".imgpool/copies/") || f.contains(".imgpool/tmp/"))
        .collect();
    assert_eq!(left.len(), 6, "{left:#?}");
    assert!(pool.ok(&["fsck"]).contains("clean"));
}

#[test]
fn a_dry_run_of_gc_keeps_the_hold_it_would_release() {
    let pool = TestPool::new(1);
    let source = pool.path("src.img");
    random_file(&source, MIB, 21);
    pool.add_image("a", &source, 1);
    // The store is lost and rebuilt from the disk: the holders are unknown, so gc is held.
    for file in ["pool.db", "pool.db-wal", "pool.db-shm"] {
        let _ = fs::remove_file(pool.state.join(file));
    }
    pool.ok(&[
        "fsck",
        "--repair",
        "--disk",
        pool.disks[0].to_str().unwrap(),
    ]);
    let held = |pool: &TestPool| {
        pool.json(&["status"])["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().starts_with("gc: "))
    };
    assert!(held(&pool));

    let out = pool.ok(&["gc", "--grace", "0s", "--dry-run", "--release-hold"]);
    assert!(out.contains("would allow gc again"), "{out}");
    assert!(out.contains("would remove a"), "{out}");
    let out = pool.json(&["gc", "--grace", "0s", "--dry-run", "--release-hold"]);
    assert_eq!(out["dry_run"], true, "{out}");
    assert_eq!(out["released_hold"], true, "{out}");
    assert_eq!(out["removed"], serde_json::json!(["a"]), "{out}");
    assert!(held(&pool), "a dry run released the hold");
    assert!(pool.fails(&["gc", "--grace", "0s"]).contains("gc is held"));
    pool.ok(&["image", "show", "a"]);

    let out = pool.ok(&["gc", "--grace", "0s", "--release-hold"]);
    assert!(
        out.contains("gc is allowed again") && out.contains("removed a"),
        "{out}"
    );
    assert!(!held(&pool));
    assert!(pool.json(&["image", "list"]).as_array().unwrap().is_empty());
}

// ---- hardening (issue 9): bad input, lost stores, last copies ----

/// Whether `dir` carries an imgpool label.
fn labelled(dir: &Path) -> bool {
    dir.join(".imgpool/label.json").exists()
}

#[test]
fn nested_disk_paths_are_refused_naming_the_conflict() {
    let pool = TestPool::new(1);
    let d1 = pool.disks[0].clone();
    let inside = d1.join("sub");
    fs::create_dir(&inside).unwrap();
    let state_sub = pool.state.join("sub");
    fs::create_dir(&state_sub).unwrap();
    let link = pool.path("link-into-d1");
    std::os::unix::fs::symlink(&inside, &link).unwrap();
    let dir = pool.dir.path().to_path_buf();
    for (path, conflict) in [
        (d1.join(".imgpool"), "is inside disk 'd1'"),
        (inside.clone(), "is inside disk 'd1'"),
        (link.clone(), "is inside disk 'd1'"),
        (dir.clone(), "contains the state directory"),
        (Path::new("/").to_path_buf(), "contains the state directory"),
        (pool.state.clone(), "is the state directory"),
        (state_sub.clone(), "is inside the state directory"),
    ] {
        let line = pool.fails(&["disk", "add", "nested", path.to_str().unwrap()]);
        assert!(
            line.contains(conflict) && line.contains("cannot be a disk"),
            "{path:?}: {line}"
        );
    }
    // A directory that holds a disk, beside the state directory.
    let outer = pool.path("outer");
    let inner = outer.join("inner");
    fs::create_dir_all(&inner).unwrap();
    let mut pool = pool;
    pool.add_disk("inner", &inner);
    let line = pool.fails(&["disk", "add", "outer", outer.to_str().unwrap()]);
    assert!(line.contains("contains disk 'inner'"), "{line}");

    // Nothing was labelled, and `--copies 2` cannot land twice in one tree.
    for path in [&inside, &state_sub, &outer, &dir] {
        assert!(!labelled(path), "{path:?} was labelled");
    }
    assert_eq!(pool.json(&["disk", "list"]).as_array().unwrap().len(), 2);
}

/// Two `disk add` of nested (or equal) paths at once: one wins, the other is refused, and the
/// winner's label is its own.
#[test]
fn concurrent_adds_of_nested_disks_register_one() {
    let pool = TestPool::empty();
    for round in 0..6 {
        let outer = pool.path(&format!("outer{round}"));
        let inner = if round % 2 == 0 {
            outer.join("inner")
        } else {
            outer.clone()
        };
        fs::create_dir_all(&inner).unwrap();
        let spawn = |name: String, path: &Path| {
            pool.command(&["disk", "add", &name, path.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let a = spawn(format!("a{round}"), &outer);
        let b = spawn(format!("b{round}"), &inner);
        let outcomes = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
        let won: Vec<bool> = outcomes.iter().map(|o| o.status.success()).collect();
        assert_eq!(
            won.iter().filter(|w| **w).count(),
            1,
            "round {round}: {:?}",
            outcomes
                .iter()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .collect::<Vec<_>>()
        );
        let loser = outcomes.iter().find(|o| !o.status.success()).unwrap();
        failed_cleanly(&format!("round {round}"), loser);
    }
    let disks = pool.json(&["disk", "list"]);
    let disks = disks.as_array().unwrap();
    assert_eq!(disks.len(), 6, "{disks:?}");
    for disk in disks {
        assert_eq!(disk["state"], "healthy", "{disk}");
    }
    // Of two nested directories, only the one registered carries a label.
    for round in (0..6).step_by(2) {
        let outer = pool.path(&format!("outer{round}"));
        for dir in [outer.join("inner"), outer] {
            let registered = disks.iter().any(|d| d["path"].as_str() == dir.to_str());
            assert_eq!(labelled(&dir), registered, "round {round}: {dir:?}");
        }
    }
}

#[test]
fn a_mount_inside_a_disk_or_the_state_dir_is_refused() {
    if !can_mount("a_mount_inside_a_disk_or_the_state_dir_is_refused") {
        return;
    }
    let pool = TestPool::new(2);
    let d1 = pool.disks[0].clone();
    let inside = d1.join("sub");
    fs::create_dir(&inside).unwrap();
    let around = pool.path("around");
    fs::create_dir(&around).unwrap();
    let state_sub = pool.state.join("sub");
    fs::create_dir(&state_sub).unwrap();
    for (path, conflict) in [
        (d1.join(".imgpool"), "is inside disk 'd1'"),
        (inside.clone(), "is inside disk 'd1'"),
        (d1.clone(), "is disk 'd1'"),
        (pool.state.clone(), "is the state directory"),
        (state_sub.clone(), "is inside the state directory"),
        (pool.dir.path().to_path_buf(), "contains"),
    ] {
        // Should the mount be made after all, the guard unmounts it (and its bind mounts).
        let _unmount = MountGuard {
            state: pool.state.clone(),
            mountpoint: path.clone(),
            disks: pool.disks.clone(),
            pid: None,
        };
        let line = pool.fails(&["mount", path.to_str().unwrap()]);
        assert!(line.contains(conflict), "{path:?}: {line}");
        assert!(!is_mount_point(&path), "{path:?} was mounted");
    }
    for disk in pool.json(&["disk", "list"]).as_array().unwrap() {
        assert_eq!(disk["state"], "healthy", "{disk}");
    }

    // A disk reached through a bind mount (another path to the same directory) is recognised.
    let alias = pool.path("alias");
    fs::create_dir(&alias).unwrap();
    let bind = Command::new("mount")
        .arg("--bind")
        .arg(&d1)
        .arg(&alias)
        .status()
        .unwrap();
    assert!(bind.success());
    // Dropping it unmounts whatever is mounted there, the bind mount here.
    let alias_mount = TmpfsMount {
        path: alias.clone(),
    };
    let line = pool.fails(&["disk", "add", "x", alias.join("sub").to_str().unwrap()]);
    assert!(line.contains("is inside disk 'd1'"), "{line}");
    let line = pool.fails(&["disk", "add", "x", alias.to_str().unwrap()]);
    assert!(line.contains("is disk 'd1'"), "{line}");

    drop(alias_mount);

    // A disk around the running mount would hold the mount in its tree.
    let mountpoint = around.join("mnt");
    fs::create_dir(&mountpoint).unwrap();
    let mut mount = MountGuard {
        state: pool.state.clone(),
        mountpoint: mountpoint.clone(),
        disks: Vec::new(),
        pid: None,
    };
    pool.ok(&["mount", mountpoint.to_str().unwrap(), "--no-bind"]);
    mount.pid = pool.json(&["status"])["mounts"][0]["pid"]
        .as_u64()
        .map(|pid| pid as i32);
    let line = pool.fails(&["disk", "add", "x", around.to_str().unwrap()]);
    assert!(line.contains("contains the pool's mount"), "{line}");
    assert!(!labelled(&around));
    mount.unmount();
}

#[test]
fn a_fifo_or_a_character_device_is_refused_without_waiting() {
    let pool = TestPool::new(1);
    let fifo = pool.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for source in [
        fifo.as_path(),
        Path::new("/dev/null"),
        Path::new("/dev/zero"),
    ] {
        let err = pool.path("add.err");
        let mut import = ChildGuard(Some(
            pool.command(&["image", "add", "x", source.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(fs::File::create(&err).unwrap())
                .spawn()
                .unwrap(),
        ));
        let status = import
            .wait_timeout(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("image add {source:?} hangs"));
        let out = std::process::Output {
            status,
            stdout: Vec::new(),
            stderr: fs::read(&err).unwrap(),
        };
        let line = failed_cleanly(&format!("image add {source:?}"), &out);
        assert!(line.contains("not a regular file"), "{source:?}: {line}");
    }
    assert!(pool.json(&["image", "list"]).as_array().unwrap().is_empty());
    assert!(pool_files(&pool.disks[0]).is_empty());
}

/// Rewrites 4 KiB of `path` at a moving offset every few milliseconds until `stop`.
fn keep_rewriting(path: &Path, stop: &std::sync::atomic::AtomicBool) -> u64 {
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    let size = file.metadata().unwrap().len();
    let mut writes = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let block = [(writes % 251) as u8 + 1; 4096];
        let offset = (writes * 7919 * 4096) % (size - 4096);
        file.write_all_at(&block, offset).unwrap();
        writes += 1;
        std::thread::sleep(Duration::from_millis(3));
    }
    writes
}

#[test]
fn a_source_rewritten_during_the_import_is_refused_and_nothing_is_kept() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, 64 * MIB, 30);
    let stop = AtomicBool::new(false);
    /// Stops the writer when the test ends, also by a failed assertion (the scope waits for it).
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| keep_rewriting(&source, &stop));
        let _stop = StopOnDrop(&stop);
        // The writer runs through every import: each one reads the file while it changes.
        for round in 0..3 {
            let line = pool.fails(&[
                "image",
                "add",
                &format!("img{round}"),
                source.to_str().unwrap(),
                "--copies",
                "2",
            ]);
            assert!(
                line.contains("changed while it was imported") && line.contains("nothing was kept"),
                "round {round}: {line}"
            );
            for disk in &pool.disks {
                assert!(pool_files(disk).is_empty(), "{:?}", pool_files(disk));
            }
            assert!(pool.json(&["image", "list"]).as_array().unwrap().is_empty());
        }
        stop.store(true, Ordering::Relaxed);
        assert!(writer.join().unwrap() > 0);
    });
    // Once nothing writes to it, the file imports whole, as it is now.
    pool.add_image("img", &source, 2);
    assert_eq!(
        pool.json(&["image", "show", "img"])["sha512"],
        sha512sum(&source).as_str()
    );
}

#[test]
fn settings_are_range_checked_and_listed_as_numbers() {
    let pool = TestPool::new(3);
    for (key, value, range) in [
        ("copies", "99", "from 1 to 3"),
        ("copies", "4", "from 1 to 3"),
        ("repair-bandwidth", "1", "at least 1MiB/s"),
        ("probe-interval", "1d", "from 1s to 10m"),
        ("probe-interval", "0s", "from 1s to 10m"),
        ("repair-jobs", "1000", "from 1 to 64"),
    ] {
        let line = pool.fails(&["config", "set", key, value]);
        assert!(line.contains(range), "{key} {value}: {line}");
    }
    let listed = pool.json(&["config", "list"]);
    assert_eq!(
        listed,
        serde_json::json!({"copies": 1, "repair-jobs": 2, "repair-bandwidth": 0, "probe-interval": 10})
    );
    pool.ok(&["config", "set", "copies", "3"]);
    pool.ok(&["config", "set", "repair-bandwidth", "200MiB"]);
    pool.ok(&["config", "set", "probe-interval", "90s"]);
    let listed = pool.json(&["config", "list"]);
    assert_eq!(
        listed,
        serde_json::json!({"copies": 3, "repair-jobs": 2, "repair-bandwidth": 200 * MIB, "probe-interval": 90})
    );
    // The plain listing keeps its display strings.
    let table = pool.ok(&["config", "list"]);
    assert!(
        table.contains("200.0 MiB/s") && table.contains("1m 30s"),
        "{table}"
    );
}

/// A slow repair (1 MiB/s) of a 4 MiB copy, its stderr and stdout in files: off a terminal it
/// prints its result and nothing else; on a terminal (a pty from `script`) a progress bar.
#[test]
fn a_slow_repair_shows_a_bar_on_a_terminal_and_nothing_extra_off_one() {
    let setup = |seed| {
        let pool = TestPool::new(2);
        let source = pool.path("src.img");
        random_file(&source, 4 * MIB, seed);
        pool.add_image("img", &source, 1);
        pool.ok(&["config", "set", "repair-bandwidth", "1MiB"]);
        pool.ok(&["image", "set", "img", "--copies", "2"]);
        pool
    };
    let pool = setup(31);
    let out = pool.run(&["repair"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("copied 'img' to 'd"),
        "{stdout}"
    );
    assert_eq!(pool.json(&["image", "show", "img"])["healthy_copies"], 2);

    let pool = setup(32);
    // script(1) gives the command a pseudo-terminal and copies what it draws to its stdout.
    let typescript = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!(
            "IMGPOOL_STATE_DIR={} {BIN} repair",
            pool.state.display()
        ))
        .arg("/dev/null")
        .env("TERM", "xterm")
        .env_remove("IMGPOOL_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&typescript.stdout);
    assert!(typescript.status.success(), "{screen}");
    assert!(
        screen.contains("copy img to d") && screen.contains("/4.00 MiB"),
        "no progress bar on the terminal: {screen:?}"
    );
    assert_eq!(pool.json(&["image", "show", "img"])["healthy_copies"], 2);
}

/// The leaf subcommands (those without subcommands of their own).
fn leaf_commands() -> Vec<Vec<String>> {
    let all = subcommands(&[]);
    all.iter()
        .filter(|c| !all.iter().any(|o| o.len() > c.len() && o.starts_with(c)))
        .cloned()
        .collect()
}

/// Commands whose output is not a result: a script for the shell.
const NO_JSON: &[&str] = &["completions"];

#[test]
fn every_command_that_prints_a_listing_or_a_result_takes_json() {
    let leaves = leaf_commands();
    assert!(leaves.len() > 30, "{leaves:?}");
    for leaf in leaves {
        let mut args: Vec<&str> = leaf.iter().map(String::as_str).collect();
        args.push("--help");
        let out = Command::new(BIN).args(&args).output().unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        let takes_json = help.lines().any(|l| l.trim_start().starts_with("--json"));
        assert_eq!(
            takes_json,
            !NO_JSON.contains(&leaf.join(" ").as_str()),
            "imgpool {}: --json {}",
            leaf.join(" "),
            if takes_json { "unexpected" } else { "missing" }
        );
    }
}

/// Every command with --json, run with it on a real pool (mounted, for those that need a
/// daemon): its stdout is one JSON document, and nothing else.
#[test]
fn every_json_output_is_one_valid_json_document() {
    let test = "every_json_output_is_one_valid_json_document";
    if !can_mount(test) {
        return;
    }
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, MIB, 33);
    let d3 = pool.dir.path().join("d3");
    fs::create_dir(&d3).unwrap();
    let d3 = d3.to_str().unwrap().to_string();
    let man = pool.path("man");
    let man = man.to_str().unwrap();
    let mnt = pool.dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mnt = mnt.to_str().unwrap().to_string();
    let fresh = pool.dir.path().join("fresh");
    let fresh = fresh.to_str().unwrap().to_string();
    let source = source.to_str().unwrap().to_string();
    // In an order that works: each command's pool state comes from those before it.
    let runs: Vec<Vec<&str>> = vec![
        vec!["--state-dir", &fresh, "init"],
        vec!["disk", "add", "d3", &d3],
        vec!["disk", "list"],
        vec!["image", "add", "img", &source],
        vec!["image", "list"],
        vec!["image", "show", "img"],
        vec!["image", "checksum", "img"],
        vec!["image", "set", "img", "--copies", "2"],
        vec!["ref", "add", "img", "holder"],
        vec!["ref", "list"],
        vec!["ref", "rm", "img", "holder"],
        vec!["repair"],
        vec!["scrub"],
        vec!["fsck"],
        vec!["gc", "--grace", "1h"],
        vec!["config", "set", "copies", "1"],
        vec!["config", "list"],
        vec!["volume", "create", "vm", "--image", "img"],
        vec!["volume", "list"],
        vec!["volume", "show", "vm"],
        vec!["volume", "resize", "vm", "2MiB"],
        vec!["snapshot", "create", "vm@one"],
        vec!["snapshot", "create", "vm@two"],
        vec!["snapshot", "list", "vm"],
        vec!["volume", "rollback", "vm@one", "--destroy-newer"],
        vec!["snapshot", "rm", "vm@one"],
        vec!["volume", "rm", "vm"],
        vec!["mount", &mnt],
        vec!["status"],
        vec!["cache", "drop"],
        vec!["log-level"],
        vec!["log-level", "info"],
        vec!["umount", &mnt],
        vec!["disk", "evict", "d3"],
        vec!["disk", "fail", "d2", "--force"],
        vec!["disk", "online", "d2"],
        vec!["image", "rm", "img"],
        vec!["disk", "rm", "d3"],
        vec!["manpages", man],
    ];
    // Unmounts what `mount` made if the test fails before `umount`.
    let _guard = MountGuard {
        state: pool.state.clone(),
        mountpoint: PathBuf::from(&mnt),
        disks: pool
            .disks
            .iter()
            .cloned()
            .chain([PathBuf::from(&d3)])
            .collect(),
        pid: None,
    };
    let mut covered = std::collections::BTreeSet::new();
    for run in &runs {
        let mut args = run.clone();
        args.push("--json");
        let out = pool.run(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "imgpool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap_or_else(|e| {
            panic!("imgpool {args:?} printed no JSON document ({e}): {stdout}")
        });
        // The command's path: its words before the first argument that is not one.
        let words: Vec<&str> = run
            .iter()
            .skip_while(|w| w.starts_with("--state-dir") || **w == fresh.as_str())
            .copied()
            .collect();
        covered.insert(words);
    }
    // `send` writes a stream on its standard output (its --json summary on standard error),
    // which `recv` reads on its standard input.
    pool.ok(&["volume", "create", "sent", "--size", "1MiB"]);
    pool.ok(&["snapshot", "create", "sent@s"]);
    let sent = pool
        .command(&["send", "sent@s", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&sent.stderr).unwrap_or_else(|e| {
        panic!(
            "imgpool send --json printed no JSON document on standard error ({e}): {}",
            String::from_utf8_lossy(&sent.stderr)
        )
    });
    covered.insert(vec!["send", "sent@s"]);
    let mut child = pool
        .command(&["recv", "received", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &sent.stdout).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
    covered.insert(vec!["recv", "received"]);
    // `copy` runs both (here: this pool to this pool), its summary on standard output.
    let copied = pool.run(&["copy", "sent", "copied", "--json"]);
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&copied.stdout).unwrap_or_else(|e| {
        panic!(
            "imgpool copy --json printed no JSON document ({e}): {}",
            String::from_utf8_lossy(&copied.stdout)
        )
    });
    covered.insert(vec!["copy", "sent"]);
    for leaf in leaf_commands() {
        let name = leaf.join(" ");
        if NO_JSON.contains(&name.as_str()) {
            continue;
        }
        assert!(
            covered
                .iter()
                .any(|run| run.len() >= leaf.len() && run[..leaf.len()] == leaf[..]),
            "imgpool {name} --json is not run by this test"
        );
    }
}

/// Removes the store and its WAL, as a lost state directory disk would.
fn lose_store(pool: &TestPool) {
    for file in ["pool.db", "pool.db-wal", "pool.db-shm"] {
        let _ = fs::remove_file(pool.state.join(file));
    }
}

/// Two images (one with two copies, one with one) and a holder.
fn pool_with_images(seed: u64) -> (TestPool, Vec<(String, String)>) {
    let pool = TestPool::new(2);
    let mut images = Vec::new();
    for (name, copies) in [("a", 2), ("b", 1)] {
        let source = pool.path(&format!("{name}.img"));
        random_file(&source, 2 * MIB + 5, seed + copies as u64);
        pool.add_image(name, &source, copies);
        images.push((name.to_string(), sha512sum(&source)));
    }
    pool.ok(&["ref", "add", "a", "replica-1"]);
    (pool, images)
}

/// Every image is back, ready, with its copies holding the right bytes.
fn assert_recovered(pool: &TestPool, images: &[(String, String)]) {
    for (name, sha512) in images {
        let shown = pool.json(&["image", "show", name]);
        assert_eq!(shown["state"], "ready", "{shown}");
        assert_eq!(shown["sha512"], sha512.as_str());
        for copy in shown["copies"].as_array().unwrap() {
            assert_eq!(
                sha512sum(Path::new(copy["path"].as_str().unwrap())),
                *sha512
            );
        }
    }
    assert!(pool.ok(&["fsck"]).contains("clean"));
}

/// Advice that could lead an operator to delete the disks' data, or to make a new pool.
fn assert_safe_advice(line: &str) {
    assert!(line.contains("fsck --repair"), "{line}");
    for bad in ["remove", "delete", "rm -", "run `imgpool init`"] {
        assert!(!line.contains(bad), "advice to {bad}: {line}");
    }
}

#[test]
fn a_lost_store_leads_to_fsck_repair_which_recovers_every_image() {
    let (pool, images) = pool_with_images(40);
    lose_store(&pool);
    for args in [
        &["status"][..],
        &["image", "list"],
        &["ref", "add", "a", "r2"],
    ] {
        let line = pool.fails(args);
        assert!(line.contains("is missing"), "{args:?}: {line}");
        assert_safe_advice(&line);
    }
    let line = pool.fails(&["fsck"]);
    assert_safe_advice(&line);
    pool.ok(&[
        "fsck",
        "--repair",
        "--disk",
        pool.disks[0].to_str().unwrap(),
        "--disk",
        pool.disks[1].to_str().unwrap(),
    ]);
    assert_recovered(&pool, &images);
}

#[test]
fn init_after_a_lost_store_is_undone_by_fsck_repair() {
    let (pool, images) = pool_with_images(41);
    lose_store(&pool);
    pool.ok(&["init"]);
    assert!(pool.json(&["image", "list"]).as_array().unwrap().is_empty());
    let disk_args = [
        "--disk",
        pool.disks[0].to_str().unwrap(),
        "--disk",
        pool.disks[1].to_str().unwrap(),
    ];
    // The old disks are another pool's now: the advice leads to the rebuild, never to
    // deleting their labels.
    let line = pool.fails(&["disk", "add", "d1", pool.disks[0].to_str().unwrap()]);
    assert!(line.contains("another imgpool pool"), "{line}");
    assert_safe_advice(&line);
    let mut check = vec!["fsck"];
    check.extend_from_slice(&disk_args);
    let line = pool.fails(&check);
    assert!(line.contains("this pool is empty"), "{line}");
    assert_safe_advice(&line);
    let mut repair = vec!["fsck", "--repair"];
    repair.extend_from_slice(&disk_args);
    let out = pool.ok(&repair);
    assert!(out.contains("set the old store aside"), "{out}");
    assert_recovered(&pool, &images);
    let aside: Vec<_> = fs::read_dir(&pool.state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pool.db.empty-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    // gc stays held until the holders are back.
    assert!(pool.fails(&["gc", "--grace", "0s"]).contains("gc is held"));
}

#[test]
fn a_damaged_store_leads_to_fsck_repair_which_sets_it_aside_and_recovers() {
    use std::os::unix::fs::FileExt;
    for damage in ["empty", "not a database", "damaged pages"] {
        let (pool, images) = pool_with_images(42);
        // Checkpointed, so that the damage is to the whole store.
        let db = pool.state.join("pool.db");
        rusqlite::Connection::open(&db)
            .unwrap()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let file = fs::OpenOptions::new().write(true).open(&db).unwrap();
        match damage {
            "empty" => file.set_len(0).unwrap(),
            "not a database" => file.write_all_at(&[0x5a; 100], 0).unwrap(),
            _ => {
                let len = file.metadata().unwrap().len();
                file.write_all_at(&vec![0xff; (len - 4096) as usize], 4096)
                    .unwrap()
            }
        }
        drop(file);
        for args in [&["status"][..], &["init"], &["fsck"]] {
            let line = pool.fails(args);
            assert!(line.contains("damaged"), "{damage}: {args:?}: {line}");
            assert_safe_advice(&line);
        }
        let out = pool.ok(&[
            "fsck",
            "--repair",
            "--disk",
            pool.disks[0].to_str().unwrap(),
            "--disk",
            pool.disks[1].to_str().unwrap(),
        ]);
        assert!(out.contains("set the old store aside"), "{damage}: {out}");
        assert_recovered(&pool, &images);
        let aside = fs::read_dir(&pool.state)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("pool.db.damaged-")
            })
            .count();
        assert!(aside >= 1, "{damage}: the damaged store was not kept");
    }
}

#[test]
fn an_unreachable_state_directory_is_not_taken_for_a_lost_store() {
    let (pool, _) = pool_with_images(43);
    let before = store_rows(&pool.state);
    let mode = |m| {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&pool.state, fs::Permissions::from_mode(m)).unwrap()
    };
    mode(0o000);
    // Root reads everything: take away its right to bypass file modes.
    let run = |args: &[&str]| {
        let mut command = if nix::unistd::geteuid().is_root() {
            let mut c = Command::new("setpriv");
            c.args([
                "--inh-caps=-all",
                "--bounding-set=-dac_override,-dac_read_search,-fowner",
                "--",
                BIN,
            ]);
            c
        } else {
            Command::new(BIN)
        };
        command
            .env("IMGPOOL_STATE_DIR", &pool.state)
            .env_remove("IMGPOOL_LOG")
            .args(args)
            .output()
            .unwrap()
    };
    for args in [&["status"][..], &["fsck", "--repair"], &["init"]] {
        let line = failed_cleanly(&format!("{args:?}"), &run(args));
        if args[0] != "init" {
            assert!(
                line.contains("cannot reach the metadata store"),
                "{args:?}: {line}"
            );
            assert!(line.contains("may be intact"), "{line}");
            assert_safe_advice(&line);
        }
    }
    mode(0o700);
    assert_eq!(store_rows(&pool.state), before, "the store was changed");
    pool.ok(&["status"]);
}

#[test]
fn a_read_only_state_filesystem_says_so_and_loses_nothing() {
    if !can_mount("a_read_only_state_filesystem_says_so_and_loses_nothing") {
        return;
    }
    let mut pool = TestPool::empty();
    let state_disk = LoopDisk::new(pool.dir.path(), "statefs", 64 * MIB, "ext4");
    let state = state_disk.mountpoint.join("state");
    pool.state = state.clone();
    pool.ok(&["init"]);
    let d1 = pool.path("d1");
    fs::create_dir(&d1).unwrap();
    pool.add_disk("d1", &d1);
    let source = pool.path("a.img");
    random_file(&source, MIB, 44);
    pool.add_image("a", &source, 1);
    let remount = |how: &str| {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{how}")])
            .arg(&state_disk.mountpoint)
            .status()
            .unwrap();
        assert!(status.success(), "remount {how}");
    };
    remount("ro");
    let line = pool.fails(&["ref", "add", "a", "r1"]);
    assert!(line.contains("read-only"), "{line}");
    assert_safe_advice(&line);
    let status = pool.run(&["status"]);
    if !status.status.success() {
        let line = failed_cleanly("status", &status);
        assert!(line.contains("read-only"), "{line}");
        assert_safe_advice(&line);
    }
    remount("rw");
    pool.ok(&["fsck", "--repair"]);
    assert_eq!(
        pool.json(&["image", "show", "a"])["sha512"],
        sha512sum(&source).as_str()
    );
}

#[test]
fn failing_or_evicting_the_last_copy_asks_for_force() {
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, MIB, 45);
    pool.add_image("both", &source, 2);
    pool.add_image("one", &source, 1);
    let holder = pool.json(&["image", "show", "one"])["copies"][0]["disk"]
        .as_str()
        .unwrap()
        .to_string();
    let other = if holder == "d1" { "d2" } else { "d1" };
    let line = pool.fails(&["disk", "fail", &holder]);
    assert!(
        line.contains("last serving copy of one") && line.contains("--force"),
        "{line}"
    );
    let state = |name: &str| {
        pool.json(&["disk", "list"])
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state(&holder), "healthy");
    // Evicting is how to move it off while another disk has room.
    pool.ok(&["disk", "evict", &holder]);
    pool.ok(&["disk", "online", &holder]);
    // The other disk holds no last copy: no question asked.
    pool.ok(&["disk", "fail", other]);
    pool.ok(&["disk", "online", other]);
    pool.ok(&["disk", "fail", &holder, "--force"]);
    assert_eq!(state(&holder), "failed");
    assert_eq!(pool.json(&["image", "show", "one"])["state"], "failed");
    pool.ok(&["disk", "online", &holder]);

    // With nowhere for the copy to go, eviction could never finish.
    let single = TestPool::new(1);
    single.add_image("one", &source, 1);
    let line = single.fails(&["disk", "evict", "d1"]);
    assert!(
        line.contains("no other disk can take it") && line.contains("--force"),
        "{line}"
    );
    single.ok(&["disk", "evict", "d1", "--force"]);
}

#[test]
fn a_full_disk_is_flagged_in_status() {
    if !can_mount("a_full_disk_is_flagged_in_status") {
        return;
    }
    let mut pool = TestPool::new(1);
    let small = TmpfsMount::new(&pool.path("small"));
    pool.add_disk("small", &small.path);
    assert_eq!(pool.json(&["status"])["health"], "ok");
    let fill = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k", "status=none"])
        .arg(format!("of={}", small.path.join("hog").display()))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!fill.success(), "dd should fill the disk");
    let status = pool.json(&["status"]);
    assert_eq!(status["health"], "degraded", "{status}");
    let problems = status["problems"].to_string();
    assert!(problems.contains("disk small: full"), "{problems}");
    assert_eq!(status["disks"]["healthy"], 2, "a full disk still serves");
    let small_disk = pool
        .json(&["disk", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "small")
        .unwrap()
        .clone();
    assert_eq!(small_disk["full"], true, "{small_disk}");
    assert_eq!(small_disk["state"], "healthy", "{small_disk}");
    fs::remove_file(small.path.join("hog")).unwrap();
    drop(small);
}

#[test]
fn holders_with_control_characters_are_refused() {
    let pool = TestPool::new(1);
    let source = pool.path("src.img");
    random_file(&source, MIB, 46);
    pool.add_image("img", &source, 1);
    for holder in ["replica\nforged line", "tab\there", "esc\u{1b}[31mred"] {
        let line = pool.fails(&["ref", "add", "img", holder]);
        assert!(line.contains("control character"), "{line}");
    }
    assert!(pool.json(&["ref", "list"]).as_array().unwrap().is_empty());
}

/// `disk fail` of the two disks holding an image's two copies, at once: the check for the last
/// serving copy is made in the transaction that fails the disk, so one of them is refused.
#[test]
fn two_disk_fails_at_once_leave_the_last_copy_serving() {
    let pool = TestPool::new(2);
    let source = pool.path("src.img");
    random_file(&source, MIB, 47);
    pool.add_image("img", &source, 2);
    for round in 0..5 {
        let spawn = |disk: &str| {
            pool.command(&["disk", "fail", disk])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn("d1"), spawn("d2"));
        let outcomes = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
        assert_eq!(
            outcomes.iter().filter(|o| o.status.success()).count(),
            1,
            "round {round}"
        );
        let refused = outcomes.iter().find(|o| !o.status.success()).unwrap();
        let line = failed_cleanly(&format!("round {round}"), refused);
        assert!(line.contains("last serving copy of img"), "{line}");
        let shown = pool.json(&["image", "show", "img"]);
        assert_eq!(shown["state"], "degraded", "round {round}: {shown}");
        let failed = if outcomes[0].status.success() {
            "d1"
        } else {
            "d2"
        };
        pool.ok(&["disk", "online", failed]);
        pool.ok(&["repair"]);
        assert_eq!(pool.json(&["image", "show", "img"])["state"], "ready");
    }
}

/// Every subcommand, nested ones included, as `imgpool --help` lists them.
fn subcommands(path: &[&str]) -> Vec<Vec<String>> {
    let out = Command::new(BIN).args(path).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let mut found = Vec::new();
    let mut in_commands = false;
    for line in help.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            let Some(name) = line
                .strip_prefix("  ")
                .and_then(|l| l.split_whitespace().next())
            else {
                break;
            };
            if name == "help" {
                continue;
            }
            let mut sub: Vec<String> = path.iter().map(|s| s.to_string()).collect();
            sub.push(name.to_string());
            let refs: Vec<&str> = sub.iter().map(String::as_str).collect();
            found.extend(subcommands(&refs));
            found.push(sub);
        }
    }
    found
}

/// Completions for bash, zsh and fish and a manual page name every subcommand, and the install
/// script lays them out with the binary and the unit.
#[test]
fn completions_and_manual_pages_cover_every_subcommand() {
    let all = subcommands(&[]);
    assert!(all.len() > 30, "{all:?}");
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        let script = String::from_utf8(out.stdout).unwrap();
        for sub in &all {
            let last = sub.last().unwrap();
            assert!(
                script.contains(last.as_str()),
                "{shell} completions lack '{}'",
                sub.join(" ")
            );
        }
    }
    let stage = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh"))
        .env("DESTDIR", stage.path())
        .env("IMGPOOL_BIN", BIN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let man = stage.path().join("usr/local/share/man/man1");
    for sub in &all {
        let page = man.join(format!("imgpool-{}.1", sub.join("-")));
        let text = fs::read_to_string(&page).unwrap_or_else(|e| panic!("{page:?}: {e}"));
        assert!(
            text.contains(".TH") && text.contains(".SH NAME"),
            "{page:?}"
        );
    }
    for file in [
        "usr/local/bin/imgpool",
        "etc/systemd/system/imgpool.service",
        "usr/share/bash-completion/completions/imgpool",
        "usr/share/zsh/vendor-completions/_imgpool",
        "usr/share/fish/vendor_completions.d/imgpool.fish",
        "usr/local/share/man/man1/imgpool.1",
    ] {
        assert!(stage.path().join(file).is_file(), "{file} not installed");
    }
}
